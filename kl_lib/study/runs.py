"""Reading RL run directories into tables.

A run directory (``kl_lib.rl.train``) holds ``config.json``, ``metrics.jsonl``, ``summary.json`` and ``DONE``;
:func:`load_runs` turns a directory of runs into one long DataFrame (one row per run and step) with the
configuration columns the notebooks group by: ``label`` (the KL configuration, or "no KL"), ``beta``,
``seed``, ``async_lag``. One row per finished run, with its evaluation, is ``kl_lib.study.tables.results_table``.

Run directories are read as the trainer leaves them after any crash: a torn last line of ``metrics.jsonl`` is
dropped with a warning (:func:`metrics_rows`); a run is *finished* only when ``DONE``, ``summary.json``,
``metrics.jsonl`` and a readable ``config.json`` are all there (:func:`is_finished`), never on ``DONE`` alone; and
a run moved aside by the trainer (``<name>.old-<time>``, an earlier config kept for the record) is not one of the
runs (:func:`run_dirs`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from kl_lib.config import KLConfig
from kl_lib.files import read_jsonl

__all__ = ["is_finished", "load_runs", "metrics_rows", "read_json", "run_dirs", "run_label"]

MOVED_ASIDE = ".old-"
"""In the name of a run directory the trainer moved aside (``<name>.old-<time>``)."""


def run_label(config: dict) -> str:
    """``KLConfig.label`` of a run's config dict, or ``"no KL"`` when β = 0."""
    kl = KLConfig(**config["kl"])
    return "no KL" if kl.beta == 0 else kl.label


def _config_columns(run_dir: Path) -> dict:
    cfg = json.loads((run_dir / "config.json").read_text())["config"]
    return {"run": run_dir.name, "label": run_label(cfg), "beta": cfg["kl"]["beta"], "seed": cfg["seed"],
            "async_lag": cfg["async_lag"], "finetune": cfg["finetune"], "policy_loss": cfg["policy_loss"]}


def read_json(path: Path) -> dict | None:
    """A JSON file's mapping, or None when it is missing or cannot be read."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def metrics_rows(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``; a torn last line is dropped with a warning, a damaged earlier line raises
    ``ValueError`` naming the file and line (``kl_lib.files.read_jsonl``)."""
    return read_jsonl(path, lambda row: isinstance(row, dict), "metrics row")


def is_finished(run_dir: Path) -> bool:
    """``DONE``, ``summary.json``, ``metrics.jsonl`` and ``config.json`` are there (the JSON files readable)."""
    return ((run_dir / "DONE").is_file() and (run_dir / "metrics.jsonl").is_file()
            and read_json(run_dir / "summary.json") is not None and read_json(run_dir / "config.json") is not None)


def run_dirs(runs_dir: str | Path, names: Iterable[str] | None = None) -> list[Path]:
    """The run directories under ``runs_dir`` (or those named) with a config and metrics, finished or not,
    without runs moved aside."""
    root = Path(runs_dir)
    dirs = [root / n for n in names] if names is not None else sorted(
        p for p in root.iterdir() if p.is_dir() and MOVED_ASIDE not in p.name)
    return [d for d in dirs if read_json(d / "config.json") is not None and (d / "metrics.jsonl").is_file()]


def load_runs(runs_dir: str | Path, names: Iterable[str] | None = None) -> pd.DataFrame:
    """Every step of every run (finished or not) as rows, with configuration columns."""
    frames = []
    for d in run_dirs(runs_dir, names):
        rows = metrics_rows(d / "metrics.jsonl")
        if rows:
            frames.append(pd.DataFrame(rows).assign(**_config_columns(d)))
    if not frames:
        raise FileNotFoundError(f"no runs with metrics under {runs_dir}; train some first (make sweep)")
    return pd.concat(frames, ignore_index=True)
