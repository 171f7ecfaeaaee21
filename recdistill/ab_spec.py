"""The experiment config's tables: one TOML file for ``recdistill abtest`` and ``recdistill
serve --ab``, read by :func:`recdistill.config.load_experiment`.

The server reads only ``[ab]`` (the salt, the arms and the design: an A/B test or
interleaving, see :mod:`recdistill.routing`); the
simulator also reads ``[artifacts]`` (served model name → artifact directory),
``[simulation]``, ``[clicks]`` and ``[analysis]``. Paths are relative to the working
directory. Every table is optional except ``[ab]``, ``[artifacts]`` and ``[simulation].data``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from recdistill.routing import Routing

TABLES = ("ab", "artifacts", "simulation", "clicks", "analysis")
MODES = ("offline", "online")
# Metric name → label; each is a ratio of per-user sums (see recdistill.abtest.analysis).
# NDCG@k needs a truth (simulations only), conversions a log that reports them (live traffic).
METRICS = {
    "ctr": "CTR",
    "clicks_per_request": "clicks / request",
    "ndcg": "NDCG@k",
    "conversions_per_request": "conversions / request",
}


@dataclass(frozen=True)
class SimulationSpec:
    """Who arrives, what retrieval proposes, how long the experiment runs.

    A user's requests per day are Poisson with mean ``requests_per_day`` times the arrival
    rate of their ``arrival_segment`` value (``arrival_rates``; unlisted values: 1). Each
    request's ``candidates`` are ``popular_share`` of them drawn from the ``popular_pool``
    most-interacted share of the catalogue and the rest uniformly from the other items; the
    arm shows its top ``k``. ``mode = "online"`` sends the experiment's requests through a
    real server; ``latency_requests`` per arm are timed one at a time in offline mode.
    ``oracle_l2`` is the EASE regularisation of the oracle on data without a ground truth.
    """

    data: str
    mode: str = "offline"
    users: int = 0  # users sampled from users.parquet; 0: all of them
    days: int = 14
    requests_per_day: float = 1.0
    arrival_segment: str = "activity_tier"
    arrival_rates: dict[str, float] = field(default_factory=dict)
    candidates: int = 100
    popular_share: float = 0.5
    popular_pool: float = 0.1
    k: int = 10
    seed: int = 0
    latency_requests: int = 200
    oracle_l2: float = 300.0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"[simulation]: mode must be one of {list(MODES)}, not {self.mode!r}")
        if self.users < 0 or self.days < 1 or self.requests_per_day <= 0:
            raise ValueError("[simulation]: users >= 0, days >= 1, requests_per_day > 0")
        if not 1 <= self.k <= self.candidates:
            raise ValueError(f"[simulation]: need 1 <= k <= candidates, got k = {self.k}")
        if not (0.0 <= self.popular_share <= 1.0 and 0.0 < self.popular_pool < 1.0):
            raise ValueError("[simulation]: popular_share in [0, 1], popular_pool in (0, 1)")
        if any(rate < 0 for rate in self.arrival_rates.values()):
            raise ValueError("[simulation]: arrival rates must be >= 0")


@dataclass(frozen=True)
class ClickSpec:
    """The position-based click model.

    P(click on the item at 0-based position ``j``) = ``examination(j) * attractiveness``, with
    ``examination(j) = 1 / (1 + j) ** eta`` and ``attractiveness = sigmoid(scale * (z - offset))``,
    ``z`` the oracle's relevance standardised over all user × item pairs: ``offset`` is how
    many standard deviations above the average pair a half-attractive item sits.
    """

    scale: float = 1.5
    offset: float = 3.5
    eta: float = 1.0

    def __post_init__(self) -> None:
        if self.scale <= 0 or self.eta < 0:
            raise ValueError("[clicks]: scale must be > 0 and eta >= 0")


@dataclass(frozen=True)
class AnalysisSpec:
    """How the experiment is judged.

    Every arm is compared with ``control``, and ``ship = [treatment, baseline]`` (e.g. the
    student against the teacher) besides; p-values are Holm-corrected across those
    comparisons, per metric. The ship rule is non-inferiority on ``metric``: ship if the
    lower bound of the ``1 - alpha`` CI of the relative lift of treatment over baseline is
    above ``-margin``; under interleaving the lift is that of the clicks credited to the
    treatment's items over those credited to the baseline's (``control``, CUPED and the
    pre-period do not apply). With ``cuped``, ``pre_days`` of pre-period (everyone on the control
    model) are simulated first and used as the CUPED covariate. ``power`` is the power the
    minimum detectable effects are stated at; a split whose sample-ratio-mismatch
    chi-square p-value is below ``srm_alpha`` is flagged. ``segments`` lists the user
    segment columns to slice by (empty: all of the data directory's); slices with fewer than
    ``min_users`` users in an arm are left out.
    """

    control: str = "control"
    ship: tuple[str, ...] = ()  # unset: the student's arm and the reference teacher's
    metric: str = "ctr"
    alpha: float = 0.05
    margin: float = 0.02
    power: float = 0.8
    cuped: bool = True
    pre_days: int = 14
    srm_alpha: float = 0.001
    segments: tuple[str, ...] = ()
    min_users: int = 50

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"[analysis]: metric must be one of {list(METRICS)}")
        if self.ship and (len(self.ship) != 2 or self.ship[0] == self.ship[1]):
            raise ValueError("[analysis]: ship is [treatment, baseline], two different arms")
        if not (0 < self.alpha < 1 and 0 < self.power < 1 and 0 < self.srm_alpha < 1):
            raise ValueError("[analysis]: alpha, power and srm_alpha must be in (0, 1)")
        if self.margin < 0 or self.pre_days < 0:
            raise ValueError("[analysis]: margin and pre_days must be >= 0")
        if self.cuped and self.pre_days == 0:
            raise ValueError("[analysis]: CUPED needs pre_days > 0")

    @property
    def simulated_pre_days(self) -> int:
        return self.pre_days if self.cuped else 0


@dataclass(frozen=True)
class ExperimentSpec:
    routing: Routing
    artifacts: dict[str, Path]
    simulation: SimulationSpec
    clicks: ClickSpec
    analysis: AnalysisSpec

    @property
    def pre_days(self) -> int:
        """Days simulated before the experiment, everyone on the control model: CUPED's
        covariate. None for interleaving, which compares the arms within every request."""
        return 0 if self.routing.interleaved else self.analysis.simulated_pre_days

    @property
    def comparisons(self) -> list[tuple[str, str]]:
        """(treatment, baseline) arm pairs: every arm against control, then the ship pair
        (interleaving: the ship pair alone, its two arms)."""
        if self.routing.interleaved:
            return [tuple(self.analysis.ship)]
        control = self.analysis.control
        pairs = [(arm.name, control) for arm in self.routing.arms if arm.name != control]
        if tuple(self.analysis.ship) not in pairs:
            pairs.append(tuple(self.analysis.ship))
        return pairs


@dataclass(frozen=True)
class ImpactSpec:
    """A sweep's ``[impact]``: the simulated experiments every candidate within the latency
    budget is judged by against the base run's reference teacher, on the sweep's data
    (``simulation.data`` is the sweep's ``--data``): an interleaving for each, an A/B test
    (50 / 50, CUPED on a pre-period on the teacher) for the finalists. ``analysis`` holds the
    rule's margin and level as an experiment's ``[analysis]`` does."""

    simulation: SimulationSpec = field(default_factory=lambda: SimulationSpec(data=""))
    clicks: ClickSpec = field(default_factory=ClickSpec)
    analysis: AnalysisSpec = field(default_factory=AnalysisSpec)
