"""The statistics of kl_lib.study.stats on simulated data: interval coverage, the false-positive rate of every
test under the null at α, exactness against brute force, and the power formulae against simulation.

Monte Carlo tolerances are 3 binomial standard errors of the replication count used."""

import itertools
import math

import numpy as np
import pytest

from kl_lib.study import stats
from kl_lib.study.stats import (ALPHA, NOT_TESTABLE, VERDICTS, bootstrap_mean_ci, direction_verdict,
                                fisher_exact_greater, hierarchical_bootstrap, holm, interval, permutation_test,
                                rate_test_power, runs_for_rate_power, seeds_for_power, stratified_difference,
                                stratified_rate_test, verdict)


def se(p, n):
    return math.sqrt(p * (1 - p) / n)


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
    """400 simulated data sets of 50 Bernoulli(0.3) draws: coverage within 3 binomial standard errors of the
    percentile bootstrap's expected coverage (slightly below 0.95 at n = 50)."""
    rng = np.random.default_rng(0)
    trials, hits = 400, 0
    for _ in range(trials):
        x = rng.random(50) < 0.3
        _, lo, hi = bootstrap_mean_ci(x, rng, n_boot=2000)
        hits += lo <= 0.3 <= hi
    coverage = hits / trials
    assert 0.95 - 3 * se(0.95, trials) - 0.02 <= coverage <= 0.95 + 3 * se(0.95, trials), coverage


def test_hierarchical_bootstrap_covers_and_pairs():
    """Seeds differ by a random offset (sd 0.05) around a true accuracy; the seed-and-problem bootstrap of the
    difference between two configurations that are truly equal covers 0 at about the nominal rate."""
    rng = np.random.default_rng(1)
    trials, hits = 150, 0
    for _ in range(trials):
        difficulty = rng.random(60)  # shared problem difficulty: pairing must cancel it
        groups = {}
        for name in ("a", "b"):
            offsets = rng.normal(0, 0.05, size=(5, 1))
            groups[name] = (rng.random((5, 60)) < np.clip(difficulty + offsets, 0, 1)).astype(float)
        reps = hierarchical_bootstrap(groups, rng, n_boot=400)
        lo, hi = interval(reps["a"] - reps["b"])
        hits += lo <= 0 <= hi
    assert hits / trials >= 0.95 - 3 * se(0.95, trials), hits / trials
    with pytest.raises(ValueError, match="same problems"):
        hierarchical_bootstrap({"a": np.zeros((2, 3)), "b": np.zeros((2, 4))}, rng)


# ---------------------------------------------------------------------------------------------------------
# Stratified intervals with a β effect


def _study(rng, seeds=8, problems=40, deltas=(0.02, 0.04), levels=(0.3, 0.7), sd_seed=0.03):
    """Two β strata with very different accuracy levels (the β effect) and a configuration effect Δ_s per
    stratum; seed offsets sd ``sd_seed``; per-problem pass@1 from 4 samples around a shared problem difficulty."""
    difficulty = rng.uniform(-0.2, 0.2, problems)
    strata = []
    for level, delta in zip(levels, deltas):
        pair = []
        for shift in (delta, 0.0):
            p = np.clip(level + shift + difficulty + rng.normal(0, sd_seed, (seeds, 1)), 0, 1)
            pair.append(rng.binomial(4, p) / 4)
        strata.append(tuple(pair))
    return strata


def _pooled_interval(strata, rng, n_boot):
    """The flawed pooled interval: every a run of every stratum in one group, resampled across strata."""
    a = np.concatenate([s[0] for s in strata])
    b = np.concatenate([s[1] for s in strata])
    reps = hierarchical_bootstrap({"a": a, "b": b}, rng, n_boot=n_boot)
    return interval(reps["a"] - reps["b"])


