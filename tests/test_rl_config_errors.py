"""Bad RL configs: each is one ``ConfigError`` line (a ``ValueError``), before any compute, that starts with the
file or the field, names the field, and says what to write instead; good configs in any number spelling Python
reads are accepted, and the CLI turns every error into one line on stderr and exit status 2."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kl_lib.config import KLConfig
from kl_lib.rl.config import ConfigError, RLConfig, check_sweep_spec, load_config, load_sweep_spec
from kl_lib.rl.sweep import expand_sweep

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs" / "gpu").glob("*.yaml"))


def _error(tmp_path: Path, text: str, overrides: tuple[str, ...] = ()) -> tuple[str, Path]:
    """The message of the ConfigError that loading ``text`` as a config file raises, checked to be one line that
    starts with the file's name (or the ``--set`` item at fault)."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), list(overrides))
    message = str(info.value)
    assert "\n" not in message and message.startswith((str(path), "--set ")), message
    return message, path


def _loaded(tmp_path: Path, text: str) -> RLConfig:
    path = tmp_path / "good.yaml"
    path.write_text(text)
    return load_config(str(path))


# ---- numbers in YAML are numbers in any spelling Python's float()/int() reads

@pytest.mark.parametrize("text, field, value", [
    ("lr: 1e-3", "lr", 1e-3), ("lr: 1E-3", "lr", 1e-3), ("lr: '1e-3'", "lr", 1e-3), ("lr: 1.0e-4", "lr", 1e-4),
    ("lr: .5", "lr", 0.5), ("temperature: +3", "temperature", 3), ("divergence_loss: 1_000", "divergence_loss", 1000),
    ("divergence_loss: 1E3", "divergence_loss", 1000.0), ("steps: 1_000", "steps", 1000), ("steps: +3", "steps", 3),
    ("seed: '7'", "seed", 7), ("kl: {beta: 1e-2}", "beta", 0.01),
    ("kl: {log_ratio_clamp: 1e1}", "log_ratio_clamp", 10.0),
])
def test_numbers_in_every_python_spelling_are_read_as_numbers(tmp_path, text, field, value):
    cfg = _loaded(tmp_path, text + "\n")
    got = getattr(cfg.kl if field in ("beta", "log_ratio_clamp") else cfg, field)
    assert got == value and type(got) is type(value)


def test_a_number_in_a_file_is_the_same_config_as_on_the_command_line(tmp_path):
    from_file = _loaded(tmp_path, "lr: 1e-3\nkl: {beta: 5e-2}\n")
    from_set = load_config(None, ["lr=1e-3", "kl.beta=5e-2"])
    assert from_file == from_set == RLConfig(lr=0.001, kl=KLConfig("k1", "reward", beta=0.05))
    assert from_file.digest() == from_set.digest()


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_shipped_configs_load(path):
    if "groups" in (yaml.safe_load(path.read_text()) or {}):  # a sweep file (configs/sweep.yaml, study*.yaml, ...)
        spec = load_sweep_spec(path)
        assert "groups" in spec and set(spec) <= {"base", "eval", "smoke", "groups"}
        assert expand_sweep(spec)  # every run of it is a valid RLConfig
    else:
        assert isinstance(load_config(str(path)), RLConfig)


# ---- one parametrised test per class of bad input: (file text, --set items, field named, fix stated)

NUMBERS = [
    ("lr: .inf\n", (), "RLConfig.lr=inf", "finite number > 0"),
    ("lr: nan\n", (), "RLConfig.lr=nan", "finite number > 0"),
    ("", ("lr=inf",), "RLConfig.lr=inf", "finite number > 0"),
    ("kl: {beta: .nan}\n", (), "KLConfig.beta=nan", "finite number ≥ 0"),
    ("kl: {beta: " + "1" + "0" * 400 + "}\n", (), "KLConfig.beta=", "finite number ≥ 0"),
    ("lr: 1" + "0" * 400 + "\n", (), "RLConfig.lr=", "finite number > 0"),
    ("weight_decay: -1e-2\n", (), "RLConfig.weight_decay=-0.01", "finite number ≥ 0"),
]

