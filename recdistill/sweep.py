"""``recdistill sweep``: search student architectures × loss mixes, compress, choose under a budget.

The teacher and intermediate of an earlier run (``[sweep] base_run``) teach every candidate; a
candidate is a model preset (``[models.*]``) with a loss mix (``[mixes]``), trained with the
``[train]`` defaults like a stage of ``recdistill train``. Read top to bottom:

1. :func:`search` trains the candidates (``jobs`` processes of one torch thread each), resuming
   a half-trained one from its checkpoint. Each is scored on validation: NDCG@10 and, in every
   user segment with at least ``min_segment_users`` users, the share of the teacher's NDCG@10
   it retains. Its int8 copy (``[quantization]``) is scored the same way. The result is written
   atomically to ``<name>/result.json``; a candidate with a result is skipped on a rerun.
   Then, with training over so that candidates do not slow each other down, every float and
   int8 model serves 100-candidate validation lists through ``OnlineRanker.rank`` on one
   thread, in interleaved rounds, timed on the wall clock and on the thread's CPU clock
   (``[selection] latency_clock`` says which one the budget holds). The p99 is the median over
   rounds of each round's p99, so a burst of load elsewhere moves one round, not the verdict.
2. :func:`select` keeps the Pareto frontier (NDCG@10 up; p99 and artifact bytes down) and
   chooses the best validation NDCG@10 among candidates meeting ``[selection]``.
3. :func:`finalize` scores the chosen student, float and int8, once on test and writes them as
   ``best`` and ``best_int8`` in a run's layout (``summary.json``, ``config.toml``,
   ``<name>/model.safetensors``), so ``recdistill export --run OUT --model best`` works.
4. :func:`build_sweep_report` writes ``report/index.html`` and ``report/report.md``.

Nothing before :func:`finalize` reads the test split.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from matplotlib.figure import Figure
from safetensors.torch import load_file, save_file

from recdistill.artifact import TWO_TOWER, WEIGHTS, Artifact
from recdistill.config import load_config, section, spec_from
from recdistill.data.batches import FeatureStore
from recdistill.data.tables import candidates_file, read_meta, write_json
from recdistill.evaluate import evaluate, mean_metrics
from recdistill.models import FeatureSpace, TwoTower, TwoTowerSpec
from recdistill.online import OnlineRanker
from recdistill.pipeline import HISTORY_LENGTH, SUMMARY, stages_from
from recdistill.quantize import QuantizationSpec, load_plain_state, plain_state, quantize
from recdistill.report import REPORT, figure_png, template_environment
from recdistill.segments import ALL, SliceSpec, slice_table, user_segments
from recdistill.train import LossTerm, StageSpec, Trainer, atomic_write

RESULT = "result.json"
INT8_WEIGHTS = "model_int8.safetensors"
WEIGHTS_OF = {"float": WEIGHTS, "int8": INT8_WEIGHTS}
BEST, BEST_INT8 = "best", "best_int8"
REFERENCE = "teacher"
METRIC = "ndcg@10"
WARM_UP_REQUESTS = 20
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
class SelectionSpec:
    """``[selection]``: the budget the chosen student must meet."""

    p99_ms: float = 2.0
    min_worst_segment_retention: float = 0.95
    max_artifact_bytes: int | None = None
    # "wall": elapsed time; "cpu": the scoring thread's CPU time, which time spent waiting
    # while other processes hold the cores does not inflate. Both are measured and reported.
    latency_clock: str = "wall"

    def p99(self, latency_ms: dict[str, Any]) -> float:
        return latency_ms[self.latency_clock]["p99"]


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


@dataclass(frozen=True)
class Choice:
    frontier: tuple[str, ...]
    within_budget: tuple[str, ...]
    chosen: str | None


def run_sweep(config: Path, data: Path, out: Path, *, jobs: int = 1) -> dict[str, Any]:
    plan = load_plan(config, data, out)
    results = search(plan, jobs=jobs)
    summary = finalize(plan, results, select(results, plan.selection))
    build_sweep_report(plan.out)
    return summary


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
    base = Path(sweep.base_run)
    history_length = section(config, "train").get(HISTORY_LENGTH, 50)
    base_length = section(load_config(base / "config.toml"), "train").get(HISTORY_LENGTH, 50)
    if history_length != base_length:
        raise ValueError(
            f"[train] {HISTORY_LENGTH} = {history_length}, but {base} was trained with "
            f"{base_length}: the teachers must see the features they were trained on"
        )
    trained = set(json.loads((base / SUMMARY).read_text())["models"])
    missing = sorted({REFERENCE, *(t for c in candidates for t in c.stage.teachers)} - trained)
    if missing:
        raise ValueError(f"{base} has no trained {missing} to learn from")
    return Plan(
        config=Path(config_path),
        data=Path(data),
        out=Path(out),
        sweep=sweep,
        selection=selection,
        quantization=spec_from(QuantizationSpec, section(config, "quantization"), "[quantization]"),
        history_length=history_length,
        candidates=candidates,
    )


class Bench:
    """What candidates are trained with and measured against, loaded once per process."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.store = FeatureStore(plan.data, history_length=plan.history_length)
        self.space = FeatureSpace(self.store.user_features, self.store.cardinalities())

    @cached_property
    def teachers(self) -> dict[str, TwoTower]:
        base = Path(self.plan.sweep.base_run)
        config = load_config(base / "config.toml")
        summary = json.loads((base / SUMMARY).read_text())
        names = {REFERENCE, *(t for c in self.plan.candidates for t in c.stage.teachers)}
        teachers = {}
        for name in sorted(names):
            preset = summary["models"][name]["preset"]
            table = section(config, f"models.{preset}")
            spec = spec_from(TwoTowerSpec, table, f"{base}: [models.{preset}]")
            teachers[name] = self.load(spec, base / name / WEIGHTS)
        return teachers

    @cached_property
    def segments(self) -> pd.DataFrame:
        return user_segments(self.plan.data, "valid")

    @cached_property
    def reference(self) -> pd.DataFrame:
        return self._per_user(self.teachers[REFERENCE], REFERENCE)

    def load(
        self, spec: TwoTowerSpec, weights: Path, quantization: QuantizationSpec | None = None
    ) -> TwoTower:
        """A model from its weights file, rebuilt as ``load_artifact`` does."""
        model = TwoTower(spec, self.space)
        if quantization is not None:
            model = quantize(model, quantization)
        load_plain_state(model, load_file(str(weights)))
        return model.eval()

    def validate(self, model: TwoTower) -> dict[str, Any]:
        """Validation NDCG@10 and the teacher's NDCG@10 retained in every large segment."""
        per_user = self._per_user(model, "candidate")
        spec = SliceSpec(metrics=(METRIC,), min_users=self.plan.sweep.min_segment_users)
        table = slice_table(pd.concat([self.reference, per_user]), self.segments, spec)
        teacher = table[table["model"] == REFERENCE].set_index(["segment", "value"])["mean"]
        segments = [
            {
                "segment": row.segment,
                "value": str(row.value),
                "users": int(row.users),
                METRIC: float(row.mean),
                f"teacher_{METRIC}": float(teacher[row.segment, row.value]),
                "retention": float(row.retention),
                "retention_ci": [float(row.retention_ci_low), float(row.retention_ci_high)],
            }
            for row in table[table["model"] == "candidate"].itertuples()
        ]
        return {
            METRIC: float(per_user[METRIC].mean()),
            "worst_segment": min(segments, key=lambda s: s["retention"]),
            "segments": segments,
        }

    def _per_user(self, model: TwoTower, label: str) -> pd.DataFrame:
        per_user = evaluate(model, self.store, "valid", full_ranking=False)
        return pd.DataFrame(
            {"model": label, "user_id": per_user["user_id"], METRIC: per_user[METRIC]}
        )


