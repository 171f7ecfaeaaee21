"""The A/B report: ``index.html`` (self-contained, plots embedded), ``report.md`` and
``summary.json`` (verdict, sample-ratio check, per-arm table and lifts)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from recdistill.ab_spec import METRICS, ExperimentSpec
from recdistill.abtest.analysis import ALL, Analysis
from recdistill.evaluation_report import bars_with_ci, figure_png, template_environment
from recdistill.files import write_json
from recdistill.layout import AbTestLayout


def write_report(
    out: AbTestLayout, experiment: ExperimentSpec, analysis: Analysis, truth: str
) -> None:
    """Write the report of ``analysis`` and its summary to ``out``; ``truth`` names the oracle."""
    spec = experiment.analysis
    decision = analysis.lifts[analysis.lifts["metric"] == spec.metric]
    overall = analysis.arms[analysis.arms["segment"] == ALL]
    context = {
        "experiment": experiment,
        "truth": truth,
        "metric": METRICS[spec.metric],
        "level": round(100 * (1 - spec.alpha)),
        "verdict": analysis.verdict,
        "srm": analysis.srm,
        "findings": findings(decision, experiment),
        "power": _power_lines(decision, experiment),
        "arms": overall.to_dict("records"),
        "arms_by_segment": analysis.arms[analysis.arms["segment"] != ALL].to_dict("records"),
        "lifts": analysis.lifts.to_dict("records"),
        "segments": analysis.segments.to_dict("records"),
        "labels": METRICS,
        "figures": {
            "daily": _daily_figure(analysis.daily, experiment),
            "segments": _segment_figure(analysis.segments, experiment)
            if len(analysis.segments)
            else None,
        },
    }
    environment = template_environment()
    environment.filters["pct"] = _percent
    environment.filters["p"] = _p_value
    out.report.index.write_text(environment.get_template("abtest.html.j2").render(context))
    out.report.markdown.write_text(environment.get_template("abtest.md.j2").render(context))
    summary = {
        "verdict": analysis.verdict,
        "ship": analysis.ship,
        "srm": dataclasses.asdict(analysis.srm) | {"mismatch": analysis.srm.mismatch},
        # Through pandas' JSON, so NaN (e.g. no round trip offline) becomes null.
        "arms": json.loads(overall.to_json(orient="records")),
        "lifts": json.loads(analysis.lifts.to_json(orient="records")),
    }
    write_json(out.summary, summary)


def _percent(value: Any, digits: int = 2) -> str:
    if value is None or np.isnan(value):
        return "–"
    return f"{value:+.{digits}%}"


def _p_value(value: float) -> str:
    return f"{value:.2g}" if value < 0.001 else f"{value:.3f}"


def findings(decision: pd.DataFrame, experiment: ExperimentSpec) -> list[str]:
    """One plain line per comparison on the decision metric."""
    label = METRICS[experiment.analysis.metric]
    lines = []
    for row in decision.itertuples():
        if row.significant:
            outcome = "better" if row.lift > 0 else "worse"
            verdict = f"significantly {outcome} (Holm p = {row.p_holm:.2g})"
        else:
            verdict = f"no significant difference (Holm p = {row.p_holm:.2g})"
        lines.append(
            f"{row.treatment} vs {row.baseline}: {label} lift {row.lift:+.2%} "
            f"[{row.ci_low:+.2%}, {row.ci_high:+.2%}] — {verdict}."
        )
    return lines


def _power_lines(decision: pd.DataFrame, experiment: ExperimentSpec) -> list[str]:
    spec = experiment.analysis
    label = METRICS[spec.metric]
    lines = []
    for row in decision.itertuples():
        cuped = (
            f"; CUPED removed {row.variance_reduction:.0%} of the variance" if spec.cuped else ""
        )
        lines.append(
            f"{row.treatment} vs {row.baseline} ({row.treatment_users:,} vs "
            f"{row.baseline_users:,} users): a relative {label} lift of ±{row.mde:.2%} is "
            f"detected with {spec.power:.0%} power at α = {spec.alpha:g}{cuped}."
        )
    return lines


def _daily_figure(daily: pd.DataFrame, experiment: ExperimentSpec) -> str:
    spec = experiment.analysis
    figure = Figure(figsize=(10, 4))
    axis = figure.subplots()
    for (treatment, baseline), part in daily.groupby(["treatment", "baseline"], sort=False):
        line = axis.plot(part["day"], part["lift"], marker=".", label=f"{treatment} vs {baseline}")
        axis.fill_between(
            part["day"], part["ci_low"], part["ci_high"], color=line[0].get_color(), alpha=0.2
        )
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.axhline(-spec.margin, color="grey", linestyle="--", linewidth=0.8)
    axis.annotate(
        "non-inferiority margin", (daily["day"].min(), -spec.margin), fontsize=7, color="grey"
    )
    axis.yaxis.set_major_formatter(lambda value, _: f"{value:+.0%}")
    axis.set_xlabel("experiment day (cumulative)")
    axis.set_ylabel(f"relative {METRICS[spec.metric]} lift")
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure_png(figure)


def _segment_figure(segments: pd.DataFrame, experiment: ExperimentSpec) -> str:
    names = list(dict.fromkeys(segments["segment"]))
    comparisons = list(dict.fromkeys(zip(segments["treatment"], segments["baseline"])))
    figure = Figure(figsize=(10, 2.6 * max(len(names), 1)))
    axes = figure.subplots(max(len(names), 1), 1, squeeze=False)[:, 0]
    for axis, name in zip(axes, names):
        part = segments[segments["segment"] == name]
        series = {
            f"{treatment} vs {baseline}": part[
                (part["treatment"] == treatment) & (part["baseline"] == baseline)
            ].set_index("value")
            for treatment, baseline in comparisons
        }
        bars_with_ci(axis, list(dict.fromkeys(part["value"])), series, "lift")
        axis.axhline(0.0, color="black", linewidth=0.8)
        axis.yaxis.set_major_formatter(lambda value, _: f"{value:+.0%}")
        axis.set_title(name, fontsize=10, loc="left")
        axis.set_ylabel(f"{METRICS[experiment.analysis.metric]} lift")
    axes[0].legend(ncol=len(comparisons), fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.15))
    figure.tight_layout()
    return figure_png(figure)
