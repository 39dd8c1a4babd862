"""kl_lib.toy.control: the target-KL controller and β schedules on the exact toy RL problem."""

from __future__ import annotations

import pytest
import torch

from kl_lib.config import KLConfig
from kl_lib.toy import TabularPolicy, control, exact, rl_problem

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def problem():
    ref = TabularPolicy.random(3, 3, generator=torch.Generator().manual_seed(0))
    return rl_problem.ToyRLProblem(ref, rl_problem.pattern_reward(3, 3, [2, 2]), 0.5)


def test_ziegler_update():
    assert control.ziegler_update(1.0, 1.0, 1.0) == 1.0
    assert abs(control.ziegler_update(1.0, 1.1, 1.0) - 1.01) < 1e-15
    assert abs(control.ziegler_update(1.0, 9.0, 1.0) - 1.02) < 1e-15  # error clipped at +0.2
    assert abs(control.ziegler_update(1.0, 0.0, 1.0) - 0.98) < 1e-15
    with pytest.raises(ValueError):
        control.ziegler_update(1.0, 1.0, 0.0)


def test_controller_brings_k1_in_reward_to_the_frontier_at_the_target(problem):
    target = 0.3
    df = control.controlled_ascent(problem, KLConfig("k1", "reward"), control.TargetKLController(target, 0.5),
                                   steps=800, lr=2.0, log_every=100)
    last = df.iloc[-1]
    assert abs(last["kl_ref"] - target) < 1e-4
    assert last["kl_to_opt_beta"] < 1e-5  # at π* of the β it settled at
    opt = rl_problem.optimal_sequence_probs(problem.ref, problem.rewards, last["beta"])
    assert abs(float((opt * (opt.log() - exact.sequence_logprobs(problem.ref))).sum()) - target) < 1e-3


def test_biased_configuration_settles_at_the_target_but_off_the_optimum(problem):
    df = control.controlled_ascent(problem, KLConfig("k3", "loss"), control.TargetKLController(0.3, 0.5),
                                   steps=800, lr=2.0, log_every=100)
    last = df.iloc[-1]
    assert abs(last["kl_ref"] - 0.3) < 1e-4 and last["kl_to_opt_beta"] > 1e-3


def test_schedules():
    lin, geo = control.schedule("linear", 1.0, 0.1, 10), control.schedule("exponential", 1.0, 0.01, 10)
    assert lin(0, 0.0) == 1.0 and abs(lin(10, 0.0) - 0.1) < 1e-15 and abs(lin(20, 0.0) - 0.1) < 1e-15
    assert abs(geo(5, 0.0) - 0.1) < 1e-15
    with pytest.raises(ValueError, match="linear"):
        control.schedule("cosine", 1.0, 0.1, 10)
