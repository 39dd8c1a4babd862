"""Rollouts with vLLM's offline engine (optional extra ``vllm``, CUDA GPUs only), synced from the trainer.

:class:`VLLMSampler` is a drop-in for :func:`kl_lib.rl.rollout.generate`: same arguments, same
:class:`~kl_lib.rl.rollout.Rollout` back, with the same conventions (``response_ids`` ``(B, R)`` right-padded
with ``pad_token_id`` after the first EOS, ``response_mask`` True up to and including it, R = the longest
response in the batch, ``behavior_logp`` float32 and 0 at masked positions, texts decoded with
``skip_special_tokens``). ``transformers`` stays the default backend; this one is picked with
``rollout_backend = "vllm"``. Requires vLLM >= 0.10.2 (see log-probs below).

**Weight sync.** The engine lives in the trainer's process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set before the
engine is built unless the caller set it), so a sync is a tensor hand-off, not IPC. :meth:`VLLMSampler.sync_weights`
builds :func:`merged_state_dict` (HF checkpoint names; a peft LoRA policy is pushed as base + B·A·scale without
touching the policy; vLLM's own LoRA mode is not used) and calls vLLM's public ``LLM.collective_rpc(fn,
args=(weights,))`` with a function that runs ``worker.get_model().load_weights(weights)`` on the worker (in process,
so nothing is serialised and GPU tensors are copied device to device): the model's own loader maps HF names
onto vLLM's fused parameters (q/k/v -> qkv_proj, gate/up -> gate_up_proj) and copies (and casts to the engine's
dtype) in place, so CUDA graphs stay valid. Without ``collective_rpc`` it falls back to the attribute path
``llm.llm_engine.model_executor.driver_worker[.worker].model_runner``. The prefix cache is then reset: cached KV
blocks were computed by the old weights. When to sync is the caller's choice: before every rollout (on-policy), or
with the weights of ``async_lag`` steps ago (off-policy).

**Log-probs.** ``behavior_logp`` must be log μ of the *tempered* distribution that was sampled, as the trainer's
importance weights and PPO ratios use it. vLLM V1 returns by default ``raw_logprobs``: from the model's logits
before temperature. The engine is built with ``logprobs_mode="processed_logprobs"``, which since vLLM 0.10.2 means
after every processor, temperature included (0.10.0/0.10.1 had the mode but left temperature out, hence the floor).
We sample with no top-k/top-p/min-p (the plain tempered softmax, as the paper and ``rollout.generate`` do), so
processed log-probs are exactly log softmax(z / T) of the sampled token: ``SamplingParams(logprobs=0)`` returns the
sampled token's value only.

**Seeds and groups.** One request per row with ``SamplingParams(seed=seed + row)``: each request has its own
generator, so a row's random draws depend on its seed alone, not on how the engine batches requests (its
logits do, up to bf16 rounding: bit-for-bit repeats need the same batch). We do not use
``SamplingParams(n=group_size)``: V1 fans ``n`` out into ``n`` child requests anyway (seeds ``seed + i``), so it
saves nothing; the rows of a group share their prompt's KV blocks through vLLM's automatic prefix caching.
vLLM's random streams differ from torch's, so the two backends draw different (equally distributed) samples.

GPU-only and optional: importing this module never imports vLLM; :func:`check_available` (called by the
constructor) says what is missing, from installed metadata, without importing it.

**Tests** (``tests/test_vllm_backend.py``). On CPU, without vLLM: :func:`merged_state_dict` against peft's
``merge_and_unload`` (policy left unchanged), :func:`rollout_from_token_lists` on hand-built lists and as the exact
inverse of a ``rollout.generate`` output, :func:`prompt_token_lists`, :func:`sampling_kwargs`. On a CUDA machine with
vLLM (skipped otherwise, saying why): the engine's log-probs against ``rollout.token_logprobs`` at T != 1 and
after a sync of perturbed (full and LoRA) weights.
"""

from __future__ import annotations

import importlib.metadata
import operator
import os
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kl_lib.rl.rollout import Rollout

__all__ = ["MIN_VLLM_VERSION", "VLLMSampler", "check_available", "merged_state_dict", "prompt_token_lists",
           "rollout_from_token_lists", "sampling_kwargs"]

MIN_VLLM_VERSION = (0, 10, 2)  # logprobs_mode="processed_logprobs" includes temperature from this release on
_INSTALL_HINT = "install the optional extra: pip install -e '.[vllm]' (CUDA only)"


