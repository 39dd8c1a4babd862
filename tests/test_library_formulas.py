"""Each library's per-token KL, written here from its documented semantics, against kl_lib on random tensors.

Formulas (docs/libraries.md, kl_lib/audit/registry.py): verl k3 = clamp(exp(c) − c − 1, ±10) with c = clamp(ref − logp,
±20), '+' = k2's gradient under the value; OpenRLHF every value clamped to ±10; NeMo-RL weight exp(logp − sg logp),
detached where |δ| > 20, value clamps; TRL k3 × exp(mean log ratio) at sequence level. Inputs include extreme
log-ratios (±30, −100) and masks with gaps; values and gradients must agree.
"""

import pytest
import torch

from kl_lib import objectives
from kl_lib.config import KLSetting

B, T = 5, 9


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    ref[0, :4] = torch.tensor([-30.0, 30.0, -100.0, 25.0], dtype=torch.float64) + logp[0, :4]  # extreme log-ratios
    ref[1, 2] = logp[1, 2] + 3.0  # k3 value clamp binds (δ = −3 < −2.61)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[2, 3:6] = False  # a gap inside a sequence
    mask[2, 0] = mask[2, 8] = True
    return logp, ref, mask


def _grads(per_token_fn, setting, logp, ref, mask, aggregation="sum"):
    x1 = logp.clone().requires_grad_()
    mine = (per_token_fn(x1, ref) * mask).sum(-1).mean() if aggregation == "sum" else None
    (g_mine,) = torch.autograd.grad(mine, x1)
    x2 = logp.clone().requires_grad_()
    loss, _ = objectives.kl_term(setting, x2, ref, mask)
    (g_lib,) = torch.autograd.grad(loss, x2)
    return mine.detach(), loss.detach(), g_mine, g_lib


def verl_k3(logp, ref):
    c = (ref - logp).clamp(-20, 20)
    return (c.exp() - c - 1).clamp(-10, 10)


def verl_plus(forward):
    def fn(logp, ref):
        backward = 0.5 * (logp - ref) ** 2
        return backward - backward.detach() + forward(logp, ref).detach()
    return fn


def openrlhf(estimator):
    def fn(logp, ref):
        d = logp - ref
        value = {"k1": d, "k2": d**2 / 2, "k3": (-d.clamp(min=-10)).exp() - 1 + d.clamp(min=-10)}[estimator]
        return value.clamp(-10, 10)
    return fn


def nemo_k3(logp, ref):
    d = logp - ref
    clipped = d.abs() > 20
    dc = d.clamp(-20, 20)
    value = ((-dc).exp() - 1 + dc).clamp(-10, 10)
    w = (logp - logp.detach()).exp()
    return torch.where(clipped, w.detach(), w) * value