def search(plan: Plan, *, jobs: int = 1) -> list[dict[str, Any]]:
    """Every candidate's result (training, validation, int8, latency), resuming a stopped run."""
    plan.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plan.config, plan.out / "config.toml")
    pending = [c for c in plan.candidates if _finished(plan, c) is None]
    bench = Bench(plan)
    with _one_torch_thread():
        if jobs == 1 or len(pending) <= 1:
            for candidate in pending:
                _announce(search_one(bench, candidate))
        else:
            with ProcessPoolExecutor(
                jobs, mp_context=get_context("spawn"), initializer=_start_worker, initargs=(plan,)
            ) as pool:
                for future in as_completed([pool.submit(_search_in_worker, c) for c in pending]):
                    _announce(future.result())
        results = [_finished(plan, c) for c in plan.candidates]
        untimed = [r for r in results if "latency_ms" not in r]
        if untimed:
            _measure_latency(bench, untimed)
    return results


def search_one(bench: Bench, candidate: Candidate) -> dict[str, Any]:
    """Train one candidate (or finish training it), score it and its int8 copy on validation."""
    directory = bench.plan.out / candidate.name
    # Teachers first: building them (once per process) draws on the RNG the seed below fixes.
    teachers = {name: bench.teachers[name] for name in candidate.stage.teachers}
    torch.manual_seed(candidate.stage.seed)
    model = TwoTower(candidate.model, bench.space)
    trained = Trainer(candidate.stage, model, teachers, bench.store, directory).fit(resume=True)
    int8 = quantize(model, bench.plan.quantization)
    atomic_write(directory / INT8_WEIGHTS, lambda path: save_file(plain_state(int8), str(path)))
    result = {
        "name": candidate.name,
        "architecture": candidate.architecture,
        "mix": candidate.mix,
        "model": dataclasses.asdict(candidate.model),
        "settings": _settings(bench.plan, candidate),
        "losses": [_describe(term) for term in candidate.stage.losses],
        "params": model.parameter_count(),
        "multiply_adds": model.multiply_adds()["per_candidate"],
        "training": {
            "best_epoch": trained.best_epoch,
            "epochs_run": trained.epochs_run,
            "train_seconds": trained.seconds,
        },
        "valid": bench.validate(model),
        "artifact_bytes": (directory / WEIGHTS).stat().st_size,
        "int8": {
            "quantization": dataclasses.asdict(bench.plan.quantization),
            "valid": bench.validate(int8),
            "artifact_bytes": (directory / INT8_WEIGHTS).stat().st_size,
        },
    }
    _write_result(directory, result)
    return result


