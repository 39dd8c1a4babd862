"""One process per run directory: a lock file naming its holder.

``<run_dir>/LOCK`` holds the holder's ``pid``, ``host`` and ``started`` (UTC, ISO 8601) as JSON, and the holder
keeps an exclusive ``flock`` on it. The operating system drops a ``flock`` when its process dies, however it dies,
so liveness needs no guessing from pids (which are reused): a ``LOCK`` file whose lock nobody holds was left by a
process that no longer runs (``kill -9``, a power cut) and is *stale*; it is taken over with a warning naming the
process that left it. A lock held by a live process raises :class:`RunLockedError` naming the holder.

:class:`RunLock` takes the lock on entry and removes the file on exit, also when the body raises. After taking the
``flock`` it checks that the file it locked is still the one at ``LOCK`` (a holder that released meanwhile has
unlinked it), so two processes never both hold a run. ``flock`` needs a local file system or NFS v4 (where Linux
maps it onto byte-range locks).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any, Self

__all__ = ["LOCK_NAME", "RunLock", "RunLockedError", "lock_holder"]

LOCK_NAME = "LOCK"
_TRIES = 5  # attempts, 50 ms apart, before a held lock is reported (a momentary lock_holder() is not a holder)


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock."""


def _read(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process (its LOCK file is being written)"
    return f"pid {holder.get('pid')} on host {holder.get('host')!r} since {holder.get('started')}"


def lock_holder(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Who holds ``run_dir/LOCK`` (``pid``, ``host``, ``started``), or None when no live process does."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read(path)
    finally:
        os.close(fd)  # also drops the shared lock
    return None


def locked_message(run_dir: str | os.PathLike, holder: dict[str, Any]) -> str:
    """The one line that says who holds a run and what to do."""
    lock = Path(run_dir) / LOCK_NAME
    return (f"run directory {run_dir} is in use by {_describe(holder)} ({lock}); wait for that process to "
            "finish (or stop it) and rerun, or train under another name")


class RunLock:
    """``with RunLock(run_dir):`` holds ``run_dir/LOCK`` for the body (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_NAME

    def acquire(self) -> Self:
        """Take the lock (taking over a stale one with a warning); :class:`RunLockedError` if it is held."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(_TRIES):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if attempt == _TRIES - 1:
                    raise RunLockedError(locked_message(self.run_dir, _read(self.path))) from None
                time.sleep(0.05)
                continue
            except OSError as err:  # ENOLCK, EOPNOTSUPP: a file system without locks
                os.close(fd)
                raise OSError(err.errno, f"cannot lock {self.path}: its file system does not support file locks "
                                         f"({err.strerror}); put runs_dir on a local disk") from None
            if os.fstat(fd).st_ino != _inode(self.path):  # released and unlinked by its holder meanwhile
                os.close(fd)
                continue
            self._claim(fd)
            return self
        raise RunLockedError(locked_message(self.run_dir, _read(self.path)))

    def _claim(self, fd: int) -> None:
        """Write this process into the locked file, warning about the dead process a stale one names."""
        left = os.read(fd, 1 << 16)
        if left.strip():
            try:
                stale = json.loads(left)
            except ValueError:
                stale = {}
            warnings.warn(f"{self.path}: taking over a stale lock left by {_describe(stale)}, which no longer runs",
                          stacklevel=4)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self.fd = fd

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        """Remove the lock file and drop the lock, if this object holds it."""
        if self.fd is None:
            return
        try:
            if _inode(self.path) == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        finally:
            os.close(self.fd)
            self.fd = None

    def moved(self, run_dir: str | os.PathLike) -> None:
        """The run directory, with this lock in it, was renamed to ``run_dir``."""
        self.run_dir = Path(run_dir)

    def __enter__(self) -> Self:
        return self if self.held else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None
