"""One training stage: a model learns from labels and/or frozen teachers.

The stage's spec is :class:`~recdistill.stage.StageSpec`, its loss one module
(:class:`~recdistill.objective.StageObjective`), its checkpoint :mod:`recdistill.checkpoint`.
Read top to bottom: :class:`Trainer` sets the stage up in named steps (the objective, which
holds the model and its adapters; the frozen teachers, one :class:`StageTeachers`; this
process's :class:`~recdistill.distributed.Replica`; the optimizers; the batches), then
:meth:`Trainer.fit` runs epochs of (score lists → weighted loss → step), evaluates NDCG@10 on
the validation lists and on full ranking after each epoch, keeps the best epoch's weights,
checkpoints its :class:`TrainState`, and stops early on the stage's ``valid_metric``. ``fit``
resumes from the checkpoint when asked and then continues to the same result as an
uninterrupted run. A non-finite loss or gradient stops the stage before its step
(:class:`TrainingDiverged`), leaving the last epoch's checkpoint as it was: resumed with a
lower learning rate (the one change a resume accepts), the stage continues from there.

Under ``torchrun`` the same code trains on every rank: the replica wraps the objective in
torchrec's DistributedModelParallel (tables sharded, the rest data-parallel), each rank takes
its own share of every epoch's batches, rank 0 alone evaluates and writes, and checkpoints
hold whole tensors, so a run resumes at any world size. Frozen teachers stay whole on every
rank.
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
from recdistill.errors import TrainingDiverged
from recdistill.evaluate import evaluate
from recdistill.files import atomic_write
from recdistill.layout import StageLayout
from recdistill.models import TwoTower
from recdistill.objective import StageObjective
from recdistill.ranked_lists import rrd_lists
from recdistill.stage import VALID_METRICS, StageSpec
from recdistill.teachers import DistillationLists, Teacher, TeacherOutputs


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
    checkpoint and best weights in ``directory``. Stages are trained through
    :func:`recdistill.recipe.train_stage`, which seeds the stage, builds its model and records
    its spec before it calls this::

        store = FeatureStore(Path("data/synthetic"))
        model = TwoTower(TwoTowerSpec(embedding_dim=8, tower=(16,)), FeatureSpace.of(store))
        spec = StageSpec("small", "tiny", (LossTerm("listnet", source="big"),))
        teachers = {"big": FrozenTeacher("big", big, store, cache=Path("runs/x/big"))}
        result = Trainer(spec, model, teachers, store, Path("runs/x/small")).fit()
        result.best_epoch, result.best_valid  # the epoch kept and its validation NDCG@10
    """

    def __init__(
        self,
        spec: StageSpec,
        model: TwoTower,
        teachers: dict[str, Teacher],
        store: FeatureStore,
        directory: Path,
        *,
        place: str = "",
    ) -> None:
        self.spec = spec
        self.model = model
        self.store = store
        # Where the stage stands in its run ("stage 2 of 4"), shown with its progress.
        self.place = place
        self.layout = StageLayout(Path(directory))
        self.replica = distributed.replica(distributed.world())
        self.objective = _stage_objective(spec, model, teachers, store)
        self.teachers = StageTeachers(spec, teachers, store)
        # ``model`` stays whole, for evaluation on rank 0 and as a teacher of later stages.
        self.trained = self.replica.wrap(
            self.objective,
            learning_rate=spec.learning_rate,
            adagrad_learning_rate=spec.table_adagrad_learning_rate,
            weight_decay=spec.weight_decay,
        )
        self.adam_parameters, self.optimizer = _adam(self.trained, spec)
        self.lists = _training_lists(spec, model, store, self.replica.world)
        # Batches of an epoch over every rank: global batch k runs from 0 to this.
        self.epoch_batches = len(self.lists) * self.replica.world.size

    def fit(self, *, resume: bool = False) -> StageResult:
        """Train until the stage's last epoch or its patience runs out, from the stage's
        checkpoint if ``resume`` and there is one."""
        spec = self.spec
        self.layout.root.mkdir(parents=True, exist_ok=True)
        state = self._start(resume)
        epoch = first = state.epoch + 1
        started = time.perf_counter()
        while epoch < spec.epochs and state.stale < spec.patience:
            stats = self.train_epoch(epoch)
            self.gather_weights()
            metrics = self._validate()
            improved = state.end_epoch(epoch, stats, metrics, spec.valid_metric)
            if self.replica.is_main:
                per_epoch = (time.perf_counter() - started) / (epoch + 1 - first)
                self._write_epoch(epoch, stats, metrics, improved)
                self._write_progress(epoch, per_epoch, started)
            self._checkpoint(state)
            epoch += 1

        self.replica.barrier()
        self.model.load_state_dict(load_file(str(self.layout.weights)))
        self.model.eval()
        return state.result()

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
            desc=f"{self.place and self.place + ': '}{self.spec.name} epoch {epoch}",
            unit="batch",
            leave=False,
            disable=None if self.replica.is_main else True,
        )
        examples, loss_sum = 0, 0.0
        for index, batch in enumerate(progress):
            loss = self.loss(batch, epoch, self.replica.global_batch(index))
            self._step(loss, epoch, index)
            examples += batch.examples
            loss_sum += loss.item() * batch.examples
            # Shown at the bar's next timed refresh (at most 10 a second), not drawn anew
            # for every batch: a terminal redrawing per batch competes for the cores.
            progress.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        examples, loss_sum = self.replica.all_sum([examples, loss_sum])
        return EpochStats(int(examples), loss_sum, time.perf_counter() - started)

    def loss(self, batch: RankingBatch | SequenceBatch, epoch: int, k: int) -> torch.Tensor:
        """The stage's loss on ``batch``, global batch ``k`` of ``epoch``."""
        device = self.replica.world.device
        batch = batch.to(device)
        answers = self.teachers.answer(batch, epoch, k, self.epoch_batches)
        with torch.autocast(device.type, torch.bfloat16, enabled=self.spec.precision == "bf16"):
            return self.trained(batch, *answers)

    def _step(self, loss: torch.Tensor, epoch: int, index: int) -> None:
        """Step on ``loss``, this rank's batch ``index`` of ``epoch``, at the learning rate of
        the step's place in the stage."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._stop_if_diverged(loss, epoch, index)
        if self.spec.clip_norm is not None:
            nn.utils.clip_grad_norm_(self.adam_parameters.values(), self.spec.clip_norm)
        rate = self.spec.learning_rate_at(epoch + (index + 1) / len(self.lists))
        for group in self.optimizer.param_groups:
            group["lr"] = rate
        self.optimizer.step()

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

    def _write_epoch(
        self, epoch: int, stats: EpochStats, metrics: dict[str, float], improved: bool
    ) -> None:
        """Keep the weights if ``improved``, and log the epoch."""
        if improved:
            weights = {
                k: v.detach().to("cpu", copy=True).contiguous()
                for k, v in self.model.state_dict().items()
            }
            atomic_write(self.layout.weights, lambda path: save_file(weights, str(path)))
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

    def _write_progress(self, epoch: int, per_epoch: float, started: float) -> None:
        """Where the run stands: the stage's place, its epochs done, its time so far and the
        most it has left (every remaining epoch run; early stopping may cut it short)."""
        left = (self.spec.epochs - epoch - 1) * per_epoch
        place = f"{self.place}, " if self.place else ""
        tqdm.write(
            f"  {place}{self.spec.name}: {epoch + 1} of {self.spec.epochs} epochs done, "
            f"{duration(time.perf_counter() - started)} so far, at most {duration(left)} left",
            file=sys.stderr,
        )

    def _start(self, resume: bool) -> TrainState:
        """The checkpoint's state if ``resume`` and there is one, else a fresh state and log."""
        state = self._restore() if resume else None
        if state is None:
            state = TrainState()
            if self.replica.is_main:
                self.layout.log.write_text("")
        return state

    def _checkpoint(self, state: TrainState) -> None:
        fused_state = self.replica.gather_fused_state(self.trained)
        if not self.replica.is_main:
            return
        adam = self.optimizer.state_dict()["state"]
        save_checkpoint(
            self.layout.checkpoint,
            self.spec,
            model=self.model.state_dict(),
            adapters=self.objective.adapters.state_dict(),
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
        self.objective.adapters.load_state_dict(payload["adapters"])
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


class StageTeachers:
    """The frozen teachers a stage learns from, asked together about each batch."""

    def __init__(self, spec: StageSpec, teachers: dict[str, Teacher], store: FeatureStore):
        self.teachers = teachers
        self.store = store
        self.list_spec = spec.lists
        self.ranked_sources = () if spec.lists is None else spec.ranked_sources
        self.seed = spec.seed

    def answer(
        self, batch: RankingBatch | SequenceBatch, epoch: int, k: int, batches: int
    ) -> tuple[dict[str, TeacherOutputs], dict[str, DistillationLists]]:
        """Every teacher's outputs on ``batch``, global batch ``k`` of an epoch of
        ``batches``, and the lists of its own a teacher brings: teacher-ranked lists of the
        teachers the stage draws lists from, or a log's requests. Each teacher's lists are
        drawn from a generator seeded by the stage's seed, ``epoch`` and ``k``, so a resumed
        or sharded run draws the same ones."""
        outputs: dict[str, TeacherOutputs] = {}
        lists: dict[str, DistillationLists] = {}
        for name, teacher in self.teachers.items():
            own = teacher.own_lists(epoch, k, batches)
            if own is not None:
                lists[name] = own
                continue
            users = teacher.users(batch)
            outputs[name] = teacher.outputs(batch, users)
            if name in self.ranked_sources:
                rng = np.random.default_rng([self.seed, epoch, k, 1])
                lists[name] = rrd_lists(batch, users, teacher, self.store, self.list_spec, rng)
        return outputs, lists


def _stage_objective(
    spec: StageSpec, model: TwoTower, teachers: dict[str, Teacher], store: FeatureStore
) -> StageObjective:
    """The stage's weighted loss around ``model`` and its feature-distillation adapters,
    which map the model's tower outputs into each teacher's space: they are trained with
    the stage and are not part of the model."""
    adapters = nn.ModuleDict(
        {
            term.source: nn.Linear(model.output_dim, teachers[term.source].output_dim)
            for term in spec.losses
            if term.fn == "feature_mse"
        }
    )
    # the catalogue's real items: item 0 stands for an unknown one
    items = len(store.items) - 1
    return StageObjective(model, adapters, spec.losses_for(items))


def _adam(trained: nn.Module, spec: StageSpec) -> tuple[dict[str, nn.Parameter], torch.optim.Adam]:
    """The parameters Adam updates, by name, and Adam: sharded tables are updated by their
    fused kernel in the backward pass, Adam updates everything else."""
    parameters = dict(in_backward_optimizer_filter(trained.named_parameters()))
    optimizer = torch.optim.Adam(
        parameters.values(), lr=spec.learning_rate, weight_decay=spec.weight_decay
    )
    return parameters, optimizer


def _training_lists(
    spec: StageSpec, model: TwoTower, store: FeatureStore, world: distributed.World
) -> TrainLists | TrainSequences:
    """This rank's share of every epoch's batches: next-item windows or ranking lists."""
    sharing = {
        "batch_size": spec.batch_size,
        "negatives": spec.negatives,
        "seed": spec.seed,
        "rank": world.rank,
        "world_size": world.size,
    }
    if spec.objective != "next_item":
        return TrainLists(store, **sharing)
    if not model.spec.is_sequence:
        raise ValueError(f"[stages.{spec.name}]: next_item needs a sequence user encoder")
    return TrainSequences(
        store, max_length=model.spec.max_length, all_items=spec.scored_items == "all", **sharing
    )


def duration(seconds: float) -> str:
    """``1 h 02 min``, ``12 min 31 s``, ``42 s`` or, for a time short of half a second that
    is not nothing, ``under 1 s``."""
    if 0 < seconds < 0.5:
        return "under 1 s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours} h {minutes:02d} min"
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _seed_of(*numbers: int) -> int:
    return int(np.random.SeedSequence(list(numbers)).generate_state(1)[0])
