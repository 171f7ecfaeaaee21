"""Soak test: the ranking server at 80 % of its capacity for minutes while its model is reloaded.

    .venv/bin/python benchmarks/soak.py --artifact artifacts/synthetic/teacher \\
        --artifact artifacts/synthetic/student [--minutes 10] [--p99-ms 50] [--load-share 0.8] \\
        [--rps R] [--reload-every 5] [--bad-every 3] [--candidates 100] [--out runs/soak]

Serves a copy of the first artifact and first finds the highest request rate that holds the
p99 budget (a closed-loop run, then fixed rates stepping down; skipped with ``--rps``). Then
Locust offers ``--load-share`` of that rate for ``--minutes`` while ``/admin/reload``
alternates the two artifacts every ``--reload-every`` seconds and, after every
``--bad-every`` reloads, tries a corrupt copy and a path outside the artifact root. Prints
per minute the requests, failures, p50/p99, reloads applied and refused, and the server's
resident memory (least and most of its samples), then a PASS/FAIL line per criterion;
exits 1 if any fails. The results go to ``--out``/soak.json, the Locust reports to
``capacity/`` and ``soak/`` and the server's logs to ``server/`` beside it.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from loadtest.soak import SoakSettings, describe, run_soak, write_result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--artifact",
        type=Path,
        action="append",
        required=True,
        help="twice: the artifact served first (A), then the one alternated with it (B)",
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="soak duration (10)")
    parser.add_argument("--p99-ms", type=float, default=50.0, help="p99 latency budget (50)")
    parser.add_argument(
        "--load-share", type=float, default=0.8, help="share of the capacity to offer (0.8)"
    )
    parser.add_argument("--rps", type=float, help="offer this rate instead of measuring capacity")
    parser.add_argument(
        "--reload-every", type=float, default=5.0, help="seconds between good reloads (5)"
    )
    parser.add_argument(
        "--bad-every", type=int, default=3, help="try the bad reloads every N good ones (3)"
    )
    parser.add_argument("--candidates", type=int, default=100, help="candidates per request (100)")
    parser.add_argument("--out", type=Path, default=Path("runs/soak"))
    args = parser.parse_args()
    if len(args.artifact) != 2:
        parser.error("pass --artifact exactly twice: A, then B")
    settings = SoakSettings(
        artifacts=(args.artifact[0], args.artifact[1]),
        out=args.out,
        minutes=args.minutes,
        p99_budget_ms=args.p99_ms,
        load_share=args.load_share,
        rps=args.rps,
        reload_every_s=args.reload_every,
        bad_every=args.bad_every,
        candidates=args.candidates,
    )
    try:
        result = run_soak(settings, progress=partial(print, flush=True))
    except (RuntimeError, OSError, ValueError) as error:
        print(f"soak: FAIL: {error}", file=sys.stderr)
        return 1
    print()
    print(describe(result))
    write_result(result, args.out / "soak.json")
    print(f"results in {args.out / 'soak.json'}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
