"""The RL trainer runs a library's KL setting (``kl_lib.config.KLSetting``) through ``objectives.kl_term``.

(a) a KLSetting with every variant at its default trains bit for bit like the plain KLConfig; (b) each library's
setting, as ``python -m kl_lib.audit`` prints it for the trainer, trains 2 steps on the tiny model with finite
losses and a logged value-clip fraction; (c) a value clamp that binds changes the run, one that never binds leaves
it bit-identical; (d) bad keys and settings the trainer cannot run are refused before any compute.
"""

import dataclasses
import json
import math

import pytest

from kl_lib import tasks
from kl_lib.audit import cli, registry
from kl_lib.config import KLConfig, KLSetting, as_setting
from kl_lib.rl.config import ConfigError, RLConfig, load_config
from kl_lib.rl.train import train


def _digit_reward(response, problem, finished):
    """The share of digits in the response (as in tests/test_rl.py): an untrained model earns it in varying
    amounts, so the policy moves off the reference at the first step and a reward-placed KL acts at the second."""
    return sum(c.isdigit() for c in response) / max(1, len(response))


@pytest.fixture
def digits(monkeypatch):
    monkeypatch.setitem(tasks.base._REGISTRY, "digits",
                        tasks.Task("digits", load=tasks.get_task("arithmetic").load, reward=_digit_reward))


def _cfg(tiny, **kw) -> RLConfig:
    root, model_dir = tiny
    base = {"model": str(model_dir), "data_dir": str(root / "data"), "task": "digits", "steps": 2, "prompts_per_step": 4,
            "group_size": 2, "max_new_tokens": 4, "lr": 1e-3, "runs_dir": str(root / "runs"), "checkpoint_every": 2}
    return RLConfig(**{**base, **kw})


def _rows(cfg: RLConfig) -> list[dict]:
    result = train(cfg, progress=False)
    assert result.status == "done", result.summary
    lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in lines]


# ---- (a) no variant: the plain configuration, bit for bit

@pytest.mark.parametrize("plain", [KLConfig("k1", "reward", beta=0.5, reward_to_go=True),
                                   KLConfig("k3", "both", beta=0.5, importance_weighting="token", log_ratio_clamp=0.5)],
                         ids=lambda c: c.name)
def test_a_setting_without_variants_trains_like_the_plain_config(tiny, one_thread, digits, plain):
    setting = as_setting(plain)
    assert type(setting) is KLSetting and setting.name == plain.name
    a = _rows(_cfg(tiny, kl=plain, name=f"plain-{plain.name}"))
    b = _rows(_cfg(tiny, kl=setting, name=f"setting-{plain.name}"))
    assert a == b  # every metric, both steps, exactly
    assert a[-1]["grad/norm"] > 0 and "kl/value_clip_fraction" not in a[-1]
    # and the text form of a setting without variants is the plain config, with its digest
    loaded = load_config(None, [f"kl.{k}={v}" for k, v in (("estimator", "k1"), ("beta", "0.5"), ("value_clamp", "null"),
                                                             ("local_reward", "false"), ("std_epsilon", "1e-6"))])
    assert type(loaded.kl) is KLConfig and loaded.digest() == RLConfig(kl=KLConfig("k1", "reward", beta=0.5)).digest()


# ---- (b) each library's setting, through the audit's printed overrides

LIBRARY_SETTINGS = {
    "trl-grpo": ("trl-grpo", {"beta": "0.04"}),
    "trl-grpo-dr_grpo-sequence": ("trl-grpo", {"beta": "0.04", "loss_type": "dr_grpo",
                                               "importance_sampling_level": "sequence", "max_completion_length": "4"}),
    "verl-low_var_kl-loss": ("verl", {"actor_rollout_ref.actor.use_kl_loss": "true"}),
    "verl-k3+-loss": ("verl", {"actor_rollout_ref.actor.use_kl_loss": "true",
                               "actor_rollout_ref.actor.kl_loss_type": "k3+"}),
    "verl-k1-reward-gae": ("verl", {"algorithm.use_kl_in_reward": "true"}),
    "verl-k1-reward-grpo": ("verl", {"algorithm.use_kl_in_reward": "true", "algorithm.adv_estimator": "grpo",
                                     "actor_rollout_ref.rollout.n": "2"}),
    "verl-abs-reward-drgrpo": ("verl", {"algorithm.use_kl_in_reward": "true", "algorithm.kl_penalty": "abs",
                                        "algorithm.adv_estimator": "grpo", "algorithm.norm_adv_by_std_in_grpo": "false",
                                        "actor_rollout_ref.rollout.n": "2"}),
    "openrlhf-k3-loss-unbiased": ("openrlhf", {"algo.kl.estimator": "k3", "algo.kl.use_loss": "true",
                                               "algo.kl.unbiased_gradient": "true"}),
    "openrlhf-k3-reward": ("openrlhf", {"algo.kl.estimator": "k3"}),
    "nemo-rl": ("nemo-rl", {}),
    "nemo-rl-reward": ("nemo-rl", {"loss_fn.use_kl_in_reward": "true"}),
}


