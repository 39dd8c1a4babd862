"""The report built from a few tiny real runs (trained and evaluated like the sweep's), opened in headless
Chromium: the page loads, every image decodes, the screenshot is not blank, links resolve."""

import csv
import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kl_lib.study import site
from kl_lib.config import KLConfig
from kl_lib.lm.evaluate import EvalSettings, evaluate_path
from kl_lib.rl.checkpoints import evaluate_run
from kl_lib.lm.models import save_untrained_model
from kl_lib.rl.config import RLConfig
from kl_lib.tasks.arithmetic import write_splits

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SETTINGS = EvalSettings(num_samples=2, batch_size=16)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two seeds of three on-policy configurations and two lagged PPO runs, evaluated, plus base_eval.json."""
    from kl_lib.rl.train import train

    root = tmp_path_factory.mktemp("site")
    model = save_untrained_model(root / "model", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    data = root / "data"
    write_splits(data, sizes={"sft": 10, "rl_train": 16, "id_test": 6, "ood_test": 6})
    runs_dir = root / "runs"
    common = dict(model=str(model), data_dir=str(data), steps=2, prompts_per_step=2, group_size=2, max_new_tokens=4,
                  lr=1e-3, runs_dir=str(runs_dir), checkpoint_every=1)
    configs = [RLConfig(**common, seed=s, kl=KLConfig(e, p, beta=b))
               for s in (0, 1) for e, p, b in [("k1", "reward", 0.1), ("k3", "loss", 0.1), ("k1", "reward", 0.0)]]
    configs += [RLConfig(**common, seed=0, async_lag=2, policy_loss="ppo", advantage="drgrpo", kl=KLConfig(e, p, beta=b))
                for e, p, b in [("k1", "reward", 0.1), ("k1", "reward", 0.0)]]
    for cfg in configs:
        result = train(cfg, progress=False)
        evaluate_run(result.run_dir, data, SETTINGS)
    evaluate_path(model, data, runs_dir / "base_eval.json", SETTINGS)
    notebooks = root / "notebooks"
    notebooks.mkdir()
    (notebooks / "01_example.html").write_text("<!doctype html><html><body><h1>notebook</h1></body></html>\n")
    return root, runs_dir, notebooks, len(configs)


@pytest.fixture(scope="module")
def report(tiny_runs):
    root, runs_dir, notebooks, n_runs = tiny_runs
    index = site.build_report(runs_dir, notebooks, root / "report", n_boot=200)
    return index, n_runs


def test_report_files_tables_and_links(report, tiny_runs):
    index, n_runs = report
    out = index.parent
    rows = list(csv.DictReader(open(out / "results.csv")))
    # the tiny runs' names are in configs/sweep.yaml's plan, which they do not complete: the report analyses the
    # seeds complete in every cell that has runs (seed 0; the lagged cells have no seed 1), and says so
    assert len(rows) == n_runs - 3 and {r["seed"] for r in rows} == {"0"}
    assert "NOT THE PRE-REGISTERED ANALYSIS" in index.read_text()
    assert {"label", "seed", "id_test pass@1", "ood_test pass@1", "diverged", "final_kl"} <= set(rows[0])
    assert {r["label"] for r in rows} == {"k1 in reward", "k3 in loss", "no KL"}
    found = json.loads((out / "findings.json").read_text())
    assert [f["id"] for f in found] == ["F1", "F2", "F3"]
    assert all(f["verdict"] in ("supported", "not supported", "inconclusive at this scale") for f in found)
    page = index.read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) >= 7, images  # accuracy, training grid, entropy, checkpoints, off-policy curves, staleness, summary
    assert (out / "predictions.csv").is_file()
    for src in images:
        assert not src.startswith(("/", "file:")) and (out / src).is_file() and (out / src).with_suffix(".svg").is_file()
    links = re.findall(r'<a href="([^"]+)"', page)
    assert "../notebooks/01_example.html" in links
    for href in links:
        assert (out / href).resolve().is_file(), href
    assert "git commit" in page and "machine" in page and "F1" in page
    assert not list(out.glob(".*")), "temporary files left behind"


def test_cli(tiny_runs, tmp_path, capsys):
    _, runs_dir, notebooks, _ = tiny_runs
    assert site.main(["--runs", str(runs_dir), "--notebooks", str(notebooks), "--out", str(tmp_path / "r"),
                      "--n-boot", "100"]) == 0
    assert (tmp_path / "r" / "index.html").is_file()
    assert site.main(["--runs", str(tmp_path / "missing"), "--out", str(tmp_path / "r2")]) == 2
    assert "make sweep" in capsys.readouterr().err


def _chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={user_data}", "--virtual-time-budget=5000"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (CI: apt-get install -y chromium)")
def test_page_and_images_load_in_headless_chromium(report, tmp_path):
    from PIL import Image

    index, _ = report
    url = index.resolve().as_uri()
    dom = _chromium("--dump-dom", url, user_data=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    imgs = re.findall(r"<img [^>]*>", dom.stdout)
    assert len(imgs) >= 6, dom.stdout[:2000]
    not_loaded = [i for i in imgs if 'data-loaded="1"' not in i]
    assert not not_loaded, f"images that did not decode: {not_loaded}"
    shot = tmp_path / "page.png"
    done = _chromium(f"--screenshot={shot}", "--window-size=1200,900", url, user_data=tmp_path / "profile-shot")
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (900, 1200)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005, "the screenshot looks blank"


# ---------------------------------------------------------------------------------------------------------
# The study helpers: analysis cut, exact-analysis predictions, staleness, strata, contrast


def test_analysis_cut_keeps_complete_seeds_only(tiny_runs):
    from kl_lib.study.tables import load_tables

    _, runs_dir, _, _ = tiny_runs
    tables = load_tables(runs_dir)
    res = tables.results
    by_seed = {int(s): list(g["run"]) for s, g in res.groupby("seed")}
    planned = {0: by_seed[0], 1: by_seed[1] + ["a-run-not-trained-yet-s1"]}
    cut, note = site.analysis_cut(tables, planned)
    assert set(cut.results["run"]) == set(by_seed[0]) and "seeds [0] are complete" in note
    assert set(cut.metrics["run"]) == set(by_seed[0])
    assert all(set(d) <= set(by_seed[0]) for d in cut.scores.values())
    # no seed complete for every planned cell: the seeds complete in every cell that has runs (here seed 0, the
    # lagged cells having no seed 1), labelled as not the pre-registered analysis
    reduced, note = site.analysis_cut(tables, {0: by_seed[0] + ["missing-s0"], 1: planned[1]})
    assert set(reduced.results["run"]) == set(by_seed[0]) and note.startswith("NOT THE PRE-REGISTERED ANALYSIS")
    assert "committed" not in note
    _, note = site.analysis_cut(tables, {0: by_seed[0] + ["missing-s0"], 1: planned[1]}, reference_runs="ref/runs")
    assert note.startswith("NOT THE PRE-REGISTERED ANALYSIS") and "committed in ref/runs" in note
    _, note = site.analysis_cut(tables, planned, reference_runs="ref/runs")  # a complete seed: no pointer needed
    assert "ref/runs" not in note
    same, note = site.analysis_cut(tables, planned, mode="all")
    assert len(same.results) == len(res) and note.startswith("all")
    with pytest.raises(ValueError, match="'cut'"):
        site.analysis_cut(tables, planned, mode="some")


def test_study_cut_points_a_reduced_study_to_the_committed_runs():
    """On the committed long-answer study: all 93 runs complete, no pointer; the reduced study's 11 runs (seed 0's
    on-policy β = 1 cells, no KL and the 4-minibatch stratum: no seed complete for every cell) are flagged and
    pointed to the committed runs, except when read against the smoke design (flagged, no pointer)."""
    from kl_lib.study.studies import get_study
    from kl_lib.study.tables import load_tables, restrict_to_runs

    study = get_study("long")
    tables = load_tables(study.reference_runs)
    res = tables.results
    full, note = site.study_cut(tables, study)
    assert set(full.results["run"]) == set(res["run"]) and len(res) == 93 and "committed" not in note
    reduced = [r for r in res["run"] if any(fnmatch.fnmatch(r, p) for p in ("nokl-s0", "*-b1-s0", "*-mb4-s0"))]
    assert len(reduced) == 11
    _, note = site.study_cut(restrict_to_runs(tables, reduced), study)
    assert note.startswith("NOT THE PRE-REGISTERED ANALYSIS") and f"committed in {study.reference_runs}" in note
    _, note = site.study_cut(restrict_to_runs(tables, reduced), study, smoke=True)
    assert note.startswith("NOT THE PRE-REGISTERED ANALYSIS") and "committed" not in note


def test_offpolicy_runs_staleness_is_minus_mean_log_ratio(tiny_runs):
    from kl_lib.study import findings
    from kl_lib.study.tables import load_tables

    _, runs_dir, _, _ = tiny_runs
    tables = load_tables(runs_dir)
    off = site.offpolicy_runs(tables, findings.run_outcomes(tables))
    assert len(off) == 2 and set(off["stratum"]) == {"2"}
    for r in off.itertuples():
        rows = [json.loads(line) for line in (runs_dir / r.run / "metrics.jsonl").read_text().splitlines()]
        expected = -np.mean([row["offpolicy/log_ratio_mean"] for row in rows])
        assert r.staleness == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert 0 <= r.clip_fraction <= 1


def _outcomes(rows):
    import pandas as pd

    return pd.DataFrame(rows)


def test_prediction_checks_statuses_follow_the_intervals():
    rows = []
    values = {"no KL": (0.0, 20.0, 5.0), "k1 in loss": (0.1, 20.0, 5.0), "k1 in reward": (0.1, 4.0, 3.0),
              "k3 in reward": (0.1, 12.0, 3.0), "k3 in loss": (0.1, 4.0, 1.0)}
    for label, (beta, kl, fwd) in values.items():
        for seed, noise in enumerate((-0.3, 0.0, 0.3)):
            rows.append({"setting": "on-policy", "label": label, "beta": beta, "seed": seed, "final_kl": kl + noise,
                         "final_forward_kl": fwd + noise})
    checks = site.prediction_checks(_outcomes(rows), n_boot=2000)
    status = dict(zip(zip(checks["prediction"], checks["β"]), checks["status"]))
    names = [p[0] for p in site.PREDICTIONS]
    assert status[(names[1], 0.1)].startswith("shown")  # control: k1 in reward holds the KL
    assert status[(names[0], 0.1)].startswith("shown")  # k1 in loss tracks no KL (difference 0)
    assert status[(names[2], 0.1)].startswith("shown")  # k3 in reward above k1 in reward
    assert status[(names[3], 0.1)].startswith("shown")  # k3 in loss lower forward KL
    row = checks[(checks["prediction"] == names[2]) & (checks["β"] == 0.1)].iloc[0]
    assert row["difference a − b"] == pytest.approx(8.0) and row["low"] > 0
    # k1 in loss regularising (its KL far below no KL) contradicts the prediction.
    flipped = [dict(r, final_kl=r["final_kl"] - 15) if r["label"] == "k1 in loss" else r for r in rows]
    checks = site.prediction_checks(_outcomes(flipped), n_boot=2000)
    assert checks.loc[checks["prediction"] == names[0], "status"].str.startswith("contradicted").all()
    # One run per cell: nothing is distinguishable.
    single = site.prediction_checks(_outcomes([r for r in rows if r["seed"] == 0]), n_boot=200)
    assert single["status"].str.startswith("not distinguishable").all()
    assert site.prediction_checks(_outcomes(rows[:1]), n_boot=10).empty


def test_offpolicy_summary_keeps_minibatch_strata_apart():
    import pandas as pd

    settings = ["PPO lag 10", "PPO lag 10, 4 minibatches"]
    out = pd.DataFrame([{"setting": s, "label": l, "policy_loss": "ppo", "async_lag": 10, "unstable": u,
                         "diverged": False} for s in settings for l, u in (("no KL", s.endswith("minibatches")),
                                                                          ("k1 in reward", False))])
    acc = pd.DataFrame([{"setting": s, "label": l, "beta": 0.1, **{f"{n} {k}": v for n in ("ID", "OOD")
                        for k, v in (("pass@1", 0.4), ("low", 0.3), ("high", 0.5))}}
                        for s in settings for l in ("no KL", "k1 in reward")])
    fig = site.plot_offpolicy_summary(acc, out)
    labels = [t.get_text().replace("\n", " ") for t in fig.axes[0].get_xticklabels()]
    assert labels == settings
    caption = fig.texts[-1].get_text().replace("\n", " ")
    assert "PPO lag 10: unstable runs, no KL 0/1" in caption and "4 minibatches: unstable runs, no KL 1/1" in caption


def test_study_contrast_reads_the_committed_short_study():
    from kl_lib.study.findings import Finding

    ref = Path(__file__).resolve().parents[1] / "runs" / "reference" / "rl"
    if not (ref / "findings.json").is_file():
        pytest.skip("no committed short-study reference results")
    committed = {f["id"]: f for f in json.loads((ref / "findings.json").read_text())}
    found = [Finding(id=f["id"], hypothesis="", test="", verdict=f["verdict"], numbers=f["numbers"])
             for f in committed.values()]
    import pandas as pd

    outcomes = pd.DataFrame({"setting": ["on-policy", "on-policy"], "final_kl": [3.0, 50.0]})
    table = site.study_contrast(found, outcomes, ref)
    assert list(table["finding"][:3]) == ["F1", "F2", "F3"]
    for _, r in table.iloc[:3].iterrows():
        assert r.iloc[1].startswith(committed[r["finding"]]["verdict"])
    short_kl = pd.read_csv(ref / "results.csv").query("setting == 'on-policy'")["final_kl"].max()
    assert f"max {short_kl:.3g}" in table.iloc[3, 1] and table.iloc[3, 2].startswith("max 50")
    assert site.study_contrast(found, outcomes, ref / "missing") is None
