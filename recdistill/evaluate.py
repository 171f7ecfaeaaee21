"""Score every evaluated user's candidate list, and the full catalogue, with any ranker."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow.parquet as pq
import torch

from recdistill.data.batches import CandidateLists, FeatureStore, RankingBatch
from recdistill.data.tables import split_file
from recdistill.metrics import held_out_ranks, single_positive_metrics

Ranker = Callable[[RankingBatch], torch.Tensor]
"""Anything that scores a batch's lists: ``[lists, list_size]`` scores."""

OTHER_HELD_OUT = {"valid": "test", "test": "valid"}


@torch.no_grad()
def evaluate(
    ranker: Ranker,
    store: FeatureStore,
    split: str,
    *,
    k: int = 10,
    full_ranking: bool = True,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Per-user metrics on ``split``'s candidate lists (and on full ranking), plus ``user_id``.

    Full ranking ranks the held-out item against every catalogue item except the user's
    train items and other held-out item.
    """
    lists = CandidateLists(store, split, batch_size=batch_size)
    greater, ties = [], []
    for batch in lists:
        g, t = held_out_ranks(ranker(batch).numpy(), np.zeros(len(batch.labels), dtype=int))
        greater.append(g)
        ties.append(t)
    result = {"user_id": store.users.values[lists.users - 1]}
    result |= single_positive_metrics(np.concatenate(greater), np.concatenate(ties), k=k)
    if full_ranking:
        full = single_positive_metrics(*_full_ranks(ranker, store, lists, split, batch_size), k=k)
        result |= {
            f"full_ndcg@{k}": full[f"ndcg@{k}"],
            f"full_recall@{k}": full[f"hr@{k}"],
            "full_mrr": full["mrr"],
        }
    return result


def _full_ranks(
    ranker: Ranker, store: FeatureStore, lists: CandidateLists, split: str, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    other = pq.read_table(store.directory / split_file(OTHER_HELD_OUT[split]))
    other_item = np.zeros(len(store.users), dtype=np.int64)
    other_item[store.users.index(other.column("user_id").to_numpy())] = store.items.index(
        other.column("item_id").to_numpy()
    )
    catalogue = np.arange(1, len(store.items))
    greater, ties = [], []
    for start in range(0, len(lists.users), batch_size):
        users = lists.users[start : start + batch_size]
        targets = lists.items[start : start + batch_size, 0]
        rows = len(users)
        batch = store.batch(
            users,
            np.broadcast_to(catalogue, (rows, len(catalogue))),
            np.zeros((rows, len(catalogue)), dtype=np.float32),
        )
        scores = ranker(batch).numpy().astype(np.float64)
        seen, lengths = store.history.gather(users)
        owner = np.repeat(np.arange(rows), lengths)
        scores[owner, seen - 1] = -np.inf
        has_other = other_item[users] > 0
        scores[np.arange(rows)[has_other], other_item[users][has_other] - 1] = -np.inf
        g, t = held_out_ranks(scores, targets - 1)
        greater.append(g)
        ties.append(t)
    return np.concatenate(greater), np.concatenate(ties)


def mean_metrics(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(values.mean()) for name, values in per_user.items() if name != "user_id"}
