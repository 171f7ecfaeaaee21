"""A data directory's features as torchrec ``KeyedJaggedTensor`` batches.

The user side of a batch is a KJT with one row per list (or history window): ``user_id``,
``history`` (most recent first, capped: for a training list the user's items before its
positive, for an evaluation list the user's history as it stood at the held-out item), and
one key per demographic feature. Beside it a ranking batch carries each list's moment (the
time of its positive or held-out interaction) and the time of every history item, which
teachers from outside the run read (``recdistill.external``). The item side has ``item_id`` and the ``genres`` bag, one row per
distinct item of the batch (so a tower runs once per item), which the batch's candidates or
targets point at. IDs are mapped to contiguous indices with 0 reserved for "unknown".

The train split is never held whole: :class:`FeatureStore` streams it once to keep each
user's history and the sorted (user, item) keys that negative sampling avoids.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recdistill.data.ids import IdCodes
from recdistill.data.sampling import pair_keys
from recdistill.data.tables import read_meta
from recdistill.layout import DEFAULT_HISTORY_LENGTH, DataLayout

UNKNOWN = 0
ITEM_KEYS = ("item_id", "genres")


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
        return self.slices(starts, self.offsets[rows + 1] - starts, limit)

    def slices(
        self, starts: np.ndarray, lengths: np.ndarray, limit: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The (values, lengths) of ``values[starts[r]:starts[r] + lengths[r]]`` concatenated,
        each cut to its first ``limit`` values."""
        if limit is not None:
            lengths = np.minimum(lengths, limit)
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return self.values[np.repeat(starts, lengths) + within], lengths


