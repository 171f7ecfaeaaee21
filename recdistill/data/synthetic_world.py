"""The synthetic world before anyone interacts: its settings, users, items and ground truth.

How each term of the relevance is drawn is described in :mod:`recdistill.data.synthetic`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from recdistill.data.synthetic_truth import GroundTruth

REGIONS = ("north", "south", "east")
REGION_SHARES = (0.45, 0.35, 0.20)
SHIFTED_REGION = "east"
AGE_BUCKETS = ("18-24", "25-34", "35-44", "45-54", "55+")
AGE_SHARES = (0.2, 0.3, 0.25, 0.15, 0.1)


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
class World:
    """What :func:`build_world` draws: the truth, and the users' and items' tables."""

    truth: GroundTruth  # user_sequence_state still zero: no user has interacted yet
    activity: np.ndarray  # how many interactions each user will have
    users: pa.Table  # user_id, region, age_bucket, cold_start
    items: pa.Table  # item_id, title, genres
    genre_names: list[str]
    niche_genres: list[str]  # the two genres the shifted region's taste leans towards


def build_world(spec: SyntheticSpec) -> World:
    """Draw every user's and item's latent factors and features from ``spec.seed``."""
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

    users = pa.table(
        {
            "user_id": truth.user_ids,
            "region": pa.array(np.asarray(REGIONS)[region]),
            "age_bucket": pa.array(np.asarray(AGE_BUCKETS)[age]),
            "cold_start": pa.array(cold_start),
        }
    )
    genres = [
        [genre_names[p]] + ([genre_names[s]] if extra else [])
        for p, s, extra in zip(primary, secondary, has_secondary)
    ]
    items = pa.table(
        {
            "item_id": truth.item_ids,
            "title": pa.array([f"item {i}" for i in truth.item_ids]),
            "genres": pa.array(genres, type=pa.list_(pa.string())),
        }
    )
    return World(
        truth=truth,
        activity=activity,
        users=users,
        items=items,
        genre_names=genre_names,
        niche_genres=[genre_names[g] for g in niche_genres],
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
