"""kl_lib.toy.optimum: closed forms of π* ∝ π_ref·exp(R/β) for a 0/1 reward against enumeration."""

from __future__ import annotations

import math

import pytest
import torch

from kl_lib.toy import TabularPolicy, optimum, rl_problem

BETAS = [0.02, 0.1, 0.5, 1.0, 3.0, 30.0]


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ref = torch.softmax(2 * torch.randn(20, generator=g, dtype=torch.float64), 0)
    rewards = (torch.rand(20, generator=g) < 0.3).double()
    return ref, rewards


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_forms_equal_enumeration(seed):
    ref, rewards = _problem(seed)
    closed = optimum.closed_form_curves(ref, rewards, BETAS, ks=(1, 4, 16))
    enum = optimum.enumerated_curves(ref, rewards, BETAS, ks=(1, 4, 16))
    for col in ["pass@1", "pass@4", "pass@16", "kl_ref", "entropy"]:
        assert (closed[col] - enum[col]).abs().max() < 1e-10, col


def test_limits_and_monotonicity():
    ref, rewards = _problem()
    c = optimum.closed_form_curves(ref, rewards, [1e-3, 1e3])
    p = float(ref[rewards.bool()].sum())
    assert abs(c["pass@1"].iloc[1] - p) < 1e-3 and c["pass@1"].iloc[0] > 1 - 1e-12
    assert abs(c["entropy"].iloc[0] - c["entropy_correct"].iloc[0]) < 1e-9  # β → 0: H(π_ref | R = 1)
    assert abs(c["entropy"].iloc[1] - optimum.entropy(ref)) < 1e-3  # β → ∞: H(π_ref)
    grid = optimum.closed_form_curves(ref, rewards, BETAS)
    assert grid["pass@1"].is_monotonic_decreasing and grid["kl_ref"].is_monotonic_decreasing


def test_agrees_with_the_toy_rl_problem():
    ref = TabularPolicy.random(3, 3, generator=torch.Generator().manual_seed(4))
    rewards = rl_problem.pattern_reward(3, 3, [2, 2])
    problem = rl_problem.ToyRLProblem(ref, rewards, 0.4)
    from_rl = rl_problem.optimal_sequence_probs(ref, rewards, 0.4)
    seq = rl_problem.exact.sequence_logprobs(ref).exp()
    torch.testing.assert_close(optimum.optimal_probs(seq, rewards, 0.4), from_rl, rtol=0, atol=1e-14)
    assert problem.beta == 0.4


def test_beta_for_pass_at_1_inverts_pass_at_1():
    for p, q in [(0.1, 0.5), (0.3, 0.99), (0.01, 0.02)]:
        assert abs(optimum.pass_at_1(p, optimum.beta_for_pass_at_1(p, q)) - q) < 1e-12
    with pytest.raises(ValueError, match="0 < p < q < 1"):
        optimum.beta_for_pass_at_1(0.5, 0.4)


def test_bad_input_is_an_error():
    ref, rewards = _problem()
    with pytest.raises(ValueError, match="0 or 1"):
        optimum.closed_form_curves(ref, rewards * 2, [1.0])
    with pytest.raises(ValueError, match="beta"):
        optimum.optimal_probs(ref, rewards, 0.0)
    assert math.isclose(optimum.pass_at_k(0.5, 3), 0.875)
