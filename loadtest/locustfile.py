"""Locust users that send realistic ``POST /rank`` traffic and check every answer.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 \\
        --artifact artifacts/student [--candidates 100] [--client-stats stats.json]

Each option can also come from the environment (``LOADTEST_ARTIFACT``, ...). Users send
requests back to back (no think time). A response that is not a 200 with the right number
of distinct candidates sorted by score counts as a Locust failure.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import orjson
from locust import FastHttpUser, events, task

from loadtest.client_stats import ClientRecorder
from loadtest.workload import Workload, check_ranking

JSON_HEADERS = {"content-type": "application/json"}


@events.init_command_line_parser.add_listener
def _add_arguments(parser) -> None:
    parser.add_argument(
        "--artifact",
        env_var="LOADTEST_ARTIFACT",
        default="",
        help="exported artifact whose vocabularies.json users and candidates are drawn from",
    )
    parser.add_argument(
        "--candidates",
        type=int,
        env_var="LOADTEST_CANDIDATES",
        default=100,
        help="candidates per request (100)",
    )
    parser.add_argument(
        "--client-stats",
        env_var="LOADTEST_CLIENT_STATS",
        default="",
        help="JSON file to write unrounded latency percentiles and CPU use to",
    )


@events.init.add_listener
def _set_up(environment, **_) -> None:
    options = environment.parsed_options
    if not options.artifact:
        sys.exit("locustfile: pass --artifact DIR (or set LOADTEST_ARTIFACT)")
    try:
        RankUser.workload = Workload.from_artifact(Path(options.artifact), options.candidates)
    except (OSError, ValueError, KeyError) as error:
        sys.exit(f"locustfile: {error}")
    if options.client_stats:
        _record_client_stats(environment, Path(options.client_stats))


def _record_client_stats(environment, path: Path) -> None:
    recorder = ClientRecorder()
    environment.events.test_start.add_listener(lambda **_: recorder.start())
    environment.events.request.add_listener(
        lambda response_time, exception, **_: recorder.add(
            response_time, failed=exception is not None
        )
    )
    environment.events.test_stop.add_listener(lambda **_: recorder.stop().write(path))


class RankUser(FastHttpUser):
    workload: Workload

    def on_start(self) -> None:
        self.rng = random.Random()

    @task
    def rank(self) -> None:
        call = self.workload.sample(self.rng)
        with self.client.post(
            "/rank",
            data=orjson.dumps(call.body),
            headers=JSON_HEADERS,
            name=f"/rank {call.kind}",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"status {response.status_code}: {(response.text or '')[:200]}")
                return
            try:
                problem = check_ranking(orjson.loads(response.content), call)
            except orjson.JSONDecodeError:
                problem = "the body is not JSON"
            if problem:
                response.failure(problem)
