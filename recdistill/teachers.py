"""Frozen teachers: a trained model that answers for each training list from the list's moment.

A training list holds a train interaction (its positive) and the user's features as they
stood just before it: the items before the positive alone (``FeatureStore.training_batch``).
A frozen teacher is asked about that same moment: its user vector for a list is its user
tower on the list's own features, never the user's state at the end of train, which holds
the items after the positive (and, for every list but the newest, the positive itself).

For a bag teacher that is its user tower on the batch, computed per batch. A sequence
teacher's attention layers would run once per list and epoch, so its state at every train
row is computed once, written to a memory-mapped ``.npy`` file and looked up by row. A
causal encoder read out at its newest position gives every prefix of a window in one pass
(position ``j`` of a window reads only the items older than it, with the positions they
would have alone), so each user's oldest ``max_length + 1`` rows cost one pass together;
each later row, whose past fills a window of its own, costs one pass. Users are taken in
chunks, so memory is bounded by the chunk, not by the number of users or rows.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from recdistill import distributed
from recdistill.data.feature_store import UNKNOWN, FeatureStore, RankingBatch
from recdistill.files import atomic_write
from recdistill.models import TwoTower


class TeacherOutputs(NamedTuple):
    """A teacher's answer for a batch: its per-list state (a two-tower's user vectors),
    the batch's item vectors (none for a teacher without a tower), the scores of every
    list's candidates, and which lists it teaches (None: all; an embeddings teacher skips
    lists whose user has no snapshot before them, when told to)."""

    users: torch.Tensor
    items: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor | None = None


# Windows run through a sequence teacher at once while computing its states.
STATE_WINDOWS = 1024
# Scores held at once while ranking the catalogue for train rows (64 MB of float32).
RANKED_CELLS = 1 << 24


class DistillationLists(NamedTuple):
    """Lists a teacher brings for a batch beside the batch's own, and the teacher's scores
    on them (``targets``): teacher-ranked lists of the batch's own users
    (``shares_users``), or logged requests of users and moments of their own."""

    batch: RankingBatch
    targets: torch.Tensor
    shares_users: bool


class Teacher:
    """What a stage learns from: for every list, scores from the list's own moment.

    A teacher scores a batch's lists (:meth:`outputs`) from its per-list state
    (:meth:`users`), and ranks the catalogue at every train row for RRD lists
    (:meth:`ranked`). What it computes per train row is written once to a memory-mapped file
    in ``cache``, named after the teacher's ``fingerprint`` (its weights and the train
    split), so a resumed run or a later stage reuses it and another teacher never does;
    without ``cache`` it is held in memory. Under ``torchrun`` rank 0 computes the file and
    every rank maps it.
    """

    # Its parameter count, when known (a teacher from outside the run may not say).
    params: int | None = None

    def __init__(self, name: str, store: FeatureStore, fingerprint: str, cache: Path | None):
        self.world = distributed.world()
        self.device = self.world.device
        self.name = name
        self.store = store
        self.fingerprint = fingerprint
        self.cache = cache
        self._ranked: dict[int, np.ndarray] = {}

    def describe(self) -> str:
        """A line on what the teacher is, printed when a run loads it."""
        return self.name

    def users(self, batch: RankingBatch) -> torch.Tensor:
        """The teacher's state for every list of ``batch``, from the list's features."""
        raise NotImplementedError

    def outputs(self, batch: RankingBatch, users: torch.Tensor | None = None) -> TeacherOutputs:
        """User vectors (``users`` if given), item vectors and scores of ``batch``'s lists."""
        raise NotImplementedError

    def catalogue_scores(self, batch: RankingBatch) -> torch.Tensor:
        """``[lists, items]``: every list's score of every item of the catalogue."""
        raise NotImplementedError

    def own_lists(self, epoch: int, k: int, batches: int) -> DistillationLists | None:
        """A teacher that brings lists of its own (a log of scored requests) gives, for global
        batch ``k`` of an epoch of ``batches``, those lists and its scores on them; every
        other teacher answers for the stage's own lists (None)."""
        return None

    def __call__(self, batch: RankingBatch) -> torch.Tensor:
        """Scores of ``batch``'s lists: a teacher is also a ranker, scored as a model of the
        run."""
        return self.outputs(batch).scores

    def ranked(self, depth: int) -> np.ndarray:
        """``[train rows, depth]`` int32: per train row, the teacher's ``depth`` best items
        from its state at that row, best first, among the items the user had not had before
        the row (the row's own item and the unknown item 0 excluded); -1 where fewer are
        left."""
        if depth not in self._ranked:
            self._ranked[depth] = self._per_row(
                f"top{depth}", (depth,), np.int32, lambda out: self._rank_rows(out)
            )
        return self._ranked[depth]

    @torch.no_grad()
    def _rank_rows(self, out: np.ndarray) -> None:
        store, depth = self.store, out.shape[1]
        items = len(store.items)
        chunk = max(1, RANKED_CELLS // items)
        for start in tqdm(
            range(0, store.train_rows, chunk),
            desc=f"{self.name} rankings",
            unit="chunk",
            disable=None,
        ):
            rows = np.arange(start, min(start + chunk, store.train_rows))
            batch = store.training_batch(rows, np.empty((len(rows), 0), dtype=np.int64))
            scores = self.catalogue_scores(batch.to(self.device)).cpu()
            past, lengths = store.past(rows)
            owner = torch.as_tensor(np.repeat(np.arange(len(rows)), lengths))
            scores[owner, torch.as_tensor(past).long()] = -torch.inf
            scores[torch.arange(len(rows)), torch.as_tensor(store.row_items(rows))] = -torch.inf
            scores[:, UNKNOWN] = -torch.inf
            best = scores.topk(min(depth, items), dim=1)
            ranked = torch.where(torch.isfinite(best.values), best.indices, -1)
            out[rows, : ranked.shape[1]] = ranked.numpy()
            out[rows, ranked.shape[1] :] = -1

    def _per_row(self, kind: str, shape: tuple[int, ...], dtype, fill) -> np.ndarray:
        """A ``[train rows, *shape]`` array ``fill`` writes, cached in ``cache`` if given."""
        rows = (self.store.train_rows, *shape)
        if self.cache is None:
            out = np.empty(rows, dtype=dtype)
            fill(out)
            return out
        path = None
        if self.world.is_main:
            self.cache.mkdir(parents=True, exist_ok=True)
            path = self.cache / f"train_{kind}_{self.name}_{self.fingerprint}.npy"
            if not path.exists():
                atomic_write(path, lambda scratch: _write(scratch, rows, dtype, fill))
        path = distributed.broadcast_json(None if path is None else str(path), self.world)
        return np.load(path, mmap_mode="r", allow_pickle=False)


class TowerTeacher(Teacher):
    """A teacher that scores ``user vector · item vector + item bias``: its item vectors and
    biases (``items``, ``bias``) are computed once, its user vector of a list from the
    list's features (:meth:`user_vectors`), or read from ``states``, the user vector at
    every train row computed once, when there are such states."""

    items: torch.Tensor
    bias: torch.Tensor
    states: np.ndarray | None = None

    @property
    def output_dim(self) -> int:
        return self.items.shape[1]

    def user_vectors(self, batch: RankingBatch) -> torch.Tensor:
        """The user vector of every list of ``batch``, computed from its features."""
        raise NotImplementedError

    @torch.no_grad()
    def users(self, batch: RankingBatch) -> torch.Tensor:
        """The teacher's user vector of every list of ``batch``, from the list's features:
        looked up for training lists when the states are precomputed, else computed."""
        rows = batch.train_rows
        if self.states is not None and bool((rows >= 0).all()):
            return torch.as_tensor(self.states[rows.cpu().numpy()]).to(self.device)
        return self.user_vectors(batch)

    @torch.no_grad()
    def outputs(self, batch: RankingBatch, users: torch.Tensor | None = None) -> TeacherOutputs:
        users = self.users(batch) if users is None else users
        ids = batch.items["item_id"].values()
        items = self.items[ids]
        return TeacherOutputs(
            users, items, (users @ items.T + self.bias[ids]).gather(1, batch.candidates)
        )

    @torch.no_grad()
    def catalogue_scores(self, batch: RankingBatch) -> torch.Tensor:
        return self.users(batch) @ self.items.T + self.bias


class FrozenTeacher(TowerTeacher):
    """A trained model in eval mode, its gradients off, its item vectors computed once; a
    sequence model's state at every train row is computed once (:func:`sequence_states`)."""

    def __init__(
        self,
        name: str,
        model: TwoTower,
        store: FeatureStore,
        *,
        cache: Path | None = None,
    ) -> None:
        model.eval()
        model.requires_grad_(False)
        super().__init__(name, store, _fingerprint(model, store), cache)
        self.params = model.parameter_count()
        on_device = next(model.parameters()).device == self.device
        self.model = model if on_device else copy.deepcopy(model).to(self.device)
        with torch.no_grad():
            self.items = self.model.item_tower(store.catalogue().to(self.device))
            self.bias = self.model.item_bias.weight.squeeze(-1)
        if model.spec.is_sequence:
            self.states = self._per_row(
                "states",
                (model.output_dim,),
                np.float32,
                lambda out: sequence_states(self.model, store, out),
            )

    @torch.no_grad()
    def user_vectors(self, batch: RankingBatch) -> torch.Tensor:
        return self.model.user_tower(batch.users)


def _write(path: Path, shape: tuple[int, ...], dtype, fill) -> None:
    out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    fill(out)
    out.flush()


def _fingerprint(model: TwoTower, store: FeatureStore) -> str:
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    store_digest(digest, store)
    return digest.hexdigest()[:16]


def store_digest(digest: Any, store: FeatureStore) -> None:
    """Add what a teacher's per-row answers depend on besides the teacher: the train
    histories and how many items of them the features keep."""
    digest.update(np.ascontiguousarray(store.history.offsets))
    digest.update(np.ascontiguousarray(store.history.values))
    digest.update(str(store.history_length).encode())


@torch.no_grad()
def sequence_states(model: TwoTower, store: FeatureStore, out: np.ndarray) -> np.ndarray:
    """Fill ``out[r]`` with ``model``'s user vector at train row ``r``, from the row's past
    alone (the items before it, newest first, as ``store.training_batch`` gives them).

    A window ending at row ``e`` of a user (the items before it) read out at its every
    position gives rows ``1..e`` when it holds the user's whole past (``e`` ≤
    ``max_length``): those are computed from one window per user. The user's first row has
    an empty past; each row with more than ``max_length`` items before it gets a window of
    its own, read out at its newest position. An attention readout pools every position, so
    each row then gets its own window.
    """
    tower = model.user_tower
    length = model.spec.max_length
    prefixes = model.spec.readout == "last"
    offsets = store.history.offsets
    counts = np.diff(offsets)
    # Users in chunks of about STATE_WINDOWS * max_length rows.
    chunk_users = np.searchsorted(offsets, np.arange(0, offsets[-1], STATE_WINDOWS * length))
    bounds = np.unique(np.concatenate([chunk_users, [len(counts)]]))
    device = next(model.parameters()).device
    progress = tqdm(total=int(offsets[-1]), desc="teacher states", unit="row", disable=None)
    for first, last in itertools.pairwise(bounds):
        users = np.arange(first, last)
        rows = np.arange(offsets[first], offsets[last])
        if len(rows) == 0:
            continue
        before = rows - offsets[store.row_users(rows)]  # items before each row
        one_window = (before > length) | (before == 0) | (not prefixes)
        for start in range(0, int(one_window.sum()), STATE_WINDOWS):
            batch_rows = rows[one_window][start : start + STATE_WINDOWS]
            kjt = store.training_users(batch_rows).to(device)
            out[batch_rows] = tower(kjt).cpu().numpy()
        if prefixes:
            # One window per user: the rows 1..e before which the user's whole past fits.
            ends = offsets[users] + np.minimum(counts[users] - 1, length)
            owners = users[ends > offsets[users]]
            ends = ends[ends > offsets[users]]
            for start in range(0, len(ends), STATE_WINDOWS):
                window_ends = ends[start : start + STATE_WINDOWS]
                kjt = store.training_users(window_ends).to(device)
                positions, _ = tower.positions(kjt)
                owner = owners[start : start + STATE_WINDOWS]
                within = window_ends - offsets[owner]
                for_rows = np.repeat(window_ends, within) - (
                    np.arange(within.sum()) - np.repeat(np.cumsum(within) - within, within)
                )
                # Row e - j reads position j of the window ending at row e.
                slot = np.repeat(window_ends, within) - for_rows
                window = np.repeat(np.arange(len(window_ends)), within)
                out[for_rows] = positions[window, slot].cpu().numpy()
        progress.update(len(rows))
    progress.close()
    return out
