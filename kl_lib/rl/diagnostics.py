"""The trainer's policy gradient as a random vector: per-batch gradients at fixed weights, and their variance.

One RL step computes g(B) = ∇_θ L(θ; B), the gradient of the trainer's loss on one batch B of
``prompts_per_step`` prompts × ``group_size`` samples. :func:`batch_gradients` computes g(B_r) for batches
B_1, …, B_n drawn at the *same* weights θ (batch r has the prompts and sampling seed of training step
``first_batch + r``), through the trainer's own code path (``kl_lib.rl.train``: :func:`rollout`, :func:`score`,
:func:`update`; the optimizer is SGD with learning rate 0 and clipping is off, so θ does not move and the
gradient is the raw, unclipped one). The batches are i.i.d., so the g(B_r) are i.i.d. draws of a random vector
with mean E g (the expected update direction) and covariance Σ. :func:`gradient_variance` estimates its total
variance

    V = tr Σ = E ‖g − E g‖²   by   V̂ = 1/(n − 1) Σ_r ‖g_r − ḡ‖²   (unbiased),

with a jackknife standard error (the leave-one-out estimates V̂_(−r) = (Q − n/(n−1)·‖g_r − ḡ‖²)/(n − 2), with
Q = Σ_r ‖g_r − ḡ‖²; SE² = (n−1)/n Σ_r (V̂_(−r) − mean)²).

Several configurations are evaluated on the *same* batches (one rollout each, then one gradient per
configuration), so that a difference V̂_a − V̂_b is paired: :func:`variance_difference` gives its jackknife
standard error from the paired leave-one-out estimates.

What it is for (issue 11, notebook 03): the RLOO baseline of the KL reward penalty. With c_i = β Σ_t k_t(i)
(sample i's detached penalty) and A^R_i the task reward's RLOO advantage, the REINFORCE coefficient of
Σ_t ∇ log π(y_{i,t}) is

    kl_reward_baseline none:  A^R_i − c_i
    kl_reward_baseline loo:   A^R_i − (c_i − b_i),   b_i = mean_{j≠i in i's group} c_j   (the paper's form).

b_i depends only on the other samples of the group, which are independent of y_i given the prompt, so
E[b_i ∇ log π(y_i)] = E[b_i] · E[∇ log π(y_i) | x] = 0: **both forms have the same mean gradient**. They differ in
variance: without the baseline the common level of the penalty (≈ β × the sequence KL, a sum over every token of
the answer) multiplies a zero-mean score function and adds noise that grows with its square. At the reference
(θ = θ_ref) k1's penalty is exactly 0 (the trainer makes the two log-probs bitwise equal), so the two forms give
identical gradients there; they separate once the policy has moved.

Only one on-policy REINFORCE update per batch is measured (one gradient per batch); full fine-tuning only.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from kl_lib.rl import distributed
from kl_lib.rl.config import RLConfig
from kl_lib.rl.train import Trainer, build_models, resolve_device, rollout, score, update
from kl_lib.tasks import get_task

__all__ = ["SAMPLING_FIELDS", "batch_gradients", "gradient_variance", "variance_difference"]

SAMPLING_FIELDS = ("model", "chat_template", "task", "data_dir", "seed", "prompts_per_step", "group_size",
                   "max_new_tokens", "temperature", "rollout_shards", "device", "dtype")
"""Fields that decide the batches; configurations measured together must agree on them."""


def _check_configs(configs: Sequence[RLConfig], batches: int) -> None:
    """Clear errors before any compute: what :func:`batch_gradients` can measure."""
    if not configs:
        raise ValueError("batch_gradients needs at least one RLConfig")
    if not isinstance(batches, int) or batches < 3:
        raise ValueError(f"batches={batches!r}: need an integer ≥ 3 (the jackknife of the variance needs 3)")
    first = configs[0]
    for cfg in configs:
        differ = [f for f in SAMPLING_FIELDS if getattr(cfg, f) != getattr(first, f)]
        if differ:
            raise ValueError(f"configs measured on the same batches must agree on {differ} ({cfg.run_name()} vs "
                             f"{first.run_name()}); measure them in separate calls")
        if (cfg.async_lag or cfg.policy_loss != "reinforce" or cfg.ppo_epochs != 1 or cfg.ppo_minibatches != 1
                or cfg.finetune != "full" or cfg.rollout_backend != "transformers"):
            raise ValueError(f"{cfg.run_name()}: batch_gradients measures one on-policy REINFORCE update of a full "
                             "fine-tuning run (async_lag 0, policy_loss reinforce, one epoch and minibatch, finetune "
                             "full, rollout_backend transformers)")


def _trainer(cfg: RLConfig, policy: torch.nn.Module, ref: torch.nn.Module, tokenizer, device: torch.device,
             autocast_dtype: torch.dtype | None) -> Trainer:
    """A :class:`Trainer` without a run directory whose update leaves the weights as they are (SGD, lr 0)."""
    task = get_task(cfg.task)
    ddp = distributed.Dist()
    shards = distributed.split(cfg.prompts_per_step, ddp, cfg.rollout_shards)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    return Trainer(cfg, task, task.load_split("rl_train", cfg.data_dir or None), ddp, shards, Path("."), "", "",
                   contextlib.nullcontext(), device, autocast_dtype, tokenizer, policy, ref, None, None, trainable,
                   torch.optim.SGD(trainable, lr=0.0), deque(maxlen=1), len(shards) > 1, False)


def batch_gradients(configs: Sequence[RLConfig], batches: int, policy: torch.nn.Module | None = None,
                    first_batch: int = 0) -> Tensor:
    """``(len(configs), batches, P)`` float32: the raw gradient of each configuration's loss on each batch.

    The reference is ``configs[0].model``; the weights the gradients are taken at are that model's, or a copy
    of ``policy`` (e.g. ``kl_lib.rl.checkpoints.load_checkpoint_model`` of a run's checkpoint), which is not
    modified. Batch r is the batch of training step ``first_batch + r`` (its prompts and sampling seed, from
    each config's ``seed``). P counts the trainable parameters, in ``policy.parameters()`` order.
    """
    _check_configs(configs, batches)
    cfgs = [dataclasses.replace(c, max_grad_norm=0.0) for c in configs]
    device, autocast_dtype = resolve_device(cfgs[0])
    tokenizer, base, ref, _ = build_models(cfgs[0], device)
    if policy is not None:
        base = copy.deepcopy(policy).to(device=device, dtype=torch.float32).train()
        base.requires_grad_(True)
    trainers = [_trainer(c, base, ref, tokenizer, device, autocast_dtype) for c in cfgs]
    size = sum(p.numel() for p in trainers[0].trainable)
    out = torch.zeros(len(cfgs), batches, size)
    for r in range(batches):
        batch = rollout(trainers[0], first_batch + r)
        if isinstance(batch, str):
            raise RuntimeError(f"batch {r}: {batch}")
        for c, tr in enumerate(trainers):
            rewards, advantages = score(tr, batch)
            upd = update(tr, batch, advantages, first_batch + r)
            if upd.diverged is not None:
                raise RuntimeError(f"{tr.cfg.run_name()}, batch {r}: the gradient is not finite ({upd.diverged})")
            out[c, r] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float().cpu()
                                   for p in tr.trainable])
    return out


def _leave_one_out(grads: Tensor) -> tuple[float, Tensor]:
    """``(V̂, V̂_(−r) for each r)`` of ``grads`` ``(n, P)``, in float64 (module docstring)."""
    if grads.ndim != 2 or grads.shape[0] < 3:
        raise ValueError(f"need gradients of shape (n ≥ 3, P), got {tuple(grads.shape)}")
    g = grads.double()
    n = g.shape[0]
    sq = ((g - g.mean(0)) ** 2).sum(1)  # (n,) ‖g_r − ḡ‖²
    total = sq.sum()
    return float(total / (n - 1)), (total - sq * n / (n - 1)) / (n - 2)


def _jackknife_se(leave_one_out: Tensor) -> float:
    n = leave_one_out.shape[0]
    return float(((n - 1) / n * ((leave_one_out - leave_one_out.mean()) ** 2).sum()).sqrt())


def gradient_variance(grads: Tensor) -> tuple[float, float]:
    """``(V̂, SE)``: the unbiased total variance tr Σ of the rows of ``grads`` ``(n, P)`` and its jackknife
    standard error (module docstring)."""
    value, loo = _leave_one_out(grads)
    return value, _jackknife_se(loo)


def variance_difference(grads_a: Tensor, grads_b: Tensor) -> tuple[float, float]:
    """``(V̂_a − V̂_b, SE)`` for gradients of two configurations on the same n batches (rows paired), with the
    jackknife standard error of the paired difference."""
    if grads_a.shape != grads_b.shape:
        raise ValueError(f"paired gradients must have the same shape, got {tuple(grads_a.shape)} and "
                         f"{tuple(grads_b.shape)}")
    va, loo_a = _leave_one_out(grads_a)
    vb, loo_b = _leave_one_out(grads_b)
    return va - vb, _jackknife_se(loo_a - loo_b)
