"""A sweep's plan: the ``[sweep]`` settings, the budget, and every candidate to train."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from recdistill.ab_spec import ImpactSpec
from recdistill.config import SweepSpec, load_run_config, load_sweep_config
from recdistill.layout import RunLayout
from recdistill.models import TwoTowerSpec
from recdistill.quantize import QuantizationSpec
from recdistill.stage import StageSpec
from recdistill.summary import (
    EnsembleModel,
    RunSummary,
    SelectionSpec,
    TrainedModel,
    read_summary,
)
from recdistill.tracking import TrackingSpec

METRIC = "ndcg@10"
# The clocks latency is measured on; ``[selection] latency_clock`` names the budget's.
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


@dataclass(frozen=True)
class Candidate:
    name: str
    architecture: str
    mix: str
    model: TwoTowerSpec
    stage: StageSpec


@dataclass(frozen=True)
class Plan:
    """A parsed sweep config: everything a worker process needs (it is sent to them)."""

    config: Path
    data: Path
    out: Path
    sweep: SweepSpec
    selection: SelectionSpec
    # The simulated experiments, on this sweep's data.
    impact: ImpactSpec
    quantization: QuantizationSpec
    history_length: int
    # The base run's reference teacher: a candidate's quality is a share of its own.
    reference: str
    candidates: tuple[Candidate, ...]
    tracking: TrackingSpec

    @property
    def base(self) -> RunLayout:
        """The run whose teachers teach."""
        return RunLayout(Path(self.sweep.base_run))


def load_plan(config_path: Path, data: Path, out: Path) -> Plan:
    config = load_sweep_config(config_path)
    grid = [(arch, mix) for arch in config.models for mix in config.mixes]
    if config.sweep.search == "random":
        samples = config.sweep.samples
        if not 0 < samples <= len(grid):
            raise ValueError(f"[sweep] samples must be in 1..{len(grid)} (the grid's size)")
        picked = np.random.default_rng(config.sweep.seed).choice(len(grid), samples, replace=False)
        grid = [grid[i] for i in sorted(picked)]
    candidates = tuple(
        Candidate(
            f"{arch}-{mix}",
            arch,
            mix,
            config.models[arch],
            config.train.stage_of(
                f"{arch}-{mix}",
                arch,
                config.mixes[mix],
                **({} if config.sweep.lists is None else {"lists": config.sweep.lists}),
            ),
        )
        for arch, mix in grid
    )
    base = RunLayout(Path(config.sweep.base_run))
    base_config = load_run_config(base.config)
    length, base_length = config.train.history_length, base_config.history_length
    if length != base_length:
        raise ValueError(
            f"[train] history_length = {length}, but {base.root} was trained with "
            f"{base_length}: the teachers must see the features they were trained on"
        )
    reference = base_config.roles.reference
    models = read_summary(base.summary, RunSummary).models
    stages = {name for name, entry in models.items() if isinstance(entry, TrainedModel)}
    ensembles = {name for name, entry in models.items() if isinstance(entry, EnsembleModel)}
    missing = sorted(
        {reference, *(t for c in candidates for t in c.stage.teachers)} - stages - ensembles
    )
    if missing:
        raise ValueError(
            f"{base.root} has no trained {missing} to learn from (its stages "
            f"{sorted(stages)} and ensembles {sorted(ensembles)} teach)"
        )
    for mix, terms in config.mixes.items():
        towers = [t.source for t in terms if t.fn == "feature_mse" and t.source in ensembles]
        if towers:
            raise ValueError(
                f"[mixes] {mix}: feature_mse needs tower outputs; the ensemble {towers[0]!r} "
                "has none"
            )
    impact = config.impact
    return Plan(
        config=Path(config_path),
        data=Path(data),
        out=Path(out),
        sweep=config.sweep,
        selection=config.selection,
        impact=replace(impact, simulation=replace(impact.simulation, data=str(data))),
        quantization=config.quantization,
        history_length=length,
        reference=reference,
        candidates=candidates,
        tracking=config.tracking,
    )
