"""Reference rankers every distillation claim is measured against."""

from __future__ import annotations

import math

import numpy as np
import torch

from recdistill.data.feature_store import FeatureStore, Jagged, RankingBatch

EASE_MAX_ITEMS = 30_000


def _slot_items(batch: RankingBatch) -> torch.Tensor:
    return batch.items["item_id"].values()[batch.candidates]


class Popularity:
    """Scores an item by its number of train interactions."""

    def __init__(self, store: FeatureStore) -> None:
        self.counts = torch.as_tensor(store.item_train_counts, dtype=torch.float32)

    def __call__(self, batch: RankingBatch) -> torch.Tensor:
        return self.counts[_slot_items(batch)]


class _UserItemTable:
    """A ranker that looks each candidate up in a precomputed ``[users, items]`` score table."""

    scores: torch.Tensor

    def __call__(self, batch: RankingBatch) -> torch.Tensor:
        users = batch.users["user_id"].values()
        return self.scores[users[:, None], _slot_items(batch)]


class Ease(_UserItemTable):
    """EASE (Steck, 2019), a closed-form item-item linear autoencoder, scored from ``store``.

    A user's scores are ``x_u B``: ``B`` is the item × item matrix :meth:`fit` on the binary
    train matrix, and ``x_u[i] = 0.5 ** (age_u(i) / half_life)`` the user's row in ``store``,
    ``age_u(i)`` being item ``i``'s position in the user's history counted from the newest
    (newest = 0) and ``x_u[i] = 0`` for items the user never had. ``half_life = inf`` is plain
    EASE; a finite one is ``ease_recency``. Scores are tabled per user at construction:
    build the ranker from ``store.known_at(split)`` for the split it scores (:meth:`scoring`).
    """

    def __init__(
        self, store: FeatureStore, weights: np.ndarray, *, l2: float, half_life: float = math.inf
    ) -> None:
        self.weights = weights
        self.l2 = l2
        self.half_life = half_life
        rows = history_matrix(store.history, len(store.items), half_life)
        self.scores = torch.as_tensor(rows @ weights, dtype=torch.float32)

    @classmethod
    def fit(cls, store: FeatureStore, l2: float) -> Ease:
        """Plain EASE fitted on ``store``'s histories with regularisation ``l2``."""
        binary = history_matrix(store.history, len(store.items))
        return cls(store, ease_weights(binary, l2), l2=l2)

    def scoring(self, store: FeatureStore, half_life: float | None = None) -> Ease:
        """The same fit scoring ``store``'s histories (with another ``half_life``, if given)."""
        half_life = self.half_life if half_life is None else half_life
        return Ease(store, self.weights, l2=self.l2, half_life=half_life)


def history_matrix(history: Jagged, n_items: int, half_life: float = math.inf) -> np.ndarray:
    """The dense user × item matrix ``x[u, i] = 0.5 ** (age / half_life)`` of train histories.

    ``history`` holds each user's train items newest first (:attr:`FeatureStore.history`), so
    an item's age is its position in the user's row; an item seen twice keeps its newest
    (largest) weight. ``half_life = inf`` gives the binary matrix.
    """
    if not half_life > 0:
        raise ValueError(f"half_life must be positive, not {half_life}")
    _check_items(n_items)
    lengths = np.diff(history.offsets)
    users = np.repeat(np.arange(len(lengths)), lengths)
    age = np.arange(len(history.values)) - np.repeat(history.offsets[:-1], lengths)
    x = np.zeros((len(lengths), n_items), dtype=np.float64)
    np.maximum.at(x, (users, history.values), 0.5 ** (age / half_life))
    return x


def ease_weights(x: np.ndarray, l2: float) -> np.ndarray:
    """The EASE item × item weights of the user × item matrix ``x`` (binary in EASE).

    ``B = I - P · diag(1 / diag(P))`` with ``P = (XᵀX + λI)⁻¹``: zero on the diagonal.
    """
    n_items = x.shape[1]
    _check_items(n_items)
    precision = np.linalg.inv(x.T @ x + l2 * np.eye(n_items))
    weights = -precision / np.diag(precision)
    np.fill_diagonal(weights, 0.0)
    return weights


def ease_scores(
    users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, l2: float
) -> np.ndarray:
    """EASE scores ``[n_users, n_items]`` of the (user, item) index pairs given: ``X B``.

    ``X`` is the binary user × item matrix of the pairs, ``B`` its :func:`ease_weights`.
    """
    _check_items(n_items)
    x = np.zeros((n_users, n_items), dtype=np.float64)
    x[users, items] = 1.0
    return x @ ease_weights(x, l2)


def _check_items(n_items: int) -> None:
    if n_items > EASE_MAX_ITEMS:
        raise ValueError(f"EASE inverts an items × items matrix; {n_items} items is too many")
