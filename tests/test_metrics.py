import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from recdistill.metrics import held_out_ranks, hit_at, ndcg_at, reciprocal_rank


def ranks(scores, positive=0):
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    return held_out_ranks(scores, np.full(len(scores), positive))


@pytest.mark.parametrize("seed", range(5))
def test_ndcg_matches_scikit_learn_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, size=(200, 30)).astype(float)  # many ties
    positive = rng.integers(0, 30, size=200)
    relevance = np.zeros_like(scores)
    relevance[np.arange(200), positive] = 1
    greater, ties = held_out_ranks(scores, positive)
    for k in (1, 5, 10, 30):
        expected = [ndcg_score(relevance[i : i + 1], scores[i : i + 1], k=k) for i in range(200)]
        assert ndcg_at(greater, ties, k) == pytest.approx(expected)


def test_hand_made_cases():
    greater, ties = ranks([0.9, 0.1, 0.5])  # positive on top
    assert ndcg_at(greater, ties, 10)[0] == 1.0
    assert reciprocal_rank(greater, ties)[0] == 1.0
    greater, ties = ranks([0.5, 0.9, 0.7, 0.1])  # third
    assert ndcg_at(greater, ties, 10)[0] == pytest.approx(1 / np.log2(4))
    assert hit_at(greater, ties, 2)[0] == 0.0 and hit_at(greater, ties, 3)[0] == 1.0
    assert reciprocal_rank(greater, ties)[0] == pytest.approx(1 / 3)
    greater, ties = ranks([1.0, 1.0, 0.0])  # tied for first: position 0 or 1, equally likely
    assert hit_at(greater, ties, 1)[0] == 0.5
    assert reciprocal_rank(greater, ties)[0] == pytest.approx((1 + 1 / 2) / 2)
    assert ndcg_at(greater, ties, 10)[0] == pytest.approx((1 + 1 / np.log2(3)) / 2)


def test_excluded_items_rank_below_everything():
    greater, ties = ranks([0.2, -np.inf, 0.9, -np.inf])
    assert (greater[0], ties[0]) == (1, 0)
