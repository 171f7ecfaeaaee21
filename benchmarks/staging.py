"""Where staging pays: students of several widths distilled directly and through intermediates.

    .venv/bin/python benchmarks/staging.py --config configs/synthetic.toml \\
        --data data/synthetic --run runs/synthetic [--widths 4 8 16 32] [--no-sequence]

In the spirit of teacher-assistant distillation (Mirzadeh et al., AAAI 2020). For each width
``w`` the config's student preset becomes ``embedding_dim = w``, ``tower = [w]``, and is
trained three ways from the run's stages:

- **direct**: the config's ``student_direct`` stage (the teacher alone);
- **via bag**: the config's ``student`` stage, learning from the teacher and the run's
  ``intermediate`` (the config's bag intermediate);
- **via sequence**: the same, with a sequence intermediate in its place, trained here with
  the config's ``intermediate`` stage (it reads the order as the teacher does, with fewer
  dimensions: ``--sequence-dim``, one attention layer). ``--no-sequence`` leaves it out.

Each row gives validation and test NDCG@10 (sampled lists and full ranking), and the staged
student against the direct one of the same width: ratios and paired t-test p-values over
test users. Choices are made on validation; test is only reported.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from students import METRICS, RunBench, Scored, paired_p

from recdistill.models import TwoTowerSpec
from recdistill.teachers import FrozenTeacher


def sequence_intermediate(bench: RunBench, dim: int) -> tuple[TwoTowerSpec, Scored, FrozenTeacher]:
    """A small sequence intermediate distilled from the teacher with the config's
    intermediate stage, frozen to teach."""
    teacher = bench.presets[bench.stages["teacher"].model]
    preset = dataclasses.replace(
        bench.presets[bench.stages["intermediate"].model],
        embedding_dim=dim,
        tower=(2 * dim, dim),
        user_encoder="sequence",
        max_length=teacher.max_length,
        layers=1,
        heads=2,
        recent_length=0,
        user_table=True,
    )
    stage = bench.stages["intermediate"]
    scored = bench.fit("sequence intermediate", stage, preset)
    return preset, scored, FrozenTeacher("intermediate", scored.model, bench.store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--run", type=Path, required=True, help="a run with trained stages")
    parser.add_argument("--widths", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--sequence-dim", type=int, default=32)
    parser.add_argument("--no-sequence", action="store_true")
    args = parser.parse_args()

    started = time.perf_counter()
    bench = RunBench(args.config, args.data, args.run)
    student, direct = bench.stages["student"], bench.stages["student_direct"]
    intermediates = {"via bag": None}
    rows = []
    if not args.no_sequence:
        _, scored, frozen = sequence_intermediate(bench, args.sequence_dim)
        intermediates["via sequence"] = frozen
        rows.append((None, scored, None))
    for width in args.widths:
        preset = dataclasses.replace(
            bench.presets[student.model], embedding_dim=width, tower=(width,)
        )
        alone = bench.fit(f"w{width} direct", direct, preset)
        rows.append((width, alone, None))
        for kind, frozen in intermediates.items():
            teachers = None
            if frozen is not None:
                teachers = {"teacher": bench.teacher("teacher"), "intermediate": frozen}
            rows.append((width, bench.fit(f"w{width} {kind}", student, preset, teachers), alone))

    print(
        f"\n{args.config} from {args.run}; students: the '{student.model}' preset at each "
        f"width; chosen on validation {student.valid_metric} ({time.perf_counter() - started:.0f} s)\n"
    )
    print(
        f"{'width':>5}  {'student':<28}{'params':>9}{'valid':>8}{'valid full':>11}"
        f"{'test':>8}{'test full':>10}{'× direct':>10}{'p':>9}{'full ×':>8}{'p':>9}"
    )
    for width, scored, alone in rows:
        compared = ""
        if alone is not None:
            compared = "".join(
                f"{scored.mean(m) / alone.mean(m):>{8 if m == METRICS[1] else 10}.3f}"
                f"{paired_p(scored, alone, m):>9.2g}"
                for m in METRICS
            )
        print(
            f"{'' if width is None else width:>5}  {scored.label:<28}{scored.params:>9,}"
            f"{scored.valid[METRICS[0]]:>8.4f}{scored.valid[METRICS[1]]:>11.4f}"
            f"{scored.mean(METRICS[0]):>8.4f}{scored.mean(METRICS[1]):>10.4f}{compared}"
        )


if __name__ == "__main__":
    main()
