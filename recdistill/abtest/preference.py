"""Judge an interleaved experiment from its per-request log, with users as the unit.

Every request showed one slate merged from both arms' rankings (team-draft,
:mod:`recdistill.interleaving`), and each click credits the arm that placed the clicked item.
Per user: the clicks credited to the treatment ``T_u`` and to the baseline ``B_u``; the user
*prefers* the arm credited more (a win for the treatment, a loss, or a tie, which includes
users who clicked nothing).

- **Preference share**: the treatment's share of all credited clicks, ``S = R / (1 + R)``
  with ``R = sum(T) / sum(B)``, the ratio of the clicks each arm's items earned when shown
  side by side. ``R`` is a ratio of per-user sums, so its uncertainty comes from the delta
  method over users, as the A/B's metrics' does: ``l_u = (T_u - R B_u) / mean(B)``,
  ``Var(R) ~ var(l) / n``; inference is on ``log R`` (CI ``exp(log R ± z se)``, a two-sided
  z-test of ``R = 1``, i.e. ``S = 1/2``) and carried over to ``S``. Both arms are seen by the
  same users, so there is no between-user variance to remove: no CUPED, no pre-period.
- **Direction**: the treatment is *preferred* when the CI of ``S`` lies above 1/2, *not
  preferred* when it lies below, and otherwise there is *no detectable preference*.
- **Non-inferiority** within the A/B's relative ``margin``: the CI's lower bound of
  ``R - 1`` (the relative lift of the treatment's clicks over the baseline's) above
  ``-margin``, i.e. ``S`` above ``(1 - margin) / (2 - margin)``; ship on it.
- **The coin check**: which arm picks first in a round is a fair coin, so the requests whose
  first item each arm placed are tested against 50 / 50 (chi-square), as the A/B tests its
  split; a failing coin blocks the verdict.
- **Power**: with ``sigma`` the per-user s.d. of ``l`` over ``R``, ``se(log R) = sigma /
  sqrt(n)``; users needed to detect a relative lift ``d`` with power ``1 - beta`` at ``alpha``:
  ``((z_{1-alpha/2} + z_{1-beta}) sigma / |log(1 + d)|) ** 2``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from recdistill.ab_spec import AnalysisSpec, ExperimentSpec
from recdistill.abtest.analysis import (
    ALL,
    Analysis,
    SampleRatioMismatch,
    SrmCheck,
    latency_columns,
    non_inferiority,
    ship_verdict,
    slices_of,
)
from recdistill.abtest.simulate import EXPERIMENT
from recdistill.stats import holm

PREFERENCE = "preference"
PREFERRED, NOT_PREFERRED, NO_PREFERENCE = "preferred", "not preferred", "no detectable preference"


@dataclass(frozen=True)
class Preference:
    """The treatment's preference over the baseline among ``users`` (see the module)."""

    users: int
    wins: int
    losses: int
    ties: int
    treatment_clicks: float
    baseline_clicks: float
    share: float
    share_low: float
    share_high: float
    lift: float  # of the clicks credited to the treatment over the baseline's
    ci_low: float
    ci_high: float
    p_value: float
    relative_sd: float

    @property
    def direction(self) -> str:
        if self.share_low > 0.5:
            return PREFERRED
        if self.share_high < 0.5:
            return NOT_PREFERRED
        return NO_PREFERENCE

    def users_needed(self, lift: float, power: float, alpha: float) -> float:
        """Users for a test at ``alpha`` to detect a true relative ``lift`` with ``power``."""
        z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
        return float((z * self.relative_sd / abs(np.log1p(lift))) ** 2)

    def minimum_detectable(self, power: float, alpha: float) -> float:
        """The smallest relative lift (upwards) detected with probability ``power``."""
        z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
        return float(np.expm1(z * self.relative_sd / np.sqrt(self.users)))


def share_floor(margin: float) -> float:
    """The preference share a relative lift of ``-margin`` gives: the non-inferiority bar."""
    return (1 - margin) / (2 - margin)


