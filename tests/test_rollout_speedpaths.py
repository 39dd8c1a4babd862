"""The long-answer paths of the trainer (``kl_lib.rl.train.long_answers``) against the step-by-step ones, on a tiny
random Llama: :func:`sample` draws ``generate``'s tokens while taking finished rows out of the batch,
:func:`trimmed_response_logits` gives :func:`response_logits`' log-probs and gradients without the padding, and a
run above ``SHORT_ANSWER_TOKENS`` starts exactly as the same run on the step-by-step paths does."""

import json

import pytest
import torch

import kl_lib.rl.train as rl_train
from kl_lib import tasks
from kl_lib.config import KLConfig
from kl_lib.lm.models import format_prompt, load_model, load_tokenizer
from kl_lib.rl.config import RLConfig
from kl_lib.rl.rollout import generate, response_logits, sample, sampled_logprobs, trimmed_response_logits

PROMPTS = ["1+2=", "123+456=", "99-7=", "5+5=", "40+2=", "7-3=", "310+5=", "8+8="]
BUDGET = 24  # > SHORT_ANSWER_TOKENS: rows of an untrained model end at very different steps


def _batch(tokenizer, group_size):
    enc = tokenizer([format_prompt(tokenizer, t) for t in PROMPTS], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    return enc["input_ids"].repeat_interleave(group_size, 0), enc["attention_mask"].repeat_interleave(group_size, 0)


@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("seed", [0, 5])
def test_sample_draws_generates_tokens(tiny, group_size, temperature, seed):
    _, model_dir = tiny
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    model.train()
    ids, mask = _batch(tokenizer, group_size)
    kw = {"max_new_tokens": BUDGET, "temperature": temperature, "seed": seed, "group_size": group_size}
    plain = generate(model, tokenizer, ids, mask, **kw)
    fast = sample(model, tokenizer, ids, mask, **kw)
    lengths = plain.response_mask.sum(-1)
    assert lengths.min() < lengths.max() / 2  # rows ended early: the batch was cut while sampling
    assert torch.equal(fast.response_ids, plain.response_ids)
    assert torch.equal(fast.response_mask, plain.response_mask) and torch.equal(fast.finished, plain.finished)
    assert fast.texts == plain.texts and torch.equal(fast.prompt_ids, plain.prompt_ids)
    torch.testing.assert_close(fast.behavior_logp, plain.behavior_logp, atol=1e-5, rtol=0)
    assert bool((fast.behavior_logp[~fast.response_mask] == 0).all())
    assert model.training  # sampled in eval mode, as generate does, then restored


def test_sample_when_every_row_ends_at_its_first_token(tiny):
    """A collapsed policy answers with end-of-sequence at once (it happened to k1 in loss off-policy in the
    long-answer study): sampling must return one-token responses, as generate does, not fail."""
    _, model_dir = tiny
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-30.0)
        head.bias[tokenizer.eos_token_id] = 30.0  # EOS with probability 1 − 1e-24 per step
    model.lm_head = head
    ids, mask = _batch(tokenizer, 2)
    kw = {"max_new_tokens": BUDGET, "temperature": 1.0, "seed": 0, "group_size": 2}
    fast, plain = sample(model, tokenizer, ids, mask, **kw), generate(model, tokenizer, ids, mask, **kw)
    assert fast.response_ids.shape == (len(ids), 1) and bool((fast.response_ids == tokenizer.eos_token_id).all())
    assert bool(fast.finished.all()) and torch.equal(fast.response_mask, plain.response_mask)


