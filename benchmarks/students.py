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
import torch
from safetensors.torch import load_file
from scipy import stats

from recdistill.config import history_length, load_config, section
from recdistill.data.feature_store import FeatureStore
from recdistill.ensembles import BASELINE_MEMBERS, EaseMember, EnsembleTeacher
from recdistill.evaluate import evaluate
from recdistill.layout import RunLayout
from recdistill.models import FeatureSpace, TwoTower, TwoTowerSpec
from recdistill.pipeline import ensembles_from, fit_baselines, model_presets, stages_from
from recdistill.stage import VALID_METRICS, StageSpec
from recdistill.summary import RunSummary, read_summary
from recdistill.teachers import FrozenTeacher, Teacher
from recdistill.train import Trainer

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
    config: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.config = load_config(self.config_path)
        self.presets = model_presets(self.config)
        self.stages = {stage.name: stage for stage in stages_from(self.config)}
        self.store = FeatureStore(self.data, history_length=history_length(self.config))
        self.space = FeatureSpace(self.store.user_features, self.store.cardinalities())
        self._teachers: dict[str, Teacher] = {}

    @cached_property
    def baselines(self) -> dict[str, Any]:
        """The config's baselines, their settings chosen on validation as a run chooses them."""
        metric = section(self.config, "train").get("valid_metric", VALID_METRICS[0])
        return fit_baselines(self.store, self.config, metric)[0]

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
            ensembles = {spec.name: spec for spec in ensembles_from(self.config)}
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
                model = TwoTower(self.presets[self.stages[name].model], self.space)
                model.load_state_dict(load_file(str(layout.stage(name).weights)))
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
        torch.manual_seed(stage.seed)
        model = TwoTower(preset, self.space)
        with tempfile.TemporaryDirectory() as scratch:
            result = Trainer(stage, model, teachers, self.store, Path(scratch)).fit()
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
