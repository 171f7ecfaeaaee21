"""The A/B report: ``index.html`` (self-contained, plots embedded), ``report.md`` and
``summary.json`` (verdict, sample-ratio check, per-arm table and lifts).

What the page shows is decided here, the same for HTML and Markdown: the tables' columns
(:class:`Column`; one with no value in any row is left out, as round-trip latency offline),
which metrics' lifts are worth a row (:func:`distinct_metrics`), where each treatment is
non-inferior per segment (:func:`segment_lines`), and the plots, with the non-inferiority
margin drawn as a band (:func:`daily_figure`, :func:`segment_figure`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from recdistill.ab_spec import METRICS, ExperimentSpec
from recdistill.abtest.analysis import (
    ALL,
    INCONCLUSIVE,
    INFERIOR,
    NON_INFERIOR,
    RATIOS,
    Analysis,
    non_inferiority,
)
from recdistill.abtest.preference import PREFERENCE
from recdistill.evaluation_report import (
    figure_png,
    format_number,
    format_p,
    template_environment,
)
from recdistill.files import write_json
from recdistill.layout import AbTestLayout

# Lifts that agree to this (half the 0.01 % they are shown to) are the same lift.
SAME_LIFT = 5e-5
# How a lift's CI lies against the margin, in the plots.
STANDING_COLOURS = {NON_INFERIOR: "#1a7f37", INCONCLUSIVE: "#b35c00", INFERIOR: "#c62828"}
STANDING_LABELS = {
    NON_INFERIOR: "non-inferior",
    INCONCLUSIVE: "inconclusive (CI straddles the margin)",
    INFERIOR: "worse beyond the margin",
}
BAND_COLOUR = "#8e44ad"
BAND = {"facecolor": BAND_COLOUR, "alpha": 0.3, "linewidth": 0}


def write_report(
    out: AbTestLayout,
    experiment: ExperimentSpec,
    analysis: Analysis,
    truth: str,
    *,
    source: str = "",
) -> None:
    """Write the report of ``analysis`` and its summary to ``out``; ``truth`` names the oracle
    of a simulation, ``source`` the logs of live traffic (then nothing was simulated)."""
    spec = experiment.analysis
    interleaved = experiment.routing.interleaved
    decision = analysis.lifts[analysis.lifts["metric"] == decision_metric(experiment)]
    overall = analysis.arms[analysis.arms["segment"] == ALL]
    if interleaved:
        metrics, merged = [PREFERENCE], []
    else:
        metrics, merged = distinct_metrics(analysis.lifts, overall, first=spec.metric)
    per_segment = segment_lines(analysis.segments, spec.margin)
    level = round(100 * (1 - spec.alpha))
    k = experiment.simulation.k
    label = decision_label(experiment)
    lines = preference_findings(decision) if interleaved else findings(decision, experiment)
    context = {
        "experiment": experiment,
        "interleaved": interleaved,
        "truth": truth,
        "source": source,
        "metric": label,
        "level": level,
        "verdict": analysis.verdict,
        "ship": analysis.ship,
        "srm": analysis.srm,
        "summary": [
            {"finding": line, "segments": per_segment.get((row.treatment, row.baseline))}
            for line, row in zip(lines, decision.itertuples())
        ],
        "power": _power_lines(decision, experiment),
        "tables": {
            "arms": table(
                _interleaved_arm_columns() if interleaved else _arm_columns(level, k), overall
            ),
            "lifts": table(
                _preference_columns(level, spec.power)
                if interleaved
                else _lift_columns(level, spec.power),
                analysis.lifts[analysis.lifts["metric"].isin(metrics)],
                css=lambda row: (
                    ("better" if row["lift"] > 0 else "worse") if row["significant"] else ""
                ),
            ),
            "slices": table(_slice_columns(level, label, interleaved), analysis.segments),
            "arms_by_segment": table(
                _segment_arm_columns(level, k), analysis.arms[analysis.arms["segment"] != ALL]
            ),
        },
        "merged": merged,
        "figures": {
            "daily": figure_png(daily_figure(analysis.daily, experiment)),
            "segments": figure_png(segment_figure(analysis.segments, decision, experiment))
            if len(analysis.segments)
            else None,
        },
    }
    environment = template_environment()
    for path, template in (
        (out.report.index, "abtest.html.j2"),
        (out.report.markdown, "abtest.md.j2"),
    ):
        path.write_text(environment.get_template(template).render(context), encoding="utf-8")
    summary = {
        "verdict": analysis.verdict,
        "ship": analysis.ship,
        "srm": dataclasses.asdict(analysis.srm) | {"mismatch": analysis.srm.mismatch},
        # Through pandas' JSON, so NaN (e.g. no round trip offline) becomes null.
        "arms": json.loads(overall.to_json(orient="records")),
        "lifts": json.loads(analysis.lifts.to_json(orient="records")),
    }
    write_json(out.summary, summary)


def decision_metric(experiment: ExperimentSpec) -> str:
    """The metric the verdict is on: the A/B's ``[analysis] metric``, or interleaving's
    preference."""
    return PREFERENCE if experiment.routing.interleaved else experiment.analysis.metric


def decision_label(experiment: ExperimentSpec) -> str:
    if experiment.routing.interleaved:
        return "interleaved clicks"
    return METRICS[experiment.analysis.metric]


def _percent(value: Any, digits: int = 2) -> str:
    if value is None or np.isnan(value):
        return "–"
    return f"{value:+.{digits}%}"


# --- Tables -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column of a report table: ``cell`` renders a row's cell from the row's ``keys``.
    A column none of whose rows has a value under any of its ``keys`` is left out."""

    header: str
    cell: Callable[[Mapping[str, Any]], str]
    keys: tuple[str, ...]
    text: bool = False  # left-aligned, as names are; numbers are right-aligned


