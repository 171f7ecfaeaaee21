"""Ensemble teachers: trained stages and EASE baselines mixed into one teacher.

Distillation began as distilling an ensemble (Hinton et al., 2015). A ``[ensembles.NAME]``
table names its ``members``, trained stages of the run or the ``ease`` and ``ease_recency``
baselines, and a grid of ``weights`` (one weight per member; by default every mix of
weights summing to 1 in steps of ``1 / steps``, a quarter unless the table says). Each member's scores for a list are standardised over the whole catalogue for
that list's moment (minus their mean over the items, over their standard deviation), so a
sequence model's logits and EASE's reconstruction weights mix on one scale; the ensemble
scores ``Σ weight · standardised member``. The weights are the grid point with the best
validation metric of the run's ``valid_metric``; test is never read.

Every member answers from the list's own moment: a trained stage as a frozen teacher does
(:class:`~recdistill.teachers.FrozenTeacher`), an EASE member from the history bag of the
list's features (the items before a training list's positive, the ``history_length`` newest,
weighted ``0.5 ** (age / half_life)`` as ``ease_recency`` weighs them). So an ensemble is a
:class:`~recdistill.teachers.Teacher`: every distillation loss and the RRD lists take it as a
source, except ``feature_mse`` (an ensemble has no tower outputs). It is also a ranker, scored
on test as a model of the run.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recdistill.baselines import Ease
from recdistill.data.feature_store import UNKNOWN, FeatureStore, RankingBatch
from recdistill.teachers import Teacher, TeacherOutputs, store_digest

# The baselines an ensemble may take as members.
BASELINE_MEMBERS = ("ease", "ease_recency")


@dataclass(frozen=True)
class EnsembleSpec:
    """``[ensembles.NAME]``: its ``members`` and the ``weights`` validation chooses from
    (unset: every mix summing to 1 in steps of ``1 / steps``)."""

    name: str
    members: tuple[str, ...]
    weights: tuple[tuple[float, ...], ...] = ()
    steps: int = 4

    def __post_init__(self) -> None:
        where = f"[ensembles.{self.name}]"
        if len(self.members) < 2 or len(set(self.members)) != len(self.members):
            raise ValueError(f"{where}: an ensemble needs two or more distinct members")
        if self.steps < 1:
            raise ValueError(f"{where}: steps must be at least 1, not {self.steps}")
        for point in self.weights:
            if not isinstance(point, list | tuple) or len(point) != len(self.members):
                raise ValueError(
                    f"{where}: weights is a list of mixes, each one weight per member "
                    f"({len(self.members)}, e.g. weights = [[0.9, 0.1]]), not {list(self.weights)}"
                )
            if min(point) < 0 or sum(point) <= 0:
                raise ValueError(
                    f"{where}: weights must be non-negative and not all zero, not {list(point)}"
                )
        # Mixes that differ in scale alone rank alike but teach at different scales: each
        # is brought to sum 1, as the default grid's are.
        weights = tuple(tuple(w / sum(point) for w in point) for point in self.weights)
        object.__setattr__(self, "weights", weights)

    @property
    def grid(self) -> tuple[tuple[float, ...], ...]:
        """The weights to choose from: the config's, or every mix in ``1 / steps``."""
        if self.weights:
            return self.weights
        return tuple(
            tuple(k / self.steps for k in point)
            for point in itertools.product(range(self.steps + 1), repeat=len(self.members))
            if sum(point) == self.steps
        )


class Member(Protocol):
    """An ensemble member: every list's scores of the whole catalogue, at the list's moment."""

    fingerprint: str

    def catalogue_scores(self, batch: RankingBatch) -> torch.Tensor: ...


class EaseMember:
    """EASE (item × item ``weights`` and a ``half_life``) scored from each list's history
    bag: the items of the user-side ``history`` feature, newest first, aged by position."""

    def __init__(self, weights: np.ndarray | torch.Tensor, half_life: float) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float32)
        self.half_life = half_life
        digest = hashlib.sha256(self.weights.numpy())
        digest.update(repr(half_life).encode())
        self.fingerprint = digest.hexdigest()[:16]

    @classmethod
    def of(cls, ease: Ease) -> EaseMember:
        return cls(ease.weights, ease.half_life)

    def catalogue_scores(self, batch: RankingBatch) -> torch.Tensor:
        return self.history_scores(batch.users)

    @torch.no_grad()
    def history_scores(self, users: KeyedJaggedTensor) -> torch.Tensor:
        """``[lists, items]`` from the ``history`` bags of a user-side KJT.

        The history rows are sparse (``history_length`` items at most), so a batch costs
        lists × ``history_length`` × items multiply-adds; the weights are dense, items²
        floats, which is what limits the catalogue (about 1.6 GB at 20,000 items).
        """
        history = users["history"]
        lengths, device = history.lengths(), history.values().device
        lists, items = len(lengths), self.weights.shape[0]
        owner = torch.repeat_interleave(torch.arange(lists, device=device), lengths)
        age = torch.arange(len(owner), device=device) - torch.repeat_interleave(
            torch.cumsum(lengths, 0) - lengths, lengths
        )
        weight = 0.5 ** (age.float() / self.half_life)
        # An item seen twice keeps its newest (largest) weight, as history_matrix does.
        x = torch.zeros(lists * items, device=device).scatter_reduce(
            0, owner * items + history.values(), weight, "amax"
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
            rows = x.reshape(lists, items).to_sparse_csr()
        if self.weights.device != device:
            self.weights = self.weights.to(device)  # once: items² floats
        return rows @ self.weights


class EnsembleTeacher(Teacher):
    """``Σ weight · standardised member`` over the catalogue, for every list at its moment.

    Its per-list state (:meth:`users`) is the mixed catalogue scores ``[lists, items]``."""

    def __init__(
        self,
        name: str,
        members: dict[str, Member],
        weights: tuple[float, ...],
        store: FeatureStore,
        *,
        cache: Path | None = None,
    ) -> None:
        digest = hashlib.sha256(repr(weights).encode())
        for member_name, member in members.items():
            digest.update(f"{member_name}:{member.fingerprint}".encode())
        store_digest(digest, store)
        super().__init__(name, store, digest.hexdigest()[:16], cache)
        self.members = members
        self.weights = dict(zip(members, weights, strict=True))

    @torch.no_grad()
    def catalogue_scores(self, batch: RankingBatch) -> torch.Tensor:
        mixed = None
        for member_name, member in self.members.items():
            weight = self.weights[member_name]
            if weight == 0:
                continue
            part = weight * standardised(member.catalogue_scores(batch))
            mixed = part if mixed is None else mixed + part
        return mixed

    def users(self, batch: RankingBatch) -> torch.Tensor:
        return self.catalogue_scores(batch)

    def outputs(self, batch: RankingBatch, users: torch.Tensor | None = None) -> TeacherOutputs:
        users = self.users(batch) if users is None else users
        items = batch.items["item_id"].values()
        scores = users[:, items].gather(1, batch.candidates)
        return TeacherOutputs(users, users.new_empty(len(items), 0), scores)


def standardised(scores: torch.Tensor) -> torch.Tensor:
    """Each row minus its mean over the real items (not the unknown item 0), over their
    standard deviation (1 where a row is constant)."""
    real = scores[:, UNKNOWN + 1 :]
    mean = real.mean(1, keepdim=True)
    spread = real.std(1, keepdim=True)
    return (scores - mean) / torch.where(spread > 0, spread, 1.0)
