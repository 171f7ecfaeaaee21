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
    """EASE (Steck, 2019): a closed-form item-item linear autoencoder.

    ``B = I - P · diag(1 / diag(P))`` with ``P = (XᵀX + λI)⁻¹``, ``X`` the binary user × item
    train matrix; a user's scores are ``x_u B``.
    """

    def __init__(self, store: FeatureStore, l2: float) -> None:
        n_items = len(store.items)
        if n_items > EASE_MAX_ITEMS:
            raise ValueError(f"EASE inverts an items × items matrix; {n_items} items is too many")
        x = np.zeros((len(store.users), n_items), dtype=np.float64)
        x[store.train_users, store.train_items] = 1.0
        gram = x.T @ x + l2 * np.eye(n_items)
        precision = np.linalg.inv(gram)
        weights = -precision / np.diag(precision)
        np.fill_diagonal(weights, 0.0)
        self.scores = torch.as_tensor(x @ weights, dtype=torch.float32)

    def __call__(self, batch: RankingBatch) -> torch.Tensor:
        users = batch.users["user_id"].values()
        return self.scores[users[:, None], _slot_items(batch)]
