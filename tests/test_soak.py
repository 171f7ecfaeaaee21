import json
from dataclasses import replace

import numpy as np
import pytest

from loadtest.capacity import STEP_SHARES, find_capacity
from loadtest.client_stats import ClientStats, Timeline
from loadtest.reloads import CORRUPT, GOOD, OUTSIDE, ReloadOutcome
from loadtest.soak import SoakSettings, describe, run_soak, write_result
from loadtest.soak_stats import MIB, judge, minute_rows

START = 1_000_000.0


def outcome(at: float, kind: str, problem: str | None = None) -> ReloadOutcome:
    status = {GOOD: 200, CORRUPT: 422, OUTSIDE: 403}[kind]
    return ReloadOutcome(START + at, kind, f"/root/{kind}", status, "v1", problem)


def test_minute_rows_bin_requests_reloads_and_memory_by_minute_from_the_start():
    finished = START + np.array([1.0, 30.0, 59.0, 61.0, 119.0, 125.0])  # the last one is late
    timeline = Timeline(
        finished_at=finished,
        ms=np.array([1.0, 2.0, 3.0, 4.0, 90.0, 5.0]),
        failed=np.array([False, False, False, True, False, False]),
    )
    reloads = [
        outcome(5, GOOD),
        outcome(10, CORRUPT),
        outcome(10, OUTSIDE),
        outcome(70, GOOD, problem="status 422"),
    ]
    memory = [(START, 100 * MIB), (START + 30, 300 * MIB), (START + 50, 110 * MIB)]
    memory.append((START + 65, 120 * MIB))

    rows = minute_rows(timeline, reloads, memory, START, minutes=2)

    first, second = rows
    assert (first.minute, first.requests, first.failures) == (1, 3, 0)
    assert (first.p50_ms, first.p99_ms) == (2.0, 3.0)
    assert (first.reloads_applied, first.reloads_refused, first.reloads_unexpected) == (1, 2, 0)
    assert (first.rss_min_mib, first.rss_max_mib) == (100, 300)
    assert (second.minute, second.requests, second.failures) == (2, 3, 1)
    assert second.p99_ms == 90.0
    assert (second.reloads_applied, second.reloads_refused, second.reloads_unexpected) == (0, 0, 1)
    assert (second.rss_min_mib, second.rss_max_mib) == (120, 120)


def test_judge_fails_each_criterion_on_its_own_evidence():
    timeline = Timeline(
        finished_at=START + np.array([1.0, 70.0, 130.0]),
        ms=np.array([1.0, 2.0, 3.0]),
        failed=np.zeros(3, dtype=bool),
    )
    reloads = [outcome(5, GOOD), outcome(6, CORRUPT), outcome(6, OUTSIDE)]
    # Minute 2's floor is the baseline, not minute 1's; peaks do not count.
    memory = [(START, 50 * MIB), (START + 60, 100 * MIB), (START + 170, 109 * MIB)]
    memory.append((START + 175, 300 * MIB))
    rows = minute_rows(timeline, reloads, memory, START, minutes=3)
    assert all(verdict.passed for verdict in judge(rows, reloads, 50.0))

    def failed(rows=rows, reloads=reloads) -> list[str]:
        return [verdict.criterion for verdict in judge(rows, reloads, 50.0) if not verdict.passed]

    assert failed(rows=[replace(rows[1], failures=1)]) == ["no failed requests"]
    assert failed(rows=[*rows, replace(rows[2], p99_ms=50.5)]) == [
        "p99 within 50 ms in every minute"
    ]
    assert failed(reloads=[*reloads, outcome(7, GOOD, "status 422")]) == [
        "every good reload applied"
    ]
    assert failed(reloads=[*reloads, outcome(8, CORRUPT, "status 200")]) == [
        "every bad reload refused, the old model serving"
    ]
    assert failed(reloads=reloads[:2]) == ["every bad reload refused, the old model serving"]
    assert failed(rows=[*rows[:2], replace(rows[2], rss_min_mib=111.0)]) == [
        "server RSS floor growth from minute 2 to the end < 10%"
    ]


