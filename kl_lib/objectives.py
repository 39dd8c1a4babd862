"""Every KL configuration's loss term, implemented once (DESIGN.md §3).

For a sampled sequence y ~ μ with per-token estimates k_t (``kl_lib.estimators``), the configuration adds to the
loss that is *minimised*

    L(y) = sg(W) · β · Σ_t m_t [ 1[reward] · sg(c_t) · u_t  +  1[loss] · v_t · k_t(θ) ]          (B,) per sequence

with
    c_t = Σ_{t'} k_{t'}               (whole sequence)   or   Σ_{t' ≥ t} k_{t'}   (``reward_to_go``)
    u_t = logp_t  (weights none/sequence)                 or   ω_t                 (weights token)
    v_t = 1       (weights none/sequence)                 or   ω_t                 (weights token)
    ω_t = exp(logp_t − behavior_logp_t)   (value 1 on-policy, gradient ω_t ∇logp_t: so even on-policy,
                                          token weights add the score term k_t ∇logp_t to the loss placement)
    W   = exp(Σ_t m_t (logp_t − behavior_logp_t))   for ``"sequence"`` weights, else 1,

m_t the validity mask (padding contributes nothing), and no length normalisation. The batch loss is
Σ_b w_b L(y_b) with sample weights w: 1/B for Monte Carlo samples in the trainer, the exact sequence
probabilities μ(y) in ``kl_lib.toy.exact``. Either way ∇(Σ_b w_b L(y_b)) is the configuration's gradient estimate
(or, exactly, its expectation): this module is the single implementation both use.

The expression is split into pieces so that ``kl_lib.toy.exact`` can also use it by dynamic programming: the
detached coefficients (c_t, W) depend on the whole sequence, the differentiable factors (u_t, v_t·k_t) on one
token and its state only.

Departure from the paper: the paper folds the reward penalty into RLOO's rewards (so the leave-one-out baseline
also applies to it); here the penalty has no baseline. Both are unbiased; the RL trainer may subtract a baseline
from ``reward_coefficients`` itself. ``aggregation="token_mean"`` divides each sequence's term by its number
of valid tokens: a different objective, offered because several libraries use it, never the default.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from kl_lib.config import KLConfig
from kl_lib.estimators import ESTIMATORS, analytic, clamp_log_ratio, get_estimator

__all__ = [
    "estimate",
    "importance_log_weights",
    "token_factors",
    "reward_coefficients",
    "sequence_weights",
    "per_sequence_loss",
    "kl_term",
    "kl_metrics",
    "AGGREGATIONS",
]

AGGREGATIONS: tuple[str, ...] = ("sum", "token_mean")


def _mask_like(logp: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return torch.ones_like(logp, dtype=torch.bool)
    if mask.shape != logp.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)} but logp has shape {tuple(logp.shape)}; both (B, T)")
    return mask.bool()


def estimate(
    config: KLConfig,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor | None = None,
    logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per-token estimates k_t for the configuration's estimator.

    Args:
        logp: ``(B, T)`` log π_θ of the sampled tokens (differentiable).
        ref_logp: ``(B, T)`` log π_ref of the sampled tokens.
        mask: ``(B, T)`` validity mask (None = all valid).
        logprobs, ref_logprobs: ``(B, T, V)`` full next-token log-probabilities, required by ``analytic`` only.

    Returns:
        ``(k, clip_fraction)``: k is ``(B, T)`` with 0 at masked positions; clip_fraction is a 0-dim tensor
        when ``config.log_ratio_clamp`` is set, else None.
    """
    m = _mask_like(logp, mask)
    est = get_estimator(config.estimator)
    clip_fraction = None
    if est.full_distribution:
        if logprobs is None or ref_logprobs is None:
            raise ValueError(
                f"estimator {config.estimator!r} needs the full next-token log-probabilities: "
                "pass logprobs and ref_logprobs of shape (B, T, V)"
            )
        k = analytic(logprobs, ref_logprobs.detach())
    else:
        log_ratio = logp - ref_logp.detach()
        if config.log_ratio_clamp is not None:
            log_ratio, clip_fraction = clamp_log_ratio(log_ratio, config.log_ratio_clamp, m)
        k = est.of_log_ratio(log_ratio)
    return torch.where(m, k, torch.zeros_like(k)), clip_fraction


def _check_behavior(logp: Tensor, behavior_logp: Tensor | None) -> None:
    if behavior_logp is not None and behavior_logp.shape != logp.shape:
        raise ValueError(
            f"behavior_logp has shape {tuple(behavior_logp.shape)} but logp has {tuple(logp.shape)}; both (B, T)"
        )


def importance_log_weights(logp: Tensor, behavior_logp: Tensor | None) -> Tensor:
    """log ω_t = logp_t − behavior_logp_t, differentiable through logp; on-policy (None) it is 0 in value."""
    if behavior_logp is None:
        return logp - logp.detach()
    _check_behavior(logp, behavior_logp)
    return logp - behavior_logp.detach()


def token_factors(config: KLConfig, logp: Tensor, k: Tensor, behavior_logp: Tensor | None) -> tuple[Tensor, Tensor]:
    """The differentiable per-token factors ``(u_t, v_t·k_t)``, both ``(B, T)``, before β and masking."""
    if config.importance_weighting == "token":
        omega = importance_log_weights(logp, behavior_logp).exp()
        return omega, omega * k
    return logp, k


