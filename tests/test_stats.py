import itertools

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests

from recdistill import stats
from recdistill.stats import (
    bootstrap_mean_ci,
    bootstrap_ratio_ci,
    holm,
    paired_t_test,
    randomization_test,
    ratio_difference_test,
)


def ndcg_like(rng: np.random.Generator, hit_probability: np.ndarray) -> np.ndarray:
    """Per-user NDCG@10 of one held-out item: 0 on a miss, 1/log2(rank + 2) on a hit."""
    hit = rng.random(hit_probability.shape) < hit_probability
    rank = rng.integers(0, 10, size=hit_probability.shape)
    return hit / np.log2(rank + 2.0)


def covers(intervals: np.ndarray, truth: float) -> np.ndarray:
    return (intervals[:, 0] <= truth) & (truth <= intervals[:, 1])


# --- bootstrap CIs ------------------------------------------------------------------------


def test_mean_ci_covers_true_mean_at_nominal_rate():
    rng = np.random.default_rng(123)
    data = rng.exponential(1.0, size=(1000, 200))  # skewed, true mean 1
    intervals = np.array([bootstrap_mean_ci(x, replicates=500, seed=i) for i, x in enumerate(data)])
    assert 0.91 <= covers(intervals, 1.0).mean() <= 0.98


def test_ratio_ci_covers_true_ratio_at_nominal_rate():
    rng = np.random.default_rng(5)
    reference = ndcg_like(rng, np.full((400, 200), 0.3))
    # The student keeps a hit with probability 0.85 and 60-100 % of its gain: ratio 0.68.
    keep = rng.random(reference.shape) < 0.85
    model = reference * keep * rng.uniform(0.6, 1.0, reference.shape)
    intervals = np.array(
        [
            bootstrap_ratio_ci(m, r, replicates=500, seed=i)
            for i, (m, r) in enumerate(zip(model, reference))
        ]
    )
    assert 0.88 <= covers(intervals, 0.85 * 0.8).mean() <= 0.98


def test_ratio_ci_resamples_the_users_the_mean_ci_does(monkeypatch):
    """With one seed, scipy's bootstrap of the mean and the ratio CI draw the same users: over a
    reference of ones the two intervals agree to rounding, in one chunk or in many."""
    values = np.random.default_rng(1).exponential(2.0, size=300)
    for chunk_elements in (stats._CHUNK_ELEMENTS, 1000):
        monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", chunk_elements)
        mean = bootstrap_mean_ci(values, level=0.9, replicates=2000, seed=3)
        ratio = bootstrap_ratio_ci(values, np.ones(300), level=0.9, replicates=2000, seed=3)
        assert ratio == pytest.approx(mean, rel=1e-12)


def test_ratio_ci_matches_scipy_paired_bootstrap():
    rng = np.random.default_rng(2)
    reference = ndcg_like(rng, np.full(300, 0.4))
    model = reference * rng.uniform(0.5, 1.0, 300)

    def ratio(m, r, axis):
        return m.mean(axis=axis) / r.mean(axis=axis)

    ours = bootstrap_ratio_ci(model, reference, replicates=20000, seed=3)
    theirs = sps.bootstrap(
        (model, reference), ratio, paired=True, n_resamples=20000, method="percentile", rng=4
    ).confidence_interval
    assert ours == pytest.approx((theirs.low, theirs.high), abs=0.01)


def test_ratio_ci_ignores_replicates_with_zero_reference_mean():
    reference = np.array([1.0, 0.0, 0.0, 0.0])  # ~32 % of resamples miss the only nonzero user
    model = np.array([0.5, 0.2, 0.0, 0.1])
    low, high = bootstrap_ratio_ci(model, reference, replicates=4000)
    assert np.isfinite([low, high]).all()
    assert 0.0 <= low < high
    nothing = bootstrap_ratio_ci(model, np.zeros(4), replicates=100)
    assert np.isnan(nothing).all()


