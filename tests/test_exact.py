"""kl_lib.toy.exact: docs/contract.md §4's table, computed (not assumed), on- and off-policy; true gradients against finite
differences; the Markov DP against enumeration; exact variances against brute force."""

import itertools
import math

import pytest
import torch

from kl_lib.toy import exact
from kl_lib.config import PLACEMENTS, KLConfig
from kl_lib.estimators import ESTIMATORS
from kl_lib.toy import MarkovPolicy, TabularPolicy

SIZES = [(2, 1), (2, 4), (3, 3), (4, 2), (2, 7)]  # (V, T)
TOL = 1e-8


def _triple(cls, V, T, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(cls.random(V, T, generator=g) for _ in range(3))


def _close(a, b, tol=TOL):
    """Equal up to tol relative to the size of the gradients involved (all are O(1) here)."""
    scale = max(1.0, float(a.norm()), float(b.norm()))
    return float((a - b).norm()) <= tol * scale


# --------------------------------------------------------------------------------------------------------------
# Layout and basics
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("V, T", [(1, 3), (2, 3), (3, 2), (4, 1)])
def test_all_sequences_in_itertools_product_order(V, T):
    assert exact.all_sequences(V, T).tolist() == [list(s) for s in itertools.product(range(V), repeat=T)]


def test_tabular_row_layout_follows_design():
    """Row of prefix (a_0..a_{t−1}) = (V^t − 1)/(V − 1) + lexicographic index; e.g. V=3: (1, 2) → 4 + 5 = 9."""
    policy = TabularPolicy.random(3, 3)
    seqs = torch.tensor([[1, 2, 0], [0, 0, 0], [2, 2, 2]])
    assert policy.param_rows(seqs).tolist() == [[0, 2, 9], [0, 1, 4], [0, 3, 12]]
    assert policy.length == 3 and policy.logits.shape == (13, 3)


@pytest.mark.parametrize("V, T", SIZES)
def test_sequence_probabilities_sum_to_one_and_match_sampling(V, T):
    policy, _, _ = _triple(TabularPolicy, V, T, 0)
    p = exact.sequence_logprobs(policy).exp()
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-12)


def test_sampling_frequencies_match_exact_probabilities():
    policy, _, _ = _triple(TabularPolicy, 3, 2, 1)
    n = 200_000
    seqs = policy.sample(n, torch.Generator().manual_seed(0))
    counts = torch.bincount(seqs[:, 0] * 3 + seqs[:, 1], minlength=9).double()
    p = exact.sequence_logprobs(policy).exp()
    se = (p * (1 - p) / n).sqrt()
    z = (counts / n - p) / se
    assert z.abs().max() < 5, z