def test_stratified_interval_covers_the_true_difference_with_beta_effects_present():
    """120 simulated studies: the equal-weight stratified interval covers the true Δ = (0.02 + 0.04) / 2 at
    ≥ 95% − 3 SE (the two-level bootstrap counts the per-problem sampling noise twice, so it leans
    conservative), while the pooled interval, which resamples runs across strata, is several times wider."""
    rng = np.random.default_rng(2)
    trials, hits, widths, pooled_widths = 120, 0, [], []
    truth = 0.03
    for _ in range(trials):
        strata = _study(rng)
        _, lo, hi, _ = stratified_difference(strata, rng, n_boot=200)
        hits += lo <= truth <= hi
        widths.append(hi - lo)
        plo, phi = _pooled_interval(strata, rng, 200)
        pooled_widths.append(phi - plo)
    coverage = hits / trials
    assert 0.95 - 3 * se(0.95, trials) <= coverage <= 1.0, coverage
    assert np.mean(pooled_widths) > 3 * np.mean(widths), (np.mean(pooled_widths), np.mean(widths))


def test_stratified_difference_is_the_fixed_weight_average():
    rng = np.random.default_rng(3)
    strata = _study(rng, seeds=3)
    d, lo, hi, reps = stratified_difference(strata, rng, weights=[0.25, 0.75], n_boot=200)
    expected = 0.25 * (strata[0][0].mean() - strata[0][1].mean()) + 0.75 * (strata[1][0].mean() - strata[1][1].mean())
    assert math.isclose(d, expected) and reps.shape == (200,) and lo <= hi
    with pytest.raises(ValueError, match="weights"):
        stratified_difference(strata, rng, weights=[0.5, 0.6])


# ---------------------------------------------------------------------------------------------------------
# Permutation test


def _brute_permutation(strata):
    """Two-sided p of the equal-weight statistic by listing every within-stratum relabelling."""
    def stat(split):
        return np.mean([np.mean(a) - np.mean(b) for a, b in split])
    observed = stat(strata)
    options = []
    for a, b in strata:
        pooled = list(a) + list(b)
        options.append([([pooled[i] for i in c], [pooled[i] for i in range(len(pooled)) if i not in c])
                        for c in itertools.combinations(range(len(pooled)), len(a))])
    values = [stat(combo) for combo in itertools.product(*options)]
    ge = np.mean([v >= observed - 1e-12 for v in values])
    le = np.mean([v <= observed + 1e-12 for v in values])
    return min(1.0, 2 * min(ge, le))


def test_permutation_test_is_exact_and_reports_its_minimal_p():
    strata = [([0.31, 0.35, 0.40], [0.30, 0.28]), ([0.70, 0.66], [0.61, 0.64, 0.60])]
    out = permutation_test(strata)
    assert out["exact"] and math.isclose(out["p_value"], _brute_permutation(strata))
    assert math.isclose(out["min_p"], 2 / (10 * 10))
    three = permutation_test([([0.5, 0.6, 0.7], [0.1, 0.2, 0.3])])
    assert three["min_p"] == pytest.approx(0.1) and three["p_value"] == pytest.approx(0.1)
    assert direction_verdict(three["difference"], three["p_value"], three["min_p"]) == NOT_TESTABLE
    with pytest.raises(ValueError, match="at least one run"):
        permutation_test([([], [1.0])])


def test_permutation_test_false_positive_rate_under_the_null():
    """400 null studies (2 β strata with different levels, 4 vs 4 seeds each, no configuration effect): the
    rejection rate at α is within 3 SE of α (4900 arrangements: the test is nearly continuous)."""
    rng = np.random.default_rng(4)
    trials = 400
    rejected = 0
    for _ in range(trials):
        strata = [(rng.normal(m, 0.03, 4), rng.normal(m, 0.03, 4)) for m in (0.3, 0.7)]
        rejected += permutation_test(strata)["p_value"] < ALPHA
    assert abs(rejected / trials - ALPHA) <= 3 * se(ALPHA, trials), rejected / trials


