"""objectives: the vectorised loss term against a plain per-token loop written from DESIGN.md §3."""

import itertools
import math

import pytest
import torch

from kl_lib import objectives
from kl_lib.config import IMPORTANCE_WEIGHTINGS, PLACEMENTS, KLConfig
from kl_lib.estimators import ESTIMATORS

B, T, V = 4, 5, 6


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    logprobs = torch.log_softmax(logits, -1)
    ref_logprobs = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    behavior_logprobs = torch.log_softmax(torch.randn(B, T, V, generator=g, dtype=torch.float64), -1)
    tokens = torch.randint(V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False  # ragged sequences
    mask[3, 1:] = False
    pick = lambda x: x.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    weights = torch.rand(B, generator=g, dtype=torch.float64)
    return logits, logprobs, ref_logprobs, pick(logprobs), pick(ref_logprobs), pick(behavior_logprobs), mask, weights


def _loop_loss(cfg, logp, ref_logp, behavior_logp, mask, weights, logprobs, ref_logprobs):
    """DESIGN.md §3 written token by token, as a reader would."""
    total = 0.0
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t]]
        k = {}
        for t in valid:
            delta = logp[b, t] - ref_logp[b, t]
            k[t] = {"k1": delta, "k2": 0.5 * delta**2, "k3": torch.exp(-delta) - 1 + delta}.get(cfg.estimator)
            if cfg.estimator == "analytic":
                k[t] = (logprobs[b, t].exp() * (logprobs[b, t] - ref_logprobs[b, t])).sum()
        omega = {t: torch.ones((), dtype=torch.float64) * torch.exp(logp[b, t] - logp[b, t].detach())
                 if behavior_logp is None else torch.exp(logp[b, t] - behavior_logp[b, t]) for t in valid}
        seq = 0.0
        for t in valid:
            if cfg.in_reward:
                c = sum(k[s].detach() for s in valid if (s >= t or not cfg.reward_to_go))
                u = omega[t] if cfg.importance_weighting == "token" else logp[b, t]
                seq = seq + c * u
            if cfg.in_loss:
                v = omega[t] if cfg.importance_weighting == "token" else 1.0
                seq = seq + v * k[t]
        if cfg.importance_weighting == "sequence" and behavior_logp is not None:
            seq = seq * math.prod(float(omega[t].detach()) for t in valid)
        total = total + weights[b] * cfg.beta * seq
    return total


ALL_CONFIGS = [
    KLConfig(e, p, beta=0.7, reward_to_go=rtg, importance_weighting=w)
    for e, p, w, rtg in itertools.product(ESTIMATORS, PLACEMENTS, IMPORTANCE_WEIGHTINGS, (False, True))
    if not (rtg and p == "loss")
]


