"""Judge a simulated experiment from its per-request log, with users as the unit.

Users are randomised, so every uncertainty is computed over users, never impressions. Each
metric is a ratio of per-user sums, ``R = sum(Y) / sum(N)``: CTR is clicks / impressions,
clicks per request is clicks / requests, NDCG@k is summed slate NDCG / requests. Its
variance comes from the delta method (Deng et al., 2018) through the linearised per-user
value ``l_u = (Y_u - R N_u) / mean(N)``: ``Var(R) ~ var(l) / n``.

- **Lift** of treatment over baseline is ``R_t / R_b - 1``. Inference is on the log ratio,
  whose distribution is far more symmetric than the ratio's in small arms: standard error
  ``sqrt(Var(R_t) / R_t^2 + Var(R_b) / R_b^2)``, CI ``exp(log ratio ± z se) - 1``, a
  two-sided z-test; p-values are Holm-corrected across the experiment's comparisons (per
  metric) and across the slices of each comparison.
- **CUPED**: the covariate is each user's linearised metric in the pre-period, when everyone
  saw the control model, ``m_u``; ``theta = cov(l, m) / var(m)`` pooled within arms, and
  each arm's ``R`` and ``l`` are adjusted by ``-theta (m - mean(m))`` (the arm's mean of
  ``m`` against the pooled mean, for ``R``).
- **Power**: the per-user standard deviation of ``l`` and the arms' sizes give, through
  ``statsmodels``' ``NormalIndPower``, the minimum detectable relative lift at the configured
  power and the power against any given lift.
- **Sample ratio mismatch**: a chi-square test of users per arm against the configured
  shares; a small p-value means the split itself is broken and nothing else can be trusted.
- **Non-inferiority**: a lift whose CI's lower bound is above ``-margin`` is non-inferior,
  one whose upper bound is below it is worse beyond the margin, one whose CI straddles it is
  inconclusive (:func:`non_inferiority`); the verdict applies it to the ship pair, the
  report to every comparison and slice.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats
from statsmodels.stats.power import NormalIndPower

from recdistill.ab_spec import METRICS, AnalysisSpec, ExperimentSpec
from recdistill.abtest.simulate import EXPERIMENT
from recdistill.segments import natural_order
from recdistill.stats import holm

ALL = "all"
# Where a lift's CI lies against the non-inferiority margin (see non_inferiority).
NON_INFERIOR, INCONCLUSIVE, INFERIOR = "non-inferior", "inconclusive", "inferior"
# Per-user numerator and denominator sums of each metric.
RATIOS = {
    "ctr": ("clicks", "impressions"),
    "clicks_per_request": ("clicks", "requests"),
    "ndcg": ("ndcg", "requests"),
    "conversions_per_request": ("conversions", "requests"),
}


# Per-request log columns summed per user (those the log has), and the names of the sums.
SUMMED = {
    "n_shown": "impressions",
    "n_clicks": "clicks",
    "ndcg": "ndcg",
    "n_conversions": "conversions",
}


class SampleRatioMismatch(UserWarning):
    """Users per arm are not what the configured traffic shares predict."""


@dataclass(frozen=True)
class Lift:
    """Relative lift of a treatment over a baseline on one metric, with its uncertainty.

    ``relative_sd`` is the per-user s.d. of the linearised metric over its mean, pooled over
    both arms so that the log ratio's ``se = relative_sd sqrt(1/n_t + 1/n_b)``: the effect
    size ``NormalIndPower`` works with is ``log(1 + lift) / relative_sd``.
    """

    treatment_users: int
    baseline_users: int
    treatment_mean: float
    baseline_mean: float
    lift: float
    ci_low: float
    ci_high: float
    p_value: float
    relative_sd: float
    variance_reduction: float  # by CUPED; 0 without

    def power(self, lift: float, alpha: float) -> float:
        """Probability that a two-sided test at ``alpha`` detects a true relative ``lift``."""
        return float(
            NormalIndPower().power(
                np.log1p(lift) / self.relative_sd,
                nobs1=self.treatment_users,
                alpha=alpha,
                ratio=self.baseline_users / self.treatment_users,
            )
        )

    def minimum_detectable(self, power: float, alpha: float) -> float:
        """The smallest relative lift (upwards) detected with probability ``power``."""
        effect_size = NormalIndPower().solve_power(
            nobs1=self.treatment_users,
            alpha=alpha,
            power=power,
            ratio=self.baseline_users / self.treatment_users,
        )
        return float(np.expm1(effect_size * self.relative_sd))

    def users_needed(self, lift: float, power: float, alpha: float) -> float:
        """Treatment users (baseline users in today's ratio) to detect ``lift`` so."""
        return float(
            NormalIndPower().solve_power(
                abs(np.log1p(lift)) / self.relative_sd,
                alpha=alpha,
                power=power,
                ratio=self.baseline_users / self.treatment_users,
            )
        )


@dataclass(frozen=True)
class SrmCheck:
    arms: tuple[str, ...]
    observed: tuple[int, ...]
    expected: tuple[float, ...]
    statistic: float
    p_value: float
    alpha: float
    # What is counted per arm: users (an A/B's split), or first picks (interleaving's coin).
    unit: str = "users"

    @property
    def mismatch(self) -> bool:
        return self.p_value < self.alpha

    def describe(self) -> str:
        counts = ", ".join(
            f"{arm} {seen:,} (expected {expected:,.0f})"
            for arm, seen, expected in zip(self.arms, self.observed, self.expected)
        )
        verdict = "SAMPLE RATIO MISMATCH" if self.mismatch else "No sample ratio mismatch"
        return (
            f"{verdict}: {self.unit} per arm {counts}; chi-square {self.statistic:.2f}, "
            f"p = {self.p_value:.3g} (a mismatch below {self.alpha:g})"
        )


@dataclass(frozen=True)
class Analysis:
    arms: pd.DataFrame  # per arm and slice: users, requests, each metric with CI, latency
    lifts: pd.DataFrame  # per comparison and metric, all users
    segments: pd.DataFrame  # per comparison and slice, the decision metric
    daily: pd.DataFrame  # per comparison and day, cumulative lift on the decision metric
    srm: SrmCheck
    verdict: str
    ship: bool | None  # None: no decision (the split is broken)


def user_totals(log: pd.DataFrame, segments: Sequence[str] = ()) -> pd.DataFrame:
    """One row per user exposed in the experiment period (index ``user_id``): arm,
    ``segments``, the sums of requests, impressions, clicks and NDCG, and the same sums over
    the user's pre-period as ``pre_*`` (0 without pre-period requests)."""
    experiment = (log["period"] == EXPERIMENT).to_numpy()
    users = log[experiment].groupby("user_id")[["arm", *segments]].first()
    users = users.join(_sums(log[experiment]))
    return users.join(_sums(log[~experiment]).add_prefix("pre_")).fillna(0)


def _sums(log: pd.DataFrame) -> pd.DataFrame:
    grouped = log.groupby("user_id")
    totals = grouped[[column for column in SUMMED if column in log]].sum().rename(columns=SUMMED)
    return totals.assign(requests=grouped.size())


def compare(
    treatment: pd.DataFrame, baseline: pd.DataFrame, metric: str, *, level: float, cuped: bool
) -> Lift:
    """The lift of ``treatment`` over ``baseline`` users (rows of :func:`user_totals`)."""
    numerator, denominator = RATIOS[metric]
    groups = (treatment, baseline)
    ratios, linear = zip(*(_linearised(g[numerator], g[denominator]) for g in groups))
    ratios, linear = list(ratios), list(linear)
    raw_variance = sum(float(np.var(values, ddof=1)) for values in linear)
    if cuped:
        ratios, linear = _cuped(groups, ratios, linear, numerator, denominator)
    (n_t, n_b), (r_t, r_b) = (len(g) for g in groups), ratios
    relative_var_t, relative_var_b = (
        float(np.var(values, ddof=1)) / r**2 for values, r in zip(linear, ratios)
    )
    log_ratio = float(np.log(r_t / r_b))
    se = np.sqrt(relative_var_t / n_t + relative_var_b / n_b)
    z = stats.norm.ppf(0.5 + level / 2)
    cuped_variance = sum(float(np.var(values, ddof=1)) for values in linear)
    return Lift(
        treatment_users=n_t,
        baseline_users=n_b,
        treatment_mean=float(r_t),
        baseline_mean=float(r_b),
        lift=float(np.expm1(log_ratio)),
        ci_low=float(np.expm1(log_ratio - z * se)),
        ci_high=float(np.expm1(log_ratio + z * se)),
        p_value=float(2 * stats.norm.sf(abs(log_ratio) / se)),
        relative_sd=float(se / np.sqrt(1 / n_t + 1 / n_b)),
        variance_reduction=1.0 - cuped_variance / raw_variance if raw_variance else 0.0,
    )


def _linearised(numerator: pd.Series, denominator: pd.Series) -> tuple[float, np.ndarray]:
    ratio = numerator.sum() / denominator.sum()
    return float(ratio), ((numerator - ratio * denominator) / denominator.mean()).to_numpy()


def _cuped(
    groups: tuple[pd.DataFrame, pd.DataFrame],
    ratios: list[float],
    linear: list[np.ndarray],
    numerator: str,
    denominator: str,
) -> tuple[list[float], list[np.ndarray]]:
    """The arms' ratios and linearised values adjusted by the pre-period covariate."""
    pre_numerator = pd.concat([g[f"pre_{numerator}"] for g in groups])
    pre_denominator = pd.concat([g[f"pre_{denominator}"] for g in groups])
    if pre_denominator.sum() == 0:
        return ratios, linear
    pre_ratio = pre_numerator.sum() / pre_denominator.sum()
    covariates = [
        (
            (g[f"pre_{numerator}"] - pre_ratio * g[f"pre_{denominator}"]) / pre_denominator.mean()
        ).to_numpy()
        for g in groups
    ]
    centred = [m - m.mean() for m in covariates]
    spread = sum(float(c @ c) for c in centred)
    if spread == 0:
        return ratios, linear
    theta = sum(float(c @ values) for c, values in zip(centred, linear)) / spread
    pooled_mean = np.concatenate(covariates).mean()
    ratios = [r - theta * (m.mean() - pooled_mean) for r, m in zip(ratios, covariates)]
    linear = [values - theta * c for values, c in zip(linear, centred)]
    return ratios, linear


def check_sample_ratio(users: pd.DataFrame, experiment: ExperimentSpec) -> SrmCheck:
    arms = experiment.routing.arms
    observed = users["arm"].value_counts().reindex([arm.name for arm in arms], fill_value=0)
    expected = np.array([arm.share for arm in arms]) * observed.sum()
    result = stats.chisquare(observed.to_numpy(), expected)
    check = SrmCheck(
        arms=tuple(observed.index),
        observed=tuple(int(v) for v in observed),
        expected=tuple(float(v) for v in expected),
        statistic=float(result.statistic),
        p_value=float(result.pvalue),
        alpha=experiment.analysis.srm_alpha,
    )
    if check.mismatch:
        warnings.warn(check.describe(), SampleRatioMismatch, stacklevel=2)
    return check


def analyse(log: pd.DataFrame, experiment: ExperimentSpec, segments: Sequence[str]) -> Analysis:
    """The experiment's analysis: an A/B test's here, an interleaved one's by
    :func:`recdistill.abtest.preference.analyse_interleaving`."""
    if experiment.routing.interleaved:
        from recdistill.abtest.preference import analyse_interleaving

        return analyse_interleaving(log, experiment, segments)
    spec = experiment.analysis
    if spec.metric not in measured_metrics(log):
        raise ValueError(
            f"[analysis] metric {spec.metric!r}: this experiment's log does not measure it"
        )
    users = user_totals(log, segments)
    srm = check_sample_ratio(users, experiment)
    slices = slices_of(users, segments)
    comparisons = experiment.comparisons

    lifts = []
    for metric in measured_metrics(log):
        rows = [_lift_row(users, pair, metric, spec) for pair in comparisons]
        for row, adjusted in zip(rows, holm(np.array([r["p_value"] for r in rows]))):
            row["p_holm"] = float(adjusted)
            row["significant"] = bool(adjusted <= spec.alpha)
        lifts += rows
    lifts = pd.DataFrame(lifts)

    sliced = []
    for pair in comparisons:
        rows = [
            {"segment": segment, "value": value} | _lift_row(users[chosen], pair, spec.metric, spec)
            for segment, value, chosen in slices[1:]
            if _enough(users[chosen], pair, spec.min_users)
        ]
        adjusted = holm(np.array([r["p_value"] for r in rows])) if rows else []
        for row, p in zip(rows, adjusted):
            row["p_holm"] = float(p)
        sliced += rows

    daily = []
    for day in sorted(log.loc[log["period"] == EXPERIMENT, "day"].unique()):
        so_far = user_totals(log[log["day"] <= day])
        daily += [
            {"day": day} | _lift_row(so_far, pair, spec.metric, spec)
            for pair in comparisons
            if _enough(so_far, pair, 2)
        ]
    ship, verdict = _verdict(users, srm, experiment)
    return Analysis(
        arms=_arm_table(log, users, slices, experiment),
        lifts=lifts,
        segments=pd.DataFrame(sliced),
        daily=pd.DataFrame(daily),
        srm=srm,
        verdict=verdict,
        ship=ship,
    )


def measured_metrics(log: pd.DataFrame) -> list[str]:
    """The metrics the log measures: NDCG@k only where the slates were graded by a truth
    (live traffic has none), conversions where they were reported (live traffic)."""
    measured = {
        "ndcg": log["ndcg"].notna().any(),
        "conversions_per_request": "n_conversions" in log and log["n_conversions"].any(),
    }
    return [metric for metric in METRICS if measured.get(metric, True)]


def slices_of(users: pd.DataFrame, segments: Sequence[str]) -> list[tuple[str, str, np.ndarray]]:
    slices = [(ALL, ALL, np.ones(len(users), dtype=bool))]
    for segment in segments:
        for value in sorted(users[segment].unique(), key=lambda v: natural_order(str(v))):
            slices.append((segment, value, (users[segment] == value).to_numpy()))
    return slices


def _enough(users: pd.DataFrame, pair: tuple[str, str], least: int) -> bool:
    counts = users["arm"].value_counts()
    return all(counts.get(arm, 0) >= least for arm in pair)


def _compare_arms(
    users: pd.DataFrame, pair: tuple[str, str], metric: str, spec: AnalysisSpec
) -> Lift:
    treatment, baseline = (users[users["arm"] == arm] for arm in pair)
    return compare(treatment, baseline, metric, level=1.0 - spec.alpha, cuped=spec.cuped)


def _lift_row(
    users: pd.DataFrame, pair: tuple[str, str], metric: str, spec: AnalysisSpec
) -> dict[str, Any]:
    lift = _compare_arms(users, pair, metric, spec)
    return {
        "treatment": pair[0],
        "baseline": pair[1],
        "metric": metric,
        **dataclasses.asdict(lift),
        "mde": lift.minimum_detectable(spec.power, spec.alpha),
    }


def _arm_table(
    log: pd.DataFrame,
    users: pd.DataFrame,
    slices: list[tuple[str, str, np.ndarray]],
    experiment: ExperimentSpec,
) -> pd.DataFrame:
    z = stats.norm.ppf(1.0 - experiment.analysis.alpha / 2)
    experiment_log = log[log["period"] == EXPERIMENT]
    rows = []
    for segment, value, chosen in slices:
        for arm in experiment.routing.arms:
            group = users[chosen & (users["arm"] == arm.name).to_numpy()]
            if len(group) < 2:
                continue
            row = {
                "segment": segment,
                "value": value,
                "arm": arm.name,
                "model": arm.model,
                "users": len(group),
                "requests": int(group["requests"].sum()),
            }
            for metric in measured_metrics(log):
                numerator, denominator = RATIOS[metric]
                ratio, linear = _linearised(group[numerator], group[denominator])
                half = z * np.std(linear, ddof=1) / np.sqrt(len(group))
                row |= {
                    metric: ratio,
                    f"{metric}_low": ratio - half,
                    f"{metric}_high": ratio + half,
                }
            if segment == ALL:
                row |= latency_columns(experiment_log[experiment_log["arm"] == arm.name])
            rows.append(row)
    return pd.DataFrame(rows)


def latency_columns(requests: pd.DataFrame) -> dict[str, float]:
    """p50 and p99 of the server's latency and the client's round trip over ``requests``
    (NaN where not measured), and, for a log with times (a server's), the requests per
    second over its time span."""
    columns = {}
    for column in ("latency_ms", "round_trip_ms"):
        values = requests[column].dropna() if column in requests else []
        p50, p99 = np.percentile(values, [50, 99]) if len(values) else (np.nan,) * 2
        columns |= {f"{column}_p50": p50, f"{column}_p99": p99}
    span = requests["time"].max() - requests["time"].min() if "time" in requests else 0.0
    columns["throughput_rps"] = len(requests) / span if span > 0 else np.nan
    return columns


def non_inferiority(ci_low: float, ci_high: float, margin: float) -> str:
    """Where a relative lift's CI lies against the non-inferiority ``margin``:
    :data:`NON_INFERIOR` if its lower bound is above ``-margin``, :data:`INFERIOR` if its
    upper bound is below it, :data:`INCONCLUSIVE` if it straddles it."""
    if ci_low > -margin:
        return NON_INFERIOR
    if ci_high < -margin:
        return INFERIOR
    return INCONCLUSIVE


def _verdict(
    users: pd.DataFrame, srm: SrmCheck, experiment: ExperimentSpec
) -> tuple[bool | None, str]:
    """Non-inferiority of the ship pair: ship if the CI's lower bound is above ``-margin``;
    not if the CI straddles it (inconclusive) or lies below; no decision on a broken split."""
    spec = experiment.analysis
    treatment, baseline = spec.ship
    lift = _compare_arms(users, spec.ship, spec.metric, spec)
    label = METRICS[spec.metric]
    estimate = (
        f"{label} lift over {baseline} {lift.lift:+.2%} [{lift.ci_low:+.2%}, {lift.ci_high:+.2%}]"
    )
    rule = (
        f"rule: ship {treatment} if the lower bound of the {1 - spec.alpha:.0%} CI of its "
        f"relative {label} lift over {baseline} is above -{spec.margin:.1%} (non-inferiority)"
    )
    standing = non_inferiority(lift.ci_low, lift.ci_high, spec.margin)
    if srm.mismatch:
        return None, f"NO DECISION: sample ratio mismatch; {estimate}; {rule}"
    return ship_verdict(standing, treatment, estimate, rule, "users per arm", lift, spec)


def ship_verdict(
    standing: str,
    treatment: str,
    estimate: str,
    rule: str,
    unit: str,
    effect: Any,
    spec: AnalysisSpec,
) -> tuple[bool, str]:
    """The verdict a non-inferiority ``standing`` gives, an A/B's or an interleaving's; when
    inconclusive, how many ``unit`` ``effect.users_needed`` says would settle it."""
    if standing == NON_INFERIOR:
        return True, f"SHIP {treatment}: {estimate}; {rule}"
    if standing == INFERIOR:
        return False, f"DO NOT SHIP {treatment}: worse beyond the margin, {estimate}; {rule}"
    needed = effect.users_needed(spec.margin, spec.power, spec.alpha)
    return False, (
        f"DO NOT SHIP {treatment} (inconclusive): {estimate} straddles the margin; about "
        f"{needed:,.0f} {unit} would show non-inferiority with {spec.power:.0%} power "
        f"if the two truly perform the same; {rule}"
    )
