"""Any :class:`~recdistill.external.contract.TeacherModel` as a teacher a stage learns from.

:class:`DataIds` turns a ranking batch (indices of the run's feature store) into
:class:`~recdistill.external.contract.TeacherLists` with the user's own IDs. A model that
gives vectors is a :class:`ContractTwoTower`: its item vectors and biases are computed once
for the catalogue, its user vector at every train row once (in chunks of rows, to a
memory-mapped file when the model has a ``fingerprint``), as a trained stage's are. Any other
model is a :class:`ContractScorer`, asked about each batch's lists as they come, and about
every item of the catalogue at each train row once when a stage ranks lists by it. Every
answer is checked: a score that is not finite stops training with the lists it was for.
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import numpy as np
import torch

from recdistill.data.feature_store import FeatureStore, RankingBatch
from recdistill.errors import TeacherError
from recdistill.external.contract import TeacherLists, TeacherModel
from recdistill.teachers import Teacher, TeacherOutputs, TowerTeacher, store_digest

# Train rows whose user vectors are asked for at once while computing a two-tower's states.
STATE_ROWS = 4096
# Items whose vectors are asked for at once.
ITEM_CHUNK = 4096
# Relative disagreement between a two-tower's scores and its vectors' dot product plus bias
# that is taken for rounding, not a different formula.
VECTOR_TOLERANCE = 1e-3


class DataIds:
    """The user's own IDs of a feature store's items, users and feature values, by index
    (index 0, "unknown", stands for a real item or user: it is only ever padding)."""

    def __init__(self, store: FeatureStore) -> None:
        self.store = store
        self.items = _with_padding(np.asarray(store.item_ids.named(store.items.values)))
        self.users = _with_padding(np.asarray(store.user_ids.named(store.users.values)))
        self.features = {
            name: _with_padding(vocabulary.values)
            for name, vocabulary in store.feature_vocabularies.items()
        }

    def lists(self, batch: RankingBatch) -> TeacherLists:
        """``batch``'s lists as the contract gives them."""
        users = batch.users
        history = users["history"]
        lengths = history.lengths().cpu().numpy().astype(np.int64)
        width = int(lengths.max(initial=0))
        real = np.arange(width)[None, :] < lengths[:, None]
        padded = np.zeros((len(lengths), width), dtype=np.int64)
        padded[real] = history.values().cpu().numpy()
        times = np.zeros_like(padded)
        times[real] = batch.history_times.cpu().numpy()
        slots = batch.items["item_id"].values()[batch.candidates].cpu().numpy()
        return TeacherLists(
            users=self.users[users["user_id"].values().cpu().numpy()],
            moments=batch.moments.cpu().numpy(),
            history=self.items[padded],
            history_times=times,
            history_length=lengths,
            candidates=self.items[slots],
            features={
                name: values[users[name].values().cpu().numpy()]
                for name, values in self.features.items()
            },
        )

    def probe(self, lists: int = 8, candidates: int = 5) -> TeacherLists:
        """A few training lists spread over the train split, to try a teacher on at load."""
        store = self.store
        rows = np.linspace(0, store.train_rows - 1, min(lists, store.train_rows)).astype(np.int64)
        items = 1 + (np.arange(len(rows) * candidates) % (len(store.items) - 1))
        return self.lists(store.training_batch(rows, items.reshape(len(rows), candidates)))


def contract_teacher(
    name: str, model: TeacherModel, store: FeatureStore, *, cache: Path | None = None
) -> ContractScorer | ContractTwoTower:
    """``model`` as a teacher of the run, tried on a few lists first: a two-tower when it
    gives ``vectors``."""
    if not callable(getattr(model, "score", None)):
        raise TeacherError(
            f"teacher {name!r}: {type(model).__name__} has no score(lists) method "
            "(recdistill.external.TeacherModel)"
        )
    if callable(getattr(model, "vectors", None)):
        return ContractTwoTower(name, model, store, cache)
    return ContractScorer(name, model, store, cache)


class ContractTeacher(Teacher):
    """What both adapters share: the IDs, the fingerprint, and checked answers."""

    def __init__(self, name: str, model: TeacherModel, store: FeatureStore, cache: Path | None):
        own = getattr(model, "fingerprint", None)
        digest = hashlib.sha256(f"{type(model).__qualname__}:{own or uuid.uuid4()}".encode())
        store_digest(digest, store)
        # Without a fingerprint of its own a model's answers are held in memory, never reused.
        super().__init__(name, store, digest.hexdigest()[:16], cache if own else None)
        self.model = model
        self.ids = DataIds(store)
        self.params = getattr(model, "params", None)

    def describe(self) -> str:
        size = "" if self.params is None else f", {self.params:,} parameters"
        return f"{self.name}: {type(self.model).__name__}, {self.form}{size}"

    @property
    def form(self) -> str:
        raise NotImplementedError

    def checked(
        self, values: np.ndarray, lists: TeacherLists, what: str, shape: tuple
    ) -> torch.Tensor:
        """``values`` the model gave for ``lists`` as a tensor, refused when not finite or not
        of ``shape``."""
        values = np.asarray(values)
        if values.shape != shape:
            raise TeacherError(
                f"teacher {self.name!r}: its {what} have shape {values.shape}; expected {shape}"
            )
        bad = ~np.isfinite(values).reshape(len(values), -1).all(axis=1)
        if bad.any():
            where = [
                f"user {user} at {moment}"
                for user, moment in zip(
                    lists.users[bad][:3].tolist(), lists.moments[bad][:3].tolist()
                )
            ]
            raise TeacherError(
                f"teacher {self.name!r} gave non-finite {what} for {int(bad.sum())} of "
                f"{len(values)} lists: {', '.join(where)}"
            )
        return torch.as_tensor(values, dtype=torch.float32).to(self.device)

    def _catalogue_lists(self, batch: RankingBatch) -> TeacherLists:
        catalogue = np.broadcast_to(self.ids.items[1:], (batch.examples, len(self.ids.items) - 1))
        return self.ids.lists(batch).with_candidates(catalogue)


