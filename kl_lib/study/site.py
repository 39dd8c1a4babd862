"""The report: a study's results, main figures and findings on one static page, linking every notebook.

    python -m kl_lib.study.site --runs runs/study --notebooks runs/notebooks --out runs/report

The study is recognised from its runs directory (``kl_lib.study.studies.study_of_runs``): its KL blow-up
threshold, its planned runs and the pre-registered analysis cut (:func:`analysis_cut`: the seeds complete for every
planned cell; a preliminary look at every finished run, flagged on the page, while no seed is complete). For the
long-answer study the short-answer study's committed findings (``runs/reference/rl``) are a contrast section.

:func:`build_report` writes into ``out_dir`` (every file atomically, ``kl_lib.files``):

    results.csv             one row per run: configuration, seed, ID/OOD accuracy, diverged, collapsed, final KL
    accuracy.csv            per setting × configuration × β: pass@1 with 95% CIs and the difference to the base model
    instability.csv         the runs that diverged, collapsed or blew up in KL (kl_lib.study.findings)
    paper_comparison.csv    the paper's reported outcomes next to ours
    findings.json           F1–F3: hypothesis, test, numbers, verdict, evidence
    predictions.csv         what the exact analysis predicts, compared on the runs (:func:`prediction_checks`)
    contrast.csv            the short-answer study's verdicts next to this study's (:func:`study_contrast`)
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
import textwrap
from pathlib import Path
from typing import Any, NamedTuple

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from kl_lib.files import git_commit, write_json, write_text
from kl_lib.rl.config import load_sweep_spec
from kl_lib.rl.sweep import expand_sweep
from kl_lib.study import figures
from kl_lib.study import findings as fnd
from kl_lib.study import stats
from kl_lib.study.figures import plot_training_curves
from kl_lib.study.studies import Study, get_study, study_of_runs
from kl_lib.study.tables import SPLITS, RunTables, complete_seeds, load_tables, restrict_to_runs

__all__ = ["plot_accuracy", "plot_training", "plot_entropy_vs_forward_kl", "plot_checkpoints",
           "plot_offpolicy_curves", "plot_offpolicy_summary", "build_report", "main"]

FORWARD_MYOPIC = "myopic forward KL Σ_t KL(π_ref(·|s_t)‖π(·|s_t)) at π's own states (nats)"
"""What ``kl/forward_myopic`` is: a per-state forward KL summed along the policy's own samples, not the sequence
forward KL(π_ref‖π) (that would need samples of π_ref)."""
CURVES = {"reward/mean": "reward (batch mean)", "kl/analytic": "KL(π‖π_ref) per sequence (nats)",
          "policy/entropy": "entropy per token (nats)", "kl/forward_myopic": FORWARD_MYOPIC}
TRAINING_GRID = {"reward/mean": "reward (batch mean)", "kl/analytic": "sequence KL(π‖π_ref) (nats)",
                 "policy/entropy": "entropy per token (nats)"}


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


def plot_entropy_vs_forward_kl(tables: RunTables, setting: str = fnd.ON_POLICY, smooth: int = 5,
                               outcomes: pd.DataFrame | None = None) -> plt.Figure:
    """Trajectories of entropy against the myopic forward KL (``FORWARD_MYOPIC``) per configuration, one panel
    per β (``outcomes``: :func:`kl_lib.study.findings.run_outcomes`, for the final-entropy interval)."""
    df = tables.metrics[tables.metrics["setting"] == setting].sort_values("step").copy()
    cols = ["kl/forward_myopic", "policy/entropy"]
    for c in cols:
        df[c] = df.groupby("run")[c].transform(lambda s: s.rolling(smooth, min_periods=1).mean())
    betas = sorted(b for b in df["beta"].unique() if b > 0) or [0.0]
    palette = figures.config_palette(_ordered(df["label"]))
    fig, axes = plt.subplots(1, len(betas), figsize=(4.4 * len(betas) + 2.5, 4.6), squeeze=False, sharex=True,
                             sharey=True)
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
        ax.set_xlabel("\n".join(textwrap.wrap(FORWARD_MYOPIC, 40)), fontsize=8)
        ax.set_ylabel("policy entropy per token (nats)" if ax is axes.flat[0] else "")
    axes.flat[-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.suptitle(f"Entropy against the myopic forward KL during training ({setting}; mean over seeds, ● = end)", y=1.02)
    fig.tight_layout()
    out = fnd.run_outcomes(tables) if outcomes is None else outcomes
    figures.caption(fig, "The paper reports that k1 in reward keeps lower entropy and k3 in loss behaves "
                          "mode-covering. Here: " + _entropy_caption(pd.DataFrame(ends), out[out["setting"] == setting]))
    return fig


def _entropy_caption(ends: pd.DataFrame, out: pd.DataFrame) -> str:
    """Per β: lowest final entropy, largest forward KL, and k1 in reward − k3 in loss in final entropy (seed CI)."""
    rng = np.random.default_rng(0)
    text = []
    for beta, g in ends.groupby("beta"):
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
            n = min((at["label"] == "k1 in reward").sum(), (at["label"] == fnd.K3_LOSS).sum())
            ci = f"95% CI over seeds [{lo:+.3f}, {hi:+.3f}]" if n >= 2 else "one run per cell: no interval"
            pair = (f" k1 in reward ends at entropy {a['entropy']:.3f} and forward KL {a['forward']:.2f}, "
                    f"k3 in loss at {b['entropy']:.3f} and {b['forward']:.2f}; final-entropy difference k1 in "
                    f"reward − k3 in loss {d:+.3f} nats/token ({ci}).")
        lowest = (kl_only["entropy"].idxmin() if np.ptp(kl_only["entropy"]) > 1e-9 else "a tie")
        largest = (kl_only["forward"].idxmax() if np.ptp(kl_only["forward"]) > 1e-9 else "a tie")
        text.append(f"β = {beta:g}: lowest final entropy {lowest}, largest forward KL {largest}.{pair}")
    return " ".join(text)


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
    """Per off-policy setting (lag and PPO minibatches: F3's strata) and configuration: fraction of unstable runs,
    and final ID / OOD pass@1 with 95% CIs (dashed: the base model, when ``base`` is given)."""
    out = outcomes[outcomes["policy_loss"] == "ppo"]
    settings = sorted(out["setting"].unique(), key=fnd.setting_key)
    acc = accuracy[accuracy["setting"].isin(settings)]
    labels = _ordered(out["label"])
    palette = figures.config_palette(labels)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    width = 0.8 / max(1, len(labels))
    offset = lambda j: np.arange(len(settings)) + (j - (len(labels) - 1) / 2) * width
    ticks = ["\n".join(textwrap.wrap(s, 18)) for s in settings]
    rate = out.groupby(["setting", "label"])["unstable"].agg(["sum", "count"]).reset_index()
    ax = axes[0]
    for j, label in enumerate(labels):
        r = rate[rate["label"] == label].set_index("setting").reindex(settings)
        xs = offset(j)
        ax.bar(xs, (r["sum"] / r["count"]).fillna(0), width, color=palette[label], label=label, edgecolor="k", lw=0.4)
        for x, (s, c) in zip(xs, r[["sum", "count"]].itertuples(index=False)):
            if c == c:  # not NaN
                ax.text(x, (s / c if c else 0) + 0.02, f"{int(s)}/{int(c)}", ha="center", fontsize=7, rotation=90)
    ax.set_xticks(range(len(settings)), ticks)
    ax.set(ylim=(0, 1.2), ylabel="fraction of runs unstable (diverged or collapsed)", title="Instability")
    for ax, split in zip(axes[1:], SPLITS):
        name = fnd.SPLIT_NAMES[split]
        for j, label in enumerate(labels):
            r = acc[acc["label"] == label].set_index("setting").reindex(settings)
            if f"{name} pass@1" not in r:
                continue
            ax.errorbar(offset(j), r[f"{name} pass@1"], yerr=[r[f"{name} pass@1"] - r[f"{name} low"],
                                                              r[f"{name} high"] - r[f"{name} pass@1"]],
                        fmt="o", color=palette[label], capsize=2, mec="k", mew=0.5, ms=6)
        if base is not None:
            ax.axhline(base[split], color="k", ls="--", lw=1, label="base model")
            ax.legend(loc="best", frameon=False, fontsize=8)
        ax.set_xticks(range(len(settings)), ticks)
        ax.set(ylabel="final pass@1 (mean over seeds, 95% CI)", title=f"{name} accuracy")
    axes[0].legend(loc="upper left", frameon=False, fontsize=7, ncol=2)
    fig.suptitle("Off-policy: stability and accuracy per setting (lag, PPO minibatches) and KL configuration", y=1.02)
    fig.tight_layout()
    text = []
    for setting in settings:
        g = out[out["setting"] == setting]
        nk, kl = g[g["label"] == fnd.NO_KL], g[g["label"].isin(fnd.OFFPOLICY_KL)]
        k1l = g[g["label"] == "k1 in loss"]
        text.append(f"{setting}: unstable runs, no KL {int(nk['unstable'].sum())}/{len(nk)}, with k1 in reward / "
                    f"k3 in loss / k3 in loss (token IS) {int(kl['unstable'].sum())}/{len(kl)}, k1 in loss "
                    f"{int(k1l['unstable'].sum())}/{len(k1l)}")
    figures.caption(fig, "; ".join(text) + ". A diverged run counts 0 in the accuracy panels.")
    return fig


def _tail_means(df: pd.DataFrame, cols: list[str], w: int) -> pd.DataFrame:
    """Per run: the mean of ``cols`` over its last ``w`` logged steps, with its label."""
    tail = df.sort_values("step").groupby("run").tail(w)
    return tail.groupby(["run", "label"])[cols].mean().reset_index()


def plot_training_grid(tables: RunTables, setting: str = fnd.ON_POLICY, smooth: int = 5,
                       kl_blowup_nats: float | None = None) -> plt.Figure:
    """Reward, sequence KL(π‖π_ref) and entropy (rows) against step, one column per β (the no-KL control in every
    column), one colour per configuration: thin lines seeds, thick their mean; dotted: the KL blow-up threshold."""
    raw = tables.metrics[tables.metrics["setting"] == setting].sort_values("step")
    df = raw.copy()
    betas = sorted(b for b in df["beta"].unique() if b > 0) or [0.0]
    labels = _ordered(df["label"])
    palette = figures.config_palette(labels)
    for c in TRAINING_GRID:
        df[c] = df.groupby("run")[c].transform(lambda s: s.rolling(smooth, min_periods=1).mean())
    width = max(7.5, 3.4 * len(betas) + 1.2)
    fig, axes = plt.subplots(len(TRAINING_GRID), len(betas), figsize=(width, 8.2), squeeze=False, sharex=True,
                             sharey="row")
    for j, beta in enumerate(betas):
        sub = df[(df["beta"] == beta) | (df["label"] == fnd.NO_KL)]
        for i, (col, name) in enumerate(TRAINING_GRID.items()):
            ax = axes[i, j]
            for label in _ordered(sub["label"]):
                runs = sub[sub["label"] == label]
                for _, r in runs.groupby("run"):
                    ax.plot(r["step"], r[col], color=palette[label], lw=0.6, alpha=0.3)
                m = runs.groupby("step")[col].mean()
                ax.plot(m.index, m.values, color=palette[label], lw=1.8)
            if col == "kl/analytic":
                ax.set_yscale("symlog", linthresh=1.0)
                if kl_blowup_nats is not None:
                    ax.axhline(kl_blowup_nats, color="k", ls=":", lw=1)
            ax.set_ylabel(name if j == 0 else "")
            ax.set_title(f"β = {beta:g}" if i == 0 else "")
            ax.set_xlabel("training step" if i == len(TRAINING_GRID) - 1 else "")
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    handles = [plt.Line2D([], [], color=palette[l], lw=2, label=l) for l in labels]
    if kl_blowup_nats is not None:
        handles.append(plt.Line2D([], [], color="k", ls=":", lw=1, label=f"KL blow-up threshold ({kl_blowup_nats:g} nats)"))
    ncol = max(1, min(len(handles), int(width // 2.3)))
    top = 1 - (0.05 + 0.03 * math.ceil(len(handles) / ncol)) * 8.2 / fig.get_figheight()
    fig.tight_layout(rect=(0, 0, 1, top))
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, top + 0.005 + 0.03 * math.ceil(len(handles) / ncol)),
               ncol=ncol, frameon=False)
    fig.suptitle("\n".join(textwrap.wrap(
        f"Training curves ({setting}), one column per β, no KL repeated in each; thin: seeds, thick: their mean "
        f"(rolling mean over {smooth} steps); KL axis linear below 1 nat, logarithmic above", int(width * 13))),
        y=1.0, va="bottom", fontsize=10)
    w = fnd.smoothing_window(int(raw["step"].max()) + 1)
    ends = _tail_means(raw, list(TRAINING_GRID), w).merge(raw[["run", "beta"]].drop_duplicates(), on="run")
    figures.caption(fig, f"Over the last {_steps(w)}, mean over runs: " + " ".join(
        _grid_caption(ends, beta, kl_blowup_nats) for beta in betas))
    return fig


def _grid_caption(ends: pd.DataFrame, beta: float, kl_blowup_nats: float | None) -> str:
    g = ends[(ends["beta"] == beta) | (ends["label"] == fnd.NO_KL)].groupby("label")[list(TRAINING_GRID)].mean()
    kl, reward = g["kl/analytic"], g["reward/mean"]
    if len(g) == 1:  # nothing to rank: say which configuration it is
        return f"β = {beta:g}: only {g.index[0]}, sequence KL {kl.iloc[0]:.1f} nats, reward {reward.iloc[0]:.2f}."
    above = "" if kl_blowup_nats is None else f"; {int((kl > kl_blowup_nats).sum())} configuration(s) above the threshold"
    return (f"β = {beta:g}: sequence KL {_extremes(kl, '{:.1f}')}; reward {_extremes(reward)}{above}.")


# ---------------------------------------------------------------------------------------------------------
# The study's analysis cut: the seeds complete for every planned cell (docs/preregistration.md §5)


def planned_runs(study: Study, smoke: bool = False) -> dict[int, list[str]]:
    """The run names the study's sweep file plans (its smoke design with ``smoke``), per seed."""
    out: dict[int, list[str]] = {}
    for cfg in expand_sweep(load_sweep_spec(study.sweep), smoke=smoke):
        out.setdefault(int(cfg.seed), []).append(cfg.run_name())
    return out


def smoke_paths(study: Study) -> tuple[str, str, str, str]:
    """``(runs_dir, sweep, model_dir, data_dir)`` of the study's smoke version, the arguments of
    ``kl_lib.rl.sweep.ensure_smoke_sweep``: its smoke runs directory, its sweep file, the smoke SFT model next to
    its base model (``<base_model>-smoke``) and the sweep's task data."""
    data_dir = load_sweep_spec(study.sweep)["base"]["data_dir"]
    return study.smoke_runs_dir, study.sweep, f"{study.base_model}-smoke", str(data_dir)


def greedy_table(results: pd.DataFrame, rng: np.random.Generator, n_boot: int = 4000) -> pd.DataFrame:
    """Per setting × configuration × β: greedy accuracy of the final models, ID and OOD, mean over runs with a
    95% bootstrap interval over runs (greedy decoding has one answer per problem, so runs are the only
    randomness; no interval with one run). Diverged runs (no model) are left out and counted."""
    rows = []
    for (setting, label, beta), g in results.groupby(["setting", "label", "beta"]):
        row = {"setting": setting, "configuration": label, "β": beta, "runs": len(g), "diverged": int(g["diverged"].sum())}
        for split in SPLITS:
            x = g[f"{split} greedy"].dropna().to_numpy(float)
            name = f"{fnd.SPLIT_NAMES[split]} greedy"
            if x.size == 0:
                row[name] = "–"
                continue
            lo, hi = stats.interval(x[rng.integers(0, x.size, (n_boot, x.size))].mean(1)) if x.size > 1 else (0, 0)
            row[name] = f"{x.mean():.3f} [{lo:.3f}, {hi:.3f}]" if x.size > 1 else f"{x.mean():.3f} (1 run)"
        rows.append(row)
    out = pd.DataFrame(rows)
    return fnd.sort_configs(out.rename(columns={"configuration": "label", "β": "beta"})).rename(
        columns={"label": "configuration", "beta": "β"})


def study_cut(tables: RunTables, study: Study, smoke: bool = False, mode: str = "cut") -> tuple[RunTables, str]:
    """:func:`analysis_cut` of ``study``'s runs: the runs it plans (its smoke design with ``smoke``), and for a
    reduced or unfinished full-size study the pointer to the complete study's committed runs (a smoke study's
    runs are not a reduced version of those)."""
    return analysis_cut(tables, planned_runs(study, smoke), mode, "" if smoke else study.reference_runs)


def analysis_cut(tables: RunTables, planned: dict[int, list[str]], mode: str = "cut",
                 reference_runs: str = "") -> tuple[RunTables, str]:
    """The tables the analysis reads and a sentence saying which runs those are.

    ``mode="cut"`` (the pre-registered rule): the finished runs of the seeds that are complete for every planned
    cell; when no seed is complete yet, the seeds complete in every cell that has runs, flagged as not the
    pre-registered analysis (and pointing to ``reference_runs``, the complete study's committed runs, if given).
    ``mode="all"``: every finished run. Runs outside the plan are left out under ``"cut"`` (and named).
    """
    if mode not in ("cut", "all"):
        raise ValueError(f"analysis mode {mode!r}: choose 'cut' (seeds complete for every cell) or 'all'")
    res = tables.results
    finished = set(res.loc[res["evaluated"] | res["diverged"], "run"])  # evaluated, or diverged (scored 0)
    in_plan = {r for runs in planned.values() for r in runs}
    counts = ", ".join(f"seed {s}: {sum(r in finished for r in runs)}/{len(runs)}" for s, runs in sorted(planned.items()))
    complete = [s for s, runs in sorted(planned.items()) if all(r in finished for r in runs)]
    if mode == "all" or not finished & in_plan:
        why = "" if finished & in_plan else " (none of them is a run the study's sweep file plans)"
        return tables, f"all {len(finished)} finished runs are analysed{why}; planned runs finished per seed: {counts}."
    if not complete:
        present = tables.results[tables.results["run"].isin(in_plan)]
        seeds = complete_seeds(present)
        cells = present.groupby(["setting", "label", "beta"]).ngroups
        return restrict_to_runs(tables, present.loc[present["seed"].isin(seeds), "run"]), (
            f"NOT THE PRE-REGISTERED ANALYSIS: no seed is complete for every planned cell (finished/planned per seed: "
            f"{counts}); shown: seed(s) {seeds}, complete for the {cells} cell(s) that have runs (a reduced or "
            "unfinished study, docs/preregistration.md §5)." + (
                f" The complete study's runs are committed in {reference_runs} (analyse them with -p runs_dir "
                f"{reference_runs}; the report: python -m kl_lib.study.site --runs {reference_runs})."
                if reference_runs else ""))
    keep = {r for s in complete for r in planned[s]}
    outside = len(finished - keep)
    return restrict_to_runs(tables, keep), (
        f"the analysis cut: seeds {complete} are complete for every planned cell ({counts}); their {len(keep)} runs "
        f"are analysed" + (f", {outside} finished run(s) of incomplete seeds or outside the plan are left out." if
                           outside else "."))


# ---------------------------------------------------------------------------------------------------------
# What the exact analysis predicts, compared on the runs (descriptive; not tested as findings)


PREDICTIONS = (
    ("k1 in loss regularises nothing on-policy (expected gradient 0): its final KL tracks the no-KL control's",
     "final_kl", "k1 in loss", fnd.NO_KL, "≈ 0"),
    ("control: k1 in reward (unbiased) does hold the KL below the no-KL control's",
     "final_kl", "k1 in reward", fnd.NO_KL, "< 0"),
    ("k3 in reward is biased (its expected gradient is not ∇KL): it holds KL(π‖π_ref) less than k1 in reward",
     "final_kl", "k3 in reward", "k1 in reward", "> 0"),
    ("k3 in loss follows the forward-KL direction: lower myopic forward KL than k1 in reward",
     "final_forward_kl", "k3 in loss", "k1 in reward", "< 0"),
)
"""(prediction, outcome column, configuration a, configuration b, expected sign of a − b at the same β)."""


def _cell_replicates(outcomes: pd.DataFrame, col: str, rng: np.random.Generator,
                     n_boot: int) -> dict[tuple[str, float], np.ndarray]:
    """Bootstrap replicates of each (label, β) cell's mean of ``col`` (runs resampled within the cell)."""
    reps = {}
    for (label, beta), g in outcomes.groupby(["label", "beta"]):
        x = g[col].to_numpy(float)
        reps[(label, float(beta))] = x[rng.integers(0, x.size, (n_boot, x.size))].mean(1)
    return reps


def _prediction_status(expected: str, low: float, high: float, n_min: int, control: str | None) -> str:
    if n_min < 2:
        return "not distinguishable: fewer than 2 runs in a cell"
    if expected == "≈ 0":
        if low > 0 or high < 0:
            return "contradicted: the interval excludes 0"
        if control is not None and control.startswith("shown"):
            return "shown: interval contains 0 while the control's excludes it"
        return "not distinguishable: the control does not separate either"
    sign = 1 if expected == "> 0" else -1
    if (low > 0 if sign > 0 else high < 0):
        return "shown: the interval excludes 0 in the predicted direction"
    if (high < 0 if sign > 0 else low > 0):
        return "contradicted: the interval excludes 0 in the other direction"
    return "not distinguishable: the interval contains 0"


def prediction_checks(outcomes: pd.DataFrame, setting: str = fnd.ON_POLICY, seed: int = 0,
                      n_boot: int = 4000) -> pd.DataFrame:
    """Each ``PREDICTIONS`` row per β and over all β: difference a − b of the cells' mean outcome (W-step mean at
    the end), a 95% bootstrap interval (runs resampled within each cell; the no-KL cell is shared by every β and
    resampled once), and a status: "shown", "contradicted" or "not distinguishable" (fewer than 2 runs in a cell,
    or an interval containing 0). "≈ 0" is shown only when its control row (k1 in reward vs no KL) separates.
    Over all β: the equal-weight mean of the per-β differences. Descriptive: no α, not one of the findings."""
    out = outcomes[outcomes["setting"] == setting]
    betas = sorted(b for b in out["beta"].unique() if b > 0)
    rows = []
    for prediction, col, a, b, expected in PREDICTIONS:
        rng = np.random.default_rng(seed)
        reps = _cell_replicates(out, col, rng, n_boot)
        n = out.groupby(["label", "beta"]).size()
        cell = lambda label, beta: (label, 0.0 if label == fnd.NO_KL else float(beta))
        usable = [beta for beta in betas if cell(a, beta) in reps and cell(b, beta) in reps]
        for stratum in [*usable, "all β"] if usable else []:
            bs = usable if stratum == "all β" else [stratum]
            d_reps = np.mean([reps[cell(a, x)] - reps[cell(b, x)] for x in bs], axis=0)
            mean = lambda label: float(np.mean([out.loc[(out["label"] == label) & (out["beta"] == cell(label, x)[1]),
                                                        col].mean() for x in bs]))
            low, high = stats.interval(d_reps)
            rows.append({"prediction": prediction, "β": stratum, "quantity": col, "a": a, "b": b,
                         "mean a": mean(a), "mean b": mean(b), "difference a − b": mean(a) - mean(b), "low": low,
                         "high": high, "expected": expected,
                         "runs a, b": f"{int(sum(n[cell(a, x)] for x in bs))}, {int(n[cell(b, bs[0])])}",
                         "n_min": int(min(min(n[cell(a, x)], n[cell(b, x)]) for x in bs))})
    df = pd.DataFrame(rows, columns=["prediction", "β", "quantity", "a", "b", "mean a", "mean b", "difference a − b",
                                     "low", "high", "expected", "runs a, b", "n_min"])
    df["status"] = pd.Series([_prediction_status(r["expected"], r["low"], r["high"], r["n_min"], None)
                              for _, r in df.iterrows()], index=df.index, dtype=object)
    ctrl = df[df["prediction"] == PREDICTIONS[1][0]]
    control = dict(zip(ctrl["β"], ctrl["status"]))
    zero = df["expected"] == "≈ 0"
    df.loc[zero, "status"] = [_prediction_status("≈ 0", r["low"], r["high"], r["n_min"], control.get(r["β"]))
                              for _, r in df[zero].iterrows()]
    return df.drop(columns="n_min")


# ---------------------------------------------------------------------------------------------------------
# Off-policy: staleness and clipping per run


def offpolicy_runs(tables: RunTables, outcomes: pd.DataFrame) -> pd.DataFrame:
    """One row per lagged PPO run: its F3 stratum (``findings.offpolicy_stratum``), ``staleness`` = KL(μ‖π) per
    token ≈ −mean over the run's steps of ``offpolicy/log_ratio_mean`` (log π − log μ on tokens drawn from μ),
    ``clip_fraction`` = mean of ``ppo/clip_fraction`` (share of tokens whose ratio PPO clipped), and the outcome
    columns of :func:`kl_lib.study.findings.run_outcomes`."""
    m = tables.metrics[(tables.metrics["policy_loss"] == "ppo") & (tables.metrics["async_lag"] > 0)]
    cols = {"offpolicy/log_ratio_mean": "log_ratio", "ppo/clip_fraction": "clip_fraction"}
    m = m.reindex(columns=["run", *cols]).rename(columns=cols)
    per_run = m.groupby("run")[["log_ratio", "clip_fraction"]].mean()
    per_run["staleness"] = -per_run.pop("log_ratio")
    keep = ["run", "setting", "label", "beta", "seed", "async_lag", "ppo_minibatches", "diverged", "collapsed",
            "unstable", "final_reward", "peak_reward", "offpolicy_stratum"]
    out = outcomes.loc[outcomes["run"].isin(per_run.index), keep].merge(per_run.reset_index(), on="run")
    out.insert(1, "stratum", out.pop("offpolicy_stratum").astype(str))
    return fnd.sort_configs(out)


def plot_staleness(off: pd.DataFrame) -> plt.Figure:
    """Per lagged run (:func:`offpolicy_runs`): staleness KL(μ‖π) per token and the PPO clip fraction, per
    configuration (x) and setting (marker)."""
    settings = sorted(off["setting"].unique(), key=fnd.setting_key)
    labels = _ordered(off["label"])
    palette = figures.config_palette(labels)
    markers = dict(zip(settings, "oD^sv"))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.4))
    width = 0.5 / max(1, len(settings))
    for ax, col, name in zip(axes, ["staleness", "clip_fraction"],
                             ["staleness KL(μ‖π) per token (nats)\n= −mean of offpolicy/log_ratio_mean", "PPO clip fraction (share of tokens)"]):
        for i, label in enumerate(labels):
            for j, setting in enumerate(settings):
                y = off.loc[(off["label"] == label) & (off["setting"] == setting), col]
                x = np.full(len(y), i + (j - (len(settings) - 1) / 2) * width)
                ax.scatter(x, y, marker=markers[setting], color=palette[label], edgecolor="k", lw=0.4, s=40)
        ax.set_xticks(range(len(labels)), labels, rotation=25, ha="right", rotation_mode="anchor")
        ax.set_ylabel(name)
    handles = [plt.Line2D([], [], marker=markers[s], ls="", color="0.6", mec="k", label=s) for s in settings]
    axes[1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    fig.suptitle("How stale the lagged rollouts are: one point per run (mean over its steps)", y=1.02)
    fig.tight_layout()
    med = off.groupby("setting")[["staleness", "clip_fraction"]].median().reindex(settings)
    figures.caption(fig, "Median over runs: " + "; ".join(
        f"{s}: KL(μ‖π) {r['staleness']:.3g} nats/token, clip fraction {100 * r['clip_fraction']:.2g}%"
        for s, r in med.iterrows()) + ". The pre-registered lag rule asked for ≥ 0.05 nats/token or ≥ 5% clipped "
        "tokens on the no-KL pilot (docs/preregistration.md §6).")
    return fig


# ---------------------------------------------------------------------------------------------------------
# The short-answer study as a contrast


def finding_numbers(fid: str, numbers: dict[str, Any]) -> str:
    """The headline numbers of a finding (``Finding.numbers``) in one line."""
    g = lambda k: numbers.get(k, math.nan)
    if fid == "F1":
        return (f"unstable incl. KL blow-up: biased {g('biased_unstable')}/{g('biased_runs')} vs other KL "
                f"{g('other_unstable')}/{g('other_runs')} (p = {g('p_two_sided'):.3g})")
    if fid == "F2":
        return "; ".join(f"{s} Δ = {g(f'{s}_difference'):+.3f} [{g(f'{s}_low'):+.3f}, {g(f'{s}_high'):+.3f}] "
                         f"(p = {g(f'{s}_p_value'):.3g})" for s in ("ID", "OOD"))
    if fid == "F3":
        return (f"unstable: no KL {g('no_kl_unstable')}/{g('no_kl_runs')} vs with KL {g('kl_unstable')}/{g('kl_runs')}"
                f" (p = {g('p_two_sided'):.3g})")
    return ""


def study_contrast(found: list[fnd.Finding], outcomes: pd.DataFrame,
                   reference_dir: str | Path = "runs/reference/rl") -> pd.DataFrame | None:
    """Per finding: the short-answer study's committed verdict and numbers (``reference_dir/findings.json``) next
    to this study's, plus a row of the on-policy final sequence KL of each (``results.csv``). None when the
    reference files are missing."""
    ref = Path(reference_dir)
    if not (ref / "findings.json").is_file():
        return None
    short = {f["id"]: f for f in json.loads((ref / "findings.json").read_text())}
    rows = [{"finding": f.id, "short-answer study (committed reference)":
             f"{short[f.id]['verdict']}: {finding_numbers(f.id, short[f.id]['numbers'])}" if f.id in short else "—",
             "this study": f"{f.verdict}: {finding_numbers(f.id, f.numbers)}"} for f in found]

    def kl_line(df: pd.DataFrame) -> str:
        kl = df.loc[df["setting"] == fnd.ON_POLICY, "final_kl"].astype(float)
        return f"max {kl.max():.3g}, median {kl.median():.3g} nats over {len(kl)} runs" if len(kl) else "no runs"

    short_kl = kl_line(pd.read_csv(ref / "results.csv")) if (ref / "results.csv").is_file() else "—"
    rows.append({"finding": "on-policy final KL(π‖π_ref) per sequence", "short-answer study (committed reference)":
                 short_kl, "this study": kl_line(outcomes)})
    return pd.DataFrame(rows)


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
    study: Study
    cut_note: str
    predictions: pd.DataFrame
    contrast: pd.DataFrame | None


def _analyse(runs_dir: Path, seed: int, n_boot: int, contrast_dir: Path | None = None) -> _Analysis:
    """The study's analysis of ``runs_dir``: its analysis cut, outcomes with its blow-up threshold, findings,
    the exact analysis's predictions, and the contrast with ``contrast_dir``'s committed findings."""
    study = study_of_runs(runs_dir)
    smoke = bool(_provenance(runs_dir)["smoke"])
    tables, cut_note = study_cut(load_tables(runs_dir), study, smoke)
    outcomes = fnd.run_outcomes(tables, kl_blowup_nats=study.kl_blowup_nats)
    rng = np.random.default_rng(seed)
    accuracy = fnd.accuracy_table(tables, rng, n_boot=n_boot)
    found = fnd.all_findings(tables, seed=seed, n_boot=n_boot, outcomes=outcomes, kl_blowup_nats=study.kl_blowup_nats)
    comparison = fnd.paper_comparison(tables, accuracy, outcomes, found)
    base = {s: tables.base_accuracy(s) for s in SPLITS}
    predictions = prediction_checks(outcomes, seed=seed, n_boot=n_boot)
    contrast = study_contrast(found, outcomes, contrast_dir) if contrast_dir is not None else None
    return _Analysis(tables, outcomes, accuracy, found, comparison, base, study, cut_note, predictions, contrast)


def _write_tables(out_dir: Path, a: _Analysis) -> None:
    """results.csv, accuracy.csv, instability.csv, paper_comparison.csv and findings.json."""
    results = a.tables.results.merge(
        a.outcomes[["run", "collapsed", "kl_blowup", "unstable", "final_reward"]], on="run", how="left")
    cols = ["setting", "label", "beta", "seed", "async_lag", "ppo_minibatches", "run", "status", "diverged", "reward_collapse",
            "collapsed", "kl_blowup", "unstable", "id_test pass@1", "id_test greedy", "ood_test pass@1",
            "ood_test greedy", "final_kl", "final_entropy", "final_reward"]
    write_text(out_dir / "results.csv", fnd.sort_configs(results)[cols].to_csv(index=False))
    write_text(out_dir / "accuracy.csv", a.accuracy.to_csv(index=False))
    write_text(out_dir / "instability.csv", fnd.instability_table(a.outcomes).to_csv(index=False))
    write_text(out_dir / "paper_comparison.csv", a.comparison.to_csv(index=False))
    write_json(out_dir / "findings.json", [f.to_dict() for f in a.found])
    write_text(out_dir / "predictions.csv", a.predictions.to_csv(index=False))
    if a.contrast is not None:
        write_text(out_dir / "contrast.csv", a.contrast.to_csv(index=False))


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
        save(plot_training_grid(tables, kl_blowup_nats=a.study.kl_blowup_nats), "fig_training",
             "Training curves per β (on-policy)")
        save(plot_entropy_vs_forward_kl(tables, outcomes=a.outcomes), "fig_entropy_forward_kl",
             "Entropy against the myopic forward KL")
        save(plot_checkpoints(tables), "fig_checkpoints", "Mid-training checkpoints vs final")
    if (tables.results["policy_loss"] == "ppo").any():
        save(plot_offpolicy_curves(tables), "fig_offpolicy_curves", "Off-policy reward curves per setting")
        off = offpolicy_runs(tables, a.outcomes)
        if len(off):
            save(plot_staleness(off), "fig_staleness", "Staleness and PPO clipping of the lagged runs")
        save(plot_offpolicy_summary(a.accuracy, a.outcomes, a.base), "fig_offpolicy",
             "Off-policy stability and accuracy")
    return saved


def _header_html(a: _Analysis, runs_dir: Path, notebooks_dir: Path, out_dir: Path, seed: int, n_boot: int) -> str:
    prov = _provenance(runs_dir)
    parts = [f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>KL estimators: report</title>"
             f"<style>{_STYLE}</style></head><body>",
             "<header><h1>A Comedy of Estimators: small-scale reproduction report</h1>",
             f"<p><b>{html.escape(a.study.title[:1].upper() + a.study.title[1:])}</b> (<code>{html.escape(a.study.sweep)}"
             f"</code>; KL blow-up threshold {a.study.kl_blowup_nats:g} nats per sequence). Runs analysed: "
             f"{html.escape(a.cut_note)}</p>",
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
             "α = 0.05 and compares runs only within one β or lag; rates by an exact test, accuracy differences by a "
             f"permutation test over seeds (exact up to {stats.MAX_ENUMERATION:,} arrangements, else "
             f"{stats.N_PERMUTATIONS:,} random ones) with a "
             "bootstrap interval; secondary rows are Holm-adjusted; a row "
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
    parts = ["<h2>The paper's outcomes next to ours (different scales)</h2>" + _table_html(a.comparison)]
    if len(a.predictions):
        parts.append("<h2>What the exact analysis predicts, on the runs</h2><p>Descriptive (not a finding): final "
                     "values (mean over the last W steps), a − b at the same β with a 95% bootstrap interval over "
                     "runs; “not distinguishable” when a cell has fewer than 2 runs or the interval contains 0.</p>"
                     + _table_html(a.predictions))
    if a.contrast is not None:
        parts.append("<h2>Contrast: the short-answer study</h2><p>The earlier study (one-step arithmetic, answers "
                     "of 4–6 tokens, <code>configs/sweep.yaml</code>), from its committed reference results "
                     "(<code>runs/reference/rl</code>), next to this study.</p>" + _table_html(a.contrast))
    parts.append("<h2>Figures</h2>")
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
                                                    "paper_comparison.csv", "findings.json", "predictions.csv",
                                                    *(["contrast.csv"] if a.contrast is not None else []))) + "</ul>")
    parts.append(_SCRIPT + "</body></html>\n")
    return "\n".join(parts)


