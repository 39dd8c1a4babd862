"""The RL engine on a tiny random Llama saved and loaded like a hub model: rollouts, the KL gradient of every
configuration on a real LM against docs/contract.md's per-token formula, resumption, divergence, LoRA, off-policy and
micro-batches (the same run in passes of one prompt group)."""

import contextlib
import dataclasses
import itertools
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from kl_lib import objectives, tasks
from kl_lib.config import KLConfig
from kl_lib.lm.models import (
    format_prompt,
    load_model,
    load_tokenizer,
    save_untrained_model,
)
from kl_lib.rl import losses
from kl_lib.rl.checkpoints import RunConflictError, run_identity
from kl_lib.rl.config import ADVANTAGES, POLICY_LOSSES, RLConfig, load_config
from kl_lib.rl.rollout import (
    generate,
    response_mask,
    sample_with_logits,
    sampled_logprobs,
    token_logprobs,
)
from kl_lib.rl.train import train
from kl_lib.tasks.arithmetic import write_splits

SIZES = {"rl_train": 64, "id_test": 16, "ood_test": 16, "sft": 32}


def _cfg(tiny, **kw):
    root, model_dir = tiny
    base = {"model": str(model_dir), "data_dir": str(root / "data"), "steps": 3, "prompts_per_step": 4,
            "group_size": 2, "max_new_tokens": 4, "lr": 1e-3, "runs_dir": str(root / "runs"), "checkpoint_every": 2}
    return RLConfig(**{**base, **kw})


def _prompts(tokenizer, texts):
    enc = tokenizer([format_prompt(tokenizer, t) for t in texts], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def test_recomputed_logprobs_match_the_sampler_with_left_padding(tiny):
    _, model_dir = tiny
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    ids, mask = _prompts(tokenizer, ["1+2=", "123+456=", "99-7=", "5+5="])  # different lengths: left padding
    assert (mask == 0).any()
    for temperature in (1.0, 0.7):
        roll = generate(model, tokenizer, ids, mask, max_new_tokens=5, temperature=temperature, seed=3)
        logp, logprobs = token_logprobs(model, roll.prompt_ids, roll.prompt_mask, roll.response_ids,
                                        roll.response_mask, temperature)
        m = roll.response_mask
        torch.testing.assert_close(logp[m], roll.behavior_logp[m], atol=1e-5, rtol=0)
        torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones_like(logp))
    # the same prompt alone (no padding) gives the same log-probs as inside the padded batch
    alone_ids, alone_mask = _prompts(tokenizer, ["1+2="])
    alone, _ = token_logprobs(model, alone_ids, alone_mask, roll.response_ids[:1], roll.response_mask[:1], 0.7)
    torch.testing.assert_close(alone[roll.response_mask[:1]], logp[:1][roll.response_mask[:1]], atol=1e-5, rtol=0)


def test_generation_is_a_pure_function_of_the_seed(tiny):
    _, model_dir = tiny
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    ids, mask = _prompts(tokenizer, ["12+34=", "7-3="])
    a = generate(model, tokenizer, ids, mask, max_new_tokens=4, temperature=1.0, seed=11)
    b = generate(model, tokenizer, ids, mask, max_new_tokens=4, temperature=1.0, seed=11)
    assert torch.equal(a.response_ids, b.response_ids)


def test_response_mask_stops_after_the_first_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]])
    mask, finished = response_mask(ids, eos_token_id=2)
    assert mask.tolist() == [[True, True, False, False], [True, True, True, True]]
    assert finished.tolist() == [True, False]


def test_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    compute = losses.compute_advantages
    torch.testing.assert_close(compute(r, 3, "rloo"), torch.tensor([1.0, -0.5, -0.5, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(compute(r, 3, "drgrpo"), r - torch.tensor([1 / 3] * 3 + [1.0] * 3))
    grpo = compute(r, 3, "grpo")
    assert abs(float(grpo[:3].std()) - 1) < 1e-4 and float(grpo[3:].abs().max()) == 0


def test_registries_hold_the_configs_names_and_reject_others():
    """Every name RLConfig accepts has a function, and an unknown name fails listing the valid ones (it used to
    run PPO for any policy loss that was not 'reinforce')."""
    assert tuple(losses.ADVANTAGE_FUNCTIONS) == ADVANTAGES
    assert tuple(losses.POLICY_LOSS_FUNCTIONS) == POLICY_LOSSES
    with pytest.raises(ValueError, match="unknown advantage 'ppo'; valid advantages are 'rloo', 'grpo', 'drgrpo'"):
        losses.compute_advantages(torch.zeros(4), 2, "ppo")
    with pytest.raises(ValueError, match="unknown policy loss 'grpo'; valid policy losses are 'reinforce', 'ppo'"):
        losses.policy_loss("grpo", torch.zeros(2, 3), torch.zeros(2), torch.ones(2, 3, dtype=torch.bool),
                           torch.zeros(2, 3), 0.2, "sum")


def test_policy_losses_per_token():
    """REINFORCE is −A log π; PPO is −min(rA, clip(r)A) with r = π/μ, and reports the share of valid tokens
    where the clip took effect."""
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.6, 0.1]]))
    beh = torch.log(torch.tensor([[0.4, 0.2, 0.5], [0.3, 0.9, 0.1]]))  # r = 1.25, 1, 1.8 | 1, 2/3, 1
    adv, mask = torch.tensor([1.0, -2.0]), torch.tensor([[True, True, True], [True, True, False]])
    loss, metrics = losses.policy_loss("reinforce", logp, adv, mask, None, 0.2, "sum")
    torch.testing.assert_close(loss, -(adv * (logp * mask).sum(-1)).mean())
    assert metrics == {"ppo/clip_fraction": 0.0}
    loss, metrics = losses.policy_loss("ppo", logp, adv, mask, beh, 0.2, "token_mean")
    # A = 1: r = 1.25 and 1.8 are clipped to 1.2 (2 tokens); A = −2: r = 2/3 is clipped to 0.8 (1 token)
    per_token = torch.tensor([[-1.2, -1.0, -1.2], [2.0, 1.6, 0.0]])
    torch.testing.assert_close(loss, (per_token.sum(-1) / mask.sum(-1)).mean())
    assert metrics["ppo/clip_fraction"] == pytest.approx(3 / 5)


