"""The ``scores`` kind: the production ranker's scores as it logged them.

The cheapest thing a platform can hand over: a Parquet table with a row per scored candidate,
``user_id``, ``request_time`` (seconds), ``item_id`` and ``score`` (and ``request_id`` when
one user's requests can share a second; without it a request is a user and a time). Each
logged request becomes a training list of its own: its candidates, scored by the student from
the user's history strictly before the request time, against the logged scores. Such a
teacher knows no other list: it cannot rank the catalogue, give vectors, or be scored on the
run's test lists.

Time runs one way: a request at or after its user's validation interaction is dropped (its
candidates were chosen and scored knowing what came before the held-out items, which the
student must not learn), and each list's history holds the train interactions before its
request time only. Every epoch deals the kept requests out over the stage's batches, in an
order seeded by the epoch.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from recdistill.data.feature_store import UNKNOWN, FeatureStore, RankingBatch
from recdistill.errors import TeacherError
from recdistill.external.spec import TeacherSpec
from recdistill.external.vocabulary import few
from recdistill.teachers import DistillationLists, Teacher, TeacherOutputs, store_digest

USER_ID, REQUEST_TIME, ITEM_ID, SCORE, REQUEST_ID = (
    "user_id",
    "request_time",
    "item_id",
    "score",
    "request_id",
)
COLUMNS = (USER_ID, REQUEST_TIME, ITEM_ID, SCORE)
# Times from this value up are taken for milliseconds (as the importer takes them).
MILLISECONDS = 10**11


class LoggedScores(Teacher):
    """The requests of a score log, as lists a stage learns from."""

    def __init__(self, name: str, spec: TeacherSpec, store: FeatureStore) -> None:
        path = Path(spec.path)
        where = spec.where
        if not path.is_file():
            raise TeacherError(f"{where}: score log {path} not found")
        digest = hashlib.sha256(path.read_bytes())
        store_digest(digest, store)
        super().__init__(name, store, digest.hexdigest()[:16], None)
        table = _read(path, where)
        users = _index(store.users, store.user_ids, table.column(USER_ID), where, "users", path)
        items = _index(store.items, store.item_ids, table.column(ITEM_ID), where, "items", path)
        times = table.column(REQUEST_TIME).to_numpy().astype(np.int64)
        scores = table.column(SCORE).to_numpy(zero_copy_only=False).astype(np.float32)
        data_times = store.history_times.values
        if len(times) and times.max() >= MILLISECONDS > data_times.max(initial=0):
            raise TeacherError(
                f"{where}: {path.name}'s request_time looks like milliseconds (up to "
                f"{times.max()}); the data's times are seconds"
            )
        if REQUEST_ID in table.column_names:
            request = table.column(REQUEST_ID).to_numpy(zero_copy_only=False)
            keys = pc.dictionary_encode(pa.array(request)).indices.to_numpy()
        else:
            keys = np.unique(np.stack([users, times], axis=1), axis=0, return_inverse=True)[1]
        order = np.argsort(keys.ravel(), kind="stable")
        keys, users, items, times, scores = (
            a[order] for a in (keys.ravel(), users, items, times, scores)
        )
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        request_users, request_times = users[starts], times[starts]
        per_request_user = np.repeat(request_users, np.diff(np.r_[starts, len(keys)]))
        if (users != per_request_user).any():
            raise TeacherError(f"{where}: a request_id of {path.name} holds more than one user")
        bad = ~np.isfinite(scores)
        if bad.any():
            owner = np.searchsorted(starts, np.flatnonzero(bad), side="right") - 1
            named = [
                f"user {store.user_ids.named(store.users.values[[u - 1]])[0]} at {t}"
                for u, t in zip(request_users[owner[:3]], request_times[owner[:3]])
            ]
            raise TeacherError(
                f"{where}: {int(bad.sum())} logged score(s) are not finite, in "
                f"{len(np.unique(owner))} request(s): {', '.join(named)}"
            )
        # A request at or after the user's validation interaction knows what preceded it.
        has_valid = store.valid_items[request_users] != UNKNOWN
        kept = ~has_valid | (request_times < store.valid_times[request_users])
        lengths = np.diff(np.r_[starts, len(keys)])
        self.requests = int(kept.sum())
        self.dropped = int((~kept).sum())
        if self.requests == 0:
            raise TeacherError(
                f"{where}: none of {path.name}'s {len(starts):,} requests comes before its "
                "user's validation interaction: there is nothing to learn from"
            )
        row_kept = np.repeat(kept, lengths)
        self.users = request_users[kept]
        self.moments = request_times[kept]
        self.lengths = lengths[kept]
        self.offsets = np.r_[0, np.cumsum(self.lengths)]
        self.items = items[row_kept]
        self.scores = scores[row_kept]
        self.before = store.rows_before(self.users, self.moments)

    def describe(self) -> str:
        """What the log gave: requests kept and dropped."""
        return (
            f"{self.name}: {self.requests:,} logged requests kept "
            f"({int(self.lengths.mean()):,} candidates on average), {self.dropped:,} dropped "
            "for coming at or after their user's validation interaction"
        )

    def own_lists(self, epoch: int, k: int, batches: int) -> DistillationLists:
        order = np.random.default_rng([epoch, 7]).permutation(self.requests)
        per_batch = math.ceil(self.requests / batches)
        chosen = order[(k * per_batch + np.arange(per_batch)) % self.requests]
        return self._lists(chosen)

    def _lists(self, requests: np.ndarray) -> DistillationLists:
        store = self.store
        lengths = self.lengths[requests]
        width = int(lengths.max())
        mask = np.arange(width)[None, :] < lengths[:, None]
        slots = self.offsets[requests][:, None] + np.minimum(
            np.arange(width)[None, :], lengths[:, None] - 1
        )
        items = self.items[slots]
        targets = np.where(mask, self.scores[slots], 0.0).astype(np.float32)
        users = self.users[requests]
        history, times, history_lengths = store.history_before(users, self.before[requests])
        distinct, positions = np.unique(items, return_inverse=True)
        batch = RankingBatch(
            users=store.user_kjt(users, history, history_lengths),
            items=store.item_kjt(distinct),
            candidates=torch.as_tensor(positions.reshape(items.shape)),
            labels=torch.zeros(items.shape),
            mask=torch.as_tensor(mask),
            user_ids=torch.as_tensor(store.users.values[users - 1]),
            train_rows=torch.full((len(users),), -1, dtype=torch.int64),
            moments=torch.as_tensor(self.moments[requests]),
            history_times=torch.as_tensor(times),
        ).to(self.device)
        return DistillationLists(
            batch, torch.as_tensor(targets).to(self.device), shares_users=False
        )

    def users(self, batch: RankingBatch) -> torch.Tensor:
        raise self._cannot("answer for lists it did not log")

    def outputs(self, batch: RankingBatch, users: torch.Tensor | None = None) -> TeacherOutputs:
        raise self._cannot("answer for lists it did not log")

    def catalogue_scores(self, batch: RankingBatch) -> torch.Tensor:
        raise self._cannot("rank the catalogue")

    def _cannot(self, what: str) -> TeacherError:
        return TeacherError(f"teacher {self.name!r} is a log of scores: it cannot {what}")


def _read(path: Path, where: str) -> pa.Table:
    names = pq.read_schema(path).names
    missing = [name for name in COLUMNS if name not in names]
    if missing:
        raise TeacherError(
            f"{where}: {path.name} has no column(s) {missing}; a score log holds {list(COLUMNS)} "
            f"(and optionally {REQUEST_ID!r})"
        )
    wanted = [*COLUMNS, *([REQUEST_ID] if REQUEST_ID in names else [])]
    return pq.read_table(path, columns=wanted)


def _index(
    vocabulary, codes, column: pa.ChunkedArray, where: str, what: str, path: Path
) -> np.ndarray:
    """The feature store's index of every ID of ``column``; an ID the data lacks is an error."""
    ids = column.to_numpy(zero_copy_only=False)
    index = vocabulary.index(codes.encode(np.asarray(ids)))
    unknown = np.unique(ids[index == UNKNOWN])
    if len(unknown):
        raise TeacherError(
            f"{where}: {path.name} names {len(unknown):,} {what} the data does not have, "
            f"e.g. {few(unknown)}"
        )
    return index
