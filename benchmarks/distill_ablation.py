"""Which distillation pays: each loss family on training lists and on teacher-ranked lists.

A student (the config's ``student`` stage and preset) learns from a finished run's teacher
with ``softmax_ce`` on the labels plus one distillation term, either on the training lists
(one positive, sampled negatives) or on teacher-ranked lists (``lists`` of the config's
``student`` stage; recdistill/ranked_lists.py). Each family's weight is chosen on validation
NDCG@10 among ``--weights``; only the chosen variant is then scored on test (sampled and full
ranking), beside the student trained on labels alone.

    .venv/bin/python benchmarks/distill_ablation.py --config configs/ml100k.toml \\
        --data data/ml100k --run runs/ml100k
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from recdistill.config import history_length, load_config
from recdistill.data.batches import FeatureStore
from recdistill.evaluate import evaluate
from recdistill.layout import RunLayout
from recdistill.models import FeatureSpace, TwoTower
from recdistill.pipeline import model_presets, stages_from
from recdistill.ranked_lists import ListSpec
from recdistill.stage import LossTerm, StageSpec
from recdistill.train import Trainer

# (row label, loss name, options): the distillation term of each family.
FAMILIES = (
    ("listwise ListNet", "listnet", {"temperature": 2.0}),
    ("RRD ListMLE top-10", "listmle", {"top_k": 10}),
    ("RD rank-weighted top-10", "rank_weighted", {"top_k": 10}),
    ("pairwise RankNet", "ranknet", {}),
    ("feature MSE", "feature_mse", {}),
)
LABELS_TERM = LossTerm("softmax_ce")


def fit_student(
    stage: StageSpec, model_spec, teacher: TwoTower, store: FeatureStore
) -> tuple[TwoTower, float, float]:
    """Train ``stage``; returns the model at its best validation epoch, that NDCG@10 and the
    seconds it took."""
    torch.manual_seed(stage.seed)
    model = TwoTower(model_spec, FeatureSpace(store.user_features, store.cardinalities()))
    with tempfile.TemporaryDirectory() as scratch:
        result = Trainer(stage, model, {"teacher": teacher}, store, Path(scratch)).fit()
    return model, result.best_valid, result.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True, help="a run with a trained teacher")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument(
        "--families", nargs="+", default=[name for _, name, _ in FAMILIES], help="loss names"
    )
    args = parser.parse_args()

    config = load_config(args.config)
    presets = model_presets(config)
    stages = {stage.name: stage for stage in stages_from(config)}
    student = stages["student"]
    lists = student.lists or ListSpec()
    store = FeatureStore(args.data, history_length=history_length(config))
    space = FeatureSpace(store.user_features, store.cardinalities())
    teacher = TwoTower(presets[stages["teacher"].model], space)
    teacher.load_state_dict(load_file(str(RunLayout(args.run).stage("teacher").weights)))
    teacher.eval()

    def scored(label: str, model: TwoTower, valid: float, seconds: float) -> dict:
        test = evaluate(model, store, "test")
        return {
            "variant": label,
            "valid": valid,
            "ndcg@10": float(test["ndcg@10"].mean()),
            "full": float(test["full_ndcg@10"].mean()),
            "seconds": seconds,
        }

    base = dataclasses.replace(student, losses=(LABELS_TERM,), lists=None)
    rows = [
        scored(
            "labels alone (student_scratch)",
            *fit_student(base, presets[student.model], teacher, store),
        )
    ]
    started = time.perf_counter()
    for label, fn, options in FAMILIES:
        if fn not in args.families:
            continue
        for kind, spec in (("training lists", None), ("teacher-ranked lists", lists)):
            if fn == "feature_mse" and spec is not None:
                continue  # compares tower outputs: no lists involved
            best = None
            for weight in args.weights:
                term = LossTerm(fn, "teacher", weight, dict(options))
                stage = dataclasses.replace(base, losses=(LABELS_TERM, term), lists=spec)
                model, valid, seconds = fit_student(stage, presets[student.model], teacher, store)
                print(f"{label}, {kind}, weight {weight:g}: valid {valid:.4f} ({seconds:.0f} s)")
                if best is None or valid > best[0]:
                    best = (valid, weight, model, seconds)
            valid, weight, model, seconds = best
            rows.append(scored(f"{label}, {kind} (weight {weight:g})", model, valid, seconds))
    scratch = rows[0]
    print(
        f"\nstudent of {args.config} learning from {args.run}/teacher; teacher-ranked lists: "
        f"teacher_top {lists.teacher_top}, sampled {lists.sampled}; weights chosen on "
        f"validation among {args.weights} ({time.perf_counter() - started:.0f} s)\n"
    )
    print(
        f"{'variant':<58}{'valid':>8}{'test ndcg@10':>14}{'× scratch':>11}"
        f"{'full ndcg@10':>14}{'× scratch':>11}"
    )
    for entry in rows:
        print(
            f"{entry['variant']:<58}{entry['valid']:>8.4f}{entry['ndcg@10']:>14.4f}"
            f"{entry['ndcg@10'] / scratch['ndcg@10']:>11.3f}{entry['full']:>14.4f}"
            f"{entry['full'] / scratch['full']:>11.3f}"
        )


if __name__ == "__main__":
    main()