def _library_run(tiny, case: str, **kl_changes):
    """The audited term of ``case``, and the rows of a 2-step run of it, loaded from the audit's overrides (β = 1,
    so that the KL term, not only the untrained model's zero reward, moves the tiny model in 2 steps)."""
    name, values = LIBRARY_SETTINGS[case]
    _, resolution = registry.resolve(registry.get_library(name), values)
    (term,) = resolution.terms
    cfg = load_config(None, cli.trainer_overrides(term))
    assert as_setting(cfg.kl) == term.setting and cfg.aggregation == term.aggregation
    assert cfg.aggregation_constant == term.aggregation_constant
    if term.setting.reward_normalization != "none":
        assert cfg.group_size == cfg.kl.group_size == 2
    kl = dataclasses.replace(cfg.kl, beta=1.0, **kl_changes)
    tag = "-".join(f"{k}{v}" for k, v in kl_changes.items())
    return term, _rows(_cfg(tiny, kl=kl, aggregation=cfg.aggregation, aggregation_constant=cfg.aggregation_constant,
                            name=f"lib-{case}{tag}"))


@pytest.mark.parametrize("case", list(LIBRARY_SETTINGS))
def test_each_library_setting_trains_through_the_printed_overrides(tiny, one_thread, digits, case):
    term, rows = _library_run(tiny, case)
    for row in rows:
        for key in ("loss/total", "loss/kl", "loss/pg", "grad/norm", "kl/k1", "kl/k3"):
            assert math.isfinite(row[key]), (case, row["step"], key)
    assert rows[-1]["grad/norm"] > 0
    if term.setting.value_clamp is None:
        assert "kl/value_clip_fraction" not in rows[-1]
    else:
        # 0 at step 0 (π = π_ref bit for bit: every estimate is 0), a share of valid tokens after. The libraries'
        # clamp of 10 binds only far from the reference (k3: δ < −2.6), which two small steps do not reach; the
        # binding case is test (c)'s
        assert rows[0]["kl/value_clip_fraction"] == 0.0 and 0.0 <= rows[1]["kl/value_clip_fraction"] <= 1.0
    if term.setting.log_ratio_clamp is not None:
        assert rows[0]["kl/clip_fraction"] == 0.0 and 0.0 <= rows[1]["kl/clip_fraction"] <= 1.0


# ---- (c) a value clamp changes the run where, and only where, it binds

@pytest.mark.parametrize("case", ["verl-low_var_kl-loss", "openrlhf-k3-reward", "nemo-rl-reward"])
def test_a_binding_value_clamp_changes_the_loss_and_one_that_never_binds_does_not(tiny, one_thread, digits, case):
    _, unclamped = _library_run(tiny, case, value_clamp=None, log_ratio_clamp=None)
    _, never = _library_run(tiny, case, value_clamp=1e6, log_ratio_clamp=None)
    _, binds = _library_run(tiny, case, value_clamp=1e-6, log_ratio_clamp=None)
    assert [r["kl/value_clip_fraction"] for r in never] == [0.0, 0.0]
    assert never == [{**r, "kl/value_clip_fraction": 0.0} for r in unclamped]  # bit for bit
    assert binds[0] == {**unclamped[0], "kl/value_clip_fraction": 0.0}  # step 0: every estimate is exactly 0
    assert 0 < binds[1]["kl/value_clip_fraction"] <= 1
    assert binds[1]["loss/kl"] != unclamped[1]["loss/kl"]


# ---- (d) bad keys and settings the trainer cannot run: a clear error before any compute

