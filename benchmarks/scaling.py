"""Teacher training at 1M, 3M and 10M interactions: one process vs `torchrun --nproc_per_node=2`.

    .venv/bin/python benchmarks/scaling.py [--users 20000 60000 200000] [--steps 200]

For each size, three fresh processes: `recdistill data synthetic` (20,000 items, ~50
interactions per user), then the teacher of configs/synthetic.toml trained for ``--steps``
of its batches (64 next-item windows of 30 history items) in one process, then the same under
`torchrun --standalone --nproc_per_node=2` (gloo on CPU, embedding tables sharded; each rank
takes ``--steps`` batches, so twice the examples). Each process reports its own peak
resident memory; "load" is building the FeatureStore (vocabularies, histories, seen-pair
keys) from the data directory, "train" the steps themselves.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from synthetic_scale import ITEMS, MEAN_ACTIVITY, measure_one, peak_gib

PROJECT = Path(__file__).resolve().parents[1]
CONFIG = PROJECT / "configs" / "synthetic.toml"


def train(data: Path, steps: int) -> dict | None:
    """Train the teacher for ``steps`` batches per rank; rank 0 returns the measurements."""
    from recdistill import distributed
    from recdistill.config import load_run_config
    from recdistill.data.batches import FeatureStore
    from recdistill.models import FeatureSpace, TwoTower
    from recdistill.trainer import Trainer

    world = distributed.world()
    config = load_run_config(CONFIG)
    stage = config.stage(config.roles.reference)
    started = time.perf_counter()
    store = FeatureStore(data, history_length=config.history_length)
    load_seconds = time.perf_counter() - started
    model = TwoTower(config.models[stage.model], FeatureSpace.of(store))
    with tempfile.TemporaryDirectory() as scratch:
        stats = Trainer(stage, model, {}, store, Path(scratch)).train_epoch(0, max_batches=steps)
    peaks = distributed.all_gather_json(peak_gib(), world) if world.distributed else [peak_gib()]
    if not world.is_main:
        return None
    return {
        "processes": world.size,
        "load_seconds": load_seconds,
        "train_seconds": stats.seconds,
        "examples": stats.examples,
        "peak_gib": max(peaks),
    }


def child(command: list[str]) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, nargs="+", default=[20_000, 60_000, 200_000])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--generate", nargs=2, metavar=("USERS", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--train", type=Path, metavar="DATA", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        print(json.dumps(measure_one(int(args.generate[0]), Path(args.generate[1]))))
        return
    if args.train:
        result = train(args.train, args.steps)
        if result is not None:
            print(json.dumps(result))
        return

    here = [sys.executable, __file__]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone"]
    rows = []
    for users in args.users:
        scratch = Path(tempfile.mkdtemp(prefix="scaling-"))
        try:
            data = scratch / "world"
            row = {"users": users, "data": child([*here, "--generate", str(users), str(data)])}
            training = [__file__, "--train", str(data), "--steps", str(args.steps)]
            row["single"] = child([sys.executable, *training])
            row["torchrun"] = child([*torchrun, "--nproc_per_node=2", *training])
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    print(report(rows, args.steps))


def batch_description() -> str:
    """What one step of the teacher's stage trains on, from the config."""
    from recdistill.config import load_run_config

    config = load_run_config(CONFIG)
    stage = config.stage(config.roles.reference)
    unit = "next-item windows" if stage.objective == "next_item" else "lists"
    return f"{stage.batch_size:,} {unit}"


def report(rows: list[dict], steps: int) -> str:
    title = (
        f"teacher of {CONFIG.name}, {steps} steps of {batch_description()} per process "
        "(examples: their targets); "
        f"synthetic data, {ITEMS:,} items, mean activity {MEAN_ACTIVITY:g}"
    )
    header = (
        f"{'interactions':>13} {'data s':>7} {'data GiB':>9}  {'mode':<10} {'load s':>7} "
        f"{'train s':>8} {'examples/s':>11} {'peak GiB/proc':>14}"
    )
    lines = [title, "", header]
    for row in rows:
        data = row["data"]
        for mode in ("single", "torchrun"):
            run = row[mode]
            label = "1 process" if mode == "single" else f"torchrun {run['processes']}"
            lines.append(
                f"{data['interactions']:>13,} {data['seconds']:>7.1f} {data['peak_gib']:>9.2f}  "
                f"{label:<10} {run['load_seconds']:>7.1f} {run['train_seconds']:>8.1f} "
                f"{run['examples'] / run['train_seconds']:>11,.0f} {run['peak_gib']:>14.2f}"
            )
    first, last = rows[0], rows[-1]

    def growth(key: str, part: str = "data") -> str:
        return f"{last[part][key] / first[part][key]:.1f}x"

    summary = (
        f"{growth('interactions')} the interactions: data step {growth('seconds')} the time, "
        f"{growth('peak_gib')} the memory; FeatureStore load {growth('load_seconds', 'single')}; "
        f"{steps} training steps {growth('train_seconds', 'single')} the time in 1 process, "
        f"{growth('train_seconds', 'torchrun')} under torchrun; training peak memory "
        f"{growth('peak_gib', 'single')}."
    )
    lines += ["", summary]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
