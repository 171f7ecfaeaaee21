"""Time and peak memory of a distillation stage from an ONNX teacher, beside the same stage
from the equivalent internal teacher.

    .venv/bin/python benchmarks/external_teacher_cost.py --data data/ml100k --config configs/ml100k.toml
    .venv/bin/python benchmarks/external_teacher_cost.py --users 200000 --config configs/synthetic.toml

The config's reference teacher (its architecture, random weights: the cost does not depend
on them) is exported as ONNX (``recdistill.onnx_export``), then each teacher teaches the
config's student stage, every loss of it learning from that teacher, in a process of its
own: the teacher is loaded (the ONNX graph tried on a few lists, its item vectors asked
for), its user vector at every train row computed and written to a memory-mapped file, its
ranking of the catalogue at every row (RRD lists), then ``--batches`` training batches of
the stage. An epoch is estimated as the per-row work once plus the epoch's batches at the
measured pace (validation not counted: it does not involve the teacher). Peak memory is the
process's resident peak after each step. Without ``--data`` a synthetic world of ``--users``
users and 20,000 items (10M interactions at 200,000 users) is generated first.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import torch
from synthetic_scale import generated_world, peak_gib

from recdistill.artifact import Artifact
from recdistill.config import load_run_config
from recdistill.data.feature_store import FeatureStore
from recdistill.external.load import load_teacher
from recdistill.external.spec import TeacherSpec
from recdistill.manifest import TWO_TOWER
from recdistill.models import FeatureSpace, TwoTower
from recdistill.online import OnlineRanker
from recdistill.onnx_export import export_onnx
from recdistill.ranked_lists import ListSpec
from recdistill.stage import LABELS
from recdistill.teachers import FrozenTeacher
from recdistill.trainer import Trainer

TEACHER = "teacher"


def teacher_model(config_path: Path, store: FeatureStore) -> TwoTower:
    config = load_run_config(config_path)
    torch.manual_seed(0)
    return TwoTower(config.preset(config.roles.reference), FeatureSpace.of(store)).eval()


def export(config_path: Path, data: Path, out: Path) -> Path:
    """The config's teacher (random weights) as ONNX, as ``recdistill export --format onnx``
    writes a trained one: its ``teacher.toml`` (the graph and its vocabularies)."""
    config = load_run_config(config_path)
    store = FeatureStore(data, history_length=config.history_length)
    model = teacher_model(config_path, store)
    artifact = Artifact(
        directory=out,
        name=TEACHER,
        kind=TWO_TOWER,
        version="benchmark",
        params=model.parameter_count(),
        store=store.known_at("test"),
        model=copy.deepcopy(model),
        counts=None,
    )
    return export_onnx(OnlineRanker(artifact), out, TEACHER).teacher


def measure(config_path: Path, data: Path, onnx: Path | None, scratch: Path, batches: int) -> dict:
    """One teacher's stage, in this process: seconds and peak GiB of each step."""
    config = load_run_config(config_path)
    store = FeatureStore(data, history_length=config.history_length)
    student = config.stage(config.roles.student)
    losses = tuple(
        t if t.source == LABELS else dataclasses.replace(t, source=TEACHER) for t in student.losses
    )
    lists = student.lists or ListSpec()
    stage = dataclasses.replace(student, losses=losses, lists=lists)
    result = {"loaded_gib": peak_gib()}
    started = time.perf_counter()
    if onnx is None:
        # A sequence teacher's states are computed as it is frozen.
        teacher = FrozenTeacher(TEACHER, teacher_model(config_path, store), store, cache=scratch)
        result["load_s"], states = 0.0, teacher.states
    else:
        table = tomllib.loads(onnx.read_text())["teachers"][TEACHER]
        spec = TeacherSpec(TEACHER, **table)
        teacher = load_teacher(spec, store, cache=scratch)
        result["load_s"] = time.perf_counter() - started
        states = teacher.states
    result["states_s"] = time.perf_counter() - started - result["load_s"]
    result["states_gib"] = peak_gib()
    started = time.perf_counter()
    teacher.ranked(lists.depth)
    result["ranking_s"] = time.perf_counter() - started
    result["ranking_gib"] = peak_gib()
    torch.manual_seed(stage.seed)
    model = TwoTower(config.models[stage.model], FeatureSpace.of(store))
    trainer = Trainer(stage, model, {TEACHER: teacher}, store, scratch / "stage")
    trainer.train_epoch(0, max_batches=1)  # the first batch pays one-off costs
    started = time.perf_counter()
    trainer.train_epoch(1, max_batches=batches)
    result["batch_ms"] = 1e3 * (time.perf_counter() - started) / batches
    result["batches_per_epoch"] = len(trainer.lists)
    result["peak_gib"] = peak_gib()
    result["rows"] = store.train_rows
    result["state_shape"] = list(states.shape)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--data", type=Path, help="a data directory (default: generate one)")
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--batches", type=int, default=20, help="training batches timed")
    parser.add_argument("--measure", choices=("internal", "onnx"), help=argparse.SUPPRESS)
    parser.add_argument("--onnx", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        onnx = args.onnx if args.measure == "onnx" else None
        print(json.dumps(measure(args.config, args.data, onnx, args.scratch, args.batches)))
        return
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        data = args.data or generated_world(args.users, scratch / "data")
        exported = export(args.config, data, scratch / "onnx")
        rows = {}
        for mode in ("internal", "onnx"):
            command = [sys.executable, __file__, "--config", str(args.config), "--data", str(data)]
            command += ["--batches", str(args.batches), "--measure", mode, "--onnx", str(exported)]
            command += ["--scratch", str(scratch / mode)]
            printed = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout
            rows[mode] = json.loads(printed.strip().splitlines()[-1])
    first = rows["internal"]
    print(
        f"\n{data}: {first['rows']:,} train rows; teacher states {first['state_shape'][1]}-d; "
        f"{torch.get_num_threads()} torch thread(s); {args.batches} training batches timed\n"
    )
    print(
        f"{'teacher':<10}{'load s':>8}{'states s':>10}{'ranking s':>11}{'ms/batch':>10}"
        f"{'epoch min':>11}{'peak GiB: states':>18}{'+ ranking':>11}{'+ batches':>11}"
    )
    for mode, row in rows.items():
        once = row["load_s"] + row["states_s"] + row["ranking_s"]
        epoch = (once + row["batches_per_epoch"] * row["batch_ms"] / 1e3) / 60
        print(
            f"{mode:<10}{row['load_s']:>8.1f}{row['states_s']:>10.1f}{row['ranking_s']:>11.1f}"
            f"{row['batch_ms']:>10.1f}{epoch:>11.1f}{row['states_gib']:>18.2f}"
            f"{row['ranking_gib']:>11.2f}{row['peak_gib']:>11.2f}"
        )
    ratio = {
        key: rows["onnx"][key] / max(rows["internal"][key], 1e-9)
        for key in ("states_s", "ranking_s", "batch_ms", "peak_gib")
    }
    print("\nonnx / internal: " + "  ".join(f"{k} ×{v:.2f}" for k, v in ratio.items()))


if __name__ == "__main__":
    main()
