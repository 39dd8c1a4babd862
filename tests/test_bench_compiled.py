"""``benchmarks/bench_compiled.py`` times a hand-written decode step in place of the model's: that step must compute
the model. LeanLlama's logits equal the Hugging Face Llama's (prompt pass, left padding included, and decode steps
through its static cache), and its rollout draws ``kl_lib.rl.rollout.sample``'s tokens for a seed."""

import importlib.util
import inspect
import sys
from pathlib import Path

import pytest
import torch

from kl_lib.lm.models import format_prompt, load_model, load_tokenizer
from kl_lib.rl.rollout import sample

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))  # it imports bench_floor, as it does when run as a script
    spec = importlib.util.spec_from_file_location("bench_compiled", BENCHMARKS / "bench_compiled.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_compiled"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_compiled"]
    sys.modules.pop("bench_floor", None)
    sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def llama(tiny, one_thread):
    _, model_dir = tiny
    return load_tokenizer(model_dir), load_model(model_dir)


def _encode(tokenizer, prompts):
    enc = tokenizer([format_prompt(tokenizer, t) for t in prompts], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def test_logits_equal_the_models_with_left_padding(bench, llama):
    tokenizer, model = llama
    ids, mask = _encode(tokenizer, ["1+2=", "12+345=", "7-3="])
    assert not bool(mask.all())  # left padding present
    lean = bench.LeanLlama(model)
    position = (mask.cumsum(-1) - 1).clamp_min(0)
    kw = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    with torch.inference_mode():
        logits, keys, values, valid = lean.prompt(ids, mask, 4)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True)
        torch.testing.assert_close(logits, out.logits[:, -1], atol=1e-5, rtol=0)
        cache, y, hf_mask, pos = _cache(out), out.logits[:, -1].argmax(-1), mask, mask.sum(-1)
        for t in range(3):  # decode steps: the lean cache against the model's own
            logits, k, v = lean.step(y, pos, keys, values, valid)
            keys[:, :, :, ids.shape[1] + t], values[:, :, :, ids.shape[1] + t] = k, v
            valid[:, ids.shape[1] + t] = True
            hf_mask = torch.cat([hf_mask, hf_mask.new_ones(len(y), 1)], 1)
            out = model(input_ids=y[:, None], attention_mask=hf_mask, position_ids=pos[:, None],
                        use_cache=True, **{kw: cache})
            torch.testing.assert_close(logits, out.logits[:, -1], atol=1e-5, rtol=0)
            cache, y, pos = _cache(out), logits.argmax(-1), pos + 1


def _cache(output):
    return output.cache if "cache" in output else output.past_key_values


def test_rollout_draws_the_samplers_tokens(bench, llama):
    tokenizer, model = llama
    ids, mask = _encode(tokenizer, ["1+2=", "5+5=", "7-3=", "8+8="])  # one prompt length, as the study's
    ids, mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
    roll = sample(model, tokenizer, ids, mask, max_new_tokens=24, temperature=1.0, seed=5, group_size=3)
    lengths = roll.response_mask.sum(-1)
    assert int(lengths.min()) < int(lengths.max())  # answers of different lengths
    lean = bench.LeanLlama(model)
    tokens = bench.lean_rollout(lean, lean.step, ids, mask, max_new_tokens=24, eos=tokenizer.eos_token_id, seed=5)
    eos = tokenizer.eos_token_id
    assert bench.up_to_eos(tokens, eos) == bench.up_to_eos(roll.response_ids, eos)


def test_lean_llama_refuses_models_it_does_not_compute(bench, llama):
    _, model = llama
    model.config.num_key_value_heads = 1  # grouped-query attention: not covered
    try:
        with pytest.raises(ValueError, match="kv heads = heads"):
            bench.LeanLlama(model)
    finally:
        model.config.num_key_value_heads = model.config.num_attention_heads


def test_bound(bench):
    floors = {"sampling": 0.05, "reference forward": 0.04, "policy forward": 0.04, "backward": 0.08}
    b = bench.bound(floors, decode=0.5, training=0.8, budget=0.26)
    assert b["step_lower_bound_s"] == pytest.approx(0.16 + 0.10)
    assert b["step_estimate_s"] == pytest.approx(0.16 / 0.8 + 0.10)
    assert b["decode_efficiency_needed"] == pytest.approx(0.05 / 0.10)
    assert b["decode_efficiency_needed_at_measured_training"] == pytest.approx(0.05 / 0.06)
    assert bench.bound(floors, decode=0.5, training=0.8, budget=0.15)["decode_efficiency_needed"] is None


def test_training_batch_scores_the_response_tokens(bench, llama):
    tokenizer, model = llama
    ids, mask = _encode(tokenizer, ["1+2=", "5+5="])
    roll = sample(model, tokenizer, ids, mask, max_new_tokens=6, temperature=1.0, seed=0)
    inputs, attention, targets, scored = bench.training_batch(ids, mask, roll)
    P = ids.shape[1]
    assert torch.equal(targets[:, P - 1:], roll.response_ids)  # position P - 1 + t predicts response token t
    assert torch.equal(scored[:, P - 1:].bool(), roll.response_mask) and not scored[:, :P - 1].any()
    assert torch.equal(inputs[:, :P], ids) and torch.equal(attention[:, :P], mask)