def _kl_configs():
    out = []
    for e, p, w, r, c in itertools.product(("k1", "k2", "k3", "analytic"), ("reward", "loss", "both"),
                                           ("none", "token", "sequence"), (False, True), (None, 0.5)):
        with contextlib.suppress(ValueError):  # combinations KLConfig rejects
            out.append(KLConfig(e, p, beta=0.3, reward_to_go=r, importance_weighting=w, log_ratio_clamp=c))
    return out


@pytest.mark.parametrize("cfg", _kl_configs(), ids=lambda c: f"{c.name}-{c.importance_weighting}-{c.log_ratio_clamp}")
@pytest.mark.parametrize("aggregation", ["sum", "token_mean"])
def test_kl_loss_is_kl_terms_loss(cfg, aggregation):
    """The trainer's kl_loss (objectives.kl_term without its metrics) gives kl_term's loss bit for bit, its
    gradient, and kl_term's kl/clip_fraction."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 5, 7
    logits = torch.randn(B, T, V, generator=g, requires_grad=True)
    ref_logprobs = torch.log_softmax(torch.randn(B, T, V, generator=g), -1)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.arange(T)[None] < torch.tensor([[5], [3], [1]])
    beh = torch.log_softmax(torch.randn(B, T, V, generator=g), -1).gather(-1, ids[..., None]).squeeze(-1)
    out = []
    for fn in (objectives.kl_term, losses.kl_loss):
        logprobs = torch.log_softmax(logits, -1)
        logp = logprobs.gather(-1, ids[..., None]).squeeze(-1)
        ref_logp = ref_logprobs.gather(-1, ids[..., None]).squeeze(-1)
        loss, extra = fn(cfg, logp, ref_logp, mask, behavior_logp=beh, logprobs=logprobs, ref_logprobs=ref_logprobs,
                         aggregation=aggregation)
        clip = extra.get("kl/clip_fraction") if isinstance(extra, dict) else extra
        out.append((loss.detach(), torch.autograd.grad(loss, logits)[0], clip))
    (loss_a, grad_a, clip_a), (loss_b, grad_b, clip_b) = out
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)
    assert (clip_a is None) == (clip_b is None) == (cfg.log_ratio_clamp is None)
    if clip_a is not None:
        assert torch.equal(clip_a, clip_b) and 0 < float(clip_b) < 1


# --------------------------------------------------------------------------------------------------------------
# The KL gradient on a real LM, for a fixed batch, against docs/contract.md §3 written per token
# --------------------------------------------------------------------------------------------------------------

CONFIGS = [KLConfig(e, p, beta=0.3, reward_to_go=r, importance_weighting=w)
           for e in ("k1", "k2", "k3") for p in ("reward", "loss", "both") for w in ("none", "token", "sequence")
           for r in (False, True) if not (r and p == "loss")]


def _derivative(estimator, delta):
    """dk/dδ: k1 → 1, k2 → δ, k3 → 1 − e^{−δ}."""
    return {"k1": torch.ones_like(delta), "k2": delta, "k3": 1 - torch.exp(-delta)}[estimator]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
def test_kl_gradient_on_the_lm_matches_the_per_token_formula(tiny, cfg):
    """∇ of objectives.kl_term through the model equals ∇ Σ_t sg(w_t) log π(y_t) with w_t from docs/contract.md §3:
    reward: β c_t (× ω_t for token weights); loss: β dk/dδ (token weights: β ω_t (k_t + dk/dδ)); × W for sequence."""
    _, model_dir = tiny
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    ref = load_model(model_dir)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ids, mask = _prompts(tokenizer, ["12+34=", "7-3=", "100+200=", "9+9="])
    roll = generate(ref, tokenizer, ids, mask, max_new_tokens=5, temperature=1.0, seed=5)  # μ = the perturbed model
    args = (roll.prompt_ids, roll.prompt_mask, roll.response_ids, roll.response_mask)
    with torch.no_grad():
        ref_logp, _ = token_logprobs(load_model(model_dir), *args)
        ref_logp = ref_logp + 0.1  # a reference different from the policy (any constant shift changes δ)
    m = roll.response_mask

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    logp, _ = token_logprobs(model, *args)
    loss, _ = objectives.kl_term(cfg, logp, ref_logp, m, behavior_logp=roll.behavior_logp)
    got = grads(loss)

    logp, _ = token_logprobs(model, *args)
    with torch.no_grad():
        delta = (logp - ref_logp).masked_fill(~m, 0)
        k = {"k1": delta, "k2": 0.5 * delta**2, "k3": torch.expm1(-delta) + delta}[cfg.estimator].masked_fill(~m, 0)
        omega = torch.exp(logp - roll.behavior_logp).masked_fill(~m, 0)
        c = k.flip(-1).cumsum(-1).flip(-1) if cfg.reward_to_go else k.sum(-1, keepdim=True).expand_as(k)
        w = torch.zeros_like(logp)
        if cfg.in_reward:
            w += c * (omega if cfg.importance_weighting == "token" else 1)
        if cfg.in_loss:
            dk = _derivative(cfg.estimator, delta)
            w += omega * (k + dk) if cfg.importance_weighting == "token" else dk
        if cfg.importance_weighting == "sequence":
            w *= torch.exp((logp - roll.behavior_logp).masked_fill(~m, 0).sum(-1, keepdim=True))
        w = cfg.beta * w.masked_fill(~m, 0) / logp.shape[0]
    expected = grads((w * logp).sum())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# Training runs
# --------------------------------------------------------------------------------------------------------------


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _strip_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("placement", ["reward", "loss", "both"])
def test_three_step_smoke_run(tiny, finetune, placement):
    cfg = _cfg(tiny, finetune=finetune, kl=KLConfig("k1", placement, beta=0.1), name=f"smoke-{finetune}-{placement}")
    result = train(cfg, progress=False)
    assert result.status == "done" and result.steps_completed == 3
    rows = _metrics(result.run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for key in ("reward/mean", "kl/k1", "kl/k2", "kl/k3", "kl/analytic", "kl/forward_myopic", "policy/entropy",
                "grad/norm", "ppo/clip_fraction", "response/length", "time/generate_s", "time/train_s"):
        assert key in rows[0] and math.isfinite(rows[0][key]), key
    assert "kl/clip_fraction" not in rows[0]  # no clamp configured
    assert rows[0]["kl/analytic"] == pytest.approx(0.0, abs=1e-6)  # step 0: the policy is the reference
    # An untrained model earns no reward, so only the KL term moves it: k1 in the loss (∇k1 = ∇log π ≠ 0 per
    # sample) does; k1 in the reward does not (its coefficient Σ k1 is 0 while π = π_ref).
    assert (rows[-1]["kl/analytic"] > 1e-8) == (placement != "reward")
    for name in ("config.json", "summary.json", "DONE"):
        assert (result.run_dir / name).exists()
    assert (result.run_dir / "final").exists()
    assert json.loads((result.run_dir / "config.json").read_text())["digest"] == run_identity(cfg)
    # a finished run with the same config is skipped; a changed one reruns
    assert train(cfg, progress=False).status == "skipped"


def test_resuming_gives_the_same_metrics(tiny):
    straight = train(_cfg(tiny, steps=4, name="straight"), progress=False)
    cfg = _cfg(tiny, steps=4, name="resumed")
    first = train(cfg, stop_after=2, progress=False)
    assert first.status == "interrupted" and not (first.run_dir / "DONE").exists()
    second = train(cfg, progress=False)
    assert second.status == "done"
    assert _strip_times(_metrics(second.run_dir)) == _strip_times(_metrics(straight.run_dir))


def test_resume_discards_metrics_written_after_the_last_checkpoint(tiny):
    cfg = _cfg(tiny, steps=4, checkpoint_every=2, name="truncate")
    train(cfg, stop_after=3, progress=False)  # checkpoint at 2, metrics for steps 0..2
    assert len(_metrics(cfg_dir := (tiny[0] / "runs" / "truncate"))) == 3
    train(cfg, progress=False)
    assert [r["step"] for r in _metrics(cfg_dir)] == [0, 1, 2, 3]


def test_more_steps_continue_a_finished_run_from_its_last_checkpoint(tiny):
    """Raising ``steps`` keeps the run (same lineage: the identity with steps=1) and continues from its last
    checkpoint: the first steps' lines are the old ones (their timings too: not retrained) and the whole equals an
    uninterrupted run of the new length. Fewer steps than trained is refused. Checkpoints are safetensors + JSON."""
    straight = train(_cfg(tiny, steps=4, name="straight"), progress=False)
    short = train(_cfg(tiny, steps=2, name="extended"), progress=False)
    assert short.status == "done"
    first = _metrics(short.run_dir)
    ckpt = short.run_dir / "checkpoints" / "step_000002"
    assert sorted(p.name for p in ckpt.iterdir()) == ["MANIFEST.json", "optimizer.safetensors",
                                                      "snapshots.safetensors", "state.json", "trainable.safetensors"]
    longer = _cfg(tiny, steps=4, name="extended")
    result = train(longer, progress=False)
    assert result.status == "done" and result.steps_completed == 4
    rows = _metrics(result.run_dir)
    assert rows[:2] == first and _strip_times(rows) == _strip_times(_metrics(straight.run_dir))
    assert json.loads((result.run_dir / "config.json").read_text())["digest"] == run_identity(longer)
    with pytest.raises(RunConflictError, match=r"holds this run with steps=4, and a run cannot be shortened to steps=3"):
        train(_cfg(tiny, steps=3, name="extended"), progress=False)
    assert train(longer, progress=False).status == "skipped"


def test_resuming_an_off_policy_lora_run_restores_the_snapshots_and_the_optimizer(tiny):
    """The async-lag snapshots and PPO's AdamW state of LoRA adapters survive the checkpoint round trip."""
    kw = dict(steps=3, async_lag=2, policy_loss="ppo", ppo_minibatches=2, finetune="lora",
              kl=KLConfig("k1", "loss", beta=1.0))
    straight = train(_cfg(tiny, name="offpolicy-straight", **kw), progress=False)
    cfg = _cfg(tiny, name="offpolicy-resumed", **kw)
    assert train(cfg, stop_after=2, progress=False).status == "interrupted"  # step 2 samples from step 0's snapshot
    assert _strip_times(_metrics(train(cfg, progress=False).run_dir)) == _strip_times(_metrics(straight.run_dir))


