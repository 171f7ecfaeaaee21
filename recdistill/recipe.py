"""One recipe to train a stage, one loader of a trained stage's model.

:func:`train_stage` seeds the stage, builds its model on the store's features, records the
model's resolved spec in the stage's directory (``stage.json``) and trains it;
:func:`load_stage_model` rebuilds a trained stage's model from that record and its best
weights. The pipeline, the sweep, export and the benchmarks all go through these two, so
nothing rebuilds a model from a run's ``config.toml`` by hand.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ConfigDict, with_config
from safetensors.torch import load_file

from recdistill.data.feature_store import FeatureStore
from recdistill.files import write_json
from recdistill.layout import RunLayout, StageLayout
from recdistill.models import FeatureSpace, TwoTower, TwoTowerSpec
from recdistill.quantize import QuantizationSpec, load_plain_state, quantize
from recdistill.stage import StageSpec
from recdistill.summary import from_json, to_json
from recdistill.teachers import Teacher
from recdistill.trainer import StageResult, Trainer


@with_config(ConfigDict(extra="forbid"))
@dataclass(frozen=True)
class StageRecord:
    """What a stage directory records of its model: its ``[models.*]`` preset, the spec
    resolved, the history its features hold, and which parts are int8 (``None``: float)."""

    preset: str
    model: TwoTowerSpec
    history_length: int
    quantization: QuantizationSpec | None = None


def train_stage(
    stage: StageSpec,
    spec: TwoTowerSpec,
    teachers: dict[str, Teacher],
    store: FeatureStore,
    directory: Path,
    *,
    resume: bool = False,
    place: str = "",
) -> tuple[TwoTower, StageResult]:
    """Train ``stage`` on a fresh model of ``spec`` (its preset ``stage.model``) from
    ``teachers``; returns the model at its best validation epoch and how training went.
    ``place`` says where the stage stands in its run in the progress lines."""
    layout = StageLayout(Path(directory))
    layout.root.mkdir(parents=True, exist_ok=True)
    write_record(layout, StageRecord(stage.model, spec, store.history_length))
    torch.manual_seed(stage.seed)
    model = TwoTower(spec, FeatureSpace.of(store))
    result = Trainer(stage, model, teachers, store, layout.root, place=place).fit(resume=resume)
    return model, result


def write_record(layout: StageLayout, record: StageRecord) -> None:
    write_json(layout.record, to_json(record))


def read_record(layout: StageLayout) -> StageRecord:
    if not layout.record.is_file():
        raise FileNotFoundError(
            f"{layout.root} has no {layout.record.name}: is it a stage trained by `recdistill train`?"
        )
    return from_json(StageRecord, json.loads(layout.record.read_text()))


def load_stage_model(run: Path, name: str, store: FeatureStore) -> TwoTower:
    """Stage ``name`` of run directory ``run`` at its best weights, in eval mode."""
    layout = RunLayout(Path(run)).stage(name)
    record = read_record(layout)
    if record.history_length != store.history_length:
        raise ValueError(
            f"{layout.root} was trained on {record.history_length} items of history; "
            f"the features hold {store.history_length}"
        )
    return load_model(record.model, store, layout.weights, record.quantization)


def load_model(
    spec: TwoTowerSpec,
    store: FeatureStore,
    weights: Path,
    quantization: QuantizationSpec | None = None,
) -> TwoTower:
    """A model of ``spec`` on ``store``'s features with the weights in ``weights``
    (int8 codes when ``quantization`` says so), in eval mode."""
    model = TwoTower(spec, FeatureSpace.of(store))
    if quantization is not None:
        model = quantize(model, quantization)
    load_plain_state(model, load_file(str(weights)))
    return model.eval()
