"""Time and peak memory of `recdistill data synthetic` at 1M, 3M and 10M interactions.

    .venv/bin/python benchmarks/synthetic_scale.py [--users 20000 60000 200000]

Each size runs in a fresh process (generation, split, candidates, segments: the whole
command) and reports that process's own peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ITEMS = 20_000
MEAN_ACTIVITY = 55.0


def measure_one(users: int, out: Path) -> dict:
    """Run `recdistill data synthetic` into ``out`` in this process and measure it."""
    from recdistill.cli import main
    from recdistill.data.tables import read_meta

    started = time.perf_counter()
    main(
        [
            "data",
            "synthetic",
            "--out",
            str(out),
            "--users",
            str(users),
            "--items",
            str(ITEMS),
            "--mean-activity",
            str(MEAN_ACTIVITY),
        ]
    )
    return {
        "users": users,
        "interactions": read_meta(out)["n_interactions"],
        "seconds": time.perf_counter() - started,
        "peak_gib": peak_gib(),
    }


def peak_gib() -> float:
    """This process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[20_000, 60_000, 200_000])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as scratch:
            print(json.dumps(measure_one(args.one, Path(scratch) / "world")))
        return
    rows = []
    for users in args.users:
        child = subprocess.run(
            [sys.executable, __file__, "--one", str(users)],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(f"\nrecdistill data synthetic, {ITEMS:,} items, mean activity {MEAN_ACTIVITY:g}")
    print(f"{'users':>9} {'interactions':>13} {'seconds':>8} {'rows/s':>10} {'peak GiB':>9}")
    for row in rows:
        print(
            f"{row['users']:>9,} {row['interactions']:>13,} {row['seconds']:>8.1f} "
            f"{row['interactions'] / row['seconds']:>10,.0f} {row['peak_gib']:>9.2f}"
        )


if __name__ == "__main__":
    main()
