"""The simulated world: users who arrive, a retrieval stage, and a truth they click by.

The truth is an oracle ``relevance(user_ids, item_ids)`` (external IDs, broadcasting):

- on synthetic data, the generator's own :class:`~recdistill.data.synthetic_truth.GroundTruth`;
- on real data, a **semi-synthetic** oracle: EASE fitted on *every* interaction of the data
  directory (train, validation and test alike), its scores taken as the true affinity. It
  is what a strong model would learn from everything we know, not a measured preference, so
  lifts on real data are lifts under that assumption. A world that helps *choose* a model
  (the sweep's) fits it ``before_test``: on train and validation alone, so the choice never
  reads the test split.

Relevance becomes a click probability through the position-based model of
:class:`~recdistill.ab_spec.ClickSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy.special import expit

from recdistill.ab_spec import ClickSpec, SimulationSpec
from recdistill.baselines import ease_scores
from recdistill.data.feature_store import Vocabulary
from recdistill.data.synthetic_truth import GroundTruth
from recdistill.data.tables import read_meta, rows_of_ids
from recdistill.layout import DataLayout

# Pairs of (user, item) sampled to standardise the oracle's relevance.
CALIBRATION_PAIRS = 200_000
# Random keys held at once when drawing candidates, and relevance cells computed at once.
CHUNK_CELLS = 1_000_000


class Oracle(Protocol):
    def relevance(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class EaseOracle:
    """The semi-synthetic truth of real data: EASE scores from all interactions."""

    users: Vocabulary
    items: Vocabulary
    scores: np.ndarray  # [users + 1, items + 1], row and column 0 unknown

    @classmethod
    def fit(cls, data: Path, l2: float, *, before_test: bool = False) -> EaseOracle:
        layout = DataLayout(data)
        users = Vocabulary.of(pq.read_table(layout.users, columns=["user_id"])["user_id"])
        items = Vocabulary.of(pq.read_table(layout.items, columns=["item_id"])["item_id"])
        columns = ["user_id", "item_id"]
        if before_test:
            interactions = pa.concat_tables(
                pq.read_table(layout.split(split), columns=columns) for split in ("train", "valid")
            )
        else:
            interactions = pq.read_table(layout.interactions, columns=columns)
        scores = ease_scores(
            users.index(interactions["user_id"].to_numpy()),
            items.index(interactions["item_id"].to_numpy()),
            len(users),
            len(items),
            l2,
        )
        return cls(users, items, scores.astype(np.float32))

    def relevance(self, user_ids: np.ndarray, item_ids: np.ndarray) -> np.ndarray:
        users = rows_of_ids(self.users.values, user_ids, "the oracle's users") + 1
        items = rows_of_ids(self.items.values, item_ids, "the oracle's items") + 1
        return self.scores[users, items]


def truth_of(data: Path, *, before_test: bool = False) -> str:
    """What the oracle of ``data``'s world is, in words."""
    if DataLayout(data).truth_tensors.exists():
        return "the synthetic generator's ground truth"
    fitted = "train and validation interactions" if before_test else "all interactions"
    return f"semi-synthetic, EASE fitted on {fitted} taken as the true affinity"


def load_oracle(data: Path, l2: float, *, before_test: bool = False) -> Oracle:
    """The generator's truth if ``data`` has one, else the EASE oracle."""
    if DataLayout(data).truth_tensors.exists():
        return GroundTruth.load(data)
    return EaseOracle.fit(data, l2, before_test=before_test)


@dataclass(frozen=True)
class ClickModel:
    """Attractiveness from relevance and examination by position (see ``ClickSpec``)."""

    spec: ClickSpec
    mean: float  # of the oracle's relevance over user × item pairs
    std: float

    def attractiveness(self, relevance: np.ndarray) -> np.ndarray:
        z = (relevance - self.mean) / self.std
        return expit(self.spec.scale * (z - self.spec.offset))

    def examination(self, k: int) -> np.ndarray:
        return 1.0 / (1.0 + np.arange(k)) ** self.spec.eta


@dataclass(frozen=True)
class Population:
    """The simulated users: their segments and relative arrival rates."""

    user_ids: np.ndarray
    segments: pd.DataFrame  # one string column per segment, rows aligned with user_ids
    arrival_rates: np.ndarray


@dataclass(frozen=True)
class Retrieval:
    """Candidate generation: some items from the popular pool, the rest from the others."""

    popular: np.ndarray
    others: np.ndarray
    from_popular: int
    size: int

    def candidates(self, requests: int, rng: np.random.Generator) -> np.ndarray:
        """``[requests, size]`` distinct item IDs per row, popular-pool draws first."""
        return np.concatenate(
            [
                _draw_distinct(self.popular, requests, self.from_popular, rng),
                _draw_distinct(self.others, requests, self.size - self.from_popular, rng),
            ],
            axis=1,
        )


