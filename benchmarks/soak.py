"""Soak test: the ranking server at 80 % of its capacity for minutes while its model is reloaded.

    .venv/bin/python benchmarks/soak.py --artifact artifacts/synthetic/teacher \\
        --artifact artifacts/synthetic/b8-rrd [--minutes 10] [--p99-ms 50] [--load-share 0.8] \\
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
from dataclasses import MISSING, fields
from functools import partial
from pathlib import Path

from loadtest.soak import SoakSettings, describe, run_soak, write_result
from recdistill.layout import SoakLayout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--artifact",
        type=Path,
        action="append",
        required=True,
        help="twice: the artifact served first (A), then the one alternated with it (B)",
    )
    # Options named as SoakSettings' fields, which give their defaults.
    parser.add_argument("--minutes", type=float, help="soak duration (%(default)s)")
    parser.add_argument(
        "--p99-ms", dest="p99_budget_ms", type=float, help="p99 latency budget (%(default)s)"
    )
    parser.add_argument("--load-share", type=float, help="share of capacity to offer (%(default)s)")
    parser.add_argument("--rps", type=float, help="offer this rate instead of measuring capacity")
    parser.add_argument(
        "--reload-every",
        dest="reload_every_s",
        type=float,
        help="seconds between good reloads (%(default)s)",
    )
    parser.add_argument(
        "--bad-every", type=int, metavar="N", help="bad reloads every N good (%(default)s)"
    )
    parser.add_argument("--candidates", type=int, help="candidates per request (%(default)s)")
    parser.add_argument("--out", type=Path, default=Path("runs/soak"), help="results (%(default)s)")
    parser.set_defaults(
        **{f.name: f.default for f in fields(SoakSettings) if f.default is not MISSING}
    )
    options = vars(parser.parse_args())
    artifacts = options.pop("artifact")
    if len(artifacts) != 2:
        parser.error("pass --artifact exactly twice: A, then B")
    settings = SoakSettings(artifacts=tuple(artifacts), **options)
    try:
        result = run_soak(settings, progress=partial(print, flush=True))
    except (RuntimeError, OSError, ValueError) as error:
        print(f"soak: FAIL: {error}", file=sys.stderr)
        return 1
    print()
    print(describe(result))
    path = SoakLayout(settings.out).result
    write_result(result, path)
    print(f"results in {path}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
