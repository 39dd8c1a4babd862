"""Monte Carlo gradient estimates of a KL configuration on a toy policy, as an RL trainer would compute them.

Draw y_1..y_N ~ μ (π_θ on-policy), compute each sequence's loss term L(y_n) with
``kl_lib.objectives.per_sequence_loss`` (whose 1/N-weighted sum is ``objectives.kl_term``, what the LLM trainer
computes for a batch) and differentiate. The per-sample
gradients g(y_n) (cheap for toy policies, see ``kl_lib.toy.exact``) give the standard error of every coordinate of
the mean, so a Monte Carlo estimate can be held against the exact expected gradient with a tolerance that
comes from its own noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kl_lib import objectives
from kl_lib.config import KLConfig
from kl_lib.toy.policies import MarkovPolicy, TabularPolicy, check_compatible

__all__ = ["MCGradient", "mc_kl_grad"]


@dataclass(frozen=True)
class MCGradient:
    """Mean of N per-sample gradients, its per-coordinate standard error, and the per-sample trace variance."""

    mean: Tensor  # shaped like policy.logits
    stderr: Tensor  # shaped like policy.logits
    variance: float  # tr Cov[g(y)] estimated from the N samples (unbiased)
    variance_stderr: float  # standard error of ``variance`` (from the spread of ‖g(y_n) − ḡ‖²)
    num_samples: int


def mc_kl_grad(policy: TabularPolicy | MarkovPolicy, ref: TabularPolicy | MarkovPolicy, config: KLConfig,
               num_samples: int, generator: torch.Generator, behavior: TabularPolicy | MarkovPolicy | None = None
               ) -> MCGradient:
    """Monte Carlo estimate of E_{y~μ}[∇L(y)] from ``num_samples`` sampled sequences (float64)."""
    if num_samples < 2:
        raise ValueError(f"num_samples must be ≥ 2 to estimate a standard error, got {num_samples}")
    check_compatible(policy, ref, behavior)
    sampler = policy if behavior is None else behavior
    seqs = sampler.sample(num_samples, generator)  # (N, T)
    V = policy.vocab_size
    theta = policy.logits.detach().double()
    gathered = policy.gather_logits(seqs, theta).requires_grad_()  # (N, T, V): per-sample gradients, see exact
    logprobs = torch.log_softmax(gathered, -1)
    logp = logprobs.gather(-1, seqs.unsqueeze(-1)).squeeze(-1)
    ref_logp, ref_logprobs = ref.token_logprobs(seqs, ref.logits.detach().double())
    behavior_logp = None if behavior is None else behavior.token_logprobs(seqs, behavior.logits.detach().double())[0]
    per_seq = objectives.per_sequence_loss(config, logp, ref_logp, behavior_logp=behavior_logp,
                                           logprobs=logprobs, ref_logprobs=ref_logprobs)
    (g,) = torch.autograd.grad(per_seq.sum(), gathered)  # (N, T, V)

    rows = policy.param_rows(seqs)  # (N, T)
    num_rows = theta.numel() // V
    # Scatter each sample's gradient into parameter space: (N, num_rows * V), dense (toy sizes only).
    flat = torch.zeros(num_samples, num_rows * V, dtype=torch.float64)
    cols = (rows.unsqueeze(-1) * V + torch.arange(V)).reshape(num_samples, -1)
    flat.scatter_(1, cols, g.reshape(num_samples, -1))
    mean = flat.mean(0)
    var = flat.var(0, unbiased=True)
    sq_dev = (flat - mean).square().sum(1)  # ‖g(y_n) − ḡ‖², (N,)
    return MCGradient(mean.reshape(theta.shape), (var / num_samples).sqrt().reshape(theta.shape),
                      float(var.sum()), float(sq_dev.std() / num_samples**0.5), num_samples)
