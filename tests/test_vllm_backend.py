"""The vLLM rollout backend: its pure parts on CPU (no vLLM), the engine itself on a CUDA machine with vLLM.

CPU: LoRA merging against peft's ``merge_and_unload``, the list -> :class:`Rollout` conversion against
``rollout.generate``'s own output, prompt extraction and per-row sampling parameters. GPU + vLLM (skipped
otherwise, saying why): the engine's log-probs against ``rollout.token_logprobs``, before and after a sync.
"""

import copy
import importlib.util
from types import SimpleNamespace

import pytest
import torch

from kl_lib.lm.models import (build_tokenizer, encode_prompts, format_prompt, load_model, load_tokenizer,
                            save_untrained_model)
from kl_lib.rl import vllm_backend
from kl_lib.rl.rollout import generate, response_mask, token_logprobs
from kl_lib.rl.vllm_backend import (VLLMSampler, merged_state_dict, prompt_token_lists, rollout_from_token_lists,
                                    sampling_kwargs)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["12+34=", "7-5=", "100+1=", "3+3="]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------------------------
# merged_state_dict
# ------------------------------------------------------------------------------------------------------------


def _tiny_llama(seed: int = 0):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).eval()


def _lora_policy(model):
    """``model`` wrapped with LoRA whose B is non-zero (freshly initialised B = 0 would make merging trivial)."""
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return policy.eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 7, 9, 2, 30], [3, 3, 8, 0, 11, 4]])


def test_merged_state_dict_equals_merge_and_unload():
    policy = _lora_policy(_tiny_llama())
    merged = merged_state_dict(policy)
    expected = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert merged.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=1e-6, msg=name)
    # the adapters did change the weights, so the comparison above has teeth
    base = _tiny_llama().state_dict()
    assert not torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"],
                              base["model.layers.0.self_attn.q_proj.weight"], atol=1e-4)


def test_merged_state_dict_leaves_the_policy_unchanged():
    policy = _lora_policy(_tiny_llama())
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    logits_before = _logits(policy, IDS)
    merged_state_dict(policy)
    after = policy.state_dict()
    assert after.keys() == before.keys()
    for k, value in before.items():
        assert torch.equal(after[k], value), k
    from peft.tuners.lora import LoraLayer

    layers = [m for m in policy.modules() if isinstance(m, LoraLayer)]
    assert layers and not any(m.merged or m.disable_adapters for m in layers)
    assert all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)
    assert torch.equal(_logits(policy, IDS), logits_before)


def test_merged_weights_load_into_the_plain_architecture_and_reproduce_the_policy():
    """The names are the HF checkpoint names: a fresh plain model takes them strictly and computes the policy."""
    policy = _lora_policy(_tiny_llama())
    fresh = _tiny_llama(seed=5)
    fresh.load_state_dict(merged_state_dict(policy), strict=True)
    torch.testing.assert_close(_logits(fresh, IDS), _logits(policy, IDS), rtol=0, atol=1e-5)


def test_merged_state_dict_of_a_plain_model_is_its_state_dict():
    model = _tiny_llama()
    merged = merged_state_dict(model)
    state = model.state_dict()
    assert list(merged) == list(state)
    assert all(merged[k].data_ptr() == state[k].data_ptr() for k in state)  # shared, not copied


def test_merged_state_dict_with_adapters_disabled_is_the_base():
    base = {k: v.clone() for k, v in _tiny_llama().state_dict().items()}
    policy = _lora_policy(_tiny_llama())
    with policy.disable_adapter():
        merged = merged_state_dict(policy)
    assert merged.keys() == base.keys()
    for k, value in base.items():
        assert torch.equal(merged[k], value), k


# ------------------------------------------------------------------------------------------------------------
# Prompts and sampling parameters
# ------------------------------------------------------------------------------------------------------------


