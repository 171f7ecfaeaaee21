"""A real `recdistill serve` process (uvicorn) on a free port, used over HTTP."""

import json

import httpx2
import pytest

from recdistill.cli import main
from recdistill.server import running_server
from serving.quality import REPORTED, served_metrics
from tests.conftest import ONE_STAGE


@pytest.mark.slow
def test_a_real_server_ranks_over_http(tiny_artifacts, tiny_run, synthetic_dir, tmp_path):
    _, run = tiny_run
    with running_server([tiny_artifacts["student"]], impressions=tmp_path / "i.jsonl") as server:
        url = server.url
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
