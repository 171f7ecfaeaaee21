"""One training stage: a model learns from labels and/or frozen teachers.

Read top to bottom: the stage's spec, the stage's loss as one module
(:class:`StageObjective`), then :class:`Trainer`, whose :meth:`Trainer.fit` runs epochs of
(score lists → weighted loss → step), evaluates validation NDCG@10 after each epoch,
checkpoints, and stops early. ``fit`` resumes from the checkpoint when asked and then
continues to the same result as an uninterrupted run. A non-finite loss or gradient stops
the stage before its step (:class:`TrainingDiverged`), leaving the last epoch's checkpoint
as it was: resumed with a lower learning rate (the one change a resume accepts), the stage
continues from there.

Under ``torchrun`` the same code trains on every rank: the objective is wrapped by torchrec's
DistributedModelParallel (tables sharded, the rest data-parallel), each rank takes its own
share of every epoch's batches, rank 0 alone evaluates and writes, and checkpoints hold whole
tensors, so a run resumes at any world size. Frozen teachers stay whole on every rank.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from recdistill import distributed
from recdistill.config import spec_from
from recdistill.data.batches import (
    FeatureStore,
    RankingBatch,
    SequenceBatch,
    TrainLists,
    TrainSequences,
)
from recdistill.errors import TrainingDiverged
from recdistill.evaluate import evaluate
from recdistill.losses import LOSSES
from recdistill.models import TwoTower
from recdistill.ranked_lists import ListSpec, RankedLists, fingerprint, top_unseen

LABELS = "labels"
# What a stage trains on: ranking lists (a train interaction and sampled negatives), or
# every position of history windows predicting the item that came next (sequence models).
OBJECTIVES = ("lists", "next_item")
SELECTION_METRIC = "ndcg@10"
CHECKPOINT = "checkpoint.pt"
BEST_WEIGHTS = "model.safetensors"
LOG = "log.jsonl"
# Row-wise Adagrad needs about this many times Adam's learning rate to learn as fast: at
# this ratio torchrun's sharded stages of configs/synthetic.toml match one process's quality.
ADAGRAD_STEP_RATIO = 10.0
# Users whose teacher vectors are computed at once.
TEACHER_USERS = 4096
# Checkpoints of other formats (or none) are refused rather than resumed differently.
CHECKPOINT_FORMAT = 2
# The stage spec's fields a resume may change: a diverged stage continues from its last good
# checkpoint at a lower rate. Any other change makes the checkpoint another stage's.
RESUMABLE_CHANGES = ("learning_rate", "adagrad_learning_rate")

TeacherOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""A frozen teacher's user vectors, item vectors and scores for a batch."""


@dataclass(frozen=True)
class LossTerm:
    """``weight * LOSSES[fn](student, target, mask=..., **options)``.

    ``source`` is ``"labels"`` or the name of an earlier stage whose model is the teacher.
    ``feature_mse`` compares tower outputs instead of scores.
    """

    fn: str
    source: str = LABELS
    weight: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fn not in LOSSES:
            raise ValueError(f"unknown loss {self.fn!r}; known: {sorted(LOSSES)}")
        if self.fn == "feature_mse" and self.source == LABELS:
            raise ValueError("feature_mse needs a teacher stage as its source, not labels")

    @property
    def scored(self) -> bool:
        """Whether the term compares scores of lists (every loss but ``feature_mse``)."""
        return self.fn != "feature_mse"


