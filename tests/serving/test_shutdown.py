"""A real server stopped under load: SIGTERM drains it cleanly, SIGKILL leaves a readable log."""

import signal
import socket
import threading
import time
import warnings
from urllib.parse import urlsplit

import httpx2
import orjson
import pytest

from recdistill.impressions import read_log
from recdistill.server import running_server

pytestmark = pytest.mark.slow  # every test here starts a server

BODY = {"user_id": 1, "candidates": list(range(1, 51)), "k": 5}
CLIENTS = 4


class Load:
    """``CLIENTS`` threads posting /rank back to back until the server goes away."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answered: list[str] = []  # request ids of 200 answers
        self.other_statuses: list[int] = []
        self.threads = [threading.Thread(target=self._client) for _ in range(CLIENTS)]
        for thread in self.threads:
            thread.start()

    def _client(self) -> None:
        with httpx2.Client(base_url=self.url, timeout=30.0) as client:
            while True:
                try:
                    response = client.post("/rank", json=BODY)
                except httpx2.TransportError:
                    return  # the server closed the connection or stopped listening
                if response.status_code == 200:
                    self.answered.append(response.json()["request_id"])
                else:
                    self.other_statuses.append(response.status_code)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(timeout=60)


def _start_slow_request(url: str) -> socket.socket:
    """A /rank request whose headers are sent and whose body is not: in flight until
    ``_finish_slow_request``."""
    parts = urlsplit(url)
    connection = socket.create_connection((parts.hostname, parts.port))
    body = orjson.dumps(BODY)
    head = "POST /rank HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    connection.sendall(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body[:10])
    return connection


def _finish_slow_request(connection: socket.socket) -> tuple[int, dict]:
    connection.sendall(orjson.dumps(BODY)[10:])
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    connection.close()
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), orjson.loads(body)


def test_sigterm_under_load_finishes_every_request_in_flight_and_flushes_the_log(
    tiny_artifacts, tmp_path
):
    log = tmp_path / "impressions.jsonl"
    with running_server([tiny_artifacts["student"]], impressions=log) as server:
        load = Load(server.url)
        time.sleep(1.0)
        slow = _start_slow_request(server.url)
        time.sleep(0.5)  # the server has read the headers: the request is in flight
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        status, slow_answer = _finish_slow_request(slow)
        load.join()
        # uvicorn re-raises the signal once it has shut down, so the code says SIGTERM.
        assert server.process.wait(timeout=30) == -signal.SIGTERM
    (server_log,) = tmp_path.glob("server-*.log")
    assert "Application shutdown complete" in server_log.read_text()  # the log was closed
    assert status == 200, slow_answer
    assert len(load.answered) > 50 and load.other_statuses == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torn line
        logged = [impression["request_id"] for impression in read_log(log)]
    # One whole line per answered request, and no request was logged but left unanswered.
    assert sorted(logged) == sorted([*load.answered, slow_answer["request_id"]])


def test_sigkill_under_load_leaves_a_readable_log(tiny_artifacts, tmp_path):
    log = tmp_path / "impressions.jsonl"
    with running_server([tiny_artifacts["student"]], impressions=log) as server:
        load = Load(server.url)
        time.sleep(1.0)
        server.process.send_signal(signal.SIGKILL)
        load.join()
        server.process.wait(timeout=30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a torn last line is allowed here
        logged = {impression["request_id"] for impression in read_log(log)}
    assert len(load.answered) > 50
    assert set(load.answered) <= logged
