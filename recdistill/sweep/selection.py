"""Choose a student by the rule of ``[selection]``, score it on test and write it as a run's model.

:func:`select` keeps the Pareto frontier (NDCG@10 up; p99 and artifact bytes down) and
chooses by the rule (:meth:`~recdistill.summary.SelectionSpec.describe`): among the
candidates within the latency (and size) budget whose simulated interleaving with the
teacher is non-inferior and none of whose validation segments is losing, the
``finalists`` smallest take an A/B test; the smallest of those the A/B does not find worse
beyond the margin is chosen.
:func:`finalize` scores the chosen student, float and int8, once on test and writes them as
``best`` and ``best_int8`` in a run's layout (the summary, the config and each one's weights),
so that ``recdistill export --run OUT --model best`` works. Nothing before it reads the test
split.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np

from recdistill.abtest.analysis import INFERIOR, NON_INFERIOR
from recdistill.abtest.world import truth_of
from recdistill.data.tables import read_meta
from recdistill.evaluate import evaluate, mean_metrics
from recdistill.layout import SweepLayout
from recdistill.recipe import StageRecord, write_record
from recdistill.summary import (
    CandidateResult,
    ChosenModel,
    Selection,
    SelectionSpec,
    SweepSummary,
    ValidScore,
    to_json,
    write_summary,
)
from recdistill.sweep.bench import Bench, one_torch_thread
from recdistill.sweep.plan import Plan

BEST, BEST_INT8 = "best", "best_int8"


@dataclass(frozen=True)
class Choice:
    frontier: tuple[str, ...]
    within_budget: tuple[str, ...]
    qualified: tuple[str, ...]
    chosen: str | None


def select(results: list[CandidateResult], rule: SelectionSpec) -> Choice:
    """The frontier, the candidates within the budget, those meeting the whole rule (the
    smallest first) and the chosen one."""
    qualified = [
        r
        for r in finalists(results, rule)
        if r.impact.ab is None or r.impact.ab.standing != INFERIOR
    ]
    return Choice(
        frontier=tuple(pareto_frontier(results, rule)),
        within_budget=tuple(r.name for r in results if within_budget(r, rule)),
        qualified=tuple(r.name for r in qualified),
        chosen=qualified[0].name if qualified else None,
    )


def within_budget(result: CandidateResult, rule: SelectionSpec) -> bool:
    """Fast enough (p99 on the rule's clock) and, if the rule says, small enough."""
    return rule.p99(result.latency_ms) <= rule.p99_ms and (
        rule.max_artifact_bytes is None or result.artifact_bytes <= rule.max_artifact_bytes
    )


def finalists(results: list[CandidateResult], rule: SelectionSpec) -> list[CandidateResult]:
    """The ``rule.finalists`` smallest candidates (parameters; then the larger interleaved
    lift) within the budget whose interleaving with the teacher is non-inferior and none of
    whose validation segments is losing (:attr:`~recdistill.summary.SegmentScore.losing`)."""
    eligible = [
        r
        for r in results
        if within_budget(r, rule)
        and r.impact is not None
        and r.impact.standing == NON_INFERIOR
        and not any(s.losing for s in r.valid.segments)
    ]
    eligible.sort(key=lambda r: (r.params, -r.impact.lift, r.name))
    return eligible[: rule.finalists]


def pareto_frontier(results: list[CandidateResult], budget: SelectionSpec) -> list[str]:
    """Names of the candidates no other beats on quality, p99 latency and size at once
    (latency on the budget's clock)."""
    costs = {
        r.name: np.array([-r.valid.ndcg, budget.p99(r.latency_ms), r.artifact_bytes])
        for r in results
    }
    return [
        name
        for name, cost in costs.items()
        if not any(np.all(other <= cost) and np.any(other < cost) for other in costs.values())
    ]


def finalize(plan: Plan, results: list[CandidateResult], choice: Choice) -> dict[str, Any]:
    """Score the chosen student (float and int8) on test; write ``best``, ``best_int8`` and
    the summary, which is returned as written."""
    layout = SweepLayout(plan.out)
    source = read_meta(plan.data)["source"]
    candidates = {r.name: r for r in results}
    for name in (BEST, BEST_INT8):
        shutil.rmtree(layout.stage(name).root, ignore_errors=True)
    models = {}
    if choice.chosen is not None:
        bench = Bench(plan)
        candidate = next(c for c in plan.candidates if c.name == choice.chosen)
        result = candidates[choice.chosen]
        trained = layout.candidate(candidate.name)
        for name, weights, quantization, measured in (
            (BEST, trained.weights, None, result),
            (BEST_INT8, trained.int8_weights, plan.quantization, result.int8),
        ):
            with one_torch_thread():
                model = bench.load(candidate.model, weights, quantization)
                metrics = mean_metrics(evaluate(model, bench.store, "test"))
            chosen = layout.stage(name)
            chosen.root.mkdir()
            shutil.copyfile(weights, chosen.weights)
            write_record(
                chosen,
                StageRecord(
                    candidate.architecture, candidate.model, plan.history_length, quantization
                ),
            )
            models[name] = ChosenModel(
                preset=candidate.architecture,
                candidate=candidate.name,
                params=result.params,
                quantization=quantization,
                artifact_bytes=measured.artifact_bytes,
                latency_ms=measured.latency_ms,
                valid=ValidScore(measured.valid.ndcg, measured.valid.worst_segment),
                metrics=metrics,
            )
    summary = SweepSummary(
        data=str(plan.data),
        source=source,
        base_run=plan.sweep.base_run,
        search=plan.sweep.search,
        min_segment_users=plan.sweep.min_segment_users,
        selection=Selection(
            **dataclasses.asdict(plan.selection),
            chosen=choice.chosen,
            frontier=list(choice.frontier),
            within_budget=list(choice.within_budget),
            qualified=list(choice.qualified),
        ),
        models=models,
        candidates=candidates,
        impact=plan.impact,
        reference=plan.reference,
        truth=truth_of(plan.data, before_test=True),
    )
    write_summary(layout.summary, summary)
    return to_json(summary)
