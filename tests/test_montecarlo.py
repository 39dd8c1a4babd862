"""Sampled gradients (as the trainer computes them) against the exact expected gradient and variance.

Tolerances come from the estimates' own standard errors: every coordinate's z-score must stay below 5 (with a
few hundred coordinates, a false alarm has probability < 1e-4), and the variance within 5 standard errors.
"""

import pytest
import torch

from kl_lib.toy import exact
from kl_lib.config import KLConfig
from kl_lib.toy.montecarlo import mc_kl_grad
from kl_lib.toy import MarkovPolicy, TabularPolicy

CASES = [
    (KLConfig("k1", "reward"), False),
    (KLConfig("k1", "reward", reward_to_go=True), False),
    (KLConfig("k1", "loss"), False),
    (KLConfig("k3", "loss"), False),
    (KLConfig("k3", "reward"), False),
    (KLConfig("k3", "both", beta=0.5), False),
    (KLConfig("analytic", "both"), False),
    (KLConfig("k3", "loss", importance_weighting="token"), True),
    (KLConfig("k1", "reward", importance_weighting="sequence"), True),
    (KLConfig("k1", "reward"), True),
]


@pytest.mark.parametrize("cls", [TabularPolicy, MarkovPolicy])
@pytest.mark.parametrize("cfg, off_policy", CASES, ids=lambda c: getattr(c, "name", str(c)))
def test_monte_carlo_gradient_agrees_with_exact_within_standard_error(cls, cfg, off_policy):
    g = torch.Generator().manual_seed(2024)
    policy, ref, behavior = (cls.random(3, 3, generator=g, scale=0.7) for _ in range(3))
    behavior = behavior if off_policy else None
    mc = mc_kl_grad(policy, ref, cfg, 20_000, torch.Generator().manual_seed(7), behavior)
    truth = exact.expected_kl_grad(policy, ref, cfg, behavior)
    visited = mc.stderr > 0
    # A coordinate never touched by any sample must have an exact expected gradient that is negligible.
    assert (truth[~visited].abs() < 1e-3).all()
    z = (mc.mean - truth)[visited] / mc.stderr[visited]
    worst = int(z.abs().argmax())
    assert z.abs().max() < 5, (
        f"{cfg.name}: MC {float(mc.mean[visited][worst]):.5f} ± {float(mc.stderr[visited][worst]):.5f} "
        f"vs exact {float(truth[visited][worst]):.5f}"
    )
    variance = exact.kl_grad_variance(policy, ref, cfg, behavior)
    assert abs(mc.variance - variance) < 5 * mc.variance_stderr, (mc.variance, mc.variance_stderr, variance)


def test_monte_carlo_is_deterministic_given_its_generator():
    policy, ref = TabularPolicy.random(2, 3), TabularPolicy.random(2, 3)
    a = mc_kl_grad(policy, ref, KLConfig(), 100, torch.Generator().manual_seed(3))
    b = mc_kl_grad(policy, ref, KLConfig(), 100, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_samples"):
        mc_kl_grad(policy, ref, KLConfig(), 1, torch.Generator())