def credit_totals(
    log: pd.DataFrame, pair: tuple[str, str], segments: Sequence[str] = ()
) -> pd.DataFrame:
    """Per user of the experiment period (index ``user_id``): ``segments``, requests, the
    clicks credited to each arm of ``pair`` (``treatment``, ``baseline``) and the items
    each placed."""
    log = log[(log["period"] == EXPERIMENT).to_numpy()]
    clicks = np.stack(log["clicks"].to_numpy()).astype(bool)
    teams = np.stack(log["teams"].to_numpy())
    per_request = pd.DataFrame(
        {
            "user_id": log["user_id"].to_numpy(),
            "requests": 1,
            **{
                column: (clicks & (teams == arm)).sum(axis=1)
                for column, arm in zip(("treatment", "baseline"), pair)
            },
            **{
                f"{column}_placed": (teams == arm).sum(axis=1)
                for column, arm in zip(("treatment", "baseline"), pair)
            },
        }
    )
    users = per_request.groupby("user_id").sum()
    if segments:
        users = log.groupby("user_id")[list(segments)].first().join(users)
    return users


def compare_preference(users: pd.DataFrame, level: float) -> Preference:
    """The preference of rows of :func:`credit_totals`, with a ``level`` CI."""
    treatment = users["treatment"].to_numpy(float)
    baseline = users["baseline"].to_numpy(float)
    n = len(users)
    difference = np.sign(treatment - baseline)
    totals = treatment.sum(), baseline.sum()
    counts = {
        "users": n,
        "wins": int((difference > 0).sum()),
        "losses": int((difference < 0).sum()),
        "ties": int((difference == 0).sum()),
        "treatment_clicks": float(totals[0]),
        "baseline_clicks": float(totals[1]),
    }
    if min(totals) == 0 or n < 2:  # no ratio to estimate
        nan = float("nan")
        return Preference(**counts, **dict.fromkeys(_ESTIMATES, nan), p_value=1.0)
    ratio = totals[0] / totals[1]
    linear = (treatment - ratio * baseline) / baseline.mean()
    relative_sd = float(np.std(linear, ddof=1) / ratio)
    se = relative_sd / np.sqrt(n)
    z = stats.norm.ppf(0.5 + level / 2)
    log_ratio = float(np.log(ratio))
    low, high = log_ratio - z * se, log_ratio + z * se
    return Preference(
        **counts,
        share=float(ratio / (1 + ratio)),
        share_low=float(stats.logistic.cdf(low)),
        share_high=float(stats.logistic.cdf(high)),
        lift=float(np.expm1(log_ratio)),
        ci_low=float(np.expm1(low)),
        ci_high=float(np.expm1(high)),
        p_value=float(2 * stats.norm.sf(abs(log_ratio) / se)) if se > 0 else 1.0,
        relative_sd=relative_sd,
    )


_ESTIMATES = ("share", "share_low", "share_high", "lift", "ci_low", "ci_high", "relative_sd")


def check_coin(log: pd.DataFrame, pair: tuple[str, str], spec: AnalysisSpec) -> SrmCheck:
    """Requests whose first shown item each arm placed, against a fair coin."""
    firsts = np.array([teams[0] for teams in log.loc[log["period"] == EXPERIMENT, "teams"]])
    observed = np.array([(firsts == arm).sum() for arm in pair])
    expected = np.full(2, observed.sum() / 2)
    result = stats.chisquare(observed, expected) if observed.sum() else None
    check = SrmCheck(
        arms=tuple(pair),
        observed=tuple(int(v) for v in observed),
        expected=tuple(float(v) for v in expected),
        statistic=float(result.statistic) if result else 0.0,
        p_value=float(result.pvalue) if result else 1.0,
        alpha=spec.srm_alpha,
        unit="first picks",
    )
    if check.mismatch:
        warnings.warn(check.describe(), SampleRatioMismatch, stacklevel=2)
    return check


