"""An ensemble teacher of a finished run's stages and baselines against its members, and the
student it teaches against the student the single teacher teaches.

    .venv/bin/python benchmarks/ensemble_teacher.py --config configs/ml100k.toml \\
        --data data/ml100k --run runs/ml100k [--members STAGE ease_recency] [--steps 4] [--student]

The ensemble (recdistill/ensembles.py) mixes the run's frozen stages and the config's EASE
baselines (their settings chosen on validation, as a run chooses them); every weight of its
grid is tried on validation and the config's ``valid_metric`` chooses. The table gives
validation and test NDCG@10 (sampled lists and full ranking) of the chosen ensemble and of
each member, and the ensemble's test ratio to each member with the paired t-test's p-value
over users. With ``--student`` the config's student stage is trained twice more, with every
score term that learns from ``teacher`` or from one of the config's ensembles learning from
the single teacher, then from the benchmark's ensemble (``feature_mse`` stays on the teacher:
an ensemble has no tower outputs); the validation row says which a config should ship. Test
is only reported.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
from students import METRICS, RunBench, Scored, paired_p

from recdistill.ensembles import BASELINE_MEMBERS, EnsembleSpec
from recdistill.evaluate import evaluate
from recdistill.pipeline import choose_ensemble
from recdistill.stage import StageSpec


def scored(label: str, ranker, bench: RunBench, valid_ranker=None) -> Scored:
    """``ranker`` on validation (or ``valid_ranker``, an EASE table of the validation-time
    histories) and on test."""
    valid = evaluate(valid_ranker or ranker, bench.store, "valid", name=label)
    test = evaluate(ranker, bench.store, "test", name=label)
    return Scored(label, ranker, {m: float(np.mean(valid[m])) for m in METRICS}, test, 0.0)


def taught_by(stage: StageSpec, source: str, mixes: set[str]) -> StageSpec:
    """``stage`` with every score term that learns from the teacher or an ensemble of the
    config learning from ``source`` instead."""
    return dataclasses.replace(
        stage,
        losses=tuple(
            dataclasses.replace(term, source=source)
            if term.source in mixes and term.scored
            else term
            for term in stage.losses
        ),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument(
        "--members", nargs="+", help="default: the run's reference teacher and ease_recency"
    )
    parser.add_argument("--steps", type=int, default=4, help="the weight grid's step is 1/steps")
    parser.add_argument("--student", action="store_true", help="also train the two students")
    args = parser.parse_args()
    bench = RunBench(args.config, args.data, args.run)
    metric = bench.config.train.valid_metric
    teacher = bench.roles.reference
    members = args.members or [teacher, BASELINE_MEMBERS[-1]]
    spec = EnsembleSpec("ensemble", tuple(members), steps=args.steps)
    members = {name: bench.member(name) for name in spec.members}
    ensemble, _ = choose_ensemble(spec, members, bench.store, metric, cache=None)
    rows = [scored("ensemble", ensemble, bench)]
    for name in spec.members:
        if name in BASELINE_MEMBERS:
            ease = bench.baselines[name]
            rows.append(scored(name, ease, bench, valid_ranker=ease.scoring(bench.store)))
        else:
            rows.append(scored(name, bench.teacher(name).model, bench))
    chosen = "  ".join(f"{name} {w:g}" for name, w in ensemble.weights.items())
    print(
        f"\n{args.run} ({args.data}): the ensemble's weights chosen on valid {metric}: {chosen}\n"
    )
    print(
        "| model | valid NDCG@10 | valid full | test NDCG@10 | test full | ensemble ÷ it (p) | full (p) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        against = ["", ""]
        if row.label != "ensemble":
            against = [
                f"×{rows[0].mean(m) / row.mean(m):.3f} ({paired_p(rows[0], row, m):.2g})"
                for m in METRICS
            ]
        print(
            f"| {row.label} | {row.valid['ndcg@10']:.4f} | {row.valid['full_ndcg@10']:.4f} "
            f"| {row.mean('ndcg@10'):.4f} | {row.mean('full_ndcg@10'):.4f} "
            f"| {against[0]} | {against[1]} |",
            flush=True,
        )
    if not args.student:
        return
    stage = bench.stages[bench.roles.student]
    mixes = {teacher, *bench.config.ensembles}

    def student(label: str, source: str) -> Scored:
        taught = taught_by(stage, source, mixes)
        teachers = {n: ensemble if n == "ensemble" else bench.teacher(n) for n in taught.teachers}
        return bench.fit(label, taught, bench.presets[stage.model], teachers)

    single = student("from the teacher", teacher)
    mixed = student("from the ensemble", "ensemble")
    print("\n| student | valid NDCG@10 | valid full | test NDCG@10 | test full |")
    print("|---|---:|---:|---:|---:|")
    for row in (single, mixed):
        print(
            f"| {row.label} | {row.valid['ndcg@10']:.4f} | {row.valid['full_ndcg@10']:.4f} "
            f"| {row.mean('ndcg@10'):.4f} | {row.mean('full_ndcg@10'):.4f} |"
        )
    print(
        "from the ensemble ÷ from the teacher on test: "
        + "  ".join(
            f"{m} ×{mixed.mean(m) / single.mean(m):.3f} (p = {paired_p(mixed, single, m):.2g})"
            for m in METRICS
        )
    )


if __name__ == "__main__":
    main()