def client_at(rps: float, p99_ms: float) -> ClientStats:
    return ClientStats(
        requests=round(rps * 10), failures=0, seconds=10.0, cpu_seconds=2.0,
        p50_ms=p99_ms / 4, p95_ms=p99_ms / 2, p99_ms=p99_ms, max_ms=p99_ms * 2,
    )  # fmt: skip


def test_capacity_steps_down_to_the_first_rate_that_holds_the_budget():
    offered = []

    def measure(load):
        if load.user_rps is None:
            return client_at(1000.0, p99_ms=200.0)
        rps = load.users * load.user_rps
        offered.append(rps)
        # Over 700 RPS the latency explodes; at 800 the server also falls short of the rate.
        if rps > 750:
            return client_at(min(rps, 760.0), p99_ms=120.0)
        return client_at(rps * 0.89 if rps > 650 else rps, p99_ms=20.0)

    capacity = find_capacity(measure, p99_budget_ms=50.0, progress=lambda line: None)

    assert offered == pytest.approx([1000.0, 900.0, 800.0, 700.0, 600.0])
    assert capacity.sustained_rps == pytest.approx(600.0)
    assert "over the 50 ms budget" in capacity.steps[0].problems[0]
    assert "623 RPS achieved of 700 offered" in capacity.steps[3].problems
    assert not capacity.generator_bound


def test_capacity_reports_none_when_no_rate_holds_the_budget():
    def measure(load):
        rps = 500.0 if load.user_rps is None else load.users * load.user_rps
        return client_at(rps, p99_ms=80.0)

    capacity = find_capacity(measure, p99_budget_ms=50.0, progress=lambda line: None)
    assert capacity.sustained_rps is None
    assert len(capacity.steps) == len(STEP_SHARES)


@pytest.mark.slow
def test_a_short_soak_applies_good_reloads_and_refuses_bad_ones(tiny_artifacts, tmp_path):
    settings = SoakSettings(
        artifacts=(tiny_artifacts["teacher"], tiny_artifacts["student"]),
        out=tmp_path / "soak",
        minutes=0.25,
        rps=30.0,
        reload_every_s=1.5,
        bad_every=2,
    )
    lines = []
    result = run_soak(settings, progress=lines.append)

    kinds = [(reload.kind, reload.status) for reload in result.reloads]
    assert kinds.count((GOOD, 200)) >= 6
    assert kinds.count((CORRUPT, 422)) >= 3
    assert kinds.count((OUTSIDE, 403)) >= 3
    assert set(kinds) == {(GOOD, 200), (CORRUPT, 422), (OUTSIDE, 403)}
    assert [reload.problem for reload in result.reloads] == [None] * len(result.reloads)
    # A bad reload leaves the version the good reload before it put in place.
    for before, after in zip(result.reloads, result.reloads[1:]):
        if after.kind != GOOD:
            assert after.serving == before.serving
    assert len({reload.serving for reload in result.reloads}) == 2

    (row,) = result.minutes
    assert row.requests > 0 and row.failures == 0
    assert row.reloads_applied + row.reloads_refused == len(result.reloads)
    assert 0 < row.rss_min_mib <= row.rss_max_mib
    verdicts = {verdict.criterion: verdict.passed for verdict in result.verdicts}
    assert verdicts["no failed requests"]
    assert verdicts["every good reload applied"]
    assert verdicts["every bad reload refused, the old model serving"]
    assert "reloads applied" in describe(result) and lines[0].startswith("soak: 30 RPS")

    write_result(result, tmp_path / "soak.json")
    written = json.loads((tmp_path / "soak.json").read_text())
    assert len(written["minutes"]) == 1 and len(written["reloads"]) == len(result.reloads)
