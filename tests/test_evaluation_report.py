import json

import numpy as np
import pandas as pd
import pytest

from recdistill.cli import main
from recdistill.roles import REFERENCE
from recdistill.segments import ALL, SliceSpec, slice_table, user_segments


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
    assert (student["flagged"] == (student["retention"] < 0.95)).all()
    assert (student["p_t_vs_reference_holm"] >= student["p_t_vs_reference"] - 1e-12).all()
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
    assert table.loc[table["model"] == "student", "flagged"].all()


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
    assert "Across the held-out item's" in (report / "report.md").read_text()


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
