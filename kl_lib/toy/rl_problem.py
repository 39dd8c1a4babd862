"""A toy KL-regularised RL problem on a TabularPolicy, solved with exact expected gradients.

Problem. Sequences y ∈ {0..V−1}^T, a fixed reward R(y) (a vector over all V**T sequences, in
``exact.all_sequences`` order), a reference π_ref and a coefficient β > 0:

    J(π) = E_{y~π}[R(y)] − β · KL(π ‖ π_ref)                    (sequence-level reverse KL, docs/contract.md §1)

Optimum. Over all distributions on sequences (Gibbs variational principle, docs/contract.md §4):

    π*(y) = π_ref(y) · exp(R(y)/β) / Z,     Z = Σ_y π_ref(y) exp(R(y)/β),     J(π*) = β log Z,

and for every π the gap to the optimum is a KL:  J(π) = β log Z − β · KL(π ‖ π*).  So KL(π‖π*) is the
suboptimality in units of β, and it is what the notebook plots. A TabularPolicy represents π* exactly
(``tabular_from_sequence_probs``: π*(v | prefix) = π*(prefix, v) / π*(prefix), from prefix marginals).

Optimisation. Gradient ascent on the logits θ with the *expected* update of each configuration:

    d(θ) = ∇_θ E_π[R]  −  E_{y~π}[∇_θ L_KL(y)]                                   (P, V), like the logits
    θ[s] ← θ[s] + lr · d(θ)[s] / π_θ(s)      for every prefix row s              (``preconditioner="prefix"``)
    θ    ← θ    + lr · d(θ)                                                       (``preconditioner="none"``)

* ∇_θ E_π[R] = Σ_y R(y) ∇_θ π_θ(y) = E_π[R ∇log π_θ(y)]: the exact REINFORCE expectation, by autograd through the
  enumerated sequence probabilities;
* E_{y~π}[∇ L_KL(y)] = ``exact.expected_kl_grad(π, π_ref, config)`` with the configuration's own β (the same
  ``kl_lib.objectives`` code the LLM trainer uses);
* π_θ(s) is the probability of reaching prefix s. Every row of every configuration's expected gradient carries
  this factor, so rarely visited rows barely move and plain ascent converges sublinearly. Dividing it out
  (a positive diagonal preconditioner, the tabular cousin of natural policy gradient) leaves the zeros of d,
  i.e. the points each configuration converges to, unchanged and makes convergence linear.

There is no sampling noise, so each configuration converges to a zero of its *expected* update field: where it
ends up shows what the configuration optimises, not how noisy it is. With ``k1 in reward`` the update is
exactly ∇J, J is strictly concave in π, and the ascent converges to π*. ``config=None`` ascends E[R] alone
(β = 0), which ``k1 in loss`` reproduces exactly because its expected KL gradient is 0. Configurations that
push some π(v|s) to 0 (E[R] alone, k1 in loss, analytic in reward) converge in π while those logits drift to
−∞ (``max_abs_logit`` records the drift); k3 in reward drives them down until k3 ≈ π_ref/π overflows, and a run
stops (``diverged=True``) as soon as an update is non-finite.

Departure from the paper: the paper has no toy RL problem (its RL runs are LLMs on MATH); this is a noise-free
model of where each configuration's expected update leads. Fixed learning rate, no Adam, no clipping.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple, Sequence

import pandas as pd
import torch
from torch import Tensor

from kl_lib.toy import exact
from kl_lib.config import KLConfig
from kl_lib.toy.policies import TabularPolicy, check_compatible

__all__ = [
    "pattern_reward",
    "ToyRLProblem",
    "tabular_from_sequence_probs",
    "optimal_sequence_probs",
    "optimal_policy",
    "optimal_objective",
    "objective",
    "expected_reward_grad",
    "ascent_direction",
    "prefix_probs",
    "Ascent",
    "optimise",
    "frontier",
]


def pattern_reward(vocab_size: int, length: int, pattern: Sequence[int]) -> Tensor:
    """R(y) = 1 if ``pattern`` occurs as a contiguous block in y, else 0; ``(V**T,)`` float64."""
    pattern = tuple(int(p) for p in pattern)
    if not pattern or len(pattern) > length or any(not 0 <= p < vocab_size for p in pattern):
        raise ValueError(f"pattern {pattern} must be non-empty, at most {length} long, tokens in [0, {vocab_size})")
    seqs = exact.all_sequences(vocab_size, length)  # (N, T)
    windows = seqs.unfold(1, len(pattern), 1)  # (N, T − |p| + 1, |p|)
    return (windows == torch.tensor(pattern)).all(-1).any(-1).to(torch.float64)


@dataclass(frozen=True)
class ToyRLProblem:
    """max_π E_π[R] − β KL(π‖π_ref) over sequences of a TabularPolicy."""

    ref: TabularPolicy
    """π_ref; also the starting point of the ascent unless ``optimise(init=...)`` says otherwise."""
    rewards: Tensor
    """R(y) for every sequence, ``(V**T,)``, in ``exact.all_sequences`` order."""
    beta: float
    """KL coefficient β > 0 of the objective (configurations carry their own β for the update)."""

    def __post_init__(self) -> None:
        if not isinstance(self.ref, TabularPolicy):
            raise ValueError(f"ToyRLProblem.ref must be a TabularPolicy, got {type(self.ref).__name__}")
        n = self.ref.vocab_size**self.ref.length
        if self.rewards.shape != (n,) or not torch.isfinite(self.rewards).all():
            raise ValueError(f"ToyRLProblem.rewards must be finite with shape ({n},), got {tuple(self.rewards.shape)}")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"ToyRLProblem.beta={self.beta!r} must be finite and > 0 (π* needs exp(R/β))")


def tabular_from_sequence_probs(probs: Tensor, vocab_size: int, length: int) -> TabularPolicy:
    """The TabularPolicy with π(y) = ``probs[y]`` (all entries > 0), logits = log π(v | prefix)."""
    V, T = vocab_size, length
    if probs.shape != (V**T,) or not (probs > 0).all():
        raise ValueError(f"probs must be positive with shape ({V**T},), got {tuple(probs.shape)}")
    joint = (probs / probs.sum()).reshape((V,) * T)  # row-major = itertools.product order
    rows = []
    for t in range(T):
        # P(prefix of length t+1), (V^t, V): rows are the length-t prefixes in lexicographic order.
        marg = joint.sum(dim=tuple(range(t + 1, T))) if t + 1 < T else joint
        marg = marg.reshape(V**t, V)
        rows.append(marg.log() - marg.sum(-1, keepdim=True).log())
    return TabularPolicy(torch.cat(rows, 0))


def _log_unnormalised_opt(ref: TabularPolicy, rewards: Tensor, beta: float) -> Tensor:
    return exact.sequence_logprobs(ref) + rewards.to(torch.float64) / beta  # (N,)


def optimal_sequence_probs(ref: TabularPolicy, rewards: Tensor, beta: float) -> Tensor:
    """π*(y) ∝ π_ref(y) exp(R(y)/β), ``(V**T,)`` float64."""
    return torch.softmax(_log_unnormalised_opt(ref, rewards, beta), 0)


def optimal_policy(problem: ToyRLProblem) -> TabularPolicy:
    """π* as a TabularPolicy (exact)."""
    probs = optimal_sequence_probs(problem.ref, problem.rewards, problem.beta)
    return tabular_from_sequence_probs(probs, problem.ref.vocab_size, problem.ref.length)


def optimal_objective(problem: ToyRLProblem) -> float:
    """J(π*) = β log Z."""
    return problem.beta * float(torch.logsumexp(_log_unnormalised_opt(problem.ref, problem.rewards, problem.beta), 0))


def objective(policy: TabularPolicy, problem: ToyRLProblem) -> float:
    """J(π) = E_π[R] − β KL(π‖π_ref)."""
    probs = exact.sequence_logprobs(policy).exp()
    return float((probs * problem.rewards).sum()) - problem.beta * exact.reverse_kl(policy, problem.ref)


def expected_reward_grad(policy: TabularPolicy, rewards: Tensor) -> Tensor:
    """∇_θ E_{y~π_θ}[R(y)] = E[R ∇log π_θ(y)], exactly; shaped like ``policy.logits``, float64."""
    theta = policy.logits.detach().to(torch.float64).requires_grad_()
    seqs = exact.all_sequences(policy.vocab_size, policy.length)
    seq_logp = policy.token_logprobs(seqs, theta)[0].sum(-1)  # (N,)
    (g,) = torch.autograd.grad((seq_logp.exp() * rewards.to(torch.float64)).sum(), theta)
    return g


def ascent_direction(policy: TabularPolicy, problem: ToyRLProblem, config: KLConfig | None) -> Tensor:
    """∇E_π[R] − E_{y~π}[∇L_KL(y)]: the expected update of the configuration (``None``: reward only)."""
    direction = expected_reward_grad(policy, problem.rewards)
    if config is not None:
        direction = direction - exact.expected_kl_grad(policy, problem.ref, config)
    return direction


def prefix_probs(policy: TabularPolicy) -> Tensor:
    """π(s) for every prefix row s of ``policy.logits`` (same row order), ``(P,)`` float64."""
    V, T = policy.vocab_size, policy.length
    joint = exact.sequence_logprobs(policy).exp().reshape((V,) * T)
    out = [torch.ones(1, dtype=torch.float64)]
    for t in range(1, T):
        out.append(joint.sum(dim=tuple(range(t, T))).reshape(-1))  # length-t prefixes, lexicographic
    return torch.cat(out)


PRECONDITIONERS: tuple[str, ...] = ("prefix", "none")


class Ascent(NamedTuple):
    """Result of :func:`optimise`: per-step metrics and the final policy."""

    metrics: pd.DataFrame
    policy: TabularPolicy


def _metrics(step: int, policy: TabularPolicy, problem: ToyRLProblem, opt_probs: Tensor, j_star: float,
             direction: Tensor) -> dict[str, float]:
    logq = exact.sequence_logprobs(policy)
    q = logq.exp()
    expected_reward = float((q * problem.rewards).sum())
    kl_ref = exact.reverse_kl(policy, problem.ref)
    j = expected_reward - problem.beta * kl_ref
    return {
        "step": step,
        "objective": j,
        "objective_gap": j_star - j,
        "expected_reward": expected_reward,
        "kl_ref": kl_ref,
        "kl_to_opt": float((q * (logq - opt_probs.log())).sum()),
        "tv_to_opt": 0.5 * float((q - opt_probs).abs().sum()),
        "update_norm": float(direction.norm()),
        "max_abs_logit": float(policy.logits.abs().max()),
    }


def optimise(problem: ToyRLProblem, config: KLConfig | None, *, steps: int, lr: float, log_every: int = 1,
             init: TabularPolicy | None = None, preconditioner: Literal["prefix", "none"] = "prefix") -> Ascent:
    """Deterministic ascent θ ← θ + lr · d(θ) / π_θ(s) (module docstring), from ``init`` (default π_ref).

    Args:
        problem: reward, reference and the objective's β (used for the metrics and π*).
        config: the KL configuration whose exact expected gradient is subtracted, with its own β (pass
            ``beta=problem.beta`` to study the problem's objective); None ascends E[R] only.
        steps: number of updates.
        lr: fixed step size.
        log_every: record metrics every this many steps (step 0 and the last step are always recorded).
        init: starting policy (default: the reference, as RL fine-tuning starts from π_ref).
        preconditioner: ``"prefix"`` divides each row's update by π_θ(prefix) (same fixed points, linear
            convergence); ``"none"`` is plain gradient ascent.

    Returns:
        ``Ascent(metrics, policy)``: a DataFrame with one row per recorded step (``config``, ``step``,
        ``objective``, ``objective_gap`` = J(π*) − J(π) = β·KL(π‖π*), ``expected_reward``, ``kl_ref`` =
        KL(π‖π_ref), ``kl_to_opt`` = KL(π‖π*), ``tv_to_opt``, ``update_norm`` = ‖d(θ)‖, ``max_abs_logit``,
        ``diverged``) and the final policy. If an update is ever non-finite the run stops there, its last row
        is the last finite policy and ``diverged`` is True on that row.
    """
    if steps < 0 or log_every < 1 or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"need steps ≥ 0, log_every ≥ 1 and a finite lr > 0; got {steps}, {log_every}, {lr}")
    if preconditioner not in PRECONDITIONERS:
        raise ValueError(f"preconditioner={preconditioner!r} is not valid; choose one of {PRECONDITIONERS}")
    start = problem.ref if init is None else init
    check_compatible(start, problem.ref)
    opt_probs = optimal_sequence_probs(problem.ref, problem.rewards, problem.beta)
    j_star = optimal_objective(problem)
    policy = TabularPolicy(start.logits.detach().to(torch.float64).clone())
    rows = []
    for step in range(steps + 1):
        direction = ascent_direction(policy, problem, config)
        update = direction
        if preconditioner == "prefix":
            # 1e-300: rows nobody reaches have d = 0 exactly; keep 0/0 out of the update.
            update = direction / prefix_probs(policy).clamp_min(1e-300).unsqueeze(-1)
        diverged = not bool(torch.isfinite(update).all())
        if step % log_every == 0 or step == steps or diverged:
            rows.append(_metrics(step, policy, problem, opt_probs, j_star, direction) | {"diverged": diverged})
        if step == steps or diverged:
            break
        policy = TabularPolicy(policy.logits + lr * update)
    metrics = pd.DataFrame(rows)
    metrics.insert(0, "config", "no KL" if config is None else config.label)
    return Ascent(metrics, policy)


def frontier(problem: ToyRLProblem, betas: Sequence[float]) -> pd.DataFrame:
    """The reverse-KL frontier: E_{π*_b}[R] and KL(π*_b‖π_ref) of the optimum π*_b for each b in ``betas``.

    Every point maximises E[R] at its own KL(π‖π_ref); a policy below the curve could gain reward at the
    same KL, so a configuration that converges off the curve optimises something other than a reverse KL.
    """
    rows = []
    logref = exact.sequence_logprobs(problem.ref)
    for b in betas:
        q = optimal_sequence_probs(problem.ref, problem.rewards, float(b))
        rows.append({"beta": float(b), "expected_reward": float((q * problem.rewards).sum()),
                     "kl_ref": float((q * (q.log() - logref)).sum())})
    return pd.DataFrame(rows)

