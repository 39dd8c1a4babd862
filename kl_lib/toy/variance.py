"""Variance done exactly: baselines for the KL penalty, k3's heavy tail, and what a clamp costs.

**Baselines** (docs/contract.md §3). For a configuration with the KL in the reward (placement ``"reward"`` or
``"both"``, whole-sequence coefficient c(y) = Σ_t k_t), write a(y) = ∇L(y) for the per-sequence gradient,
s(y) = ∇log π_θ(y) for the score, μ = E[a] and r = E[c s]. Subtracting β·b·s(y) leaves the mean unchanged
(E[s] = 0). On-policy, by enumeration of all V^T sequences:

* constant b:  tr Cov[a − βbs] = E‖a‖² − 2βb E[a·s] + β²b² E‖s‖² − ‖μ‖²,  smallest at b* = E[a·s] / (β E‖s‖²);
* leave-one-out over a group of G samples (RLOO, as the paper folds the penalty into the rewards),
  b_i = (1/(G−1)) Σ_{j≠i} c(y_j), group estimate ĝ = (1/G) Σ_i (a_i − β b_i s_i). With c̄ = E[c],
  G · tr Cov[ĝ] = E‖a‖² − 2βc̄ E[a·s] + β²(Var c/(G−1) + c̄²) E‖s‖² − ‖μ‖² + β²‖r‖²/(G−1),
  i.e. the constant baseline b = c̄ plus two O(1/G) terms: the noise of estimating c̄ from G − 1 samples and
  the correlation that b_k shares with a_i through c_i (derivation in tests/test_toy_variance.py, which checks
  the formula against all N^G groups). Reported multiplied by G, so that every number is a one-sample variance.

**k3's heavy tail.** In Schulman's Gaussian family (q = N(0,1), p = N(μ,1), KL = μ²/2; ``kl_lib.toy.gaussian``)
std/KL is 2/μ for k1 and 2√(e^{μ²} − 1 − μ²)/μ² for k3: k3 wins near the reference (√2 vs ∞ as KL → 0), but
the ratio r = p/q has a log-normal tail, Var r = e^{μ²} − 1, and k3's spread overtakes k1's at a finite KL
(``std_crossing``). Libraries clamp δ for this reason.

**A clamp, exactly.** On one next-token distribution, k(clamp(δ, −c, c)) has bias E[k(clamp δ)] − KL and
variance Var[k(clamp δ)], both sums over the vocabulary (``clamp_moments``). For k3, clamping can only lower
the value (k3 decreases in δ below 0 and increases above), so the bias is ≤ 0: the clamp trades the tail's
variance for a downward bias.

Departure from the paper: the paper's Fig. 2 estimates variance from Monte Carlo repeats with no baseline on
the penalty; here the variances are exact, with and without the baselines the paper's RLOO implies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch
from torch import Tensor

from kl_lib import objectives
from kl_lib.config import KLConfig
from kl_lib.estimators import clamp_log_ratio, get_estimator
from kl_lib.toy import exact, gaussian
from kl_lib.toy.policies import TabularPolicy, check_compatible

__all__ = [
    "PerSequence",
    "baseline_variances",
    "clamp_moments",
    "gaussian_std_over_kl",
    "per_sequence_terms",
    "std_crossing",
]


class PerSequence:
    """Every sequence's probability, gradient a(y), score s(y) and penalty c(y), on-policy, by enumeration."""

    def __init__(self, probs: Tensor, grads: Tensor, scores: Tensor, penalties: Tensor):
        self.probs, self.grads, self.scores, self.penalties = probs, grads, scores, penalties  # (N,), (N, D) ×2, (N,)

    def mean(self, x: Tensor) -> Tensor:
        """E_π[x] over sequences, for x of shape (N,) or (N, D)."""
        return torch.tensordot(self.probs, x, dims=([0], [0]))


def _flat(policy: TabularPolicy, seqs: Tensor, g: Tensor) -> Tensor:
    """Scatter per-sequence gradients w.r.t. gathered logits (N, T, V) into parameter space (N, P·V)."""
    n, V = seqs.shape[0], policy.vocab_size
    out = torch.zeros(n, policy.logits.numel(), dtype=torch.float64)
    cols = (policy.param_rows(seqs).unsqueeze(-1) * V + torch.arange(V)).reshape(n, -1)
    return out.scatter_(1, cols, g.reshape(n, -1))


def per_sequence_terms(policy: TabularPolicy, ref: TabularPolicy, config: KLConfig) -> PerSequence:
    """a(y) = ∇L(y) through ``kl_lib.objectives``, s(y) = ∇log π(y) and c(y) = Σ_t k_t, for all V^T sequences."""
    check_compatible(policy, ref)
    seqs = exact.all_sequences(policy.vocab_size, policy.length)
    gathered = policy.gather_logits(seqs, policy.logits.detach().double()).requires_grad_()  # (N, T, V)
    logprobs = torch.log_softmax(gathered, -1)
    logp = logprobs.gather(-1, seqs.unsqueeze(-1)).squeeze(-1)  # (N, T)
    ref_logp, ref_logprobs = ref.token_logprobs(seqs, ref.logits.detach().double())
    loss = objectives.per_sequence_loss(config, logp, ref_logp, logprobs=logprobs, ref_logprobs=ref_logprobs)
    (g,) = torch.autograd.grad(loss.sum(), gathered, retain_graph=True)
    (s,) = torch.autograd.grad(logp.sum(), gathered, retain_graph=True)
    k, _ = objectives.estimate(config, logp.detach(), ref_logp, logprobs=logprobs.detach(), ref_logprobs=ref_logprobs)
    return PerSequence(logp.detach().sum(-1).exp(), _flat(policy, seqs, g), _flat(policy, seqs, s), k.sum(-1))


