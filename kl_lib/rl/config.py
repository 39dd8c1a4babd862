"""Configuration of an RL fine-tuning run: one dataclass, every field documented, validated before any compute.

A run is described by YAML (``configs/*.yaml``) or keyword overrides ``--set key=value`` (dotted keys reach
into the KL section: ``--set kl.estimator=k3``). :meth:`RLConfig.run_name` is a deterministic name, and
:meth:`digest` a hash of every field that changes results, so that a sweep can tell a finished run from a
changed one.

How text becomes a config (:func:`load_config`, :func:`from_dict`, :func:`apply_overrides`):

* a number field takes a number in any spelling Python's ``float()`` reads (``1e-3``, ``1E3``, ``.5``,
  ``1_000``), in a file as on the command line: PyYAML follows YAML 1.1, which reads ``1e-3`` as a string.
  An integer field takes integer spellings only (``1e3`` and ``3.0`` are refused, naming ``1000`` and ``3``), up
  to 2³¹ − 1; ``inf`` and ``nan`` are refused where a field needs a finite value;
* a true/false field takes YAML's unquoted booleans only (``"yes"`` in quotes is refused);
* ``lora_targets`` is a list, or one string of comma-separated module names (``q_proj`` or ``q_proj,v_proj``);
* ``model`` and ``runs_dir`` may not be empty, and no text field may be ``null``; ``--set`` gives a text field
  its value verbatim (``--set name=1e3`` is the name ``1e3``);
* ``kl`` is a mapping merged over the default KL settings. It takes the fields of ``kl_lib.config.KLConfig`` and
  of ``KLSetting`` (the library variants: ``value_clamp``, ``gradient_estimator``, ``local_reward``, …); when one
  of the latter has a value other than its default the config holds a ``KLSetting``, otherwise the plain
  ``KLConfig`` (so a run that names no variant keeps its name and digest). A setting this trainer cannot run is
  refused here, naming the field and why (:func:`check_kl_setting`);
* relative paths are read from the current directory (as ``from_pretrained`` and ``open`` do); a relative model
  or data directory that is missing there but present beside the config file is reported with where to run.

Every bad input is one :class:`ConfigError` line (a ``ValueError``; ``FileNotFoundError`` for a missing file)
that starts with the file, or the ``--set`` item, names the field (an unknown key with the closest valid one)
and says what to write instead. :func:`load_sweep_spec` reads and checks a sweep file the same way.

Defaults follow the paper's on-policy setting (RLOO, one gradient step per batch, sequence-sum KL with k1 in
the reward) at a scale that runs on two CPU cores.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import os
import re
import reprlib
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

import yaml

from kl_lib.config import (
    IMPORTANCE_WEIGHTINGS,
    PLACEMENTS,
    REWARD_NORMALIZATIONS,
    SEQUENCE_WEIGHTS,
    TOKEN_WEIGHTS,
    KLConfig,
    KLSetting,
    as_setting,
    check_choice,
    is_finite_number,
)
from kl_lib.estimators import ESTIMATORS, LIBRARY_ESTIMATORS
from kl_lib.files import config_digest
from kl_lib.objectives import AGGREGATIONS
from kl_lib.tasks import task_names

__all__ = ["ADVANTAGES", "FINETUNES", "KL_REWARD_BASELINES", "POLICY_LOSSES", "SWEEP_GROUP_KEYS", "SWEEP_KEYS",
           "ConfigError", "RLConfig", "apply_overrides", "check_kl_setting", "check_sweep_spec", "field_choices",
           "field_docs", "fields_help", "from_dict", "kl_config", "load_config", "load_sweep_spec", "read_yaml"]

ADVANTAGES = ("rloo", "grpo", "drgrpo")
POLICY_LOSSES = ("reinforce", "ppo")
KL_REWARD_BASELINES = ("none", "loo")
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
    forward itself instead of recomputing it (same gradient, a third less model compute; the decode graph is kept
    until the backward, about 11% more peak memory in ``benchmarks/bench_memory.py``'s LoRA run). False: always
    ``generate`` then recompute. Only for ``max_new_tokens`` ≤ ``kl_lib.rl.train.SHORT_ANSWER_TOKENS`` (16):
    longer budgets always sample without a graph, dropping finished rows, and recompute without most of the
    padding (``long_answers``): the same numbers up to rounding, about 2× TRL's speed at 48 tokens."""
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
    """The KL configuration (estimator, placement, beta, reward_to_go, importance_weighting, log_ratio_clamp), see
    kl_lib.config; a KLSetting for a library's variants (value_clamp, gradient_estimator, local_reward,
    token_weight, sequence_weight, reward_normalization with group_size = the run's group_size, std_epsilon)."""
    kl_reward_baseline: str = "none"
    """Baseline of the KL penalty in the reward (placement ``reward``/``both``; no effect otherwise): ``loo``
    subtracts from each sample's penalty β·Σ_t k_t the mean of the other samples' penalties in its prompt's group,
    so with ``advantage: rloo`` the update is RLOO on the folded reward R − β·Σ_t k_t: **the paper's form**.
    ``none`` (the default, this project's form before the study of issue 11) gives the penalty no baseline.
    Both are unbiased (``kl_lib.rl.losses.kl_reward_loo_baseline``). At its default the field is left out of
    :meth:`digest`, so runs made before it existed keep their identity."""
    aggregation: str = "sum"
    """How per-token terms of the policy loss and of the KL term are combined into an update batch's loss
    (``kl_lib.objectives.AGGREGATIONS``): ``sum`` over tokens, mean over sequences (docs/contract.md §3; verl
    seq-mean-token-sum); ``token_mean`` per sequence (verl seq-mean-token-mean, TRL grpo); ``global_token_mean``
    over the update batch's valid tokens, on every process together (verl token-mean, TRL dapo/bnpo, NeMo-RL
    token_level_loss); ``constant``: the sum divided by aggregation_constant (verl seq-mean-token-sum-norm, TRL
    dr_grpo)."""
    aggregation_constant: float | None = None
    """``aggregation: constant`` only: the divisor C; null = max_new_tokens (TRL's dr_grpo divides by
    max_completion_length). Left out of :meth:`digest` when null."""
    async_lag: int = 0
    """Off-policy: rollouts come from the policy of this many steps earlier (0 = on-policy)."""
    # ---- optimisation
    finetune: str = "full"
    """``full`` (reference = a frozen copy) or ``lora`` (reference = the base with adapters disabled)."""
    lora_rank: int = 8
    """LoRA only: rank of the adapters."""
    lora_alpha: float = 16.0
    """LoRA only: scaling numerator (the adapters' update is scaled by lora_alpha / lora_rank)."""
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
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables clipping; the unclipped norm is always logged)."""
    divergence_loss: float = 1e4
    """|loss| above this (or a NaN/Inf loss or gradient) marks the run diverged and stops it."""
    # ---- bookkeeping
    checkpoint_every: int = 25
    """Save a resumable checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 1
    """Older checkpoints kept besides the newest (≥ 1, so a damaged newest one has an intact predecessor)."""
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
            _check_keys("KL", self.kl, _KL_FIELDS)
            object.__setattr__(self, "kl", kl_config(self.kl))
        if not isinstance(self.kl, KLConfig):
            raise ValueError(f"RLConfig.kl={_short(self.kl)} must be a mapping of KL settings, e.g. kl: {{estimator: k3, "
                             "placement: loss} (on the command line --set kl.estimator=k3)")
        object.__setattr__(self, "lora_targets", _module_names(self.lora_targets))
        _check_fields(self)
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
        check_kl_setting(self)

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
        # added after the first study: at its default it is left out, so the earlier runs' digests stay valid
        if d["kl_reward_baseline"] == "none":
            d.pop("kl_reward_baseline")
        if d["aggregation_constant"] is None:
            d.pop("aggregation_constant")
        return config_digest(d)

    def run_name(self) -> str:
        """Deterministic: ``<kl name>-b<beta>[-lag<k>][-ppo][-mb<m>][-ep<e>][-lora]-s<seed>``, or ``nokl-…`` when
        β = 0 (``-mb``/``-ep`` only for more than one PPO minibatch or epoch per batch)."""
        if self.name:
            return self.name
        kl = "nokl" if self.kl.beta == 0 else f"{self.kl.name}-b{self.kl.beta:g}"
        parts = [kl]
        if self.async_lag:
            parts.append(f"lag{self.async_lag}")
        if self.policy_loss == "ppo":
            parts.append("ppo")
        if self.ppo_minibatches > 1:
            parts.append(f"mb{self.ppo_minibatches}")
        if self.ppo_epochs > 1:
            parts.append(f"ep{self.ppo_epochs}")
        if self.finetune == "lora":
            parts.append("lora")
        parts.append(f"s{self.seed}")
        return "-".join(parts)


