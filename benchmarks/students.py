"""What the distillation benchmarks share: a finished run's frozen teachers, and students
trained from them and scored on validation and test side by side.

Choices are made on validation (the config's ``valid_metric``); test is only reported.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from recdistill.config import RunConfig, load_run_config
from recdistill.data.feature_store import FeatureStore
from recdistill.ensembles import BASELINE_MEMBERS, EaseMember, EnsembleTeacher
from recdistill.evaluate import evaluate
from recdistill.layout import RunLayout
from recdistill.models import TwoTower, TwoTowerSpec
from recdistill.pipeline import fit_baselines
from recdistill.recipe import load_stage_model, train_stage
from recdistill.stage import StageSpec
from recdistill.summary import RunSummary, read_summary
from recdistill.teachers import FrozenTeacher, Teacher

METRICS = ("ndcg@10", "full_ndcg@10")


@dataclass
class Scored:
    """A trained student: its size, its best validation metrics and per-user test metrics."""

    label: str
    model: TwoTower
    valid: dict[str, float]
    test: dict[str, np.ndarray]
    seconds: float

    @property
    def params(self) -> int:
        return self.model.parameter_count()

    def mean(self, metric: str) -> float:
        return float(self.test[metric].mean())


@dataclass
class RunBench:
    """A config, its data and the run whose trained stages teach."""

    config_path: Path
    data: Path
    run: Path
    config: RunConfig = field(init=False)

    def __post_init__(self) -> None:
        self.config = load_run_config(self.config_path)
        self.presets = self.config.models
        self.stages = {stage.name: stage for stage in self.config.stages}
        self.roles = self.config.roles
        self.store = FeatureStore(self.data, history_length=self.config.history_length)
        self._teachers: dict[str, Teacher] = {}

    @cached_property
    def baselines(self) -> dict[str, Any]:
        """The config's baselines, their settings chosen on validation as a run chooses them."""
        return fit_baselines(self.store, self.config)[0]

    def member(self, name: str) -> Any:
        """What ``name`` brings to an ensemble: a baseline's EASE member or a frozen stage."""
        return (
            EaseMember.of(self.baselines[name]) if name in BASELINE_MEMBERS else self.teacher(name)
        )

    def teacher(self, name: str) -> Teacher:
        """Stage ``name`` of the run, frozen, or the config's ensemble ``name`` at the weights
        the run chose (what they compute per train row cached in their run directory)."""
        if name not in self._teachers:
            layout = RunLayout(self.run)
            ensembles = self.config.ensembles
            if name in ensembles:
                chosen = read_summary(layout.summary, RunSummary).models[name].weights
                members = {member: self.member(member) for member in ensembles[name].members}
                self._teachers[name] = EnsembleTeacher(
                    name,
                    members,
                    tuple(chosen[member] for member in members),
                    self.store,
                    cache=layout.stage(name).root,
                )
            else:
                model = load_stage_model(self.run, name, self.store)
                self._teachers[name] = FrozenTeacher(
                    name, model, self.store, cache=layout.stage(name).root
                )
        return self._teachers[name]

    def fit(
        self,
        label: str,
        stage: StageSpec,
        preset: TwoTowerSpec,
        teachers: dict[str, Teacher] | None = None,
    ) -> Scored:
        """Train ``stage`` on a fresh ``preset`` model from its teachers (by default the
        run's stages it names) and score it."""
        if teachers is None:
            teachers = {name: self.teacher(name) for name in stage.teachers}
        with tempfile.TemporaryDirectory() as scratch:
            model, result = train_stage(stage, preset, teachers, self.store, Path(scratch))
        print(
            f"  {label}: valid "
            + "  ".join(f"{name} {value:.4f}" for name, value in result.valid.items())
            + f" ({result.seconds:.0f} s)",
            flush=True,
        )
        test = evaluate(model, self.store, "test", name=label)
        return Scored(label, model, result.valid, test, result.seconds)


def paired_p(a: Scored, b: Scored, metric: str) -> float:
    """The paired t-test's p-value of ``a`` against ``b`` over the test users."""
    return float(stats.ttest_rel(a.test[metric], b.test[metric]).pvalue)