def test_a_run_without_summary_is_incomplete_not_done(tiny):
    """DONE without summary.json is not a finished run: it is resumed (from its final checkpoint, no step
    retrained) and finished again, never reported as done with 0 steps."""
    cfg = _cfg(tiny, steps=2, name="nosummary")
    result = train(cfg, progress=False)
    rows = _metrics(result.run_dir)
    (result.run_dir / "summary.json").unlink()
    again = train(cfg, progress=False)
    assert again.status == "done" and again.steps_completed == 2 and _metrics(again.run_dir) == rows
    assert json.loads((again.run_dir / "summary.json").read_text())["steps_completed"] == 2


def test_divergence_is_recorded_and_the_run_exits_cleanly(tiny):
    """A learning rate of 1e30 blows the weights up in one update: the next rollout samples from NaN probabilities
    and the run stops there, with the metrics of the steps before it."""
    cfg = _cfg(tiny, steps=8, lr=1e30, kl=KLConfig("k1", "loss", beta=1.0), name="diverge")
    result = train(cfg, progress=False)
    assert result.status == "diverged"
    summary = json.loads((result.run_dir / "summary.json").read_text())
    rows = _metrics(result.run_dir)
    assert summary["status"] == "diverged" and summary["diverged_reason"].startswith("step 1")
    assert [r["step"] for r in rows] == [0]
    assert (result.run_dir / "DONE").read_text().strip() == "diverged" and not (result.run_dir / "final").exists()


