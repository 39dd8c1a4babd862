"""Every KL configuration's loss term, implemented once (docs/contract.md §3).

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

Inputs. ``logp``, ``ref_logp``, ``behavior_logp`` and ``mask`` are ``(B, T)``, all of one shape; full
log-probabilities ``logprobs``/``ref_logprobs`` are ``(B, T, V)`` over the same ``(B, T)``; the mask is bool or
0/1. Anything else, and an empty batch (B = 0 or T = 0), is a ``ValueError`` naming the tensor, raised before
any compute. Masked positions (m_t = 0) are replaced before any arithmetic: their log-probs by 0 (so δ = 0,
ω = 1) and their vocabulary rows dropped from the analytic sum. Whatever they hold (NaN, ±inf, huge log-ratios)
they therefore contribute exactly nothing to the loss, the metrics and the gradient, which is exactly 0 there.
Because the batch loss is a weighted sum of per-sequence terms, never divided by the batch's token count, a
sequence without valid tokens contributes 0, and so does a batch made only of such sequences: an all-padding
batch gives loss 0, gradient 0 and metrics 0 (not an error), so a batch split into micro-batches or chunks
never fails on a part that happens to be all padding.

Library variants (``kl_lib.config.KLSetting``; a plain ``KLConfig`` is the setting with no variant, and takes
exactly the operations above). With the estimate's value clamp, k_t → clamp(k_t, −c, c); with a straight-through
gradient estimator g, k_t → sg(k_t) + g(δ_t) − sg(g(δ_t)). The reward coefficient may be local, c_t = k_t, or
pass through a group's normalisation: over contiguous groups of G sequences, β c_t → (βc − mean_G βc)
(``"group_mean"``) or (βc − mean_G βc)/(std_G βc + ε) (``"group_std"``, Bessel's std), as GRPO does with a
KL-only reward. Token weights may be detached, v_t = sg(ω_t), or detached only where the log-ratio clamp binds;
TRL's sequence-level weight is v_t = exp(mean_t m_t log ω_t) (differentiable, one value per sequence).

Aggregations (``AGGREGATIONS``), for the batch loss from the per-sequence terms L_b with sample weights w_b and
n_b valid tokens: ``"sum"`` Σ_b w_b L_b (the contract; verl ``seq-mean-token-sum``); ``"token_mean"``
Σ_b w_b L_b / n_b (verl ``seq-mean-token-mean``, TRL ``grpo``); ``"global_token_mean"`` Σ_b w_b L_b / Σ_b w_b n_b
(verl ``token-mean``, TRL ``dapo``/``bnpo``, NeMo-RL ``token_level_loss``; over this call's batch, so a trainer
that splits a batch gets the per-part token count); ``"constant"`` Σ_b w_b L_b / C with C =
``aggregation_constant``, default the padded length T (verl ``seq-mean-token-sum-norm``, TRL ``dr_grpo`` with
C = ``max_completion_length``).

Departure from the paper: the paper folds the reward penalty into RLOO's rewards (so the leave-one-out baseline
also applies to it); here the penalty has no baseline. Both are unbiased; the RL trainer subtracts the paper's
leave-one-out baseline when asked (``RLConfig.kl_reward_baseline = "loo"``, ``kl_lib.rl.losses``). ``aggregation="token_mean"`` divides each sequence's term by its number
of valid tokens (by 1 when it has none): a different objective, offered because several libraries use it,
never the default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from kl_lib.config import KLConfig, KLSetting, as_setting
from kl_lib.estimators import (
    ESTIMATORS,
    Estimator,
    analytic,
    clamp_log_ratio,
    clamp_value,
    lookup_estimator,
)

__all__ = [
    "AGGREGATIONS",
    "estimate",
    "group_normalized",
    "importance_log_weights",
    "kl_metrics",
    "kl_term",
    "per_sequence_loss",
    "reward_coefficients",
    "sequence_weights",
    "token_factors",
]



class _Inputs(NamedTuple):
    """Checked inputs; the ``(B, T)`` log-probs hold 0 at masked positions (the full rows are masked in
    ``analytic``)."""

    logp: Tensor
    ref_logp: Tensor
    mask: Tensor  # bool
    behavior_logp: Tensor | None
    logprobs: Tensor | None
    ref_logprobs: Tensor | None


def _check_shape(name: str, x: Tensor, like: Tensor, like_name: str = "logp") -> None:
    if x.shape != like.shape:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)} but {like_name} has {tuple(like.shape)}; both must be (B, T)"
        )


def _valid_mask(mask: Tensor | None, like: Tensor, like_name: str = "logp") -> Tensor:
    """The bool validity mask for ``like`` (None = all valid): same shape, bool or 0/1 values."""
    if mask is None:
        return torch.ones_like(like, dtype=torch.bool)
    _check_shape("mask", mask, like, like_name)
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(
            f"mask (dtype {mask.dtype}) holds values other than 0 and 1; pass a bool mask (True = valid token)"
        )
    return mask.bool()


def _check_full(logp: Tensor, logprobs: Tensor | None, ref_logprobs: Tensor | None) -> None:
    for name, full in (("logprobs", logprobs), ("ref_logprobs", ref_logprobs)):
        if full is not None and (full.dim() != logp.dim() + 1 or full.shape[:-1] != logp.shape):
            raise ValueError(
                f"{name} has shape {tuple(full.shape)} but logp has {tuple(logp.shape)}; "
                f"{name} must be (B, T, V) for logp's (B, T)"
            )
    if logprobs is not None and ref_logprobs is not None and logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs has shape {tuple(logprobs.shape)} but ref_logprobs has {tuple(ref_logprobs.shape)}; "
            "both must be (B, T, V) over the same vocabulary"
        )


def _checked(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor | None,
    behavior_logp: Tensor | None = None,
    logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
    *,
    batch: bool = True,
) -> _Inputs:
    """Check the inputs (``batch``: a non-empty ``(B, T)``; else any one shape) and replace masked entries."""
    if batch and logp.dim() != 2:
        raise ValueError(f"logp has shape {tuple(logp.shape)}; expected (B, T), one row per sequence")
    if batch and logp.numel() == 0:
        raise ValueError(
            f"empty batch: logp has shape {tuple(logp.shape)}; pass at least one sequence (B ≥ 1) of at least "
            "one position (T ≥ 1)"
        )
    _check_shape("ref_logp", ref_logp, logp)
    if behavior_logp is not None:
        _check_shape("behavior_logp", behavior_logp, logp)
    _check_full(logp, logprobs, ref_logprobs)
    m = _valid_mask(mask, logp)

    def safe(x: Tensor | None) -> Tensor | None:
        return None if x is None else torch.where(m, x, 0.0)

    return _Inputs(safe(logp), safe(ref_logp), m, safe(behavior_logp), logprobs, ref_logprobs)


def _require_full(config: KLConfig, logprobs: Tensor | None, ref_logprobs: Tensor | None) -> None:
    if lookup_estimator(config.estimator).full_distribution and (logprobs is None or ref_logprobs is None):
        raise ValueError(
            f"estimator {config.estimator!r} needs the full next-token log-probabilities: "
            "pass logprobs and ref_logprobs of shape (B, T, V)"
        )


class _Estimate(NamedTuple):
    """Per-token estimates k (0 at masked positions), the clamps' clipped fractions and where δ was clipped."""

    k: Tensor
    clip_fraction: Tensor | None = None
    value_clip_fraction: Tensor | None = None
    clipped: Tensor | None = None


