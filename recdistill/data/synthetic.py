"""A seeded synthetic world with a known ground truth.

Every user ``u`` and item ``i`` has latent factors; the true relevance of ``i`` to ``u`` after
``u``'s history ``h`` (items, newest first) is

    relevance(u, i | h) = p_u · q_i + w_u · log_popularity_i
                          + feature_interaction · region_genre[region_u] · g_i
                          + sequence_weight · s_u(h) · b_i,
    s_u(h) = Σ_r sequence_decay^r · a_{h_r}

- ``q_i`` is built from the item's genre centroids plus noise; genre sizes follow a power law;
  ``p_u · q_i`` has rank ``dim`` (32 by default), more than a small student's embedding width;
- ``log_popularity_i`` is a centred Zipf log-weight: item popularity is power-law;
- ``p_u`` is built from one or two favourite genres plus noise; users of region ``east`` carry
  an extra taste shift towards two niche genres the rest of the population rarely favours;
- ``w_u`` is the user's popularity sensitivity: light users follow the crowd, heavy users
  seek the niche, cold-start users follow the crowd most;
- ``region_genre`` is a ``[regions, genres]`` N(0, 1) matrix and ``g_i`` the item's genre
  weights (1 for its primary genre, 0.5 for its secondary one): an interaction of a user
  feature with an item feature;
- ``a_i`` (what ``i`` leads to) and ``b_i`` (what ``i`` follows) are vectors in R^k,
  ``k = sequence_dim``, of coordinates with variance 1 / sqrt(k), so that ``a_j · b_i`` has
  unit variance; the sequence state ``s_u`` remembers the recent items, the newest most, and
  makes the next item depend on them;
- ``age_bucket`` has no effect at all: a placebo segment on which no model should differ.

A user's number of interactions comes from a log-normal activity distribution (plus a
cold-start group with 3 to 5 interactions). The user first gets a pool of
``min(items, pool_factor × activity)`` items drawn without replacement from the softmax of the
history-free part of the relevance (Gumbel top-k), then walks through it: each next item is
drawn from the softmax of the full relevance over the pool items not yet taken (Gumbel-max),
and the state moves on, ``s ← a_j + sequence_decay · s`` from ``s = 0``. Timestamps increase
along the sequence, spread over the user's active period.

The truth is saved beside the data (``truth.safetensors`` + ``truth.json``) so that any
(user, item) pair can be scored later with :meth:`GroundTruth.load` and
:meth:`GroundTruth.relevance`, by default after the user's whole generated sequence.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import load_file, save_file
from tqdm import tqdm

from recdistill.data.tables import (
    INTERACTIONS,
    INTERACTIONS_SCHEMA,
    ITEMS,
    META,
    USERS,
    rows_of_ids,
    write_json,
)

SOURCE = "synthetic"
USER_FEATURES = ("region", "age_bucket")
REGIONS = ("north", "south", "east")
REGION_SHARES = (0.45, 0.35, 0.20)
SHIFTED_REGION = "east"
AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55+")
AGE_SHARES = (0.2, 0.3, 0.25, 0.15, 0.1)
TRUTH_TENSORS = "truth.safetensors"
TRUTH_JSON = "truth.json"
# Users are simulated in chunks of about this many cells: their relevance logits over all
# items, and the b_i vectors of their pools.
CHUNK_CELLS = 16_000_000
# Interactions are buffered up to this many rows per Parquet row group.
ROW_GROUP_ROWS = 1_000_000
# Floor of the uniforms turned into Gumbel noise, so that none is infinite.
TINY = np.finfo(np.float32).tiny


@dataclass(frozen=True)
class SyntheticSpec:
    users: int = 4000
    items: int = 2000
    seed: int = 0
    dim: int = 32
    genres: int = 18
    mean_activity: float = 30.0
    activity_sigma: float = 1.0
    min_activity: int = 8
    max_activity_share: float = 0.25
    cold_start_share: float = 0.1
    popularity_exponent: float = 1.0
    region_shift: float = 1.5
    feature_interaction: float = 1.0
    sequence_dim: int = 8
    sequence_decay: float = 0.5
    sequence_weight: float = 2.0
    pool_factor: float = 3.0
    start_time: int = 1_600_000_000
    days: int = 365

    def __post_init__(self) -> None:
        if self.users < 1 or self.items < 200:
            raise ValueError("the synthetic world needs at least 1 user and 200 items")
        if not 0.0 <= self.cold_start_share < 1.0:
            raise ValueError("cold_start_share must be in [0, 1)")
        if self.genres < 4:
            raise ValueError("the synthetic world needs at least 4 genres")
        if self.sequence_dim < 1:
            raise ValueError("sequence_dim must be at least 1")
        if not 0.0 <= self.sequence_decay < 1.0:
            raise ValueError("sequence_decay must be in [0, 1)")
        if self.pool_factor < 1.0:
            raise ValueError("pool_factor must be at least 1")


@dataclass(frozen=True)
class GroundTruth:
    """The generator's relevance function, loadable from a synthetic data directory."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    user_popularity_weight: np.ndarray
    item_log_popularity: np.ndarray
    user_region: np.ndarray  # index into REGIONS
    region_genre: np.ndarray  # [regions, genres]
    item_genre_weights: np.ndarray  # g_i, [items, genres]
    item_leads_to: np.ndarray  # a_i, [items, sequence_dim]
    item_follows: np.ndarray  # b_i, [items, sequence_dim]
    user_sequence_state: np.ndarray  # s_u after the user's whole generated sequence
    feature_interaction: float
    sequence_weight: float
    sequence_decay: float

    @classmethod
    def load(cls, directory: Path) -> GroundTruth:
        path = Path(directory) / TRUTH_TENSORS
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: only synthetic data directories carry a ground truth"
            )
        tensors = load_file(str(path))
        names = [field.name for field in dataclasses.fields(cls)]  # scalars: 0-d tensors
        missing = [name for name in names if name not in tensors]
        if missing:
            raise ValueError(
                f"{path} lacks {missing}: written by an older generator, regenerate the data "
                "with `recdistill data synthetic`"
            )
        return cls(
            **{
                name: tensors[name] if tensors[name].ndim else float(tensors[name])
                for name in names
            }
        )

    def save(self, directory: Path) -> None:
        save_file(
            {
                field.name: np.asarray(getattr(self, field.name))
                for field in dataclasses.fields(self)
            },
            str(Path(directory) / TRUTH_TENSORS),
        )

    def relevance(
        self,
        user_ids: np.ndarray,
        item_ids: np.ndarray,
        sequence_state: np.ndarray | None = None,
    ) -> np.ndarray:
        """True relevance of (user, item) pairs, external IDs; the two arrays broadcast.

        The sequence term uses each user's state after all their data, unless
        ``sequence_state`` (``[..., sequence_dim]``, broadcasting with the pairs, e.g. one
        :meth:`sequence_state`) says which history to score after.
        """
        users = rows_of_ids(self.user_ids, user_ids, "the synthetic world's users")
        items = rows_of_ids(self.item_ids, item_ids, "the synthetic world's items")
        if sequence_state is None:
            sequence_state = self.user_sequence_state[users]
        regional = self.region_genre[self.user_region[users]]
        return (
            _dot(self.user_factors[users], self.item_factors[items])
            + self.user_popularity_weight[users] * self.item_log_popularity[items]
            + self.feature_interaction * _dot(regional, self.item_genre_weights[items])
            + self.sequence_weight * _dot(np.asarray(sequence_state), self.item_follows[items])
        )

    def sequence_state(self, item_ids_newest_first: np.ndarray) -> np.ndarray:
        """The state ``s`` after one user's history of external item IDs, newest first."""
        items = rows_of_ids(
            self.item_ids, np.ravel(item_ids_newest_first), "the synthetic world's items"
        )
        decay = self.sequence_decay ** np.arange(len(items), dtype=np.float32)
        return decay @ self.item_leads_to[items]