# ------------------------------------------------------------------------------------------------------------
# Pure parts: no vLLM needed (tested on CPU)
# ------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def merged_state_dict(policy: torch.nn.Module) -> dict[str, Tensor]:
    """The policy's full weights under HF checkpoint names, with active LoRA adapters merged in.

    For a plain model this is ``policy.state_dict()`` (tensors shared, nothing copied). For a peft model the names
    lose peft's ``base_model.model.`` prefix and ``.base_layer`` infix, the adapter tensors (``lora_A``/``lora_B``…)
    are dropped, and each adapted weight is replaced by a new tensor W + Σ_active B·A·scale, what
    ``merge_and_unload`` would produce, while the policy itself is not modified (adapters stay unmerged and
    trainable). Inside ``policy.disable_adapter()`` the base weights come back. Consumers must not write into the
    returned tensors: unadapted ones share storage with the policy.
    """
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    lora: dict[str, LoraLayer] = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "ModulesToSaveWrapper":
            raise NotImplementedError(f"peft modules_to_save ({name}) is not supported by merged_state_dict")
        if isinstance(module, BaseTunerLayer):
            if not isinstance(module, LoraLayer):
                raise NotImplementedError(f"{name} is a {type(module).__name__}: only LoRA adapters can be merged")
            lora[name] = module

    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        layer = _owning_layer(key, lora)
        if layer is None:
            out[key] = value
            continue
        rest = key[len(layer) + 1:]
        if rest.startswith("base_layer."):  # the wrapped module's own tensors, under its HF name
            out[f"{layer}.{rest[len('base_layer.'):]}"] = value
        # anything else under a LoRA layer is adapter state (lora_A, lora_B, lora_embedding_*, …): not a weight

    for name, module in lora.items():
        if module.merged or module.disable_adapters:  # already in the base weight, or adapters switched off
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A or a in module.lora_embedding_A]
        if not adapters:
            continue
        if any(module.use_dora.get(a, False) for a in adapters):
            raise NotImplementedError(f"{name}: DoRA adapters cannot be merged by merged_state_dict")
        key = f"{name}.weight"
        weight = out[key]
        delta = sum(module.get_delta_weight(a) for a in adapters)
        out[key] = weight + delta.to(weight.dtype)  # a new tensor: the policy's weight is left alone
    return out


def _owning_layer(key: str, layers: dict[str, Any]) -> str | None:
    """The name of the innermost entry of ``layers`` that ``key`` (a state-dict key) belongs to, if any."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in layers:
            return prefix
    return None


def prompt_token_lists(prompt_ids: Tensor, prompt_mask: Tensor) -> list[list[int]]:
    """The real tokens of each row of padded prompts ``(B, P)``, as vLLM takes them (``prompt_token_ids``).

    Dropping the padding changes nothing for the model: ``rollout.generate`` gives left-padded rows positions from
    the attention mask, so each row is encoded as if it were alone.
    """
    keep = prompt_mask.bool().cpu()
    ids = prompt_ids.cpu()
    return [row[m].tolist() for row, m in zip(ids, keep)]


def sampling_kwargs(batch_size: int, *, max_new_tokens: int, temperature: float, seed: int,
                    eos_token_id: int) -> list[dict[str, Any]]:
    """Keyword arguments of ``vllm.SamplingParams`` for each of ``batch_size`` rows (row b gets ``seed + b``).

    The plain tempered softmax: top-k, top-p and min-p are left at vLLM's "off" defaults (their spelling of off
    changed across versions: ``top_k`` -1 vs 0), penalties at neutral. ``logprobs=0`` returns the sampled token's
    log-prob only; ``detokenize=False`` because texts are decoded here, exactly as ``rollout.generate`` does.
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0 (vLLM samples greedily at 0; "
                         "rollout.generate does not)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be >= 1")
    return [{"n": 1, "temperature": float(temperature), "top_p": 1.0, "max_tokens": int(max_new_tokens),
             "logprobs": 0, "seed": int(seed) + b, "stop_token_ids": [int(eos_token_id)], "ignore_eos": False,
             "detokenize": False}
            for b in range(batch_size)]