@pytest.mark.parametrize("overrides, message", [
    (["kl.value_clmap=10"], "unknown KL key 'value_clmap'; did you mean 'value_clamp'? (valid keys are beta, "),
    (["kl.value_clamp=-1"], "KLSetting.value_clamp=-1.0 must be a finite number > 0"),
    (["kl.gradient_estimator=analytic"], "KLSetting.gradient_estimator='analytic' is not valid"),
    (["kl.local_reward=true", "kl.placement=loss"], "local_reward=True needs placement='reward' or 'both'"),
    (["kl.token_weight=detached"], "token_weight='detached' needs importance_weighting='token' and placement='loss'"),
    (["kl.reward_normalization=group_std"], "needs an integer group_size ≥ 2, got None"),
    (["kl.reward_normalization=group_mean", "kl.group_size=3"],
     "RLConfig.kl.group_size=3 must equal RLConfig.group_size=4: the trainer normalises the KL penalty within each "
     "prompt's group of samples; set kl.group_size=4"),
    (["kl.reward_normalization=group_std", "kl.group_size=4", "policy_loss=ppo", "ppo_minibatches=2"],
     "ppo_minibatches=2: minibatches are shuffled rows that split the prompt groups"),
    (["kl.reward_normalization=group_std", "kl.group_size=4", "kl_reward_baseline=loo"],
     "kl_reward_baseline='loo': the group normalisation already centres the penalty"),
    (["kl.local_reward=\"yes\""], "RLConfig.kl.local_reward='yes' must be true or false"),
    (["aggregation_constant=512"], "aggregation_constant=512 is only used with aggregation: constant"),
    (["aggregation=constant", "aggregation_constant=0"], "aggregation_constant=0 must be a finite number > 0"),
])
def test_bad_settings_are_refused_before_compute(tmp_path, overrides, message):
    """``load_config`` refuses them: no model, data or run directory is touched (the model path does not exist)."""
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"model={tmp_path / 'absent'}", f"runs_dir={tmp_path / 'runs'}", *overrides])
    assert message in str(err.value)
    assert not (tmp_path / "runs").exists()


def test_setting_fields_reach_the_help_and_keep_the_plain_digests():
    from kl_lib.rl.config import fields_help
    text = fields_help()
    for key in ("kl.value_clamp", "kl.gradient_estimator", "kl.reward_normalization", "aggregation_constant"):
        assert f"  {key}: " in text
    assert "{none, group_mean, group_std}" in text
    assert RLConfig(model="m", data_dir="d").digest() == "392cbb554810"  # as tests/test_rl.py pins it
    assert RLConfig(model="m", data_dir="d", kl={"estimator": "k1", "placement": "reward", "beta": 0.1,
                                                 "value_clamp": None}).digest() == "392cbb554810"
    clamped = RLConfig(model="m", data_dir="d", kl={"estimator": "k1", "placement": "reward", "beta": 0.1,
                                                    "value_clamp": 10})
    assert isinstance(clamped.kl, KLSetting) and clamped.kl.value_clamp == 10.0 and clamped.digest() != "392cbb554810"
    assert clamped.run_name() == "k1-reward-vclamp10-b0.1-s0"


# ---- (e) the library aggregations and the group-normalised penalty do not depend on how a batch is split

@pytest.mark.parametrize("aggregation, kl", [
    ("global_token_mean", KLSetting("k3", "loss", beta=1.0, importance_weighting="token", value_clamp=10.0)),
    ("constant", KLConfig("k1", "both", beta=1.0)),
    ("sum", KLSetting("k1", "reward", beta=1.0, reward_normalization="group_std", group_size=2)),
], ids=["global_token_mean", "constant", "group_std"])
def test_micro_batches_give_the_same_metrics_for_library_terms(tiny, one_thread, digits, aggregation, kl):
    """Passes of one prompt group (micro_batch_size = group_size) log the whole batch's metrics: the global token
    mean divides by the update batch's tokens, not the pass's, and a pass holds whole groups. Equal up to float32
    rounding (tolerances of tests/test_rl.py's micro-batch test)."""
    runs = [_rows(_cfg(tiny, kl=kl, aggregation=aggregation, micro_batch_size=micro, rollout_grad=False,
                       name=f"split-{aggregation}-{kl.name}-{micro}")) for micro in (0, 2)]
    assert runs[0][1]["loss/kl"] != 0
    for whole, split in zip(*runs):
        assert split.keys() == whole.keys()
        for key in whole:
            assert split[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), (whole["step"], key)


def test_the_group_normalised_penalty_is_not_the_plain_one(tiny, one_thread, digits):
    plain = _rows(_cfg(tiny, kl=KLConfig("k1", "reward", beta=1.0), name="penalty-plain"))
    normalised = _rows(_cfg(tiny, kl=KLSetting("k1", "reward", beta=1.0, reward_normalization="group_std",
                                               group_size=2), name="penalty-groupstd"))
    assert plain[0] == normalised[0]  # step 0: every estimate is 0, so is every normalised penalty
    assert plain[1]["kl/k1"] == normalised[1]["kl/k1"]  # the same policy after the same first update
    assert normalised[1]["loss/kl"] != plain[1]["loss/kl"]
