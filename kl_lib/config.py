"""What a KL configuration is: which estimator, where it enters the objective, and how it is weighted.

A configuration is the tuple (estimator, placement, β, reward_to_go, importance_weighting) of docs/contract.md §3:

* ``placement="reward"``: β·sg(Σ_t k_t) enters the reward as a detached penalty. Only the score-function
  part of ∇E[Σ_t k_t] survives.
* ``placement="loss"``: β·Σ_t k_t(θ) is added to the loss and differentiated with the samples held fixed.
  Only the pathwise part survives.
* ``placement="both"``: both parts, hence ∇E_π[Σ_t k_t], which is the true ∇KL whenever E_π[Σ_t k_t] = KL.
* ``reward_to_go``: the reward penalty at token t only counts the estimates of tokens t' ≥ t.
* ``importance_weighting``: ``"token"`` multiplies each token's term by ω_t = π_θ/μ (differentiable),
  ``"sequence"`` multiplies the sequence's term by sg(Π_t ω_t); both are 1 on-policy.

``log_ratio_clamp`` (an addition to the signature of docs/contract.md §3, default off) is the explicit, reported clamp of δ that
some libraries apply silently; it exists so that their behaviour can be studied, not as a recommendation.

``KLSetting`` (a ``KLConfig`` with more fields, every default reproducing the plain configuration) expresses the
further choices of TRL, verl, OpenRLHF and NeMo-RL (docs/contract.md §3 "Library variants", docs/libraries.md):

* ``value_clamp``: the estimate's value k_t is clamped to [−c, c] after any ``log_ratio_clamp`` (zero gradient where
  it binds); verl k3: δ to ±20 then the value to ±10; OpenRLHF: the value to ±10 for every estimator.
* ``gradient_estimator``: straight-through, k_t = sg(value) + g(δ) − sg(g(δ)) with g the named estimator on the
  unclamped δ (verl's ``k1+``/``k3+``, OpenRLHF's ``unbiased_gradient``: g = k2).
* ``local_reward``: the reward penalty of token t is its own estimate only, c_t = k_t (NeMo-RL REINFORCE++).
* ``token_weight`` (with ``importance_weighting="token"``, loss placement): ``"differentiable"`` ω_t (contract),
  ``"detached"`` sg(ω_t) (OpenRLHF ``unbiased_gradient`` off-policy), ``"detached_where_clamped"`` sg(ω_t) where
  ``log_ratio_clamp`` binds (NeMo-RL, PR #2958).
* ``sequence_weight`` (with ``importance_weighting="sequence"``): ``"product"`` sg(Π_t ω_t) (contract) or
  ``"geometric_mean"``: TRL's differentiable exp(mean_t log ω_t) multiplying every token's k_t (loss placement).
* ``reward_normalization``: the sequence penalty passes through a group's advantage normalisation, over contiguous
  groups of ``group_size`` sequences: ``"group_mean"`` c − mean_group(c) (Dr. GRPO), ``"group_std"``
  (βc − mean)/(std(βc) + ``std_epsilon``) with Bessel's std (GRPO in verl and TRL). Only Monte Carlo batches have
  groups: the exact analysis treats ``"group_mean"`` exactly ((1 − 1/G) times the reward part) and ``"group_std"``
  by Monte Carlo.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import asdict, dataclass

from kl_lib.estimators import ESTIMATORS, LIBRARY_ESTIMATORS, Estimator

__all__ = [
    "IMPORTANCE_WEIGHTINGS",
    "KLConfig",
    "KLSetting",
    "PLACEMENTS",
    "REWARD_NORMALIZATIONS",
    "SEQUENCE_WEIGHTS",
    "TOKEN_WEIGHTS",
    "as_setting",
    "check_choice",
    "is_finite_number",
]

PLACEMENTS: tuple[str, ...] = ("reward", "loss", "both")
IMPORTANCE_WEIGHTINGS: tuple[str, ...] = ("none", "token", "sequence")
TOKEN_WEIGHTS: tuple[str, ...] = ("differentiable", "detached", "detached_where_clamped")
SEQUENCE_WEIGHTS: tuple[str, ...] = ("product", "geometric_mean")
REWARD_NORMALIZATIONS: tuple[str, ...] = ("none", "group_mean", "group_std")


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
    """One way of putting a KL estimate into the RL objective (docs/contract.md §3)."""

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
        self._check(ESTIMATORS)

    def _check(self, estimators: dict[str, Estimator]) -> None:
        check_choice("KLConfig.estimator", self.estimator, tuple(estimators))
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
            if estimators[self.estimator].full_distribution:
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


@dataclass(frozen=True)
class KLSetting(KLConfig):
    """A ``KLConfig`` plus the library variants of this module's docstring; the defaults add nothing."""

    value_clamp: float | None = None
    """Clamp of the estimate's value to [−c, c], after ``log_ratio_clamp``; reported as ``kl/value_clip_fraction``."""
    gradient_estimator: str | None = None
    """Straight-through: the value of ``estimator``, the gradient of this estimator at the unclamped δ."""
    local_reward: bool = False
    """Reward placement: penalise token t with its own estimate only, c_t = k_t."""
    token_weight: str = "differentiable"
    """With token weights in the loss: ``"differentiable"``, ``"detached"`` or ``"detached_where_clamped"``."""
    sequence_weight: str = "product"
    """With sequence weights: ``"product"`` (sg Π_t ω_t) or ``"geometric_mean"`` (TRL, differentiable, loss only)."""
    reward_normalization: str = "none"
    """The sequence penalty through a group's advantage normalisation: ``"none"``, ``"group_mean"``, ``"group_std"``."""
    group_size: int | None = None
    """G, the number of contiguous sequences per group (required by ``reward_normalization``)."""
    std_epsilon: float = 1e-6
    """ε in (βc − mean)/(std + ε) (verl 1e-6; TRL 1e-4)."""

    def __post_init__(self) -> None:
        self._check({**ESTIMATORS, **LIBRARY_ESTIMATORS})
        if self.value_clamp is not None and (not is_finite_number(self.value_clamp) or self.value_clamp <= 0):
            raise ValueError(f"KLSetting.value_clamp={reprlib.repr(self.value_clamp)} must be a finite number > 0, "
                             "or null (no clamp)")
        if self.gradient_estimator is not None:
            check_choice("KLSetting.gradient_estimator", self.gradient_estimator,
                         tuple(n for n, e in {**ESTIMATORS, **LIBRARY_ESTIMATORS}.items() if not e.full_distribution))
        if (self.value_clamp is not None or self.gradient_estimator is not None) and self.estimator == "analytic":
            raise ValueError("KLSetting.value_clamp and gradient_estimator apply to sampled estimators, not 'analytic'")
        check_choice("KLSetting.token_weight", self.token_weight, TOKEN_WEIGHTS)
        check_choice("KLSetting.sequence_weight", self.sequence_weight, SEQUENCE_WEIGHTS)
        check_choice("KLSetting.reward_normalization", self.reward_normalization, REWARD_NORMALIZATIONS)
        self._check_combinations()

    def _check_combinations(self) -> None:
        def refuse(condition: bool, message: str) -> None:
            if condition:
                raise ValueError(f"KLSetting: {message}")

        refuse(self.local_reward and not self.in_reward, "local_reward=True needs placement='reward' or 'both'")
        refuse(self.local_reward and self.reward_to_go, "local_reward and reward_to_go exclude each other")
        refuse(self.token_weight != "differentiable" and (self.importance_weighting != "token"
                                                          or self.placement != "loss"),
               f"token_weight={self.token_weight!r} needs importance_weighting='token' and placement='loss'")
        refuse(self.token_weight == "detached_where_clamped" and self.log_ratio_clamp is None,
               "token_weight='detached_where_clamped' needs a log_ratio_clamp")
        refuse(self.sequence_weight != "product" and (self.importance_weighting != "sequence"
                                                     or self.placement != "loss"),
               f"sequence_weight={self.sequence_weight!r} needs importance_weighting='sequence' and placement='loss'")
        normalised = self.reward_normalization != "none"
        refuse(normalised and (not self.in_reward or self.reward_to_go or self.local_reward),
               "reward_normalization needs the whole-sequence reward penalty (placement 'reward' or 'both', "
               "no reward_to_go, no local_reward)")
        refuse(normalised and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                               or self.group_size < 2),
               f"reward_normalization={self.reward_normalization!r} needs an integer group_size ≥ 2, "
               f"got {self.group_size!r}")
        refuse(not normalised and self.group_size is not None, "group_size is only used with reward_normalization")
        refuse(not is_finite_number(self.std_epsilon) or self.std_epsilon < 0, "std_epsilon must be finite and ≥ 0")

    def _variants(self) -> list[tuple[str, str]]:
        """(name part, label part) of every non-default variant field."""
        out = []
        if self.value_clamp is not None:
            out.append((f"vclamp{self.value_clamp:g}", f"|k|≤{self.value_clamp:g}"))
        if self.gradient_estimator is not None:
            out.append((f"st{self.gradient_estimator}", f"{self.gradient_estimator} gradient"))
        if self.local_reward:
            out.append(("local", "local penalty"))
        if self.token_weight != "differentiable":
            out.append((f"w{self.token_weight}", f"{self.token_weight.replace('_', ' ')} weight"))
        if self.sequence_weight != "product":
            out.append(("seqgeo", "sequence geometric-mean weight"))
        if self.reward_normalization != "none":
            out.append((f"{self.reward_normalization.replace('_', '')}{self.group_size}",
                        f"{self.reward_normalization.replace('_', ' ')}, G={self.group_size}"))
        return out

    @property
    def name(self) -> str:
        return "-".join([super().name, *(n for n, _ in self._variants())])

    @property
    def label(self) -> str:
        base, extras = super().label, [lab for _, lab in self._variants()]
        if not extras:
            return base
        if base.endswith(")"):
            return base[:-1] + ", " + ", ".join(extras) + ")"
        return base + " (" + ", ".join(extras) + ")"


def as_setting(config: KLConfig) -> KLSetting:
    """``config`` itself if it is a ``KLSetting``, else the ``KLSetting`` with its fields and no variant."""
    if isinstance(config, KLSetting):
        return config
    return KLSetting(**asdict(config))