@dataclass(frozen=True)
class Table:
    columns: list[Column]
    rows: list[tuple[str, list[str]]]  # (CSS class, cells)


def table(
    columns: Sequence[Column],
    frame: pd.DataFrame,
    css: Callable[[Mapping[str, Any]], str] = lambda row: "",
) -> Table:
    """The rows of ``frame`` in ``columns``, but for the columns with no value in any row."""
    records = frame.to_dict("records")
    shown = [
        column
        for column in columns
        if any(pd.notna(row.get(key)) for row in records for key in column.keys)
    ]
    return Table(shown, [(css(row), [column.cell(row) for column in shown]) for row in records])


def _text(header: str, key: str) -> Column:
    return Column(header, lambda row: str(row[key]), (key,), text=True)


def _number(header: str, key: str, format: Callable[[Any], str]) -> Column:
    return Column(header, lambda row: format(row[key]), (key,))


def _interval(header: str, low: str, high: str, format: Callable[[Any], str]) -> Column:
    return Column(header, lambda row: f"[{format(row[low])}, {format(row[high])}]", (low, high))


def _count(value: Any) -> str:
    return "–" if pd.isna(value) else f"{int(value):,}"


def _digits(digits: int) -> Callable[[Any], str]:
    return lambda value: format_number(value, digits)


def _user_counts() -> Column:
    return Column(
        "users",
        lambda row: f"{_count(row['treatment_users'])} / {_count(row['baseline_users'])}",
        ("treatment_users", "baseline_users"),
    )


def _metric_columns(level: int, k: int) -> list[Column]:
    """Each metric of an arm with its CI (a metric the log does not measure has no values,
    so its columns are left out)."""
    columns = []
    for metric, label in METRICS.items():
        digits = _digits(3 if metric == "clicks_per_request" else 4)
        columns += [
            _number(label.replace("@k", f"@{k}"), metric, digits),
            _interval(f"{level} % CI", f"{metric}_low", f"{metric}_high", digits),
        ]
    return columns


def _arm_columns(level: int, k: int) -> list[Column]:
    return [
        _text("arm", "arm"),
        _text("model", "model"),
        _number("users", "users", _count),
        _number("requests", "requests", _count),
        *_metric_columns(level, k),
        *_latency_columns(),
    ]


def _interleaved_arm_columns() -> list[Column]:
    return [
        _text("arm", "arm"),
        _text("model", "model"),
        _number("users", "users", _count),
        _number("requests", "requests", _count),
        _number("items placed", "placed", _count),
        _number("clicks credited", "credited_clicks", _count),
        _number("CTR of its items", "placed_ctr", _digits(4)),
        *_latency_columns(),
    ]


