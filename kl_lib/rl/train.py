"""RL fine-tuning with any KL configuration: one readable loop.

    python -m kl_lib.rl.train --config configs/base.yaml [--set kl.estimator=k3 --set kl.placement=loss ...]

:func:`train` is the loop; each step is a named function below it (the paper's on-policy RLOO by default):

1. :func:`rollout`: ``prompts_per_step`` prompts × ``group_size`` samples from the *sampler*: the current
   policy, or with ``async_lag = k`` the policy of k steps earlier (off-policy, as in asynchronous RL). For one
   on-policy REINFORCE pass over the whole batch (``rollout_grad``), the sampling forward keeps its autograd
   graph and *is* the training forward (the reference is scored in the same loop), instead of being recomputed.
   Above ``SHORT_ANSWER_TOKENS`` of answer budget (:func:`long_answers`) the trainer instead samples without
   a graph, taking finished rows out of the batch, and its forward passes skip the padding.
2. :func:`score`: R ∈ {0, 1} from the task's verifier and the advantages within each prompt's group
   (``kl_lib.rl.losses``: RLOO, GRPO or Dr. GRPO).
3. :func:`update`: ``ppo_epochs`` × ``ppo_minibatches`` AdamW updates (one for REINFORCE) of the loss (minimised)

       REINFORCE:  L_pg = −(1/N) Σ_i A_i Σ_t m_t log π(y_t)
       PPO-clip:   L_pg = −(1/N) Σ_i Σ_t m_t min(r_t A_i, clip(r_t, 1 ± ε) A_i),  r_t = π/μ
       KL:         L_kl = objectives.kl_term(config.kl, log π, log π_ref, m, behavior_logp=log μ)'s loss

   summed over tokens (no length normalisation) unless ``aggregation`` says otherwise (``token_mean``,
   ``global_token_mean`` over the update batch's valid tokens on all processes, ``constant``); gradient clipping;
   NaN/Inf or |loss| > ``divergence_loss`` marks the run diverged. With ``micro_batch_size = m`` each update
   batch of N sequences is computed in passes of m sequences (:func:`micro_pass`: forward, then backward of the
   pass's loss × m/N), so the accumulated gradient is the batch's; the reference, the loss values and the logged
   statistics are computed pass by pass too and combined into the whole batch's (sums over tokens and
   sequences, divided once). Nothing the size of the vocabulary is kept for more than one pass, except the
   reference's full log-probs, recomputed per pass by the analytic estimator when a batch is passed over more
   than once (PPO).
4. :func:`log_step`: one line of ``metrics.jsonl``: rewards, every estimator's KL of the pre-update policy on
   the whole batch (``kl/k1`` … ``kl/analytic``, each computed once per pass), entropy, losses, gradient norm,
   the clip fractions (``ppo/clip_fraction``, ``kl/clip_fraction`` when ``kl.log_ratio_clamp`` is set,
   ``kl/value_clip_fraction`` when a ``KLSetting``'s ``value_clamp`` is).
5. a checkpoint every ``checkpoint_every`` steps (``kl_lib.rl.checkpoints``), and :func:`finish`.

The reference is a frozen copy of the initial model (full fine-tuning) or, with LoRA, the same model with its
adapters disabled (no second copy in memory). Everything a run produces lives in ``runs/rl/<name>/``:
``config.json``, ``metrics.jsonl`` (one line per step, namespaced keys), ``checkpoints/``, ``summary.json``
and ``DONE`` (written last). An interrupted run resumes from its last intact checkpoint and produces the same
metrics as an uninterrupted one (seeded per step; CPU); raising ``steps`` continues a finished run. A run directory
is never deleted: one holding a run of another config is refused (or moved aside on request), one that another
process trains is refused naming it (``kl_lib.rl.checkpoints``, ``kl_lib.rl.runlock``). :class:`Hooks` let a
benchmark observe a real run.

A library's KL setting (``kl_lib.config.KLSetting``: value clamp, straight-through gradient, local or
group-normalised reward penalty, token and sequence weights) is the ``kl:`` section with its fields; it is run by
the same ``kl_term`` on each pass's rows (``reward_normalization`` over the prompt groups, which every pass holds
whole; ``kl_lib.rl.config.check_kl_setting`` refuses what cannot be run so, before any compute). Departure from
the libraries: the KL penalty's group normalisation is its own, not that of the task reward plus the penalty.

Departures from the paper: the KL reward penalty gets no baseline unless ``kl_reward_baseline: loo`` (the
paper's RLOO on the folded reward; ``kl_lib.rl.losses``; unbiased either way); the model, task and scale are
small (see ``kl_lib.tasks.arithmetic`` and ``kl_lib.tasks.worked_arithmetic``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import random
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kl_lib import objectives
from kl_lib.estimators import analytic, lookup_estimator
from kl_lib.files import environment_info, write_json, write_text
from kl_lib.lm.models import (
    add_lora,
    encode_prompts,
    load_model,
    load_tokenizer,
    model_source,
    save_model,
)
from kl_lib.lm.presets import resolve
from kl_lib.rl import distributed, vllm_backend
from kl_lib.rl.checkpoints import (
    ON_CONFLICT,
    CheckpointError,
    DiskFullError,
    RunConflictError,
    disk_errors,
    finished_summary,
    load_trainable,
    open_run_dir,
    read_metrics,
    resume_point,
    run_identity,
    save_checkpoint,
    trainable_state,
    truncate_metrics,
)
from kl_lib.rl.config import RLConfig, fields_help, load_config
from kl_lib.rl.losses import compute_advantages, kl_loss, kl_reward_loo_baseline, kl_reward_penalty, policy_loss
from kl_lib.rl.rollout import (
    Rollout,
    concat_rollouts,
    generate,
    response_logits,
    sample,
    sample_with_logits,
    sampled_logprobs,
    trimmed_response_logits,
)
from kl_lib.rl.runlock import RunLockedError, lock_holder, locked_message
from kl_lib.rl.tracking import TRACKERS, make_tracker, tracking_choice
from kl_lib.tasks import Problem, Task, get_task

__all__ = ["SHORT_ANSWER_TOKENS", "Batch", "Hooks", "RunResult", "Scores", "Trainer", "Update", "build_models",
           "finish", "forward_logits", "log_step", "long_answers", "micro_pass", "optimizer_step", "prepare",
           "reference", "reference_logprobs", "resolve_device", "resume", "rollout", "score", "train", "update"]


# ------------------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    run_dir: Path
    status: str  # "done", "diverged", "skipped", "interrupted"
    steps_completed: int
    summary: dict[str, Any]


def _nothing(*_: Any) -> None:
    return None


@dataclass(frozen=True)
class Hooks:
    """Callbacks into :func:`train` for observing a real run from outside (``benchmarks/``); no-ops by default."""

    after_setup: Callable[[Trainer], None] = _nothing
    """The models and the optimizer are built; before resuming and the first step."""
    before_rollout: Callable[[Trainer, int], None] = _nothing
    """A step begins (its number)."""
    after_rollout: Callable[[Trainer, Batch], None] = _nothing
    """The step's batch is sampled; the update follows."""
    before_checkpoint: Callable[[Trainer, int], None] = _nothing
    """Rank 0 is about to save the checkpoint after this many steps."""