@dataclass(frozen=True)
class World:
    """Everything about the users and the catalogue, built once from the simulation spec's
    ``data``, ``users``, ``arrival_*``, ``candidates``, ``popular_*`` and ``oracle_l2``; the
    run's own knobs (days, requests per day, k, seed) are read by each simulation."""

    population: Population
    oracle: Oracle
    clicks: ClickModel
    retrieval: Retrieval
    truth: str  # what the oracle is, in words

    @classmethod
    def load(cls, spec: SimulationSpec, clicks: ClickSpec, *, before_test: bool = False) -> World:
        data = Path(spec.data)
        rng = np.random.default_rng([spec.seed, 0])
        population = load_population(data, spec, rng)
        items = pq.read_table(DataLayout(data).items, columns=["item_id", "n_train"]).to_pandas()
        oracle = load_oracle(data, spec.oracle_l2, before_test=before_test)
        pairs = (
            rng.choice(population.user_ids, CALIBRATION_PAIRS),
            rng.choice(items["item_id"].to_numpy(), CALIBRATION_PAIRS),
        )
        relevance = oracle.relevance(*pairs)
        return cls(
            population=population,
            oracle=oracle,
            clicks=ClickModel(clicks, float(relevance.mean()), float(relevance.std())),
            retrieval=retrieval_of(items, spec),
            truth=truth_of(data, before_test=before_test),
        )

    def attractiveness(self, user_ids: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """``[requests, C]`` attractiveness of each request's candidates to its user."""
        step = max(1, CHUNK_CELLS // max(candidates.shape[1], 1))
        return np.concatenate(
            [
                self.clicks.attractiveness(
                    self.oracle.relevance(
                        user_ids[start : start + step, None], candidates[start : start + step]
                    )
                )
                for start in range(0, len(user_ids), step)
            ]
        ).reshape(candidates.shape)


def load_population(data: Path, spec: SimulationSpec, rng: np.random.Generator) -> Population:
    """``spec.users`` users of ``data`` (all if 0) with every user segment column."""
    users = pq.read_table(DataLayout(data).users).to_pandas()
    columns = read_meta(data)["user_segments"]
    if spec.arrival_segment not in columns:
        raise ValueError(
            f"[simulation]: arrival_segment {spec.arrival_segment!r} is not a user segment "
            f"of {data} ({columns})"
        )
    known = set(users[spec.arrival_segment].astype(str))
    unknown = sorted(set(spec.arrival_rates) - known)
    if unknown:
        raise ValueError(
            f"[simulation]: arrival_rates name {unknown}, not values of "
            f"{spec.arrival_segment} ({sorted(known)})"
        )
    if spec.users and spec.users < len(users):
        users = users.iloc[np.sort(rng.choice(len(users), spec.users, replace=False))]
    segments = users[columns].astype(str).reset_index(drop=True)
    rates = segments[spec.arrival_segment].map(spec.arrival_rates).fillna(1.0).to_numpy()
    return Population(
        user_ids=users["user_id"].to_numpy(np.int64),
        segments=segments,
        arrival_rates=rates,
    )


def retrieval_of(items: pd.DataFrame, spec: SimulationSpec) -> Retrieval:
    """The ``popular_pool`` share of items with most train interactions, and the rest."""
    order = np.lexsort((items["item_id"].to_numpy(), -items["n_train"].to_numpy()))
    ranked = items["item_id"].to_numpy(np.int64)[order]
    pool = max(1, round(spec.popular_pool * len(ranked)))
    popular, others = ranked[:pool], ranked[pool:]
    from_popular = round(spec.popular_share * spec.candidates)
    if from_popular > len(popular) or spec.candidates - from_popular > len(others):
        raise ValueError(
            f"[simulation]: cannot draw {from_popular} of {spec.candidates} candidates from "
            f"{len(popular)} popular items and the rest from {len(others)} others"
        )
    return Retrieval(popular, others, from_popular, spec.candidates)


def _draw_distinct(pool: np.ndarray, rows: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` distinct items of ``pool`` per row, uniformly: the smallest of random keys."""
    if size == 0:
        return np.empty((rows, 0), dtype=np.int64)
    step = max(1, CHUNK_CELLS // len(pool))
    parts = []
    for start in range(0, rows, step):
        keys = rng.random((min(step, rows - start), len(pool)), dtype=np.float32)
        parts.append(pool[np.argpartition(keys, size - 1, axis=1)[:, :size]])
    return np.concatenate(parts) if parts else np.empty((0, size), dtype=np.int64)
