"""Ranking lists and next-item windows, batched for training and evaluation.

Every example of a ranking batch is a list: one user and ``list_size`` candidate items with
labels. A training list is a train interaction: its item first, then negatives re-sampled
every epoch from the items the user never interacted with in train (only train: steering
negatives away from held-out items would leak where they are), the user's features as they
stood just before it (the items before it alone, as at validation, test and serving).
Evaluation lists are the saved candidate lists (held-out item first). Next-item windows cut
each user's train history into pieces, every item predicted from those before it.

:class:`TrainLists` shuffles the train rows every epoch, block by block; the features come
from a :class:`~recdistill.data.feature_store.FeatureStore`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import KW_ONLY, dataclass, field

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from recdistill.data.feature_store import FeatureStore, RankingBatch, SequenceBatch
from recdistill.data.sampling import sample_unseen
from recdistill.layout import DataLayout

# Training rows are shuffled within windows of at most this many rows, made of blocks of
# BLOCK_ROWS consecutive rows taken in a shuffled order.
SHUFFLE_ROWS = 1 << 21
BLOCK_ROWS = 1 << 16


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
    """Training lists (a train row's item first, ``negatives`` fresh negatives, the features
    of the row's moment) for one epoch at a time.

    Each epoch shuffles blocks of ``block_rows`` consecutive train rows, gathers them into
    windows of at most ``shuffle_rows`` rows and shuffles the rows within each window (a
    split that fits in one window gets a full permutation), so no more than a window of row
    numbers is held. Batches are seeded and dealt to ranks as :class:`_TrainEpochs` says.
    """

    shuffle_rows: int = SHUFFLE_ROWS
    block_rows: int = BLOCK_ROWS

    @property
    def blocks(self) -> int:
        return math.ceil(self.store.train_rows / self.block_rows)

    def __len__(self) -> int:
        return math.ceil(self.store.train_rows / self.batch_size) // self.world_size

    def epoch(self, epoch: int) -> Iterator[RankingBatch]:
        rng = np.random.default_rng([self.seed, epoch])
        batches = len(self) * self.world_size
        for k, rows in enumerate(self._shuffled_rows(rng)):
            if k == batches:
                return
            if k % self.world_size != self.rank:
                continue
            users = self.store.row_users(rows)
            yield self.store.training_batch(rows, self._negatives(users, epoch, k))

    def _shuffled_rows(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """The epoch's train rows, shuffled, ``batch_size`` rows at a time."""
        rows = np.empty(0, dtype=np.int64)
        for window in self._windows(rng):
            rows = np.concatenate([rows, window[rng.permutation(len(window))]])
            whole = len(rows) - len(rows) % self.batch_size
            for start in range(0, whole, self.batch_size):
                yield rows[start : start + self.batch_size]
            rows = rows[whole:]
        if len(rows):
            yield rows

    def _windows(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """The row numbers of each window: whole blocks in a shuffled order."""
        per_window = max(1, self.shuffle_rows // self.block_rows)
        order = rng.permutation(self.blocks)
        for start in range(0, len(order), per_window):
            yield np.concatenate(
                [
                    np.arange(
                        block * self.block_rows,
                        min((block + 1) * self.block_rows, self.store.train_rows),
                    )
                    for block in order[start : start + per_window]
                ]
            )


@dataclass(kw_only=True)
class TrainSequences(_TrainEpochs):
    """Next-item training windows over every user's train history, for one epoch at a time.

    A user's history ``h`` (newest first) is cut into windows ``e = 0, L, 2L, ...``: window
    ``e`` reads ``h[e + 1 : e + 1 + L]`` and its position ``j`` is followed by ``h[e + j]``, so
    each train interaction but a user's oldest is a target once an epoch, predicted from the
    items before it alone. Windows are shuffled each epoch; each window gets ``negatives``
    shared among its positions, or with ``all_items`` none: every position is then scored
    against the whole catalogue (the batch's ``items``). Batches are seeded and dealt to ranks
    as :class:`_TrainEpochs` says.
    """

    max_length: int
    all_items: bool = False
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
            if self.all_items:
                negatives = np.empty((len(users), 0), dtype=np.int64)
            else:
                negatives = self._negatives(users, epoch, k)
            yield self._batch(users, self.window_ends[windows], negatives)

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
        if self.all_items:
            distinct, rows = np.arange(len(store.items)), targets.ravel().astype(np.int64)
        else:
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
