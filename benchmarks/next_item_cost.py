"""Cost of a next-item training step of the config's teacher, per loss, side by side.

    .venv/bin/python benchmarks/next_item_cost.py --config configs/ml100k.toml --data data/ml100k
    .venv/bin/python benchmarks/next_item_cost.py --config configs/synthetic.toml --users 200000

Times ``--batches`` training steps (loss, backward, Adam step, after two unmeasured ones) of
the config's teacher stage under each loss: a softmax over the whole catalogue, a softmax
over ``--negatives`` items sampled per window, and gBCE on the same sampled items. An
epoch's time is the step's time × the epoch's batches. Without ``--data`` it first
generates a synthetic world of ``--users`` users and 20,000 items (55 interactions per user
on average: 10M interactions at 200,000 users) in a separate process, as
benchmarks/teacher_states.py does. The weights are random: the cost does not depend on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from synthetic_scale import generated_world, peak_gib

from recdistill.config import load_run_config
from recdistill.data.batches import FeatureStore
from recdistill.models import FeatureSpace, TwoTower
from recdistill.stage import LossTerm, StageSpec
from recdistill.trainer import Trainer


def variants(stage: StageSpec, negatives: int) -> dict[str, StageSpec]:
    sampled = dataclasses.replace(stage, scored_items="sampled", negatives=negatives)
    return {
        "softmax_ce, every item": dataclasses.replace(
            stage, scored_items="all", losses=(LossTerm("softmax_ce"),)
        ),
        f"softmax_ce, {negatives} sampled": dataclasses.replace(
            sampled, losses=(LossTerm("softmax_ce"),)
        ),
        f"gbce (t 0.75), {negatives} sampled": dataclasses.replace(
            sampled, losses=(LossTerm("gbce", options={"t": 0.75}),)
        ),
    }


def seconds_per_step(trainer: Trainer, batches: int) -> float:
    steps = iter(trainer.lists.epoch(0))
    elapsed = 0.0
    for k in range(batches + 2):
        batch = next(steps)
        started = time.perf_counter()
        loss = trainer.loss(batch, 0, k)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        if k >= 2:
            elapsed += time.perf_counter() - started
    return elapsed / batches


def measure(config_path: Path, data: Path, scratch: Path, batches: int, negatives: int) -> None:
    config = load_run_config(config_path)
    stage = config.stage(config.roles.reference)
    preset = config.models[stage.model]
    store = FeatureStore(data, history_length=config.history_length)
    space = FeatureSpace.of(store)
    print(
        f"\n{data}: {len(store.users) - 1:,} users, {len(store.items) - 1:,} items, "
        f"{store.train_rows:,} train rows; teacher {preset.embedding_dim}-d, "
        f"{preset.layers} layer(s), max_length {preset.max_length}, {stage.batch_size} windows "
        f"a batch; {torch.get_num_threads()} torch thread(s); {batches} steps timed\n"
    )
    print("| loss | ms/step | steps/epoch | s/epoch | peak GiB so far |")
    print("|---|---:|---:|---:|---:|")
    for label, variant in variants(stage, negatives).items():
        torch.manual_seed(0)
        model = TwoTower(preset, space)
        trainer = Trainer(variant, model, {}, store, scratch / label.replace(" ", "_"))
        step = seconds_per_step(trainer, batches)
        print(
            f"| {label} | {1e3 * step:.0f} | {len(trainer.lists):,} "
            f"| {step * len(trainer.lists):,.0f} | {peak_gib():.2f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--data", type=Path, help="a data directory (default: generate one)")
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--batches", type=int, default=20, help="training steps timed")
    parser.add_argument("--negatives", type=int, default=256, help="sampled items per window")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        data = args.data or generated_world(args.users, Path(scratch) / "data")
        measure(args.config, data, Path(scratch), args.batches, args.negatives)


if __name__ == "__main__":
    main()
