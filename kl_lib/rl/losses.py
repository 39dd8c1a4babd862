"""The trainer's objective, piece by piece: advantages, policy-gradient losses and the KL term's loss.

Rewards ``(B,)`` come as consecutive groups of G samples of one prompt. Advantages, within each group:

    rloo     A_i = R_i − mean_{j≠i} R_j = (R_i − mean) · G / (G − 1)     (leave-one-out, the paper's)
    grpo     A_i = (R_i − mean) / (std + 1e-6)                          (std with Bessel's correction)
    drgrpo   A_i = R_i − mean                                           (Dr. GRPO: no std)

Policy-gradient losses (minimised), per token ``(B, T)`` before masking and aggregation:

    reinforce   −A_i log π(y_t)                                         (exactly on-policy)
    ppo         −min(r_t A_i, clip(r_t, 1 − ε, 1 + ε) A_i),  r_t = π(y_t) / μ(y_t)

aggregated by :func:`policy_loss` as ``kl_lib.objectives.kl_term`` aggregates the KL term: the mean over
sequences of Σ_t m_t (·) (``aggregation="sum"``), of the per-sequence token mean (``"token_mean"``), of Σ_t m_t (·)
over the batch's valid tokens (``"global_token_mean"``: Σ_b Σ_t m_t (·) / Σ_b n_b) or over a constant C
(``"constant"``). :func:`kl_loss` is ``kl_term``'s loss with its clip fractions but without the estimators'
values: the trainer logs every estimator once per batch itself, so the pass computes no KL twice. With a
``kl_lib.config.KLSetting`` it is the library variant's term (value clamp, straight-through gradient, local or
group-normalised reward penalty, token and sequence weights), computed by the same ``kl_term``.

Each advantage and policy loss is a small pure function in a registry (:func:`get_advantage`,
:func:`get_policy_loss`); unknown names raise ``ValueError`` listing the valid ones. The registries' names are
``kl_lib.rl.config.ADVANTAGES`` and ``POLICY_LOSSES``, which validate a config before any compute.

The KL penalty in the reward (placement ``reward``/``both``), −β·Σ_t k_t per sequence, is a loss term of its own
(``kl_lib.objectives``); :func:`kl_reward_loo_baseline` gives it the leave-one-out baseline

    b_i = β · mean_{j≠i} Σ_t m_t k_t(y_j)       (within the prompt's group of G samples)

which the trainer adds to the advantage (RLConfig ``kl_reward_baseline: loo``). With the ``rloo`` advantage the
update is then RLOO on the folded reward R_i − β·Σ_t k_t(y_i): the paper's form. b_i does not depend on y_i
(the group's samples are independent), so E[b_i ∇log π(y_i)] = 0 and the gradient stays unbiased; only its
variance changes. Departure from the paper: off-policy (PPO), the baseline passes through the ratio and its
clip with the advantage while the sample's own penalty keeps the KL term's form; with
``kl_reward_baseline: none`` (the default) the penalty gets no baseline at all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kl_lib import objectives
from kl_lib.config import KLConfig

__all__ = ["ADVANTAGE_FUNCTIONS", "POLICY_LOSS_FUNCTIONS", "compute_advantages", "get_advantage",
           "get_policy_loss", "kl_loss", "kl_reward_loo_baseline", "kl_reward_penalty",
           "leave_one_out_mean", "policy_loss"]


# ------------------------------------------------------------------------------------------------------------
# Advantages: (P, G) rewards of P prompts' groups -> (P, G) advantages
# ------------------------------------------------------------------------------------------------------------


def rloo(r: Tensor) -> Tensor:
    """R_i minus the mean of the group's other rewards, ``(P, G)``."""
    group_size = r.shape[-1]
    return (r - r.mean(-1, keepdim=True)) * group_size / (group_size - 1)


def grpo(r: Tensor) -> Tensor:
    """(R_i − mean) / (std + 1e-6) within the group, ``(P, G)``."""
    return (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-6)


