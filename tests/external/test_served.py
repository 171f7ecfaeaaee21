"""A teacher from outside the run is served as an arm: the A/B compares the team's own
teacher with the student distilled from it."""

import json
import tomllib

import pytest
from fastapi.testclient import TestClient

import recdistill
from recdistill.cli import main
from recdistill.config import parse_run_config
from recdistill.layout import OnnxLayout
from recdistill.manifest import EXTERNAL, read_manifest
from recdistill.server import ServerSettings
from serving.app import create_app
from tests.abtest.test_abtest_cli import write_config
from tests.external.conftest import SCORES_ONLY


@pytest.fixture(scope="module")
def outside_run(tiny_run, synthetic_dir, tmp_path_factory):
    """A run distilled from the tiny run's teacher out as ONNX, and its artifacts."""
    _, inside = tiny_run
    directory = tmp_path_factory.mktemp("served")
    onnx = directory / "teacher_onnx"
    recdistill.export(inside, "teacher", onnx, format="onnx")
    # It keeps the name "teacher": the A/B's arms serve models by name.
    config = SCORES_ONLY.replace('"outside"', '"teacher"') + OnnxLayout(onnx).teacher.read_text()
    recdistill.train(parse_run_config(tomllib.loads(config)), synthetic_dir, directory / "run")
    artifacts = {}
    for name in ("teacher", "student", "popularity"):
        artifacts[name] = recdistill.export(directory / "run", name, directory / name)
    return artifacts


def test_a_teacher_from_outside_exports_as_an_arm_and_ranks_as_its_original(
    outside_run, tiny_artifacts, tmp_path
):
    manifest = read_manifest(outside_run["teacher"])
    assert manifest.kind == EXTERNAL and manifest.role == "reference" and manifest.params > 0

    def settings(artifact):
        return ServerSettings(
            artifacts=(str(artifact),), impressions=str(tmp_path / "impressions.jsonl")
        )

    with (
        TestClient(create_app(settings(outside_run["teacher"]))) as outside,
        TestClient(create_app(settings(tiny_artifacts["teacher"]))) as inside,
    ):
        candidates = list(range(1, 40))
        for body in (
            {"user_id": 5, "candidates": candidates},
            {"user_id": 5, "candidates": candidates, "recent_items": [8, 3]},
            {"user_id": 987_654, "candidates": candidates},
            {"user_id": 987_654, "candidates": candidates, "recent_items": [8, 3]},
        ):
            ours, theirs = (client.post("/rank", json=body).json() for client in (outside, inside))
            served = {row["item_id"]: row["score"] for row in ours["items"]}
            original = {row["item_id"]: row["score"] for row in theirs["items"]}
            assert ours["model"] == "teacher" and ours["version"] != theirs["version"]
            assert max(abs(served[i] - original[i]) for i in candidates) < 1e-5, body
        unknown = outside.post("/rank", json={"user_id": 5, "candidates": [1, 2, 999_999]}).json()
        scores = {row["item_id"]: row["score"] for row in unknown["items"]}
        assert scores[999_999] == pytest.approx((scores[1] + scores[2]) / 2, rel=1e-6)
        assert outside.post("/rank", json={"user_id": 5, "candidates": []}).status_code == 422


def test_the_a_b_test_compares_the_teacher_from_outside_with_its_student(
    outside_run, synthetic_dir, tmp_path, capsys
):
    config = write_config(tmp_path, outside_run, synthetic_dir)
    out = tmp_path / "ab"
    assert main(["abtest", "--config", str(config), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "student vs teacher" in capsys.readouterr().out
    assert "non-inferiority" in summary["verdict"]
