"""Every notebook is stored clean and runs end to end in smoke mode; the runner fails loudly and leaves
nothing that Make could mistake for a result.

The smoke executions are real papermill runs on the ``kl-compendium`` kernel (``@pytest.mark.notebook``;
deselect with ``-m "not notebook"``); their outputs go to pytest's tmp_path, never to runs/."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest

from kl_lib.study import nbrun

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _run(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "kl_lib.study.nbrun", *map(str, args), "--no-progress-bar"]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)


def _write_notebook(path: Path, *code: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "kl-compendium", "display_name": "KL compendium (.venv)", "language": "python"}
    params = nbformat.v4.new_code_cell('smoke = False\noutput_dir = "runs/interactive/x"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# temporary"), params, *map(nbformat.v4.new_code_cell, code)]
    nbformat.write(nb, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# The repository's notebooks


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_clean(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.cells and nb.cells[0].cell_type == "markdown", "the first cell must be markdown (title, summary)"
    assert nb.metadata.get("kernelspec", {}).get("name") == "kl-compendium", nb.metadata.get("kernelspec")
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell [{i}] is stored with outputs (clear them before committing)"
            assert cell.execution_count is None, f"cell [{i}] is stored with an execution count"
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"need exactly one cell tagged 'parameters', found cells {tagged}"
    injected = [i for i, c in enumerate(nb.cells) if "injected-parameters" in c.metadata.get("tags", [])]
    assert not injected, f"cells {injected} are papermill's injected parameters: save the source, not an output"
    declared = papermill.inspect_notebook(str(path))
    missing = [p for p in nbrun.REQUIRED_PARAMETERS if p not in declared]
    assert not missing, f"the parameters cell must declare {missing}"


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_executes_in_smoke_mode(path: Path, tmp_path: Path) -> None:
    done = _run(path.relative_to(ROOT), "--out", tmp_path, "--smoke")
    assert done.returncode == 0, done.stderr[-5000:]
    stem = path.stem
    executed = nbformat.read(tmp_path / f"{stem}.ipynb", as_version=4)
    assert executed.metadata["papermill"]["parameters"]["smoke"] is True
    assert (tmp_path / f"{stem}.html").read_text().lstrip().lower().startswith("<!doctype html")
    meta = json.loads((tmp_path / f"{stem}.meta.json").read_text())
    assert meta["parameters"]["smoke"] is True
    assert meta["parameters"]["output_dir"] == str(tmp_path / stem)
    assert not list(tmp_path.glob(".*")), "temporary files left behind"


# ---------------------------------------------------------------------------------------------------------
# The runner


@pytest.mark.notebook
def test_runner_success_writes_outputs_and_resolves_parameters(tmp_path: Path) -> None:
    nb = _write_notebook(
        tmp_path / "ok.ipynb",
        "import os, pathlib\n"
        "pathlib.Path(output_dir).mkdir(parents=True, exist_ok=True)\n"
        "pathlib.Path(output_dir, 'cwd.txt').write_text(os.getcwd())",
    )
    out = tmp_path / "out"
    done = _run(nb, "--out", out, "-p", "output_dir", "figs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in out.iterdir()} == {"ok.ipynb", "ok.html", "ok.meta.json"}
    meta = json.loads((out / "ok.meta.json").read_text())
    assert meta["parameters"] == {"smoke": False, "output_dir": "figs"}
    assert meta["packages"]["torch"].startswith("2.13.0") and meta["wall_time_s"] > 0
    # No repository above tmp_path, so the kernel ran in the invoking cwd.
    assert Path(tmp_path / "figs" / "cwd.txt").read_text() == str(tmp_path)


@pytest.mark.notebook
def test_runner_failure_names_notebook_and_cell_and_leaves_no_output(tmp_path: Path) -> None:
    nb = _write_notebook(tmp_path / "bad.ipynb", "x = 1", "1/0  # boom\ny = 2")
    out = tmp_path / "out"
    done = _run(nb.name, "--out", out, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    # Cell 3 of the source notebook (papermill's own index would say 4: it inserts the injected parameters).
    assert last == "FAILED: bad.ipynb, cell [3] (1/0  # boom): ZeroDivisionError: division by zero", last
    assert done.stderr.count("ZeroDivisionError") >= 2, "the traceback comes before the FAILED line"
    assert not (out / "bad.ipynb").exists() and not (out / "bad.html").exists()
    assert not (out / "bad.meta.json").exists()
    assert (out / "bad.failed.ipynb").exists(), "the failed execution is kept for debugging"
    assert not list(out.glob(".*")), "temporary files left behind"


def test_runner_rejects_undeclared_parameter(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nb = _write_notebook(tmp_path / "p.ipynb", "pass")
    assert nbrun.main([str(nb), "--out", str(tmp_path / "out"), "-p", "sedd", "3"]) == 2
    err = capsys.readouterr().err
    assert "unknown parameter(s) sedd" in err and "declared: smoke, output_dir" in err
    assert not (tmp_path / "out").exists()


def test_runner_requires_smoke_and_output_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("seed = 0")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params]
    nbformat.write(nb, tmp_path / "q.ipynb")
    assert nbrun.main([str(tmp_path / "q.ipynb"), "--out", str(tmp_path / "out")]) == 2
    assert "must declare smoke, output_dir" in capsys.readouterr().err


def test_parse_value_types_like_papermill_cli() -> None:
    assert [nbrun.parse_value(v) for v in ("True", "False", "None", "3", "0.5", "1e-3", "runs/x")] == [
        True, False, None, 3, 0.5, 1e-3, "runs/x",
    ]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Notebooks 04 and 05 on a partial study (the long study while it trains: cells missing, seeds incomplete)


@pytest.mark.notebook
@pytest.mark.parametrize("stem", ["04_evaluation", "05_off_policy"])
def test_study_notebook_runs_on_a_partial_study(stem: str, tmp_path: Path) -> None:
    import shutil

    from kl_lib.rl.sweep import ensure_smoke_sweep
    from kl_lib.study import site
    from kl_lib.study.studies import get_study

    smoke_runs = ROOT / ensure_smoke_sweep(*site.smoke_paths(get_study("long")))
    partial = tmp_path / "study"
    shutil.copytree(smoke_runs, partial, ignore=shutil.ignore_patterns(
        "sweep.json", "k3-loss-b0.1-s0", "nokl-lag10-ppo-mb4-s0", "k1-reward-b0.1-lag10-ppo-mb4-s0"))
    done = _run(ROOT / "notebooks" / f"{stem}.ipynb", "--out", tmp_path / "out", "-p", "runs_dir", partial,
                "-p", "n_boot", "100")
    assert done.returncode == 0, done.stderr[-5000:]
    executed = nbformat.read(tmp_path / "out" / f"{stem}.ipynb", as_version=4)
    text = "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/markdown", ""))
                   for c in executed.cells if c.cell_type == "code" for o in c.outputs)
    assert "NOT THE PRE-REGISTERED ANALYSIS: no seed is complete" in text  # the full design's cut, not met
