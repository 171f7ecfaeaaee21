"""What ``summary.json`` holds, as dataclasses: a run's and a sweep's.

``recdistill train`` writes a :class:`RunSummary`; ``recdistill sweep`` a :class:`SweepSummary`,
whose chosen students sit in ``models`` as a run's trained models do, so that
``recdistill export`` reads either. Summaries are written and read only through
:func:`write_summary` and :func:`read_summary`: reading checks the file against these classes
(a missing or unknown key is an error that names it), and JSON keys that are not Python
names (``ndcg@10_ratio``, ...) are field aliases. Field order is the files' key order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import ConfigDict, Field, TypeAdapter, with_config

from recdistill.ab_spec import ImpactSpec
from recdistill.files import write_json
from recdistill.quantize import QuantizationSpec
from recdistill.ranked_lists import ListSpec

# Means over users, keyed by metric name (``ndcg@10``, ``full_recall@10``, ...). Which metrics
# a model has varies: agreement with the teacher (``kendall_tau``, ...) only beside a teacher.
Metrics = dict[str, float]

# What a sweep's latency is measured on: elapsed time, or the scoring thread's CPU time.
CLOCKS = ("wall", "cpu")
# A field a file leaves out when it has no value (a baseline's hyperparameters).
_OMITTED_WHEN_NONE = Field(exclude_if=lambda value: value is None)
# Unknown keys are errors: they also tell the kinds of model entry apart when reading.
_STRICT = ConfigDict(extra="forbid")


def _key(name: str) -> Any:
    return Field(alias=name)


@with_config(_STRICT)
@dataclass(frozen=True)
class Latency:
    """Milliseconds to score one request's list in process."""

    p50: float
    p99: float


@with_config(_STRICT)
@dataclass(frozen=True)
class MultiplyAdds:
    user_tower: int
    item_tower: int
    per_candidate: float


@with_config(_STRICT)
@dataclass(frozen=True)
class Training:
    """How a run's stage trained: from whom, on what, and how long."""

    teachers: list[str]
    losses: list[str]
    lists: ListSpec | None
    best_epoch: int
    epochs_run: int
    # What early stopping chose the best epoch by, and every validation metric at it.
    valid_metric: str
    valid: Metrics
    train_seconds: float
    examples_per_second: float


@with_config(_STRICT)
@dataclass(frozen=True)
class TrainedModel:
    """A model a run trained (a stage): ``preset`` names its ``[models.*]`` table."""

    preset: str
    params: int
    multiply_adds: MultiplyAdds
    training: Training
    metrics: Metrics
    latency_ms: Latency


@with_config(_STRICT)
@dataclass(frozen=True, kw_only=True)
class EnsembleModel:
    """An ensemble teacher: its members' weights and its validation metrics at them, which
    were the best of its grid; ``params`` adds up its members'."""

    weights: dict[str, float]
    params: int
    valid: Metrics
    metrics: Metrics
    latency_ms: Latency


@with_config(_STRICT)
@dataclass(frozen=True, kw_only=True)
class BaselineModel:
    """Popularity or EASE, with the hyperparameters chosen on validation (EASE only)."""

    params: int
    l2: Annotated[float | None, _OMITTED_WHEN_NONE] = None
    half_life: Annotated[float | None, _OMITTED_WHEN_NONE] = None
    metrics: Metrics
    latency_ms: Latency


@with_config(_STRICT)
@dataclass(frozen=True, kw_only=True)
class ExternalModel:
    """A teacher from outside the run (``[teachers.*]``): its ``kind``, its parameter count
    when it is known, what it taught from (``note``), and its test metrics: none for a log of
    scores, which scored no list but the ones it logged."""

    kind: str
    params: int | None
    note: str
    metrics: Metrics
    latency_ms: Latency | None


@with_config(_STRICT)
@dataclass(frozen=True)
class Comparison:
    """A model against a reference over the same users: mean NDCG@10 ratio (sampled lists
    and full ranking) and the paired t-test's p-value."""

    ndcg_ratio: Annotated[float, _key("ndcg@10_ratio")]
    ndcg_p_value: Annotated[float, _key("ndcg@10_p_value")]
    full_ndcg_ratio: Annotated[float, _key("full_ndcg@10_ratio")]
    full_ndcg_p_value: Annotated[float, _key("full_ndcg@10_p_value")]


