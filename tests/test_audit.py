"""kl_lib.audit: library defaults → gradient classes, the exact group-mean factor against Monte Carlo, the CLI."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kl_lib.audit import analysis, registry
from kl_lib.config import KLSetting

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [analysis.reference_pair(T, 0.5, seed=T) for T in (1, 2, 4)]


def _classes(lib: str, values: dict) -> list[str]:
    _, resolution = registry.resolve(registry.get_library(lib), values)
    return [analysis.classify(t, PAIRS) for t in resolution.terms]


@pytest.mark.parametrize("lib, values, expected", [
    ("verl", {}, []),  # both switches off by default
    ("verl", {"algorithm.use_kl_in_reward": "true"}, ["G*"]),
    ("verl", {"actor_rollout_ref.actor.use_kl_loss": "true"}, ["F"]),
    ("verl", {"actor_rollout_ref.actor.use_kl_loss": "true", "actor_rollout_ref.actor.kl_loss_type": "k3+"}, ["M"]),
    ("verl", {"actor_rollout_ref.actor.use_kl_loss": "true", "actor_rollout_ref.actor.kl_loss_type": "kl"}, ["0"]),
    ("verl", {"algorithm.use_kl_in_reward": "true", "algorithm.kl_penalty": "low_var_kl"}, ["G* − F"]),
    ("verl", {"algorithm.use_kl_in_reward": "true", "algorithm.kl_penalty": "abs"}, ["biased"]),
    ("verl", {"algorithm.use_kl_in_reward": "true", "algorithm.adv_estimator": "grpo",
              "algorithm.norm_adv_by_std_in_grpo": "false", "actor_rollout_ref.rollout.n": "4"}, ["G*"]),
    ("trl-grpo", {}, []),  # beta = 0.0
    ("trl-grpo", {"beta": "0.04"}, ["M"]),
    ("trl-grpo", {"beta": "0.04", "use_bias_correction_kl": "false"}, ["F"]),
    ("trl-grpo", {"beta": "0.04", "importance_sampling_level": "sequence"}, ["F + (G* − F)/T"]),
    ("trl-rloo", {}, ["G*"]),
    ("openrlhf", {}, ["G*"]),
    ("openrlhf", {"algo.kl.use_loss": "true"}, ["0"]),
    ("openrlhf", {"algo.kl.use_loss": "true", "algo.kl.estimator": "k3"}, ["F"]),
    ("openrlhf", {"algo.kl.use_loss": "true", "algo.kl.estimator": "k3", "algo.kl.unbiased_gradient": "true"}, ["M"]),
    ("nemo-rl", {}, ["M"]),
    ("nemo-rl", {"loss_fn.use_kl_in_reward": "true"}, ["M − F"]),
])
def test_library_flags_give_the_expected_gradient_class(lib, values, expected):
    assert _classes(lib, values) == expected


def test_unknown_flags_and_libraries_are_named():
    with pytest.raises(ValueError, match=r"unknown verl flag\(s\) 'algorithm.use_kl_in_rewards' \(did you mean "
                                         r"'algorithm.use_kl_in_reward'\?\); known flags: algorithm.use_kl_in_reward"):
        registry.resolve(registry.get_library("verl"), {"algorithm.use_kl_in_rewards": "true"})
    with pytest.raises(ValueError, match="unknown library 'trl'; known libraries: trl-grpo, trl-rloo"):
        registry.get_library("trl")
    with pytest.raises(ValueError, match="algorithm.kl_penalty='k9' is not valid"):
        registry.resolve(registry.get_library("verl"), {"algorithm.kl_penalty": "k9"})
    with pytest.raises(ValueError, match="beta='lots' is not a valid float"):
        registry.resolve(registry.get_library("trl-grpo"), {"beta": "lots"})
    with pytest.raises(ValueError, match="NotImplementedError"):
        registry.resolve(registry.get_library("verl"), {"algorithm.use_kl_in_reward": True,
                                                        "algorithm.kl_penalty": "full"})


@pytest.mark.parametrize("kwargs, message", [
    ({"estimator": "k1", "placement": "loss", "local_reward": True}, "local_reward=True needs"),
    ({"estimator": "k1", "placement": "reward", "reward_normalization": "group_std"}, "integer group_size ≥ 2"),
    ({"estimator": "k3", "placement": "reward", "importance_weighting": "token", "token_weight": "detached"},
     "needs importance_weighting='token' and placement='loss'"),
    ({"estimator": "analytic", "placement": "loss", "value_clamp": 1.0}, "not 'analytic'"),
    ({"estimator": "k3", "placement": "loss", "gradient_estimator": "analytic"}, "gradient_estimator='analytic'"),
])
def test_setting_combinations_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KLSetting(**kwargs)


def test_group_mean_factor_is_exact_against_monte_carlo():
    """E[(c_i − c̄) ∇log π(y_i)] = (1 − 1/G) E[c ∇log π]: exact vs Monte Carlo through objectives, within 5 SE."""
    policy, ref = analysis.reference_pair(3, 1.0, seed=7)
    term = analysis.Term(KLSetting("k1", "reward", reward_normalization="group_mean", group_size=3))
    exact_mean = analysis.expected_grad(term, policy, ref)
    mean, stderr, _ = analysis.group_mc(term, policy, ref, 20_000, torch.Generator().manual_seed(0))
    assert torch.all((mean - exact_mean).abs() <= 5 * stderr + 1e-12)
    assert not torch.allclose(exact_mean * 3 / 2, analysis.expected_grad(analysis.Term(KLSetting("k1", "reward")),
                                                                         policy, ref) * 0.5)


def test_exact_refuses_group_normalisation_and_dp_refuses_enumeration_only_weights():
    policy, ref = analysis.reference_pair(3, 1.0)
    from kl_lib.toy import exact
    with pytest.raises(ValueError, match="reward_normalization couples the samples"):
        exact.expected_kl_grad(policy, ref, KLSetting("k1", "reward", reward_normalization="group_std", group_size=2))
    with pytest.raises(ValueError, match="Markov DP does not handle"):
        exact.expected_kl_grad(policy, ref, KLSetting("k3", "loss", importance_weighting="sequence",
                                                      sequence_weight="geometric_mean"), method="dp")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kl_lib.audit", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("lib, config, expected", [
    ("verl", "verl_grpo_kl_loss.yaml", "β·(F)/T"),
    ("verl", "verl_k1_in_reward.yaml", "β·(G*): the true gradient"),
    ("trl-grpo", "trl_grpo.yaml", "β·(M)/T"),
    ("trl-grpo", "trl_grpo_sequence.json", "β·(F + (G* − F)/T)/T"),
    ("openrlhf", "openrlhf_args.txt", "β·(F)/T"),
    ("nemo-rl", "nemo_rl_grpo.yaml", "β·(M)/T"),
])
def test_cli_on_sample_config_files(lib, config, expected):
    result = _cli("--lib", lib, "--config", f"configs/libraries/{config}", "--lengths", "1,2")
    assert result.returncode == 0, result.stderr
    assert f"expected gradient: {expected}" in result.stdout
    assert "known upstream bugs" in result.stdout and "unbiased gradient (G*)" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--lib", "nope"], "unknown library 'nope'"),
    (["--lib", "verl", "--set", "algorithm.use_kl_in_rewards=true"], "unknown verl flag(s)"),
    (["--lib", "verl", "--set", "algorithm.use_kl_in_reward"], "expected KEY=VALUE"),
    (["--lib", "verl", "--config", "configs/libraries/missing.yaml"], "does not exist"),
    (["--lib", "verl", "--lengths", "1,20"], "between 1 and 8"),
])
def test_cli_errors_are_one_line_with_status_2(args, message):
    result = _cli(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr


def test_cli_default_and_help():
    result = _cli("--lib", "verl", "--lengths", "1")
    assert result.returncode == 0 and "the KL is off" in result.stdout
    help_text = _cli("--help").stdout
    assert "examples:" in help_text and "--set" in help_text


@pytest.mark.parametrize("aggregation, constant", [("sum", None), ("token_mean", None), ("global_token_mean", None),
                                                   ("constant", None), ("constant", 11.0)])
def test_aggregation_scale_matches_kl_term_on_enumerated_sequences(aggregation, constant):
    """analysis.aggregation_scale × exact gradient = ∇ kl_term(aggregation) with weights μ(y) over all sequences."""
    from kl_lib import objectives
    from kl_lib.toy import exact
    policy, ref = analysis.reference_pair(3, 1.0, seed=2)
    setting = KLSetting("k3", "both")
    seqs = exact.all_sequences(3, 3)
    theta = policy.logits.detach().double().requires_grad_()
    logp, logprobs = policy.token_logprobs(seqs, theta)
    ref_logp, ref_logprobs = ref.token_logprobs(seqs, ref.logits.double())
    loss, _ = objectives.kl_term(setting, logp, ref_logp, weights=logp.detach().sum(-1).exp(), logprobs=logprobs,
                                 ref_logprobs=ref_logprobs, aggregation=aggregation, aggregation_constant=constant)
    (grad,) = torch.autograd.grad(loss, theta)
    expected = analysis.expected_grad(analysis.Term(setting, aggregation, constant), policy, ref)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("lib, sets", [
    ("trl-grpo", ["beta=0.04"]),
    ("trl-grpo", ["beta=0.04", "loss_type=dr_grpo", "importance_sampling_level=sequence"]),
    ("verl", ["actor_rollout_ref.actor.use_kl_loss=true"]),
    ("verl", ["algorithm.use_kl_in_reward=true", "algorithm.adv_estimator=grpo", "actor_rollout_ref.rollout.n=8"]),
    ("verl", ["algorithm.use_kl_in_reward=true", "algorithm.kl_penalty=abs"]),
    ("openrlhf", ["algo.kl.estimator=k3", "algo.kl.use_loss=true", "algo.kl.unbiased_gradient=true"]),
    ("nemo-rl", []),
    ("nemo-rl", ["loss_fn.use_kl_in_reward=true"]),
    ("trl-rloo", []),
])
def test_cli_prints_trainer_overrides_that_load_the_audited_setting(lib, sets):
    """The printed ``python -m kl_lib.rl.train --set …`` line loads into an RLConfig whose kl is the audited setting
    (and whose aggregation is the term's)."""
    from kl_lib.config import as_setting
    from kl_lib.rl.config import load_config
    result = _cli("--lib", lib, *(a for s in sets for a in ("--set", s)), "--lengths", "1", "--mc-groups", "100")
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("python -m kl_lib.rl.train")]
    _, resolution = registry.resolve(registry.get_library(lib), dict(s.split("=", 1) for s in sets))
    assert len(lines) == len(resolution.terms) == 1
    overrides = lines[0].split()[3:]
    assert overrides[::2] == ["--set"] * (len(overrides) // 2)
    cfg = load_config(None, overrides[1::2])
    (term,) = resolution.terms
    assert as_setting(cfg.kl) == term.setting
    assert (cfg.aggregation, cfg.aggregation_constant) == (term.aggregation, term.aggregation_constant)


def test_cli_says_two_terms_are_two_runs():
    result = _cli("--lib", "verl", "--set", "algorithm.use_kl_in_reward=true", "--set",
                  "actor_rollout_ref.actor.use_kl_loss=true", "--lengths", "1")
    assert result.returncode == 0, result.stderr
    assert "not as one run: the trainer runs one KL term per run and these flags give 2" in result.stdout
    assert result.stdout.count("python -m kl_lib.rl.train --set") == 2
