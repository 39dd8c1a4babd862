"""kl_lib.rl.diagnostics: per-batch policy gradients through the trainer's code path, and their variance.

Checked: the variance and its jackknife error against direct computations; the gradients against the trainer's
own (the norm it logs at step 0); the weights left untouched; and the RLOO baseline of the KL reward penalty
(``kl_reward_baseline: loo`` vs ``none``): identical at the reference, the same mean gradient within its Monte
Carlo error once the policy has moved, and a measurable variance difference."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from kl_lib.lm.models import load_model
from kl_lib.rl.checkpoints import load_checkpoint_model
from kl_lib.rl.config import RLConfig
from kl_lib.rl.diagnostics import batch_gradients, gradient_variance, variance_difference
from kl_lib.rl.train import train


def _config(tiny, tmp_path, **kw) -> RLConfig:
    root, model_dir = tiny
    fields = dict(model=str(model_dir), data_dir=str(root / "data"), seed=0, steps=1, prompts_per_step=4,
                  group_size=3, max_new_tokens=6, runs_dir=str(tmp_path / "runs"), device="cpu", lr=1e-3)
    fields.update(kw)
    return RLConfig(**fields)


def _moved(model_dir, scale: float = 0.3) -> torch.nn.Module:
    """The model with Gaussian noise of ``scale`` added to every weight: a policy away from its reference."""
    model = load_model(str(model_dir), device="cpu", dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return model


def test_variance_and_jackknife_match_direct_computation() -> None:
    rng = np.random.default_rng(0)
    g = rng.normal(size=(12, 7)) * rng.uniform(0.5, 3, size=7) + rng.normal(size=7)
    value, se = gradient_variance(torch.tensor(g, dtype=torch.float32))
    assert value == pytest.approx(g.var(axis=0, ddof=1).sum(), rel=1e-6)
    loo = np.array([np.delete(g, r, axis=0).var(axis=0, ddof=1).sum() for r in range(len(g))])
    assert se == pytest.approx(np.sqrt((len(g) - 1) / len(g) * ((loo - loo.mean()) ** 2).sum()), rel=1e-5)
    assert value >= 0 and se >= 0
    h = g + rng.normal(size=g.shape)
    diff, diff_se = variance_difference(torch.tensor(g), torch.tensor(h))
    assert diff == pytest.approx(g.var(axis=0, ddof=1).sum() - h.var(axis=0, ddof=1).sum(), rel=1e-9)
    loo_h = np.array([np.delete(h, r, axis=0).var(axis=0, ddof=1).sum() for r in range(len(h))])
    d = loo - loo_h
    assert diff_se == pytest.approx(np.sqrt((len(g) - 1) / len(g) * ((d - d.mean()) ** 2).sum()), rel=1e-6)
    assert gradient_variance(torch.ones(5, 3))[0] == 0.0  # identical rows: no variance


def test_bad_input_is_refused_before_compute(tiny, tmp_path) -> None:
    cfg = _config(tiny, tmp_path)
    with pytest.raises(ValueError, match="≥ 3"):
        batch_gradients([cfg], 2)
    with pytest.raises(ValueError, match="agree on"):
        batch_gradients([cfg, _config(tiny, tmp_path, group_size=2)], 4)
    with pytest.raises(ValueError, match="on-policy REINFORCE"):
        batch_gradients([_config(tiny, tmp_path, policy_loss="ppo")], 4)
    with pytest.raises(ValueError, match="shape"):
        variance_difference(torch.zeros(4, 2), torch.zeros(5, 2))


def test_gradient_is_the_trainers_and_weights_do_not_move(tiny, tmp_path, one_thread) -> None:
    # k1 in the loss: Σ_t ∇ log π(y_t) per sample, non-zero on every batch (0 only in expectation)
    cfg = _config(tiny, tmp_path, kl={"estimator": "k1", "placement": "loss", "beta": 1.0})
    policy = _moved(tiny[1], 0.1)
    before = [p.detach().clone() for p in policy.parameters()]
    grads = batch_gradients([cfg], 3, policy=policy)
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters())), "the given policy is not modified"
    assert grads.shape[:2] == (1, 3) and grads.shape[2] == sum(p.numel() for p in policy.parameters())
    # the trainer's step 1 (the policy of its checkpoint after one update, batch 1) logs the same gradient norm
    run = train(dataclasses.replace(cfg, steps=2, checkpoint_every=1, keep_checkpoints=2), progress=False)
    logged = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    step1, _ = load_checkpoint_model(run.run_dir, run.run_dir / "checkpoints" / "step_000001")
    grads = batch_gradients([cfg], 3, policy=step1, first_batch=1)
    assert float(grads[0, 0].norm()) == pytest.approx(logged[1]["grad/norm"], rel=1e-4)
    assert logged[1]["grad/norm"] > 0 and not torch.equal(grads[0, 0], grads[0, 1]), "batches differ"


def test_kl_reward_baseline_same_mean_different_variance(tiny, tmp_path, one_thread) -> None:
    kl = {"estimator": "k1", "placement": "reward", "beta": 1.0}
    loo, none = (_config(tiny, tmp_path, kl=kl, kl_reward_baseline=b) for b in ("loo", "none"))
    at_ref = batch_gradients([loo, none], 3)
    assert torch.equal(at_ref[0], at_ref[1]), "k1's penalty is exactly 0 at the reference: the forms coincide"

    n = 120
    g_loo, g_none = batch_gradients([loo, none], n, policy=_moved(tiny[1]))
    # both forms are unbiased: d = g_loo − g_none has mean 0, so n‖d̄‖² / tr Σ̂_d (whose expectation is then
    # tr Σ_d / tr Σ_d = 1 over i.i.d. batches) stays near 1 (the sum of many squared standardised coordinates)
    d = (g_loo - g_none).double()
    assert float(n * d.mean(0).pow(2).sum() / gradient_variance(d)[0]) < 3.0, "same expected gradient"
    diff, se = variance_difference(g_none, g_loo)
    assert diff > 3 * se > 0, f"the un-baselined penalty adds variance here: {diff:.4g} ± {se:.4g}"
