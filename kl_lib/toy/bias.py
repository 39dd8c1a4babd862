"""Exact bias, variance and direction of KL-configuration gradients, swept over length and staleness.

For a policy π, a reference π_ref, a behaviour policy μ (π on-policy) and a configuration c with β = 1:

    E[g_c]    = exact.expected_kl_grad(π, π_ref, c, μ)           expected gradient (exact)
    G*        = ∇_θ KL(π‖π_ref)                                   the target (sequence-level reverse KL)
    bias      = ‖E[g_c] − G*‖,   rel_bias = bias / ‖G*‖         (Frobenius norm over all logits)
    variance  = tr Cov_{y~μ}[g_c(y)]                              one-sample variance, see ``grad_variance``
    cos_X     = ⟨E[g_c], X⟩ / (‖E[g_c]‖ ‖X‖) for X ∈
                  reverse          G*
                  forward          ∇_θ KL(π_ref‖π)               (sequence level)
                  myopic_forward   F = E_{s~π} Σ_t ∇ KL(π_ref(·|s_t)‖π(·|s_t))
                  myopic_reverse   M = E_{s~μ} Σ_t ∇ KL(π(·|s_t)‖π_ref(·|s_t))   (states from μ)
    rel_dist_X = ‖E[g_c] − X‖ / ‖X‖ for X ∈ {myopic_forward, myopic_reverse}   (identity checks)

A cosine is NaN when either vector is (numerically) zero, e.g. for ``k1 in loss`` whose expected gradient is 0.

Pairs (``perturbed_pair``): policy logits i.i.d. N(0, scale²), reference logits = policy logits + ref_noise·ε with
ε ~ N(0, 1) of the same shape, so KL(π‖π_ref) grows linearly in T at a moderate rate per token. Staleness
(``sweep_staleness``): μ's logits = π's logits + σ·ε' with one fixed direction ε' per seed, so σ = 0 is
on-policy and the curves in σ are smooth. Every pair is drawn from ``torch.Generator().manual_seed(k)`` with
k = ``pair_seed(seed, length)``: deterministic, and independent across lengths.

Departure from the paper (its Figure 2): exact expectations instead of Monte Carlo repeats, a MarkovPolicy
(dynamic programming) for T in the hundreds, and k2 / analytic / reward-to-go / "both" alongside k1 and k3.
"""

from __future__ import annotations

import math
from typing import Iterable, Literal, Sequence

import pandas as pd
import torch
from torch import Tensor

from kl_lib.toy import exact
from kl_lib.config import KLConfig
from kl_lib.toy.policies import MarkovPolicy, TabularPolicy

__all__ = [
    "figure2_configs",
    "offpolicy_configs",
    "pair_seed",
    "perturbed_pair",
    "perturb",
    "cosine",
    "grad_variance",
    "gradient_table",
    "sweep_lengths",
    "sweep_staleness",
]

Policy = TabularPolicy | MarkovPolicy
PolicyKind = Literal["tabular", "markov"]

_ZERO_NORM = 1e-12  # below this an expected gradient counts as the zero vector (k1 in loss is ~1e-17)


def figure2_configs(beta: float = 1.0) -> list[KLConfig]:
    """The on-policy configurations of notebook 02 (docs/contract.md §4's table plus reward-to-go variants)."""
    specs = [("k1", "reward", False), ("k1", "reward", True), ("k1", "loss", False), ("k2", "loss", False),
             ("k3", "reward", False), ("k3", "loss", False), ("k3", "both", False), ("k3", "both", True),
             ("analytic", "reward", False), ("analytic", "loss", False), ("analytic", "both", False),
             ("analytic", "both", True)]
    return [KLConfig(e, p, beta=beta, reward_to_go=rtg) for e, p, rtg in specs]


def offpolicy_configs(beta: float = 1.0) -> list[KLConfig]:
    """k1 in reward and k3 in loss with each importance weighting, plus k1 in loss (token IS)."""
    out = [KLConfig(e, p, beta=beta, importance_weighting=w)
           for e, p in [("k1", "reward"), ("k3", "loss")] for w in ("none", "token", "sequence")]
    return out + [KLConfig("k1", "loss", beta=beta, importance_weighting="token")]


def pair_seed(seed: int, length: int) -> int:
    """The generator seed of the (π, π_ref) pair for ``seed`` at length T (independent across T)."""
    return 1_000_003 * seed + length


def _policy_class(kind: PolicyKind) -> type[TabularPolicy] | type[MarkovPolicy]:
    if kind not in ("tabular", "markov"):
        raise ValueError(f"kind={kind!r} is not valid; choose 'tabular' or 'markov'")
    return TabularPolicy if kind == "tabular" else MarkovPolicy


def perturb(policy: Policy, noise: float, generator: torch.Generator) -> Policy:
    """The same kind of policy with logits + noise·ε, ε ~ N(0, 1) i.i.d. (float64)."""
    logits = policy.logits.detach().to(torch.float64)
    return policy.with_logits(logits + noise * torch.randn(logits.shape, generator=generator, dtype=torch.float64))


