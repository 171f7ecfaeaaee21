"""A model out as ONNX: the same scores as the server's, and a teacher any run can read back."""

import tomllib

import numpy as np
import onnxruntime
import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file

import recdistill
from recdistill.artifact import load_artifact
from recdistill.cli import main
from recdistill.config import parse_run_config
from recdistill.layout import OnnxLayout, RunLayout
from recdistill.online import OnlineRanker
from recdistill.onnx_export import export_onnx
from recdistill.server import ServerSettings
from recdistill.summary import read_summary
from serving.app import create_app
from tests.conftest import TINY

# A student distilled from the ONNX copy of its teacher equals the one distilled from the
# teacher itself to float rounding: the graph's scores differ from the torchrec model's in
# the last bits, and two epochs of training carry that into the weights no further.
WEIGHT_TOLERANCE = 1e-4
METRIC_TOLERANCE = 1e-4
TEACHER_STAGE = TINY[: TINY.index("[stages.intermediate]")]
STUDENT = """
[stages.student]
model = "small"
lists = { depth = 30, top = 8, uniform = 8 }
losses = [
    { fn = "softmax_ce" },
    { fn = "listnet", source = "teacher", temperature = 2.0 },
    { fn = "listmle", source = "teacher", top_k = 8 },
    { fn = "feature_mse", source = "teacher", weight = 0.1 },
]

[stages.student_scratch]
model = "small"
losses = [{ fn = "softmax_ce" }]
"""


@pytest.fixture(scope="module")
def served_student(tiny_artifacts, tmp_path_factory):
    """The tiny run's student as ONNX, and a server of its artifact."""
    out = tmp_path_factory.mktemp("onnx") / "student"
    export_onnx(OnlineRanker(load_artifact(tiny_artifacts["student"])), out, "student")
    settings = ServerSettings(
        artifacts=(str(tiny_artifacts["student"]),),
        impressions=str(out.parent / "impressions.jsonl"),
    )
    with TestClient(create_app(settings)) as client:
        yield OnnxLayout(out), client, load_artifact(tiny_artifacts["student"]).store


def onnx_inputs(store, user_id, history_ids, candidate_ids, layout):
    """What another serving stack sends the graph: indices from the exported vocabularies."""
    import pyarrow.parquet as pq

    def index(kind):
        ids = pq.read_table(layout.vocabulary / f"{kind}.parquet").column("id").to_pylist()
        return {value: position for position, value in enumerate(ids) if value is not None}

    items, users = index("item_id"), index("user_id")
    user = users.get(user_id, 0)
    length = store.history_length
    history = np.zeros((1, length), dtype=np.int64)
    known = [items[i] for i in history_ids if i in items][:length]
    history[0, : len(known)] = known
    feed = {
        "user": np.array([user]),
        "history": history,
        "history_length": np.array([len(known)]),
        "candidates": np.array([[items.get(i, 0) for i in candidate_ids]]),
    }
    for name in store.user_features:
        values = index(name)
        value = store.feature_vocabularies[name].values[store.user_codes[name][user] - 1]
        feed[f"feature_{name}"] = np.array([values[value] if user else 0])
    return feed


def test_the_onnx_student_scores_as_the_server_ranks(served_student):
    layout, client, store = served_student
    session = onnxruntime.InferenceSession(str(layout.model))
    catalogue = store.items.values
    known_user = int(store.users.values[4])
    snapshot = store.history.values[store.history.offsets[5] : store.history.offsets[6]]
    snapshot_ids = catalogue[snapshot - 1].tolist()
    candidates = [int(i) for i in catalogue[[3, 10, 50, 99]]] + [999_999]  # one unknown item
    recent = [int(catalogue[7]), int(catalogue[20])]
    cases = {
        "known user": (known_user, [], snapshot_ids),
        "known user with recent items": (known_user, recent, recent + snapshot_ids),
        "cold user": (123_456, [], []),
        "cold user with recent items": (123_456, recent, recent),
    }
    for case, (user, recent_items, history) in cases.items():
        body = {"user_id": user, "candidates": candidates, "recent_items": recent_items}
        served = {
            row["item_id"]: row["score"] for row in client.post("/rank", json=body).json()["items"]
        }
        (scores,) = session.run(["scores"], onnx_inputs(store, user, history, candidates, layout))
        assert np.abs(scores[0] - [served[c] for c in candidates]).max() < 1e-5, case


def test_a_trained_teacher_out_as_onnx_teaches_the_same_student(synthetic_dir, tmp_path):
    inside = parse_run_config(tomllib.loads(TEACHER_STAGE + STUDENT))
    recdistill.train(inside, synthetic_dir, tmp_path / "inside")
    assert (
        main(
            [
                "export",
                "--run",
                str(tmp_path / "inside"),
                "--model",
                "teacher",
                "--out",
                str(tmp_path / "teacher_onnx"),
                "--format",
                "onnx",
            ]
        )
        == 0
    )
    table = OnnxLayout(tmp_path / "teacher_onnx").teacher.read_text()
    outside = parse_run_config(
        tomllib.loads(TEACHER_STAGE.split("[stages.teacher]")[0] + table + STUDENT)
    )
    assert outside.teachers["teacher"].kind == "onnx" and outside.roles.reference == "teacher"
    recdistill.train(outside, synthetic_dir, tmp_path / "outside")
    runs = {name: RunLayout(tmp_path / name) for name in ("inside", "outside")}
    summaries = {name: read_summary(layout.summary) for name, layout in runs.items()}
    for metric, value in summaries["inside"].models["teacher"].metrics.items():
        assert summaries["outside"].models["teacher"].metrics[metric] == pytest.approx(
            value, abs=1e-6
        )
    weights = {
        name: load_file(str(layout.stage("student").weights)) for name, layout in runs.items()
    }
    gap = max(
        float((weights["inside"][k] - weights["outside"][k]).abs().max()) for k in weights["inside"]
    )
    inside, outside = (summaries[n].models["student"].metrics for n in ("inside", "outside"))
    print(
        f"largest weight gap {gap:.2e}; ndcg@10 {inside['ndcg@10']:.6f} vs {outside['ndcg@10']:.6f}"
    )
    assert gap < WEIGHT_TOLERANCE
    for metric in ("ndcg@10", "full_ndcg@10"):
        assert outside[metric] == pytest.approx(inside[metric], abs=METRIC_TOLERANCE)