def test_chunking_does_not_change_the_answer_beyond_monte_carlo_noise(monkeypatch):
    values = np.random.default_rng(0).exponential(1.0, size=200)
    whole = bootstrap_mean_ci(values, replicates=20000)
    monkeypatch.setattr(stats, "_CHUNK_ELEMENTS", 1000)  # 5 replicates per chunk
    chunked = bootstrap_mean_ci(values, replicates=20000)
    assert chunked == pytest.approx(whole, abs=0.01)
    # the replicate count is honoured even when it is not a multiple of the chunk size
    assert stats._bootstrap_means(values[None, :], 23, seed=0).shape == (1, 23)


# --- paired tests -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def null_pairs() -> tuple[np.ndarray, np.ndarray]:
    """2000 A/A experiments of 200 users: both arms draw from each user's own hit rate."""
    rng = np.random.default_rng(11)
    propensity = rng.beta(0.6, 1.4, size=(2000, 200))
    return ndcg_like(rng, propensity), ndcg_like(rng, propensity)


def test_t_test_false_positive_rate_under_null(null_pairs):
    p = np.array([paired_t_test(m, r) for m, r in zip(*null_pairs)])
    assert 0.035 <= (p < 0.05).mean() <= 0.065


def test_randomization_false_positive_rate_under_null(null_pairs):
    model, reference = (arm[:1000] for arm in null_pairs)
    p = np.array(
        [
            randomization_test(m, r, permutations=500, seed=i)
            for i, (m, r) in enumerate(zip(model, reference))
        ]
    )
    assert 0.025 <= (p < 0.05).mean() <= 0.075


def test_both_tests_detect_a_clear_effect():
    rng = np.random.default_rng(12)
    propensity = rng.beta(0.6, 1.4, size=(300, 400))
    model = ndcg_like(rng, np.minimum(1.0, propensity + 0.2))
    reference = ndcg_like(rng, propensity)
    t_p = np.array([paired_t_test(m, r) for m, r in zip(model, reference)])
    r_p = np.array(
        [
            randomization_test(m, r, permutations=500, seed=i)
            for i, (m, r) in enumerate(zip(model, reference))
        ]
    )
    assert (t_p < 0.05).mean() > 0.9
    assert (r_p < 0.05).mean() > 0.9


def test_t_test_is_scipy_and_one_without_differences():
    rng = np.random.default_rng(3)
    model, reference = rng.normal(size=50), rng.normal(size=50)
    assert paired_t_test(model, reference) == sps.ttest_rel(model, reference).pvalue
    assert paired_t_test(model, model) == 1.0


def test_randomization_matches_exact_enumeration():
    diff = np.random.default_rng(4).normal(0.4, 1.0, size=12)
    signs = np.array(list(itertools.product([-1.0, 1.0], repeat=12)))
    exact = (np.abs(signs @ diff) >= abs(diff.sum()) - 1e-12).mean()
    assert 0.05 < exact < 0.5  # an informative case
    p = randomization_test(diff, np.zeros(12), permutations=40000, seed=1)
    assert p == pytest.approx(exact, abs=0.01)


def test_randomization_p_value_bounds():
    model = np.random.default_rng(5).normal(size=30)
    assert randomization_test(model, model, permutations=100) == 1.0
    huge = randomization_test(model + 100.0, model, permutations=99)
    assert huge == pytest.approx(1 / 100)


# --- determinism and input checks ---------------------------------------------------------


def test_same_seed_same_answer_other_seed_other_answer():
    rng = np.random.default_rng(6)
    model, reference = rng.exponential(1.0, 100), rng.exponential(1.2, 100)
    for call in (
        lambda seed: bootstrap_mean_ci(model, replicates=300, seed=seed),
        lambda seed: bootstrap_ratio_ci(model, reference, replicates=300, seed=seed),
        lambda seed: randomization_test(model, reference, permutations=3000, seed=seed),
    ):
        assert call(7) == call(7)
        assert call(7) != call(8)


