import argparse
import math
import os
import random
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from loadtest import runner
from loadtest.__main__ import add_load_arguments, load_settings, main, parse_duration
from loadtest.capacity import Cost, serving_cost
from loadtest.client_stats import ClientStats
from loadtest.runner import (
    CorePlan,
    LoadTestSettings,
    describe_outcome,
    format_table,
    gate_problems,
    plan_cores,
    run_load_test,
    serve_artifact,
)
from loadtest.server_metrics import bucket_difference, histogram_quantile, rank_latency_buckets
from loadtest.workload import RankCall, Workload, check_ranking
from recdistill.server import ServerProcess, running_server

CALL = RankCall(kind="known", body={"user_id": 1, "candidates": [10, 11, 12], "k": 2})


def ranked(*pairs: tuple[int, float]) -> dict:
    return {"items": [{"item_id": item, "score": score} for item, score in pairs]}


def test_check_ranking_accepts_the_top_k_sorted_by_score():
    assert check_ranking(ranked((11, 2.0), (10, 1.5)), CALL) is None


def test_check_ranking_returns_every_candidate_without_k():
    call = RankCall(kind="known", body={"user_id": 1, "candidates": [10, 11, 12]})
    assert check_ranking(ranked((11, 2.0), (10, 1.5), (12, 1.0)), call) is None
    assert "expected 3" in check_ranking(ranked((11, 2.0), (10, 1.5)), call)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (ranked((10, 1.5), (11, 2.0)), "not sorted"),
        (ranked((11, 2.0)), "1 items returned, expected 2"),
        (ranked((11, 2.0), (10, 1.5), (12, 1.0)), "3 items returned, expected 2"),
        (ranked((11, 2.0), (99, 1.5)), "not distinct candidates"),
        (ranked((11, 2.0), (11, 2.0)), "not distinct candidates"),
        (ranked((11, 2.0), (10, None)), "numeric score"),
        ({"detail": "oops"}, "no list of items"),
    ],
)
def test_check_ranking_names_what_is_wrong(body, problem):
    assert problem in check_ranking(body, CALL)


def test_workload_mixes_known_cold_start_and_session_requests(tiny_artifacts):
    workload = Workload.from_artifact(tiny_artifacts["student"], candidates=100)
    rng = random.Random(0)
    calls = [workload.sample(rng) for _ in range(500)]
    known_users, items = set(workload.users), set(workload.items)

    kinds = {call.kind for call in calls}
    assert kinds == {"known", "known+session", "cold-start", "cold-start+session"}
    for call in calls:
        candidates = call.body["candidates"]
        assert len(candidates) == len(set(candidates)) == 100
        assert set(candidates) <= items
        assert (call.body["user_id"] in known_users) == call.kind.startswith("known")
        assert ("recent_items" in call.body) == call.kind.endswith("+session")
    assert {call.expected_length for call in calls} == {10, 100}


def test_workload_refuses_more_candidates_than_items(tiny_artifacts):
    with pytest.raises(ValueError, match="items"):
        Workload.from_artifact(tiny_artifacts["student"], candidates=10**6)


def test_histogram_quantile_interpolates_within_the_bucket_like_prometheus():
    buckets = {0.001: 10.0, 0.002: 60.0, 0.005: 100.0, math.inf: 100.0}
    # rank 0.99 * 100 = 99 falls in (0.002, 0.005], holding 40: 0.002 + 0.003 * 39 / 40.
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.004925)
    # rank 50 falls in (0.001, 0.002], holding 50: 0.001 + 0.001 * 40 / 50.
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.0018)
    # rank 5 falls in the first bucket, which starts at 0: 0.001 * 5 / 10.
    assert histogram_quantile(0.05, buckets) == pytest.approx(0.0005)
    # In the +Inf bucket the answer is the largest finite bound.
    assert histogram_quantile(0.99, {0.001: 50.0, math.inf: 100.0}) == 0.001
    assert histogram_quantile(0.99, {0.001: 0.0, math.inf: 0.0}) is None


