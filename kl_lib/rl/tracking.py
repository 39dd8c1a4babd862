"""Optional experiment tracking: each line of a run's ``metrics.jsonl`` mirrored to a tracker (no math here).

``metrics.jsonl`` stays the source of truth (resumption, the study and the report read it); a tracker only shows
the same rows live. Off by default. Chosen by ``--track`` on the trainer's command line or the environment
variable ``KL_TRACKING`` (``none`` or ``tensorboard``), never by an ``RLConfig`` field: tracking does not change
results, so it must not change a run's digest.

* ``none``: nothing is written.
* ``tensorboard``: every number of a row is a scalar at its ``step`` in ``<run_dir>/tensorboard/``
  (``tensorboard --logdir runs/rl``). Needs the ``tracking`` extra (``pip install -e .[tracking]``, i.e. the
  ``tensorboard`` package); asking for it without the package is an error naming the extra, before any compute.

A resumed run appends to the same directory; rows re-logged after a resumption overwrite nothing in the JSONL
(TensorBoard shows the later value of a repeated step).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

__all__ = ["TRACKERS", "NoTracker", "TensorBoardTracker", "Tracker", "make_tracker", "tracking_choice"]

ENV_VAR = "KL_TRACKING"
_MISSING = ("needs the tensorboard package, which is not installed: pip install -e '.[tracking]' (the tracking "
            "extra), or run without --track / KL_TRACKING")


class Tracker(Protocol):
    """Receives each metrics row (the dict written to ``metrics.jsonl``, with its ``step``), then ``close()``."""

    def log(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class NoTracker:
    """The default: tracks nothing."""

    def log(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker:
    """Each finite number of a row as a TensorBoard scalar at the row's ``step``, under ``<run_dir>/tensorboard``."""

    def __init__(self, run_dir: str | os.PathLike) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError(f"tracking 'tensorboard' {_MISSING}") from None
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


TRACKERS: dict[str, Callable[[Path], Tracker]] = {"none": lambda run_dir: NoTracker(),
                                                   "tensorboard": TensorBoardTracker}


def tracking_choice(flag: str | None = None) -> str:
    """The tracker's name: ``flag`` if given, else ``$KL_TRACKING``, else ``none``. An unknown name is a
    ``ValueError`` listing the valid ones, and ``tensorboard`` without its package an ``ImportError`` naming the
    extra (both before any compute)."""
    name = flag if flag is not None else os.environ.get(ENV_VAR, "") or "none"
    source = "--track" if flag is not None else ENV_VAR
    if name not in TRACKERS:
        raise ValueError(f"{source}={name!r} is not a tracker; choose one of {', '.join(TRACKERS)}")
    if name == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ImportError(f"{source}=tensorboard {_MISSING}")
    return name


def make_tracker(name: str, run_dir: str | os.PathLike) -> Tracker:
    """The tracker called ``name`` (see :data:`TRACKERS`) writing under ``run_dir``."""
    return TRACKERS[tracking_choice(name)](Path(run_dir))