def test_bad_policy_inputs():
    with pytest.raises(ValueError, match="not 1 \\+ V"):
        TabularPolicy(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="float tensor"):
        TabularPolicy(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(T, V, V\)"):
        MarkovPolicy(torch.zeros(3, 2, 4))
    pi = TabularPolicy.random(2, 3)
    with pytest.raises(ValueError, match="ref must be a TabularPolicy"):
        exact.reverse_kl(pi, TabularPolicy.random(2, 4))
    with pytest.raises(ValueError, match="behavior must be"):
        exact.expected_kl_grad(pi, pi, KLConfig(), behavior=MarkovPolicy.random(2, 3))
    with pytest.raises(ValueError, match="method"):
        exact.reverse_kl(pi, pi, method="fast")
    with pytest.raises(ValueError, match="MarkovPolicy"):
        exact.reverse_kl(pi, pi, method="dp")


def test_enumeration_refuses_clearly_when_too_large():
    big = MarkovPolicy.random(4, 11)  # 4**11 = 4.2M sequences
    with pytest.raises(ValueError, match="exceeds the limit.*MarkovPolicy"):
        exact.kl_grad_variance(big, big, KLConfig(), method="enumerate")


# --------------------------------------------------------------------------------------------------------------
# True gradients
# --------------------------------------------------------------------------------------------------------------


def _finite_difference(fn, policy, h=1e-6):
    base = policy.logits.detach().double()
    grad = torch.zeros_like(base)
    for idx in itertools.product(*map(range, base.shape)):
        plus, minus = base.clone(), base.clone()
        plus[idx] += h
        minus[idx] -= h
        grad[idx] = (fn(policy.with_logits(plus)) - fn(policy.with_logits(minus))) / (2 * h)
    return grad


@pytest.mark.parametrize("cls, V, T", [(TabularPolicy, 3, 2), (TabularPolicy, 2, 3), (MarkovPolicy, 2, 3)])
def test_kl_gradients_match_finite_differences(cls, V, T):
    policy, ref, _ = _triple(cls, V, T, 3)
    for value, grad in [(exact.reverse_kl, exact.reverse_kl_grad), (exact.forward_kl, exact.forward_kl_grad)]:
        fd = _finite_difference(lambda p: value(p, ref), policy)
        torch.testing.assert_close(grad(policy, ref), fd, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("V, T", SIZES)
def test_kl_values(V, T):
    policy, ref, _ = _triple(TabularPolicy, V, T, 4)
    lp, ref_lp = exact.sequence_logprobs(policy), exact.sequence_logprobs(ref)
    assert math.isclose(exact.reverse_kl(policy, ref), float((lp.exp() * (lp - ref_lp)).sum()), rel_tol=1e-12)
    assert math.isclose(exact.forward_kl(policy, ref), float((ref_lp.exp() * (ref_lp - lp)).sum()), rel_tol=1e-12)
    assert exact.reverse_kl(policy, policy) == pytest.approx(0.0, abs=1e-14)
    assert float(exact.reverse_kl_grad(policy, policy).norm()) < 1e-12


# --------------------------------------------------------------------------------------------------------------
# docs/contract.md §4, on-policy: every row, computed by exact.expected_kl_grad through objectives
# --------------------------------------------------------------------------------------------------------------

# What each configuration's expected gradient equals, as a function of (G*, F, M); None = "biased": differs from
# G*, and from every other reference gradient, on random policies.
CONTRACT_TABLE = {
    ("k1", "reward"): lambda G, F, M: G,
    ("k1", "loss"): lambda G, F, M: torch.zeros_like(G),
    ("k1", "both"): lambda G, F, M: G,
    ("k2", "reward"): None,
    ("k2", "loss"): lambda G, F, M: M,
    ("k2", "both"): None,
    ("k3", "reward"): lambda G, F, M: G - F,
    ("k3", "loss"): lambda G, F, M: F,
    ("k3", "both"): lambda G, F, M: G,
    ("analytic", "reward"): lambda G, F, M: G - M,
    ("analytic", "loss"): lambda G, F, M: M,
    ("analytic", "both"): lambda G, F, M: G,
}


def test_design_table_is_complete():
    assert set(CONTRACT_TABLE) == set(itertools.product(ESTIMATORS, PLACEMENTS))


def _references(policy, ref, **kw):
    return (exact.reverse_kl_grad(policy, ref, **kw), exact.myopic_forward_kl_grad(policy, ref, **kw),
            exact.myopic_reverse_kl_grad(policy, ref, **kw))


@pytest.mark.parametrize("cls", [TabularPolicy, MarkovPolicy])
@pytest.mark.parametrize("V, T", SIZES)
@pytest.mark.parametrize("seed", [0, 1])
def test_design_table_on_policy(cls, V, T, seed):
    policy, ref, _ = _triple(cls, V, T, seed)
    G, F, M = _references(policy, ref)
    for (est, placement), expected in CONTRACT_TABLE.items():
        for rtg in ([False, True] if placement != "loss" else [False]):
            cfg = KLConfig(est, placement, reward_to_go=rtg)
            got = exact.expected_kl_grad(policy, ref, cfg)
            if expected is not None:
                assert _close(got, expected(G, F, M)), (cfg.name, float((got - expected(G, F, M)).norm()))
            elif T > 1:
                # k2 in reward/both: biased, i.e. equal to none of the reference gradients.
                for other in (G, F, M, G - F, G - M, torch.zeros_like(G)):
                    assert float((got - other).norm()) > 1e-3 * float(G.norm()), cfg.name


@pytest.mark.parametrize("V", [2, 3, 5])
def test_k2_in_loss_is_unbiased_only_for_a_single_token(V):
    for T in (1, 3):
        policy, ref, _ = _triple(TabularPolicy, V, T, 7)
        got = exact.expected_kl_grad(policy, ref, KLConfig("k2", "loss"))
        G = exact.reverse_kl_grad(policy, ref)
        assert _close(got, G) == (T == 1)


def test_biased_configurations_are_really_biased():
    """The 'biased' entries are not vacuous: G*, F, M, 0 are pairwise far apart on random policies."""
    policy, ref, _ = _triple(TabularPolicy, 3, 3, 11)
    G, F, M = _references(policy, ref)
    refs = [G, F, M, G - F, G - M, torch.zeros_like(G)]
    for a, b in itertools.combinations(refs, 2):
        assert float((a - b).norm()) > 0.05 * float(G.norm())


@pytest.mark.parametrize("beta", [0.0, 0.05, 2.5])
def test_beta_scales_the_expected_gradient(beta):
    policy, ref, _ = _triple(TabularPolicy, 2, 4, 5)
    for cfg in (KLConfig("k1", "reward"), KLConfig("k3", "loss"), KLConfig("analytic", "both")):
        scaled = exact.expected_kl_grad(policy, ref, KLConfig(cfg.estimator, cfg.placement, beta=beta))
        assert _close(scaled, beta * exact.expected_kl_grad(policy, ref, cfg))


# --------------------------------------------------------------------------------------------------------------
# Off-policy (docs/contract.md §4, last paragraph)
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [TabularPolicy, MarkovPolicy])
@pytest.mark.parametrize("V, T", [(2, 4), (3, 3), (4, 2)])
def test_off_policy_rows(cls, V, T):
    policy, ref, behavior = _triple(cls, V, T, 21)
    G = exact.reverse_kl_grad(policy, ref)
    M_mu = exact.myopic_reverse_kl_grad(policy, ref, states_from=behavior)
    # Without weights nothing is unbiased.
    for est, placement in itertools.product(ESTIMATORS, PLACEMENTS):
        got = exact.expected_kl_grad(policy, ref, KLConfig(est, placement), behavior)
        assert float((got - G).norm()) > 1e-3 * float(G.norm()), (est, placement)
    # Token weights, k1/k3 in the loss: the per-state reverse-KL gradient at the behaviour policy's states.
    for est in ("k1", "k3"):
        got = exact.expected_kl_grad(policy, ref, KLConfig(est, "loss", importance_weighting="token"), behavior)
        assert _close(got, M_mu), est
    # Sequence weights: k1 in reward, and every unbiased estimator in both, recover G*.
    for est, placement in [("k1", "reward"), ("k1", "both"), ("k3", "both"), ("analytic", "both")]:
        cfg = KLConfig(est, placement, importance_weighting="sequence")
        assert _close(exact.expected_kl_grad(policy, ref, cfg, behavior), G), cfg.name
    cfg = KLConfig("k1", "reward", reward_to_go=True, importance_weighting="sequence")
    assert _close(exact.expected_kl_grad(policy, ref, cfg, behavior), G)


def test_behavior_equal_to_policy_is_on_policy():
    policy, ref, _ = _triple(TabularPolicy, 3, 3, 2)
    same = policy.with_logits(policy.logits.clone())
    for cfg in (KLConfig("k3", "loss", importance_weighting="token"), KLConfig("k1", "reward"),
                KLConfig("k1", "both", importance_weighting="sequence")):
        assert _close(exact.expected_kl_grad(policy, ref, cfg, same), exact.expected_kl_grad(policy, ref, cfg))


# --------------------------------------------------------------------------------------------------------------
# MarkovPolicy: dynamic programming against enumeration
# --------------------------------------------------------------------------------------------------------------


def _tied(markov: MarkovPolicy, tabular_grad: torch.Tensor) -> torch.Tensor:
    """Map a gradient w.r.t. the tied TabularPolicy rows back to the MarkovPolicy's (T, V, V) logits."""
    V, T = markov.vocab_size, markov.length
    out = torch.zeros_like(markov.logits, dtype=torch.float64)
    row = 0
    for t in range(T):
        for prefix in range(V**t):
            out[t, 0 if t == 0 else prefix % V] += tabular_grad[row]
            row += 1
    return out


ALL_CONFIGS = [KLConfig(e, p, beta=0.3, reward_to_go=r, importance_weighting=w)
               for e, p, w, r in itertools.product(ESTIMATORS, PLACEMENTS, ("none", "token", "sequence"), (False, True))
               if not (r and p == "loss")]


@pytest.mark.parametrize("V, T", [(2, 5), (3, 3)])
@pytest.mark.parametrize("off_policy", [False, True], ids=["on", "off"])
def test_markov_dp_matches_enumeration_for_every_configuration(V, T, off_policy):
    policy, ref, behavior = _triple(MarkovPolicy, V, T, 8)
    behavior = behavior if off_policy else None
    tab_behavior = behavior.as_tabular() if off_policy else None
    for cfg in ALL_CONFIGS:
        dp = exact.expected_kl_grad(policy, ref, cfg, behavior)
        enum = exact.expected_kl_grad(policy, ref, cfg, behavior, method="enumerate")
        tab = _tied(policy, exact.expected_kl_grad(policy.as_tabular(), ref.as_tabular(), cfg, tab_behavior))
        assert dp.shape == policy.logits.shape
        assert _close(dp, enum, 1e-10) and _close(dp, tab, 1e-10), cfg.name


@pytest.mark.parametrize("V, T", [(2, 6), (4, 3)])
def test_markov_dp_kls_and_myopic_gradients_match_enumeration(V, T):
    policy, ref, states = _triple(MarkovPolicy, V, T, 9)
    for fn in (exact.reverse_kl, exact.forward_kl):
        assert math.isclose(fn(policy, ref), fn(policy, ref, method="enumerate"), rel_tol=1e-12)
        assert math.isclose(fn(policy, ref), fn(policy.as_tabular(), ref.as_tabular()), rel_tol=1e-12)
    for fn in (exact.reverse_kl_grad, exact.forward_kl_grad):
        assert _close(fn(policy, ref), fn(policy, ref, method="enumerate"), 1e-10)
    for fn in (exact.myopic_reverse_kl_grad, exact.myopic_forward_kl_grad):
        assert _close(fn(policy, ref, states), fn(policy, ref, states, method="enumerate"), 1e-10)


def test_design_table_holds_for_long_markov_sequences():
    """T = 200 (4^200 sequences): only the DP can do this; the table still holds."""
    policy, ref, _ = _triple(MarkovPolicy, 4, 200, 13)
    G, F, M = _references(policy, ref)
    for (est, placement), expected in CONTRACT_TABLE.items():
        if expected is not None:
            got = exact.expected_kl_grad(policy, ref, KLConfig(est, placement))
            assert _close(got, expected(G, F, M)), (est, placement)


# --------------------------------------------------------------------------------------------------------------
# Variance
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [TabularPolicy, MarkovPolicy])
@pytest.mark.parametrize("off_policy", [False, True], ids=["on", "off"])
def test_variance_matches_brute_force_per_sequence_gradients(cls, off_policy):
    """E‖g‖² − ‖E g‖² against one autograd call per sequence with the objectives' batch of size one."""
    from kl_lib import objectives

    policy, ref, behavior = _triple(cls, 3, 3, 17)
    behavior = behavior if off_policy else None
    seqs = exact.all_sequences(3, 3)
    sampler = policy if behavior is None else behavior
    q = exact.sequence_logprobs(sampler).exp()
    for cfg in (KLConfig("k1", "reward"), KLConfig("k3", "loss", importance_weighting="token"),
                KLConfig("analytic", "both", reward_to_go=True), KLConfig("k1", "reward", importance_weighting="sequence")):
        grads = []
        for y in seqs:
            theta = policy.logits.detach().double().requires_grad_()
            logp, logprobs = policy.token_logprobs(y[None], theta)
            ref_logp, ref_logprobs = ref.token_logprobs(y[None])
            beh = None if behavior is None else behavior.token_logprobs(y[None])[0]
            loss = objectives.per_sequence_loss(cfg, logp, ref_logp, behavior_logp=beh, logprobs=logprobs,
                                                ref_logprobs=ref_logprobs).sum()
            grads.append(torch.autograd.grad(loss, theta)[0].flatten())
        g = torch.stack(grads)
        brute = float((q * g.square().sum(1)).sum() - ((q[:, None] * g).sum(0)).square().sum())
        assert math.isclose(exact.kl_grad_variance(policy, ref, cfg, behavior), brute, rel_tol=1e-10), cfg.name


