"""The highest request rate a server answers within its p99 latency budget.

A closed-loop run (users sending back to back) finds the most the server answers at all;
fixed-rate runs then step down from that throughput until one holds the budget: p99 within
it, no failures, a load generator with CPU to spare, and the offered rate actually achieved.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from loadtest.client_stats import ClientStats
from loadtest.runner import MAX_GENERATOR_CPU, gate_problems

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
