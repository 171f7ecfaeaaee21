"""Ranking metrics for candidate lists with one held-out positive, ties resolved by expectation.

A positive tied with ``t`` other items at 0-based position ``g`` (``g`` items score higher)
is equally likely at any position ``g .. g + t``; every metric is averaged over those
positions, which matches scikit-learn's tie handling in ``ndcg_score`` and ``roc_auc_score``.

Beyond accuracy, the module measures what a model recommends (popularity, novelty, catalogue
coverage of its top-k) and how faithfully a student reproduces a reference (teacher) ranking
(Kendall's tau-b, top-k overlap). Everything is vectorised over users: ``scores`` is
``[users, L]``, one row per user's candidate list. A score may be ``-inf`` (an item excluded
from ranking, below everything); NaN or ``+inf`` is a ValueError, not a silently wrong number.
"""

from __future__ import annotations

import numpy as np

_PAIRWISE_CHUNK = 50_000_000
"""Largest ``[users, L, L]`` pairwise block built at once by ``kendall_tau``."""


def _check_scores(scores: np.ndarray) -> None:
    """Refuse ``[users, L]`` scores holding NaN or ``+inf`` (``-inf`` marks an excluded item)."""
    bad = (np.isnan(scores) | np.isposinf(scores)).any(axis=1)
    if bad.any():
        raise ValueError(
            f"the scores of {int(bad.sum())} of {len(scores)} users hold NaN or +inf; "
            "only finite scores (or -inf for an excluded item) can be ranked"
        )


