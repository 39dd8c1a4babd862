"""objectives: the vectorised loss term against a plain per-token loop written from docs/contract.md §3; padding
that contributes exactly nothing; clear errors for bad shapes, masks and empty batches."""

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
    pick = lambda x: x.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    weights = torch.rand(B, generator=g, dtype=torch.float64)
    return logits, logprobs, ref_logprobs, pick(logprobs), pick(ref_logprobs), pick(behavior_logprobs), mask, weights


def _loop_loss(cfg, logp, ref_logp, behavior_logp, mask, weights, logprobs, ref_logprobs):
    """docs/contract.md §3 written token by token, as a reader would."""
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


def test_sequence_weights_are_one_on_policy():
    """On-policy, sequence weighting reproduces the unweighted value and gradient."""
    logits, _, _, logp, ref_logp, _, mask, weights = _batch()
    for est, placement in itertools.product(["k1", "k3"], PLACEMENTS):
        plain, _ = objectives.kl_term(KLConfig(est, placement), logp, ref_logp, mask, weights=weights)
        weighted, _ = objectives.kl_term(KLConfig(est, placement, importance_weighting="sequence"), logp, ref_logp,
                                         mask, weights=weights)
        torch.testing.assert_close(plain, weighted)
        torch.testing.assert_close(torch.autograd.grad(plain, logits, retain_graph=True)[0],
                                   torch.autograd.grad(weighted, logits, retain_graph=True)[0])


def test_token_weights_are_one_in_value_but_add_the_score_term_in_the_loss():
    """On-policy ω_t = 1 in value, but ∇(ω_t k_t) = k_t ∇logp_t + ∇k_t: the loss placement gains the per-token
    score-function term (which is why token-weighted k1/k3 in the loss target M, docs/contract.md §4)."""
    logits, _, _, logp, ref_logp, _, mask, weights = _batch()
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


FULL_PRODUCT = [
    KLConfig(e, p, beta=0.7, reward_to_go=rtg, importance_weighting=w, log_ratio_clamp=clamp)
    for e, p, w, rtg, clamp in itertools.product(ESTIMATORS, PLACEMENTS, IMPORTANCE_WEIGHTINGS, (False, True),
                                                 (None, 0.5))
    if not (rtg and p == "loss") and not (clamp is not None and ESTIMATORS[e].full_distribution)
]
GARBAGE = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf, "+1e4": 1e4, "-1e4": -1e4}
_NAMES = ("logp", "ref_logp", "behavior_logp", "logprobs", "ref_logprobs")


def _inputs(mask: torch.Tensor, garbage: float | None, seed: int = 3) -> dict[str, torch.Tensor]:
    """Independent float64 leaves; masked positions (whole vocabulary rows for the full log-probs) hold
    ``garbage`` in π_θ's log-probs and ``−garbage`` in π_ref's and μ's (so finite garbage is an extreme log-ratio,
    ±2e4), or, for None, ordinary random log-probabilities. Valid positions are the same either way."""
    g = torch.Generator().manual_seed(seed)
    full = [torch.log_softmax(2 * torch.randn(B, T, V, generator=g, dtype=torch.float64), -1) for _ in range(3)]
    tokens = torch.randint(V, (B, T), generator=g)
    values = [f.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) for f in full] + full[:2]
    if garbage is not None:
        signs = (1, -1, -1, 1, -1)  # logp, ref_logp, behavior_logp, logprobs, ref_logprobs
        values = [torch.where(mask if x.dim() == 2 else mask.unsqueeze(-1), x, sign * garbage)
                  for x, sign in zip(values, signs)]
    return {name: x.clone().requires_grad_() for name, x in zip(_NAMES, values)}


def _run(cfg, x, mask, off_policy, aggregation, weights):
    """kl_term's loss, metrics and gradients w.r.t. every input (None where it does not depend on one)."""
    loss, metrics = objectives.kl_term(cfg, x["logp"], x["ref_logp"], mask,
                                       behavior_logp=x["behavior_logp"] if off_policy else None,
                                       logprobs=x["logprobs"], ref_logprobs=x["ref_logprobs"], weights=weights,
                                       aggregation=aggregation)
    grads = torch.autograd.grad(loss, list(x.values()), allow_unused=True)
    return loss, metrics, dict(zip(_NAMES, grads))


