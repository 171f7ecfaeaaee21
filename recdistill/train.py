"""One training stage: a model learns from labels and/or frozen teachers.

The stage's spec is :class:`~recdistill.stage.StageSpec`, its loss one module
(:class:`~recdistill.objective.StageObjective`), its checkpoint :mod:`recdistill.checkpoint`.
Read top to bottom: :class:`Trainer`, whose :meth:`Trainer.fit` runs epochs of
(score lists → weighted loss → step), evaluates NDCG@10 on the validation lists and on full
ranking after each epoch, checkpoints, and stops early on the stage's ``valid_metric``. ``fit`` resumes from the checkpoint when asked and then
continues to the same result as an uninterrupted run. A non-finite loss or gradient stops
the stage before its step (:class:`TrainingDiverged`), leaving the last epoch's checkpoint
as it was: resumed with a lower learning rate (the one change a resume accepts), the stage
continues from there.

Under ``torchrun`` the same code trains on every rank: the trainer's
:class:`~recdistill.distributed.Replica` wraps the objective in torchrec's
DistributedModelParallel (tables sharded, the rest data-parallel), each rank takes its own
share of every epoch's batches, rank 0 alone evaluates and writes, and checkpoints hold whole
tensors, so a run resumes at any world size. Frozen teachers stay whole on every rank.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torchrec.optim.optimizers import in_backward_optimizer_filter
from tqdm import tqdm

from recdistill import distributed
from recdistill.checkpoint import load_checkpoint, save_checkpoint, trim_log
from recdistill.data.batches import TrainLists, TrainSequences
from recdistill.data.feature_store import FeatureStore, RankingBatch, SequenceBatch
from recdistill.data.tables import atomic_write
from recdistill.errors import TrainingDiverged
from recdistill.evaluate import evaluate
from recdistill.layout import StageLayout
from recdistill.models import TwoTower
from recdistill.objective import StageObjective
from recdistill.ranked_lists import rrd_lists
from recdistill.stage import VALID_METRICS, StageSpec
from recdistill.teachers import Teacher, TeacherOutputs


@dataclass
class StageResult:
    """How a stage went: ``best_valid`` is the stage's ``valid_metric`` at ``best_epoch``,
    ``valid`` every validation metric at that epoch."""

    best_epoch: int
    best_valid: float
    valid: dict[str, float]
    epochs_run: int
    seconds: float
    examples_per_second: float


@dataclass
class EpochStats:
    """One epoch's training, summed over every rank."""

    examples: int
    loss_sum: float
    seconds: float


@dataclass
class TrainState:
    """Where a stage stands after its last finished epoch, ``epoch`` (-1 before the first):
    its best epoch so far and that epoch's validation metrics, the epochs since then
    (``stale``), and the seconds and examples trained. A checkpoint holds it as a dict."""

    epoch: int = -1
    best_valid: float = -math.inf
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_epoch: int = -1
    stale: int = 0
    seconds: float = 0.0
    examples: int = 0

    def end_epoch(
        self, epoch: int, stats: EpochStats, metrics: dict[str, float], valid_metric: str
    ) -> bool:
        """Count epoch ``epoch`` in; whether its ``valid_metric`` is the best so far."""
        improved = metrics[valid_metric] > self.best_valid
        if improved:
            self.best_valid, self.best_metrics = metrics[valid_metric], metrics
            self.best_epoch, self.stale = epoch, 0
        else:
            self.stale += 1
        self.epoch = epoch
        self.seconds += stats.seconds
        self.examples += stats.examples
        return improved

    def result(self) -> StageResult:
        return StageResult(
            best_epoch=self.best_epoch,
            best_valid=self.best_valid,
            valid=self.best_metrics,
            epochs_run=self.epoch + 1,
            seconds=self.seconds,
            examples_per_second=self.examples / max(self.seconds, 1e-9),
        )


