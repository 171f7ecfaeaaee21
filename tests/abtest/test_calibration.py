"""Is the analysis calibrated? Many small simulated experiments with a known truth.

Every experiment re-runs the real simulator on the 400-user world with its own salt (a
fresh random split) and seed (fresh arrivals, candidates and clicks); both arms serve the
same ranker, so the only true difference is the one a test injects. The same holds for
interleaved experiments, where every user sees both arms.
"""

import numpy as np
import pytest
from scipy import stats

from recdistill.abtest.analysis import compare, user_totals
from recdistill.abtest.preference import compare_preference, credit_totals
from recdistill.abtest.simulate import simulate
from tests.abtest.conftest import experiment

ALPHA = 0.05
HALF_AND_HALF = {"control": ("popularity", 0.5), "treatment": ("popularity", 0.5)}
# A two-week pre-period: with fewer pre-period requests per user the CUPED covariate is
# noisy and the adjusted test runs slightly hot (about 6 % in 1,000 A/A runs at 7 days).
PRE_PERIOD = {"pre_days": 14}  # the default, spelled out: the band below depends on it


def experiments(synthetic_dir, world, ranker, runs: int, lift: float = 0.0):
    """Per run, the treatment's and the control's user totals. A ``lift`` divides the
    control's click probabilities by ``1 + lift`` (multiplying the treatment's could push
    some past 1, where they are capped)."""
    for run in range(runs):
        spec = experiment(
            synthetic_dir, HALF_AND_HALF, salt=f"calibration-{run}", seed=run, analysis=PRE_PERIOD
        )
        multiplier = {"control": 1 / (1 + lift)}
        log = simulate(world, spec, {"popularity": ranker}, click_multiplier=multiplier)
        users = user_totals(log)
        yield users[users["arm"] == "treatment"], users[users["arm"] == "control"]


@pytest.fixture(scope="module")
def aa_runs(synthetic_dir, small_world, popularity_ranker):
    return list(experiments(synthetic_dir, small_world, popularity_ranker, 400))


@pytest.mark.parametrize("cuped", [False, True])
def test_an_aa_test_rejects_at_the_nominal_rate(aa_runs, cuped):
    """Identical arms: 400 experiments should reject at 5 %; the binomial s.d. of the rate is
    1.1 points, so 3–7 % is a ±1.8 s.d. band."""
    lifts = [compare(*run, "ctr", level=1 - ALPHA, cuped=cuped) for run in aa_runs]
    rejected = np.mean([lift.p_value < ALPHA for lift in lifts])
    print(f"A/A rejection rate ({'CUPED' if cuped else 'plain'}): {rejected:.3f}")
    assert 0.03 <= rejected <= 0.07
    covered = np.mean([lift.ci_low <= 0.0 <= lift.ci_high for lift in lifts])
    assert covered == pytest.approx(1.0 - rejected)  # the CI and the test agree


def test_cuped_narrows_the_aa_intervals(aa_runs):
    """By how much depends on how persistent users' CTRs are: in the synthetic world, where
    much of the relevance varies by (user, item) pair, intervals come out about 5 % narrower."""
    plain, adjusted = (
        np.mean([compare(*run, "ctr", level=0.95, cuped=cuped).relative_sd for run in aa_runs])
        for cuped in (False, True)
    )
    assert adjusted < 0.97 * plain


def test_an_injected_effect_is_found_as_often_as_the_power_statement_says(
    synthetic_dir, small_world, popularity_ranker
):
    """A true +30 % CTR lift. Over 200 experiments the share that rejects must match the mean
    power each experiment's own statement predicts for that lift: within 7 points, twice the
    binomial s.d. at 50 % (3.5 points)."""
    effect = 0.3
    runs = experiments(synthetic_dir, small_world, popularity_ranker, 200, effect)
    lifts = [compare(*run, "ctr", level=1 - ALPHA, cuped=True) for run in runs]
    predicted = np.mean([lift.power(effect, ALPHA) for lift in lifts])
    achieved = np.mean([lift.p_value < ALPHA for lift in lifts])
    print(f"power predicted {predicted:.3f}, achieved {achieved:.3f}")
    assert 0.3 < predicted < 0.8  # a test with a real chance to miss
    assert abs(achieved - predicted) <= 0.07
    assert np.median([lift.lift for lift in lifts]) == pytest.approx(effect, abs=0.03)


def interleaved_experiments(synthetic_dir, world, ranker, runs: int, lift: float = 0.0):
    """Per run, the interleaved experiment's per-user credits, one model on both sides (its
    every slate is that model's own top k, each item's team a coin). A ``lift`` divides the
    click probabilities of the baseline's items by ``1 + lift``."""
    pair = {"treatment": ("popularity", 0.5), "baseline": ("popularity", 0.5)}
    for run in range(runs):
        spec = experiment(
            synthetic_dir,
            pair,
            design="interleaving",
            ship=("treatment", "baseline"),
            salt=f"interleaving-{run}",
            seed=run,
        )
        multiplier = {"baseline": 1 / (1 + lift)}
        log = simulate(world, spec, {"popularity": ranker}, click_multiplier=multiplier)
        yield credit_totals(log, ("treatment", "baseline"))


def test_an_interleaved_aa_test_rejects_at_the_nominal_rate(
    synthetic_dir, small_world, popularity_ranker
):
    """400 interleaved A/A experiments: 3–7 % rejected at α = 0.05, as the A/B's band."""
    runs = interleaved_experiments(synthetic_dir, small_world, popularity_ranker, 400)
    preferences = [compare_preference(users, 1 - ALPHA) for users in runs]
    rejected = np.mean([p.p_value < ALPHA for p in preferences])
    print(f"interleaved A/A rejection rate: {rejected:.3f}")
    assert 0.03 <= rejected <= 0.07
    covered = np.mean([p.share_low <= 0.5 <= p.share_high for p in preferences])
    assert covered == pytest.approx(1.0 - rejected)


def test_an_injected_preference_is_found_as_often_as_predicted(
    synthetic_dir, small_world, popularity_ranker
):
    """The treatment's items clicked 1.3 times as readily as the baseline's: the share of
    200 experiments that detects it matches the power the formula predicts for that lift."""
    effect = 0.3
    runs = interleaved_experiments(synthetic_dir, small_world, popularity_ranker, 200, effect)
    preferences = [compare_preference(users, 1 - ALPHA) for users in runs]
    z = stats.norm.ppf(1 - ALPHA / 2)
    predicted = np.mean(
        [
            stats.norm.sf(z - np.log1p(effect) * np.sqrt(p.users) / p.relative_sd)
            for p in preferences
        ]
    )
    achieved = np.mean([p.p_value < ALPHA for p in preferences])
    print(f"interleaving power predicted {predicted:.3f}, achieved {achieved:.3f}")
    assert 0.3 < predicted < 0.95
    assert abs(achieved - predicted) <= 0.07
    assert np.median([p.lift for p in preferences]) == pytest.approx(effect, abs=0.05)
