import numpy as np
import pytest
from scipy.stats import kendalltau
from sklearn.metrics import ndcg_score, roc_auc_score

from recdistill import metrics
from recdistill.metrics import (
    auc,
    average_precision_at,
    coverage_at,
    held_out_ranks,
    hit_at,
    kendall_tau,
    list_metrics,
    mean_popularity_at,
    ndcg_at,
    novelty_at,
    reciprocal_rank,
    top_k,
    top_k_overlap,
)


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


def rows(seed, users=100, length=20, levels=5):
    """Random integer scores (many ties) and a random positive column per row."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, size=(users, length)).astype(float)
    return scores, rng.integers(0, length, size=users)


@pytest.mark.parametrize("seed", range(3))
def test_auc_matches_scikit_learn_with_ties(seed):
    scores, positive = rows(seed)
    scores[:, -1] = -np.inf  # still an item, ranked below everything
    labels = np.zeros_like(scores)
    labels[np.arange(len(scores)), positive] = 1
    finite = np.where(np.isinf(scores), -1e9, scores)  # scikit-learn rejects infinities
    expected = [roc_auc_score(labels[i], finite[i]) for i in range(len(scores))]
    assert auc(scores, positive) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(3))
def test_map_matches_direct_computation(seed):
    scores, positive = rows(seed)
    greater, ties = held_out_ranks(scores, positive)
    for k in (1, 3, 10, 20):
        expected = []
        for g, t in zip(greater, ties, strict=True):  # rank g + 1 .. g + t + 1, equally likely
            expected.append(np.mean([1 / r if r <= k else 0.0 for r in range(g + 1, g + t + 2)]))
        assert average_precision_at(greater, ties, k) == pytest.approx(expected)


def test_map_auc_hand_made_cases():
    greater, ties = ranks([0.5, 0.9, 0.7, 0.1])  # third
    assert average_precision_at(greater, ties, 2)[0] == 0.0
    assert average_precision_at(greater, ties, 3)[0] == pytest.approx(1 / 3)
    assert auc(np.array([[0.5, 0.9, 0.7, 0.1]]), np.array([0]))[0] == pytest.approx(1 / 3)
    greater, ties = ranks([1.0, 1.0, 0.0])  # tied for first
    assert average_precision_at(greater, ties, 1)[0] == 0.5
    assert auc(np.array([[1.0, 1.0, 0.0]]), np.array([0]))[0] == 0.75
    bottom = np.array([[0.0, 0.3, 0.2, 0.1]])  # positive at the bottom
    assert auc(bottom, np.array([0]))[0] == 0.0
    assert average_precision_at(*held_out_ranks(bottom, np.array([0])), 3)[0] == 0.0
    assert auc(bottom, np.array([1]))[0] == 1.0  # positive in another column, on top


def test_top_k_is_descending_with_stable_ties():
    scores = np.array([[0.1, 0.5, 0.5, 0.9, -np.inf], [3.0, 3.0, 3.0, 1.0, 2.0]])
    assert top_k(scores, 3).tolist() == [[3, 1, 2], [0, 1, 2]]
    assert top_k(scores, 5)[0].tolist() == [3, 1, 2, 0, 4]


def test_popularity_and_novelty():
    scores = np.array([[0.9, 0.1, 0.5, 0.7], [0.0, 0.0, 1.0, 0.0]])
    popularity = np.array([[10, 1000, 0, 30], [8, 2, 4, 16]])
    assert mean_popularity_at(scores, popularity, 2).tolist() == [20.0, 6.0]  # cols 0,3 | 2,0
    novelty = novelty_at(scores, popularity, 16, 2)
    assert novelty[0] == pytest.approx((-np.log2(10 / 16) - np.log2(30 / 16)) / 2)
    assert novelty[1] == pytest.approx((2 + 1) / 2)  # pops 4 and 8 of 16 users
    assert novelty_at(scores[:1], popularity[:1], 16, 3)[0] == pytest.approx(
        (-np.log2(10 / 16) - np.log2(30 / 16) + 4) / 3  # pop 0 counts as 1
    )


def test_coverage():
    scores = np.array([[0.9, 0.8, 0.1], [0.1, 0.9, 0.8]])
    item_ids = np.array([[3, 7, 5], [4, 3, 9]])
    assert coverage_at(scores, item_ids, 10, 2) == pytest.approx(3 / 10)  # {3, 7} | {3, 9}
    assert coverage_at(scores, item_ids, 10, 1) == pytest.approx(1 / 10)  # 3 | 3
    assert coverage_at(scores, item_ids, 10, 3) == pytest.approx(5 / 10)


@pytest.mark.parametrize("seed", range(3))
def test_kendall_tau_matches_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(60, 25)).astype(float)
    reference = rng.integers(0, 6, size=(60, 25)).astype(float)
    reference[1] = scores[1] * 2 + 1  # perfect agreement despite ties
    reference[2] = -scores[2]
    scores[3, :5] = -np.inf
    reference[4] = 3.0  # constant: NaN
    expected = [kendalltau(x, y).statistic for x, y in zip(scores, reference, strict=True)]
    tau = kendall_tau(scores, reference)
    assert tau == pytest.approx(expected, nan_ok=True)
    assert np.isnan(tau[4]) and tau[1] == pytest.approx(1.0) and tau[2] == pytest.approx(-1.0)


def test_kendall_tau_processes_users_in_chunks(monkeypatch):
    scores, _ = rows(0, users=7, length=10)
    reference, _ = rows(1, users=7, length=10)
    whole = kendall_tau(scores, reference)
    monkeypatch.setattr(metrics, "_PAIRWISE_CHUNK", 300)  # 3 users per chunk
    assert kendall_tau(scores, reference) == pytest.approx(whole)


def test_top_k_overlap():
    scores = np.array([[0.9, 0.8, 0.7, 0.1], [0.1, 0.2, 0.3, 0.4]])
    reference = np.array([[0.9, 0.1, 0.8, 0.7], [0.1, 0.2, 0.3, 0.4]])
    assert top_k_overlap(scores, reference, 2).tolist() == [0.5, 1.0]  # {0,1} vs {0,2}
    assert top_k_overlap(scores, reference, 3).tolist() == [2 / 3, 1.0]
    assert top_k_overlap(scores, reference, 10).tolist() == [1.0, 1.0]  # k capped at L


def test_list_metrics_keys_and_values():
    scores, _ = rows(0, users=30, length=12)
    popularity = np.arange(360).reshape(30, 12)
    basic = list_metrics(scores, k=5)
    assert set(basic) == {"ndcg@5", "hr@5", "mrr", "map@5", "auc"}
    assert basic["auc"] == pytest.approx(auc(scores, np.zeros(30, dtype=int)))
    assert set(list_metrics(scores, popularity=popularity, k=5)) == set(basic) | {"popularity@5"}
    full = list_metrics(scores, popularity=popularity, n_users=400, reference=-scores, k=5)
    assert set(full) == set(basic) | {"popularity@5", "novelty@5", "kendall_tau", "overlap@5"}
    assert all(value.shape == (30,) for value in full.values())
    positive = np.full(30, 3)
    shifted = list_metrics(scores, positive=positive, k=5)
    greater, ties = held_out_ranks(scores, positive)
    assert shifted["map@5"] == pytest.approx(average_precision_at(greater, ties, 5))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_positive_infinite_scores_are_refused(bad):
    scores = np.array([[0.5, 0.9, 0.7], [0.5, 0.9, 0.7], [0.2, 0.1, -np.inf]])
    candidate, held_out = scores.copy(), scores.copy()
    candidate[1, 1] = bad  # a NaN candidate used to count as below the held-out item
    held_out[0, 0] = held_out[1, 0] = bad  # a NaN held-out item used to give an AUC above 1
    positive = np.zeros(3, dtype=int)
    computations = (
        lambda spoiled: held_out_ranks(spoiled, positive),
        lambda spoiled: auc(spoiled, positive),
        lambda spoiled: top_k(spoiled, 2),
        lambda spoiled: kendall_tau(spoiled, scores),
        lambda spoiled: kendall_tau(scores, spoiled),
        list_metrics,
    )
    for spoiled, users in ((candidate, 1), (held_out, 2)):
        for compute in computations:
            with pytest.raises(ValueError, match=rf"^the scores of {users} of 3 users hold NaN"):
                compute(spoiled)
    assert hit_at(*held_out_ranks(scores, positive), 2).tolist() == [0.0, 0.0, 1.0]
