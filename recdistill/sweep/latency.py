"""The sweep's latency benchmark: every float and int8 candidate served through
``OnlineRanker.rank`` on one thread, with training over so that candidates do not slow each
other down. Every request runs the user tower (no user-vector cache, which would time every
model alike), as a user's first request to a model version does.

Models take turns in interleaved rounds of 100-candidate validation lists, timed on the wall
clock and on the thread's CPU clock. The p99 is the median over rounds of each round's p99, so
a burst of load elsewhere moves one round, not the verdict.
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq

from recdistill.layout import DataLayout, SweepLayout
from recdistill.online import OnlineRanker
from recdistill.summary import CandidateResult, ClockLatency, Latency
from recdistill.sweep.bench import Bench
from recdistill.sweep.plan import CLOCKS, Candidate

WARM_UP_REQUESTS = 20
VARIANTS = ("float", "int8")


def measure_latency(bench: Bench, results: list[CandidateResult]) -> list[CandidateResult]:
    """``results`` with the float and int8 ``latency_ms`` of ``OnlineRanker.rank``: p50 and
    p99 on each clock, and the machine's load average meanwhile."""
    plan = bench.plan
    lists = pq.read_table(DataLayout(plan.data).candidates("valid"))
    users = lists.column("user_id").to_numpy()
    candidates = np.array(lists.column("candidates").to_pylist(), dtype=np.int64)
    by_name = {c.name: c for c in plan.candidates}
    rankers = {
        (r.name, variant): candidate_ranker(bench, by_name[r.name], variant, r.params)
        for r in results
        for variant in VARIANTS
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

    def latency(name: str, variant: str) -> ClockLatency:
        on = {}
        for clock in CLOCKS:
            times = rounds[(name, variant), clock]
            on[clock] = Latency(
                p50=float(np.median(np.concatenate(times))),
                p99=float(np.median([np.percentile(t, 99) for t in times])),
            )
        return ClockLatency(load_average=load_average, **on)

    return [
        replace(
            result,
            latency_ms=latency(result.name, "float"),
            int8=replace(result.int8, latency_ms=latency(result.name, "int8")),
        )
        for result in results
    ]


def candidate_ranker(bench: Bench, candidate: Candidate, variant: str, params: int) -> OnlineRanker:
    """The candidate served as its artifact would be, straight from the sweep directory."""
    layout = SweepLayout(bench.plan.out).candidate(candidate.name)
    quantization = bench.plan.quantization if variant == "int8" else None
    weights = layout.int8_weights if variant == "int8" else layout.weights
    model = bench.load(candidate.model, weights, quantization)
    return bench.ranker(candidate.name, model, params, quantization)
