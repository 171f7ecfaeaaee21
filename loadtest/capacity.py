"""The highest request rate a server answers within its p99 latency budget.

A closed-loop run (users sending back to back) finds the most the server answers at all;
fixed-rate runs then step down from that throughput until one holds the budget: p99 within
it, no failures, a load generator with CPU to spare, and the offered rate actually achieved.
What that rate costs in cores is :func:`serving_cost`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from loadtest.client_stats import ClientStats
from loadtest.runner import (
    MAX_GENERATOR_CPU,
    LoadTestResult,
    LoadTestSettings,
    gate_problems,
    run_load_test,
)

CLOSED_LOOP_USERS = 4
CLOSED_LOOP_S = 15
STEP_S = 10
# The fixed rates tried, as shares of the closed-loop throughput, highest first.
STEP_SHARES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
# A fixed-rate run holds its rate when it achieves this share of it; users start over the
# first second, which costs a short run a few percent.
MIN_ACHIEVED_SHARE = 0.9
# Each fixed-rate user's requests are 1 / USER_RPS s apart, far longer than a reply within
# budget takes, so a user does not fall behind its schedule and the offered rate holds.
USER_RPS = 10.0


@dataclass(frozen=True)
class Load:
    users: int
    user_rps: float | None  # each user's steady rate; None: back to back
    seconds: int


@dataclass(frozen=True)
class RateStep:
    target_rps: float
    client: ClientStats
    problems: tuple[str, ...]


@dataclass(frozen=True)
class Capacity:
    closed_loop: ClientStats
    steps: tuple[RateStep, ...]

    @property
    def sustained_rps(self) -> float | None:
        """The highest rate tried that held the budget; None if none did."""
        return next((step.target_rps for step in self.steps if not step.problems), None)

    @property
    def generator_bound(self) -> bool:
        """Whether the closed-loop throughput is the load generator's rather than the server's."""
        return self.closed_loop.cpu_share > MAX_GENERATOR_CPU


def fixed_rate(rps: float, seconds: int) -> Load:
    """Users at a steady ``USER_RPS`` or less each, offering ``rps`` together."""
    users = max(1, math.ceil(rps / USER_RPS))
    return Load(users=users, user_rps=rps / users, seconds=seconds)


def run_load(template: LoadTestSettings, load: Load, out: Path) -> LoadTestResult:
    """``template``'s load test with ``load``, its reports in a directory of ``out`` named
    after the load."""
    name = "closed-loop" if load.user_rps is None else f"{load.users * load.user_rps:.0f}-rps"
    return run_load_test(
        replace(
            template,
            out=out / name,
            users=load.users,
            user_rps=load.user_rps,
            run_time_s=load.seconds,
        )
    )


def find_capacity(
    measure: Callable[[Load], ClientStats],
    p99_budget_ms: float,
    progress: Callable[[str], None],
) -> Capacity:
    """Step down from the closed-loop throughput to the first rate that holds the budget;
    ``measure`` runs a load against the server and returns what the client saw. Raises
    ``RuntimeError`` if the closed-loop run completes no request."""
    closed_loop = measure(Load(users=CLOSED_LOOP_USERS, user_rps=None, seconds=CLOSED_LOOP_S))
    if not closed_loop.requests:
        raise RuntimeError("no request completed in the closed-loop run")
    progress(
        f"capacity: closed loop, {CLOSED_LOOP_USERS} users: {closed_loop.rps:.0f} RPS, "
        f"p99 {closed_loop.p99_ms:.2f} ms, load generator CPU {closed_loop.cpu_share:.0%}"
    )
    steps = []
    for share in STEP_SHARES:
        target = share * closed_loop.rps
        client = measure(fixed_rate(target, STEP_S))
        step = RateStep(target, client, tuple(rate_problems(client, target, p99_budget_ms)))
        steps.append(step)
        progress(f"capacity: {describe_step(step)}")
        if not step.problems:
            break
    return Capacity(closed_loop, tuple(steps))


def rate_problems(client: ClientStats, target_rps: float, p99_budget_ms: float) -> list[str]:
    """Why a fixed-rate run offering ``target_rps`` did not hold the budget; empty if it did."""
    problems = gate_problems(client, p99_budget_ms)
    if client.rps < MIN_ACHIEVED_SHARE * target_rps:
        problems.append(f"{client.rps:.0f} RPS achieved of {target_rps:.0f} offered")
    return problems


def describe_step(step: RateStep) -> str:
    outcome = "holds the budget" if not step.problems else "; ".join(step.problems)
    return (
        f"{step.target_rps:.0f} RPS offered, {step.client.rps:.0f} achieved, "
        f"p99 {step.client.p99_ms:.2f} ms: {outcome}"
    )


@dataclass(frozen=True)
class Cost:
    rps_per_core: float
    cores_needed: int  # for the target rate


def serving_cost(sustained_rps: float | None, server_cores: int, target_rps: float) -> Cost | None:
    """What serving ``target_rps`` takes at ``sustained_rps`` on ``server_cores`` cores, if
    cores scale linearly; None without a sustained rate."""
    if not sustained_rps:
        return None
    per_core = sustained_rps / server_cores
    # Rounded first, so that a rate dividing the target exactly is not rounded up a core.
    return Cost(per_core, math.ceil(round(target_rps / per_core, 9)))