def test_monte_carlo_permutation_test_agrees_with_the_exact_one():
    rng = np.random.default_rng(5)
    strata = [(rng.normal(0.1, 1, 5), rng.normal(0, 1, 5)), (rng.normal(0.6, 1, 5), rng.normal(0, 1, 5))]
    exact = permutation_test(strata)
    stats.MAX_ENUMERATION, saved = 10, stats.MAX_ENUMERATION
    try:
        mc = permutation_test(strata, rng, n_perm=20_000)
    finally:
        stats.MAX_ENUMERATION = saved
    assert not mc["exact"] and abs(mc["p_greater"] - exact["p_greater"]) <= 3 * se(exact["p_greater"], 20_000) + 1e-4


# ---------------------------------------------------------------------------------------------------------
# Rate tests


def _brute_fisher(ea, na, eb, nb):
    """P(events in a ≥ ea) when the total events are spread at random over the na + nb runs."""
    total = ea + eb
    runs = list(range(na + nb))
    count = sum(1 for chosen in itertools.combinations(runs, total) if sum(r < na for r in chosen) >= ea)
    return count / math.comb(na + nb, total)


@pytest.mark.parametrize("ea, na, eb, nb", [(3, 6, 0, 6), (1, 4, 1, 4), (0, 3, 2, 5), (5, 5, 5, 5), (2, 7, 1, 3)])
def test_fisher_exact_against_brute_force(ea, na, eb, nb):
    assert math.isclose(fisher_exact_greater(ea, na, eb, nb), _brute_fisher(ea, na, eb, nb), rel_tol=1e-12)


def test_stratified_rate_test_against_brute_force():
    """Two strata: P(Σ events in a ≥ observed) over independent random spreads of each stratum's events."""
    strata = [(2, 4, 0, 3), (1, 3, 1, 5)]
    spreads = []
    for ea, na, eb, nb in strata:
        runs = range(na + nb)
        spreads.append([sum(r < na for r in c) for c in itertools.combinations(runs, ea + eb)])
    totals = [a + b for a, b in itertools.product(*spreads)]
    brute = np.mean([t >= 3 for t in totals])
    out = stratified_rate_test(strata)
    assert math.isclose(out["p_greater"], brute, rel_tol=1e-12)
    assert math.isclose(out["min_p"], 2 / (math.comb(7, 4) * math.comb(8, 3)))


def test_rate_test_size_is_at_most_alpha():
    """Exact size of the two-sided rate test (n = 10 per group) at several common null rates: ≤ α; and a
    stratified Monte Carlo check (rates 0.2 and 0.6 in two strata, 6 runs per group per stratum)."""
    for rate in (0.1, 0.3, 0.5, 0.8):
        size = rate_test_power(10, rate, rate) + rate_test_power(10, rate, rate)  # a > b plus, by symmetry, b > a
        assert size <= ALPHA + 1e-12, (rate, size)
    rng = np.random.default_rng(6)
    trials, rejected = 1000, 0
    for _ in range(trials):
        strata = [(int(rng.binomial(6, p)), 6, int(rng.binomial(6, p)), 6) for p in (0.2, 0.6)]
        rejected += stratified_rate_test(strata)["p_value"] < ALPHA
    assert rejected / trials <= ALPHA + 3 * se(ALPHA, trials), rejected / trials


# ---------------------------------------------------------------------------------------------------------
# Holm and verdicts


def test_holm_adjustment_and_family_wise_error():
    adjusted = holm([0.01, 0.04, np.nan, 0.03])
    assert np.allclose(adjusted[[0, 1, 3]], [0.03, 0.06, 0.06]) and np.isnan(adjusted[2])
    rng = np.random.default_rng(7)
    trials = 2000
    fwer = np.mean([(holm(rng.random(6)) < ALPHA).any() for _ in range(trials)])
    assert fwer <= ALPHA + 3 * se(ALPHA, trials), fwer


