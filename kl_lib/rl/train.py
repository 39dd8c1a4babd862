"""RL fine-tuning with any KL configuration: one readable loop.

    python -m kl_lib.rl.train --config configs/base.yaml [--set kl.estimator=k3 --set kl.placement=loss ...]

Per step (the paper's on-policy RLOO by default):

1. **Rollout.** ``prompts_per_step`` prompts × ``group_size`` samples from the *sampler*: the current policy,
   or with ``async_lag = k`` the policy of k steps earlier (off-policy, as in asynchronous RL). For one
   on-policy REINFORCE pass over the whole batch (``rollout_grad``), the sampling forward keeps its autograd
   graph and *is* the training forward (the reference is scored in the same loop), instead of being recomputed.
2. **Reward and advantage.** R ∈ {0, 1} from the task's verifier; A_i = R_i − mean_{j≠i} R_j (RLOO),
   (R_i − mean)/std (GRPO) or R_i − mean (Dr. GRPO), within each prompt's group.
3. **Loss** (minimised) = policy-gradient term + the KL configuration's term from ``kl_lib.objectives``, the
   same code the exact analysis differentiates:

       REINFORCE:  L_pg = −(1/N) Σ_i A_i Σ_t m_t log π(y_t)
       PPO-clip:   L_pg = −(1/N) Σ_i Σ_t m_t min(r_t A_i, clip(r_t, 1 ± ε) A_i),  r_t = π/μ
       KL:         L_kl = objectives.kl_term(config.kl, log π, log π_ref, m, behavior_logp=log μ)

   Sums over tokens (no length normalisation) unless ``aggregation = "token_mean"``.
4. **Update** with AdamW, gradient clipping; NaN/Inf or |loss| > ``divergence_loss`` marks the run diverged.
   With ``micro_batch_size = m`` each update batch of N sequences is computed in passes of m sequences
   (forward, then backward of the pass's loss × m/N), so the accumulated gradient is the batch's; the
   reference, the loss values and the logged statistics are computed pass by pass too and combined into
   the whole batch's (sums over tokens and sequences, divided once). Nothing the size of the vocabulary is
   kept for more than one pass, except the reference's full log-probs, recomputed per pass by the analytic
   estimator when a batch is passed over more than once (PPO).

The reference is a frozen copy of the initial model (full fine-tuning) or, with LoRA, the same model with its
adapters disabled (no second copy in memory). Everything a run produces lives in ``runs/rl/<name>/``:
``config.json``, ``metrics.jsonl`` (one line per step, namespaced keys), ``checkpoints/``, ``summary.json``
and ``DONE`` (written last). An interrupted run resumes from its last checkpoint and produces the same metrics
as an uninterrupted one (seeded per step; CPU).

Departures from the paper: the KL reward penalty gets no RLOO baseline (``kl_lib.objectives``; unbiased
either way); the model, task and scale are small (see ``kl_lib.tasks.arithmetic``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import random
import shutil
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from kl_lib import objectives
from kl_lib.estimators import analytic, get_estimator
from kl_lib.lm.models import add_lora, encode_prompts, load_model, load_tokenizer
from kl_lib.rl import distributed
from kl_lib.rl.config import RLConfig, load_config
from kl_lib.rl.rollout import (
    Rollout,
    concat_rollouts,
    generate,
    response_logits,
    sample_with_logits,
    sampled_logprobs,
)
from kl_lib.files import atomic_write, environment_info, write_json
from kl_lib.tasks import Problem, get_task, problems_digest

__all__ = ["RunResult", "compute_advantages", "policy_loss", "resolve_device", "train"]


# ------------------------------------------------------------------------------------------------------------
# Pieces of the objective
# ------------------------------------------------------------------------------------------------------------


def compute_advantages(rewards: Tensor, group_size: int, kind: str) -> Tensor:
    """Per-sequence advantages ``(B,)`` from rewards ``(B,)`` laid out as consecutive groups of ``group_size``."""
    r = rewards.view(-1, group_size)  # (num_prompts, G)
    mean = r.mean(-1, keepdim=True)
    if kind == "rloo":
        adv = (r - mean) * group_size / (group_size - 1)  # = R_i − mean of the others
    elif kind == "grpo":
        adv = (r - mean) / (r.std(-1, keepdim=True) + 1e-6)
    elif kind == "drgrpo":
        adv = r - mean
    else:
        raise ValueError(f"unknown advantage {kind!r}; choose 'rloo', 'grpo' or 'drgrpo'")
    return adv.reshape(-1)


def policy_loss(kind: str, logp: Tensor, advantages: Tensor, mask: Tensor, behavior_logp: Tensor | None,
                clip_eps: float, aggregation: str) -> tuple[Tensor, dict[str, float]]:
    """The policy-gradient term (minimised), mean over sequences; ``logp``/``mask`` are ``(B, R)``."""
    m = mask.to(logp.dtype)
    if kind == "reinforce":
        per_token = -advantages[:, None] * logp
        clip_fraction = 0.0
    else:
        if behavior_logp is None:
            raise ValueError("PPO needs the behaviour log-probs")
        ratio = torch.exp(logp - behavior_logp)
        unclipped = ratio * advantages[:, None]
        clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages[:, None]
        per_token = -torch.minimum(unclipped, clipped)
        clip_fraction = float(((clipped < unclipped).to(m.dtype) * m).sum() / m.sum().clamp_min(1))
    per_seq = (per_token * m).sum(-1)
    if aggregation == "token_mean":
        per_seq = per_seq / m.sum(-1).clamp_min(1)
    return per_seq.mean(), {"ppo/clip_fraction": clip_fraction}


# ------------------------------------------------------------------------------------------------------------
# Set-up
# ------------------------------------------------------------------------------------------------------------


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


def _check_model(cfg: RLConfig) -> None:
    """Fail before any compute when the model is neither a directory, a preset nor a hub id (or is missing)."""
    from kl_lib.lm.presets import resolve

    resolve(cfg.model)  # FileNotFoundError for a missing local directory, ValueError for a malformed name
    if cfg.rollout_backend == "vllm":
        from kl_lib.rl import vllm_backend

        vllm_backend.check_available()


def run_identity(cfg: RLConfig, problems: list[Problem] | None = None) -> str:
    """What a run's results depend on: its config digest, the base model's weights and the training prompts.

    A finished run is skipped only when this is unchanged, so retraining the base model or regenerating the
    data reruns the sweep rather than silently keeping stale results.
    """
    from kl_lib.lm.evaluate import model_digest

    if problems is None:
        problems = get_task(cfg.task).load_split("rl_train", cfg.data_dir or None)
    model = Path(_model_source(cfg.model))  # a preset's local cache is hashed like any model directory
    parts = [cfg.digest(), model_digest(model) if model.is_dir() else cfg.model, problems_digest(problems)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def _trainable_state(model: torch.nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model: torch.nn.Module, state: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _model_source(name: str) -> str:
    """The directory or hub id that ``from_pretrained`` (and vLLM) load for a model name or preset."""
    from kl_lib.lm.models import model_source

    return model_source(name)[0]


def _build_models(cfg: RLConfig, device: torch.device):
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
    sampler = None
    if cfg.async_lag:
        sampler = copy.deepcopy(policy).eval().requires_grad_(False)
    return tokenizer, policy, ref, sampler


@contextlib.contextmanager
def _reference(policy, ref):
    """The model to score π_ref with: the frozen copy, or the policy with LoRA adapters disabled."""
    if ref is not None:
        yield ref
    else:
        with policy.disable_adapter():
            yield policy


# ------------------------------------------------------------------------------------------------------------
# Run directory: checkpoints, metrics, summary
# ------------------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    run_dir: Path
    status: str  # "done", "diverged", "skipped"
    steps_completed: int
    summary: dict[str, Any]


def _save_checkpoint(run_dir: Path, step: int, policy, optimizer, snapshots: deque, identity: str,
                     keep: int) -> None:
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f".step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"step": step, "digest": identity, "trainable": _trainable_state(policy),
                "optimizer": optimizer.state_dict(), "snapshots": list(snapshots)}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    old = sorted(p for p in ckpt_root.glob("step_*") if p != final)
    for p in old[: max(0, len(old) - keep)]:
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    return ckpts[-1] if ckpts else None


def _truncate_metrics(path: Path, keep_below_step: int) -> None:
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] < keep_below_step]
    with atomic_write(path) as f:
        f.write("".join(line + "\n" for line in kept))


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


# ------------------------------------------------------------------------------------------------------------
# Micro-batches: the forward passes, and statistics that add up over them
# ------------------------------------------------------------------------------------------------------------

_STATS_CHUNK = 2**22  # vocabulary entries per chunk of the logging statistics (16 MiB per float32 temporary)


def _logits(model, roll: Rollout, rows: Tensor, cfg: RLConfig, autocast_dtype, group_size: int) -> Tensor:
    """The tempered logits ``(m, R, V)`` of ``model`` on the rows ``rows`` of the batch."""
    return response_logits(model, roll.prompt_ids[rows], roll.prompt_mask[rows], roll.response_ids[rows],
                           roll.response_mask[rows], cfg.temperature, autocast_dtype, group_size)


def _sampled(logits: Tensor, logprobs: Tensor | None, response_ids: Tensor) -> Tensor:
    """log π of the sampled tokens ``(m, R)``, from the full log-probs when they exist, else from the logits.

    Policy and reference go through the same formula, so that identical weights give a log-ratio of exactly 0
    (the coefficient of k1 in the reward is then 0, not rounding noise that AdamW would scale up to a step).
    """
    if logprobs is not None:
        return logprobs.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    return sampled_logprobs(logits, response_ids)


@torch.no_grad()
def _reference_logprobs(policy, ref, roll: Rollout, rows: Tensor, cfg: RLConfig, autocast_dtype, group_size: int,
                        full: bool) -> tuple[Tensor, Tensor]:
    """``(ref_logp (m, R), ref_logprobs (m, R, V))`` of the reference on the rows ``rows`` of the batch;
    ``ref_logp`` computed as the policy's is (``full``: from the full log-probs)."""
    with _reference(policy, ref) as ref_model:
        logits = _logits(ref_model, roll, rows, cfg, autocast_dtype, group_size)
    return _reference_from_logits(logits, roll.response_ids[rows], full)


