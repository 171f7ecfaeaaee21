"""Experiment tracking with MLflow: off unless ``[tracking] enabled = true`` or ``--track``.

``recdistill train`` logs one MLflow run per run directory: its config flattened as params
(``stages.student.epochs``, ...) and ``config.toml`` as an artifact, and a child run per
stage, logged as the stage finishes (the stage's spec and its model's as params, its epoch
log as metrics at step = epoch). Once the run is scored, each stage's test metrics join its
child run, and ``summary.json`` and the report (if ``recdistill report`` made one) the
parent's artifacts. ``recdistill sweep`` logs one run per sweep, with a child run per
candidate.

A run directory records its MLflow run in ``tracking.json`` (:class:`TrackingRecord`):
``--resume`` continues that run, and ``recdistill report`` adds its files to it. Only rank 0
logs under ``torchrun``. MLflow is imported only when tracking is on; it is the optional extra
``recdistill[tracking]``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from recdistill import distributed
from recdistill.errors import MissingExtra
from recdistill.files import atomic_write, write_json
from recdistill.layout import RunLayout, StageLayout

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from recdistill.models import TwoTowerSpec
    from recdistill.stage import StageSpec
    from recdistill.summary import CandidateResult, RunSummary, SweepSummary

# The store when neither the config nor MLFLOW_TRACKING_URI names one: MLflow's file store in
# ./mlruns. MLflow's own default is sqlite:///mlflow.db, which needs SQLAlchemy, and
# mlflow-skinny (the extra recdistill[tracking]) has none; the file store needs nothing more.
DEFAULT_STORE = "mlruns"
PARENT_TAG = "mlflow.parentRunId"
# The absolute path of the run (or sweep) directory a parent run logs.
DIRECTORY_TAG = "recdistill.directory"


@dataclass(frozen=True)
class TrackingSpec:
    """``[tracking]``: whether ``recdistill train`` and ``recdistill sweep`` log to MLflow,
    to which store (``uri``; empty: ``$MLFLOW_TRACKING_URI``, else ``./mlruns``) and under
    which experiment."""

    enabled: bool = False
    uri: str = ""
    experiment: str = "recdistill"

    def __post_init__(self) -> None:
        # A string would be truthy: `enabled = "false"` must not turn tracking on.
        if self.enabled not in (True, False):
            raise ValueError(f"[tracking] enabled = {self.enabled!r}: use true or false")
        if not self.experiment:
            raise ValueError("[tracking] experiment must name an MLflow experiment")


@dataclass(frozen=True)
class TrackingRecord:
    """``tracking.json``: the MLflow run a run (or sweep) directory is logged to, and where."""

    uri: str
    run_id: str

    def describe(self) -> str:
        """Where the run went, and how to look at it."""
        ui = f"mlflow ui --backend-store-uri {self.uri}"
        return f"MLflow run {self.run_id} in {self.uri} (to browse it: {ui})"


def location(layout: RunLayout) -> str | None:
    """Where the run (or sweep) of ``layout`` is tracked, if it is."""
    return _read_record(layout).describe() if layout.tracking.exists() else None


def tracking_uri(spec: TrackingSpec) -> str:
    """The store ``spec`` logs to, a local path made an absolute ``file:`` URI so that the
    run's record finds it from any directory."""
    uri = spec.uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_STORE
    # "databricks" alone names the default Databricks profile, not a path.
    if not urlsplit(uri).scheme and uri != "databricks":
        return Path(uri).resolve().as_uri()
    return uri


