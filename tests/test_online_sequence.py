"""Export and serving of a sequence-encoder model: artifact, online ranker, int8, server.

A run directory is written by hand (config, summary, weights, as ``recdistill sweep`` lays
out its chosen models) around a seeded, untrained sequence model: serving must reproduce the model it
was given, whatever its quality.
"""

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from recdistill.artifact import export_artifact, load_artifact
from recdistill.data.feature_store import UNKNOWN, FeatureStore
from recdistill.errors import ArtifactError
from recdistill.evaluate import score_lists
from recdistill.layout import MANIFEST, SPEC, WEIGHTS
from recdistill.models import FeatureSpace, TwoTower, TwoTowerSpec
from recdistill.online import OnlineRanker
from recdistill.quantize import QuantizationSpec, plain_state, quantize
from recdistill.server import ServerSettings
from serving.app import create_app
from tests.conftest import write_sweep_summary
from tests.test_artifact import _refresh_hashes

HISTORY_LENGTH = 10
MAX_LENGTH = 5
CONFIG = f"""
[models.sequence]
embedding_dim = 8
tower = [8]
feature_dim = 2
user_encoder = "sequence"
max_length = {MAX_LENGTH}
layers = 1
heads = 2
readout = "{{readout}}"

[train]
history_length = {HISTORY_LENGTH}

[stages.teacher]
model = "sequence"
losses = [{{{{ fn = "softmax_ce" }}}}]
"""
INT8 = QuantizationSpec()


@pytest.fixture(scope="module")
def store(synthetic_dir) -> FeatureStore:
    return FeatureStore(synthetic_dir, history_length=HISTORY_LENGTH)


@pytest.fixture(scope="module", params=["last", "attention"])
def trained(request, store) -> TwoTower:
    """A seeded sequence model, as a sequence teacher's stage would leave it (eval mode)."""
    torch.manual_seed(0)
    spec = TwoTowerSpec(
        embedding_dim=8, tower=(8,), feature_dim=2, user_encoder="sequence",
        max_length=MAX_LENGTH, layers=1, heads=2, readout=request.param,
    )  # fmt: skip
    model = TwoTower(spec, FeatureSpace.of(store))
    with torch.no_grad():
        torch.nn.init.normal_(model.item_bias.weight, std=0.1)
        if spec.readout == "attention":
            torch.nn.init.normal_(model.user_tower.sequence.query)
    return model.eval()


@pytest.fixture(scope="module")
def run(trained, synthetic_dir, tmp_path_factory):
    """A run directory holding ``trained`` as its teacher and an int8 copy of it."""
    directory = tmp_path_factory.mktemp("sequence_run")
    (directory / "config.toml").write_text(CONFIG.format(readout=trained.spec.readout))
    params = trained.parameter_count()
    models = {"teacher": ("sequence", params, None), "teacher_int8": ("sequence", params, INT8)}
    write_sweep_summary(directory, synthetic_dir, models)
    (directory / "teacher").mkdir(exist_ok=True)
    save_file(trained.state_dict(), directory / "teacher" / WEIGHTS)
    (directory / "teacher_int8").mkdir(exist_ok=True)
    save_file(plain_state(quantize(trained, INT8)), directory / "teacher_int8" / WEIGHTS)
    return directory