# ------------------------------------------------------------------------------------------------------------
# Each field on its own
# ------------------------------------------------------------------------------------------------------------

_MAX_INT = 2**31 - 1
"""The largest integer any field takes: a step count, seed or size beyond it is a typo (and overflows seeds)."""
_LORA_EXAMPLE = "lora_targets: [q_proj, v_proj] (on the command line --set lora_targets=q_proj,v_proj)"


def field_choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of each RLConfig field that takes one of a fixed set (what the checks and ``--help`` use)."""
    return {"advantage": ADVANTAGES, "policy_loss": POLICY_LOSSES, "finetune": FINETUNES, "aggregation": AGGREGATIONS,
            "kl_reward_baseline": KL_REWARD_BASELINES, "device": DEVICES, "dtype": DTYPES,
            "rollout_backend": ROLLOUT_BACKENDS, "chat_template": CHAT_TEMPLATES, "task": tuple(task_names())}


def _check_fields(cfg: RLConfig) -> None:
    """Type, range and choices of each field; the checks between fields are in ``RLConfig.__post_init__``."""
    for name, valid in field_choices().items():
        check_choice(f"RLConfig.{name}", getattr(cfg, name), valid)
    for name in ("model", "runs_dir", "data_dir", "name"):
        _text(name, getattr(cfg, name), required=name in ("model", "runs_dir"))
    for name in ("rollout_grad", "gradient_checkpointing"):
        value = getattr(cfg, name)
        if not isinstance(value, bool):
            # a ValueError like every config error, which the CLI reports as one
            raise ValueError(  # noqa: TRY004
                f"RLConfig.{name}={value!r} must be true or false (unquoted in YAML: {name}: false)")
    if not is_finite_number(cfg.vllm_gpu_memory_utilization) or not 0 < cfg.vllm_gpu_memory_utilization < 1:
        raise ValueError(f"RLConfig.vllm_gpu_memory_utilization={_short(cfg.vllm_gpu_memory_utilization)} must be "
                         "a number in (0, 1)")
    for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "ppo_epochs", "ppo_minibatches",
                 "lora_rank", "checkpoint_every", "keep_checkpoints"):
        _int_at_least(name, getattr(cfg, name), 1)
    for name in ("seed", "async_lag", "rollout_shards", "micro_batch_size"):
        _int_at_least(name, getattr(cfg, name), 0)
    for name in ("temperature", "lr", "clip_eps", "lora_alpha", "divergence_loss"):
        value = getattr(cfg, name)
        if not is_finite_number(value) or value <= 0:
            raise ValueError(f"RLConfig.{name}={_short(value)} must be a finite number > 0")
    for name in ("weight_decay", "max_grad_norm"):
        value = getattr(cfg, name)
        if not is_finite_number(value) or value < 0:
            raise ValueError(f"RLConfig.{name}={_short(value)} must be a finite number ≥ 0")
    _check_aggregation_constant(cfg)


def _check_aggregation_constant(cfg: RLConfig) -> None:
    c = cfg.aggregation_constant
    if c is None:
        return
    if cfg.aggregation != "constant":
        raise ValueError(f"RLConfig.aggregation_constant={_short(c)} is only used with aggregation: constant (it is "
                         f"{cfg.aggregation!r}); remove it or set aggregation: constant")
    if not is_finite_number(c) or c <= 0:
        raise ValueError(f"RLConfig.aggregation_constant={_short(c)} must be a finite number > 0 (e.g. the maximum "
                         "response length), or null for max_new_tokens")


def check_kl_setting(cfg: RLConfig) -> None:
    """Refuse, naming the field and why, a ``KLSetting`` that this trainer cannot run as the setting means it.

    The trainer computes the KL term with ``kl_lib.objectives.kl_term`` on each pass's rows, so every variant
    runs as written except where it needs more than those rows: the group normalisation of the reward penalty
    (``reward_normalization``) groups contiguous rows, so it needs the trainer's prompt groups (``kl.group_size``
    equal to ``group_size``) kept whole in every update (``ppo_minibatches`` 1; micro-batches hold whole groups),
    and it already centres the penalty within the group (no ``kl_reward_baseline``).
    """
    kl = cfg.kl
    if not isinstance(kl, KLSetting):
        return
    if not isinstance(kl.local_reward, bool):
        raise ValueError(f"RLConfig.kl.local_reward={_short(kl.local_reward)} must be true or false (unquoted in "
                         "YAML)")
    if kl.reward_normalization == "none":
        return
    where = f"RLConfig.kl.reward_normalization={kl.reward_normalization!r}"
    if kl.group_size != cfg.group_size:
        raise ValueError(f"RLConfig.kl.group_size={_short(kl.group_size)} must equal RLConfig.group_size="
                         f"{cfg.group_size}: the trainer normalises the KL penalty within each prompt's group of "
                         f"samples; set kl.group_size={cfg.group_size} (or group_size={_short(kl.group_size)})")
    if cfg.ppo_minibatches > 1:
        raise ValueError(f"{where} cannot run with ppo_minibatches={cfg.ppo_minibatches}: minibatches are shuffled "
                         "rows that split the prompt groups the penalty is normalised in; use ppo_minibatches: 1")
    if cfg.kl_reward_baseline != "none":
        raise ValueError(f"{where} cannot run with kl_reward_baseline={cfg.kl_reward_baseline!r}: the group "
                         "normalisation already centres the penalty within its group; use kl_reward_baseline: none")


def _short(value: Any) -> str:
    """``repr`` cut to a readable length (a 400-digit integer, a long list)."""
    return reprlib.repr(value)


def _int_at_least(name: str, value: Any, low: int) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= _MAX_INT:
        return
    hint = ""
    if isinstance(value, (float, str)):  # 3.0 or 1e3: a whole number in a float's spelling
        whole = _read_number(float, value)
        if is_finite_number(whole) and whole.is_integer() and low <= whole <= _MAX_INT:
            hint = f"; write {int(whole)}, without a decimal point or exponent"
    raise ValueError(f"RLConfig.{name}={_short(value)} must be an integer ≥ {low} and ≤ {_MAX_INT}{hint}")


def _text(name: str, value: Any, required: bool) -> None:
    """A path or name: text, and not empty when ``required`` (``model:`` with nothing after it is ``null``)."""
    if value is None or (required and value == ""):
        default = RLConfig.__dataclass_fields__[name].default
        raise ValueError(f"RLConfig.{name} is empty; give it a value, or leave it out for "
                         + (f"the default {default!r}" if default else _EMPTY_MEANS[name]))
    if not isinstance(value, str):
        raise ValueError(f"RLConfig.{name}={_short(value)} must be text; quote it in YAML: {name}: \"{value}\"")


_EMPTY_MEANS = {"data_dir": "the task's default data", "name": "the automatic RLConfig.run_name()"}


def _module_names(value: Any) -> tuple[str, ...]:
    """``lora_targets`` as a tuple of module names, from a list, or from one string of comma-separated names
    (``q_proj`` or ``q_proj,v_proj``: what ``--set lora_targets=q_proj,v_proj`` gives), never split into letters."""
    names = [part.strip() for part in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, (list, tuple)) or not names:
        raise ValueError(f"RLConfig.lora_targets={_short(value)} must be a non-empty list of module names, e.g. "
                         + _LORA_EXAMPLE)
    for name in names:
        if not isinstance(name, str) or not re.fullmatch(r"[\w.]+", name):
            raise ValueError(f"RLConfig.lora_targets has {_short(name)}, which is not a module name; separate names "
                             f"with commas: {_LORA_EXAMPLE}")
    return tuple(names)


# ------------------------------------------------------------------------------------------------------------
# Configs as text: YAML files and --set overrides
# ------------------------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A bad config file, sweep file or override: one line naming the file or field, and what to write instead."""