def analyse_interleaving(
    log: pd.DataFrame, experiment: ExperimentSpec, segments: Sequence[str]
) -> Analysis:
    """The interleaved experiment's :class:`~recdistill.abtest.analysis.Analysis`: its
    ``lifts``, ``segments`` and ``daily`` rows carry the preference of the ship pair (the
    A/B's lift columns: the lift of the treatment's credited clicks), ``arms`` what each
    arm placed and earned."""
    spec = experiment.analysis
    pair = tuple(spec.ship)
    level = 1.0 - spec.alpha
    users = credit_totals(log, pair, segments)
    coin = check_coin(log, pair, spec)
    overall = compare_preference(users, level)
    lifts = pd.DataFrame([_row(pair, overall, spec) | {"p_holm": overall.p_value}])
    lifts["significant"] = lifts["p_holm"] <= spec.alpha

    sliced = [
        {"segment": segment, "value": value}
        | _row(pair, compare_preference(users[chosen], level), spec)
        for segment, value, chosen in slices_of(users, segments)[1:]
        if chosen.sum() >= spec.min_users
    ]
    for row, adjusted in zip(sliced, holm(np.array([r["p_value"] for r in sliced]))):
        row["p_holm"] = float(adjusted)

    experiment_log = log[log["period"] == EXPERIMENT]
    daily = [
        {"day": day}
        | _row(pair, compare_preference(credit_totals(log[log["day"] <= day], pair), level), spec)
        for day in sorted(experiment_log["day"].unique())
    ]
    ship, verdict = _verdict(overall, coin, experiment)
    return Analysis(
        arms=_arm_table(experiment_log, users, experiment),
        lifts=lifts,
        segments=pd.DataFrame(sliced),
        daily=pd.DataFrame(daily),
        srm=coin,
        verdict=verdict,
        ship=ship,
    )


def _row(pair: tuple[str, str], preference: Preference, spec: AnalysisSpec) -> dict:
    return {
        "treatment": pair[0],
        "baseline": pair[1],
        "metric": PREFERENCE,
        "treatment_users": preference.users,
        "baseline_users": preference.users,
        "treatment_mean": preference.treatment_clicks / max(preference.users, 1),
        "baseline_mean": preference.baseline_clicks / max(preference.users, 1),
        **{key: getattr(preference, key) for key in Preference.__dataclass_fields__},
        "mde": preference.minimum_detectable(spec.power, spec.alpha),
    }


def _arm_table(log: pd.DataFrame, users: pd.DataFrame, experiment: ExperimentSpec) -> pd.DataFrame:
    """Per arm: the items it placed, the clicks they earned and its items' CTR; latency and
    throughput are the interleaved request's, which both arms rank."""
    latency = latency_columns(log)
    rows = []
    for column, arm_name in zip(("treatment", "baseline"), experiment.analysis.ship):
        arm = next(a for a in experiment.routing.arms if a.name == arm_name)
        placed, clicks = users[f"{column}_placed"].sum(), users[column].sum()
        rows.append(
            {
                "segment": ALL,
                "value": ALL,
                "arm": arm.name,
                "model": arm.model,
                "users": len(users),
                "requests": int(users["requests"].sum()),
                "placed": int(placed),
                "credited_clicks": int(clicks),
                "placed_ctr": clicks / placed if placed else np.nan,
                **latency,
            }
        )
    return pd.DataFrame(rows)


def _verdict(
    preference: Preference, coin: SrmCheck, experiment: ExperimentSpec
) -> tuple[bool | None, str]:
    spec = experiment.analysis
    treatment, baseline = spec.ship
    estimate = (
        f"preference share {preference.share:.2%} [{preference.share_low:.2%}, "
        f"{preference.share_high:.2%}] ({preference.direction}; the clicks on its items vs "
        f"{baseline}'s {preference.lift:+.2%} [{preference.ci_low:+.2%}, "
        f"{preference.ci_high:+.2%}]; users preferring {treatment} {preference.wins:,}, "
        f"{baseline} {preference.losses:,}, neither {preference.ties:,})"
    )
    rule = (
        f"rule: ship {treatment} if the lower bound of the {1 - spec.alpha:.0%} CI of the "
        f"relative lift of the clicks on its items over {baseline}'s, interleaved, is above "
        f"-{spec.margin:.1%} (non-inferiority: a preference share above "
        f"{share_floor(spec.margin):.2%})"
    )
    if coin.mismatch:
        return None, f"NO DECISION: the interleaving coin is biased; {estimate}; {rule}"
    if np.isnan(preference.lift):
        return None, f"NO DECISION: no clicks credited to both arms; {rule}"
    standing = non_inferiority(preference.ci_low, preference.ci_high, spec.margin)
    return ship_verdict(standing, treatment, estimate, rule, "users", preference, spec)