def train(cfg: RLConfig, progress: bool = True, stop_after: int | None = None, hooks: Hooks = Hooks(),
          on_conflict: str = "refuse", tracker: str | None = None) -> RunResult:
    """Run (or resume, extend, or skip if already done) the configured training; returns where and how it ended.

    ``stop_after`` stops after that many steps *of this call* without finishing the run (to test resumption).
    ``on_conflict``: when the run directory holds another run, ``"refuse"`` (``RunConflictError``, nothing
    changed) or ``"move"`` it aside to ``<name>.old-<time>`` (``kl_lib.rl.checkpoints.open_run_dir``). The run
    directory is locked while this runs (``kl_lib.rl.runlock``). Under a multi-process launch
    (``kl_lib.rl.distributed``) every process calls this; rank 0 writes. ``tracker`` (default ``$KL_TRACKING``,
    else ``"none"``) mirrors each metrics row to a tracker (``kl_lib.rl.tracking``).
    """
    tracking = tracking_choice(tracker)
    tr = prepare(cfg, on_conflict)
    if isinstance(tr, RunResult):
        return tr  # finished earlier with the same identity
    with tr.lock, contextlib.closing(make_tracker(tracking if tr.ddp.is_main else "none", tr.run_dir)) as track:
        hooks.after_setup(tr)
        start_step, history = resume(tr)
        status, reason = "done", None
        bar = tqdm(range(start_step, cfg.steps), desc=cfg.run_name(), unit="step", initial=start_step,
                   total=cfg.steps, disable=not progress or not tr.ddp.is_main, mininterval=2, file=sys.stderr)
        metrics_path = tr.run_dir / "metrics.jsonl"
        for step in bar:
            t0 = time.perf_counter()
            hooks.before_rollout(tr, step)
            batch = rollout(tr, step)
            if isinstance(batch, str):  # sampling failed: the weights have blown up
                status, reason = "diverged", batch
                break
            t_generate = time.perf_counter() - t0
            hooks.after_rollout(tr, batch)
            rewards, advantages = score(tr, batch)
            t1 = time.perf_counter()
            upd = update(tr, batch, advantages, step)
            row = log_step(tr, step, batch, rewards, upd, t_generate, time.perf_counter() - t1, t0)
            if tr.ddp.is_main:
                with disk_errors(metrics_path), open(metrics_path, "a") as metrics_file:
                    metrics_file.write(json.dumps(row) + "\n")
                track.log(row)
            history.append(row)
            bar.set_postfix(reward=f"{row['reward/mean']:.2f}", kl=f"{row['kl/k1']:.3f}")
            if upd.diverged is not None:
                status, reason = "diverged", upd.diverged
                break
            done_steps = step + 1
            if tr.ddp.is_main and (done_steps % cfg.checkpoint_every == 0 or done_steps == cfg.steps):
                hooks.before_checkpoint(tr, done_steps)
                save_checkpoint(tr.run_dir, done_steps, tr.policy, tr.optimizer, tr.snapshots, tr.identity,
                                tr.lineage, cfg.keep_checkpoints)
            if stop_after is not None and done_steps - start_step >= stop_after and done_steps < cfg.steps:
                bar.close()
                tr.ddp.barrier()
                return RunResult(tr.run_dir, "interrupted", done_steps, {})
        bar.close()
        return finish(tr, history, status, reason)


# ------------------------------------------------------------------------------------------------------------
# Set-up: inputs checked, run directory, models, resumption
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Trainer:
    """What a run holds from step to step."""

    cfg: RLConfig
    task: Task
    problems: list[Problem]  # the rl_train split prompts are drawn from
    ddp: distributed.Dist
    shards: list[tuple[int, int]]  # this rank's [start, stop) prompt ranges, each a rollout shard with its seed
    run_dir: Path
    identity: str  # checkpoints.run_identity
    lineage: str  # the identity with steps=1: what a checkpoint must match to be resumed (or extended)
    lock: contextlib.AbstractContextManager  # the run directory's RunLock on rank 0
    device: torch.device
    autocast_dtype: torch.dtype | None
    tokenizer: Any
    policy: torch.nn.Module
    ref: torch.nn.Module | None  # the frozen copy; None with LoRA (the policy with its adapters disabled)
    sampler: torch.nn.Module | None  # with async_lag: a copy holding the weights of `async_lag` steps ago
    engine: vllm_backend.VLLMSampler | None  # rollout_backend = "vllm"
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    snapshots: deque  # trainable weights of the last async_lag + 1 policies
    fixed_width: bool  # responses padded to max_new_tokens, so that shards and ranks line up
    fuse_rollout: bool  # train on the sampling forward itself (see rollout_grad)