def _latency_columns() -> list[Column]:
    return [
        *(
            _number(f"{name} {quantile} (ms)", f"{column}_{quantile}", _digits(2))
            for column, name in (("latency_ms", "latency"), ("round_trip_ms", "round trip"))
            for quantile in ("p50", "p99")
        ),
        _number("requests / s", "throughput_rps", _digits(1)),
    ]


def _segment_arm_columns(level: int, k: int) -> list[Column]:
    return [
        _text("segment", "segment"),
        _text("value", "value"),
        _text("arm", "arm"),
        _number("users", "users", _count),
        _number("requests", "requests", _count),
        *_metric_columns(level, k),
    ]


def _lift_columns(level: int, power: float) -> list[Column]:
    return [
        _text("treatment", "treatment"),
        _text("baseline", "baseline"),
        Column(
            "metric",
            lambda row: METRICS[row["metric"]],
            ("metric",),
            text=True,
        ),
        _user_counts(),
        _number("lift", "lift", _percent),
        _interval(f"{level} % CI", "ci_low", "ci_high", _percent),
        _number("p", "p_value", format_p),
        Column(
            "p (Holm)",
            lambda row: format_p(row["p_holm"]) + (" *" if row["significant"] else ""),
            ("p_holm",),
        ),
        _number(f"MDE ({100 * power:.0f} % power)", "mde", lambda value: f"±{value:.2%}"),
        _number("CUPED variance cut", "variance_reduction", lambda value: f"{value:.1%}"),
    ]


def _preference_columns(level: int, power: float) -> list[Column]:
    return [
        _text("treatment", "treatment"),
        _text("baseline", "baseline"),
        _number("users", "users", _count),
        Column(
            "prefer treatment / baseline / neither",
            lambda row: f"{row['wins']:,} / {row['losses']:,} / {row['ties']:,}",
            ("wins",),
        ),
        _number("clicks credited to treatment", "treatment_clicks", _count),
        _number("to baseline", "baseline_clicks", _count),
        _number("preference share", "share", lambda value: f"{value:.2%}"),
        _interval(f"{level} % CI", "share_low", "share_high", lambda value: f"{value:.2%}"),
        _number("click lift", "lift", _percent),
        _interval(f"{level} % CI ", "ci_low", "ci_high", _percent),
        _number("p", "p_value", format_p),
        _number(f"MDE ({100 * power:.0f} % power)", "mde", lambda value: f"±{value:.2%}"),
    ]


def _slice_columns(level: int, metric: str, interleaved: bool = False) -> list[Column]:
    per_user = " / user" if interleaved else ""
    return [
        _text("segment", "segment"),
        _text("value", "value"),
        _text("treatment", "treatment"),
        _text("baseline", "baseline"),
        _number("users", "treatment_users", _count) if interleaved else _user_counts(),
        _number(f"treatment {metric}{per_user}", "treatment_mean", format_number),
        _number(f"baseline {metric}{per_user}", "baseline_mean", format_number),
        _number("lift", "lift", _percent),
        _interval(f"{level} % CI", "ci_low", "ci_high", _percent),
        _number("p (Holm)", "p_holm", format_p),
    ]


# --- What the summary says --------------------------------------------------------------


def findings(decision: pd.DataFrame, experiment: ExperimentSpec) -> list[str]:
    """One plain line per comparison on the decision metric."""
    label = METRICS[experiment.analysis.metric]
    lines = []
    for row in decision.itertuples():
        if row.significant:
            outcome = "better" if row.lift > 0 else "worse"
            verdict = f"significantly {outcome} (Holm p {_p_clause(row.p_holm)})"
        else:
            verdict = f"no significant difference (Holm p {_p_clause(row.p_holm)})"
        lines.append(
            f"{row.treatment} vs {row.baseline}: {label} lift {row.lift:+.2%} "
            f"[{row.ci_low:+.2%}, {row.ci_high:+.2%}] — {verdict}."
        )
    return lines


