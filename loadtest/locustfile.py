"""Locust users that send realistic ``POST /rank`` traffic and check every answer.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 \\
        --artifact artifacts/student [--candidates 100] [--client-stats stats.json] \\
        [--user-rps R] [--timeline timeline.npy]

Each option can also come from the environment (``LOADTEST_ARTIFACT``, ...). Users send
requests back to back (no think time), or with ``--user-rps`` each at that mean rate, as a
Poisson stream, so that ``--users`` sets the offered load. A response that is not a 200 with
the right number of distinct candidates sorted by score counts as a Locust failure.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

import gevent
import orjson
from locust import FastHttpUser, events, task

from loadtest.client_stats import ClientRecorder, TimelineRecorder
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
        help="candidates per request (%(default)s)",
    )
    parser.add_argument(
        "--client-stats",
        env_var="LOADTEST_CLIENT_STATS",
        default="",
        help="JSON file to write unrounded latency percentiles and CPU use to",
    )
    parser.add_argument(
        "--user-rps",
        type=float,
        env_var="LOADTEST_USER_RPS",
        default=0.0,
        help="requests per second of each user (0: back to back)",
    )
    parser.add_argument(
        "--timeline",
        env_var="LOADTEST_TIMELINE",
        default="",
        help=".npy file to write every request's finish time, latency and failure flag to",
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
    if options.user_rps > 0:
        RankUser.period_s = 1 / options.user_rps
    if options.client_stats:
        _record(environment, ClientRecorder(), Path(options.client_stats))
    if options.timeline:
        _record(environment, TimelineRecorder(), Path(options.timeline))


def _record(environment, recorder: ClientRecorder | TimelineRecorder, path: Path) -> None:
    environment.events.test_start.add_listener(lambda **_: recorder.start())
    environment.events.request.add_listener(
        lambda response_time, exception, **_: recorder.add(
            response_time, failed=exception is not None
        )
    )
    environment.events.test_stop.add_listener(lambda **_: recorder.stop().write(path))


class RankUser(FastHttpUser):
    workload: Workload
    period_s = 0.0  # between the starts of a user's requests; 0: back to back

    def on_start(self) -> None:
        self.rng = random.Random()
        # Users start 1 / spawn-rate apart, which can line their schedules up into bursts of
        # simultaneous requests; a random phase spreads them over the period instead.
        gevent.sleep(self.rng.random() * self.period_s)
        self.due = time.monotonic()

    def wait_time(self) -> float:
        """Until the next request is due (now, if late). The gaps between a user's requests
        are exponential with the period as their mean, so users arrive as independent
        Poisson streams. With equal gaps, every user held up by one slow moment (a reload)
        fell due at the same instant and stayed in step with the others from then on: the
        server got the whole rate in one burst per period, and the latencies measured that
        burst rather than the rate."""
        now = time.monotonic()
        if self.period_s:
            self.due = max(self.due + self.rng.expovariate(1 / self.period_s), now)
        else:
            self.due = now
        return self.due - now

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
