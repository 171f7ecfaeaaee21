import numpy as np
import pytest
import torch

from recdistill.baselines import Ease, Popularity
from recdistill.data.batches import CandidateLists, FeatureStore
from recdistill.evaluate import evaluate


@pytest.fixture(scope="module")
def store(synthetic_dir):
    return FeatureStore(synthetic_dir, history_length=10)


def slot_items(batch):
    return batch.items["item_id"].values()[batch.candidates]


class Fixed:
    """Scores items by a fixed per-item table, optionally pushing each user's train items."""

    def __init__(self, store, push_seen=0.0):
        self.scores = torch.rand(len(store.items), generator=torch.Generator().manual_seed(0))
        self.store, self.push_seen = store, push_seen

    def __call__(self, batch):
        items = slot_items(batch)
        scores = self.scores[items].clone()
        users = batch.users["user_id"].values().numpy()
        for row, user in enumerate(users):
            seen, _ = self.store.history.gather(np.array([user]))
            scores[row, torch.isin(items[row], torch.as_tensor(seen))] += self.push_seen
        return scores


def test_full_ranking_ignores_the_users_own_train_items(store):
    plain = evaluate(Fixed(store), store, "test")
    pushed = evaluate(Fixed(store, push_seen=100.0), store, "test")
    assert np.allclose(plain["full_ndcg@10"], pushed["full_ndcg@10"])
    assert plain["full_ndcg@10"].mean() <= plain["ndcg@10"].mean()


def test_a_ranker_that_knows_the_answer_scores_one(store):
    def oracle(batch):
        return (batch.candidates == batch.candidates[:, :1]).float()

    metrics = evaluate(oracle, store, "test", full_ranking=False)
    assert metrics["ndcg@10"].min() == 1.0 and metrics["mrr"].min() == 1.0


def test_a_constant_ranker_gets_no_credit_for_ties(store):
    metrics = evaluate(lambda b: torch.zeros(b.candidates.shape), store, "test")
    expected = np.mean(1 / np.log2(np.arange(10) + 2)) * 10 / 100
    assert metrics["ndcg@10"] == pytest.approx(np.full(len(metrics["ndcg@10"]), expected))


def test_ease_matches_its_closed_form_and_popularity_counts(store):
    ease = Ease.fit(store, l2=10.0)
    x = np.zeros((len(store.users), len(store.items)))
    x[store.train_users, store.train_items] = 1
    inverse = np.linalg.inv(x.T @ x + 10.0 * np.eye(len(store.items)))
    weights = np.eye(len(store.items)) - inverse / np.diag(inverse)
    assert np.allclose(ease.scores.numpy(), x @ weights, atol=1e-4)
    counts = Popularity(store).counts.numpy()
    assert counts.sum() == len(store.train_items) and counts[0] == 0
    assert (
        evaluate(ease, store, "valid")["ndcg@10"].mean()
        > evaluate(Popularity(store), store, "valid")["ndcg@10"].mean()
    )


def spoiled(store, users, value, *, full_ranking_only=False):
    """A ``Fixed`` ranker whose scores are ``value`` for the given (internal) user indices."""
    fixed = Fixed(store)

    def ranker(batch):
        scores = fixed(batch)
        if full_ranking_only and batch.candidates.shape[1] <= 100:
            return scores
        rows = np.isin(batch.users["user_id"].values().numpy(), users)
        scores[torch.as_tensor(rows)] = value
        return scores

    return ranker


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_candidate_scores_are_refused_naming_the_model(store, value):
    evaluated = CandidateLists(store, "test").users
    users = evaluated[::7]
    with pytest.raises(ValueError) as refused:
        evaluate(spoiled(store, users, value), store, "test", name="student")
    assert str(refused.value) == (
        f"model 'student' gave non-finite scores for {len(users)} of {len(evaluated)} users; "
        "refusing to evaluate"
    )


def test_non_finite_full_ranking_scores_are_refused_naming_the_model(store):
    evaluated = CandidateLists(store, "test").users
    users = evaluated[:3]
    ranker = spoiled(store, users, np.nan, full_ranking_only=True)
    assert np.isfinite(evaluate(ranker, store, "test", full_ranking=False)["ndcg@10"]).all()
    with pytest.raises(ValueError) as refused:
        evaluate(ranker, store, "test", name="teacher")
    assert str(refused.value) == (
        f"model 'teacher' gave non-finite scores on full ranking for 3 of {len(evaluated)} "
        "users; refusing to evaluate"
    )
