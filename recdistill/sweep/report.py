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
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from recdistill.abtest.analysis import INFERIOR, NON_INFERIOR
from recdistill.abtest.report import (
    BAND,
    STANDING_COLOURS,
    STANDING_LABELS,
    margin_band,
    margin_label,
    percent_axis,
)
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
    margin = summary.impact.analysis.margin
    context = {
        "run": str(layout.root),
        "summary": summary,
        "selection": selection,
        "rule": selection.describe(margin),
        "margin": margin,
        "metric": METRIC,
        "rows": rows,
        "chosen": None if chosen is None else next(r for r in rows if r["name"] == chosen),
        "compression": _compression(summary) if chosen is not None else None,
        "winners": winners,
        "wins": Counter(w["winner"] for w in winners).most_common(),
        "figure": _frontier_figure(rows, summary),
        "impact_figure": _impact_figure(rows, summary),
        "load_average": np.mean([r.latency_ms.load_average for r in summary.candidates.values()]),
    }
    environment = template_environment()
    report = layout.report
    report.root.mkdir(exist_ok=True)
    report.index.write_text(environment.get_template("sweep.html.j2").render(context))
    report.markdown.write_text(environment.get_template("sweep.md.j2").render(context))
    return report.index


def candidates_table(summary: SweepSummary) -> str:
    """The candidates side by side, as printed at the end of ``recdistill sweep``: validation
    quality, size, latency, the interleaving with the teacher (and the finalists' A/B
    test), and where each stands by the rule."""
    selection = summary.selection
    header = (
        f"{'candidate':<28}{'valid ndcg':>11}{'worst ret.':>11}{'params':>9}{'p99 ' + selection.latency_clock:>9}"
        f"{'pref. share':>12}{'interleaved clicks [95 % CI]':>31}{'A/B ' + summary.impact.analysis.metric + ' [95 % CI]':>28}  standing"
    )
    lines = [header]
    for name, r in summary.candidates.items():
        row = _row(r, selection)
        share = "–" if r.impact is None else f"{r.impact.share:.2%}"
        lines.append(
            f"{name:<28}{r.valid.ndcg:>11.4f}{r.valid.worst_segment.retention:>11.3f}"
            f"{r.params:>9,}{selection.p99(r.latency_ms):>9.3f}{share:>12}"
            f"{row['interleaved']:>31}{row['ab']:>28}  {row['standing']}"
        )
    margin = summary.impact.analysis.margin
    lines.append(f"\nrule: {selection.describe(margin)}")
    if selection.chosen is None:
        lines.append("no candidate meets the rule (the standing column says why)")
    else:
        best, best_int8 = summary.models[BEST], summary.models[BEST_INT8]
        lines.append(
            f"chosen: {selection.chosen} ({best.params:,} parameters): test ndcg@10 "
            f"{best.metrics[METRIC]:.4f} (int8 {best_int8.metrics[METRIC]:.4f})"
        )
    return "\n".join(lines)


def _interval(value: float, ci: list[float]) -> str:
    return f"{value:+.2%} [{ci[0]:+.2%}, {ci[1]:+.2%}]"


def _standing(result: CandidateResult, selection: Selection) -> str:
    """Where the candidate stands by the rule: chosen, qualified, or the first reason not."""
    if result.name == selection.chosen:
        return "CHOSEN"
    if result.name in selection.qualified:
        return "qualifies, a smaller one was chosen"
    if result.name not in selection.within_budget:
        return "over the latency or size budget"
    impact = result.impact
    if impact.standing != NON_INFERIOR:
        worse = "worse beyond the margin" if impact.standing == INFERIOR else "inconclusive"
        return f"interleaved: {worse}"
    losing = [s.describe() for s in result.valid.segments if s.losing]
    if losing:
        return f"segment(s) losing more than the rest: {', '.join(losing)}"
    if impact.ab is None:
        return "not among the smallest finalists"
    return f"A/B: {impact.ab.standing}"


def _row(result: CandidateResult, selection: Selection) -> dict[str, Any]:
    model, worst, int8 = result.model, result.valid.worst_segment, result.int8
    clock = selection.latency_clock
    impact = result.impact
    ab = None if impact is None else impact.ab
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
        "impact": impact,
        "interleaved": "–" if impact is None else _interval(impact.lift, impact.lift_ci),
        "ab": "–" if ab is None else _interval(ab.lift, ab.lift_ci),
        "losing": [s.describe() for s in result.valid.segments if s.losing],
        "standing": _standing(result, selection),
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
    p99_label = f"p99 budget {selection.p99_ms} ms"
    _budget_line(axis, selection.p99_ms, latencies, p99_label, vertical=True)
    _budget_line(axis, teacher.teacher_ndcg, qualities, "the teacher", vertical=False)
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


def _impact_figure(rows: list[dict[str, Any]], summary: SweepSummary) -> str | None:
    """Each candidate's interleaved click lift over the teacher with its CI against its
    parameters, coloured by where the CI lies against the margin band; the finalists' A/B
    lifts beside them; the chosen one named."""
    measured = [r for r in rows if r["impact"] is not None]
    if not measured:
        return None
    margin = summary.impact.analysis.margin
    figure = Figure(figsize=(11, 5.5))
    axis = figure.subplots()
    margin_band(axis, margin)
    for r in measured:
        impact = r["impact"]
        colour = STANDING_COLOURS[impact.standing]
        error = [[impact.lift - impact.lift_ci[0]], [impact.lift_ci[1] - impact.lift]]
        axis.errorbar(r["params"], impact.lift, yerr=error, fmt="o", color=colour, capsize=3)
        if impact.ab is not None:
            ab = impact.ab
            error = [[ab.lift - ab.lift_ci[0]], [ab.lift_ci[1] - ab.lift]]
            axis.errorbar(
                r["params"] * 1.06, ab.lift, yerr=error, fmt="s", mfc="none", color=colour
            )
        if r["chosen"]:
            axis.annotate(
                f"chosen: {r['name']}",
                (r["params"], impact.lift),
                xytext=(8, 8),
                textcoords="offset points",
                fontsize=9,
                fontweight="bold",
            )
    axis.set_xscale("log")
    percent_axis(axis)
    axis.set_xlabel("parameters (log scale)")
    axis.set_ylabel(f"lift over {summary.reference} (95 % CI)")
    axis.set_title(
        "dots: the candidate's clicks interleaved with the teacher's; squares: the A/B "
        "test's CTR (finalists)",
        fontsize=9,
    )
    handles = [
        Line2D([], [], color=colour, marker="o", linestyle="", label=STANDING_LABELS[standing])
        for standing, colour in STANDING_COLOURS.items()
    ]
    handles.append(Patch(label=margin_label(margin), **BAND))
    axis.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    figure.tight_layout()
    return figure_png(figure)
