"""Does a run on the GPU give what it gives on the CPU, and how much faster does it train?

    .venv/bin/python benchmarks/device_check.py [--devices cpu cuda] [--users 4000 --batches 30]
        [--check-users 400 --epochs 2]

Three tables, a row per device; a device torch cannot see (CUDA on a CPU-only machine) is
a row marked unavailable, so the script runs everywhere:

1. **Same weights, same metrics.** The models of a tiny run trained on the CPU are scored on
   each device: every model's test NDCG@10 and full-ranking NDCG@10 must agree with the
   CPU's within ``SCORE_TOLERANCE``.
2. **Same run, same metrics.** The tiny run (``CHECK_CONFIG``: a causal sequence teacher
   learning the next item, a bag student distilled from it on RRD lists, ``--epochs`` each,
   on a synthetic world of ``--check-users`` users) is trained on each device: every model's
   test NDCG@10 must be within ``TRAIN_TOLERANCE`` of the CPU's. Kernels differ in the last bits of float32
   and training compounds the difference, so this tolerance is wider.
3. **Training speed.** The demo's teacher stage (``configs/synthetic.toml``, in float32 and
   with ``precision = "bf16"``) and the demo sweep's 8-d bag student distilled on RRD lists
   from that teacher (``configs/sweep_synthetic.toml``):
   training examples per second over ``--batches`` batches, after two unmeasured ones, on
   a synthetic world of ``--users`` users (the demo's 4,000 by default). The weights are
   fresh: speed does not depend on them.

Exits 1 when an available device disagrees with the CPU beyond a tolerance.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import torch

from recdistill import devices
from recdistill.api import train
from recdistill.config import RunConfig, load_run_config, load_sweep_config, parse_run_config
from recdistill.data.feature_store import FeatureStore
from recdistill.data.prepare import SplitSpec, prepare
from recdistill.data.synthetic import SyntheticSpec, generate
from recdistill.evaluate import evaluate, mean_metrics
from recdistill.models import FeatureSpace, TwoTower, TwoTowerSpec
from recdistill.recipe import load_stage_model
from recdistill.stage import StageSpec
from recdistill.teachers import FrozenTeacher
from recdistill.trainer import Trainer

PROJECT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = PROJECT / "configs" / "synthetic.toml"
DEMO_SWEEP = PROJECT / "configs" / "sweep_synthetic.toml"
STUDENT = ("b8", "rrd")  # the demo sweep's 8-d bag (34,493 parameters) and its loss mix
METRICS = ("ndcg@10", "full_ndcg@10")
# Absolute differences from the CPU's metrics that a device may show.
SCORE_TOLERANCE = 1e-4
TRAIN_TOLERANCE = 0.02
CHECK_WORLD = SyntheticSpec(items=500, mean_activity=25.0, seed=3)
CHECK_CONFIG = """
[models.teacher]
embedding_dim = 16
tower = [32, 16]
user_encoder = "sequence"
max_length = 10
layers = 1

[models.student]
embedding_dim = 8
tower = [8]
feature_dim = 2
recent_length = 1

[train]
history_length = 20
batch_size = 256
learning_rate = 5e-3

[baselines.ease]
l2 = [100.0]

[baselines.ease_recency]
half_life = [5.0]

[stages.teacher]
model = "teacher"
objective = "next_item"
scored_items = "all"
batch_size = 64
losses = [{ fn = "softmax_ce" }]

[stages.student]
model = "student"
lists = { depth = 50, top = 10, uniform = 10 }
losses = [{ fn = "softmax_ce" }, { fn = "listmle", source = "teacher", top_k = 10 }]
"""


def available(name: str) -> bool:
    try:
        devices.resolve(name)
    except ValueError:
        return False
    return True


def world(spec: SyntheticSpec, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    generate(spec, directory)
    prepare(directory, SplitSpec(seed=spec.seed))
    return directory


def check_config(epochs: int) -> RunConfig:
    raw = tomllib.loads(CHECK_CONFIG)
    raw["train"]["epochs"] = epochs
    return parse_run_config(raw)


def same_weights(
    config: RunConfig, run: Path, data: Path, names: list[str]
) -> dict[str, dict[str, float] | None]:
    """Each device's test metrics ``model metric`` of the models trained on the CPU (None:
    unavailable)."""
    store = FeatureStore(data, history_length=config.history_length)
    scored: dict[str, dict[str, float] | None] = {}
    for name in names:
        if not available(name):
            scored[name] = None
            continue
        device = devices.use(name)
        scored[name] = {}
        for stage in config.stages:
            model = load_stage_model(run, stage.name, store).to(device)
            metrics = mean_metrics(evaluate(model, store, "test", name=stage.name))
            scored[name] |= {f"{stage.name} {m}": metrics[m] for m in METRICS}
    return scored


def same_run(
    config: RunConfig, data: Path, scratch: Path, names: list[str]
) -> dict[str, dict[str, float] | None]:
    """Each device's test metrics ``model metric`` of the tiny run trained on it."""
    runs: dict[str, dict[str, float] | None] = {}
    for name in names:
        if not available(name):
            runs[name] = None
            continue
        summary = train(config, data, scratch / f"run-{name}", device=name)
        runs[name] = {
            f"{model} {m}": summary.models[model].metrics[m]
            for model in ("teacher", "student")
            for m in METRICS
        }
    return runs