def trl_sequence(mask):
    def fn(logp, ref):
        k3 = (ref - logp).exp() - (ref - logp) - 1
        log_w = ((logp - logp.detach()) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        return k3 * log_w.exp()
    return fn


CASES = {
    "verl k3 (low_var_kl)": (verl_k3, KLSetting("k3", "loss", log_ratio_clamp=20.0, value_clamp=10.0)),
    "verl k3+": (verl_plus(verl_k3), KLSetting("k3", "loss", log_ratio_clamp=20.0, value_clamp=10.0,
                                               gradient_estimator="k2")),
    "verl k1+": (verl_plus(lambda lp, r: lp - r), KLSetting("k1", "loss", gradient_estimator="k2")),
    "verl abs": (lambda lp, r: (lp - r).abs(), KLSetting("abs", "loss")),
    "openrlhf k1": (openrlhf("k1"), KLSetting("k1", "loss", value_clamp=10.0)),
    "openrlhf k2": (openrlhf("k2"), KLSetting("k2", "loss", value_clamp=10.0)),
    "openrlhf k3": (openrlhf("k3"), KLSetting("k3", "loss", value_clamp=10.0)),
    "nemo-rl k3": (nemo_k3, KLSetting("k3", "loss", importance_weighting="token", token_weight="detached_where_clamped",
                                      log_ratio_clamp=20.0, value_clamp=10.0)),
    "trl k3 + token bias correction": (lambda lp, r: ((r - lp).exp() - (r - lp) - 1) * (lp - lp.detach()).exp(),
                                       KLSetting("k3", "loss", importance_weighting="token")),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(CASES))
def test_library_per_token_formula_matches_kl_lib(name, seed):
    fn, setting = CASES[name]
    logp, ref, mask = _inputs(seed)
    mine, lib, g_mine, g_lib = _grads(fn, setting, logp, ref, mask)
    torch.testing.assert_close(lib, mine, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_lib, g_mine, rtol=1e-12, atol=1e-12)
    assert torch.all(g_lib[~mask] == 0)


def test_trl_sequence_level_weight_matches_kl_lib():
    logp, ref, mask = _inputs(3)
    ref = torch.where(ref - logp < -20, logp - 5, ref)  # TRL does not clamp: keep exp finite
    setting = KLSetting("k3", "loss", importance_weighting="sequence", sequence_weight="geometric_mean")
    mine, lib, g_mine, g_lib = _grads(trl_sequence(mask), setting, logp, ref, mask)
    torch.testing.assert_close(lib, mine, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_lib, g_mine, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("std", [True, False])
def test_grpo_group_normalised_penalty_matches_verl_semantics(std):
    """verl GRPO with use_kl_in_reward: scores = Σ_t(−β k1_t); A = (s − mean)/(std + 1e-6); loss = −A Σ_t logp."""
    logp, ref, mask = _inputs(4)
    logp, ref, mask = logp[:4].repeat(2, 1), ref[:4].repeat(2, 1), mask[:4].repeat(2, 1)  # B = 8, G = 4
    beta = 0.3
    x1 = logp.clone().requires_grad_()
    scores = (-beta * (x1 - ref).detach() * mask).sum(-1).view(-1, 4)
    adv = scores - scores.mean(-1, keepdim=True)
    adv = adv / (scores.std(-1, keepdim=True) + 1e-6) if std else adv
    mine = (-adv.reshape(-1, 1) * x1 * mask).sum(-1).mean()
    (g_mine,) = torch.autograd.grad(mine, x1)
    setting = KLSetting("k1", "reward", beta=beta, reward_normalization="group_std" if std else "group_mean",
                        group_size=4)
    x2 = logp.clone().requires_grad_()
    loss, _ = objectives.kl_term(setting, x2, ref, mask)
    (g_lib,) = torch.autograd.grad(loss, x2)
    torch.testing.assert_close(g_lib, g_mine, rtol=1e-10, atol=1e-12)


def test_local_penalty_and_aggregations():
    logp, ref, mask = _inputs(5)
    m = mask.double()
    x = logp.clone().requires_grad_()
    k = (x - ref).detach()
    per_token = k * x * m  # local penalty: c_t = k_t
    expected = {"sum": per_token.sum(-1).mean(), "token_mean": (per_token.sum(-1) / m.sum(-1).clamp(min=1)).mean(),
                "global_token_mean": per_token.sum() / m.sum(), "constant": per_token.sum(-1).mean() / 7.0}
    for aggregation, value in expected.items():
        loss, _ = objectives.kl_term(KLSetting("k1", "reward", local_reward=True), logp.clone().requires_grad_(), ref,
                                     mask, aggregation=aggregation,
                                     aggregation_constant=7.0 if aggregation == "constant" else None)
        torch.testing.assert_close(loss, value.detach(), rtol=1e-12, atol=1e-12)


def test_value_clip_fraction_metric():
    logp, ref, mask = _inputs(0)
    _, metrics = objectives.kl_term(KLSetting("k3", "loss", value_clamp=10.0), logp, ref, mask)
    k3 = torch.expm1(ref - logp) + (logp - ref)
    expected = ((k3.abs() > 10) & mask).sum() / mask.sum()
    torch.testing.assert_close(metrics["kl/value_clip_fraction"], expected.double())