class ContractScorer(ContractTeacher):
    """A model that scores candidates and gives no vectors: asked about every list."""

    def __init__(self, name: str, model: TeacherModel, store: FeatureStore, cache: Path | None):
        super().__init__(name, model, store, cache)
        self.outputs_of(self.ids.probe())

    @property
    def form(self) -> str:
        return "scores (no vectors): asked about every list"

    def outputs_of(self, lists: TeacherLists) -> torch.Tensor:
        return self.checked(self.model.score(lists), lists, "scores", lists.candidates.shape)

    def users(self, batch: RankingBatch) -> torch.Tensor:
        return torch.empty((batch.examples, 0), device=self.device)

    @torch.no_grad()
    def outputs(self, batch: RankingBatch, users: torch.Tensor | None = None) -> TeacherOutputs:
        scores = self.outputs_of(self.ids.lists(batch))
        items = torch.empty((len(batch.items["item_id"].values()), 0), device=self.device)
        return TeacherOutputs(self.users(batch), items, scores)

    @torch.no_grad()
    def catalogue_scores(self, batch: RankingBatch) -> torch.Tensor:
        scores = self.outputs_of(self._catalogue_lists(batch))
        return torch.cat([scores.new_zeros((len(scores), 1)), scores], dim=1)


class ContractTwoTower(ContractTeacher, TowerTeacher):
    """A model that gives vectors: its scores are user vector · item vector + item bias,
    the item vectors and biases computed once and the user vector at every train row once."""

    def __init__(self, name: str, model: TeacherModel, store: FeatureStore, cache: Path | None):
        super().__init__(name, model, store, cache)
        self.items, self.bias = self._item_vectors()
        self._check_vectors(self.ids.probe())
        self._states: np.ndarray | None = None

    @property
    def form(self) -> str:
        return f"two-tower, {self.output_dim}-d vectors"

    @property
    def states(self) -> np.ndarray:
        """The user vector at every train row, computed when first asked for (loading a
        teacher writes nothing)."""
        if self._states is None:
            self._states = self._per_row(
                "states", (self.output_dim,), np.float32, lambda out: self._fill_states(out)
            )
        return self._states

    @torch.no_grad()
    def user_vectors(self, batch: RankingBatch) -> torch.Tensor:
        lists = self.ids.lists(batch)
        users, _ = self._vectors(lists.with_candidates(lists.candidates[:, :1]))
        return users

    def _vectors(self, lists: TeacherLists) -> tuple[torch.Tensor, torch.Tensor]:
        users, items = self.model.vectors(lists)
        users = np.asarray(users)
        width = users.shape[-1] if users.ndim == 2 else -1
        return (
            self.checked(users, lists, "user vectors", (len(lists), width)),
            self.checked(items, lists, "item vectors", (*lists.candidates.shape, width)),
        )

    def _item_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every item's vector and bias, from one list (the probe's first) scoring the
        catalogue in chunks: the bias is its score less the dot product."""
        first = self.ids.probe().rows(slice(0, 1))
        vectors, biases = [], []
        for start in range(1, len(self.ids.items), ITEM_CHUNK):
            lists = first.with_candidates(self.ids.items[None, start : start + ITEM_CHUNK])
            users, items = self._vectors(lists)
            scores = self.checked(self.model.score(lists), lists, "scores", lists.candidates.shape)
            vectors.append(items[0])
            biases.append(scores[0] - items[0] @ users[0])
        vectors, biases = torch.cat(vectors), torch.cat(biases)
        # Index 0 is the unknown item: padding, scored as nothing.
        vectors = torch.cat([vectors.new_zeros(1, vectors.shape[1]), vectors])
        biases = torch.cat([biases.new_zeros(1), biases])
        return vectors, biases

    def _check_vectors(self, lists: TeacherLists) -> None:
        """The model's own scores must be its vectors' dot product plus the item's bias."""
        users, _ = self._vectors(lists)
        scores = self.checked(self.model.score(lists), lists, "scores", lists.candidates.shape)
        index = torch.as_tensor(
            self.store.items.index(self.store.item_ids.lookup(lists.candidates.ravel()))
        ).reshape(lists.candidates.shape)
        implied = torch.einsum("ld,lcd->lc", users, self.items[index]) + self.bias[index]
        gap = float((implied - scores).abs().max())
        scale = float(scores.abs().max()) + 1.0
        if gap > VECTOR_TOLERANCE * scale:
            raise TeacherError(
                f"teacher {self.name!r}: its scores are not its user vector · item vector plus an "
                f"item bias (off by up to {gap:.3g}), as a teacher that gives vectors must score"
            )

    def _fill_states(self, out: np.ndarray) -> None:
        store = self.store
        for start in range(0, store.train_rows, STATE_ROWS):
            rows = np.arange(start, min(start + STATE_ROWS, store.train_rows))
            batch = store.training_batch(rows, np.empty((len(rows), 0), dtype=np.int64))
            out[rows] = self.user_vectors(batch).cpu().numpy()


def _with_padding(values: np.ndarray) -> np.ndarray:
    """``values`` behind a copy of its first value, so that index ``k`` is ``values[k - 1]``."""
    return np.concatenate([values[:1], values]) if len(values) else values
