"""Ranking lists and next-item windows, batched for training and evaluation.

Every example of a ranking batch is a list: one user and ``list_size`` candidate items with
labels. Training lists hold the positive first, then negatives re-sampled every epoch from the
items the user never interacted with in train (only train: steering negatives away from
held-out items would leak where they are), and the positive is left out of the list's
history; evaluation lists are the saved candidate lists (held-out item first). Next-item
windows cut each user's train history into pieces, every item predicted from those before it.

:class:`TrainLists` streams the train split every epoch, shuffled window by window; the
features come from a :class:`~recdistill.data.feature_store.FeatureStore`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import KW_ONLY, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from recdistill.data.feature_store import FeatureStore, RankingBatch, SequenceBatch
from recdistill.data.sampling import sample_unseen
from recdistill.layout import DataLayout

# Training rows are shuffled within windows of at most this many rows (16 bytes each).
SHUFFLE_ROWS = 1 << 21


@dataclass
class _TrainEpochs:
    """What :class:`TrainLists` and :class:`TrainSequences` share: global batch ``k`` of an
    epoch draws its ``negatives`` from its own generator, seeded by (seed, epoch, k), so the
    stream of batches is the same however many processes share it; rank ``r`` of
    ``world_size`` takes batches ``r, r + world_size, ...``, and every rank runs the same
    number of batches (collectives would hang otherwise), leaving out up to
    ``world_size - 1`` trailing batches of an epoch.
    """

    store: FeatureStore
    _: KW_ONLY
    batch_size: int
    negatives: int
    seed: int = 0
    rank: int = 0
    world_size: int = 1

    def _negatives(self, users: np.ndarray, epoch: int, k: int) -> np.ndarray:
        """``[len(users), negatives]`` item indices outside each user's train history."""
        return sample_unseen(
            users,
            self.negatives,
            self.store.train_seen,
            len(self.store.items),
            np.random.default_rng([self.seed, epoch, k]),
            first_item=1,
        )


