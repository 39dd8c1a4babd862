"""kl_lib.toy.variance: exact baseline variances (against all N^G groups), the Gaussian tail and clamps.

Leave-one-out, derived. ĝ = (1/G) Σ_i u_i with u_i = a_i − β b_i s_i, b_i = mean_{j≠i} c_j. E[u_i] = μ because b_i
is independent of s_i and E[s] = 0. E‖u_i‖² = E‖a‖² − 2β c̄ E[a·s] + β² E[b²] E‖s‖², E[b²] = Var c/(G−1) + c̄².
For i ≠ k only the pairing of c_k (in b_i) with s_k and of c_i (in b_k) with s_i survives:
E[u_i·u_k] = ‖μ‖² + β²‖E[c s]‖²/(G−1)². Summing, G·tr Cov[ĝ] is the formula in the module docstring.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kl_lib.config import KLConfig
from kl_lib.toy import TabularPolicy, exact, variance

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(seed: int, vocab: int = 2, length: int = 2):
    g = torch.Generator().manual_seed(seed)
    return TabularPolicy.random(vocab, length, generator=g), TabularPolicy.random(vocab, length, generator=g)


def _group_variance(t: variance.PerSequence, beta: float, G: int) -> float:
    """tr Cov of the leave-one-out group estimate, by enumerating all N^G groups."""
    N = len(t.probs)
    mean = torch.zeros(t.grads.shape[1], dtype=torch.float64)
    second = 0.0
    for idx in itertools.product(range(N), repeat=G):
        w = math.prod(float(t.probs[i]) for i in idx)
        c = t.penalties[list(idx)]
        est = sum(t.grads[i] - beta * (c.sum() - c[j]) / (G - 1) * t.scores[i] for j, i in enumerate(idx)) / G
        mean += w * est
        second += w * float(est.square().sum())
    return second - float(mean.square().sum())


@pytest.mark.parametrize("config", [KLConfig("k1", "reward", beta=0.7), KLConfig("k3", "both"),
                                    KLConfig("analytic", "reward", beta=2.0)], ids=lambda c: c.name)
def test_baseline_variances_are_exact(config):
    pi, ref = _pair(3)
    out = variance.baseline_variances(pi, ref, config, (2, 3))
    assert abs(out["none"] - exact.kl_grad_variance(pi, ref, config)) < 1e-12
    t = variance.per_sequence_terms(pi, ref, config)
    for G in (2, 3):
        assert abs(G * _group_variance(t, config.beta, G) - out[f"loo G={G}"]) < 1e-10
    assert out["optimal"] <= min(out["none"], out["mean"]) + 1e-14  # b* minimises over constants
    assert out["loo G=3"] > out["mean"] and out["loo G=2"] > out["loo G=3"]  # LOO → b = E[c] as G grows


def test_optimal_baseline_is_the_vertex():
    pi, ref = _pair(5, vocab=3, length=2)
    config = KLConfig("k1", "reward")
    t = variance.per_sequence_terms(pi, ref, config)
    mu = t.mean(t.grads)

    def var(b: float) -> float:
        g = t.grads - b * t.scores
        return float(t.mean(g.square().sum(1))) - float(mu.square().sum())

    out = variance.baseline_variances(pi, ref, config, ())
    assert abs(var(out["b*"]) - out["optimal"]) < 1e-12 and abs(var(0.0) - out["none"]) < 1e-12
    assert var(out["b*"] + 1e-3) > out["optimal"] and var(out["b*"] - 1e-3) > out["optimal"]


def test_baselines_need_the_reward_placement():
    pi, ref = _pair(0)
    for config in (KLConfig("k3", "loss"), KLConfig("k1", "reward", reward_to_go=True)):
        with pytest.raises(ValueError, match="reward"):
            variance.baseline_variances(pi, ref, config)
    with pytest.raises(ValueError, match="at least 2"):
        variance.baseline_variances(pi, ref, KLConfig("k1", "reward"), (1,))


def test_gaussian_tail_numbers():
    s = variance.gaussian_std_over_kl(0.5)
    assert abs(s["k3"] - 2 * math.sqrt(math.e - 2)) < 1e-12 and s["k1"] == 2.0
    s2 = variance.gaussian_std_over_kl(2.0)
    assert abs(s2["k3"] - math.sqrt(math.exp(4) - 5) / 2) < 1e-12 and abs(s2["k1"] - 1.0) < 1e-12
    kl = variance.std_crossing("k3", "k1")
    at = variance.gaussian_std_over_kl(kl)
    assert abs(at["k3"] - at["k1"]) < 1e-9 and 0.62 < kl < 0.64


def test_clamp_moments():
    lp = torch.tensor([0.98, 0.0199, 0.0001], dtype=torch.float64).log()
    rp = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log()
    table = variance.clamp_moments(lp, rp, "k3", [None, 100.0, 5.0, 2.0, 1.0])
    kl = float((lp.exp() * (lp - rp)).sum())
    assert abs(table["bias"].iloc[0]) < 1e-12 and abs(table["bias"].iloc[1]) < 1e-12  # nothing clipped
    assert (table["bias"].iloc[2:] < 0).all() and table["bias"].iloc[2:].is_monotonic_decreasing
    assert (table["variance"].iloc[2:] < table["variance"].iloc[0]).all()
    assert ((table["mse"] - table["bias"] ** 2 - table["variance"]).abs() < 1e-9).all()
    assert abs(table["mean"].iloc[0] - kl) < 1e-12 and abs(table["clip_prob"].iloc[2] - 1e-4) < 1e-12
    with pytest.raises(ValueError, match="sampled"):
        variance.clamp_moments(lp, rp, "analytic", [1.0])