def _estimate(est: Estimator, x: _Inputs, clamp: float | None = None, setting: KLSetting | None = None) -> _Estimate:
    """The estimates of ``est`` on checked inputs, with the ``setting``'s value clamp and straight-through gradient."""
    clip_fraction = value_fraction = clipped = None
    if est.full_distribution:
        k = analytic(x.logprobs, x.ref_logprobs.detach(), x.mask)
    else:
        raw = log_ratio = x.logp - x.ref_logp.detach()
        if clamp is not None:
            log_ratio, clip_fraction = clamp_log_ratio(log_ratio, clamp, x.mask)
            clipped = raw.detach().abs() > clamp
        k = est.of_log_ratio(log_ratio)
        if setting is not None and setting.value_clamp is not None:
            k, value_fraction = clamp_value(k, setting.value_clamp, x.mask)
        if setting is not None and setting.gradient_estimator is not None:
            g = lookup_estimator(setting.gradient_estimator).of_log_ratio(raw)
            k = k.detach() + (g - g.detach())
    return _Estimate(torch.where(x.mask, k, torch.zeros_like(k)), clip_fraction, value_fraction, clipped)


def _estimate_config(config: KLConfig, x: _Inputs) -> _Estimate:
    setting = as_setting(config)
    return _estimate(lookup_estimator(setting.estimator), x, setting.log_ratio_clamp, setting)