def build_report(runs_dir: str | Path, notebooks_dir: str | Path, out_dir: str | Path = "runs/report",
                 seed: int = 0, n_boot: int = 4000, contrast: str | Path | None = "runs/reference/rl") -> Path:
    """Write the report (module docstring) into ``out_dir``; returns the path of ``index.html``. ``contrast``:
    the short-answer study's committed results, shown as a contrast when present (not for the short study)."""
    runs_dir, notebooks_dir, out_dir = Path(runs_dir), Path(notebooks_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures.setup()
    contrast_dir = Path(contrast) if contrast is not None and study_of_runs(runs_dir).name != "short" else None
    analysis = _analyse(runs_dir, seed, n_boot, contrast_dir)
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
        epilog="example: python -m kl_lib.study.site --runs runs/study --notebooks runs/notebooks --out runs/report "
               "(make report)")
    parser.add_argument("--runs", default=get_study("long").runs_dir, metavar="DIR",
                        help=f"the study's runs directory (default {get_study('long').runs_dir}, the long-answer study)")
    parser.add_argument("--contrast", default="runs/reference/rl", metavar="DIR",
                        help="the short-answer study's committed results, shown as a contrast (default "
                             "runs/reference/rl; skipped when missing)")
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
        index = build_report(args.runs, args.notebooks, args.out, seed=args.seed, n_boot=args.n_boot,
                             contrast=args.contrast)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
