import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import load_file

from recdistill.config import routing_from
from recdistill.server import ServerSettings
from serving.app import create_app
from serving.middleware import ADMIN_TOKEN_ENV
from tests.conftest import ab_table

AB = ab_table(
    "test-salt",
    control=("popularity", 0.2),
    teacher=("teacher", 0.3),
    student=("student", 0.5),
)


@pytest.fixture(scope="module")
def single(tiny_artifacts, tmp_path_factory):
    log = tmp_path_factory.mktemp("single") / "impressions.jsonl"
    settings = ServerSettings(artifacts=(str(tiny_artifacts["student"]),), impressions=str(log))
    with TestClient(create_app(settings)) as client:
        yield client, log


@pytest.fixture(scope="module")
def ab(tiny_artifacts, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ab")
    (directory / "ab.toml").write_text(AB)
    settings = ServerSettings(
        artifacts=tuple(str(tiny_artifacts[n]) for n in ("popularity", "teacher", "student")),
        ab_config=str(directory / "ab.toml"),
        impressions=str(directory / "impressions.jsonl"),
    )
    with TestClient(create_app(settings)) as client:
        yield client, directory / "impressions.jsonl"


@pytest.fixture(scope="module")
def lists(tiny_run):
    _, run = tiny_run
    return load_file(run / "scores_test.safetensors")


def _request(lists, row=0, **extra):
    body = {"user_id": int(lists["user_id"][row]), "candidates": lists["candidates"][row].tolist()}
    return body | extra


def test_rank_returns_every_candidate_sorted_with_model_and_version(single, lists):
    client, _ = single
    response = client.post("/rank", json=_request(lists))
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == body["arm"] == "student"
    assert len(body["version"]) == 16 and not body["cold_start"] and body["unknown_items"] == []
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert sorted(i["item_id"] for i in body["items"]) == sorted(lists["candidates"][0].tolist())


def test_served_scores_equal_the_offline_scores(single, lists):
    client, _ = single
    for row in range(0, len(lists["user_id"]), 41):
        items = client.post("/rank", json=_request(lists, row)).json()["items"]
        served = {item["item_id"]: item["score"] for item in items}
        offline = lists["student"][row]
        served_in_order = [served[i] for i in lists["candidates"][row].tolist()]
        np.testing.assert_allclose(served_in_order, offline, rtol=1e-5, atol=1e-5)


def test_k_returns_the_top_k(single, lists):
    client, _ = single
    everything = client.post("/rank", json=_request(lists)).json()["items"]
    top = client.post("/rank", json=_request(lists, k=5)).json()["items"]
    assert top == everything[:5]
    assert len(client.post("/rank", json=_request(lists, k=10_000)).json()["items"]) == 100


def test_cold_start_and_unknown_items_are_marked(single, lists):
    client, _ = single
    candidates = lists["candidates"][0][:10].tolist() + [-5, -6]
    body = client.post("/rank", json={"user_id": -1, "candidates": candidates}).json()
    assert body["cold_start"] is True
    assert body["unknown_items"] == [-5, -6]
    assert len(body["items"]) == 12
    session = {"user_id": -1, "candidates": candidates, "recent_items": candidates[:3]}
    assert client.post("/rank", json=session).json()["cold_start"] is True


BAD_BODIES = {
    "empty candidates": {"user_id": 1, "candidates": []},
    "duplicate candidates": {"user_id": 1, "candidates": [3, 4, 3]},
    "string user": {"user_id": "1", "candidates": [1]},
    "float candidate": {"user_id": 1, "candidates": [1.5]},
    "string candidate": {"user_id": 1, "candidates": ["a"]},
    "bool user": {"user_id": True, "candidates": [1]},
    "null user": {"user_id": None, "candidates": [1]},
    "huge id": {"user_id": 2**64, "candidates": [1]},
    "huge candidate": {"user_id": 1, "candidates": [-(2**63) - 1]},
    "k zero": {"user_id": 1, "candidates": [1], "k": 0},
    "k negative": {"user_id": 1, "candidates": [1], "k": -3},
    "k float": {"user_id": 1, "candidates": [1], "k": 2.5},
    "too many candidates": {"user_id": 1, "candidates": list(range(1001))},
    "missing candidates": {"user_id": 1},
    "missing user": {"candidates": [1]},
    "unknown field": {"user_id": 1, "candidates": [1], "model": "teacher"},
    "candidates not a list": {"user_id": 1, "candidates": 5},
    "recent items not ints": {"user_id": 1, "candidates": [1], "recent_items": ["x"]},
    "a list body": [1, 2, 3],
}


@pytest.mark.parametrize("name", BAD_BODIES)
def test_bad_requests_get_a_4xx_with_a_message(single, name):
    client, _ = single
    response = client.post("/rank", json=BAD_BODIES[name])
    assert response.status_code == 422, response.text
    assert response.json()["detail"]


NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e999")
RANK_FIELDS = {
    # body with {} where the non-finite number goes: the field the error must name
    '{"user_id": {}, "candidates": [1]}': "user_id",
    '{"user_id": 1, "candidates": [{}]}': "candidates[0]",
    '{"user_id": 1, "candidates": [1, 2, {}]}': "candidates[2]",
    '{"user_id": 1, "candidates": [1], "k": {}}': "k",
    '{"user_id": 1, "candidates": [1], "recent_items": [3, {}]}': "recent_items[1]",
    '{"user_id": 1, "candidates": [[1, [{}]]]}': "candidates[0][1][0]",
    '{"user_id": 1, "candidates": [1], "extra": {"deep": [{"deeper": {}}]}}':
        "extra.deep[0].deeper",
    '{"user_id": {"id": {}}, "candidates": [1]}': "user_id.id",
    "{}": "the body",
    "[1, {}]": "body[1]",
}  # fmt: skip


@pytest.mark.parametrize("number", NON_FINITE)
@pytest.mark.parametrize("template", RANK_FIELDS)
def test_non_finite_numbers_anywhere_are_a_422_naming_the_field(single, template, number):
    client, _ = single
    content = template.replace("{}", number)
    response = client.post("/rank", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    first = response.json()["detail"][0]
    spelled = "Infinity" if number == "1e999" else number
    assert first["msg"] == f"{RANK_FIELDS[template]} is {spelled}: JSON numbers must be finite"
    assert first["type"] == "finite_number"


@pytest.mark.parametrize("number", NON_FINITE)
@pytest.mark.parametrize(
    ("template", "field"),
    [
        ('{"artifact": {}}', "artifact"),
        ('{"artifact": "a", "model": {}}', "model"),
        ('{"artifact": ["a", {"b": {}}]}', "artifact[1].b"),
    ],
)
def test_non_finite_numbers_in_a_reload_are_a_422_naming_the_field(
    reloadable, template, field, number
):
    content = template.replace("{}", number)
    headers = AUTH | {"content-type": "application/json"}
    response = reloadable.post("/admin/reload", content=content, headers=headers)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["msg"].startswith(f"{field} is ")


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b"{not json", 422),
        (b"", 422),
        (b"\xff\xfe", 422),
        (b'{"user_id": 1, "candidates": [1]', 422),
    ],
)
def test_malformed_bodies_get_a_4xx(single, content, status):
    client, _ = single
    response = client.post("/rank", content=content, headers={"content-type": "application/json"})
    assert response.status_code == status
    assert response.json()["detail"]


