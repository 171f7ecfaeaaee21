import json
import sys
from pathlib import Path

import pytest

from recdistill import distributed, tracking
from recdistill.cli import main
from recdistill.config import load_sweep_config, parse_run_config
from recdistill.layout import REPORT_HTML, REPORT_MARKDOWN, SEGMENTS, RunLayout
from recdistill.tracking import TrackingSpec, tracked_run, tracking_uri
from tests.conftest import ONE_STAGE, TINY
from tests.test_sweep import TINY_SWEEP

MlflowClient = pytest.importorskip("mlflow").MlflowClient

# TINY's teacher → intermediate → student: what the sweep below needs as its base run.
STAGES = ("teacher", "intermediate", "student")
CONFIG = TINY.split("[stages.student_scratch]")[0]
MISSING = "recdistill: error: experiment tracking needs MLflow: pip install 'recdistill[tracking]'"


@pytest.fixture(autouse=True)
def _file_store(monkeypatch):
    """Let the tests read MLflow's file store, as recdistill lets itself (MLflow 3.18)."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")


def _children(client: MlflowClient, run_id: str) -> dict[str, object]:
    experiment = client.get_run(run_id).info.experiment_id
    children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{run_id}'")
    return {child.info.run_name: child for child in children}


@pytest.fixture(scope="module")
def tracked(synthetic_dir, tmp_path_factory):
    """A tiny run trained with --track into a file store that MLFLOW_TRACKING_URI names:
    (config file, run directory, store URI)."""
    directory = tmp_path_factory.mktemp("tracked")
    config, out, store = directory / "tiny.toml", directory / "run", directory / "store"
    config.write_text(CONFIG)
    command = ["train", "--config", str(config), "--data", str(synthetic_dir), "--out", str(out)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", str(store))
        assert main([*command, "--track"]) == 0
    return config, out, store.as_uri()


def test_a_tracked_run_is_a_parent_run_with_a_child_run_per_stage(tracked):
    _, run, store = tracked
    record = json.loads((run / "tracking.json").read_text())
    assert record["uri"] == store
    client = MlflowClient(store)
    parent = client.get_run(record["run_id"])
    assert (parent.info.run_name, parent.info.status) == ("run", "FINISHED")
    assert parent.data.tags[tracking.DIRECTORY_TAG] == str(run.resolve())
    params = parent.data.params
    assert params["stages.student.lists.depth"] == "50"
    assert params["stages.student.epochs"] == "1"
    assert params["train.learning_rate"] == "0.005"
    assert params["models.big.tower"] == "[32, 8]"
    assert params["tracking.enabled"] == "true"
    summary = json.loads((run / "summary.json").read_text())
    logged = client.download_artifacts(record["run_id"], "summary.json")
    assert json.loads(Path(logged).read_text()) == summary
    assert {a.path for a in client.list_artifacts(record["run_id"])} == {
        "config.toml",
        "summary.json",
    }

    children = _children(client, record["run_id"])
    assert sorted(children) == sorted(STAGES)
    for name, child in children.items():
        model = summary["models"][name]
        epochs = model["training"]["epochs_run"]
        log = [json.loads(line) for line in (run / name / "log.jsonl").read_text().splitlines()]
        history = client.get_metric_history(child.info.run_id, "valid_ndcg_at_10")
        assert [m.step for m in history] == list(range(epochs))
        assert [m.value for m in history] == [r["valid_ndcg@10"] for r in log]
        assert len(client.get_metric_history(child.info.run_id, "train_loss")) == epochs
        assert child.data.metrics["test_ndcg_at_10"] == model["metrics"]["ndcg@10"]
        assert child.data.params["stage.name"] == name
        assert child.data.params["model.embedding_dim"] == ("16" if name == "teacher" else "4")
    assert [summary["models"][name]["training"]["epochs_run"] for name in STAGES] == [2, 2, 1]
    assert children["student"].data.params["stage.lists.top"] == "10"


def test_the_report_adds_its_files_to_the_tracked_run(tracked):
    _, run, store = tracked
    assert main(["report", "--run", str(run)]) == 0
    run_id = json.loads((run / "tracking.json").read_text())["run_id"]
    files = {Path(a.path).name for a in MlflowClient(store).list_artifacts(run_id, "report")}
    assert files == {REPORT_HTML, REPORT_MARKDOWN, SEGMENTS}


def test_a_tracked_sweep_has_a_child_run_per_candidate(tracked, synthetic_dir, tmp_path):
    _, run, _ = tracked
    store = tmp_path / "store"
    config = tmp_path / "sweep.toml"
    sampled = 'search = "random"\nsamples = 2'
    config.write_text(
        TINY_SWEEP.format(base_run=run, search=sampled, epochs=1)
        + f'\n[tracking]\nenabled = true\nuri = "{store}"\nexperiment = "sweeps"\n'
    )
    out = tmp_path / "sweep"
    command = ["sweep", "--config", str(config), "--data", str(synthetic_dir), "--out", str(out)]
    assert main(command) == 0
    summary = json.loads((out / "summary.json").read_text())
    client = MlflowClient(store.as_uri())
    run_id = json.loads((out / "tracking.json").read_text())["run_id"]
    parent = client.get_run(run_id)
    assert client.get_experiment(parent.info.experiment_id).name == "sweeps"
    assert parent.data.params["sweep.samples"] == "2"
    children = _children(client, run_id)
    assert sorted(children) == sorted(summary["candidates"])
    for name, child in children.items():
        result = summary["candidates"][name]
        assert child.data.params["mix"] == result["mix"]
        assert child.data.params["stage.epochs"] == "1"
        metrics = child.data.metrics
        assert metrics["valid_ndcg_at_10"] == result["valid"]["ndcg@10"]
        assert metrics["int8_valid_ndcg_at_10"] == result["int8"]["valid"]["ndcg@10"]
        assert metrics["latency_wall_p99_ms"] == result["latency_ms"]["wall"]["p99"]
    best = summary["models"]["best"]
    chosen = children[best["candidate"]].data.metrics
    assert chosen["test_ndcg_at_10"] == best["metrics"]["ndcg@10"]
    assert chosen["int8_test_ndcg_at_10"] == summary["models"]["best_int8"]["metrics"]["ndcg@10"]
    assert {a.path for a in client.list_artifacts(run_id)} == {
        "report",
        "summary.json",
        "sweep.toml",
    }


def _without_mlflow(monkeypatch) -> None:
    """Make every import of MLflow fail, as when it is not installed."""
    for name in [m for m in sys.modules if m.split(".")[0] == "mlflow"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "mlflow", None)


def test_tracking_off_writes_nothing_and_never_imports_mlflow(synthetic_dir, tmp_path, monkeypatch):
    _without_mlflow(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", str(tmp_path / "store"))
    config = tmp_path / "one.toml"
    config.write_text(ONE_STAGE.replace("epochs = 3", "epochs = 1"))
    out = tmp_path / "run"
    command = ["train", "--config", str(config), "--data", str(synthetic_dir), "--out", str(out)]
    assert main(command) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.toml", "run"]
    assert not (out / "tracking.json").exists()


def test_tracking_without_mlflow_is_a_one_line_error(synthetic_dir, tmp_path, monkeypatch, capsys):
    _without_mlflow(monkeypatch)
    config = tmp_path / "one.toml"
    config.write_text(ONE_STAGE)
    out = tmp_path / "run"
    command = ["train", "--config", str(config), "--data", str(synthetic_dir), "--out", str(out)]
    assert main([*command, "--track"]) == 2
    assert capsys.readouterr().err.splitlines() == [MISSING]
    assert not list(out.glob("*/log.jsonl"))


def test_a_run_that_raises_is_failed_and_a_resume_continues_it(tmp_path):
    spec = TrackingSpec(enabled=True, uri=str(tmp_path / "store"))
    layout = RunLayout(tmp_path / "run")
    config = tmp_path / "config.toml"
    config.write_text(f'[a]\n"ndcg@10" = 1\nlong = "{"x" * 7000}"\n')
    with pytest.raises(RuntimeError), tracked_run(spec, layout, config, resume=False) as tracker:
        tracker.log_child("done", {"b": 2}, {0: {"loss": 1.0}, 1: {"loss": 0.5}})
        # A child whose process died while it was logged.
        tracker.client.create_run(
            tracker.experiment_id, run_name="cut", tags={tracking.PARENT_TAG: tracker.run_id}
        )
        raise RuntimeError("diverged")
    client = MlflowClient(tracking_uri(spec))
    run_id = tracker.run_id
    assert client.get_run(run_id).info.status == "FAILED"
    params = client.get_run(run_id).data.params
    assert params["a.ndcg_at_10"] == "1"
    assert len(params["a.long"]) == 6000 and params["a.long"].endswith("…")

    # The record, not the config, says where the run is; a resumable change of the config
    # (MLflow refuses to change a logged param) reaches the config.toml artifact only.
    elsewhere = TrackingSpec(enabled=True, uri=str(tmp_path / "elsewhere"))
    config.write_text('[a]\n"ndcg@10" = 2\n')
    with tracked_run(elsewhere, layout, config, resume=True) as resumed:
        assert resumed.run_id == run_id and list(resumed.children) == ["done"]
        resumed.log_child("done", {"b": 2}, {0: {"loss": 9.0}})
    assert not (tmp_path / "elsewhere").exists()
    assert client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.params["a.ndcg_at_10"] == "1"
    assert Path(client.download_artifacts(run_id, "config.toml")).read_text() == config.read_text()
    assert sorted(_children(client, run_id)) == ["done"]
    loss = client.get_metric_history(resumed.children["done"], "loss")
    assert [(m.step, m.value) for m in loss] == [(0, 1.0), (1, 0.5)]

    with tracked_run(spec, layout, config, resume=False) as fresh:
        assert fresh.run_id != run_id and not fresh.children
    assert json.loads(layout.tracking.read_text())["run_id"] == fresh.run_id


def test_only_rank_0_logs(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(rank=1, size=2))
    spec = TrackingSpec(enabled=True, uri=str(tmp_path / "store"))
    config = tmp_path / "config.toml"
    config.write_text("")
    with tracked_run(spec, RunLayout(tmp_path / "run"), config, resume=False) as tracker:
        assert tracker is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


def test_the_store_is_the_configs_else_the_environments_else_mlruns_here(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(TrackingSpec()) == (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")
    assert tracking_uri(TrackingSpec()) == "http://tracking:5000"
    assert tracking_uri(TrackingSpec(uri="runs/store")) == (tmp_path / "runs/store").as_uri()


def test_the_tracking_table_is_parsed_checked_and_written_back(tmp_path):
    table = {"enabled": True, "uri": "sqlite:///mlflow.db", "experiment": "ml100k"}
    config = parse_run_config({"tracking": table})
    assert config.tracking == TrackingSpec(**table)
    assert "[tracking]\nenabled = true\n" in config.to_toml()
    assert parse_run_config({}).tracking == TrackingSpec(enabled=False, uri="")
    with pytest.raises(ValueError, match=r"\[tracking\]: unknown key\(s\) \['on'\]"):
        parse_run_config({"tracking": {"on": True}})
    with pytest.raises(ValueError, match=r"\[tracking\] enabled = 'false': expected true or false"):
        parse_run_config({"tracking": {"enabled": "false"}})
    sweep = tmp_path / "sweep.toml"
    sweep.write_text(
        TINY_SWEEP.format(base_run="runs/x", search="", epochs=1)
        + '[tracking]\nenabled = true\nexperiment = "sweeps"\n'
    )
    assert load_sweep_config(sweep).tracking == TrackingSpec(enabled=True, experiment="sweeps")


def test_a_tracked_run_says_where_it_goes(tmp_path, capsys):
    config = tmp_path / "one.toml"
    config.write_text(ONE_STAGE)
    store = tmp_path / "store"
    layout = RunLayout(tmp_path / "run")
    with tracked_run(TrackingSpec(enabled=True, uri=str(store)), layout, config, resume=False):
        pass
    run_id = json.loads(layout.tracking.read_text())["run_id"]
    where = (
        f"MLflow run {run_id} in {store.as_uri()} "
        f"(to browse it: mlflow ui --backend-store-uri {store.as_uri()})"
    )
    assert capsys.readouterr().err == f"tracking: {where}\n"
    assert tracking.location(layout) == where
    assert tracking.location(RunLayout(tmp_path / "untracked")) is None
