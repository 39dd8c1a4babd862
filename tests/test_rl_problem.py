"""kl_lib.toy.rl_problem: the optimum π* ∝ π_ref·exp(R/β), the objective, and exact-gradient ascent."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from kl_lib.toy import exact, rl_problem
from kl_lib.config import KLConfig
from kl_lib.toy import TabularPolicy


pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(vocab_size: int = 2, length: int = 3, beta: float = 0.7, seed: int = 0) -> rl_problem.ToyRLProblem:
    gen = torch.Generator().manual_seed(seed)
    ref = TabularPolicy.random(vocab_size, length, generator=gen)
    return rl_problem.ToyRLProblem(ref, rl_problem.pattern_reward(vocab_size, length, (1, 1)), beta)


def test_pattern_reward_matches_a_loop():
    rewards = rl_problem.pattern_reward(3, 4, (2, 0))
    expected = [float(any(y[i:i + 2] == (2, 0) for i in range(3))) for y in itertools.product(range(3), repeat=4)]
    assert rewards.tolist() == expected


def test_optimum_matches_brute_force_loop():
    problem = _problem(vocab_size=3, length=3, beta=0.4)
    weights = []
    for i, y in enumerate(itertools.product(range(3), repeat=3)):
        logp = float(problem.ref.log_prob(torch.tensor([y]))[0])
        weights.append(math.exp(logp + float(problem.rewards[i]) / problem.beta))
    brute = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    assert_close(rl_problem.optimal_sequence_probs(problem.ref, problem.rewards, problem.beta), brute)
    # ... and the TabularPolicy form represents exactly that distribution.
    assert_close(exact.sequence_logprobs(rl_problem.optimal_policy(problem)).exp(), brute)
    assert_close(rl_problem.optimal_objective(problem), problem.beta * math.log(sum(weights)))


def test_objective_gap_is_beta_times_kl_to_optimum():
    problem = _problem(beta=0.5)
    opt = rl_problem.optimal_policy(problem)
    j_star = rl_problem.optimal_objective(problem)
    assert rl_problem.objective(opt, problem) == pytest.approx(j_star, abs=1e-12)
    gen = torch.Generator().manual_seed(1)
    opt_probs = exact.sequence_logprobs(opt).exp()
    for _ in range(5):
        policy = TabularPolicy.random(2, 3, scale=2.0, generator=gen)
        q = exact.sequence_logprobs(policy).exp()
        kl_to_opt = float((q * (q.log() - opt_probs.log())).sum())
        assert rl_problem.objective(policy, problem) == pytest.approx(j_star - problem.beta * kl_to_opt, abs=1e-12)
        assert rl_problem.objective(policy, problem) < j_star


def test_optimum_is_a_stationary_point_of_the_objective():
    problem = _problem(vocab_size=3, length=2, beta=0.3)
    opt = rl_problem.optimal_policy(problem)
    grad = rl_problem.expected_reward_grad(opt, problem.rewards) - problem.beta * exact.reverse_kl_grad(opt, problem.ref)
    assert float(grad.abs().max()) < 1e-12


def test_expected_reward_grad_is_the_score_function_expectation():
    problem = _problem(vocab_size=3, length=3)
    policy = TabularPolicy.random(3, 3, generator=torch.Generator().manual_seed(2))
    theta = policy.logits.clone().requires_grad_()
    seq_logp = policy.token_logprobs(exact.all_sequences(3, 3), theta)[0].sum(-1)
    (score,) = torch.autograd.grad((seq_logp.exp().detach() * problem.rewards * seq_logp).sum(), theta)  # E[R ∇logπ]
    assert_close(rl_problem.expected_reward_grad(policy, problem.rewards), score)


def test_prefix_probs_match_a_loop():
    policy = TabularPolicy.random(2, 3, generator=torch.Generator().manual_seed(3))
    probs = exact.sequence_logprobs(policy).exp()
    seqs = exact.all_sequences(2, 3).tolist()
    expected = [1.0]
    for t in (1, 2):
        for prefix in itertools.product(range(2), repeat=t):
            expected.append(sum(float(p) for p, y in zip(probs, seqs) if tuple(y[:t]) == prefix))
    assert_close(rl_problem.prefix_probs(policy), torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("estimator,placement", [("k1", "reward"), ("k3", "both"), ("analytic", "both")])
def test_unbiased_configurations_converge_to_the_optimum(estimator, placement):
    problem = _problem(beta=0.7)
    metrics, policy = rl_problem.optimise(problem, KLConfig(estimator, placement, beta=problem.beta), steps=300, lr=1.0,
                                      log_every=50)
    assert metrics["kl_to_opt"].iloc[-1] < 1e-8
    assert rl_problem.objective(policy, problem) == pytest.approx(rl_problem.optimal_objective(problem), abs=1e-8)
    assert not metrics["diverged"].any()


def test_plain_gradient_ascent_increases_the_objective_towards_the_optimum():
    problem = _problem(beta=0.7)
    metrics, _ = rl_problem.optimise(problem, KLConfig("k1", "reward", beta=0.7), steps=200, lr=0.5, log_every=20,
                                 preconditioner="none")
    assert (metrics["objective"].diff().dropna() > 0).all()
    assert metrics["kl_to_opt"].iloc[-1] < 0.1 * metrics["kl_to_opt"].iloc[0]


def test_k1_in_loss_follows_the_unregularised_trajectory():
    problem = _problem(beta=0.7)
    with_k1_loss, policy_a = rl_problem.optimise(problem, KLConfig("k1", "loss", beta=0.7), steps=60, lr=0.5)
    no_kl, policy_b = rl_problem.optimise(problem, None, steps=60, lr=0.5)
    cols = ["objective", "expected_reward", "kl_ref", "kl_to_opt"]
    assert_close(torch.tensor(with_k1_loss[cols].values), torch.tensor(no_kl[cols].values), atol=1e-12, rtol=0)
    assert_close(policy_a.logits, policy_b.logits, atol=1e-12, rtol=0)
    assert no_kl["config"].iloc[0] == "no KL" and with_k1_loss["config"].iloc[0] == "k1 in loss"


def test_biased_configuration_stops_away_from_the_optimum():
    problem = _problem(beta=0.7)
    metrics, _ = rl_problem.optimise(problem, KLConfig("k3", "loss", beta=0.7), steps=300, lr=0.5, log_every=100)
    assert metrics["update_norm"].iloc[-1] < 1e-6  # converged ...
    assert metrics["kl_to_opt"].iloc[-1] > 1e-4  # ... somewhere else


def test_optimise_is_deterministic_and_records_steps():
    problem = _problem()
    a, _ = rl_problem.optimise(problem, KLConfig("k3", "reward", beta=0.7), steps=25, lr=0.5, log_every=10)
    b, _ = rl_problem.optimise(problem, KLConfig("k3", "reward", beta=0.7), steps=25, lr=0.5, log_every=10)
    assert a.equals(b)
    assert a["step"].tolist() == [0, 10, 20, 25]


def test_frontier_trades_reward_for_kl():
    problem = _problem()
    front = rl_problem.frontier(problem, [0.1, 0.3, 1.0, 3.0])
    assert front["kl_ref"].is_monotonic_decreasing and front["expected_reward"].is_monotonic_decreasing


def test_invalid_arguments_raise():
    problem = _problem()
    with pytest.raises(ValueError, match="beta"):
        rl_problem.ToyRLProblem(problem.ref, problem.rewards, 0.0)
    with pytest.raises(ValueError, match="rewards"):
        rl_problem.ToyRLProblem(problem.ref, problem.rewards[:-1], 1.0)
    with pytest.raises(ValueError, match="preconditioner"):
        rl_problem.optimise(problem, None, steps=1, lr=0.1, preconditioner="adam")
    with pytest.raises(ValueError, match="pattern"):
        rl_problem.pattern_reward(2, 3, (0, 2))