def drgrpo(r: Tensor) -> Tensor:
    """R_i − mean within the group, ``(P, G)``."""
    return r - r.mean(-1, keepdim=True)


ADVANTAGE_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {"rloo": rloo, "grpo": grpo, "drgrpo": drgrpo}


def get_advantage(name: str) -> Callable[[Tensor], Tensor]:
    """The advantage function called ``name``; unknown names raise ``ValueError`` listing the valid ones."""
    try:
        return ADVANTAGE_FUNCTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown advantage {name!r}; valid advantages are "
                         f"{', '.join(map(repr, ADVANTAGE_FUNCTIONS))}") from None


def compute_advantages(rewards: Tensor, group_size: int, kind: str) -> Tensor:
    """Per-sequence advantages ``(B,)`` from rewards ``(B,)`` laid out as consecutive groups of ``group_size``."""
    return get_advantage(kind)(rewards.view(-1, group_size)).reshape(-1)


def leave_one_out_mean(x: Tensor, group_size: int) -> Tensor:
    """mean_{j≠i} x_j within consecutive groups of ``group_size``: ``(B,)`` → ``(B,)``."""
    if group_size < 2 or x.shape[0] % group_size:
        raise ValueError(f"a leave-one-out mean needs group_size ≥ 2 dividing the batch size {x.shape[0]}, "
                         f"got group_size={group_size}")
    groups = x.view(-1, group_size)
    return ((groups.sum(-1, keepdim=True) - groups) / (group_size - 1)).reshape(-1)


def kl_reward_penalty(config: KLConfig, logp: Tensor, ref_logp: Tensor, mask: Tensor,
                      logprobs: Tensor | None = None, ref_logprobs: Tensor | None = None) -> Tensor:
    """``(B,)`` detached β · Σ_t m_t k_t: each sequence's KL penalty in the reward, 0 when the KL is not in the
    reward. ``logp``, ``ref_logp``, ``mask`` are ``(B, T)``; ``logprobs``/``ref_logprobs`` ``(B, T, V)`` for the
    analytic estimator only. k_t is the configuration's estimate (with a ``KLSetting``'s value clamp)."""
    if not config.in_reward or config.beta == 0:
        return torch.zeros(logp.shape[0], dtype=logp.dtype, device=logp.device)
    with torch.no_grad():
        k, _ = objectives.estimate(config, logp.detach(), ref_logp, mask, logprobs, ref_logprobs)
        return config.beta * k.sum(-1)  # k is exactly 0 at masked positions


def kl_reward_loo_baseline(penalty: Tensor, group_size: int) -> Tensor:
    """``(B,)`` b_i = mean_{j≠i} penalty_j within each prompt's group, from :func:`kl_reward_penalty`'s ``(B,)``:
    the leave-one-out baseline of the reward penalty, to be *added* to the advantage (the penalty enters the
    reward with a minus sign)."""
    return leave_one_out_mean(penalty, group_size)


# ------------------------------------------------------------------------------------------------------------
# Policy-gradient losses: per-token loss (B, T) and, for PPO, which tokens the clip took (B, T)
# ------------------------------------------------------------------------------------------------------------


def reinforce(logp: Tensor, advantages: Tensor, behavior_logp: Tensor | None,
              clip_eps: float) -> tuple[Tensor, Tensor | None]:
    """``(−A_i log π(y_t), None)``: ``logp`` ``(B, T)``, ``advantages`` ``(B,)``; nothing is clipped."""
    return -advantages[:, None] * logp, None


def ppo(logp: Tensor, advantages: Tensor, behavior_logp: Tensor | None,
        clip_eps: float) -> tuple[Tensor, Tensor | None]:
    """``(−min(r A, clip(r, 1 ± ε) A), clipped)``, both ``(B, T)``, with r = exp(logp − behavior_logp)."""
    if behavior_logp is None:
        raise ValueError("PPO needs the behaviour log-probs")
    ratio = torch.exp(logp - behavior_logp)
    unclipped = ratio * advantages[:, None]
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages[:, None]
    return -torch.minimum(unclipped, clipped), clipped < unclipped


