"""Uncertainty for small sweeps: stratified bootstrap intervals, exact tests, Holm, power, and verdicts.

One significance level, ``ALPHA`` = 0.05 **two-sided**, everywhere (``docs/statistics.md``): intervals are 95%
two-sided; a directional claim is decided by a two-sided test at 0.05 whose estimate lies in the claimed
direction, which is the same as a one-sided test at ``ALPHA / 2`` = 0.025 in each direction.

* :func:`hierarchical_bootstrap` — replicates of each group's mean over seeds (runs) and problems: resample
  seeds within the group, then problems (one problem draw per replicate shared by every group, so the shared
  difficulty of the problems cancels in paired differences). A group is one *cell* (one setting, β, lag,
  configuration); runs are never resampled across cells.
* :func:`stratified_difference` — a fixed-weight average over strata s of Δ_s = mean(a_s) − mean(b_s), each
  stratum's cells bootstrapped within themselves: Δ = Σ_s w_s Δ_s with w_s fixed in advance (equal weights).
* :func:`permutation_test` — exact test of Δ = Σ_s w_s Δ_s over seeds: the per-run values are permuted
  between a and b *within* each stratum (all Π_s C(n_s, n_{a,s}) arrangements when they are few, else a Monte
  Carlo sample). Its smallest attainable two-sided p-value is 2 / Π_s C(n_s, n_{a,s}) (e.g. 0.1 for 3 vs 3
  seeds in one stratum): when that is ≥ α the comparison is "not testable at this scale" whatever the data.
* :func:`stratified_rate_test` — exact conditional test that group a's event rate (diverged or collapsed
  runs) exceeds b's, stratified: the events of a summed over strata, whose null distribution given every
  stratum's margins is the convolution of the strata's hypergeometric laws. One stratum = Fisher's exact test.
* :func:`holm` — Holm's step-down adjustment of the secondary rows' p-values (family-wise error ≤ α).
* :func:`seeds_for_power`, :func:`runs_for_rate_power` — seeds per cell for a target power (see
  ``docs/statistics.md`` for the formulae).
* :func:`verdict` — interval or p-value → "supported", "not supported", "inconclusive at this scale".
* :func:`compare_cells` — two cells side by side without a claimed direction: mean a − mean b, its hierarchical
  bootstrap interval (score matrices) and the exact permutation test over seeds, read as "higher", "lower",
  "not distinguishable" (p ≥ α) or "not testable at this scale" (smallest attainable p ≥ α).

All randomness comes from an explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "ALPHA", "LEVEL", "VERDICTS", "NOT_TESTABLE", "MAX_ENUMERATION", "N_PERMUTATIONS", "bootstrap_mean_ci",
    "hierarchical_bootstrap", "interval",
    "stratified_difference", "permutation_test", "min_permutation_p", "fisher_exact_greater",
    "stratified_rate_test", "holm", "t_cdf", "t_quantile", "power_t_test", "seeds_for_power", "rate_test_power",
    "runs_for_rate_power", "verdict", "direction_verdict", "ORDERINGS", "compare_cells",
]

ALPHA = 0.05
"""Two-sided significance level of every test and 1 − the level of every interval."""
LEVEL = 1 - ALPHA
VERDICTS = ("supported", "not supported", "inconclusive at this scale")
NOT_TESTABLE = "not testable at this scale"
"""A row whose smallest attainable p-value is ≥ α: decided by the design, before any data are seen."""
MAX_ENUMERATION = 200_000
"""Above this many arrangements :func:`permutation_test` samples arrangements at random instead."""
N_PERMUTATIONS = 20_000
"""How many random arrangements :func:`permutation_test` samples above ``MAX_ENUMERATION`` (by default)."""


def bootstrap_mean_ci(values: Sequence[float], rng: np.random.Generator, level: float = LEVEL,
                      n_boot: int = 10_000) -> tuple[float, float, float]:
    """``(mean, low, high)``: percentile bootstrap interval of the mean of ``values``."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_mean_ci needs at least one value")
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(1)
    alpha = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def hierarchical_bootstrap(scores: dict[str, np.ndarray], rng: np.random.Generator, level: float = LEVEL,
                           n_boot: int = 4_000) -> dict[str, np.ndarray]:
    """Bootstrap replicates of each group's mean accuracy.

    Args:
        scores: group name → ``(num_seeds, num_problems)`` per-problem accuracies (e.g. pass@1 per problem) of
            each seed's run; every group must cover the same problems in the same order. A group should be one
            cell (runs that differ only in their seed).
        rng: the random generator.

    Returns:
        group name → ``(n_boot,)`` replicates of the mean over seeds and problems. The problem resample is
        shared by all groups in a replicate, so ``reps[a] − reps[b]`` is a paired difference.
    """
    num_problems = {v.shape[1] for v in scores.values()}
    if len(num_problems) != 1:
        raise ValueError("every group must be scored on the same problems")
    (P,) = num_problems
    out = {name: np.empty(n_boot) for name in scores}
    for b in range(n_boot):
        problems = rng.integers(0, P, size=P)
        for name, s in scores.items():
            seeds = rng.integers(0, s.shape[0], size=s.shape[0])
            out[name][b] = s[np.ix_(seeds, problems)].mean()
    return out