def estimate(
    config: KLConfig,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor | None = None,
    logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Per-token estimates k_t for the configuration's estimator (with a ``KLSetting``'s value clamp and
    straight-through gradient).

    Args:
        logp: ``(B, T)`` log π_θ of the sampled tokens (differentiable). Elementwise, so any one shape is
            accepted (``kl_lib.toy.exact`` passes its ``(T, V, V)`` grid).
        ref_logp: ``(B, T)`` log π_ref of the sampled tokens.
        mask: ``(B, T)`` validity mask, bool or 0/1 (None = all valid).
        logprobs, ref_logprobs: ``(B, T, V)`` full next-token log-probabilities, required by ``analytic`` only.

    Returns:
        ``(k, clip_fraction)``: k is ``(B, T)``, exactly 0 with zero gradient at masked positions;
        clip_fraction is a 0-dim tensor when ``config.log_ratio_clamp`` is set, else None.
    """
    _require_full(config, logprobs, ref_logprobs)
    x = _checked(logp, ref_logp, mask, logprobs=logprobs, ref_logprobs=ref_logprobs, batch=False)
    e = _estimate_config(config, x)
    return e.k, e.clip_fraction


def importance_log_weights(logp: Tensor, behavior_logp: Tensor | None) -> Tensor:
    """log ω_t = logp_t − behavior_logp_t, differentiable through logp; on-policy (None) it is 0 in value."""
    if behavior_logp is None:
        return logp - logp.detach()
    _check_shape("behavior_logp", behavior_logp, logp)
    return logp - behavior_logp.detach()


def _detached_where_clamped(omega: Tensor, clipped: Tensor | None) -> Tensor:
    if clipped is None:
        raise ValueError("token_weight='detached_where_clamped' needs `clipped`, where the log-ratio clamp binds "
                         "(kl_term and per_sequence_loss pass it; the Markov DP does not support this weight)")
    return torch.where(clipped, omega.detach(), omega)


_TOKEN_WEIGHTS: dict[str, Callable[[Tensor, Tensor | None], Tensor]] = {
    "differentiable": lambda omega, clipped: omega,
    "detached": lambda omega, clipped: omega.detach(),
    "detached_where_clamped": _detached_where_clamped,
}


def _geometric_mean_weight(logp: Tensor, behavior_logp: Tensor | None, mask: Tensor | None) -> Tensor:
    """TRL's sequence weight exp(Σ_t m_t log ω_t / Σ_t m_t), differentiable, ``(B, 1)``."""
    m = torch.ones_like(logp, dtype=torch.bool) if mask is None else mask.bool()
    log_w = torch.where(m, importance_log_weights(logp, behavior_logp), 0.0)
    return (log_w.sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp_min(1).to(logp.dtype)).exp()