def select(results: list[dict[str, Any]], budget: SelectionSpec) -> Choice:
    """The frontier, the candidates within ``budget``, and the best of those on validation."""
    within = [r for r in results if meets(r, budget)]
    chosen = max(within, key=lambda r: r["valid"][METRIC])["name"] if within else None
    return Choice(
        frontier=tuple(pareto_frontier(results, budget)),
        within_budget=tuple(r["name"] for r in within),
        chosen=chosen,
    )


def meets(result: dict[str, Any], budget: SelectionSpec) -> bool:
    return (
        budget.p99(result["latency_ms"]) <= budget.p99_ms
        and result["valid"]["worst_segment"]["retention"] >= budget.min_worst_segment_retention
        and (
            budget.max_artifact_bytes is None
            or result["artifact_bytes"] <= budget.max_artifact_bytes
        )
    )


def pareto_frontier(results: list[dict[str, Any]], budget: SelectionSpec) -> list[str]:
    """Names of the candidates no other beats on quality, p99 latency and size at once
    (latency on the budget's clock)."""
    costs = {
        r["name"]: np.array([-r["valid"][METRIC], budget.p99(r["latency_ms"]), r["artifact_bytes"]])
        for r in results
    }
    return [
        name
        for name, cost in costs.items()
        if not any(np.all(other <= cost) and np.any(other < cost) for other in costs.values())
    ]


