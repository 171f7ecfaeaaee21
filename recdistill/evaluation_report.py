"""``recdistill report``: the evaluation report analysts decide from.

Reads a run (``summary.json``, ``per_user.parquet``, the stages' logs) and its data
directory's segments; writes ``report/index.html`` (one self-contained file, plots
embedded), ``report/report.md`` and ``report/segments.parquet``, and adds them to the run's
MLflow run if the run was tracked.
"""

from __future__ import annotations

import base64
import io
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from jinja2 import Environment, PackageLoader, StrictUndefined
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from recdistill.config import load_run_config
from recdistill.layout import RunLayout
from recdistill.roles import REFERENCE, SCRATCH, Roles
from recdistill.segments import ALL, SliceSpec, slice_table, user_segments
from recdistill.summary import RunSummary, TrainedModel, read_summary
from recdistill.tracking import log_report

# What the models table's latency columns are, said beside them.
LATENCY_NOTE = (
    "Scoring p50 and p99: in-process time to score one list of 100 candidates, 200 lists "
    "timed once, as training ended, on the machine and device that trained (summary.json's "
    "latency_ms). "
    "On a shared CPU they move from one run to the next: a rough ordering of the models, not "
    "their serving latency, which the load test measures (docs/load-test-locust-against-the-"
    "endpoint.md)."
)


def build_report(run: Path, spec: SliceSpec | None = None) -> Path:
    layout = RunLayout(Path(run))
    spec = spec or SliceSpec()
    if not Path(run).is_dir():
        raise FileNotFoundError(f"run folder {run} does not exist")
    if not layout.summary.exists() and RunLayout(Path(run).parent).summary.exists():
        raise FileNotFoundError(
            f"{run} is a stage of the run {Path(run).parent}: pass --run {Path(run).parent}"
        )
    for needed in (layout.summary, layout.per_user):
        if not needed.exists():
            raise FileNotFoundError(f"{needed} not found: run `recdistill train` first")
    summary = read_summary(layout.summary, RunSummary)
    config = load_run_config(layout.config)
    references = {REFERENCE: config.roles.reference, SCRATCH: config.roles.scratch}
    per_user = pq.read_table(layout.per_user).to_pandas()
    table = slice_table(
        per_user, user_segments(Path(summary.data), categories=True), spec, references
    )
    out = layout.report
    out.root.mkdir(exist_ok=True)
    table.to_parquet(out.segments, index=False)

    rank = {name: position for position, name in enumerate(summary.models)}
    table = table.iloc[np.argsort(table["model"].map(rank).to_numpy(), kind="stable")]
    key = table[table["metric"] == spec.key_metric]
    candidates = candidate_models(summary, config.roles)
    colours = model_colours(list(summary.models))
    objectives = {stage.name: stage.describe_objective() for stage in config.stages}
    cost, unplotted = _quality_vs_cost(summary, key, spec, colours)
    judged = verdicts(key, candidates, spec, config.roles.reference)
    context = {
        "run": str(layout.root),
        "source": summary.source,
        "metric": spec.key_metric,
        "level": int(spec.level * 100),
        "min_users": spec.min_users,
        "references": references,
        "verdicts": judged,
        "headline": _headline(summary, key),
        "latency_note": LATENCY_NOTE,
        "families": _families(key),
        "metrics": _metric_tabs(table),
        "unplotted": unplotted,
        "figures": {
            "segments": _segment_bars(key, spec, colours),
            "retention": _retention_heatmap(key, [v["model"] for v in judged]),
            "cost": cost,
            "curves": _curves_figure(_learning_curves(layout, summary), objectives, colours),
        },
    }
    environment = template_environment()
    out.index.write_text(environment.get_template("report.html.j2").render(context))
    out.markdown.write_text(environment.get_template("report.md.j2").render(context))
    log_report(layout)
    return out.index


def candidate_models(summary: RunSummary, roles: Roles) -> list[str]:
    """The models that could stand in for the reference, the student first: every trained
    stage but the reference. Ensembles (teachers) and baselines are compared, never judged."""
    models = [
        name
        for name, entry in summary.models.items()
        if isinstance(entry, TrainedModel) and name != roles.reference
    ]
    return sorted(models, key=lambda name: name != roles.student)


