"""Reference rankers every distillation claim is measured against."""

from __future__ import annotations

import numpy as np
import torch

from recdistill.data.batches import FeatureStore, RankingBatch

EASE_MAX_ITEMS = 30_000


def _slot_items(batch: RankingBatch) -> torch.Tensor:
    return batch.items["item_id"].values()[batch.candidates]


class Popularity:
    """Scores an item by its number of train interactions."""

    def __init__(self, store: FeatureStore) -> None:
        self.counts = torch.as_tensor(store.item_train_counts, dtype=torch.float32)

    def __call__(self, batch: RankingBatch) -> torch.Tensor:
        return self.counts[_slot_items(batch)]


class Ease:
    """EASE (Steck, 2019): a closed-form item-item linear autoencoder, fitted on train."""

    def __init__(self, store: FeatureStore, l2: float) -> None:
        scores = ease_scores(
            store.train_users, store.train_items, len(store.users), len(store.items), l2
        )
        self.scores = torch.as_tensor(scores, dtype=torch.float32)

    def __call__(self, batch: RankingBatch) -> torch.Tensor:
        users = batch.users["user_id"].values()
        return self.scores[users[:, None], _slot_items(batch)]


def ease_scores(
    users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, l2: float
) -> np.ndarray:
    """EASE scores ``[n_users, n_items]`` of the (user, item) index pairs given.

    ``B = I - P · diag(1 / diag(P))`` with ``P = (XᵀX + λI)⁻¹``, ``X`` the binary user × item
    matrix; a user's scores are ``x_u B``.
    """
    if n_items > EASE_MAX_ITEMS:
        raise ValueError(f"EASE inverts an items × items matrix; {n_items} items is too many")
    x = np.zeros((n_users, n_items), dtype=np.float64)
    x[users, items] = 1.0
    precision = np.linalg.inv(x.T @ x + l2 * np.eye(n_items))
    weights = -precision / np.diag(precision)
    np.fill_diagonal(weights, 0.0)
    return x @ weights