def test_prompt_token_lists_drop_the_left_padding():
    tok = build_tokenizer()
    ids, mask = encode_prompts(tok, PROMPTS)
    assert len(set(mask.sum(1).tolist())) > 1, "prompts of different lengths, so some rows are padded"
    lists = prompt_token_lists(ids, mask)
    expected = [tok(format_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert lists == expected


def test_sampling_kwargs_give_each_row_its_own_seed_and_the_plain_tempered_softmax():
    kws = sampling_kwargs(6, max_new_tokens=9, temperature=0.7, seed=40, eos_token_id=2)
    assert [kw["seed"] for kw in kws] == [40, 41, 42, 43, 44, 45]  # rows of one group differ, runs repeat
    for kw in kws:
        assert kw["temperature"] == 0.7 and kw["top_p"] == 1.0 and kw["max_tokens"] == 9 and kw["n"] == 1
        assert kw["logprobs"] == 0 and kw["stop_token_ids"] == [2] and not kw["ignore_eos"]
        assert not {"top_k", "min_p", "repetition_penalty"} & kw.keys()  # left at vLLM's "off" defaults
    with pytest.raises(ValueError, match="temperature"):
        sampling_kwargs(2, max_new_tokens=9, temperature=0.0, seed=0, eos_token_id=2)


# ------------------------------------------------------------------------------------------------------------
# rollout_from_token_lists
# ------------------------------------------------------------------------------------------------------------


def test_rollout_from_hand_built_lists():
    tok = build_tokenizer()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    d = {c: tok.convert_tokens_to_ids(c) for c in "12+="}
    prompt_ids, prompt_mask = encode_prompts(tok, PROMPTS)
    sampled = [[d["1"], d["2"], eos, d["="]],  # EOS in the middle: cut after it
               [d["1"], d["+"], d["2"], d["="], d["1"]],  # no EOS within the budget: truncated
               [],  # empty
               [eos]]  # EOS first
    logps = [[-0.1, -0.2, -0.3, -0.4], [-1.0, -1.1, -1.2, -1.3, -1.4], [], [-0.5]]
    roll = rollout_from_token_lists(prompt_ids, prompt_mask, sampled, logps, eos, pad, tok)

    assert roll.response_ids.tolist() == [[d["1"], d["2"], eos, pad, pad],
                                          [d["1"], d["+"], d["2"], d["="], d["1"]],
                                          [pad] * 5,
                                          [eos, pad, pad, pad, pad]]
    assert roll.response_mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5, [False] * 5,
                                           [True] + [False] * 4]
    assert roll.finished.tolist() == [True, False, False, True]
    expected_logp = torch.tensor([[-0.1, -0.2, -0.3, 0, 0], [-1.0, -1.1, -1.2, -1.3, -1.4], [0] * 5,
                                  [-0.5, 0, 0, 0, 0]], dtype=torch.float32)
    assert roll.behavior_logp.dtype == torch.float32 and torch.equal(roll.behavior_logp, expected_logp)
    assert roll.texts == ["12", "1+2=1", "", ""]
    assert roll.prompt_ids is prompt_ids and roll.prompt_mask is prompt_mask
    # the conventions of rollout.response_mask (an empty response cannot come out of a sampler: row 2 aside)
    mask, finished = response_mask(roll.response_ids, eos)
    rows = [0, 1, 3]
    assert torch.equal(mask[rows], roll.response_mask[rows]) and torch.equal(finished, roll.finished)


def test_rollout_from_token_lists_rejects_inconsistent_lists():
    tok = build_tokenizer()
    ids, mask = encode_prompts(tok, PROMPTS[:2])
    with pytest.raises(ValueError, match="2 prompts"):
        rollout_from_token_lists(ids, mask, [[5]], [[-1.0]], tok.eos_token_id, tok.pad_token_id, tok)
    with pytest.raises(ValueError, match="row 1"):
        rollout_from_token_lists(ids, mask, [[5], [5, 6]], [[-1.0], [-1.0]], tok.eos_token_id, tok.pad_token_id, tok)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_untrained_model(tmp_path_factory.mktemp("tiny_model"))


def test_round_trip_of_a_transformers_rollout(tiny_dir):
    """A ``rollout.generate`` output, unpadded into per-row lists as vLLM returns them, converts back exactly."""
    tok, model = load_tokenizer(tiny_dir), load_model(tiny_dir)
    G = 4
    prompt_ids, prompt_mask = (t.repeat_interleave(G, 0) for t in encode_prompts(tok, PROMPTS))
    roll = generate(model, tok, prompt_ids, prompt_mask, max_new_tokens=24, temperature=0.7, seed=0, group_size=G)
    assert roll.finished.any() and not roll.finished.all(), "the check needs finished and truncated rows"

    sampled = [ids[m].tolist() for ids, m in zip(roll.response_ids, roll.response_mask)]
    logps = [lp[m].tolist() for lp, m in zip(roll.behavior_logp, roll.response_mask)]
    back = rollout_from_token_lists(roll.prompt_ids, roll.prompt_mask, sampled, logps, tok.eos_token_id,
                                    tok.pad_token_id, tok)
    for field in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "finished", "behavior_logp"):
        a, b = getattr(back, field), getattr(roll, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field
    assert back.texts == roll.texts


# ------------------------------------------------------------------------------------------------------------
# Availability checks (CPU)
# ------------------------------------------------------------------------------------------------------------


def test_parse_version():
    assert vllm_backend._parse_version("0.10.2") == (0, 10, 2)
    assert vllm_backend._parse_version("0.10.2rc1.dev3+gabcdef") == (0, 10, 2)
    assert vllm_backend._parse_version("0.11.0+cu128") == (0, 11, 0)
    assert vllm_backend._parse_version("1.0") == (1, 0, 0)
    assert vllm_backend._parse_version("0.10.1.1") < vllm_backend.MIN_VLLM_VERSION


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_without_vllm_the_backend_says_how_to_install_it():
    with pytest.raises(ImportError, match=r"pip install -e '\.\[vllm\]' \(CUDA only\)"):
        vllm_backend.check_available()
    with pytest.raises(ImportError, match="optional extra"):
        VLLMSampler("unused", build_tokenizer(), seed=0)


def test_the_vllm_lora_mode_is_refused():
    with pytest.raises(ValueError, match="merged weights"):
        VLLMSampler("unused", build_tokenizer(), seed=0, enable_lora=True)


# ------------------------------------------------------------------------------------------------------------
# The engine: CUDA + vLLM only
# ------------------------------------------------------------------------------------------------------------

# Tolerances for vLLM (bf16 weights and activations) against transformers in fp32 on the same bf16-rounded
# weights, for the tiny model below at T = 0.7. On CPU, the same model run in bf16 differs from the fp32 run by
# mean 0.009 / max 0.054 nats per token; GPU kernels (flash attention, fused RMSNorm, other reduction orders)
# add error of the same order, hence about 3x and 5x that. The effects the tests must see are far larger: the
# T = 1 log-probs differ from the T = 0.7 ones by mean 0.28 (raw instead of processed log-probs would fail),
# and perturbing the weights moves them by about 1 nat (a missed sync would fail).
MEAN_TOL, MAX_TOL = 0.03, 0.3
TEMPERATURE = 0.7


def _require_vllm_gpu():
    pytest.importorskip("vllm", reason="vllm is not installed (optional extra: pip install '.[vllm]'); "
                                       "the vLLM backend runs on CUDA GPUs only")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: the vLLM backend runs on CUDA GPUs only")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    _require_vllm_gpu()
    model_dir = save_untrained_model(tmp_path_factory.mktemp("vllm_model"))
    tok = load_tokenizer(model_dir)
    policy = load_model(model_dir, device="cuda")
    with torch.no_grad():
        policy.lm_head.weight.mul_(8)  # sharper than at initialisation, so that temperature matters
    sampler = VLLMSampler(str(model_dir), tok, seed=0, dtype="bfloat16", gpu_memory_utilization=0.25,
                          max_model_len=64, enforce_eager=True)
    G = 4
    prompt_ids, prompt_mask = (t.repeat_interleave(G, 0) for t in encode_prompts(tok, PROMPTS, "cuda"))
    return SimpleNamespace(tok=tok, policy=policy, sampler=sampler, prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                           G=G)


def _sample(engine, seed=123):
    return engine.sampler.generate(engine.prompt_ids, engine.prompt_mask, max_new_tokens=24, temperature=TEMPERATURE,
                                   seed=seed, eos_token_id=engine.tok.eos_token_id,
                                   pad_token_id=engine.tok.pad_token_id, group_size=engine.G)


def _reference_logp(model, roll, temperature=TEMPERATURE):
    """transformers' log-probs of the rollout's tokens, in fp32 on the bf16-rounded weights the engine holds."""
    ref = copy.deepcopy(model).float()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.bfloat16().float())
        logp, _ = token_logprobs(ref, roll.prompt_ids, roll.prompt_mask, roll.response_ids, roll.response_mask,
                                 temperature=temperature)
    return logp