def test_verdict_rules():
    assert verdict(0.01, 0.2) == "supported"
    assert verdict(-0.2, -0.01) == "not supported"
    assert verdict(-0.1, 0.1) == "inconclusive at this scale"
    assert verdict(p_value=0.02) == "supported" and verdict(p_value=0.03) == "inconclusive at this scale"
    assert set(VERDICTS) == {"supported", "not supported", "inconclusive at this scale"}
    assert direction_verdict(0.1, 0.01, 0.001) == "supported"
    assert direction_verdict(-0.1, 0.01, 0.001) == "not supported"
    assert direction_verdict(0.1, 0.2, 0.001) == "inconclusive at this scale"
    assert direction_verdict(0.1, 0.1, 0.1) == NOT_TESTABLE
    with pytest.raises(ValueError):
        verdict()


# ---------------------------------------------------------------------------------------------------------
# Power


def test_t_distribution_against_table_values():
    assert stats.t_cdf(2.0, 1) == pytest.approx(0.5 + math.atan(2) / math.pi)
    for df, q975 in [(1, 12.7062), (2, 4.3027), (3, 3.1824), (10, 2.2281), (30, 2.0423)]:
        assert stats.t_quantile(0.975, df) == pytest.approx(q975, abs=1e-4)


def _t_reject(a, b=None):
    """Two-sided t-test at α: unpaired (a, b) or paired (a = differences)."""
    if b is None:
        t, df = a.mean() / (a.std(ddof=1) / math.sqrt(a.size)), a.size - 1
    else:
        sp = math.sqrt(((a.size - 1) * a.var(ddof=1) + (b.size - 1) * b.var(ddof=1)) / (a.size + b.size - 2))
        t, df = (a.mean() - b.mean()) / (sp * math.sqrt(1 / a.size + 1 / b.size)), a.size + b.size - 2
    return abs(t) > stats.t_quantile(1 - ALPHA / 2, df)


@pytest.mark.parametrize("test", ["unpaired", "paired"])
def test_seeds_for_power_against_simulation(test):
    """Simulated t-tests with the returned n reach the target power (within 3 SE and the 0.01 error of the
    shifted-central-t approximation), and with n − 1 seeds fall short of it."""
    effect, sd, target = 0.03, 0.025, 0.8
    n = seeds_for_power(effect, sd, ALPHA, target, test=test)
    rng = np.random.default_rng(8)
    trials = 2000

    def simulated(k):
        if test == "paired":
            return np.mean([_t_reject(rng.normal(effect, sd, k)) for _ in range(trials)])
        return np.mean([_t_reject(rng.normal(effect, sd, k), rng.normal(0, sd, k)) for _ in range(trials)])

    tol = 3 * se(target, trials) + 0.01
    assert simulated(n) >= target - tol
    assert simulated(n - 1) <= target + tol
    assert abs(simulated(n) - stats.power_t_test(n, effect, sd, ALPHA, test)) <= tol


def test_seeds_for_power_respects_the_permutation_floor_and_checks_input():
    # a huge effect would need 2 seeds by the t formula, but 3 vs 3 cannot reach p < 0.05 by permutation
    assert seeds_for_power(1.0, 0.01, test="unpaired") == 4
    assert seeds_for_power(1.0, 0.01, test="paired") == 6
    with pytest.raises(ValueError, match="unknown test"):
        seeds_for_power(0.1, 0.1, test="welch")
    with pytest.raises(ValueError, match="effect"):
        seeds_for_power(0.0, 0.1)


