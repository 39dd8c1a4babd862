"""Shared figure style and figure saving for the notebooks.

One seaborn theme, one colour per KL configuration across every figure (so "k3 in loss" is the same colour
in notebook 02 and in the report), and :func:`save_figure`, which writes PNG and SVG atomically and puts the
takeaway caption under the axes so that a figure read on its own still says what it shows.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from kl_lib.files import atomic_write

__all__ = ["setup", "config_palette", "caption", "save_figure", "plot_training_curves"]

_PALETTE = {
    "k1 in reward": "#1b9e77",
    "k1 in loss": "#d95f02",
    "k1 in reward+loss": "#66a61e",
    "k2 in reward": "#a6761d",
    "k2 in loss": "#e6ab02",
    "k2 in reward+loss": "#b3b3b3",
    "k3 in reward": "#e7298a",
    "k3 in loss": "#7570b3",
    "k3 in reward+loss": "#1f78b4",
    "k3 in loss (token IS)": "#bcbd22",
    "analytic in reward": "#fb9a99",
    "analytic in loss": "#cab2d6",
    "analytic in reward+loss": "#6a3d9a",
    "no KL": "#666666",
    "k1 in reward (reward-to-go)": "#17becf",
    "k3 in reward+loss (reward-to-go)": "#a6cee3",
    "analytic in reward+loss (reward-to-go)": "#b15928",
}


def setup(context: str = "notebook") -> None:
    """Apply the compendium's seaborn theme."""
    sns.set_theme(context=context, style="whitegrid", font_scale=0.95)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 150, "savefig.bbox": "tight", "axes.titleweight": "bold"})


def config_palette(labels) -> dict[str, str]:
    """A colour for each configuration label.

    Standard labels (``KLConfig.label``) get fixed colours; a variant such as ``"k3 in loss (token IS)"`` gets
    its base label's colour unless the base is also present; anything else gets a tab20 colour.
    """
    labels = list(dict.fromkeys(labels))
    extra = iter(_fallback_colours() * (1 + len(labels) // 8))
    out = {}
    for label in labels:
        base = label.split(" (")[0]
        if label in _PALETTE:
            out[label] = _PALETTE[label]
        elif base in _PALETTE and base not in labels:
            out[label] = _PALETTE[base]
        else:
            out[label] = next(extra)
    return out


def _fallback_colours() -> list[str]:
    """tab20 colours that are not close to any fixed configuration colour."""
    fixed = [_rgb(c) for c in _PALETTE.values()]
    out = []
    for colour in sns.color_palette("tab20", n_colors=20).as_hex():
        rgb = _rgb(colour)
        if min(sum((a - b) ** 2 for a, b in zip(rgb, f)) for f in fixed) > 0.06:
            out.append(colour)
    return out


def _rgb(hex_colour: str) -> tuple[float, float, float]:
    h = hex_colour.lstrip("#")
    return tuple(int(h[i: i + 2], 16) / 255 for i in (0, 2, 4))


def caption(fig: plt.Figure, text: str, width: int = 120) -> None:
    """Write the figure's takeaway under the axes."""
    fig.text(0.01, -0.01, "\n".join(textwrap.wrap(text, width)), ha="left", va="top", fontsize=9, style="italic")


def save_figure(fig: plt.Figure, path_stem: str | os.PathLike, formats: tuple[str, ...] = ("png", "svg")) -> list[Path]:
    """Save ``fig`` as ``<path_stem>.png`` and ``.svg`` (atomically); returns the written paths."""
    stem = Path(path_stem)
    written = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        with atomic_write(path, "wb") as f:
            fig.savefig(f, format=fmt, bbox_inches="tight")
        written.append(path)
    return written


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
