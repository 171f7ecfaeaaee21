"""Ranking metrics for lists with one held-out positive, ties resolved by expectation.

A positive tied with ``t`` other items at 0-based position ``g`` (``g`` items score higher)
is equally likely at any position ``g .. g + t``; every metric is averaged over those
positions, which matches scikit-learn's tie handling in ``ndcg_score``.
"""

from __future__ import annotations

import numpy as np


def held_out_ranks(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row, how many items score above the positive and how many tie with it.

    ``scores`` is ``[users, items]`` (``-inf`` for items excluded from ranking), ``positive``
    the column of each row's held-out item.
    """
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
    return _expected(1.0 / np.log2(np.arange(k) + 2.0), greater, ties)


def hit_at(greater: np.ndarray, ties: np.ndarray, k: int) -> np.ndarray:
    return _expected(np.ones(k), greater, ties)


def reciprocal_rank(greater: np.ndarray, ties: np.ndarray) -> np.ndarray:
    longest = int((greater + ties).max(initial=0)) + 1
    return _expected(1.0 / np.arange(1, longest + 1), greater, ties)


def single_positive_metrics(
    greater: np.ndarray, ties: np.ndarray, *, k: int = 10
) -> dict[str, np.ndarray]:
    """Per-user NDCG@k, HR@k (the recall@k of a single positive) and MRR."""
    return {
        f"ndcg@{k}": ndcg_at(greater, ties, k),
        f"hr@{k}": hit_at(greater, ties, k),
        "mrr": reciprocal_rank(greater, ties),
    }