@dataclass
class Tracker:
    """A parent MLflow run and its finished child runs' ids, by name."""

    client: MlflowClient
    run_id: str
    experiment_id: str
    children: dict[str, str]

    def log_params(self, params: dict[str, Any]) -> None:
        """``params`` (nested tables) on the parent, by dotted key."""
        self._log(self.run_id, params=params)

    def log_child(
        self, name: str, params: dict[str, Any], steps: dict[int, dict[str, float]]
    ) -> None:
        """Child run ``name`` with ``params`` and ``steps`` (metrics by step), unless a
        finished child of that name is logged already (a resumed run's earlier stages)."""
        if name in self.children:
            return
        tags = _context_tags({PARENT_TAG: self.run_id})
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        self._log(run_id, params=params, steps=steps)
        self.client.set_terminated(run_id)
        self.children[name] = run_id

    def log_metrics(self, name: str, metrics: dict[str, float]) -> None:
        """``metrics`` on child run ``name``."""
        self._log(self.children[name], steps={0: metrics})

    def log_artifact(self, path: Path) -> None:
        """A file or a directory (under its own name) on the parent."""
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), path.name)
        else:
            self.client.log_artifact(self.run_id, str(path))

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)

    def _log(
        self,
        run_id: str,
        *,
        params: dict[str, Any] | None = None,
        steps: dict[int, dict[str, float]] | None = None,
    ) -> None:
        from mlflow.entities import Metric, Param
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

        logged = [Param(_name(k), _param_value(v)) for k, v in _flatten(params or {}).items()]
        for start in range(0, len(logged), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(run_id, params=logged[start : start + MAX_PARAMS_TAGS_PER_BATCH])
        now = int(time.time() * 1000)
        measured = [
            Metric(_name(key), float(value), now, step)
            for step, metrics in (steps or {}).items()
            for key, value in metrics.items()
        ]
        for start in range(0, len(measured), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=measured[start : start + MAX_METRICS_PER_BATCH])


@contextmanager
def tracked_run(
    spec: TrackingSpec, layout: RunLayout, config: Path, *, resume: bool
) -> Iterator[Tracker | None]:
    """The MLflow run of directory ``layout`` while the block runs, finished after it (failed
    if the block raises); None when tracking is off, and on every rank but 0 under torchrun.

    ``resume`` continues the run ``tracking.json`` records, if there is one; otherwise a new
    run is started with the TOML file ``config`` flattened as params, and recorded. ``config``
    is logged as an artifact either way."""
    if not spec.enabled or not distributed.world().is_main:
        yield None
        return
    if resume and layout.tracking.exists():
        tracker = _continued(layout)
    else:
        tracker = _started(spec, layout, config)
    print(f"tracking: {location(layout)}", file=sys.stderr, flush=True)
    tracker.log_artifact(config)
    try:
        yield tracker
    except BaseException as error:
        tracker.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    tracker.end("FINISHED")


def _client(uri: str) -> MlflowClient:
    try:
        from mlflow import MlflowClient
    except ImportError as error:
        raise MissingExtra(
            "experiment tracking needs MLflow: pip install 'recdistill[tracking]'"
        ) from error
    if urlsplit(uri).scheme == "file":
        # MLflow 3.18 refuses its file store, "in maintenance mode", unless this is set.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def _started(spec: TrackingSpec, layout: RunLayout, config: Path) -> Tracker:
    """A new run with ``config`` flattened as params, recorded in ``tracking.json``."""
    uri = tracking_uri(spec)
    client = _client(uri)
    experiment = client.get_experiment_by_name(spec.experiment)
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment(spec.experiment)
    )
    tags = _context_tags({DIRECTORY_TAG: str(layout.root.resolve())})
    run = client.create_run(experiment_id, run_name=layout.root.name, tags=tags)
    record = TrackingRecord(uri, run.info.run_id)
    layout.root.mkdir(parents=True, exist_ok=True)
    atomic_write(layout.tracking, lambda path: write_json(path, dataclasses.asdict(record)))
    tracker = Tracker(client, run.info.run_id, experiment_id, {})
    tracker.log_params(tomllib.loads(config.read_text()))
    return tracker


def _continued(layout: RunLayout) -> Tracker:
    """The recorded run, running again, with its finished children; a child cut short (its
    process died while logging it) is deleted, to be logged anew."""
    record = _read_record(layout)
    client = _client(record.uri)
    experiment_id = client.get_run(record.run_id).info.experiment_id
    client.update_run(record.run_id, status="RUNNING")
    children = {}
    for child in client.search_runs([experiment_id], f"tags.{PARENT_TAG} = '{record.run_id}'"):
        if child.info.status == "FINISHED":
            children[child.info.run_name] = child.info.run_id
        else:
            client.delete_run(child.info.run_id)
    return Tracker(client, record.run_id, experiment_id, children)