def prepare(cfg: RLConfig, on_conflict: str = "refuse") -> Trainer | RunResult:
    """Check every input before any compute, build the models and the optimizer, then open (lock, check, write
    ``config.json``) the run directory: nothing is written before the model, device and dtype are known to work.
    A :class:`RunResult` ``"skipped"`` instead when the run finished earlier with the same identity."""
    if on_conflict not in ON_CONFLICT:
        raise ValueError(f"on_conflict={on_conflict!r}; valid values are {', '.join(map(repr, ON_CONFLICT))}")
    resolve(cfg.model)  # FileNotFoundError for a missing local directory, ValueError for a malformed name
    if cfg.rollout_backend == "vllm":
        vllm_backend.check_available()
    task = get_task(cfg.task)
    problems = task.load_split("rl_train", cfg.data_dir or None)
    if len(problems) < cfg.prompts_per_step:
        raise ValueError(f"task {cfg.task!r} has {len(problems)} rl_train problems, fewer than "
                         f"prompts_per_step={cfg.prompts_per_step}")
    ddp = distributed.init()
    shards = distributed.split(cfg.prompts_per_step, ddp, cfg.rollout_shards)
    local = sum(stop - start for start, stop in shards) * cfg.group_size  # this rank's sequences per step
    if local % cfg.ppo_minibatches or (cfg.micro_batch_size and (local // cfg.ppo_minibatches) % cfg.micro_batch_size):
        raise ValueError(f"with {ddp.world_size} processes each holds {local} sequences per step, which "
                         f"ppo_minibatches={cfg.ppo_minibatches} and micro_batch_size={cfg.micro_batch_size} "
                         "(per process) must divide into whole updates and passes; lower them or use fewer processes")
    run_dir = Path(cfg.runs_dir) / cfg.run_name()
    identity = run_identity(cfg, problems)
    summary = finished_summary(run_dir, identity)
    if summary is not None:
        return RunResult(run_dir, "skipped", summary.get("steps_completed", 0), summary)
    if ddp.is_main and (holder := lock_holder(run_dir)) is not None:  # before minutes of model loading
        raise RunLockedError(locked_message(run_dir, holder))

    device, autocast_dtype = resolve_device(cfg, ddp.local_rank)
    tokenizer, policy, ref, sampler = build_models(cfg, device)
    engine = None
    if cfg.rollout_backend == "vllm":
        engine = vllm_backend.VLLMSampler(model_source(cfg.model)[0], tokenizer, seed=cfg.seed,
                                          gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    fixed_width = len(shards) > 1 or ddp.enabled
    # Train on the sampling forward itself: only for one on-policy REINFORCE pass over the whole batch.
    # Not for long answers (see long_answers).
    fuse_rollout = (cfg.rollout_grad and not long_answers(cfg) and engine is None and cfg.async_lag == 0
                    and cfg.policy_loss == "reinforce" and cfg.ppo_epochs == 1 and cfg.ppo_minibatches == 1
                    and not cfg.gradient_checkpointing and not fixed_width
                    and cfg.micro_batch_size in (0, cfg.prompts_per_step * cfg.group_size))
    lineage = run_identity(cfg, problems, steps=1)
    lock = _open_run_dir(cfg, ddp, run_dir, identity, lineage, problems, on_conflict)
    return Trainer(cfg, task, problems, ddp, shards, run_dir, identity, lineage, lock, device, autocast_dtype,
                   tokenizer, policy, ref, sampler, engine, trainable,
                   torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay),
                   deque(maxlen=cfg.async_lag + 1), fixed_width, fuse_rollout)


def _open_run_dir(cfg: RLConfig, ddp: distributed.Dist, run_dir: Path, identity: str, lineage: str,
                  problems: list[Problem], on_conflict: str) -> contextlib.AbstractContextManager:
    """Rank 0 opens the run directory (``checkpoints.open_run_dir``) and holds its lock; its error, if any, stops
    every process."""
    lock: contextlib.AbstractContextManager = contextlib.nullcontext()
    error = None
    if ddp.is_main:
        try:
            lock = open_run_dir(run_dir, cfg, identity, lineage, problems, ddp.world_size, environment_info(),
                                on_conflict)
        except (RunConflictError, RunLockedError, OSError) as err:
            error = err
    if ddp.any(error is not None):
        raise error or RuntimeError(f"rank 0 could not open {run_dir}; see its error")
    return lock


def resolve_device(cfg: RLConfig, local_rank: int = 0) -> tuple[torch.device, torch.dtype | None]:
    """``(device, autocast dtype)``: bf16 autocast on GPUs that support it, plain float32 otherwise.

    Under a multi-process launch each process takes the GPU of its ``LOCAL_RANK``.
    """
    if cfg.device == "auto":
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(cfg.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("RLConfig.device='cuda' but no CUDA device is available; use device='auto' or 'cpu'")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank)
    if cfg.dtype == "float32" or device.type == "cpu":
        if cfg.dtype == "bfloat16" and device.type == "cpu":
            raise ValueError("RLConfig.dtype='bfloat16' is for GPUs; on CPU use 'auto' or 'float32'")
        return device, None
    if cfg.dtype == "bfloat16" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return device, torch.bfloat16
    return device, None


def build_models(cfg: RLConfig, device: torch.device):
    """``(tokenizer, policy, reference or None, sampler or None)`` for a run (see :class:`Trainer`)."""
    tokenizer = load_tokenizer(cfg.model, use_chat_template={"auto": None, "on": True, "off": False}[cfg.chat_template])
    # LoRA trains float32 adapters on a frozen base, which may be stored in the preset's GPU dtype (bf16): it is
    # also the reference. Full fine-tuning keeps float32 master weights (autocast to bf16 on GPUs).
    policy = load_model(cfg.model, device=device, dtype="auto" if cfg.finetune == "lora" else torch.float32,
                        gradient_checkpointing=cfg.gradient_checkpointing)
    if cfg.finetune == "lora":
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            policy = add_lora(policy, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        ref = None  # the reference is the same model with its adapters disabled
    else:
        # Fresh allocations for the policy's weights (from_pretrained may leave them at the file's offsets in a
        # memory map): CPU kernels round small products by the operands' alignment, so only equally aligned
        # weights make the frozen copy's log-probs bitwise the policy's (k1 = 0 exactly at the start).
        with torch.no_grad():
            for param in policy.parameters():
                param.data = param.data.clone()
        ref = copy.deepcopy(policy).eval().requires_grad_(False)
    policy.train()
    sampler = copy.deepcopy(policy).eval().requires_grad_(False) if cfg.async_lag else None
    return tokenizer, policy, ref, sampler


def resume(tr: Trainer) -> tuple[int, list[dict[str, Any]]]:
    """``(first step, metrics of the steps before it)``: from the newest intact checkpoint of this run (same
    lineage: an extended run continues from its last one) that the metrics reach, else from step 0.

    A torn last line of ``metrics.jsonl`` is dropped; lines after the checkpoint are removed (rank 0).
    """
    metrics_path = tr.run_dir / "metrics.jsonl"
    rows = read_metrics(metrics_path)
    reached = next((i for i, row in enumerate(rows) if row["step"] != i), len(rows))  # steps 0 … reached-1 logged
    state = resume_point(tr.run_dir, tr.lineage, min(reached, tr.cfg.steps), tr.device)
    start_step = 0
    if state is not None:
        load_trainable(tr.policy, state["trainable"])
        tr.optimizer.load_state_dict(state["optimizer"])
        tr.snapshots.extend(state["snapshots"])
        start_step = state["step"]
    if tr.ddp.is_main:
        truncate_metrics(metrics_path, start_step, rows)
    tr.ddp.barrier()
    return start_step, rows[:start_step]


# ------------------------------------------------------------------------------------------------------------
# Rollout and rewards
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """A step's samples: the rollout ``(B, R)``, each sequence's problem and, when the sampling forward is the
    training one, its differentiable logits and the reference's (both ``(B, R, V)``, consumed by the update)."""

    roll: Rollout
    problems: list[Problem]
    logits: Tensor | None = None
    ref_logits: Tensor | None = None


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 17) % (2**31 - 1)


def _shard_seed(seed: int, step: int, start: int) -> int:
    """Sampling seed of the rollout shard that begins at prompt ``start`` (shard 0 uses the step's seed)."""
    return (_step_seed(seed, step) + 1_000_033 * start) % (2**31 - 1)


def rollout(tr: Trainer, step: int) -> Batch | str:
    """Sample the step's groups from the current policy, or from the one of ``async_lag`` steps ago; a string
    saying why when sampling failed (on any rank) because the weights are no longer finite."""
    cfg = tr.cfg
    if cfg.async_lag:
        tr.snapshots.append(trainable_state(tr.policy))
        load_trainable(tr.sampler, tr.snapshots[0])  # lag steps old (or the oldest available early on)
    model = tr.sampler if cfg.async_lag else tr.policy
    chosen = random.Random(_step_seed(cfg.seed, step)).sample(tr.problems, cfg.prompts_per_step)  # same on every rank
    all_ids, all_mask = encode_prompts(tr.tokenizer, [p.prompt for p in chosen], tr.device)
    if tr.engine is not None:
        tr.engine.sync_weights(model)  # vLLM samples from exactly these weights
    problems, rolls, failed = [], [], None
    logits = ref_logits = None  # (B, R, V) with the policy's graph, and the reference's, on the fused path
    for start, stop in tr.shards:  # this rank's rollout shards, each with its own seed
        ids, mask = (t[start:stop].repeat_interleave(cfg.group_size, 0) for t in (all_ids, all_mask))
        problems += [p for p in chosen[start:stop] for _ in range(cfg.group_size)]  # groups of one prompt
        try:
            roll, logits, ref_logits = _sample(tr, model, ids, mask, _shard_seed(cfg.seed, step, start))
            rolls.append(roll)
        except RuntimeError as err:  # sampling from NaN/Inf probabilities
            if "probability tensor" not in str(err):
                raise
            failed = f"step {step}: rollout failed ({err})"
        if rolls and not bool(torch.isfinite(rolls[-1].behavior_logp).all()):
            failed = f"step {step}: the sampler's log-probs are not finite"
    if tr.ddp.any(failed is not None):
        return failed or f"step {step}: rollout failed on another process"
    roll = concat_rollouts(rolls, cfg.max_new_tokens, tr.tokenizer.pad_token_id) if tr.fixed_width else rolls[0]
    return Batch(roll, problems, logits, ref_logits)


SHORT_ANSWER_TOKENS = 16  # answer budgets up to this use the step-by-step paths (see long_answers)


def long_answers(cfg: RLConfig) -> bool:
    """Whether the run's answer budget is above ``SHORT_ANSWER_TOKENS``, where the length-trimmed paths pay.

    Up to it (every run of the short-answer study): sampling with the graph kept (``rollout_grad``) or by
    ``generate``, and forward passes over the padded batch. Above it, answers of varied length make padding the
    bulk of the work and a decode graph's backward slow (``benchmarks/bench_trl.py``: at a 48-token budget the
    fused path ran at 0.8× TRL, these paths at 1.9–2.0×), so ``rollout_grad`` is not used and the trainer samples
    with :func:`kl_lib.rl.rollout.sample` (``generate``'s tokens, finished rows dropped) and computes log-probs
    with :func:`kl_lib.rl.rollout.trimmed_response_logits` (no padding): the same numbers up to rounding.
    """
    return cfg.max_new_tokens > SHORT_ANSWER_TOKENS


def _sample(tr: Trainer, model: torch.nn.Module, ids: Tensor, mask: Tensor,
            seed: int) -> tuple[Rollout, Tensor | None, Tensor | None]:
    """One shard's ``(rollout, logits, ref_logits)``: with the graph kept (:func:`sample_with_logits`), else by
    ``generate`` (long answers: :func:`sample`) or vLLM (no logits)."""
    cfg = tr.cfg
    kw = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "seed": seed,
          "group_size": cfg.group_size}
    if tr.fuse_rollout:
        return sample_with_logits(tr.policy, tr.tokenizer, ids, mask, autocast_dtype=tr.autocast_dtype,
                                  reference=lambda: reference(tr.policy, tr.ref), **kw)
    if tr.engine is None:
        sampler = sample if long_answers(cfg) else generate
        return sampler(model, tr.tokenizer, ids, mask, autocast_dtype=tr.autocast_dtype, **kw), None, None
    return tr.engine.generate(ids, mask, eos_token_id=tr.tokenizer.eos_token_id,
                              pad_token_id=tr.tokenizer.pad_token_id, **kw), None, None


def score(tr: Trainer, batch: Batch) -> tuple[Tensor, Tensor]:
    """``(rewards, advantages)``, both ``(B,)``: the task's verifier, then the advantage within each group."""
    roll = batch.roll
    rewards = torch.tensor([tr.task.reward(text, p, bool(f)) for text, p, f in
                            zip(roll.texts, batch.problems, roll.finished.tolist())], device=tr.device)
    return rewards, compute_advantages(rewards, tr.cfg.group_size, tr.cfg.advantage)


# ------------------------------------------------------------------------------------------------------------
# Forward passes on rows of the batch
# ------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def reference(policy: torch.nn.Module, ref: torch.nn.Module | None):
    """The model to score π_ref with: the frozen copy, or the policy with LoRA adapters disabled."""
    if ref is not None:
        yield ref
    else:
        with policy.disable_adapter():
            yield policy


def forward_logits(tr: Trainer, model: torch.nn.Module, roll: Rollout, rows: Tensor, group_size: int) -> Tensor:
    """The tempered logits ``(m, R, V)`` of ``model`` on the rows ``rows`` of the batch (prompt groups of
    ``group_size`` rows share their prompt's forward pass; long answers: without the padding)."""
    forward = trimmed_response_logits if long_answers(tr.cfg) else response_logits
    return forward(model, roll.prompt_ids[rows], roll.prompt_mask[rows], roll.response_ids[rows],
                   roll.response_mask[rows], tr.cfg.temperature, tr.autocast_dtype, group_size)


def _sampled(logits: Tensor, logprobs: Tensor | None, response_ids: Tensor) -> Tensor:
    """log π of the sampled tokens ``(m, R)``, from the full log-probs when they exist, else from the logits.

    Policy and reference go through the same formula, so that identical weights give a log-ratio of exactly 0
    (the coefficient of k1 in the reward is then 0, not rounding noise that AdamW would scale up to a step).
    """
    if logprobs is not None:
        return logprobs.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    return sampled_logprobs(logits, response_ids)


@torch.no_grad()
def reference_logprobs(tr: Trainer, roll: Rollout, rows: Tensor, group_size: int, full: bool) -> tuple[Tensor, Tensor]:
    """``(ref_logp (m, R), ref_logprobs (m, R, V))`` of the reference on the rows ``rows`` of the batch;
    ``ref_logp`` computed as the policy's is (``full``: from the full log-probs)."""
    with reference(tr.policy, tr.ref) as ref_model:
        logits = forward_logits(tr, ref_model, roll, rows, group_size)
    return _reference_from_logits(logits, roll.response_ids[rows], full)


def _reference_from_logits(logits: Tensor, response_ids: Tensor, full: bool) -> tuple[Tensor, Tensor]:
    """``(ref_logp, ref_logprobs)`` from the reference's tempered logits ``(m, R, V)``."""
    logprobs = torch.log_softmax(logits, -1)
    return _sampled(logits, logprobs if full else None, response_ids), logprobs


# ------------------------------------------------------------------------------------------------------------
# The update: epochs × minibatches × micro-batches
# ------------------------------------------------------------------------------------------------------------

_STATS_CHUNK = 2**22  # vocabulary entries per chunk of the logging statistics (16 MiB per float32 temporary)


class _BatchStats:
    """The logged policy statistics of a whole batch, added up over micro-batches.

    Each is a sum over sequences (the KL estimates Σ_t k_t, the myopic forward KL) or over valid tokens (the
    entropy): micro-batches add numerators, and :meth:`values` divides once by the batch's sequences or
    tokens, which gives the unsplit batch's numbers (not a mean of means).
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.sequences, self.tokens = 0, 0

    @torch.no_grad()
    def add(self, logits: Tensor, logp: Tensor, ref_logp: Tensor, ref_logprobs: Tensor, mask: Tensor) -> None:
        """Add one micro-batch: tempered ``logits`` ``(m, R, V)``, ``logp``/``ref_logp``/``mask`` ``(m, R)``,
        ``ref_logprobs`` ``(m, R, V)``.

        A sum over sequences of Σ_t is a sum over all tokens, so the tokens are taken in chunks of ``_STATS_CHUNK``
        vocabulary entries (each token a length-1 "sequence" for ``kl_metrics``): the statistics' temporaries
        (log-softmax, the analytic KL's terms) stay small next to the training pass whatever its size.
        """
        V = logits.shape[-1]
        flat = [t.detach().reshape(-1, 1, V) for t in (logits, ref_logprobs)]  # (m·R, 1, V), views
        lp, ref_lp, m = (t.reshape(-1, 1) for t in (logp, ref_logp, mask))  # (m·R, 1)
        step = max(1, _STATS_CHUNK // V)
        for i in range(0, m.shape[0], step):
            c = slice(i, i + step)
            logprobs = torch.log_softmax(flat[0][c], -1)  # (c, 1, V)
            mf = m[c].to(logprobs.dtype)
            ones = torch.ones(mf.shape[0], dtype=mf.dtype, device=mf.device)
            sums = objectives.kl_metrics(lp[c], ref_lp[c], m[c], weights=ones, logprobs=logprobs,
                                         ref_logprobs=flat[1][c])  # Σ over tokens of k_t, every estimator
            sums["kl/forward_myopic"] = (analytic(flat[1][c], logprobs) * mf).sum()  # per-state KL(π_ref ‖ π)
            sums["policy/entropy"] = (-(logprobs.exp() * logprobs).sum(-1) * mf).sum()
            for key, value in sums.items():
                self.sums[key] = self.sums.get(key, 0.0) + value
        self.sequences += logits.shape[0]
        self.tokens += int(mask.sum())

    def values(self) -> dict[str, Tensor]:
        out = {key: value / self.sequences for key, value in self.sums.items()}
        out["policy/entropy"] = self.sums["policy/entropy"] / max(1, self.tokens)
        return out


@dataclass
class Scores:
    """The pre-update policy on the whole batch, filled pass by pass: ``(B, R)`` log-probs and the statistics."""

    ref_logp: Tensor  # (B, R) log π_ref of the sampled tokens
    cur_logp: Tensor  # (B, R) log π before this step's update
    stats: _BatchStats
    kl_penalty: Tensor  # (B,) β·Σ_t k_t of the pre-update policy, for kl_reward_baseline "loo" (else zeros)


@dataclass
class Update:
    """What a step's last optimizer update reports (or the one that diverged)."""

    pg: Tensor  # 0-dim policy-gradient loss of the update batch
    kl: Tensor  # 0-dim KL loss
    loss: float  # pg + kl, averaged over ranks
    grad_norm: float  # before clipping
    clip: dict[str, float]  # ppo/clip_fraction [, kl/clip_fraction, kl/value_clip_fraction]: shares of valid tokens
    scores: Scores
    diverged: str | None  # why the run must stop, or None


def update(tr: Trainer, batch: Batch, advantages: Tensor, step: int) -> Update:
    """One step's optimisation: ``ppo_epochs`` × ``ppo_minibatches`` updates (one for REINFORCE), each accumulated
    over micro-batches. Minibatches of a PPO batch are shuffled rows (scored first in a pass of their own);
    otherwise passes take whole prompt groups in order and the first one also scores the pre-update policy."""
    cfg, n = tr.cfg, batch.roll.response_ids.shape[0]
    scores = Scores(torch.zeros_like(batch.roll.behavior_logp), torch.zeros_like(batch.roll.behavior_logp), _BatchStats(),
                    torch.zeros_like(batch.roll.behavior_logp[:, 0]))
    if cfg.ppo_minibatches > 1:
        _score_batch(tr, batch, scores)
    for epoch in range(cfg.ppo_epochs):
        order = torch.arange(n)
        if cfg.ppo_minibatches > 1:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_step_seed(cfg.seed, step) + epoch))
        first_pass = epoch == 0 and cfg.ppo_minibatches == 1  # the batch in order, before any update
        for idx in order.view(cfg.ppo_minibatches, -1).to(tr.device):
            tr.optimizer.zero_grad(set_to_none=True)
            pg = kl = torch.zeros((), device=tr.device)
            clipped: dict[str, float] = {}  # clipped tokens, by metric
            tokens = 0
            aggregation = _update_aggregation(tr, batch, idx)
            for rows in idx.split(cfg.micro_batch_size or len(idx)):
                share = len(rows) / len(idx)  # the minibatch's mean loss = Σ over passes of (the pass's mean) × m/N
                pg_m, kl_m, fractions = micro_pass(tr, batch, advantages, rows, share, scores, first_pass,
                                                   aggregation)
                pg, kl = pg + pg_m * share, kl + kl_m * share
                n_tokens = int(batch.roll.response_mask[rows].sum())
                for key, fraction in fractions.items():
                    clipped[key] = clipped.get(key, 0.0) + fraction * n_tokens
                tokens += n_tokens
            loss, grad_norm, diverged = optimizer_step(tr, pg + kl, step)
            result = Update(pg, kl, loss, grad_norm, {k: c / max(1, tokens) for k, c in clipped.items()}, scores,
                            diverged)
            if diverged is not None:
                return result
    return result