def interval(replicates: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates."""
    alpha = (1 - level) / 2
    return float(np.quantile(replicates, alpha)), float(np.quantile(replicates, 1 - alpha))


def _weights(n: int, weights: Sequence[float] | None) -> np.ndarray:
    w = np.full(n, 1 / n) if weights is None else np.asarray(weights, float)
    if w.shape != (n,) or (w < 0).any() or not math.isclose(w.sum(), 1.0):
        raise ValueError(f"need {n} non-negative stratum weights summing to 1, got {weights}")
    return w


def stratified_difference(strata: Sequence[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator,
                          weights: Sequence[float] | None = None, n_boot: int = 4_000,
                          level: float = LEVEL) -> tuple[float, float, float, np.ndarray]:
    """Δ = Σ_s w_s (mean a_s − mean b_s) with its percentile interval: ``(Δ, low, high, replicates)``.

    ``strata[s] = (a_s, b_s)``, each a ``(num_seeds, num_problems)`` score matrix of one cell (every matrix on
    the same problems); ``weights`` default to equal. Seeds are resampled within each cell, problems once per
    replicate for all cells (:func:`hierarchical_bootstrap`).
    """
    w = _weights(len(strata), weights)
    cells = {f"{side}{s}": m for s, pair in enumerate(strata) for side, m in zip("ab", pair)}
    reps = hierarchical_bootstrap(cells, rng, level, n_boot)
    est = sum(w[s] * (a.mean() - b.mean()) for s, (a, b) in enumerate(strata))
    d = sum(w[s] * (reps[f"a{s}"] - reps[f"b{s}"]) for s in range(len(strata)))
    return float(est), *interval(d, level), d


def min_permutation_p(sizes: Sequence[tuple[int, int]]) -> float:
    """Smallest two-sided p-value :func:`permutation_test` can give with ``(n_a, n_b)`` runs per stratum."""
    return min(1.0, 2 / math.prod(math.comb(na + nb, na) for na, nb in sizes))


def permutation_test(strata: Sequence[tuple[Sequence[float], Sequence[float]]], rng: np.random.Generator | None = None,
                     weights: Sequence[float] | None = None, n_perm: int = N_PERMUTATIONS) -> dict[str, float]:
    """Exact stratified permutation test of Δ = Σ_s w_s (mean a_s − mean b_s) over per-run values.

    Returns ``difference``, ``p_greater`` = P(Δ* ≥ Δ), ``p_less`` = P(Δ* ≤ Δ), ``p_value`` (two-sided,
    2 · min, capped at 1), ``min_p`` (:func:`min_permutation_p`) and ``exact`` (all arrangements enumerated).
    """
    w = _weights(len(strata), weights)
    strata = [(np.asarray(a, float), np.asarray(b, float)) for a, b in strata]
    if any(a.size == 0 or b.size == 0 for a, b in strata):
        raise ValueError("every stratum needs at least one run in each group")
    observed = sum(w[s] * (a.mean() - b.mean()) for s, (a, b) in enumerate(strata))
    count = math.prod(math.comb(a.size + b.size, a.size) for a, b in strata)
    exact = count <= MAX_ENUMERATION
    if not exact and rng is None:
        raise ValueError(f"{count} arrangements: give rng for a Monte Carlo permutation test")
    dist = np.zeros(1)
    for s, (a, b) in enumerate(strata):
        pooled, na = np.concatenate([a, b]), a.size
        if exact:
            idx = np.array(list(itertools.combinations(range(pooled.size), na)))
            mask = np.zeros((len(idx), pooled.size), bool)
            np.put_along_axis(mask, idx, True, axis=1)
        else:
            mask = np.argsort(rng.random((n_perm, pooled.size)), axis=1) < na
        diffs = w[s] * ((mask * pooled).sum(1) / na - (~mask * pooled).sum(1) / b.size)
        dist = (dist[:, None] + diffs[None, :]).ravel() if exact else dist + diffs
    tol = 1e-12 * max(1.0, abs(observed))
    p_greater, p_less = float(np.mean(dist >= observed - tol)), float(np.mean(dist <= observed + tol))
    if not exact:  # the observed arrangement counts as one of the sample (a valid Monte Carlo p-value)
        p_greater, p_less = [(p * n_perm + 1) / (n_perm + 1) for p in (p_greater, p_less)]
    return {"difference": float(observed), "p_greater": p_greater, "p_less": p_less,
            "p_value": min(1.0, 2 * min(p_greater, p_less)),
            "min_p": min_permutation_p([(a.size, b.size) for a, b in strata]), "exact": exact}


def fisher_exact_greater(events_a: int, n_a: int, events_b: int, n_b: int) -> float:
    """One-sided p-value that group a's event rate exceeds group b's (hypergeometric tail)."""
    return stratified_rate_test([(events_a, n_a, events_b, n_b)])["p_greater"]


def _hypergeometric(n_a: int, n_b: int, events: int) -> np.ndarray:
    """P(k of the ``events`` fall in group a), k = 0..n_a, given the margins."""
    total = math.comb(n_a + n_b, n_a)
    return np.array([math.comb(events, k) * math.comb(n_a + n_b - events, n_a - k) / total
                     for k in range(n_a + 1)])


def stratified_rate_test(strata: Sequence[tuple[int, int, int, int]]) -> dict[str, float]:
    """Exact conditional test on ``(events_a, n_a, events_b, n_b)`` per stratum.

    Returns ``p_greater`` (a's rate higher), ``p_less``, ``p_value`` (two-sided, 2 · min, capped at 1) and
    ``min_p``: the smallest two-sided p-value these group sizes allow, 2 / Π_s C(n_a + n_b, n_a) (every event in
    a, none in b); when it is ≥ α the comparison is not testable at this scale, whatever happens.
    """
    dist, observed = np.ones(1), 0
    for ea, na, eb, nb in strata:
        if not (0 <= ea <= na and 0 <= eb <= nb):
            raise ValueError(f"need 0 ≤ events ≤ n in both groups, got {(ea, na, eb, nb)}")
        dist, observed = np.convolve(dist, _hypergeometric(na, nb, ea + eb)), observed + ea
    p_greater, p_less = float(dist[observed:].sum()), float(dist[:observed + 1].sum())
    return {"p_greater": min(1.0, p_greater), "p_less": min(1.0, p_less),
            "p_value": min(1.0, 2 * min(p_greater, p_less)),
            "min_p": min_permutation_p([(na, nb) for _, na, _, nb in strata])}


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (NaN entries are left out of the family and stay NaN)."""
    p = np.asarray(p_values, float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


# ---------------------------------------------------------------------------------------------------------
# Power


def t_cdf(t: float, df: int) -> float:
    """Student-t CDF for an integer number of degrees of freedom (the closed-form finite series)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"df must be a positive integer, got {df}")
    theta = math.atan(t / math.sqrt(df))
    c, s = math.cos(theta), math.sin(theta)
    if df % 2:  # odd: θ/π·2 plus a cosine series
        term, total = c, c if df > 1 else 0.0
        for k in range(3, df - 1, 2):
            term *= c * c * (k - 1) / k
            total += term
        a = (2 / math.pi) * (theta + s * total)
    else:
        term = total = 1.0
        for k in range(2, df - 1, 2):
            term *= c * c * (k - 1) / k
            total += term
        a = s * total
    return 0.5 * (1 + a)


def t_quantile(q: float, df: int) -> float:
    """Inverse of :func:`t_cdf` by bisection."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def power_t_test(n: int, effect: float, sd_between_seeds: float, alpha: float = ALPHA,
                 test: str = "unpaired") -> float:
    """Approximate power of the two-sided t-test with ``n`` seeds per configuration (shifted central t).

    ``unpaired``: two groups of n runs, SD ``sd_between_seeds`` of a run's accuracy; noncentrality
    λ = δ / (σ √(2/n)), df = 2n − 2. ``paired``: n seed pairs, ``sd_between_seeds`` the SD of the per-seed
    difference; λ = δ / (σ / √n), df = n − 1. Power ≈ 1 − F_df(c − λ) + F_df(−c − λ), c = t_{1−α/2, df}.
    """
    lam, df = _TESTS[test](n, effect, sd_between_seeds)
    c = t_quantile(1 - alpha / 2, df)
    return 1 - t_cdf(c - lam, df) + t_cdf(-c - lam, df)


_TESTS: dict[str, Callable[[int, float, float], tuple[float, int]]] = {
    "unpaired": lambda n, d, sd: (d / (sd * math.sqrt(2 / n)), 2 * n - 2),
    "paired": lambda n, d, sd: (d / (sd / math.sqrt(n)), n - 1),
}
_MIN_P: dict[str, Callable[[int], float]] = {
    "unpaired": lambda n: min_permutation_p([(n, n)]),
    "paired": lambda n: min(1.0, 2 / 2 ** n),  # sign-flip test over n pairs
}


def seeds_for_power(effect: float, sd_between_seeds: float, alpha: float = ALPHA, power: float = 0.8,
                    test: str = "unpaired", max_seeds: int = 10_000) -> int:
    """Seeds per configuration for a two-sided test of a pass@1 difference ``effect`` at level ``alpha``.

    The smallest n with :func:`power_t_test` ≥ ``power`` and whose exact permutation (unpaired) or sign-flip
    (paired) test can reach p < ``alpha`` at all. Tests: ``unpaired``, ``paired``.
    """
    if test not in _TESTS:
        raise ValueError(f"unknown test {test!r}; valid: {sorted(_TESTS)}")
    if effect == 0 or sd_between_seeds <= 0 or not (0 < alpha < 1) or not (0 < power < 1):
        raise ValueError("need effect ≠ 0, sd_between_seeds > 0 and alpha, power in (0, 1)")
    for n in range(2, max_seeds + 1):
        if _MIN_P[test](n) < alpha and power_t_test(n, abs(effect), sd_between_seeds, alpha, test) >= power:
            return n
    raise ValueError(f"more than {max_seeds} seeds needed")


@lru_cache(maxsize=64)
def _rejections(n_a: int, n_b: int, alpha: float) -> np.ndarray:
    """``(n_a+1, n_b+1)``: whether the one-sided exact test (a > b) at α/2 rejects with those event counts."""
    return np.array([[stratified_rate_test([(ea, n_a, eb, n_b)])["p_greater"] < alpha / 2
                      for eb in range(n_b + 1)] for ea in range(n_a + 1)])


def _binom_pmf(n: int, p: float) -> np.ndarray:
    return np.array([math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)])


def rate_test_power(n: int, rate_a: float, rate_b: float, alpha: float = ALPHA) -> float:
    """Exact power of :func:`stratified_rate_test` (one stratum, a > b, two-sided α) with n runs per group."""
    return float(_binom_pmf(n, rate_a) @ _rejections(n, n, alpha) @ _binom_pmf(n, rate_b))


def runs_for_rate_power(rate_a: float, rate_b: float, alpha: float = ALPHA, power: float = 0.8,
                        max_runs: int = 200) -> int:
    """Runs per group for the exact rate test to detect ``rate_a > rate_b`` with the given power."""
    if not (0 <= rate_b < rate_a <= 1):
        raise ValueError("need 0 ≤ rate_b < rate_a ≤ 1 (the claimed-unstable group first)")
    for n in range(2, max_runs + 1):
        if rate_test_power(n, rate_a, rate_b, alpha) >= power:
            return n
    raise ValueError(f"more than {max_runs} runs per group needed")


# ---------------------------------------------------------------------------------------------------------
# Verdicts


def verdict(low: float | None = None, high: float | None = None, p_value: float | None = None,
            alpha: float = ALPHA) -> str:
    """An interval excluding 0 above → supported, below → not supported; a one-sided p-value (the claimed
    direction) < α/2 → supported; anything else inconclusive."""
    if p_value is not None:
        return VERDICTS[0] if p_value < alpha / 2 else VERDICTS[2]
    if low is None or high is None:
        raise ValueError("give an interval (low, high) or a p-value")
    if low > 0:
        return VERDICTS[0]
    if high < 0:
        return VERDICTS[1]
    return VERDICTS[2]


def direction_verdict(difference: float, p_value: float, min_p: float, alpha: float = ALPHA) -> str:
    """Two-sided test of a claimed positive difference: "not testable at this scale" when ``min_p`` ≥ α (by
    design), supported / not supported when p < α with the estimate above / below 0, else inconclusive."""
    if not math.isfinite(min_p) or min_p >= alpha:
        return NOT_TESTABLE
    if p_value < alpha:
        return VERDICTS[0] if difference > 0 else VERDICTS[1]
    return VERDICTS[2]


ORDERINGS = ("higher", "lower", "not distinguishable", NOT_TESTABLE)
"""What :func:`compare_cells` says of cell a against cell b."""


def compare_cells(a: np.ndarray | Sequence[float], b: np.ndarray | Sequence[float], rng: np.random.Generator,
                  n_boot: int = 4_000, alpha: float = ALPHA) -> dict[str, float | str]:
    """Cell a against cell b, with no direction claimed in advance.

    Args:
        a, b: either ``(num_seeds, num_problems)`` per-problem scores of each run of the cell (both on the same
            problems, e.g. pass@1 or greedy correctness per problem), or ``(num_seeds,)`` one value per run
            (e.g. a run's final entropy).
        rng: the random generator of the bootstrap.

    Returns:
        ``difference`` = mean a − mean b; ``low``, ``high``: its 1 − ``alpha`` interval, the hierarchical
        bootstrap of :func:`stratified_difference` (one stratum) for score matrices, NaN for per-run values (a
        bootstrap over a handful of seeds alone is not an interval to trust, ``docs/statistics.md`` §3);
        ``p_value`` and ``min_p`` of the exact :func:`permutation_test` of the per-run values (a matrix's row
        means); ``ordering``: "higher" / "lower" when p < ``alpha`` (a above / below b), "not testable at this
        scale" when ``min_p`` ≥ ``alpha`` (fixed by the numbers of seeds), else "not distinguishable".
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.ndim != b.ndim or a.ndim not in (1, 2) or (a.ndim == 2 and a.shape[1] != b.shape[1]):
        raise ValueError(f"need two (num_seeds,) vectors or two (num_seeds, num_problems) matrices on the same "
                         f"problems, got shapes {a.shape} and {b.shape}")
    if a.shape[0] == 0 or b.shape[0] == 0 or (a.ndim == 2 and a.shape[1] == 0):
        raise ValueError(f"each cell needs at least one run (and one problem), got shapes {a.shape} and {b.shape}")
    if a.ndim == 2:
        difference, low, high, _ = stratified_difference([(a, b)], rng, n_boot=n_boot, level=1 - alpha)
        runs_a, runs_b = a.mean(1), b.mean(1)
    else:
        difference, low, high = float(a.mean() - b.mean()), math.nan, math.nan
        runs_a, runs_b = a, b
    test = permutation_test([(runs_a, runs_b)], rng)
    if test["min_p"] >= alpha:
        ordering = NOT_TESTABLE
    elif test["p_value"] < alpha:
        ordering = ORDERINGS[0] if test["difference"] > 0 else ORDERINGS[1]
    else:
        ordering = ORDERINGS[2]
    return {"difference": difference, "low": low, "high": high, "p_value": test["p_value"], "min_p": test["min_p"],
            "ordering": ordering}
