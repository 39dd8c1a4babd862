"""The tiny base model's tokenizer and architecture, and loading any causal LM the way a hub model is loaded.

Tokenizer: one token per character of the task alphabet (digits, ``+ - = `` and space) plus special tokens,
built with ``tokenizers`` and saved as a ``PreTrainedTokenizerFast`` with a chat template:

    <bos><|user|>123+456=<|assistant|>579<eos>

Model: a Llama-architecture decoder (rotary position embeddings, so left padding with position ids taken from
the attention mask gives the same log-probs as no padding) of about 1 M parameters. Both are saved with
``save_pretrained`` and loaded back through ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained``: the
same code path that loads a hub model by name.

Departure from the paper: the paper fine-tunes 4–8 B pretrained models; this is a from-scratch model trained by
SFT on the arithmetic task family (``kl_lib.tasks.arithmetic``), small enough for RL on two CPU cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["CHAT_TEMPLATE", "SPECIAL_TOKENS", "ALPHABET", "build_tokenizer", "tiny_llama_config", "load_model",
           "load_tokenizer", "format_prompt", "encode_prompts", "save_untrained_model"]

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


def format_prompt(tokenizer, prompt: str) -> str:
    """The chat-formatted generation prompt for one user message."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def encode_prompts(tokenizer, prompts: list[str], device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-format and left-pad user messages: ``(input_ids, attention_mask)``, both ``(B, P)`` on ``device``."""
    enc = tokenizer([format_prompt(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def load_tokenizer(name_or_path: str | os.PathLike):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """``AutoModelForCausalLM.from_pretrained`` with a clear error for a missing local directory."""
    from transformers import AutoModelForCausalLM

    path = Path(name_or_path)
    looks_local = str(name_or_path).startswith((".", "/")) or path.parts[:1] in (("data",), ("runs",))
    if looks_local and not path.exists():
        raise FileNotFoundError(f"model directory {path} does not exist; build the base model with `make base-model`")
    return AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype).to(device)


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
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
