"""Reading RL run directories into tables.

A run directory (``kl_lib.rl.train``) holds ``config.json``, ``metrics.jsonl``, ``summary.json`` and ``DONE``;
:func:`load_runs` turns a directory of runs into one long DataFrame (one row per run and step) with the
configuration columns the notebooks group by: ``label`` (the KL configuration, or "no KL"), ``beta``,
``seed``, ``async_lag``. One row per finished run, with its evaluation, is ``kl_lib.study.tables.results_table``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import pandas as pd

from kl_lib.config import KLConfig

__all__ = ["run_label", "load_runs"]


def run_label(config: dict) -> str:
    """``KLConfig.label`` of a run's config dict, or ``"no KL"`` when β = 0."""
    kl = KLConfig(**config["kl"])
    return "no KL" if kl.beta == 0 else kl.label


def _config_columns(run_dir: Path) -> dict:
    cfg = json.loads((run_dir / "config.json").read_text())["config"]
    return {"run": run_dir.name, "label": run_label(cfg), "beta": cfg["kl"]["beta"], "seed": cfg["seed"],
            "async_lag": cfg["async_lag"], "finetune": cfg["finetune"], "policy_loss": cfg["policy_loss"]}


def _run_dirs(runs_dir: str | Path, names: Iterable[str] | None = None) -> list[Path]:
    root = Path(runs_dir)
    dirs = [root / n for n in names] if names is not None else sorted(p for p in root.iterdir() if p.is_dir())
    return [d for d in dirs if (d / "config.json").exists() and (d / "metrics.jsonl").exists()]


def load_runs(runs_dir: str | Path, names: Iterable[str] | None = None) -> pd.DataFrame:
    """Every step of every run (finished or not) as rows, with configuration columns."""
    frames = []
    for d in _run_dirs(runs_dir, names):
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]
        if rows:
            frames.append(pd.DataFrame(rows).assign(**_config_columns(d)))
    if not frames:
        raise FileNotFoundError(f"no runs with metrics under {runs_dir}; train some first (make sweep)")
    return pd.concat(frames, ignore_index=True)
