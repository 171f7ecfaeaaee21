"""Side-by-side load tests of exported artifacts, e.g. teacher against student.

    .venv/bin/python benchmarks/load_test.py --artifacts artifacts/teacher artifacts/student \\
        [--users 1 2 4 8 16] [--run-time 20s] [--candidates 100] [--p99-ms 50] \\
        [--workers 1] [--[no-]precompute-items] [--inference plain|torchrec] [--user-cache N] \\
        [--out runs/load_benchmark]

Every artifact gets its own server (``--workers`` workers, on the server cores, with the
``recdistill serve`` options given) for the whole sweep; at
each user level the artifacts take turns, so a noisy neighbour hurts them alike. Prints one
table of all runs, the p99 of each artifact over the last one's, and per artifact the
highest user level whose run passed (p99 within budget, no failures) with its throughput.
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from loadtest.__main__ import add_load_arguments, load_settings
from loadtest.runner import (
    LoadTestResult,
    LoadTestSettings,
    artifact_name,
    format_table,
    plan_cores,
    run_load_test,
    serve_artifact,
)


def sweep(
    artifacts: dict[str, Path], user_levels: list[int], template: LoadTestSettings
) -> list[LoadTestResult]:
    """Run ``template``'s load on every artifact (by model name) at every user level."""
    cores = plan_cores(template.workers)
    results = []
    with ExitStack() as servers:
        urls = {
            name: servers.enter_context(
                serve_artifact(
                    artifact,
                    template.out / name,
                    cores,
                    server_args=template.server_args,
                    workers=template.workers,
                )
            ).url
            for name, artifact in artifacts.items()
        }
        for users in user_levels:
            for name, artifact in artifacts.items():
                settings = replace(
                    template,
                    artifact=artifact,
                    out=template.out / name / f"users-{users}",
                    host=urls[name],
                    users=users,
                )
                result = run_load_test(settings)
                print(
                    f"{name}, {users} users: {result.client.rps:.0f} RPS, "
                    f"p99 {result.client.p99_ms:.2f} ms, {result.client.failures} failures",
                    flush=True,
                )
                results.append(result)
    return results


def p99_ratios(results: list[LoadTestResult], reference: str) -> str:
    """Each model's client and server p99 over the reference model's, per user level."""
    by_run = {(result.model, result.users): result for result in results}
    others = sorted({result.model for result in results} - {reference})
    lines = [f"p99 over {reference}'s p99 (client / server side)"]
    for users in sorted({result.users for result in results}):
        base = by_run[reference, users]
        for model in others:
            run = by_run[model, users]
            server = (
                run.server_p99_ms / base.server_p99_ms
                if run.server_p99_ms and base.server_p99_ms
                else float("nan")
            )
            lines.append(
                f"  {users:>3} users  {model}: {run.client.p99_ms / base.client.p99_ms:5.2f}x "
                f"/ {server:5.2f}x"
            )
    return "\n".join(lines)


def capacity(results: list[LoadTestResult], models: list[str]) -> str:
    lines = ["highest user level that passed (p99 within budget, no failures)"]
    for model in models:
        passed = [result for result in results if result.model == model and result.ok]
        if not passed:
            lines.append(f"  {model}: no level passed")
            continue
        best = max(passed, key=lambda result: result.users)
        lines.append(
            f"  {model}: {best.users} users, {best.client.rps:.0f} RPS, "
            f"p99 {best.client.p99_ms:.2f} ms"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, nargs="+", required=True)
    parser.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--out", type=Path, default=Path("runs/load_benchmark"))
    add_load_arguments(parser)
    args = parser.parse_args()
    artifacts = {artifact_name(artifact): artifact for artifact in args.artifacts}
    if len(artifacts) != len(args.artifacts):
        parser.error("the artifacts must have distinct model names")
    template = load_settings(args, artifact=args.artifacts[0], out=args.out)
    results = sweep(artifacts, args.users, template)
    models = list(artifacts)
    server = " ".join(("--workers", str(template.workers), *template.server_args))
    print(
        f"\n/rank load test, {args.candidates} candidates, {args.run_time} s per run, "
        f"server {server}"
    )
    print(format_table(results))
    for result in results:
        for problem in result.problems:
            print(f"  {result.model} at {result.users} users: {problem}")
    if len(models) > 1:
        print(p99_ratios(results, reference=models[-1]))
    print(capacity(results, models))


if __name__ == "__main__":
    main()