def rollout_from_token_lists(prompt_ids: Tensor, prompt_mask: Tensor, sampled: Sequence[Sequence[int]],
                             sampled_logprobs: Sequence[Sequence[float]], eos_token_id: int, pad_token_id: int,
                             tokenizer) -> Rollout:
    """Pad per-row responses (token ids and the sampler's log-probs of them) into a :class:`Rollout`.

    Row b's response is cut after its first EOS (inclusive), like ``rollout.response_mask``; ``finished`` says
    whether it has one. R is the longest response, as in ``rollout.generate`` (whose R is the number of
    generation steps: all rows finished, or the budget). Tensors are on ``prompt_ids``'s device.
    """
    B = prompt_ids.shape[0]
    if not len(sampled) == len(sampled_logprobs) == B:
        raise ValueError(f"{len(sampled)} responses and {len(sampled_logprobs)} log-prob lists for {B} prompts")
    rows: list[tuple[list[int], list[float], bool]] = []
    for b, (ids, lps) in enumerate(zip(sampled, sampled_logprobs)):
        ids, lps = list(ids), list(lps)
        if len(ids) != len(lps):
            raise ValueError(f"row {b}: {len(ids)} tokens but {len(lps)} log-probs")
        finished = eos_token_id in ids
        if finished:
            end = ids.index(eos_token_id) + 1
            ids, lps = ids[:end], lps[:end]
        rows.append((ids, lps, finished))

    R = max((len(ids) for ids, _, _ in rows), default=0)
    device = prompt_ids.device
    response_ids = torch.full((B, R), pad_token_id, dtype=prompt_ids.dtype)
    mask = torch.zeros((B, R), dtype=torch.bool)
    behavior_logp = torch.zeros((B, R), dtype=torch.float32)
    for b, (ids, lps, _) in enumerate(rows):
        n = len(ids)
        response_ids[b, :n] = torch.tensor(ids, dtype=prompt_ids.dtype)
        mask[b, :n] = True
        behavior_logp[b, :n] = torch.tensor(lps, dtype=torch.float32)
    finished = torch.tensor([f for _, _, f in rows], dtype=torch.bool)
    texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, response_ids.to(device), mask.to(device), finished.to(device),
                   behavior_logp.to(device), texts)


# ------------------------------------------------------------------------------------------------------------
# The engine (needs vLLM and a CUDA GPU)
# ------------------------------------------------------------------------------------------------------------


def _parse_version(version: str) -> tuple[int, int, int]:
    """``"0.10.2rc1.dev3+gabc"`` -> ``(0, 10, 2)``: the release part, enough for a minimum-version check."""
    numbers = [int(x) for x in re.findall(r"\d+", version.split("+")[0].split("rc")[0].split("dev")[0])[:3]]
    return tuple(numbers + [0] * (3 - len(numbers)))  # type: ignore[return-value]


def check_available() -> None:
    """Raise, saying what is missing, unless vLLM >= :data:`MIN_VLLM_VERSION` is installed and a CUDA GPU is visible.

    Does not import vLLM (which initialises CUDA and is slow to import): it reads the installed metadata.
    """
    try:
        version = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"rollout_backend='vllm' needs vllm, which is not installed: {_INSTALL_HINT}") from None
    if _parse_version(version) < MIN_VLLM_VERSION:
        minimum = ".".join(map(str, MIN_VLLM_VERSION))
        raise ImportError(f"vllm {version} is too old: the backend needs vllm >= {minimum}, whose "
                          f"logprobs_mode='processed_logprobs' includes temperature; {_INSTALL_HINT}")
    if not torch.cuda.is_available():
        raise RuntimeError("rollout_backend='vllm' runs on CUDA GPUs only and no CUDA GPU is visible; "
                           "use rollout_backend='transformers'")


def _load_weights_on_worker(worker: Any, weights: list[tuple[str, Tensor]]) -> list[str] | None:
    """Runs inside the vLLM worker (via ``collective_rpc``): load HF-named weights into its model in place.

    Returns the engine parameters that received no weight (a name-mapping bug) when the model's ``load_weights``
    reports what it loaded (recent vLLM), else None.
    """
    model = worker.get_model() if hasattr(worker, "get_model") else worker.model_runner.model
    loaded = model.load_weights(weights)
    if not isinstance(loaded, set):
        return None
    return sorted(name for name, _ in model.named_parameters() if name not in loaded)


def _engine_model(llm: Any) -> torch.nn.Module:
    """Fallback for engines without ``collective_rpc``: the in-process model by attribute path."""
    for path in ("llm_engine.model_executor.driver_worker.worker.model_runner",
                 "llm_engine.model_executor.driver_worker.model_runner"):
        try:
            runner = operator.attrgetter(path)(llm)
        except AttributeError:
            continue
        return runner.get_model() if hasattr(runner, "get_model") else runner.model
    raise RuntimeError("cannot reach the vLLM model: no LLM.collective_rpc and no in-process "
                       "llm_engine.model_executor.driver_worker; is VLLM_ENABLE_V1_MULTIPROCESSING=0?")


