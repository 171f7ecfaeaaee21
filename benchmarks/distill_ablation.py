"""Which distillation pays: each loss family on training lists and on RRD lists.

A student (the config's student stage and preset) learns from a finished run's reference teacher
with ``softmax_ce`` on the labels plus one distillation term, either on the training lists
(one positive, sampled negatives, the teacher asked about the list's moment) or on RRD lists
(``lists`` of the config's ``student`` stage, or RRD's defaults: 40 items sampled from the
teacher's top 100, 40 uniform ones; recdistill/ranked_lists.py). Each family's weight is
chosen on the config's validation metric among ``--weights``; only the chosen variant is
reported on test (sampled and full ranking), beside the student trained on labels alone.

    .venv/bin/python benchmarks/distill_ablation.py --config configs/ml100k.toml \\
        --data data/ml100k --run runs/ml100k
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from students import METRICS, RunBench, Scored

from recdistill.ranked_lists import ListSpec
from recdistill.stage import LossTerm

LABELS_TERM = LossTerm("softmax_ce")


def families(lists: ListSpec) -> tuple[tuple[str, str, dict, dict], ...]:
    """(row label, loss name, options on training lists, options on RRD lists)."""
    return (
        ("listwise ListNet", "listnet", {"temperature": 2.0}, {"temperature": 2.0}),
        ("RRD ListMLE", "listmle", {"top_k": 10}, {"top_k": lists.top}),
        ("RD rank-weighted top-10", "rank_weighted", {"top_k": 10}, {"top_k": 10}),
        ("pairwise RankNet", "ranknet", {}, {}),
        ("feature MSE", "feature_mse", {}, None),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True, help="a run with a trained teacher")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--families", nargs="+", help="loss names (default: every family)")
    args = parser.parse_args()

    bench = RunBench(args.config, args.data, args.run)
    student = bench.stages[bench.roles.student]
    lists = student.lists or ListSpec()
    preset = bench.presets[student.model]
    metric = student.valid_metric
    base = dataclasses.replace(student, losses=(LABELS_TERM,), lists=None)
    started = time.perf_counter()
    rows = [bench.fit("labels alone", base, preset)]
    for label, fn, on_training, on_rrd in families(lists):
        if args.families and fn not in args.families:
            continue
        for kind, spec, options in (
            ("training lists", None, on_training),
            ("RRD lists", lists, on_rrd),
        ):
            if options is None:
                continue  # feature MSE compares tower outputs: no lists involved
            best: Scored | None = None
            for weight in args.weights:
                term = LossTerm(fn, bench.roles.reference, weight, dict(options))
                stage = dataclasses.replace(base, losses=(LABELS_TERM, term), lists=spec)
                scored = bench.fit(f"{label}, {kind} (weight {weight:g})", stage, preset)
                if best is None or scored.valid[metric] > best.valid[metric]:
                    best = scored
            rows.append(best)
    scratch = rows[0]
    print(
        f"\nstudent of {args.config} learning from {args.run}/{bench.roles.reference}; "
        f"RRD lists: {lists}; "
        f"weights chosen on validation {metric} among {args.weights} "
        f"({time.perf_counter() - started:.0f} s)\n"
    )
    print(
        f"{'variant':<52}{'valid':>8}{'valid full':>11}{'test ndcg@10':>14}{'× scratch':>11}"
        f"{'full ndcg@10':>14}{'× scratch':>11}"
    )
    for entry in rows:
        print(
            f"{entry.label:<52}{entry.valid[METRICS[0]]:>8.4f}{entry.valid[METRICS[1]]:>11.4f}"
            f"{entry.mean(METRICS[0]):>14.4f}{entry.mean(METRICS[0]) / scratch.mean(METRICS[0]):>11.3f}"
            f"{entry.mean(METRICS[1]):>14.4f}{entry.mean(METRICS[1]) / scratch.mean(METRICS[1]):>11.3f}"
        )


if __name__ == "__main__":
    main()
