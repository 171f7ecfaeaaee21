"""Ranking lists as torchrec ``KeyedJaggedTensor`` batches.

Every example is a list: one user and ``list_size`` candidate items with labels. Training
lists hold the positive first, then negatives re-sampled every epoch from the items the user
never interacted with in train (only train: steering negatives away from held-out items would
leak where they are); evaluation lists are the saved candidate lists (held-out item
first). The user side of a batch is a KJT with one row per list: ``user_id``, ``history``
(the user's train items, most recent first, without the list's target, capped), and one
key per demographic feature. The item side has one row per candidate: ``item_id`` and the
``genres`` bag, one row per distinct item of the batch (so a tower runs once per item),
with ``candidates`` pointing each list slot at its row. IDs are mapped to contiguous indices
with 0 reserved for "unknown".

The train split is never held whole: :class:`FeatureStore` streams it once to keep each
user's history and the sorted (user, item) keys that negative sampling avoids, and
:class:`TrainLists` streams it again every epoch, shuffled window by window.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recdistill.data.sampling import pair_keys, sample_unseen
from recdistill.data.tables import ITEMS, USERS, candidates_file, read_meta, split_file

UNKNOWN = 0
ITEM_KEYS = ("item_id", "genres")
# Training rows are shuffled within windows of at most this many rows (16 bytes each).
SHUFFLE_ROWS = 1 << 21


@dataclass(frozen=True)
class Vocabulary:
    """Sorted distinct values; value ``values[k]`` has index ``k + 1``, 0 means unknown."""

    values: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray) -> Vocabulary:
        return cls(np.unique(values))

    def __len__(self) -> int:
        return len(self.values) + 1

    def index(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values)
        if len(self.values) == 0:
            return np.zeros(values.shape, dtype=np.int64)
        position = np.minimum(np.searchsorted(self.values, values), len(self.values) - 1)
        return np.where(self.values[position] == values, position + 1, UNKNOWN).astype(np.int64)


@dataclass(frozen=True)
class Jagged:
    """Rows of int64 values in CSR form: row ``r`` is ``values[offsets[r]:offsets[r + 1]]``."""

    offsets: np.ndarray
    values: np.ndarray

    def gather(self, rows: np.ndarray, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The (values, lengths) of ``rows`` concatenated, each row cut to ``limit`` values."""
        starts = self.offsets[rows]
        lengths = self.offsets[rows + 1] - starts
        if limit is not None:
            lengths = np.minimum(lengths, limit)
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return self.values[np.repeat(starts, lengths) + within], lengths


@dataclass
class RankingBatch:
    """A batch of ranking lists.

    ``users`` has one row per list, ``items`` one row per distinct item; ``candidates``,
    ``labels`` and ``mask`` are ``[lists, list_size]``, ``candidates`` holding row numbers
    of ``items``.
    """

    users: KeyedJaggedTensor
    items: KeyedJaggedTensor
    candidates: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    user_ids: torch.Tensor

    @property
    def list_size(self) -> int:
        return self.labels.shape[1]

    @property
    def examples(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device) -> RankingBatch:
        return _to(self, device)


@dataclass
class SequenceBatch:
    """Windows of users' histories for next-item training (as SASRec trains).

    ``users`` has one row per window: the history it reads, newest first. Position ``j`` of
    that history is followed in time by ``targets[:, j]``, a row of ``items``, where
    ``has_target``; every window shares ``negatives`` (rows of ``items``, never items of the
    user's train history) among its positions.
    """

    users: KeyedJaggedTensor
    items: KeyedJaggedTensor
    targets: torch.Tensor
    has_target: torch.Tensor
    negatives: torch.Tensor
    user_ids: torch.Tensor

    @property
    def examples(self) -> int:
        return int(self.has_target.sum())

    def to(self, device: torch.device) -> SequenceBatch:
        return _to(self, device)


def _to(batch, device: torch.device):
    return type(batch)(
        **{f.name: getattr(batch, f.name).to(device) for f in dataclasses.fields(batch)}
    )


