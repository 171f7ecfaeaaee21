"""Run Locust headless against a ranking server and judge the run against the latency budget.

:func:`run_load_test` starts ``recdistill serve`` from the artifact (or targets a given
host), runs ``loadtest/locustfile.py`` in a Locust subprocess, reads the server's latency
histogram before and after, and returns a :class:`LoadTestResult` whose ``problems`` say why
the run fails its gate: a p99 over budget, any failed request, or a load generator so busy
that its own queueing is in the latencies it reports.

When it starts the server, it runs ``workers`` uvicorn workers of one torch thread each,
with ``server_args`` (more ``recdistill serve`` options). While the cores outnumber the
workers, the server gets the first ``workers`` cores and Locust (one process) the next one,
so they do not compete; with as many workers as cores or more, nothing is pinned and the
server and Locust share the cores. Each worker keeps its own Prometheus metrics, so with
more than one the server's latency histogram is not read.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loadtest.client_stats import ClientStats
from loadtest.server_metrics import (
    bucket_difference,
    histogram_quantile,
    observations,
    scrape_rank_latency,
)
from loadtest.workload import Workload
from recdistill.layout import LoadTestLayout
from recdistill.manifest import read_manifest
from recdistill.server import ServerProcess, running_server

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
MAX_GENERATOR_CPU = 0.9
LOCUST_EXIT_GRACE_S = 60


@dataclass(frozen=True)
class LoadTestSettings:
    artifact: Path
    out: Path
    host: str | None = None
    users: int = 8
    spawn_rate: float | None = None  # users started per second; None: all within a second
    user_rps: float | None = None  # each user's steady request rate; None: back to back
    run_time_s: int = 20
    candidates: int = 100
    p99_budget_ms: float = 50.0
    # When starting the server: more `recdistill serve` options, e.g. ("--inference", "torchrec").
    server_args: tuple[str, ...] = ()
    workers: int = 1  # the server's uvicorn workers (also when given a host: cores are planned)
    timeline: Path | None = None  # where Locust writes every request's time, latency, outcome


@dataclass(frozen=True)
class CorePlan:
    """Which cores the server and the load generator run on (None: not pinned), of the
    ``available`` cores."""

    server: set[int] | None
    load_generator: set[int] | None
    available: int
    note: str | None = None

    @property
    def server_cores(self) -> int:
        """The cores the server runs on: its own, or all of them, shared with the load
        generator, when it is not pinned."""
        return len(self.server) if self.server else self.available


@dataclass(frozen=True)
class LoadTestResult:
    model: str
    users: int
    client: ClientStats
    server_p99_ms: float | None
    server_requests: int
    p99_budget_ms: float
    problems: tuple[str, ...]
    notes: tuple[str, ...]
    out: Path

    @property
    def ok(self) -> bool:
        return not self.problems


def plan_cores(workers: int = 1) -> CorePlan:
    """The first ``workers`` cores for the server and the next for the load generator, if
    there is one left; otherwise nothing pinned."""
    if not hasattr(os, "sched_setaffinity"):
        return CorePlan(
            None, None, os.cpu_count() or 1, "cannot pin processes to cores on this platform"
        )
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return CorePlan(
            None, None, 1, "one core: server and load generator share it, latencies are pessimistic"
        )
    if workers >= len(cores):
        return CorePlan(
            None,
            None,
            len(cores),
            f"{workers} server workers on {len(cores)} cores: the server and the load generator "
            "share the cores, latencies are pessimistic",
        )
    return CorePlan(set(cores[:workers]), {cores[workers]}, len(cores))


@contextmanager
def serve_artifact(
    artifact: Path,
    out: Path,
    cores: CorePlan,
    *,
    server_args: tuple[str, ...] = (),
    workers: int = 1,
    artifact_root: Path | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[ServerProcess]:
    """A server of ``artifact``, ``workers`` workers of one torch thread each, with
    ``server_args``, on the server's cores of ``cores``."""
    extra_args = ["--workers", str(workers), "--threads", "1", *server_args]
    if artifact_root is not None:
        extra_args += ["--artifact-root", str(artifact_root)]
    with running_server(
        [artifact],
        impressions=LoadTestLayout(out).impressions,
        cpus=cores.server,
        extra_args=extra_args,
        env=env,
    ) as server:
        yield server


def run_load_test(settings: LoadTestSettings) -> LoadTestResult:
    """Run the load test of ``settings``; raises ``RuntimeError`` if Locust or the server
    could not run at all (a run that ran but failed its gate is a result with problems)."""
    model = artifact_name(settings.artifact)
    Workload.from_artifact(settings.artifact, settings.candidates)  # fail before serving
    settings.out.mkdir(parents=True, exist_ok=True)
    cores = plan_cores(settings.workers)
    if settings.host is not None:
        return _measure(settings, model, settings.host, cores)
    with serve_artifact(
        settings.artifact,
        settings.out,
        cores,
        server_args=settings.server_args,
        workers=settings.workers,
    ) as server:
        return _measure(settings, model, server.url, cores)