@pytest.mark.parametrize(
    "call",
    [
        lambda: bootstrap_mean_ci(np.array([])),
        lambda: bootstrap_mean_ci(np.ones((3, 3))),
        lambda: bootstrap_mean_ci(np.ones(5), level=1.0),
        lambda: bootstrap_mean_ci(np.ones(5), replicates=0),
        lambda: bootstrap_ratio_ci(np.ones(5), np.ones(4)),
        lambda: paired_t_test(np.ones(5), np.ones(6)),
        lambda: randomization_test(np.ones(5), np.ones(5), permutations=0),
        lambda: holm(np.array([0.5, 1.5])),
    ],
)
def test_bad_input_is_rejected(call):
    with pytest.raises(ValueError):
        call()


# --- Holm ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("p", "expected"),
    [
        # sorted 0.005, 0.01, 0.03, 0.04 -> 4x, 3x, 2x, 1x = 0.02, 0.03, 0.06, 0.04 -> max 0.06
        ([0.01, 0.04, 0.03, 0.005], [0.03, 0.06, 0.06, 0.02]),
        ([0.02, 0.5, 0.02], [0.06, 0.5, 0.06]),  # ties get the same value
        ([0.6, 0.7], [1.0, 1.0]),  # capped at 1
        ([0.01, np.nan, 0.04], [0.02, np.nan, 0.04]),  # NaN untouched, m = 2
        ([np.nan, np.nan], [np.nan, np.nan]),
        ([0.03], [0.03]),
        ([], []),
    ],
)
def test_holm_hand_computed(p, expected):
    np.testing.assert_allclose(holm(np.array(p)), expected, rtol=1e-12)


def step_down_rejections(p: np.ndarray, alpha: float) -> np.ndarray:
    """Holm's procedure as written: reject p_(k) <= alpha / (m - k + 1) until the first miss."""
    rejected = np.zeros(len(p), dtype=bool)
    for k, i in enumerate(np.argsort(p)):
        if p[i] > alpha / (len(p) - k):
            break
        rejected[i] = True
    return rejected


@pytest.mark.parametrize("seed", range(5))
def test_holm_adjusted_values_reproduce_the_step_down_procedure(seed):
    rng = np.random.default_rng(seed)
    p = rng.beta(0.3, 1.0, size=15)  # many small p-values, so the procedure goes deep
    adjusted = holm(p)
    assert (adjusted >= p).all() and (adjusted <= 1).all()
    order = np.argsort(p)
    assert (np.diff(adjusted[order]) >= 0).all()
    for alpha in np.linspace(0.001, 0.5, 100):
        np.testing.assert_array_equal(adjusted <= alpha, step_down_rejections(p, alpha))


def test_holm_matches_statsmodels_to_the_bit():
    p = np.random.default_rng(9).beta(0.3, 1.0, size=40)
    p[[3, 7]] = p[5]  # a tie
    np.testing.assert_array_equal(holm(p), multipletests(p, method="holm")[1])


def test_ratio_difference_test_by_hand_and_at_its_level():
    # Two users a side: ratios 1.5 / 1.5 = 1 and 2 / 1 = 2; residuals (0, 0) and (1, -1): the
    # first group has no variance, the second 2 / (2 users * 1^2) = 1, so z = 1 / 1 = 1.
    p = ratio_difference_test(
        np.array([1.0, 2.0]), np.array([1.0, 2.0]), np.array([2.0, 2.0]), np.array([0.5, 1.5])
    )
    assert p == pytest.approx(2 * sps.norm.sf(1.0))
    assert np.isnan(ratio_difference_test(np.ones(1), np.ones(1), np.ones(5), np.ones(5)))
    # Under the null (the same 0.9 retention everywhere, the slice's teacher 0.3x the rest's),
    # with slices of 10 %, 50 % and 90 % of the users, it rejects at about its level.
    rng = np.random.default_rng(0)
    for share in (0.1, 0.5, 0.9):
        rejected = 0
        for _ in range(1000):
            chosen = rng.random(2000) < share
            teacher = rng.random(2000) * np.where(chosen, 0.3, 1.0)
            model = 0.9 * teacher + rng.normal(0, 0.1, 2000)
            p = ratio_difference_test(
                model[chosen], teacher[chosen], model[~chosen], teacher[~chosen]
            )
            rejected += p <= 0.05
        assert 0.03 <= rejected / 1000 <= 0.07, (share, rejected)
