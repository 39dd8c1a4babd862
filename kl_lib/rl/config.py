"""Configuration of an RL fine-tuning run: one dataclass, every field documented, validated before any compute.

A run is described by YAML (``configs/*.yaml``) or keyword overrides ``--set key=value`` (dotted keys reach
into the KL section: ``--set kl.estimator=k3``). Unknown keys and invalid values raise ``ValueError`` naming
the field and the allowed values. :meth:`RLConfig.run_name` is a deterministic name, and :meth:`digest` a hash
of every field that changes results, so that a sweep can tell a finished run from a changed one.

Defaults follow the paper's on-policy setting (RLOO, one gradient step per batch, sequence-sum KL with k1 in
the reward) at a scale that runs on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from kl_lib.config import KLConfig, check_choice
from kl_lib.files import config_digest
from kl_lib.objectives import AGGREGATIONS
from kl_lib.tasks import task_names

__all__ = ["ADVANTAGES", "FINETUNES", "POLICY_LOSSES", "RLConfig", "apply_overrides", "load_config"]

ADVANTAGES = ("rloo", "grpo", "drgrpo")
POLICY_LOSSES = ("reinforce", "ppo")
FINETUNES = ("full", "lora")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float32", "bfloat16")
ROLLOUT_BACKENDS = ("transformers", "vllm")
CHAT_TEMPLATES = ("auto", "on", "off")


@dataclass(frozen=True)
class RLConfig:
    # ---- what is trained, on what
    model: str = "data/models/tiny-base"
    """Model directory, hub name or preset name (``kl_lib.lm.presets``, e.g. ``smollm2-135m-instruct``)."""
    chat_template: str = "auto"
    """``auto`` (the preset's choice; the tokenizer's template when there is no preset), ``on`` or ``off`` (raw
    prompts: the paper also evaluated the Qwen base model without its chat template)."""
    task: str = "arithmetic"
    """Registered task (``kl_lib.tasks``): ``arithmetic``, ``countdown``, ``math``, ``gsm8k``, ..."""
    data_dir: str = ""
    """Where the task's data lives (a local directory); empty = the task's default (``data/<task>`` or its hub
    dataset)."""
    seed: int = 0
    """Seeds prompt order, sampling and LoRA initialisation; a run is deterministic from it on CPU."""
    steps: int = 100
    """Optimizer steps (one batch of rollouts each)."""
    # ---- rollouts
    prompts_per_step: int = 16
    """Distinct prompts per step."""
    group_size: int = 4
    """Samples per prompt (the paper uses 5). Needs ≥ 2 for RLOO/GRPO baselines."""
    max_new_tokens: int = 6
    """Generation budget; responses that do not end within it are truncated and score 0."""
    temperature: float = 1.0
    """Sampling temperature (the paper samples at 1.0). Log-probs are of the tempered distribution."""
    rollout_backend: str = "transformers"
    """``transformers`` (``generate``, any device) or ``vllm`` (GPU only, optional extra; weights synced from the
    trainer before each rollout)."""
    vllm_gpu_memory_utilization: float = 0.3
    """vLLM only: fraction of GPU memory vLLM may take (the trainer needs the rest)."""
    rollout_shards: int = 0
    """Rollouts are sampled in this many chunks of prompts, each with its own seed (0 = one per process). Fixing
    it makes a run's samples independent of the number of processes: a 2-process run with ``rollout_shards=2``
    trains on exactly the batches of a 1-process run with ``rollout_shards=2``."""
    rollout_grad: bool = True
    """On-policy REINFORCE with the whole batch in one pass (no ``async_lag``, PPO, micro-batches, gradient
    checkpointing, vLLM or rollout shards): sample with the autograd graph kept and train on the sampling
    forward itself instead of recomputing it (same gradient, a third less model compute). False: always
    ``generate`` then recompute."""
    # ---- objective
    advantage: str = "rloo"
    """``rloo`` (leave-one-out baseline, the paper's), ``grpo`` ((R − mean)/std) or ``drgrpo`` (R − mean)."""
    policy_loss: str = "reinforce"
    """``reinforce`` (−A·Σ_t log π, exactly on-policy) or ``ppo`` (clipped ratio to the behaviour policy)."""
    ppo_epochs: int = 1
    """PPO only: passes over each batch."""
    ppo_minibatches: int = 1
    """PPO only: minibatches per pass (1 = the whole batch per update)."""
    clip_eps: float = 0.2
    """PPO only: ratio clip range [1 − ε, 1 + ε]."""
    kl: KLConfig = field(default_factory=lambda: KLConfig("k1", "reward", beta=0.1))
    """The KL configuration (estimator, placement, beta, reward_to_go, importance_weighting), see kl_lib.config."""
    aggregation: str = "sum"
    """How per-token terms are combined: ``sum`` over tokens (DESIGN.md) or ``token_mean`` per sequence."""
    async_lag: int = 0
    """Off-policy: rollouts come from the policy of this many steps earlier (0 = on-policy)."""
    # ---- optimisation
    finetune: str = "full"
    """``full`` (reference = a frozen copy) or ``lora`` (reference = the base with adapters disabled)."""
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """LoRA target module names."""
    micro_batch_size: int = 0
    """Sequences per forward/backward pass (per process under a multi-process launch); 0 = the whole update
    batch (the batch, or a PPO minibatch) at once. The passes' gradients add up to exactly the update batch's
    and the logged metrics are the whole batch's, so it changes memory, not results (not part of
    :meth:`digest`): the update's full-vocabulary tensors (logits, log-probs; ~16 bytes per response token ×
    vocabulary entry at their peak, ``benchmarks/bench_memory.py --vocab``) then scale with it instead of the
    batch. A multiple of ``group_size`` (whole prompt groups, which share their prompt's forward pass) that
    divides the update batch. Costs some speed when small (smaller matrix products) and, for the analytic
    estimator with several PPO passes over a batch, one reference forward per pass."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute); for large models."""
    lr: float = 1e-4
    """AdamW learning rate (constant)."""
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping; the unclipped norm is always logged)."""
    divergence_loss: float = 1e4
    """|loss| above this (or a NaN/Inf loss or gradient) marks the run diverged and stops it."""
    # ---- bookkeeping
    checkpoint_every: int = 25
    """Save a resumable checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 1
    """How many checkpoints to keep besides the final one."""
    device: str = "auto"
    """``auto`` (cuda if available), ``cpu``, ``cuda`` or ``mps``."""
    dtype: str = "auto"
    """``auto`` = bfloat16 on a GPU that supports it, else float32."""
    runs_dir: str = "runs/rl"
    """Parent directory of run directories."""
    name: str = ""
    """Run directory name; empty = :meth:`run_name`."""

    def __post_init__(self) -> None:
        if isinstance(self.kl, dict):
            object.__setattr__(self, "kl", KLConfig(**self.kl))
        if isinstance(self.lora_targets, list):
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        check_choice("RLConfig.advantage", self.advantage, ADVANTAGES)
        check_choice("RLConfig.policy_loss", self.policy_loss, POLICY_LOSSES)
        check_choice("RLConfig.finetune", self.finetune, FINETUNES)
        check_choice("RLConfig.aggregation", self.aggregation, AGGREGATIONS)
        check_choice("RLConfig.device", self.device, DEVICES)
        check_choice("RLConfig.dtype", self.dtype, DTYPES)
        check_choice("RLConfig.rollout_backend", self.rollout_backend, ROLLOUT_BACKENDS)
        check_choice("RLConfig.chat_template", self.chat_template, CHAT_TEMPLATES)
        check_choice("RLConfig.task", self.task, tuple(task_names()))
        if not isinstance(self.rollout_grad, bool):
            raise ValueError(f"RLConfig.rollout_grad={self.rollout_grad!r} must be true or false")  # noqa: TRY004
        if not isinstance(self.gradient_checkpointing, bool):
            # a ValueError like every config error, which the CLI reports as one
            raise ValueError(f"RLConfig.gradient_checkpointing={self.gradient_checkpointing!r} must be true or "  # noqa: TRY004
                             "false")
        if not _is_real(self.vllm_gpu_memory_utilization) or not 0 < self.vllm_gpu_memory_utilization < 1:
            raise ValueError(f"RLConfig.vllm_gpu_memory_utilization={self.vllm_gpu_memory_utilization!r} must be "
                             "in (0, 1)")
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "ppo_epochs", "ppo_minibatches",
                     "lora_rank", "checkpoint_every"):
            _positive_int(name, getattr(self, name))
        for name in ("seed", "async_lag", "keep_checkpoints", "rollout_shards", "micro_batch_size"):
            _nonnegative_int(name, getattr(self, name))
        for name in ("temperature", "lr", "clip_eps", "lora_alpha", "divergence_loss"):
            _positive_float(name, getattr(self, name))
        for name in ("weight_decay", "max_grad_norm"):
            value = getattr(self, name)
            if not _is_real(value) or value < 0:
                raise ValueError(f"RLConfig.{name}={value!r} must be a finite number ≥ 0")
        if self.advantage in ("rloo", "grpo", "drgrpo") and self.group_size < 2:
            raise ValueError(f"RLConfig.group_size={self.group_size} must be ≥ 2 for the {self.advantage!r} baseline")
        if self.prompts_per_step * self.group_size % self.ppo_minibatches:
            raise ValueError(f"RLConfig.ppo_minibatches={self.ppo_minibatches} must divide the batch of "
                             f"{self.prompts_per_step * self.group_size} sequences")
        update = self.prompts_per_step * self.group_size // self.ppo_minibatches  # sequences per update
        if self.micro_batch_size and (self.micro_batch_size % self.group_size or update % self.micro_batch_size):
            fits = [m for m in range(self.group_size, update + 1, self.group_size) if update % m == 0]
            raise ValueError(f"RLConfig.micro_batch_size={self.micro_batch_size} must be a multiple of "
                             f"group_size={self.group_size} (whole prompt groups per pass) that divides the {update} "
                             f"sequences of each update (prompts_per_step × group_size / ppo_minibatches = "
                             f"{self.prompts_per_step} × {self.group_size} / {self.ppo_minibatches}); use "
                             + (f"one of {fits} or 0 (the whole update at once)" if fits else
                                "0 (the whole update at once), or fewer ppo_minibatches"))
        if self.policy_loss == "reinforce" and (self.ppo_epochs > 1 or self.ppo_minibatches > 1):
            raise ValueError("RLConfig.ppo_epochs/ppo_minibatches > 1 need policy_loss='ppo' "
                             "(REINFORCE is only valid for one on-policy update per batch)")
        if self.rollout_shards and self.prompts_per_step % self.rollout_shards:
            raise ValueError(f"RLConfig.rollout_shards={self.rollout_shards} must divide "
                             f"prompts_per_step={self.prompts_per_step}")
        if self.name and ("/" in self.name or self.name.startswith(".")):
            raise ValueError(f"RLConfig.name={self.name!r} must be a plain directory name")

    # ---- identity
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["lora_targets"] = list(self.lora_targets)
        return out

    def digest(self) -> str:
        """Hash of every field that affects results (not where they are written)."""
        d = self.to_dict()
        # micro_batch_size is how the same gradient is computed (accumulated over passes), like the device: a
        # finished run is not redone for it, and digests of runs made before the field existed stay valid.
        for key in ("checkpoint_every", "keep_checkpoints", "runs_dir", "name", "device", "micro_batch_size"):
            d.pop(key)
        return config_digest(d)

    def run_name(self) -> str:
        """Deterministic: ``<kl name>-b<beta>[-lag<k>][-lora]-s<seed>``, or ``nokl-…`` when β = 0."""
        if self.name:
            return self.name
        kl = "nokl" if self.kl.beta == 0 else f"{self.kl.name}-b{self.kl.beta:g}"
        parts = [kl]
        if self.async_lag:
            parts.append(f"lag{self.async_lag}")
        if self.policy_loss == "ppo":
            parts.append("ppo")
        if self.finetune == "lora":
            parts.append("lora")
        parts.append(f"s{self.seed}")
        return "-".join(parts)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"RLConfig.{name}={value!r} must be an integer ≥ 1")