def _gaps(roll, logp):
    diff = (roll.behavior_logp - logp).abs()[roll.response_mask]
    return diff.mean().item(), diff.max().item()


def _assert_matches(roll, logp, what):
    mean, worst = _gaps(roll, logp)
    assert mean <= MEAN_TOL and worst <= MAX_TOL, f"{what}: vLLM vs transformers log-probs differ by mean " \
                                                  f"{mean:.4f} (tol {MEAN_TOL}), max {worst:.4f} (tol {MAX_TOL})"


def test_vllm_rollout_contract_and_logprobs_match_transformers(engine):
    engine.sampler.sync_weights(engine.policy)
    roll = _sample(engine)
    tok = engine.tok
    B = engine.prompt_ids.shape[0]
    assert roll.response_ids.shape[0] == B and 1 <= roll.response_ids.shape[1] <= 24
    mask, finished = response_mask(roll.response_ids, tok.eos_token_id)
    assert torch.equal(mask, roll.response_mask) and torch.equal(finished, roll.finished)
    assert roll.behavior_logp.dtype == torch.float32 and (roll.behavior_logp[~roll.response_mask] == 0).all()
    assert (roll.response_ids[~roll.response_mask] == tok.pad_token_id).all()
    assert roll.texts == tok.batch_decode(roll.response_ids, skip_special_tokens=True)
    assert roll.response_mask.sum(1).max() == roll.response_ids.shape[1]  # R = the longest response

    _assert_matches(roll, _reference_logp(engine.policy, roll), "synced policy")
    # processed (tempered) log-probs, not raw ones: far from the T = 1 values
    raw_mean, _ = _gaps(roll, _reference_logp(engine.policy, roll, temperature=1.0))
    assert raw_mean > max(0.1, 3 * MEAN_TOL), f"vLLM log-probs look untempered (mean gap to T=1: {raw_mean:.4f})"


