"""Where every file recdistill reads or writes lives: the one place that spells their names.

Each directory kind is a frozen dataclass over its root; its attributes and methods are the
paths inside it. A run's stage directory, a sweep's candidate directory and an artifact's
feature snapshot are themselves layouts (:class:`StageLayout`, :class:`CandidateLayout`,
:class:`DataLayout`). ::

    data/<name>/                 DataLayout
        interactions.parquet users.parquet items.parquet meta.json
        {train,valid,test}.parquet candidates_{valid,test}.parquet
        truth.safetensors truth.json                  (synthetic data only)
    runs/<name>/                 RunLayout
        config.toml summary.json per_user.parquet scores_test.safetensors
        tracking.json            (tracked runs only: their MLflow run and its store)
        <stage>/                 StageLayout
            checkpoint.pt model.safetensors log.jsonl stage.json train_<states|top<depth>>_<teacher>_<fp>.npy
        report/                  ReportLayout: index.html report.md segments.parquet
    runs/<sweep>/                SweepLayout: a run's layout (best/, best_int8/ are its stages)
        <candidate>/             CandidateLayout: a stage + result.json model_int8.safetensors
    artifacts/<name>/            ArtifactLayout
        manifest.json model.safetensors spec.json vocabularies.json features/ (a DataLayout)
    <onnx out>/                  OnnxLayout (``recdistill export --format onnx``)
        model.onnx onnx.json teacher.toml vocabulary/<item_id|user_id|feature>.parquet
    runs/serve/                  ServeLayout: impressions.jsonl events.jsonl (``serve``'s default)
    runs/ab/                     AbTestLayout
        requests.parquet impressions.jsonl events.jsonl summary.json index.html report.md
    <load test out>/             LoadTestLayout
        impressions.jsonl client_stats.json locust.log locust.html locust_*.csv
    <soak out>/                  SoakLayout
        root/{a,b,corrupt}/ server/ capacity/<load>/ soak/timeline.npy soak.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The [train] history_length a config that sets none gets: items of history a model reads.
DEFAULT_HISTORY_LENGTH = 50

# The files' names: the dataclasses below build every path from them. Code reads and writes
# through the dataclasses; a bare name is for messages, and for tests that check the layout.
# A data directory
INTERACTIONS = "interactions.parquet"
USERS = "users.parquet"
ITEMS = "items.parquet"
META = "meta.json"
TRUTH_TENSORS = "truth.safetensors"
TRUTH_JSON = "truth.json"
# A run (and a sweep, laid out as one)
CONFIG = "config.toml"
SUMMARY = "summary.json"
PER_USER = "per_user.parquet"
SCORES = "scores_test.safetensors"
REPORT = "report"
CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"
STAGE_RECORD = "stage.json"
LOG = "log.jsonl"
INT8_WEIGHTS = "model_int8.safetensors"
RESULT = "result.json"
TRACKING = "tracking.json"
# A report directory
REPORT_HTML = "index.html"
REPORT_MARKDOWN = "report.md"
SEGMENTS = "segments.parquet"
# An artifact
MANIFEST = "manifest.json"
SPEC = "spec.json"
VOCABULARIES = "vocabularies.json"
FEATURES = "features"
# A model out as ONNX (``recdistill export --format onnx``)
ONNX_MODEL = "model.onnx"
ONNX_CONTRACT = "onnx.json"
ONNX_TEACHER = "teacher.toml"
ONNX_VOCABULARY = "vocabulary"
# The server's impression log, a JSON line per ranked request, and its event log, a JSON
# line per click or conversion reported to POST /feedback (beside the impression log).
IMPRESSIONS = "impressions.jsonl"
EVENTS = "events.jsonl"
# Where ``recdistill serve`` keeps its impression log unless --impressions names one: a folder
# of its own beside the runs, relative to the working directory (docs/serving-export-and-the-
# real-time-ranker.md says why not the artifact's or its run's folder).
SERVE_DIR = "runs/serve"
# An A/B test
REQUESTS = "requests.parquet"
# A load test and a soak
CLIENT_STATS = "client_stats.json"
LOCUST_LOG = "locust.log"
LOCUST_HTML = "locust.html"
LOCUST_CSV_PREFIX = "locust"
SOAK_ARTIFACTS = "root"
SOAK_SERVER = "server"
SOAK_CAPACITY = "capacity"
SOAK_RUN = "soak"
TIMELINE = "timeline.npy"
SOAK_RESULT = "soak.json"


class _File:
    """A file (or directory) of a layout: read on a layout, its path under the layout's root."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, layout: Any, owner: type) -> Path:
        return layout.root / self.name


@dataclass(frozen=True)
class DataLayout:
    """A data directory: the canonical tables, their splits and candidate lists."""

    root: Path
    interactions = _File(INTERACTIONS)
    users = _File(USERS)
    items = _File(ITEMS)
    meta = _File(META)
    # The synthetic world's ground truth (user and item vectors): synthetic data only.
    truth_tensors = _File(TRUTH_TENSORS)
    truth_json = _File(TRUTH_JSON)

    def split(self, split: str) -> Path:
        return self.root / f"{split}.parquet"

    def candidates(self, split: str) -> Path:
        return self.root / f"candidates_{split}.parquet"


