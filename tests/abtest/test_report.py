"""The A/B page: the margin band in the plots, columns without data left out, one row per
distinct lift, and where each treatment is non-inferior per segment."""

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recdistill.abtest.analysis import INCONCLUSIVE, INFERIOR, NON_INFERIOR, analyse
from recdistill.abtest.report import (
    _arm_columns,
    daily_figure,
    distinct_metrics,
    margin_label,
    segment_figure,
    segment_lines,
    table,
    write_report,
)
from recdistill.abtest.simulate import simulate
from recdistill.layout import AbTestLayout
from tests.abtest.conftest import experiment

ARMS = {"control": ("popularity", 0.34), "teacher": ("truth", 0.33), "student": ("noisy", 0.33)}
MARGIN = 0.03


def spec(data: Path = Path("unused"), **simulation):
    return experiment(data, ARMS, analysis={"margin": MARGIN, "min_users": 20}, **simulation)


@pytest.fixture(scope="module")
def offline_run(synthetic_dir, small_world, truth_ranker, popularity_ranker, noisy_truth_ranker):
    """A small offline experiment (no latency timed, so no latency at all) and its analysis."""
    run = spec(synthetic_dir)
    rankers = {"popularity": popularity_ranker, "truth": truth_ranker, "noisy": noisy_truth_ranker}
    log = simulate(small_world, run, rankers)
    return run, analyse(log, run, ["activity_tier"])


def report(tmp_path, run, analysis) -> tuple[str, str]:
    tmp_path.mkdir(exist_ok=True)
    write_report(AbTestLayout(tmp_path), run, analysis, "a test truth")
    return (tmp_path / "index.html").read_text(), (tmp_path / "report.md").read_text()


def lift_rows(**cis: tuple[float, float, float]) -> pd.DataFrame:
    """Lift rows of one comparison, a slice per keyword: value=(lift, ci_low, ci_high)."""
    return pd.DataFrame(
        [
            {"treatment": "student", "baseline": "teacher", "segment": "tier", "value": value}
            | dict(zip(("lift", "ci_low", "ci_high"), estimate))
            for value, estimate in cis.items()
        ]
    )


def band_extent(axis, *, vertical: bool) -> tuple[float, float]:
    """The data extent, across the lift axis, of the patch labelled as the margin."""
    (band,) = [p for p in axis.patches if p.get_label() == margin_label(MARGIN)]
    corners = axis.transData.inverted().transform(band.get_verts())[:, 0 if vertical else 1]
    return float(corners.min()), float(corners.max())


def test_the_margin_is_a_labelled_band_in_every_panel_of_both_plots():
    daily = pd.concat(
        [
            pd.DataFrame({"day": range(3), "lift": [0.1, 0.0, -0.01]}).assign(
                treatment=pair[0],
                baseline=pair[1],
                ci_low=lambda f: f.lift - 0.05,
                ci_high=lambda f: f.lift + 0.05,
            )
            for pair in (("teacher", "control"), ("student", "control"), ("student", "teacher"))
        ]
    )
    figure = daily_figure(daily, spec())
    assert len(figure.axes) == 3
    # The ship pair first, then the comparisons with the control.
    assert figure.axes[0].get_title(loc="left") == "student vs teacher (the ship decision)"
    for axis in figure.axes:
        assert band_extent(axis, vertical=False) == pytest.approx((-MARGIN, 0.0))
    assert margin_label(MARGIN) == "non-inferiority margin (−3.0%)"
    assert margin_label(MARGIN) in [text.get_text() for text in figure.legends[0].get_texts()]

    segments = lift_rows(cold=(0.0, -0.02, 0.03), heavy=(-0.1, -0.2, 0.0))
    overall = lift_rows(all=(-0.05, -0.1, 0.0))
    (axis,) = segment_figure(segments, overall, spec()).axes
    assert band_extent(axis, vertical=True) == pytest.approx((-MARGIN, 0.0))


def test_no_band_for_a_zero_margin():
    daily = lift_rows(all=(0.0, -0.1, 0.1)).assign(day=0)
    run = experiment(Path("unused"), ARMS, analysis={"margin": 0.0})
    (axis,) = daily_figure(daily, run).axes
    assert not axis.patches  # the CI is a collection, not a patch


def test_columns_without_any_value_are_left_out(offline_run, tmp_path):
    run, analysis = offline_run
    html, markdown = report(tmp_path / "offline", run, analysis)
    for page in (html, markdown):
        assert "round trip" not in page and "latency p50" not in page  # nothing timed
        assert "NDCG@5" in page and "clicks / request" in page

    overall = analysis.arms[analysis.arms["segment"] == "all"]
    timed = overall.assign(
        latency_ms_p50=1.5, latency_ms_p99=3.0, round_trip_ms_p50=np.nan, round_trip_ms_p99=np.nan
    )
    timed.loc[timed.index[0], "round_trip_ms_p50"] = 2.25  # one arm with a value shows them
    headers = [column.header for column in table(_arm_columns(95, 5), timed).columns]
    assert {"latency p50 (ms)", "round trip p50 (ms)"} <= set(headers)
    assert "round trip p99 (ms)" not in headers
    rows = table(_arm_columns(95, 5), timed).rows
    assert [cells[headers.index("round trip p50 (ms)")] for _, cells in rows] == ["2.25", "–", "–"]

    arms = pd.concat([timed, analysis.arms[analysis.arms["segment"] != "all"]])
    html, markdown = report(tmp_path / "timed", run, dataclasses.replace(analysis, arms=arms))
    for page in (html, markdown):
        assert "round trip p50 (ms)" in page and "round trip p99" not in page


