"""A sweep's plan: the ``[sweep]`` settings, the budget, and every candidate to train."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recdistill.config import HISTORY_LENGTH, history_length, load_config, section, spec_from
from recdistill.layout import RunLayout
from recdistill.models import TwoTowerSpec
from recdistill.pipeline import stages_from
from recdistill.quantize import QuantizationSpec
from recdistill.stage import StageSpec
from recdistill.summary import RunSummary, SelectionSpec, read_summary

# The model whose validation NDCG@10 a candidate's is a share of, per user segment.
REFERENCE = "teacher"
METRIC = "ndcg@10"
# The clocks latency is measured on; ``[selection] latency_clock`` names the budget's.
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


@dataclass(frozen=True)
class SweepSpec:
    """``[sweep]``: where the teachers come from, what to search and how to measure it."""

    base_run: str = ""
    search: str = "grid"  # "grid": every preset × mix; "random": ``samples`` of them
    samples: int = 0
    seed: int = 0
    min_segment_users: int = 100
    latency_rounds: int = 5
    latency_requests: int = 200  # timed requests per model and round


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
    quantization: QuantizationSpec
    history_length: int
    candidates: tuple[Candidate, ...]

    @property
    def base(self) -> RunLayout:
        """The run whose teachers teach."""
        return RunLayout(Path(self.sweep.base_run))


def load_plan(config_path: Path, data: Path, out: Path) -> Plan:
    config = load_config(config_path)
    sweep = spec_from(SweepSpec, section(config, "sweep"), "[sweep]")
    if not sweep.base_run:
        raise ValueError('[sweep] needs base_run = "runs/X", the run whose teachers teach')
    if sweep.search not in ("grid", "random"):
        raise ValueError(f'[sweep] search = {sweep.search!r}; use "grid" or "random"')
    selection = spec_from(SelectionSpec, section(config, "selection"), "[selection]")
    if selection.latency_clock not in CLOCKS:
        raise ValueError(f"[selection] latency_clock must be one of {sorted(CLOCKS)}")
    presets = {
        name: spec_from(TwoTowerSpec, table, f"[models.{name}]")
        for name, table in section(config, "models").items()
    }
    mixes = section(config, "mixes")
    if not presets or not mixes:
        raise ValueError("a sweep config needs [models.*] presets and a [mixes] table")
    grid = [(arch, mix) for arch in presets for mix in mixes]
    if sweep.search == "random":
        if not 0 < sweep.samples <= len(grid):
            raise ValueError(f"[sweep] samples must be in 1..{len(grid)} (the grid's size)")
        picked = np.random.default_rng(sweep.seed).choice(len(grid), sweep.samples, replace=False)
        grid = [grid[i] for i in sorted(picked)]
    stages = stages_from(
        {
            "train": section(config, "train"),
            "stages": {
                f"{arch}-{mix}": {"model": arch, "losses": mixes[mix]} for arch, mix in grid
            },
        }
    )
    candidates = tuple(
        Candidate(stage.name, arch, mix, presets[arch], stage)
        for stage, (arch, mix) in zip(stages, grid)
    )
    base = RunLayout(Path(sweep.base_run))
    length = history_length(config)
    base_length = history_length(load_config(base.config))
    if length != base_length:
        raise ValueError(
            f"[train] {HISTORY_LENGTH} = {length}, but {base.root} was trained with "
            f"{base_length}: the teachers must see the features they were trained on"
        )
    trained = set(read_summary(base.summary, RunSummary).models)
    missing = sorted({REFERENCE, *(t for c in candidates for t in c.stage.teachers)} - trained)
    if missing:
        raise ValueError(f"{base.root} has no trained {missing} to learn from")
    return Plan(
        config=Path(config_path),
        data=Path(data),
        out=Path(out),
        sweep=sweep,
        selection=selection,
        quantization=spec_from(QuantizationSpec, section(config, "quantization"), "[quantization]"),
        history_length=length,
        candidates=candidates,
    )
