"""The notebook runner's answers to bad input and its clean-up, and the Makefile's checks of SMOKE and PARAMS_*.

Parameter checks run in-process and never start a kernel. Executions are real papermill runs of tiny notebooks
written to tmp_path, on the ``kl-compendium`` kernel (``@pytest.mark.notebook``). The Make tests run ``make -n``
(print, execute nothing) with the repository's real Makefile.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from kl_lib.study import nbrun

ROOT = Path(__file__).resolve().parents[1]
PARAMETERS = """smoke = False
output_dir = "runs/interactive/x"
seed = 0
lr: float = 1
name = "a"
flag = False
items = [1, 2]
options = {"a": 1}
block = 2**16
anything = None
sleep_s = 0.0"""
RECORD = """import json, pathlib, time
time.sleep(sleep_s)
pathlib.Path(output_dir).mkdir(parents=True, exist_ok=True)
names = ["seed", "lr", "name", "flag", "items", "options", "block", "anything"]
pathlib.Path(output_dir, "values.json").write_text(json.dumps({n: [globals()[n], type(globals()[n]).__name__] for n in names}))"""


def _notebook(path: Path, *code: str, parameters: str = PARAMETERS) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "kl-compendium", "display_name": "KL compendium (.venv)", "language": "python"}
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# temporary"), params, *map(nbformat.v4.new_code_cell, code)]
    nbformat.write(nb, path)
    return path


def _command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "kl_lib.study.nbrun", *map(str, args), "--no-progress-bar"]


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_command(*args), cwd=cwd, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)


def _hidden(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob(".*"))


@pytest.fixture
def nb(tmp_path: Path) -> Path:
    return _notebook(tmp_path / "p.ipynb", RECORD)


def _usage_error(nb: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI in-process; it must refuse (status 2) without creating the output directory."""
    out = nb.parent / "out"
    assert nbrun.main([str(nb), "--out", str(out), *args]) == 2
    assert not out.exists(), "a refused invocation must not touch the output directory"
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Types: declared, checked, read from -p text


def test_declared_types(nb: Path) -> None:
    declared = nbrun.declared_parameters(nb)
    types = {name: d.type for name, d in declared.items()}
    assert types == {"smoke": bool, "output_dir": str, "seed": int, "lr": float, "name": str, "flag": bool,
                     "items": list, "options": dict, "block": int, "anything": None, "sleep_s": float}
    assert declared["block"].default == "2**16"


def test_expressions_that_are_not_constants_take_any_value(tmp_path: Path) -> None:
    nb = _notebook(tmp_path / "e.ipynb", parameters='smoke = False\noutput_dir = "x"\nhome = os.getcwd()\nn = len("ab")')
    declared = nbrun.declared_parameters(nb)
    assert declared["home"].type is None and declared["n"].type is None


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-p", "seed", "abc"], "parameter 'seed' expects int (declared default 0), got 'abc'"),
        (["-p", "seed", "1.5"], "parameter 'seed' expects int"),
        (["-p", "lr", "fast"], "parameter 'lr' expects float (declared default 1), got 'fast'"),
        (["-p", "flag", "maybe"], "parameter 'flag' expects bool (declared default False), got 'maybe'"),
        (["-p", "items", "3"], "parameter 'items' expects list (declared default [1, 2]), got '3'; pass lists "
                               "and dicts as YAML: -y/--parameters_yaml"),
        (["-y", "seed: [1]"], "parameter 'seed' expects int (declared default 0), got [1] (list)"),
        (["-y", "seed: true"], "parameter 'seed' expects int (declared default 0), got True (bool)"),
        (["-y", "name: 7"], "parameter 'name' expects str (declared default \"a\"), got 7 (int)"),
        (["-y", "options: [1]"], "parameter 'options' expects dict"),
        (["-y", "flag: 1"], "parameter 'flag' expects bool"),
    ],
)
def test_wrong_type_is_refused_before_execution(nb: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                                expected: str) -> None:
    assert expected in _usage_error(nb, *args, capsys=capsys)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["-y", "[1, 2]"], "--parameters_yaml '[1, 2]': must be a YAML mapping of parameter names to values"),
        (["-y", "seed: [1"], "--parameters_yaml 'seed: [1': not valid YAML"),
        (["-f", "missing.yaml"], "--parameters_file missing.yaml: cannot read it (No such file or directory)"),
        (["-y", "sed: 1"], "unknown parameter(s) sed; declared: smoke, output_dir, seed"),
        (["-y", "smoke: true"], "pass --smoke, not a parameter smoke"),
        (["-p", "seed", "1", "-p", "seed", "2"], "parameter 'seed' given twice"),
    ],
)
def test_bad_parameter_sources_are_refused(nb: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                           expected: str) -> None:
    assert expected in _usage_error(nb, *args, capsys=capsys)


