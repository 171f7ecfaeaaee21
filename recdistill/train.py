"""One training stage: a model learns from labels and/or frozen teachers.

Read top to bottom: the stage's spec, then :class:`Trainer`, whose :meth:`Trainer.fit` runs
epochs of (score lists → weighted loss → step), evaluates validation NDCG@10 after each
epoch, checkpoints, and stops early. ``fit`` resumes from the checkpoint when asked and then
continues to the same result as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from recdistill.data.batches import FeatureStore, RankingBatch, TrainLists
from recdistill.evaluate import evaluate
from recdistill.losses import LOSSES
from recdistill.models import TwoTower

LABELS = "labels"
SELECTION_METRIC = "ndcg@10"
CHECKPOINT = "checkpoint.pt"
BEST_WEIGHTS = "model.safetensors"
LOG = "log.jsonl"


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
    weight_decay: float = 0.0
    seed: int = 0

    @property
    def teachers(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(t.source for t in self.losses if t.source != LABELS))


@dataclass
class StageResult:
    best_epoch: int
    best_valid: float
    epochs_run: int
    seconds: float
    examples_per_second: float


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
        self.teachers = teachers
        self.store = store
        self.directory = Path(directory)
        for teacher in teachers.values():
            teacher.eval()
            teacher.requires_grad_(False)
        # A frozen teacher's item vectors never change: compute them once for the catalogue.
        with torch.no_grad():
            catalogue = store.catalogue()
            self.teacher_items = {
                name: teacher.item_tower(catalogue) for name, teacher in teachers.items()
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
        self.optimizer = torch.optim.Adam(
            [*model.parameters(), *self.adapters.parameters()],
            lr=spec.learning_rate,
            weight_decay=spec.weight_decay,
        )
        self.lists = TrainLists(
            store, batch_size=spec.batch_size, negatives=spec.negatives, seed=spec.seed
        )

    def loss(self, batch: RankingBatch) -> torch.Tensor:
        users, items = self.model.towers(batch)
        scores = self.model.score(users, items, batch)
        teacher_outputs = {}
        with torch.no_grad():
            item_ids = batch.items["item_id"].values()
            for name, teacher in self.teachers.items():
                t_users = teacher.user_tower(batch.users)
                t_items = self.teacher_items[name][item_ids]
                teacher_outputs[name] = (t_users, t_items, teacher.score(t_users, t_items, batch))
        total = scores.new_zeros(())
        for term in self.spec.losses:
            fn = LOSSES[term.fn]
            if term.fn == "feature_mse":
                t_users, t_items, _ = teacher_outputs[term.source]
                adapter = self.adapters[term.source]
                value = 0.5 * (
                    fn(adapter(users), t_users, mask=_all_rows(users), **term.options)
                    + fn(adapter(items), t_items, mask=_all_rows(items), **term.options)
                )
            else:
                target = batch.labels if term.source == LABELS else teacher_outputs[term.source][2]
                value = fn(scores, target, mask=batch.mask, **term.options)
            total = total + term.weight * value
        return total

    def fit(self, *, resume: bool = False) -> StageResult:
        spec = self.spec
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
            (self.directory / LOG).write_text("")
        epoch = state["epoch"] + 1
        while epoch < spec.epochs and state["stale"] < spec.patience:
            started = time.perf_counter()
            self.model.train()
            examples, loss_sum = 0, 0.0
            progress = tqdm(
                self.lists.epoch(epoch),
                total=len(self.lists),
                desc=f"{spec.name} epoch {epoch}",
                unit="batch",
                leave=False,
                disable=None,
            )
            for batch in progress:
                loss = self.loss(batch)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                examples += len(batch.labels)
                loss_sum += loss.item() * len(batch.labels)
                progress.set_postfix(loss=f"{loss.item():.4f}")
            train_seconds = time.perf_counter() - started

            self.model.eval()
            valid = evaluate(self.model, self.store, "valid", full_ranking=False)
            valid_metric = float(valid[SELECTION_METRIC].mean())
            improved = valid_metric > state["best_valid"]
            if improved:
                state.update(best_valid=valid_metric, best_epoch=epoch, stale=0)
                self._save_best()
            else:
                state["stale"] += 1
            state.update(
                epoch=epoch,
                seconds=state["seconds"] + train_seconds,
                examples=state["examples"] + examples,
            )
            record = {
                "stage": spec.name,
                "epoch": epoch,
                "train_loss": loss_sum / examples,
                f"valid_{SELECTION_METRIC}": valid_metric,
                "best": improved,
                "seconds": train_seconds,
                "examples_per_second": examples / train_seconds,
            }
            with (self.directory / LOG).open("a") as log:
                log.write(json.dumps(record) + "\n")
            tqdm.write(
                f"{spec.name} epoch {epoch}: loss {record['train_loss']:.4f}  "
                f"valid {SELECTION_METRIC} {valid_metric:.4f}{'  *' if improved else ''}",
                file=sys.stderr,
            )
            self._checkpoint(state)
            epoch += 1

        self.model.load_state_dict(load_file(str(self.directory / BEST_WEIGHTS)))
        self.model.eval()
        return StageResult(
            best_epoch=state["best_epoch"],
            best_valid=state["best_valid"],
            epochs_run=state["epoch"] + 1,
            seconds=state["seconds"],
            examples_per_second=state["examples"] / max(state["seconds"], 1e-9),
        )

    def _save_best(self) -> None:
        weights = {k: v.detach().clone().contiguous() for k, v in self.model.state_dict().items()}
        atomic_write(self.directory / BEST_WEIGHTS, lambda path: save_file(weights, str(path)))

    def _checkpoint(self, state: dict[str, Any]) -> None:
        payload = {
            "model": self.model.state_dict(),
            "adapters": self.adapters.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "state": state,
            "spec": json.dumps(dataclasses.asdict(self.spec)),
        }
        atomic_write(self.directory / CHECKPOINT, lambda path: torch.save(payload, path))

    def _restore(self) -> dict[str, Any] | None:
        path = self.directory / CHECKPOINT
        if not path.exists():
            return None
        payload = torch.load(path, weights_only=True)
        if payload["spec"] != json.dumps(dataclasses.asdict(self.spec)):
            raise ValueError(
                f"{path} was written for a different stage spec; start a fresh run directory"
            )
        self.model.load_state_dict(payload["model"])
        self.adapters.load_state_dict(payload["adapters"])
        self.optimizer.load_state_dict(payload["optimizer"])
        torch.set_rng_state(payload["torch_rng"])
        return payload["state"]


def _all_rows(values: torch.Tensor) -> torch.Tensor:
    return torch.ones(values.shape[0], dtype=torch.bool)


def atomic_write(path: Path, write) -> None:
    scratch = path.with_name(path.name + ".partial")
    write(scratch)
    os.replace(scratch, path)
