"""Teacher-ranked distillation lists: what a teacher knows beyond the labels.

On the training lists (one positive, uniformly sampled negatives) a teacher's ranking says
little more than the label. What a student should learn is how the teacher orders the items
it puts on top of the whole catalogue (Ranking Distillation, Tang & Wang 2018; RRD, Kang et
al. 2020). Per user, a distillation list is the teacher's ``teacher_top`` best items among
those the user never saw in train, then ``sampled`` unseen items drawn uniformly afresh for
every batch (a draw that repeats a top item is masked out).

The top items are computed once per stage from the frozen teacher's precomputed user and
item vectors, users in chunks of at most ``CELLS`` scores, and written row by row to a
memory-mapped ``.npy`` file in the stage's directory: memory is bounded by the chunk, not by
the number of users. The file's name carries a fingerprint of the teacher's vectors, so a
resumed run reuses it and a changed teacher never does.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from recdistill.data.feature_store import UNKNOWN, FeatureStore, RankingBatch
from recdistill.data.sampling import sample_unseen

# Scores held at once while ranking the catalogue for a chunk of users (64 MB of float32).
CELLS = 1 << 24


@dataclass(frozen=True)
class ListSpec:
    """A stage's distillation lists: the teacher's ``teacher_top`` unseen items plus
    ``sampled`` uniform unseen items."""

    teacher_top: int = 50
    sampled: int = 50

    def __post_init__(self) -> None:
        if self.teacher_top < 1 or self.sampled < 0:
            raise ValueError(
                f"lists need teacher_top ≥ 1 and sampled ≥ 0, not {self.teacher_top} "
                f"and {self.sampled}"
            )


def top_unseen(
    user_vectors: torch.Tensor,
    item_vectors: torch.Tensor,
    item_bias: torch.Tensor,
    store: FeatureStore,
    k: int,
    path: Path,
) -> np.ndarray:
    """Per user index, the ``k`` items of highest ``user · item + bias`` among those the user
    never saw in train (the unknown item 0 excluded), best first: ``[users, k]`` int32,
    written to ``path`` chunk by chunk and returned memory-mapped."""
    users, items = user_vectors.shape[0], item_vectors.shape[0]
    seen_counts = np.diff(store.history.offsets)
    if (too_many := np.flatnonzero(seen_counts + k > items - 1)).size:
        user = too_many[0]
        raise ValueError(
            f"user index {user} has seen {seen_counts[user]} of the {items - 1} items: "
            f"fewer than teacher_top = {k} are left to rank"
        )
    top = np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(users, k))
    chunk = max(1, CELLS // items)
    with torch.no_grad():
        for start in tqdm(
            range(0, users, chunk), desc="teacher-ranked lists", unit="chunk", disable=None
        ):
            stop = min(start + chunk, users)
            scores = user_vectors[start:stop] @ item_vectors.T + item_bias
            scores[:, UNKNOWN] = -torch.inf
            offsets = store.history.offsets[start : stop + 1]
            rows = np.repeat(np.arange(stop - start), np.diff(offsets))
            seen = torch.as_tensor(store.history.values[offsets[0] : offsets[-1]]).long()
            scores[torch.as_tensor(rows), seen] = -torch.inf
            top[start:stop] = scores.topk(k, dim=1).indices.numpy()
    top.flush()
    del top
    return np.load(path, mmap_mode="r", allow_pickle=False)


def fingerprint(*tensors: torch.Tensor) -> str:
    """A short digest of the tensors' values, naming what a cached file was computed from."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class RankedLists:
    """Distillation batches for the users of a training batch, one list per user and
    teacher, from each teacher's precomputed top items (``top[name]``: ``[users, k]``)."""

    def __init__(self, store: FeatureStore, top: dict[str, np.ndarray], sampled: int) -> None:
        self.store = store
        self.top = top
        self.sampled = sampled

    def batch(self, teacher: str, users: np.ndarray, rng: np.random.Generator) -> RankingBatch:
        store = self.store
        top = np.asarray(self.top[teacher][users], dtype=np.int64)
        sampled = np.empty((len(users), 0), dtype=np.int64)
        if self.sampled:
            sampled = sample_unseen(
                users, self.sampled, store.train_seen, len(store.items), rng, first_item=1
            )
        items = np.concatenate([top, sampled], axis=1)
        repeats_top = (sampled[:, :, None] == top[:, None, :]).any(-1)
        mask = np.concatenate([np.ones(top.shape, dtype=bool), ~repeats_top], axis=1)
        batch = store.batch(users, items, np.zeros(items.shape, dtype=np.float32))
        return dataclasses.replace(batch, mask=torch.as_tensor(mask))