@pytest.mark.parametrize("cfg", ALL_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("off_policy", [False, True], ids=["on", "off"])
def test_vectorised_loss_and_gradient_match_the_loop(cfg, off_policy):
    logits, logprobs, ref_logprobs, logp, ref_logp, behavior_logp, mask, weights = _batch()
    behavior = behavior_logp if off_policy else None
    loss, metrics = objectives.kl_term(cfg, logp, ref_logp, mask, behavior_logp=behavior, logprobs=logprobs,
                                       ref_logprobs=ref_logprobs, weights=weights)
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    expected = _loop_loss(cfg, logp, ref_logp, behavior, mask, weights, logprobs, ref_logprobs)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(metrics["kl/term"], loss.detach())


def test_padding_never_leaks_into_loss_or_gradient():
    """Garbage (even inf/NaN) at masked positions changes nothing."""
    logits, logprobs, ref_logprobs, logp, ref_logp, behavior_logp, mask, weights = _batch()
    cfg = KLConfig("k3", "both", importance_weighting="token")
    clean, _ = objectives.kl_term(cfg, logp, ref_logp, mask, behavior_logp=behavior_logp, weights=weights)
    (clean_grad,) = torch.autograd.grad(clean, logits, retain_graph=True)
    junk = torch.where(mask, torch.zeros_like(ref_logp), torch.full_like(ref_logp, 1e4))
    dirty, _ = objectives.kl_term(cfg, logp + 0 * junk, ref_logp - junk, mask, behavior_logp=behavior_logp + junk,
                                  weights=weights)
    (dirty_grad,) = torch.autograd.grad(dirty, logits)
    torch.testing.assert_close(clean, dirty)
    torch.testing.assert_close(clean_grad, dirty_grad)


def test_sequence_weights_are_one_on_policy():
    """On-policy, sequence weighting reproduces the unweighted value and gradient."""
    logits, logprobs, ref_logprobs, logp, ref_logp, _, mask, weights = _batch()
    for est, placement in itertools.product(["k1", "k3"], PLACEMENTS):
        plain, _ = objectives.kl_term(KLConfig(est, placement), logp, ref_logp, mask, weights=weights)
        weighted, _ = objectives.kl_term(KLConfig(est, placement, importance_weighting="sequence"), logp, ref_logp,
                                         mask, weights=weights)
        torch.testing.assert_close(plain, weighted)
        torch.testing.assert_close(torch.autograd.grad(plain, logits, retain_graph=True)[0],
                                   torch.autograd.grad(weighted, logits, retain_graph=True)[0])


def test_token_weights_are_one_in_value_but_add_the_score_term_in_the_loss():
    """On-policy ω_t = 1 in value, but ∇(ω_t k_t) = k_t ∇logp_t + ∇k_t: the loss placement gains the per-token
    score-function term (which is why token-weighted k1/k3 in the loss target M, DESIGN.md §4)."""
    logits, logprobs, ref_logprobs, logp, ref_logp, _, mask, weights = _batch()
    for est in ["k1", "k3"]:
        plain, _ = objectives.kl_term(KLConfig(est, "loss"), logp, ref_logp, mask, weights=weights)
        weighted, _ = objectives.kl_term(KLConfig(est, "loss", importance_weighting="token"), logp, ref_logp, mask,
                                         weights=weights)
        k, _ = objectives.estimate(KLConfig(est), logp, ref_logp, mask)
        score = (weights * (k.detach() * logp).sum(-1)).sum()
        torch.testing.assert_close(plain, weighted)
        torch.testing.assert_close(torch.autograd.grad(weighted, logits, retain_graph=True)[0],
                                   torch.autograd.grad(plain + score, logits, retain_graph=True)[0])
        reward_plain, _ = objectives.kl_term(KLConfig(est, "reward"), logp, ref_logp, mask, weights=weights)
        reward_weighted, _ = objectives.kl_term(KLConfig(est, "reward", importance_weighting="token"), logp,
                                                ref_logp, mask, weights=weights)
        torch.testing.assert_close(torch.autograd.grad(reward_plain, logits, retain_graph=True)[0],
                                   torch.autograd.grad(reward_weighted, logits, retain_graph=True)[0])


def test_token_mean_divides_each_sequence_by_its_length():
    _, _, _, logp, ref_logp, _, mask, weights = _batch()
    cfg = KLConfig("k3", "loss")
    per_seq = objectives.per_sequence_loss(cfg, logp, ref_logp, mask)
    loss, _ = objectives.kl_term(cfg, logp, ref_logp, mask, weights=weights, aggregation="token_mean")
    torch.testing.assert_close(loss, (weights * per_seq / mask.sum(-1)).sum())
    with pytest.raises(ValueError, match="aggregation"):
        objectives.kl_term(cfg, logp, ref_logp, mask, aggregation="mean")


def test_default_weights_are_the_sample_mean():
    _, _, _, logp, ref_logp, _, mask, _ = _batch()
    cfg = KLConfig("k1", "reward")
    loss, _ = objectives.kl_term(cfg, logp, ref_logp, mask)
    torch.testing.assert_close(loss, objectives.per_sequence_loss(cfg, logp, ref_logp, mask).mean())


def test_metrics_report_every_estimator_and_the_clip_fraction():
    _, logprobs, ref_logprobs, logp, ref_logp, _, mask, weights = _batch()
    _, metrics = objectives.kl_term(KLConfig("k3", "loss", log_ratio_clamp=0.5), logp, ref_logp, mask,
                                    logprobs=logprobs, ref_logprobs=ref_logprobs, weights=weights)
    assert {"kl/k1", "kl/k2", "kl/k3", "kl/analytic", "kl/term", "kl/clip_fraction"} <= set(metrics)
    delta = (logp - ref_logp).detach()
    expected_fraction = ((delta.abs() > 0.5) & mask).sum() / mask.sum()
    torch.testing.assert_close(metrics["kl/clip_fraction"], expected_fraction.double())
    k1_sum = torch.where(mask, delta, 0).sum(-1)
    torch.testing.assert_close(metrics["kl/k1"], (weights * k1_sum).sum())
    assert all(not v.requires_grad for v in metrics.values())


def test_clear_errors_for_bad_inputs():
    _, _, _, logp, ref_logp, _, mask, _ = _batch()
    with pytest.raises(ValueError, match="full next-token log-probabilities"):
        objectives.kl_term(KLConfig("analytic", "loss"), logp, ref_logp, mask)
    with pytest.raises(ValueError, match="mask"):
        objectives.kl_term(KLConfig(), logp, ref_logp, mask[:, :2])
    with pytest.raises(ValueError, match="ref_logp"):
        objectives.kl_term(KLConfig(), logp, ref_logp[:, :2], mask)
    with pytest.raises(ValueError, match="behavior_logp"):
        objectives.kl_term(KLConfig(), logp, ref_logp, mask, behavior_logp=ref_logp[:2])
    with pytest.raises(ValueError, match="weights"):
        objectives.kl_term(KLConfig(), logp, ref_logp, mask, weights=torch.ones(3))


def test_reward_to_go_coefficients():
    k = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[True, True, True, False]])
    torch.testing.assert_close(objectives.reward_coefficients(k, mask, reward_to_go=True),
                               torch.tensor([[6.0, 5.0, 3.0, 0.0]]))
    torch.testing.assert_close(objectives.reward_coefficients(k, mask), torch.tensor([[6.0, 6.0, 6.0, 6.0]]))