def _same(a, b) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


# ragged sequences, one without any valid token
_MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("garbage", GARBAGE, ids=str)
def test_masked_positions_change_no_value_and_no_gradient_bit(garbage, one_thread):
    """NaN, ±inf or ±1e4 log-ratios at masked positions give exactly (torch.equal) the loss, metrics and
    gradients of benign values there, for the full product of configurations, and the gradient there is 0."""
    clean, dirty = _inputs(_MASK, None), _inputs(_MASK, GARBAGE[garbage])
    weights = torch.rand(B, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for cfg, off_policy, aggregation, w in itertools.product(FULL_PRODUCT, (False, True), objectives.AGGREGATIONS,
                                                             (None, weights)):
        case = (cfg.name, off_policy, aggregation, w is None)
        loss, metrics, grads = _run(cfg, clean, _MASK, off_policy, aggregation, w)
        dirty_loss, dirty_metrics, dirty_grads = _run(cfg, dirty, _MASK, off_policy, aggregation, w)
        assert torch.isfinite(loss) and torch.equal(loss, dirty_loss), case
        assert metrics.keys() == dirty_metrics.keys() and all(
            torch.equal(metrics[key], dirty_metrics[key]) for key in metrics), case
        assert all(_same(grads[name], dirty_grads[name]) for name in _NAMES), case
        for name, grad in dirty_grads.items():
            if grad is not None:
                at_mask = grad[~_MASK]
                assert torch.equal(at_mask, torch.zeros_like(at_mask)), (case, name)


@pytest.mark.parametrize("garbage", GARBAGE, ids=str)
def test_per_sequence_loss_and_metrics_ignore_masked_positions(garbage):
    clean, dirty = _inputs(_MASK, None), _inputs(_MASK, GARBAGE[garbage])
    for cfg in FULL_PRODUCT:
        per_seq = [objectives.per_sequence_loss(cfg, x["logp"], x["ref_logp"], _MASK, behavior_logp=x["behavior_logp"],
                                                logprobs=x["logprobs"], ref_logprobs=x["ref_logprobs"])
                   for x in (clean, dirty)]
        assert torch.equal(*per_seq), cfg.name
        grads = [torch.autograd.grad(p.sum(), [x["logp"], x["logprobs"]], allow_unused=True)
                 for p, x in zip(per_seq, (clean, dirty))]
        assert all(_same(a, b) for a, b in zip(*grads)), cfg.name
        k = [objectives.estimate(cfg, x["logp"], x["ref_logp"], _MASK, x["logprobs"], x["ref_logprobs"])[0]
             for x in (clean, dirty)]
        assert torch.equal(*k), cfg.name
    metrics = [objectives.kl_metrics(x["logp"], x["ref_logp"], _MASK, logprobs=x["logprobs"],
                                     ref_logprobs=x["ref_logprobs"]) for x in (clean, dirty)]
    assert all(torch.equal(metrics[0][key], metrics[1][key]) for key in metrics[0])


def test_a_zero_one_mask_of_any_dtype_is_the_bool_mask():
    x = _inputs(_MASK, math.nan)
    cfg = KLConfig("k3", "both", importance_weighting="token", log_ratio_clamp=0.5)
    reference = _run(cfg, x, _MASK, True, "token_mean", None)
    for dtype in (torch.float32, torch.float64, torch.int64, torch.uint8):
        loss, metrics, grads = _run(cfg, x, _MASK.to(dtype), True, "token_mean", None)
        assert torch.equal(loss, reference[0]) and all(torch.equal(metrics[k], reference[1][k]) for k in metrics)
        assert all(_same(grads[name], reference[2][name]) for name in _NAMES)


def test_an_all_padding_batch_is_loss_zero_not_an_error():
    """Padding contributes nothing, so a batch of padding only (a micro-batch or metric chunk can be one) gives
    loss 0, gradient 0 and metrics 0, whatever its positions hold."""
    none_valid = torch.zeros(B, T, dtype=torch.bool)
    x = _inputs(none_valid, math.nan)
    for cfg, aggregation in itertools.product(FULL_PRODUCT, objectives.AGGREGATIONS):
        loss, metrics, grads = _run(cfg, x, none_valid, True, aggregation, None)
        assert torch.equal(loss, torch.zeros((), dtype=torch.float64)), cfg.name
        assert all(float(v) == 0.0 for v in metrics.values()), (cfg.name, metrics)
        assert all(g is None or not g.any() for g in grads.values()), cfg.name


def test_token_mean_is_finite_for_a_sequence_without_valid_tokens():
    x = _inputs(_MASK, None)
    cfg = KLConfig("k3", "both")
    per_seq = objectives.per_sequence_loss(cfg, x["logp"], x["ref_logp"], _MASK)
    loss, _ = objectives.kl_term(cfg, x["logp"], x["ref_logp"], _MASK, aggregation="token_mean")
    assert per_seq[2] == 0
    torch.testing.assert_close(loss, (per_seq / _MASK.sum(-1).clamp_min(1)).mean(), rtol=1e-14, atol=0)


@pytest.mark.parametrize("shape", [(0, T), (B, 0)], ids=["B=0", "T=0"])
def test_an_empty_batch_is_a_clear_error(shape):
    empty = torch.zeros(shape, dtype=torch.float64)
    for call in (lambda: objectives.kl_term(KLConfig(), empty, empty),
                 lambda: objectives.per_sequence_loss(KLConfig(), empty, empty),
                 lambda: objectives.kl_metrics(empty, empty)):
        with pytest.raises(ValueError, match=r"empty batch: logp has shape"):
            call()


def test_shapes_are_checked_with_messages_naming_the_tensors():
    x = {name: t.detach() for name, t in _inputs(_MASK, None).items()}
    logp, ref_logp, logprobs, ref_logprobs = x["logp"], x["ref_logp"], x["logprobs"], x["ref_logprobs"]
    analytic_cfg = KLConfig("analytic", "loss")
    with pytest.raises(ValueError, match=r"logp has shape \(20,\); expected \(B, T\)"):
        objectives.kl_term(KLConfig(), logp.reshape(-1), ref_logp.reshape(-1))
    with pytest.raises(ValueError, match=r"ref_logp has shape \(4, 1\) but logp has \(4, 5\)"):
        objectives.kl_term(KLConfig(), logp, ref_logp[:, :1])  # would broadcast
    with pytest.raises(ValueError, match=r"logprobs has shape \(4, 1, 6\) but logp has \(4, 5\)"):
        objectives.kl_term(analytic_cfg, logp, ref_logp, logprobs=logprobs[:, :1], ref_logprobs=ref_logprobs)
    with pytest.raises(ValueError, match=r"ref_logprobs has shape \(4, 1, 6\)"):
        objectives.kl_term(analytic_cfg, logp, ref_logp, logprobs=logprobs, ref_logprobs=ref_logprobs[:, :1])
    with pytest.raises(ValueError, match=r"ref_logprobs has shape \(5, 6\)"):
        objectives.kl_metrics(logp, ref_logp, logprobs=logprobs, ref_logprobs=ref_logprobs[0])
    with pytest.raises(ValueError, match="same vocabulary"):
        objectives.kl_term(analytic_cfg, logp, ref_logp, logprobs=logprobs, ref_logprobs=ref_logprobs[..., :3])
    with pytest.raises(ValueError, match=r"mask has shape \(4, 1\)"):
        objectives.estimate(KLConfig(), logp, ref_logp, _MASK[:, :1])
    with pytest.raises(ValueError, match=r"behavior_logp has shape \(1, 5\)"):
        objectives.per_sequence_loss(KLConfig(), logp, ref_logp, behavior_logp=ref_logp[:1])
    for bad in (_MASK * 2, _MASK * 0.5, torch.where(_MASK, 1.0, math.nan)):
        with pytest.raises(ValueError, match="values other than 0 and 1"):
            objectives.kl_term(KLConfig(), logp, ref_logp, bad)
