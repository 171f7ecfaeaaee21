"""Headless load test of the ranking endpoint; exits 1 when the run fails its gate.

    python -m loadtest --artifact artifacts/student --out runs/loadtest \\
        [--host URL] [--users 8] [--spawn-rate R] [--run-time 20s] [--candidates 100] \\
        [--p99-ms 50] [--workers 1] [--[no-]precompute-items] [--inference plain|torchrec] \\
        [--user-cache N]

Without ``--host`` it serves ``--artifact`` itself, with ``--workers`` and the
``recdistill serve`` options given (the others at serve's defaults); with it, ``--artifact``
only supplies the users and items to sample requests from, and must be the artifact the host
serves.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from loadtest.runner import LoadTestSettings, describe_outcome, format_table, run_load_test
from recdistill.server import INFERENCE_PATHS

DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?")


def parse_duration(text: str) -> int:
    """Whole seconds in ``20``, ``20s``, ``1m30s`` or ``1h``, as Locust's ``--run-time``.

    Not ``locust.util.timespan.parse_timespan``: importing anything of ``locust`` runs gevent's
    ``monkey.patch_all()`` on the importing process, which here only starts Locust as a
    subprocess (and, under pytest, shares its process with the server tests).
    """
    match = DURATION.fullmatch(text.strip())
    if not text.strip() or match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 20s, 1m30s or 1h")
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The load options shared with ``benchmarks/load_test.py``."""
    parser.add_argument("--spawn-rate", type=float, help="users started per second (all at once)")
    parser.add_argument(
        "--run-time", type=parse_duration, help="duration: 20, 20s, 1m30s or 1h (%(default)s s)"
    )
    parser.add_argument("--candidates", type=int, help="candidates per request (%(default)s)")
    parser.add_argument("--p99-ms", type=float, help="p99 latency budget (%(default)s)")
    server = parser.add_argument_group(
        "server", "when starting the server; options not given keep recdistill serve's defaults"
    )
    server.add_argument(
        "--workers",
        type=int,
        default=LoadTestSettings.workers,
        help="the server's worker processes, each on a core of its own while the cores "
        "outnumber them (%(default)s)",
    )
    server.add_argument(
        "--precompute-items",
        action=argparse.BooleanOptionalAction,
        help="the item tower once, at load, or on each request's candidates",
    )
    server.add_argument("--inference", choices=INFERENCE_PATHS, help="the user tower's path")
    server.add_argument("--user-cache", type=int, help="user vectors kept per model; 0: none")
    parser.set_defaults(
        run_time=LoadTestSettings.run_time_s,
        candidates=LoadTestSettings.candidates,
        p99_ms=LoadTestSettings.p99_budget_ms,
    )


def load_settings(args: argparse.Namespace, **fields) -> LoadTestSettings:
    """Settings from the options of :func:`add_load_arguments`, plus ``fields``."""
    return LoadTestSettings(
        spawn_rate=args.spawn_rate,
        run_time_s=args.run_time,
        candidates=args.candidates,
        p99_budget_ms=args.p99_ms,
        server_args=server_args(args),
        workers=args.workers,
        **fields,
    )


def server_args(args: argparse.Namespace) -> tuple[str, ...]:
    """The ``recdistill serve`` options given among those of :func:`add_load_arguments`."""
    options: list[str] = []
    if args.precompute_items is not None:
        options.append("--precompute-items" if args.precompute_items else "--no-precompute-items")
    if args.inference is not None:
        options += ["--inference", args.inference]
    if args.user_cache is not None:
        options += ["--user-cache", str(args.user_cache)]
    return tuple(options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest",
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--artifact", type=Path, required=True, help="exported artifact")
    parser.add_argument("--host", help="base URL of a running server (default: start one)")
    parser.add_argument("--out", type=Path, required=True, help="directory for the reports")
    parser.add_argument(
        "--users",
        type=int,
        default=LoadTestSettings.users,
        help="concurrent Locust users (%(default)s)",
    )
    add_load_arguments(parser)
    args = parser.parse_args(argv)
    settings = load_settings(
        args, artifact=args.artifact, out=args.out, host=args.host, users=args.users
    )
    try:
        result = run_load_test(settings)
    except (RuntimeError, OSError, ValueError) as error:
        print(f"loadtest: error: {error}", file=sys.stderr)
        return 2
    print(format_table([result]))
    print(describe_outcome(result))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
