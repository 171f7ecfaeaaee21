"""What the distillation benchmarks share: a finished run's frozen teachers, and students
trained from them and scored on validation and test side by side.

Choices are made on validation (the config's ``valid_metric``); test is only reported.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from scipy import stats

from recdistill.config import history_length, load_config
from recdistill.data.feature_store import FeatureStore
from recdistill.evaluate import evaluate
from recdistill.layout import RunLayout
from recdistill.models import FeatureSpace, TwoTower, TwoTowerSpec
from recdistill.pipeline import model_presets, stages_from
from recdistill.stage import StageSpec
from recdistill.teachers import FrozenTeacher
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
        self._teachers: dict[str, FrozenTeacher] = {}

    def teacher(self, name: str) -> FrozenTeacher:
        """Stage ``name`` of the run, frozen (its states cached in its stage directory)."""
        if name not in self._teachers:
            model = TwoTower(self.presets[self.stages[name].model], self.space)
            stage = RunLayout(self.run).stage(name)
            model.load_state_dict(load_file(str(stage.weights)))
            self._teachers[name] = FrozenTeacher(name, model, self.store, cache=stage.root)
        return self._teachers[name]

    def fit(
        self,
        label: str,
        stage: StageSpec,
        preset: TwoTowerSpec,
        teachers: dict[str, FrozenTeacher] | None = None,
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