def test_equal_lifts_are_shown_once_with_a_note():
    def lifts(metric, lift, ci_low, ci_high):
        return {"treatment": "student", "baseline": "teacher", "metric": metric, "lift": lift,
                "ci_low": ci_low, "ci_high": ci_high}  # fmt: skip

    frame = pd.DataFrame(
        [
            lifts("ctr", -0.0661, -0.1375, 0.0111),
            lifts("clicks_per_request", -0.06612, -0.13748, 0.01112),  # the same, to 0.01 %
            lifts("ndcg", -0.0661, -0.1375, 0.0150),  # the same lift, another CI
        ]
    )
    arms = pd.DataFrame({"ctr": [0.02, 0.03], "clicks_per_request": [0.2, 0.3], "ndcg": [0.4, 0.5]})
    metrics, notes = distinct_metrics(frame, arms, first="ctr")
    assert metrics == ["ctr", "ndcg"]
    assert notes == [
        (
            "No clicks / request rows: its lift and CI equal CTR's on every comparison "
            "(both count clicks, and impressions / requests = 10 in every arm)."
        )
    ]
    # Decided from the numbers: the decision metric is kept, whichever it is; NDCG's lift
    # equal to CTR's is merged too, with no reason given, as they share no numerator.
    frame.loc[2, "ci_high"] = 0.0111
    metrics, notes = distinct_metrics(frame, arms, first="clicks_per_request")
    assert metrics == ["clicks_per_request"]
    assert notes[0].startswith("No CTR rows: its lift and CI equal clicks / request's")
    assert (
        notes[1] == "No NDCG@k rows: its lift and CI equal clicks / request's on every comparison."
    )
    # Any comparison that differs keeps both.
    other = frame.assign(baseline="control", lift=[0.5, 0.6, 0.5])
    metrics, _ = distinct_metrics(pd.concat([frame, other]), arms, first="ctr")
    assert metrics == ["ctr", "clicks_per_request"]


def test_the_page_merges_what_the_simulation_makes_equal(offline_run, tmp_path):
    """Every request shows k = 5 items: clicks / request's lifts are CTR's."""
    run, analysis = offline_run
    ctr, per_request = (
        analysis.lifts.loc[analysis.lifts["metric"] == metric, "lift"].to_numpy()
        for metric in ("ctr", "clicks_per_request")
    )
    assert np.allclose(ctr, per_request)
    html, markdown = report(tmp_path, run, analysis)
    note = "No clicks / request rows: its lift and CI equal CTR's on every comparison"
    for page in (html, markdown):
        assert note in page and "impressions / requests = 5 in every arm" in page
    lifts_section = markdown.split("## Lifts")[1].split("##")[0]
    assert "| CTR |" in lifts_section and "| NDCG@k |" in lifts_section
    assert "| clicks / request |" not in lifts_section


def test_the_segment_line_sorts_slices_by_the_verdicts_rule():
    segments = pd.concat(
        [
            lift_rows(
                cold=(0.01, -0.02, 0.04),  # lower bound above -3 %: non-inferior
                heavy=(-0.02, -0.08, 0.04),  # straddles -3 %
                light=(-0.10, -0.15, -0.05),  # all of it below -3 %
                medium=(0.0, -0.029, 0.03),
            ),
            lift_rows(cold=(0.5, 0.2, 0.8), heavy=(0.4, 0.1, 0.7)).assign(baseline="control"),
        ]
    )
    lines = segment_lines(segments, MARGIN)
    assert lines[("student", "teacher")] == (
        "Per segment: non-inferior (CI lower bound above -3.0%, each slice uncorrected) in 2 of 4: tier cold, medium; "
        "inconclusive in 1: tier heavy -2.0% [-8.0%, +4.0%]; "
        "worse beyond the margin in 1: tier light -10.0% [-15.0%, -5.0%]."
    )
    assert lines[("student", "control")] == (
        "Per segment: non-inferior (CI lower bound above -3.0%, each slice uncorrected) in all 2 slices."
    )
    assert segment_lines(segments.iloc[:0], MARGIN) == {}


def test_the_summary_says_per_segment_where_the_treatment_is_non_inferior(offline_run, tmp_path):
    """On a real analysis, each comparison's line lists exactly the slices the rule puts
    where it says, with their lifts."""
    run, analysis = offline_run
    html, markdown = report(tmp_path, run, analysis)
    for (treatment, baseline), part in analysis.segments.groupby(["treatment", "baseline"]):
        line = segment_lines(analysis.segments, MARGIN)[(treatment, baseline)]
        assert line in html and line in markdown
        for row in part.itertuples():
            if row.ci_low > -MARGIN:
                assert f"{row.value} {row.lift:+.1%}" not in line
            else:
                assert f"{row.value} {row.lift:+.1%} [{row.ci_low:+.1%}" in line


def test_standings_are_the_three_outcomes_of_the_verdict():
    from recdistill.abtest.analysis import non_inferiority

    assert non_inferiority(-0.01, 0.05, 0.02) == NON_INFERIOR
    assert non_inferiority(-0.02, 0.05, 0.02) == INCONCLUSIVE  # on the margin: not above it
    assert non_inferiority(-0.09, -0.03, 0.02) == INFERIOR
