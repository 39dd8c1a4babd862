"""The sweep file, the evaluation metrics and the run tables: expansion, validation, pass@k, caching."""

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kl_lib.config import KLConfig
from kl_lib.lm.evaluate import EvalSettings, evaluate_path, model_digest, pass_at_k
from kl_lib.lm.models import save_untrained_model
from kl_lib.rl.checkpoints import evaluate_run
from kl_lib.rl.config import RLConfig
from kl_lib.rl.sweep import eval_settings, expand_sweep
from kl_lib.rl.sweep import main as sweep_main
from kl_lib.rl.train import train
from kl_lib.study.runs import load_runs
from kl_lib.study.tables import results_table
from kl_lib.tasks.arithmetic import write_splits


def test_the_shipped_sweep_expands_to_valid_distinct_runs():
    spec = yaml.safe_load(Path("configs/sweep.yaml").read_text())
    full, smoke = expand_sweep(spec), expand_sweep(spec, smoke=True)
    names = [c.run_name() for c in full]
    assert len(names) == len(set(names)) == 78
    assert sum(c.kl.beta == 0 for c in full) == 12  # one no-KL control per seed and group, not per beta
    assert {c.async_lag for c in full} == {0, 2, 8}
    assert all(c.steps == 4 and c.seed == 0 for c in smoke) and len(smoke) == 21
    assert eval_settings(spec).num_samples == 4 and eval_settings(spec, smoke=True).num_samples == 2


def test_sweep_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="unknown sweep key"):
        expand_sweep({"base": {}, "grups": {}})
    with pytest.raises(ValueError, match="group 'g'.*KLConfig.placement"):
        expand_sweep({"groups": {"g": {"kl": [{"estimator": "k1", "placement": "advantage"}]}}})
    with pytest.raises(ValueError, match="same name"):
        expand_sweep({"groups": {"a": {"kl": [{}]}, "b": {"kl": [{}]}}})
    bad = tmp_path / "bad.yaml"
    bad.write_text("groups: {g: {kl: [{estimator: k9}]}}\n")
    assert sweep_main([str(bad), "--dry-run"]) == 2


def _brute_pass_at_k(n, c, k):
    """Probability that a random k-subset of n samples (c correct) contains a correct one, by enumeration."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert math.isclose(pass_at_k(n, c, k), _brute_pass_at_k(n, c, k), abs_tol=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_model_evaluation_does_not_import_the_rl_package():
    """kl_lib.lm sits below kl_lib.rl: evaluating a model needs no trainer (run directories are kl_lib.rl's)."""
    code = "import sys, kl_lib.lm.evaluate; print(sorted(m for m in sys.modules if m.startswith('kl_lib.rl')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_evaluation_of_a_tiny_run_end_to_end_and_its_cache(tmp_path):
    model = save_untrained_model(tmp_path / "model", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    write_splits(tmp_path / "data", sizes={"sft": 10, "rl_train": 16, "id_test": 6, "ood_test": 6})
    cfg = RLConfig(model=str(model), data_dir=str(tmp_path / "data"), steps=2, prompts_per_step=2, group_size=2,
                   runs_dir=str(tmp_path / "runs"), name="tiny", lr=1e-3, checkpoint_every=1,
                   kl=KLConfig("k1", "loss", beta=1.0))  # an untrained model earns no reward: the KL term moves it
    result = train(cfg, progress=False)
    settings = EvalSettings(num_samples=4, batch_size=8)
    record = evaluate_path(result.run_dir / "final", tmp_path / "data", result.run_dir / "eval.json", settings)
    for split in ("id_test", "ood_test"):
        r = record["results"][split]
        assert r["n_problems"] == 6 and len(r["correct_counts"]) == 6
        assert 0 <= r["pass@1"] <= r["pass@2"] <= r["pass@4"] <= 1
        assert math.isclose(r["pass@1"], sum(r["correct_counts"]) / 24)
    # cached: same key, file untouched; a changed checkpoint changes the key
    mtime = (result.run_dir / "eval.json").stat().st_mtime_ns
    assert evaluate_path(result.run_dir / "final", tmp_path / "data", result.run_dir / "eval.json", settings) == record
    assert (result.run_dir / "eval.json").stat().st_mtime_ns == mtime
    assert model_digest(result.run_dir / "final") != model_digest(model)
    # the final model and the kept intermediate checkpoint (the last checkpoint is the final model)
    run_eval = evaluate_run(result.run_dir, tmp_path / "data", settings)
    assert set(run_eval) == {"final", "step_000001"}
    assert run_eval["final"]["results"] == record["results"]
    assert run_eval["step_000001"]["key"] != run_eval["final"]["key"]
    assert evaluate_run(result.run_dir, tmp_path / "data", settings) == run_eval  # cached
    # run tables
    df = load_runs(tmp_path / "runs")
    assert list(df["step"]) == [0, 1] and set(df["label"]) == {"k1 in loss"}
    summaries = results_table(tmp_path / "runs")
    assert summaries.loc[0, "status"] == "done" and summaries.loc[0, "steps_completed"] == 2
    assert summaries.loc[0, "id_test pass@1"] == run_eval["final"]["results"]["id_test"]["pass@1"]
    with pytest.raises(FileNotFoundError, match="make sweep"):
        load_runs(tmp_path / "data")


def _fake_run(root, name, files, steps=2):
    """A run directory written by hand: ``files`` among config, metrics, summary, DONE."""
    d = root / name
    d.mkdir(parents=True)
    if "config" in files:
        (d / "config.json").write_text(json.dumps({"config": RLConfig(name=name).to_dict(), "digest": "x"}))
    if "metrics" in files:
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "reward/mean": 0.5}) + "\n"
                                                 for i in range(steps)))
    if "summary" in files:
        (d / "summary.json").write_text(json.dumps({"status": "done", "steps_completed": steps}))
    if "DONE" in files:
        (d / "DONE").write_text("done\n")
    return d


def test_run_tables_report_only_finished_runs_and_survive_a_torn_line(tmp_path):
    """A run is finished only with DONE, summary, metrics and config all there: missing any one it is incomplete,
    never "done" (with 0 steps or otherwise); a moved-aside run is not a result; a torn last metrics line (a
    crash mid-write) is dropped with a warning, a damaged earlier line names the file."""
    everything = ("config", "metrics", "summary", "DONE")
    _fake_run(tmp_path, "finished", everything)
    for missing in everything:
        _fake_run(tmp_path, f"no-{missing}", [f for f in everything if f != missing])
    _fake_run(tmp_path, "finished.old-20250101-000000", everything)
    (tmp_path / "no-summary" / "summary.json").write_text('{"status": "do')  # torn: unreadable, not finished
    assert list(results_table(tmp_path)["run"]) == ["finished"]
    assert "finished.old-20250101-000000" not in set(load_runs(tmp_path)["run"])
    torn = tmp_path / "finished" / "metrics.jsonl"
    torn.write_text(torn.read_text() + '{"step": 2, "rew')
    with pytest.warns(UserWarning, match="metrics.jsonl:3: dropping a torn last line"):
        df = load_runs(tmp_path, ["finished"])
    assert list(df["step"]) == [0, 1]
    torn.write_text('{"step": 0}\n{"st\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"finished/metrics.jsonl:2 is not a metrics row"):
        load_runs(tmp_path, ["finished"])