@pytest.fixture(scope="module")
def artifact_dir(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("sequence_artifact") / "teacher"
    export_artifact(run, "teacher", out)
    return out


@pytest.fixture(scope="module")
def rankers(artifact_dir):
    return {
        mode: OnlineRanker(load_artifact(artifact_dir), precompute_items=mode == "precomputed")
        for mode in ("online", "precomputed")
    }


@pytest.fixture(scope="module")
def offline(trained, store):
    return score_lists(trained, store, "test")


def _served(ranking, candidates):
    served = dict(zip(ranking.items.tolist(), ranking.scores.tolist()))
    return np.array([served[item] for item in candidates.tolist()])


def _scores(model, store, users, history, items):
    """Independent scores of item indices ``items`` for one user row with ``history``."""
    features = store.user_kjt(np.asarray(users), history, np.array([len(history)]))
    with torch.no_grad():
        user = model.user_tower(features)[0]
        vectors = model.item_tower(store.item_kjt(items))
        bias = model.item_bias.weight[torch.as_tensor(items), 0]
        return (vectors @ user + bias).numpy()


def _own_history(store, user):
    """The user's history as served: train items and the validation item, newest first."""
    history = store.known_at("test").history
    return history.values[history.offsets[user] : history.offsets[user + 1]]


def test_spec_json_carries_the_sequence_encoder(artifact_dir, trained):
    spec = json.loads((artifact_dir / SPEC).read_text())["model"]
    assert spec["user_encoder"] == "sequence"
    assert (spec["max_length"], spec["layers"], spec["heads"]) == (MAX_LENGTH, 1, 2)
    assert spec["readout"] == trained.spec.readout
    artifact = load_artifact(artifact_dir)
    assert artifact.model.spec == trained.spec
    assert artifact.model.user_tower.sequence is not None
    assert artifact.describe()["user_encoder"] == "sequence"
    weights = load_file(artifact_dir / WEIGHTS)
    assert "user_tower.sequence.embeddings.embeddings.table_history_sequence.weight" in weights
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(artifact.model.state_dict()[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["online", "precomputed"])
def test_served_scores_equal_the_offline_scores(rankers, offline, store, mode):
    ranker = rankers[mode]
    for row in range(0, len(offline.users), 23):
        user = int(store.users.values[offline.users[row] - 1])
        candidates = store.items.values[offline.items[row] - 1]
        ranking = ranker.rank(user, candidates)
        assert not ranking.cold_start and len(ranking.unknown) == 0
        np.testing.assert_allclose(
            _served(ranking, candidates), offline.scores[row], rtol=1e-5, atol=1e-5
        )


def test_batched_list_scores_equal_the_offline_scores(rankers, offline, store):
    users = store.users.values[offline.users - 1]
    candidates = store.items.values[offline.items - 1]
    served = rankers["online"].score_lists(users, candidates)
    np.testing.assert_allclose(served, offline.scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["online", "precomputed"])
def test_recent_items_enter_the_front_of_the_sequence(rankers, trained, store, mode):
    ranker = rankers[mode]
    items = store.items.values[:30]
    rows = store.items.index(items)
    user = 5
    recent = store.items.values[-2:]  # most recent first
    plain = ranker.rank(int(store.users.values[user - 1]), items)
    ranking = ranker.rank(int(store.users.values[user - 1]), items, recent_items=recent)
    assert not np.allclose(_served(ranking, items), _served(plain, items))
    history = np.concatenate([store.items.index(recent), _own_history(store, user)])
    expected = _scores(trained, store, [user], history[:HISTORY_LENGTH], rows)
    np.testing.assert_allclose(_served(ranking, items), expected, rtol=1e-5, atol=1e-5)
    # Order matters to a sequence encoder: the most recent item is position 0.
    swapped = ranker.rank(int(store.users.values[user - 1]), items, recent_items=recent[::-1])
    assert not np.allclose(_served(swapped, items), _served(ranking, items))


def test_a_full_window_of_recent_items_hides_the_train_history(rankers, trained, store):
    ranker = rankers["online"]
    items = store.items.values[:30]
    rows = store.items.index(items)
    recent = store.items.values[40 : 40 + MAX_LENGTH]
    user = 7
    assert len(_own_history(store, user)) > 0
    ranking = ranker.rank(int(store.users.values[user - 1]), items, recent_items=recent)
    expected = _scores(trained, store, [user], store.items.index(recent), rows)
    np.testing.assert_allclose(_served(ranking, items), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["online", "precomputed"])
def test_a_cold_user_with_recent_items_is_ranked_from_them(rankers, trained, store, mode):
    ranker = rankers[mode]
    items = store.items.values[:30]
    rows = store.items.index(items)
    recent = store.items.values[[12, 3, 40]]
    ranking = ranker.rank(-7, items, recent_items=np.append(recent, -1))  # -1: unknown, dropped
    assert ranking.cold_start
    # The model with its unknown user-ID and demographic rows set to the mean known row.
    fallback = copy.deepcopy(trained)
    with torch.no_grad():
        for name in ("user_id", *store.user_features):
            table = fallback.user_tower.embeddings.embedding_bags[f"table_{name}"]
            table.weight[UNKNOWN] = table.weight[1:].mean(0)
    expected = _scores(fallback, store, [UNKNOWN], store.items.index(recent), rows)
    np.testing.assert_allclose(_served(ranking, items), expected, rtol=1e-5, atol=1e-5)
    cold = ranker.rank(-7, items)
    assert cold.cold_start and not np.allclose(_served(cold, items), expected)


@pytest.mark.parametrize("recent", [[], [-1, -2]], ids=["empty", "all-unknown"])
def test_no_history_gives_finite_scores(rankers, store, recent):
    ranker = rankers["online"]
    items = store.items.values[:30]
    known = int(store.users.values[0])
    for user in (known, -7):
        ranking = ranker.rank(user, items, recent_items=np.asarray(recent))
        assert np.isfinite(ranking.scores).all()
    # Unknown recent items change nothing; a cold user falls back to the mean user.
    np.testing.assert_array_equal(
        ranker.rank(known, items, recent_items=np.asarray(recent)).scores,
        ranker.rank(known, items).scores,
    )
    cold = ranker.rank(-7, items, recent_items=np.asarray(recent))
    expected = ranker.item_vectors[store.items.index(items)] @ ranker.mean_user
    expected += ranker.item_bias[store.items.index(items)]
    np.testing.assert_allclose(_served(cold, items), expected, rtol=1e-5, atol=1e-5)
    # A known user's empty history (no train items, none recent) reads no NaN either.
    empty = store.user_kjt(np.array([1]), np.empty(0, dtype=np.int64), np.array([0]))
    with torch.no_grad():
        assert torch.isfinite(ranker.artifact.model.user_tower(empty)).all()


def test_the_artifact_round_trips(run, artifact_dir, rankers, store, tmp_path):
    again = export_artifact(run, "teacher", tmp_path / "again")
    manifest = json.loads((artifact_dir / MANIFEST).read_text())
    assert again.version == manifest["version"]
    reloaded = OnlineRanker(load_artifact(tmp_path / "again"))
    items = store.items.values[:50]
    for user, recent in ((int(store.users.values[3]), []), (-7, store.items.values[:3])):
        np.testing.assert_array_equal(
            reloaded.rank(user, items, recent_items=np.asarray(recent)).scores,
            rankers["online"].rank(user, items, recent_items=np.asarray(recent)).scores,
        )


@pytest.fixture
def artifact_copy(artifact_dir, tmp_path):
    directory = tmp_path / "teacher"
    shutil.copytree(artifact_dir, directory)
    return directory


def _edit_spec(directory, **changes):
    spec = json.loads((directory / SPEC).read_text())
    spec["model"].update(changes)
    (directory / SPEC).write_text(json.dumps(spec))
    _refresh_hashes(directory)


def test_weights_for_another_window_are_refused(artifact_copy):
    _edit_spec(artifact_copy, max_length=MAX_LENGTH + 1)
    with pytest.raises(ArtifactError, match=r"sequence.position.weight has shape \(5, 8\)"):
        load_artifact(artifact_copy)


def test_weights_of_a_bag_model_are_refused(artifact_copy):
    _edit_spec(artifact_copy, user_encoder="bag")
    with pytest.raises(ArtifactError, match="weights do not fit the spec"):
        load_artifact(artifact_copy)


def test_an_invalid_sequence_spec_is_an_artifact_error(artifact_copy):
    _edit_spec(artifact_copy, heads=3)
    with pytest.raises(ArtifactError, match=r"heads \(3\) must divide embedding_dim \(8\)"):
        load_artifact(artifact_copy)


@pytest.fixture(scope="module")
def int8_artifact(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("sequence_int8") / "teacher_int8"
    export_artifact(run, "teacher_int8", out)
    return out


@pytest.mark.parametrize("precompute", [False, True])
def test_an_int8_sequence_model_keeps_a_float_encoder_and_serves_its_scores(
    int8_artifact, trained, store, precompute
):
    artifact = load_artifact(int8_artifact)
    assert artifact.quantization == INT8
    weights = load_file(int8_artifact / WEIGHTS)
    sequence = {k: v for k, v in weights.items() if k.startswith("user_tower.sequence.")}
    assert sequence and all(v.dtype == torch.float32 for v in sequence.values())
    for key, value in sequence.items():
        torch.testing.assert_close(value, trained.state_dict()[key], rtol=0, atol=0)
    assert weights["user_tower.embeddings.embedding_bags.table_user_id.weight"].dtype == (
        torch.uint8
    )

    ranker = OnlineRanker(artifact, precompute_items=precompute)
    int8 = quantize(trained, INT8)
    offline = score_lists(int8, store, "test")
    # Dynamic int8 layers quantize their inputs with the range of the batch at hand.
    tolerance = 0.02 * np.abs(offline.scores).max()
    for row in range(0, len(offline.users), 41):
        user = int(store.users.values[offline.users[row] - 1])
        candidates = store.items.values[offline.items[row] - 1]
        served = _served(ranker.rank(user, candidates), candidates)
        np.testing.assert_allclose(served, offline.scores[row], rtol=0, atol=tolerance)
    items = store.items.values[:30]
    session = ranker.rank(-7, items, recent_items=items[:3])
    assert session.cold_start and np.isfinite(session.scores).all()
    assert not np.allclose(session.scores, ranker.rank(-7, items).scores)


def test_the_server_ranks_with_a_sequence_model(artifact_dir, rankers, store, tmp_path):
    settings = ServerSettings(
        artifacts=(str(artifact_dir),), impressions=str(tmp_path / "impressions.jsonl")
    )
    user, items = int(store.users.values[2]), store.items.values[:40]
    recent = store.items.values[[50, 60]]
    with TestClient(create_app(settings)) as client:
        assert client.get("/model").json()["models"][0]["user_encoder"] == "sequence"
        body = {"user_id": user, "candidates": items.tolist(), "recent_items": recent.tolist()}
        response = client.post("/rank", json=body)
    assert response.status_code == 200
    served = {item["item_id"]: item["score"] for item in response.json()["items"]}
    expected = rankers["online"].rank(user, items, recent_items=recent)
    np.testing.assert_allclose(
        [served[i] for i in items.tolist()], _served(expected, items), rtol=1e-6, atol=1e-6
    )
