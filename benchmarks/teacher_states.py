"""Time and peak memory of a frozen sequence teacher's per-row states and rankings, and of RRD lists.

    .venv/bin/python benchmarks/teacher_states.py --data data/ml100k --config configs/ml100k.toml
    .venv/bin/python benchmarks/teacher_states.py --users 200000 --config configs/synthetic.toml

Computes the state of the config's teacher (its architecture, random weights: the cost does
not depend on them) at every train row, from the row's past alone, written to a memory-mapped
file as a distillation stage does once per run (recdistill/teachers.py), then its ranking
of the catalogue at every train row (the ``depth`` best items of the config's student
``lists``, or RRD's defaults), then draws the RRD lists of ``--batches`` training batches of
the config's student stage (recdistill/ranked_lists.py).
Without ``--data`` it first generates a synthetic world of ``--users`` users and 20,000 items
(55 interactions per user on average: 10M interactions at 200,000 users) in a separate
process, so that the generator's peak is not this one's. Peak memory is this process's
resident peak after loading the ``FeatureStore``, after the states, the rankings and the
lists; the files stay on disk, memory-mapped.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from synthetic_scale import generated_world, peak_gib

from recdistill.config import load_run_config
from recdistill.data.batches import FeatureStore, TrainLists
from recdistill.models import FeatureSpace, TwoTower
from recdistill.ranked_lists import ListSpec, rrd_lists
from recdistill.teachers import FrozenTeacher


def measure(config_path: Path, data: Path, scratch: Path, batches: int) -> None:
    config = load_run_config(config_path)
    preset = config.preset(config.roles.reference)
    student = config.stage(config.roles.student)
    loaded = time.perf_counter()
    store = FeatureStore(data, history_length=config.history_length)
    load_seconds = time.perf_counter() - loaded
    after_load = peak_gib()
    torch.manual_seed(0)
    model = TwoTower(preset, FeatureSpace.of(store))
    started = time.perf_counter()
    teacher = FrozenTeacher(config.roles.reference, model, store, cache=scratch)
    state_seconds = time.perf_counter() - started
    after_states = peak_gib()
    lists = student.lists or ListSpec()
    started = time.perf_counter()
    teacher.ranked(lists.depth)
    rank_seconds = time.perf_counter() - started
    after_ranking = peak_gib()
    train = TrainLists(store, batch_size=student.batch_size, negatives=student.negatives)
    rng = np.random.default_rng(0)
    drawn, list_seconds = 0, 0.0
    for batch in train.epoch(0):
        if drawn == batches:
            break
        started = time.perf_counter()
        rrd_lists(batch, teacher.users(batch), teacher, store, lists, rng)
        list_seconds += time.perf_counter() - started
        drawn += 1
    after_lists = peak_gib()
    gib = store.train_rows * 4 / 2**30
    print(
        f"\n{data}: {len(store.users) - 1:,} users, {len(store.items) - 1:,} items, "
        f"{store.train_rows:,} train rows; teacher {preset.embedding_dim}-d, "
        f"{preset.layers} layer(s), max_length {preset.max_length}; {torch.get_num_threads()} "
        f"torch thread(s); RRD lists {lists}, {student.batch_size} lists a batch\n"
    )
    print(
        f"{'load s':>7}{'states s':>10}{'GiB':>6}{'ranking s':>11}{'GiB':>6}{'ms/batch':>10}"
        f"{'peak GiB: loaded':>18}{'+ states':>10}{'+ ranking':>11}{'+ lists':>9}"
    )
    print(
        f"{load_seconds:>7.1f}{state_seconds:>10.1f}{gib * model.output_dim:>6.2f}"
        f"{rank_seconds:>11.1f}{gib * lists.depth:>6.2f}{1e3 * list_seconds / max(drawn, 1):>10.1f}"
        f"{after_load:>18.2f}{after_states:>10.2f}{after_ranking:>11.2f}{after_lists:>9.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--data", type=Path, help="a data directory (default: generate one)")
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--batches", type=int, default=20, help="batches of RRD lists timed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data = args.data or generated_world(args.users, Path(scratch) / "data")
        measure(args.config, data, Path(scratch) / "states", args.batches)


if __name__ == "__main__":
    main()