def preference_findings(decision: pd.DataFrame) -> list[str]:
    """One plain line per interleaved comparison: the preference share, its direction and
    what each arm's items earned."""
    lines = []
    for row in decision.itertuples():
        if np.isnan(row.share):
            lines.append(f"{row.treatment} vs {row.baseline}: no clicks credited to both arms.")
            continue
        direction = (
            f"{row.treatment} preferred"
            if row.share_low > 0.5
            else f"{row.baseline} preferred"
            if row.share_high < 0.5
            else "no detectable preference"
        )
        lines.append(
            f"{row.treatment} vs {row.baseline}, interleaved: preference share "
            f"{row.share:.2%} [{row.share_low:.2%}, {row.share_high:.2%}] — {direction} "
            f"(p {_p_clause(row.p_value)}); clicks on {row.treatment}'s items "
            f"{row.lift:+.2%} [{row.ci_low:+.2%}, {row.ci_high:+.2%}] over {row.baseline}'s; "
            f"{row.wins:,} users preferred {row.treatment}, {row.losses:,} {row.baseline}, "
            f"{row.ties:,} neither."
        )
    return lines


def _p_clause(value: float) -> str:
    """``= 0.092`` or ``< 0.001``: a p-value after its name."""
    shown = format_p(value)
    return shown if shown.startswith("<") else f"= {shown}"


def segment_lines(segments: pd.DataFrame, margin: float) -> dict[tuple[str, str], str]:
    """Per comparison, one sentence: the slices where the treatment is non-inferior by the
    verdict's rule (:func:`~recdistill.abtest.analysis.non_inferiority`), and the lift and CI
    of those where it is not (inconclusive, or worse beyond the margin)."""
    lines = {}
    if segments.empty:
        return lines
    for pair, part in segments.groupby(["treatment", "baseline"], sort=False):
        standing = pd.Series(
            [non_inferiority(low, high, margin) for low, high in zip(part.ci_low, part.ci_high)],
            index=part.index,
        )
        good = part[standing == NON_INFERIOR]
        if len(good) == len(part):
            where = f"all {len(part)} slices"
        elif good.empty:
            where = f"none of the {len(part)} slices"
        else:
            where = f"{len(good)} of {len(part)}: {_slice_names(good)}"
        rule = f"CI lower bound above -{margin:.1%}, each slice uncorrected"
        clauses = [f"non-inferior ({rule}) in {where}"]
        for outcome, name in (
            (INCONCLUSIVE, "inconclusive"),
            (INFERIOR, "worse beyond the margin"),
        ):
            rest = part[standing == outcome]
            if len(rest):
                count = f"all {len(rest)}" if len(rest) == len(part) else str(len(rest))
                clauses.append(f"{name} in {count}: {_slice_names(rest, estimates=True)}")
        lines[pair] = "Per segment: " + "; ".join(clauses) + "."
    return lines


def _slice_names(rows: pd.DataFrame, estimates: bool = False) -> str:
    """``segment value, value, other-segment value``: each segment named once, before its
    first value; with ``estimates``, each value's lift and CI."""
    names, previous = [], None
    for row in rows.itertuples():
        name = str(row.value) if row.segment == previous else f"{row.segment} {row.value}"
        if estimates:
            name += f" {row.lift:+.1%} [{row.ci_low:+.1%}, {row.ci_high:+.1%}]"
        names.append(name)
        previous = row.segment
    return ", ".join(names)


def distinct_metrics(
    lifts: pd.DataFrame, arms: pd.DataFrame, first: str
) -> tuple[list[str], list[str]]:
    """The metrics whose lifts are worth a row of their own, and a note on each left out.

    A metric is left out when its lift and CI equal, on every comparison, those of a metric
    kept before it (``first`` is kept first, the others in :data:`METRICS` order): CTR and
    clicks / request give the same lift whenever every arm shows the same number of items
    per request. This is decided from the numbers; the note explains it from ``arms``'
    overall rows where the two share a numerator.
    """
    present = [metric for metric in METRICS if metric in set(lifts["metric"])]
    by_metric = {
        metric: lifts[lifts["metric"] == metric].set_index(["treatment", "baseline"])[
            ["lift", "ci_low", "ci_high"]
        ]
        for metric in present
    }
    kept, notes = [], []
    for metric in sorted(present, key=lambda name: name != first):
        same = next((k for k in kept if _same_lifts(by_metric[metric], by_metric[k])), None)
        if same is None:
            kept.append(metric)
            continue
        notes.append(
            f"No {METRICS[metric]} rows: its lift and CI equal {METRICS[same]}'s on every "
            f"comparison{_why_same(same, metric, arms)}."
        )
    return [metric for metric in present if metric in kept], notes


