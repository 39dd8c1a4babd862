"""Forward vs reverse KL on pictures a student can draw, and the myopic per-state KLs of a toy policy.

**Fitting a unimodal q to a bimodal p.** On a grid x_1..x_n, p is a mixture of two discretised Gaussians and q
ranges over the discretised Gaussians q_{m,s}(x_i) ∝ exp(−(x_i − m)²/2s²). Minimising

    reverse KL(q‖p) = Σ_i q_i log(q_i/p_i)     (the RL penalty: q = π_θ, p = π_ref)   is mode-seeking,
    forward KL(p‖q) = Σ_i p_i log(p_i/q_i)     (what k3 in the loss descends per state)  is mass-covering.

The family is an exponential family with sufficient statistics (x, x²), so the forward-KL fit matches the
first two moments of p on the grid exactly. The reverse-KL fit sits on one mode; if q is (close to) p restricted
to a set A and renormalised, KL(q‖p) = −log p(A): dropping the other mode costs −log of the kept mass (log 2 for
two equal modes), a finite price, whereas the forward KL of that fit is huge (q ≈ 0 where p has mass).

**Myopic per-state KLs of a TabularPolicy** (docs/contract.md §4), by enumeration:

    myopic_forward_kl(π, π_ref) = E_{y~π} Σ_t KL(π_ref(·|s_t) ‖ π(·|s_t))     (the logged ``kl/forward_myopic``)
    myopic_reverse_kl(π, π_ref) = E_{y~π} Σ_t KL(π(·|s_t) ‖ π_ref(·|s_t))     (= KL(π‖π_ref) by the chain rule)

The first is not the sequence-level forward KL(π_ref‖π): its states come from π, not π_ref; F is its gradient
with the states held fixed.

Departure from the paper: the paper describes the forward/reverse contrast in words (its Fig. 7 discussion);
here both fits are computed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from kl_lib.toy import exact
from kl_lib.toy.policies import TabularPolicy, check_compatible

__all__ = [
    "DIRECTIONS",
    "GaussianFit",
    "bimodal_reference",
    "discrete_kl",
    "fit_gaussian",
    "gaussian_on_grid",
    "myopic_forward_kl",
    "myopic_reverse_kl",
]

DIRECTIONS: tuple[str, ...] = ("forward", "reverse")


def discrete_kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(p‖q) = Σ_i p_i log(p_i/q_i) of probability vectors ``(..., n)``, with 0 log 0 = 0."""
    terms = torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p))
    return terms.sum(-1)


def gaussian_on_grid(grid: Tensor, mean: Tensor | float, log_std: Tensor | float) -> Tensor:
    """q_i ∝ exp(−(x_i − m)²/2s²) on ``grid`` ``(n,)``, normalised; differentiable in m and log s."""
    mean, log_std = torch.as_tensor(mean, dtype=grid.dtype), torch.as_tensor(log_std, dtype=grid.dtype)
    return torch.softmax(-0.5 * ((grid - mean) / log_std.exp()) ** 2, -1)


def bimodal_reference(grid: Tensor, means: Sequence[float] = (-2.0, 2.0), std: float = 0.5,
                      weights: Sequence[float] = (0.5, 0.5)) -> Tensor:
    """p = Σ_j w_j · gaussian_on_grid(grid, m_j, log std), ``(n,)``."""
    if len(means) != len(weights) or abs(sum(weights) - 1) > 1e-12 or min(weights) <= 0:
        raise ValueError(f"need one positive weight per mean, summing to 1; got means {means}, weights {weights}")
    return sum(w * gaussian_on_grid(grid, m, math.log(std)) for m, w in zip(means, weights))


@dataclass(frozen=True)
class GaussianFit:
    """The best discretised Gaussian under one divergence, and both divergences at it."""

    direction: str
    mean: float
    std: float
    probs: Tensor  # (n,)
    forward_kl: float  # KL(p‖q)
    reverse_kl: float  # KL(q‖p)


def _objective(fit: GaussianFit) -> float:
    return fit.forward_kl if fit.direction == "forward" else fit.reverse_kl


def _fit_from(grid: Tensor, ref: Tensor, direction: str, initial_mean: float, steps: int) -> GaussianFit:
    """One L-BFGS run from (m, log s) = (initial_mean, 0)."""
    params = torch.tensor([float(initial_mean), 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def loss() -> Tensor:
        opt.zero_grad()
        q = gaussian_on_grid(grid, params[0], params[1])
        value = discrete_kl(ref, q) if direction == "forward" else discrete_kl(q, ref)
        value.backward()
        return value

    opt.step(loss)
    with torch.no_grad():
        q = gaussian_on_grid(grid, params[0], params[1])
        return GaussianFit(direction, float(params[0]), float(params[1].exp()), q, float(discrete_kl(ref, q)),
                           float(discrete_kl(q, ref)))


def fit_gaussian(grid: Tensor, ref: Tensor, direction: Literal["forward", "reverse"],
                 init_means: Sequence[float] = (-2.0, 0.0, 2.0), steps: int = 200) -> GaussianFit:
    """Minimise KL(ref‖q) (``"forward"``) or KL(q‖ref) (``"reverse"``) over q = gaussian_on_grid(grid, m, s).

    L-BFGS from each initial mean (with s = 1); the best local minimum is returned, so a reverse fit to two
    equal modes returns one of them.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is not valid; choose one of {DIRECTIONS}")
    grid, ref = grid.to(torch.float64), ref.to(torch.float64)
    return min((_fit_from(grid, ref, direction, m0, steps) for m0 in init_means), key=_objective)


def _per_state_kls(policy: TabularPolicy, ref: TabularPolicy) -> tuple[Tensor, Tensor, Tensor]:
    """Sequence probabilities ``(N,)`` and per-state forward and reverse KLs ``(N, T)``, by enumeration."""
    check_compatible(policy, ref)
    seqs = exact.all_sequences(policy.vocab_size, policy.length)
    logp, logprobs = policy.token_logprobs(seqs, policy.logits.detach().double())
    _, ref_logprobs = ref.token_logprobs(seqs, ref.logits.detach().double())
    probs, ref_probs = logprobs.exp(), ref_logprobs.exp()
    forward = (ref_probs * (ref_logprobs - logprobs)).sum(-1)
    reverse = (probs * (logprobs - ref_logprobs)).sum(-1)
    return logp.sum(-1).exp(), forward, reverse


def myopic_forward_kl(policy: TabularPolicy, ref: TabularPolicy) -> float:
    """E_{y~π} Σ_t KL(π_ref(·|s_t) ‖ π(·|s_t)): the per-state forward KL at the policy's own states."""
    seq_probs, forward, _ = _per_state_kls(policy, ref)
    return float((seq_probs * forward.sum(-1)).sum())


def myopic_reverse_kl(policy: TabularPolicy, ref: TabularPolicy) -> float:
    """E_{y~π} Σ_t KL(π(·|s_t) ‖ π_ref(·|s_t)), equal to KL(π‖π_ref) by the chain rule."""
    seq_probs, _, reverse = _per_state_kls(policy, ref)
    return float((seq_probs * reverse.sum(-1)).sum())