def perturbed_pair(kind: PolicyKind, vocab_size: int, length: int, *, scale: float, ref_noise: float,
                   generator: torch.Generator) -> tuple[Policy, Policy]:
    """``(π, π_ref)``: π's logits i.i.d. N(0, scale²) and π_ref's = π's + ref_noise·N(0, 1)."""
    policy = _policy_class(kind).random(vocab_size, length, scale=scale, generator=generator)
    return policy, perturb(policy, ref_noise, generator)


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two same-shaped tensors; NaN if either has norm below 1e-12."""
    na, nb = float(a.norm()), float(b.norm())
    if na < _ZERO_NORM or nb < _ZERO_NORM:
        return math.nan
    return float((a * b).sum()) / (na * nb)


def grad_variance(policy: Policy, ref: Policy, config: KLConfig, behavior: Policy | None = None, *,
                  max_sequences: int = 2**16) -> float:
    """tr Cov[g(y)] of one sample, or NaN when it is not computed.

    The single source of variances for the sweeps: ``exact.kl_grad_variance``, by dynamic programming for a
    MarkovPolicy (any T), by enumeration otherwise (NaN when V**T > ``max_sequences``). Sequence importance
    weights off-policy need enumeration even for a MarkovPolicy.
    """
    needs_enumeration = not isinstance(policy, MarkovPolicy) or (
        config.importance_weighting == "sequence" and behavior is not None)
    if needs_enumeration and policy.vocab_size**policy.length > min(max_sequences, exact.MAX_ENUMERATED_SEQUENCES):
        return math.nan
    return exact.kl_grad_variance(policy, ref, config, behavior)


def gradient_table(policy: Policy, ref: Policy, configs: Iterable[KLConfig], behavior: Policy | None = None, *,
                   variance: bool = True, max_sequences: int = 2**16) -> pd.DataFrame:
    """One row per configuration: bias, relative bias, variance, cosines and identity distances (module doc).

    Columns: ``config`` (label), ``name``, ``estimator``, ``placement``, ``importance_weighting``, ``bias``,
    ``rel_bias``, ``variance``, ``grad_norm`` (‖E g‖), ``true_grad_norm`` (‖G*‖), ``cos_reverse``,
    ``cos_forward``, ``cos_myopic_forward``, ``cos_myopic_reverse``, ``rel_dist_myopic_forward``,
    ``rel_dist_myopic_reverse``, ``kl`` (KL(π‖π_ref)).
    """
    true_grad = exact.reverse_kl_grad(policy, ref)
    targets = {
        "forward": exact.forward_kl_grad(policy, ref),
        "myopic_forward": exact.myopic_forward_kl_grad(policy, ref),
        "myopic_reverse": exact.myopic_reverse_kl_grad(policy, ref, states_from=behavior),
    }
    kl = exact.reverse_kl(policy, ref)
    rows = []
    for config in configs:
        g = exact.expected_kl_grad(policy, ref, config, behavior)
        bias = float((g - true_grad).norm())
        row = {
            "config": config.label, "name": config.name, "estimator": config.estimator,
            "placement": config.placement, "importance_weighting": config.importance_weighting,
            "bias": bias, "rel_bias": bias / float(true_grad.norm()),
            "variance": grad_variance(policy, ref, config, behavior, max_sequences=max_sequences) if variance
            else math.nan,
            "grad_norm": float(g.norm()), "true_grad_norm": float(true_grad.norm()),
            "cos_reverse": cosine(g, true_grad),
        }
        row |= {f"cos_{k}": cosine(g, v) for k, v in targets.items()}
        row |= {f"rel_dist_{k}": float((g - targets[k]).norm() / targets[k].norm())
                for k in ("myopic_forward", "myopic_reverse")}
        row["kl"] = kl
        rows.append(row)
    return pd.DataFrame(rows)


def sweep_lengths(kind: PolicyKind, vocab_size: int, lengths: Sequence[int], seeds: Sequence[int],
                  configs: Sequence[KLConfig], *, scale: float = 1.0, ref_noise: float = 0.5,
                  max_variance_sequences: int = 2**16) -> pd.DataFrame:
    """``gradient_table`` on-policy for every (T, seed); adds columns ``kind``, ``V``, ``T``, ``seed``.

    The variance is computed where V**T ≤ ``max_variance_sequences`` (NaN elsewhere).
    """
    frames = []
    for length in lengths:
        for seed in seeds:
            gen = torch.Generator().manual_seed(pair_seed(seed, length))
            policy, ref = perturbed_pair(kind, vocab_size, length, scale=scale, ref_noise=ref_noise, generator=gen)
            table = gradient_table(policy, ref, configs, max_sequences=max_variance_sequences)
            frames.append(table.assign(kind=kind, V=vocab_size, T=length, seed=seed))
    return pd.concat(frames, ignore_index=True)


def sweep_staleness(kind: PolicyKind, vocab_size: int, length: int, staleness: Sequence[float],
                    seeds: Sequence[int], configs: Sequence[KLConfig], *, scale: float = 1.0,
                    ref_noise: float = 0.5, max_variance_sequences: int = 2**16) -> pd.DataFrame:
    """``gradient_table`` with μ = π's logits + σ·ε' for every (σ, seed); adds ``staleness``, ``seed``, ``T``.

    ``staleness`` σ = 0 gives μ = π exactly (on-policy values of every configuration). Also adds
    ``kl_behavior`` = KL(μ‖π) over whole sequences, a scale-free measure of how stale μ is.
    """
    frames = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(pair_seed(seed, length))
        policy, ref = perturbed_pair(kind, vocab_size, length, scale=scale, ref_noise=ref_noise, generator=gen)
        direction = perturb(policy, 1.0, gen).logits - policy.logits  # ε', fixed per seed
        for sigma in staleness:
            behavior = policy.with_logits(policy.logits + sigma * direction)
            table = gradient_table(policy, ref, configs, behavior, max_sequences=max_variance_sequences)
            frames.append(table.assign(kind=kind, V=vocab_size, T=length, seed=seed, staleness=float(sigma),
                                       kl_behavior=exact.reverse_kl(behavior, policy)))
    return pd.concat(frames, ignore_index=True)
