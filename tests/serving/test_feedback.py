"""POST /feedback: events for requests the server answered, checked and appended once; and
/rank under an interleaving design."""

import json

import pytest
from fastapi.testclient import TestClient
from safetensors.numpy import load_file

from recdistill.impressions import read_log
from recdistill.server import ServerSettings
from serving.app import create_app

INTERLEAVED = """
[ab]
salt = "test-salt"
design = "interleaving"
[ab.arms.student]
model = "student"
[ab.arms.teacher]
model = "teacher"
"""


@pytest.fixture(scope="module")
def lists(tiny_run):
    _, run = tiny_run
    return load_file(run / "scores_test.safetensors")


def _start(directory, artifacts, ab=None, **settings):
    config = None
    if ab is not None:
        config = directory / "ab.toml"
        config.write_text(ab)
    return ServerSettings(
        artifacts=tuple(str(a) for a in artifacts),
        ab_config=None if config is None else str(config),
        impressions=str(directory / "impressions.jsonl"),
        **settings,
    )


@pytest.fixture(scope="module")
def interleaving(tiny_artifacts, tmp_path_factory):
    directory = tmp_path_factory.mktemp("interleaving")
    artifacts = (tiny_artifacts["student"], tiny_artifacts["teacher"])
    with TestClient(create_app(_start(directory, artifacts, INTERLEAVED))) as client:
        yield client, directory


@pytest.fixture
def single(tiny_artifacts, tmp_path):
    with TestClient(create_app(_start(tmp_path, [tiny_artifacts["student"]]))) as client:
        yield client, tmp_path


def _rank(client, lists, row=0, k=5):
    body = {
        "user_id": int(lists["user_id"][row]),
        "candidates": lists["candidates"][row].tolist(),
        "k": k,
    }
    response = client.post("/rank", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_an_interleaved_slate_merges_both_rankings_and_logs_who_placed_each_item(
    interleaving, lists
):
    client, directory = interleaving
    body = _rank(client, lists, row=3, k=6)
    assert body["arm"] == "interleaved" and body["model"] == "student+teacher"
    assert "+" in body["version"]
    logged = {i["request_id"]: i for i in read_log(directory / "impressions.jsonl")}
    impression = logged[body["request_id"]]
    assert impression["items"] == [item["item_id"] for item in body["items"]]
    assert len(impression["teams"]) == 6 and set(impression["teams"]) == {"student", "teacher"}
    # Team draft: after every round of two picks, the arms have placed as many items each.
    for end in (2, 4, 6):
        assert impression["teams"][:end].count("student") == end // 2
    assert len(set(impression["items"])) == 6


def test_each_arm_places_its_own_best_remaining_item(interleaving, lists, tiny_artifacts):
    from recdistill.artifact import load_artifact
    from recdistill.online import OnlineRanker

    client, directory = interleaving
    rankers = {n: OnlineRanker(load_artifact(tiny_artifacts[n])) for n in ("student", "teacher")}
    row = 5
    body = _rank(client, lists, row=row, k=8)
    impression = {i["request_id"]: i for i in read_log(directory / "impressions.jsonl")}[
        body["request_id"]
    ]
    user, candidates = int(lists["user_id"][row]), lists["candidates"][row]
    orders = {n: r.rank(user, candidates).items.tolist() for n, r in rankers.items()}
    shown: list[int] = []
    for item, team in zip(impression["items"], impression["teams"]):
        assert item == next(i for i in orders[team] if i not in shown)
        shown.append(item)


def test_feedback_is_recorded_once_with_the_arm_that_placed_the_item(interleaving, lists):
    client, directory = interleaving
    body = _rank(client, lists, row=7)
    request_id, item = body["request_id"], body["items"][2]["item_id"]
    event = {"request_id": request_id, "item_id": item, "event": "click", "time": 2e9}
    answered = client.post("/feedback", json=event)
    assert answered.status_code == 200, answered.text
    logged = {i["request_id"]: i for i in read_log(directory / "impressions.jsonl")}
    assert answered.json()["arm"] == logged[request_id]["teams"][2]

    again = client.post("/feedback", json=event)
    assert again.status_code == 409 and "already recorded" in again.json()["detail"]
    conversion = client.post("/feedback", json=event | {"event": "conversion"})
    assert conversion.status_code == 200  # another kind of event on the same item
    recorded = [e for e in read_log(directory / "events.jsonl") if e["request_id"] == request_id]
    assert [(e["item_id"], e["event"], e["time"]) for e in recorded] == [
        (item, "click", 2e9),
        (item, "conversion", 2e9),
    ]


BAD_EVENTS = {
    "unknown request": ({"request_id": "0" * 32}, 404, "no ranked request"),
    "item not shown": ({"item_id": -7}, 422, "did not show item"),
    "item of the wrong kind": ({"item_id": "x"}, 422, "did not show item"),
    "unknown event": ({"event": "purchase"}, 422, "event"),
    "time before the request": ({"time": 1.0}, 422, "before request"),
    "negative time": ({"time": -1.0}, 422, "time"),
    "missing item": ({"item_id": None}, 422, "item_id"),
    "extra field": ({"arm": "student"}, 422, "arm"),
}


@pytest.mark.parametrize("name", BAD_EVENTS)
def test_bad_events_are_a_4xx_with_a_message_and_nothing_is_recorded(single, lists, name):
    client, directory = single
    body = _rank(client, lists)
    change, status, message = BAD_EVENTS[name]
    event = {"request_id": body["request_id"], "item_id": body["items"][0]["item_id"]}
    event = {**event, "event": "click"} | change
    event = {key: value for key, value in event.items() if value is not None}
    answered = client.post("/feedback", json=event)
    assert answered.status_code == status, answered.text
    assert message in json.dumps(answered.json()["detail"])
    assert not (directory / "events.jsonl").exists() or read_log(directory / "events.jsonl") == []


def test_feedback_reaches_requests_another_worker_answered(tiny_artifacts, lists, tmp_path):
    """Two apps (as two worker processes) share the logs: an event is accepted by either,
    whichever answered its request, and counted once across them."""
    settings = _start(tmp_path, [tiny_artifacts["student"]])
    with TestClient(create_app(settings)) as one, TestClient(create_app(settings)) as other:
        body = _rank(one, lists)
        event = {
            "request_id": body["request_id"],
            "item_id": body["items"][0]["item_id"],
            "event": "click",
        }
        assert other.post("/feedback", json=event).status_code == 200
        assert one.post("/feedback", json=event).status_code == 409
    assert len(read_log(tmp_path / "events.jsonl")) == 1
