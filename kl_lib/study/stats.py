"""Uncertainty for small sweeps: bootstrap confidence intervals, an exact test for rates, and verdicts.

* :func:`bootstrap_mean_ci` — percentile bootstrap CI of a mean.
* :func:`hierarchical_bootstrap` — accuracy of a configuration averaged over seeds (runs) and problems, with a
  two-level bootstrap: resample seeds, then problems (the same problem draw for every configuration in a paired
  comparison, so the shared difficulty of the problems cancels in differences).
* :func:`fisher_exact_greater` — one-sided Fisher exact test that one group's rate of events (diverged or
  collapsed runs) is higher than another's.
* :func:`verdict` — maps an interval or a p-value to "supported", "not supported" or "inconclusive at this
  scale". The rule is fixed before looking at data: a difference is supported when its 95% interval excludes
  0 in the claimed direction, contradicted ("not supported") when it excludes 0 in the other direction, and
  inconclusive otherwise; a rate comparison is supported when p < 0.05.

All randomness comes from an explicit ``numpy.random.Generator``.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["bootstrap_mean_ci", "hierarchical_bootstrap", "interval", "fisher_exact_greater", "verdict", "VERDICTS"]

VERDICTS = ("supported", "not supported", "inconclusive at this scale")


def bootstrap_mean_ci(values: Sequence[float], rng: np.random.Generator, level: float = 0.95,
                      n_boot: int = 10_000) -> tuple[float, float, float]:
    """``(mean, low, high)``: percentile bootstrap interval of the mean of ``values``."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_mean_ci needs at least one value")
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    means = x[idx].mean(1)
    alpha = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def hierarchical_bootstrap(scores: dict[str, np.ndarray], rng: np.random.Generator, level: float = 0.95,
                           n_boot: int = 4_000) -> dict[str, np.ndarray]:
    """Bootstrap replicates of each group's mean accuracy.

    Args:
        scores: group name → ``(num_seeds, num_problems)`` per-problem accuracies (e.g. pass@1 per problem) of
            each seed's run; every group must cover the same problems in the same order.
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


def interval(replicates: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    alpha = (1 - level) / 2
    return float(np.quantile(replicates, alpha)), float(np.quantile(replicates, 1 - alpha))


def fisher_exact_greater(events_a: int, n_a: int, events_b: int, n_b: int) -> float:
    """One-sided p-value that group a's event rate exceeds group b's (hypergeometric tail)."""
    if not (0 <= events_a <= n_a and 0 <= events_b <= n_b):
        raise ValueError("need 0 ≤ events ≤ n in both groups")
    total_events, total = events_a + events_b, n_a + n_b
    denom = math.comb(total, n_a)
    hi = min(n_a, total_events)
    return sum(math.comb(total_events, k) * math.comb(total - total_events, n_a - k)
               for k in range(events_a, hi + 1)) / denom


def verdict(low: float | None = None, high: float | None = None, p_value: float | None = None,
            alpha: float = 0.05) -> str:
    """The pre-registered decision rule of this module's docstring."""
    if p_value is not None:
        return VERDICTS[0] if p_value < alpha else VERDICTS[2]
    if low is None or high is None:
        raise ValueError("give an interval (low, high) or a p-value")
    if low > 0:
        return VERDICTS[0]
    if high < 0:
        return VERDICTS[1]
    return VERDICTS[2]
