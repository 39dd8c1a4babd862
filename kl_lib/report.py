"""Reading RL run directories into tables, and the training-curve figure shared by notebooks 03–05.

A run directory (``kl_lib.rl.train``) holds ``config.json``, ``metrics.jsonl``, ``summary.json`` and ``DONE``;
:func:`load_runs` turns a directory of runs into one long DataFrame (one row per run and step) with the
configuration columns the notebooks group by: ``label`` (the KL configuration, or "no KL"), ``beta``,
``seed``, ``async_lag``. One row per finished run, with its evaluation, is ``kl_lib.tables.results_table``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from kl_lib.config import KLConfig
from kl_lib.plotting import config_palette

__all__ = ["run_label", "load_runs", "plot_training_curves"]


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


def plot_training_curves(df: pd.DataFrame, metrics: dict[str, str], hue: str = "label", units: str = "seed",
                         smooth: int = 5, ncols: int = 2) -> plt.Figure:
    """One panel per metric (``{column: axis label}``) against step; a line per ``hue`` value, one thin line
    per ``units`` value (seeds) plus their mean (rolling mean over ``smooth`` steps)."""
    n = len(metrics)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.2 * ncols, 3.6 * nrows), squeeze=False)
    palette = config_palette(df[hue].unique())
    data = df.sort_values("step").copy()
    for col in metrics:
        data[col] = data.groupby(["run"])[col].transform(lambda s: s.rolling(smooth, min_periods=1).mean())
    for ax, (col, label) in zip(axes.flat, metrics.items()):
        sns.lineplot(data=data, x="step", y=col, hue=hue, units=units, estimator=None, palette=palette, ax=ax,
                     alpha=0.3, linewidth=0.8, legend=False)
        sns.lineplot(data=data, x="step", y=col, hue=hue, palette=palette, ax=ax, errorbar=None, linewidth=2,
                     legend=ax is axes.flat[0])
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
    for ax in list(axes.flat)[n:]:
        ax.remove()
    if axes.flat[0].get_legend() is not None:
        sns.move_legend(axes.flat[0], "upper left", bbox_to_anchor=(0, 1.35), ncol=3, frameon=False, title=None)
    fig.tight_layout()
    return fig