EXPOSITION = """\
# HELP recdistill_rank_latency_seconds Server-side /rank latency.
# TYPE recdistill_rank_latency_seconds histogram
recdistill_rank_latency_seconds_bucket{arm="a",le="0.001",model="student"} 3.0
recdistill_rank_latency_seconds_bucket{arm="a",le="0.002",model="student"} 5.0
recdistill_rank_latency_seconds_bucket{arm="a",le="+Inf",model="student"} 6.0
recdistill_rank_latency_seconds_count{arm="a",model="student"} 6.0
recdistill_rank_latency_seconds_sum{arm="a",model="student"} 0.01
recdistill_rank_latency_seconds_bucket{arm="b",le="0.001",model="teacher"} 1.0
recdistill_rank_latency_seconds_bucket{arm="b",le="0.002",model="teacher"} 1.0
recdistill_rank_latency_seconds_bucket{arm="b",le="+Inf",model="teacher"} 2.0
recdistill_rank_latency_seconds_count{arm="b",model="teacher"} 2.0
recdistill_rank_latency_seconds_sum{arm="b",model="teacher"} 0.01
# HELP recdistill_http_requests_total HTTP requests by route and status code.
# TYPE recdistill_http_requests_total counter
recdistill_http_requests_total{route="/rank",status="200"} 8.0
"""


def test_rank_latency_buckets_sum_models_and_subtract_an_earlier_snapshot():
    after = rank_latency_buckets(EXPOSITION)
    assert after == {0.001: 4.0, 0.002: 6.0, math.inf: 8.0}
    before = {0.001: 4.0, 0.002: 4.0, math.inf: 4.0}
    assert bucket_difference(after, before) == {0.001: 0.0, 0.002: 2.0, math.inf: 4.0}
    assert bucket_difference(after, {}) == after


HEALTHY = ClientStats(
    requests=1000, failures=0, seconds=10.0, cpu_seconds=3.0,
    p50_ms=1.0, p95_ms=3.0, p99_ms=5.0, max_ms=9.0,
)  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({}, None),
        ({"p99_ms": 50.0}, None),
        ({"p99_ms": 50.5}, "p99 50.50 ms is over the 50 ms budget"),
        ({"failures": 3}, "3 of 1000 requests failed"),
        ({"cpu_seconds": 9.5}, "the load generator used 95% of a core"),
        ({"requests": 0}, "no request completed"),
    ],
)
def test_the_gate_fails_on_latency_failures_and_a_saturated_load_generator(changes, problem):
    problems = gate_problems(replace(HEALTHY, **changes), p99_budget_ms=50.0)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0]


def settings_from(argv: list[str]) -> LoadTestSettings:
    parser = argparse.ArgumentParser()
    add_load_arguments(parser)
    return load_settings(parser.parse_args(argv), artifact=Path("a"), out=Path("out"))


def test_server_options_become_server_args_and_only_those_given():
    assert settings_from([]).server_args == ()
    assert settings_from([]).workers == 1
    settings = settings_from(
        ["--no-precompute-items", "--inference", "torchrec", "--user-cache", "0", "--workers", "2"]
    )
    assert settings.server_args == (
        "--no-precompute-items", "--inference", "torchrec", "--user-cache", "0",
    )  # fmt: skip
    assert settings.workers == 2
    assert settings_from(["--precompute-items"]).server_args == ("--precompute-items",)


def test_the_server_args_and_workers_reach_the_server_command_line(monkeypatch, tmp_path):
    started = {}

    @contextmanager
    def recording_server(artifacts, **options):
        started.update(options, artifacts=artifacts)
        yield ServerProcess("http://127.0.0.1:1", process=None)

    monkeypatch.setattr(runner, "running_server", recording_server)
    plan = CorePlan({0, 1}, {2}, available=3)
    with serve_artifact(
        Path("a"), tmp_path, plan, server_args=("--inference", "torchrec"), workers=2
    ) as server:
        assert server.url == "http://127.0.0.1:1"

    assert started["artifacts"] == [Path("a")]
    assert started["extra_args"] == [
        "--workers", "2", "--threads", "1", "--inference", "torchrec",
    ]  # fmt: skip
    assert started["cpus"] == {0, 1}


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no core pinning here")
@pytest.mark.parametrize(
    ("available", "workers", "server", "load_generator", "server_cores"),
    [
        ({4, 5}, 1, {4}, {5}, 1),  # as before: the server on the first core, Locust the second
        ({0, 1, 2, 3}, 2, {0, 1}, {2}, 2),
        ({0, 1}, 2, None, None, 2),  # as many workers as cores: shared
        ({0, 1}, 3, None, None, 2),
        ({0}, 1, None, None, 1),
    ],
)
def test_plan_cores_pins_the_workers_only_while_a_core_is_left_for_locust(
    monkeypatch, available, workers, server, load_generator, server_cores
):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: available)
    plan = plan_cores(workers)
    assert (plan.server, plan.load_generator) == (server, load_generator)
    assert plan.server_cores == server_cores
    assert (plan.note is None) == (server is not None)
    if server is None:
        assert "share" in plan.note


