"""The KL-regularised optimum π* ∝ π_ref·exp(R/β) for a 0/1 reward: pass@1, pass@k, entropy and KL against β.

For sequences y with reference probabilities π_ref(y) and a reward R(y) ∈ {0, 1}, write p = π_ref(R = 1) (the
reference's pass@1). The maximiser of E_π[R] − β KL(π‖π_ref) is (docs/contract.md §4)

    π*(y) = π_ref(y) e^{R(y)/β} / Z,      Z = 1 − p + p e^{1/β}.

Closed forms, with q = π*(R = 1), H₁ = H(π_ref | R = 1), H₀ = H(π_ref | R = 0):

    q(β)        = p e^{1/β} / (1 − p + p e^{1/β})            (pass@1; β → ∞: p, β → 0: 1)
    pass@k(β)   = 1 − (1 − q)^k                                (k independent samples)
    KL(π*‖π_ref) = q log(q/p) + (1 − q) log((1 − q)/(1 − p))
    H(π*)       = h(q) + q H₁ + (1 − q) H₀,   h(q) = −q log q − (1 − q) log(1 − q)

because π* restricted to either reward class is π_ref conditioned on that class. As β → 0 the entropy falls to
H₁, the reference's entropy *within the correct set*: the optimum concentrates on correct answers, in the
reference's proportions; it does not pick one. A policy whose entropy falls below H₁ with E[R] ≈ 1 has left the
optimum of every β. And the β that reaches a target pass@1 q is β = 1 / log(q(1 − p) / (p(1 − q))).

Departure from the paper: the paper reports entropy curves of trained LLMs; here the optimum they would reach
with an exact, unbiased gradient is computed for any reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd
import torch
from torch import Tensor

__all__ = [
    "beta_for_pass_at_1",
    "closed_form_curves",
    "entropy",
    "enumerated_curves",
    "optimal_probs",
    "pass_at_1",
    "pass_at_k",
]


def _check_binary(ref_probs: Tensor, rewards: Tensor) -> None:
    if ref_probs.shape != rewards.shape or ref_probs.ndim != 1:
        raise ValueError(f"ref_probs and rewards must be matching vectors, got {tuple(ref_probs.shape)}, "
                         f"{tuple(rewards.shape)}")
    if not ((rewards == 0) | (rewards == 1)).all():
        raise ValueError("rewards must be 0 or 1 (the closed forms are for a binary reward)")
    if not (ref_probs > 0).all() or abs(float(ref_probs.sum()) - 1) > 1e-9:
        raise ValueError("ref_probs must be positive and sum to 1")


def optimal_probs(ref_probs: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """π*(y) ∝ π_ref(y) exp(R(y)/β), ``(N,)`` float64, for any reward (computed in log space)."""
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta={beta!r} must be finite and > 0")
    return torch.softmax(ref_probs.double().log() + rewards.double() / beta, 0)


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def pass_at_1(p: float, beta: float) -> float:
    """q(β) = p e^{1/β} / (1 − p + p e^{1/β}) = σ(logit p + 1/β)."""
    if not 0 < p < 1:
        raise ValueError(f"p = π_ref(R = 1) must be in (0, 1), got {p}")
    return 1 / (1 + math.exp(-(math.log(p / (1 - p)) + 1 / beta)))


def pass_at_k(q: float | Tensor, k: int) -> float | Tensor:
    """1 − (1 − q)^k: the chance that at least one of k independent samples is correct."""
    return 1 - (1 - q) ** k


def beta_for_pass_at_1(p: float, q: float) -> float:
    """The β at which π* has pass@1 q (needs p < q < 1): 1 / log(q(1 − p) / (p(1 − q)))."""
    if not 0 < p < q < 1:
        raise ValueError(f"need 0 < p < q < 1, got p={p}, q={q}")
    return 1 / math.log(q * (1 - p) / (p * (1 - q)))


def entropy(probs: Tensor) -> float:
    """H = −Σ π log π (nats), with 0 log 0 = 0."""
    return float(-(torch.where(probs > 0, probs * probs.log(), torch.zeros_like(probs))).sum())


def closed_form_curves(ref_probs: Tensor, rewards: Tensor, betas: Sequence[float],
                       ks: Sequence[int] = (1, 8)) -> pd.DataFrame:
    """pass@1, pass@k, KL(π*‖π_ref) and H(π*) from the closed forms (module docstring), one row per β."""
    _check_binary(ref_probs, rewards)
    ref_probs = ref_probs.double()
    correct = rewards.bool()
    p = float(ref_probs[correct].sum())
    h1, h0 = entropy(ref_probs[correct] / p), entropy(ref_probs[~correct] / (1 - p))
    rows = []
    for beta in betas:
        z = math.log(p / (1 - p)) + 1 / float(beta)  # log-odds of π*(R = 1)
        log_q, log_not_q = -_softplus(-z), -_softplus(z)  # log q and log(1 − q), without cancellation
        q, not_q = math.exp(log_q), math.exp(log_not_q)
        rows.append({"beta": float(beta), **{f"pass@{k}": 1 - not_q**k for k in ks},
                     "kl_ref": q * (log_q - math.log(p)) + not_q * (log_not_q - math.log(1 - p)),
                     "entropy": -q * log_q - not_q * log_not_q + q * h1 + not_q * h0})
    return pd.DataFrame(rows).assign(entropy_ref=entropy(ref_probs), entropy_correct=h1, p_ref=p)


def enumerated_curves(ref_probs: Tensor, rewards: Tensor, betas: Sequence[float],
                      ks: Sequence[int] = (1, 8)) -> pd.DataFrame:
    """The same columns as :func:`closed_form_curves`, computed from the vector π*_β itself."""
    _check_binary(ref_probs, rewards)
    rows = []
    for beta in betas:
        q_vec = optimal_probs(ref_probs, rewards, float(beta))
        q = float((q_vec * rewards.double()).sum())
        rows.append({"beta": float(beta), **{f"pass@{k}": pass_at_k(q, k) for k in ks},
                     "kl_ref": float((q_vec * (q_vec.log() - ref_probs.double().log())).sum()),
                     "entropy": entropy(q_vec)})
    return pd.DataFrame(rows)
