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
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from jinja2 import Environment, PackageLoader, StrictUndefined
from matplotlib.figure import Figure

from recdistill.config import load_run_config
from recdistill.layout import RunLayout
from recdistill.roles import REFERENCE, SCRATCH
from recdistill.segments import ALL, HELD_OUT_CATEGORY, SliceSpec, slice_table, user_segments
from recdistill.summary import RunSummary, TrainedModel, read_summary
from recdistill.tracking import log_report


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
    roles = load_run_config(layout.config).roles
    references = {REFERENCE: roles.reference, SCRATCH: roles.scratch}
    per_user = pq.read_table(layout.per_user).to_pandas()
    table = slice_table(
        per_user, user_segments(Path(summary.data), categories=True), spec, references
    )
    out = layout.report
    out.root.mkdir(exist_ok=True)
    table.to_parquet(out.segments, index=False)

    rank = {name: position for position, name in enumerate(summary.models)}
    key = table[table["metric"] == spec.key_metric]
    key = key.iloc[np.argsort(key["model"].map(rank).to_numpy(), kind="stable")]
    curves = _learning_curves(layout, summary)
    context = {
        "run": str(layout.root),
        "source": summary.source,
        "metric": spec.key_metric,
        "threshold": spec.retention_threshold,
        "level": int(spec.level * 100),
        "min_users": spec.min_users,
        "references": references,
        "headline": _headline(summary, key),
        "findings": _findings(key, spec),
        "flagged": key[key.get("flagged", False) == True].to_dict("records"),
        "slices": key.to_dict("records"),
        "figures": {
            "segments": _segment_bars(key, spec),
            "retention": _retention_heatmap(key, spec),
            "cost": _quality_vs_cost(summary, key, spec),
            "curves": _curves_figure(curves),
        },
    }
    environment = template_environment()
    out.index.write_text(environment.get_template("report.html.j2").render(context))
    out.markdown.write_text(environment.get_template("report.md.j2").render(context))
    log_report(layout)
    return out.index


def template_environment() -> Environment:
    """The jinja environment every report renders with (``num`` formats numbers)."""
    environment = Environment(
        loader=PackageLoader("recdistill", "templates"),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["num"] = format_number
    return environment


def format_number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


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
                "p50_ms": entry.latency_ms.p50,
                "p99_ms": entry.latency_ms.p99,
                "mean": None if row is None else row["mean"],
                "ci_low": None if row is None else row["ci_low"],
                "ci_high": None if row is None else row["ci_high"],
                "retention": None if row is None else row.get("retention"),
                "retention_ci_low": None if row is None else row.get("retention_ci_low"),
                "retention_ci_high": None if row is None else row.get("retention_ci_high"),
            }
        )
    return rows


def _findings(key: pd.DataFrame, spec: SliceSpec) -> list[str]:
    """Plain-language lines: where each model kept least of the teacher's quality."""
    lines = []
    sliced = key[(key["segment"] != ALL) & key["retention"].notna()]
    for model, group in sliced.groupby("model", sort=False):
        worst = group.nsmallest(2, "retention")
        parts = [
            f"{r.segment} = {r.value} ({r.users} users): retention {r.retention:.1%} "
            f"[{r.retention_ci_low:.1%}, {r.retention_ci_high:.1%}]"
            for r in worst.itertuples()
        ]
        flagged = int(group["flagged"].sum())
        verdict = (
            f"{flagged} slice(s) below {spec.retention_threshold:.0%}"
            if flagged
            else f"no slice below {spec.retention_threshold:.0%}"
        )
        line = f"{model}: lost most on " + "; ".join(parts) + f" — {verdict}."
        categories = group[group["segment"] == HELD_OUT_CATEGORY]
        if len(categories):
            low = categories.loc[categories["retention"].idxmin()]
            high = categories.loc[categories["retention"].idxmax()]
            line += (
                f" Across the held-out item's {len(categories)} categories: retention "
                f"{low.retention:.1%} ({low.value}) to {high.retention:.1%} ({high.value})."
            )
        lines.append(line)
    return lines


