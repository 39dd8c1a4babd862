"""Bootstrap intervals cover at about their nominal rate; the exact test and the verdict rule are right."""

import itertools
import math

import numpy as np
import pytest

from kl_lib.study.stats import (VERDICTS, bootstrap_mean_ci, fisher_exact_greater, hierarchical_bootstrap, interval,
                          verdict)


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
    se = math.sqrt(0.95 * 0.05 / trials)
    assert 0.95 - 3 * se - 0.02 <= coverage <= 0.95 + 3 * se, coverage


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
    assert hits / trials >= 0.88, hits / trials
    with pytest.raises(ValueError, match="same problems"):
        hierarchical_bootstrap({"a": np.zeros((2, 3)), "b": np.zeros((2, 4))}, rng)


def _brute_fisher(ea, na, eb, nb):
    """P(events in a ≥ ea) when the total events are spread at random over the na + nb runs."""
    total = ea + eb
    runs = list(range(na + nb))
    count = sum(1 for chosen in itertools.combinations(runs, total) if sum(r < na for r in chosen) >= ea)
    return count / math.comb(na + nb, total)


@pytest.mark.parametrize("ea, na, eb, nb", [(3, 6, 0, 6), (1, 4, 1, 4), (0, 3, 2, 5), (5, 5, 5, 5), (2, 7, 1, 3)])
def test_fisher_exact_against_brute_force(ea, na, eb, nb):
    assert math.isclose(fisher_exact_greater(ea, na, eb, nb), _brute_fisher(ea, na, eb, nb), rel_tol=1e-12)


def test_verdict_rule():
    assert verdict(0.01, 0.2) == "supported"
    assert verdict(-0.2, -0.01) == "not supported"
    assert verdict(-0.1, 0.1) == "inconclusive at this scale"
    assert verdict(p_value=0.01) == "supported" and verdict(p_value=0.2) == "inconclusive at this scale"
    assert set(VERDICTS) == {"supported", "not supported", "inconclusive at this scale"}
    with pytest.raises(ValueError):
        verdict()
