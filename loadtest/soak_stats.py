"""A soak run per minute, and its verdicts.

:func:`minute_rows` bins the client's per-request timeline, the reload outcomes and the
server's memory samples by minute from the start of the soak; :func:`judge` applies the
soak's criteria to them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loadtest.client_stats import Timeline, percentile
from loadtest.reloads import CORRUPT, GOOD, OUTSIDE, ReloadOutcome

MINUTE_S = 60.0
MAX_RSS_GROWTH = 0.10
MIB = 2**20

# (wall-clock time, resident bytes) of the server process.
MemorySample = tuple[float, int]


@dataclass(frozen=True)
class MinuteRow:
    minute: int  # from 1
    requests: int
    failures: int
    p50_ms: float
    p99_ms: float
    reloads_applied: int
    reloads_refused: int
    reloads_unexpected: int
    # The least and most of the minute's samples (None: not sampled). Loading a model
    # allocates a few hundred MiB for a while, so single samples swing by that much; a leak
    # shows as a rising floor.
    rss_min_mib: float | None
    rss_max_mib: float | None


@dataclass(frozen=True)
class Verdict:
    criterion: str
    passed: bool
    detail: str


def reload_counts(outcomes: Sequence[ReloadOutcome]) -> str:
    applied = sum(outcome.applied for outcome in outcomes)
    refused = sum(outcome.refused for outcome in outcomes)
    unexpected = sum(outcome.problem is not None for outcome in outcomes)
    return f"{applied} reloads applied, {refused} refused, {unexpected} unexpected"


def minute_rows(
    timeline: Timeline,
    reloads: Sequence[ReloadOutcome],
    memory: Sequence[MemorySample],
    started_at: float,
    minutes: int,
) -> list[MinuteRow]:
    """Requests, latencies, reloads and the server's memory in each of ``minutes`` minutes
    from ``started_at``; whatever falls outside them counts in the nearest."""

    def minute_of(times: Sequence[float] | np.ndarray) -> np.ndarray:
        elapsed = np.asarray(times, dtype=np.float64) - started_at
        return np.clip(elapsed // MINUTE_S, 0, minutes - 1).astype(int)

    request_minutes = minute_of(timeline.finished_at)
    reload_minutes = minute_of([outcome.at for outcome in reloads])
    memory_minutes = minute_of([at for at, _ in memory])
    rows = []
    for minute in range(minutes):
        in_minute = request_minutes == minute
        latencies = np.sort(timeline.ms[in_minute]).tolist()
        outcomes = [o for o, m in zip(reloads, reload_minutes, strict=True) if m == minute]
        rss = [rss for (_, rss), m in zip(memory, memory_minutes, strict=True) if m == minute]
        rows.append(
            MinuteRow(
                minute=minute + 1,
                requests=len(latencies),
                failures=int(timeline.failed[in_minute].sum()),
                p50_ms=percentile(latencies, 0.50),
                p99_ms=percentile(latencies, 0.99),
                reloads_applied=sum(outcome.applied for outcome in outcomes),
                reloads_refused=sum(outcome.refused for outcome in outcomes),
                reloads_unexpected=sum(outcome.problem is not None for outcome in outcomes),
                rss_min_mib=min(rss) / MIB if rss else None,
                rss_max_mib=max(rss) / MIB if rss else None,
            )
        )
    return rows


def judge(
    rows: Sequence[MinuteRow],
    reloads: Sequence[ReloadOutcome],
    p99_budget_ms: float,
) -> list[Verdict]:
    """The soak's criteria: no failed request, p99 within budget in every minute, every good
    reload applied, every bad one refused with the old model serving, and resident memory
    growing less than ``MAX_RSS_GROWTH`` from minute 2 (the first minute, if shorter) on."""
    requests = sum(row.requests for row in rows)
    failures = sum(row.failures for row in rows)
    over = [row for row in rows if not row.p99_ms <= p99_budget_ms]  # NaN: no request
    good = [outcome for outcome in reloads if outcome.kind == GOOD]
    bad = [outcome for outcome in reloads if outcome.kind != GOOD]
    return [
        Verdict(
            "no failed requests",
            requests > 0 and failures == 0,
            f"{failures} of {requests} requests failed",
        ),
        Verdict(
            f"p99 within {p99_budget_ms:g} ms in every minute",
            bool(rows) and not over,
            f"worst minute {max((row.p99_ms for row in rows), default=math.nan):.2f} ms"
            + (f"; over in minute {', '.join(str(row.minute) for row in over)}" if over else ""),
        ),
        Verdict(
            "every good reload applied",
            bool(good) and all(outcome.applied for outcome in good),
            f"{sum(outcome.applied for outcome in good)} of {len(good)} applied"
            + _first_problem(good),
        ),
        Verdict(
            "every bad reload refused, the old model serving",
            {outcome.kind for outcome in bad} == {CORRUPT, OUTSIDE}
            and all(outcome.refused for outcome in bad),
            f"{sum(outcome.refused for outcome in bad)} of {len(bad)} refused "
            f"({sum(outcome.kind == CORRUPT for outcome in bad)} corrupt, "
            f"{sum(outcome.kind == OUTSIDE for outcome in bad)} outside the root)"
            + _first_problem(bad),
        ),
        _memory_verdict(rows),
    ]


def _first_problem(outcomes: Sequence[ReloadOutcome]) -> str:
    problem = next((outcome for outcome in outcomes if outcome.problem), None)
    return (
        "" if problem is None else f"; first: {problem.kind} {problem.artifact}: {problem.problem}"
    )


def _memory_verdict(rows: Sequence[MinuteRow]) -> Verdict:
    criterion = f"server RSS floor growth from minute 2 to the end < {MAX_RSS_GROWTH:.0%}"
    # Minute 1 includes warm-up: the load's first requests and the first reloads allocate.
    baseline, end = rows[1] if len(rows) > 1 else rows[0], rows[-1]
    if baseline.rss_min_mib is None or end.rss_min_mib is None:
        return Verdict(criterion, False, "the server's memory was not sampled")
    growth = end.rss_min_mib / baseline.rss_min_mib - 1
    return Verdict(
        criterion,
        growth < MAX_RSS_GROWTH,
        f"{baseline.rss_min_mib:.0f} MiB in minute {baseline.minute} -> {end.rss_min_mib:.0f} "
        f"MiB in minute {end.minute} ({growth:+.1%}); peak "
        f"{max(row.rss_max_mib or 0.0 for row in rows):.0f} MiB",
    )


def format_minutes(rows: Sequence[MinuteRow]) -> str:
    header = (
        f"{'minute':>6}{'requests':>10}{'failures':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'reloads applied':>17}{'reloads refused':>17}{'unexpected':>12}"
        f"{'RSS min MiB':>13}{'RSS max MiB':>13}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        rss_min, rss_max = (
            math.nan if mib is None else mib for mib in (row.rss_min_mib, row.rss_max_mib)
        )
        lines.append(
            f"{row.minute:>6}{row.requests:>10}{row.failures:>10}{row.p50_ms:>9.2f}"
            f"{row.p99_ms:>9.2f}{row.reloads_applied:>17}{row.reloads_refused:>17}"
            f"{row.reloads_unexpected:>12}{rss_min:>13.1f}{rss_max:>13.1f}"
        )
    return "\n".join(lines)