class Trainer:
    """Trains ``model`` for one stage, on labels and/or the frozen ``teachers``' scores.

    :meth:`fit` leaves the best validation epoch's weights in ``model`` and the stage's log,
    checkpoint and best weights in ``directory``. ``recdistill.pipeline.run`` trains each
    stage of a config this way::

        store = FeatureStore(Path("data/synthetic"))
        space = FeatureSpace(store.user_features, store.cardinalities())
        student = TwoTower(TwoTowerSpec(embedding_dim=8, tower=(16,)), space)
        spec = StageSpec("student", "small", (LossTerm("listnet", source="teacher"),))
        teachers = {"teacher": FrozenTeacher("teacher", teacher, store, cache=Path("runs/x/teacher"))}
        result = Trainer(spec, student, teachers, store, Path("runs/x/student")).fit()
        result.best_epoch, result.best_valid  # the epoch kept and its validation NDCG@10
    """

    def __init__(
        self,
        spec: StageSpec,
        model: TwoTower,
        teachers: dict[str, Teacher],
        store: FeatureStore,
        directory: Path,
    ) -> None:
        self.spec = spec
        self.model = model
        self.store = store
        self.teachers = teachers
        self.layout = StageLayout(Path(directory))
        self.replica = distributed.replica(distributed.world())
        # Feature distillation maps the student's tower outputs into each teacher's space;
        # the adapters are trained with the stage and are not part of the model.
        self.adapters = nn.ModuleDict(
            {
                term.source: nn.Linear(model.output_dim, teachers[term.source].output_dim)
                for term in spec.losses
                if term.fn == "feature_mse"
            }
        )
        # the catalogue's real items: item 0 stands for an unknown one
        items = len(store.items) - 1
        self.objective = StageObjective(model, self.adapters, spec.losses_for(items))
        # ``model`` stays whole, for evaluation on rank 0 and as a teacher of later stages.
        self.trained = self.replica.wrap(
            self.objective,
            learning_rate=spec.learning_rate,
            adagrad_learning_rate=spec.table_adagrad_learning_rate,
            weight_decay=spec.weight_decay,
        )
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
            "rank": self.replica.world.rank,
            "world_size": self.replica.world.size,
        }
        if spec.objective == "next_item":
            if not model.spec.is_sequence:
                raise ValueError(f"[stages.{spec.name}]: next_item needs a sequence user encoder")
            self.lists = TrainSequences(
                store,
                max_length=model.spec.max_length,
                all_items=spec.scored_items == "all",
                **sharing,
            )
        else:
            self.lists = TrainLists(store, **sharing)

    def loss(self, batch: RankingBatch | SequenceBatch, epoch: int, k: int) -> torch.Tensor:
        """The stage's loss on ``batch``, global batch ``k`` of ``epoch``: its teacher-ranked
        lists are drawn from a generator seeded by both, so a resumed or sharded run draws
        the same ones."""
        batch = batch.to(self.replica.world.device)
        outputs: dict[str, TeacherOutputs] = {}
        ranked: dict[str, tuple[RankingBatch, torch.Tensor]] = {}
        for name, teacher in self.teachers.items():
            users = teacher.users(batch)
            outputs[name] = teacher.outputs(batch, users)
            if self.spec.lists is not None and name in self.spec.ranked_sources:
                rng = np.random.default_rng([self.spec.seed, epoch, k, 1])
                ranked[name] = rrd_lists(batch, users, teacher, self.store, self.spec.lists, rng)
        return self.trained(batch, outputs, ranked)

    def train_epoch(self, epoch: int, *, max_batches: int | None = None) -> EpochStats:
        """Train on epoch ``epoch``'s batches (only the first ``max_batches``, if given)."""
        # Dropout draws from a generator seeded by epoch and rank, so that resuming at an
        # epoch boundary replays it without the previous process's generator state.
        torch.manual_seed(_seed_of(self.spec.seed, epoch, self.replica.world.rank))
        self.trained.train()
        started = time.perf_counter()
        batches = len(self.lists) if max_batches is None else min(max_batches, len(self.lists))
        progress = tqdm(
            itertools.islice(self.lists.epoch(epoch), batches),
            total=batches,
            desc=f"{self.spec.name} epoch {epoch}",
            unit="batch",
            leave=False,
            disable=None if self.replica.is_main else True,
        )
        examples, loss_sum = 0, 0.0
        for index, batch in enumerate(progress):
            loss = self.loss(batch, epoch, self.replica.global_batch(index))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._stop_if_diverged(loss, epoch, index)
            if self.spec.clip_norm is not None:
                nn.utils.clip_grad_norm_(self.adam_parameters.values(), self.spec.clip_norm)
            rate = self.spec.learning_rate_at(epoch + (index + 1) / len(self.lists))
            for group in self.optimizer.param_groups:
                group["lr"] = rate
            self.optimizer.step()
            examples += batch.examples
            loss_sum += loss.item() * batch.examples
            progress.set_postfix(loss=f"{loss.item():.4f}")
        examples, loss_sum = self.replica.all_sum([examples, loss_sum])
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
        if not any(self.replica.all_sum([float(bad_loss), float(bad_gradients)])):
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
        spec, main = self.spec, self.replica.is_main
        self.layout.root.mkdir(parents=True, exist_ok=True)
        state = self._restore() if resume else None
        if state is None:
            state = TrainState()
            if main:
                self.layout.log.write_text("")
        epoch = state.epoch + 1
        while epoch < spec.epochs and state.stale < spec.patience:
            stats = self.train_epoch(epoch)
            self.gather_weights()
            metrics = self._validate()
            improved = state.end_epoch(epoch, stats, metrics, spec.valid_metric)
            if main:
                if improved:
                    self._save_best()
                self._log(epoch, stats, metrics, improved)
            self._checkpoint(state)
            epoch += 1

        self.replica.barrier()
        self.model.load_state_dict(load_file(str(self.layout.weights)))
        self.model.eval()
        return state.result()

    def gather_weights(self) -> None:
        """Bring the whole, current weights into ``model`` and the adapters on every rank."""
        self.replica.gather_weights(self.trained, self.objective)

    def _validate(self) -> dict[str, float]:
        """Every validation metric a stage may select on (``VALID_METRICS``), by mean,
        evaluated on rank 0."""
        return self.replica.from_main(self._evaluate)

    def _evaluate(self) -> dict[str, float]:
        self.model.eval()
        valid = evaluate(self.model, self.store, "valid", name=self.spec.name)
        return {name: float(valid[name].mean()) for name in VALID_METRICS}

    def _log(
        self, epoch: int, stats: EpochStats, metrics: dict[str, float], improved: bool
    ) -> None:
        record = {
            "stage": self.spec.name,
            "epoch": epoch,
            "train_loss": stats.loss_sum / stats.examples,
            **{f"valid_{name}": value for name, value in metrics.items()},
            "best": improved,
            "seconds": stats.seconds,
            "examples_per_second": stats.examples / stats.seconds,
        }
        with self.layout.log.open("a") as log:
            log.write(json.dumps(record) + "\n")
        shown = "  ".join(
            f"{name} {value:.4f}{'*' if improved and name == self.spec.valid_metric else ''}"
            for name, value in metrics.items()
        )
        tqdm.write(
            f"{self.spec.name} epoch {epoch}: loss {record['train_loss']:.4f}  valid {shown}",
            file=sys.stderr,
        )

    def _save_best(self) -> None:
        weights = {k: v.detach().clone().contiguous() for k, v in self.model.state_dict().items()}
        atomic_write(self.layout.weights, lambda path: save_file(weights, str(path)))

    def _checkpoint(self, state: TrainState) -> None:
        fused_state = self.replica.gather_fused_state(self.trained)
        if not self.replica.is_main:
            return
        adam = self.optimizer.state_dict()["state"]
        save_checkpoint(
            self.layout.checkpoint,
            self.spec,
            model=self.model.state_dict(),
            adapters=self.adapters.state_dict(),
            optimizer={name: adam[i] for i, name in enumerate(self.adam_parameters) if i in adam},
            embedding_optimizer=fused_state,
            state=dataclasses.asdict(state),
        )

    def _restore(self) -> TrainState | None:
        """Load the checkpoint, if any, into this process's share of the model.

        Optimizer state is matched by parameter name: state that this world size's
        optimizers do not hold (the tables' Adam state when resuming a single-process run
        under torchrun, or the fused kernel's state the other way round) starts afresh.
        """
        payload = load_checkpoint(self.layout.checkpoint, self.spec, announce=self.replica.is_main)
        if payload is None:
            return None
        self.model.load_state_dict(payload["model"])
        self.adapters.load_state_dict(payload["adapters"])
        self.replica.restore(self.trained, self.objective, payload["embedding_optimizer"])
        adam = self.optimizer.state_dict()
        adam["state"] = {
            i: payload["optimizer"][name]
            for i, name in enumerate(self.adam_parameters)
            if name in payload["optimizer"]
        }
        self.optimizer.load_state_dict(adam)
        state = TrainState(**payload["state"])
        if self.replica.is_main:
            trim_log(self.layout.log, state.epoch)
        return state


def _seed_of(*numbers: int) -> int:
    return int(np.random.SeedSequence(list(numbers)).generate_state(1)[0])