INTEGERS = [
    ("steps: 1e3\n", (), "RLConfig.steps='1e3'", "write 1000"),
    ("steps: 3.0\n", (), "RLConfig.steps=3.0", "write 3"),
    ("", ("steps=1e3",), "RLConfig.steps='1e3'", "write 1000"),
    (f"steps: {10**30}\n", (), "RLConfig.steps=1000000000000000000000000000000", "≤ 2147483647"),
    ("seed: 99999999999999999999\n", (), "RLConfig.seed=", "≤ 2147483647"),
    ("seed: -1\n", (), "RLConfig.seed=-1", "integer ≥ 0"),
    ("seed: 1.5\n", (), "RLConfig.seed=1.5", "integer ≥ 0"),
    ("steps: many\n", (), "RLConfig.steps='many'", "integer ≥ 1"),
]

KL_SECTION = [
    ("kl:\n", (), "RLConfig.kl is empty", "kl: {estimator: k1"),
    ("kl: k3\n", (), "RLConfig.kl='k3'", "--set kl.estimator=k3"),
    ("kl: [k3]\n", (), "RLConfig.kl=['k3']", "kl: {estimator: k3"),
    ("steps: 3\n", ("kl=k3",), "RLConfig.kl='k3'", "--set kl.estimator=k3"),
    ("kl: k3\n", ("kl.beta=0.2",), "RLConfig.kl='k3'", "kl: {estimator: k3"),
]

PATHS = [
    ("model: null\n", (), "RLConfig.model is empty", "the default 'data/models/tiny-base'"),
    ("model:\n", (), "RLConfig.model is empty", "the default 'data/models/tiny-base'"),
    ("model: ''\n", (), "RLConfig.model is empty", "the default 'data/models/tiny-base'"),
    ("steps: 3\n", ("model=",), "RLConfig.model is empty", "the default 'data/models/tiny-base'"),
    ("data_dir:\n", (), "RLConfig.data_dir is empty", "leave it out for the task's default data"),
    ("runs_dir: ''\n", (), "RLConfig.runs_dir is empty", "the default 'runs/rl'"),
    ("name:\n", (), "RLConfig.name is empty", "leave it out for the automatic RLConfig.run_name()"),
]

UNKNOWN_KEYS = [
    ("stepz: 3\n", (), "unknown config key 'stepz'", "did you mean 'steps'?"),
    ("kl: {estimatr: k3}\n", (), "unknown KL key 'estimatr'", "did you mean 'estimator'?"),
    ("steps: 3\n", ("kl.bet=3",), "--set kl.bet=3: unknown KL key 'bet'", "did you mean 'beta'?"),
    ("kl: {value_clmap: 10}\n", (), "unknown KL key 'value_clmap'",
     "did you mean 'value_clamp'? (valid keys are beta, estimator, gradient_estimator, group_size"),
    ("steps: 3\n", ("kl.vclamp=10",), "--set kl.vclamp=10: unknown KL key 'vclamp'", "valid keys are beta, "),
    ("steps: 3\n", ("learning_rate=1e-3",), "unknown config key 'learning_rate'", "valid keys are"),
    ("steps: 3\n", ("steps",), "--set steps", "must look like key=value"),
]

KL_SETTINGS = [  # a library's variant (kl_lib.config.KLSetting) the trainer refuses, naming the field
    ("kl: {value_clamp: 0}\n", (), "KLSetting.value_clamp=0", "finite number > 0"),
    ("kl: {reward_normalization: group_mean, group_size: 2}\n", (), "RLConfig.kl.group_size=2",
     "must equal RLConfig.group_size=4"),
    ("group_size: 2\nkl: {reward_normalization: group_std, group_size: 2}\n", ("kl_reward_baseline=loo",),
     "kl_reward_baseline='loo'", "use kl_reward_baseline: none"),
    ("aggregation: sum\n", ("aggregation_constant=64",), "RLConfig.aggregation_constant=64",
     "only used with aggregation: constant"),
]