def _reference_from_logits(logits: Tensor, response_ids: Tensor, full: bool) -> tuple[Tensor, Tensor]:
    """``(ref_logp, ref_logprobs)`` from the reference's tempered logits ``(m, R, V)``."""
    logprobs = torch.log_softmax(logits, -1)
    return _sampled(logits, logprobs if full else None, response_ids), logprobs


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
                                         ref_logprobs=flat[1][c])  # Σ over tokens of k_t
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


# ------------------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------------------


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 17) % (2**31 - 1)


def train(cfg: RLConfig, progress: bool = True, stop_after: int | None = None) -> RunResult:
    """Run (or resume, or skip if already done) the configured training; returns where and how it ended.

    ``stop_after`` stops after that many steps *of this call* without finishing the run (to test resumption).
    Under a multi-process launch (``kl_lib.rl.distributed``) every process calls this; rank 0 writes.
    """
    # ---- INPUTS: everything that can be wrong fails here, before any compute
    _check_model(cfg)
    task = get_task(cfg.task)
    problems = task.load_split("rl_train", cfg.data_dir or None)
    if len(problems) < cfg.prompts_per_step:
        raise ValueError(f"task {cfg.task!r} has {len(problems)} rl_train problems, fewer than "
                         f"prompts_per_step={cfg.prompts_per_step}")
    ddp = distributed.init()
    shards = distributed.split(cfg.prompts_per_step, ddp, cfg.rollout_shards)  # this rank's prompt ranges
    local = sum(stop - start for start, stop in shards) * cfg.group_size  # this rank's sequences per step
    if local % cfg.ppo_minibatches or (cfg.micro_batch_size and (local // cfg.ppo_minibatches) % cfg.micro_batch_size):
        raise ValueError(f"with {ddp.world_size} processes each holds {local} sequences per step, which "
                         f"ppo_minibatches={cfg.ppo_minibatches} and micro_batch_size={cfg.micro_batch_size} "
                         "(per process) must divide into whole updates and passes; lower them or use fewer processes")
    run_dir = Path(cfg.runs_dir) / cfg.run_name()
    identity = run_identity(cfg, problems)
    if (run_dir / "DONE").exists():
        previous = json.loads((run_dir / "config.json").read_text())
        if previous.get("digest") == identity:
            summary = json.loads((run_dir / "summary.json").read_text())
            return RunResult(run_dir, "skipped", summary.get("steps_completed", 0), summary)
    if ddp.is_main:
        if (run_dir / "config.json").exists():  # same name, changed config or data: start over
            previous = json.loads((run_dir / "config.json").read_text())
            if previous.get("digest") != identity:
                shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / "config.json", {"config": cfg.to_dict(), "digest": identity,
                                             "world_size": ddp.world_size, "environment": environment_info()})
    ddp.barrier()

    device, autocast_dtype = resolve_device(cfg, ddp.local_rank)
    tokenizer, policy, ref, sampler = _build_models(cfg, device)
    engine = None  # the vLLM engine when rollout_backend = "vllm"
    if cfg.rollout_backend == "vllm":
        from kl_lib.rl.vllm_backend import VLLMSampler

        engine = VLLMSampler(_model_source(cfg.model), tokenizer, seed=cfg.seed,
                             gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    snapshots: deque = deque(maxlen=cfg.async_lag + 1)  # trainable weights of the last lag + 1 policies
    fixed_width = len(shards) > 1 or ddp.enabled  # pad responses to max_new_tokens so shards line up
    # Train on the sampling forward itself: only for one on-policy REINFORCE pass over the whole batch.
    fuse_rollout = (cfg.rollout_grad and engine is None and cfg.async_lag == 0 and cfg.policy_loss == "reinforce"
                    and cfg.ppo_epochs == 1 and cfg.ppo_minibatches == 1 and not cfg.gradient_checkpointing
                    and not fixed_width and cfg.micro_batch_size in (0, cfg.prompts_per_step * cfg.group_size))

    start_step = 0
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        state = torch.load(ckpt / "state.pt", map_location=device, weights_only=False)
        if state["digest"] == identity:
            _load_trainable(policy, state["trainable"])
            optimizer.load_state_dict(state["optimizer"])
            snapshots.extend(state["snapshots"])
            start_step = state["step"]
    metrics_path = run_dir / "metrics.jsonl"
    if ddp.is_main:
        _truncate_metrics(metrics_path, start_step)
    ddp.barrier()
    history = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.exists() else []

    status, reason = "done", None
    steps_this_call = 0
    bar = tqdm(range(start_step, cfg.steps), desc=cfg.run_name(), unit="step", disable=not progress or not ddp.is_main,
               initial=start_step, total=cfg.steps, mininterval=2, file=sys.stderr)
    with (open(metrics_path, "a") if ddp.is_main else contextlib.nullcontext()) as metrics_file:
        for step in bar:
            t0 = time.perf_counter()
            # ---- ROLLOUT: sample from the current policy, or from the one of `async_lag` steps ago
            if cfg.async_lag:
                snapshots.append(_trainable_state(policy))
                _load_trainable(sampler, snapshots[0])  # lag steps old (or the oldest available early on)
            sampler_model = sampler if cfg.async_lag else policy
            rng = random.Random(_step_seed(cfg.seed, step))
            chosen = rng.sample(problems, cfg.prompts_per_step)  # the same on every rank
            all_ids, all_mask = encode_prompts(tokenizer, [p.prompt for p in chosen], device)
            if engine is not None:
                engine.sync_weights(sampler_model)  # vLLM samples from exactly these weights
            batch, rolls, failed = [], [], None
            sampled_logits = None  # (B, R, V) with the policy's graph, when the sampling forward is the training one
            sampled_ref_logits = None  # (B, R, V) the reference's, scored in the same loop
            for start, stop in shards:  # this rank's rollout shards, each with its own seed
                ids, mask = (t[start:stop].repeat_interleave(cfg.group_size, 0) for t in (all_ids, all_mask))
                batch += [p for p in chosen[start:stop] for _ in range(cfg.group_size)]  # groups of one prompt
                seed = _shard_seed(cfg.seed, step, start)
                try:
                    if fuse_rollout:
                        roll_, sampled_logits, sampled_ref_logits = sample_with_logits(
                            policy, tokenizer, ids, mask, max_new_tokens=cfg.max_new_tokens,
                            temperature=cfg.temperature, seed=seed, autocast_dtype=autocast_dtype,
                            group_size=cfg.group_size, reference=lambda: _reference(policy, ref))
                        rolls.append(roll_)
                    elif engine is None:
                        rolls.append(generate(sampler_model, tokenizer, ids, mask, max_new_tokens=cfg.max_new_tokens,
                                              temperature=cfg.temperature, seed=seed, autocast_dtype=autocast_dtype,
                                              group_size=cfg.group_size))
                    else:
                        rolls.append(engine.generate(ids, mask, max_new_tokens=cfg.max_new_tokens,
                                                     temperature=cfg.temperature, seed=seed,
                                                     eos_token_id=tokenizer.eos_token_id,
                                                     pad_token_id=tokenizer.pad_token_id, group_size=cfg.group_size))
                except RuntimeError as err:  # sampling from NaN/Inf probabilities: the weights have blown up
                    if "probability tensor" not in str(err):
                        raise
                    failed = f"step {step}: rollout failed ({err})"
                if rolls and not bool(torch.isfinite(rolls[-1].behavior_logp).all()):
                    failed = f"step {step}: the sampler's log-probs are not finite"
            if ddp.any(failed is not None):
                status, reason = "diverged", failed or f"step {step}: rollout failed on another process"
                break
            roll: Rollout = (concat_rollouts(rolls, cfg.max_new_tokens, tokenizer.pad_token_id) if fixed_width
                             else rolls[0])
            t_gen = time.perf_counter() - t0

            # ---- REWARD AND ADVANTAGE
            rewards = torch.tensor([task.reward(text, p, bool(f)) for text, p, f in
                                    zip(roll.texts, batch, roll.finished.tolist())], device=device)
            advantages = compute_advantages(rewards, cfg.group_size, cfg.advantage)
            off_policy = cfg.async_lag > 0 or cfg.policy_loss == "ppo"
            behavior_logp = roll.behavior_logp if off_policy else None

            # ---- LOSS AND UPDATE (one step for REINFORCE; epochs × minibatches for PPO), in micro-batches
            t1 = time.perf_counter()
            n = roll.response_ids.shape[0]
            update_size = n // cfg.ppo_minibatches  # sequences per optimizer step
            micro = cfg.micro_batch_size or update_size  # sequences per forward/backward pass
            full = get_estimator(cfg.kl.estimator).full_distribution  # the loss needs full log-probs
            # Minibatches of a PPO batch are shuffled rows; otherwise passes take whole prompt groups in order and
            # share each prompt's forward pass across its group.
            shared = cfg.group_size if cfg.ppo_minibatches == 1 else 1
            ref_logp = torch.zeros_like(roll.behavior_logp)  # (B, R), filled by the first pass over the batch
            cur_logp = torch.zeros_like(roll.behavior_logp)  # (B, R) log π before this step's update, for logging
            stats = _BatchStats()  # the same policy on the whole batch: KL estimates, entropy
            if cfg.ppo_minibatches > 1:  # shuffled minibatches: a pass of its own for the reference and the logs
                for rows in torch.arange(n, device=device).split(micro):
                    ref_logp[rows], ref_logprobs = _reference_logprobs(policy, ref, roll, rows, cfg, autocast_dtype,
                                                                       cfg.group_size, full)
                    with torch.no_grad():
                        logits = _logits(policy, roll, rows, cfg, autocast_dtype, cfg.group_size)  # (m, R, V)
                        logprobs = torch.log_softmax(logits, -1) if full else None
                        cur_logp[rows] = _sampled(logits, logprobs, roll.response_ids[rows])
                    stats.add(logits, cur_logp[rows], ref_logp[rows], ref_logprobs, roll.response_mask[rows])
                    del logits, logprobs, ref_logprobs
            for epoch in range(cfg.ppo_epochs):
                order = torch.arange(n)
                if cfg.ppo_minibatches > 1:
                    order = torch.randperm(n, generator=torch.Generator().manual_seed(_step_seed(cfg.seed, step) + epoch))
                first_pass = epoch == 0 and cfg.ppo_minibatches == 1  # the batch in order, before any update
                for idx in order.view(cfg.ppo_minibatches, -1).to(device):
                    optimizer.zero_grad(set_to_none=True)
                    pg = kl_loss = torch.zeros((), device=device)
                    clipped_tokens, tokens = 0.0, 0
                    for rows in idx.split(micro):
                        ref_logprobs = None  # the reference's (m, R, V), for the logs and the analytic loss
                        if first_pass or full:
                            if sampled_ref_logits is not None:  # scored alongside the sampling (one pass)
                                rows_ref_logp, ref_logprobs = _reference_from_logits(
                                    sampled_ref_logits, roll.response_ids[rows], full)
                                sampled_ref_logits = None
                            else:
                                rows_ref_logp, ref_logprobs = _reference_logprobs(policy, ref, roll, rows, cfg,
                                                                                  autocast_dtype, shared, full)
                            if first_pass:
                                ref_logp[rows] = rows_ref_logp
                        mask = roll.response_mask[rows]
                        if sampled_logits is not None:  # the sampling forward of this very batch and policy
                            logits, sampled_logits = sampled_logits, None
                        else:
                            logits = _logits(policy, roll, rows, cfg, autocast_dtype, shared)  # (m, R, V), differentiable
                        logprobs = torch.log_softmax(logits, -1) if full else None  # only the analytic loss needs them
                        logp = _sampled(logits, logprobs, roll.response_ids[rows])  # (m, R)
                        beh = None if behavior_logp is None else behavior_logp[rows]
                        pg_m, pg_metrics = policy_loss(cfg.policy_loss, logp, advantages[rows], mask, beh,
                                                       cfg.clip_eps, cfg.aggregation)
                        kl_m, _ = objectives.kl_term(cfg.kl, logp, ref_logp[rows], mask, behavior_logp=beh,
                                                     logprobs=logprobs, ref_logprobs=ref_logprobs if full else None,
                                                     aggregation=cfg.aggregation)
                        # ALGO LOGIC: the minibatch's mean loss = Σ over passes of (the pass's mean) × m/N
                        share = len(rows) / len(idx)
                        if first_pass:  # log the pre-update policy, freeing the reference before the backward
                            cur_logp[rows] = logp.detach()
                            stats.add(logits, cur_logp[rows], ref_logp[rows], ref_logprobs, mask)
                        del logits, logprobs, ref_logprobs
                        ((pg_m + kl_m) * share).backward()
                        pg, kl_loss = pg + pg_m.detach() * share, kl_loss + kl_m.detach() * share
                        n_tokens = int(mask.sum())
                        clipped_tokens += pg_metrics["ppo/clip_fraction"] * n_tokens
                        tokens += n_tokens
                        del logp, pg_m, kl_m
                    pg_metrics = {"ppo/clip_fraction": clipped_tokens / max(1, tokens)}
                    loss = pg + kl_loss
                    ddp.average_gradients(trainable)  # mean over ranks = the gradient of the global batch
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(
                        trainable, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")))
                    loss_value = float(ddp.mean(loss.reshape(1)))
                    if not math.isfinite(loss_value) or not math.isfinite(grad_norm) \
                            or abs(loss_value) > cfg.divergence_loss:
                        status = "diverged"
                        reason = f"step {step}: loss={loss_value:.4g}, grad_norm={grad_norm:.4g}"
                        break
                    optimizer.step()
                    if not all(bool(torch.isfinite(p).all()) for p in trainable):
                        status, reason = "diverged", f"step {step}: non-finite weights after the update"
                        break
                if status == "diverged":
                    break
            t_train = time.perf_counter() - t1

            # ---- LOGGING: the policy that was updated this step, on the whole batch (averaged over ranks)
            with torch.no_grad():
                mf = roll.response_mask.float()
                local = {
                    "reward/mean": rewards.mean(), "reward/std": rewards.std(),
                    "reward/finished_fraction": roll.finished.float().mean(),
                    **stats.values(),  # kl/k1 … kl/analytic, kl/forward_myopic, policy/entropy
                    "loss/pg": pg, "loss/kl": kl_loss,
                    "response/length": mf.sum(-1).mean(),
                    **({"offpolicy/log_ratio_mean": ((cur_logp - roll.behavior_logp) * mf).sum() / mf.sum().clamp_min(1)}
                       if cfg.async_lag else {}),
                }
                averaged = ddp.mean(torch.stack([torch.as_tensor(v, dtype=torch.float32, device=device).reshape(())
                                                 for v in local.values()])).tolist()
                step_metrics = {"step": step, **dict(zip(local, averaged)),
                                "loss/total": loss_value, "grad/norm": grad_norm, **pg_metrics,
                                "time/generate_s": t_gen, "time/train_s": t_train,
                                "time/step_s": time.perf_counter() - t0}
            if ddp.is_main:
                metrics_file.write(json.dumps(step_metrics) + "\n")
                metrics_file.flush()
            history.append(step_metrics)
            bar.set_postfix(reward=f"{step_metrics['reward/mean']:.2f}", kl=f"{step_metrics['kl/k1']:.3f}")
            if status == "diverged":
                break
            steps_this_call += 1
            done_steps = step + 1
            if ddp.is_main and (done_steps % cfg.checkpoint_every == 0 or done_steps == cfg.steps):
                _save_checkpoint(run_dir, done_steps, policy, optimizer, snapshots, identity, cfg.keep_checkpoints)
            if stop_after is not None and steps_this_call >= stop_after and done_steps < cfg.steps:
                bar.close()
                ddp.barrier()
                return RunResult(run_dir, "interrupted", done_steps, {})
    bar.close()

    final_dir = run_dir / "final"
    summary = _summarise(history, status, {"diverged_reason": reason, "run_name": cfg.run_name(),
                                           "digest": identity, "final_model": str(final_dir) if status == "done" else None})
    if ddp.is_main:
        if status == "done":
            tmp = run_dir / ".final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            policy.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(final_dir, ignore_errors=True)
            tmp.rename(final_dir)
        write_json(run_dir / "summary.json", summary)
        (run_dir / "DONE").write_text(status + "\n")
    ddp.barrier()
    return RunResult(run_dir, status, len(history), summary)


def _shard_seed(seed: int, step: int, start: int) -> int:
    """Sampling seed of the rollout shard that begins at prompt ``start`` (shard 0 uses the step's seed)."""
    return (_step_seed(seed, step) + 1_000_033 * start) % (2**31 - 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="RL fine-tuning with a chosen KL configuration.")
    parser.add_argument("--config", help="YAML config file (defaults: kl_lib.rl.config.RLConfig)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set kl.estimator=k3 --set steps=50 (repeatable)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = train(cfg, progress=not args.no_progress)
    print(json.dumps({"run_dir": str(result.run_dir), "status": result.status, **result.summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
