"""Per-token estimators of the reverse KL divergence KL(π_θ ‖ π_ref).

Notation (docs/contract.md §1): for a sampled token y_t at state s_t,

    logp      = log π_θ(y_t | s_t)          (differentiable)
    ref_logp  = log π_ref(y_t | s_t)        (never differentiated)
    δ         = logp − ref_logp              (the log-ratio)
    ρ         = π_ref / π_θ = exp(−δ)

and the estimators, each a function of δ alone (Schulman, "Approximating KL divergence"):

    k1 = δ                                   E_{y_t~π}[k1 | s_t] = KL(π(·|s_t) ‖ π_ref(·|s_t)), can be < 0
    k2 = ½ δ²                                biased: = KL + O(δ³) near π = π_ref; either sign
    k3 = ρ − 1 + δ = expm1(−δ) + δ ≥ 0       unbiased, the control-variate form of k1

plus ``analytic``, the exact per-state KL summed over the whole vocabulary, which needs the full
next-token distributions ``(..., V)`` rather than the sampled token's log-prob.

Numerics. k3 is computed with ``expm1`` on the log-ratio: for δ → 0 this avoids the cancellation in
``exp(−δ) − 1``, and for |δ| ≤ 50 it stays finite in float32 (exp(50) ≈ 5.2e21 < 3.4e38). Nothing is clamped
silently. A clamp on δ is offered only as the explicit :func:`clamp_log_ratio`, which returns the fraction of
entries it clipped so that a caller can report it (clipped entries carry no gradient through δ).

Library estimators. ``LIBRARY_ESTIMATORS`` holds estimators that libraries offer but the contract's table does
not study (verl's ``abs`` = |δ|, biased); they are usable through ``kl_lib.config.KLSetting`` and are not logged
as metrics. :func:`clamp_value` is the explicit, reported clamp of an estimate's *value* to [−c, c] (verl, OpenRLHF
and NeMo-RL clamp k3's value at 10, which binds for δ < −2.61 or δ > 11); a clipped entry has zero gradient.

Departure from the paper: the paper studies k1 and k3 only; k2 and ``analytic`` are included because the
libraries it discusses offer them (``analytic`` is the Rao-Blackwellised, zero-sampling-noise reference).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "LIBRARY_ESTIMATORS",
    "analytic",
    "clamp_log_ratio",
    "clamp_value",
    "estimator_names",
    "get_estimator",
    "lookup_estimator",
    "k1",
    "k2",
    "k3",
]


def _k1(log_ratio: Tensor) -> Tensor:
    return log_ratio


def _k2(log_ratio: Tensor) -> Tensor:
    return 0.5 * log_ratio.square()


def _k3(log_ratio: Tensor) -> Tensor:
    return torch.expm1(-log_ratio) + log_ratio


def _abs(log_ratio: Tensor) -> Tensor:
    return log_ratio.abs()


def k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log π_θ − log π_ref, elementwise on tensors of any (broadcastable) shape."""
    return _k1(logp - ref_logp)


def k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = ½ (log π_θ − log π_ref)², elementwise."""
    return _k2(logp - ref_logp)


def k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = π_ref/π_θ − 1 − log(π_ref/π_θ) = expm1(−δ) + δ ≥ 0, elementwise."""
    return _k3(logp - ref_logp)