def generate(spec: SyntheticSpec, directory: Path) -> None:
    """Write interactions, users, items, meta and the ground truth of ``spec`` to ``directory``."""
    rng = np.random.default_rng(spec.seed)
    genre_names = [f"genre_{g:02d}" for g in range(spec.genres)]
    genre_weight = _zipf(spec.genres, 0.8)
    # Coordinates scale as 1 / sqrt(dim) (0.5 and 0.3 at dim 16) so that norms, hence the
    # taste's strength, do not depend on ``dim``, which sets only its rank.
    coordinate = 1.0 / np.sqrt(spec.dim)
    centroids = rng.normal(0.0, 2.0 * coordinate, size=(spec.genres, spec.dim))
    niche_genres = np.argsort(genre_weight)[:2]

    primary = rng.choice(spec.genres, size=spec.items, p=genre_weight)
    secondary = (primary + rng.integers(1, spec.genres, size=spec.items)) % spec.genres
    has_secondary = rng.random(spec.items) < 0.35
    item_factors = (
        centroids[primary]
        + 0.5 * has_secondary[:, None] * centroids[secondary]
        + rng.normal(0.0, 1.2 * coordinate, size=(spec.items, spec.dim))
    )
    popularity_rank = rng.permutation(spec.items) + 1
    log_popularity = -spec.popularity_exponent * np.log(popularity_rank)
    log_popularity -= log_popularity.mean()

    favourite = rng.choice(spec.genres, size=spec.users, p=genre_weight)
    second_favourite = rng.choice(spec.genres, size=spec.users, p=genre_weight)
    user_factors = (
        centroids[favourite]
        + 0.6 * centroids[second_favourite]
        + rng.normal(0.0, 1.2 * coordinate, size=(spec.users, spec.dim))
    )
    region = rng.choice(len(REGIONS), size=spec.users, p=REGION_SHARES)
    shift = centroids[niche_genres].sum(axis=0)
    shift *= spec.region_shift * 2.0 / np.linalg.norm(shift)
    user_factors[region == REGIONS.index(SHIFTED_REGION)] += shift
    age = rng.choice(len(AGE_BUCKETS), size=spec.users, p=AGE_SHARES)

    activity, cold_start = _activity(spec, rng)
    popularity_weight = np.where(
        cold_start, 1.3, np.clip(1.0 - 0.35 * np.log(activity / spec.mean_activity), 0.2, 1.5)
    )

    item_genre_weights = np.zeros((spec.items, spec.genres), dtype=np.float32)
    item_genre_weights[np.arange(spec.items), primary] = 1.0
    item_genre_weights[np.arange(spec.items), secondary] += 0.5 * has_secondary
    region_genre = rng.normal(size=(len(REGIONS), spec.genres)).astype(np.float32)
    leads_to, follows = rng.normal(
        0.0, spec.sequence_dim**-0.25, size=(2, spec.items, spec.sequence_dim)
    ).astype(np.float32)
    truth = GroundTruth(
        user_ids=np.arange(1, spec.users + 1, dtype=np.int64),
        item_ids=np.arange(1, spec.items + 1, dtype=np.int64),
        user_factors=user_factors.astype(np.float32),
        item_factors=item_factors.astype(np.float32),
        user_popularity_weight=popularity_weight.astype(np.float32),
        item_log_popularity=log_popularity.astype(np.float32),
        user_region=region.astype(np.int64),
        region_genre=region_genre,
        item_genre_weights=item_genre_weights,
        item_leads_to=leads_to,
        item_follows=follows,
        user_sequence_state=np.zeros((spec.users, spec.sequence_dim), dtype=np.float32),
        feature_interaction=spec.feature_interaction,
        sequence_weight=spec.sequence_weight,
        sequence_decay=spec.sequence_decay,
    )
    n_interactions, final_state = _write_interactions(
        spec, truth, activity, directory / INTERACTIONS
    )
    truth = dataclasses.replace(truth, user_sequence_state=final_state)

    pq.write_table(
        pa.table(
            {
                "user_id": truth.user_ids,
                "region": pa.array(np.asarray(REGIONS)[region]),
                "age_bucket": pa.array(np.asarray(AGE_BUCKETS)[age]),
                "cold_start": pa.array(cold_start),
            }
        ),
        directory / USERS,
    )
    genres = [
        [genre_names[p]] + ([genre_names[s]] if extra else [])
        for p, s, extra in zip(primary, secondary, has_secondary)
    ]
    pq.write_table(
        pa.table(
            {
                "item_id": truth.item_ids,
                "title": pa.array([f"item {i}" for i in truth.item_ids]),
                "genres": pa.array(genres, type=pa.list_(pa.string())),
            }
        ),
        directory / ITEMS,
    )
    truth.save(directory)
    write_json(directory / TRUTH_JSON, _truth_description(spec, genre_names, niche_genres))
    write_json(
        directory / META,
        {
            "source": SOURCE,
            "user_features": list(USER_FEATURES),
            "ground_truth_segments": ["cold_start"],
            "generated_interactions": n_interactions,
            "synthetic": dataclasses.asdict(spec),
        },
    )


