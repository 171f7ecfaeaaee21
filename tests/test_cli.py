import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from recdistill.cli import main
from recdistill.data.tables import read_meta


def test_help_lists_the_data_commands():
    result = subprocess.run(
        [sys.executable, "-m", "recdistill.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "recdistill data synthetic" in result.stdout
    assert "recdistill data movielens" in result.stdout


def test_synthetic_end_to_end(tmp_path, capsys):
    out = tmp_path / "world"
    sizes = ["--users", "200", "--items", "300", "--seed", "1"]
    assert main(["data", "synthetic", "--out", str(out), *sizes]) == 0
    printed = capsys.readouterr().out
    assert "users 200" in printed and "activity_tier" in printed
    meta = read_meta(out)
    assert meta["synthetic"]["seed"] == 1 and meta["split_spec"]["seed"] == 1
    assert pq.read_metadata(out / "candidates_test.parquet").num_rows == meta["users_evaluated"]
    assert (out / "truth.safetensors").exists()


def test_config_typos_are_reported(tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text("[data.synthetic]\nuserz = 5\n")
    assert main(["data", "synthetic", "--out", str(tmp_path / "x"), "--config", str(config)]) == 2
    assert "unknown key(s) ['userz']" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_movielens_100k(ml100k, tmp_path, capsys):
    out = tmp_path / "ml100k"
    assert main(["data", "movielens", "--path", str(ml100k), "--out", str(out)]) == 0
    meta = read_meta(out)
    assert (meta["n_interactions"], meta["n_users"], meta["n_items"]) == (100_000, 943, 1682)
    assert meta["splits"]["test"] == meta["splits"]["valid"] == 943
    assert meta["user_segments"] == ["activity_tier", "gender", "age_bucket", "occupation"]
    for name in ("train", "valid", "test", "candidates_valid", "candidates_test"):
        assert (out / f"{name}.parquet").exists()
    assert "users 943" in capsys.readouterr().out


@pytest.mark.parametrize("previous", [False, True])
def test_malformed_movielens_names_file_and_line_and_writes_nothing(
    ml100k, tmp_path, capsys, previous
):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("u.user", "u.item", "u.genre"):
        (raw / name).write_bytes((ml100k / name).read_bytes())
    lines = (ml100k / "u.data").read_text().splitlines()[:50]
    lines[41] = "196\t242\tthree\t881250949"
    (raw / "u.data").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    if previous:
        out.mkdir()
        (out / "meta.json").write_text("{}")
    assert main(["data", "movielens", "--path", str(raw), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "u.data line 42: rating 'three' is not a number" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out", "raw"] if previous else ["raw"])
    if previous:
        assert [p.name for p in out.iterdir()] == ["meta.json"]


def test_version_names_the_installed_package(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip().startswith("recdistill ")


def test_train_shows_where_the_run_stands_and_closes_with_its_time_and_next_commands(tiny_run):
    directory, out = tiny_run[1].parent, tiny_run[1]
    errors = (directory / "stderr.txt").read_text()
    progress = [line.strip() for line in errors.splitlines() if "epochs done" in line]
    stages = [("teacher", 2), ("intermediate", 2), ("student", 1)]
    stages += [("student_scratch", 2), ("student_direct", 2)]
    expected = [
        (number, name, done, epochs)
        for number, (name, epochs) in enumerate(stages, start=1)
        for done in range(1, epochs + 1)
    ]
    assert len(progress) == len(expected)
    pattern = r"stage {} of 5, {}: {} of {} epochs done, (under 1|\d+) s so far, at most (under 1|\d+) s left"
    for line, (number, name, done, epochs) in zip(progress, expected):
        assert re.fullmatch(pattern.format(number, name, done, epochs), line), line
        assert line.endswith("at most 0 s left") == (done == epochs)
    printed = (directory / "stdout.txt").read_text()
    closing = printed.split(f"wrote {out}/summary.json; the run took ")[1].splitlines()
    assert re.fullmatch(r"(\d+ min )?\d+ s|under 1 s", closing[0])
    assert closing[1:] == [
        "next:",
        f"  recdistill report --run {out}",
        f"  recdistill export --run {out} --model student --out artifacts/student",
    ]