@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunks", [1, 3, 64])
def test_trimmed_logits_match_the_padded_forward(tiny, group_size, temperature, chunks):
    """Log-probs at 1e-5 and gradients at 1e-4 (the tolerances of the fused-vs-recomputed test), finite values at
    the masked positions, and without grad the very numbers computed with grad (the reference's call equals the
    policy's)."""
    _, model_dir = tiny
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    ids, mask = _batch(tokenizer, group_size)
    roll = sample(model, tokenizer, ids, mask, max_new_tokens=BUDGET, temperature=temperature, seed=3,
                  group_size=group_size)
    m = roll.response_mask
    assert m.sum(-1).min() < m.shape[1]  # padding to skip
    args = (model, roll.prompt_ids, roll.prompt_mask, roll.response_ids, m, temperature, None, group_size)
    weights = torch.linspace(-1, 1, m.numel()).view_as(m) * m

    padded = sampled_logprobs(response_logits(*args), roll.response_ids)
    grads_padded = torch.autograd.grad((padded * weights).sum(), list(model.parameters()))
    logits = trimmed_response_logits(*args, chunks=chunks)
    assert logits.shape == (*m.shape, len(tokenizer)) and bool(torch.isfinite(logits).all())
    if chunks >= len(m):  # one row per slice: nothing computed after any response's end
        assert bool((logits[~m] == 0).all())
    trimmed = sampled_logprobs(logits, roll.response_ids)
    torch.testing.assert_close(trimmed[m], padded[m], atol=1e-5, rtol=0)
    grads_trimmed = torch.autograd.grad((trimmed * weights).sum(), list(model.parameters()))
    for a, b in zip(grads_trimmed, grads_padded):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        assert torch.equal(trimmed_response_logits(*args, chunks=chunks), logits.detach())


def _digit_reward(response, problem, finished):
    """The share of digits in the response: varies across an untrained model's samples, so updates are real."""
    return sum(c.isdigit() for c in response) / max(1, len(response))


CASES = {
    "k3-loss-token_mean": {"kl": KLConfig("k3", "loss", beta=0.2), "aggregation": "token_mean"},
    "analytic-loss-lora": {"kl": KLConfig("analytic", "loss", beta=0.2), "finetune": "lora"},
    "k1-reward-recompute": {"kl": KLConfig("k1", "reward", beta=0.2), "rollout_grad": False},
    "k3-loss-lag": {"kl": KLConfig("k3", "loss", beta=0.2), "async_lag": 1},
}


@pytest.mark.parametrize("case", list(CASES))
def test_long_answer_run_starts_as_the_step_by_step_paths(tiny, monkeypatch, case):
    """The first step's metrics (rewards, KL estimates, entropy, losses, gradient norm) of a run above
    SHORT_ANSWER_TOKENS are those of the same run forced onto the step-by-step paths (fused sampling forward or
    generate + padded recomputation), to 1e-4; only the first step, as in test_rl's fused-vs-recomputed test
    (AdamW turns last-bit differences of near-zero gradient coordinates into steps of up to lr). k1 of the
    pre-update policy is exactly 0: the reference's forward is the policy's, bit for bit."""
    root, model_dir = tiny
    monkeypatch.setitem(tasks.base._REGISTRY, "digits",
                        tasks.Task("digits", load=tasks.get_task("arithmetic").load, reward=_digit_reward))
    first = {}
    for long in (True, False):
        monkeypatch.setattr(rl_train, "SHORT_ANSWER_TOKENS", 16 if long else BUDGET)
        cfg = RLConfig(model=str(model_dir), data_dir=str(root / "data"), steps=1, prompts_per_step=4, group_size=3,
                       max_new_tokens=BUDGET, lr=1e-3, runs_dir=str(root / "runs"), task="digits",
                       name=f"{case}-{long}", **CASES[case])
        assert rl_train.long_answers(cfg) is long
        result = rl_train.train(cfg, progress=False)
        assert result.status == "done"
        row = json.loads((result.run_dir / "metrics.jsonl").read_text().splitlines()[0])
        first[long] = {k: v for k, v in row.items() if not k.startswith("time/")}
    assert first[True]["grad/norm"] > 0 and first[True]["reward/std"] > 0
    assert first[True]["response/length"] < BUDGET - 2  # padding the long path skipped
    assert first[True]["kl/k1"] == 0.0
    for key, value in first[False].items():
        assert first[True][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