def _truth_description(
    spec: SyntheticSpec, genre_names: list[str], niche_genres: np.ndarray
) -> dict:
    return {
        "relevance": (
            "p_u . q_i + w_u * log_popularity_i"
            " + feature_interaction * region_genre[region_u] . g_i"
            " + sequence_weight * s_u . b_i"
        ),
        "sequence_state": (
            "s_u = sum_r sequence_decay^r * a_{h_r} over the user's history h, newest first"
            " (s <- a_j + sequence_decay * s after item j, from s = 0)"
        ),
        "tensors": {
            "user_factors": "p_u, rows aligned with user_ids",
            "item_factors": "q_i, rows aligned with item_ids",
            "user_popularity_weight": "w_u",
            "item_log_popularity": "log_popularity_i (centred Zipf log-weight)",
            "user_region": f"region_u, index into {list(REGIONS)}",
            "region_genre": "[regions, genres], N(0, 1)",
            "item_genre_weights": "g_i: 1 for the primary genre, 0.5 for the secondary one",
            "item_leads_to": "a_i, coordinates of variance 1 / sqrt(sequence_dim)",
            "item_follows": "b_i, like a_i: a_j . b_i has unit variance",
            "user_sequence_state": "s_u after the user's whole generated sequence",
            "feature_interaction": "scalar",
            "sequence_weight": "scalar",
            "sequence_decay": "scalar",
        },
        "interactions": (
            "per user, a pool of min(items, pool_factor * activity) items drawn without"
            " replacement from softmax(relevance without the sequence term), then the sequence:"
            " each next item drawn from softmax(relevance(u, . | history so far)) over the pool"
            " items not yet taken; timestamps strictly increase along the sequence"
        ),
        "genres": genre_names,
        "shifted_region": SHIFTED_REGION,
        "niche_genres": [genre_names[g] for g in niche_genres],
        "placebo_segment": "age_bucket: drawn independently of everything, no effect at all",
        "spec": dataclasses.asdict(spec),
    }