def test_bodies_over_the_size_limit_get_413_declared_or_streamed(single):
    client, _ = single
    declared = client.post(
        "/rank", content=b"1" * 70_000, headers={"content-type": "application/json"}
    )
    assert declared.status_code == 413 and "over 65536 bytes" in declared.json()["detail"]

    def chunks():
        for _ in range(100):
            yield b" " * 1000

    streamed = client.post("/rank", content=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_wrong_method_and_path_are_4xx(single):
    client, _ = single
    assert client.get("/rank").status_code == 405
    assert client.get("/nowhere").status_code == 404


def test_health_readiness_and_model_endpoints(single, tiny_artifacts):
    client, _ = single
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    described = client.get("/model").json()
    (model,) = described["models"]
    manifest = json.loads((tiny_artifacts["student"] / "manifest.json").read_text())
    assert model["name"] == "student" and model["version"] == manifest["version"]
    assert model["params"] == manifest["params"] > 0
    assert described["routing"]["arms"] == [{"name": "student", "model": "student", "share": 1.0}]


def _samples(client, metric):
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        if family.name == metric:
            return family.samples
    return []


def test_metrics_count_requests_and_histogram_latency_per_model_and_arm(single, lists):
    client, _ = single
    before = {
        s.labels["le"]: s.value
        for s in _samples(client, "recdistill_rank_latency_seconds")
        if s.name.endswith("_bucket")
    }
    for _ in range(3):
        client.post("/rank", json=_request(lists))
    client.post("/rank", json={"user_id": 1, "candidates": []})
    samples = _samples(client, "recdistill_rank_latency_seconds")
    buckets = [s for s in samples if s.name.endswith("_bucket")]
    assert {s.labels["model"] for s in buckets} == {"student"}
    assert {s.labels["arm"] for s in buckets} == {"student"}
    assert len(buckets) >= 20  # fine buckets, so a p99 can be read off
    inf = next(s for s in buckets if s.labels["le"] == "+Inf")
    assert inf.value - before.get("+Inf", 0) == 3
    requests = {
        (s.labels["route"], s.labels["status"]): s.value
        for s in _samples(client, "recdistill_http_requests")
        if s.name.endswith("_total")
    }
    assert requests[("/rank", "200")] >= 3 and requests[("/rank", "422")] >= 1


def test_every_ranked_response_is_logged(single, lists):
    client, log = single
    lines_before = log.read_text().count("\n")
    response = client.post("/rank", json=_request(lists, k=4)).json()
    lines = log.read_text().splitlines()
    assert len(lines) == lines_before + 1
    impression = json.loads(lines[-1])
    assert impression["request_id"] == response["request_id"]
    assert impression["user_id"] == int(lists["user_id"][0])
    assert impression["items"] == [item["item_id"] for item in response["items"]]
    assert impression["arm"] == "student" and impression["version"] == response["version"]
    assert impression["latency_ms"] > 0 and impression["n_candidates"] == 100


def test_ab_routing_follows_the_hash_buckets(ab, lists):
    client, log = ab
    routing = routing_from({"salt": "test-salt", "arms": {
        "control": {"model": "popularity", "share": 0.2},
        "teacher": {"model": "teacher", "share": 0.3},
        "student": {"model": "student", "share": 0.5},
    }})  # fmt: skip
    seen = {}
    for row in range(len(lists["user_id"])):
        body = client.post("/rank", json=_request(lists, row, k=3)).json()
        arm = routing.arm_of(int(lists["user_id"][row]))
        assert (body["arm"], body["model"]) == (arm.name, arm.model)
        seen[body["arm"]] = seen.get(body["arm"], 0) + 1
    assert set(seen) == {"control", "teacher", "student"}
    again = client.post("/rank", json=_request(lists, 0, k=3)).json()
    assert again["arm"] == routing.arm_of(int(lists["user_id"][0])).name
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert {entry["arm"] for entry in logged} == {"control", "teacher", "student"}
    arms = {arm["name"]: arm for arm in client.get("/model").json()["routing"]["arms"]}
    assert arms["control"] == {"name": "control", "model": "popularity", "share": 0.2}


def test_ab_config_must_cover_its_models(tiny_artifacts, tmp_path):
    (tmp_path / "ab.toml").write_text(AB)
    settings = ServerSettings(
        artifacts=(str(tiny_artifacts["student"]),),
        ab_config=str(tmp_path / "ab.toml"),
        impressions=str(tmp_path / "log.jsonl"),
    )
    with (
        pytest.raises(ValueError, match="no --artifact provides"),
        TestClient(create_app(settings)),
    ):
        pass


@pytest.fixture
def served(tiny_artifacts, tmp_path):
    """Copies of the tiny artifacts in one directory, the default root of reloads."""
    directory = tmp_path / "served"
    for name in ("student", "intermediate", "teacher"):
        shutil.copytree(tiny_artifacts[name], directory / name)
    return directory


@pytest.fixture
def reloadable(served, tmp_path, monkeypatch):
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "s3cret")
    settings = ServerSettings(
        artifacts=(str(served / "student"),), impressions=str(tmp_path / "log.jsonl")
    )
    with TestClient(create_app(settings)) as client:
        yield client


