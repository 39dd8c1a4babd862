"""Exercises for notebooks 01 and 02, each with a checker that computes the truth and a reference answer.

A notebook cell reads ``answer = None`` (the student replaces it) and prints ``check(key, answer)``:

* ``None`` → ``"Exercise <key>: not answered yet"`` (not a failure, so the notebook runs end to end);
* a right answer → a short explanation of why it is right;
* a wrong answer → ``AssertionError`` with what the computation says.

``reference(key)`` returns the reference answer; notebooks use it when run with ``reveal_answers=True``, and
tests/test_toy_exercises.py checks every reference answer (and a wrong answer) against its checker. Answers that
are functions ("implement …") are checked on random inputs against an independent computation.

Every checker computes the truth with ``kl_lib`` itself (exact enumeration, closed forms), never from the
reference answer.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kl_lib.config import KLConfig
from kl_lib.estimators import k3
from kl_lib.toy import control, exact, optimum
from kl_lib.toy.divergences import discrete_kl
from kl_lib.toy.literature import sequence_k2_grads
from kl_lib.toy.policies import TabularPolicy
from kl_lib.toy.variance import baseline_variances, per_sequence_terms

__all__ = ["EXERCISES", "Exercise", "check", "reference"]

_ATOL = 1e-8


@dataclass(frozen=True)
class Exercise:
    key: str
    title: str
    reference: Any
    checker: Callable[[Any], str]  # raises AssertionError on a wrong answer, returns an explanation otherwise


def _pair(seed: int, length: int = 3, vocab: int = 3) -> tuple[TabularPolicy, TabularPolicy]:
    g = torch.Generator().manual_seed(seed)
    return TabularPolicy.random(vocab, length, generator=g), TabularPolicy.random(vocab, length, generator=g)


def _candidates(pi: TabularPolicy, ref: TabularPolicy) -> dict[str, torch.Tensor]:
    G, F, M = exact.reverse_kl_grad(pi, ref), exact.myopic_forward_kl_grad(pi, ref), exact.myopic_reverse_kl_grad(pi, ref)
    return {"G*": G, "0": torch.zeros_like(G), "F": F, "M": M, "G* − F": G - F, "G* − M": G - M}


def _grpo(answer: str) -> str:
    pi, ref = _pair(101)
    cands, got = _candidates(pi, ref), exact.expected_kl_grad(pi, ref, KLConfig("k3", "loss"))
    assert answer in cands, f"{answer!r} is not one of {list(cands)}"
    assert (got - cands[answer]).abs().max() <= _ATOL, f"k3 in the loss does not follow {answer}"
    return "k3 in the loss follows F: the per-state forward KL(π_ref‖π_θ), states held fixed."


def _reward_to_go(answer: set[str]) -> str:
    pi, ref = _pair(102)
    unchanged = {e for e in ("k1", "k2", "k3", "analytic")
                 if (exact.expected_kl_grad(pi, ref, KLConfig(e, "reward", reward_to_go=True))
                     - exact.expected_kl_grad(pi, ref, KLConfig(e, "reward"))).abs().max() <= _ATOL}
    assert set(answer) == unchanged, f"reward-to-go leaves {sorted(unchanged)} unchanged, not {sorted(answer)}"
    return "all four: a past estimate times the present score has mean zero, whatever the estimator."


def _k2_loss(answer: dict[int, bool]) -> str:
    truth = {}
    for T in (1, 3):
        pi, ref = _pair(400 + T, length=T)
        truth[T] = bool((exact.expected_kl_grad(pi, ref, KLConfig("k2", "loss"))
                         - exact.reverse_kl_grad(pi, ref)).abs().max() <= _ATOL)
    assert dict(answer) == truth, f"k2 in the loss is unbiased at T=1: {truth[1]}, at T=3: {truth[3]}"
    return "k2 in the loss gives M, which misses E[(Σ_t KL_t)∇log π(y)]; that term vanishes only for T = 1."


def _one_token(answer: list[float]) -> str:
    theta = torch.tensor([1.0, 0.0, -1.0], dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(theta, -1)[2]
    (grad,) = torch.autograd.grad(k3(logp, torch.tensor(1 / 3, dtype=torch.float64).log()), theta)
    assert torch.allclose(torch.tensor(answer, dtype=torch.float64), grad, atol=0.01), \
        f"autograd says {grad.numpy().round(3)}"
    return (f"∇k3 = {grad.numpy().round(3)}; a descent step raises θ_2, so π_θ(2) rises from 0.090 towards "
            "π_ref(2) = 1/3.")


def _dropped_mass(answer: Callable[[float], float]) -> str:
    g = torch.Generator().manual_seed(7)
    ref = torch.softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    for size in range(1, 6):
        for subset in itertools.combinations(range(6), size):
            keep = torch.zeros(6, dtype=torch.bool)
            keep[list(subset)] = True
            q = torch.where(keep, ref, torch.zeros_like(ref)) / ref[keep].sum()
            truth = float(discrete_kl(q, ref))
            got = float(answer(float(ref[keep].sum())))
            assert abs(got - truth) < 1e-10, f"A = {subset}: KL(π_A‖π_ref) = {truth:.6f}, your formula gives {got:.6f}"
    return ("KL(π_A‖π_ref) = −log π_ref(A): dropping mass has a finite price under the reverse KL; the forward "
            "KL(π_ref‖π_A) is +∞ because π_A = 0 where π_ref > 0.")


def _loo(answer: Callable[[torch.Tensor], torch.Tensor]) -> str:
    g = torch.Generator().manual_seed(8)
    for G in (2, 3, 5, 8):
        c = torch.randn(G, generator=g, dtype=torch.float64)
        truth = torch.stack([c[i] - (c.sum() - c[i]) / (G - 1) for i in range(G)])
        got = torch.as_tensor(answer(c.clone()), dtype=torch.float64)
        assert got.shape == truth.shape and torch.allclose(got, truth, atol=1e-12), f"G={G}: want {truth}, got {got}"
    return "c_i − mean_{j≠i} c_j = (G/(G−1)) (c_i − mean_j c_j): the leave-one-out baseline is a rescaled centring."


def _optimal_baseline(answer: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], float]) -> str:
    pi, ref = _pair(103)
    config = KLConfig("k1", "reward")
    t = per_sequence_terms(pi, ref, config)
    truth = baseline_variances(pi, ref, config, ())["b*"]
    got = float(answer(t.probs, t.penalties, t.scores.square().sum(1)))
    assert abs(got - truth) < 1e-10, f"b* = {truth:.6f}, your formula gives {got:.6f}"
    return (f"b* = E[c‖s‖²]/E‖s‖² = {truth:.4f}, not E[c] = {float(t.mean(t.penalties)):.4f}: sequences with "
            "large scores weigh more.")


def _liu(answer: KLConfig) -> str:
    pi, ref = _pair(104)
    assert isinstance(answer, KLConfig), "answer with a KLConfig(...)"
    got = per_sequence_terms(pi, ref, answer).grads
    diff = float((got - sequence_k2_grads(pi, ref)).abs().max())
    assert diff <= _ATOL, f"{answer.label}: per-sample gradients differ from ½(Σδ)²'s by up to {diff:.3g}"
    return "∇½(Σ_t δ_t)² = (Σ_t δ_t) ∇log π(y): k1 in the reward, sample by sample."


def _pass_at_1(answer: Callable[[float, float], float]) -> str:
    g = torch.Generator().manual_seed(9)
    ref = torch.softmax(torch.randn(12, generator=g, dtype=torch.float64), 0)
    rewards = (torch.arange(12) % 4 == 0).double()
    p = float(ref[rewards.bool()].sum())
    for beta in (0.05, 0.3, 1.0, 5.0):
        truth = float((optimum.optimal_probs(ref, rewards, beta) * rewards).sum())
        got = float(answer(p, beta))
        assert abs(got - truth) < 1e-10, f"β={beta}: pass@1 of π* is {truth:.6f}, your formula gives {got:.6f}"
    return "q = p e^{1/β} / (1 − p + p e^{1/β}) = σ(logit p + 1/β): the optimum shifts the log-odds by 1/β."


def _beta_for(answer: Callable[[float, float], float]) -> str:
    for p, q in [(0.1, 0.5), (0.3, 0.9), (0.05, 0.99)]:
        got = float(answer(p, q))
        assert got > 0 and abs(optimum.pass_at_1(p, got) - q) < 1e-10, f"p={p}, q={q}: β={got} gives " \
            f"pass@1 {optimum.pass_at_1(p, got) if got > 0 else float('nan'):.6f}"
    return "β = 1 / log(q(1 − p) / (p(1 − q))): the log-odds gain divided into 1."


def _ziegler(answer: Callable[[float, float, float], float]) -> str:
    for beta, kl, target in itertools.product((0.05, 0.5), (0.0, 0.9, 1.0, 1.1, 5.0), (1.0,)):
        truth, got = control.ziegler_update(beta, kl, target), float(answer(beta, kl, target))
        assert abs(got - truth) < 1e-12, f"β={beta}, KL={kl}, target={target}: want {truth}, got {got}"
    return "β ← β(1 + 0.1·clip(KL/target − 1, −0.2, 0.2)): at most ±2% per step."


def _entropy_limit(answer: Callable[[torch.Tensor, torch.Tensor], float]) -> str:
    g = torch.Generator().manual_seed(10)
    ref = torch.softmax(torch.randn(12, generator=g, dtype=torch.float64), 0)
    rewards = (torch.arange(12) % 3 == 0).double()
    truth = optimum.entropy(optimum.optimal_probs(ref, rewards, 1e-3))
    got = float(answer(ref, rewards))
    assert abs(got - truth) < 1e-8, f"H(π*) at β = 0.001 is {truth:.6f}, your answer {got:.6f}"
    return "H(π*) → H(π_ref | R = 1): the optimum keeps the reference's spread over the correct answers."


def _ref_loo(c: torch.Tensor) -> torch.Tensor:
    return c - (c.sum() - c) / (len(c) - 1)


def _ref_entropy_limit(ref: torch.Tensor, rewards: torch.Tensor) -> float:
    return optimum.entropy(ref[rewards.bool()] / ref[rewards.bool()].sum())


EXERCISES: dict[str, Exercise] = {e.key: e for e in [
    Exercise("01.1", "GRPO's k3 in the loss", "F", _grpo),
    Exercise("01.2", "reward-to-go", {"k1", "k2", "k3", "analytic"}, _reward_to_go),
    Exercise("01.3", "k2 in the loss at T = 1 and T = 3", {1: True, 3: False}, _k2_loss),
    Exercise("01.4", "one token by hand", [1.80, 0.66, -2.46], _one_token),
    Exercise("01.5", "the reverse-KL price of dropping mass", lambda mass: -math.log(mass), _dropped_mass),
    Exercise("01.6", "implement the leave-one-out baseline", _ref_loo, _loo),
    Exercise("01.7", "derive the optimal constant baseline",
             lambda probs, c, s2: float((probs * c * s2).sum() / (probs * s2).sum()), _optimal_baseline),
    Exercise("01.8", "Liu et al.'s sequence-level k2", KLConfig("k1", "reward"), _liu),
    Exercise("02.1", "pass@1 of π*", lambda p, beta: p * math.exp(1 / beta) / (1 - p + p * math.exp(1 / beta)),
             _pass_at_1),
    Exercise("02.2", "the β for a target pass@1", lambda p, q: 1 / math.log(q * (1 - p) / (p * (1 - q))), _beta_for),
    Exercise("02.3", "implement the target-KL controller",
             lambda beta, kl, target: beta * (1 + 0.1 * min(max(kl / target - 1, -0.2), 0.2)), _ziegler),
    Exercise("02.4", "the entropy of π* as β → 0", _ref_entropy_limit, _entropy_limit),
]}


def _get(key: str) -> Exercise:
    if key not in EXERCISES:
        raise ValueError(f"unknown exercise {key!r}; valid: {', '.join(EXERCISES)}")
    return EXERCISES[key]


def reference(key: str) -> Any:
    """The reference answer of exercise ``key``."""
    return _get(key).reference


def check(key: str, answer: Any) -> str:
    """``"Exercise <key>: not answered yet"`` for None, an explanation if right; AssertionError if wrong."""
    exercise = _get(key)
    if answer is None:
        return f"Exercise {key} ({exercise.title}): not answered yet"
    return f"Exercise {key} ({exercise.title}): correct. {exercise.checker(answer)}"