POLICY_LOSS_FUNCTIONS = {"reinforce": reinforce, "ppo": ppo}


def get_policy_loss(name: str) -> Callable[..., tuple[Tensor, Tensor | None]]:
    """The per-token policy loss called ``name``; unknown names raise ``ValueError`` listing the valid ones."""
    try:
        return POLICY_LOSS_FUNCTIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown policy loss {name!r}; valid policy losses are "
                         f"{', '.join(map(repr, POLICY_LOSS_FUNCTIONS))}") from None


def policy_loss(kind: str, logp: Tensor, advantages: Tensor, mask: Tensor, behavior_logp: Tensor | None,
                clip_eps: float, aggregation: str, aggregation_constant: float | None = None
                ) -> tuple[Tensor, dict[str, float]]:
    """The policy-gradient term (minimised), aggregated as ``objectives.kl_term`` aggregates (``"sum"``: mean over
    sequences of the token sums; ``"token_mean"``, ``"global_token_mean"``, ``"constant"`` with divisor
    ``aggregation_constant``, default T), and ``ppo/clip_fraction`` (0 for REINFORCE).

    ``logp``, ``mask`` and ``behavior_logp`` are ``(B, T)``, ``advantages`` ``(B,)``; the clip fraction is over
    the valid tokens. An unknown aggregation raises ``ValueError`` listing the valid ones.
    """
    m = mask.to(logp.dtype)
    per_token, clipped = get_policy_loss(kind)(logp, advantages, behavior_logp, clip_eps)
    clip_fraction = 0.0 if clipped is None else float((clipped.to(m.dtype) * m).sum() / m.sum().clamp_min(1))
    per_seq = (per_token * m).sum(-1)
    if aggregation == "token_mean":
        per_seq = per_seq / m.sum(-1).clamp_min(1)
    elif aggregation == "global_token_mean":
        return per_seq.sum() / m.sum().clamp_min(1), {"ppo/clip_fraction": clip_fraction}
    elif aggregation == "constant":
        per_seq = per_seq / (m.shape[-1] if aggregation_constant is None else aggregation_constant)
    elif aggregation != "sum":
        raise ValueError(f"aggregation={aggregation!r} is not valid; choose one of "
                         f"{', '.join(map(repr, objectives.AGGREGATIONS))}")
    return per_seq.mean(), {"ppo/clip_fraction": clip_fraction}


# ------------------------------------------------------------------------------------------------------------
# The KL term's loss
# ------------------------------------------------------------------------------------------------------------


def kl_loss(config: KLConfig, logp: Tensor, ref_logp: Tensor, mask: Tensor, *, behavior_logp: Tensor | None,
            logprobs: Tensor | None, ref_logprobs: Tensor | None, aggregation: str,
            aggregation_constant: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """``(loss, clip fractions)``: ``objectives.kl_term``'s loss with mean sample weights, without the
    per-estimator values (the trainer logs those once per batch).

    ``logp``, ``ref_logp``, ``mask`` (bool) and ``behavior_logp`` are ``(B, T)``; ``logprobs`` and
    ``ref_logprobs`` ``(B, T, V)`` (analytic estimator only, else None). The clip fractions are 0-dim shares of
    valid tokens: ``kl/clip_fraction`` (the log-ratio clamp) and ``kl/value_clip_fraction`` (a ``KLSetting``'s
    value clamp), each present only when its clamp is set. A ``KLSetting``'s ``reward_normalization`` groups
    contiguous rows: pass whole groups of ``group_size`` rows.
    """
    loss, metrics = objectives.kl_term(config, logp, ref_logp, mask, behavior_logp=behavior_logp, logprobs=logprobs,
                                       ref_logprobs=ref_logprobs, aggregation=aggregation,
                                       aggregation_constant=aggregation_constant, estimator_metrics=False)
    return loss, {key: value for key, value in metrics.items() if key.endswith("clip_fraction")}