def _nonnegative_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"RLConfig.{name}={value!r} must be an integer ≥ 0")


def _positive_float(name: str, value: Any) -> None:
    if not _is_real(value) or value <= 0:
        raise ValueError(f"RLConfig.{name}={value!r} must be a finite number > 0")


_FIELDS = {f.name for f in fields(RLConfig)}
_KL_FIELDS = {f.name for f in fields(KLConfig)}


def _coerce(value: str) -> Any:
    """``--set`` values are YAML scalars: ``0.1`` → float, ``true`` → bool, ``k3`` → str; also ``3e-5`` → float
    (YAML 1.1, which PyYAML follows, reads exponents without a dot as strings)."""
    parsed = yaml.safe_load(value)
    if isinstance(parsed, str):
        try:
            return float(parsed)
        except ValueError:
            pass
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted ``kl.beta=0.3`` for the KL section) to a raw config dict."""
    raw = {**raw, "kl": dict(raw.get("kl", {}))}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. kl.beta=0.3)")
        key, value = item.split("=", 1)
        if key.startswith("kl."):
            sub = key[3:]
            if sub not in _KL_FIELDS:
                raise ValueError(f"unknown KL key {sub!r}; valid keys are {', '.join(sorted(_KL_FIELDS))}")
            raw["kl"][sub] = _coerce(value)
        else:
            if key not in _FIELDS:
                raise ValueError(f"unknown config key {key!r}; valid keys are {', '.join(sorted(_FIELDS))}")
            raw[key] = _coerce(value)
    return raw


def from_dict(raw: dict[str, Any]) -> RLConfig:
    unknown = set(raw) - _FIELDS
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(unknown)}; valid keys are {', '.join(sorted(_FIELDS))}")
    kl = raw.get("kl", {})
    if isinstance(kl, dict):
        unknown_kl = set(kl) - _KL_FIELDS
        if unknown_kl:
            raise ValueError(f"unknown KL key(s) {sorted(unknown_kl)}; valid keys are {', '.join(sorted(_KL_FIELDS))}")
        base = dataclasses.asdict(RLConfig().kl)
        raw = {**raw, "kl": KLConfig(**{**base, **kl})}
    return RLConfig(**raw)


def load_config(path: str | None = None, overrides: list[str] | None = None) -> RLConfig:
    """Read a YAML config (or the defaults) and apply overrides; every error names the offending key."""
    raw: dict[str, Any] = {}
    if path is not None:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a config file must be a YAML mapping of key: value")
    return from_dict(apply_overrides(raw, overrides or []))