def _read_record(layout: RunLayout) -> TrackingRecord:
    return TrackingRecord(**json.loads(layout.tracking.read_text()))


def log_stage(
    tracker: Tracker, stage: StageSpec, model: TwoTowerSpec, directory: StageLayout
) -> None:
    """A finished stage as a child run: its spec and its model's as params, and each epoch's
    training loss and validation metrics (``log.jsonl``) as metrics at step = epoch."""
    epochs = [json.loads(line) for line in directory.log.read_text().splitlines()]
    tracker.log_child(
        stage.name,
        params={"stage": dataclasses.asdict(stage), "model": dataclasses.asdict(model)},
        steps={
            record["epoch"]: {k: v for k, v in record.items() if k != "epoch" and _is_number(v)}
            for record in epochs
        },
    )


def log_run(tracker: Tracker, layout: RunLayout, summary: RunSummary) -> None:
    """A scored run: each stage's test metrics on its child run, and ``summary.json`` and the
    report, if there is one, on the parent."""
    for name in tracker.children:
        tracker.log_metrics(name, _prefixed("test_", summary.models[name].metrics))
    tracker.log_artifact(layout.summary)
    if layout.report.root.is_dir():
        tracker.log_artifact(layout.report.root)


def log_sweep(tracker: Tracker, layout: RunLayout, summary: SweepSummary) -> None:
    """A finished sweep: a child run per candidate (its settings as params, its validation
    metrics, size and latency as metrics), the chosen candidate's test metrics (``int8_test_``
    for its int8 copy) on its child, and ``summary.json`` and the report on the parent."""
    for name, result in summary.candidates.items():
        settings = {"architecture": result.architecture, "mix": result.mix, **result.settings}
        tracker.log_child(name, params=settings, steps={0: _candidate_metrics(result)})
    for chosen in summary.models.values():
        prefix = "test_" if chosen.quantization is None else "int8_test_"
        tracker.log_metrics(chosen.candidate, _prefixed(prefix, chosen.metrics))
    tracker.log_artifact(layout.summary)
    tracker.log_artifact(layout.report.root)


def log_report(layout: RunLayout) -> None:
    """Add the run's report to its MLflow run, if it was tracked (it has ``tracking.json``)."""
    if layout.tracking.exists():
        record, report = _read_record(layout), layout.report.root
        _client(record.uri).log_artifacts(record.run_id, str(report), report.name)


def _candidate_metrics(result: CandidateResult) -> dict[str, float]:
    metrics = {
        "params": result.params,
        "multiply_adds": result.multiply_adds,
        "best_epoch": result.training.best_epoch,
        "epochs_run": result.training.epochs_run,
        "train_seconds": result.training.train_seconds,
    }
    for prefix, measured in (("", result), ("int8_", result.int8)):
        metrics[f"{prefix}valid_ndcg@10"] = measured.valid.ndcg
        metrics[f"{prefix}valid_worst_segment_retention"] = measured.valid.worst_segment.retention
        metrics[f"{prefix}artifact_bytes"] = measured.artifact_bytes
        for clock in ("wall", "cpu"):
            latency = measured.latency_ms.on(clock)
            metrics[f"{prefix}latency_{clock}_p50_ms"] = latency.p50
            metrics[f"{prefix}latency_{clock}_p99_ms"] = latency.p99
    return metrics


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``tree``'s leaves by dotted key (``stages.student.lists.depth``); a list is a leaf."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _param_value(value: Any) -> str:
    """A param's value as text (lists and tables as JSON), cut to MLflow's length limit."""
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_PARAM_VAL_LENGTH else text[: MAX_PARAM_VAL_LENGTH - 1] + "…"


def _name(key: str) -> str:
    """``key`` as MLflow allows names: ``ndcg@10`` becomes ``ndcg_at_10``."""
    return re.sub(r"[^/\w.\- :]", "_", key.replace("@", "_at_"))


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}{key}": value for key, value in metrics.items()}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _context_tags(tags: dict[str, str]) -> dict[str, str]:
    """``tags`` and those MLflow's own runs carry (user, source, git commit)."""
    from mlflow.tracking.context.registry import resolve_tags

    return resolve_tags(tags)
