"""The sweep's report: ``report/index.html`` (the frontier plot embedded) and
``report/report.md`` from its summary, and the table ``recdistill sweep`` prints."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from recdistill.evaluation_report import figure_png, template_environment
from recdistill.layout import SweepLayout
from recdistill.segments import ALL
from recdistill.summary import CandidateResult, Selection, SweepSummary, read_summary
from recdistill.sweep.plan import CLOCKS, METRIC
from recdistill.sweep.selection import BEST, BEST_INT8


def build_sweep_report(out: Path) -> Path:
    """``report/index.html`` (frontier plot embedded) and ``report/report.md`` of a sweep."""
    layout = SweepLayout(Path(out))
    summary = read_summary(layout.summary, SweepSummary)
    selection = summary.selection
    rows = [_row(r, selection) for r in summary.candidates.values()]
    chosen = selection.chosen
    winners = _segment_winners(summary.candidates.values())
    context = {
        "run": str(layout.root),
        "summary": summary,
        "selection": selection,
        "metric": METRIC,
        "rows": rows,
        "chosen": None if chosen is None else next(r for r in rows if r["name"] == chosen),
        "compression": _compression(summary) if chosen is not None else None,
        "winners": winners,
        "wins": Counter(w["winner"] for w in winners).most_common(),
        "figure": _frontier_figure(rows, summary),
        "load_average": np.mean([r.latency_ms.load_average for r in summary.candidates.values()]),
    }
    environment = template_environment()
    report = layout.report
    report.root.mkdir(exist_ok=True)
    report.index.write_text(environment.get_template("sweep.html.j2").render(context))
    report.markdown.write_text(environment.get_template("sweep.md.j2").render(context))
    return report.index


def candidates_table(summary: SweepSummary) -> str:
    """The candidates side by side, as printed at the end of ``recdistill sweep``."""
    selection = summary.selection
    header = (
        f"{'candidate':<30}{'valid ndcg':>11}{'worst ret.':>11}{'params':>9}{'bytes':>10}"
        f"{'p99 wall':>9}{'p99 cpu':>8}{'int8 ndcg':>10}{'int8 bytes':>11}{'int8 wall':>10}"
        f"{'int8 cpu':>9}  flags"
    )
    lines = [header]
    for name, r in summary.candidates.items():
        flags = "frontier " * (name in selection.frontier)
        flags += "budget " * (name in selection.within_budget)
        flags += "CHOSEN" * (name == selection.chosen)
        int8 = r.int8
        lines.append(
            f"{name:<30}{r.valid.ndcg:>11.4f}{r.valid.worst_segment.retention:>11.3f}"
            f"{r.params:>9,}{r.artifact_bytes:>10,}{r.latency_ms.wall.p99:>9.3f}"
            f"{r.latency_ms.cpu.p99:>8.3f}{int8.valid.ndcg:>10.4f}"
            f"{int8.artifact_bytes:>11,}{int8.latency_ms.wall.p99:>10.3f}"
            f"{int8.latency_ms.cpu.p99:>9.3f}  {flags}"
        )
    if selection.chosen is None:
        lines.append("\nno candidate meets the budget")
    else:
        best, best_int8 = summary.models[BEST], summary.models[BEST_INT8]
        lines.append(
            f"\nchosen: {selection.chosen}: test ndcg@10 {best.metrics[METRIC]:.4f} "
            f"(int8 {best_int8.metrics[METRIC]:.4f})"
        )
    return "\n".join(lines)


def _row(result: CandidateResult, selection: Selection) -> dict[str, Any]:
    model, worst, int8 = result.model, result.valid.worst_segment, result.int8
    clock = selection.latency_clock
    return {
        "name": result.name,
        "architecture": result.architecture,
        "shape": f"emb {model['embedding_dim']}, tower {model['tower']}, feat {model['feature_dim']}",
        "mix": result.mix,
        "losses": " + ".join(result.losses),
        "ndcg": result.valid.ndcg,
        "worst": worst.retention,
        "worst_slice": f"{worst.segment} = {worst.value} ({worst.users})",
        "params": result.params,
        "bytes": result.artifact_bytes,
        "p50": result.latency_ms.wall.p50,
        "p99": result.latency_ms.wall.p99,
        "cpu_p99": result.latency_ms.cpu.p99,
        "budget_p99": result.latency_ms.on(clock).p99,
        "int8_ndcg": int8.valid.ndcg,
        "int8_worst": int8.valid.worst_segment.retention,
        "int8_bytes": int8.artifact_bytes,
        "int8_p99": int8.latency_ms.wall.p99,
        "int8_cpu_p99": int8.latency_ms.cpu.p99,
        "int8_budget_p99": int8.latency_ms.on(clock).p99,
        "frontier": result.name in selection.frontier,
        "within_budget": result.name in selection.within_budget,
        "chosen": result.name == selection.chosen,
    }


def _compression(summary: SweepSummary) -> list[dict[str, Any]]:
    """Float against int8 for the chosen student: quality, size and latency, with ratios."""
    best, int8 = summary.models[BEST], summary.models[BEST_INT8]
    measures = [
        (f"validation {METRIC}", best.valid.ndcg, int8.valid.ndcg, 4),
        (f"test {METRIC}", best.metrics[METRIC], int8.metrics[METRIC], 4),
        ("test full_ndcg@10", best.metrics["full_ndcg@10"], int8.metrics["full_ndcg@10"], 4),
        (
            "worst-segment retention",
            best.valid.worst_segment.retention,
            int8.valid.worst_segment.retention,
            3,
        ),
        ("artifact bytes", best.artifact_bytes, int8.artifact_bytes, 0),
    ]
    for clock in CLOCKS:
        for stat in ("p50", "p99"):
            label = f"{stat} latency, {clock} clock (ms)"
            measures.append(
                (
                    label,
                    getattr(best.latency_ms.on(clock), stat),
                    getattr(int8.latency_ms.on(clock), stat),
                    3,
                )
            )
    return [
        {"measure": label, "float": a, "int8": b, "ratio": b / a, "digits": digits}
        for label, a, b, digits in measures
    ]


def _segment_winners(results: Iterable[CandidateResult]) -> list[dict[str, Any]]:
    """Per segment, the loss mix with the best validation NDCG@10, averaged over architectures."""
    frame = pd.DataFrame(
        [
            {
                "segment": s.segment,
                "value": s.value,
                "users": s.users,
                "mix": r.mix,
                METRIC: s.ndcg,
            }
            for r in results
            for s in r.valid.segments
        ]
    )
    by_mix = frame.groupby(["segment", "value", "users", "mix"], sort=False)[METRIC].mean()
    winners = []
    for (segment, value, users), group in by_mix.groupby(level=[0, 1, 2], sort=False):
        ranked = group.sort_values(ascending=False)
        mixes = ranked.index.get_level_values("mix")
        winners.append(
            {
                "segment": segment,
                "value": value,
                "users": users,
                "winner": mixes[0],
                "winner_ndcg": ranked.iloc[0],
                "runner_up": mixes[1] if len(ranked) > 1 else None,
                "margin": ranked.iloc[0] - ranked.iloc[1] if len(ranked) > 1 else None,
            }
        )
    return winners


def _budget_line(axis, value: float, data: list[float], label: str, *, vertical: bool) -> None:
    """A budget line where it falls near the data; further out, only its legend entry (the
    axis stretched to reach it would squeeze every candidate into a corner)."""
    low, high = min(data), max(data)
    span = max(high - low, 0.05 * abs(high))
    if low - span <= value <= high + span:
        draw = axis.axvline if vertical else axis.axhline
        draw(value, color="red", ls=":", label=label)
    else:
        beyond = value > high
        side = (
            ("right of" if beyond else "left of") if vertical else ("above" if beyond else "below")
        )
        axis.plot([], [], color="red", ls=":", label=f"{label}: {side} the plotted range")


def _frontier_figure(rows: list[dict[str, Any]], summary: SweepSummary) -> str:
    selection = summary.selection
    mixes = list(dict.fromkeys(r["mix"] for r in rows))
    colours = {mix: f"C{i % 10}" for i, mix in enumerate(mixes)}
    largest = max(max(r["bytes"], r["int8_bytes"]) for r in rows)
    figure = Figure(figsize=(12, 6))
    axis = figure.subplots()
    for r in rows:
        colour = colours[r["mix"]]
        axis.plot(
            [r["budget_p99"], r["int8_budget_p99"]],
            [r["ndcg"], r["int8_ndcg"]],
            color=colour,
            lw=0.5,
        )
        axis.scatter(
            r["budget_p99"],
            r["ndcg"],
            s=400 * r["bytes"] / largest,
            color=colour,
            alpha=0.85 if r["within_budget"] else 0.3,
            edgecolors="black" if r["frontier"] else "none",
            linewidths=1.8,
            zorder=3,
        )
        axis.scatter(
            r["int8_budget_p99"],
            r["int8_ndcg"],
            s=400 * r["int8_bytes"] / largest,
            marker="s",
            facecolors="none",
            edgecolors=colour,
            zorder=2,
        )
        if r["chosen"]:
            axis.annotate(
                f"chosen: {r['name']}",
                (r["budget_p99"], r["ndcg"]),
                xytext=(8, 8),
                textcoords="offset points",
                fontsize=9,
                fontweight="bold",
            )
    latencies = [v for r in rows for v in (r["budget_p99"], r["int8_budget_p99"])]
    qualities = [v for r in rows for v in (r["ndcg"], r["int8_ndcg"])]
    slices = summary.candidates[rows[0]["name"]].valid.segments
    teacher = next(s for s in slices if s.segment == ALL)
    floor = teacher.teacher_ndcg * selection.min_worst_segment_retention
    p99_label = f"p99 budget {selection.p99_ms} ms"
    _budget_line(axis, selection.p99_ms, latencies, p99_label, vertical=True)
    floor_label = f"teacher × {selection.min_worst_segment_retention} (retention budget, all users)"
    _budget_line(axis, floor, qualities, floor_label, vertical=False)
    axis.scatter([], [], color="white", edgecolors="black", linewidths=1.8, label="Pareto frontier")
    for mix, colour in colours.items():
        axis.scatter([], [], color=colour, label=mix)
    axis.scatter([], [], marker="s", facecolors="none", edgecolors="grey", label="int8 copy")
    axis.set_xlabel(
        f"p99 scoring latency, {selection.latency_clock} clock (ms, 100 candidates, one thread)"
    )
    axis.set_ylabel(f"validation {METRIC}")
    axis.set_title(
        "marker area = artifact bytes; faded = outside the budget; squares = int8 copies",
        fontsize=9,
    )
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.tight_layout()
    return figure_png(figure)