@dataclass(frozen=True)
class StageSpec:
    name: str
    model: str
    losses: tuple[LossTerm, ...]
    epochs: int = 20
    patience: int = 3
    batch_size: int = 512
    negatives: int = 19
    learning_rate: float = 1e-3
    # Under torchrun on CPU the sharded tables learn with fbgemm's row-wise Adagrad (its CPU
    # kernel has no Adam); unset, ADAGRAD_STEP_RATIO × learning_rate. Ignored in one
    # process and on GPUs.
    adagrad_learning_rate: float | None = None
    weight_decay: float = 0.0
    seed: int = 0
    objective: str = "lists"
    # Teacher-ranked distillation lists (recdistill/ranked_lists.py) for the terms that
    # learn from a teacher's scores; unset, they use the training lists too.
    lists: ListSpec | None = None

    def __post_init__(self) -> None:
        if isinstance(self.lists, dict):
            object.__setattr__(
                self, "lists", spec_from(ListSpec, self.lists, f"[stages.{self.name}] lists")
            )
        if self.lists is not None and not self.ranked_sources:
            raise ValueError(
                f"[stages.{self.name}]: lists are ranked by a teacher, but no loss of this "
                "stage learns from a teacher's scores"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"[stages.{self.name}]: unknown objective {self.objective!r}; "
                f"choose one of {list(OBJECTIVES)}"
            )
        if self.objective == "next_item" and self.teachers:
            raise ValueError(
                f"[stages.{self.name}]: the next_item objective learns from labels only; "
                f"it cannot distil from {list(self.teachers)}"
            )

    @property
    def table_adagrad_learning_rate(self) -> float:
        if self.adagrad_learning_rate is not None:
            return self.adagrad_learning_rate
        return ADAGRAD_STEP_RATIO * self.learning_rate

    @property
    def teachers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.source for t in self.losses if t.source != LABELS))

    @property
    def ranked_sources(self) -> tuple[str, ...]:
        """The teachers whose score losses read teacher-ranked lists (when ``lists`` is set)."""
        return tuple(
            dict.fromkeys(t.source for t in self.losses if t.source != LABELS and t.scored)
        )


@dataclass
class StageResult:
    best_epoch: int
    best_valid: float
    epochs_run: int
    seconds: float
    examples_per_second: float


@dataclass
class EpochStats:
    """One epoch's training, summed over every rank."""

    examples: int
    loss_sum: float
    seconds: float


class StageObjective(nn.Module):
    """The stage's weighted loss on a batch, as one module holding the student and the
    feature-distillation adapters: under ``torchrun`` DistributedModelParallel wraps it whole,
    so its forward is where the data-parallel gradients are synchronised."""

    def __init__(
        self, model: TwoTower, adapters: nn.ModuleDict, losses: tuple[LossTerm, ...]
    ) -> None:
        super().__init__()
        self.model = model
        self.adapters = adapters
        self.losses = losses

    def forward(
        self,
        batch: RankingBatch | SequenceBatch,
        teacher_outputs: dict[str, TeacherOutputs],
        ranked: dict[str, tuple[RankingBatch, TeacherOutputs]],
    ) -> torch.Tensor:
        """The weighted loss of ``batch``; a score term whose teacher has a teacher-ranked
        batch in ``ranked`` (with that teacher's outputs on it) is computed on that batch."""
        if isinstance(batch, SequenceBatch):
            scores, labels = self.model.next_item_scores(batch)
            mask = torch.ones_like(labels, dtype=torch.bool)
            return sum(
                term.weight * LOSSES[term.fn](scores, labels, mask=mask, **term.options)
                for term in self.losses
            )
        users, items = self.model.towers(batch)
        scores = self.model.score(users, items, batch)
        ranked_scores = {name: self.model(lists) for name, (lists, _) in ranked.items()}
        total = scores.new_zeros(())
        for term in self.losses:
            fn = LOSSES[term.fn]
            if term.fn == "feature_mse":
                t_users, t_items, _ = teacher_outputs[term.source]
                adapter = self.adapters[term.source]
                value = 0.5 * (
                    fn(adapter(users), t_users, mask=_all_rows(users), **term.options)
                    + fn(adapter(items), t_items, mask=_all_rows(items), **term.options)
                )
            elif term.source in ranked:
                lists, (_, _, target) = ranked[term.source]
                value = fn(ranked_scores[term.source], target, mask=lists.mask, **term.options)
            else:
                target = batch.labels if term.source == LABELS else teacher_outputs[term.source][2]
                value = fn(scores, target, mask=batch.mask, **term.options)
            total = total + term.weight * value
        return total