@dataclass(kw_only=True)
class TrainLists(_TrainEpochs):
    """Training lists (positive first, ``negatives`` fresh negatives) for one epoch at a time.

    Each epoch shuffles the train split's Parquet row groups, reads them into windows of at
    most ``shuffle_rows`` rows and shuffles the rows within each window (a split that fits in
    one window gets a full permutation). Batches are seeded and dealt to ranks as
    :class:`_TrainEpochs` says.
    """

    shuffle_rows: int = SHUFFLE_ROWS
    chunks: list[ds.ParquetFileFragment] = field(init=False)

    def __post_init__(self) -> None:
        train = ds.dataset(DataLayout(self.store.directory).split("train"), format="parquet")
        self.chunks = [
            row_group
            for fragment in train.get_fragments()
            for row_group in fragment.split_by_row_group()
        ]

    def __len__(self) -> int:
        return math.ceil(len(self.store.train_items) / self.batch_size) // self.world_size

    def epoch(self, epoch: int) -> Iterator[RankingBatch]:
        rng = np.random.default_rng([self.seed, epoch])
        labels = np.zeros((1, self.negatives + 1), dtype=np.float32)
        labels[0, 0] = 1.0
        batches = len(self) * self.world_size
        for k, (users, positives) in enumerate(self._shuffled_rows(rng)):
            if k == batches:
                return
            if k % self.world_size != self.rank:
                continue
            yield self.store.batch(
                users,
                np.concatenate([positives[:, None], self._negatives(users, epoch, k)], axis=1),
                np.repeat(labels, len(users), axis=0),
                exclude_from_history=positives,
            )

    def _shuffled_rows(self, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The epoch's (user, item) index rows, shuffled, ``batch_size`` rows at a time."""
        users = items = np.empty(0, dtype=np.int64)
        for window in self._windows(rng):
            table = pa.concat_tables(
                chunk.to_table(columns=["user_id", "item_id"]) for chunk in window
            )
            order = rng.permutation(len(table))
            users = np.concatenate(
                [users, self.store.users.index(table["user_id"].to_numpy())[order]]
            )
            items = np.concatenate(
                [items, self.store.items.index(table["item_id"].to_numpy())[order]]
            )
            whole = len(users) - len(users) % self.batch_size
            for start in range(0, whole, self.batch_size):
                yield users[start : start + self.batch_size], items[start : start + self.batch_size]
            users, items = users[whole:], items[whole:]
        if len(users):
            yield users, items

    def _windows(self, rng: np.random.Generator) -> Iterator[list[ds.ParquetFileFragment]]:
        window, rows = [], 0
        for index in rng.permutation(len(self.chunks)):
            chunk = self.chunks[index]
            chunk_rows = chunk.row_groups[0].num_rows
            if window and rows + chunk_rows > self.shuffle_rows:
                yield window
                window, rows = [], 0
            window.append(chunk)
            rows += chunk_rows
        if window:
            yield window


@dataclass(kw_only=True)
class TrainSequences(_TrainEpochs):
    """Next-item training windows over every user's train history, for one epoch at a time.

    A user's history ``h`` (newest first) is cut into windows ``e = 0, L, 2L, ...``: window
    ``e`` reads ``h[e + 1 : e + 1 + L]`` and its position ``j`` is followed by ``h[e + j]``, so
    each train interaction but a user's oldest is a target once an epoch, predicted from the
    items before it alone. Windows are shuffled each epoch; each window gets ``negatives``
    shared among its positions. Batches are seeded and dealt to ranks as
    :class:`_TrainEpochs` says.
    """

    max_length: int
    window_users: np.ndarray = field(init=False)
    window_ends: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        length = self.max_length
        counts = np.diff(self.store.history.offsets)
        per_user = np.maximum(counts - 1 + length - 1, 0) // length
        self.window_users = np.repeat(np.arange(len(counts)), per_user)
        first = np.repeat(np.cumsum(per_user) - per_user, per_user)
        self.window_ends = (np.arange(len(self.window_users)) - first) * length

    def __len__(self) -> int:
        return math.ceil(len(self.window_users) / self.batch_size) // self.world_size

    def epoch(self, epoch: int) -> Iterator[SequenceBatch]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.window_users))
        for k in range(self.rank, len(self) * self.world_size, self.world_size):
            windows = order[k * self.batch_size : (k + 1) * self.batch_size]
            users = self.window_users[windows]
            yield self._batch(users, self.window_ends[windows], self._negatives(users, epoch, k))

    def _batch(self, users: np.ndarray, ends: np.ndarray, negatives: np.ndarray) -> SequenceBatch:
        store, length = self.store, self.max_length
        starts = store.history.offsets[users] + ends
        available = store.history.offsets[users + 1] - starts - 1
        lengths = np.minimum(available, length)
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        history = store.history.values[np.repeat(starts + 1, lengths) + within]
        slots = np.arange(length)
        has_target = slots < lengths[:, None]
        targets = np.where(
            has_target, store.history.values[starts[:, None] + slots * has_target], 0
        )
        distinct, rows = np.unique(
            np.concatenate([targets.ravel(), negatives.ravel()]), return_inverse=True
        )
        return SequenceBatch(
            users=store.user_kjt(users, history, lengths),
            items=store.item_kjt(distinct),
            targets=torch.as_tensor(rows[: targets.size].reshape(targets.shape)),
            has_target=torch.as_tensor(has_target),
            negatives=torch.as_tensor(rows[targets.size :].reshape(negatives.shape)),
            user_ids=torch.as_tensor(store.users.values[users - 1]),
        )


class CandidateLists:
    """The saved validation or test candidate lists (held-out item first), in batches, each
    user's history as it stood at the held-out interaction (:meth:`FeatureStore.known_at`)."""

    def __init__(self, store: FeatureStore, split: str, *, batch_size: int = 256) -> None:
        table = pq.read_table(DataLayout(store.directory).candidates(split))
        store = store.known_at(split)
        self.store = store
        self.batch_size = batch_size
        self.users = store.users.index(table.column("user_id").to_numpy())
        candidates = table.column("candidates")
        list_size = len(candidates[0]) if len(candidates) else 0
        self.items = store.items.index(pc.list_flatten(candidates).to_numpy()).reshape(
            -1, list_size
        )

    def __len__(self) -> int:
        return math.ceil(len(self.users) / self.batch_size)

    def __iter__(self) -> Iterator[RankingBatch]:
        labels = np.zeros((1, self.items.shape[1]), dtype=np.float32)
        labels[0, 0] = 1.0
        for start in range(0, len(self.users), self.batch_size):
            users = self.users[start : start + self.batch_size]
            yield self.store.batch(
                users, self.items[start : start + self.batch_size], labels.repeat(len(users), 0)
            )
