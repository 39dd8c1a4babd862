"""The report built from a few tiny real runs (trained and evaluated like the sweep's), opened in headless
Chromium: the page loads, every image decodes, the screenshot is not blank, links resolve."""

import csv
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
    assert len(rows) == n_runs
    assert {"label", "seed", "id_test pass@1", "ood_test pass@1", "diverged", "final_kl"} <= set(rows[0])
    assert {r["label"] for r in rows} == {"k1 in reward", "k3 in loss", "no KL"}
    found = json.loads((out / "findings.json").read_text())
    assert [f["id"] for f in found] == ["F1", "F2", "F3"]
    assert all(f["verdict"] in ("supported", "not supported", "inconclusive at this scale") for f in found)
    page = index.read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert len(images) >= 6, images  # accuracy, training curves, entropy, checkpoints, off-policy ×2
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