class FeatureStore:
    """Everything needed to turn (user, candidate items) into KJTs, built from a data dir."""

    def __init__(self, directory: Path, history_length: int = 50) -> None:
        directory = Path(directory)
        meta = read_meta(directory)
        # Sorted by ID, row r of each table is vocabulary index r + 1.
        users = pq.read_table(directory / USERS).sort_by("user_id")
        items = pq.read_table(directory / ITEMS).sort_by("item_id")
        self.directory = directory
        self.history_length = history_length
        self.user_features: tuple[str, ...] = tuple(meta["user_features"])
        self.users = Vocabulary.of(users.column("user_id").to_numpy())
        self.items = Vocabulary.of(items.column("item_id").to_numpy())

        self.feature_vocabularies: dict[str, Vocabulary] = {}
        self.user_codes: dict[str, np.ndarray] = {}
        for name in self.user_features:
            values = users.column(name).to_numpy(zero_copy_only=False).astype(str)
            vocabulary = Vocabulary.of(values)
            self.feature_vocabularies[name] = vocabulary
            self.user_codes[name] = np.concatenate([[UNKNOWN], vocabulary.index(values)])

        genres = items.column("genres")
        genre_names = pc.list_flatten(genres).to_numpy(zero_copy_only=False)
        self.genres = Vocabulary.of(genre_names)
        genre_counts = pc.list_value_length(genres).fill_null(0).to_numpy()
        self.item_genres = Jagged(
            np.concatenate([[0, 0], np.cumsum(genre_counts)]), self.genres.index(genre_names)
        )

        train_users, train_items = self._read_train()
        counts = np.bincount(train_users, minlength=len(self.users))
        offsets = np.concatenate([[0], np.cumsum(counts)])
        # Rows come oldest first within a user; each user's history lists them newest first.
        newest_first = offsets[train_users] + offsets[train_users + 1] - 1 - np.arange(counts.sum())
        history = np.empty_like(train_items)
        history[newest_first] = train_items
        del newest_first
        self.history = Jagged(offsets, history)
        valid = pq.read_table(directory / split_file("valid"), columns=["user_id", "item_id"])
        self._test_view: FeatureStore | None = None
        self.valid_items = np.zeros(len(self.users), dtype=np.int64)
        self.valid_items[self.users.index(valid.column("user_id").to_numpy())] = self.items.index(
            valid.column("item_id").to_numpy()
        )
        self.train_seen = pair_keys(train_users, train_items, len(self.items))
        self.train_seen.sort()
        self.item_train_counts = np.bincount(train_items, minlength=len(self.items))

    def known_at(self, split: str) -> FeatureStore:
        """The store as it stands when ``split``'s held-out interactions happen.

        Validation items come after every train item and before the test item, so for
        ``"test"`` each user's history also holds the user's validation item, as the newest;
        for ``"valid"`` it is the train history alone. Negative sampling, item counts and
        everything else stay train-only.
        """
        if split == "valid":
            return self
        if split != "test":
            raise ValueError(f"no held-out split {split!r}; choose valid or test")
        if self._test_view is None:
            self._test_view = self._with_validation_items()
        return self._test_view

    def _with_validation_items(self) -> FeatureStore:
        has = (self.valid_items > 0).astype(np.int64)
        lengths = np.diff(self.history.offsets)
        offsets = np.concatenate([[0], np.cumsum(lengths + has)])
        values = np.empty(offsets[-1], dtype=self.history.values.dtype)
        values[offsets[:-1][has == 1]] = self.valid_items[has == 1]
        shift = np.repeat(np.cumsum(has), lengths)
        values[np.arange(len(self.history.values)) + shift] = self.history.values
        view = copy.copy(self)
        view.history = Jagged(offsets, values)
        view._test_view = view  # already as at the test interactions
        return view

    @property
    def train_users(self) -> np.ndarray:
        """The user index of every history interaction, grouped by user like ``train_items``."""
        return np.repeat(np.arange(len(self.users)), np.diff(self.history.offsets))

    @property
    def train_items(self) -> np.ndarray:
        """The item index of every history interaction (each user's newest first)."""
        return self.history.values

    def _read_train(self) -> tuple[np.ndarray, np.ndarray]:
        """User and item indices (int32) of the train split, streamed in record batches.

        ``prepare`` writes the split sorted by user, then time; that order is checked here
        rather than re-sorted, so no more than the two index columns is ever held.
        """
        users, items = [], []
        last = (-1, np.iinfo(np.int64).min)
        for record in ds.dataset(self.directory / split_file("train"), format="parquet").to_batches(
            columns=["user_id", "item_id", "timestamp"]
        ):
            user = self.users.index(record.column("user_id").to_numpy()).astype(np.int32)
            timestamp = record.column("timestamp").to_numpy()
            if len(user) == 0:
                continue
            if not _ordered(
                np.concatenate([[last[0]], user]), np.concatenate([[last[1]], timestamp])
            ):
                raise ValueError(
                    f"{self.directory / split_file('train')} is not sorted by user, then time; "
                    "rebuild the data directory with `recdistill data ...`"
                )
            last = (user[-1], timestamp[-1])
            users.append(user)
            items.append(self.items.index(record.column("item_id").to_numpy()).astype(np.int32))
        empty = np.empty(0, dtype=np.int32)
        return np.concatenate([empty, *users]), np.concatenate([empty, *items])

    def cardinalities(self) -> dict[str, int]:
        """Embedding table sizes per KJT key (index 0 = unknown included)."""
        sizes = {"user_id": len(self.users), "history": len(self.items)}
        sizes.update({name: len(v) for name, v in self.feature_vocabularies.items()})
        sizes.update({"item_id": len(self.items), "genres": len(self.genres)})
        return sizes

    def catalogue(self) -> KeyedJaggedTensor:
        """Item-side features of every item index (row ``i`` = index ``i``, 0 = unknown)."""
        return self.item_kjt(np.arange(len(self.items)))

    def item_kjt(self, items: np.ndarray) -> KeyedJaggedTensor:
        """The item-side KJT of item indices ``items``, one row each."""
        genres, lengths = self.item_genres.gather(items)
        return _kjt(ITEM_KEYS, [items, genres], [np.ones(len(items)), lengths])

    def user_kjt(
        self, users: np.ndarray, history: np.ndarray, history_lengths: np.ndarray
    ) -> KeyedJaggedTensor:
        """The user-side KJT of user indices ``users`` with the given history bags."""
        values = [users, history] + [self.user_codes[n][users] for n in self.user_features]
        lengths = [np.ones(len(users)), history_lengths]
        lengths += [np.ones(len(users))] * len(self.user_features)
        return _kjt(("user_id", "history", *self.user_features), values, lengths)

    def history_kjt(self, users: np.ndarray) -> KeyedJaggedTensor:
        """The user-side KJT of user indices ``users`` with their train histories (capped)."""
        history, lengths = self.history.gather(users, limit=self.history_length)
        return self.user_kjt(users, history, lengths)

    def batch(
        self,
        users: np.ndarray,
        items: np.ndarray,
        labels: np.ndarray,
        exclude_from_history: np.ndarray | None = None,
    ) -> RankingBatch:
        """Build a batch from user indices ``[B]`` and candidate item indices ``[B, L]``.

        ``exclude_from_history`` (item index per list) is dropped from that list's history, so
        a training target is never one of its own features.
        """
        lists = len(users)
        history, history_lengths = self.history.gather(users, limit=self.history_length + 1)
        owner = np.repeat(np.arange(lists), history_lengths)
        keep = np.ones(len(history), dtype=bool)
        if exclude_from_history is not None:
            keep &= history != exclude_from_history[owner]
        kept_before = np.cumsum(keep) - keep
        first_of_row = np.repeat(np.cumsum(history_lengths) - history_lengths, history_lengths)
        keep &= (kept_before - kept_before[first_of_row]) < self.history_length
        history_lengths = np.bincount(owner[keep], minlength=lists)
        distinct, slots = np.unique(items, return_inverse=True)
        return RankingBatch(
            users=self.user_kjt(users, history[keep], history_lengths),
            items=self.item_kjt(distinct),
            candidates=torch.as_tensor(slots.reshape(items.shape)),
            labels=torch.as_tensor(labels, dtype=torch.float32),
            mask=torch.ones(labels.shape, dtype=torch.bool),
            user_ids=torch.as_tensor(self.users.values[users - 1]),
        )