def test_text_is_read_as_the_declared_type() -> None:
    def typed(text: str, declared: type | None) -> object:
        return nbrun.type_text("x", text, nbrun.Declared("...", declared))

    assert typed("3", int) == 3 and type(typed("3", int)) is int
    assert typed("3", float) == 3.0 and type(typed("3", float)) is float
    assert typed("007", str) == "007" and typed("True", str) == "True"
    assert typed("true", bool) is True and typed("False", bool) is False
    assert typed("3", None) == 3 and typed("None", None) is None  # open type: papermill's CLI typing
    assert nbrun.check_value("lr", 1, nbrun.Declared("0.5", float)) == 1.0
    assert nbrun.check_value("pair", [1, 2], nbrun.Declared("(0, 0)", tuple)) == [1, 2]


# ---------------------------------------------------------------------------------------------------------
# Executions


@pytest.mark.notebook
def test_typed_and_merged_parameters_reach_the_kernel(nb: Path, tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("seed: 9\nitems: [3, 4]\noptions: {b: 2}\nname: '2024-01-01'\n")
    out = tmp_path / "out"
    done = _run(nb, "--out", out, "-f", "params.yaml", "-y", "items: [5]", "-p", "seed", "3", "-p", "lr", "2",
                "-p", "flag", "true", "-p", "anything", "7", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    values = json.loads((out / "p" / "values.json").read_text())
    assert values == {
        "seed": [3, "int"],  # -p overrides the file
        "lr": [2.0, "float"],  # an int for a float parameter is passed as a float
        "name": ["2024-01-01", "str"],  # YAML dates stay strings, as papermill reads them
        "flag": [True, "bool"],
        "items": [[5], "list"],  # -y overrides the file
        "options": [{"b": 2}, "dict"],
        "block": [65536, "int"],
        "anything": [7, "int"],
    }
    meta = json.loads((out / "p.meta.json").read_text())
    assert meta["parameters"]["seed"] == 3 and meta["parameters"]["block"] == "2**16"
    assert _hidden(out) == []


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _running_last_cell(path: Path) -> bool:
    try:
        cells = json.loads(path.read_text())["cells"]
    except (OSError, ValueError, KeyError):  # not written yet, or caught mid-write
        return False
    return cells[-1].get("metadata", {}).get("papermill", {}).get("status") == "running"


def _start_slow_run(nb: Path, out: Path) -> tuple[subprocess.Popen[str], Path, list[int]]:
    """A run whose last cell sleeps, returned while that cell runs, with its temporary notebook and the
    runner's child processes (the kernel among them)."""
    proc = subprocess.Popen(_command(nb, "--out", out, "-p", "sleep_s", "300"), cwd=nb.parent, text=True,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        temporaries = list(out.glob(f".{nb.stem}.{proc.pid}.*.tmp.ipynb")) if out.is_dir() else []
        if temporaries and _running_last_cell(temporaries[0]):
            return proc, temporaries[0], _children(proc.pid)
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("the run did not reach its last cell within 300 s")


def _end(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.notebook
def test_killed_run_leaves_its_temporary_notebook_and_the_next_run_removes_it(nb: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, tmp, children = _start_slow_run(nb, out)
    try:
        proc.kill()  # SIGKILL: no clean-up can run
        proc.wait(timeout=60)
    finally:
        _end(children)
    assert tmp.exists(), "SIGKILL cannot clean up: the leftover this test is about"
    done = _run(nb, "--out", out, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"removed {tmp}, left by an earlier run that was killed" in done.stderr
    assert _hidden(out) == [] and (out / "p.ipynb").is_file()


@pytest.mark.notebook
def test_sigterm_removes_the_temporary_notebook_and_stops_the_kernel(nb: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc, tmp, children = _start_slow_run(nb, out)
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, proc.stderr.read()
        deadline = time.monotonic() + 60
        while any(Path(f"/proc/{pid}").exists() for pid in children) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(Path(f"/proc/{pid}").exists() for pid in children), "the kernel outlived the runner"
    finally:
        _end(children)
    assert _hidden(out) == [] and not (out / "p.ipynb").exists()


@pytest.mark.notebook
def test_only_leftovers_of_gone_writers_are_removed(nb: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen(["true"])  # noqa: S607
    dead.wait()
    alive = subprocess.Popen(["sleep", "300"])  # noqa: S607
    try:
        time.sleep(1.5)  # the live process starts before its file is written (beyond /proc's 1 s resolution)
        files = {
            "dead": f".p.{dead.pid}.ab12cd34.tmp.ipynb",  # its writer is gone
            "alive": f".p.{alive.pid}.ef56gh78.tmp.ipynb",  # a concurrent run: kept
            "reused": f".p.{alive.pid}.ij90kl12.tmp.ipynb",  # last written before that process started
            "legacy": ".p.mn34op56.tmp.ipynb",  # an older runner's name (no process id), older than this run
            "other": f".q.{dead.pid}.qr78st90.tmp.ipynb",  # another notebook's
        }
        for name in files.values():
            (out / name).write_text("{}")
        hour_ago = time.time() - 3600
        os.utime(out / files["reused"], (hour_ago, hour_ago))
        done = _run(nb, "--out", out, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert _hidden(out) == sorted([files["alive"], files["other"]])
        for key in ("dead", "reused", "legacy"):
            assert f"removed {out / files[key]}" in done.stderr
    finally:
        alive.kill()
        alive.wait()


@pytest.mark.notebook
def test_dead_kernel_fails_cleanly(tmp_path: Path) -> None:
    nb = _notebook(tmp_path / "d.ipynb", "import os\nos._exit(1)")
    out = tmp_path / "out"
    done = _run(nb, "--out", out, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"FAILED: {nb}: DeadKernelError: Kernel died", done.stderr[-2000:]
    assert _hidden(out) == [] and not (out / "d.ipynb").exists()


# ---------------------------------------------------------------------------------------------------------
# The Makefile


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SMOKE" and not k.startswith(("PARAMS", "MAKEFLAGS", "MFLAGS"))}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("value", ["ture", "2", "y", "yes no", "it's", "-1"])
def test_make_rejects_unclear_smoke(value: str) -> None:
    started = time.monotonic()
    done = _make("-n", "reproduce", f"SMOKE={value}")
    assert done.returncode != 0
    assert (f"SMOKE={value} is not a true/false value; use SMOKE=1/0, true/false, yes/no or on/off (any case; "
            "empty = false)") in done.stderr, done.stderr
    assert done.stdout == "", "nothing may run before the error"
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(("value", "smoke"), [("1", True), ("TRUE", True), ("Yes", True), ("on", True),
                                              ("0", False), ("False", False), ("NO", False), ("off", False),
                                              ("", False)])
def test_make_reads_smoke_spellings(value: str, smoke: bool) -> None:
    done = _make("-n", "reproduce", f"SMOKE={value}")
    assert done.returncode == 0, done.stderr
    runs = [line for line in done.stdout.splitlines() if "-m kl_lib.study.nbrun notebooks/" in line]
    assert len(runs) == len(list((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))), done.stdout
    for line in runs:
        assert ("--out runs/smoke/notebooks --smoke" in line) == smoke, line
        assert ("--out runs/notebooks " in line) == (not smoke), line


def test_make_rejects_params_for_a_missing_notebook() -> None:
    done = _make("-n", "reproduce", "PARAMS_02_toy_gradient_bais=-p rl_steps 200")
    assert done.returncode != 0
    stems = " ".join(sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb")))
    assert f"PARAMS_02_toy_gradient_bais: no notebook with that stem; notebook stems: {stems}" in done.stderr


def test_make_passes_params_to_the_named_notebook_only() -> None:
    done = _make("-n", "reproduce", "PARAMS_02_toy_gradient_bias=-p rl_steps 200")
    assert done.returncode == 0, done.stderr
    runs = [line for line in done.stdout.splitlines() if "-m kl_lib.study.nbrun notebooks/" in line]
    assert [line.endswith("-p rl_steps 200") for line in runs] == ["02_toy_gradient_bias" in line for line in runs]


def test_make_help() -> None:
    done = _make("help")
    assert done.returncode == 0, done.stderr
    assert "make reproduce SMOKE=1" in done.stdout and "make env" in done.stdout
