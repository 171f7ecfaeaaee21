import shutil

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy.special import expit

from recdistill.ab_spec import ClickSpec, SimulationSpec
from recdistill.abtest.simulate import plan_requests, simulate
from recdistill.abtest.world import EaseOracle, World, load_oracle, truth_of
from recdistill.artifact import load_artifact
from recdistill.data.synthetic_truth import GroundTruth
from recdistill.online import OnlineRanker
from tests.abtest.conftest import experiment

LOG_COLUMNS = [
    "request_id", "day", "period", "user_id", "arm", "model", "version", "items", "clicks",
    "n_shown", "n_clicks", "ndcg", "latency_ms", "round_trip_ms",
]  # fmt: skip


def test_the_click_model_is_position_based(small_world):
    clicks = small_world.clicks
    assert clicks.examination(4) == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4])
    spec = clicks.spec
    offset_relevance = clicks.mean + spec.offset * clicks.std
    assert clicks.attractiveness(np.array([offset_relevance])) == pytest.approx([0.5])
    one_sd_more = np.array([offset_relevance + clicks.std])
    assert clicks.attractiveness(one_sd_more) == pytest.approx(expit([spec.scale]))


def test_retrieval_mixes_popular_and_random_distinct_items(synthetic_dir):
    spec = SimulationSpec(data=str(synthetic_dir), candidates=40, popular_share=0.25)
    world = World.load(spec, ClickSpec())
    candidates = world.retrieval.candidates(300, np.random.default_rng(0))
    assert candidates.shape == (300, 40)
    assert all(len(set(row)) == 40 for row in candidates)
    popular = set(world.retrieval.popular)
    assert len(popular) == 50  # the 10 % most interacted of 500 items
    assert all(set(row[:10]) <= popular and not set(row[10:]) & popular for row in candidates)


def test_requests_arrive_by_segment_over_pre_period_and_experiment(synthetic_dir):
    spec = SimulationSpec(data=str(synthetic_dir), arrival_rates={"heavy": 3.0, "cold": 0.0})
    world = World.load(spec, ClickSpec())
    plan = plan_requests(world, days=10, pre_days=5, requests_per_day=0.5, seed=0)
    assert plan.days.min() == -5 and plan.days.max() == 9
    assert (np.diff(plan.days) >= 0).all()  # in time order
    tier = world.population.segments["activity_tier"].to_numpy()[plan.users]
    per_user = {
        t: np.mean(tier == t) / np.mean(world.population.segments["activity_tier"] == t)
        for t in ("heavy", "medium", "cold")
    }
    assert per_user["cold"] == 0
    assert per_user["heavy"] == pytest.approx(3 * per_user["medium"], rel=0.15)


def test_the_log_follows_the_servers_routing(
    synthetic_dir, small_world, popularity_ranker, truth_ranker
):
    spec = experiment(
        synthetic_dir,
        {"control": ("popularity", 0.5), "treatment": ("truth", 0.5)},
        salt="routing",
        ship=("treatment", "control"),
    )
    log = simulate(small_world, spec, {"popularity": popularity_ranker, "truth": truth_ranker})
    assert list(log.columns[: len(LOG_COLUMNS)]) == LOG_COLUMNS
    assert set(log.columns[len(LOG_COLUMNS) :]) == set(small_world.population.segments.columns)
    experiment_rows = log[log["period"] == "experiment"]
    for user_id, arm in experiment_rows.groupby("user_id")["arm"].first().items():
        assert spec.routing.arm_of(user_id).name == arm
    pre = log[log["period"] == "pre"]
    assert (pre["day"] < 0).all() and (pre["model"] == "popularity").all()
    assert (
        experiment_rows["model"]
        == np.where(experiment_rows["arm"] == "control", "popularity", "truth")
    ).all()
    truth_rows = experiment_rows[experiment_rows["arm"] == "treatment"]
    assert truth_rows["ndcg"].to_numpy() == pytest.approx(1.0)  # the oracle's slate is ideal
    assert (log["n_clicks"] == log["clicks"].map(sum)).all()


