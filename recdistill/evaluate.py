"""Score every evaluated user's candidate list, and the full catalogue, with any ranker.

A ranker scores on its own device (:func:`device_of`): batches are moved there and scores
brought back to the CPU."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from recdistill.data.batches import CandidateLists
from recdistill.data.feature_store import FeatureStore, RankingBatch
from recdistill.metrics import held_out_ranks, list_metrics, single_positive_metrics

Ranker = Callable[[RankingBatch], torch.Tensor]
"""Anything that scores a batch's lists: ``[lists, list_size]`` scores."""


def device_of(ranker: Ranker) -> torch.device:
    """Where ``ranker`` computes: a module's weights' device, a teacher's ``device``, else the
    CPU (the baselines' tables)."""
    if isinstance(ranker, torch.nn.Module):
        weight = next(itertools.chain(ranker.parameters(), ranker.buffers()), None)
        return torch.device("cpu") if weight is None else weight.device
    return getattr(ranker, "device", torch.device("cpu"))


def _scores(ranker: Ranker, batch: RankingBatch) -> np.ndarray:
    return ranker(batch.to(device_of(ranker))).cpu().numpy()


@dataclass(frozen=True)
class ScoredLists:
    """A ranker's scores on a split's candidate lists (held-out item in column 0)."""

    users: np.ndarray
    items: np.ndarray
    scores: np.ndarray


@torch.no_grad()
def score_lists(
    ranker: Ranker, store: FeatureStore, split: str, *, batch_size: int = 256
) -> ScoredLists:
    lists = CandidateLists(store, split, batch_size=batch_size)
    scores = np.concatenate([_scores(ranker, batch) for batch in lists])
    return ScoredLists(lists.users, lists.items, scores.astype(np.float32))


@torch.no_grad()
def evaluate(
    ranker: Ranker,
    store: FeatureStore,
    split: str,
    *,
    k: int = 10,
    full_ranking: bool = True,
    reference: ScoredLists | None = None,
    scored: ScoredLists | None = None,
    batch_size: int = 256,
    name: str = "ranker",
) -> dict[str, np.ndarray]:
    """Per-user metrics on ``split``'s candidate lists (and on full ranking), plus ``user_id``.

    ``reference`` (the teacher's scores on the same lists) adds teacher-fidelity metrics;
    ``scored`` reuses this ranker's scores when they are at hand. Full ranking ranks the
    held-out item against every catalogue item the user had not interacted with before it
    (the train items, and for test the validation item), so validation never reads the test
    split. A ranker that gives any user a non-finite score is refused, by ``name``:
    its metrics would be meaningless.
    """
    if scored is None:
        scored = score_lists(ranker, store, split, batch_size=batch_size)
    _refuse_non_finite(name, ~np.isfinite(scored.scores).all(axis=1), "")
    result = {"user_id": store.users.values[scored.users - 1]}
    result |= list_metrics(
        scored.scores,
        popularity=store.item_train_counts[scored.items],
        n_users=len(store.users) - 1,
        reference=None if reference is None else reference.scores,
        k=k,
    )
    if full_ranking:
        full = single_positive_metrics(
            *_full_ranks(ranker, store, scored, split, batch_size, name), k=k
        )
        result |= {
            f"full_ndcg@{k}": full[f"ndcg@{k}"],
            f"full_recall@{k}": full[f"hr@{k}"],
            "full_mrr": full["mrr"],
        }
    return result


@torch.no_grad()
def scoring_latency_ms(
    ranker: Ranker, store: FeatureStore, split: str, *, requests: int = 200
) -> dict[str, float]:
    """In-process time to score one list (one request), median and 99th percentile in ms.

    Batches are built, on the ranker's device, before the clock starts: only the ranker's own
    work is timed, until its scores are back on the CPU.
    """
    lists = CandidateLists(store, split, batch_size=1)
    device = device_of(ranker)
    batches = [batch.to(device) for _, batch in zip(range(requests), lists)]
    for batch in batches[:10]:
        ranker(batch).cpu()
    seconds = []
    for batch in batches:
        started = time.perf_counter()
        ranker(batch).cpu()
        seconds.append(time.perf_counter() - started)
    return {
        "p50": float(np.percentile(seconds, 50) * 1e3),
        "p99": float(np.percentile(seconds, 99) * 1e3),
    }


def _full_ranks(
    ranker: Ranker,
    store: FeatureStore,
    lists: ScoredLists,
    split: str,
    batch_size: int,
    name: str,
) -> tuple[np.ndarray, np.ndarray]:
    store = store.known_at(split)
    catalogue = np.arange(1, len(store.items))
    greater, ties, non_finite = [], [], []
    for start in range(0, len(lists.users), batch_size):
        users = lists.users[start : start + batch_size]
        targets = lists.items[start : start + batch_size, 0]
        rows = len(users)
        batch = store.batch(
            users,
            np.broadcast_to(catalogue, (rows, len(catalogue))),
            np.zeros((rows, len(catalogue)), dtype=np.float32),
        )
        scores = _scores(ranker, batch).astype(np.float64)
        non_finite.append(~np.isfinite(scores).all(axis=1))
        if non_finite[-1].any():
            continue  # counted for the error below; ranking these scores would be meaningless
        seen, lengths = store.history.gather(users)
        owner = np.repeat(np.arange(rows), lengths)
        scores[owner, seen - 1] = -np.inf
        g, t = held_out_ranks(scores, targets - 1)
        greater.append(g)
        ties.append(t)
    _refuse_non_finite(name, np.concatenate(non_finite), " on full ranking")
    return np.concatenate(greater), np.concatenate(ties)


def _refuse_non_finite(name: str, users: np.ndarray, where: str) -> None:
    """Raise when any of ``users`` (a mask over the evaluated users) got a non-finite score."""
    if users.any():
        raise ValueError(
            f"model {name!r} gave non-finite scores{where} for {int(users.sum())} of "
            f"{len(users)} users; refusing to evaluate"
        )


def mean_metrics(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    """Means over users; a metric undefined for some users (NaN) averages the others."""
    return {name: float(np.nanmean(v)) for name, v in per_user.items() if name != "user_id"}
