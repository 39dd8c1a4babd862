"""Exact analysis of a library's KL terms on reference toy policies (docs/contract.md §4, extended).

A library setting is a sum of *terms* (``Term``): a ``KLSetting`` (estimator, placement, β, clamps, weights, …)
aggregated one way (``kl_lib.objectives.AGGREGATIONS``). On a toy policy of fixed length T every sequence has T
valid tokens, so every length normalisation is a constant factor a: 1 for ``sum``, 1/T for ``token_mean`` and
``global_token_mean``, 1/C for ``constant`` with divisor C (default C = T). (With sequences of varying length the per-sequence
token mean weights sequences by 1/n_b, a further length bias that these fixed-length toys do not show.)

For each term the expected gradient E[g] is computed exactly by ``kl_lib.toy.exact`` (dynamic programming, or
enumeration for the variants the DP refuses) and named in the table's terms by matching E[g]/(β a) against

    0, G*, F, M, G* − F, G* − M, M − F, F + (G* − F)/T   (the last: TRL's sequence-level weight on k3)

on every reference pair and length (relative tolerance 1e-6). Group normalisation of the penalty: with the group
mean only (Dr. GRPO), E[(c_i − c̄) ∇log π(y_i)] = (1 − 1/G) E[c ∇log π], since y_j (j ≠ i) is independent of y_i:
exact. With the group std in the denominator there is no closed form: ``group_mc`` estimates it by Monte
Carlo over groups, with standard errors, and says so; β cancels there (only the direction is meaningful).

Reported per term and length: the relative bias ‖E g − β a G*‖/‖β a G*‖ (against the target of the chosen
aggregation, the length-scaled KL), the cosine between E g and G*, and the one-sample noise-to-signal ratio
√(tr Cov g)/‖β a G*‖.

Departure from the paper: the paper's Table 2 names flags; here every flag's gradient is computed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kl_lib import objectives
from kl_lib.config import KLSetting
from kl_lib.toy import MarkovPolicy, exact

__all__ = ["CLASS_NAMES", "Term", "TermResult", "aggregation_scale", "analyse_term", "classify",
           "expected_grad", "group_mc", "reference_pair"]

CLASS_NAMES: tuple[str, ...] = ("0", "G*", "F", "M", "G* − F", "G* − M", "M − F", "F + (G* − F)/T")
RTOL = 1e-6


@dataclass(frozen=True)
class Term:
    """One KL term of a library setting: the configuration, its aggregation and where it comes from."""

    setting: KLSetting
    aggregation: str = "sum"
    aggregation_constant: float | None = None
    origin: str = ""


def aggregation_scale(term: Term, length: int) -> float:
    """The constant factor a of the term's aggregation at fixed length T (module docstring)."""
    if term.aggregation not in objectives.AGGREGATIONS:
        raise ValueError(f"aggregation={term.aggregation!r} is not valid; choose one of {objectives.AGGREGATIONS}")
    if term.aggregation == "sum":
        return 1.0
    if term.aggregation == "constant":
        return 1.0 / (length if term.aggregation_constant is None else term.aggregation_constant)
    return 1.0 / length


