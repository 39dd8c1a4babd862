"""What a KL configuration is: which estimator, where it enters the objective, and how it is weighted.

A configuration is the tuple (estimator, placement, β, reward_to_go, importance_weighting) of DESIGN.md §3:

* ``placement="reward"``: β·sg(Σ_t k_t) enters the reward as a detached penalty. Only the score-function
  part of ∇E[Σ_t k_t] survives.
* ``placement="loss"``: β·Σ_t k_t(θ) is added to the loss and differentiated with the samples held fixed.
  Only the pathwise part survives.
* ``placement="both"``: both parts, hence ∇E_π[Σ_t k_t], which is the true ∇KL whenever E_π[Σ_t k_t] = KL.
* ``reward_to_go``: the reward penalty at token t only counts the estimates of tokens t' ≥ t.
* ``importance_weighting``: ``"token"`` multiplies each token's term by ω_t = π_θ/μ (differentiable),
  ``"sequence"`` multiplies the sequence's term by sg(Π_t ω_t); both are 1 on-policy.

``log_ratio_clamp`` (not in DESIGN.md's signature, default off) is the explicit, reported clamp of δ that
some libraries apply silently; it exists so that their behaviour can be studied, not as a recommendation.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import asdict, dataclass

from kl_lib.estimators import ESTIMATORS

__all__ = ["KLConfig", "PLACEMENTS", "IMPORTANCE_WEIGHTINGS", "check_choice", "is_finite_number"]

PLACEMENTS: tuple[str, ...] = ("reward", "loss", "both")
IMPORTANCE_WEIGHTINGS: tuple[str, ...] = ("none", "token", "sequence")


def check_choice(field: str, value: object, valid: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``field`` (e.g. ``"KLConfig.estimator"``) and the valid values unless ``value``
    is one of ``valid``."""
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{field}={value!r} is not valid; choose one of {', '.join(map(repr, valid))}")


def is_finite_number(value: object) -> bool:
    """A finite real number (not a bool, not an integer beyond the range of a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclass(frozen=True)
class KLConfig:
    """One way of putting a KL estimate into the RL objective (DESIGN.md §3)."""

    estimator: str = "k1"
    """Which per-token estimate k_t: ``"k1"``, ``"k2"``, ``"k3"`` or ``"analytic"`` (full-vocabulary KL)."""
    placement: str = "reward"
    """Where it enters: ``"reward"`` (detached penalty), ``"loss"`` (differentiated) or ``"both"``."""
    beta: float = 1.0
    """KL coefficient β ≥ 0. β = 0 switches the KL term off (the term is still computed for logging)."""
    reward_to_go: bool = False
    """Reward placement only: penalise token t with Σ_{t'≥t} k_{t'} instead of the whole-sequence sum."""
    importance_weighting: str = "none"
    """Off-policy correction: ``"none"``, ``"token"`` (ω_t, differentiable) or ``"sequence"`` (sg(Π_t ω_t))."""
    log_ratio_clamp: float | None = None
    """Optional explicit clamp of δ to [−c, c]; the clipped fraction is reported as ``kl/clip_fraction``."""

    def __post_init__(self) -> None:
        check_choice("KLConfig.estimator", self.estimator, tuple(ESTIMATORS))
        check_choice("KLConfig.placement", self.placement, PLACEMENTS)
        check_choice("KLConfig.importance_weighting", self.importance_weighting, IMPORTANCE_WEIGHTINGS)
        if not is_finite_number(self.beta) or self.beta < 0:
            raise ValueError(f"KLConfig.beta={reprlib.repr(self.beta)} must be a finite number ≥ 0 (beta=0 disables "
                             "the KL)")
        if not isinstance(self.reward_to_go, bool):
            raise ValueError(f"KLConfig.reward_to_go={self.reward_to_go!r} must be true or false (unquoted in YAML)")
        if self.reward_to_go and self.placement == "loss":
            raise ValueError(
                "KLConfig.reward_to_go=True has no effect with placement='loss' (there is no reward penalty); "
                "use placement='reward' or 'both', or set reward_to_go=False"
            )
        if self.log_ratio_clamp is not None:
            c = self.log_ratio_clamp
            if not is_finite_number(c) or c <= 0:
                raise ValueError(f"KLConfig.log_ratio_clamp={reprlib.repr(c)} must be a finite number > 0, or null "
                                 "(no clamp)")
            if ESTIMATORS[self.estimator].full_distribution:
                raise ValueError("KLConfig.log_ratio_clamp applies to sampled estimators only, not 'analytic'")

    @property
    def in_reward(self) -> bool:
        return self.placement in ("reward", "both")

    @property
    def in_loss(self) -> bool:
        return self.placement in ("loss", "both")

    @property
    def name(self) -> str:
        """A short, deterministic, filesystem-safe name, e.g. ``k1-reward-rtg`` or ``k3-loss-tokenIS``."""
        parts = [self.estimator, self.placement]
        if self.reward_to_go:
            parts.append("rtg")
        if self.importance_weighting != "none":
            parts.append(f"{self.importance_weighting}IS")
        if self.log_ratio_clamp is not None:
            parts.append(f"clamp{self.log_ratio_clamp:g}")
        return "-".join(parts)

    @property
    def label(self) -> str:
        """A human-readable label for plots and tables, e.g. ``k3 in loss (token IS)``."""
        where = {"reward": "in reward", "loss": "in loss", "both": "in reward+loss"}[self.placement]
        extras = []
        if self.reward_to_go:
            extras.append("reward-to-go")
        if self.importance_weighting != "none":
            extras.append(f"{self.importance_weighting} IS")
        if self.log_ratio_clamp is not None:
            extras.append(f"|δ|≤{self.log_ratio_clamp:g}")
        return f"{self.estimator} {where}" + (f" ({', '.join(extras)})" if extras else "")

    def to_dict(self) -> dict:
        return asdict(self)