_FIELDS = get_type_hints(RLConfig)
_KL_FIELDS = get_type_hints(KLSetting)
_PLAIN_KL_FIELDS = {f.name for f in dataclasses.fields(KLConfig)}
_VARIANT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(KLSetting) if f.name not in _PLAIN_KL_FIELDS}


def _is_default(value: Any, default: Any) -> bool:
    return value is default or (type(value) is type(default) and value == default)


def kl_config(values: dict[str, Any]) -> KLConfig:
    """The KL section from a mapping of its fields: a ``KLSetting`` when a variant field (``value_clamp``, …) has
    a value other than its default or the estimator is a library one (``abs``), else the plain ``KLConfig`` (the
    variant fields at their defaults dropped), so that a config naming no variant keeps its digest."""
    variant = any(key in _VARIANT_DEFAULTS and not _is_default(value, _VARIANT_DEFAULTS[key])
                  for key, value in values.items())
    if variant or (isinstance(values.get("estimator"), str) and values["estimator"] in LIBRARY_ESTIMATORS):
        # a whole number written for a new float field (value_clamp: 10) is that float, so that it has one digest
        floats = {key: float(v) for key, v in values.items() if key in ("value_clamp", "std_epsilon")
                  and isinstance(v, int) and not isinstance(v, bool)}
        return KLSetting(**{**values, **floats})
    return KLConfig(**{key: value for key, value in values.items() if key in _PLAIN_KL_FIELDS})


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[str, yaml.Mark] = {}
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                mark = key_node.start_mark
                if key_node.value in seen:
                    raise ConfigError(f"{mark.name}, line {mark.line + 1}: key {key_node.value!r} is given twice "
                                      f"(also on line {seen[key_node.value].line + 1}); keep one")
                seen[key_node.value] = mark
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> Any:
    """The YAML document in ``path`` (``None`` when empty). A missing file raises ``FileNotFoundError``; a
    directory, an unreadable file, bad syntax (with its line) or a repeated key raise ``ConfigError``."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_Loader)  # noqa: S506 — a SafeLoader
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (looked for {os.path.abspath(path)}); relative paths are read "
                                "from the current directory: run from the repository root or give an absolute path"
                                ) from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory; give a YAML file, e.g. configs/base.yaml") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not a UTF-8 text file; give a YAML file, e.g. configs/base.yaml") from None
    except OSError as err:
        raise ConfigError(f"{path} cannot be read ({err.strerror}); check its permissions") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else f"{path}"
        problem = getattr(err, "problem", None) or str(err)
        message = (f"{where}: not valid YAML ({problem}); write one key: value per line, indent with spaces, "
                   "close every bracket and quote")
        raise ConfigError(" ".join(message.split())) from None


def _read_number(kind: Any, value: Any) -> Any:
    """A string where the field takes a number, read as Python reads it: ``1e-3``, ``1E3``, ``.5``, ``1_000``
    (PyYAML follows YAML 1.1, which reads ``1e-3`` as a string). Integer fields take integer spellings only.
    Anything else comes back as it is, for the field's own check to report."""
    if not isinstance(value, str):
        return value
    try:
        if kind is int or int in get_args(kind):
            return int(value)
        if kind is float or float in get_args(kind):
            return float(value)
    except ValueError:
        pass
    return value