def reward_coefficients(k: Tensor, mask: Tensor | None = None, reward_to_go: bool = False) -> Tensor:
    """Detached reward-penalty coefficients c_t, ``(B, T)``: the sequence sum of k, or its reward-to-go."""
    k = torch.where(_mask_like(k, mask), k.detach(), torch.zeros_like(k))
    if reward_to_go:
        return k.flip(-1).cumsum(-1).flip(-1)
    return k.sum(-1, keepdim=True).expand_as(k)


def sequence_weights(config: KLConfig, logp: Tensor, behavior_logp: Tensor | None, mask: Tensor | None) -> Tensor:
    """Detached per-sequence weights ``(B,)``: W = Π_t ω_t for ``"sequence"`` weighting, else ones."""
    if config.importance_weighting != "sequence" or behavior_logp is None:
        return torch.ones(logp.shape[0], dtype=logp.dtype, device=logp.device)
    log_w = torch.where(_mask_like(logp, mask), importance_log_weights(logp, behavior_logp).detach(), 0.0)
    return log_w.sum(-1).exp()


def per_sequence_loss(
    config: KLConfig,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor | None = None,
    *,
    behavior_logp: Tensor | None = None,
    logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    k: Tensor | None = None,
) -> Tensor:
    """L(y) for each sequence, ``(B,)``: the formula in this module's docstring (sum over tokens).

    ``k`` may be passed when the caller already has ``estimate(...)[0]`` for the same inputs.
    """
    m = _mask_like(logp, mask)
    if k is None:
        k, _ = estimate(config, logp, ref_logp, m, logprobs, ref_logprobs)
    u, vk = token_factors(config, logp, k, behavior_logp)
    per_token = torch.zeros_like(logp)
    if config.in_reward:
        per_token = per_token + reward_coefficients(k, m, config.reward_to_go) * u
    if config.in_loss:
        per_token = per_token + vk
    per_token = torch.where(m, per_token, torch.zeros_like(per_token))
    return config.beta * sequence_weights(config, logp, behavior_logp, m) * per_token.sum(-1)


@torch.no_grad()
def kl_metrics(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor | None = None,
    weights: Tensor | None = None,
    logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
) -> dict[str, Tensor]:
    """Weighted means over sequences of Σ_t k_t for every estimator (``kl/k1`` … ``kl/analytic``), detached."""
    m = _mask_like(logp, mask)
    w = _sample_weights(weights, logp)
    out = {}
    for name, est in ESTIMATORS.items():
        if est.full_distribution:
            if logprobs is None or ref_logprobs is None:
                continue
            k = analytic(logprobs, ref_logprobs)
        else:
            k = est.of_log_ratio(logp - ref_logp)
        out[f"kl/{name}"] = (w * torch.where(m, k, torch.zeros_like(k)).sum(-1)).sum()
    return out


def _sample_weights(weights: Tensor | None, logp: Tensor) -> Tensor:
    if weights is None:
        return torch.full((logp.shape[0],), 1.0 / logp.shape[0], dtype=logp.dtype, device=logp.device)
    if weights.shape != logp.shape[:1]:
        raise ValueError(f"weights has shape {tuple(weights.shape)}; expected ({logp.shape[0]},), one per sequence")
    return weights.detach()


def kl_term(
    config: KLConfig,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor | None = None,
    *,
    behavior_logp: Tensor | None = None,
    logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    weights: Tensor | None = None,
    aggregation: Literal["sum", "token_mean"] = "sum",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The configuration's KL loss term for a batch, and its metrics.

    Args:
        config: the KL configuration.
        logp: ``(B, T)`` log π_θ(y_t|s_t) of the sampled tokens, differentiable.
        ref_logp: ``(B, T)`` log π_ref(y_t|s_t), treated as a constant.
        mask: ``(B, T)`` bool validity mask (None = all valid).
        behavior_logp: ``(B, T)`` log μ(y_t|s_t) of the policy that sampled y; None means on-policy (μ = π_θ).
        logprobs, ref_logprobs: ``(B, T, V)`` full log-probabilities (``analytic`` estimator and metric only).
        weights: ``(B,)`` sample weights, default 1/B (Monte Carlo mean); exact analysis passes μ(y).
        aggregation: ``"sum"`` over tokens (DESIGN.md, default) or ``"token_mean"`` per sequence.

    Returns:
        ``(loss, metrics)``: loss is a 0-dim tensor to add to the minimised objective; metrics holds detached
        0-dim tensors ``kl/term``, ``kl/k1`` … and ``kl/clip_fraction`` when a clamp is configured.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} is not valid; choose one of {', '.join(map(repr, AGGREGATIONS))}")
    if ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp has shape {tuple(ref_logp.shape)} but logp has {tuple(logp.shape)}; both (B, T)")
    _check_behavior(logp, behavior_logp)
    m = _mask_like(logp, mask)
    w = _sample_weights(weights, logp)
    k, clip_fraction = estimate(config, logp, ref_logp, m, logprobs, ref_logprobs)
    per_seq = per_sequence_loss(config, logp, ref_logp, m, behavior_logp=behavior_logp, k=k)
    if aggregation == "token_mean":
        per_seq = per_seq / m.sum(-1).clamp_min(1).to(per_seq.dtype)
    loss = (w * per_seq).sum()
    metrics = kl_metrics(logp, ref_logp, m, w, logprobs, ref_logprobs)
    metrics["kl/term"] = loss.detach()
    if clip_fraction is not None:
        metrics["kl/clip_fraction"] = clip_fraction.detach()
    return loss, metrics