def _measure(settings: LoadTestSettings, model: str, url: str, cores: CorePlan) -> LoadTestResult:
    notes = [cores.note] if cores.note else []
    # With several workers a scrape reaches one of them, whose histogram has its requests only.
    read_server = settings.workers == 1
    before = scrape_rank_latency(url) if read_server else {}
    client = _run_locust(settings, url, cores)
    server = bucket_difference(scrape_rank_latency(url), before) if read_server else {}
    server_p99 = histogram_quantile(0.99, server)
    problems = gate_problems(client, settings.p99_budget_ms)
    if not read_server:
        notes.append(
            f"server-side latency not read: each of the {settings.workers} workers keeps "
            "its own metrics"
        )
    elif abs(observations(server) - client.requests) > settings.users:
        # Requests in flight when Locust stops are timed by the server but not by Locust.
        notes.append(
            f"the server timed {observations(server):.0f} /rank requests, Locust sent "
            f"{client.requests} (other traffic, or requests that failed or were cut off at the end)"
        )
    return LoadTestResult(
        model=model,
        users=settings.users,
        client=client,
        server_p99_ms=None if server_p99 is None else server_p99 * 1000,
        server_requests=int(observations(server)),
        p99_budget_ms=settings.p99_budget_ms,
        problems=tuple(problems),
        notes=tuple(notes),
        out=settings.out,
    )


def _run_locust(settings: LoadTestSettings, url: str, cores: CorePlan) -> ClientStats:
    layout = LoadTestLayout(settings.out)
    stats_path = layout.client_stats
    stats_path.unlink(missing_ok=True)
    log_path = layout.locust_log
    command = [
        sys.executable, "-m", "locust",
        "-f", str(LOCUSTFILE),
        "--headless", "--only-summary",
        "--host", url,
        "--users", str(settings.users),
        "--spawn-rate", str(settings.spawn_rate or settings.users),
        "--run-time", f"{settings.run_time_s}s",
        "--csv", str(layout.locust_csv_prefix),
        "--html", str(layout.locust_html),
        "--artifact", str(settings.artifact),
        "--candidates", str(settings.candidates),
        "--client-stats", str(stats_path),
    ]  # fmt: skip
    if settings.user_rps is not None:
        command += ["--user-rps", str(settings.user_rps)]
    if settings.timeline is not None:
        command += ["--timeline", str(settings.timeline)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    if cores.load_generator:
        os.sched_setaffinity(process.pid, cores.load_generator)
    try:
        process.wait(timeout=settings.run_time_s + LOCUST_EXIT_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise RuntimeError(f"Locust did not stop; its log: {log_path}") from None
    if not stats_path.exists():
        raise RuntimeError(
            f"Locust exited with code {process.returncode} before the test ended:\n"
            + "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        )
    return ClientStats.read(stats_path)


def gate_problems(client: ClientStats, p99_budget_ms: float) -> list[str]:
    """Why a run whose client saw ``client`` fails the gate; empty when it passes."""
    if client.requests == 0:
        return ["no request completed"]
    problems = []
    if client.p99_ms > p99_budget_ms:
        problems.append(f"p99 {client.p99_ms:.2f} ms is over the {p99_budget_ms:g} ms budget")
    if client.failures:
        problems.append(
            f"{client.failures} of {client.requests} requests failed "
            "(see Locust's failures CSV and HTML report in the output directory)"
        )
    if client.cpu_share > MAX_GENERATOR_CPU:
        problems.append(
            f"the load generator used {client.cpu_share:.0%} of a core (limit "
            f"{MAX_GENERATOR_CPU:.0%}): its latencies include its own queueing and cannot be "
            "trusted; use fewer users"
        )
    return problems


def artifact_name(artifact: Path) -> str:
    return read_manifest(artifact).name


def format_table(results: list[LoadTestResult]) -> str:
    header = (
        f"{'model':<14}{'users':>6}{'requests':>10}{'RPS':>9}{'p50 ms':>9}{'p95 ms':>9}"
        f"{'p99 ms':>9}{'max ms':>9}{'failures':>10}{'server p99 ms':>15}{'locust CPU':>12}"
    )
    lines = [header, "-" * len(header)]
    for result in results:
        client = result.client
        server_p99 = math.nan if result.server_p99_ms is None else result.server_p99_ms
        lines.append(
            f"{result.model:<14}{result.users:>6}{client.requests:>10}{client.rps:>9.1f}"
            f"{client.p50_ms:>9.2f}{client.p95_ms:>9.2f}{client.p99_ms:>9.2f}"
            f"{client.max_ms:>9.2f}{client.failures:>10}{server_p99:>15.2f}"
            f"{client.cpu_share:>12.0%}"
        )
    return "\n".join(lines)


def describe_outcome(result: LoadTestResult) -> str:
    lines = [f"note: {note}" for note in result.notes]
    if result.ok:
        lines.append(
            f"PASS: p99 {result.client.p99_ms:.2f} ms within the {result.p99_budget_ms:g} ms "
            f"budget, no failures; reports in {result.out}"
        )
    else:
        lines += [f"FAIL: {problem}" for problem in result.problems]
        lines.append(f"reports in {result.out}")
    return "\n".join(lines)
