"""The literature in one map: each published KL variant reduced to a row of docs/contract.md §4, by enumeration.

Each identity is checked on a TabularPolicy by enumerating all V^T sequences (float64):

1. **Liu et al. 2025** ("Rethinking KL regularization in RLHF"): the sequence-level loss ½(Σ_t δ_t)² has, per
   sample, the gradient (Σ_t δ_t) Σ_t ∇log π(y_t|s_t) = (Σ_t δ_t) ∇log π(y): exactly the per-sample gradient of
   k1 in the reward. Equal sample by sample, not only in expectation.
2. **Tang & Munos 2025** ("partial gradient"): per-token k2 in the loss has expected gradient M, the myopic
   per-state reverse-KL gradient, which misses G* − M = E[(Σ_t KL_t) ∇log π(y)].
3. **DeepSeek-V3.2** ("unbiased KL"): k3 multiplied by the token ratio ω_t = π_θ/π_old, differentiated. On-policy
   ω_t = 1 in value but ∇ω_t = ∇log π_t, so ∇(ω_t k3_t) = (k3_t + 1 − ρ_t)∇log π_t = δ_t ∇log π_t: expected
   gradient M, even on-policy (unbiased for the per-token KL, not for the sequence-level G*).
4. **Off-policy k1 in the loss**: E_{y~μ}[Σ_t ∇log π(y_t|s_t)] = ∇_θ E_μ[log π_θ(y)] = −∇_θ CE(μ, π_θ), a push
   *away from the sampler's* distribution (it raises log π on the samples, i.e. lowers the cross-entropy to μ,
   which on-policy is the zero vector).

Departure from the paper: the paper cites these works; here each reduction is computed.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import Tensor

from kl_lib.config import KLConfig
from kl_lib.toy import exact
from kl_lib.toy.policies import TabularPolicy, check_compatible
from kl_lib.toy.variance import per_sequence_terms

__all__ = ["cross_entropy_grad", "literature_map", "sequence_k2_grads"]


def sequence_k2_grads(policy: TabularPolicy, ref: TabularPolicy) -> Tensor:
    """Per-sequence gradients of ½(Σ_t δ_t)², ``(N, P·V)`` in ``exact.all_sequences`` order."""
    check_compatible(policy, ref)
    seqs = exact.all_sequences(policy.vocab_size, policy.length)
    theta = policy.logits.detach().double()
    gathered = policy.gather_logits(seqs, theta).requires_grad_()  # (N, T, V): one row per (sequence, step)
    logp = torch.log_softmax(gathered, -1).gather(-1, seqs.unsqueeze(-1)).squeeze(-1)
    ref_logp = ref.token_logprobs(seqs, ref.logits.detach().double())[0]
    loss = 0.5 * (logp - ref_logp).sum(-1).square()  # (N,)
    (g,) = torch.autograd.grad(loss.sum(), gathered)
    n, V = seqs.shape[0], policy.vocab_size
    cols = (policy.param_rows(seqs).unsqueeze(-1) * V + torch.arange(V)).reshape(n, -1)
    return torch.zeros(n, theta.numel(), dtype=torch.float64).scatter_(1, cols, g.reshape(n, -1))


def cross_entropy_grad(policy: TabularPolicy, behavior: TabularPolicy) -> Tensor:
    """∇_θ CE(μ, π_θ) = −∇_θ Σ_y μ(y) log π_θ(y), shaped like ``policy.logits``."""
    check_compatible(policy, behavior)
    theta = policy.logits.detach().double().requires_grad_()
    seqs = exact.all_sequences(policy.vocab_size, policy.length)
    log_pi = policy.token_logprobs(seqs, theta)[0].sum(-1)
    mu = exact.sequence_logprobs(behavior).exp()
    (g,) = torch.autograd.grad(-(mu * log_pi).sum(), theta)
    return g


def literature_map(policy: TabularPolicy, ref: TabularPolicy, behavior: TabularPolicy) -> pd.DataFrame:
    """One row per identity: max |difference| of its two sides, the size of the right side (so that a zero
    difference is not trivial) and the relative bias of the variant's expected gradient against G*."""
    G = exact.reverse_kl_grad(policy, ref)
    M = exact.myopic_reverse_kl_grad(policy, ref)
    k1_reward = per_sequence_terms(policy, ref, KLConfig("k1", "reward"))
    liu = sequence_k2_grads(policy, ref)
    liu_mean = (k1_reward.probs.unsqueeze(1) * liu).sum(0).reshape(G.shape)
    off_k1_loss = exact.expected_kl_grad(policy, ref, KLConfig("k1", "loss"), behavior=behavior)
    rows = [  # (variant, what it equals, left side, right side, its expected gradient)
        ("Liu et al.: ½(Σ_t δ_t)² in loss, per sample", "k1 in reward, per sample", liu, k1_reward.grads, liu_mean),
        ("Tang & Munos: per-token k2 in loss", "M (myopic reverse KL)",
         exact.expected_kl_grad(policy, ref, KLConfig("k2", "loss")), M, M),
        ("DeepSeek-V3.2: token-weighted k3 in loss, on-policy", "M (myopic reverse KL)",
         exact.expected_kl_grad(policy, ref, KLConfig("k3", "loss", importance_weighting="token")), M, M),
        ("k1 in loss, off-policy (y ~ μ)", "−∇CE(μ, π)", off_k1_loss, -cross_entropy_grad(policy, behavior),
         off_k1_loss),
    ]
    return pd.DataFrame([{"variant": name, "equals": target, "max |difference|": float((a - b).abs().max()),
                          "max |right side|": float(b.abs().max()),
                          "‖E[g] − G*‖ / ‖G*‖": float((mean - G).norm() / G.norm())}
                         for name, target, a, b, mean in rows])