AUTH = {"authorization": "Bearer s3cret"}


def test_reload_needs_the_token(reloadable, served, monkeypatch):
    body = {"artifact": str(served / "student")}
    assert reloadable.post("/admin/reload", json=body).status_code == 401
    wrong = reloadable.post("/admin/reload", json=body, headers={"authorization": "Bearer no"})
    assert wrong.status_code == 401
    monkeypatch.delenv(ADMIN_TOKEN_ENV)
    disabled = reloadable.post("/admin/reload", json=body, headers=AUTH)
    assert disabled.status_code == 401 and ADMIN_TOKEN_ENV in disabled.json()["detail"]


def test_reload_swaps_the_model(reloadable, served, lists):
    old = reloadable.get("/model").json()["models"][0]["version"]
    body = {"artifact": str(served / "intermediate"), "model": "student"}
    response = reloadable.post("/admin/reload", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    new = json.loads((served / "intermediate" / "manifest.json").read_text())["version"]
    assert response.json() == {"model": "student", "version": new, "previous_version": old}
    ranked = reloadable.post("/rank", json=_request(lists)).json()
    assert ranked["version"] == new and ranked["arm"] == "student"
    assert (
        f'recdistill_model_info{{model="intermediate",version="{new}"}} 1.0'
        in reloadable.get("/metrics").text
    )


def _cache_lookups(client):
    return {
        (s.labels["version"], s.labels["outcome"]): s.value
        for s in _samples(client, "recdistill_user_vector_cache_lookups")
        if s.name.endswith("_total")
    }


def test_the_user_vector_cache_answers_repeat_users_and_restarts_on_reload(
    served, lists, tmp_path, monkeypatch
):
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "s3cret")
    # Room for two users: the load fills it with the first two known users' vectors, so
    # the user with the largest ID is not among them until its first request.
    settings = ServerSettings(
        artifacts=(str(served / "student"),), impressions=str(tmp_path / "log.jsonl"), user_cache=2
    )
    last = int(np.argmax(lists["user_id"]))
    with TestClient(create_app(settings)) as client:
        version = client.get("/model").json()["models"][0]["version"]
        first = client.post("/rank", json=_request(lists, row=last)).json()
        again = client.post("/rank", json=_request(lists, row=last)).json()
        assert again["items"] == first["items"]  # the cached vector ranks exactly as computed
        recent = [int(lists["candidates"][last][0])]
        client.post("/rank", json=_request(lists, row=last, recent_items=recent))  # not cached
        assert _cache_lookups(client) == {(version, "hit"): 1, (version, "miss"): 1}
        (ratio,) = _samples(client, "recdistill_user_vector_cache_hit_ratio")
        assert ratio.value == 0.5
        body = {"artifact": str(served / "intermediate"), "model": "student"}
        assert client.post("/admin/reload", json=body, headers=AUTH).status_code == 200
        new = client.get("/model").json()["models"][0]["version"]
        client.post("/rank", json=_request(lists, row=last))
        assert _cache_lookups(client) == {(new, "hit"): 0, (new, "miss"): 1}


