"""Adaptive KL control in the toy RL problem: Ziegler et al.'s target-KL controller and β schedules.

Practitioners rarely keep β fixed. Two common choices, applied here to the exact expected-gradient ascent of
``kl_lib.toy.rl_problem`` (prefix preconditioner, no sampling noise):

* **Target-KL controller** (Ziegler et al. 2019, "Fine-tuning language models from human preferences"; TRL's
  ``AdaptiveKLController``): after each step, with the measured KL_n = KL(π_n‖π_ref),

      e_n = clip(KL_n / KL_target − 1, −c, c),     β_{n+1} = β_n (1 + K_β e_n)       (c = 0.2, K_β = 0.1).

  Ziegler et al. scale K_β by the batch size over a horizon; here one step is one update. The measured KL is
  the exact sequence-level reverse KL (what the mean of k1 over a batch estimates without bias).
* **A schedule** β_n from β_start to β_end over the run: ``"linear"`` or ``"exponential"`` (geometric).

Where they lead. The update of a configuration at β is ∇E[R] − β·E[∇L_KL/β]. For k1 in reward it is ∇J_β, so a
controller that settles at β̄ settles at π*_β̄ with KL(π*_β̄‖π_ref) = KL_target: the controller chooses a point on
the reward–KL frontier. A biased configuration settles where *its own* field vanishes at β̄, at the target
KL but off the frontier (less reward for the same KL); k1 in loss has no KL field at all, so β only grows.

Departure from the paper: the paper uses fixed β; this module is an addition for teaching.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pandas as pd
import torch

from kl_lib.config import KLConfig
from kl_lib.toy import exact, rl_problem
from kl_lib.toy.policies import TabularPolicy

__all__ = ["SCHEDULES", "TargetKLController", "controlled_ascent", "schedule", "ziegler_update"]


def ziegler_update(beta: float, kl: float, target: float, k_beta: float = 0.1, clip: float = 0.2) -> float:
    """One step of the target-KL controller: β (1 + K_β · clip(KL/target − 1, −clip, clip))."""
    if not (target > 0 and beta > 0 and k_beta > 0 and clip > 0):
        raise ValueError(f"need target, beta, k_beta, clip > 0; got {target}, {beta}, {k_beta}, {clip}")
    error = min(max(kl / target - 1.0, -clip), clip)
    return beta * (1.0 + k_beta * error)


@dataclasses.dataclass
class TargetKLController:
    """Stateful controller: ``beta`` is the current β; calling it at step n > 0 applies :func:`ziegler_update`."""

    target: float
    beta: float
    k_beta: float = 0.1
    clip: float = 0.2

    def __call__(self, step: int, kl: float) -> float:
        if step > 0:
            self.beta = ziegler_update(self.beta, kl, self.target, self.k_beta, self.clip)
        return self.beta


def _linear(start: float, end: float, frac: float) -> float:
    return start + (end - start) * frac


def _exponential(start: float, end: float, frac: float) -> float:
    return start * (end / start) ** frac


SCHEDULES: dict[str, Callable[[float, float, float], float]] = {"linear": _linear, "exponential": _exponential}


def schedule(kind: str, start: float, end: float, steps: int) -> Callable[[int, float], float]:
    """β_n for n = 0..steps from ``start`` to ``end`` (the KL argument is ignored)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule kind {kind!r} is not valid; choose one of {tuple(SCHEDULES)}")
    if not (start > 0 and end > 0 and steps >= 1):
        raise ValueError(f"need start, end > 0 and steps ≥ 1; got {start}, {end}, {steps}")
    return lambda step, kl: SCHEDULES[kind](start, end, min(step, steps) / steps)


def controlled_ascent(problem: rl_problem.ToyRLProblem, config: KLConfig, beta_of: Callable[[int, float], float],
                      *, steps: int, lr: float, log_every: int = 10) -> pd.DataFrame:
    """Exact ascent from π_ref where step n uses ``config`` with β = beta_of(n, KL(π_n‖π_ref)).

    Returns one row per recorded step: ``step``, ``beta``, ``expected_reward``, ``kl_ref``, ``kl_to_opt_beta``
    (KL(π_n‖π*_{β_n}): distance to the optimum of the current β), ``update_norm``, ``diverged``.
    """
    if steps < 1 or log_every < 1 or not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"need steps ≥ 1, log_every ≥ 1 and a finite lr > 0; got {steps}, {log_every}, {lr}")
    policy = TabularPolicy(problem.ref.logits.detach().double().clone())
    rows = []
    for step in range(steps + 1):
        seq_logp = exact.sequence_logprobs(policy)
        kl = exact.reverse_kl(policy, problem.ref)
        beta = float(beta_of(step, kl))
        direction = rl_problem.ascent_direction(policy, problem, dataclasses.replace(config, beta=beta))
        update = direction / rl_problem.prefix_probs(policy).clamp_min(1e-300).unsqueeze(-1)
        diverged = not bool(torch.isfinite(update).all())
        if step % log_every == 0 or step == steps or diverged:
            opt = rl_problem.optimal_sequence_probs(problem.ref, problem.rewards, beta)
            q = seq_logp.exp()
            rows.append({"config": config.label, "step": step, "beta": beta,
                         "expected_reward": float((q * problem.rewards).sum()), "kl_ref": kl,
                         "kl_to_opt_beta": float((q * (seq_logp - opt.log())).sum()),
                         "update_norm": float(direction.norm()), "diverged": diverged})
        if diverged:
            break
        policy = TabularPolicy(policy.logits + lr * update)
    return pd.DataFrame(rows)
