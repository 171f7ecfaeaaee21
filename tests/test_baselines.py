import math

import numpy as np
import pytest

from recdistill import evaluate as evaluate_module
from recdistill import pipeline
from recdistill.baselines import Ease, ease_scores, ease_weights, history_matrix
from recdistill.config import parse_run_config
from recdistill.data.batches import CandidateLists
from recdistill.data.feature_store import FeatureStore, Jagged
from recdistill.evaluate import evaluate

L2 = 30.0


@pytest.fixture(scope="module")
def store(synthetic_dir):
    return FeatureStore(synthetic_dir, history_length=10)


@pytest.fixture(scope="module")
def ease(store):
    return Ease.fit(store, L2)


def dense_recency(store, half_life):
    """x[u, i] = 0.5 ** (age / half_life), one loop per user: the newest occurrence counts."""
    x = np.zeros((len(store.users), len(store.items)))
    offsets, values = store.history.offsets, store.history.values
    for user in range(len(store.users)):
        for age, item in enumerate(values[offsets[user] : offsets[user + 1]]):
            x[user, item] = max(x[user, item], 0.5 ** (age / half_life))
    return x


def dense_ease_weights(store, l2):
    x = np.zeros((len(store.users), len(store.items)))
    x[store.train_users, store.train_items] = 1
    inverse = np.linalg.inv(x.T @ x + l2 * np.eye(len(store.items)))
    weights = np.eye(len(store.items)) - inverse / np.diag(inverse)
    return weights


def test_history_matrix_weights_items_by_their_age_newest_first():
    # User 0 has no history; user 1 saw items 3 (newest), 1, 3 again, 2; user 2 saw item 1.
    history = Jagged(np.array([0, 0, 4, 5]), np.array([3, 1, 3, 2, 1]))
    x = history_matrix(history, 5, half_life=2.0)
    expected = np.zeros((3, 5))
    expected[1, 3] = 1.0  # age 0; its older repeat (age 2) does not lower or add to it
    expected[1, 1] = 0.5**0.5
    expected[1, 2] = 0.5**1.5
    expected[2, 1] = 1.0
    assert np.allclose(x, expected)
    assert np.array_equal(history_matrix(history, 5), expected > 0)
    with pytest.raises(ValueError, match="half_life"):
        history_matrix(history, 5, half_life=0.0)


def test_ease_recency_matches_a_dense_computation(store, ease):
    weights = dense_ease_weights(store, L2)
    assert np.allclose(ease.weights, weights, atol=1e-8)
    for half_life in (1.0, 3.0):
        recency = ease.scoring(store, half_life)
        expected = dense_recency(store, half_life) @ weights
        assert np.allclose(recency.scores.numpy(), expected, atol=1e-4)
        assert (recency.l2, recency.half_life) == (L2, half_life)
        batch = next(iter(CandidateLists(store, "valid", batch_size=32)))
        users = batch.users["user_id"].values().numpy()
        items = batch.items["item_id"].values()[batch.candidates].numpy()
        assert np.allclose(recency(batch).numpy(), expected[users[:, None], items], atol=1e-4)


def test_an_infinite_half_life_is_plain_ease(store, ease):
    assert np.array_equal(ease.scoring(store, math.inf).scores, ease.scores)
    assert np.allclose(ease.scoring(store, 1e12).scores, ease.scores, atol=1e-5)
    # Ease and the pairwise ease_scores (the A/B oracle's) are one fit.
    pairwise = ease_scores(
        store.train_users, store.train_items, len(store.users), len(store.items), L2
    )
    assert np.allclose(ease.scores.numpy(), pairwise, atol=1e-4)
    assert np.allclose(
        ease_weights(history_matrix(store.history, len(store.items)), L2), ease.weights
    )


def test_half_life_and_l2_are_chosen_on_validation_only(store, monkeypatch):
    splits, lists = [], []
    real_lists = evaluate_module.CandidateLists

    def spy(ranker, store, split, **kwargs):
        splits.append(split)
        return evaluate(ranker, store, split, **kwargs)

    def spy_lists(store, split, **kwargs):
        lists.append(split)
        return real_lists(store, split, **kwargs)

    monkeypatch.setattr(pipeline, "evaluate", spy)
    monkeypatch.setattr(evaluate_module, "CandidateLists", spy_lists)
    ease = pipeline._best_on_valid(store, [5.0, L2], lambda l2: Ease.fit(store, l2), "ndcg@10")
    grid = [1.0, 5.0, 50.0]
    recency = pipeline._best_on_valid(store, grid, lambda h: ease.scoring(store, h), "ndcg@10")
    assert splits == ["valid"] * 5 and set(lists) == {"valid"}
    assert ease.l2 in (5.0, L2) and recency.l2 == ease.l2
    monkeypatch.undo()

    def valid_ndcg(half_life):
        ranker = ease.scoring(store, half_life)
        return evaluate(ranker, store, "valid", full_ranking=False)["ndcg@10"].mean()

    assert recency.half_life == max(grid, key=valid_ndcg)
    on_full = pipeline._best_on_valid(store, grid, lambda h: ease.scoring(store, h), "full_ndcg@10")
    assert on_full.half_life == max(
        grid,
        key=lambda h: evaluate(ease.scoring(store, h), store, "valid")["full_ndcg@10"].mean(),
    )
    # The shared fit: the tuned ranker scores with the chosen Ease's B, not a refit.
    expected = history_matrix(store.history, len(store.items), recency.half_life) @ ease.weights
    assert np.allclose(recency.scores.numpy(), expected, atol=1e-5)


def test_an_empty_grid_is_an_error():
    for table in ({"ease": {"l2": []}}, {"ease_recency": {"half_life": []}}):
        with pytest.raises(ValueError, match=r"\[baselines.\*\]: a baseline's grid is empty"):
            parse_run_config({"baselines": table})


def test_test_time_ease_reads_the_validation_item_as_the_newest(store, ease):
    tested = store.known_at("test")
    recency = ease.scoring(tested, 3.0)
    expected = dense_recency(tested, 3.0) @ ease.weights
    assert np.allclose(recency.scores.numpy(), expected, atol=1e-4)
    user = int(np.flatnonzero(store.valid_items)[0])
    row = tested.history.values[tested.history.offsets[user] : tested.history.offsets[user + 1]]
    assert row[0] == store.valid_items[user]
