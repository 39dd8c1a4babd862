"""The report: the sweep's results, main figures and findings on one static page, linking every notebook.

    python -m kl_lib.study.site --runs runs/rl --notebooks runs/notebooks --out runs/report

:func:`build_report` writes into ``out_dir`` (every file atomically, ``kl_lib.files``):

    results.csv             one row per run: configuration, seed, ID/OOD accuracy, diverged, collapsed, final KL
    accuracy.csv            per setting × configuration × β: pass@1 with 95% CIs and the difference to the base model
    instability.csv         the runs that diverged, collapsed or blew up in KL (kl_lib.study.findings)
    paper_comparison.csv    the paper's reported outcomes next to ours
    findings.json           F1–F3: hypothesis, test, numbers, verdict, evidence
    fig_*.png / fig_*.svg   the main figures (below)
    index.html              the page: provenance header, findings, figures inline, links to the notebooks

The figure functions (``plot_*``) are also what notebooks 04 and 05 show, so the report and the notebooks
cannot disagree. Each puts a caption computed from the data under its axes (``figures.caption``).

The page links executed notebooks as ``<notebooks_dir>/*.html`` with paths relative to ``out_dir``, and
its images by file name, so the folder can be moved together with the notebooks folder. A small inline script
marks each ``<img>`` with ``data-loaded="1"`` once it has decoded (``tests/test_site.py`` reads that back from
headless Chromium).
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import json
import math
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from kl_lib.files import git_commit, write_json, write_text
from kl_lib.study import figures
from kl_lib.study import findings as fnd
from kl_lib.study.figures import plot_training_curves
from kl_lib.study.tables import SPLITS, RunTables, load_tables

__all__ = ["plot_accuracy", "plot_training", "plot_entropy_vs_forward_kl", "plot_checkpoints",
           "plot_offpolicy_curves", "plot_offpolicy_summary", "build_report", "main"]

CURVES = {"reward/mean": "reward (batch mean)", "kl/analytic": "KL(π‖π_ref) per sequence (nats)",
          "policy/entropy": "entropy per token (nats)", "kl/forward_myopic": "Σ_t KL(π_ref‖π) at π's states (nats)"}


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def _extremes(s: pd.Series, fmt: str = "{:.2f}") -> str:
    """"highest A (x), lowest B (y)", or "all equal (x)" when there is nothing to rank."""
    if s.max() - s.min() < 1e-9:
        return f"all equal ({fmt.format(s.max())})"
    return f"highest {s.idxmax()} ({fmt.format(s.max())}), lowest {s.idxmin()} ({fmt.format(s.min())})"


def _ordered(labels) -> list[str]:
    return sorted(set(labels), key=fnd.label_key)


# ---------------------------------------------------------------------------------------------------------
# Figures


def plot_accuracy(accuracy: pd.DataFrame, base: dict[str, float], setting: str = fnd.ON_POLICY) -> plt.Figure:
    """pass@1 per configuration (x) and β (marker), ID and OOD panels, with 95% CIs; dashed: the base model."""
    acc = accuracy[accuracy["setting"] == setting]
    labels = _ordered(acc["label"])
    betas = sorted(acc["beta"].unique())
    palette = figures.config_palette(labels)
    markers = dict(zip(betas, "osD^v<>"))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharey=True)
    width = 0.6 / max(1, len(betas))
    for ax, split in zip(axes, SPLITS):
        name = fnd.SPLIT_NAMES[split]
        for i, label in enumerate(labels):
            for j, beta in enumerate(betas):
                r = acc[(acc["label"] == label) & (acc["beta"] == beta)]
                if r.empty or f"{name} pass@1" not in r:
                    continue
                r = r.iloc[0]
                x = i + (j - (len(betas) - 1) / 2) * width
                ax.errorbar(x, r[f"{name} pass@1"], yerr=[[r[f"{name} pass@1"] - r[f"{name} low"]],
                                                         [r[f"{name} high"] - r[f"{name} pass@1"]]],
                            fmt=markers[beta], color=palette[label], capsize=3, ms=7, mec="k", mew=0.5)
        ax.axhline(base[split], color="k", ls="--", lw=1)
        ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", rotation_mode="anchor")
        ax.set_title(f"{'in domain' if split == 'id_test' else 'out of domain'} ({name}: "
                     f"{'3-digit addition' if split == 'id_test' else '3-digit subtraction'})")
        ax.set_ylabel("pass@1 of the final model (temperature 1)" if ax is axes[0] else "")
    handles = [plt.Line2D([], [], marker=markers[b], ls="", color="0.5", mec="k", label=f"β = {b:g}") for b in betas]
    handles.append(plt.Line2D([], [], color="k", ls="--", lw=1, label="base model"))
    axes[1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.suptitle(f"Held-out accuracy per KL configuration ({setting}); mean over seeds, 95% bootstrap CI", y=1.02)
    fig.tight_layout()
    parts = []
    for split in SPLITS:
        name = fnd.SPLIT_NAMES[split]
        if f"{name} pass@1" not in acc or acc[f"{name} pass@1"].isna().all():
            continue
        best = acc.loc[acc[f"{name} pass@1"].idxmax()]
        above = int((acc[f"{name} Δbase low"] > 0).sum())
        below = int((acc[f"{name} Δbase high"] < 0).sum())
        top = (f"highest {best['label']} (β={best['beta']:g}) {best[f'{name} pass@1']:.3f}"
               if np.ptp(acc[f"{name} pass@1"]) > 1e-9 else f"all equal ({best[f'{name} pass@1']:.3f})")
        parts.append(f"{name}: {top} vs base {base[split]:.3f}; {above} of {len(acc)} configuration×β cells are "
                     f"above the base model (CI excludes 0) and {below} below.")
    lo_n, hi_n = int(acc["n_runs"].min()), int(acc["n_runs"].max())
    n_text = f"{lo_n} run{'s' if lo_n > 1 else ''}" if lo_n == hi_n else f"{lo_n}–{hi_n} runs"
    figures.caption(fig, (f"{n_text} per point; intervals resample runs and "
                           "problems (a diverged run counts 0). " + " ".join(parts)))
    return fig


def plot_training(tables: RunTables, setting: str = fnd.ON_POLICY, beta: float | None = None,
                  smooth: int = 5) -> plt.Figure:
    """Reward, KL and entropy against step for one setting (and β; the no-KL runs are always shown)."""
    df = tables.metrics[tables.metrics["setting"] == setting]
    if beta is not None:
        df = df[(df["beta"] == beta) | (df["label"] == fnd.NO_KL)]
    fig = plot_training_curves(df, CURVES, smooth=smooth, ncols=2)
    for ax in fig.axes:
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    steps = int(df["step"].max()) + 1
    w = max(1, steps // 10)
    last = df[df["step"] >= steps - w].groupby("label")[list(CURVES)].mean().reindex(_ordered(df["label"]))
    most_kl, low_ent = last["kl/analytic"].idxmax(), last["policy/entropy"].idxmin()
    figures.caption(fig, (
        f"{setting}{'' if beta is None else f', β = {beta:g}'}; thin lines: seeds, thick: their mean (rolling mean "
        f"over {smooth} steps). Over the last {_steps(w)}, reward / KL / entropy: "
        + "; ".join(f"{l}: {r['reward/mean']:.2f} / {r['kl/analytic']:.3f} / {r['policy/entropy']:.3f}"
                    for l, r in last.iterrows())
        + f". Furthest from the reference: {most_kl}; lowest entropy: {low_ent}."
        + ("" if last["kl/analytic"].max() - last["kl/analytic"].min() > 1e-6 else " (no KL differences: ties)")))
    return fig


def plot_entropy_vs_forward_kl(tables: RunTables, setting: str = fnd.ON_POLICY, smooth: int = 5) -> plt.Figure:
    """Trajectories of entropy against the myopic forward KL(π_ref‖π) per configuration, one panel per β."""
    df = tables.metrics[tables.metrics["setting"] == setting].sort_values("step").copy()
    cols = ["kl/forward_myopic", "policy/entropy"]
    for c in cols:
        df[c] = df.groupby("run")[c].transform(lambda s: s.rolling(smooth, min_periods=1).mean())
    betas = sorted(b for b in df["beta"].unique() if b > 0) or [0.0]
    palette = figures.config_palette(_ordered(df["label"]))
    fig, axes = plt.subplots(1, len(betas), figsize=(6.2 * len(betas), 4.6), squeeze=False, sharex=True, sharey=True)
    ends = []
    for ax, beta in zip(axes.flat, betas):
        sub = df[(df["beta"] == beta) | (df["label"] == fnd.NO_KL)]
        mean = sub.groupby(["label", "step"])[cols].mean().reset_index()
        for label in _ordered(mean["label"]):
            m = mean[mean["label"] == label]
            ax.plot(m[cols[0]], m[cols[1]], color=palette[label], lw=1.6, label=label)
            ax.plot(m[cols[0]].iloc[-1], m[cols[1]].iloc[-1], "o", color=palette[label], mec="k", ms=7)
            ends.append({"beta": beta, "label": label, "forward": m[cols[0]].iloc[-1], "entropy": m[cols[1]].iloc[-1]})
        start = mean[mean["step"] == mean["step"].min()][cols].mean()
        ax.plot(start[cols[0]], start[cols[1]], "*", color="gold", mec="k", ms=14, zorder=5, label="start (π = π_ref)")
        ax.set_title(f"β = {beta:g}")
        ax.set_xlabel("myopic forward KL: Σ_t KL(π_ref‖π) at π's states (nats)")
        ax.set_ylabel("policy entropy per token (nats)")
    axes.flat[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.suptitle(f"Entropy against forward KL during training ({setting}; mean over seeds, ● = end)", y=1.02)
    fig.tight_layout()
    e = pd.DataFrame(ends)
    # Final entropy per run (W-step mean at the end) for a seed-level interval of the k1-in-reward − k3-in-loss gap.
    out = fnd.run_outcomes(tables)
    out = out[out["setting"] == setting]
    rng = np.random.default_rng(0)
    text = []
    for beta, g in e.groupby("beta"):
        g = g.set_index("label")
        kl_only = g.drop(index=fnd.NO_KL, errors="ignore")
        if kl_only.empty:
            continue
        pair = ""
        if {"k1 in reward", fnd.K3_LOSS} <= set(g.index):
            a, b = g.loc["k1 in reward"], g.loc[fnd.K3_LOSS]
            at = out[out["beta"] == beta]
            d, lo, hi = fnd.bootstrap_difference(at.loc[at["label"] == "k1 in reward", "final_entropy"],
                                                 at.loc[at["label"] == fnd.K3_LOSS, "final_entropy"], rng, 4000)
            pair = (f" k1 in reward ends at entropy {a['entropy']:.3f} and forward KL {a['forward']:.3f}, "
                    f"k3 in loss at {b['entropy']:.3f} and {b['forward']:.3f}; final-entropy difference k1 in "
                    f"reward − k3 in loss {d:+.3f} nats/token (95% CI over seeds [{lo:+.3f}, {hi:+.3f}]).")
        lowest = (kl_only["entropy"].idxmin() if np.ptp(kl_only["entropy"]) > 1e-9 else "a tie")
        largest = (kl_only["forward"].idxmax() if np.ptp(kl_only["forward"]) > 1e-9 else "a tie")
        text.append(f"β = {beta:g}: lowest final entropy {lowest}, largest forward KL {largest}.{pair}")
    figures.caption(fig, "The paper reports that k1 in reward keeps lower entropy and k3 in loss behaves "
                          "mode-covering. Here: " + " ".join(text))
    return fig


def plot_checkpoints(tables: RunTables, setting: str = fnd.ON_POLICY) -> plt.Figure:
    """pass@1 of the base model (step 0), the mid-training checkpoint(s) and the final model per configuration."""
    ck = tables.checkpoints[tables.checkpoints["setting"] == setting]
    labels = _ordered(ck["label"])
    palette = figures.config_palette(labels)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    betas = sorted(ck["beta"].unique())
    dashes = dict(zip([b for b in betas if b > 0], ["", (4, 2), (1, 1), (6, 2, 1, 2)]))
    rows = []
    for ax, split in zip(axes, SPLITS):
        sub = ck[ck["split"] == split]
        mean = sub.groupby(["label", "beta", "step"])["pass@1"].mean().reset_index()
        for (label, beta), m in mean.groupby(["label", "beta"]):
            ls = dashes.get(beta, "")
            ax.plot(m["step"], m["pass@1"], marker="o", color=palette[label], dashes=ls or (None, None),
                    label=f"{label}" + ("" if label == fnd.NO_KL else f", β={beta:g}"))
            ckpts = m[m["step"] > 0]
            if len(ckpts) >= 2:
                rows.append({"split": fnd.SPLIT_NAMES[split], "label": label, "beta": beta,
                             "mid": ckpts["pass@1"].iloc[-2], "final": ckpts["pass@1"].iloc[-1]})
        ax.set_title(f"{fnd.SPLIT_NAMES[split]} ({split})")
        ax.set_xlabel("training step (0 = base model)")
        ax.set_ylabel("pass@1 (mean over seeds)")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False, fontsize=8)
    fig.suptitle(f"Accuracy at intermediate checkpoints and at the end ({setting})", y=1.02)
    fig.tight_layout()
    r = pd.DataFrame(rows)
    if r.empty:
        figures.caption(fig, "No intermediate checkpoints were evaluated for this setting.")
        return fig
    r["change"] = r["final"] - r["mid"]
    text = []
    for split, g in r.groupby("split"):
        up, down = int((g["change"] > 0).sum()), int((g["change"] < 0).sum())
        worst = g.loc[g["change"].idxmin()]
        fall = (f" (largest fall {worst['label']}, β={worst['beta']:g}: {worst['mid']:.3f} → {worst['final']:.3f})"
                if down else "")
        text.append(f"{split}: from the mid checkpoint to the end, {up} of {len(g)} configuration×β lines rise and "
                    f"{down} fall{fall}.")
    figures.caption(fig, "Means over seeds; diverged runs have no final model and are absent here. " + " ".join(text))
    return fig


def _lagged_settings(df: pd.DataFrame) -> list[str]:
    return sorted((s for s in df["setting"].unique() if s != fnd.ON_POLICY), key=fnd.setting_key)


def plot_offpolicy_curves(tables: RunTables, smooth: int = 5) -> plt.Figure:
    """Reward against step, one panel per lag (PPO settings), a line per configuration (thin: seeds)."""
    df = tables.metrics[tables.metrics["policy_loss"] == "ppo"].sort_values("step").copy()
    settings = _lagged_settings(df)
    df["reward"] = df.groupby("run")["reward/mean"].transform(lambda s: s.rolling(smooth, min_periods=1).mean())
    labels = _ordered(df["label"])
    palette = figures.config_palette(labels)
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 4.2), squeeze=False, sharey=True)
    for ax, setting in zip(axes.flat, settings):
        sub = df[df["setting"] == setting]
        sns.lineplot(data=sub, x="step", y="reward", hue="label", hue_order=labels, units="seed", estimator=None,
                     palette=palette, alpha=0.25, lw=0.8, legend=False, ax=ax)
        sns.lineplot(data=sub, x="step", y="reward", hue="label", hue_order=labels, palette=palette, errorbar=None,
                     lw=2, legend=ax is axes.flat[-1], ax=ax)
        ax.set_title(setting)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"reward (batch mean, rolling {smooth})")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    if axes.flat[-1].get_legend() is not None:
        sns.move_legend(axes.flat[-1], "center left", bbox_to_anchor=(1.02, 0.5), frameon=False, title=None)
    fig.suptitle("Off-policy training: reward per lag (PPO-clip, Dr. GRPO advantages)", y=1.02)
    fig.tight_layout()
    steps = int(df["step"].max()) + 1
    w = max(1, steps // 10)
    last = df[df["step"] >= steps - w].groupby(["setting", "label"])["reward/mean"].mean()
    text = []
    for setting in settings:
        s = last.loc[setting]
        text.append(f"{setting}: {_extremes(s)}")
    figures.caption(fig, f"Mean reward over the last {_steps(w)}: " + "; ".join(text) + ".")
    return fig


def plot_offpolicy_summary(accuracy: pd.DataFrame, outcomes: pd.DataFrame,
                           base: dict[str, float] | None = None) -> plt.Figure:
    """Per lag and configuration: fraction of unstable runs, and final ID / OOD pass@1 with 95% CIs
    (dashed: the base model, when ``base`` is given)."""
    out = outcomes[outcomes["policy_loss"] == "ppo"]
    acc = accuracy[accuracy["setting"].isin(out["setting"].unique())].copy()
    labels = _ordered(out["label"])
    palette = figures.config_palette(labels)
    lags = sorted(out["async_lag"].unique())
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    width = 0.8 / max(1, len(labels))
    rate = out.groupby(["async_lag", "label"])["unstable"].agg(["sum", "count"]).reset_index()
    ax = axes[0]
    for j, label in enumerate(labels):
        r = rate[rate["label"] == label].set_index("async_lag").reindex(lags)
        xs = np.arange(len(lags)) + (j - (len(labels) - 1) / 2) * width
        ax.bar(xs, (r["sum"] / r["count"]).fillna(0), width, color=palette[label], label=label, edgecolor="k", lw=0.4)
        for x, (s, c) in zip(xs, r[["sum", "count"]].itertuples(index=False)):
            if c == c:  # not NaN
                ax.text(x, (s / c if c else 0) + 0.02, f"{int(s)}/{int(c)}", ha="center", fontsize=7, rotation=90)
    ax.set_xticks(range(len(lags)), [f"lag {k}" for k in lags])
    ax.set(ylim=(0, 1.15), ylabel="fraction of runs unstable (diverged or collapsed)", title="Instability")
    acc["lag"] = acc["setting"].map(lambda s: int(s.rsplit(" ", 1)[-1]))
    for ax, split in zip(axes[1:], SPLITS):
        name = fnd.SPLIT_NAMES[split]
        for j, label in enumerate(labels):
            r = acc[acc["label"] == label].set_index("lag").reindex(lags)
            if f"{name} pass@1" not in r:
                continue
            xs = np.arange(len(lags)) + (j - (len(labels) - 1) / 2) * width
            ax.errorbar(xs, r[f"{name} pass@1"], yerr=[r[f"{name} pass@1"] - r[f"{name} low"],
                                                       r[f"{name} high"] - r[f"{name} pass@1"]],
                        fmt="o", color=palette[label], capsize=2, mec="k", mew=0.5, ms=6)
        if base is not None:
            ax.axhline(base[split], color="k", ls="--", lw=1, label="base model")
            ax.legend(loc="best", frameon=False, fontsize=8)
        ax.set_xticks(range(len(lags)), [f"lag {k}" for k in lags])
        ax.set(ylabel="final pass@1 (mean over seeds, 95% CI)", title=f"{name} accuracy")
    axes[0].legend(loc="upper left", frameon=False, fontsize=8)
    fig.suptitle("Off-policy: stability and accuracy per lag and KL configuration", y=1.02)
    fig.tight_layout()
    text = []
    for lag in lags:
        g = out[out["async_lag"] == lag]
        nk, kl = g[g["label"] == fnd.NO_KL], g[g["label"].isin(fnd.OFFPOLICY_KL)]
        k1l = g[g["label"] == "k1 in loss"]
        text.append(f"lag {lag}: unstable runs, no KL {int(nk['unstable'].sum())}/{len(nk)}, with k1 in reward / "
                    f"k3 in loss / k3 in loss (token IS) {int(kl['unstable'].sum())}/{len(kl)}, k1 in loss "
                    f"{int(k1l['unstable'].sum())}/{len(k1l)}")
    figures.caption(fig, "; ".join(text) + ". A diverged run counts 0 in the accuracy panels.")
    return fig


# ---------------------------------------------------------------------------------------------------------
# The page


_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
header { border-bottom: 1px solid #ccc; margin-bottom: 1em; font-size: 0.9em; color: #444; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ddd; padding: 3px 6px; text-align: left; vertical-align: top; }
img { max-width: 100%; border: 1px solid #eee; }
.verdict-supported { color: #1b7837; font-weight: bold; }
.verdict-not-supported { color: #b2182b; font-weight: bold; }
.verdict-inconclusive-at-this-scale { color: #8c6d1f; font-weight: bold; }
.warning { background: #fff3cd; padding: 0.5em; border: 1px solid #e0c36c; }
"""