def finalize(plan: Plan, results: list[dict[str, Any]], choice: Choice) -> dict[str, Any]:
    """Score the chosen student (float and int8) on test; write ``best``, ``best_int8``, summary."""
    summary: dict[str, Any] = {
        "data": str(plan.data),
        "source": read_meta(plan.data)["source"],
        "base_run": plan.sweep.base_run,
        "search": plan.sweep.search,
        "min_segment_users": plan.sweep.min_segment_users,
        "selection": dataclasses.asdict(plan.selection)
        | {
            "chosen": choice.chosen,
            "frontier": list(choice.frontier),
            "within_budget": list(choice.within_budget),
        },
        "models": {},
        "candidates": {r["name"]: r for r in results},
    }
    for name in (BEST, BEST_INT8):
        shutil.rmtree(plan.out / name, ignore_errors=True)
    if choice.chosen is not None:
        bench = Bench(plan)
        candidate = next(c for c in plan.candidates if c.name == choice.chosen)
        result = summary["candidates"][choice.chosen]
        for name, weights, quantization, measured in (
            (BEST, WEIGHTS, None, result),
            (BEST_INT8, INT8_WEIGHTS, plan.quantization, result["int8"]),
        ):
            path = plan.out / candidate.name / weights
            with _one_torch_thread():
                model = bench.load(candidate.model, path, quantization)
                metrics = mean_metrics(evaluate(model, bench.store, "test"))
            (plan.out / name).mkdir()
            shutil.copyfile(path, plan.out / name / WEIGHTS)
            summary["models"][name] = {
                "preset": candidate.architecture,
                "candidate": candidate.name,
                "params": result["params"],
                "quantization": None if quantization is None else dataclasses.asdict(quantization),
                "artifact_bytes": measured["artifact_bytes"],
                "latency_ms": measured["latency_ms"],
                "valid": {k: v for k, v in measured["valid"].items() if k != "segments"},
                "metrics": metrics,
            }
    write_json(plan.out / SUMMARY, summary)
    return summary


def candidates_table(summary: dict[str, Any]) -> str:
    """The candidates side by side, as printed at the end of ``recdistill sweep``."""
    selection = summary["selection"]
    header = (
        f"{'candidate':<30}{'valid ndcg':>11}{'worst ret.':>11}{'params':>9}{'bytes':>10}"
        f"{'p99 wall':>9}{'p99 cpu':>8}{'int8 ndcg':>10}{'int8 bytes':>11}{'int8 wall':>10}"
        f"{'int8 cpu':>9}  flags"
    )
    lines = [header]
    for name, r in summary["candidates"].items():
        flags = "frontier " * (name in selection["frontier"])
        flags += "budget " * (name in selection["within_budget"])
        flags += "CHOSEN" * (name == selection["chosen"])
        int8 = r["int8"]
        lines.append(
            f"{name:<30}{r['valid'][METRIC]:>11.4f}{r['valid']['worst_segment']['retention']:>11.3f}"
            f"{r['params']:>9,}{r['artifact_bytes']:>10,}{r['latency_ms']['wall']['p99']:>9.3f}"
            f"{r['latency_ms']['cpu']['p99']:>8.3f}{int8['valid'][METRIC]:>10.4f}"
            f"{int8['artifact_bytes']:>11,}{int8['latency_ms']['wall']['p99']:>10.3f}"
            f"{int8['latency_ms']['cpu']['p99']:>9.3f}  {flags}"
        )
    if selection["chosen"] is None:
        lines.append("\nno candidate meets the budget")
    else:
        best, best_int8 = summary["models"][BEST], summary["models"][BEST_INT8]
        lines.append(
            f"\nchosen: {selection['chosen']}: test ndcg@10 {best['metrics'][METRIC]:.4f} "
            f"(int8 {best_int8['metrics'][METRIC]:.4f})"
        )
    return "\n".join(lines)


