"""Files on disk: safe writes, digests and provenance, used by every layer of kl_lib (it imports none of them).

Every artefact the compendium writes goes through :func:`atomic_write` (write to a temporary file in the same
directory, then ``os.replace``), so an interrupted run never leaves a half-written file behind; caches and run
identities are keyed by :func:`file_digest` and :func:`config_digest`; and every run directory records what
produced it (:func:`environment_info`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_write", "write_json", "write_text", "read_jsonl", "file_digest", "config_digest",
           "current_umask", "environment_info", "git_commit"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """Open a temporary file next to ``path``; on success move it into place, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON with sorted keys to ``path`` atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    return Path(path)


def read_jsonl(path: str | os.PathLike, is_row: Callable[[Any], bool] = lambda row: True,
               what: str = "row") -> list[Any]:
    """The JSON rows of a JSONL file that is appended to line by line (metrics of a run).

    A torn last line (a crash or a full disk in the middle of a write) is dropped with a warning: what came
    before it is intact. A bad line *before* the end means the file was damaged otherwise and raises
    ``ValueError`` naming the file and line. ``is_row`` rejects parsed lines of the wrong shape the same way.
    """
    lines = Path(path).read_text(errors="replace").split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ok = is_row(row)
        except ValueError:
            ok = False
        if not ok:
            if any(rest.strip() for rest in lines[number:]):
                raise ValueError(f"{path}:{number} is not a {what}; the file is damaged before its end")
            warnings.warn(f"{path}:{number}: dropping a torn last line ({line[:60]!r})", stacklevel=2)
            break
        rows.append(row)
    return rows


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def config_digest(fields: dict[str, Any]) -> str:
    """12 hex digits identifying a configuration: SHA-256 of its fields as JSON with sorted keys."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


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
