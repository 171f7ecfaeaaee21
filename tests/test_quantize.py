import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from recdistill.artifact import export_artifact, load_artifact
from recdistill.data.feature_store import UNKNOWN, FeatureStore
from recdistill.errors import ArtifactError
from recdistill.evaluate import evaluate, score_lists
from recdistill.layout import MANIFEST, WEIGHTS, RunLayout
from recdistill.models import TwoTower, with_recent
from recdistill.online import OnlineRanker
from recdistill.quantize import (
    QuantizationSpec,
    load_plain_state,
    plain_state,
    quantize,
    set_unknown_row_to_mean,
)
from recdistill.summary import read_summary
from tests.conftest import write_sweep_summary
from tests.test_artifact import _refresh_hashes
from tests.test_online import rank_as_the_mean_user

SPECS = {
    "embeddings": QuantizationSpec(embeddings=True, linear=False),
    "linear": QuantizationSpec(embeddings=False, linear=True),
    "both": QuantizationSpec(),
}


@pytest.fixture(scope="module")
def student(tiny_artifacts) -> TwoTower:
    return load_artifact(tiny_artifacts["student"]).model


@pytest.fixture(scope="module")
def store(synthetic_dir) -> FeatureStore:
    return FeatureStore(synthetic_dir, history_length=10)


def _fresh(model: TwoTower, spec: QuantizationSpec) -> TwoTower:
    return quantize(TwoTower(model.spec, model.space), spec)


@pytest.mark.parametrize("name", SPECS)
def test_int8_scores_stay_close_to_the_float_scores(student, store, name):
    int8 = quantize(student, SPECS[name])
    exact = score_lists(student, store, "valid").scores
    approximate = score_lists(int8, store, "valid").scores
    assert np.abs(approximate - exact).max() < 0.05 * np.abs(exact).max()
    ndcg = evaluate(student, store, "valid", full_ranking=False)["ndcg@10"].mean()
    int8_ndcg = evaluate(int8, store, "valid", full_ranking=False)["ndcg@10"].mean()
    assert int8_ndcg == pytest.approx(ndcg, rel=0.03)


def test_int8_embeddings_feed_the_tower_its_features_in_its_order(student, store):
    # torchrec's int8 collection concatenates sum-pooled tables before mean-pooled ones; the
    # user tower mixes both, so unless it reads the features by key this would be far off.
    int8 = quantize(student, SPECS["embeddings"])
    users = np.arange(1, 50)
    history, lengths = store.history.gather(users, limit=store.history_length)
    features = store.user_kjt(users, history, lengths)
    with torch.no_grad():
        exact, approximate = student.user_tower(features), int8.user_tower(features)
    assert (approximate - exact).abs().max() < 0.02 * exact.abs().max()


def test_quantizing_leaves_the_float_model_untouched(student):
    before = {k: v.clone() for k, v in student.state_dict().items()}
    quantize(student, SPECS["both"])
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


@pytest.mark.parametrize("name", SPECS)
def test_the_plain_state_round_trips_exactly_through_safetensors(student, store, name, tmp_path):
    int8 = quantize(student, SPECS[name])
    save_file(plain_state(int8), tmp_path / "int8.safetensors")
    loaded = _fresh(student, SPECS[name])
    load_plain_state(loaded, load_file(tmp_path / "int8.safetensors"))
    np.testing.assert_array_equal(
        score_lists(loaded.eval(), store, "valid").scores,
        score_lists(int8, store, "valid").scores,
    )


def test_the_plain_state_holds_int8_codes_and_is_smaller(student, tmp_path):
    state = plain_state(quantize(student, SPECS["both"]))
    tables = [k for k in state if ".embedding_bags." in k and k.endswith(".weight")]
    assert tables and all(state[k].dtype == torch.uint8 for k in tables)
    codes = [k for k in state if k.endswith(".weight_int8")]
    assert len(codes) == len(student.user_tower.linear_layers()) * 2
    assert all(state[k].dtype == torch.int8 for k in codes)
    save_file(state, tmp_path / "int8.safetensors")
    save_file(student.state_dict(), tmp_path / "float.safetensors")
    int8_bytes = (tmp_path / "int8.safetensors").stat().st_size
    assert int8_bytes < 0.75 * (tmp_path / "float.safetensors").stat().st_size


def test_a_state_of_another_model_is_refused(student):
    state = plain_state(quantize(student, SPECS["both"]))
    del state["item_bias.weight"]
    with pytest.raises(ValueError, match="missing \\['item_bias.weight'\\]"):
        load_plain_state(_fresh(student, SPECS["both"]), state)


