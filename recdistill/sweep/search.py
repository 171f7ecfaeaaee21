"""Train every candidate (in a pool of processes), score it and its int8 copy on validation,
time it, and measure its simulated impact against the teacher.

A candidate's result is written atomically to its ``result.json``; a candidate with a result
for the same settings is skipped on a rerun, and a half-trained one resumes from its
checkpoint. A result is a :class:`~recdistill.summary.CandidateResult`, its latency left
out until every candidate is trained and timed, its impact until every one is timed.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from typing import Any

import torch
from safetensors.torch import save_file

from recdistill.files import atomic_write, write_json
from recdistill.layout import CandidateLayout, SweepLayout
from recdistill.quantize import plain_state, quantize
from recdistill.recipe import train_stage
from recdistill.summary import CandidateResult, CandidateTraining, Int8Result, from_json, to_json
from recdistill.sweep.bench import Bench, one_torch_thread
from recdistill.sweep.impact import measure_impact
from recdistill.sweep.latency import measure_latency
from recdistill.sweep.plan import METRIC, Candidate, Plan


def search(plan: Plan, *, jobs: int = 1) -> list[CandidateResult]:
    """Every candidate's result (training, validation, int8, latency), resuming a stopped run."""
    plan.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(plan.config, SweepLayout(plan.out).config)
    pending = [c for c in plan.candidates if _finished(plan, c) is None]
    bench = Bench(plan)
    with one_torch_thread():
        if jobs > 1 and len(pending) > 1:
            _rank_once(bench, pending)
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
        untimed = [r for r in results if r.latency_ms is None]
        if untimed:
            timed = {r.name: r for r in measure_latency(bench, untimed)}
            results = [timed.get(r.name, r) for r in results]
        # Cheap beside training, and it depends on the rule and on every candidate (the
        # finalists): measured again on every run.
        results = measure_impact(bench, results)
        for result in results:
            write_result(_layout(plan, result.name), result)
    return results


def search_one(bench: Bench, candidate: Candidate) -> CandidateResult:
    """Train one candidate (or finish training it), score it and its int8 copy on validation."""
    layout = _layout(bench.plan, candidate.name)
    # Teachers first: building them (once per process) draws on the RNG the seed below fixes.
    teachers = {name: bench.frozen[name] for name in candidate.stage.teachers}
    model, trained = train_stage(
        candidate.stage,
        candidate.model,
        teachers,
        bench.store,
        layout.root,
        resume=True,
    )
    int8 = quantize(model, bench.plan.quantization)
    atomic_write(layout.int8_weights, lambda path: save_file(plain_state(int8), str(path)))
    result = CandidateResult(
        name=candidate.name,
        architecture=candidate.architecture,
        mix=candidate.mix,
        model=dataclasses.asdict(candidate.model),
        settings=_settings(bench.plan, candidate),
        losses=[term.describe() for term in candidate.stage.losses],
        params=model.parameter_count(),
        multiply_adds=model.multiply_adds()["per_candidate"],
        training=CandidateTraining(trained.best_epoch, trained.epochs_run, trained.seconds),
        valid=bench.validate(model),
        artifact_bytes=layout.weights.stat().st_size,
        int8=Int8Result(
            quantization=bench.plan.quantization,
            valid=bench.validate(int8),
            artifact_bytes=layout.int8_weights.stat().st_size,
        ),
    )
    write_result(layout, result)
    return result


def _rank_once(bench: Bench, pending: list[Candidate]) -> None:
    """What the teachers compute per train row (a sequence teacher's states, the rankings
    RRD lists are drawn from), computed here and cached in the base run before the workers
    start, rather than by each worker at once."""
    for candidate in pending:
        stage = candidate.stage
        for name in stage.teachers:
            teacher = bench.frozen[name]
            if stage.lists is not None and name in stage.ranked_sources:
                teacher.ranked(stage.lists.depth)


def write_result(layout: CandidateLayout, result: CandidateResult) -> None:
    atomic_write(layout.result, lambda path: write_json(path, to_json(result)))


_WORKER_BENCH: Bench | None = None


def _start_worker(plan: Plan) -> None:
    global _WORKER_BENCH
    torch.set_num_threads(1)
    _WORKER_BENCH = Bench(plan)


def _search_in_worker(candidate: Candidate) -> CandidateResult:
    return search_one(_WORKER_BENCH, candidate)


def _layout(plan: Plan, name: str) -> CandidateLayout:
    return SweepLayout(plan.out).candidate(name)


def _finished(plan: Plan, candidate: Candidate) -> CandidateResult | None:
    """The candidate's result, if it has one for these settings."""
    path = _layout(plan, candidate.name).result
    if not path.exists():
        return None
    result = from_json(CandidateResult, json.loads(path.read_text()))
    if result.settings != _settings(plan, candidate):
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


def _announce(result: CandidateResult) -> None:
    print(
        f"{result.name}: valid {METRIC} {result.valid.ndcg:.4f}, worst segment "
        f"retention {result.valid.worst_segment.retention:.3f}, "
        f"int8 {result.int8.valid.ndcg:.4f}",
        file=sys.stderr,
    )