def _update_aggregation(tr: Trainer, batch: Batch, idx: Tensor) -> tuple[str, float | None]:
    """``(aggregation, aggregation_constant)`` for each pass over the update batch ``idx`` of N sequences, such
    that the passes' losses × m/N add up to the update batch's loss under ``cfg.aggregation``.

    ``sum`` and ``token_mean`` are means over sequences and pass through. ``global_token_mean`` divides by the
    update batch's valid tokens, which no single pass sees: it is ``constant`` with C = (mean over processes of
    their update batch's valid tokens) / N, so (each process holding N sequences) the loss averaged over processes
    is Σ_b L_b over all their sequences divided by all their valid tokens. ``constant`` takes ``aggregation_constant``, by default
    ``max_new_tokens`` (every pass of a run divides by the same C, whatever its padded width).
    """
    cfg = tr.cfg
    if cfg.aggregation == "global_token_mean":
        tokens = batch.roll.response_mask[idx].sum().to(torch.float32).reshape(1)
        return "constant", max(1.0, float(tr.ddp.mean(tokens))) / len(idx)
    if cfg.aggregation == "constant":
        return "constant", float(cfg.max_new_tokens if cfg.aggregation_constant is None else cfg.aggregation_constant)
    return cfg.aggregation, None


def _score_batch(tr: Trainer, batch: Batch, scores: Scores) -> None:
    """The reference's and the pre-update policy's log-probs and statistics on the whole batch, without grad."""
    cfg, roll = tr.cfg, batch.roll
    full = lookup_estimator(cfg.kl.estimator).full_distribution
    for rows in torch.arange(roll.response_ids.shape[0], device=tr.device).split(
            cfg.micro_batch_size or roll.response_ids.shape[0] // cfg.ppo_minibatches):
        scores.ref_logp[rows], ref_logprobs = reference_logprobs(tr, roll, rows, cfg.group_size, full)
        with torch.no_grad():
            logits = forward_logits(tr, tr.policy, roll, rows, cfg.group_size)  # (m, R, V)
            logprobs = torch.log_softmax(logits, -1) if full else None
            scores.cur_logp[rows] = _sampled(logits, logprobs, roll.response_ids[rows])
        scores.stats.add(logits, scores.cur_logp[rows], scores.ref_logp[rows], ref_logprobs, roll.response_mask[rows])
        if cfg.kl_reward_baseline == "loo":
            scores.kl_penalty[rows] = kl_reward_penalty(cfg.kl, scores.cur_logp[rows], scores.ref_logp[rows],
                                                        roll.response_mask[rows], logprobs, ref_logprobs)
        del logits, logprobs, ref_logprobs


def micro_pass(tr: Trainer, batch: Batch, advantages: Tensor, rows: Tensor, share: float, scores: Scores,
               first_pass: bool, aggregation: tuple[str, float | None]) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Forward and backward (of the loss × ``share``) of the rows ``rows``; ``(pg, kl, clip fractions)``, detached.

    ``aggregation`` is the pass's ``(aggregation, aggregation_constant)`` (:func:`_update_aggregation`).

    On the first pass over the batch it also records the reference's and the policy's log-probs and adds the
    pass to the logged statistics, freeing the reference's ``(m, R, V)`` log-probs before the backward pass.
    """
    cfg, roll = tr.cfg, batch.roll
    full = lookup_estimator(cfg.kl.estimator).full_distribution  # the loss needs full log-probs
    shared = cfg.group_size if cfg.ppo_minibatches == 1 else 1  # rows in order: prompt groups share a forward
    ref_logprobs = None  # the reference's (m, R, V), for the logs and the analytic loss
    if first_pass or full:
        if batch.ref_logits is not None:  # scored alongside the sampling (one pass)
            rows_ref_logp, ref_logprobs = _reference_from_logits(batch.ref_logits, roll.response_ids[rows], full)
            batch.ref_logits = None
        else:
            rows_ref_logp, ref_logprobs = reference_logprobs(tr, roll, rows, shared, full)
        if first_pass:
            scores.ref_logp[rows] = rows_ref_logp
    mask = roll.response_mask[rows]
    if batch.logits is not None:  # the sampling forward of this very batch and policy
        logits, batch.logits = batch.logits, None
    else:
        logits = forward_logits(tr, tr.policy, roll, rows, shared)  # (m, R, V), differentiable
    logprobs = torch.log_softmax(logits, -1) if full else None  # only the analytic loss needs them
    logp = _sampled(logits, logprobs, roll.response_ids[rows])  # (m, R)
    off_policy = cfg.async_lag > 0 or cfg.policy_loss == "ppo"
    behavior_logp = roll.behavior_logp[rows] if off_policy else None
    rows_advantages = advantages[rows]
    if cfg.kl_reward_baseline == "loo":
        rows_advantages = rows_advantages + _kl_reward_baseline(tr, scores, rows, logp, mask, logprobs, ref_logprobs,
                                                                first_pass)
    pg, fractions = policy_loss(cfg.policy_loss, logp, rows_advantages, mask, behavior_logp, cfg.clip_eps,
                                *aggregation)
    kl, kl_clips = kl_loss(cfg.kl, logp, scores.ref_logp[rows], mask, behavior_logp=behavior_logp, logprobs=logprobs,
                           ref_logprobs=ref_logprobs if full else None, aggregation=aggregation[0],
                           aggregation_constant=aggregation[1])
    fractions.update({key: float(value) for key, value in kl_clips.items()})  # kl/clip_fraction, kl/value_…
    if first_pass:  # log the pre-update policy, freeing the reference before the backward
        scores.cur_logp[rows] = logp.detach()
        scores.stats.add(logits, scores.cur_logp[rows], scores.ref_logp[rows], ref_logprobs, mask)
    del logits, logprobs, ref_logprobs
    ((pg + kl) * share).backward()
    return pg.detach(), kl.detach(), fractions


def _kl_reward_baseline(tr: Trainer, scores: Scores, rows: Tensor, logp: Tensor, mask: Tensor,
                        logprobs: Tensor | None, ref_logprobs: Tensor | None, first_pass: bool) -> Tensor:
    """``(m,)`` leave-one-out baseline of the reward's KL penalty for ``rows``, from the pre-update policy.

    On the first pass over a batch (rows in order: whole prompt groups) the rows' penalties are computed here from
    this pass's ``(m, R)`` log-probs and recorded; later passes (PPO epochs, or minibatches after ``_score_batch``)
    read the whole batch's recorded penalties.
    """
    group_size = tr.cfg.group_size
    if first_pass:
        scores.kl_penalty[rows] = kl_reward_penalty(tr.cfg.kl, logp, scores.ref_logp[rows], mask, logprobs,
                                                    ref_logprobs)
        return kl_reward_loo_baseline(scores.kl_penalty[rows], group_size)
    return kl_reward_loo_baseline(scores.kl_penalty, group_size)[rows]


def optimizer_step(tr: Trainer, loss: Tensor, step: int) -> tuple[float, float, str | None]:
    """Average the accumulated gradient over ranks, clip it and step AdamW, unless the loss or the gradient is
    not finite (or |loss| > ``divergence_loss``): ``(loss, gradient norm, why the run diverged or None)``."""
    cfg = tr.cfg
    tr.ddp.average_gradients(tr.trainable)  # mean over ranks = the gradient of the global batch
    grad_norm = float(torch.nn.utils.clip_grad_norm_(
        tr.trainable, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")))
    loss_value = float(tr.ddp.mean(loss.reshape(1)))
    if not math.isfinite(loss_value) or not math.isfinite(grad_norm) or abs(loss_value) > cfg.divergence_loss:
        return loss_value, grad_norm, f"step {step}: loss={loss_value:.4g}, grad_norm={grad_norm:.4g}"
    tr.optimizer.step()
    if not all(bool(torch.isfinite(p).all()) for p in tr.trainable):
        return loss_value, grad_norm, f"step {step}: non-finite weights after the update"
    return loss_value, grad_norm, None


# ------------------------------------------------------------------------------------------------------------
# Logging and the end of a run
# ------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def log_step(tr: Trainer, step: int, batch: Batch, rewards: Tensor, upd: Update, t_generate: float, t_train: float,
             t0: float) -> dict[str, Any]:
    """The step's line of ``metrics.jsonl``: the policy that was updated this step, on the whole batch (tensor
    metrics averaged over ranks), the last update's losses, gradient norm and clip fractions, and timings."""
    roll, mf = batch.roll, batch.roll.response_mask.float()
    local = {
        "reward/mean": rewards.mean(), "reward/std": rewards.std(),
        "reward/finished_fraction": roll.finished.float().mean(),
        **upd.scores.stats.values(),  # kl/k1 … kl/analytic, kl/forward_myopic, policy/entropy
        "loss/pg": upd.pg, "loss/kl": upd.kl,
        "response/length": mf.sum(-1).mean(),
        **({"offpolicy/log_ratio_mean": ((upd.scores.cur_logp - roll.behavior_logp) * mf).sum() / mf.sum().clamp_min(1)}
           if tr.cfg.async_lag else {}),
    }
    averaged = tr.ddp.mean(torch.stack([torch.as_tensor(v, dtype=torch.float32, device=tr.device).reshape(())
                                        for v in local.values()])).tolist()
    return {"step": step, **dict(zip(local, averaged)), "loss/total": upd.loss, "grad/norm": upd.grad_norm,
            **upd.clip, "time/generate_s": t_generate, "time/train_s": t_train,
            "time/step_s": time.perf_counter() - t0}


