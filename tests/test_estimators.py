"""Estimator values: identities, numerics at extreme log-ratios, the registry and the explicit clamp."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kl_lib.estimators import (
    ESTIMATORS,
    Estimator,
    _register,
    analytic,
    clamp_log_ratio,
    get_estimator,
    k1,
    k2,
    k3,
)

logit_vectors = st.integers(2, 8).flatmap(
    lambda v: st.tuples(
        st.lists(st.floats(-6, 6), min_size=v, max_size=v),
        st.lists(st.floats(-6, 6), min_size=v, max_size=v),
    )
)


def _categorical(pair):
    lp = torch.log_softmax(torch.tensor(pair[0], dtype=torch.float64), -1)
    ref = torch.log_softmax(torch.tensor(pair[1], dtype=torch.float64), -1)
    return lp, ref


def test_formulas_match_their_definitions():
    logp = torch.tensor([-0.3, -2.0, -1.0], dtype=torch.float64)
    ref = torch.tensor([-1.3, -0.5, -1.0], dtype=torch.float64)
    delta = logp - ref
    rho = (ref - logp).exp()
    torch.testing.assert_close(k1(logp, ref), delta)
    torch.testing.assert_close(k2(logp, ref), 0.5 * delta**2)
    torch.testing.assert_close(k3(logp, ref), rho - 1 - torch.log(rho))


@settings(max_examples=200, deadline=None)
@given(logit_vectors)
def test_k1_and_k3_are_unbiased_and_k3_is_nonnegative(pair):
    """E_{v~π}[k1] = E_{v~π}[k3] = KL(π‖π_ref) exactly (sum over the vocabulary), and k3 ≥ 0 pointwise."""
    lp, ref = _categorical(pair)
    p = lp.exp()
    kl = analytic(lp, ref)
    torch.testing.assert_close((p * k1(lp, ref)).sum(), kl, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close((p * k3(lp, ref)).sum(), kl, atol=1e-12, rtol=1e-10)
    assert (k3(lp, ref) >= 0).all()


@settings(max_examples=200, deadline=None)
@given(logit_vectors)
def test_k2_bias_is_third_order(pair):
    """E[k2] − KL = E[δ³/6 − δ⁴/24] + R, |R| ≤ E[|δ|⁵ e^{|δ|}]/120.

    From E_π[e^{−δ}] = Σ π_ref = 1: KL = E[k3] = E[e^{−δ} − 1 + δ], so E[k2] − KL = −E[e^{−δ} − 1 + δ − δ²/2],
    and Taylor's theorem with Lagrange remainder bounds what is left after the δ⁴ term.
    """
    lp, ref_direction = _categorical(pair)
    for eps in (1e-1, 1e-2, 1e-3):
        ref = torch.log_softmax(lp + eps * ref_direction, -1)
        p = lp.exp()
        delta = lp - ref
        bias = (p * k2(lp, ref)).sum() - analytic(lp, ref)
        series = (p * delta**3).sum() / 6 - (p * delta**4).sum() / 24
        remainder_bound = (p * delta.abs() ** 5 * delta.abs().exp()).sum() / 120
        assert abs(bias - series) <= remainder_bound + 1e-15, (eps, float(bias), float(series))


def test_analytic_matches_sum_and_handles_zero_probabilities():
    lp = torch.log(torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)).requires_grad_()
    ref = torch.log(torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64))
    kl = analytic(lp, ref)
    assert math.isclose(float(kl.detach()), math.log(2.0), rel_tol=1e-12)
    kl.backward()
    assert torch.isfinite(lp.grad).all()
    # π > 0 where π_ref = 0: infinite KL, not NaN
    assert analytic(ref, lp.detach()) == float("inf")


def test_analytic_mask_drops_invalid_states_with_zero_gradient():
    """A masked state's KL is exactly 0 and its gradient exactly 0 even when its rows hold NaN or ±inf; valid
    states are untouched bit for bit."""
    lp = torch.log_softmax(torch.randn(3, 4, dtype=torch.float64), -1)
    ref = torch.log_softmax(torch.randn(3, 4, dtype=torch.float64), -1)
    mask = torch.tensor([True, False, True])
    lp[1], ref[1] = torch.tensor([math.nan, math.inf, -math.inf, 1e4]), torch.tensor([-math.inf, math.nan, 0, -1e4])
    lp.requires_grad_()
    kl = analytic(lp, ref, mask)
    (grad,) = torch.autograd.grad(kl.sum(), lp)
    assert kl[1] == 0 and torch.equal(grad[1], torch.zeros(4, dtype=torch.float64))
    assert torch.equal(kl[mask], analytic(lp[mask], ref[mask])) and torch.isfinite(grad).all()
    with pytest.raises(ValueError, match="mask"):
        analytic(lp, ref, mask[:2])


def test_analytic_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same shape"):
        analytic(torch.zeros(2, 3), torch.zeros(2, 4))


def test_k3_near_zero_has_rounding_error_of_order_eps_times_delta():
    """With expm1 the float32 error of k3 is O(eps·|δ|); the naive exp(−δ) − 1 + δ has O(eps) error, which
    swamps the value δ²/2 for |δ| ≲ 1e-3."""
    delta = torch.tensor([3e-3, -3e-3, 1e-4, -1e-4, 1e-6, -1e-6], dtype=torch.float32)
    exact = k3(delta.double(), torch.zeros(6, dtype=torch.float64))
    eps = torch.finfo(torch.float32).eps
    error = (k3(delta, torch.zeros_like(delta)).double() - exact).abs()
    assert (error <= 4 * eps * delta.double().abs()).all(), error
    naive_error = ((torch.exp(-delta) - 1 + delta).double() - exact).abs()
    assert naive_error.max() > 100 * error.max()


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_finite_in_float32_for_extreme_log_ratios_without_clamping(name):
    delta = torch.linspace(-50, 50, 101, dtype=torch.float32).requires_grad_()
    est = get_estimator(name)
    value = est(delta, torch.zeros_like(delta))
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(delta.grad).all()
    # Nothing was clamped: the float32 values agree with float64 ones to float32 precision.
    exact = est(delta.detach().double(), torch.zeros(101, dtype=torch.float64))
    torch.testing.assert_close(value.double(), exact, rtol=1e-5, atol=1e-5)
    if name == "k3":
        assert value[0] > 5e21  # expm1(50) − 50 ≈ 5.18e21: no silent clamp at 10 or 20


def test_registry_lists_valid_names_on_error():
    assert set(ESTIMATORS) == {"k1", "k2", "k3", "analytic"}
    with pytest.raises(ValueError) as err:
        get_estimator("k4")
    for name in ESTIMATORS:
        assert repr(name) in str(err.value)
    with pytest.raises(ValueError, match="already registered"):
        _register(Estimator("k1", "δ", True, lambda x: x))


def test_get_estimator_is_callable_like_the_functions():
    logp, ref = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    for fn in (k1, k2, k3):
        torch.testing.assert_close(get_estimator(fn.__name__)(logp, ref), fn(logp, ref))
    full = torch.log_softmax(torch.randn(4, 5, 7, dtype=torch.float64), -1)
    full_ref = torch.log_softmax(torch.randn(4, 5, 7, dtype=torch.float64), -1)
    torch.testing.assert_close(get_estimator("analytic")(full, full_ref), analytic(full, full_ref))


def test_monte_carlo_mean_of_k1_and_k3_matches_kl_within_standard_error():
    g = torch.Generator().manual_seed(1234)
    lp = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    ref = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), -1)
    tokens = torch.multinomial(lp.exp(), 100_000, replacement=True, generator=g)
    kl = float(analytic(lp, ref))
    for est in (k1, k3):
        samples = est(lp[tokens], ref[tokens])
        mean, se = float(samples.mean()), float(samples.std() / len(samples) ** 0.5)
        assert abs(mean - kl) < 5 * se, f"{est.__name__}: MC {mean:.5f} ± {se:.5f} vs exact {kl:.5f}"


def test_clamp_reports_the_clipped_fraction():
    delta = torch.tensor([[-30.0, 0.5, 12.0], [0.0, 25.0, -1.0]])
    mask = torch.tensor([[True, True, True], [True, False, True]])
    clamped, frac = clamp_log_ratio(delta, 10.0)
    assert clamped.abs().max() == 10.0 and math.isclose(float(frac), 3 / 6, rel_tol=1e-6)
    _, frac_masked = clamp_log_ratio(delta, 10.0, mask)
    assert math.isclose(float(frac_masked), 2 / 5, rel_tol=1e-6)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="positive and finite"):
            clamp_log_ratio(delta, bad)