WRONG_TYPES = [
    ("lr: [1, 2]\n", (), "RLConfig.lr=[1, 2]", "finite number > 0"),
    ("name: 123\n", (), "RLConfig.name=123", 'quote it in YAML: name: "123"'),
    ("model: 1.5\n", (), "RLConfig.model=1.5", 'quote it in YAML: model: "1.5"'),
    ('rollout_grad: "yes"\n', (), "RLConfig.rollout_grad='yes'", "true or false (unquoted"),
    ("gradient_checkpointing: 1\n", (), "RLConfig.gradient_checkpointing=1", "true or false (unquoted"),
    ('kl: {reward_to_go: "no"}\n', (), "KLConfig.reward_to_go='no'", "true or false (unquoted"),
    ("advantage: [rloo]\n", (), "RLConfig.advantage=['rloo']", "choose one of 'rloo'"),
]

LORA_TARGETS = [
    ("lora_targets: q_proj v_proj\n", (), "RLConfig.lora_targets has 'q_proj v_proj'",
     "lora_targets: [q_proj, v_proj]"),
    ("lora_targets: []\n", (), "RLConfig.lora_targets=[]", "lora_targets: [q_proj, v_proj]"),
    ("lora_targets:\n", (), "RLConfig.lora_targets=None", "lora_targets: [q_proj, v_proj]"),
    ("lora_targets: [q_proj, 3]\n", (), "RLConfig.lora_targets has 3", "lora_targets: [q_proj, v_proj]"),
    ("lora_targets: q_proj,,v_proj\n", (), "RLConfig.lora_targets has ''", "--set lora_targets=q_proj,v_proj"),
]


@pytest.mark.parametrize("cases", [NUMBERS, INTEGERS, KL_SECTION, PATHS, UNKNOWN_KEYS, KL_SETTINGS, WRONG_TYPES,
                                   LORA_TARGETS],
                         ids=["numbers", "integers", "kl_section", "paths", "unknown_keys", "kl_settings", "wrong_types",
                              "lora_targets"])
def test_each_bad_value_names_the_field_and_the_fix(tmp_path, cases):
    for text, overrides, field, fix in cases:
        message, _ = _error(tmp_path, text, overrides)
        assert field in message and fix in message, (text, overrides, message)


BAD_FILES = [
    ("steps: 3\nkl: {estimator: k3\nlr: 1\n", "line 3, column 3: not valid YAML", "close every bracket"),
    ("steps:\t3\n", "line 1, column 7: not valid YAML", "indent with spaces"),
    ("steps: 3\nlr: 0.1\nsteps: 4\n", "line 3: key 'steps' is given twice (also on line 1)", "keep one"),
    ("3\n", "a config file must be a YAML mapping", "e.g. steps: 100"),
    ("- steps: 3\n", "a config file must be a YAML mapping", "e.g. steps: 100"),
    ("base: {steps: 3}\ngroups: {}\n", "is a sweep file", "python -m kl_lib.rl.sweep"),
]


@pytest.mark.parametrize("text, problem, fix", BAD_FILES, ids=["unclosed", "tab", "repeated_key", "scalar", "list",
                                                               "sweep_file"])
def test_a_bad_file_is_named_with_its_line_and_the_fix(tmp_path, text, problem, fix):
    message, _ = _error(tmp_path, text)
    assert problem in message and fix in message, message


