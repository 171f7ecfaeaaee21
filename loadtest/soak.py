"""A soak test: the ranking server under steady load for minutes while its model is reloaded.

:func:`run_soak` copies artifacts A and B, and A with garbage weights, into a scratch
artifact root and serves the copy of A from it (one worker, on the server's core). Unless
given a rate, it first finds the highest one that holds the p99 budget
(:mod:`loadtest.capacity`). Then Locust offers ``load_share`` of that rate for ``minutes``
while a :class:`~loadtest.reloads.Reloader` swaps the served model for B and A in turn every
``reload_every_s`` and, every few reloads, tries the corrupt copy and the original A, which
is outside the root. The server's resident memory is sampled throughout. Latencies, reloads
and memory are binned per minute and judged (:mod:`loadtest.soak_stats`).
"""

from __future__ import annotations

import itertools
import json
import math
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx2
import psutil

from loadtest.capacity import STEP_SHARES, Capacity, find_capacity, fixed_rate, run_load
from loadtest.client_stats import Timeline
from loadtest.reloads import Reloader, ReloadOutcome
from loadtest.runner import (
    MAX_GENERATOR_CPU,
    LoadTestResult,
    LoadTestSettings,
    plan_cores,
    run_load_test,
    serve_artifact,
)
from loadtest.soak_stats import (
    MIB,
    MINUTE_S,
    MemorySample,
    MinuteRow,
    Verdict,
    format_minutes,
    judge,
    minute_rows,
    reload_counts,
)
from recdistill.layout import ArtifactLayout, SoakLayout
from recdistill.manifest import read_manifest
from serving.middleware import ADMIN_TOKEN_ENV

MEMORY_SAMPLE_S = 2.0


@dataclass(frozen=True)
class SoakSettings:
    artifacts: tuple[Path, Path]  # A, served first, and B
    out: Path
    minutes: float = 10.0
    p99_budget_ms: float = 50.0
    load_share: float = 0.8
    rps: float | None = None  # the soak's request rate; None: load_share of the capacity
    reload_every_s: float = 5.0
    bad_every: int = 3  # try the bad artifacts after every this many good reloads
    candidates: int = 100


@dataclass(frozen=True)
class ScratchRoot:
    directory: Path
    a: Path
    b: Path
    corrupt: Path


@dataclass(frozen=True)
class SoakResult:
    settings: SoakSettings
    capacity: Capacity | None  # None: the rate was given
    rps: float
    load: LoadTestResult
    minutes: tuple[MinuteRow, ...]
    reloads: tuple[ReloadOutcome, ...]
    memory: tuple[MemorySample, ...]
    verdicts: tuple[Verdict, ...]

    @property
    def ok(self) -> bool:
        return all(verdict.passed for verdict in self.verdicts)


class MemorySampler:
    def __init__(self, pid: int) -> None:
        self.samples: list[MemorySample] = []
        self._process = psutil.Process(pid)

    def sample(self) -> None:
        self.samples.append((time.time(), self._process.memory_info().rss))


def run_soak(settings: SoakSettings, progress: Callable[[str], None]) -> SoakResult:
    """Run the soak of ``settings``, reporting progress (a line per phase step and per
    minute) to ``progress``; raises ``RuntimeError`` if the server or Locust could not run,
    or no rate held the budget."""
    layout = SoakLayout(settings.out)
    root = prepare_root(settings.artifacts, layout.artifacts)
    # The server's log and impression log (a line per request) of this run only.
    server_out = layout.server.root
    shutil.rmtree(server_out, ignore_errors=True)
    token = secrets.token_urlsafe(16)
    with serve_artifact(
        root.a,
        server_out,
        plan_cores(),
        artifact_root=root.directory,
        env={ADMIN_TOKEN_ENV: token},
    ) as server:
        template = LoadTestSettings(
            artifact=root.a,
            out=settings.out,
            host=server.url,
            candidates=settings.candidates,
            p99_budget_ms=settings.p99_budget_ms,
        )
        capacity, rps = None, settings.rps
        if rps is None:
            capacity = find_capacity(
                lambda load: run_load(template, load, layout.capacity).client,
                settings.p99_budget_ms,
                progress,
            )
            if capacity.sustained_rps is None:
                raise RuntimeError(
                    f"no rate down to {STEP_SHARES[-1]:.0%} of the closed-loop throughput "
                    f"held the {settings.p99_budget_ms:g} ms p99 budget"
                )
            rps = settings.load_share * capacity.sustained_rps
        authorization = {"authorization": f"Bearer {token}"}
        with httpx2.Client(base_url=server.url, headers=authorization, timeout=10.0) as admin:
            manifest = read_manifest(root.a)
            reloader = Reloader(
                admin,
                model=manifest.name,
                serving=manifest.version,
                good=(root.b, root.a),
                corrupt=root.corrupt,
                outside=settings.artifacts[0].resolve(),
                bad_every=settings.bad_every,
            )
            memory = MemorySampler(server.process.pid)
            return _soak(settings, template, rps, capacity, reloader, memory, progress)


