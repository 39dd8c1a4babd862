"""The command lines explain themselves: every config field in the trainer's and the sweep's ``--help`` (type,
default, allowed values, doc), real program names, a help string on every option; optional TensorBoard tracking."""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kl_lib.config import IMPORTANCE_WEIGHTINGS, PLACEMENTS, KLConfig
from kl_lib.estimators import ESTIMATORS
from kl_lib.lm import sft
from kl_lib.lm.models import save_untrained_model
from kl_lib.rl import sweep, tracking, train
from kl_lib.rl.config import RLConfig, field_choices, field_docs, fields_help
from kl_lib.study import site
from kl_lib.tasks import arithmetic, hub
from kl_lib.tasks.base import write_splits_parser

ROOT = Path(__file__).resolve().parents[1]

PARSERS = {
    "python -m kl_lib.rl.train": train.build_parser,
    "python -m kl_lib.rl.sweep": sweep.build_parser,
    "python -m kl_lib.lm.sft": sft.build_parser,
    "python -m kl_lib.tasks.hub": hub.build_parser,
    "python -m kl_lib.study.site": site.build_parser,
    "python -m kl_lib.tasks.arithmetic": lambda: write_splits_parser("d", arithmetic.DEFAULT_DIR,
                                                                     arithmetic.write_splits),
}


def _field_lines(text: str) -> dict[str, str]:
    """``name: type = default ...`` heads of the field listing, by name."""
    heads = [line.strip() for line in text.splitlines() if line.startswith("  ") and not line.startswith("      ")]
    return {head.split(":")[0]: head for head in heads if ": " in head and " = " in head}


@pytest.mark.parametrize("build", [train.build_parser, sweep.build_parser], ids=["train", "sweep"])
def test_help_lists_every_field_with_type_default_choices_and_doc(build):
    text = build().format_help()
    heads = _field_lines(text)
    default = RLConfig()
    choices = field_choices()
    for f in dataclasses.fields(RLConfig):
        if f.name == "kl":
            continue
        head = heads[f.name]
        value = getattr(default, f.name)
        assert f"{f.name}: {f.type} = {list(value) if isinstance(value, tuple) else value!r}" in head
        for allowed in choices.get(f.name, ()):
            assert allowed in head
        first_words = " ".join(field_docs(RLConfig)[f.name].split()[:4])
        assert first_words in " ".join(text.split()), f.name
    kl_choices = {"estimator": tuple(ESTIMATORS), "placement": PLACEMENTS,
                  "importance_weighting": IMPORTANCE_WEIGHTINGS}
    for f in dataclasses.fields(KLConfig):
        head = heads[f"kl.{f.name}"]
        assert f"= {getattr(default.kl, f.name)!r}" in head  # the run's KL default (beta 0.1), not KLConfig's
        for allowed in kl_choices.get(f.name, ()):
            assert allowed in head


def test_every_field_has_a_doc():
    for cls in (RLConfig, KLConfig):
        docs = field_docs(cls)
        assert set(docs) == {f.name for f in dataclasses.fields(cls)}
        assert all(docs.values()), [name for name, doc in docs.items() if not doc]
    assert field_docs(KLConfig)["estimator"].startswith("Which per-token estimate k_t")


def test_choices_are_the_ones_the_config_checks():
    """The listed values are accepted and anything else is refused, so the help cannot promise a wrong set."""
    for name, valid in field_choices().items():
        for value in valid:
            if name != "task" and not (name == "rollout_backend" and value == "vllm"):
                RLConfig(**{name: value})
        with pytest.raises(ValueError, match="choose one of"):
            RLConfig(**{name: "no-such-value"})


@pytest.mark.parametrize("prog", list(PARSERS))
def test_every_option_has_help_and_the_real_program_name(prog):
    parser = PARSERS[prog]()
    assert parser.prog == prog
    assert parser.format_usage().startswith(f"usage: {prog} ")
    for action in parser._actions:
        assert action.help and action.help is not argparse.SUPPRESS, (prog, action.option_strings or action.dest)
    assert "example" in (parser.epilog or ""), prog


def test_help_runs_as_a_program():
    """The real command: exit 0, the module's name as the program, the field listing, nothing on stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "kl_lib.rl.train", "--help"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120, check=True)
    assert out.stdout.startswith("usage: python -m kl_lib.rl.train ")
    assert "kl.estimator: str = 'k1'  {k1, k2, k3, analytic, abs}" in out.stdout  # abs: verl's, a library estimator
    assert "advantage: str = 'rloo'  {rloo, grpo, drgrpo}" in out.stdout
    out = subprocess.run([sys.executable, "-m", "kl_lib.tasks.arithmetic", "--help"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=120, check=True)
    assert out.stdout.startswith("usage: python -m kl_lib.tasks.arithmetic ")


def test_help_text_is_the_generated_listing():
    assert fields_help() in train.build_parser().format_help()
    assert fields_help() in sweep.build_parser().format_help()


def test_set_interface_is_kept(capsys):
    """--config/--set still reach the config: a bad override is the config's one-line error, exit 2."""
    assert train.main(["--set", "kl.estimator=k9"]) == 2
    assert "KLConfig.estimator='k9' is not valid" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# Tracking
# ------------------------------------------------------------------------------------------------------------


def test_tracking_is_off_by_default_and_refuses_unknown_names(monkeypatch):
    monkeypatch.delenv("KL_TRACKING", raising=False)
    assert tracking.tracking_choice() == "none"
    monkeypatch.setenv("KL_TRACKING", "wandb")
    with pytest.raises(ValueError, match="KL_TRACKING='wandb' is not a tracker; choose one of none, tensorboard"):
        tracking.tracking_choice()
    with pytest.raises(ValueError, match="--track='x'"):
        tracking.tracking_choice("x")
    monkeypatch.setenv("KL_TRACKING", "none")
    assert tracking.tracking_choice() == "none"


def test_missing_tensorboard_is_an_error_naming_the_extra(monkeypatch, capsys):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorboard is installed here")
    with pytest.raises(ImportError, match=r"tracking extra"):
        tracking.tracking_choice("tensorboard")
    monkeypatch.setenv("KL_TRACKING", "tensorboard")
    assert train.main(["--set", "steps=1"]) == 2  # before any compute
    assert "pip install -e '.[tracking]'" in capsys.readouterr().err


def test_tensorboard_mirrors_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = save_untrained_model(tmp_path / "model", seed=0, hidden_size=32, num_layers=2, num_heads=2,
                                 intermediate_size=64)
    arithmetic.write_splits(tmp_path / "data", seed=0, sizes={"rl_train": 16, "id_test": 4, "ood_test": 4, "sft": 4})
    cfg = RLConfig(model=str(model), data_dir=str(tmp_path / "data"), steps=2, prompts_per_step=2, group_size=2,
                   max_new_tokens=3, runs_dir=str(tmp_path / "runs"), device="cpu")
    monkeypatch.delenv("KL_TRACKING", raising=False)
    result = train.train(cfg, progress=False, tracker="tensorboard")
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    for key in ("reward/mean", "kl/k1", "loss/total"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [row["step"] for row in rows]
        assert [s.value for s in scalars] == pytest.approx([row[key] for row in rows], rel=1e-6)  # float32
    untracked = train.train(dataclasses.replace(cfg, runs_dir=str(tmp_path / "plain")), progress=False)
    assert not (untracked.run_dir / "tensorboard").exists()
    plain = [json.loads(line) for line in (untracked.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/mean"] for r in plain] == [r["reward/mean"] for r in rows]  # tracking changes no result
