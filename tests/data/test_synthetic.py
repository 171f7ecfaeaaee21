import json

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from recdistill.data.synthetic_truth import GroundTruth
from recdistill.data.synthetic_world import AGE_BUCKETS, REGIONS, SHIFTED_REGION, SyntheticSpec
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
    users, items = _sequences(synthetic_dir)
    states = _states_before(truth, users, items)
    random_items = np.random.default_rng(0).choice(truth.item_ids, size=len(items))
    positive = truth.relevance(users, items, states)
    negative = truth.relevance(users, random_items, states)
    # Probability that an interacted item outranks a random item for the same user, both
    # scored after the history the user had then (AUC).
    assert (positive > negative).mean() > 0.85


def test_truth_scores_any_pair_and_rejects_unknown_ids(synthetic_dir):
    truth = GroundTruth.load(synthetic_dir)
    grid = truth.relevance(np.array([[1], [2]]), np.array([[1, 2, 3]]))
    assert grid.shape == (2, 3) and np.isfinite(grid).all()
    expected = _relevance(truth, 0, 2, truth.user_sequence_state[0])
    assert grid[0, 2] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(KeyError, match="no id 999999"):
        truth.relevance(np.array([1]), np.array([999999]))


def test_relevance_after_an_explicit_history(synthetic_dir):
    truth = GroundTruth.load(synthetic_dir)
    state = truth.sequence_state(np.array([5, 9, 7]))
    decay = truth.sequence_decay
    expected_state = (
        truth.item_leads_to[4] + decay * truth.item_leads_to[8] + decay**2 * truth.item_leads_to[6]
    )
    np.testing.assert_allclose(state, expected_state, rtol=1e-5)
    items = np.arange(1, 21)
    after = truth.relevance(np.array([3]), items, state)
    np.testing.assert_allclose(
        after, [_relevance(truth, 2, item - 1, state) for item in items], rtol=1e-5, atol=1e-5
    )
    assert np.abs(after - truth.relevance(np.array([3]), items)).max() > 0.1
    empty = truth.relevance(np.array([3]), items, truth.sequence_state(np.array([], np.int64)))
    np.testing.assert_allclose(
        empty,
        [_relevance(truth, 2, item - 1, np.zeros_like(state)) for item in items],
        rtol=1e-5,
        atol=1e-5,
    )


def test_final_states_and_times_follow_the_generated_sequences(synthetic_dir):
    truth = GroundTruth.load(synthetic_dir)
    frame = pq.read_table(synthetic_dir / "interactions.parquet").to_pandas()
    assert (frame.groupby("user_id")["timestamp"].diff().dropna() > 0).all()
    users, items = _sequences(synthetic_dir)
    last = np.r_[users[1:] != users[:-1], True]
    final = (
        truth.item_leads_to[items[last] - 1]
        + truth.sequence_decay * _states_before(truth, users, items)[last]
    )
    np.testing.assert_allclose(truth.user_sequence_state[users[last] - 1], final, atol=1e-5)
    history = items[users == users[0]][::-1]
    np.testing.assert_allclose(
        truth.sequence_state(history), truth.user_sequence_state[users[0] - 1], atol=1e-5
    )


def test_next_item_follows_the_recent_items_and_order_carries_it(synthetic_dir):
    truth = GroundTruth.load(synthetic_dir)
    users, items = _sequences(synthetic_dir)
    rng = np.random.default_rng(0)
    random_items = rng.choice(truth.item_ids, size=len(items))

    def gap(items: np.ndarray) -> float:
        """How much more the chosen item than a random one follows the state before it."""
        states = _states_before(truth, users, items)
        chosen = np.einsum("nk,nk->n", states, truth.item_follows[items - 1])
        other = np.einsum("nk,nk->n", states, truth.item_follows[random_items - 1])
        return float((chosen - other).mean() / other.std())

    # Each user's items in a random order instead of the generated one.
    shuffled = items[np.lexsort((rng.random(len(items)), users))]
    assert gap(items) > 1.0
    assert abs(gap(shuffled)) < 0.2 * gap(items)