def reference_pair(length: int, scale: float, seed: int = 0, vocab_size: int = 3) -> tuple[MarkovPolicy, MarkovPolicy]:
    """(π_θ, π_ref): random Markov policies with logits N(0, scale²), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return (MarkovPolicy.random(vocab_size, length, scale, generator=g),
            MarkovPolicy.random(vocab_size, length, scale, generator=g))


def _method(setting: KLSetting) -> str:
    dp_refused = setting.sequence_weight != "product" or setting.token_weight == "detached_where_clamped"
    return "enumerate" if dp_refused else "auto"


def expected_grad(term: Term, policy: MarkovPolicy, ref: MarkovPolicy) -> Tensor:
    """E[g] of the term, exactly (group mean: the (1 − 1/G) factor on the reward part); refuses group std."""
    s = term.setting
    a = aggregation_scale(term, policy.length)
    if s.reward_normalization == "group_std":
        raise ValueError("the group std has no exact expected gradient; use group_mc (Monte Carlo)")
    if s.reward_normalization == "none":
        return a * exact.expected_kl_grad(policy, ref, s, method=_method(s))
    base = dataclasses.replace(s, reward_normalization="none", group_size=None)
    reward = exact.expected_kl_grad(policy, ref, dataclasses.replace(base, placement="reward"), method=_method(s))
    out = (1 - 1 / s.group_size) * reward
    if s.in_loss:
        out = out + exact.expected_kl_grad(policy, ref, dataclasses.replace(base, placement="loss"), method=_method(s))
    return a * out


def _candidates(policy: MarkovPolicy, ref: MarkovPolicy) -> dict[str, Tensor]:
    g = exact.reverse_kl_grad(policy, ref)
    f = exact.myopic_forward_kl_grad(policy, ref)
    m = exact.myopic_reverse_kl_grad(policy, ref)
    T = policy.length
    values = (torch.zeros_like(g), g, f, m, g - f, g - m, m - f, f + (g - f) / T)
    return dict(zip(CLASS_NAMES, values))


def _same(x: Tensor, y: Tensor, scale: float) -> bool:
    """‖x − y‖ ≤ RTOL · max(‖x‖, ‖y‖, scale): ``scale`` (‖G*‖) lets a numerically zero x match 0."""
    return bool((x - y).norm() <= RTOL * max(float(y.norm()), float(x.norm()), scale))


def classify(term: Term, pairs: list[tuple[MarkovPolicy, MarkovPolicy]]) -> str:
    """The name of E[g]/(β a (1 − 1/G)) among ``CLASS_NAMES`` on every pair, or ``"biased"`` when none matches.

    (For group normalisation the factor (1 − 1/G) applies to the reward part only, so the name is that of the
    reward part when the term has no loss part.) Raises for the group std, which has no exact gradient.
    """
    s = term.setting
    names = set(CLASS_NAMES)
    for policy, ref in pairs:
        scale = s.beta * aggregation_scale(term, policy.length)
        if s.reward_normalization == "group_mean" and not s.in_loss:
            scale *= 1 - 1 / s.group_size
        if scale == 0:
            return "0 (β = 0: the KL is off)"
        value = expected_grad(term, policy, ref) / scale
        candidates = _candidates(policy, ref)
        names &= {n for n, c in candidates.items() if _same(value, c, float(candidates["G*"].norm()))}
    return next((n for n in CLASS_NAMES if n in names), "biased")


@dataclass(frozen=True)
class TermResult:
    """Bias, direction and noise of one term at one length on one reference pair."""

    length: int
    relative_bias: float
    cosine: float
    noise_to_signal: float
    monte_carlo: bool = False


def analyse_term(term: Term, policy: MarkovPolicy, ref: MarkovPolicy, mc_groups: int = 4000, seed: int = 0
                 ) -> TermResult:
    """Relative bias, cosine with G* and noise-to-signal of the term.

    Group normalisation: the variance by Monte Carlo (``mc_groups`` groups), and the mean too for the group std.
    """
    s, a = term.setting, aggregation_scale(term, policy.length)
    target = s.beta * a * exact.reverse_kl_grad(policy, ref)
    mc = s.reward_normalization != "none"
    if mc:  # variance by Monte Carlo; the mean too for the group std
        mean, _, variance = group_mc(term, policy, ref, mc_groups, torch.Generator().manual_seed(seed))
        if s.reward_normalization == "group_mean":
            mean = expected_grad(term, policy, ref)
    else:
        mean, variance = expected_grad(term, policy, ref), a * a * exact.kl_grad_variance(policy, ref, s,
                                                                                         method=_method(s))
    norm = float(target.norm())
    cosine = float((mean * target).sum() / (mean.norm() * target.norm()).clamp_min(1e-300))
    return TermResult(policy.length, float((mean - target).norm()) / norm if norm else math.nan, cosine,
                      math.sqrt(max(variance, 0.0)) / norm if norm else math.nan, mc)


def group_mc(term: Term, policy: MarkovPolicy, ref: MarkovPolicy, num_groups: int, generator: torch.Generator
                 ) -> tuple[Tensor, Tensor, float]:
    """Monte Carlo E[g] of a group-normalised term (either normalisation) over ``num_groups`` groups of G on-policy samples.

    Returns ``(mean, stderr, variance)``: the mean over groups of the group's gradient (1/G Σ_i ∇L(y_i), as
    ``objectives.kl_term`` computes for the group), its per-coordinate standard error, and tr Cov of the group
    gradient times G (a per-sample variance, comparable with the exact one-sample variances).
    """
    s, G, V = term.setting, term.setting.group_size, policy.vocab_size
    seqs = policy.sample(num_groups * G, generator)
    theta = policy.logits.detach().double()
    gathered = policy.gather_logits(seqs, theta).requires_grad_()
    logprobs = torch.log_softmax(gathered, -1)
    logp = logprobs.gather(-1, seqs.unsqueeze(-1)).squeeze(-1)
    ref_logp, ref_logprobs = ref.token_logprobs(seqs, ref.logits.detach().double())
    per_seq = objectives.per_sequence_loss(s, logp, ref_logp, logprobs=logprobs, ref_logprobs=ref_logprobs)
    (g,) = torch.autograd.grad(per_seq.sum(), gathered)
    cols = (policy.param_rows(seqs).unsqueeze(-1) * V + torch.arange(V)).reshape(seqs.shape[0], -1)
    flat = torch.zeros(seqs.shape[0], theta.numel(), dtype=torch.float64).scatter_(1, cols, g.reshape(seqs.shape[0], -1))
    groups = aggregation_scale(term, policy.length) * flat.view(num_groups, G, -1).mean(1)
    mean, var = groups.mean(0), groups.var(0, unbiased=True)
    return mean.reshape(theta.shape), (var / num_groups).sqrt().reshape(theta.shape), float(var.sum()) * G
