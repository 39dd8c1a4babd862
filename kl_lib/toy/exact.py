"""Exact KL quantities and exact expected gradients of every KL configuration, for toy policies.

Everything is computed in float64, by exhaustive enumeration of all V^T sequences (``TabularPolicy``, or any
policy when ``method="enumerate"``) or by dynamic programming over (position, previous token)
(``MarkovPolicy``, the default for it), and nothing here re-derives a configuration's gradient by hand:

* **Expected gradient of a configuration** (docs/contract.md §3): E_{y~μ}[g(y)] with g(y) = ∇_θ L(y), L the
  per-sequence loss term of ``kl_lib.objectives``. By enumeration it is ∇_θ Σ_y sg(μ(y)) L(y; θ): the very
  same ``objectives.kl_term`` the RL trainer calls, with the exact sequence probabilities as sample weights.
  By DP it uses the same split ``objectives`` exposes: L(y) = β Σ_t [sg(c_t(y)) u_t + v_t k_t] where only the
  detached coefficient c_t depends on the whole sequence, and u_t, v_t k_t depend on (t, y_{t−1}, y_t) only.
  So E_μ[L] = β Σ_{t,a,v} μ(y_{t−1}=a, y_t=v) (E_μ[c_t | a, v] u(t,a,v) + vk(t,a,v)), where the conditional
  expectations of c_t = past + current + future estimates come from a forward and a backward recursion,
  and u, vk are evaluated by ``objectives.estimate`` / ``objectives.token_factors`` on the (t, a, v) grid.
* **True gradients** ∇KL(π‖π_ref) and ∇KL(π_ref‖π) of the sequence-level divergences, by autograd through
  the exact divergence (enumerated, or through the DP's differentiable marginals).
* **Myopic gradients** M and F (docs/contract.md §4): Σ_t ∇ KL(π(·|s_t)‖π_ref(·|s_t)) and its forward twin, with the
  states s_t drawn from a given policy and held fixed.
* **One-sample variance** tr Cov[g(y)] = E‖g‖² − ‖E g‖². Per-sequence gradients come cheaply because a
  sequence reads each parameter row at most once (``policy.param_rows``): the gradient of Σ_y L(y) w.r.t. the
  gathered ``(N, T, V)`` logits *is* the stack of per-sequence gradients. For MarkovPolicy the same fact gives
  ‖g(y)‖² = β² Σ_t ‖c_t e_t + f_t‖² with per-cell e, f, so E‖g‖² needs only E[c_t | a, v] and E[c_t² | a, v],
  which the DP also provides (past and future sums are independent given (y_{t−1}, y_t)).

Library variants (``kl_lib.config.KLSetting``): value clamps, straight-through gradients and detached token weights
act inside ``objectives.estimate``/``token_factors``, so both paths handle them; the local reward penalty (c_t = k_t)
is the DP with neither past nor future sums. TRL's geometric-mean sequence weight and NeMo-RL's weight detached where
clamped are enumerated only (the DP refuses them), and group normalisation of the penalty is refused here.

Departure from the paper: the paper estimates bias and variance from Monte Carlo repeats on a small model;
here they are exact, and Monte Carlo is used only to check the estimators against these numbers.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import Tensor

from kl_lib import objectives
from kl_lib.config import KLConfig, as_setting
from kl_lib.estimators import analytic
from kl_lib.toy.policies import MarkovPolicy, TabularPolicy, check_compatible

__all__ = [
    "all_sequences",
    "sequence_logprobs",
    "reverse_kl",
    "forward_kl",
    "reverse_kl_grad",
    "forward_kl_grad",
    "myopic_reverse_kl_grad",
    "myopic_forward_kl_grad",
    "expected_kl_grad",
    "kl_grad_variance",
    "MAX_ENUMERATED_SEQUENCES",
]

Policy = TabularPolicy | MarkovPolicy

MAX_ENUMERATED_SEQUENCES = 2**20
"""Enumeration refuses beyond this many sequences (about 1 GB of float64 intermediates at T = 20)."""


# ----------------------------------------------------------------------------------------------------------
# Enumeration
# ----------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _all_sequences(vocab_size: int, length: int) -> Tensor:
    n = vocab_size**length
    if n > MAX_ENUMERATED_SEQUENCES:
        raise ValueError(
            f"enumerating V**T = {vocab_size}**{length} = {n:,} sequences exceeds the limit of "
            f"{MAX_ENUMERATED_SEQUENCES:,}; use a shorter length, or a MarkovPolicy with method='dp'"
        )
    place = vocab_size ** torch.arange(length - 1, -1, -1)
    return torch.arange(n).unsqueeze(1).div(place, rounding_mode="floor").remainder(vocab_size)


def all_sequences(vocab_size: int, length: int) -> Tensor:
    """Every sequence, ``(V**T, T)`` LongTensor, in ``itertools.product(range(V), repeat=T)`` order."""
    if vocab_size < 1 or length < 1:
        raise ValueError(f"need vocab_size ≥ 1 and length ≥ 1, got {vocab_size}, {length}")
    return _all_sequences(vocab_size, length).clone()


def _double(policy: Policy) -> Tensor:
    return policy.logits.detach().to(torch.float64)


@dataclasses.dataclass
class _Enumerated:
    """All sequences with their per-token log-probs under π_θ (differentiable), π_ref and μ."""

    theta: Tensor  # (P, V) or (T, V, V), requires grad
    sequences: Tensor  # (N, T)
    logp: Tensor  # (N, T)
    logprobs: Tensor  # (N, T, V)
    ref_logp: Tensor  # (N, T)
    ref_logprobs: Tensor  # (N, T, V)
    behavior_logp: Tensor | None  # (N, T)

    @property
    def weights(self) -> Tensor:
        """Detached μ(y) (π_θ(y) on-policy), ``(N,)``."""
        lp = self.logp if self.behavior_logp is None else self.behavior_logp
        return lp.detach().sum(-1).exp()


def _enumerate(policy: Policy, ref: Policy, behavior: Policy | None = None, *, per_sequence: bool = False) -> _Enumerated:
    check_compatible(policy, ref, behavior)
    seqs = _all_sequences(policy.vocab_size, policy.length)
    theta = _double(policy).requires_grad_()
    if per_sequence:
        # Differentiate w.r.t. the gathered logits so that the gradient is per sequence (see module docstring).
        gathered = policy.gather_logits(seqs, theta.detach()).requires_grad_()
        theta = gathered
        logprobs = torch.log_softmax(gathered, -1)
        logp = logprobs.gather(-1, seqs.unsqueeze(-1)).squeeze(-1)
    else:
        logp, logprobs = policy.token_logprobs(seqs, theta)
    ref_logp, ref_logprobs = ref.token_logprobs(seqs, _double(ref))
    behavior_logp = None if behavior is None else behavior.token_logprobs(seqs, _double(behavior))[0]
    return _Enumerated(theta, seqs, logp, logprobs, ref_logp, ref_logprobs, behavior_logp)


def sequence_logprobs(policy: Policy) -> Tensor:
    """log π(y) of every sequence in ``all_sequences`` order, ``(V**T,)``, float64."""
    seqs = _all_sequences(policy.vocab_size, policy.length)
    return policy.token_logprobs(seqs, _double(policy))[0].sum(-1)


def _grad(value: Tensor, theta: Tensor) -> Tensor:
    (g,) = torch.autograd.grad(value, theta)
    return g


def _method(policy: Policy, method: str) -> str:
    if method not in ("auto", "enumerate", "dp"):
        raise ValueError(f"method={method!r} is not valid; choose 'auto', 'enumerate' or 'dp'")
    if method == "auto":
        return "dp" if isinstance(policy, MarkovPolicy) else "enumerate"
    if method == "dp" and not isinstance(policy, MarkovPolicy):
        raise ValueError("method='dp' needs MarkovPolicy arguments; a TabularPolicy is enumerated")
    return method


# ----------------------------------------------------------------------------------------------------------
# Dynamic programming over (position, previous token) for MarkovPolicy
# ----------------------------------------------------------------------------------------------------------


def _grid_logprobs(logits: Tensor) -> Tensor:
    """Step log-probs ``(T, V, V)``: [t, a, v] = log π(y_t = v | y_{t−1} = a)."""
    return torch.log_softmax(logits, -1)


def _state_marginals(step_logprobs: Tensor) -> Tensor:
    """P(y_{t−1} = a) for t = 0..T−1, ``(T, V)``; y_{−1} = 0. Differentiable through ``step_logprobs``."""
    T, V, _ = step_logprobs.shape
    transitions = step_logprobs.exp()
    prev = torch.zeros(V, dtype=step_logprobs.dtype)
    prev[0] = 1.0
    out = [prev]
    for t in range(T - 1):
        prev = prev @ transitions[t]
        out.append(prev)
    return torch.stack(out)


def _conditional_moments(k: Tensor, transitions: Tensor, state_marginals: Tensor, second: bool = False
                         ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Conditional moments of the past and future sums of k under the Markov chain.

    With P_t = Σ_{t'<t} k_{t'} and S_t = Σ_{t'>t} k_{t'}, returns ``(T, V)`` tensors
    E[P_t | y_{t−1}=a], E[S_t | y_t=v] and, if ``second``, E[P_t² | y_{t−1}=a], E[S_t² | y_t=v].
    ``k`` is the detached ``(T, V, V)`` grid k(t, a, v); ``transitions`` the ``(T, V, V)`` step probabilities.
    The future recursion runs backwards; the past one conditions backwards with Bayes' rule.
    """
    T, V, _ = k.shape
    zeros = lambda: torch.zeros(T, V, dtype=k.dtype)  # noqa: E731
    future, past = zeros(), zeros()
    future2, past2 = (zeros(), zeros()) if second else (None, None)
    for t in range(T - 2, -1, -1):
        step = k[t + 1] + future[t + 1]  # (v, w)
        future[t] = (transitions[t + 1] * step).sum(-1)
        if second:
            step2 = k[t + 1].square() + 2 * k[t + 1] * future[t + 1] + future2[t + 1]
            future2[t] = (transitions[t + 1] * step2).sum(-1)
    for t in range(T - 1):
        joint = state_marginals[t].unsqueeze(1) * transitions[t]  # (a, v): P(y_{t−1}=a, y_t=v)
        posterior = joint / joint.sum(0)  # P(y_{t−1}=a | y_t=v)
        past[t + 1] = (posterior * (past[t].unsqueeze(1) + k[t])).sum(0)
        if second:
            step2 = past2[t].unsqueeze(1) + 2 * k[t] * past[t].unsqueeze(1) + k[t].square()
            past2[t + 1] = (posterior * step2).sum(0)
    return past, future, past2, future2