def figure_png(figure: Figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def bars_with_ci(axis, values: list, series: dict[str, pd.DataFrame], center: str) -> None:
    """One group of bars per entry of ``values``, one bar per series, each with its CI.

    Each series is indexed by value, with columns ``center``, ``ci_low`` and ``ci_high``.
    """
    width = 0.8 / max(len(series), 1)
    for offset, (label, rows) in enumerate(series.items()):
        rows = rows.reindex(values)
        x = np.arange(len(values)) + offset * width
        axis.bar(x, rows[center], width, label=label)
        axis.errorbar(
            x,
            rows[center],
            yerr=[rows[center] - rows["ci_low"], rows["ci_high"] - rows[center]],
            fmt="none",
            ecolor="black",
            linewidth=0.8,
        )
    axis.set_xticks(np.arange(len(values)) + 0.4 - width / 2, values, fontsize=8)


def _segment_bars(key: pd.DataFrame, spec: SliceSpec) -> str:
    segments = list(key["segment"].unique())
    models = list(key["model"].unique())
    figure = Figure(figsize=(11, 2.6 * len(segments)))
    axes = figure.subplots(len(segments), 1, squeeze=False)
    for axis, segment in zip(axes[:, 0], segments):
        part = key[key["segment"] == segment]
        series = {model: part[part["model"] == model].set_index("value") for model in models}
        bars_with_ci(axis, list(dict.fromkeys(part["value"])), series, "mean")
        axis.set_title(segment, fontsize=10, loc="left")
        axis.set_ylabel(spec.key_metric)
    axes[0, 0].legend(ncol=len(models), fontsize=8, loc="lower left", bbox_to_anchor=(0, 1.15))
    figure.tight_layout()
    return figure_png(figure)


def _retention_heatmap(key: pd.DataFrame, spec: SliceSpec) -> str:
    rows = key[key["retention"].notna()].copy()
    rows["slice"] = rows["segment"] + "=" + rows["value"].astype(str)
    models = list(dict.fromkeys(rows["model"]))
    slices = list(dict.fromkeys(rows["slice"]))
    grid = rows.pivot(index="model", columns="slice", values="retention").loc[models, slices]
    flags = rows.pivot(index="model", columns="slice", values="flagged").loc[models, slices]
    figure = Figure(figsize=(max(8, 0.45 * grid.shape[1]), 0.6 * len(grid) + 2))
    axis = figure.subplots()
    image = axis.imshow(grid.to_numpy(), cmap="RdYlGn", vmin=0.8, vmax=1.2, aspect="auto")
    axis.set_xticks(range(grid.shape[1]), grid.columns, rotation=70, ha="right", fontsize=7)
    axis.set_yticks(range(len(grid)), grid.index, fontsize=8)
    for (i, j), value in np.ndenumerate(grid.to_numpy()):
        if not np.isnan(value):
            flagged = bool(flags.iloc[i, j])
            axis.text(
                j,
                i,
                f"{value:.2f}{'!' if flagged else ''}",
                ha="center",
                va="center",
                fontsize=6,
                fontweight="bold" if flagged else "normal",
            )
    figure.colorbar(image, ax=axis, label=f"{spec.key_metric} retention vs teacher")
    axis.set_title(f"retention per slice ('!' = below {spec.retention_threshold:.0%})")
    figure.tight_layout()
    return figure_png(figure)


def _quality_vs_cost(summary: RunSummary, key: pd.DataFrame, spec: SliceSpec) -> str:
    overall = key[key["segment"] == ALL].set_index("model")
    figure = Figure(figsize=(11, 4))
    axes = figure.subplots(1, 2)
    for axis, (label, cost) in zip(
        axes,
        [
            ("parameters", lambda e: e.params),
            ("scoring latency p50 (ms, 100 candidates)", lambda e: e.latency_ms.p50),
        ],
    ):
        for name, entry in summary.models.items():
            if name not in overall.index or not entry.params:
                continue
            row = overall.loc[name]
            x = cost(entry)
            axis.errorbar(
                x,
                row["mean"],
                yerr=[[row["mean"] - row["ci_low"]], [row["ci_high"] - row["mean"]]],
                fmt="o",
            )
            axis.annotate(
                name, (x, row["mean"]), fontsize=8, xytext=(4, 4), textcoords="offset points"
            )
        axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel(spec.key_metric)
    figure.tight_layout()
    return figure_png(figure)


def _learning_curves(layout: RunLayout, summary: RunSummary) -> dict[str, pd.DataFrame]:
    curves = {}
    for name in summary.models:
        log = layout.stage(name).log
        if log.exists() and log.stat().st_size:
            curves[name] = pd.DataFrame([json.loads(line) for line in log.read_text().splitlines()])
    return curves


def _curves_figure(curves: dict[str, pd.DataFrame]) -> str:
    figure = Figure(figsize=(11, 4))
    loss_axis, metric_axis = figure.subplots(1, 2)
    for name, log in curves.items():
        loss_axis.plot(log["epoch"], log["train_loss"], marker=".", label=name)
        metric = next(c for c in log.columns if c.startswith("valid_"))
        metric_axis.plot(log["epoch"], log[metric], marker=".", label=name)
        metric_axis.set_ylabel(metric)
    loss_axis.set_ylabel("train loss")
    for axis in (loss_axis, metric_axis):
        axis.set_xlabel("epoch")
    metric_axis.legend(fontsize=8)
    figure.tight_layout()
    return figure_png(figure)