def test_a_failed_reload_keeps_the_old_model_serving(reloadable, served, lists):
    old = reloadable.post("/rank", json=_request(lists)).json()
    broken = served / "broken"
    shutil.copytree(served / "student", broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    for body in (
        {"artifact": str(broken)},
        {"artifact": str(served / "missing")},
    ):
        response = reloadable.post("/admin/reload", json=body, headers=AUTH)
        assert response.status_code == 422
        assert "reload failed" in response.json()["detail"]
        assert "keeps serving" in response.json()["detail"]
    assert (
        "corrupt"
        in reloadable.post("/admin/reload", json={"artifact": str(broken)}, headers=AUTH).json()[
            "detail"
        ]
    )
    after = reloadable.post("/rank", json=_request(lists)).json()
    assert after["version"] == old["version"] and after["items"] == old["items"]


def test_reload_into_an_unserved_name_is_refused(reloadable, served):
    body = {"artifact": str(served / "teacher")}
    response = reloadable.post("/admin/reload", json=body, headers=AUTH)
    assert response.status_code == 409 and "no served model is named 'teacher'" in response.text


UNPARSED_BODIES = {
    "malformed JSON": b"{not json",
    "wrong schema": b'{"artefact": 3}',
    "non-finite": b'{"artifact": NaN}',
    "over the size limit": b"1" * 70_000,
}


@pytest.mark.parametrize("name", UNPARSED_BODIES)
@pytest.mark.parametrize("token", [None, "Bearer wrong"])
def test_admin_requests_are_authenticated_before_the_body_is_read(reloadable, name, token):
    headers = {"content-type": "application/json"} | ({"authorization": token} if token else {})
    response = reloadable.post("/admin/reload", content=UNPARSED_BODIES[name], headers=headers)
    assert response.status_code == 401, response.text
    assert "admin token" in response.json()["detail"]
    assert response.headers["www-authenticate"] == "Bearer"


def test_reloads_outside_the_artifact_root_are_403_and_change_nothing(
    reloadable, served, tiny_artifacts, tmp_path, lists
):
    before = reloadable.post("/rank", json=_request(lists)).json()
    (served / "link").symlink_to(tiny_artifacts["intermediate"])
    shutil.copytree(served / "intermediate", tmp_path / "outside")
    for artifact in (
        str(tmp_path / "outside"),
        str(served / ".." / "outside"),
        str(served / "link"),
        "/",
        "nul\x00byte",
    ):
        body = {"artifact": artifact, "model": "student"}
        response = reloadable.post("/admin/reload", json=body, headers=AUTH)
        assert response.status_code == 403, (artifact, response.text)
        assert f"outside the artifact root {served}" in response.json()["detail"]
    after = reloadable.post("/rank", json=_request(lists)).json()
    assert after["version"] == before["version"] and after["items"] == before["items"]
    refused = 'recdistill_reloads_total{model="student",outcome="refused"} 5.0'
    assert refused in reloadable.get("/metrics").text


def test_the_artifact_root_can_be_set(served, tiny_artifacts, tmp_path, monkeypatch):
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "s3cret")
    settings = ServerSettings(
        artifacts=(str(served / "student"),),
        impressions=str(tmp_path / "log.jsonl"),
        artifact_root=str(tiny_artifacts["intermediate"].parent),
    )
    with TestClient(create_app(settings)) as client:
        body = {"artifact": str(tiny_artifacts["intermediate"]), "model": "student"}
        assert client.post("/admin/reload", json=body, headers=AUTH).status_code == 200
        body = {"artifact": str(served / "intermediate"), "model": "student"}
        assert client.post("/admin/reload", json=body, headers=AUTH).status_code == 403


def test_requests_run_on_the_configured_torch_threads(tiny_artifacts, tmp_path):
    for threads in (1, 2):
        settings = ServerSettings(
            artifacts=(str(tiny_artifacts["student"]),),
            impressions=str(tmp_path / "l.jsonl"),
            threads=threads,
        )
        with TestClient(create_app(settings)) as client:
            assert client.get("/model").json()["torch_threads"] == threads


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("user_cache", -1, "user_cache must be 0"),
        ("inference", "onnx", "inference must be one of"),
        ("threads", 0, "threads must be at least 1"),
        ("max_candidates", 0, "max_candidates must be at least 1"),
    ],
)
def test_server_settings_refuse_values_that_cannot_serve(tiny_artifacts, field, value, message):
    with pytest.raises(ValueError, match=message):
        ServerSettings(artifacts=(str(tiny_artifacts["student"]),), **{field: value})
