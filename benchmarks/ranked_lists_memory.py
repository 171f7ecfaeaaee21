"""Time and peak memory of computing teacher-ranked lists on a large synthetic world.

    .venv/bin/python benchmarks/ranked_lists_memory.py [--users 200000] [--items 20000]

Generates the world (``recdistill data synthetic``, 55 interactions per user on average: 10M
interactions at the defaults) into a temporary directory in a separate process, so that its
peak is not this one's, then loads the world's ``FeatureStore`` and
ranks the whole catalogue for every user with random teacher vectors, as a stage with
``lists`` does once (recdistill/ranked_lists.py). Peak memory is the process's resident
peak before and after the ranking; the ranking's own share is the difference.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from recdistill.data.batches import FeatureStore
from recdistill.ranked_lists import CELLS, top_unseen


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=64, help="the teacher's output width")
    parser.add_argument("--teacher-top", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "data"
        subprocess.run(
            [str(Path(sys.executable).parent / "recdistill"), "data", "synthetic"]
            + ["--out", str(data), "--users", str(args.users), "--items", str(args.items)]
            + ["--mean-activity", "55"],
            check=True,
        )
        store = FeatureStore(data)
        generator = torch.Generator().manual_seed(0)
        users = torch.randn(len(store.users), args.dim, generator=generator)
        items = torch.randn(len(store.items), args.dim, generator=generator)
        bias = torch.randn(len(store.items), generator=generator)
        before = peak_gib()
        started = time.perf_counter()
        top = top_unseen(users, items, bias, store, args.teacher_top, Path(scratch) / "top.npy")
        seconds = time.perf_counter() - started
        after = peak_gib()
        interactions = len(store.train_items)
    print(
        f"\nteacher-ranked lists: {len(top):,} users × {len(store.items):,} items, "
        f"{interactions:,} train interactions, top {args.teacher_top}, chunks of "
        f"{CELLS:,} scores\n"
    )
    print(f"{'seconds':>8}{'peak GiB before':>17}{'peak GiB after':>16}{'ranking adds GiB':>18}")
    print(f"{seconds:>8.1f}{before:>17.2f}{after:>16.2f}{after - before:>18.2f}")


if __name__ == "__main__":
    main()