def held_out_ranks(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row, how many items score above the positive and how many tie with it.

    ``scores`` is ``[users, items]`` (``-inf`` for items excluded from ranking), ``positive``
    the column of each row's held-out item.
    """
    _check_scores(scores)
    rows = np.arange(len(scores))
    target = scores[rows, positive][:, None]
    greater = (scores > target).sum(axis=1)
    ties = (scores == target).sum(axis=1) - 1
    return greater, ties


def _expected(discount: np.ndarray, greater: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """Mean of ``discount[p]`` over positions ``greater .. greater + ties``."""
    cumulative = np.concatenate([[0.0], np.cumsum(discount)])
    last = np.minimum(greater + ties + 1, len(discount))
    first = np.minimum(greater, len(discount))
    return (cumulative[last] - cumulative[first]) / (ties + 1)


def ndcg_at(greater: np.ndarray, ties: np.ndarray, k: int) -> np.ndarray:
    """NDCG@k = E[1 / log2(rank + 1)] for rank <= k, else 0 (ideal DCG is 1)."""
    return _expected(1.0 / np.log2(np.arange(k) + 2.0), greater, ties)


def hit_at(greater: np.ndarray, ties: np.ndarray, k: int) -> np.ndarray:
    """HR@k = P(rank <= k)."""
    return _expected(np.ones(k), greater, ties)


def reciprocal_rank(greater: np.ndarray, ties: np.ndarray) -> np.ndarray:
    """RR = E[1 / rank]."""
    longest = int((greater + ties).max(initial=0)) + 1
    return _expected(1.0 / np.arange(1, longest + 1), greater, ties)


def average_precision_at(greater: np.ndarray, ties: np.ndarray, k: int) -> np.ndarray:
    """AP@k of a single positive = E[1 / rank] for rank <= k, else 0 (its mean is MAP@k)."""
    return _expected(1.0 / np.arange(1, k + 1), greater, ties)


def single_positive_metrics(
    greater: np.ndarray, ties: np.ndarray, *, k: int = 10
) -> dict[str, np.ndarray]:
    """Per-user NDCG@k, HR@k (the recall@k of a single positive) and MRR."""
    return {
        f"ndcg@{k}": ndcg_at(greater, ties, k),
        f"hr@{k}": hit_at(greater, ties, k),
        "mrr": reciprocal_rank(greater, ties),
    }


def auc(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """Per-user AUC = (negatives below the positive + 0.5 * negatives tied) / negatives.

    Every other column is a negative (``-inf`` ones too); a list of one item gives NaN.
    """
    greater, ties = held_out_ranks(scores, positive)
    negatives = scores.shape[1] - 1
    below = negatives - greater - ties
    return (below + 0.5 * ties) / negatives


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Columns ``[users, min(k, L)]`` of each row's k highest scores, descending.

    Ties go to the lower column index.
    """
    _check_scores(scores)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def mean_popularity_at(scores: np.ndarray, popularity: np.ndarray, k: int) -> np.ndarray:
    """Per-user mean of ``popularity[u, j]`` over the top-k columns ``j`` (popularity bias).

    ``popularity`` is ``[users, L]``: each candidate's train interaction count.
    """
    return np.take_along_axis(popularity, top_k(scores, k), axis=1).mean(axis=1)


def novelty_at(scores: np.ndarray, popularity: np.ndarray, n_users: int, k: int) -> np.ndarray:
    """Per-user mean self-information -log2(max(pop, 1) / n_users) of the top-k items."""
    chosen = np.take_along_axis(popularity, top_k(scores, k), axis=1)
    return -np.log2(np.maximum(chosen, 1) / n_users).mean(axis=1)


def coverage_at(scores: np.ndarray, item_ids: np.ndarray, n_catalogue: int, k: int) -> float:
    """Catalogue coverage = |distinct item ids in any user's top-k| / n_catalogue.

    ``item_ids`` is ``[users, L]``: the catalogue id of each candidate.
    """
    chosen = np.take_along_axis(item_ids, top_k(scores, k), axis=1)
    return np.unique(chosen).size / n_catalogue


def _pairwise_signs(values: np.ndarray) -> np.ndarray:
    """``sign(values[u, i] - values[u, j])`` as ``[users, L, L]`` int8, exact for infinities."""
    left, right = values[:, :, None], values[:, None, :]
    return (left > right).astype(np.int8) - (left < right).astype(np.int8)


def kendall_tau(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-user Kendall's tau-b between ``scores`` and ``reference`` over the same list.

    With ``sx = sign(x_i - x_j)`` and ``sy = sign(y_i - y_j)`` over all pairs ``(i, j)``,
    tau_b = sum(sx * sy) / sqrt(sum(sx**2) * sum(sy**2)), i.e. (concordant - discordant) /
    sqrt((pairs - ties in x) * (pairs - ties in y)): ``scipy.stats.kendalltau``'s default.
    A constant row gives NaN.
    """
    _check_scores(scores)
    _check_scores(reference)
    users, length = scores.shape
    chunk = max(1, _PAIRWISE_CHUNK // max(1, length * length))
    tau = np.empty(users)
    for start in range(0, users, chunk):
        x = _pairwise_signs(scores[start : start + chunk])
        y = _pairwise_signs(reference[start : start + chunk])
        agreement = (x * y).sum(axis=(1, 2), dtype=np.int64)
        untied_x = np.abs(x).sum(axis=(1, 2), dtype=np.int64)
        untied_y = np.abs(y).sum(axis=(1, 2), dtype=np.int64)
        with np.errstate(invalid="ignore"):  # constant rows: 0 / 0
            tau[start : start + chunk] = agreement / np.sqrt(untied_x.astype(float) * untied_y)
    return tau


def top_k_overlap(scores: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Per-user |top_k(scores) ∩ top_k(reference)| / k (k capped at the list length L)."""
    chosen = np.zeros(scores.shape, dtype=bool)
    wanted = np.zeros(reference.shape, dtype=bool)
    np.put_along_axis(chosen, top_k(scores, k), True, axis=1)
    np.put_along_axis(wanted, top_k(reference, k), True, axis=1)
    return (chosen & wanted).sum(axis=1) / min(k, scores.shape[1])


def list_metrics(
    scores: np.ndarray,
    *,
    positive: np.ndarray | None = None,
    popularity: np.ndarray | None = None,
    n_users: int | None = None,
    reference: np.ndarray | None = None,
    k: int = 10,
) -> dict[str, np.ndarray]:
    """Per-user metrics of candidate lists ``scores`` ``[users, L]``.

    Always ``ndcg@k``, ``hr@k``, ``mrr``, ``map@k`` and ``auc`` of the held-out item in column
    ``positive`` (column 0 by default); ``popularity@k`` when ``popularity`` (``[users, L]``
    train counts) is given and ``novelty@k`` when ``n_users`` is too; ``kendall_tau`` and
    ``overlap@k`` against a ``reference`` (teacher) model's scores on the same lists.

    GAUC (the impression-weighted mean of per-user AUC) equals the plain mean of ``auc`` here,
    since every user's list has the same length L.
    """
    if positive is None:
        positive = np.zeros(len(scores), dtype=np.int64)
    greater, ties = held_out_ranks(scores, positive)
    result = single_positive_metrics(greater, ties, k=k)
    result[f"map@{k}"] = average_precision_at(greater, ties, k)
    result["auc"] = auc(scores, positive)
    if popularity is not None:
        result[f"popularity@{k}"] = mean_popularity_at(scores, popularity, k)
        if n_users is not None:
            result[f"novelty@{k}"] = novelty_at(scores, popularity, n_users, k)
    if reference is not None:
        result["kendall_tau"] = kendall_tau(scores, reference)
        result[f"overlap@{k}"] = top_k_overlap(scores, reference, k)
    return result
