"""``recdistill abtest``: load the experiment, simulate it (offline or online), analyse, report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from recdistill import devices
from recdistill.ab_spec import ExperimentSpec
from recdistill.abtest.analysis import ALL, Analysis, analyse
from recdistill.abtest.report import decision_metric, findings, preference_findings, write_report
from recdistill.abtest.simulate import Server, simulate
from recdistill.abtest.world import World
from recdistill.artifact import load_artifact
from recdistill.config import load_experiment
from recdistill.files import atomic_output_dir
from recdistill.layout import AbTestLayout
from recdistill.online import OnlineRanker
from recdistill.server import running_server

# The per-arm table's columns (those with a value), and their headers.
SUMMARY_COLUMNS = {
    "arm": "arm",
    "model": "model",
    "users": "users",
    "requests": "requests",
    "ctr": "CTR",
    "clicks_per_request": "clicks/request",
    "ndcg": "NDCG@k",
    "conversions_per_request": "conversions/request",
    "placed": "items placed",
    "credited_clicks": "clicks credited",
    "placed_ctr": "CTR of its items",
    "latency_ms_p50": "latency p50 ms",
    "latency_ms_p99": "p99 ms",
    "throughput_rps": "requests/s",
}


@dataclass(frozen=True)
class AbTestResult:
    experiment: ExperimentSpec
    analysis: Analysis
    log: pd.DataFrame
    report: Path

    def summary(self) -> str:
        """The per-arm table, the lifts on the decision metric, the split check, the verdict."""
        arms = self.analysis.arms
        arms = arms[arms["segment"] == ALL].dropna(axis=1, how="all")
        table = arms[[c for c in SUMMARY_COLUMNS if c in arms]].rename(columns=SUMMARY_COLUMNS)
        decision = self.analysis.lifts
        decision = decision[decision["metric"] == decision_metric(self.experiment)]
        lines = (
            preference_findings(decision)
            if self.experiment.routing.interleaved
            else findings(decision, self.experiment)
        )
        return "\n".join(
            [
                table.to_string(index=False, float_format=lambda value: f"{value:.4f}"),
                "",
                *lines,
                self.analysis.srm.describe(),
                "",
                self.analysis.verdict,
            ]
        )


def run_abtest(
    config: Path, out: Path, *, device: str | None = None, **simulation_overrides: Any
) -> AbTestResult:
    """Run the experiment of ``config``; write the report and the request log to ``out``.
    In-process arms score their batches on ``device`` (:func:`recdistill.devices.resolve`)."""
    experiment = load_experiment(config, **simulation_overrides)
    world = World.load(experiment.simulation, experiment.clicks)
    rankers = load_rankers(experiment, devices.announce(devices.use(device)))
    columns = list(world.population.segments.columns)
    segments = list(experiment.analysis.segments) or columns
    if set(segments) - set(columns):
        raise ValueError(f"[analysis]: segments {segments} are not all user segments {columns}")
    with atomic_output_dir(out) as scratch:
        layout = AbTestLayout(scratch)
        if experiment.simulation.mode == "online":
            server_artifacts = {experiment.artifacts[arm.model] for arm in experiment.routing.arms}
            impressions = layout.impressions
            with running_server(
                sorted(server_artifacts),
                ab_config=config,
                impressions=impressions,
                events=layout.events,
            ) as server:
                log = simulate(world, experiment, rankers, server=Server(server.url, impressions))
        else:
            log = simulate(world, experiment, rankers)
        log.to_parquet(layout.requests, index=False)
        analysis = analyse(log, experiment, segments)
        write_report(layout, experiment, analysis, world.truth)
    return AbTestResult(experiment, analysis, log, AbTestLayout(Path(out)).report.index)


def load_rankers(
    experiment: ExperimentSpec, device: torch.device | str = "cpu"
) -> dict[str, OnlineRanker]:
    """The in-process ranker of every arm's model, scoring batches on ``device``, checked
    against its [artifacts] name."""
    rankers = {}
    for model in dict.fromkeys(arm.model for arm in experiment.routing.arms):
        ranker = OnlineRanker(load_artifact(experiment.artifacts[model]), device=device)
        if ranker.name != model:
            raise ValueError(
                f"[artifacts] {model} = {str(experiment.artifacts[model])!r} holds the model "
                f"{ranker.name!r}; the server would not find {model!r} in it"
            )
        rankers[model] = ranker
    return rankers
