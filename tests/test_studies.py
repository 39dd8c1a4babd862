"""The long-answer study's plumbing: its sweep file, the study registry, seed-ordered sweeps, evaluation on a
sample of the test problems and the base-model response statistics its blow-up threshold is read from."""

import io
import json
import math
import shlex
from contextlib import redirect_stdout
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from kl_lib.files import config_digest
from kl_lib.lm.evaluate import EvalSettings, load_splits, response_statistics
from kl_lib.lm.models import load_tokenizer, save_untrained_model
from kl_lib.rl.sweep import eval_settings, expand_sweep
from kl_lib.rl.sweep import main as sweep_main
from kl_lib.study.studies import STUDIES, get_study, study_of_runs
from kl_lib.study.tables import setting_name
from kl_lib.tasks.worked_arithmetic import write_splits


def test_the_study_file_is_the_preregistered_design():
    """docs/preregistration.md §2: β grid, 250 steps, G = 5, the folded RLOO baseline, lag 10 with 1 and 4
    minibatches, 3 seeds, 93 distinct runs; the smoke variant is small."""
    spec = yaml.safe_load(Path("configs/study.yaml").read_text())
    full, smoke = expand_sweep(spec), expand_sweep(spec, smoke=True)
    names = [c.run_name() for c in full]
    assert len(names) == len(set(names)) == 93
    on = [c for c in full if c.async_lag == 0]
    assert sorted({c.kl.beta for c in on}) == [0, 0.05, 0.1, 0.3, 1.0] and len(on) == 63
    assert all(c.steps == 250 and c.group_size == 5 and c.kl_reward_baseline == "loo" for c in full)
    off = [c for c in full if c.async_lag]
    assert {(c.async_lag, c.ppo_minibatches) for c in off} == {(10, 1), (10, 4)} and len(off) == 30
    assert {c.kl.beta for c in off} == {0, 0.1} and all(c.advantage == "drgrpo" for c in off)
    assert {c.seed for c in full} == {0, 1, 2} and all(c.task == "worked_arithmetic" for c in full)
    assert all(c.steps == 4 and c.seed == 0 for c in smoke) and len(smoke) == 6 + 10  # β = 0.1 only
    assert eval_settings(spec).max_problems == 150


def test_seed_order_puts_every_cells_first_seed_first(tmp_path):
    out = io.StringIO()
    with redirect_stdout(out):
        assert sweep_main(["configs/study.yaml", "--dry-run", "--order", "seed"]) == 0
    names = [line.split()[0] for line in out.getvalue().splitlines()[1:]]
    seeds = [int(n.rsplit("-s", 1)[1]) for n in names]
    assert seeds == sorted(seeds) and len(names) == 93
    assert names[:21] == [n for n in names[:31] if "lag" not in n]  # the file's order within a seed


def test_setting_names_carry_the_minibatch_count():
    assert setting_name("reinforce", 0) == "on-policy"
    assert setting_name("ppo", 10) == "PPO lag 10"
    assert setting_name("ppo", 10, 4) == "PPO lag 10, 4 minibatches"


def test_study_registry_and_which_study_made_a_runs_directory(tmp_path):
    assert get_study("long").kl_blowup_nats == 41.0 and get_study("short").kl_blowup_nats == 5.0
    with pytest.raises(ValueError, match="unknown study 'medium'.*'long'"):
        get_study("medium")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "sweep.json").write_text(json.dumps({"sweep": "configs/study.yaml", "runs": []}))
    assert study_of_runs(tmp_path / "x").name == "long"
    assert study_of_runs(tmp_path / "study").name == "long"  # by its name, before any sweep.json
    assert study_of_runs(tmp_path / "rl").name == "short"
    for study in STUDIES.values():
        assert Path(study.sweep).is_file()