def prepare_root(artifacts: tuple[Path, Path], directory: Path) -> ScratchRoot:
    """Fresh copies of A and B, and A with garbage weights, in ``directory``."""
    shutil.rmtree(directory, ignore_errors=True)
    root = ScratchRoot(directory.resolve(), directory / "a", directory / "b", directory / "corrupt")
    shutil.copytree(artifacts[0], root.a)
    shutil.copytree(artifacts[1], root.b)
    shutil.copytree(artifacts[0], root.corrupt)
    ArtifactLayout(root.corrupt).weights.write_bytes(b"not a safetensors file")
    return root


def _soak(
    settings: SoakSettings,
    template: LoadTestSettings,
    rps: float,
    capacity: Capacity | None,
    reloader: Reloader,
    memory: MemorySampler,
    progress: Callable[[str], None],
) -> SoakResult:
    load = fixed_rate(rps, max(1, round(settings.minutes * MINUTE_S)))
    minutes = math.ceil(load.seconds / MINUTE_S)
    layout = SoakLayout(settings.out)
    timeline = layout.timeline
    timeline.unlink(missing_ok=True)
    progress(
        f"soak: {rps:.0f} RPS from {load.users} users for {load.seconds} s, reloading every "
        f"{settings.reload_every_s:g} s"
    )
    minutes_done = itertools.count(1)

    def report_minute() -> None:
        rss = memory.samples[-1][1] / MIB
        progress(
            f"soak: minute {next(minutes_done)} of {minutes}: "
            f"{reload_counts(reloader.outcomes)} so far, server RSS now {rss:.0f} MiB"
        )

    stop = threading.Event()
    started_at = time.time()
    memory.sample()
    threads = [
        _repeat(settings.reload_every_s, stop, reloader.tick),
        _repeat(MEMORY_SAMPLE_S, stop, memory.sample),
        _repeat(MINUTE_S, stop, report_minute),
    ]
    try:
        result = run_load_test(
            replace(
                template,
                out=layout.soak,
                users=load.users,
                user_rps=load.user_rps,
                run_time_s=load.seconds,
                timeline=timeline,
            )
        )
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    rows = minute_rows(
        Timeline.read(timeline), reloader.outcomes, memory.samples, started_at, minutes
    )
    return SoakResult(
        settings=settings,
        capacity=capacity,
        rps=rps,
        load=result,
        minutes=tuple(rows),
        reloads=tuple(reloader.outcomes),
        memory=tuple(memory.samples),
        verdicts=tuple(judge(rows, reloader.outcomes, settings.p99_budget_ms)),
    )


def _repeat(
    interval_s: float, stop: threading.Event, action: Callable[[], None]
) -> threading.Thread:
    """Call ``action`` every ``interval_s`` seconds, on schedule, in a new thread until
    ``stop`` is set."""

    def loop() -> None:
        due = time.monotonic() + interval_s
        while not stop.wait(max(0.0, due - time.monotonic())):
            action()
            due += interval_s

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def describe(result: SoakResult) -> str:
    """The run in words: its rate and where it came from, the minute table, the verdicts."""
    settings, client = result.settings, result.load.client
    lines = []
    if result.capacity is None:
        lines.append(f"rate: {result.rps:.0f} RPS, as given")
    else:
        lines.append(
            f"rate: {result.rps:.0f} RPS, {settings.load_share:.0%} of "
            f"{result.capacity.sustained_rps:.0f} RPS, the highest rate found to hold "
            f"p99 within {settings.p99_budget_ms:g} ms (closed loop: "
            f"{result.capacity.closed_loop.rps:.0f} RPS)"
        )
        if result.capacity.generator_bound:
            lines.append(
                "note: the load generator saturated its core in the closed-loop run: the "
                "capacity is the load generator's, not the server's"
            )
    lines.append(format_minutes(result.minutes))
    lines.append(
        f"total: {client.requests} requests at {client.rps:.1f} RPS, p99 {client.p99_ms:.2f} ms, "
        f"load generator CPU {client.cpu_share:.0%}; {reload_counts(result.reloads)}"
    )
    if client.cpu_share > MAX_GENERATOR_CPU:
        lines.append(
            "note: the load generator saturated its core: the latencies include its own queueing"
        )
    lines += [f"note: {note}" for note in result.load.notes]
    lines += [
        f"{'PASS' if verdict.passed else 'FAIL'}: {verdict.criterion}: {verdict.detail}"
        for verdict in result.verdicts
    ]
    return "\n".join(lines)


def write_result(result: SoakResult, path: Path) -> None:
    """The run as JSON: settings, capacity search, minute rows, reloads, memory, verdicts."""
    document = {
        "settings": asdict(result.settings),
        "capacity": None if result.capacity is None else asdict(result.capacity),
        "rps": result.rps,
        "client": asdict(result.load.client),
        "minutes": [asdict(row) for row in result.minutes],
        "reloads": [asdict(outcome) for outcome in result.reloads],
        "memory": [{"at": at, "rss_bytes": rss} for at, rss in result.memory],
        "verdicts": [asdict(verdict) for verdict in result.verdicts],
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