def test_several_workers_leave_the_server_histogram_unread(tiny_artifacts, monkeypatch, tmp_path):
    def unreachable(url):
        raise AssertionError("a scrape reaches one worker only")

    monkeypatch.setattr(runner, "scrape_rank_latency", unreachable)
    monkeypatch.setattr(runner, "_run_locust", lambda settings, url, cores: HEALTHY)
    settings = LoadTestSettings(
        artifact=tiny_artifacts["student"], out=tmp_path, host="http://127.0.0.1:1", workers=2
    )
    result = run_load_test(settings)

    assert result.ok and result.server_p99_ms is None and result.server_requests == 0
    assert any("each of the 2 workers keeps its own metrics" in note for note in result.notes)


@pytest.mark.parametrize(
    ("sustained_rps", "server_cores", "cost"),
    [
        (900.0, 1, Cost(900.0, 12)),
        (1000.0, 2, Cost(500.0, 20)),  # dividing the target exactly: not a core more
        (1000.0, 3, Cost(1000.0 / 3, 30)),
        (20_000.0, 1, Cost(20_000.0, 1)),
        (None, 1, None),
    ],
)
def test_serving_cost_is_rps_per_core_and_the_cores_for_the_target(
    sustained_rps, server_cores, cost
):
    assert serving_cost(sustained_rps, server_cores, target_rps=10_000) == cost


def test_parse_duration():
    assert [parse_duration(text) for text in ("20", "20s", "1m30s", "1h")] == [20, 20, 90, 3600]


@pytest.mark.slow
def test_a_short_run_against_the_student_passes(tiny_artifacts, tmp_path):
    out = tmp_path / "loadtest"
    # The gate's arithmetic is tested above; this run checks the mechanics, not how fast a
    # shared test machine is (the 50 ms budget is measured by `make loadtest` and benchmarks).
    settings = LoadTestSettings(
        artifact=tiny_artifacts["student"], out=out, users=4, run_time_s=8, p99_budget_ms=10_000.0
    )
    result = run_load_test(settings)

    assert result.ok, describe_outcome(result)
    assert result.model == "student"
    assert result.client.requests > 0 and result.client.failures == 0
    assert result.server_requests > 0 and result.server_p99_ms > 0
    for report in ("locust_stats.csv", "locust_failures.csv", "locust.html"):
        assert (out / report).stat().st_size > 0
    table = format_table([result])
    assert "p99 ms" in table and "server p99 ms" in table and "student" in table
    assert describe_outcome(result).startswith("PASS")


@pytest.mark.slow
def test_an_impossible_budget_fails_the_run_and_says_why(tiny_artifacts, tmp_path, capsys):
    student = tiny_artifacts["student"]
    with running_server([student], impressions=tmp_path / "impressions.jsonl") as server:
        code = main(
            [
                "--artifact", str(student), "--host", server.url, "--out", str(tmp_path / "out"),
                "--users", "2", "--run-time", "3s", "--p99-ms", "0.1",
            ]
        )  # fmt: skip

    printed = capsys.readouterr().out
    assert code == 1
    assert "server p99 ms" in printed
    assert "FAIL: p99" in printed and "over the 0.1 ms budget" in printed


def test_without_the_loadtest_extra_the_message_names_it():
    """locust, gevent and psutil are an extra: a library user without them who starts the
    load test is told which extra brings them."""
    hide_psutil = (
        "import importlib.util as u; found = u.find_spec; "
        "u.find_spec = lambda name, *a: None if name == 'psutil' else found(name, *a); "
        "import loadtest"
    )
    run = subprocess.run(
        [sys.executable, "-c", hide_psutil], check=False, capture_output=True, text=True
    )
    assert run.returncode == 1
    assert run.stderr.strip().endswith(
        "MissingExtra: the load test needs psutil: pip install 'recdistill[loadtest]'"
    )
