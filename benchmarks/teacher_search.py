"""Validation-only comparison of variants of one training stage, side by side.

Each ``--variant`` is a TOML snippet with dotted keys merged over the config (for example
``'models.teacher.dropout = 0.3'`` or ``'stages.teacher.objective = "lists"'``; an empty one
is the config as it is, the default when none is given). Every variant trains the stage alone (a stage that learns
from teachers is refused) from the same seed and reports its best validation NDCG@10, the
epoch it came at and the time taken. Nothing here reads the test split: this is how the
presets in configs/ are chosen.

    .venv/bin/python benchmarks/teacher_search.py --config configs/ml100k.toml \\
        --data data/ml100k --stage teacher \\
        --variant 'models.teacher.readout = "attention"
                   stages.teacher.objective = "lists"' --epochs 3
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import tomllib
from pathlib import Path
from typing import Any

from recdistill.config import RunConfig, load_run_config
from recdistill.data.batches import FeatureStore
from recdistill.recipe import train_stage


def train_variant(
    config: RunConfig, data: Path, stage_name: str | None, epochs: int | None
) -> dict[str, Any]:
    stage = config.stage(stage_name or config.roles.reference)
    if stage.teachers:
        raise ValueError(f"{stage.where} learns from {list(stage.teachers)}: not alone")
    if epochs is not None:
        stage = dataclasses.replace(stage, epochs=epochs)
    store = FeatureStore(data, history_length=config.history_length)
    with tempfile.TemporaryDirectory() as scratch:
        model, result = train_stage(stage, config.models[stage.model], {}, store, Path(scratch))
    return {
        "params": model.parameter_count(),
        "metric": stage.valid_metric,
        "valid": result.valid,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs_run,
        "seconds": result.seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--stage", help="default: the config's reference teacher")
    parser.add_argument("--variant", action="append", default=[], help="TOML, dotted keys")
    parser.add_argument("--epochs", type=int, help="cap every variant's epochs")
    args = parser.parse_args()
    rows = []
    for snippet in args.variant or [""]:
        change = tomllib.loads(snippet)
        config = load_run_config(args.config, change)
        row = train_variant(config, args.data, args.stage, args.epochs)
        rows.append((" ".join(snippet.split()) or "(config as is)", row))
        print(f"{rows[-1][0]}: valid {row['valid']}", flush=True)
    stage = args.stage or config.roles.reference
    print(f"\n{args.config}, stage {stage}, {args.data}; best epoch by valid {row['metric']}")
    print(
        "| variant | params | valid NDCG@10 | valid full NDCG@10 | best epoch | epochs run | train s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, row in rows:
        print(
            f"| `{name}` | {row['params']:,} | {row['valid']['ndcg@10']:.4f} "
            f"| {row['valid']['full_ndcg@10']:.4f} | {row['best_epoch']} "
            f"| {row['epochs']} | {row['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