@with_config(_STRICT)
@dataclass(frozen=True)
class RunSummary:
    """``summary.json`` of ``recdistill train``: every model in the run, scored on test, and
    the comparisons (``"student_vs_teacher"``, ...) its claims rest on."""

    data: str
    source: str
    models: dict[str, TrainedModel | EnsembleModel | BaselineModel | ExternalModel]
    comparisons: dict[str, Comparison]


@with_config(_STRICT)
@dataclass(frozen=True)
class ClockLatency:
    """p50 and p99 of a sweep's latency benchmark on each clock, and the machine's load."""

    load_average: float
    wall: Latency
    cpu: Latency

    def on(self, clock: str) -> Latency:
        return {"wall": self.wall, "cpu": self.cpu}[clock]


@with_config(_STRICT)
@dataclass(frozen=True)
class SegmentScore:
    """A candidate's validation NDCG@10 in one user segment, and the teacher's it retains."""

    segment: str
    value: str
    users: int
    ndcg: Annotated[float, _key("ndcg@10")]
    teacher_ndcg: Annotated[float, _key("teacher_ndcg@10")]
    retention: float
    retention_ci: list[float]
    # Keeps significantly less of the teacher than the candidate's other users (the
    # evaluation report's test: recdistill.segments).
    flagged: bool = False

    @property
    def losing(self) -> bool:
        """Loses to the teacher here, and significantly more than the candidate's other
        users: a segment that keeps less than the rest but still gains on the teacher has
        lost nothing."""
        return self.flagged and self.retention < 1

    def describe(self) -> str:
        return f"{self.segment} = {self.value} ({self.retention:.3f})"


@with_config(_STRICT)
@dataclass(frozen=True)
class ValidScore:
    ndcg: Annotated[float, _key("ndcg@10")]
    worst_segment: SegmentScore


@with_config(_STRICT)
@dataclass(frozen=True)
class SegmentedValidScore(ValidScore):
    segments: list[SegmentScore]


@with_config(_STRICT)
@dataclass(frozen=True)
class CandidateTraining:
    best_epoch: int
    epochs_run: int
    train_seconds: float


@with_config(_STRICT)
@dataclass(frozen=True)
class Int8Result:
    """A candidate's int8 copy, measured as the candidate is."""

    quantization: QuantizationSpec
    valid: SegmentedValidScore
    artifact_bytes: int
    # Measured once every candidate is trained (None until then).
    latency_ms: Annotated[ClockLatency | None, _OMITTED_WHEN_NONE] = None


@with_config(_STRICT)
@dataclass(frozen=True)
class AbImpact:
    """A finalist against the reference teacher in a simulated A/B test (CUPED): the relative
    lift of the decision metric with its CI, and where that CI lies against the margin."""

    users: list[int]  # treatment, baseline
    lift: float
    lift_ci: list[float]
    p_value: float
    mde: float
    standing: str


@with_config(_STRICT)
@dataclass(frozen=True)
class SimulatedImpact:
    """A candidate against the reference teacher, interleaved in a simulated experiment
    (:mod:`recdistill.abtest.preference`): users preferring each and neither, the preference
    share and the relative lift of the clicks on the candidate's items, with CIs, and where
    that lift's CI lies against the margin; the A/B test's for a finalist."""

    users: int
    wins: int
    losses: int
    ties: int
    share: float
    share_ci: list[float]
    lift: float
    lift_ci: list[float]
    p_value: float
    standing: str
    ab: Annotated[AbImpact | None, _OMITTED_WHEN_NONE] = None


@with_config(_STRICT)
@dataclass(frozen=True)
class CandidateResult:
    """A sweep candidate (a preset × a loss mix) trained and measured on validation: what its
    ``result.json`` holds once its latency is measured."""

    name: str
    architecture: str
    mix: str
    model: dict[str, Any]
    settings: dict[str, Any]
    losses: list[str]
    params: int
    multiply_adds: float
    training: CandidateTraining
    valid: SegmentedValidScore
    artifact_bytes: int
    int8: Int8Result
    # Measured once every candidate is trained (None until then).
    latency_ms: Annotated[ClockLatency | None, _OMITTED_WHEN_NONE] = None
    # Measured once every candidate is timed, for those within the latency budget.
    impact: Annotated[SimulatedImpact | None, _OMITTED_WHEN_NONE] = None