class Trainer:
    def __init__(
        self,
        spec: StageSpec,
        model: TwoTower,
        teachers: dict[str, TwoTower],
        store: FeatureStore,
        directory: Path,
    ) -> None:
        self.spec = spec
        self.model = model
        self.store = store
        self.directory = Path(directory)
        self.world = distributed.world()
        device = self.world.device
        for teacher in teachers.values():
            teacher.eval()
            teacher.requires_grad_(False)
        self.teachers = {
            name: teacher if device.type == "cpu" else copy.deepcopy(teacher).to(device)
            for name, teacher in teachers.items()
        }
        # A frozen teacher's vectors never change: compute them once, for the catalogue and
        # for every user from the user's whole train history, as the teacher would serve
        # them. A sequence teacher would otherwise run its attention layers on every list.
        with torch.no_grad():
            catalogue = store.catalogue().to(device)
            self.teacher_items = {
                name: teacher.item_tower(catalogue) for name, teacher in self.teachers.items()
            }
            users = np.arange(len(store.users))
            self.teacher_users = {
                name: torch.cat(
                    [
                        teacher.user_tower(store.history_kjt(chunk).to(device))
                        for chunk in np.array_split(users, math.ceil(len(users) / TEACHER_USERS))
                    ]
                )
                for name, teacher in self.teachers.items()
            }
        # Feature distillation maps the student's tower outputs into each teacher's space;
        # the adapters are trained with the stage and are not part of the model.
        self.adapters = nn.ModuleDict(
            {
                term.source: nn.Linear(model.output_dim, teachers[term.source].output_dim)
                for term in spec.losses
                if term.fn == "feature_mse"
            }
        )
        self.objective = StageObjective(model, self.adapters, spec.losses)
        if self.world.distributed:
            # Sharding rebuilds modules in place: shard a copy and keep ``model`` whole, for
            # evaluation on rank 0 and as a teacher of later stages.
            self.trained: nn.Module = distributed.shard(
                copy.deepcopy(self.objective),
                self.world,
                learning_rate=spec.learning_rate,
                adagrad_learning_rate=spec.table_adagrad_learning_rate,
                weight_decay=spec.weight_decay,
            )
        else:
            self.trained = self.objective
        # Sharded tables are updated by their fused kernel in the backward pass; Adam
        # updates everything else.
        self.adam_parameters = dict(in_backward_optimizer_filter(self.trained.named_parameters()))
        self.optimizer = torch.optim.Adam(
            self.adam_parameters.values(), lr=spec.learning_rate, weight_decay=spec.weight_decay
        )
        sharing = {
            "batch_size": spec.batch_size,
            "negatives": spec.negatives,
            "seed": spec.seed,
            "rank": self.world.rank,
            "world_size": self.world.size,
        }
        if spec.objective == "next_item":
            if not model.spec.is_sequence:
                raise ValueError(f"[stages.{spec.name}]: next_item needs a sequence user encoder")
            self.lists = TrainSequences(store, max_length=model.spec.max_length, **sharing)
        else:
            self.lists = TrainLists(store, **sharing)
        self.ranked = None
        if spec.lists is not None:
            top = {name: self._teacher_top(name) for name in spec.ranked_sources}
            self.ranked = RankedLists(store, top, spec.lists.sampled)

    def _teacher_top(self, name: str) -> np.ndarray:
        """Teacher ``name``'s top unseen items per user, computed once by rank 0 and cached in
        the stage's directory under a name that fingerprints the teacher's vectors."""
        vectors = (
            self.teacher_users[name].cpu(),
            self.teacher_items[name].cpu(),
            self.teachers[name].item_bias.weight.squeeze(-1).cpu(),
        )
        k = self.spec.lists.teacher_top
        path = None
        if self.world.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self.directory / f"teacher_top_{name}_{k}_{fingerprint(*vectors)}.npy"
            if not path.exists():
                atomic_write(path, lambda scratch: top_unseen(*vectors, self.store, k, scratch))
        path = distributed.broadcast_json(None if path is None else str(path), self.world)
        return np.load(path, mmap_mode="r", allow_pickle=False)

    def ranked_batches(
        self, batch: RankingBatch | SequenceBatch, epoch: int, k: int
    ) -> dict[str, RankingBatch]:
        """The teacher-ranked lists of the users of ``batch``, global batch ``k`` of
        ``epoch``: seeded by both, so a resumed or sharded run draws the same ones."""
        if self.ranked is None or isinstance(batch, SequenceBatch):
            return {}
        users = batch.users["user_id"].values().numpy()
        rng = np.random.default_rng([self.spec.seed, epoch, k, 1])
        return {name: self.ranked.batch(name, users, rng) for name in self.spec.ranked_sources}

    def loss(
        self,
        batch: RankingBatch | SequenceBatch,
        ranked: dict[str, RankingBatch] | None = None,
    ) -> torch.Tensor:
        device = self.world.device
        batch = batch.to(device)
        ranked_outputs = {}
        for name, lists in (ranked or {}).items():
            lists = lists.to(device)
            ranked_outputs[name] = (lists, self.teacher_outputs(lists, (name,))[name])
        return self.trained(batch, self.teacher_outputs(batch), ranked_outputs)

    @torch.no_grad()
    def teacher_outputs(
        self, batch: RankingBatch | SequenceBatch, names: tuple[str, ...] | None = None
    ) -> dict[str, TeacherOutputs]:
        """Each teacher's (or those in ``names``) user vectors, item vectors and scores."""
        if not self.teachers:
            return {}
        item_ids = batch.items["item_id"].values()
        user_ids = batch.users["user_id"].values()
        outputs = {}
        for name, teacher in self.teachers.items():
            if names is not None and name not in names:
                continue
            users = self.teacher_users[name][user_ids]
            items = self.teacher_items[name][item_ids]
            outputs[name] = (users, items, teacher.score(users, items, batch))
        return outputs

    def train_epoch(self, epoch: int, *, max_batches: int | None = None) -> EpochStats:
        """Train on epoch ``epoch``'s batches (only the first ``max_batches``, if given)."""
        # Dropout draws from a generator seeded by epoch and rank, so that resuming at an
        # epoch boundary replays it without the previous process's generator state.
        torch.manual_seed(_seed_of(self.spec.seed, epoch, self.world.rank))
        self.trained.train()
        started = time.perf_counter()
        batches = len(self.lists) if max_batches is None else min(max_batches, len(self.lists))
        progress = tqdm(
            itertools.islice(self.lists.epoch(epoch), batches),
            total=batches,
            desc=f"{self.spec.name} epoch {epoch}",
            unit="batch",
            leave=False,
            disable=None if self.world.is_main else True,
        )
        examples, loss_sum = 0, 0.0
        for index, batch in enumerate(progress):
            global_index = index * self.world.size + self.world.rank
            loss = self.loss(batch, self.ranked_batches(batch, epoch, global_index))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._stop_if_diverged(loss, epoch, index)
            self.optimizer.step()
            examples += batch.examples
            loss_sum += loss.item() * batch.examples
            progress.set_postfix(loss=f"{loss.item():.4f}")
        examples, loss_sum = distributed.all_sum([examples, loss_sum], self.world)
        return EpochStats(int(examples), loss_sum, time.perf_counter() - started)

    def _stop_if_diverged(self, loss: torch.Tensor, epoch: int, batch: int) -> None:
        """Raise :class:`TrainingDiverged` on every rank, before the step, when any rank's loss
        or gradients are not finite (the sum over ranks keeps the ranks in step).

        ``fit`` checkpoints every finished epoch, so epoch ``epoch - 1``'s checkpoint is the
        last good one. Sharded tables have already been updated inside the backward pass
        (their gradients never reach ``optimizer``), but nothing is written from them.
        """
        gradients = [p.grad for p in self.adam_parameters.values() if p.grad is not None]
        largest = torch.nn.utils.get_total_norm(gradients, norm_type=math.inf)
        bad_loss, bad_gradients = not torch.isfinite(loss), not torch.isfinite(largest)
        anywhere = distributed.all_sum([float(bad_loss), float(bad_gradients)], self.world)
        if not any(anywhere):
            return
        if bad_loss:
            problem = f"loss is {loss.item()}"
        elif bad_gradients:
            problem = f"gradients are not finite (loss {loss.item():.4g})"
        else:
            problem = "the loss or gradients of another rank are not finite"
        kept = (
            f"the last good checkpoint (epoch {epoch - 1}) is kept"
            if epoch > 0
            else "no epoch had finished, so there is no checkpoint"
        )
        raise TrainingDiverged(
            f"stage {self.spec.name!r} diverged at epoch {epoch}, batch {batch}: {problem}; "
            f"{kept}: lower the learning rate and rerun with --resume"
        )

    def fit(self, *, resume: bool = False) -> StageResult:
        spec, main = self.spec, self.world.is_main
        self.directory.mkdir(parents=True, exist_ok=True)
        state = self._restore() if resume else None
        if state is None:
            state = {
                "epoch": -1,
                "best_valid": -math.inf,
                "best_epoch": -1,
                "stale": 0,
                "seconds": 0.0,
                "examples": 0,
            }
            if main:
                (self.directory / LOG).write_text("")
        epoch = state["epoch"] + 1
        while epoch < spec.epochs and state["stale"] < spec.patience:
            stats = self.train_epoch(epoch)
            self.gather_weights()
            valid_metric = self._validate()
            improved = valid_metric > state["best_valid"]
            if improved:
                state.update(best_valid=valid_metric, best_epoch=epoch, stale=0)
                if main:
                    self._save_best()
            else:
                state["stale"] += 1
            state.update(
                epoch=epoch,
                seconds=state["seconds"] + stats.seconds,
                examples=state["examples"] + stats.examples,
            )
            if main:
                self._log(epoch, stats, valid_metric, improved)
            self._checkpoint(state)
            epoch += 1

        distributed.barrier(self.world)
        self.model.load_state_dict(load_file(str(self.directory / BEST_WEIGHTS)))
        self.model.eval()
        return StageResult(
            best_epoch=state["best_epoch"],
            best_valid=state["best_valid"],
            epochs_run=state["epoch"] + 1,
            seconds=state["seconds"],
            examples_per_second=state["examples"] / max(state["seconds"], 1e-9),
        )

    def gather_weights(self) -> None:
        """Bring the whole, current weights into ``model`` and the adapters on every rank."""
        if self.world.distributed:
            self.objective.load_state_dict(
                distributed.gather_state(self.trained.state_dict(), self.world)
            )

    def _validate(self) -> float:
        metric = None
        if self.world.is_main:
            self.model.eval()
            valid = evaluate(
                self.model, self.store, "valid", full_ranking=False, name=self.spec.name
            )
            metric = float(valid[SELECTION_METRIC].mean())
        return distributed.broadcast_json(metric, self.world)

    def _log(self, epoch: int, stats: EpochStats, valid_metric: float, improved: bool) -> None:
        record = {
            "stage": self.spec.name,
            "epoch": epoch,
            "train_loss": stats.loss_sum / stats.examples,
            f"valid_{SELECTION_METRIC}": valid_metric,
            "best": improved,
            "seconds": stats.seconds,
            "examples_per_second": stats.examples / stats.seconds,
        }
        with (self.directory / LOG).open("a") as log:
            log.write(json.dumps(record) + "\n")
        tqdm.write(
            f"{self.spec.name} epoch {epoch}: loss {record['train_loss']:.4f}  "
            f"valid {SELECTION_METRIC} {valid_metric:.4f}{'  *' if improved else ''}",
            file=sys.stderr,
        )

    def _save_best(self) -> None:
        weights = {k: v.detach().clone().contiguous() for k, v in self.model.state_dict().items()}
        atomic_write(self.directory / BEST_WEIGHTS, lambda path: save_file(weights, str(path)))

    def _checkpoint(self, state: dict[str, Any]) -> None:
        """Whole tensors only, keyed by name, so that any world size can resume from it.

        ``optimizer`` holds Adam's state per parameter name; ``embedding_optimizer`` the
        fused kernel's state of sharded tables (empty in a single process, where Adam
        updates the tables too).
        """
        embedding_optimizer = {}
        if self.world.distributed:
            embedding_optimizer = distributed.gather_state(
                distributed.fused_optimizer_state(self.trained), self.world
            )
        if not self.world.is_main:
            return
        adam = self.optimizer.state_dict()["state"]
        payload = {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "adapters": self.adapters.state_dict(),
            "optimizer": {
                name: adam[i] for i, name in enumerate(self.adam_parameters) if i in adam
            },
            "embedding_optimizer": embedding_optimizer,
            "state": state,
            "spec": json.dumps(dataclasses.asdict(self.spec)),
        }
        atomic_write(self.directory / CHECKPOINT, lambda path: torch.save(payload, path))

    def _restore(self) -> dict[str, Any] | None:
        """Load the checkpoint, if any, into this process's share of the model.

        Optimizer state is matched by parameter name: state that this world size's
        optimizers do not hold (the tables' Adam state when resuming a single-process run
        under torchrun, or the fused kernel's state the other way round) starts afresh.
        """
        path = self.directory / CHECKPOINT
        if not path.exists():
            return None
        payload = torch.load(path, weights_only=True, map_location="cpu")
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{path} was written by another version of recdistill; start a fresh run directory"
            )
        saved, current = json.loads(payload["spec"]), dataclasses.asdict(self.spec)
        if _fixed_on_resume(saved) != _fixed_on_resume(current):
            raise ValueError(
                f"{path} was written for a different stage spec (a resume may change only "
                f"{', '.join(RESUMABLE_CHANGES)}); start a fresh run directory"
            )
        changed = [key for key in RESUMABLE_CHANGES if saved[key] != current[key]]
        if changed and self.world.is_main:
            tqdm.write(
                f"{self.spec.name}: resuming after epoch {payload['state']['epoch']} with "
                + ", ".join(f"{key} {current[key]} (was {saved[key]})" for key in changed),
                file=sys.stderr,
            )
        self.model.load_state_dict(payload["model"])
        self.adapters.load_state_dict(payload["adapters"])
        if self.world.distributed:
            distributed.load_state(self.trained.state_dict(), self.objective.state_dict())
            saved = payload["embedding_optimizer"]
            fused = distributed.fused_optimizer_state(self.trained)
            distributed.load_state({k: v for k, v in fused.items() if k in saved}, saved)
        adam = self.optimizer.state_dict()
        adam["state"] = {
            i: payload["optimizer"][name]
            for i, name in enumerate(self.adam_parameters)
            if name in payload["optimizer"]
        }
        self.optimizer.load_state_dict(adam)
        state = payload["state"]
        if self.world.is_main:
            # A run killed after logging an epoch but before checkpointing it logs it again.
            log = self.directory / LOG
            records = [json.loads(line) for line in log.read_text().splitlines()]
            kept = [r for r in records if r["epoch"] <= state["epoch"]]
            log.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return state


def _fixed_on_resume(spec: dict[str, Any]) -> str:
    """The spec's fields a resume must keep, as JSON (tuples and lists compare equal)."""
    return json.dumps({k: v for k, v in spec.items() if k not in RESUMABLE_CHANGES})


def _seed_of(*numbers: int) -> int:
    return int(np.random.SeedSequence(list(numbers)).generate_state(1)[0])


def _all_rows(values: torch.Tensor) -> torch.Tensor:
    return torch.ones(values.shape[0], dtype=torch.bool)


def atomic_write(path: Path, write) -> None:
    scratch = path.with_name(path.name + ".partial")
    write(scratch)
    os.replace(scratch, path)