def speed_stages() -> dict[str, tuple[StageSpec, TwoTowerSpec]]:
    """The demo's teacher stage, in float32 and in bf16, and the demo sweep's 8-d bag
    student (``STUDENT``) learning from it on RRD lists, each with its model."""
    config = load_run_config(DEMO_CONFIG)
    sweep = load_sweep_config(DEMO_SWEEP)
    teacher = config.stage("teacher")
    preset, mix = STUDENT
    student = sweep.train.stage_of("student", preset, sweep.mixes[mix], lists=sweep.sweep.lists)
    model = config.models[teacher.model]
    return {
        "teacher": (teacher, model),
        "teacher (bf16)": (dataclasses.replace(teacher, precision="bf16"), model),
        "student on RRD lists": (student, sweep.models[preset]),
    }


def examples_per_second(trainer: Trainer, batches: int) -> float:
    trainer.train_epoch(0, max_batches=2)
    stats = trainer.train_epoch(1, max_batches=batches)
    return stats.examples / stats.seconds


def speeds(
    data: Path, scratch: Path, names: list[str], batches: int
) -> dict[str, dict[str, float] | None]:
    """Each device's training examples per second of every stage of :func:`speed_stages`."""
    config = load_run_config(DEMO_CONFIG)
    store = FeatureStore(data, history_length=config.history_length)
    space = FeatureSpace.of(store)
    measured: dict[str, dict[str, float] | None] = {}
    for name in names:
        if not available(name):
            measured[name] = None
            continue
        devices.use(name)
        torch.manual_seed(0)
        teacher = TwoTower(config.models["teacher"], space)
        frozen = {"teacher": FrozenTeacher("teacher", teacher, store)}
        measured[name] = {}
        for label, (stage, spec) in speed_stages().items():
            torch.manual_seed(0)
            model = TwoTower(spec, space)
            teachers = {t: frozen[t] for t in stage.teachers}
            trainer = Trainer(stage, model, teachers, store, scratch / name / stage.name)
            measured[name][label] = examples_per_second(trainer, batches)
    return measured


def table(title: str, rows: dict[str, dict[str, float] | None], fmt: str) -> list[str]:
    columns = next((list(r) for r in rows.values() if r is not None), [])
    lines = [f"\n{title}\n", "| device | " + " | ".join(columns) + " |"]
    lines.append("|---|" + "---:|" * len(columns))
    for name, row in rows.items():
        cells = (
            ["unavailable"] * len(columns) if row is None else [fmt.format(v) for v in row.values()]
        )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def disagreements(rows: dict[str, dict[str, float] | None], tolerance: float) -> list[str]:
    """Every available device's metric further than ``tolerance`` from the CPU's."""
    cpu = rows.get("cpu")
    if cpu is None:
        return []
    return [
        f"{name} {key}: {value:.6f} against the CPU's {cpu[key]:.6f} (tolerance {tolerance:g})"
        for name, row in rows.items()
        if row is not None
        for key, value in row.items()
        if abs(value - cpu[key]) > tolerance
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"])
    parser.add_argument("--users", type=int, default=4000, help="users of the speed world")
    parser.add_argument("--batches", type=int, default=30, help="training batches timed")
    parser.add_argument("--check-users", type=int, default=400, help="users of the tiny run")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each tiny stage")
    args = parser.parse_args(argv)
    names = ["cpu", *(n for n in args.devices if n != "cpu")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        scratch = Path(directory)
        config = check_config(args.epochs)
        check = world(dataclasses.replace(CHECK_WORLD, users=args.check_users), scratch / "check")
        runs = same_run(config, check, scratch, names)
        scored = same_weights(config, scratch / "run-cpu", check, names)
        demo = dataclasses.replace(load_run_config(DEMO_CONFIG).data.synthetic, users=args.users)
        trained = speeds(
            world(demo, scratch / "speed"), scratch / "speed-runs", names, args.batches
        )
    devices.use("cpu")
    print(f"torch {torch.__version__}; {torch.get_num_threads()} CPU threads")
    lines = table(
        f"Same weights (trained on the CPU), test metrics; tolerance {SCORE_TOLERANCE:g}",
        scored,
        "{:.4f}",
    )
    lines += table(
        f"Same run trained on each device; tolerance {TRAIN_TOLERANCE:g}", runs, "{:.4f}"
    )
    lines += table(
        f"Training examples per second, {args.users:,} users, {args.batches} batches",
        trained,
        "{:,.0f}",
    )
    print("\n".join(lines))
    problems = disagreements(scored, SCORE_TOLERANCE) + disagreements(runs, TRAIN_TOLERANCE)
    print(f"\n{time.perf_counter() - started:.0f} s")
    for problem in problems:
        print(f"DISAGREES: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
