import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recdistill.cli import main
from recdistill.evaluation_report import LATENCY_NOTE, colour_scale, format_p, verdicts
from recdistill.roles import REFERENCE
from recdistill.segments import ALL, SliceSpec, natural_order, slice_table, user_segments
from tests.conftest import ONE_STAGE


@pytest.fixture(scope="module")
def report(tiny_run):
    _, run = tiny_run
    assert main(["report", "--run", str(run)]) == 0
    return run / "report"


def test_report_writes_three_self_contained_files(report):
    html = (report / "index.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    assert 'src="http' not in html and "<script" not in html
    markdown = (report / "report.md").read_text()
    assert "| teacher |" in markdown and "retention" in markdown
    segments = pd.read_parquet(report / "segments.parquet")
    assert {
        "activity_tier",
        "region",
        "age_bucket",
        "cold_start",
        "held_out_popularity_tier",
        ALL,
    } <= set(segments["segment"])


def test_the_segment_the_generator_made_different_differs(report):
    # Heavy users of the synthetic world seek niche items, cold ones follow the crowd.
    segments = pd.read_parquet(report / "segments.parquet")
    teacher = segments[(segments["model"] == "teacher") & (segments["metric"] == "ndcg@10")]
    tiers = teacher[teacher["segment"] == "activity_tier"].set_index("value")
    assert tiers.loc["heavy", "ci_high"] < tiers.loc["cold", "ci_low"]


def test_slices_retention_flags_and_holm(report):
    segments = pd.read_parquet(report / "segments.parquet")
    key = segments[segments["metric"] == "ndcg@10"]
    assert key["users"].min() >= 30
    student = key[key["model"] == "student"].set_index(["segment", "value"])
    teacher = key[key["model"] == "teacher"].set_index(["segment", "value"])
    # Retention is undefined where the teacher's mean is 0 (held-out tail items of the tiny
    # run's two-epoch teacher): NaN there, never a number.
    defined = teacher["mean"] > 0
    assert student.loc[~defined, "retention"].isna().all()
    student, ratio = student[defined], (student["mean"] / teacher["mean"])[defined]
    assert np.allclose(student["retention"], ratio)
    overall = student.loc[(ALL, ALL), "retention"]
    below = (student["p_vs_rest_holm"] <= 0.05) & (student["retention"] < overall)
    assert (student["flagged"] == below).all()
    assert (student["p_t_vs_reference_holm"] >= student["p_t_vs_reference"] - 1e-12).all()
    tested = student.drop(index=(ALL, ALL))
    assert (tested["p_vs_rest_holm"] >= tested["p_vs_rest"] - 1e-12).all()
    assert (student["retention_ci_low"] <= student["retention"]).all()
    assert teacher["retention"].isna().all()


def teacher_and_student(teacher: np.ndarray, student: np.ndarray) -> pd.DataFrame:
    """Per-user NDCG@10 of a teacher and a student over users 0, 1, ..."""
    users = np.arange(len(teacher))
    return pd.DataFrame(
        {
            "user_id": np.tile(users, 2),
            "model": ["teacher"] * len(users) + ["student"] * len(users),
            "ndcg@10": np.concatenate([teacher, student]),
        }
    )


def test_min_users_and_threshold_are_honoured():
    rng = np.random.default_rng(0)
    users = np.arange(100)
    per_user = teacher_and_student(rng.random(100), rng.random(100) * 0.5)
    segments = pd.DataFrame({"tier": ["a"] * 80 + ["b"] * 20}, index=users)
    table = slice_table(
        per_user,
        segments,
        SliceSpec(metrics=("ndcg@10",), min_users=30, replicates=200, permutations=200),
        {REFERENCE: "teacher"},
    )
    assert set(zip(table["segment"], table["value"])) == {(ALL, ALL), ("tier", "a")}
    # The student keeps about half of the teacher's quality: below 0.95, above 0.3, and its
    # own point estimate lies within its CI.
    retention = table.loc[(table["segment"] == ALL) & (table["model"] == "student"), "retention"]
    for threshold, standing in ((0.95, "below"), (0.3, "above"), (retention.item(), "level with")):
        spec = SliceSpec(metrics=("ndcg@10",), retention_threshold=threshold)
        (verdict,) = verdicts(table, ["student"], spec, "teacher")
        assert verdict["standing"] == standing


def test_report_without_a_run_is_a_clear_error(tmp_path, capsys):
    assert main(["report", "--run", str(tmp_path)]) == 2
    assert "run `recdistill train` first" in capsys.readouterr().err


def test_report_names_what_is_wrong_with_the_run_folder(tiny_run, tmp_path, capsys):
    _, run = tiny_run
    assert main(["report", "--run", str(tmp_path / "nope")]) == 2
    assert f"run folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert main(["report", "--run", str(run / "teacher")]) == 2
    assert f"is a stage of the run {run}: pass --run {run}" in capsys.readouterr().err


def test_summary_carries_latency_and_fidelity(tiny_run):
    _, run = tiny_run
    summary = json.loads((run / "summary.json").read_text())
    student = summary["models"]["student"]
    assert student["latency_ms"]["p99"] >= student["latency_ms"]["p50"] > 0
    assert -1 <= student["metrics"]["kendall_tau"] <= 1
    assert 0 <= student["metrics"]["overlap@10"] <= 1
    assert "kendall_tau" not in summary["models"]["teacher"]["metrics"]


def test_an_item_of_two_genres_puts_its_user_in_both_slices():
    rng = np.random.default_rng(0)
    users = np.arange(90)
    per_user = teacher_and_student(rng.random(90), rng.random(90))
    genres = [("Drama",)] * 30 + [("Comedy", "Drama")] * 30 + [("Comedy",)] * 20 + [()] * 10
    segments = pd.DataFrame({"held_out_category": genres}, index=users)
    table = slice_table(
        per_user,
        segments,
        SliceSpec(metrics=("ndcg@10",), min_users=25, replicates=50, permutations=50),
        {REFERENCE: "teacher"},
    )
    sizes = table[table["model"] == "student"].set_index("value")["users"]
    assert sizes.to_dict() == {ALL: 90, "Comedy": 50, "Drama": 60}
    drama = per_user[(per_user["model"] == "student") & (per_user["user_id"] < 60)]
    mean = table[(table["model"] == "student") & (table["value"] == "Drama")]["mean"].item()
    assert mean == pytest.approx(drama["ndcg@10"].mean())


def test_the_report_slices_the_held_out_item_s_categories(report):
    segments = pd.read_parquet(report / "segments.parquet")
    genres = segments[segments["segment"] == "held_out_category"]
    assert len(genres["value"].unique()) >= 2 and (genres["users"] >= 30).all()
    assert "held_out_category" in (report / "index.html").read_text()
    markdown = (report / "report.md").read_text()
    for value in genres["value"].unique():
        assert f"| held_out_category | {value} | student |" in markdown


def test_ml100k_slices_the_held_out_movie_s_genres(ml100k_dir):
    segments = user_segments(ml100k_dir, categories=True)
    rng = np.random.default_rng(0)
    per_user = teacher_and_student(rng.random(len(segments)), rng.random(len(segments)))
    per_user["user_id"] = np.tile(segments.index.to_numpy(), 2)
    spec = SliceSpec(metrics=("ndcg@10",), min_users=30, replicates=20, permutations=20)
    table = slice_table(per_user, segments, spec, {REFERENCE: "teacher"})
    genres = table[(table["segment"] == "held_out_category") & (table["model"] == "student")]
    users = genres.set_index("value")["users"]
    assert {"Drama", "Comedy", "Action", "Thriller", "Romance"} <= set(users.index)

    test = pd.read_parquet(ml100k_dir / "test.parquet")
    items = pd.read_parquet(ml100k_dir / "items.parquet").set_index("item_id")["genres"]
    held_out_genres = test["item_id"].map(items).map(list)
    assert users["Drama"] == sum("Drama" in genres for genres in held_out_genres)


def verdict_lines(report_dir) -> dict[str, str]:
    """The report.md verdict, one line per model it judges."""
    section = (report_dir / "report.md").read_text().split("## Verdict")[1].split("\n## ")[0]
    lines = [line for line in section.splitlines() if line.startswith("- **")]
    return {line[4:].split(" ", 1)[0]: line for line in lines}


def delta_method_p(model, teacher, chosen) -> float:
    """Two-sided p of "the slice's retention equals the other users'", by the delta method."""
    from scipy.stats import norm

    parts = []
    for side in (chosen, ~chosen):
        m, t = model[side], teacher[side]
        ratio = m.mean() / t.mean()
        parts.append((ratio, np.var(m - ratio * t, ddof=1) / (len(m) * t.mean() ** 2)))
    (r1, v1), (r2, v2) = parts
    return 2 * norm.sf(abs(r1 - r2) / np.sqrt(v1 + v2))


def test_the_verdict_names_the_slices_below_the_student_s_own_retention(report, tiny_run):
    # Recomputed from per_user.parquet, with statsmodels' Holm.
    from statsmodels.stats.multitest import multipletests

    _, run = tiny_run
    summary = json.loads((run / "summary.json").read_text())
    wide = pd.read_parquet(run / "per_user.parquet").pivot(
        index="user_id", columns="model", values="ndcg@10"
    )
    student, teacher = wide["student"].to_numpy(), wide["teacher"].to_numpy()
    overall = student.mean() / teacher.mean()
    segments = user_segments(Path(summary["data"]), categories=True).reindex(wide.index)
    slices, p_values, retention = [], [], []
    for column in segments.columns:
        held = segments[column].map(lambda v: set(v) if isinstance(v, tuple) else {v})
        for value in sorted(set().union(*held)):
            chosen = np.array([value in values for values in held])
            if chosen.sum() >= 30 and teacher[chosen].mean() > 0:
                slices.append(f"{column}: {value}")
                p_values.append(delta_method_p(student, teacher, chosen))
                retention.append(student[chosen].mean() / teacher[chosen].mean())
    adjusted = multipletests(p_values, method="holm")[1]
    below = {s for s, p, r in zip(slices, adjusted, retention) if p <= 0.05 and r < overall}
    assert below, "the tiny run's student should lose more somewhere than overall"

    lines = verdict_lines(report)
    named = lines["student"].split("slice(s): ")[1].rstrip(".").split("; ")
    assert {entry.split(" (")[0] for entry in named} == below
    assert next(iter(lines)) == "student"
    assert not set(lines) & {"popularity", "ease", "ease_recency", "teacher"}


def test_a_run_with_nothing_to_judge_reports_so(synthetic_dir, tmp_path):
    config = tmp_path / "one.toml"
    config.write_text(ONE_STAGE)
    run = tmp_path / "run"
    assert (
        main(["train", "--config", str(config), "--data", str(synthetic_dir), "--out", str(run)])
        == 0
    )
    assert main(["report", "--run", str(run)]) == 0
    html = (run / "report" / "index.html").read_text()
    assert "No trained model besides teacher to judge." in html
    assert "retention heatmap" not in html and "p vs None" not in html


def test_segment_values_come_in_their_natural_order():
    values = ["tail", "head", "torso", "heavy", "cold", "medium", "light"]
    assert sorted(values, key=natural_order) == [
        "cold", "light", "medium", "heavy", "head", "torso", "tail"
    ]  # fmt: skip
    ages = ["56+", "25-34", "<18", "18-24", "50-55", "unknown"]
    assert sorted(ages, key=natural_order) == ["<18", "18-24", "25-34", "50-55", "56+", "unknown"]


def test_p_values_read_as_people_quote_them():
    assert format_p(0.0) == "< 0.001" and format_p(3.1e-90) == "< 0.001"
    assert format_p(0.0921) == "0.092" and format_p(float("nan")) == "–"


def test_a_planted_loss_is_flagged_and_a_placebo_or_a_harder_slice_is_not():
    rng = np.random.default_rng(0)
    users = 3000
    teacher = rng.random(users)
    # "hard" users score lower with both models but lose the same share; "planted" lose more.
    hard = np.arange(users) % 3 == 0
    teacher[hard] *= 0.5
    student = 0.9 * teacher + rng.normal(0, 0.02, users)
    planted = np.arange(users) % 5 == 0
    student[planted] -= 0.15 * teacher[planted]
    segments = pd.DataFrame(
        {
            "difficulty": np.where(hard, "hard", "easy"),
            "planted": np.where(planted, "yes", "no"),
            "placebo": rng.choice(["a", "b", "c"], users),
        }
    )
    table = slice_table(
        teacher_and_student(teacher, student),
        segments,
        SliceSpec(metrics=("ndcg@10",), replicates=200, permutations=200),
        {REFERENCE: "teacher"},
    )
    flagged = table[(table["model"] == "student") & table["flagged"]]
    assert set(zip(flagged["segment"], flagged["value"])) == {("planted", "yes")}
    assert table.loc[table["model"] == "teacher", "flagged"].eq(False).all()


def test_the_heatmap_scale_is_robust_to_an_outlier_and_marks_the_cells_beyond_it():
    # One slice of a few users 15 off, the rest within 0.03 (median 0.02): the scale is ±0.10.
    shifts = np.array([[0.01, -0.02], [0.03, 15.1], [np.nan, -0.01]])
    span, clipped = colour_scale(shifts)
    assert span == pytest.approx(0.1)
    assert clipped.tolist() == [[False, False], [False, True], [False, False]]
    # Shifts of one size: the scale reaches the largest, and nothing is beyond it.
    span, clipped = colour_scale(np.array([[0.2, -0.25], [0.3, -0.22]]))
    assert span == pytest.approx(0.3) and not clipped.any()
    assert colour_scale(np.array([[0.001]]))[0] == 0.05


def test_the_models_table_says_its_latency_is_one_run_on_the_training_machine(report):
    markdown = (report / "report.md").read_text()
    assert "| scoring p50 (ms, one run) | p99 (ms) |" in markdown
    assert LATENCY_NOTE in markdown
    assert "not their serving latency" in (report / "index.html").read_text()