def _measure_latency(bench: Bench, results: list[dict[str, Any]]) -> None:
    """Add float and int8 ``latency_ms`` of ``OnlineRanker.rank`` to ``results``: p50 and p99
    on each clock, and the machine's load average meanwhile."""
    plan = bench.plan
    lists = pq.read_table(plan.data / candidates_file("valid"))
    users = lists.column("user_id").to_numpy()
    candidates = np.array(lists.column("candidates").to_pylist(), dtype=np.int64)
    by_name = {c.name: c for c in plan.candidates}
    rankers = {
        (r["name"], variant): _ranker(bench, by_name[r["name"]], variant, r["params"])
        for r in results
        for variant in WEIGHTS_OF
    }
    for ranker in rankers.values():
        for row in range(WARM_UP_REQUESTS):
            ranker.rank(int(users[row % len(users)]), candidates[row % len(users)])
    rounds = {(key, clock): [] for key in rankers for clock in CLOCKS}
    requests = plan.sweep.latency_requests
    for round_ in range(plan.sweep.latency_rounds):
        for key, ranker in rankers.items():
            seconds = {clock: np.empty(requests) for clock in CLOCKS}
            for i in range(requests):
                row = (round_ * requests + i) % len(users)
                started = {clock: read() for clock, read in CLOCKS.items()}
                ranker.rank(int(users[row]), candidates[row])
                for clock, read in CLOCKS.items():
                    seconds[clock][i] = read() - started[clock]
            for clock in CLOCKS:
                rounds[key, clock].append(seconds[clock] * 1e3)
    load_average = os.getloadavg()[0]
    for result in results:
        for variant, target in (("float", result), ("int8", result["int8"])):
            target["latency_ms"] = {"load_average": load_average}
            for clock in CLOCKS:
                times = rounds[(result["name"], variant), clock]
                target["latency_ms"][clock] = {
                    "p50": float(np.median(np.concatenate(times))),
                    "p99": float(np.median([np.percentile(t, 99) for t in times])),
                }
        _write_result(plan.out / result["name"], result)


def _ranker(bench: Bench, candidate: Candidate, variant: str, params: int) -> OnlineRanker:
    """The candidate served as its artifact would be, straight from the sweep directory."""
    quantization = bench.plan.quantization if variant == "int8" else None
    directory = bench.plan.out / candidate.name
    model = bench.load(candidate.model, directory / WEIGHTS_OF[variant], quantization)
    artifact = Artifact(
        directory=directory,
        name=candidate.name,
        kind=TWO_TOWER,
        version=variant,
        params=params,
        store=bench.store,
        model=model,
        counts=None,
        quantization=quantization,
    )
    return OnlineRanker(artifact)


_WORKER_BENCH: Bench | None = None


def _start_worker(plan: Plan) -> None:
    global _WORKER_BENCH
    torch.set_num_threads(1)
    _WORKER_BENCH = Bench(plan)


def _search_in_worker(candidate: Candidate) -> dict[str, Any]:
    return search_one(_WORKER_BENCH, candidate)


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _describe(term: LossTerm) -> str:
    options = "".join(f", {key}={value:g}" for key, value in term.options.items())
    return f"{term.weight:g}·{term.fn}({term.source}{options})"


def _finished(plan: Plan, candidate: Candidate) -> dict[str, Any] | None:
    """The candidate's result, if it has one for these settings."""
    path = plan.out / candidate.name / RESULT
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    if result["settings"] != _settings(plan, candidate):
        raise ValueError(
            f"{path} was written for other settings of {candidate.name}; "
            "sweep into a fresh --out directory"
        )
    return result


def _settings(plan: Plan, candidate: Candidate) -> dict[str, Any]:
    """What a result depends on, as it reads back from JSON."""
    settings = {
        "model": candidate.model,
        "stage": candidate.stage,
        "quantization": plan.quantization,
    }
    return json.loads(json.dumps({k: dataclasses.asdict(v) for k, v in settings.items()}))


def _write_result(directory: Path, result: dict[str, Any]) -> None:
    atomic_write(directory / RESULT, lambda path: write_json(path, result))


def _announce(result: dict[str, Any]) -> None:
    print(
        f"{result['name']}: valid {METRIC} {result['valid'][METRIC]:.4f}, worst segment "
        f"retention {result['valid']['worst_segment']['retention']:.3f}, "
        f"int8 {result['int8']['valid'][METRIC]:.4f}",
        file=sys.stderr,
    )


# ----------------------------------------------------------------------------- report