def verdicts(
    key: pd.DataFrame, candidates: list[str], spec: SliceSpec, reference: str
) -> list[dict[str, Any]]:
    """Per candidate, in two sentences: its overall retention against the threshold, and
    the slices that lose significantly more than it does overall (``flagged``), the
    biggest loss first."""
    overall = key[key["segment"] == ALL].set_index("model")
    result = []
    for model in candidates:
        if model not in overall.index or pd.isna(overall.loc[model, "retention"]):
            continue
        row = overall.loc[model]
        own = key[(key["model"] == model) & (key["segment"] != ALL)]
        below = own[own["flagged"]].sort_values("retention")
        threshold = spec.retention_threshold
        standing = (
            "above"
            if row["retention_ci_low"] >= threshold
            else "below"
            if row["retention_ci_high"] < threshold
            else "level with"
        )
        overall_line = (
            f"{model} keeps {row['retention']:.1%} [{row['retention_ci_low']:.1%}, "
            f"{row['retention_ci_high']:.1%}] of {reference}'s {spec.key_metric} overall: "
            f"{standing} the {threshold:.0%} threshold"
            + (", within its CI." if standing == "level with" else ".")
        )
        where = "; ".join(
            f"{r.segment}: {r.value} ({r.retention:.1%}, {r.users:,} users)"
            for r in below.itertuples()
        )
        below_line = (
            f"It keeps significantly less than that on {len(below)} slice(s): {where}."
            if len(below)
            else "No slice keeps significantly less than that."
        )
        result.append(
            {
                "model": model,
                "standing": standing,
                "overall": overall_line,
                "below": below_line,
                "slices": below[["segment", "value"]].to_dict("records"),
            }
        )
    return result


