import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from recdistill.data.synthetic import SHIFTED_REGION, GroundTruth, SyntheticSpec
from tests.conftest import SMALL_WORLD, build_synthetic

TABLES = [
    "interactions",
    "users",
    "items",
    "train",
    "valid",
    "test",
    "candidates_valid",
    "candidates_test",
]


def test_same_seed_same_world_other_seed_other_world(synthetic_dir, tmp_path):
    again = build_synthetic(tmp_path / "again")
    for name in TABLES:
        assert pq.read_table(synthetic_dir / f"{name}.parquet").equals(
            pq.read_table(again / f"{name}.parquet")
        ), name
    other = build_synthetic(
        tmp_path / "other", SyntheticSpec(**{**SMALL_WORLD.__dict__, "seed": 4})
    )
    assert not pq.read_table(other / "interactions.parquet").equals(
        pq.read_table(synthetic_dir / "interactions.parquet")
    )


def test_truth_ranks_interacted_items_above_random_ones(synthetic_dir):
    truth = GroundTruth.load(synthetic_dir)
    interactions = pq.read_table(synthetic_dir / "interactions.parquet")
    users = interactions.column("user_id").to_numpy()
    items = interactions.column("item_id").to_numpy()
    random_items = np.random.default_rng(0).choice(truth.item_ids, size=len(items))
    positive = truth.relevance(users, items)
    negative = truth.relevance(users, random_items)
    # Probability that an interacted item outranks a random item for the same user (AUC).
    assert (positive > negative).mean() > 0.85


def test_truth_scores_any_pair_and_rejects_unknown_ids(synthetic_dir):
    truth = GroundTruth.load(synthetic_dir)
    grid = truth.relevance(np.array([[1], [2]]), np.array([[1, 2, 3]]))
    assert grid.shape == (2, 3) and np.isfinite(grid).all()
    expected = truth.user_factors[0] @ truth.item_factors[2] + (
        truth.user_popularity_weight[0] * truth.item_log_popularity[2]
    )
    assert grid[0, 2] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(KeyError, match="no id 999999"):
        truth.relevance(np.array([1]), np.array([999999]))


def test_segments_really_behave_differently(synthetic_dir):
    users = pq.read_table(synthetic_dir / "users.parquet").to_pandas().set_index("user_id")
    items = pq.read_table(synthetic_dir / "items.parquet").to_pandas().set_index("item_id")
    frame = pq.read_table(synthetic_dir / "interactions.parquet").to_pandas()
    frame = frame.join(users, on="user_id").join(items[["genres"]], on="item_id")
    niche = set(json.loads((synthetic_dir / "truth.json").read_text())["niche_genres"])
    frame["niche"] = frame["genres"].map(lambda genres: bool(niche & set(genres)))
    niche_share = frame.groupby(frame["region"] == SHIFTED_REGION)["niche"].mean()
    assert niche_share[True] > 2 * niche_share[False]

    item_counts = frame["item_id"].value_counts()
    frame["item_popularity"] = frame["item_id"].map(item_counts)
    by_tier = frame.groupby("activity_tier")["item_popularity"].mean()
    assert by_tier["heavy"] < by_tier["light"]
    assert users.loc[users["cold_start"], "activity_tier"].eq("cold").mean() > 0.9


def test_activity_and_popularity_are_long_tailed(synthetic_dir):
    interactions = pq.read_table(synthetic_dir / "interactions.parquet")
    per_user = pc.value_counts(interactions.column("user_id")).field("counts").to_numpy()
    per_item = np.sort(pc.value_counts(interactions.column("item_id")).field("counts").to_numpy())
    assert per_user.max() > 5 * np.median(per_user)
    top_tenth = per_item[-len(per_item) // 10 :].sum() / per_item.sum()
    assert top_tenth > 0.3