def _check_keys(what: str, keys: Any, valid: Any) -> None:
    """Refuse a key not in ``valid``, naming the closest valid one; the KL section's (a short list) are listed too."""
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(str(key), list(valid), n=1)
            listed = f"valid keys are {', '.join(sorted(valid))}"
            hint = f"did you mean {close[0]!r}?" if close else listed
            if close and what == "KL":
                hint += f" ({listed})"
            raise ConfigError(f"unknown {what} key {key!r}; {hint}")


def _kl_mapping(value: Any) -> dict[str, Any]:
    """The ``kl`` section as a mapping of known KL keys, its numbers read as numbers."""
    if value is None:
        raise ConfigError("RLConfig.kl is empty; put its settings indented below it, e.g. kl: {estimator: k1, "
                          "placement: reward, beta: 0.1}, or delete the line for that default")
    if not isinstance(value, dict):
        raise ConfigError(f"RLConfig.kl={_short(value)} must be a mapping of KL settings, e.g. kl: {{estimator: k3, "
                          "placement: loss} (on the command line --set kl.estimator=k3)")
    _check_keys("KL", value, _KL_FIELDS)
    return {key: _read_number(_KL_FIELDS[key], v) for key, v in value.items()}


def _parse_override(kind: Any, text: str) -> Any:
    """An override's value: verbatim for text fields, else a YAML value (``true``, ``0.1``, ``[q_proj, v_proj]``)."""
    if kind is str:
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # the field's check reports it


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted ``kl.beta=0.3`` for the KL section) to a raw config dict."""
    raw = dict(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        try:
            if not sep:
                raise ConfigError("must look like key=value (e.g. kl.beta=0.3)")
            if key.startswith("kl."):
                _check_keys("KL", [key[3:]], _KL_FIELDS)
                kl = raw.get("kl", {})
                if isinstance(kl, dict):  # else from_dict reports the file's kl section
                    raw["kl"] = {**kl, key[3:]: _parse_override(_KL_FIELDS[key[3:]], text)}
            else:
                _check_keys("config", [key], _FIELDS)
                raw[key] = _parse_override(_FIELDS[key], text)
        except ConfigError as err:
            raise ConfigError(f"--set {item}: {err}") from None
    return raw


def from_dict(raw: dict[str, Any]) -> RLConfig:
    """An ``RLConfig`` from a mapping as read from YAML: ``kl`` is a mapping merged over the default KL settings,
    numbers written as strings are read as numbers; an error names the field and what to write."""
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping of key: value (e.g. steps: 100), not {_short(raw)}")
    _check_keys("config", raw, _FIELDS)
    raw = {key: _read_number(_FIELDS[key], value) for key, value in raw.items()}
    if "kl" in raw:
        raw["kl"] = kl_config({**dataclasses.asdict(RLConfig().kl), **_kl_mapping(raw["kl"])})
    return RLConfig(**raw)


def _check_relative_paths(cfg: RLConfig, path: str | None) -> None:
    """A relative model or data directory is read from the current directory. One missing there but present
    beside the config file (or the checkout of this package) means the run was started from another directory:
    say so, rather than ask for ``make base-model``. One missing everywhere is left to the model and data checks."""
    roots = [Path(__file__).resolve().parents[2]]
    if path is not None:
        roots = [*Path(path).resolve().parents, *roots]
    for name in ("model", "data_dir"):
        value = getattr(cfg, name)
        if not value or Path(value).expanduser().is_absolute() or os.path.exists(value):
            continue
        for root in roots:
            if (root / value).is_dir():
                raise ConfigError(f"RLConfig.{name}={value!r} is read from the current directory, where "
                                  f"{os.path.abspath(value)} does not exist, but {root / value} does: run from "
                                  f"{root} or give the absolute path")


def load_config(path: str | None = None, overrides: list[str] | None = None) -> RLConfig:
    """Read a YAML config (or the defaults) and apply overrides. Every error is one line that names the file or
    the ``--set`` item and the field: ``ConfigError`` (a ``ValueError``), or ``FileNotFoundError`` for a missing
    config file."""
    raw = {} if path is None else read_yaml(path)
    if raw is None:  # an empty file: the defaults
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config file must be a YAML mapping of key: value (e.g. steps: 100), not "
                          f"{_short(raw)}")
    if "groups" in raw or "base" in raw:
        raise ConfigError(f"{path} is a sweep file (it has base/groups), not one run's config; run it with "
                          f"python -m kl_lib.rl.sweep {path}")
    raw = apply_overrides(raw, overrides or [])
    try:
        cfg = from_dict(raw)
        _check_relative_paths(cfg, path)
    except ValueError as err:
        raise ConfigError(f"{path}: {err}" if path is not None else str(err)) from None
    return cfg


# ------------------------------------------------------------------------------------------------------------
# Help text, generated from the dataclasses so that it cannot go stale
# ------------------------------------------------------------------------------------------------------------


def field_docs(cls: type) -> dict[str, str]:
    """Each field's docstring (the string literal right after the field in ``cls``'s source), whitespace collapsed
    and reStructuredText's double backquotes removed; ``""`` for a field without one."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, [*body[1:], None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            is_doc = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                and isinstance(after.value.value, str)
            text = after.value.value if is_doc else ""
            docs[node.target.id] = " ".join(text.replace("``", "").replace(":meth:", "").replace("`", "").split())
    return docs