@dataclass(frozen=True)
class SelectionSpec:
    """``[selection]``: the rule a sweep's chosen student must meet (see ``describe``)."""

    p99_ms: float = 2.0
    max_artifact_bytes: int | None = None
    # The smallest candidates non-inferior in the interleaving that also take the A/B test.
    finalists: int = 3
    # "wall": elapsed time; "cpu": the scoring thread's CPU time, which time spent waiting
    # while other processes hold the cores does not inflate. Both are measured and reported.
    latency_clock: str = "wall"

    def __post_init__(self) -> None:
        if self.latency_clock not in CLOCKS:
            raise ValueError(f"[selection] latency_clock must be one of {list(CLOCKS)}")
        if self.finalists < 1:
            raise ValueError(f"[selection] finalists must be at least 1, not {self.finalists}")

    def p99(self, latency_ms: ClockLatency) -> float:
        return latency_ms.on(self.latency_clock).p99

    def describe(self, margin: float) -> str:
        """The rule in one sentence (the sweep's report and its printout state it)."""
        size = (
            ""
            if self.max_artifact_bytes is None
            else f" and an artifact of at most {self.max_artifact_bytes:,} bytes"
        )
        return (
            f"the smallest candidate (parameters) with p99 ≤ {self.p99_ms:g} ms on the "
            f"{self.latency_clock} clock{size} whose clicks, interleaved with the teacher's "
            f"in the simulation, are non-inferior within {margin:.1%} (the CI's lower bound), "
            f"none of whose validation segments loses to the teacher and significantly more "
            f"than its other users (the report's test), and which the A/B test of the "
            f"{self.finalists} smallest such finalists does not find worse beyond the margin"
        )


@with_config(_STRICT)
@dataclass(frozen=True, kw_only=True)
class Selection(SelectionSpec):
    """The budget and what met it: the Pareto frontier, the candidates within the budget
    and the one chosen (None when none was)."""

    chosen: str | None
    frontier: list[str]
    within_budget: list[str]
    # Meet the whole rule, the smallest first.
    qualified: list[str] = field(default_factory=list)


@with_config(_STRICT)
@dataclass(frozen=True)
class ChosenModel:
    """A sweep's chosen student (``best``) or its int8 copy (``best_int8``), scored on test."""

    preset: str
    candidate: str
    params: int
    quantization: QuantizationSpec | None
    artifact_bytes: int
    latency_ms: ClockLatency
    valid: ValidScore
    metrics: Metrics


@with_config(_STRICT)
@dataclass(frozen=True)
class SweepSummary:
    """``summary.json`` of ``recdistill sweep``."""

    data: str
    source: str
    base_run: str
    search: str
    min_segment_users: int
    selection: Selection
    models: dict[str, ChosenModel]
    candidates: dict[str, CandidateResult]
    # The simulated experiments the candidates were judged by, against ``reference``.
    impact: Annotated[ImpactSpec | None, _OMITTED_WHEN_NONE] = None
    reference: str = ""
    truth: str = ""


Summary = RunSummary | SweepSummary


@cache
def _adapter(kind: Any) -> TypeAdapter:
    return TypeAdapter(kind)


def to_json(value: Any) -> Any:
    """A summary (or any part of one) as the plain JSON values its file holds."""
    return _adapter(type(value)).dump_python(value, by_alias=True)


def from_json(kind: Any, data: Any) -> Any:
    """``data`` (as :func:`to_json` gives it) read as ``kind``, e.g. ``RunSummary``."""
    return _adapter(kind).validate_python(data)


def write_summary(path: Path, summary: Summary) -> None:
    write_json(path, to_json(summary))


def read_summary(path: Path, kind: Any = Summary) -> Any:
    """The summary at ``path``, read as ``kind``: a run's or a sweep's unless told which."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {path.parent} a `recdistill train` run?")
    return from_json(kind, json.loads(path.read_text()))