def test_runs_for_rate_power_against_simulation():
    """The exact power at the returned n agrees with simulated exact tests within 3 SE, reaches the target,
    and n − 1 runs do not."""
    n = runs_for_rate_power(0.7, 0.1, ALPHA, 0.8)
    assert rate_test_power(n, 0.7, 0.1) >= 0.8 > rate_test_power(n - 1, 0.7, 0.1)
    rng = np.random.default_rng(9)
    trials = 2000
    hits = np.mean([fisher_exact_greater(int(rng.binomial(n, 0.7)), n, int(rng.binomial(n, 0.1)), n) < ALPHA / 2
                    for _ in range(trials)])
    exact = rate_test_power(n, 0.7, 0.1)
    assert abs(hits - exact) <= 3 * se(exact, trials), (hits, exact)
    with pytest.raises(ValueError, match="rate_b"):
        runs_for_rate_power(0.1, 0.7)


# ---------------------------------------------------------------------------------------------------------
# compare_cells: two cells side by side (notebook 06)


def test_compare_cells_combines_the_bootstrap_interval_and_the_exact_test():
    rng = np.random.default_rng(11)
    a = (rng.random((4, 30)) < 0.7).astype(float)
    b = (rng.random((4, 30)) < 0.3).astype(float)
    out = stats.compare_cells(a, b, np.random.default_rng(3), n_boot=500)
    est, lo, hi, _ = stratified_difference([(a, b)], np.random.default_rng(3), n_boot=500)
    assert (out["difference"], out["low"], out["high"]) == (est, lo, hi)
    assert out["difference"] == pytest.approx(a.mean() - b.mean())
    test = permutation_test([(a.mean(1), b.mean(1))])
    assert out["p_value"] == test["p_value"] and out["min_p"] == pytest.approx(2 / 70)
    # 4 vs 4 seeds, every a run above every b run: p = 2/70 < α, decided in the direction of the estimate.
    assert out["ordering"] == "higher" and stats.compare_cells(b, a, rng, n_boot=200)["ordering"] == "lower"
    # 3 vs 3 seeds can never reach p < α (smallest p = 0.1), however far apart the cells are.
    three = stats.compare_cells(a[:3], b[:3], rng, n_boot=200)
    assert three["ordering"] == NOT_TESTABLE and three["min_p"] == pytest.approx(0.1) and three["low"] > 0
    # Interleaved per-run values: p = 1, not distinguishable; per-run values have no interval.
    flat = stats.compare_cells([0.1, 0.4, 0.5, 0.8], [0.2, 0.3, 0.6, 0.7], rng)
    assert flat["ordering"] == "not distinguishable" and flat["p_value"] == pytest.approx(1.0)
    assert flat["difference"] == pytest.approx(0.0, abs=1e-12) and math.isnan(flat["low"]) and math.isnan(flat["high"])
    assert set(stats.ORDERINGS) == {"higher", "lower", "not distinguishable", NOT_TESTABLE}


def test_compare_cells_decides_an_ordering_under_the_null_at_most_alpha_of_the_time():
    """300 null pairs of cells (4 vs 4 seeds, per-run values from one normal law): the rate of "higher" or
    "lower" is within 3 SE of the test's exact size 2/70 ≈ 0.029 ≤ α (p < α only when a's runs are the 4 largest
    or the 4 smallest of the 8, each with probability 1/70; the next attainable p, 4/70, is above α)."""
    rng = np.random.default_rng(12)
    trials = 300
    decided = sum(stats.compare_cells(rng.normal(0, 1, 4), rng.normal(0, 1, 4), rng)["ordering"] in ("higher", "lower")
                  for _ in range(trials))
    size = 2 / 70
    assert abs(decided / trials - size) <= 3 * se(size, trials), decided / trials


def test_compare_cells_rejects_mismatched_cells():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="same problems"):
        stats.compare_cells(np.zeros((3, 5)), np.zeros((3, 6)), rng)
    with pytest.raises(ValueError, match="same problems"):
        stats.compare_cells(np.zeros((3, 5)), np.zeros(3), rng)
    with pytest.raises(ValueError, match="at least one run"):
        stats.compare_cells(np.zeros((0, 5)), np.zeros((3, 5)), rng)