def test_evaluation_on_the_first_problems_keeps_old_cache_keys(tmp_path):
    write_splits(tmp_path, sizes={"sft": 8, "rl_train": 8, "id_test": 10, "ood_test": 10})
    every, first = EvalSettings(task="worked_arithmetic"), EvalSettings(task="worked_arithmetic", max_problems=4)
    assert {s: len(p) for s, p in load_splits(first, tmp_path).items()} == {"id_test": 4, "ood_test": 4}
    assert load_splits(first, tmp_path)["id_test"] == load_splits(every, tmp_path)["id_test"][:4]
    # max_problems = 0 leaves the key as it was before the field existed (cached evaluations stay valid)
    legacy = {k: v for k, v in asdict(every).items() if k != "max_problems"}
    assert every.key() == config_digest(legacy) and first.key() != every.key()
    with pytest.raises(ValueError, match="max_problems=-1 must be an integer ≥ 0"):
        EvalSettings(max_problems=-1)


def test_response_statistics_of_a_uniform_model(tmp_path):
    """A model whose logits are all zero samples every token uniformly: each token's entropy is exactly log V,
    so the sequence entropy is log V × the response length."""
    model_dir = save_untrained_model(tmp_path / "m", seed=0, hidden_size=32, num_layers=1, num_heads=2,
                                     intermediate_size=64)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    tokenizer = load_tokenizer(str(model_dir))
    write_splits(tmp_path / "d", sizes={"sft": 8, "rl_train": 12, "id_test": 4, "ood_test": 4})
    problems = load_splits(EvalSettings(task="worked_arithmetic", splits=("id_test",)), tmp_path / "d")["id_test"]
    stats = response_statistics(model, tokenizer, problems, max_new_tokens=10, num_samples=3, seed=0)
    vocab = model.config.vocab_size
    assert stats["n_responses"] == 12
    assert stats["token_entropy"] == pytest.approx(math.log(vocab), rel=1e-5)
    assert stats["sequence_entropy"] == pytest.approx(math.log(vocab) * stats["mean_length"], rel=1e-5)
    assert 1 <= stats["median_length"] <= 10 and 0 <= stats["finished_fraction"] <= 1


def _makefile_reduced_study_flags() -> list[str]:
    """The flags `make reproduce` gives the sweep for the reduced study (STUDY_REDUCED in the Makefile)."""
    line = next(l for l in Path("Makefile").read_text().splitlines() if l.startswith("STUDY_REDUCED := --"))
    return shlex.split(line.split(":=", 1)[1])


def test_the_reduced_study_is_a_subset_of_the_design_with_the_same_digests(capsys):
    """make reproduce's reduced study (the Makefile's STUDY_REDUCED): 11 of the 93 runs (seed 0: β = 1 and no KL
    on-policy, the 4-minibatch off-policy stratum), each with the full design's name and digest, so make study
    later only adds the rest."""
    assert sweep_main(["configs/study.yaml", "--dry-run"]) == 0
    full = dict(line.split() for line in capsys.readouterr().out.splitlines()[1:])
    assert sweep_main(["configs/study.yaml", "--dry-run", *_makefile_reduced_study_flags()]) == 0
    reduced = dict(line.split() for line in capsys.readouterr().out.splitlines()[1:])
    assert len(reduced) == 11 and all(full[name] == digest for name, digest in reduced.items())
    assert sum("lag10-ppo-mb4" in n for n in reduced) == 5 and "nokl-s0" in reduced
    assert sorted(n for n in reduced if "lag" not in n and n != "nokl-s0") == sorted(
        f"{c}-b1-s0" for c in ("k1-reward", "k3-reward", "k1-loss", "k3-loss", "k3-both"))
    assert sweep_main(["configs/study.yaml", "--dry-run", "--seeds", "9"]) == 2
    assert "no runs with these --seeds/--betas/--runs" in capsys.readouterr().err
    assert sweep_main(["configs/study.yaml", "--dry-run", "--runs", "nokl-s0,k9-*"]) == 2
    assert "--runs pattern 'k9-*' matches no run of the sweep" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep_main(["configs/study.yaml", "--dry-run", "--runs", ","])
    assert "holds no run-name pattern" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep_main(["configs/study.yaml", "--dry-run", "--betas", "one"])
    assert "not a comma-separated list of float numbers" in capsys.readouterr().err