@dataclass(frozen=True)
class ReportLayout:
    """A report directory: the HTML page and its Markdown twin (and a run's segment table)."""

    root: Path
    index = _File(REPORT_HTML)
    markdown = _File(REPORT_MARKDOWN)
    segments = _File(SEGMENTS)


@dataclass(frozen=True)
class StageLayout:
    """A trained model's directory in a run: its checkpoint, best weights, epoch log and the
    record of its model's spec."""

    root: Path
    checkpoint = _File(CHECKPOINT)
    weights = _File(WEIGHTS)
    log = _File(LOG)
    record = _File(STAGE_RECORD)


@dataclass(frozen=True)
class RunLayout:
    """A ``recdistill train`` run: its config, summary, per-user metrics and a stage per model."""

    root: Path
    config = _File(CONFIG)
    summary = _File(SUMMARY)
    per_user = _File(PER_USER)
    scores = _File(SCORES)
    # The MLflow run the directory is logged to, when tracking is on (recdistill.tracking).
    tracking = _File(TRACKING)

    @property
    def report(self) -> ReportLayout:
        return ReportLayout(self.root / REPORT)

    def stage(self, name: str) -> StageLayout:
        return StageLayout(self.root / name)

    def has_checkpoints(self) -> bool:
        """Whether any stage has been trained here (a run to resume, not to overwrite)."""
        return any(self.root.glob(f"*/{CHECKPOINT}"))


@dataclass(frozen=True)
class CandidateLayout(StageLayout):
    """A sweep candidate's stage directory, with its int8 copy and its validation result."""

    int8_weights = _File(INT8_WEIGHTS)
    result = _File(RESULT)


@dataclass(frozen=True)
class SweepLayout(RunLayout):
    """A ``recdistill sweep`` directory: laid out as a run (its chosen students are stages
    that ``recdistill export`` reads), with a directory per candidate."""

    def candidate(self, name: str) -> CandidateLayout:
        return CandidateLayout(self.root / name)


@dataclass(frozen=True)
class ArtifactLayout:
    """An exported artifact: what ``recdistill serve`` loads."""

    root: Path
    manifest = _File(MANIFEST)
    weights = _File(WEIGHTS)
    spec = _File(SPEC)
    vocabularies = _File(VOCABULARIES)

    @property
    def features(self) -> DataLayout:
        """The snapshot of the data directory the model reads its features from."""
        return DataLayout(self.root / FEATURES)


@dataclass(frozen=True)
class OnnxLayout:
    """A model out as ONNX: the graph, what it reads and gives, its vocabularies (one
    Parquet table per ID kind) and its ``[teachers.*]`` table."""

    root: Path
    model = _File(ONNX_MODEL)
    contract = _File(ONNX_CONTRACT)
    teacher = _File(ONNX_TEACHER)
    vocabulary = _File(ONNX_VOCABULARY)


@dataclass(frozen=True)
class ServeLayout:
    """What ``recdistill serve`` writes by default: its impression and event logs."""

    root: Path = Path(SERVE_DIR)
    impressions = _File(IMPRESSIONS)
    events = _File(EVENTS)


@dataclass(frozen=True)
class AbTestLayout:
    """A ``recdistill abtest`` output directory."""

    root: Path
    requests = _File(REQUESTS)
    impressions = _File(IMPRESSIONS)
    events = _File(EVENTS)
    summary = _File(SUMMARY)

    @property
    def report(self) -> ReportLayout:
        return ReportLayout(self.root)


@dataclass(frozen=True)
class LoadTestLayout:
    """A load test's output directory: the server's impression log and what Locust wrote."""

    root: Path
    impressions = _File(IMPRESSIONS)
    client_stats = _File(CLIENT_STATS)
    locust_log = _File(LOCUST_LOG)
    locust_html = _File(LOCUST_HTML)
    # Locust's --csv prefix: it writes locust_stats.csv and its siblings.
    locust_csv_prefix = _File(LOCUST_CSV_PREFIX)


@dataclass(frozen=True)
class SoakLayout:
    """A soak's output directory: scratch artifacts, the server's output, each phase's load
    tests, and the result."""

    root: Path
    # Fresh copies of artifacts A and B, and A with corrupt weights (a/, b/, corrupt/): the
    # server's artifact root.
    artifacts = _File(SOAK_ARTIFACTS)
    capacity = _File(SOAK_CAPACITY)
    soak = _File(SOAK_RUN)
    result = _File(SOAK_RESULT)

    @property
    def server(self) -> LoadTestLayout:
        return LoadTestLayout(self.root / SOAK_SERVER)

    @property
    def timeline(self) -> Path:
        return self.soak / TIMELINE
