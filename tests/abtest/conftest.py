"""Small experiments on the session's synthetic world, with rankers of known quality."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from recdistill.ab_spec import AnalysisSpec, ClickSpec, ExperimentSpec, SimulationSpec
from recdistill.abtest.world import World
from recdistill.routing import Arm, Routing

# Small and short: one experiment on the 400-user world takes milliseconds.
QUICK = {
    "days": 4,
    "requests_per_day": 0.75,
    "candidates": 20,
    "popular_share": 1.0,
    "popular_pool": 0.2,
    "k": 5,
    "latency_requests": 0,
}


@dataclass(frozen=True)
class FunctionRanker:
    """An arm's model given as a scoring function ``(user_ids [L], candidates [L, C]) -> [L, C]``."""

    name: str
    score: Callable[[np.ndarray, np.ndarray], np.ndarray]
    version: str = "test"

    def score_lists(self, user_ids: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        return self.score(user_ids, candidates)


def experiment(
    data: Path,
    arms: dict[str, tuple[str, float]],
    *,
    salt: str = "test",
    design: str = "ab",
    control: str = "control",
    ship: tuple[str, str] = ("student", "teacher"),
    analysis: dict | None = None,
    **simulation,
) -> ExperimentSpec:
    """An experiment over ``arms`` (name → (model, share)) on the data directory ``data``."""
    arms = tuple(Arm(name, model, share) for name, (model, share) in arms.items())
    routing = Routing(salt, arms, design)
    return ExperimentSpec(
        routing=routing,
        artifacts={},
        simulation=SimulationSpec(data=str(data), **(QUICK | simulation)),
        clicks=ClickSpec(),
        analysis=AnalysisSpec(control=control, ship=ship, **(analysis or {})),
    )


@pytest.fixture(scope="session")
def small_world(synthetic_dir) -> World:
    return World.load(SimulationSpec(data=str(synthetic_dir), **QUICK), ClickSpec())


@pytest.fixture(scope="session")
def truth_ranker(small_world) -> FunctionRanker:
    """Ranks by the true relevance: the best any model can do."""
    return FunctionRanker(
        "truth", lambda users, items: small_world.oracle.relevance(users[:, None], items)
    )


@pytest.fixture(scope="session")
def popularity_ranker(synthetic_dir) -> FunctionRanker:
    """Ranks by train interactions, as the popularity baseline does."""
    items = pq.read_table(synthetic_dir / "items.parquet", columns=["item_id", "n_train"])
    counts = np.zeros(items["item_id"].to_numpy().max() + 1)
    counts[items["item_id"].to_numpy()] = items["n_train"].to_numpy()
    return FunctionRanker("popularity", lambda users, items: counts[items])


@pytest.fixture(scope="session")
def noisy_truth_ranker(small_world) -> FunctionRanker:
    """The true relevance plus fixed noise per (user, item): worse than the truth, known how."""
    noise = np.random.default_rng(0).normal(0.0, 2.0, size=(1000, 1000))
    return FunctionRanker(
        "noisy",
        lambda users, items: (
            small_world.oracle.relevance(users[:, None], items) + noise[users[:, None], items]
        ),
    )