@dataclass
class RankingBatch:
    """A batch of ranking lists.

    ``users`` has one row per list, ``items`` one row per distinct item; ``candidates``,
    ``labels`` and ``mask`` are ``[lists, list_size]``, ``candidates`` holding row numbers
    of ``items``. ``train_rows`` is the train split's row of each training list's positive
    (the moment the list's features stand at), -1 for lists that are not training lists.
    ``moments`` is each list's time (seconds): its positive's, or its held-out item's;
    ``history_times`` the time of every item of ``users``' ``history`` key, in its order.
    """

    users: KeyedJaggedTensor
    items: KeyedJaggedTensor
    candidates: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    user_ids: torch.Tensor
    train_rows: torch.Tensor
    moments: torch.Tensor
    history_times: torch.Tensor

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

    def __init__(self, directory: Path, history_length: int = DEFAULT_HISTORY_LENGTH) -> None:
        directory = Path(directory)
        layout = DataLayout(directory)
        meta = read_meta(directory)
        # Sorted by ID, row r of each table is vocabulary index r + 1.
        users = pq.read_table(layout.users).sort_by("user_id")
        items = pq.read_table(layout.items).sort_by("item_id")
        self.directory = directory
        self.history_length = history_length
        self.user_features: tuple[str, ...] = tuple(meta["user_features"])
        self.users = Vocabulary.of(users.column("user_id").to_numpy())
        self.items = Vocabulary.of(items.column("item_id").to_numpy())
        # The user's own IDs, for data imported with string IDs.
        self.user_ids = IdCodes.of_table(users, "user_id")
        self.item_ids = IdCodes.of_table(items, "item_id")

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

        train_users, train_items, train_times = self._read_train()
        counts = np.bincount(train_users, minlength=len(self.users))
        offsets = np.concatenate([[0], np.cumsum(counts)])
        # Rows come oldest first within a user; each user's history lists them newest first.
        newest_first = offsets[train_users] + offsets[train_users + 1] - 1 - np.arange(counts.sum())
        history = np.empty_like(train_items)
        history[newest_first] = train_items
        times = np.empty_like(train_times)
        times[newest_first] = train_times
        del newest_first
        self.history = Jagged(offsets, history)
        self.history_times = Jagged(offsets, times)
        self._test_view: FeatureStore | None = None
        self.valid_items, self.valid_times = self._held_out("valid")
        self._split = "valid"
        self._held_out_times: np.ndarray | None = self.valid_times
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

    def _held_out(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Each user's item index and time in held-out ``split`` (0 where the user has none)."""
        table = pq.read_table(
            DataLayout(self.directory).split(split), columns=["user_id", "item_id", "timestamp"]
        )
        users = self.users.index(table.column("user_id").to_numpy())
        items = np.zeros(len(self.users), dtype=np.int64)
        times = np.zeros(len(self.users), dtype=np.int64)
        items[users] = self.items.index(table.column("item_id").to_numpy())
        times[users] = table.column("timestamp").to_numpy()
        return items, times

    def _with_validation_items(self) -> FeatureStore:
        has = (self.valid_items > 0).astype(np.int64)
        lengths = np.diff(self.history.offsets)
        offsets = np.concatenate([[0], np.cumsum(lengths + has)])
        shift = np.repeat(np.cumsum(has), lengths)

        def with_newest(history: Jagged, newest: np.ndarray) -> Jagged:
            values = np.empty(offsets[-1], dtype=history.values.dtype)
            values[offsets[:-1][has == 1]] = newest[has == 1]
            values[np.arange(len(history.values)) + shift] = history.values
            return Jagged(offsets, values)

        view = copy.copy(self)
        view.history = with_newest(self.history, self.valid_items)
        view.history_times = with_newest(self.history_times, self.valid_times)
        # Read when first asked for: a served artifact's snapshot holds no test split.
        view._split, view._held_out_times = "test", None
        view._test_view = view  # already as at the test interactions
        return view

    @property
    def held_out_times(self) -> np.ndarray:
        """The moment of each user's evaluation list in this view: the time of the user's
        held-out interaction (validation, or test in ``known_at("test")``)."""
        if self._held_out_times is None:
            self._held_out_times = self._held_out(self._split)[1]
        return self._held_out_times

    @property
    def train_users(self) -> np.ndarray:
        """The user index of every history interaction, grouped by user like ``train_items``."""
        return np.repeat(np.arange(len(self.users)), np.diff(self.history.offsets))

    @property
    def train_items(self) -> np.ndarray:
        """The item index of every history interaction (each user's newest first)."""
        return self.history.values

    def _read_train(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """User and item indices (int32) and times of the train split, streamed in record
        batches.

        ``prepare`` writes the split sorted by user, then time; that order is checked here
        rather than re-sorted, so no more than the two index columns is ever held.
        """
        path = DataLayout(self.directory).split("train")
        users, items, times = [], [], []
        last = (-1, np.iinfo(np.int64).min)
        for record in ds.dataset(path, format="parquet").to_batches(
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
                    f"{path} is not sorted by user, then time; "
                    "rebuild the data directory with `recdistill data ...`"
                )
            last = (user[-1], timestamp[-1])
            users.append(user)
            items.append(self.items.index(record.column("item_id").to_numpy()).astype(np.int32))
            times.append(timestamp.astype(np.int64))
        empty = np.empty(0, dtype=np.int32)
        return (
            np.concatenate([empty, *users]),
            np.concatenate([empty, *items]),
            np.concatenate([empty.astype(np.int64), *times]),
        )

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

    def history_of(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (items, times, lengths) of users ``users``' histories in this view, newest
        first, capped at ``history_length``."""
        items, lengths = self.history.gather(users, limit=self.history_length)
        times, _ = self.history_times.gather(users, limit=self.history_length)
        return items, times, lengths

    @property
    def train_rows(self) -> int:
        """Rows of the train split: row ``r`` is the ``r``-th interaction in the split's order
        (by user, then time, ties in the split's seeded order)."""
        return len(self.history.values)

    def row_users(self, rows: np.ndarray) -> np.ndarray:
        """The user index of each train row of ``rows``."""
        return np.searchsorted(self.history.offsets, rows, side="right") - 1

    def _row_positions(self, rows: np.ndarray) -> np.ndarray:
        """Where each train row of ``rows`` sits in the newest-first history arrays."""
        users = self.row_users(rows)
        offsets = self.history.offsets
        return offsets[users] + offsets[users + 1] - 1 - rows

    def row_items(self, rows: np.ndarray) -> np.ndarray:
        """The item index of each train row of ``rows``."""
        return self.history.values[self._row_positions(rows)].astype(np.int64)

    def row_times(self, rows: np.ndarray) -> np.ndarray:
        """The time of each train row of ``rows``: the moment its training list stands at."""
        return self.history_times.values[self._row_positions(rows)]

    def past(self, rows: np.ndarray, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per train row, the (values, lengths) of the items its user had before it, newest
        first, cut to ``limit``: what was known at the row's moment."""
        return self.history.slices(*self._past_spans(rows), limit)

    def past_times(self, rows: np.ndarray, limit: int | None = None) -> np.ndarray:
        """The times of :meth:`past`'s items, in its order."""
        return self.history_times.slices(*self._past_spans(rows), limit)[0]

    def _past_spans(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        users = self.row_users(rows)
        return self._first_rows(users, rows - self.history.offsets[users])

    def _first_rows(self, users: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each user's first ``counts`` train rows sit in the newest-first history
        arrays: their start, and their number."""
        return self.history.offsets[users + 1] - counts, counts

    def rows_before(self, users: np.ndarray, moments: np.ndarray) -> np.ndarray:
        """How many of each user's train rows are strictly before its moment (seconds)."""
        times = self.row_times(np.arange(self.train_rows))  # by user, then time
        start = int(min(times.min(initial=0), moments.min(initial=0)))
        span = int(max(times.max(initial=0), moments.max(initial=0))) - start + 1
        keys = self.row_users(np.arange(self.train_rows)).astype(np.int64) * span + (times - start)
        wanted = users.astype(np.int64) * span + (moments - start)
        return np.searchsorted(keys, wanted, side="left") - self.history.offsets[users]

    def history_before(
        self, users: np.ndarray, counts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (items, times, lengths) of each user's first ``counts`` train rows, newest
        first, capped at ``history_length``: the history at a moment after them."""
        starts, counts = self._first_rows(users, counts)
        items, lengths = self.history.slices(starts, counts, self.history_length)
        times, _ = self.history_times.slices(starts, counts, self.history_length)
        return items, times, lengths

    def training_users(self, rows: np.ndarray) -> KeyedJaggedTensor:
        """The user-side KJT of train rows ``rows``: each row's user with the row's past."""
        history, lengths = self.past(rows, limit=self.history_length)
        return self.user_kjt(self.row_users(rows), history, lengths)

    def training_batch(self, rows: np.ndarray, negatives: np.ndarray) -> RankingBatch:
        """Training lists of train rows ``rows`` (``[B]``): each row's item first (label 1),
        then its ``negatives`` (``[B, n]``), the user's features as they stood before it."""
        users = self.row_users(rows)
        items = np.concatenate([self.row_items(rows)[:, None], negatives], axis=1)
        labels = np.zeros(items.shape, dtype=np.float32)
        labels[:, 0] = 1.0
        return self._batch(
            self.training_users(rows),
            users,
            items,
            labels,
            rows,
            self.row_times(rows),
            self.past_times(rows, limit=self.history_length),
        )

    def batch(self, users: np.ndarray, items: np.ndarray, labels: np.ndarray) -> RankingBatch:
        """Build a batch from user indices ``[B]`` and candidate item indices ``[B, L]``, each
        user's features as they stand in this view (:meth:`known_at`), at the moment of the
        user's held-out interaction."""
        rows = np.full(len(users), -1)
        history, times, lengths = self.history_of(users)
        features = self.user_kjt(users, history, lengths)
        return self._batch(features, users, items, labels, rows, self.held_out_times[users], times)

    def _batch(
        self,
        user_features: KeyedJaggedTensor,
        users: np.ndarray,
        items: np.ndarray,
        labels: np.ndarray,
        rows: np.ndarray,
        moments: np.ndarray,
        history_times: np.ndarray,
    ) -> RankingBatch:
        distinct, slots = np.unique(items, return_inverse=True)
        return RankingBatch(
            users=user_features,
            items=self.item_kjt(distinct),
            candidates=torch.as_tensor(slots.reshape(items.shape)),
            labels=torch.as_tensor(labels, dtype=torch.float32),
            mask=torch.ones(labels.shape, dtype=torch.bool),
            user_ids=torch.as_tensor(self.users.values[users - 1]),
            train_rows=torch.as_tensor(rows, dtype=torch.int64),
            moments=torch.as_tensor(moments, dtype=torch.int64),
            history_times=torch.as_tensor(history_times, dtype=torch.int64),
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
