"""``recdistill sweep``: search student architectures × loss mixes, compress, choose under a budget.

The teacher and intermediate of an earlier run (``[sweep] base_run``) teach every candidate; a
candidate is a model preset (``[models.*]``) with a loss mix (``[mixes]``), trained with the
``[train]`` defaults like a stage of ``recdistill train``. One module per job, in order:

1. :mod:`~recdistill.sweep.plan` reads the config into a :class:`~recdistill.sweep.plan.Plan`.
2. :mod:`~recdistill.sweep.search` trains the candidates (``jobs`` processes of one torch
   thread each) and scores each on validation: NDCG@10 and, in every user segment with at
   least ``min_segment_users`` users, the share of the teacher's NDCG@10 it retains; its int8
   copy (``[quantization]``) is scored the same way. Then
   :mod:`~recdistill.sweep.latency` times every float and int8 model
   (``[selection] latency_clock`` says which clock the budget holds).
3. :mod:`~recdistill.sweep.selection` keeps the Pareto frontier, chooses the best validation
   NDCG@10 within ``[selection]``, scores the choice on test and writes it as a run's models.
4. :mod:`~recdistill.sweep.report` writes the HTML and Markdown report.

With ``[tracking]`` on (or ``track``), the sweep is one MLflow run with a child run per
candidate (:func:`recdistill.tracking.log_sweep`), logged once every candidate is measured.

Nothing before the chosen student is scored on test reads the test split.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from recdistill import devices, tracking
from recdistill.layout import SweepLayout
from recdistill.summary import SweepSummary, from_json
from recdistill.sweep.plan import load_plan
from recdistill.sweep.report import build_sweep_report
from recdistill.sweep.search import search
from recdistill.sweep.selection import finalize, select


def run_sweep(
    config: Path,
    data: Path,
    out: Path,
    *,
    jobs: int = 1,
    track: bool = False,
    device: str | None = None,
) -> SweepSummary:
    """Run the sweep of ``config`` into ``out``; ``track`` turns ``[tracking]`` on. Candidates
    train on ``device`` (:func:`recdistill.train`'s), its worker processes too."""
    devices.announce(devices.use(device))
    plan = load_plan(config, data, out)
    spec = replace(plan.tracking, enabled=True) if track else plan.tracking
    layout = SweepLayout(plan.out)
    # A sweep directory always resumes: so does its MLflow run.
    with tracking.tracked_run(spec, layout, plan.config, resume=True) as tracker:
        results = search(plan, jobs=jobs)
        summary = from_json(SweepSummary, finalize(plan, results, select(results, plan.selection)))
        build_sweep_report(plan.out)
        if tracker is not None:
            tracking.log_sweep(tracker, layout, summary)
    return summary
