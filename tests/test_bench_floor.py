"""``benchmarks/bench_floor.py`` counts the work of the code it bounds: its matrix products, phase by phase, equal
the multiply-adds ``torch.utils.flop_counter.FlopCounterMode`` counts when the real sampling and scoring paths run
(a tiny random Llama, answers of very different lengths, so the sampler cuts its batch several times)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kl_lib.lm.models import format_prompt, load_model, load_tokenizer
from kl_lib.rl.rollout import generate, response_logits, sample, trimmed_response_logits

PROMPTS = ["1+2=", "5+5=", "7-3=", "8+8="]  # one prompt length, as the study's (the count assumes it)
GROUP, BUDGET = 3, 24


@pytest.fixture(scope="module")
def floor():
    path = Path(__file__).parents[1] / "benchmarks" / "bench_floor.py"
    spec = importlib.util.spec_from_file_location("bench_floor", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_floor"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_floor"]


@pytest.fixture(scope="module")
def rollout(tiny, one_thread):
    _, model_dir = tiny
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    enc = tokenizer([format_prompt(tokenizer, t) for t in PROMPTS], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    ids, mask = (enc[k].repeat_interleave(GROUP, 0) for k in ("input_ids", "attention_mask"))
    assert bool(mask.all())
    with FlopCounterMode(display=False) as counter:
        roll = sample(model, tokenizer, ids, mask, max_new_tokens=BUDGET, temperature=1.0, seed=0, group_size=GROUP)
    lengths = [int(n) for n in roll.response_mask.sum(-1)]
    assert min(lengths) < max(lengths) / 2  # the batch was cut while sampling
    return model, tokenizer, roll, lengths, counter.get_total_flops()


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_sampling_products(floor, rollout):
    model, _, roll, lengths, counted = rollout
    d = floor.Dims.of(model.config)
    work = floor.sampling_work(d, lengths, roll.prompt_ids.shape[1], GROUP, BUDGET, drop=True)
    assert work.product_gflop() * 1e9 == counted


def test_scoring_and_backward_products(floor, rollout):
    model, _, roll, lengths, _ = rollout
    d = floor.Dims.of(model.config)
    args = (roll.prompt_ids, roll.prompt_mask, roll.response_ids, roll.response_mask)
    holder = {}
    forward = _flops(lambda: holder.setdefault("logits", trimmed_response_logits(model, *args, group_size=GROUP)))
    backward = _flops(lambda: holder["logits"].sum().backward())
    work = floor.scoring_work(d, lengths, roll.prompt_ids.shape[1], GROUP)
    assert work.product_gflop() * 1e9 == forward
    assert floor.backward_of(work).product_gflop() * 1e9 == backward


def test_padded_design_products(floor, rollout):
    """The padded batch TRL runs: our own padded forward (no prompt sharing) and ``generate``, which runs every row
    until the last one ends."""
    model, tokenizer, roll, lengths, _ = rollout
    d, prompt = floor.Dims.of(model.config), roll.prompt_ids.shape[1]
    with torch.no_grad():
        padded = _flops(lambda: response_logits(model, roll.prompt_ids, roll.prompt_mask, roll.response_ids,
                                                roll.response_mask))
    assert floor.padded_work(d, lengths, prompt).product_gflop() * 1e9 == padded
    generated = {}
    counted = _flops(lambda: generated.setdefault("roll", generate(
        model, tokenizer, roll.prompt_ids, roll.prompt_mask, max_new_tokens=BUDGET, temperature=1.0, seed=0)))
    generated_lengths = [int(n) for n in generated["roll"].response_mask.sum(-1)]
    assert floor.sampling_work(d, generated_lengths, prompt, 1, BUDGET, drop=False).product_gflop() * 1e9 == counted


def test_decode_rows_follow_the_samplers_rule(floor):
    # 8 rows: two end at the second token (cut 8 → 6, as 6 ≤ 3·8//4), one at the fifth (5 > 3·6//4 = 4: no cut),
    # one at the sixth (cut 6 → 4), and the last four at the seventh (none left: the loop ends)
    assert floor.decode_rows([2, 2, 4, 5, 6, 6, 6, 6], 8) == [8, 6, 6, 6, 4]
    assert floor.decode_rows([1, 1], 8) == []  # every row ended at its first token: no decode step