def template_environment() -> Environment:
    """The jinja environment every report renders with (``num`` formats numbers)."""
    environment = Environment(
        loader=PackageLoader("recdistill", "templates"),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["num"] = format_number
    environment.filters["p"] = format_p
    return environment


def format_number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def format_p(value: Any) -> str:
    """A p-value as people read it: ``< 0.001`` below that, three decimals above."""
    if value is None or np.isnan(value):
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _headline(summary: RunSummary, key: pd.DataFrame) -> list[dict[str, Any]]:
    overall = key[key["segment"] == ALL].set_index("model")
    rows = []
    for name, entry in summary.models.items():
        row = overall.loc[name] if name in overall.index else None
        trained = isinstance(entry, TrainedModel)
        rows.append(
            {
                "model": name,
                "params": entry.params,
                "macs": entry.multiply_adds.per_candidate if trained else None,
                "p50_ms": None if entry.latency_ms is None else entry.latency_ms.p50,
                "p99_ms": None if entry.latency_ms is None else entry.latency_ms.p99,
                "mean": None if row is None else row["mean"],
                "ci_low": None if row is None else row["ci_low"],
                "ci_high": None if row is None else row["ci_high"],
                "retention": None if row is None else row["retention"],
                "retention_ci_low": None if row is None else row["retention_ci_low"],
                "retention_ci_high": None if row is None else row["retention_ci_high"],
            }
        )
    return rows


def _families(key: pd.DataFrame) -> list[dict[str, Any]]:
    """The slices of each segment column, for one collapsible table each."""
    return [
        {"segment": segment, "rows": rows.to_dict("records"), "flagged": int(rows["flagged"].sum())}
        for segment, rows in key.groupby("segment", sort=False)
    ]


def _metric_tabs(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Per metric, a slice × model grid of means with their CIs."""
    tabs = []
    for metric, rows in table.groupby("metric", sort=False):
        models = list(dict.fromkeys(rows["model"]))
        grid = []
        for (segment, value), cells in rows.groupby(["segment", "value"], sort=False):
            cells = cells.set_index("model")
            grid.append(
                {
                    "slice": f"{segment}: {value}" if segment != ALL else ALL,
                    "users": int(cells["users"].iloc[0]),
                    "cells": [cells.loc[m] if m in cells.index else None for m in models],
                }
            )
        tabs.append({"metric": metric, "models": models, "grid": grid})
    return tabs


def model_colours(models: list[str]) -> dict[str, Any]:
    """One colour per model, the same in every plot of a report."""
    palette = matplotlib.colormaps["tab10"].colors
    return {model: palette[i % len(palette)] for i, model in enumerate(models)}


def figure_png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _bars_with_ci(
    axis, values: list, series: dict[str, pd.DataFrame], center: str, colours: dict | None = None
) -> None:
    """One group of bars per entry of ``values``, one bar per series, each with its CI.

    Each series is indexed by value, with columns ``center``, ``ci_low`` and ``ci_high``.
    """
    width = 0.8 / max(len(series), 1)
    for offset, (label, rows) in enumerate(series.items()):
        rows = rows.reindex(values)
        x = np.arange(len(values)) + offset * width
        axis.bar(x, rows[center], width, label=label, color=(colours or {}).get(label))
        axis.errorbar(
            x,
            rows[center],
            yerr=[rows[center] - rows["ci_low"], rows["ci_high"] - rows[center]],
            fmt="none",
            ecolor="black",
            linewidth=0.8,
        )
    axis.set_xticks(np.arange(len(values)) + 0.4 - width / 2, values, fontsize=8)


def _segment_bars(key: pd.DataFrame, spec: SliceSpec, colours: dict) -> str | None:
    """Bars per segment value and model; None when no slice but ``all`` is large enough."""
    segments = [segment for segment in dict.fromkeys(key["segment"]) if segment != ALL]
    if not segments:
        return None
    models = list(dict.fromkeys(key["model"]))
    figure = Figure(figsize=(11, 2.4 * len(segments)))
    axes = figure.subplots(len(segments), 1, squeeze=False)
    for axis, segment in zip(axes[:, 0], segments):
        part = key[key["segment"] == segment]
        series = {model: part[part["model"] == model].set_index("value") for model in models}
        values = list(dict.fromkeys(part["value"]))
        _bars_with_ci(axis, values, series, "mean", colours)
        if len(values) > 8:
            for label in axis.get_xticklabels():
                label.set(rotation=30, ha="right")
        axis.set_title(segment, fontsize=10, loc="left")
        axis.set_ylabel(spec.key_metric)
    axes[0, 0].legend(ncol=len(models), fontsize=9, loc="lower left", bbox_to_anchor=(0, 1.15))
    figure.tight_layout()
    return figure_png(figure)


def _retention_heatmap(key: pd.DataFrame, candidates: list[str]) -> str | None:
    """Slices down, candidates across; each cell's colour is the slice's retention minus the
    model's own overall retention (red: loses more than overall), its text the retention,
    bold with ▼ where the slice is flagged. None without a candidate or a slice."""
    rows = key[key["model"].isin(candidates) & key["retention"].notna()].copy()
    if not candidates or (rows["segment"] != ALL).sum() == 0:
        return None
    overall = rows[rows["segment"] == ALL].set_index("model")["retention"]
    models = [model for model in candidates if model in overall.index]
    rows = rows[rows["segment"] != ALL]
    rows["slice"] = rows["segment"] + ": " + rows["value"].astype(str)
    slices = list(dict.fromkeys(rows["slice"]))
    retention = rows.pivot(index="slice", columns="model", values="retention").loc[slices, models]
    flags = rows.pivot(index="slice", columns="model", values="flagged").loc[slices, models]
    shift = retention - overall[models]
    span, clipped = colour_scale(shift.to_numpy(dtype=float))
    figure = Figure(figsize=(3.2 + 1.3 * len(models), 1.6 + 0.3 * len(slices)))
    axis = figure.subplots()
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-span, vmax=span)
    image = axis.imshow(shift.to_numpy(dtype=float), cmap="RdBu", norm=norm, aspect="auto")
    axis.set_xticks(
        range(len(models)), [f"{m}\noverall {overall[m]:.3f}" for m in models], fontsize=9
    )
    axis.xaxis.tick_top()
    axis.set_yticks(range(len(slices)), [textwrap.fill(s, 34) for s in slices], fontsize=9)
    segment_of = rows.drop_duplicates("slice").set_index("slice")["segment"].loc[slices]
    for boundary in np.flatnonzero(segment_of.to_numpy()[1:] != segment_of.to_numpy()[:-1]):
        axis.axhline(boundary + 0.5, color="white", linewidth=2)
    for i, j in np.argwhere(clipped):
        axis.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, linewidth=2))
    for (i, j), value in np.ndenumerate(retention.to_numpy(dtype=float)):
        if np.isnan(value):
            continue
        flagged = bool(flags.iloc[i, j])
        dark = abs(shift.iloc[i, j]) > 0.6 * span
        axis.text(
            j,
            i,
            f"{'▼ ' if flagged else ''}{value:.2f}",
            ha="center",
            va="center",
            fontsize=9,
            fontweight="bold" if flagged else "normal",
            color="white" if dark else "black",
        )
    beyond = f"; {int(clipped.sum())} outlined cell(s) beyond it" if clipped.any() else ""
    figure.colorbar(
        image,
        ax=axis,
        shrink=min(1.0, 8 / max(len(slices), 1)),
        extend="both" if clipped.any() else "neither",
        label=f"retention − the model's overall retention (scale ±{span:.2f}{beyond})",
    )
    figure.tight_layout()
    return figure_png(figure)


def colour_scale(shifts: np.ndarray) -> tuple[float, np.ndarray]:
    """The heatmap's colour scale ±``span`` for cells of ``shifts`` (NaN: empty), in steps of
    0.05 and at least 0.05, and the cells beyond it, drawn at its ends and outlined.

    The scale reaches the largest shift unless that is more than three times the median
    one: a single outlying cell (a slice of a few users) would otherwise wash every other
    cell out to white."""
    magnitudes = np.abs(shifts[~np.isnan(shifts)])
    reach = min(magnitudes.max(), 3 * np.median(magnitudes)) if len(magnitudes) else 0.0
    span = max(0.05, math.ceil(round(reach / 0.05, 9)) * 0.05)
    return span, np.nan_to_num(np.abs(shifts), nan=0.0) > span


def _quality_vs_cost(
    summary: RunSummary, key: pd.DataFrame, spec: SliceSpec, colours: dict
) -> tuple[str, list[str]]:
    """The quality-vs-cost plot, and the models it leaves out (no parameters to place on
    its log axis)."""
    overall = key[key["segment"] == ALL].set_index("model")
    plotted = {
        name: entry
        for name, entry in summary.models.items()
        if name in overall.index and entry.params
    }
    figure = Figure(figsize=(11, 4))
    axes = figure.subplots(1, 2)
    for axis, (label, cost) in zip(
        axes,
        [
            ("parameters", lambda e: e.params),
            ("in-process scoring p50 (ms, 100 candidates, one run)", lambda e: e.latency_ms.p50),
        ],
    ):
        for marker, (name, entry) in zip("osD^vP*Xhp" * 2, plotted.items()):
            row = overall.loc[name]
            axis.errorbar(
                cost(entry),
                row["mean"],
                yerr=[[row["mean"] - row["ci_low"]], [row["ci_high"] - row["mean"]]],
                fmt=marker,
                color=colours[name],
                markersize=7,
                label=name,
            )
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel(spec.key_metric)
    axes[1].legend(fontsize=9, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.tight_layout()
    unplotted = [name for name in summary.models if name in overall.index and name not in plotted]
    return figure_png(figure), unplotted


def _learning_curves(layout: RunLayout, summary: RunSummary) -> dict[str, pd.DataFrame]:
    curves = {}
    for name in summary.models:
        log = layout.stage(name).log
        if log.exists() and log.stat().st_size:
            curves[name] = pd.DataFrame([json.loads(line) for line in log.read_text().splitlines()])
    return curves


def _curves_figure(
    curves: dict[str, pd.DataFrame], objectives: dict[str, str], colours: dict
) -> str:
    """One training-loss panel per objective (stages minimising the same one share it),
    then the validation metric of every stage."""
    panels: dict[str, list[str]] = {}
    for name in curves:
        panels.setdefault(objectives.get(name, name), []).append(name)
    columns = min(3, len(panels) + 1)
    rows = math.ceil((len(panels) + 1) / columns)
    figure = Figure(figsize=(11, 3.4 * rows))
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis, (objective, names) in zip(axes, panels.items()):
        for name in names:
            log = curves[name]
            axis.plot(log["epoch"], log["train_loss"], marker=".", label=name, color=colours[name])
        axis.set_title(textwrap.fill(objective, 44), fontsize=9, loc="left")
        axis.set_ylabel("train loss")
        axis.legend(fontsize=8)
    metric_axis = axes[len(panels)]
    for name, log in curves.items():
        metric = next(c for c in log.columns if c.startswith("valid_"))
        metric_axis.plot(log["epoch"], log[metric], marker=".", label=name, color=colours[name])
        metric_axis.set_ylabel(metric)
    metric_axis.set_title("validation", fontsize=9, loc="left")
    metric_axis.legend(fontsize=8)
    for axis in axes[: len(panels) + 1]:
        axis.set_xlabel("epoch")
    for axis in axes[len(panels) + 1 :]:
        axis.set_visible(False)
    figure.tight_layout()
    return figure_png(figure)