def _ordered(users: np.ndarray, timestamps: np.ndarray) -> bool:
    """Whether rows are sorted by user, then timestamp."""
    same_user = users[1:] == users[:-1]
    return bool(
        np.all((users[1:] > users[:-1]) | (same_user & (timestamps[1:] >= timestamps[:-1])))
    )


def _kjt(keys, values: list[np.ndarray], lengths: list[np.ndarray]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(keys),
        values=torch.as_tensor(np.concatenate(values).astype(np.int64)),
        lengths=torch.as_tensor(np.concatenate(lengths).astype(np.int32)),
    )


class TrainLists:
    """Training lists (positive first, ``negatives`` fresh negatives) for one epoch at a time.

    Each epoch shuffles the train split's Parquet row groups, reads them into windows of at
    most ``shuffle_rows`` rows and shuffles the rows within each window (a split that fits in
    one window gets a full permutation). Global batch ``k`` of the epoch draws its negatives
    from its own generator, seeded by (seed, epoch, k), so the stream of batches is the same
    however many processes share it: rank ``r`` of ``world_size`` takes batches
    ``r, r + world_size, ...``, and every rank runs the same number of batches (collectives
    would hang otherwise), leaving out up to ``world_size - 1`` trailing batches of an epoch.
    """

    def __init__(
        self,
        store: FeatureStore,
        *,
        batch_size: int,
        negatives: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle_rows: int = SHUFFLE_ROWS,
    ) -> None:
        self.store = store
        self.batch_size = batch_size
        self.negatives = negatives
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle_rows = shuffle_rows
        train = ds.dataset(store.directory / split_file("train"), format="parquet")
        self.chunks = [
            row_group
            for fragment in train.get_fragments()
            for row_group in fragment.split_by_row_group()
        ]

    def __len__(self) -> int:
        return math.ceil(len(self.store.train_items) / self.batch_size) // self.world_size

    def epoch(self, epoch: int) -> Iterator[RankingBatch]:
        store = self.store
        rng = np.random.default_rng([self.seed, epoch])
        labels = np.zeros((1, self.negatives + 1), dtype=np.float32)
        labels[0, 0] = 1.0
        batches = len(self) * self.world_size
        for k, (users, positives) in enumerate(self._shuffled_rows(rng)):
            if k == batches:
                return
            if k % self.world_size != self.rank:
                continue
            negatives = sample_unseen(
                users,
                self.negatives,
                store.train_seen,
                len(store.items),
                np.random.default_rng([self.seed, epoch, k]),
                first_item=1,
            )
            yield store.batch(
                users,
                np.concatenate([positives[:, None], negatives], axis=1),
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


class TrainSequences:
    """Next-item training windows over every user's train history, for one epoch at a time.

    A user's history ``h`` (newest first) is cut into windows ``e = 0, L, 2L, ...``: window
    ``e`` reads ``h[e + 1 : e + 1 + L]`` and its position ``j`` is followed by ``h[e + j]``, so
    each train interaction but a user's oldest is a target once an epoch, predicted from the
    items before it alone. Windows are shuffled each epoch; global batch ``k`` draws its
    ``negatives`` per window from its own generator, seeded by (seed, epoch, k), and goes
    to rank ``k mod world_size``, as :class:`TrainLists` does.
    """

    def __init__(
        self,
        store: FeatureStore,
        *,
        max_length: int,
        batch_size: int,
        negatives: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.store = store
        self.max_length = max_length
        self.batch_size = batch_size
        self.negatives = negatives
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        counts = np.diff(store.history.offsets)
        per_user = np.maximum(counts - 1 + max_length - 1, 0) // max_length
        self.window_users = np.repeat(np.arange(len(counts)), per_user)
        first = np.repeat(np.cumsum(per_user) - per_user, per_user)
        self.window_ends = (np.arange(len(self.window_users)) - first) * max_length

    def __len__(self) -> int:
        return math.ceil(len(self.window_users) / self.batch_size) // self.world_size

    def epoch(self, epoch: int) -> Iterator[SequenceBatch]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.window_users))
        for k in range(self.rank, len(self) * self.world_size, self.world_size):
            windows = order[k * self.batch_size : (k + 1) * self.batch_size]
            rng = np.random.default_rng([self.seed, epoch, k])
            yield self._batch(self.window_users[windows], self.window_ends[windows], rng)

    def _batch(
        self, users: np.ndarray, ends: np.ndarray, rng: np.random.Generator
    ) -> SequenceBatch:
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
        negatives = sample_unseen(
            users, self.negatives, store.train_seen, len(store.items), rng, first_item=1
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
        table = pq.read_table(store.directory / candidates_file(split))
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
