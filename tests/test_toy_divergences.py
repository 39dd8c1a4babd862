"""kl_lib.toy.divergences: forward- vs reverse-KL fits of a unimodal family to a bimodal reference."""

from __future__ import annotations

import math

import pytest
import torch

from kl_lib.toy import TabularPolicy, exact
from kl_lib.toy.divergences import (
    bimodal_reference,
    discrete_kl,
    fit_gaussian,
    gaussian_on_grid,
    myopic_forward_kl,
    myopic_reverse_kl,
)

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = torch.linspace(-6, 6, 1201, dtype=torch.float64)


def test_forward_fit_matches_the_first_two_moments_exactly():
    ref = bimodal_reference(GRID, means=(-2.0, 2.0), std=0.5, weights=(0.3, 0.7))
    fit = fit_gaussian(GRID, ref, "forward")
    for power in (1, 2):  # exponential family with statistics (x, x²): the forward-KL optimum is moment matching
        assert abs(float((fit.probs * GRID**power).sum() - (ref * GRID**power).sum())) < 1e-6


def test_reverse_fit_sits_on_one_mode_and_pays_minus_log_of_its_mass():
    ref = bimodal_reference(GRID, means=(-2.5, 2.5), std=0.5)
    fit = fit_gaussian(GRID, ref, "reverse")
    assert abs(abs(fit.mean) - 2.5) < 1e-3 and abs(fit.std - 0.5) < 1e-3
    assert abs(fit.reverse_kl - math.log(2)) < 1e-4  # q = p restricted to one mode: KL = −log p(A) = log 2
    assert fit.forward_kl > 10  # the dropped mode: q ≈ 0 where p has half its mass
    forward = fit_gaussian(GRID, ref, "forward")
    assert forward.std > 2.0 and abs(forward.mean) < 1e-6  # covers both modes, centred between them
    assert forward.reverse_kl > fit.reverse_kl and forward.forward_kl < fit.forward_kl


def test_bad_direction_and_weights_are_errors():
    with pytest.raises(ValueError, match="direction"):
        fit_gaussian(GRID, bimodal_reference(GRID), "sideways")
    with pytest.raises(ValueError, match="weight"):
        bimodal_reference(GRID, weights=(0.5, 0.6))


def test_discrete_kl_has_zero_log_zero():
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q = gaussian_on_grid(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64), 1.0, 0.0)
    assert torch.isfinite(discrete_kl(p, q))


def test_myopic_kls_of_a_tabular_policy():
    g = torch.Generator().manual_seed(0)
    pi, ref = TabularPolicy.random(3, 3, generator=g), TabularPolicy.random(3, 3, generator=g)
    assert abs(myopic_reverse_kl(pi, ref) - exact.reverse_kl(pi, ref)) < 1e-12  # chain rule of the KL
    assert abs(myopic_forward_kl(pi, pi)) < 1e-14
    # Not the sequence-level forward KL: the states come from π, not π_ref.
    assert abs(myopic_forward_kl(pi, ref) - exact.forward_kl(pi, ref)) > 1e-3
    theta = pi.logits.detach().clone().requires_grad_()
    # Its gradient with the states held fixed is F (exact.myopic_forward_kl_grad): check by finite differences.
    F = exact.myopic_forward_kl_grad(pi, ref)
    probs = exact.sequence_logprobs(pi).exp()
    seqs = exact.all_sequences(3, 3)
    _, lp = pi.token_logprobs(seqs, theta)
    _, rlp = ref.token_logprobs(seqs, ref.logits.double())
    value = (probs.unsqueeze(1) * (rlp.exp() * (rlp - lp)).sum(-1)).sum()
    (grad,) = torch.autograd.grad(value, theta)
    torch.testing.assert_close(grad, F, rtol=0, atol=1e-12)