def _same_lifts(one: pd.DataFrame, other: pd.DataFrame) -> bool:
    if not one.index.equals(other.index):
        return False
    return bool(np.allclose(one.to_numpy(), other.to_numpy(), rtol=0.0, atol=SAME_LIFT))


def _why_same(kept: str, left_out: str, arms: pd.DataFrame) -> str:
    """`` (both count clicks, and impressions / requests = 10 in every arm)`` where the two
    metrics share their numerator and the ratio of their denominators is the same in every
    arm; else nothing."""
    (numerator, over), (other_numerator, under) = RATIOS[kept], RATIOS[left_out]
    if numerator != other_numerator or not {kept, left_out} <= set(arms):
        return ""
    # kept / left_out = under / over, the same in every arm for the lifts to agree.
    ratio = (arms[left_out] / arms[kept]).to_numpy()
    if not len(ratio) or not np.allclose(ratio, ratio[0], rtol=1e-9):
        return ""
    value = float(ratio[0])
    if value < 1:
        over, under, value = under, over, 1 / value
    return f" (both count {numerator}, and {over} / {under} = {value:.3g} in every arm)"


def _power_lines(decision: pd.DataFrame, experiment: ExperimentSpec) -> list[str]:
    spec = experiment.analysis
    label = decision_label(experiment)
    lines = []
    for row in decision.itertuples():
        if experiment.routing.interleaved:
            lines.append(
                f"{row.treatment} vs {row.baseline} ({row.users:,} users, each seeing both): "
                f"a relative lift of the clicks on its items of ±{row.mde:.2%} is detected "
                f"with {spec.power:.0%} power at α = {spec.alpha:g}."
            )
            continue
        cuped = (
            f"; CUPED removed {row.variance_reduction:.0%} of the variance" if spec.cuped else ""
        )
        lines.append(
            f"{row.treatment} vs {row.baseline} ({row.treatment_users:,} vs "
            f"{row.baseline_users:,} users): a relative {label} lift of ±{row.mde:.2%} is "
            f"detected with {spec.power:.0%} power at α = {spec.alpha:g}{cuped}."
        )
    return lines


# --- Plots ------------------------------------------------------------------------------


def margin_band(axis: Axes, margin: float, *, vertical: bool = False) -> Patch | None:
    """Shade the non-inferiority margin, lifts from ``-margin`` to 0: a lift whose CI's
    lower bound clears the band's lower edge is non-inferior. Nothing for a zero margin."""
    if margin <= 0:
        return None
    span, edge = (axis.axvspan, axis.axvline) if vertical else (axis.axhspan, axis.axhline)
    edge(-margin, color=BAND_COLOUR, linestyle="--", linewidth=1.0, zorder=1.5)
    return span(-margin, 0.0, zorder=1.5, label=margin_label(margin), **BAND)


def margin_label(margin: float) -> str:
    return f"non-inferiority margin (−{margin:.1%})"


def _ordered_pairs(frame: pd.DataFrame, experiment: ExperimentSpec) -> list[tuple[str, str]]:
    """The comparisons of ``frame``, the ship pair (the verdict's) first."""
    pairs = list(dict.fromkeys(zip(frame["treatment"], frame["baseline"])))
    return sorted(pairs, key=lambda pair: pair != tuple(experiment.analysis.ship))


def _pair_title(pair: tuple[str, str], experiment: ExperimentSpec) -> str:
    ship = " (the ship decision)" if pair == tuple(experiment.analysis.ship) else ""
    return f"{pair[0]} vs {pair[1]}{ship}"


def percent_axis(axis: Axes, *, vertical: bool = False) -> None:
    which = axis.xaxis if vertical else axis.yaxis
    which.set_major_formatter(lambda value, _: f"{value:+.0%}")
    (axis.axvline if vertical else axis.axhline)(0.0, color="black", linewidth=0.8)