def analytic(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor | None = None) -> Tensor:
    """Exact KL(π_θ(·|s) ‖ π_ref(·|s)) from full next-token log-probabilities.

    Args:
        logprobs: ``(..., V)`` normalised log-probabilities of π_θ (differentiable).
        ref_logprobs: ``(..., V)`` normalised log-probabilities of π_ref.
        mask: optional ``(...)`` bool validity mask: an invalid state's KL is exactly 0, and its gradient too,
            whatever its rows hold (NaN, ±inf).

    Returns:
        ``(...)`` the KL at each state. Tokens with π_θ = 0 (log-prob −inf) contribute 0, with a finite
        gradient; a token with π_θ > 0 and π_ref = 0 gives +inf, as it should.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"analytic: logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} "
            "must have the same shape (..., V)"
        )
    dropped = logprobs == float("-inf")
    if mask is not None:
        if mask.shape != logprobs.shape[:-1]:
            raise ValueError(
                f"analytic: mask {tuple(mask.shape)} must be the log-probabilities' shape without the vocabulary, "
                f"{tuple(logprobs.shape[:-1])}"
            )
        dropped = dropped | ~mask.bool().unsqueeze(-1)
    safe_logprobs = logprobs.masked_fill(dropped, 0.0)
    terms = safe_logprobs.exp() * (safe_logprobs - ref_logprobs)
    return terms.masked_fill(dropped, 0.0).sum(-1)


@dataclass(frozen=True)
class Estimator:
    """A registered KL estimator.

    ``of_log_ratio`` maps the per-token log-ratio δ to the estimate (sampled estimators); ``full_distribution``
    estimators (``analytic``) instead need the full next-token log-probabilities and have no such map.
    """

    name: str
    formula: str
    unbiased: bool
    of_log_ratio: Callable[[Tensor], Tensor] | None
    full_distribution: bool = False

    def __call__(self, logp: Tensor, ref_logp: Tensor) -> Tensor:
        if self.full_distribution:
            return analytic(logp, ref_logp)
        return self.of_log_ratio(logp - ref_logp)


ESTIMATORS: dict[str, Estimator] = {}


def _register(estimator: Estimator) -> None:
    if estimator.name in ESTIMATORS:
        raise ValueError(f"estimator {estimator.name!r} is already registered")
    ESTIMATORS[estimator.name] = estimator


_register(Estimator("k1", "δ", unbiased=True, of_log_ratio=_k1))
_register(Estimator("k2", "½δ²", unbiased=False, of_log_ratio=_k2))
_register(Estimator("k3", "expm1(−δ) + δ", unbiased=True, of_log_ratio=_k3))
_register(Estimator("analytic", "Σ_v π(v)(log π(v) − log π_ref(v))", unbiased=True, of_log_ratio=None,
                    full_distribution=True))


LIBRARY_ESTIMATORS: dict[str, Estimator] = {
    "abs": Estimator("abs", "|δ|", unbiased=False, of_log_ratio=_abs),
}
"""Estimators offered by libraries outside the contract's table (not logged as metrics, not in ``ESTIMATORS``)."""


def estimator_names() -> tuple[str, ...]:
    return tuple(ESTIMATORS)


def get_estimator(name: str) -> Estimator:
    """Look up an estimator by name; unknown names raise a ``ValueError`` that lists the valid ones.

    The returned object is callable as ``est(logp, ref_logp)`` (for ``analytic``: full log-prob vectors).
    """
    try:
        return ESTIMATORS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown KL estimator {name!r}; valid estimators are {', '.join(map(repr, ESTIMATORS))}"
        ) from None


def lookup_estimator(name: str) -> Estimator:
    """Look up ``name`` in ``ESTIMATORS`` or ``LIBRARY_ESTIMATORS``; unknown names raise a ``ValueError`` listing both."""
    found = ESTIMATORS.get(name) if isinstance(name, str) else None
    found = found or (LIBRARY_ESTIMATORS.get(name) if isinstance(name, str) else None)
    if found is None:
        valid = ", ".join(map(repr, [*ESTIMATORS, *LIBRARY_ESTIMATORS]))
        raise ValueError(f"unknown KL estimator {name!r}; valid estimators are {valid}")
    return found


def clamp_value(value: Tensor, bound: float, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Clamp an estimate's value to [−bound, bound] and report the fraction of (valid) entries clipped.

    A clipped entry has zero gradient (``torch.clamp``), so the clamp changes the estimator's gradient wherever it
    binds. Shapes and the returned fraction as in :func:`clamp_log_ratio`.
    """
    if not (bound > 0 and bound < float("inf")):
        raise ValueError(f"clamp bound must be positive and finite, got {bound!r}")
    clipped = value.detach().abs() > bound
    if mask is None:
        fraction = clipped.to(value.dtype).mean()
    else:
        m = mask.to(value.dtype)
        fraction = (clipped.to(value.dtype) * m).sum() / m.sum().clamp_min(1.0)
    return value.clamp(-bound, bound), fraction


def clamp_log_ratio(log_ratio: Tensor, bound: float, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Clamp δ to [−bound, bound] and report how often that happened.

    This is the *explicit* version of the clamps that verl, NeMo-RL or SkyRL apply silently. A clipped
    entry has zero gradient through δ, so a clamp changes the estimator being studied: report the fraction.

    Args:
        log_ratio: ``(B, T)`` (any shape) log-ratios δ.
        bound: positive finite bound.
        mask: optional ``(B, T)`` validity mask; the fraction is over valid entries only.

    Returns:
        ``(clamped, clip_fraction)`` with ``clip_fraction`` a 0-dim tensor in [0, 1].
    """
    return clamp_value(log_ratio, bound, mask)
