"""What serving costs in cores: each model's capacity per core on each serving path.

    .venv/bin/python benchmarks/serving_cost.py \\
        --artifacts artifacts/synthetic/teacher artifacts/synthetic/b8-rrd \\
        [--workers 1 2] [--paths plain torchrec] [--candidates 100] [--p99-ms 50] \\
        [--out runs/serving_cost]

For every artifact, serving path and worker count it starts one server and finds the highest
request rate that holds the p99 budget (:mod:`loadtest.capacity`: a closed-loop run, then
fixed rates stepping down until one has p99 within budget, no failures, a load generator with
CPU to spare and the rate achieved). ``plain`` is ``recdistill serve``'s defaults (item
vectors precomputed, the plain user tower, a user-vector cache); ``torchrec`` the serving path
before them (``--inference torchrec --no-precompute-items --user-cache 0``). A server with
fewer workers than cores gets a core per worker and the load generator the next one; with as
many workers as cores, the two share them all. That rate over the server's cores is its RPS
per core, and ``TARGET_RPS`` over that the cores it would take, if cores scale linearly.

The runs go worker count by worker count, path by path within it and model by model within
that, so the runs compared (plain with torchrec, model with model) are close in time on a
noisy machine. Prints a table of the runs, then per model the plain / torchrec ratio of RPS
per core and per path the first artifact's over each other's. The Locust reports go to
``--out``/<model>-<path>-<workers>w/.
"""

from __future__ import annotations

import argparse
import itertools
from dataclasses import dataclass
from pathlib import Path

from loadtest.capacity import Capacity, Cost, find_capacity, run_load, serving_cost
from loadtest.runner import CorePlan, LoadTestSettings, artifact_name, plan_cores, serve_artifact

PATHS = {
    "plain": (),
    "torchrec": ("--inference", "torchrec", "--no-precompute-items", "--user-cache", "0"),
}
TARGET_RPS = 10_000


@dataclass(frozen=True)
class Run:
    model: str
    path: str
    workers: int
    cores: CorePlan
    capacity: Capacity

    @property
    def cost(self) -> Cost | None:
        return serving_cost(self.capacity.sustained_rps, self.cores.server_cores, TARGET_RPS)


def measure(artifact: Path, path: str, workers: int, args: argparse.Namespace) -> Run:
    """One server of ``artifact`` on ``path`` with ``workers`` workers, and its capacity."""
    model = artifact_name(artifact)
    label = f"{model}, {path}, {workers} worker(s)"
    out = args.out / f"{model}-{path}-{workers}w"
    cores = plan_cores(workers)
    with serve_artifact(
        artifact, out / "server", cores, server_args=PATHS[path], workers=workers
    ) as server:
        template = LoadTestSettings(
            artifact=artifact,
            out=out,
            host=server.url,
            candidates=args.candidates,
            p99_budget_ms=args.p99_ms,
            server_args=PATHS[path],
            workers=workers,
        )
        capacity = find_capacity(
            lambda load: run_load(template, load, out).client,
            args.p99_ms,
            lambda line: print(f"{label}: {line}", flush=True),
        )
    return Run(model, path, workers, cores, capacity)


def format_runs(runs: list[Run]) -> str:
    header = (
        f"{'model':<10}{'path':<10}{'workers':>8}{'server cores':>13}{'closed-loop RPS':>16}"
        f"{'passing RPS':>12}{'RPS/core':>10}{f'cores for {TARGET_RPS:,}':>18}{'gen CPU':>9}"
        "  note"
    )
    lines = [header, "-" * len(header)]
    for run in runs:
        passing, cost = run.capacity.sustained_rps, run.cost
        notes = []
        if passing is None:
            notes.append("no rate held the budget")
        if run.capacity.generator_bound:
            notes.append("the load generator's capacity, not the server's")
        if run.cores.server is None:
            notes.append("cores shared with the load generator")
        lines.append(
            f"{run.model:<10}{run.path:<10}{run.workers:>8}{run.cores.server_cores:>13}"
            f"{run.capacity.closed_loop.rps:>16.0f}"
            f"{'-' if passing is None else f'{passing:.0f}':>12}"
            f"{'-' if cost is None else f'{cost.rps_per_core:.0f}':>10}"
            f"{'-' if cost is None else cost.cores_needed:>18}"
            f"{run.capacity.closed_loop.cpu_share:>9.0%}  {'; '.join(notes)}".rstrip()
        )
    return "\n".join(lines)


def ratios(runs: list[Run], models: list[str], paths: list[str], workers: list[int]) -> str:
    """Per model plain / torchrec, and per path the first model over each other, of RPS per
    core at each worker count."""
    cost = {(run.model, run.path, run.workers): run.cost for run in runs}

    def ratio(a: Cost | None, b: Cost | None) -> str:
        return f"{a.rps_per_core / b.rps_per_core:5.2f}x" if a and b else "  n/a (no passing rate)"

    lines = []
    if {"plain", "torchrec"} <= set(paths):
        lines.append("RPS per core, plain / torchrec")
        for model, count in itertools.product(models, workers):
            plain, torchrec = cost[model, "plain", count], cost[model, "torchrec", count]
            lines.append(f"  {model:<10}{count} worker(s): {ratio(plain, torchrec)}")
    for other in models[1:]:
        lines.append(f"RPS per core, {models[0]} / {other}")
        for path, count in itertools.product(paths, workers):
            first, second = cost[models[0], path, count], cost[other, path, count]
            lines.append(f"  {path:<10}{count} worker(s): {ratio(first, second)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, nargs="+", required=True)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--candidates", type=int, default=LoadTestSettings.candidates)
    parser.add_argument("--p99-ms", type=float, default=LoadTestSettings.p99_budget_ms)
    parser.add_argument("--out", type=Path, default=Path("runs/serving_cost"))
    args = parser.parse_args()
    artifacts = {artifact_name(artifact): artifact for artifact in args.artifacts}
    if len(artifacts) != len(args.artifacts):
        parser.error("the artifacts must have distinct model names")
    models = list(artifacts)
    runs = [
        measure(artifacts[model], path, workers, args)
        for workers, path, model in itertools.product(args.workers, args.paths, models)
    ]
    print(
        f"\n/rank serving cost: {args.candidates} candidates, p99 within {args.p99_ms:g} ms, "
        f"{plan_cores().available} cores; gen CPU: the load generator's share of a core in the "
        "closed-loop run"
    )
    print(format_runs(runs))
    print(ratios(runs, models, args.paths, args.workers))


if __name__ == "__main__":
    main()
