"""A real `recdistill serve` process (uvicorn) on a free port, used over HTTP."""

import json
import os
import socket

import httpx2
import pytest
import uvicorn
from fastapi.testclient import TestClient

from recdistill.cli import main
from recdistill.impressions import read_log
from recdistill.server import SETTINGS_ENV, ServerSettings, running_server
from serving.app import app_from_environment
from serving.quality import REPORTED, served_metrics
from tests.conftest import ONE_STAGE


@pytest.mark.slow
def test_a_real_server_ranks_over_http(tiny_artifacts, tiny_run, synthetic_dir, tmp_path):
    _, run = tiny_run
    log = tmp_path / "i.jsonl"
    with running_server([tiny_artifacts["student"]], impressions=log) as server:
        url = server.url
        # Printed (and flushed) before the server is ready, as a person starting it reads it.
        (output,) = tmp_path.glob("server-*.log")
        assert f"impressions: appending to {log.resolve()}\n" in output.read_text()
        ranked = httpx2.post(f"{url}/rank", json={"user_id": 1, "candidates": [1, 2, 3], "k": 2})
        assert ranked.status_code == 200
        assert [item["item_id"] for item in ranked.json()["items"]] != []
        assert len(ranked.json()["items"]) == 2
        bad = httpx2.post(f"{url}/rank", json={"user_id": 1, "candidates": [1, 1]})
        assert bad.status_code == 422 and "distinct" in bad.text
        assert "recdistill_rank_latency_seconds_bucket" in httpx2.get(f"{url}/metrics").text
        served = served_metrics(url, synthetic_dir)
    offline = json.loads((run / "summary.json").read_text())["models"]["student"]["metrics"]
    assert served == pytest.approx({name: offline[name] for name in REPORTED}, abs=1e-9)


@pytest.mark.slow
def test_a_served_ml100k_model_matches_its_offline_quality(ml100k, tmp_path):
    data, run, artifact = tmp_path / "data", tmp_path / "run", tmp_path / "teacher"
    config = tmp_path / "teacher.toml"
    config.write_text(ONE_STAGE.replace("epochs = 3", "epochs = 1"))
    assert main(["data", "movielens", "--path", str(ml100k), "--out", str(data)]) == 0
    assert main(["train", "--config", str(config), "--data", str(data), "--out", str(run)]) == 0
    assert main(["export", "--run", str(run), "--model", "teacher", "--out", str(artifact)]) == 0
    with running_server([artifact], impressions=tmp_path / "i.jsonl") as server:
        served = served_metrics(server.url, data)
    offline = json.loads((run / "summary.json").read_text())["models"]["teacher"]["metrics"]
    assert served == pytest.approx({name: offline[name] for name in REPORTED}, abs=1e-9)
    assert served["ndcg@10"] > 0.1  # a trained model, not a constant


def test_a_bad_artifact_stops_serve_before_it_starts(tmp_path, capsys):
    assert main(["serve", "--artifact", str(tmp_path)]) == 2
    assert "not an artifact" in capsys.readouterr().err


def test_serve_logs_impressions_under_runs_serve_by_default_and_says_where(
    tiny_artifacts, tmp_path, monkeypatch, capsys
):
    """Without --impressions the log goes to runs/serve/impressions.jsonl under the current
    folder (docs/serving-export-and-the-real-time-ranker.md), never loose in the folder
    itself; its full path is printed at start-up and its folder made. uvicorn is stubbed: the
    app is then built from the settings `serve` hands it, as a worker would build it."""
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.update(app=app))
    monkeypatch.setenv(SETTINGS_ENV, "")  # so that what `serve` sets is undone after the test
    monkeypatch.chdir(tmp_path)
    assert main(["serve", "--artifact", str(tiny_artifacts["student"])]) == 0
    default = tmp_path.resolve() / "runs" / "serve" / "impressions.jsonl"
    assert f"impressions: appending to {default}\n" in capsys.readouterr().out
    assert default.parent.is_dir() and started["app"] == "serving.app:app_from_environment"
    assert ServerSettings.from_json(os.environ[SETTINGS_ENV]).impressions == str(default)
    with TestClient(app_from_environment()) as client:
        ranked = client.post("/rank", json={"user_id": 1, "candidates": [1, 2, 3]})
    assert ranked.status_code == 200
    assert [i["request_id"] for i in read_log(default)] == [ranked.json()["request_id"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_serve_says_when_the_impression_log_cannot_be_made(tiny_artifacts, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    log = blocker / "impressions.jsonl"
    artifact = str(tiny_artifacts["student"])
    assert main(["serve", "--artifact", artifact, "--impressions", str(log)]) == 2
    assert f"impression log {log}: cannot create its folder" in capsys.readouterr().err


def test_serve_on_a_port_in_use_says_so_before_claiming_to_serve(tiny_artifacts, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        argv = ["serve", "--artifact", str(tiny_artifacts["student"]), "--port", str(port)]
        assert main(argv) == 2
    printed = capsys.readouterr()
    assert printed.err == (
        f"recdistill: error: cannot serve on 127.0.0.1:{port}: Address already in use\n"
    )
    assert "serving" not in printed.out
