"""A seeded synthetic world with a known ground truth.

Every user ``u`` and item ``i`` has a latent factor; the true relevance is

    relevance(u, i) = p_u · q_i + w_u · log_popularity_i

- ``q_i`` is built from the item's genre centroids plus noise; genre sizes follow a power law;
- ``log_popularity_i`` is a centred Zipf log-weight: item popularity is power-law;
- ``p_u`` is built from one or two favourite genres plus noise; users of region ``east`` carry
  an extra taste shift towards two niche genres the rest of the population rarely favours;
- ``w_u`` is the user's popularity sensitivity: light users follow the crowd, heavy users
  seek the niche, cold-start users follow the crowd most;
- ``age_bucket`` has no effect at all: a placebo segment on which no model should differ.

A user's interactions are drawn without replacement from ``softmax(relevance(u, ·))``
(Gumbel top-k), their number from a log-normal activity distribution (plus a cold-start
group with 3 to 5 interactions), their timestamps uniformly over the user's active period.
The truth is saved beside the data (``truth.safetensors`` + ``truth.json``) so that any
(user, item) pair can be scored later with :meth:`GroundTruth.load` and
:meth:`GroundTruth.relevance`.
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
# Relevance logits are computed for this many (user, item) pairs at a time.
CHUNK_CELLS = 16_000_000
# Interactions are buffered up to this many rows per Parquet row group.
ROW_GROUP_ROWS = 1_000_000


@dataclass(frozen=True)
class SyntheticSpec:
    users: int = 4000
    items: int = 2000
    seed: int = 0
    dim: int = 16
    genres: int = 18
    mean_activity: float = 30.0
    activity_sigma: float = 1.0
    min_activity: int = 8
    max_activity_share: float = 0.25
    cold_start_share: float = 0.1
    popularity_exponent: float = 1.0
    region_shift: float = 1.5
    start_time: int = 1_600_000_000
    days: int = 365

    def __post_init__(self) -> None:
        if self.users < 1 or self.items < 200:
            raise ValueError("the synthetic world needs at least 1 user and 200 items")
        if not 0.0 <= self.cold_start_share < 1.0:
            raise ValueError("cold_start_share must be in [0, 1)")
        if self.genres < 4:
            raise ValueError("the synthetic world needs at least 4 genres")


@dataclass(frozen=True)
class GroundTruth:
    """The generator's relevance function, loadable from a synthetic data directory."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    user_popularity_weight: np.ndarray
    item_log_popularity: np.ndarray

    @classmethod
    def load(cls, directory: Path) -> GroundTruth:
        path = Path(directory) / TRUTH_TENSORS
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: only synthetic data directories carry a ground truth"
            )
        tensors = load_file(str(path))
        return cls(**{field.name: tensors[field.name] for field in dataclasses.fields(cls)})

    def save(self, directory: Path) -> None:
        save_file(
            {field.name: getattr(self, field.name) for field in dataclasses.fields(self)},
            str(Path(directory) / TRUTH_TENSORS),
        )

    def relevance(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        """True relevance of (user, item) pairs, external IDs; the two arrays broadcast."""
        users = rows_of_ids(self.user_ids, user_ids, "the synthetic world's users")
        items = rows_of_ids(self.item_ids, item_ids, "the synthetic world's items")
        affinity = np.einsum("...d,...d->...", self.user_factors[users], self.item_factors[items])
        return affinity + self.user_popularity_weight[users] * self.item_log_popularity[items]


def generate(spec: SyntheticSpec, directory: Path) -> None:
    """Write interactions, users, items, meta and the ground truth of ``spec`` to ``directory``."""
    rng = np.random.default_rng(spec.seed)
    genre_names = [f"genre_{g:02d}" for g in range(spec.genres)]
    genre_weight = _zipf(spec.genres, 0.8)
    centroids = rng.normal(0.0, 0.5, size=(spec.genres, spec.dim))
    niche_genres = np.argsort(genre_weight)[:2]

    primary = rng.choice(spec.genres, size=spec.items, p=genre_weight)
    secondary = (primary + rng.integers(1, spec.genres, size=spec.items)) % spec.genres
    has_secondary = rng.random(spec.items) < 0.35
    item_factors = (
        centroids[primary]
        + 0.5 * has_secondary[:, None] * centroids[secondary]
        + rng.normal(0.0, 0.3, size=(spec.items, spec.dim))
    )
    popularity_rank = rng.permutation(spec.items) + 1
    log_popularity = -spec.popularity_exponent * np.log(popularity_rank)
    log_popularity -= log_popularity.mean()

    favourite = rng.choice(spec.genres, size=spec.users, p=genre_weight)
    second_favourite = rng.choice(spec.genres, size=spec.users, p=genre_weight)
    user_factors = (
        centroids[favourite]
        + 0.6 * centroids[second_favourite]
        + rng.normal(0.0, 0.3, size=(spec.users, spec.dim))
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

    truth = GroundTruth(
        user_ids=np.arange(1, spec.users + 1, dtype=np.int64),
        item_ids=np.arange(1, spec.items + 1, dtype=np.int64),
        user_factors=user_factors.astype(np.float32),
        item_factors=item_factors.astype(np.float32),
        user_popularity_weight=popularity_weight.astype(np.float32),
        item_log_popularity=log_popularity.astype(np.float32),
    )
    n_interactions = _write_interactions(spec, truth, activity, directory / INTERACTIONS)

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
    write_json(
        directory / TRUTH_JSON,
        {
            "relevance": "p_u . q_i + w_u * log_popularity_i",
            "tensors": {
                "user_factors": "p_u, rows aligned with user_ids",
                "item_factors": "q_i, rows aligned with item_ids",
                "user_popularity_weight": "w_u",
                "item_log_popularity": "log_popularity_i (centred Zipf log-weight)",
            },
            "interactions": "drawn without replacement from softmax(relevance(u, .))",
            "shifted_region": SHIFTED_REGION,
            "niche_genres": [genre_names[g] for g in niche_genres],
            "placebo_segment": "age_bucket",
            "spec": dataclasses.asdict(spec),
        },
    )
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
) -> int:
    """Sample every user's interactions chunk by chunk and stream them to Parquet."""
    chunk_users = max(1, CHUNK_CELLS // spec.items)
    span = spec.days * 86_400
    written = 0
    buffered: list[pa.Table] = []
    with pq.ParquetWriter(path, INTERACTIONS_SCHEMA) as writer:
        starts = range(0, spec.users, chunk_users)
        for chunk, start in enumerate(
            tqdm(starts, desc="synthetic users", unit="chunk", disable=None)
        ):
            rng = np.random.default_rng([spec.seed, chunk])
            users = np.arange(start, min(start + chunk_users, spec.users))
            counts = activity[users]
            logits = truth.user_factors[users] @ truth.item_factors.T
            logits += truth.user_popularity_weight[users, None] * truth.item_log_popularity
            uniform = rng.random(logits.shape, dtype=np.float32)
            logits -= np.log(-np.log(np.maximum(uniform, np.finfo(np.float32).tiny)))
            top = int(counts.max())
            best = np.argpartition(-logits, top - 1, axis=1)[:, :top]
            best = np.take_along_axis(
                best, np.argsort(-np.take_along_axis(logits, best, axis=1), axis=1), axis=1
            )
            taken = np.arange(top) < counts[:, None]
            rows = np.repeat(users, counts)
            first_seen = rng.uniform(0.0, 0.7 * span, size=len(users))
            seen_at = first_seen[rows - start] + rng.uniform(0.0, 0.3 * span, size=len(rows))
            table = pa.table(
                {
                    "user_id": truth.user_ids[rows],
                    "item_id": truth.item_ids[best[taken]],
                    "timestamp": spec.start_time + seen_at.astype(np.int64),
                    "rating": np.ones(len(rows), dtype=np.float32),
                },
                schema=INTERACTIONS_SCHEMA,
            )
            buffered.append(table)
            written += len(rows)
            if sum(len(t) for t in buffered) >= ROW_GROUP_ROWS:
                writer.write_table(pa.concat_tables(buffered))
                buffered = []
        if buffered:
            writer.write_table(pa.concat_tables(buffered))
    return written