def _dot(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    return np.einsum("...d,...d->...", left, right)


def _zipf(n: int, exponent: float) -> np.ndarray:
    weight = 1.0 / np.arange(1, n + 1) ** exponent
    return weight / weight.sum()


def _activity(spec: SyntheticSpec, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Interactions per user (log-normal, capped) and the cold-start flag."""
    mu = np.log(spec.mean_activity) - spec.activity_sigma**2 / 2
    cap = max(spec.min_activity, int(spec.items * spec.max_activity_share))
    activity = np.clip(
        np.rint(rng.lognormal(mu, spec.activity_sigma, size=spec.users)), spec.min_activity, cap
    ).astype(np.int64)
    cold_start = rng.random(spec.users) < spec.cold_start_share
    activity[cold_start] = rng.integers(3, 6, size=int(cold_start.sum()))
    return activity, cold_start


def _write_interactions(
    spec: SyntheticSpec, truth: GroundTruth, activity: np.ndarray, path: Path
) -> tuple[int, np.ndarray]:
    """Simulate every user's sequence chunk by chunk and stream it to Parquet.

    Returns the number of interactions and each user's sequence state after them.
    """
    pool_cells = spec.pool_factor * spec.mean_activity * spec.sequence_dim
    chunk_users = max(1, int(CHUNK_CELLS // (spec.items + pool_cells)))
    final_state = np.zeros((spec.users, spec.sequence_dim), dtype=np.float32)
    written = 0
    buffered: list[pa.Table] = []
    with pq.ParquetWriter(path, INTERACTIONS_SCHEMA) as writer:
        starts = range(0, spec.users, chunk_users)
        for chunk, start in enumerate(
            tqdm(starts, desc="synthetic users", unit="chunk", disable=None)
        ):
            rng = np.random.default_rng([spec.seed, chunk])
            users = np.arange(start, min(start + chunk_users, spec.users))
            table = _simulate(spec, truth, users, activity[users], rng, final_state)
            buffered.append(table)
            written += len(table)
            if sum(len(t) for t in buffered) >= ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(buffered))
                buffered = []
        if buffered:
            writer.write_table(pa.concat_tables(buffered))
    return written, final_state


def _simulate(
    spec: SyntheticSpec,
    truth: GroundTruth,
    users: np.ndarray,
    activity: np.ndarray,
    rng: np.random.Generator,
    final_state: np.ndarray,
) -> pa.Table:
    """The interactions of ``users`` (rows), sorted by user and time; writes their final
    sequence states into ``final_state``."""
    logits = _history_free(truth, users)
    noisy = logits - np.log(-np.log(np.maximum(rng.random(logits.shape, dtype=np.float32), TINY)))
    pool_sizes = np.minimum(spec.items, np.ceil(spec.pool_factor * activity)).astype(np.int64)
    user_rows, item_rows, timestamps = [], [], []
    for group in _activity_groups(activity):
        pool = _pools(noisy[group], pool_sizes[group])
        pool_logits = logits[group[:, None], pool]
        pool_logits[np.arange(pool.shape[1]) >= pool_sizes[group, None]] = -np.inf
        picks, final_state[users[group]] = _walk(truth, pool, pool_logits, activity[group], rng)
        taken = np.arange(picks.shape[1]) < activity[group, None]
        user_rows.append(np.repeat(users[group], activity[group]))
        item_rows.append(np.take_along_axis(pool, picks, axis=1)[taken])
        timestamps.append(_timestamps(spec, activity[group], rng)[taken])
    user_rows, item_rows, timestamps = map(np.concatenate, (user_rows, item_rows, timestamps))
    # Each user's rows are in sequence order within their group; a stable sort keeps it.
    order = np.argsort(user_rows, kind="stable")
    return pa.table(
        {
            "user_id": truth.user_ids[user_rows[order]],
            "item_id": truth.item_ids[item_rows[order]],
            "timestamp": timestamps[order],
            "rating": np.ones(len(order), dtype=np.float32),
        },
        schema=INTERACTIONS_SCHEMA,
    )


def _history_free(truth: GroundTruth, users: np.ndarray) -> np.ndarray:
    """``[users, items]`` relevance without the sequence term, user and item rows."""
    logits = truth.user_factors[users] @ truth.item_factors.T
    logits += truth.user_popularity_weight[users, None] * truth.item_log_popularity
    regional = truth.region_genre[truth.user_region[users]]
    logits += truth.feature_interaction * (regional @ truth.item_genre_weights.T)
    return logits


def _activity_groups(activity: np.ndarray) -> list[np.ndarray]:
    """Positions of users by decreasing activity, split where the activity halves: padding a
    group's pools and steps to its most active user at most doubles the work."""
    order = np.argsort(-activity, kind="stable")
    octave = np.floor(np.log2(activity[order]))
    return np.split(order, np.flatnonzero(np.diff(octave)) + 1)


def _pools(noisy: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Item rows of each user's ``sizes.max()`` best noisy logits, best first: the first
    ``size`` of a row are the user's pool (Gumbel top-k)."""
    width = int(sizes.max())
    best = np.argpartition(-noisy, width - 1, axis=1)[:, :width]
    return np.take_along_axis(
        best, np.argsort(-np.take_along_axis(noisy, best, axis=1), axis=1), axis=1
    )


def _walk(
    truth: GroundTruth,
    pool: np.ndarray,
    pool_logits: np.ndarray,
    activity: np.ndarray,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's sequence through their pool: ``[users, activity.max()]`` pool positions in
    order (past a user's activity meaningless) and the state after the sequence.

    Users come by decreasing activity, so the ones still walking are a prefix; a pool item's
    logit becomes -inf once taken.
    """
    follows = truth.item_follows[pool]
    state = np.zeros((len(pool), follows.shape[2]), dtype=np.float32)
    picks = np.zeros((len(pool), int(activity[0])), dtype=np.int64)
    for step in range(picks.shape[1]):
        active = int(np.searchsorted(-activity, -step))
        rows = np.arange(active)
        sequence = np.matmul(follows[:active], state[:active, :, None])[..., 0]
        scores = pool_logits[:active] + truth.sequence_weight * sequence
        scores -= np.log(-np.log(np.maximum(rng.random(scores.shape, dtype=np.float32), TINY)))
        pick = scores.argmax(axis=1)
        picks[:active, step] = pick
        pool_logits[rows, pick] = -np.inf
        state[:active] *= truth.sequence_decay
        state[:active] += truth.item_leads_to[pool[rows, pick]]
    return picks, state


def _timestamps(spec: SyntheticSpec, activity: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``[users, activity.max()]`` times, strictly increasing along each user's sequence and
    spread over the user's active period (past a user's activity meaningless)."""
    span = spec.days * 86_400
    steps = np.arange(activity.max())
    offsets = np.sort(
        np.where(steps < activity[:, None], rng.random((len(activity), len(steps))), 2.0), axis=1
    )
    first_seen = rng.uniform(0.0, 0.7 * span, size=(len(activity), 1))
    seconds = (first_seen + 0.3 * span * offsets).astype(np.int64)
    # Whole seconds may tie: each one is moved to at least one second after the previous.
    return spec.start_time + np.maximum.accumulate(seconds - steps, axis=1) + steps