def build_sweep_report(out: Path) -> Path:
    """``report/index.html`` (frontier plot embedded) and ``report/report.md`` of a sweep."""
    out = Path(out)
    summary = json.loads((out / SUMMARY).read_text())
    selection = summary["selection"]
    rows = [_row(r, selection) for r in summary["candidates"].values()]
    chosen = selection["chosen"]
    winners = _segment_winners(summary["candidates"].values())
    context = {
        "run": str(out),
        "summary": summary,
        "selection": selection,
        "metric": METRIC,
        "rows": rows,
        "chosen": None if chosen is None else next(r for r in rows if r["name"] == chosen),
        "compression": _compression(summary) if chosen is not None else None,
        "winners": winners,
        "wins": Counter(w["winner"] for w in winners).most_common(),
        "figure": _frontier_figure(rows, summary),
        "load_average": np.mean(
            [r["latency_ms"]["load_average"] for r in summary["candidates"].values()]
        ),
    }
    environment = template_environment()
    report = out / REPORT
    report.mkdir(exist_ok=True)
    (report / "index.html").write_text(environment.get_template("sweep.html.j2").render(context))
    (report / "report.md").write_text(environment.get_template("sweep.md.j2").render(context))
    return report / "index.html"


def _row(result: dict[str, Any], selection: dict[str, Any]) -> dict[str, Any]:
    model, worst, int8 = result["model"], result["valid"]["worst_segment"], result["int8"]
    return {
        "name": result["name"],
        "architecture": result["architecture"],
        "shape": f"emb {model['embedding_dim']}, tower {model['tower']}, feat {model['feature_dim']}",
        "mix": result["mix"],
        "losses": " + ".join(result["losses"]),
        "ndcg": result["valid"][METRIC],
        "worst": worst["retention"],
        "worst_slice": f"{worst['segment']} = {worst['value']} ({worst['users']})",
        "params": result["params"],
        "bytes": result["artifact_bytes"],
        "p50": result["latency_ms"]["wall"]["p50"],
        "p99": result["latency_ms"]["wall"]["p99"],
        "cpu_p99": result["latency_ms"]["cpu"]["p99"],
        "budget_p99": result["latency_ms"][selection["latency_clock"]]["p99"],
        "int8_ndcg": int8["valid"][METRIC],
        "int8_worst": int8["valid"]["worst_segment"]["retention"],
        "int8_bytes": int8["artifact_bytes"],
        "int8_p99": int8["latency_ms"]["wall"]["p99"],
        "int8_cpu_p99": int8["latency_ms"]["cpu"]["p99"],
        "int8_budget_p99": int8["latency_ms"][selection["latency_clock"]]["p99"],
        "frontier": result["name"] in selection["frontier"],
        "within_budget": result["name"] in selection["within_budget"],
        "chosen": result["name"] == selection["chosen"],
    }