def _summarise(metrics: list[dict[str, Any]], status: str, extra: dict[str, Any]) -> dict[str, Any]:
    rewards = [m["reward/mean"] for m in metrics]
    summary: dict[str, Any] = {"status": status, "steps_completed": len(metrics), **extra}
    if rewards:
        window = max(1, len(rewards) // 10)
        peak = max(sum(rewards[i: i + window]) / len(rewards[i: i + window]) for i in range(len(rewards)))
        final = sum(rewards[-window:]) / window
        summary.update({
            "reward/final": final, "reward/peak": peak, "reward/initial": sum(rewards[:window]) / window,
            # A collapse is recorded, not hidden: final reward below half its running peak.
            "reward_collapse": bool(peak > 0 and final < 0.5 * peak),
            "kl/final_k1": metrics[-1].get("kl/k1"), "kl/final_analytic": metrics[-1].get("kl/analytic"),
            "policy/final_entropy": metrics[-1].get("policy/entropy"),
        })
    return summary


def finish(tr: Trainer, history: list[dict[str, Any]], status: str, reason: str | None) -> RunResult:
    """Write ``final/`` (a finished run's model and tokenizer), ``summary.json`` and ``DONE`` (rank 0)."""
    final_dir = tr.run_dir / "final"
    summary = _summarise(history, status, {"diverged_reason": reason, "run_name": tr.cfg.run_name(),
                                           "digest": tr.identity,
                                           "final_model": str(final_dir) if status == "done" else None})
    if tr.ddp.is_main:
        if status == "done":
            tmp = tr.run_dir / ".final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                with disk_errors(tmp):
                    save_model(tr.policy, tr.tokenizer, tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(final_dir, ignore_errors=True)
            tmp.rename(final_dir)
        with disk_errors(tr.run_dir / "summary.json"):
            write_json(tr.run_dir / "summary.json", summary)
        with disk_errors(tr.run_dir / "DONE"):
            write_text(tr.run_dir / "DONE", status + "\n")  # last: from here on the run is finished
    tr.ddp.barrier()
    return RunResult(tr.run_dir, status, len(history), summary)


_TRAIN_EXAMPLES = """examples:
  python -m kl_lib.rl.train --config configs/base.yaml
  python -m kl_lib.rl.train --config configs/base.yaml --set kl.estimator=k3 --set kl.placement=loss --set steps=50
  KL_TRACKING=tensorboard python -m kl_lib.rl.train --set steps=20   (then: tensorboard --logdir runs/rl)
"""


def build_parser() -> argparse.ArgumentParser:
    """The trainer's command line; its help lists every config field (``kl_lib.rl.config.fields_help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m kl_lib.rl.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="RL fine-tuning of a language model with a chosen KL configuration.\nThe run is written to "
                    "<runs_dir>/<name>/ (config.json, metrics.jsonl, checkpoints/, summary.json);\nrerunning a "
                    "finished run does nothing, an interrupted one resumes.",
        epilog=_TRAIN_EXAMPLES + "\n" + fields_help())
    parser.add_argument("--config", metavar="YAML",
                        help="YAML config file of the fields below (default: every field at its default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set kl.estimator=k3 --set steps=50 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--move-aside", action="store_true",
                        help="if the run directory holds a run of another config, rename it to <name>.old-<time> "
                             "and start this one (by default such a run is refused and left untouched)")
    parser.add_argument("--track", choices=list(TRACKERS), default=None,
                        help="mirror each metrics row to a tracker (default $KL_TRACKING, else none; tensorboard "
                             "writes <run_dir>/tensorboard/ and needs the tracking extra); metrics.jsonl is always "
                             "written")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        tracking = tracking_choice(args.track)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        result = train(cfg, progress=not args.no_progress, on_conflict="move" if args.move_aside else "refuse",
                       tracker=tracking)
    except (RunConflictError, RunLockedError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DiskFullError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except CheckpointError as err:
        print(f"error: {err}; train under a new name (--set name=...), or delete "
              f"{Path(cfg.runs_dir) / cfg.run_name() / 'checkpoints'} to retrain the run from step 0", file=sys.stderr)
        return 1
    print(json.dumps({"run_dir": str(result.run_dir), "status": result.status, **result.summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