class VLLMSampler:
    """A vLLM engine that samples rollouts from weights pushed by the trainer.

    Args:
        model: HF model directory or hub name the engine is built from (its architecture and tokenizer; the
            weights are overwritten by each :meth:`sync_weights`).
        tokenizer: the trainer's tokenizer, used to decode response texts.
        seed: the engine's global seed (per-request seeds, given to :meth:`generate`, decide the samples).
        dtype: the engine's weights and activations (``"bfloat16"``; synced fp32 weights are cast on load).
        gpu_memory_utilization: fraction of the GPU's memory vLLM may take (weights + KV cache); the trainer,
            in the same process, needs the rest. vLLM refuses to start if that much is not free.
        max_model_len: longest prompt + response (default: the model's ``max_position_embeddings``).
        enable_lora: must stay False: LoRA policies are synced as merged weights (exact, and sampled without
            LoRA kernels), so the engine needs no LoRA support.
        **engine_kwargs: passed to ``vllm.LLM`` (e.g. ``enforce_eager=True`` to skip compilation and CUDA
            graphs, which makes start-up fast on tiny models).
    """

    def __init__(self, model: str, tokenizer, *, seed: int, dtype: str = "bfloat16",
                 gpu_memory_utilization: float = 0.3, max_model_len: int | None = None, enable_lora: bool = False,
                 **engine_kwargs: Any) -> None:
        if enable_lora:
            raise ValueError("VLLMSampler(enable_lora=True) is not supported: sync_weights pushes LoRA policies as "
                             "merged weights (base + B·A·scale), so build the engine with enable_lora=False")
        check_available()
        # The engine must share the trainer's process for sync_weights to hand tensors over (and for the
        # attribute-path fallback); set before vLLM reads its environment.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.in_process = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        if not self.in_process:  # a separate engine process: the worker function must be pickled across
            os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        import vllm

        self._sampling_params = vllm.SamplingParams
        self.tokenizer = tokenizer
        self.llm = vllm.LLM(model=str(model), seed=seed, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, logprobs_mode="processed_logprobs",
                            generation_config="vllm",  # sampling defaults from vLLM, not the checkpoint
                            **engine_kwargs)

    @torch.no_grad()
    def sync_weights(self, policy: torch.nn.Module) -> None:
        """Push the policy's current weights (LoRA merged, policy untouched) into the engine; reset its prefix cache."""
        weights = merged_state_dict(policy)
        if not self.in_process:  # tensors cross a process boundary: send CPU copies
            weights = {name: t.detach().cpu() for name, t in weights.items()}
        items = list(weights.items())
        if hasattr(self.llm, "collective_rpc"):
            missing_per_worker = self.llm.collective_rpc(_load_weights_on_worker, args=(items,))
        else:
            missing_per_worker = [_load_weights_on_worker(_WorkerView(_engine_model(self.llm)), items)]
        missing = sorted({name for per_worker in missing_per_worker if per_worker for name in per_worker})
        if missing:
            raise RuntimeError(f"sync_weights left {len(missing)} engine parameters unset (name mismatch between "
                               f"the policy and vLLM's loader?): {missing[:8]}")
        self.llm.reset_prefix_cache()  # cached KV blocks belong to the old weights

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int, temperature: float,
                 seed: int, eos_token_id: int, pad_token_id: int, group_size: int = 1) -> Rollout:
        """Sample one response per row of left-padded ``prompt_ids`` ``(B, P)``; same contract as ``rollout.generate``.

        ``group_size`` is accepted for parity and changes nothing: rows of a group share prompt KV blocks
        through vLLM's prefix cache whatever it says.
        """
        prompts = [{"prompt_token_ids": ids} for ids in prompt_token_lists(prompt_ids, prompt_mask)]
        params = [self._sampling_params(**kw) for kw in sampling_kwargs(
            len(prompts), max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
            eos_token_id=eos_token_id)]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        sampled, sampled_logprobs = [], []
        for out in outputs:  # vLLM returns them in request order
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            if completion.logprobs is None or len(completion.logprobs) != len(ids):
                raise RuntimeError("vLLM returned no per-token log-probs (SamplingParams(logprobs=0) ignored?)")
            if completion.finish_reason == "stop" and (not ids or ids[-1] != eos_token_id):
                # an EOS stripped from token_ids would turn finished responses into truncated ones (reward 0)
                raise RuntimeError(f"vLLM stopped a response without returning its EOS {eos_token_id}: {ids[-5:]}")
            sampled.append(ids)
            sampled_logprobs.append([completion.logprobs[t][token].logprob for t, token in enumerate(ids)])
        return rollout_from_token_lists(prompt_ids, prompt_mask, sampled, sampled_logprobs, eos_token_id,
                                        pad_token_id, self.tokenizer)


class _WorkerView:
    """Lets :func:`_load_weights_on_worker` take a bare model (the attribute-path fallback)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model

    def get_model(self) -> torch.nn.Module:
        return self._model