def test_a_click_multiplier_scales_one_arms_clicks(synthetic_dir, small_world, popularity_ranker):
    """Halved (a doubled probability could pass 1 and be capped)."""
    spec = experiment(
        synthetic_dir,
        {"control": ("popularity", 0.5), "treatment": ("popularity", 0.5)},
        ship=("treatment", "control"),
        days=20,
    )
    rankers = {"popularity": popularity_ranker}
    runs = [
        simulate(small_world, spec, rankers, click_multiplier={"treatment": m}) for m in (1, 0.5)
    ]
    clicks = [log[log["period"] == "experiment"].groupby("arm")["n_clicks"].sum() for log in runs]
    assert clicks[1]["control"] == clicks[0]["control"]  # same draws, same probabilities
    assert clicks[1]["treatment"] / clicks[0]["treatment"] == pytest.approx(0.5, rel=0.1)


@pytest.mark.parametrize("name", ["teacher", "popularity"])
def test_batched_scores_are_the_servers_scores(tiny_artifacts, name):
    ranker = OnlineRanker(load_artifact(tiny_artifacts[name]))
    items = ranker.store.items.values
    rng = np.random.default_rng(0)
    unknown_user = int(ranker.store.users.values.max()) + 1
    user_ids = np.array([*ranker.store.users.values[:5], unknown_user])
    candidates = np.stack([rng.choice(items, 30, replace=False) for _ in user_ids])
    batched = ranker.score_lists(user_ids, candidates)
    for user_id, row, scores in zip(user_ids, candidates, batched):
        ranking = ranker.rank(user_id, row)
        order = np.argsort(-scores, kind="stable")
        assert scores[order] == pytest.approx(ranking.scores, rel=1e-5, abs=1e-5)


def test_real_data_gets_an_ease_oracle_on_all_interactions(synthetic_dir, tmp_path):
    """Without a ground truth the oracle is EASE's closed form on every interaction."""
    real = tmp_path / "real"
    shutil.copytree(synthetic_dir, real, ignore=shutil.ignore_patterns("truth.*"))
    assert isinstance(load_oracle(synthetic_dir, 100.0), GroundTruth)
    oracle = load_oracle(real, 100.0)
    assert isinstance(oracle, EaseOracle)

    interactions = pq.read_table(real / "interactions.parquet").to_pandas()
    users, items = np.unique(interactions["user_id"]), np.unique(interactions["item_id"])
    x = np.zeros((len(users), len(items)))
    x[
        np.searchsorted(users, interactions["user_id"]),
        np.searchsorted(items, interactions["item_id"]),
    ] = 1
    precision = np.linalg.inv(x.T @ x + 100.0 * np.eye(len(items)))
    weights = np.eye(len(items)) - precision / np.diag(precision)
    expected = x[:3] @ weights
    assert oracle.relevance(users[:3, None], items[None, :]) == pytest.approx(expected, abs=1e-4)


def test_an_oracle_that_helps_choose_never_reads_the_test_split(synthetic_dir, tmp_path):
    """``before_test``: EASE on train and validation alone, so it is fitted with the test
    split's files gone, and the test interactions are not among what it reconstructs."""
    real = tmp_path / "real"
    ignored = shutil.ignore_patterns("truth.*", "test.parquet", "interactions.parquet")
    shutil.copytree(synthetic_dir, real, ignore=ignored)
    oracle = load_oracle(real, 100.0, before_test=True)
    known = pd.concat(
        pq.read_table(synthetic_dir / f"{split}.parquet").to_pandas()
        for split in ("train", "valid")
    )
    users, items = oracle.users.values, oracle.items.values
    x = np.zeros((len(users), len(items)))
    x[np.searchsorted(users, known["user_id"]), np.searchsorted(items, known["item_id"])] = 1
    precision = np.linalg.inv(x.T @ x + 100.0 * np.eye(len(items)))
    weights = np.eye(len(items)) - precision / np.diag(precision)
    expected = x[:3] @ weights
    assert oracle.relevance(users[:3, None], items[None, :]) == pytest.approx(expected, abs=1e-4)
    assert "train and validation" in truth_of(real, before_test=True)