def test_a_missing_file_a_directory_or_a_binary_file(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_config(str(tmp_path / "nope.yaml"))
    assert str(info.value).startswith(f"{tmp_path / 'nope.yaml'}: no such file")
    assert "run from the repository root or give an absolute path" in str(info.value)
    with pytest.raises(ConfigError, match=rf"^{tmp_path} is a directory; give a YAML file, e\.g\. configs/base\.yaml"):
        load_config(str(tmp_path))
    (tmp_path / "binary.yaml").write_bytes(b"\x80\x81\xfe\n")
    with pytest.raises(ConfigError, match="binary.yaml is not a UTF-8 text file; give a YAML file"):
        load_config(str(tmp_path / "binary.yaml"))


# ---- lora_targets: a list, or one string of comma-separated names (never split into letters)

@pytest.mark.parametrize("text, overrides, targets", [
    ("lora_targets: [q_proj, v_proj]\n", (), ("q_proj", "v_proj")),
    ("lora_targets: q_proj\n", (), ("q_proj",)),
    ("lora_targets: q_proj, v_proj\n", (), ("q_proj", "v_proj")),
    ("steps: 3\n", ("lora_targets=q_proj,v_proj",), ("q_proj", "v_proj")),
    ("steps: 3\n", ("lora_targets=[q_proj, v_proj]",), ("q_proj", "v_proj")),
])
def test_lora_targets_as_a_list_or_comma_separated(tmp_path, text, overrides, targets):
    path = tmp_path / "lora.yaml"
    path.write_text(text)
    assert load_config(str(path), list(overrides)).lora_targets == targets


def test_text_fields_take_override_values_verbatim():
    assert load_config(None, ["name=1e3"]).name == "1e3"
    assert load_config(None, ["data_dir="]).data_dir == ""


# ---- relative paths are read from the current directory

def test_a_run_started_from_another_directory_says_where_to_run_it(tmp_path, monkeypatch):
    repo, elsewhere = tmp_path / "repo", tmp_path / "elsewhere"
    (repo / "configs").mkdir(parents=True)
    (repo / "data" / "models" / "m").mkdir(parents=True)
    elsewhere.mkdir()
    config = repo / "configs" / "run.yaml"
    config.write_text("model: data/models/m\n")
    monkeypatch.chdir(repo)
    assert load_config("configs/run.yaml").model == "data/models/m"
    monkeypatch.chdir(elsewhere)
    with pytest.raises(ConfigError) as info:
        load_config(str(config))
    message = str(info.value)
    assert message.startswith(f"{config}: RLConfig.model='data/models/m' is read from the current directory")
    assert str(elsewhere / "data" / "models" / "m") in message  # the absolute path that was looked at
    assert f"run from {repo} or give the absolute path" in message
    assert load_config(str(config), [f"model={repo / 'data' / 'models' / 'm'}"]).model.startswith(str(repo))


# ---- sweep files: shapes of base, seeds, betas, kl, groups

SWEEP = "groups: {g: {seeds: [0], betas: [0.1], kl: [{estimator: k1, placement: reward}]}}\n"

BAD_SWEEPS = [
    ("groups: {g: {seeds: 3, kl: [{}]}}", "groups.g.seeds=3", "seeds: [0, 1, 2]"),
    ("groups: {g: {seeds: [a], kl: [{}]}}", "groups.g.seeds=['a']", "list of integers ≥ 0"),
    ("groups: {g: {betas: 0.1, kl: [{}]}}", "groups.g.betas=0.1", "betas: [0.05, 0.3]"),
    ("groups: {g: {betas: [.inf], kl: [{}]}}", "groups.g.betas=[inf]", "finite numbers ≥ 0"),
    ("groups: {g: {kl: {estimator: k3}}}", "groups.g.kl={'estimator': 'k3'}", "kl: [{estimator: k1"),
    ("groups: {g: {kl: [k3]}}", "groups.g.kl=['k3']", "kl: [{estimator: k1"),
    ("groups: {g: {kl: [{estimatr: k3}]}}", "groups.g.kl[0]: unknown KL key 'estimatr'", "did you mean 'estimator'"),
    ("groups: {g: {kl: [{beta: }]}}", "groups.g.kl[0]: beta=None", "left out to take the group's betas"),
    ("groups: {g: {sedes: [0], kl: [{}]}}", "unknown groups.g key 'sedes'", "did you mean 'seeds'"),
    ("groups: {g: }", "groups.g=None", "{kl: [{estimator: k1"),
    ("groups: [a, b]", "groups=['a', 'b']", "groups: {main: {kl:"),
    ("base: {steps: 3}", "groups=None", "groups: {main: {kl:"),
    ("base: {seed: 3}\n" + SWEEP, "base.seed would be replaced", "seeds: [0, 1, 2]"),
    ("base: {kl: {beta: 1}}\n" + SWEEP, "base.kl would be replaced", "kl: [{estimator: k1"),
    ("base: {stepz: 3}\n" + SWEEP, "unknown base key 'stepz'", "did you mean 'steps'"),
    ("base: [steps]\n" + SWEEP, "base=['steps']", "{steps: 100}"),
    ("groups: {g: {set: {seed: 1}, kl: [{}]}}", "groups.g.set.seed would be replaced", "seeds: [0, 1, 2]"),
    ("smoke: {seeds: 0}\n" + SWEEP, "smoke.seeds=0", "seeds: [0]"),
    ("smoke: {eval: 2}\n" + SWEEP, "smoke.eval=2", "{num_samples: 4}"),
    ("grups: {}\n", "unknown sweep key 'grups'", "did you mean 'groups'"),
    ("", "found nothing", "see configs/sweep.yaml"),
    ("groups: {g: {kl: [{estimator: k1}}}\n", "line 1, column 34: not valid YAML", "close every bracket"),
]


def test_each_bad_sweep_names_the_key_and_the_fix(tmp_path):
    path = tmp_path / "sweep.yaml"
    for text, key, fix in BAD_SWEEPS:
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_sweep_spec(path)
        message = str(info.value)
        assert message.startswith(str(path)) and "\n" not in message, message
        assert key in message and fix in message, (text, message)


def test_a_sweep_reads_numbers_like_a_config(tmp_path):
    from kl_lib.rl.sweep import expand_sweep

    path = tmp_path / "sweep.yaml"
    path.write_text("base: {lr: 1e-3, steps: 1_000}\ngroups: {g: {betas: [1e-3], kl: [{}, {beta: 0}]}}\n")
    configs = expand_sweep(load_sweep_spec(path))
    assert [(c.lr, c.steps, c.kl.beta) for c in configs] == [(1e-3, 1000, 1e-3), (1e-3, 1000, 0)]
    check_sweep_spec({"groups": {"g": {"kl": [{}]}}})  # a dict spec is checked the same way


# ---- the command line: exit status 2, one line, no traceback, nothing written

@pytest.mark.parametrize("text", [
    "steps: 3\nkl: {estimator: k3\n",          # bad YAML
    "kl: k3\n",                                 # a scalar KL section
    "stepz: 3\n",                               # an unknown key
    f"steps: {10**30}\n",                       # a huge integer
    None,                                       # a directory as the config
    "",                                         # a missing file (not written)
], ids=["yaml", "kl_scalar", "unknown_key", "huge_int", "directory", "missing"])
def test_the_cli_reports_one_line_and_exit_status_2_before_any_compute(tmp_path, text):
    work = tmp_path / "work"
    work.mkdir()
    config = {None: "configs", "": "nope.yaml"}.get(text, "bad.yaml")
    if text is None:
        (work / "configs").mkdir()
    elif text:
        (work / config).write_text(text)  # runs_dir defaults to runs/rl, under work/
    before = sorted(os.listdir(work))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "kl_lib.rl.train", "--config", config, "--no-progress"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {config}"), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert sorted(os.listdir(work)) == before  # no run directory, no runs/