def token_factors(config: KLConfig, logp: Tensor, k: Tensor, behavior_logp: Tensor | None, *,
                  clipped: Tensor | None = None, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The differentiable per-token factors ``(u_t, v_t·k_t)``, both ``(B, T)``, before β and masking.

    ``clipped`` (where the log-ratio clamp binds) is needed by ``token_weight="detached_where_clamped"``, ``mask``
    by TRL's ``sequence_weight="geometric_mean"`` (None = all valid); both ``(B, T)``.
    """
    setting = as_setting(config)
    if setting.importance_weighting == "token":
        omega = _TOKEN_WEIGHTS[setting.token_weight](importance_log_weights(logp, behavior_logp).exp(), clipped)
        return omega, omega * k
    if setting.importance_weighting == "sequence" and setting.sequence_weight == "geometric_mean":
        return logp, _geometric_mean_weight(logp, behavior_logp, mask) * k
    return logp, k


def _coefficients(k: Tensor, m: Tensor, reward_to_go: bool, local: bool = False) -> Tensor:
    k = torch.where(m, k.detach(), torch.zeros_like(k))
    if local:
        return k
    if reward_to_go:
        return k.flip(-1).cumsum(-1).flip(-1)
    return k.sum(-1, keepdim=True).expand_as(k)


def reward_coefficients(k: Tensor, mask: Tensor | None = None, reward_to_go: bool = False, local: bool = False
                        ) -> Tensor:
    """Detached reward-penalty coefficients c_t, ``(B, T)``: the sequence sum of k, its reward-to-go, or k_t itself
    (``local``)."""
    return _coefficients(k, _valid_mask(mask, k, "k"), reward_to_go, local)


def group_normalized(c: Tensor, beta: float, group_size: int, scale: bool, epsilon: float = 1e-6) -> Tensor:
    """c' with β c' = (βc − mean_G βc) [/ (std_G βc + ε) if ``scale``], over contiguous groups; ``(B,)`` → ``(B,)``.

    This is GRPO's advantage normalisation of a reward −βc (sign kept as a loss coefficient); β = 0 gives 0.
    """
    if c.shape[0] % group_size:
        raise ValueError(f"reward_normalization needs the batch size B = {c.shape[0]} to be a multiple of "
                         f"group_size = {group_size}: pass groups of {group_size} contiguous samples of one prompt")
    if beta == 0:
        return torch.zeros_like(c)
    r = (beta * c.detach()).view(-1, group_size)
    centred = r - r.mean(-1, keepdim=True)
    if scale:
        centred = centred / (r.std(-1, keepdim=True) + epsilon)
    return centred.reshape(c.shape) / beta


def _reward_coefficients(setting: KLSetting, k: Tensor, m: Tensor) -> Tensor:
    c = _coefficients(k, m, setting.reward_to_go, setting.local_reward)
    if setting.reward_normalization == "none":
        return c
    c_seq = group_normalized(c[:, 0], setting.beta, setting.group_size, setting.reward_normalization == "group_std",
                             setting.std_epsilon)
    return c_seq.unsqueeze(-1).expand_as(c)


def _sequence_weights(config: KLConfig, logp: Tensor, behavior_logp: Tensor | None, m: Tensor) -> Tensor:
    if config.importance_weighting != "sequence" or behavior_logp is None:
        return torch.ones(logp.shape[0], dtype=logp.dtype, device=logp.device)
    log_w = torch.where(m, importance_log_weights(logp, behavior_logp).detach(), 0.0)
    return log_w.sum(-1).exp()


def sequence_weights(config: KLConfig, logp: Tensor, behavior_logp: Tensor | None, mask: Tensor | None) -> Tensor:
    """Detached per-sequence weights ``(B,)``: W = Π_t ω_t for ``"sequence"`` weighting, else ones."""
    if behavior_logp is not None:
        _check_shape("behavior_logp", behavior_logp, logp)
    return _sequence_weights(config, logp, behavior_logp, _valid_mask(mask, logp))


def _per_sequence(config: KLConfig, x: _Inputs, e: _Estimate) -> Tensor:
    setting = as_setting(config)
    u, vk = token_factors(setting, x.logp, e.k, x.behavior_logp, clipped=e.clipped, mask=x.mask)
    per_token = torch.zeros_like(x.logp)
    if setting.in_reward:
        per_token = per_token + _reward_coefficients(setting, e.k, x.mask) * u
    if setting.in_loss:
        per_token = per_token + vk
    per_token = torch.where(x.mask, per_token, torch.zeros_like(per_token))
    seq_w = (_sequence_weights(setting, x.logp, x.behavior_logp, x.mask) if setting.sequence_weight == "product"
             else torch.ones(x.logp.shape[0], dtype=x.logp.dtype, device=x.logp.device))
    return setting.beta * seq_w * per_token.sum(-1)


def per_sequence_loss(
    config: KLConfig,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor | None = None,
    *,
    behavior_logp: Tensor | None = None,
    logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
) -> Tensor:
    """L(y) for each sequence, ``(B,)``: the formula in this module's docstring (sum over tokens).

    Arguments as for :func:`kl_term`.
    """
    _require_full(config, logprobs, ref_logprobs)
    x = _checked(logp, ref_logp, mask, behavior_logp, logprobs, ref_logprobs)
    return _per_sequence(config, x, _estimate_config(config, x))


def _sample_weights(weights: Tensor | None, logp: Tensor) -> Tensor:
    if weights is None:
        return torch.full((logp.shape[0],), 1.0 / logp.shape[0], dtype=logp.dtype, device=logp.device)
    if weights.shape != logp.shape[:1]:
        raise ValueError(f"weights has shape {tuple(weights.shape)}; expected ({logp.shape[0]},), one per sequence")
    return weights.detach()


@torch.no_grad()
def _metrics(x: _Inputs, w: Tensor) -> dict[str, Tensor]:
    out = {}
    for name, est in ESTIMATORS.items():
        if est.full_distribution and (x.logprobs is None or x.ref_logprobs is None):
            continue
        k = _estimate(est, x).k
        out[f"kl/{name}"] = (w * k.sum(-1)).sum()
    return out


def kl_metrics(
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor | None = None,
    weights: Tensor | None = None,
    logprobs: Tensor | None = None,
    ref_logprobs: Tensor | None = None,
) -> dict[str, Tensor]:
    """Weighted means over sequences of Σ_t k_t for every estimator (``kl/k1`` … ``kl/analytic``), detached.

    ``kl/analytic`` only when both full log-probabilities are given. Arguments as for :func:`kl_term`.
    """
    x = _checked(logp.detach(), ref_logp.detach(), mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    return _metrics(x, _sample_weights(weights, logp))


def _token_counts(m: Tensor, dtype: torch.dtype) -> Tensor:
    return m.sum(-1).clamp_min(1).to(dtype)


def _global_token_mean(per_seq: Tensor, w: Tensor, m: Tensor, constant: float | None) -> Tensor:
    tokens = (w * m.sum(-1).to(per_seq.dtype)).sum()
    return (w * per_seq).sum() / torch.where(tokens > 0, tokens, torch.ones_like(tokens))


_AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, Tensor, float | None], Tensor]] = {
    "sum": lambda per_seq, w, m, constant: (w * per_seq).sum(),
    "token_mean": lambda per_seq, w, m, constant: (w * (per_seq / _token_counts(m, per_seq.dtype))).sum(),
    "global_token_mean": _global_token_mean,
    "constant": lambda per_seq, w, m, constant: (w * per_seq).sum() / (m.shape[-1] if constant is None else constant),
}
AGGREGATIONS: tuple[str, ...] = tuple(_AGGREGATIONS)


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
    aggregation: Literal["sum", "token_mean", "global_token_mean", "constant"] = "sum",
    aggregation_constant: float | None = None,
    estimator_metrics: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The configuration's KL loss term for a batch, and its metrics.

    Args:
        config: the KL configuration.
        logp: ``(B, T)`` log π_θ(y_t|s_t) of the sampled tokens, differentiable; B, T ≥ 1.
        ref_logp: ``(B, T)`` log π_ref(y_t|s_t), treated as a constant.
        mask: ``(B, T)`` validity mask, bool or 0/1 (None = all valid). Masked positions may hold anything.
        behavior_logp: ``(B, T)`` log μ(y_t|s_t) of the policy that sampled y; None means on-policy (μ = π_θ).
        logprobs, ref_logprobs: ``(B, T, V)`` full log-probabilities (``analytic`` estimator and metric only).
        weights: ``(B,)`` sample weights, default 1/B (Monte Carlo mean); exact analysis passes μ(y).
        aggregation: ``"sum"`` over tokens (docs/contract.md §3, default), ``"token_mean"`` per sequence,
            ``"global_token_mean"`` or ``"constant"`` (see the module docstring).
        aggregation_constant: the divisor C of ``"constant"`` (default T, the padded length); only with it.
        estimator_metrics: also compute every estimator's value (``kl/k1`` …); a caller that logs them from
            elsewhere (the RL trainer, once per batch) passes False and gets only ``kl/term`` and the clip
            fractions.

    Returns:
        ``(loss, metrics)``: loss is a 0-dim tensor to add to the minimised objective (0 for an all-padding
        batch); metrics holds detached 0-dim tensors ``kl/term``, ``kl/k1`` … and ``kl/clip_fraction`` (over
        valid tokens, 0 when there are none) when a clamp is configured, ``kl/value_clip_fraction`` likewise.
    """
    if aggregation not in _AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r} is not valid; choose one of {', '.join(map(repr, AGGREGATIONS))}")
    _check_constant(aggregation, aggregation_constant)
    _require_full(config, logprobs, ref_logprobs)
    x = _checked(logp, ref_logp, mask, behavior_logp, logprobs, ref_logprobs)
    w = _sample_weights(weights, logp)
    e = _estimate_config(config, x)
    loss = _AGGREGATIONS[aggregation](_per_sequence(config, x, e), w, x.mask, aggregation_constant)
    metrics = _metrics(x, w) if estimator_metrics else {}
    metrics["kl/term"] = loss.detach()
    for key, fraction in (("kl/clip_fraction", e.clip_fraction), ("kl/value_clip_fraction", e.value_clip_fraction)):
        if fraction is not None:
            metrics[key] = fraction.detach()
    return loss, metrics


def _check_constant(aggregation: str, constant: float | None) -> None:
    if constant is None:
        return
    if aggregation != "constant":
        raise ValueError(f"aggregation_constant={constant!r} is only used with aggregation='constant'")
    if isinstance(constant, bool) or not isinstance(constant, (int, float)) or not 0 < constant < float("inf"):
        raise ValueError(f"aggregation_constant={constant!r} must be a positive finite number (e.g. the maximum "
                         "completion length)")
