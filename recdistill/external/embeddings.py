"""The ``embeddings`` kind: a two-tower teacher as the vectors it logged, snapshot by snapshot.

Two Parquet tables, ``items`` (``item_id``, ``valid_from``, ``vector``) and ``users``
(``user_id``, ``valid_from``, ``vector``): each row is a vector that holds from its
``valid_from`` time (seconds) until the same ID's next row, as a daily dump of a production
model's towers would write them. A list reads, for its user and for each item, the newest row
strictly before the list's moment, so the teacher it stands for is time-consistent by
construction; its score of an item is the dot product of the two vectors. An item with no row
before a list's moment has no vector yet and scores 0 there. A list whose user has no snapshot
before its moment is scored from its history instead (the mean of its history's item vectors)
or, with ``missing = "skip"``, is left out of distillation (at evaluation every list is
scored, from its history where it must be).

Rows are looked up by binary search on (ID, time) keys; the tables are held in memory
(4 bytes per dimension of every row, and 16 bytes of keys).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from recdistill.data.feature_store import UNKNOWN, FeatureStore, RankingBatch
from recdistill.errors import TeacherError
from recdistill.external.spec import TeacherSpec
from recdistill.external.vocabulary import few
from recdistill.teachers import Teacher, TeacherOutputs, store_digest

VALID_FROM = "valid_from"
VECTOR = "vector"
# Train rows looked up at once while checking which lists have a snapshot.
CHECK_ROWS = 1 << 20


class Snapshots:
    """One table's vectors, by (index of the data's IDs, ``valid_from``)."""

    def __init__(self, path: Path, id_column: str, index_of, where: str):
        path = Path(path)
        if not path.is_file():
            raise TeacherError(f"{where}: {path} not found")
        columns = pq.read_schema(path).names
        missing = [name for name in (id_column, VALID_FROM, VECTOR) if name not in columns]
        if missing:
            raise TeacherError(
                f"{where}: {path.name} has no column(s) {missing}; it needs "
                f"{[id_column, VALID_FROM, VECTOR]}"
            )
        table = pq.read_table(path, columns=[id_column, VALID_FROM, VECTOR])
        ids = table.column(id_column).to_numpy(zero_copy_only=False)
        index = index_of(ids)
        lengths = pc.list_value_length(table.column(VECTOR)).to_numpy(zero_copy_only=False)
        if len(lengths) == 0:
            raise TeacherError(f"{where}: {path.name} holds no vectors")
        if (lengths != lengths[0]).any():
            other = lengths[lengths != lengths[0]][0]
            raise TeacherError(
                f"{where}: {path.name}'s vectors differ in dimension ({lengths[0]} and {other})"
            )
        self.dim = int(lengths[0])
        self.ignored = int((index == UNKNOWN).sum())
        keep = index != UNKNOWN
        vectors = pc.list_flatten(table.column(VECTOR)).to_numpy(zero_copy_only=False)
        vectors = vectors.astype(np.float32).reshape(len(lengths), self.dim)[keep]
        bad = ~np.isfinite(vectors).all(axis=1)
        if bad.any():
            raise TeacherError(
                f"{where}: {path.name} has {int(bad.sum())} vector(s) that are not finite, "
                f"e.g. of {few(ids[keep][bad])}"
            )
        self.owners = index[keep]
        self.times = table.column(VALID_FROM).to_numpy().astype(np.int64)[keep]
        del table
        self.start = int(self.times.min(initial=0))
        self.span = int(self.times.max(initial=0)) - self.start + 2
        order = np.lexsort((self.times, self.owners))
        self.keys = self._key(self.owners[order], self.times[order])
        self.owners, self.times = self.owners[order], self.times[order]
        self.vectors = vectors[order]

    def _key(self, owners: np.ndarray, times: np.ndarray) -> np.ndarray:
        offset = np.clip(times - self.start, 0, self.span - 1)
        return owners.astype(np.int64) * self.span + offset

    def rows(self, owners: np.ndarray, moments: np.ndarray) -> np.ndarray:
        """The row of each owner's newest vector strictly before its moment, -1 for none."""
        owners, moments = np.broadcast_arrays(owners, moments)
        position = np.searchsorted(self.keys, self._key(owners, moments), side="left") - 1
        found = position >= 0
        position = np.where(found, position, 0)
        found &= self.owners[position] == owners
        return np.where(found, position, -1)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of ``rows`` (zeros for -1)."""
        out = np.asarray(self.vectors[np.maximum(rows, 0).ravel()]).reshape(*rows.shape, self.dim)
        out[rows < 0] = 0.0
        return out


class EmbeddingTeacher(Teacher):
    """The vectors of ``spec.items`` and ``spec.users`` answering for every list at its moment."""

    def __init__(self, name: str, spec: TeacherSpec, store: FeatureStore, cache: Path | None):
        where = spec.where
        digest = hashlib.sha256(spec.missing.encode())
        for path in (spec.items, spec.users):
            digest.update(_file_digest(Path(path)))
        store_digest(digest, store)
        super().__init__(name, store, digest.hexdigest()[:16], cache)
        self.item_vectors = Snapshots(Path(spec.items), "item_id", _indices(store, "items"), where)
        self.user_vectors = Snapshots(Path(spec.users), "user_id", _indices(store, "users"), where)
        if self.item_vectors.dim != self.user_vectors.dim:
            raise TeacherError(
                f"{where}: item vectors have {self.item_vectors.dim} dimensions, user vectors "
                f"{self.user_vectors.dim}: they must match"
            )
        self.skip = spec.missing == "skip"
        self.params = self.item_vectors.dim * (
            len(np.unique(self.item_vectors.owners)) + len(np.unique(self.user_vectors.owners))
        )
        self.covered = self._check_coverage(where)

    @property
    def output_dim(self) -> int:
        return self.user_vectors.dim

    def describe(self) -> str:
        fallback = "left out" if self.skip else "scored from their history's item vectors"
        return (
            f"{self.name}: {self.output_dim}-d vectors; {self.covered:.1%} of training lists have "
            f"a snapshot of their user before them, the rest are {fallback}"
        )

    def _check_coverage(self, where: str) -> float:
        """The share of training lists whose user has a snapshot before them; none at all
        (or no item vector before any list) is an error."""
        store, covered = self.store, 0
        for start in range(0, store.train_rows, CHECK_ROWS):
            rows = np.arange(start, min(start + CHECK_ROWS, store.train_rows))
            found = self.user_vectors.rows(store.row_users(rows), store.row_times(rows))
            covered += int((found >= 0).sum())
        last = int(store.history_times.values.max(initial=0))
        for table, what in ((self.user_vectors, "user"), (self.item_vectors, "item")):
            if not len(table.times) or int(table.times.min()) >= last:
                first = few(table.times[:1]) if len(table.times) else "none"
                raise TeacherError(
                    f"{where}: no {what} vector is valid before any training list (the first "
                    f"{VALID_FROM} is {first}; the last training list is at {last})"
                )
        return covered / max(store.train_rows, 1)

    def _lookup(self, batch: RankingBatch) -> tuple[torch.Tensor, np.ndarray]:
        """Every list's user vector, and which lists have a snapshot of their user."""
        moments = batch.moments.cpu().numpy()
        rows = self.user_vectors.rows(batch.users["user_id"].values().cpu().numpy(), moments)
        users = self.user_vectors.gather(rows)
        missing = rows < 0
        if missing.any():
            history = batch.users["history"]
            lengths = history.lengths().cpu().numpy()
            owner = np.repeat(np.arange(len(lengths)), lengths)
            items = self.item_vectors.gather(
                self.item_vectors.rows(history.values().cpu().numpy(), moments[owner])
            )
            sums = np.zeros_like(users)
            np.add.at(sums, owner, items)
            mean = sums / np.maximum(lengths, 1)[:, None]
            users[missing] = mean[missing]
        return torch.as_tensor(users).to(self.device), ~missing

    @torch.no_grad()
    def users(self, batch: RankingBatch) -> torch.Tensor:
        return self._lookup(batch)[0]

    @torch.no_grad()
    def outputs(self, batch: RankingBatch, users: torch.Tensor | None = None) -> TeacherOutputs:
        looked_up, has = self._lookup(batch)
        users = looked_up if users is None else users
        moments = batch.moments.cpu().numpy()
        slots = batch.items["item_id"].values()[batch.candidates].cpu().numpy()
        vectors = self.item_vectors.gather(self.item_vectors.rows(slots, moments[:, None]))
        scores = torch.einsum("ld,lcd->lc", users, torch.as_tensor(vectors).to(self.device))
        # Item vectors of the batch's items for feature distillation: as of its earliest list.
        ids = batch.items["item_id"].values().cpu().numpy()
        items = self.item_vectors.gather(self.item_vectors.rows(ids, moments.min(initial=0)))
        valid = None
        if self.skip:
            taught = has | (batch.train_rows.cpu().numpy() < 0)
            valid = torch.as_tensor(taught).to(self.device)
        return TeacherOutputs(users, torch.as_tensor(items).to(self.device), scores, valid)

    @torch.no_grad()
    def catalogue_scores(self, batch: RankingBatch) -> torch.Tensor:
        users = self.users(batch)
        moments = batch.moments.cpu().numpy()
        catalogue = np.arange(len(self.store.items))
        epochs = np.unique(self.item_vectors.times)
        epoch_of = np.searchsorted(epochs, moments, side="left")
        scores = torch.empty((len(moments), len(catalogue)), device=self.device)
        for epoch in np.unique(epoch_of):
            lists = torch.as_tensor(np.flatnonzero(epoch_of == epoch))
            # As of every row valid from before this epoch's moments: valid_from < moment.
            at = epochs[epoch - 1] + 1 if epoch > 0 else np.iinfo(np.int64).min // 4
            matrix = self.item_vectors.gather(self.item_vectors.rows(catalogue, at))
            scores[lists.to(self.device)] = users[lists] @ torch.as_tensor(matrix).to(self.device).T
        return scores


def _indices(store: FeatureStore, kind: str):
    """The index of the data's users or items of each ID (the unknown index for others)."""
    ids = store.items if kind == "items" else store.users
    codes = store.item_ids if kind == "items" else store.user_ids
    return lambda values: ids.index(codes.encode(np.asarray(values)))


def _file_digest(path: Path) -> bytes:
    digest = hashlib.sha256()
    if path.is_file():
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
    return digest.digest()