def test_kl_clip_fraction_is_logged_when_a_clamp_is_set(tiny):
    """KLConfig.log_ratio_clamp's share of clipped tokens reaches metrics.jsonl: 0 at step 0 (π = π_ref bit for
    bit, δ = 0), then the share of valid tokens with |δ| > c (k1 in the loss moves the policy even without
    reward); with micro-batches it is the whole batch's share."""
    rows = {}
    for micro in (0, 2):
        cfg = _cfg(tiny, steps=2, kl=KLConfig("k1", "loss", beta=1.0, log_ratio_clamp=1e-4), micro_batch_size=micro,
                   rollout_grad=False, name=f"clamp-{micro}")
        rows[micro] = _metrics(train(cfg, progress=False).run_dir)
    assert rows[0][0]["kl/clip_fraction"] == 0.0 and 0 < rows[0][1]["kl/clip_fraction"] <= 1
    assert rows[2][1]["kl/clip_fraction"] == pytest.approx(rows[0][1]["kl/clip_fraction"], abs=1e-9)


def test_off_policy_path_with_lag_ppo_and_token_weights(tiny):
    cfg = _cfg(tiny, steps=4, async_lag=2, policy_loss="ppo", ppo_epochs=2, ppo_minibatches=2,
               kl=KLConfig("k1", "loss", beta=1.0, importance_weighting="token"), name="offpolicy")
    result = train(cfg, progress=False)
    rows = _metrics(result.run_dir)
    assert result.status == "done" and all("offpolicy/log_ratio_mean" in r for r in rows)
    # steps 0 samples from the initial policy, so does step 2 (lag 2); the log-ratio is 0 only at step 0
    assert rows[0]["offpolicy/log_ratio_mean"] == pytest.approx(0.0, abs=1e-5)
    assert abs(rows[3]["offpolicy/log_ratio_mean"]) > 1e-6


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="RLConfig.advantage='ppo'.*'rloo'"):
        RLConfig(advantage="ppo")
    with pytest.raises(ValueError, match="RLConfig.group_size"):
        RLConfig(group_size=1)
    with pytest.raises(ValueError, match="RLConfig.lr"):
        RLConfig(lr=-1.0)
    with pytest.raises(ValueError, match="policy_loss='ppo'"):
        RLConfig(ppo_epochs=2)
    with pytest.raises(ValueError, match="KLConfig.placement"):
        load_config(None, ["kl.placement=advantage"])
    with pytest.raises(ValueError, match="unknown config key 'stepz'"):
        load_config(None, ["stepz=3"])
    with pytest.raises(ValueError, match="unknown KL key"):
        load_config(None, ["kl.bet=3"])
    cfg = load_config(None, ["kl.estimator=k3", "kl.placement=loss", "steps=7", "finetune=lora"])
    assert cfg.kl.estimator == "k3" and cfg.steps == 7 and cfg.run_name() == "k3-loss-b0.1-lora-s0"
    assert dataclasses.replace(cfg, name="x").digest() == cfg.digest()
    # micro-batches change how the gradient is computed, not what it is: same digest, so a finished run is kept
    assert dataclasses.replace(cfg, micro_batch_size=4).digest() == cfg.digest()


def test_micro_batch_size_must_cut_updates_into_whole_prompt_groups():
    with pytest.raises(ValueError, match=r"micro_batch_size=3 must be a multiple of group_size=2 .* one of \[2, 4, 8\]"):
        RLConfig(prompts_per_step=4, group_size=2, micro_batch_size=3)
    with pytest.raises(ValueError, match=r"micro_batch_size=8 .* divides the 4 sequences of each update"):
        RLConfig(prompts_per_step=4, group_size=2, policy_loss="ppo", ppo_minibatches=2, micro_batch_size=8)
    with pytest.raises(ValueError, match="or fewer ppo_minibatches"):  # no micro-batch fits 8 / 4 = 2 sequences
        RLConfig(prompts_per_step=2, group_size=4, policy_loss="ppo", ppo_minibatches=4, micro_batch_size=4)
    with pytest.raises(ValueError, match="RLConfig.micro_batch_size=-2 must be an integer ≥ 0"):
        RLConfig(micro_batch_size=-2)
    assert RLConfig(prompts_per_step=4, group_size=2, micro_batch_size=4).micro_batch_size == 4


def test_missing_model_or_data_fails_before_compute(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="make data"):
        train(_cfg(tiny, data_dir=str(tmp_path / "nodata")), progress=False)
    with pytest.raises(FileNotFoundError, match="make base-model"):
        train(_cfg(tiny, model=str(tmp_path / "nomodel")), progress=False)


