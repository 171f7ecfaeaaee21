"""One simulated experiment: requests planned, ranked by the arms, clicked by simulated users.

1. **Plan**: on every day of the pre-period (days < 0) and of the experiment (days >= 0)
   each user makes a Poisson number of requests; each request gets its candidates from the
   retrieval stage.
2. **Rank**: a user's arm is the server's: ``Routing.arms_of`` hashes ``salt:user_id``.
   In the pre-period everyone sees the control arm's model. Offline, each arm's model
   scores all its requests in-process in one batch, and ``latency_requests`` of them are
   timed one at a time; online, every experiment request is a ``POST /rank`` to a running
   server and the server's impression log is what is read back. Under interleaving every
   request is ranked by both arms and shown as their team-draft merge
   (:func:`recdistill.interleaving.team_draft`), each shown item's arm in ``teams``.
3. **Observe**: the user examines position ``j`` of the top ``k`` with probability
   ``1 / (1 + j) ** eta`` and clicks an examined item with its attractiveness; the slate's
   NDCG@k is graded by attractiveness against the best ``k`` of the request's candidates.

The result is the per-request log: one row per request with the shown items and clicks
(and, interleaved, the arm that placed each). Online, each click is also posted to the
server's ``POST /feedback``, as a client reporting it would.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx2
import numpy as np
import pandas as pd

from recdistill.ab_spec import ExperimentSpec, SimulationSpec
from recdistill.abtest.world import World
from recdistill.impressions import read_log
from recdistill.interleaving import INTERLEAVED, team_draft
from recdistill.metrics import top_k
from recdistill.routing import Arm

EXPERIMENT, PRE = "experiment", "pre"


class SlateRanker(Protocol):
    """What an arm needs of a model (``recdistill.online.OnlineRanker`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> str: ...

    def score_lists(self, user_ids: np.ndarray, candidates: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Server:
    """A running ranking server and the impression log it appends to."""

    url: str
    impressions: Path


@dataclass(frozen=True)
class RequestPlan:
    """Every request in time order: the asking user (row of the population), day, candidates."""

    users: np.ndarray
    days: np.ndarray
    candidates: np.ndarray


@dataclass
class Slates:
    """What each request was shown: top-``k`` columns of its candidates, by which arm (and,
    interleaved, the arm that placed each shown item)."""

    request_ids: np.ndarray
    arms: np.ndarray
    models: np.ndarray
    versions: np.ndarray
    shown: np.ndarray
    latency_ms: np.ndarray
    round_trip_ms: np.ndarray
    teams: np.ndarray | None = None

    @classmethod
    def empty(cls, requests: int, k: int, *, interleaved: bool = False) -> Slates:
        return cls(
            request_ids=np.arange(requests).astype(str).astype(object),
            arms=np.empty(requests, dtype=object),
            models=np.empty(requests, dtype=object),
            versions=np.empty(requests, dtype=object),
            shown=np.zeros((requests, k), dtype=np.int64),
            latency_ms=np.full(requests, np.nan),
            round_trip_ms=np.full(requests, np.nan),
            teams=np.empty((requests, k), dtype=object) if interleaved else None,
        )


def simulate(
    world: World,
    experiment: ExperimentSpec,
    rankers: Mapping[str, SlateRanker],
    *,
    server: Server | None = None,
    click_multiplier: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """The per-request log of one run of ``experiment``; online if a ``server`` is given.

    ``rankers`` maps model names to rankers. ``click_multiplier`` (arm → factor) scales the
    click probabilities of an arm's items in the experiment period (capped at 1): an effect
    of known size, to check that the analysis finds it.
    """
    spec = experiment.simulation
    plan = plan_requests(world, spec.days, experiment.pre_days, spec.requests_per_day, spec.seed)
    routing = experiment.routing
    slates = Slates.empty(len(plan.days), spec.k, interleaved=routing.interleaved)
    pre = plan.days < 0
    if routing.interleaved:
        slates.arms[:] = INTERLEAVED
        if server is None:
            rng = np.random.default_rng([spec.seed, 3])
            _interleave_in_process(slates, plan, world, routing.arms, rankers, spec, rng)
    else:
        arm_index = routing.arms_of(world.population.user_ids)[plan.users]
        slates.arms[:] = np.array([arm.name for arm in routing.arms], dtype=object)[arm_index]
        control = next(arm for arm in routing.arms if arm.name == experiment.analysis.control)
        _rank_in_process(slates, plan, world, np.flatnonzero(pre), rankers[control.model], spec.k)
        if server is None:
            for index, arm in enumerate(routing.arms):
                rows, ranker = np.flatnonzero(~pre & (arm_index == index)), rankers[arm.model]
                _rank_in_process(slates, plan, world, rows, ranker, spec.k, spec.latency_requests)
    if server is not None:
        _rank_online(slates, plan, world, np.flatnonzero(~pre), server, spec.k)

    multiplier = np.ones(slates.shown.shape)
    placed_by = slates.teams if routing.interleaved else slates.arms[:, None]
    for arm, factor in (click_multiplier or {}).items():
        multiplier[np.broadcast_to(~pre[:, None] & (placed_by == arm), multiplier.shape)] = factor
    log = observe(world, plan, slates, multiplier, np.random.default_rng([spec.seed, 2]))
    if server is not None:
        post_clicks(server, log)
    return log


def plan_requests(
    world: World, days: int, pre_days: int, requests_per_day: float, seed: int
) -> RequestPlan:
    rng = np.random.default_rng([seed, 1])
    rates = requests_per_day * world.population.arrival_rates
    calendar = np.arange(-pre_days, days)
    counts = rng.poisson(rates[:, None], (len(rates), len(calendar)))
    cell = np.repeat(np.arange(counts.size), counts.ravel())
    users, day = cell // len(calendar), calendar[cell % len(calendar)]
    order = np.lexsort((rng.random(len(cell)), day))
    users, day = users[order], day[order]
    return RequestPlan(users, day, world.retrieval.candidates(len(users), rng))


def observe(
    world: World,
    plan: RequestPlan,
    slates: Slates,
    multiplier: np.ndarray,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """Simulated clicks on the shown slates, and the per-request log."""
    k = slates.shown.shape[1]
    user_ids = world.population.user_ids[plan.users]
    attractiveness = world.attractiveness(user_ids, plan.candidates)
    shown = np.take_along_axis(attractiveness, slates.shown, axis=1)
    click_probability = np.minimum(1.0, shown * world.clicks.examination(k) * multiplier)
    clicks = rng.random(click_probability.shape) < click_probability
    discount = 1.0 / np.log2(np.arange(k) + 2.0)
    ideal = -np.partition(-attractiveness, k - 1, axis=1)[:, :k]
    ideal = -np.sort(-ideal, axis=1)
    log = pd.DataFrame(
        {
            "request_id": slates.request_ids,
            "day": plan.days,
            "period": np.where(plan.days < 0, PRE, EXPERIMENT),
            "user_id": user_ids,
            "arm": slates.arms,
            "model": slates.models,
            "version": slates.versions,
            "items": list(np.take_along_axis(plan.candidates, slates.shown, axis=1)),
            "clicks": list(clicks.astype(np.int8)),
            "n_shown": k,
            "n_clicks": clicks.sum(axis=1),
            "ndcg": (shown @ discount) / (ideal @ discount),
            "latency_ms": slates.latency_ms,
            "round_trip_ms": slates.round_trip_ms,
        }
    )
    if slates.teams is not None:
        log.insert(log.columns.get_loc("clicks") + 1, "teams", list(slates.teams))
    segments = world.population.segments.iloc[plan.users].reset_index(drop=True)
    return pd.concat([log, segments], axis=1)


def _rank_in_process(
    slates: Slates,
    plan: RequestPlan,
    world: World,
    rows: np.ndarray,
    ranker: SlateRanker,
    k: int,
    latency_requests: int = 0,
) -> None:
    """Rank ``rows`` in one batch, then time the first ``latency_requests`` of them scored and
    sorted one at a time (no HTTP); the first timed request runs once untimed, so one-off
    costs are not counted."""
    if not len(rows):
        return
    user_ids = world.population.user_ids[plan.users[rows]]
    slates.shown[rows] = top_k(ranker.score_lists(user_ids, plan.candidates[rows]), k)
    slates.models[rows], slates.versions[rows] = ranker.name, ranker.version
    timed, timed_users = rows[:latency_requests], user_ids[:latency_requests]
    for row, user_id in zip([*timed[:1], *timed], [*timed_users[:1], *timed_users]):
        start = time.perf_counter()
        top_k(ranker.score_lists(np.array([user_id]), plan.candidates[row : row + 1]), k)
        slates.latency_ms[row] = (time.perf_counter() - start) * 1000


def _interleave_in_process(
    slates: Slates,
    plan: RequestPlan,
    world: World,
    arms: tuple[Arm, Arm],
    rankers: Mapping[str, SlateRanker],
    spec: SimulationSpec,
    rng: np.random.Generator,
) -> None:
    """Every request's team-draft slate of the two arms' rankings; the first
    ``latency_requests`` timed one at a time, both rankings and the merge, as the server
    does them (the first once untimed)."""
    k, user_ids = spec.k, world.population.user_ids[plan.users]
    pair = [rankers[arm.model] for arm in arms]

    def slate(users: np.ndarray, candidates: np.ndarray, draws: np.random.Generator):
        first, second = (top_k(ranker.score_lists(users, candidates), k) for ranker in pair)
        return team_draft(first, second, k, draws)

    slates.shown[:], teams = slate(user_ids, plan.candidates, rng)
    slates.teams[:] = np.array([arm.name for arm in arms], dtype=object)[teams]
    slates.models[:] = "+".join(ranker.name for ranker in pair)
    slates.versions[:] = "+".join(ranker.version for ranker in pair)
    timed = np.arange(min(spec.latency_requests, len(user_ids)))
    for row in [*timed[:1], *timed]:
        start = time.perf_counter()
        slate(user_ids[row : row + 1], plan.candidates[row : row + 1], np.random.default_rng(row))
        slates.latency_ms[row] = (time.perf_counter() - start) * 1000


def _rank_online(
    slates: Slates,
    plan: RequestPlan,
    world: World,
    rows: np.ndarray,
    server: Server,
    k: int,
) -> None:
    """``POST /rank`` each request in turn, then read what was shown from the impression log."""
    user_ids = world.population.user_ids[plan.users[rows]]
    row_of_request = {}
    with httpx2.Client(base_url=server.url, timeout=30.0) as client:
        for row, user_id in zip(rows, user_ids):
            body = {"user_id": int(user_id), "candidates": plan.candidates[row].tolist(), "k": k}
            start = time.perf_counter()
            response = client.post("/rank", json=body)
            slates.round_trip_ms[row] = (time.perf_counter() - start) * 1000
            if response.status_code != 200:
                raise RuntimeError(f"POST /rank answered {response.status_code}: {response.text}")
            request_id = response.json()["request_id"]
            row_of_request[request_id] = row

    logged = (
        pd.DataFrame(read_log(server.impressions)).set_index("request_id").loc[list(row_of_request)]
    )
    logged_rows = np.fromiter(row_of_request.values(), dtype=np.int64)
    mismatched = logged["arm"].to_numpy() != slates.arms[logged_rows]
    if mismatched.any():
        first = logged.index[np.argmax(mismatched)]
        raise RuntimeError(
            f"the server routed request {first} (user {logged.loc[first, 'user_id']}) to arm "
            f"{logged.loc[first, 'arm']!r}; recdistill.routing says "
            f"{slates.arms[row_of_request[first]]!r}"
        )
    items = np.stack(logged["items"].to_numpy())
    if slates.teams is not None:
        slates.teams[logged_rows] = np.stack(logged["teams"].to_numpy())
    slates.request_ids[logged_rows] = logged.index.to_numpy()
    slates.models[logged_rows] = logged["model"].to_numpy()
    slates.versions[logged_rows] = logged["version"].to_numpy()
    slates.latency_ms[logged_rows] = logged["latency_ms"].to_numpy()
    slates.shown[logged_rows] = _columns_of(plan.candidates[logged_rows], items)


def post_clicks(server: Server, log: pd.DataFrame) -> None:
    """``POST /feedback`` every click of the experiment period, as the client that saw it
    would report it."""
    clicked = log[(log["period"] == EXPERIMENT) & (log["n_clicks"] > 0)]
    with httpx2.Client(base_url=server.url, timeout=30.0) as client:
        for row in clicked.itertuples():
            for item in np.asarray(row.items)[np.asarray(row.clicks, dtype=bool)]:
                body = {"request_id": row.request_id, "item_id": int(item), "event": "click"}
                response = client.post("/feedback", json=body)
                if response.status_code != 200:
                    raise RuntimeError(
                        f"POST /feedback answered {response.status_code}: {response.text}"
                    )


def _columns_of(candidates: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Per row, the column of each of ``items`` in ``candidates`` (every item is present)."""
    order = np.argsort(candidates, axis=1)
    ordered = np.take_along_axis(candidates, order, axis=1)
    found = np.stack([np.searchsorted(c, i) for c, i in zip(ordered, items)])
    return np.take_along_axis(order, found, axis=1)