def daily_figure(daily: pd.DataFrame, experiment: ExperimentSpec) -> Figure:
    """The cumulative lift on the decision metric by day, one panel per comparison (each at
    its own scale, so that a few-percent margin stays visible), the margin as a band."""
    spec = experiment.analysis
    pairs = _ordered_pairs(daily, experiment)
    figure = Figure(figsize=(10, 0.6 + 2.4 * len(pairs)))
    axes = figure.subplots(len(pairs), 1, sharex=True, squeeze=False)[:, 0]
    for axis, pair in zip(axes, pairs):
        part = _comparison(daily, pair)
        margin_band(axis, spec.margin)
        axis.fill_between(part["day"], part["ci_low"], part["ci_high"], color="C0", alpha=0.2)
        axis.plot(part["day"], part["lift"], marker=".", color="C0")
        percent_axis(axis)
        axis.set_title(_pair_title(pair, experiment), fontsize=10, loc="left")
        axis.set_ylabel(f"{decision_label(experiment)} lift")
    axes[-1].set_xlabel("experiment day (lift over the days so far)")
    handles = [
        Line2D([], [], color="C0", marker=".", label="cumulative lift"),
        Patch(color="C0", alpha=0.2, label=f"{1 - spec.alpha:.0%} CI"),
    ]
    _legend(figure, handles, spec.margin)
    return figure


def segment_figure(
    segments: pd.DataFrame, overall: pd.DataFrame, experiment: ExperimentSpec
) -> Figure:
    """Per comparison, the decision metric's lift and CI in every slice (and over all users,
    from ``overall``), a point coloured by where its CI lies against the margin band."""
    spec = experiment.analysis
    pairs = _ordered_pairs(segments, experiment)
    labels = list(dict.fromkeys(zip(segments["segment"], segments["value"])))
    # Top to bottom: all users, then each segment's values, a gap between segments.
    rows, y, previous = {(ALL, ALL): 0.0}, 0.0, ALL
    for segment, value in labels:
        y += 1.6 if segment != previous else 1.0
        rows[(segment, value)], previous = y, segment
    figure = Figure(figsize=(2.0 + 3.4 * len(pairs), 1.0 + 0.28 * (y + 1)))
    axes = figure.subplots(1, len(pairs), sharey=True, squeeze=False)[0]
    for axis, pair in zip(axes, pairs):
        part = _comparison(segments, pair)
        positions = [0.0, *(rows[key] for key in zip(part["segment"], part["value"]))]
        part = pd.concat([_comparison(overall, pair), part])
        margin_band(axis, spec.margin, vertical=True)
        for position, row in zip(positions, part.itertuples()):
            whole = position == 0.0
            axis.errorbar(
                row.lift,
                position,
                xerr=[[row.lift - row.ci_low], [row.ci_high - row.lift]],
                fmt="D" if whole else "o",
                color=STANDING_COLOURS[non_inferiority(row.ci_low, row.ci_high, spec.margin)],
                markersize=6 if whole else 4,
                linewidth=1.4 if whole else 1.0,
            )
        percent_axis(axis, vertical=True)
        axis.set_title(_pair_title(pair, experiment), fontsize=10, loc="left")
        axis.set_xlabel(f"{decision_label(experiment)} lift")
        axis.grid(axis="x", color="#dddddd", linewidth=0.6)
    axes[0].set_yticks(
        list(rows.values()),
        ["all users", *(f"{segment}: {value}" for segment, value in labels)],
        fontsize=9,
    )
    axes[0].get_yticklabels()[0].set_fontweight("bold")
    axes[0].invert_yaxis()
    handles = [
        Line2D([], [], color=colour, marker="o", linestyle="", label=STANDING_LABELS[standing])
        for standing, colour in STANDING_COLOURS.items()
    ]
    _legend(figure, handles, spec.margin)
    return figure


def _comparison(frame: pd.DataFrame, pair: tuple[str, str]) -> pd.DataFrame:
    return frame[(frame["treatment"] == pair[0]) & (frame["baseline"] == pair[1])]


def _legend(figure: Figure, handles: list[Any], margin: float) -> None:
    """One legend above the panels: ``handles``, then the margin band's."""
    if margin > 0:
        handles = [*handles, Patch(label=margin_label(margin), **BAND)]
    figure.legend(handles=handles, loc="upper left", ncol=len(handles), fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.4 / figure.get_figheight()))