def test_the_unknown_row_of_an_int8_table_becomes_the_mean_row(student, store):
    int8 = quantize(student, SPECS["embeddings"])
    table = int8.user_tower.embeddings.embedding_bags["table_user_id"]

    def rows():
        return table.weight.float() * table.weight_qscale.float() + table.weight_qbias.float()

    with torch.no_grad():
        expected = rows()[1:].mean(0)
        set_unknown_row_to_mean(table)
        assert (rows()[UNKNOWN] - expected).abs().max() <= float(table.weight_qscale[UNKNOWN])
        # The int8 kernel reads the rewritten row: the unknown user ID embeds to it.
        unknown = store.user_kjt(np.array([UNKNOWN]), np.empty(0, dtype=np.int64), np.array([0]))
        features = with_recent(unknown, int8.user_tower.recent_length)
        embedded = int8.user_tower.embeddings(features).to_dict()["user_id"][0]
    torch.testing.assert_close(embedded, rows()[UNKNOWN], rtol=0, atol=1e-3)


@pytest.fixture(scope="module", params=["embeddings", "both"])
def int8_run(request, tiny_run, student, tmp_path_factory):
    """A copy of the tiny run with an int8 copy of its student, as `recdistill sweep` writes."""
    _, run = tiny_run
    spec = SPECS[request.param]
    copy = tmp_path_factory.mktemp("int8_run")
    shutil.copyfile(run / "config.toml", copy / "config.toml")
    summary = read_summary(RunLayout(run).summary)
    entry = summary.models["student"]
    write_sweep_summary(copy, summary.data, {"student_int8": (entry.preset, entry.params, spec)})
    (copy / "student_int8").mkdir(exist_ok=True)
    save_file(plain_state(quantize(student, spec)), copy / "student_int8" / WEIGHTS)
    return copy, spec


@pytest.fixture(scope="module")
def int8_artifact(int8_run, tmp_path_factory):
    run, spec = int8_run
    out = tmp_path_factory.mktemp("int8_artifact") / "student_int8"
    export_artifact(run, "student_int8", out)
    return out, spec


def test_an_int8_artifact_records_its_quantization_and_is_smaller(int8_artifact, tiny_artifacts):
    int8_artifact, spec = int8_artifact
    manifest = json.loads((int8_artifact / MANIFEST).read_text())
    assert manifest["quantization"] == dataclasses.asdict(spec)
    assert json.loads((int8_artifact / "spec.json").read_text())["quantization"] == (
        dataclasses.asdict(spec)
    )
    artifact = load_artifact(int8_artifact)
    assert artifact.quantization == spec
    assert artifact.describe()["quantization"] == spec.describe()
    assert load_artifact(tiny_artifacts["student"]).describe()["quantization"] is None
    float_bytes = (tiny_artifacts["student"] / WEIGHTS).stat().st_size
    assert (int8_artifact / WEIGHTS).stat().st_size < float_bytes


@pytest.mark.parametrize("precompute", [False, True])
def test_an_int8_artifact_serves_the_scores_of_the_int8_model(
    int8_artifact, student, store, precompute
):
    int8_artifact, spec = int8_artifact
    ranker = OnlineRanker(load_artifact(int8_artifact), precompute_items=precompute)
    offline = score_lists(quantize(student, spec), store, "test")  # served histories: test's
    # Dynamic int8 layers quantize their inputs with the range of the batch at hand, so with
    # them a score moves a little with the other items scored alongside it.
    tolerance = 0.02 * np.abs(offline.scores).max() if spec.linear else 1e-5
    for row in range(0, len(offline.users), 41):
        user = int(store.users.values[offline.users[row] - 1])
        candidates = store.items.values[offline.items[row] - 1]
        ranking = ranker.rank(user, candidates)
        served = dict(zip(ranking.items.tolist(), ranking.scores.tolist()))
        np.testing.assert_allclose(
            [served[i] for i in candidates.tolist()], offline.scores[row], rtol=0, atol=tolerance
        )


def test_an_int8_artifact_keeps_the_cold_start_fallbacks(int8_artifact):
    int8_artifact, _ = int8_artifact
    # Precomputed item vectors: the same vectors the mean user is compared with below.
    ranker = OnlineRanker(load_artifact(int8_artifact), precompute_items=True)
    items = ranker.store.items.values[:20]
    cold = rank_as_the_mean_user(ranker, items)
    session = ranker.rank(-7, items, recent_items=items[:3])
    assert session.cold_start and not np.allclose(session.scores, cold.scores)
    with_unknown = ranker.rank(int(ranker.store.users.values[0]), np.append(items[:5], -100))
    assert with_unknown.unknown.tolist() == [-100]


def test_float_weights_in_an_int8_artifact_are_refused(int8_artifact, tiny_run, tmp_path):
    int8_artifact, _ = int8_artifact
    _, run = tiny_run
    copy = tmp_path / "student_int8"
    shutil.copytree(int8_artifact, copy)
    save_file(load_file(run / "student" / WEIGHTS), copy / WEIGHTS)
    _refresh_hashes(copy)
    with pytest.raises(ArtifactError, match="weights do not fit the spec"):
        load_artifact(copy)