def test_region_genre_interaction_shows_in_genre_shares(synthetic_dir):
    truth = GroundTruth.load(synthetic_dir)
    users = pq.read_table(synthetic_dir / "users.parquet").to_pandas()
    assert (users["region"] == np.asarray(REGIONS)[truth.user_region]).all()
    genres = json.loads((synthetic_dir / "truth.json").read_text())["genres"]
    items = pq.read_table(synthetic_dir / "items.parquet").column("genres").to_pylist()
    weights = np.zeros_like(truth.item_genre_weights)
    for row, names in enumerate(items):
        for name, weight in zip(names, (1.0, 0.5)):
            weights[row, genres.index(name)] = weight
    np.testing.assert_array_equal(truth.item_genre_weights, weights)

    counts = _user_genre_counts(synthetic_dir, truth)
    shares = _group_shares(counts, truth.user_region, len(truth.region_genre))
    lift = np.log(shares / (counts.sum(axis=0) / counts.sum()))
    # Region-specific part of region_genre: what the genre gains in this region over others.
    specific = truth.region_genre - truth.region_genre.mean(axis=0)
    assert np.corrcoef(lift.ravel(), specific.ravel())[0, 1] > 0.4


def test_age_bucket_is_a_placebo(synthetic_dir):
    """Genre shares differ between regions far beyond chance, between age buckets not: each
    segment's spread of genre shares against the spreads under shuffled segment labels."""
    truth = GroundTruth.load(synthetic_dir)
    users = pq.read_table(synthetic_dir / "users.parquet").to_pandas()
    age = users["age_bucket"].map(AGE_BUCKETS.index).to_numpy()
    counts = _user_genre_counts(synthetic_dir, truth)
    overall = counts.sum(axis=0) / counts.sum()
    rng = np.random.default_rng(0)

    def p_value(labels: np.ndarray, groups: int) -> float:
        def spread(labels: np.ndarray) -> float:
            return float(((_group_shares(counts, labels, groups) - overall) ** 2).sum())

        null = [spread(rng.permutation(labels)) for _ in range(200)]
        return float(np.mean(np.array(null) >= spread(labels)))

    assert p_value(truth.user_region, len(truth.region_genre)) < 0.01
    assert p_value(age, len(AGE_BUCKETS)) > 0.01


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


def _sequences(directory) -> tuple[np.ndarray, np.ndarray]:
    """User and item IDs of every interaction, by user and time."""
    frame = pq.read_table(directory / "interactions.parquet").to_pandas()
    frame = frame.sort_values(["user_id", "timestamp"])
    return frame["user_id"].to_numpy(), frame["item_id"].to_numpy()


def _states_before(truth: GroundTruth, users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The sequence state before each interaction of :func:`_sequences`, by its recursion."""
    states = np.zeros((len(items), truth.item_leads_to.shape[1]), dtype=np.float32)
    for row in range(1, len(items)):
        if users[row] == users[row - 1]:
            states[row] = (
                truth.item_leads_to[items[row - 1] - 1] + truth.sequence_decay * states[row - 1]
            )
    return states


def _relevance(truth: GroundTruth, user: int, item: int, state: np.ndarray) -> float:
    """The documented formula, from the stored tensors, for one user and item row."""
    return (
        truth.user_factors[user] @ truth.item_factors[item]
        + truth.user_popularity_weight[user] * truth.item_log_popularity[item]
        + truth.feature_interaction
        * (truth.region_genre[truth.user_region[user]] @ truth.item_genre_weights[item])
        + truth.sequence_weight * (state @ truth.item_follows[item])
    )


def _user_genre_counts(directory, truth: GroundTruth) -> np.ndarray:
    """``[users, genres]`` genre weights summed over each user's interactions."""
    users, items = _sequences(directory)
    counts = np.zeros((len(truth.user_ids), truth.item_genre_weights.shape[1]))
    np.add.at(counts, users - 1, truth.item_genre_weights[items - 1])
    return counts


def _group_shares(counts: np.ndarray, labels: np.ndarray, groups: int) -> np.ndarray:
    """``[groups, genres]`` genre shares of the interactions of each group of users."""
    summed = np.zeros((groups, counts.shape[1]))
    np.add.at(summed, labels, counts)
    return summed / summed.sum(axis=1, keepdims=True)
