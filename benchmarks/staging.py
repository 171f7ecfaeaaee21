"""Where staging pays: students of several widths distilled directly and through intermediates.

    .venv/bin/python benchmarks/staging.py --config configs/synthetic.toml \\
        --data data/synthetic --run runs/synthetic [--widths 4 8 16 32] [--no-sequence]

In the spirit of teacher-assistant distillation (Mirzadeh et al., AAAI 2020). For each width
``w`` the config's student preset becomes ``embedding_dim = w``, ``tower = [w]``, and is
trained from labels alone and three ways from the run's stages:

- **labels alone**: the student stage's label terms only (where distillation has to beat);
- **direct**: the config's ``student`` stage learning from its source alone (the teacher,
  or an ensemble of the config at the weights the run chose), its intermediate terms left
  out;
- **via bag**: the same stage learning from that source and the run's ``intermediate`` (the
  config's bag intermediate): the student stage's own terms if it has intermediate ones,
  else each of its other score terms repeated against the intermediate at
  ``--intermediate-weight``;
- **via sequence**: the same, with a sequence intermediate in its place, trained here with
  the config's ``intermediate`` stage (it reads the order as the teacher does, with fewer
  dimensions: ``--sequence-dim``, one attention layer). ``--no-sequence`` leaves it out.

Each row gives validation and test NDCG@10 (sampled lists and full ranking), and each
distilled student against the labels-alone one of its width, and each staged one against the
direct one: ratios and paired t-test p-values over test users. Choices are made on
validation; test is only reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from students import METRICS, RunBench, Scored, paired_p

from recdistill.models import TwoTowerSpec
from recdistill.stage import LABELS, StageSpec
from recdistill.teachers import FrozenTeacher


def sequence_intermediate(
    bench: RunBench, intermediate: str, dim: int
) -> tuple[TwoTowerSpec, Scored, FrozenTeacher]:
    """A small sequence intermediate distilled from the teacher with the config's
    intermediate stage, frozen to teach in its place."""
    teacher = bench.config.preset(bench.roles.reference)
    preset = dataclasses.replace(
        bench.config.preset(intermediate),
        embedding_dim=dim,
        tower=(2 * dim, dim),
        user_encoder="sequence",
        max_length=teacher.max_length,
        layers=1,
        heads=2,
        recent_length=0,
        user_table=True,
    )
    scored = bench.fit("sequence intermediate", bench.stages[intermediate], preset)
    return preset, scored, FrozenTeacher(intermediate, scored.model, bench.store)


def staged_and_direct(
    student: StageSpec, intermediate: str, weight: float
) -> tuple[StageSpec, StageSpec]:
    """The student stage learning from its source and the intermediate, and from its
    source alone."""
    direct_terms = tuple(t for t in student.losses if t.source != intermediate)
    direct = dataclasses.replace(student, losses=direct_terms)
    if intermediate in student.teachers:
        return student, direct
    repeated = tuple(
        dataclasses.replace(t, source=intermediate, weight=weight)
        for t in student.losses
        if t.source not in (LABELS, intermediate) and t.scored
    )
    return dataclasses.replace(student, losses=student.losses + repeated), direct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True, help="a run with trained stages")
    parser.add_argument("--widths", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--sequence-dim", type=int, default=32)
    parser.add_argument("--no-sequence", action="store_true")
    parser.add_argument("--intermediate-weight", type=float, default=0.5)
    parser.add_argument(
        "--intermediate",
        help="the stage between (default: the first distilled stage but the student)",
    )
    args = parser.parse_args()

    started = time.perf_counter()
    bench = RunBench(args.config, args.data, args.run)
    intermediate = args.intermediate or next(
        s.name for s in bench.config.stages if s.teachers and s.name != bench.roles.student
    )
    student, direct = staged_and_direct(
        bench.stages[bench.roles.student], intermediate, args.intermediate_weight
    )
    labels_alone = dataclasses.replace(
        student, losses=tuple(t for t in student.losses if t.source == LABELS), lists=None
    )
    intermediates = {"via bag": None}
    rows = []
    if not args.no_sequence:
        _, scored, frozen = sequence_intermediate(bench, intermediate, args.sequence_dim)
        intermediates["via sequence"] = frozen
        rows.append((None, scored, None, None))
    for width in args.widths:
        preset = dataclasses.replace(
            bench.presets[student.model], embedding_dim=width, tower=(width,)
        )
        scratch = bench.fit(f"w{width} labels alone", labels_alone, preset)
        alone = bench.fit(f"w{width} direct", direct, preset)
        rows += [(width, scratch, None, None), (width, alone, scratch, None)]
        for kind, frozen in intermediates.items():
            teachers = None
            if frozen is not None:
                sources = (n for n in student.teachers if n != intermediate)
                teachers = {**{n: bench.teacher(n) for n in sources}, intermediate: frozen}
            staged = bench.fit(f"w{width} {kind}", student, preset, teachers)
            rows.append((width, staged, scratch, alone))

    print(
        f"\n{args.config} from {args.run}; students: the '{student.model}' preset at each "
        f"width; epochs chosen on validation {student.valid_metric} "
        f"({time.perf_counter() - started:.0f} s); ratios and paired t-test p-values on test, "
        "sampled lists / full ranking\n"
    )
    print(
        f"{'width':>5}  {'student':<24}{'params':>8}{'valid':>8}{'full':>8}{'test':>8}{'full':>8}"
        f"{'× labels alone':>32}{'× direct':>32}"
    )
    for width, scored, scratch, alone in rows:
        print(
            f"{'' if width is None else width:>5}  {scored.label:<24}{scored.params:>8,}"
            f"{scored.valid[METRICS[0]]:>8.4f}{scored.valid[METRICS[1]]:>8.4f}"
            f"{scored.mean(METRICS[0]):>8.4f}{scored.mean(METRICS[1]):>8.4f}"
            f"{versus(scored, scratch):>32}{versus(scored, alone):>32}"
        )


def versus(scored: Scored, reference: Scored | None) -> str:
    """``×sampled (p) / ×full (p)`` of ``scored`` against ``reference`` on test."""
    if reference is None:
        return ""
    return " / ".join(
        f"{scored.mean(m) / reference.mean(m):.3f} ({paired_p(scored, reference, m):.1g})"
        for m in METRICS
    )


if __name__ == "__main__":
    main()