def fields_help(width: int = 100) -> str:
    """Every RLConfig field (and the KL section's as ``kl.<field>``): type, default, allowed values and doc, as the
    ``--help`` of the trainer and the sweep print them."""
    default = RLConfig()
    kl_choices = {"estimator": (*ESTIMATORS, *LIBRARY_ESTIMATORS), "placement": PLACEMENTS,
                  "importance_weighting": IMPORTANCE_WEIGHTINGS, "token_weight": TOKEN_WEIGHTS,
                  "sequence_weight": SEQUENCE_WEIGHTS, "reward_normalization": REWARD_NORMALIZATIONS}
    rows = []
    for prefix, cls, values, choices, docs in (
            ("", RLConfig, default, field_choices(), field_docs(RLConfig)),
            ("kl.", KLSetting, as_setting(default.kl), kl_choices, {**field_docs(KLConfig), **field_docs(KLSetting)})):
        for f in dataclasses.fields(cls):
            if prefix == "" and f.name == "kl":
                continue  # listed field by field below
            value = getattr(values, f.name)
            value = list(value) if isinstance(value, tuple) else value
            head = f"  {prefix}{f.name}: {f.type} = {value!r}"
            if f.name in choices:
                head += f"  {{{', '.join(choices[f.name])}}}"
            rows.append(head)
            rows.append(textwrap.fill(docs[f.name], width, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(["config fields (KEY: VALUE in the --config YAML, or --set KEY=VALUE; name: type = default "
                      "{allowed values}):", *rows])


# ------------------------------------------------------------------------------------------------------------
# Sweep files (kl_lib.rl.sweep documents the format)
# ------------------------------------------------------------------------------------------------------------

SWEEP_KEYS = ("base", "eval", "groups", "smoke")
SWEEP_GROUP_KEYS = ("betas", "kl", "seeds", "set")
_PER_RUN = {"seed": "seeds are listed per group: seeds: [0, 1, 2]",
            "kl": "KL settings are listed per group: kl: [{estimator: k1, placement: reward}]"}


def _run_fields(where: str, value: Any, extra: tuple[str, ...] = ()) -> None:
    """``base``, ``smoke`` or a group's ``set``: an optional mapping of RLConfig fields (and ``extra`` keys),
    without the per-run ``seed`` and ``kl``, which the sweep would silently replace."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise ConfigError(f"{where}={_short(value)} must be a mapping of RLConfig fields, e.g. {{steps: 100}}")
    _check_keys(f"{where}", value, {*_FIELDS, *extra})
    for key, why in _PER_RUN.items():
        if key in value:
            raise ConfigError(f"{where}.{key} would be replaced in every run: {why}")


def _list_of(where: str, value: Any, kind: type, example: str) -> None:
    """``seeds`` (integers ≥ 0) or ``betas`` (finite numbers ≥ 0): a non-empty list, when given."""
    if value is None:
        return
    items = [_read_number(kind, v) for v in value] if isinstance(value, list) else []
    if not items or not all(_nonnegative(kind, v) for v in items):
        what = "integers ≥ 0" if kind is int else "finite numbers ≥ 0"
        raise ConfigError(f"{where}={_short(value)} must be a non-empty list of {what}, e.g. {example}")


def _nonnegative(kind: type, value: Any) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_INT
    return is_finite_number(value) and value >= 0


def _check_group(where: str, group: Any) -> None:
    if not isinstance(group, dict) or not group:
        raise ConfigError(f"{where}={_short(group)} must be a mapping with kl (and seeds, betas, set), e.g. "
                          "{kl: [{estimator: k1, placement: reward}], seeds: [0, 1, 2], betas: [0.1]}")
    _check_keys(f"{where}", group, SWEEP_GROUP_KEYS)
    _run_fields(f"{where}.set", group.get("set"))
    _list_of(f"{where}.seeds", group.get("seeds"), int, "seeds: [0, 1, 2]")
    _list_of(f"{where}.betas", group.get("betas"), float, "betas: [0.05, 0.3]")
    kl = group.get("kl")
    if kl is not None and (not isinstance(kl, list) or not kl or not all(isinstance(e, dict) for e in kl)):
        raise ConfigError(f"{where}.kl={_short(kl)} must be a non-empty list of KL settings, e.g. "
                          "kl: [{estimator: k1, placement: reward}, {estimator: k3, placement: loss}]")
    for i, entry in enumerate(kl or []):
        try:
            _check_keys("KL", entry, _KL_FIELDS)
            if "beta" in entry and not _nonnegative(float, _read_number(float, entry["beta"])):
                raise ConfigError(f"beta={_short(entry['beta'])} must be a finite number ≥ 0 (beta: 0 is the no-KL "
                                  "control), or left out to take the group's betas")
        except ConfigError as err:
            raise ConfigError(f"{where}.kl[{i}]: {err}") from None


def check_sweep_spec(spec: Any) -> None:
    """Raise ``ConfigError`` naming the key (``groups.on_policy.seeds``) unless ``spec`` has a sweep's shape: known
    top-level keys; ``base`` and ``smoke`` mappings of RLConfig fields (``smoke`` may also hold ``seeds``, ``betas``
    and ``eval``); an ``eval`` mapping; and a non-empty ``groups`` mapping of groups with known keys, ``seeds`` a
    list of integers, ``betas`` a list of numbers, ``kl`` a list of KL mappings, ``set`` a mapping. The values
    themselves are checked when the runs are built (:func:`from_dict`)."""
    if not isinstance(spec, dict):
        found = "nothing" if spec is None else _short(spec)
        raise ConfigError(f"a sweep is a mapping with base and groups (see configs/sweep.yaml); found {found}")
    _check_keys("sweep", spec, SWEEP_KEYS)
    _run_fields("base", spec.get("base"))
    smoke = spec.get("smoke")
    _run_fields("smoke", smoke, extra=("seeds", "betas", "eval"))
    for where, value in (("eval", spec.get("eval")), ("smoke.eval", (smoke or {}).get("eval"))):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{where}={_short(value)} must be a mapping of evaluation settings, e.g. "
                              "{num_samples: 4}")
    _list_of("smoke.seeds", (smoke or {}).get("seeds"), int, "seeds: [0]")
    _list_of("smoke.betas", (smoke or {}).get("betas"), float, "betas: [0.1]")
    groups = spec.get("groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"groups={_short(groups)} must be a non-empty mapping of named groups, e.g. "
                          "groups: {main: {kl: [{estimator: k1, placement: reward}], seeds: [0, 1]}}")
    for name, group in groups.items():
        _check_group(f"groups.{name}", group)


def load_sweep_spec(path: str | os.PathLike) -> dict[str, Any]:
    """The sweep file at ``path``, read (:func:`read_yaml`) and checked (:func:`check_sweep_spec`); every error is
    one ``ConfigError`` line starting with the file's name (``FileNotFoundError`` for a missing file)."""
    spec = read_yaml(path)
    try:
        check_sweep_spec(spec)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    return spec