@dataclasses.dataclass
class _Grid:
    """A MarkovPolicy problem on the (t, a, v) grid: state (t, y_{t−1}=a), token v."""

    config: KLConfig  # sequence weights off-policy are turned into a change of measure, see _grid
    theta: Tensor  # (T, V, V) leaf
    ref_lp: Tensor  # (T, V, V) step log-probs of π_ref
    behavior_lp: Tensor | None  # (T, V, V) step log-probs of μ, None on-policy
    transitions: Tensor  # (T, V, V) step probabilities of the sampling policy (detached)
    marginals: Tensor  # (T, V): P(y_{t−1} = a) under the sampling policy
    joint: Tensor  # (T, V, V): P(y_{t−1} = a, y_t = v)

    def terms(self, state_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(k, u, vk)`` on the grid, each ``(T, V, V)``, from per-cell state logits ``(T, V, V, V)``.

        The grid is a batch of tokens: the estimates and factors come from ``objectives``, elementwise.
        """
        T, V, _ = self.ref_lp.shape
        full = torch.log_softmax(state_logits, -1)  # [t, a, v, :] = log π(· | t, a)
        lp = full.gather(-1, torch.arange(V).view(1, 1, V, 1).expand(T, V, V, 1)).squeeze(-1)
        ref_full = self.ref_lp.unsqueeze(2).expand(T, V, V, V)
        k, _ = objectives.estimate(self.config, lp, self.ref_lp, None, full, ref_full)
        u, vk = objectives.token_factors(self.config, lp, k, self.behavior_lp)
        return k, u, vk

    def coefficient_moments(self, k: Tensor, second: bool = False) -> tuple[Tensor, Tensor | None]:
        """E[c_t | a, v] (and E[c_t² | a, v]) of the reward coefficient c_t, ``(T, V, V)``."""
        past, future, past2, future2 = _conditional_moments(k, self.transitions, self.marginals, second)
        local = as_setting(self.config).local_reward
        if self.config.reward_to_go or local:
            past, past2 = torch.zeros_like(past), (torch.zeros_like(past) if second else None)
        if local:
            future, future2 = torch.zeros_like(future), (torch.zeros_like(future) if second else None)
        P, S = past.unsqueeze(2), future.unsqueeze(1)  # broadcast over v and over a
        mean = P + k + S
        if not second:
            return mean, None
        # Past and future are independent given (y_{t−1}, y_t) = (a, v) (Markov property).
        P2, S2 = past2.unsqueeze(2), future2.unsqueeze(1)
        return mean, P2 + k.square() + S2 + 2 * (k * P + k * S + P * S)


def _check_dp(config: KLConfig) -> None:
    """Refuse the library variants whose terms are not per-cell functions of (t, y_{t−1}, y_t)."""
    setting = as_setting(config)
    if setting.sequence_weight != "product" or setting.token_weight == "detached_where_clamped":
        raise ValueError(f"{setting.label}: the Markov DP does not handle sequence_weight={setting.sequence_weight!r} "
                         f"or token_weight={setting.token_weight!r}; use method='enumerate' (V**T small enough)")


def _check_exact(config: KLConfig) -> None:
    """Group normalisation needs groups of Monte Carlo samples: refuse it here (see kl_lib.audit.analysis)."""
    if as_setting(config).reward_normalization != "none":
        raise ValueError(f"{as_setting(config).label}: reward_normalization couples the samples of a group, so it has "
                         "no per-sequence exact gradient here; use kl_lib.audit.analysis (exact for 'group_mean', "
                         "Monte Carlo for 'group_std')")


def _grid(config: KLConfig, policy: MarkovPolicy, ref: MarkovPolicy, behavior: MarkovPolicy | None) -> _Grid:
    check_compatible(policy, ref, behavior)
    _check_dp(config)
    theta = _double(policy).requires_grad_()
    behavior_lp = None if behavior is None else _grid_logprobs(_double(behavior))
    if config.importance_weighting == "sequence" and behavior_lp is not None:
        # E_μ[sg(W) ∇L_none(y)] = E_π[∇L_none(y)]: a change of measure, since W = π(y)/μ(y) exactly.
        config = dataclasses.replace(config, importance_weighting="none")
        behavior_lp = None
    sampling_lp = _grid_logprobs(theta.detach()) if behavior_lp is None else behavior_lp
    transitions = sampling_lp.exp()
    marginals = _state_marginals(sampling_lp)
    return _Grid(config, theta, _grid_logprobs(_double(ref)), behavior_lp, transitions, marginals,
                 marginals.unsqueeze(-1) * transitions)


def _dp_expected_grad(config: KLConfig, policy: MarkovPolicy, ref: MarkovPolicy, behavior: MarkovPolicy | None
                      ) -> Tensor:
    """E_{y~μ}[g(y)] by DP: the gradient of Σ_{t,a,v} P(a, v) (E[c_t | a, v] u + vk), see the module docstring."""
    grid = _grid(config, policy, ref, behavior)
    T, V, _ = grid.theta.shape
    k, u, vk = grid.terms(grid.theta.unsqueeze(2).expand(T, V, V, V))
    per_cell = torch.zeros_like(u)
    if grid.config.in_reward:
        per_cell = per_cell + grid.coefficient_moments(k.detach())[0] * u
    if grid.config.in_loss:
        per_cell = per_cell + vk
    return _grad(grid.config.beta * (grid.joint * per_cell).sum(), grid.theta)


def _dp_second_moment(config: KLConfig, policy: MarkovPolicy, ref: MarkovPolicy, behavior: MarkovPolicy | None
                      ) -> Tensor:
    """E_{y~μ}‖g(y)‖² by DP.

    A sequence reads row (t, y_{t−1}) once per step, so ‖g(y)‖² = β² Σ_t ‖c_t e_t + f_t‖² with e_t = ∂u_t/∂z_t and
    f_t = ∂(v_t k_t)/∂z_t functions of the cell (t, a, v) only: its expectation needs E[c_t | a, v] and E[c_t² | a, v].
    """
    if config.importance_weighting == "sequence" and behavior is not None:
        raise ValueError("the DP variance does not handle sequence importance weights off-policy; "
                         "use method='enumerate' (V**T small enough)")
    grid = _grid(config, policy, ref, behavior)
    T, V, _ = grid.theta.shape
    cells = grid.theta.detach().unsqueeze(2).expand(T, V, V, V).clone().requires_grad_()  # one copy per cell
    k, u, vk = grid.terms(cells)
    per_cell = torch.zeros_like(u)
    f = torch.autograd.grad(vk.sum(), cells, retain_graph=True)[0] if grid.config.in_loss else torch.zeros_like(cells)
    per_cell = per_cell + f.square().sum(-1)
    if grid.config.in_reward:
        e = torch.autograd.grad(u.sum(), cells)[0]
        c1, c2 = grid.coefficient_moments(k.detach(), second=True)
        per_cell = per_cell + c2 * e.square().sum(-1) + 2 * c1 * (e * f).sum(-1)
    return grid.config.beta**2 * (grid.joint * per_cell).sum()


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------


def _reverse_kl_value(policy: Policy, ref: Policy, method: str) -> tuple[Tensor, Tensor]:
    check_compatible(policy, ref)
    if _method(policy, method) == "dp":
        theta = _double(policy).requires_grad_()
        lp, ref_lp = _grid_logprobs(theta), _grid_logprobs(_double(ref))
        per_state = analytic(lp, ref_lp)  # (T, V)
        return (_state_marginals(lp) * per_state).sum(), theta
    e = _enumerate(policy, ref)
    seq_lp = e.logp.sum(-1)
    return (seq_lp.exp() * (seq_lp - e.ref_logp.sum(-1))).sum(), e.theta


def _forward_kl_value(policy: Policy, ref: Policy, method: str) -> tuple[Tensor, Tensor]:
    check_compatible(policy, ref)
    if _method(policy, method) == "dp":
        theta = _double(policy).requires_grad_()
        lp, ref_lp = _grid_logprobs(theta), _grid_logprobs(_double(ref))
        per_state = analytic(ref_lp, lp)
        return (_state_marginals(ref_lp) * per_state).sum(), theta
    e = _enumerate(policy, ref)
    ref_seq_lp = e.ref_logp.sum(-1)
    return (ref_seq_lp.exp() * (ref_seq_lp - e.logp.sum(-1))).sum(), e.theta


def reverse_kl(policy: Policy, ref: Policy, *, method: str = "auto") -> float:
    """KL(π‖π_ref) = E_{y~π}[log π(y)/π_ref(y)] over whole sequences."""
    return float(_reverse_kl_value(policy, ref, method)[0].detach())


def forward_kl(policy: Policy, ref: Policy, *, method: str = "auto") -> float:
    """KL(π_ref‖π) = E_{y~π_ref}[log π_ref(y)/π(y)] over whole sequences."""
    return float(_forward_kl_value(policy, ref, method)[0].detach())


def reverse_kl_grad(policy: Policy, ref: Policy, *, method: str = "auto") -> Tensor:
    """G* = ∇_θ KL(π_θ‖π_ref), same shape as ``policy.logits``."""
    return _grad(*_reverse_kl_value(policy, ref, method))


def forward_kl_grad(policy: Policy, ref: Policy, *, method: str = "auto") -> Tensor:
    """∇_θ KL(π_ref‖π_θ) (sequence level), same shape as ``policy.logits``."""
    return _grad(*_forward_kl_value(policy, ref, method))


def _myopic_grad(policy: Policy, ref: Policy, states_from: Policy | None, method: str, forward: bool) -> Tensor:
    states = policy if states_from is None else states_from
    check_compatible(policy, ref, states)
    if _method(policy, method) == "dp":
        theta = _double(policy).requires_grad_()
        lp, ref_lp = _grid_logprobs(theta), _grid_logprobs(_double(ref))
        per_state = analytic(ref_lp, lp) if forward else analytic(lp, ref_lp)
        return _grad((_state_marginals(_grid_logprobs(_double(states))) * per_state).sum(), theta)
    e = _enumerate(policy, ref, states)
    per_state = analytic(e.ref_logprobs, e.logprobs) if forward else analytic(e.logprobs, e.ref_logprobs)
    return _grad((e.weights * per_state.sum(-1)).sum(), e.theta)


def myopic_reverse_kl_grad(policy: Policy, ref: Policy, states_from: Policy | None = None, *,
                           method: str = "auto") -> Tensor:
    """M = E_{y~σ}[Σ_t ∇_θ KL(π_θ(·|s_t)‖π_ref(·|s_t))], states from σ = ``states_from`` (default π), fixed."""
    return _myopic_grad(policy, ref, states_from, method, forward=False)


def myopic_forward_kl_grad(policy: Policy, ref: Policy, states_from: Policy | None = None, *,
                           method: str = "auto") -> Tensor:
    """F = E_{y~σ}[Σ_t ∇_θ KL(π_ref(·|s_t)‖π_θ(·|s_t))], states from σ = ``states_from`` (default π), fixed."""
    return _myopic_grad(policy, ref, states_from, method, forward=True)


def expected_kl_grad(policy: Policy, ref: Policy, config: KLConfig, behavior: Policy | None = None, *,
                     method: str = "auto") -> Tensor:
    """E_{y~μ}[∇_θ L(y)] for the configuration's loss term L (``kl_lib.objectives``), exactly.

    Args:
        policy: π_θ (the gradient is w.r.t. ``policy.logits``).
        ref: π_ref.
        config: the KL configuration, with its β.
        behavior: μ, the policy that produced the samples; None means on-policy (μ = π_θ).
        method: ``"auto"`` (DP for MarkovPolicy, enumeration otherwise), ``"enumerate"`` or ``"dp"``.

    Returns:
        A float64 tensor shaped like ``policy.logits``.
    """
    _check_exact(config)
    if _method(policy, method) == "dp":
        return _dp_expected_grad(config, policy, ref, behavior)
    e = _enumerate(policy, ref, behavior)
    loss, _ = objectives.kl_term(config, e.logp, e.ref_logp, behavior_logp=e.behavior_logp,
                                 logprobs=e.logprobs, ref_logprobs=e.ref_logprobs, weights=e.weights)
    return _grad(loss, e.theta)


def kl_grad_variance(policy: Policy, ref: Policy, config: KLConfig, behavior: Policy | None = None, *,
                     method: str = "auto") -> float:
    """tr Cov_{y~μ}[g(y)] = E‖g(y)‖² − ‖E g(y)‖² for a single sample y.

    MarkovPolicy uses DP (second moments of the reward coefficient), except with sequence importance weights
    off-policy, where it falls back to enumeration. Enumeration raises ``ValueError`` when V**T exceeds
    ``MAX_ENUMERATED_SEQUENCES``.
    """
    _check_exact(config)
    method = _method(policy, method)
    if method == "dp" and config.importance_weighting == "sequence" and behavior is not None:
        method = "enumerate"
    if method == "dp":
        mean = _dp_expected_grad(config, policy, ref, behavior)
        return float(_dp_second_moment(config, policy, ref, behavior) - mean.square().sum())
    e = _enumerate(policy, ref, behavior, per_sequence=True)
    per_seq = objectives.per_sequence_loss(config, e.logp, e.ref_logp, behavior_logp=e.behavior_logp,
                                           logprobs=e.logprobs, ref_logprobs=e.ref_logprobs)
    g = _grad(per_seq.sum(), e.theta)  # (N, T, V): row n is ∇L(y_n) restricted to the rows y_n reads
    q = e.weights
    second_moment = (q * g.square().sum((1, 2))).sum()
    mean = torch.zeros(policy.logits.numel() // policy.vocab_size, policy.vocab_size, dtype=torch.float64)
    mean.index_add_(0, policy.param_rows(e.sequences).reshape(-1), (q[:, None, None] * g).reshape(-1, policy.vocab_size))
    return float(second_moment - mean.square().sum())