def _compression(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Float against int8 for the chosen student: quality, size and latency, with ratios."""
    best, int8 = summary["models"][BEST], summary["models"][BEST_INT8]
    measures = [
        (f"validation {METRIC}", best["valid"][METRIC], int8["valid"][METRIC], 4),
        (f"test {METRIC}", best["metrics"][METRIC], int8["metrics"][METRIC], 4),
        ("test full_ndcg@10", best["metrics"]["full_ndcg@10"], int8["metrics"]["full_ndcg@10"], 4),
        (
            "worst-segment retention",
            best["valid"]["worst_segment"]["retention"],
            int8["valid"]["worst_segment"]["retention"],
            3,
        ),
        ("artifact bytes", best["artifact_bytes"], int8["artifact_bytes"], 0),
    ]
    for clock in CLOCKS:
        for stat in ("p50", "p99"):
            label = f"{stat} latency, {clock} clock (ms)"
            measures.append(
                (label, best["latency_ms"][clock][stat], int8["latency_ms"][clock][stat], 3)
            )
    return [
        {"measure": label, "float": a, "int8": b, "ratio": b / a, "digits": digits}
        for label, a, b, digits in measures
    ]


def _segment_winners(results) -> list[dict[str, Any]]:
    """Per segment, the loss mix with the best validation NDCG@10, averaged over architectures."""
    frame = pd.DataFrame(
        [
            {
                "segment": s["segment"],
                "value": s["value"],
                "users": s["users"],
                "mix": r["mix"],
                METRIC: s[METRIC],
            }
            for r in results
            for s in r["valid"]["segments"]
        ]
    )
    by_mix = frame.groupby(["segment", "value", "users", "mix"], sort=False)[METRIC].mean()
    winners = []
    for (segment, value, users), group in by_mix.groupby(level=[0, 1, 2], sort=False):
        ranked = group.sort_values(ascending=False)
        mixes = ranked.index.get_level_values("mix")
        winners.append(
            {
                "segment": segment,
                "value": value,
                "users": users,
                "winner": mixes[0],
                "winner_ndcg": ranked.iloc[0],
                "runner_up": mixes[1] if len(ranked) > 1 else None,
                "margin": ranked.iloc[0] - ranked.iloc[1] if len(ranked) > 1 else None,
            }
        )
    return winners


def _budget_line(axis, value: float, data: list[float], label: str, *, vertical: bool) -> None:
    """A budget line where it falls near the data; further out, only its legend entry (the
    axis stretched to reach it would squeeze every candidate into a corner)."""
    low, high = min(data), max(data)
    span = max(high - low, 0.05 * abs(high))
    if low - span <= value <= high + span:
        draw = axis.axvline if vertical else axis.axhline
        draw(value, color="red", ls=":", label=label)
    else:
        beyond = value > high
        side = (
            ("right of" if beyond else "left of") if vertical else ("above" if beyond else "below")
        )
        axis.plot([], [], color="red", ls=":", label=f"{label}: {side} the plotted range")


def _frontier_figure(rows: list[dict[str, Any]], summary: dict[str, Any]) -> str:
    selection = summary["selection"]
    mixes = list(dict.fromkeys(r["mix"] for r in rows))
    colours = {mix: f"C{i % 10}" for i, mix in enumerate(mixes)}
    largest = max(max(r["bytes"], r["int8_bytes"]) for r in rows)
    figure = Figure(figsize=(12, 6))
    axis = figure.subplots()
    for r in rows:
        colour = colours[r["mix"]]
        axis.plot(
            [r["budget_p99"], r["int8_budget_p99"]],
            [r["ndcg"], r["int8_ndcg"]],
            color=colour,
            lw=0.5,
        )
        axis.scatter(
            r["budget_p99"],
            r["ndcg"],
            s=400 * r["bytes"] / largest,
            color=colour,
            alpha=0.85 if r["within_budget"] else 0.3,
            edgecolors="black" if r["frontier"] else "none",
            linewidths=1.8,
            zorder=3,
        )
        axis.scatter(
            r["int8_budget_p99"],
            r["int8_ndcg"],
            s=400 * r["int8_bytes"] / largest,
            marker="s",
            facecolors="none",
            edgecolors=colour,
            zorder=2,
        )
        if r["chosen"]:
            axis.annotate(
                f"chosen: {r['name']}",
                (r["budget_p99"], r["ndcg"]),
                xytext=(8, 8),
                textcoords="offset points",
                fontsize=9,
                fontweight="bold",
            )
    latencies = [v for r in rows for v in (r["budget_p99"], r["int8_budget_p99"])]
    qualities = [v for r in rows for v in (r["ndcg"], r["int8_ndcg"])]
    slices = summary["candidates"][rows[0]["name"]]["valid"]["segments"]
    teacher = next(s for s in slices if s["segment"] == ALL)
    floor = teacher[f"teacher_{METRIC}"] * selection["min_worst_segment_retention"]
    p99_label = f"p99 budget {selection['p99_ms']} ms"
    _budget_line(axis, selection["p99_ms"], latencies, p99_label, vertical=True)
    floor_label = (
        f"teacher × {selection['min_worst_segment_retention']} (retention budget, all users)"
    )
    _budget_line(axis, floor, qualities, floor_label, vertical=False)
    axis.scatter([], [], color="white", edgecolors="black", linewidths=1.8, label="Pareto frontier")
    for mix, colour in colours.items():
        axis.scatter([], [], color=colour, label=mix)
    axis.scatter([], [], marker="s", facecolors="none", edgecolors="grey", label="int8 copy")
    axis.set_xlabel(
        f"p99 scoring latency, {selection['latency_clock']} clock (ms, 100 candidates, one thread)"
    )
    axis.set_ylabel(f"validation {METRIC}")
    axis.set_title(
        "marker area = artifact bytes; faded = outside the budget; squares = int8 copies",
        fontsize=9,
    )
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.tight_layout()
    return figure_png(figure)