_SCRIPT = """
<script>
// Marks every image once it has decoded: tests/test_site.py reads data-loaded back from headless Chromium.
function markImages() {
  document.querySelectorAll('img').forEach(function (img) {
    img.setAttribute('data-loaded', img.complete && img.naturalWidth > 0 ? '1' : '0');
  });
}
window.addEventListener('load', markImages);
</script>
"""


def _table_html(df: pd.DataFrame) -> str:
    return _strong(df.to_html(index=False, na_rep="–", float_format=lambda x: f"{x:.3g}", border=0, escape=True))


def _strong(escaped_html: str) -> str:
    """``**text**`` (how findings mark unconfirmed paper facts) as bold, in already escaped HTML."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped_html)


def _verdict_span(verdict: str) -> str:
    return f'<span class="verdict-{verdict.replace(" ", "-")}">{html.escape(verdict)}</span>'


def _provenance(runs_dir: Path) -> dict[str, Any]:
    sweep = runs_dir / "sweep.json"
    smoke = json.loads(sweep.read_text()).get("smoke") if sweep.exists() else None
    return {"git_commit": git_commit() or "unknown", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} · {platform.platform()} · {os.cpu_count()} CPUs · Python "
                       f"{platform.python_version()}", "runs_dir": str(runs_dir), "smoke": smoke}


class _Analysis(NamedTuple):
    """Everything the report shows, computed once from the run tables."""

    tables: RunTables
    outcomes: pd.DataFrame
    accuracy: pd.DataFrame
    found: list[fnd.Finding]
    comparison: pd.DataFrame
    base: dict[str, float]


def _analyse(runs_dir: Path, seed: int, n_boot: int) -> _Analysis:
    tables = load_tables(runs_dir)
    outcomes = fnd.run_outcomes(tables)
    rng = np.random.default_rng(seed)
    accuracy = fnd.accuracy_table(tables, rng, n_boot=n_boot)
    found = fnd.all_findings(tables, seed=seed, n_boot=n_boot, outcomes=outcomes)
    comparison = fnd.paper_comparison(tables, accuracy, outcomes, found)
    base = {s: tables.base_accuracy(s) for s in SPLITS}
    return _Analysis(tables, outcomes, accuracy, found, comparison, base)


def _write_tables(out_dir: Path, a: _Analysis) -> None:
    """results.csv, accuracy.csv, instability.csv, paper_comparison.csv and findings.json."""
    results = a.tables.results.merge(
        a.outcomes[["run", "collapsed", "kl_blowup", "unstable", "final_reward"]], on="run", how="left")
    cols = ["setting", "label", "beta", "seed", "async_lag", "run", "status", "diverged", "reward_collapse",
            "collapsed", "kl_blowup", "unstable", "id_test pass@1", "id_test greedy", "ood_test pass@1",
            "ood_test greedy", "final_kl", "final_entropy", "final_reward"]
    write_text(out_dir / "results.csv", fnd.sort_configs(results)[cols].to_csv(index=False))
    write_text(out_dir / "accuracy.csv", a.accuracy.to_csv(index=False))
    write_text(out_dir / "instability.csv", fnd.instability_table(a.outcomes).to_csv(index=False))
    write_text(out_dir / "paper_comparison.csv", a.comparison.to_csv(index=False))
    write_json(out_dir / "findings.json", [f.to_dict() for f in a.found])


def _save_figures(out_dir: Path, a: _Analysis) -> list[tuple[str, str]]:
    """Save the figures that the runs support; returns their ``(stem, title)`` in page order."""
    saved: list[tuple[str, str]] = []

    def save(fig: plt.Figure, stem: str, title: str) -> None:
        figures.save_figure(fig, out_dir / stem)
        plt.close(fig)
        saved.append((stem, title))

    tables = a.tables
    if fnd.ON_POLICY in set(tables.results["setting"]):
        save(plot_accuracy(a.accuracy, a.base), "fig_accuracy", "Accuracy per KL configuration (on-policy)")
        on_policy = tables.results[tables.results["setting"] == fnd.ON_POLICY]
        for beta in sorted(b for b in on_policy["beta"].unique() if b > 0):
            save(plot_training(tables, fnd.ON_POLICY, beta), f"fig_training_b{beta:g}".replace(".", "p"),
                 f"Training curves (on-policy, β = {beta:g})")
        save(plot_entropy_vs_forward_kl(tables), "fig_entropy_forward_kl", "Entropy against forward KL")
        save(plot_checkpoints(tables), "fig_checkpoints", "Mid-training checkpoints vs final")
    if (tables.results["policy_loss"] == "ppo").any():
        save(plot_offpolicy_curves(tables), "fig_offpolicy_curves", "Off-policy reward curves per lag")
        save(plot_offpolicy_summary(a.accuracy, a.outcomes, a.base), "fig_offpolicy",
             "Off-policy stability and accuracy")
    return saved


def _header_html(a: _Analysis, runs_dir: Path, notebooks_dir: Path, out_dir: Path, seed: int, n_boot: int) -> str:
    prov = _provenance(runs_dir)
    parts = [f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>KL estimators: report</title>"
             f"<style>{_STYLE}</style></head><body>",
             "<header><h1>A Comedy of Estimators: small-scale reproduction report</h1>",
             f"<p>Produced by <code>python -m kl_lib.study.site --runs {html.escape(str(runs_dir))} --notebooks "
             f"{html.escape(str(notebooks_dir))} --out {html.escape(str(out_dir))}</code> at git commit "
             f"<code>{html.escape(prov['git_commit'])}</code> on {html.escape(prov['date'])}, machine "
             f"{html.escape(prov['machine'])}. {len(a.tables.results)} runs from <code>{html.escape(str(runs_dir))}</code>; "
             f"bootstrap seed {seed}, {n_boot} replicates.</p>"]
    if prov["smoke"]:
        parts.append('<p class="warning">These runs are a <b>smoke</b> sweep (a few steps, one seed): the numbers '
                     'only show that the pipeline works, not what the study finds.</p>')
    parts.append("</header>")
    return "\n".join(parts)


def _findings_html(found: list[fnd.Finding]) -> str:
    parts = ["<h2>Findings</h2><p>Hypotheses from the paper, tested with rules fixed in advance "
             "(<code>docs/statistics.md</code>, <code>kl_lib.study.findings</code>): every test is two-sided at "
             "α = 0.05 and compares runs only within one β or lag; rates by an exact test, accuracy differences by an "
             "exact permutation test over seeds with a bootstrap interval; secondary rows are Holm-adjusted; a row "
             "whose smallest attainable p is ≥ α is “not testable at this scale”.</p><ul>"]
    for f in found:
        nums = ", ".join(f"{k} = {v:.3g}" if isinstance(v, float) else f"{k} = {v}" for k, v in f.numbers.items()
                         if not (isinstance(v, float) and math.isnan(v)))
        parts.append(f"<li><b>{f.id}</b>: {html.escape(f.hypothesis)} <br>Verdict: {_verdict_span(f.verdict)}. "
                     f"<br><small>Test: {html.escape(f.test)}<br>Numbers: {html.escape(nums)}<br>Paper: "
                     f"{_strong(html.escape(f.paper))}</small></li>")
    parts.append("</ul>")
    return "\n".join(parts)


def _notebooks_html(notebooks_dir: Path, out_dir: Path) -> str:
    notebooks = sorted(notebooks_dir.glob("*.html")) if notebooks_dir.is_dir() else []
    if not notebooks:
        return f"<p>No executed notebooks in <code>{html.escape(str(notebooks_dir))}</code> (make reproduce).</p>"
    return "<ul>" + "".join(
        f'<li><a href="{html.escape(Path(os.path.relpath(nb, out_dir)).as_posix())}">{html.escape(nb.stem)}</a></li>'
        for nb in notebooks) + "</ul>"


def _body_html(a: _Analysis, saved: list[tuple[str, str]], notebooks_dir: Path, out_dir: Path) -> str:
    """Everything after the findings: comparison, figures, tables, notebook and file links."""
    parts = ["<h2>The paper's outcomes next to ours (different scales)</h2>" + _table_html(a.comparison),
             "<h2>Figures</h2>"]
    for stem, title in saved:
        parts.append(f'<h3>{html.escape(title)}</h3><p><img src="{stem}.png" alt="{html.escape(title)}"> '
                     f'<br><a href="{stem}.svg">SVG</a></p>')
    acc_cols = [c for c in a.accuracy.columns if "Δbase low" not in c and "Δbase high" not in c]
    parts.append("<h2>Accuracy per configuration × β</h2>" + _table_html(a.accuracy[acc_cols]))
    inst = fnd.instability_table(a.outcomes)
    parts.append("<h2>Unstable runs</h2>" + (_table_html(inst) if len(inst) else "<p>No run diverged, collapsed or "
                                                                                  "blew up in KL.</p>"))
    parts.append("<h2>Notebooks</h2>")
    parts.append(_notebooks_html(notebooks_dir, out_dir))
    parts.append("<h2>Files</h2><ul>" + "".join(
        f'<li><a href="{n}">{n}</a></li>' for n in ("results.csv", "accuracy.csv", "instability.csv",
                                                    "paper_comparison.csv", "findings.json")) + "</ul>")
    parts.append(_SCRIPT + "</body></html>\n")
    return "\n".join(parts)


def build_report(runs_dir: str | Path, notebooks_dir: str | Path, out_dir: str | Path = "runs/report",
                 seed: int = 0, n_boot: int = 4000) -> Path:
    """Write the report (module docstring) into ``out_dir``; returns the path of ``index.html``."""
    runs_dir, notebooks_dir, out_dir = Path(runs_dir), Path(notebooks_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures.setup()
    analysis = _analyse(runs_dir, seed, n_boot)
    _write_tables(out_dir, analysis)
    saved = _save_figures(out_dir, analysis)
    page = [_header_html(analysis, runs_dir, notebooks_dir, out_dir, seed, n_boot), _findings_html(analysis.found),
            _body_html(analysis, saved, notebooks_dir, out_dir)]
    return write_text(out_dir / "index.html", "\n".join(page))


def build_parser() -> argparse.ArgumentParser:
    """The command line that builds the static report."""
    parser = argparse.ArgumentParser(
        prog="python -m kl_lib.study.site",
        description="Build the static report (index.html with the sweep's tables and figures, linking the executed "
                    "notebooks) from a finished sweep.",
        epilog="example: python -m kl_lib.study.site --runs runs/rl --notebooks runs/notebooks --out runs/report "
               "(make report)")
    parser.add_argument("--runs", default="runs/rl", metavar="DIR", help="sweep runs directory (default runs/rl)")
    parser.add_argument("--notebooks", default="runs/notebooks", metavar="DIR",
                        help="executed notebooks (*.html) to link (default runs/notebooks)")
    parser.add_argument("--out", default="runs/report", metavar="DIR", help="output directory (default runs/report)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--n-boot", type=int, default=4000, metavar="N", help="bootstrap replicates (default 4000)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    try:
        index = build_report(args.runs, args.notebooks, args.out, seed=args.seed, n_boot=args.n_boot)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
