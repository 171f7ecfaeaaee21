"""Interleaving's analysis: credit by team, wins and ties per user, the preference share's
CI against a bootstrap over users, and the verdict's rule."""

import numpy as np
import pandas as pd
import pytest

from recdistill.abtest.analysis import analyse
from recdistill.abtest.preference import (
    NO_PREFERENCE,
    NOT_PREFERRED,
    compare_preference,
    credit_totals,
    share_floor,
)
from recdistill.abtest.simulate import simulate
from tests.abtest.conftest import experiment

PAIR = {"student": ("noisy", 0.5), "teacher": ("truth", 0.5)}


def test_clicks_are_credited_to_the_arm_that_placed_the_item():
    log = pd.DataFrame(
        {
            "user_id": [1, 1, 2, 3],
            "period": "experiment",
            "clicks": [[1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 0]],
            "teams": [["s", "t", "t"], ["t", "s", "s"], ["s", "t", "s"], ["t", "s", "t"]],
        }
    )
    users = credit_totals(log, ("s", "t"))
    assert users.loc[1, ["treatment", "baseline", "requests"]].tolist() == [2, 1, 2]
    assert users.loc[2, ["treatment", "baseline"]].tolist() == [0, 0]
    assert users.loc[3, ["treatment", "baseline"]].tolist() == [1, 1]
    assert users["treatment_placed"].tolist() == [3, 2, 1]
    preference = compare_preference(users, 0.95)
    assert (preference.wins, preference.losses, preference.ties) == (1, 0, 2)
    assert preference.share == pytest.approx(3 / 5)
    assert preference.lift == pytest.approx(3 / 2 - 1)


def test_the_preference_ci_matches_a_bootstrap_over_users():
    rng = np.random.default_rng(0)
    activity = rng.gamma(1.0, 3.0, 3000)
    users = pd.DataFrame(
        {"treatment": rng.poisson(activity * 1.1), "baseline": rng.poisson(activity)}
    )
    preference = compare_preference(users, 0.95)
    draws = rng.integers(0, len(users), (2000, len(users)))
    t, b = users["treatment"].to_numpy()[draws].sum(1), users["baseline"].to_numpy()[draws].sum(1)
    low, high = np.percentile(t / (t + b), [2.5, 97.5])
    assert preference.share_low == pytest.approx(low, abs=0.002)
    assert preference.share_high == pytest.approx(high, abs=0.002)
    assert preference.lift == pytest.approx(0.1, abs=0.03)


def test_the_non_inferiority_bar_is_the_margin_as_a_share():
    assert share_floor(0.02) == pytest.approx(0.98 / 1.98)
    assert share_floor(0.0) == 0.5


@pytest.fixture(scope="module")
def interleaved(synthetic_dir, small_world, truth_ranker, noisy_truth_ranker):
    spec = experiment(synthetic_dir, PAIR, design="interleaving", analysis={"min_users": 20})
    log = simulate(small_world, spec, {"truth": truth_ranker, "noisy": noisy_truth_ranker})
    return spec, log


def test_an_interleaved_log_shows_both_arms_in_every_slate(interleaved):
    spec, log = interleaved
    assert (log["period"] == "experiment").all()  # no pre-period: nothing for CUPED to do
    assert (log["arm"] == "interleaved").all() and (log["model"] == "noisy+truth").all()
    teams = np.stack(log["teams"].to_numpy())
    assert set(np.unique(teams)) == {"student", "teacher"}
    assert (np.abs((teams == "student").sum(1) - spec.simulation.k / 2) <= 0.5).all()


def test_the_truth_is_preferred_to_a_noisy_copy_of_it(interleaved):
    spec, log = interleaved
    analysis = analyse(log, spec, ["activity_tier"])
    row = analysis.lifts.iloc[0]
    assert row["metric"] == "preference" and row["share_high"] < 0.5
    assert analysis.ship is False and analysis.verdict.startswith("DO NOT SHIP student")
    assert NOT_PREFERRED in analysis.verdict and "49.49%" in analysis.verdict
    assert not analysis.srm.mismatch and analysis.srm.unit == "first picks"
    assert set(analysis.segments["value"]) == {"cold", "light", "medium", "heavy"}
    assert analysis.daily["day"].tolist() == list(range(spec.simulation.days))


def test_the_same_model_on_both_sides_is_no_detectable_preference(
    synthetic_dir, small_world, truth_ranker
):
    pair = {"student": ("truth", 0.5), "teacher": ("truth", 0.5)}
    spec = experiment(synthetic_dir, pair, design="interleaving", seed=4)
    analysis = analyse(simulate(small_world, spec, {"truth": truth_ranker}), spec, [])
    assert NO_PREFERENCE in analysis.verdict
    assert "inconclusive" in analysis.verdict and "users would show" in analysis.verdict