def test_run_identity_follows_the_base_model_and_the_data(tiny, tmp_path):
    """A finished run is reused only if its config, base-model weights and training prompts are unchanged."""
    cfg = _cfg(tiny)
    other_model = save_untrained_model(tmp_path / "other", seed=1, hidden_size=32, num_layers=2, num_heads=2,
                                       intermediate_size=64)
    other_data = tmp_path / "data"
    write_splits(other_data, seed=1, sizes=SIZES)
    assert run_identity(cfg) == run_identity(_cfg(tiny))
    assert run_identity(cfg) != run_identity(dataclasses.replace(cfg, model=str(other_model)))
    assert run_identity(cfg) != run_identity(dataclasses.replace(cfg, data_dir=str(other_data)))
    assert run_identity(cfg) != run_identity(dataclasses.replace(cfg, lr=2e-3))


def test_sharing_each_prompt_across_its_group_changes_nothing_but_the_cost(tiny):
    """Groups of identical prompts are encoded once (prefix cache in generate, a shared prompt pass in the
    log-probs): the same samples, log-probs and gradients as the plain path."""
    _, model_dir = tiny
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    G = 3
    ids, mask = _prompts(tokenizer, [t for t in ["1+2=", "123+456=", "99-7="] for _ in range(G)])
    plain = generate(model, tokenizer, ids, mask, max_new_tokens=5, temperature=1.0, seed=4)
    shared = generate(model, tokenizer, ids, mask, max_new_tokens=5, temperature=1.0, seed=4, group_size=G)
    assert torch.equal(plain.response_ids, shared.response_ids)
    m = plain.response_mask
    torch.testing.assert_close(plain.behavior_logp[m], shared.behavior_logp[m], atol=1e-5, rtol=0)
    args = (plain.prompt_ids, plain.prompt_mask, plain.response_ids, m)
    model.train()
    grads = []
    for group_size in (1, G):
        logp, logprobs = token_logprobs(model, *args, group_size=group_size)
        loss = (logp * m).sum() + (logprobs.exp() * logprobs).sum()
        grads.append((logp.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=0)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # rows interleaved, so not consecutive groups of one prompt: the plain path is taken
    perm = torch.arange(3 * G).view(3, G).T.reshape(-1)
    logp_mixed, _ = token_logprobs(model, *(x[perm] for x in args), group_size=G)
    torch.testing.assert_close(logp_mixed, grads[0][0][perm], atol=1e-5, rtol=0)


@pytest.mark.parametrize("finetune", ["full", "lora"])
def test_gradient_checkpointing_makes_the_same_updates(tiny, finetune):
    """Recomputing activations changes memory, not results (the shared prompt pass is off under checkpointing)."""
    runs = {}
    for checkpointing in (False, True):
        cfg = _cfg(tiny, steps=2, finetune=finetune, gradient_checkpointing=checkpointing,
                   name=f"ckpt-{finetune}-{checkpointing}", kl=KLConfig("k1", "loss", beta=1.0))
        result = train(cfg, progress=False)
        assert result.status == "done"
        runs[checkpointing] = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    for plain, ckpt in zip(runs[False], runs[True]):
        for key in ("loss/total", "grad/norm", "kl/k1", "policy/entropy"):
            assert ckpt[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-6), key


# --------------------------------------------------------------------------------------------------------------
# Micro-batches: the same run, computed in passes of one prompt group
# --------------------------------------------------------------------------------------------------------------


def test_token_only_logprobs_match_the_full_path(tiny):
    """``full=False`` (logits[y] − logsumexp, no (B, R, V) log-softmax) gives the full path's log π and gradients,
    and both give those of the plain computation (all positions' logits, out-of-place temperature)."""
    _, model_dir = tiny
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    ids, mask = _prompts(tokenizer, [t for t in ["1+2=", "123+456=", "99-7="] for _ in range(2)])
    roll = generate(model, tokenizer, ids, mask, max_new_tokens=5, temperature=0.7, seed=2, group_size=2)
    args = (roll.prompt_ids, roll.prompt_mask, roll.response_ids, roll.response_mask, 0.7)
    w = torch.randn(roll.response_ids.shape, generator=torch.Generator().manual_seed(0)) * roll.response_mask
    model.train()
    attention = torch.cat([roll.prompt_mask, roll.response_mask.long()], 1)
    P = roll.prompt_ids.shape[1]
    logits = model(input_ids=torch.cat([roll.prompt_ids, roll.response_ids], 1), attention_mask=attention,
                   position_ids=(attention.cumsum(-1) - 1).clamp_min(0)).logits[:, P - 1: -1] / 0.7
    plain = torch.log_softmax(logits, -1).gather(-1, roll.response_ids.unsqueeze(-1)).squeeze(-1)
    plain = (plain.detach(), torch.autograd.grad((w * plain).sum(), list(model.parameters())))
    for group_size in (1, 2):  # the forward with logits_to_keep, and the shared prompt pass
        out = {None: plain}
        for full in (True, False):
            logp, logprobs = token_logprobs(model, *args, group_size=group_size, full=full)
            assert (logprobs is None) == (not full)
            out[full] = (logp.detach(), torch.autograd.grad((w * logp).sum(), list(model.parameters())))
        for full in (True, False):
            torch.testing.assert_close(out[full][0], out[None if full else True][0], atol=1e-6, rtol=0)
            for a, b in zip(out[full][1], out[None if full else True][1]):
                torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _digit_reward(response, problem, finished):
    """The share of digits in the response: an untrained model earns it in varying amounts, so the policy
    gradient is not zero and every update is a real one (with the arithmetic reward, all zero, it would be
    AdamW's normalisation of the KL term alone)."""
    return sum(c.isdigit() for c in response) / max(1, len(response))


PPO = {"policy_loss": "ppo", "ppo_epochs": 2, "ppo_minibatches": 2}
MICRO_CASES = {
    "reinforce-k1-reward": {"kl": KLConfig("k1", "reward", beta=0.2)},
    "reinforce-k3-loss-token_mean": {"kl": KLConfig("k3", "loss", beta=0.2), "aggregation": "token_mean"},
    "reinforce-analytic-loss": {"kl": KLConfig("analytic", "loss", beta=0.2)},
    "ppo-k1-reward-lag": {**PPO, "kl": KLConfig("k1", "reward", beta=0.2), "async_lag": 1},
    "ppo-k3-loss": {**PPO, "kl": KLConfig("k3", "loss", beta=0.2, importance_weighting="token")},
    "ppo-analytic-loss-epochs": {**PPO, "ppo_minibatches": 1, "kl": KLConfig("analytic", "loss", beta=0.2)},
    "ppo-analytic-loss": {**PPO, "kl": KLConfig("analytic", "loss", beta=0.2)},
    "reinforce-k1-reward-loo": {"kl": KLConfig("k1", "reward", beta=0.2), "kl_reward_baseline": "loo"},
    "ppo-k3-both-loo-lag": {**PPO, "kl": KLConfig("k3", "both", beta=0.2), "async_lag": 1,
                            "kl_reward_baseline": "loo"},
}


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("case", list(MICRO_CASES))
def test_micro_batches_give_the_same_run(tiny, monkeypatch, finetune, case):
    """micro_batch_size = group_size (passes of one prompt group, gradients accumulated, statistics added up)
    logs the same metrics and ends with the same weights as the whole batch at once.

    Equal up to float32 rounding: other matrix shapes change the last bits of each log-prob (~1e-7), and KL
    values of 1e-4 are sums of differences of such log-probs, hence the absolute floor of 1e-6 (the one the
    checkpointing and two-process tests use). The largest differences seen: 4e-7 on a metric (PPO's loss/kl, a
    k1 coefficient times Σ log π).

    The weights get a tolerance of their own, from how AdamW treats rounding. Its step lr·m̂/(√v̂ + eps) depends
    on the gradient g with slope up to lr/eps (at the first step it is lr·g/(|g| + eps)), so where a gradient
    coordinate is itself rounding noise (|g| ≲ eps = 1e-8: the tied embedding row of a token the model
    practically never predicts, whose gradient is a cancelling sum), a difference δg in its last bits moves the
    weight by up to lr·δg/eps per update, ~1e6·δg here. Measured over these 14 cases: δg ≤ 1.8e-10 where
    |g| < eps (elsewhere ≤ 6e-8); on two intra-op threads (other reduction orders) the first update of
    ``reinforce-analytic-loss`` has δg = 5.2e-11 on embedding row 6 (|g| = 1.5e-10), which moves it by
    lr·δg/eps = 2.6e-6, the difference then found in the final weights (also ~2.6e-6 for
    ``ppo-analytic-loss-epochs`` and 1.0e-6 for ``ppo-k3-loss``; every other weight within 1.2e-7). Hence
    atol = max(1e-6, updates · lr · 2e-10 / eps): the rounding of one near-zero gradient coordinate, amplified
    the most AdamW can at each update."""
    digits = tasks.Task("digits", load=tasks.get_task("arithmetic").load, reward=_digit_reward)
    monkeypatch.setitem(tasks.base._REGISTRY, "digits", digits)
    runs = {}
    for micro in (0, 2):
        cfg = _cfg(tiny, steps=2, task="digits", finetune=finetune, micro_batch_size=micro, lr=5e-4,
                   rollout_grad=False,  # the same rollout path for both (the sampling forward is tested below)
                   name=f"micro-{case}-{finetune}-{micro}", **MICRO_CASES[case])
        result = train(cfg, progress=False)
        assert result.status == "done"
        runs[micro] = (_strip_times(_metrics(result.run_dir)),
                       {k: v for f in sorted((result.run_dir / "final").glob("*.safetensors"))
                        for k, v in load_file(f).items()})
    (whole, whole_weights), (micro, micro_weights) = runs[0], runs[2]
    assert [r.keys() for r in micro] == [r.keys() for r in whole]
    assert whole[-1]["reward/std"] > 0 and whole[-1]["grad/norm"] > 0  # real updates, not only noise
    for a, b in zip(micro, whole):
        for key in b:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert micro_weights.keys() == whole_weights.keys() and whole_weights
    updates = cfg.steps * cfg.ppo_epochs * cfg.ppo_minibatches
    adam_eps = torch.optim.AdamW([torch.zeros(1)]).defaults["eps"]  # the trainer's AdamW keeps the default
    atol = max(1e-6, updates * cfg.lr * 2e-10 / adam_eps)
    for key, value in whole_weights.items():
        torch.testing.assert_close(micro_weights[key], value, atol=atol, rtol=0, msg=key)

# ---- training on the sampling forward (rollout_grad)

@pytest.mark.parametrize("group_size", [1, 3])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_with_grad_matches_generate_and_recomputation(tiny, group_size, temperature):
    """sample_with_logits draws generate's tokens for the same seed, and its differentiable logits give the
    recomputed log-probs and their gradient; a reference scored in the same loop equals the policy bit for bit."""
    _, model_dir = tiny
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    ids, mask = _prompts(tokenizer, ["1+2=", "123+456=", "99-7=", "5+5="])
    ids, mask = ids.repeat_interleave(group_size, 0), mask.repeat_interleave(group_size, 0)
    plain = generate(model, tokenizer, ids, mask, max_new_tokens=5, temperature=temperature, seed=11,
                     group_size=group_size)
    roll, logits, ref_logits = sample_with_logits(model, tokenizer, ids, mask, max_new_tokens=5,
                                                  temperature=temperature, seed=11, group_size=group_size,
                                                  reference=lambda: contextlib.nullcontext(model))
    assert torch.equal(roll.response_ids, plain.response_ids) and torch.equal(roll.response_mask, plain.response_mask)
    m = roll.response_mask
    torch.testing.assert_close(roll.behavior_logp[m], plain.behavior_logp[m], atol=1e-5, rtol=0)
    assert torch.equal(ref_logits, logits.detach())  # same operations, same weights: k1 = 0 exactly

    weights = torch.linspace(-1, 1, m.numel()).view_as(m) * m
    fused = sampled_logprobs(logits, roll.response_ids)
    grads_fused = torch.autograd.grad((fused * weights).sum(), list(model.parameters()))
    recomputed, _ = token_logprobs(model, roll.prompt_ids, roll.prompt_mask, roll.response_ids, m, temperature,
                                   group_size=group_size)
    torch.testing.assert_close(fused[m], recomputed[m], atol=1e-5, rtol=0)
    grads_recomputed = torch.autograd.grad((recomputed * weights).sum(), list(model.parameters()))
    for a, b in zip(grads_fused, grads_recomputed):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("finetune", ["full", "lora"])
@pytest.mark.parametrize("kl", [KLConfig("k1", "reward", beta=0.2), KLConfig("analytic", "loss", beta=0.2)])
def test_training_on_the_sampling_forward_matches_recomputing(tiny, monkeypatch, finetune, kl):
    """The first step's loss, gradient norm and logged statistics are those of the recomputing path (only the
    first: AdamW turns last-bit differences of near-zero gradient coordinates into steps of up to lr)."""
    digits = tasks.Task("digits", load=tasks.get_task("arithmetic").load, reward=_digit_reward)
    monkeypatch.setitem(tasks.base._REGISTRY, "digits", digits)
    first = {}
    for fused in (True, False):
        cfg = _cfg(tiny, steps=1, task="digits", finetune=finetune, kl=kl, rollout_grad=fused,
                   name=f"fused-{finetune}-{kl.name}-{fused}")
        result = train(cfg, progress=False)
        assert result.status == "done"
        first[fused] = _strip_times(_metrics(result.run_dir))[0]
    assert first[False]["grad/norm"] > 0 and first[False]["reward/std"] > 0
    for key, value in first[False].items():
        assert first[True][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_chat_template_off_trains_on_raw_prompts(tiny):
    """chat_template=off: prompts are the bare user messages, and the saved tokenizer keeps it that way."""
    cfg = _cfg(tiny, steps=1, chat_template="off", name="raw-prompts")
    result = train(cfg, progress=False)
    assert result.status == "done"
    tokenizer = load_tokenizer(result.run_dir / "final")
    assert tokenizer.chat_template is None and format_prompt(tokenizer, "1+2=") == "1+2="
    with pytest.raises(ValueError, match="chat_template"):
        _cfg(tiny, chat_template="maybe")


# ---- the KL penalty's leave-one-out baseline (kl_reward_baseline: loo, the paper's RLOO)


def test_leave_one_out_mean_and_the_reward_penalty():
    x = torch.tensor([1.0, 2.0, 6.0, 0.0, 4.0, 8.0])
    torch.testing.assert_close(losses.leave_one_out_mean(x, 3), torch.tensor([4.0, 3.5, 1.5, 6.0, 4.0, 2.0]))
    with pytest.raises(ValueError, match="group_size"):
        losses.leave_one_out_mean(x, 4)
    logp, ref = torch.log(torch.tensor([[0.5, 0.2], [0.1, 0.9]])), torch.log(torch.tensor([[0.25, 0.4], [0.2, 0.3]]))
    mask = torch.tensor([[True, True], [True, False]])
    k1 = (logp - ref) * mask
    torch.testing.assert_close(losses.kl_reward_penalty(KLConfig("k1", "reward", beta=0.3), logp, ref, mask),
                               0.3 * k1.sum(-1))
    for kl in (KLConfig("k1", "loss", beta=0.3), KLConfig("k1", "reward", beta=0.0)):
        assert losses.kl_reward_penalty(kl, logp, ref, mask).abs().max() == 0


def test_kl_reward_baseline_default_keeps_every_digest():
    """The field is left out of the digest at its default: the digests computed before it existed."""
    assert RLConfig(model="m", data_dir="d").digest() == "392cbb554810"
    assert RLConfig(model="m", data_dir="d", kl=KLConfig("k3", "loss", beta=0.3), advantage="drgrpo", async_lag=10,
                    policy_loss="ppo").digest() == "c5ca33aff951"
    assert RLConfig(model="m", data_dir="d", kl_reward_baseline="loo").digest() != "392cbb554810"
    with pytest.raises(ValueError, match="kl_reward_baseline"):
        RLConfig(model="m", data_dir="d", kl_reward_baseline="mean")


def _toy_group_gradients(baseline: str, estimator: str, group_size: int = 3, beta: float = 0.5):
    """Every outcome of a group of ``group_size`` samples of 2 independent tokens over 2 symbols: its probability
    and the trainer's gradient estimate (RLOO advantage + the KL term in the reward, with or without the
    penalty's leave-one-out baseline), of the objective E[R] − β KL."""
    torch.manual_seed(0)
    theta = torch.randn(2, 2, requires_grad=True)
    ref = torch.log_softmax(torch.randn(2, 2), -1)
    reward_table = torch.tensor([[0.0, 1.0], [0.3, 0.0]])  # R(y) = Σ_t table[t, y_t]
    kl = KLConfig(estimator, "reward", beta=beta)
    probs, grads = [], []
    sequences = list(itertools.product(range(2), repeat=2))
    for group in itertools.product(sequences, repeat=group_size):
        y = torch.tensor(group)  # (G, T)
        logp_all = torch.log_softmax(theta, -1)  # (T, V)
        logp = logp_all.gather(1, y.T).T  # (G, T)
        ref_logp = ref.gather(1, y.T).T
        mask = torch.ones_like(logp, dtype=torch.bool)
        rewards = reward_table.gather(1, y.T).T.sum(-1)
        adv = losses.compute_advantages(rewards, group_size, "rloo")
        if baseline == "loo":
            adv = adv + losses.kl_reward_loo_baseline(losses.kl_reward_penalty(kl, logp, ref_logp, mask), group_size)
        pg, _ = losses.policy_loss("reinforce", logp, adv, mask, None, 0.2, "sum")
        kl_term, _ = losses.kl_loss(kl, logp, ref_logp, mask, behavior_logp=None, logprobs=None, ref_logprobs=None,
                                    aggregation="sum")
        (grad,) = torch.autograd.grad(-(pg + kl_term), theta)
        probs.append(float(logp.detach().sum().exp()))
        grads.append(grad.reshape(-1).double())
    return torch.tensor(probs, dtype=torch.float64), torch.stack(grads), theta, ref, reward_table


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_the_loo_baseline_keeps_the_expected_gradient_exactly(estimator):
    """Over every outcome of a group (exact expectation): both forms have the same expected gradient, and for
    k1 it is the true ∇(E[R] − β KL(π‖π_ref)) (k3 in reward is biased, by the same amount for both forms)."""
    p_none, g_none, theta, ref, table = _toy_group_gradients("none", estimator)
    p_loo, g_loo, *_ = _toy_group_gradients("loo", estimator)
    assert float(p_none.sum()) == pytest.approx(1.0, abs=1e-6)
    mean_none, mean_loo = p_none @ g_none, p_loo @ g_loo
    torch.testing.assert_close(mean_loo, mean_none, atol=1e-6, rtol=1e-6)
    var = {name: float(p @ ((g - p @ g) ** 2).sum(-1)) for name, p, g in (("none", p_none, g_none),
                                                                          ("loo", p_loo, g_loo))}
    print(f"{estimator}: exact trace of the gradient covariance none={var['none']:.5f} loo={var['loo']:.5f}")
    assert var["none"] != pytest.approx(var["loo"], rel=1e-3)  # the forms differ in variance only
    if estimator == "k1":
        t = theta.detach().requires_grad_(True)
        logp = torch.log_softmax(t, -1)
        objective = (logp.exp() * table).sum() - 0.5 * (logp.exp() * (logp - ref)).sum()
        (true_grad,) = torch.autograd.grad(objective, t)
        torch.testing.assert_close(mean_none.float(), true_grad.reshape(-1), atol=1e-5, rtol=1e-5)


def test_the_loo_baseline_on_the_tiny_lm_keeps_the_mean_and_reports_the_variance(tiny):
    """200 independent groups at fixed weights (a perturbed policy, so the KL penalty is not 0): the paired
    difference of the two forms' gradients, b_i ∇log π(y_i), has mean 0 (checked on 8 random directions within
    4.5 standard errors); the traces of both covariances are printed (the variance difference, issue 11)."""
    root, model_dir = tiny
    tokenizer, ref = load_tokenizer(model_dir), load_model(model_dir)
    policy = load_model(model_dir)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    params = [p for p in policy.parameters()]
    kl, group_size, n_samples = KLConfig("k1", "reward", beta=0.3), 4, 200
    ids, mask = _prompts(tokenizer, ["12+34="])
    ids, mask = ids.repeat(group_size, 1), mask.repeat(group_size, 1)
    grads = {"none": [], "loo": []}
    for i in range(n_samples):
        with torch.no_grad():
            roll = generate(policy, tokenizer, ids, mask, max_new_tokens=6, temperature=1.0, seed=1000 + i)
            ref_logp, _ = token_logprobs(ref, ids, mask, roll.response_ids, roll.response_mask, full=False)
        logp, _ = token_logprobs(policy, ids, mask, roll.response_ids, roll.response_mask, full=False)
        valid = roll.response_mask
        rewards = torch.tensor([_digit_reward(t, None, True) for t in roll.texts])
        adv = losses.compute_advantages(rewards, group_size, "rloo")
        base = losses.kl_reward_loo_baseline(losses.kl_reward_penalty(kl, logp, ref_logp, valid), group_size)
        kl_term, _ = losses.kl_loss(kl, logp, ref_logp, valid, behavior_logp=None, logprobs=None, ref_logprobs=None,
                                    aggregation="sum")
        for name, a in (("none", adv), ("loo", adv + base)):
            pg, _ = losses.policy_loss("reinforce", logp, a, valid, None, 0.2, "sum")
            g = torch.autograd.grad(pg + kl_term, params, retain_graph=True)
            grads[name].append(torch.cat([x.reshape(-1) for x in g]).double())
    g_none, g_loo = torch.stack(grads["none"]), torch.stack(grads["loo"])
    traces = {name: float(g.var(0).sum()) for name, g in (("none", g_none), ("loo", g_loo))}
    print(f"tiny LM, k1 in reward, beta=0.3, G={group_size}, {n_samples} groups: trace of the gradient covariance "
          f"none={traces['none']:.4g} loo={traces['loo']:.4g} (ratio loo/none {traces['loo'] / traces['none']:.3f})")
    directions = torch.randn(g_none.shape[1], 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    diff = (g_loo - g_none) @ directions  # (n, 8)
    z = diff.mean(0) / (diff.std(0) / math.sqrt(n_samples))
    assert float(diff.abs().max()) > 0 and float(z.abs().max()) < 4.5, z
