import warnings

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm

from recdistill.ab_spec import SimulationSpec
from recdistill.abtest.analysis import SampleRatioMismatch, analyse, compare
from recdistill.abtest.simulate import simulate
from recdistill.abtest.world import World
from tests.abtest.conftest import experiment


def users(rng: np.random.Generator, n: int, ctr: float, impressions=None) -> pd.DataFrame:
    """Per-user totals with heterogeneous click rates; the pre-period shares each user's rate."""
    rate = rng.beta(2.0, 2.0 / ctr - 2.0, size=n)
    shown = rng.poisson(20, size=n) + 1 if impressions is None else np.full(n, impressions)
    pre_shown = rng.poisson(20, size=n) + 1 if impressions is None else np.full(n, impressions)
    return pd.DataFrame(
        {
            "impressions": shown,
            "clicks": rng.binomial(shown, rate),
            "pre_impressions": pre_shown,
            "pre_clicks": rng.binomial(pre_shown, rate),
        }
    )


def test_the_delta_method_matches_a_user_bootstrap():
    rng = np.random.default_rng(0)
    treatment, baseline = users(rng, 1500, 0.06), users(rng, 1500, 0.05)
    lift = compare(treatment, baseline, "ctr", level=0.95, cuped=False)
    ratio = treatment["clicks"].sum() / treatment["impressions"].sum()
    ratio /= baseline["clicks"].sum() / baseline["impressions"].sum()
    assert lift.lift == pytest.approx(ratio - 1)

    def resampled_ctr(frame: pd.DataFrame) -> np.ndarray:
        rows = rng.integers(0, len(frame), size=(2000, len(frame)))
        clicks, shown = frame["clicks"].to_numpy()[rows], frame["impressions"].to_numpy()[rows]
        return clicks.sum(axis=1) / shown.sum(axis=1)

    bootstrap_se = np.std(np.log(resampled_ctr(treatment) / resampled_ctr(baseline)))
    delta_se = (np.log1p(lift.ci_high) - np.log1p(lift.ci_low)) / (2 * 1.959964)
    assert delta_se == pytest.approx(bootstrap_se, rel=0.08)


def test_cuped_is_the_ancova_estimate_for_equal_exposure():
    """With the same impressions for everyone, the CUPED difference in CTR is the treatment
    coefficient of OLS ``ctr ~ 1 + treated + pre_ctr`` (statsmodels)."""
    rng = np.random.default_rng(1)
    treatment, baseline = users(rng, 800, 0.06, impressions=30), users(rng, 700, 0.05, 30)
    lift = compare(treatment, baseline, "ctr", level=0.95, cuped=True)
    both = pd.concat([treatment.assign(treated=1.0), baseline.assign(treated=0.0)])
    design = sm.add_constant(
        pd.DataFrame({"treated": both["treated"], "pre": both["pre_clicks"] / 30})
    )
    ols = sm.OLS(both["clicks"] / 30, design).fit()
    assert lift.treatment_mean - lift.baseline_mean == pytest.approx(ols.params["treated"])
    assert lift.variance_reduction > 0.2  # the pre-period shares each user's rate


def test_power_and_minimum_detectable_effect_agree():
    rng = np.random.default_rng(2)
    lift = compare(users(rng, 1000, 0.05), users(rng, 1000, 0.05), "ctr", level=0.95, cuped=True)
    mde = lift.minimum_detectable(0.8, 0.05)
    assert lift.power(mde, 0.05) == pytest.approx(0.8, abs=1e-4)
    assert lift.users_needed(mde, 0.8, 0.05) == pytest.approx(1000, rel=1e-3)
    assert lift.power(2 * mde, 0.05) > 0.99


# The default retrieval and slate (100 candidates, top 10), not the calibration tests' quick one.
DEFAULT_RETRIEVAL = {
    name: getattr(SimulationSpec(data=""), name)
    for name in ("candidates", "popular_share", "popular_pool", "k")
}
SPLIT = {"control": ("popularity", 0.5), "treatment": ("popularity", 0.5)}


def test_a_broken_split_is_flagged_and_blocks_the_decision(
    synthetic_dir, small_world, popularity_ranker
):
    """60/40 delivered while 50/50 is configured: the chi-square check warns, no verdict."""
    delivered = experiment(
        synthetic_dir,
        {"control": ("popularity", 0.6), "treatment": ("popularity", 0.4)},
        ship=("treatment", "control"),
    )
    configured = experiment(synthetic_dir, SPLIT, ship=("treatment", "control"))
    log = simulate(small_world, delivered, {"popularity": popularity_ranker})
    with pytest.warns(SampleRatioMismatch, match="SAMPLE RATIO MISMATCH"):
        analysis = analyse(log, configured, [])
    assert analysis.srm.mismatch and analysis.srm.p_value < 1e-3
    assert analysis.ship is None and analysis.verdict.startswith("NO DECISION")

    with warnings.catch_warnings():
        warnings.simplefilter("error", SampleRatioMismatch)
        balanced = analyse(
            simulate(small_world, configured, {"popularity": popularity_ranker}), configured, []
        )
    assert not balanced.srm.mismatch and balanced.ship is not None


def test_models_of_known_quality_beat_the_control(
    synthetic_dir, truth_ranker, popularity_ranker, noisy_truth_ranker
):
    """The oracle (as "teacher") and a noisier oracle (as "student") both beat popularity with
    Holm-corrected significance; the student vs teacher comparison is reported too."""
    spec = experiment(
        synthetic_dir,
        {"control": ("popularity", 0.34), "teacher": ("truth", 0.33), "student": ("noisy", 0.33)},
        # ~130 users an arm: slices of 30 (not the default 50) so that every world's tiers show.
        analysis={"min_users": 30},
        days=7,
        requests_per_day=1.0,
        **DEFAULT_RETRIEVAL,
    )
    rankers = {"popularity": popularity_ranker, "truth": truth_ranker, "noisy": noisy_truth_ranker}
    log = simulate(World.load(spec.simulation, spec.clicks), spec, rankers)
    analysis = analyse(log, spec, ["activity_tier"])
    ctr = analysis.lifts[analysis.lifts["metric"] == "ctr"].set_index(["treatment", "baseline"])
    for arm in ("teacher", "student"):
        assert ctr.loc[(arm, "control"), "significant"]
        assert ctr.loc[(arm, "control"), "lift"] > 0.2
    assert ctr.loc[("student", "teacher"), "lift"] < 0
    ndcg = analysis.arms[analysis.arms["segment"] == "all"].set_index("arm")["ndcg"]
    assert ndcg["teacher"] == pytest.approx(1.0) and ndcg["control"] < ndcg["student"] < 1.0
    assert set(analysis.segments["segment"]) == {"activity_tier"}
    assert analysis.daily["day"].max() == 6
    assert "student" in analysis.verdict and "teacher" in analysis.verdict