def test_sync_weights_makes_vllm_follow_new_weights(engine):
    perturbed = copy.deepcopy(engine.policy)
    g = torch.Generator(device="cuda").manual_seed(1)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, device="cuda"))
    try:
        engine.sampler.sync_weights(perturbed)
        roll = _sample(engine)
        _assert_matches(roll, _reference_logp(perturbed, roll), "perturbed weights")
        stale_mean, _ = _gaps(roll, _reference_logp(engine.policy, roll))
        assert stale_mean > 10 * MEAN_TOL, f"the old weights explain vLLM's log-probs too well ({stale_mean:.4f})"

        # a LoRA policy is pushed merged, and left as it was
        from peft import LoraConfig, get_peft_model

        lora = get_peft_model(copy.deepcopy(engine.policy),
                              LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS))
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g, device="cuda"))
        engine.sampler.sync_weights(lora)
        roll = _sample(engine)
        merged = copy.deepcopy(lora).merge_and_unload()
        _assert_matches(roll, _reference_logp(merged, roll), "merged LoRA policy")
        base_mean, _ = _gaps(roll, _reference_logp(engine.policy, roll))
        assert base_mean > 3 * MEAN_TOL, f"the LoRA update did not reach vLLM (gap to the base: {base_mean:.4f})"
    finally:
        engine.sampler.sync_weights(engine.policy)


def test_vllm_rollouts_are_a_function_of_the_seed(engine):
    engine.sampler.sync_weights(engine.policy)
    a, b, c = _sample(engine, seed=7), _sample(engine, seed=7), _sample(engine, seed=8)
    assert torch.equal(a.response_ids, b.response_ids)
    assert not torch.equal(a.response_ids, c.response_ids)
    # rows of one group (same prompt) get different seeds, hence (almost surely) different responses
    first_group = a.response_ids[: engine.G]
    assert len({tuple(r.tolist()) for r in first_group}) > 1