@pytest.mark.parametrize("V, T", [(2, 6), (3, 4)])
@pytest.mark.parametrize("off_policy", [False, True], ids=["on", "off"])
def test_markov_dp_variance_matches_enumeration_for_every_configuration(V, T, off_policy):
    policy, ref, behavior = _triple(MarkovPolicy, V, T, 19)
    behavior = behavior if off_policy else None
    for cfg in ALL_CONFIGS:
        dp = exact.kl_grad_variance(policy, ref, cfg, behavior)
        enum = exact.kl_grad_variance(policy, ref, cfg, behavior, method="enumerate")
        assert math.isclose(dp, enum, rel_tol=1e-10), (cfg.name, dp, enum)


def test_markov_dp_variance_reaches_long_sequences():
    """T = 300: variance is finite, positive, and the unbiased reward configuration's grows with T."""
    g = torch.Generator().manual_seed(5)
    policy, ref = (MarkovPolicy.random(3, 300, generator=g, scale=0.3) for _ in range(2))
    cfg = KLConfig("k1", "reward")
    short = exact.kl_grad_variance(MarkovPolicy(policy.logits[:30]), MarkovPolicy(ref.logits[:30]), cfg)
    long = exact.kl_grad_variance(policy, ref, cfg)
    assert 0 < short < long < float("inf")
    with pytest.raises(ValueError, match="enumerate"):
        exact._dp_second_moment(KLConfig(importance_weighting="sequence"), policy, ref, policy)
