"""Run directories and safe writes.

Every artefact the compendium writes goes through :func:`atomic_write` (write to a temporary file in the same
directory, then ``os.replace``), so an interrupted run never leaves a half-written file behind, and every run
directory records what produced it (:func:`environment_info`).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_write", "write_json", "write_text", "environment_info", "git_commit"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file next to ``path``; on success move it into place, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    return Path(path)


def git_commit(cwd: str | os.PathLike | None = None) -> str | None:
    """The current commit (with ``-dirty`` if the tree has changes), or None outside a git checkout."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment_info(packages: tuple[str, ...] = ("torch", "numpy", "pandas", "transformers", "peft", "datasets",
                                                   "papermill", "seaborn", "kl_lib")) -> dict[str, Any]:
    """Python, platform, git commit and the versions of the packages that shape results."""
    versions = {}
    for name in packages:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": platform.python_version(), "platform": platform.platform(), "git_commit": git_commit(),
            "packages": versions}