def baseline_variances(policy: TabularPolicy, ref: TabularPolicy, config: KLConfig,
                       group_sizes: Sequence[int] = (2, 4, 8)) -> dict[str, float]:
    """One-sample variances (module docstring) with no baseline, b = E[c], b = b*, and leave-one-out over G.

    Returns a dict: ``"none"``, ``"mean"``, ``"optimal"``, ``"loo G=<G>"`` for each G, and ``"b*"``, ``"E[c]"``.
    """
    if not config.in_reward or config.reward_to_go:
        raise ValueError(f"{config.label}: a penalty baseline needs the KL in the reward with whole-sequence "
                         "coefficients (placement 'reward' or 'both', reward_to_go=False)")
    if config.importance_weighting != "none" or config.beta <= 0:
        raise ValueError(f"{config.label}: baselines are computed on-policy, without weights and with β > 0")
    if any(g < 2 for g in group_sizes):
        raise ValueError(f"leave-one-out needs groups of at least 2, got {list(group_sizes)}")
    t = per_sequence_terms(policy, ref, config)
    beta = config.beta
    mu = t.mean(t.grads)
    a2, s2 = float(t.mean(t.grads.square().sum(1))), float(t.mean(t.scores.square().sum(1)))
    a_s = float(t.mean((t.grads * t.scores).sum(1)))
    c_bar = float(t.mean(t.penalties))
    var_c = float(t.mean(t.penalties.square())) - c_bar**2
    r2 = float(t.mean(t.penalties.unsqueeze(1) * t.scores).square().sum())

    def constant(b: float) -> float:
        return a2 - 2 * beta * b * a_s + beta**2 * b**2 * s2 - float(mu.square().sum())

    b_star = a_s / (beta * s2)
    out = {"none": constant(0.0), "mean": constant(c_bar), "optimal": constant(b_star), "b*": b_star, "E[c]": c_bar}
    for g in group_sizes:
        out[f"loo G={g}"] = constant(c_bar) + beta**2 * (var_c * s2 + r2) / (g - 1)
    return out


def gaussian_std_over_kl(kl: float) -> dict[str, float]:
    """std/KL of one sample of k1, k2, k3 in Schulman's Gaussian family at the given KL = μ²/2 (closed form)."""
    if not (math.isfinite(kl) and kl > 0):
        raise ValueError(f"kl={kl!r} must be finite and > 0")
    table = gaussian.closed_form_table((math.sqrt(2 * kl),))
    return dict(zip(table["estimator"], table["std_over_true"].astype(float)))


def std_crossing(a: str = "k3", b: str = "k1", low: float = 1e-3, high: float = 10.0) -> float:
    """The KL at which std/KL of estimator ``a`` overtakes that of ``b`` in the Gaussian family (bisection)."""
    def gap(kl: float) -> float:
        s = gaussian_std_over_kl(kl)
        return s[a] - s[b]

    if not gap(low) < 0 < gap(high):
        raise ValueError(f"{a} does not overtake {b} between KL = {low} and {high}")
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if gap(mid) < 0 else (low, mid)
    return 0.5 * (low + high)


def clamp_moments(logprobs: Tensor, ref_logprobs: Tensor, estimator: str,
                  bounds: Sequence[float | None]) -> pd.DataFrame:
    """Exact mean, bias, variance and MSE of one sampled estimate k(clamp(δ, −c, c)), v ~ π, for each bound.

    ``logprobs``, ``ref_logprobs``: ``(V,)`` next-token log-probabilities of π_θ and π_ref at one state;
    a bound ``None`` is the unclamped estimator. Columns: bound, mean, bias, variance, mse, clip_prob.
    """
    if logprobs.shape != ref_logprobs.shape or logprobs.ndim != 1:
        raise ValueError(f"need two (V,) log-probability vectors, got {tuple(logprobs.shape)}, "
                         f"{tuple(ref_logprobs.shape)}")
    fn = get_estimator(estimator)
    if fn.full_distribution:
        raise ValueError("clamps apply to sampled estimators (k1, k2, k3), not 'analytic'")
    logprobs, ref_logprobs = logprobs.double(), ref_logprobs.double()
    probs = logprobs.exp()
    kl = float((probs * (logprobs - ref_logprobs)).sum())
    delta = logprobs - ref_logprobs
    rows = []
    for bound in bounds:
        clipped, _ = (delta, None) if bound is None else clamp_log_ratio(delta, bound)
        k = fn.of_log_ratio(clipped)
        mean = float((probs * k).sum())
        var = float((probs * (k - mean).square()).sum())
        clip_prob = 0.0 if bound is None else float(probs[delta.abs() > bound].sum())
        rows.append({"bound": bound, "mean": mean, "bias": mean - kl, "variance": var,
                     "mse": (mean - kl) ** 2 + var, "clip_prob": clip_prob})
    return pd.DataFrame(rows)
