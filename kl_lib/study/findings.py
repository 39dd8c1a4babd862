"""The paper's three findings as hypotheses, tested on the sweep's run tables with rules fixed in advance.

Input: a :class:`kl_lib.study.tables.RunTables` (``load_tables(runs_dir)``). Output: per-run outcomes, the
accuracy table per configuration × β, the instability table, and one :class:`Finding` per hypothesis with
its test, numbers and verdict (``kl_lib.study.stats.VERDICTS``). Notebook 04 shows them, notebook 05 F3, and the
report (``kl_lib.study.site``) lists them. ``docs/statistics.md`` is the statistical plan these functions carry
out (α, strata, Holm, exact tests, thresholds and their rationale, power).

Definitions (fixed before looking at any sweep result)
-------------------------------------------------------

Accuracy. pass@1 of a final model on a problem = correct samples / samples (temperature 1). A cell is the runs
of one setting × configuration × β (× lag) that differ only in their seed. A cell's accuracy is the mean over its
seeds and the split's problems, with a 95% interval from ``stats.hierarchical_bootstrap`` (seeds resampled within
the cell, then problems, one problem draw shared by every cell). A diverged run has no model and is scored 0 on
every problem (``kl_lib.study.tables``).

Smoothing window. ``W = max(2, steps // 10)`` steps (10 for the 100-step sweep), a trailing rolling mean.

Per-run outcomes (``run_outcomes``), thresholds fixed in advance:

* **diverged**: the trainer stopped the run (non-finite or |loss| > ``divergence_loss``, see ``kl_lib.rl.train``);
* **collapsed**: the W-step mean reward at the end is below ``COLLAPSE_FRACTION`` = ½ of the run's peak W-step
  mean, provided that peak is at least ``COLLAPSE_FLOOR`` = 0.05 (a run that never earned reward cannot
  "collapse" by noise); ``collapse_step`` is the first step of the final stretch below ½ peak;
* **KL blow-up**: ``kl/analytic`` is non-finite at some step, or its mean over the last W steps exceeds the
  study's threshold in nats per sequence (any run, no-KL runs included; rationale in ``docs/statistics.md`` §7):
  ``KL_BLOWUP_NATS`` = 5 for the short-answer study, 41 for the long-answer one (``kl_lib.study.studies``, passed
  as ``run_outcomes(..., kl_blowup_nats=...)``);
* **unstable** = diverged or collapsed; **unstable (incl. KL blow-up)** adds the blow-up.

Hypotheses, strata and tests (on-policy = REINFORCE with RLOO and no lag; lagged = PPO with ``async_lag > 0``).
Every test is two-sided at ``stats.ALPHA`` = 0.05; each finding has one primary comparison (F2: one per split,
both required), and its secondary rows are Holm-adjusted. Runs are never pooled across β or lag: comparisons are
made within a stratum and combined over strata with fixed equal weights.

* **F1** biased configurations (k3 in reward, k1 in loss) train unstably: on-policy, "unstable (incl. KL
  blow-up)" in the biased configurations vs the other KL configurations (k1 in reward, k3 in loss, k3 in
  reward+loss; no-KL runs are the control, in neither group). Primary: the exact conditional rate test
  stratified by β (``stats.stratified_rate_test``). Secondary: each biased configuration; each β.
* **F2** unbiased configurations (k1 in reward, k3 in reward+loss) beat k3 in loss, ID and OOD: on-policy, per β
  Δ_β = (mean of the two unbiased cells) − k3 in loss cell; Δ = mean of Δ_β. Primary (ID and OOD): exact
  permutation test over seeds within β (``stats.permutation_test``); supported if both splits are significant
  and positive, "not supported" if either is significant and negative. Interval: fixed-weight combination of
  the cells' hierarchical-bootstrap replicates. Secondary: each unbiased configuration (all β); each β.
* **F3** KL stabilises off-policy training: lagged runs with KL (k1 in reward, k3 in loss, k3 in loss with
  token IS) vs without (no KL). Primary: the exact rate test, no KL more often unstable (diverged or collapsed),
  stratified by lag. Secondary: the rate per lag; the differences (KL − no KL) in final reward (W-step mean at the
  end, 0 for a diverged run) and in ID and OOD pass@1, stratified by lag and per lag, each with a permutation test.

Verdicts (``stats.direction_verdict``): "supported" when p < α and the estimate has the claimed sign, "not
supported" when p < α with the other sign, "inconclusive at this scale" otherwise. A row whose smallest
attainable p-value (fixed by its run counts) is ≥ α is "not testable at this scale"; a finding whose primary
row is not testable gets "inconclusive at this scale" with ``numbers["testable"] = False`` and a note saying why.
Nothing in the analysis is chosen after seeing results; the verdict is what the rule gives.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import pandas as pd

from kl_lib.study import stats
from kl_lib.study.tables import SPLITS, RunTables

__all__ = [
    "COLLAPSE_FRACTION", "COLLAPSE_FLOOR", "KL_BLOWUP_NATS", "offpolicy_stratum", "BIASED", "UNBIASED", "K3_LOSS",
    "OFFPOLICY_KL", "NO_KL", "ON_POLICY", "LABEL_ORDER", "SPLIT_NAMES", "label_key", "setting_key", "sort_configs",
    "smoothing_window", "run_outcomes", "instability_table", "accuracy_table", "format_accuracy",
    "group_replicates", "rate_comparison", "stratified_rate_comparison", "bootstrap_difference", "Finding", "finding_f1", "finding_f2",
    "finding_f3", "all_findings", "PAPER_SETUP", "paper_comparison", "findings_table",
]

COLLAPSE_FRACTION = 0.5
COLLAPSE_FLOOR = 0.05
KL_BLOWUP_NATS = 5.0
"""The short-answer study's threshold (the default; the long study's, 41 nats, is in ``kl_lib.study.studies``).
Fixed in advance (``docs/statistics.md``): a policy that puts its mass on answers y pays KL = −log π_ref(y), so
KL > 5 nats means answers the reference model gives < e⁻⁵ ≈ 0.7% probability: ≈ 3× the base model's sequence
entropy (≈ 0.34 nats/token × ≈ 4.6 answer tokens ≈ 1.6 nats) and ≈ 1 nat per answer token."""

ON_POLICY = "on-policy"
NO_KL = "no KL"
BIASED = ("k3 in reward", "k1 in loss")
UNBIASED = ("k1 in reward", "k3 in reward+loss")
K3_LOSS = "k3 in loss"
OFFPOLICY_KL = ("k1 in reward", "k3 in loss", "k3 in loss (token IS)")
LABEL_ORDER = ("k1 in reward", "k3 in reward+loss", "k3 in loss", "k3 in loss (token IS)", "k1 in loss",
               "k3 in reward", "no KL")
SPLIT_NAMES = {"id_test": "ID", "ood_test": "OOD"}


def smoothing_window(steps: int) -> int:
    """W = max(2, steps // 10): the rolling-mean window of the outcome definitions (module docstring)."""
    return max(2, int(steps) // 10)


def label_key(label: str) -> int:
    """Sort key of a configuration label: its place in ``LABEL_ORDER`` (unknown labels last)."""
    return LABEL_ORDER.index(label) if label in LABEL_ORDER else len(LABEL_ORDER)


def setting_key(setting: str) -> tuple[int, int, int]:
    """Sort key of a setting: on-policy first, then ``"... lag k[, m minibatches]"`` settings by lag and
    minibatches, anything else last."""
    if setting == ON_POLICY:
        return (0, 0, 0)
    match = re.search(r"lag (\d+)(?:, (\d+) minibatches)?$", setting)
    return (1, int(match[1]), int(match[2] or 1)) if match else (2, 0, 0)


def offpolicy_stratum(async_lag: int, ppo_minibatches: int = 1) -> int | str:
    """F3's stratum of a lagged run: its lag, or ``"<lag>, <m> minibatches"`` with m > 1 PPO updates per batch."""
    return int(async_lag) if ppo_minibatches == 1 else f"{int(async_lag)}, {int(ppo_minibatches)} minibatches"


def _strata(df: pd.DataFrame) -> list[int | str]:
    """The off-policy strata present in ``df`` (a :func:`run_outcomes` frame), ordered by lag, then minibatches."""
    return list(dict.fromkeys(df.sort_values(["async_lag", "ppo_minibatches"])["offpolicy_stratum"]))


def sort_configs(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in the order setting, configuration (``LABEL_ORDER``), β, seed (where those columns exist)."""
    keys = {"setting": setting_key, "label": label_key}
    cols = [c for c in ("setting", "label", "beta", "seed") if c in df.columns]
    return df.sort_values(cols, key=lambda s: s.map(keys[s.name]) if s.name in keys else s, ignore_index=True)


# ---------------------------------------------------------------------------------------------------------
# Per-run outcomes and the instability table


def run_outcomes(tables: RunTables, kl_blowup_nats: float = KL_BLOWUP_NATS) -> pd.DataFrame:
    """One row per run: the module docstring's outcomes and W-step means at the end of training.

    Columns: configuration columns, ``window``, ``diverged``, ``collapsed``, ``collapse_step``, ``peak_reward``,
    ``final_reward`` (0 for a diverged run), ``final_kl``, ``final_forward_kl``, ``final_entropy`` (W-step
    means of ``kl/analytic``, ``kl/forward_myopic``, ``policy/entropy``), ``kl_nonfinite``, ``kl_blowup``,
    ``unstable``, ``unstable_incl_blowup``.
    """
    res = tables.results.set_index("run")
    by_run = dict(list(tables.metrics.sort_values("step").groupby("run", sort=False)))
    empty = pd.DataFrame(columns=["step", "reward/mean", "kl/analytic", "kl/forward_myopic", "policy/entropy"],
                         dtype=float)
    rows = []
    for run, r in res.iterrows():
        m = by_run.get(run, empty)  # a run that diverged in its first rollout logged no step
        w = smoothing_window(r["steps"])
        reward = m["reward/mean"].rolling(w, min_periods=w).mean()
        peak = float(reward.max()) if reward.notna().any() else float("nan")
        tail = m.tail(w)
        final = float(tail["reward/mean"].mean())
        collapsed = bool(len(m) >= w and peak >= COLLAPSE_FLOOR and final < COLLAPSE_FRACTION * peak)
        above = np.flatnonzero((reward >= COLLAPSE_FRACTION * peak).to_numpy())
        kl = m["kl/analytic"].astype(float)
        minibatches = int(r.get("ppo_minibatches", 1))
        rows.append({
            "run": run, **{c: r[c] for c in ("setting", "label", "beta", "seed", "async_lag", "policy_loss", "steps")},
            "ppo_minibatches": minibatches, "offpolicy_stratum": offpolicy_stratum(r["async_lag"], minibatches),
            "status": r["status"], "steps_completed": len(m), "window": w, "diverged": bool(r["diverged"]),
            "collapsed": collapsed,
            "collapse_step": int(m["step"].iloc[above[-1] + 1]) if collapsed else None,
            "peak_reward": peak, "final_reward": 0.0 if r["diverged"] else final,
            "final_kl": float(tail["kl/analytic"].mean()),
            "final_forward_kl": float(tail["kl/forward_myopic"].mean()),
            "final_entropy": float(tail["policy/entropy"].mean()),
            "kl_nonfinite": bool((~np.isfinite(kl)).any()),
        })
    out = pd.DataFrame(rows)
    out["kl_blowup"] = out["kl_nonfinite"] | (out["final_kl"] > kl_blowup_nats)
    out["unstable"] = out["diverged"] | out["collapsed"]
    out["unstable_incl_blowup"] = out["unstable"] | out["kl_blowup"]
    out = sort_configs(out)
    out.attrs["kl_blowup_nats"] = kl_blowup_nats  # read by finding_f1's description
    return out


def instability_table(outcomes: pd.DataFrame) -> pd.DataFrame:
    """The runs with any instability, and which: diverged, collapsed (step), KL blow-up."""
    cols = ["setting", "label", "beta", "seed", "run", "status", "steps_completed", "diverged", "collapsed",
            "collapse_step", "peak_reward", "final_reward", "kl_blowup", "final_kl"]
    return outcomes.loc[outcomes["unstable_incl_blowup"], cols].reset_index(drop=True)


# ---------------------------------------------------------------------------------------------------------
# Bootstrap helpers


def _matrix(tables: RunTables, split: str, runs: Iterable[str]) -> np.ndarray | None:
    rows = [tables.scores[split][r] for r in runs if r in tables.scores[split]]
    return np.stack(rows) if rows else None  # (num_runs, num_problems)


def group_replicates(tables: RunTables, split: str, groups: dict[str, list[str]], rng: np.random.Generator,
                     n_boot: int, base: bool = True) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """``(estimates, replicates)`` of each group's mean pass@1 (groups: name → run names) and, with
    ``base``, of the base model as group ``"base"``; one shared problem draw per replicate (paired).
    Groups without scored runs are left out."""
    scores = {name: m for name, runs in groups.items() if (m := _matrix(tables, split, runs)) is not None}
    if base:
        scores["base"] = tables.base_scores[split][None, :]  # (1, P): one model, problems resampled only
    if not scores:
        return {}, {}
    reps = stats.hierarchical_bootstrap(scores, rng, n_boot=n_boot)
    return {name: float(m.mean()) for name, m in scores.items()}, reps


def bootstrap_difference(a: np.ndarray, b: np.ndarray, rng: np.random.Generator,
                         n_boot: int = 10_000) -> tuple[float, float, float]:
    """``(mean(a) − mean(b), low, high)``: 95% percentile interval, each group resampled independently."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size == 0 or b.size == 0:
        return math.nan, math.nan, math.nan
    reps = a[rng.integers(0, a.size, (n_boot, a.size))].mean(1) - b[rng.integers(0, b.size, (n_boot, b.size))].mean(1)
    low, high = stats.interval(reps)
    return float(a.mean() - b.mean()), low, high


def _interval_verdict(low: float, high: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return stats.VERDICTS[2]
    return stats.verdict(low=low, high=high)


def stratified_rate_comparison(strata: list[tuple[int, int, int, int]]) -> dict[str, Any]:
    """Claim: group a's event rate exceeds group b's; ``strata`` = ``(events_a, n_a, events_b, n_b)`` per stratum.

    The exact stratified test (``stats.stratified_rate_test``; strata with an empty group carry no information
    and are dropped) with its row verdict (``stats.direction_verdict``) and ``difference``, the equal-weight
    average over strata of rate_a − rate_b.
    """
    strata = [s for s in strata if s[1] > 0 and s[3] > 0]
    if not strata:
        return {"difference": math.nan, "p_greater": math.nan, "p_less": math.nan, "p_value": math.nan,
                "min_p": math.nan, "verdict": stats.NOT_TESTABLE}
    test = stats.stratified_rate_test(strata)
    diff = float(np.mean([ea / na - eb / nb for ea, na, eb, nb in strata]))
    direction = 1.0 if test["p_greater"] <= test["p_less"] else -1.0
    return {"difference": diff, **test, "verdict": stats.direction_verdict(direction, test["p_value"], test["min_p"])}


def rate_comparison(events_a: int, n_a: int, events_b: int, n_b: int) -> dict[str, Any]:
    """:func:`stratified_rate_comparison` with one stratum (Fisher's exact test)."""
    return stratified_rate_comparison([(events_a, n_a, events_b, n_b)])


# ---------------------------------------------------------------------------------------------------------
# The accuracy table


def accuracy_table(tables: RunTables, rng: np.random.Generator, n_boot: int = 4000) -> pd.DataFrame:
    """Per setting × configuration × β: runs, diverged runs, and for ID and OOD the mean pass@1 over seeds
    with its 95% CI and the difference to the base model with its CI (hierarchical bootstrap)."""
    res = tables.results
    keys = {f"{s}|{l}|{b}": (s, l, b) for (s, l, b), _ in res.groupby(["setting", "label", "beta"])}
    groups = {k: list(res[(res["setting"] == s) & (res["label"] == l) & (res["beta"] == b)]["run"])
              for k, (s, l, b) in keys.items()}
    rows = {k: {"setting": s, "label": l, "beta": b, "n_runs": len(groups[k]),
                "n_diverged": int(res[res["run"].isin(groups[k])]["diverged"].sum())} for k, (s, l, b) in keys.items()}
    for split in SPLITS:
        name = SPLIT_NAMES[split]
        est, reps = group_replicates(tables, split, groups, rng, n_boot)
        for k in keys:
            if k not in reps:
                continue
            lo, hi = stats.interval(reps[k])
            dlo, dhi = stats.interval(reps[k] - reps["base"])
            rows[k].update({f"{name} pass@1": est[k], f"{name} low": lo, f"{name} high": hi,
                            f"{name} Δbase": est[k] - est["base"], f"{name} Δbase low": dlo,
                            f"{name} Δbase high": dhi})
    return sort_configs(pd.DataFrame(list(rows.values())))


def format_accuracy(accuracy: pd.DataFrame) -> pd.DataFrame:
    """``accuracy_table`` for reading: "estimate [low, high]" strings per split, for pass@1 and for − base."""
    rows = []
    for _, r in accuracy.iterrows():
        row = {"setting": r["setting"], "configuration": r["label"], "β": r["beta"], "runs": r["n_runs"],
               "diverged": r["n_diverged"]}
        for s in SPLIT_NAMES.values():
            if f"{s} pass@1" not in r or pd.isna(r[f"{s} pass@1"]):
                row[f"{s} pass@1 [95% CI]"] = row[f"{s} − base [95% CI]"] = "–"
                continue
            row[f"{s} pass@1 [95% CI]"] = f"{r[f'{s} pass@1']:.3f} [{r[f'{s} low']:.3f}, {r[f'{s} high']:.3f}]"
            row[f"{s} − base [95% CI]"] = (f"{r[f'{s} Δbase']:+.3f} [{r[f'{s} Δbase low']:+.3f}, "
                                           f"{r[f'{s} Δbase high']:+.3f}]")
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------------
# Findings


@dataclass
class Finding:
    """One hypothesis, how it was tested, the numbers and the verdict."""

    id: str
    hypothesis: str
    test: str
    verdict: str
    numbers: dict[str, Any]
    evidence: pd.DataFrame = field(default_factory=pd.DataFrame)
    paper: str = ""
    """What the paper reports (``docs/paper.md`` §3), for the side-by-side table."""

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "hypothesis": self.hypothesis, "test": self.test, "verdict": self.verdict,
                "numbers": self.numbers, "paper": self.paper,
                "evidence": self.evidence.replace({np.nan: None}).to_dict(orient="records")}

    def summary(self) -> str:
        return f"{self.id} ({self.verdict}): {self.hypothesis}"


def _rate_row(group: str, df: pd.DataFrame, col: str) -> dict[str, Any]:
    return {"group": group, "events": int(df[col].sum()), "runs": len(df),
            "rate": float(df[col].mean()) if len(df) else math.nan,
            "diverged": int(df["diverged"].sum()), "collapsed": int(df["collapsed"].sum()),
            "kl_blowup": int(df["kl_blowup"].sum())}


def _rate_test_row(comparison: str, stratum: Any, role: str, a: pd.DataFrame, b: pd.DataFrame, col: str,
                   by: str) -> dict[str, Any]:
    """One rate test of a > b, stratified by the column ``by`` (strata present in both groups)."""
    keys = sorted(set(a[by]) & set(b[by]), key=lambda k: (isinstance(k, str), str(k) if isinstance(k, str) else k))
    strata = [(int(a.loc[a[by] == k, col].sum()), int((a[by] == k).sum()),
               int(b.loc[b[by] == k, col].sum()), int((b[by] == k).sum())) for k in keys]
    test = stratified_rate_comparison(strata)
    return {"comparison": comparison, by: stratum, "role": role, "events_a": sum(s[0] for s in strata),
            "runs_a": sum(s[1] for s in strata), "events_b": sum(s[2] for s in strata),
            "runs_b": sum(s[3] for s in strata), "difference": test["difference"], "p_value": test["p_value"],
            "min_p": test["min_p"]}


def _decide(rows: pd.DataFrame) -> pd.DataFrame:
    """Holm over the testable secondary rows, then each row's verdict (``stats.direction_verdict``): primary
    rows at their own p-value, secondary rows at their Holm-adjusted one."""
    rows = rows.copy()
    secondary = (rows["role"] == "secondary") & (rows["min_p"] < stats.ALPHA)
    rows["p_holm"] = math.nan
    if secondary.any():
        rows.loc[secondary, "p_holm"] = stats.holm(rows.loc[secondary, "p_value"].to_numpy())
    p = np.where(rows["role"] == "primary", rows["p_value"], rows["p_holm"])
    rows["verdict"] = [stats.direction_verdict(d, q, m) if math.isfinite(d) else stats.NOT_TESTABLE
                       for d, q, m in zip(rows["difference"], p, rows["min_p"])]
    return rows


def _combine(verdicts: list[str]) -> tuple[str, bool]:
    """A finding's verdict from its primary rows (all must hold): any "not supported" → not supported; all
    supported → supported; otherwise inconclusive at this scale. Also whether every primary row was testable."""
    testable = stats.NOT_TESTABLE not in verdicts
    if stats.VERDICTS[1] in verdicts:
        return stats.VERDICTS[1], testable
    if verdicts and all(v == stats.VERDICTS[0] for v in verdicts):
        return stats.VERDICTS[0], testable
    return stats.VERDICTS[2], testable


def _not_testable_note(rows: pd.DataFrame) -> str:
    bad = rows[(rows["role"] == "primary") & (rows["verdict"] == stats.NOT_TESTABLE)]
    if bad.empty:
        return ""
    parts = [f"{m:.3g}" for m in bad["min_p"] if math.isfinite(m)]
    if not parts:
        return "not testable at this scale: a group of the primary comparison has no runs"
    return ("not testable at this scale: the smallest attainable two-sided p-value is " + ", ".join(parts)
            + f" ≥ α = {stats.ALPHA} with these run counts" + (" (or a group has no runs)" if len(parts) < len(bad) else ""))


def finding_f1(outcomes: pd.DataFrame) -> Finding:
    """F1: on-policy, biased configurations are unstable more often than the other KL configurations."""
    on = outcomes[outcomes["setting"] == ON_POLICY]
    kl = on[on["label"] != NO_KL]
    biased, other = kl[kl["label"].isin(BIASED)], kl[~kl["label"].isin(BIASED)]
    col = "unstable_incl_blowup"
    groups = [_rate_row("biased (k3 in reward, k1 in loss)", biased, col), _rate_row("other KL configurations", other, col)]
    groups += [_rate_row(f"{label}, β={beta:g}", g, col) for (label, beta), g in on.groupby(["label", "beta"])]
    tests = [_rate_test_row("biased vs other KL configurations", "all", "primary", biased, other, col, "beta")]
    tests += [_rate_test_row(f"{label} vs other KL configurations", "all", "secondary", kl[kl["label"] == label],
                             other, col, "beta") for label in BIASED]
    tests += [_rate_test_row("biased vs other KL configurations", b, "secondary", biased[biased["beta"] == b],
                             other[other["beta"] == b], col, "beta") for b in sorted(kl["beta"].unique())]
    tests = _decide(pd.DataFrame(tests))
    primary = tests.iloc[0]
    verdict, testable = _combine([primary["verdict"]])
    full = stratified_rate_comparison([(int(biased.loc[biased["beta"] == b, col].sum()), int((biased["beta"] == b).sum()),
                                        int(other.loc[other["beta"] == b, col].sum()), int((other["beta"] == b).sum()))
                                       for b in sorted(kl["beta"].unique())])
    return Finding(
        id="F1",
        hypothesis="Biased KL configurations (k3 in reward, k1 in loss) train unstably: they diverge, collapse "
                   "or blow up in KL more often than the other KL configurations (on-policy).",
        test="Exact conditional rate test stratified by β (Fisher's test per β, combined over β), two-sided at "
             f"α = {stats.ALPHA}; unstable = diverged, final reward < ½ peak, or final KL > "
             f"{outcomes.attrs.get('kl_blowup_nats', KL_BLOWUP_NATS):g} "
             "nats per sequence (kl_lib.study.findings docstring); no-KL runs excluded. Secondary rows (each "
             "biased configuration; each β) Holm-adjusted.",
        verdict=verdict,
        numbers={"biased_unstable": groups[0]["events"], "biased_runs": groups[0]["runs"],
                 "other_unstable": groups[1]["events"], "other_runs": groups[1]["runs"],
                 "p_value": full["p_greater"], "p_value_opposite": full["p_less"], "p_two_sided": full["p_value"],
                 "min_p": full["min_p"], "testable": testable, "note": _not_testable_note(tests)},
        evidence=pd.concat([tests.assign(kind="test"), pd.DataFrame(groups).assign(kind="counts")],
                           ignore_index=True),
        paper="k3 in reward collapses (Pass@1 ≈ 0), partially or fully, for every β tested [PW, HFB]; k1 in loss is "
              "unstable [HFB, REV]; that this happens for Qwen2.5-7B at β ≥ 0.3 and for Llama-3.1-8B at β = 0.05 "
              "is **unconfirmed [KIMI]**.")


def _runs(df: pd.DataFrame, mask) -> list[str]:
    return list(df.loc[mask, "run"])


def _contrast(comparison: str, stratum: Any, role: str, strata: list[tuple[list[str], str]], cells: dict[str, list[str]],
              est: dict[str, float], reps: dict[str, np.ndarray], values: dict[str, float],
              perm_rng: np.random.Generator) -> dict[str, Any]:
    """Fixed-weight contrast Σ_s w_s (mean over the a cells of s − the b cell of s), w_s = 1 / #strata.

    ``strata``: per stratum, the a-side cell keys (averaged with equal weights) and the b-side cell key; cells
    without runs are left out (a stratum without both sides is dropped). The estimate and its interval come from
    each cell's bootstrap replicates ``reps`` (cells resampled within themselves); the p-value from the stratified
    permutation test of the per-run ``values`` (a runs vs b runs within each stratum): exact, or Monte Carlo with
    ``perm_rng`` above ``stats.MAX_ENUMERATION`` arrangements (four β strata of 6 + 3 runs: 84⁴ ≈ 5·10⁷).
    """
    strata = [([k for k in a if k in reps], b) for a, b in strata]
    strata = [(a, b) for a, b in strata if a and b in reps]
    row = {"comparison": comparison, "stratum": stratum, "role": role}
    if not strata:
        return {**row, "difference": math.nan, "low": math.nan, "high": math.nan, "p_value": math.nan,
                "min_p": math.nan}
    w = 1 / len(strata)
    d = sum(w * (np.mean([est[k] for k in a]) - est[b]) for a, b in strata)
    d_reps = sum(w * (np.mean([reps[k] for k in a], axis=0) - reps[b]) for a, b in strata)
    low, high = stats.interval(d_reps)
    test = stats.permutation_test([([values[r] for k in a for r in cells[k]], [values[r] for r in cells[b]])
                                   for a, b in strata], perm_rng)
    return {**row, "difference": float(d), "low": low, "high": high, "p_value": test["p_value"],
            "min_p": test["min_p"]}


def _accuracy_replicates(tables: RunTables, split: str, cells: dict[str, list[str]], rng: np.random.Generator,
                         n_boot: int) -> tuple[dict, dict, dict, dict]:
    """Cell means, hierarchical bootstrap replicates (one problem draw shared by all cells), per-run means, and
    the cells restricted to evaluated runs."""
    est, reps = group_replicates(tables, split, cells, rng, n_boot, base=False)
    values = {r: float(s.mean()) for r, s in tables.scores[split].items()}
    cells = {k: [r for r in runs if r in values] for k, runs in cells.items()}
    return est, reps, values, cells


def finding_f2(tables: RunTables, rng: np.random.Generator, n_boot: int = 4000) -> Finding:
    """F2: on-policy, the unbiased configurations beat k3 in loss in pass@1, ID and OOD (strata: β)."""
    on = tables.results[tables.results["setting"] == ON_POLICY]
    betas = sorted(b for b in on["beta"].unique() if b > 0)
    labels = (*UNBIASED, K3_LOSS)
    cells = {f"{label}@{b}": _runs(on, (on["beta"] == b) & (on["label"] == label)) for label in labels for b in betas}
    cells = {k: v for k, v in cells.items() if v}
    rows = []
    perm_rng = rng.spawn(1)[0]  # Monte Carlo permutations, if any, without shifting the bootstrap's stream
    for split in SPLITS:
        est, reps, values, split_cells = _accuracy_replicates(tables, split, cells, rng, n_boot)

        def row(comparison, stratum, role, a_labels, bs, split=split):
            strata = [([f"{label}@{b}" for label in a_labels], f"{K3_LOSS}@{b}") for b in bs]
            r = _contrast(comparison, stratum, role, strata, split_cells, est, reps, values, perm_rng)
            return {**r, "split": SPLIT_NAMES[split]}

        rows.append(row("unbiased − k3 in loss", "all", "primary", UNBIASED, betas))
        rows += [row(f"{label} − k3 in loss", "all", "secondary", (label,), betas) for label in UNBIASED]
        for b in betas:
            rows.append(row("unbiased − k3 in loss", b, "secondary", UNBIASED, [b]))
            rows += [row(f"{label} − k3 in loss", b, "secondary", (label,), [b]) for label in UNBIASED]
    evidence = _decide(pd.DataFrame(rows)).rename(columns={"stratum": "beta"})
    primary = evidence[evidence["role"] == "primary"].set_index("split")
    verdict, testable = _combine(list(primary["verdict"]))
    numbers = {f"{s}_{k}": float(primary.loc[s, k]) for s in primary.index
               for k in ("difference", "low", "high", "p_value", "min_p")}
    numbers.update({"unbiased_runs": int(on["label"].isin(UNBIASED).sum()),
                    "k3_loss_runs": int((on["label"] == K3_LOSS).sum()), "testable": testable,
                    "note": _not_testable_note(evidence)})
    return Finding(
        id="F2",
        hypothesis="Unbiased configurations (k1 in reward, k3 in reward+loss) reach higher pass@1 than k3 in "
                   "loss, both in domain (ID) and out of domain (OOD) (on-policy).",
        test="Per β, Δ_β = mean pass@1 of the unbiased cells (equal weights) − k3 in loss; Δ = equal-weight mean "
             "of Δ_β over β. Primary, for ID and for OOD: permutation test over seeds within β strata (exact up "
             f"to {stats.MAX_ENUMERATION:,} arrangements, else {stats.N_PERMUTATIONS:,} random ones), "
             f"two-sided α = {stats.ALPHA}; supported if both are significant and positive, not supported if "
             "either is significant and negative. 95% interval: hierarchical bootstrap (seeds within each cell, "
             "problems shared). Secondary rows (each configuration, each β) Holm-adjusted.",
        verdict=verdict, numbers=numbers, evidence=evidence,
        paper="k1 in reward ≥ k3 in loss on every task of Fig. 4 [PW] (Qwen2.5-7B OOD physics 0.508 vs 0.429, about "
              "19% relative OOD gain [PW]); k3 in reward+loss ≈ k1 in reward > k3 in loss (Fig. 6) [PW].")


def _final_reward_replicates(outcomes: pd.DataFrame, cells: dict[str, list[str]], rng: np.random.Generator,
                             n_boot: int) -> tuple[dict[str, float], dict[str, np.ndarray], dict[str, float]]:
    """Cell means of the final reward and run-level bootstrap replicates within each cell."""
    values = dict(zip(outcomes["run"], outcomes["final_reward"].astype(float)))
    est, reps = {}, {}
    for k, runs in cells.items():
        x = np.array([values[r] for r in runs])
        est[k], reps[k] = float(x.mean()), x[rng.integers(0, x.size, (n_boot, x.size))].mean(1)
    return est, reps, values


def finding_f3(tables: RunTables, outcomes: pd.DataFrame, rng: np.random.Generator, n_boot: int = 4000) -> Finding:
    """F3: lagged (off-policy) runs are stabilised by a KL term (strata: lag, and the PPO minibatch count when it
    is more than one: :func:`offpolicy_stratum`)."""
    lagged = outcomes[(outcomes["policy_loss"] == "ppo") & (outcomes["async_lag"] > 0)]
    lags = _strata(lagged)
    lagged = lagged.rename(columns={"offpolicy_stratum": "stratum"})
    with_kl, no_kl = lagged[lagged["label"].isin(OFFPOLICY_KL)], lagged[lagged["label"] == NO_KL]
    rates = [_rate_row("with KL (k1 in reward, k3 in loss, k3 in loss token IS)", with_kl, "unstable"),
             _rate_row("no KL", no_kl, "unstable")]
    rates += [_rate_row(f"lag {lag}: {label}", g, "unstable") for (lag, label), g in lagged.groupby(["stratum", "label"])]
    tests = [_rate_test_row("unstable, no KL vs KL", "all", "primary", no_kl, with_kl, "unstable", "stratum")]
    tests += [_rate_test_row("unstable, no KL vs KL", lag, "secondary", no_kl[no_kl["stratum"] == lag],
                             with_kl[with_kl["stratum"] == lag], "unstable", "stratum") for lag in lags]
    tests = pd.DataFrame(tests).assign(split="train")
    cells = {f"{label}@{lag}": list(lagged.loc[(lagged["label"] == label) & (lagged["stratum"] == lag), "run"])
             for label in (*OFFPOLICY_KL, NO_KL) for lag in lags}
    cells = {k: v for k, v in cells.items() if v}
    sources = [("final reward, KL − no KL", "train", _final_reward_replicates(outcomes, cells, rng, n_boot) + (cells,))]
    sources += [("pass@1, KL − no KL", SPLIT_NAMES[s], _accuracy_replicates(tables, s, cells, rng, n_boot))
                for s in SPLITS]
    perm_rng, diffs = rng.spawn(1)[0], []  # Monte Carlo permutations, if any, apart from the bootstrap's stream
    for comparison, split, (est, reps, values, split_cells) in sources:
        for lag in ["all", *lags]:
            strata = [([f"{label}@{l}" for label in OFFPOLICY_KL], f"{NO_KL}@{l}") for l in (lags if lag == "all" else [lag])]
            r = _contrast(comparison, lag, "secondary", strata, split_cells, est, reps, values, perm_rng)
            diffs.append({**r, "split": split})
    rows = _decide(pd.concat([tests, pd.DataFrame(diffs)], ignore_index=True)).rename(columns={"stratum": "lag"})
    verdict, testable = _combine([rows.iloc[0]["verdict"]])
    full = stratified_rate_comparison([(int(no_kl.loc[no_kl["stratum"] == l, "unstable"].sum()),
                                        int((no_kl["stratum"] == l).sum()),
                                        int(with_kl.loc[with_kl["stratum"] == l, "unstable"].sum()),
                                        int((with_kl["stratum"] == l).sum())) for l in lags])
    numbers = {"no_kl_unstable": rates[1]["events"], "no_kl_runs": rates[1]["runs"], "kl_unstable": rates[0]["events"],
               "kl_runs": rates[0]["runs"], "p_value": full["p_greater"], "p_value_opposite": full["p_less"],
               "p_two_sided": full["p_value"], "min_p": full["min_p"], "testable": testable,
               "note": _not_testable_note(rows)}
    for _, r in rows[(rows["lag"] == "all") & rows["low"].notna()].iterrows():
        key = "final_reward" if r["split"] == "train" else f"{r['split']}_pass@1"
        numbers.update({f"{key}_{k}": (float(r[k]) if k != "verdict" else r[k])
                        for k in ("difference", "low", "high", "p_value", "p_holm", "verdict")})
    return Finding(
        id="F3",
        hypothesis="A KL term stabilises off-policy (lagged) training: without KL, lagged runs diverge or collapse "
                   "more often than with k1 in reward, k3 in loss or k3 in loss with token IS.",
        test="Exact conditional rate test stratified by lag (Fisher's test per lag > 0, combined), two-sided "
             f"α = {stats.ALPHA}, unstable = diverged or final reward < ½ peak. Secondary, Holm-adjusted: the rate "
             "per lag, and the differences (KL − no KL; KL cells averaged with equal weights, lags with equal "
             "weights) in final reward and ID/OOD pass@1, each with an exact permutation test over seeds within "
             "lags and a 95% bootstrap interval (runs resampled within each cell).",
        verdict=verdict, numbers=numbers,
        evidence=pd.concat([rows.assign(kind="test"), pd.DataFrame(rates).assign(kind="instability")],
                           ignore_index=True),
        paper="Async level 10 with Dr. GRPO [PW]: without KL training is unstable or collapses; k1 in loss also "
              "collapses; k1 in reward and k3 in loss both stabilise it, k1 in reward ahead [PW, abs].")


def all_findings(tables: RunTables, seed: int = 0, n_boot: int = 4000, outcomes: pd.DataFrame | None = None,
                 kl_blowup_nats: float = KL_BLOWUP_NATS) -> list[Finding]:
    """F1–F3 with one random generator seeded by ``seed`` (``kl_blowup_nats``: see :func:`run_outcomes`)."""
    rng = np.random.default_rng(seed)
    outcomes = run_outcomes(tables, kl_blowup_nats) if outcomes is None else outcomes
    return [finding_f1(outcomes), finding_f2(tables, rng, n_boot), finding_f3(tables, outcomes, rng, n_boot)]


def findings_table(findings: list[Finding]) -> pd.DataFrame:
    """One row per finding: id, hypothesis, verdict, test."""
    return pd.DataFrame([{"finding": f.id, "hypothesis": f.hypothesis, "verdict": f.verdict, "test": f.test}
                         for f in findings])


# ---------------------------------------------------------------------------------------------------------
# The paper's outcomes next to ours


def _fmt_ci(est: float, lo: float, hi: float) -> str:
    if not math.isfinite(est):
        return "n/a"
    return f"{est:.3f} [{lo:.3f}, {hi:.3f}]"


def _acc(acc: pd.DataFrame, setting: str, label: str, split: str) -> str:
    rows = acc[(acc["setting"] == setting) & (acc["label"] == label)]
    name = SPLIT_NAMES[split]
    if rows.empty or f"{name} pass@1" not in rows:
        return "no runs"
    return "; ".join(f"β={r['beta']:g}: {_fmt_ci(r[f'{name} pass@1'], r[f'{name} low'], r[f'{name} high'])}"
                     for _, r in rows.iterrows())


def _unstable(outcomes: pd.DataFrame, mask: pd.Series, label: str, col: str = "unstable_incl_blowup",
              by: str = "beta") -> str:
    """"<label> unstable in β=0.1: 1/3, β=0.5: 0/3" (or per off-policy stratum, lag and minibatch count, with
    ``by="async_lag"``)."""
    g = outcomes[mask & (outcomes["label"] == label)]
    if g.empty:
        return f"{label}: no runs"
    if by != "beta":
        return f"{label} unstable at " + ", ".join(
            f"lag {k}: {int(sub[col].sum())}/{len(sub)}" for k in _strata(g)
            for sub in [g[g["offpolicy_stratum"] == k]])
    return f"{label} unstable in " + ", ".join(f"β={k:g}: {int(sub[col].sum())}/{len(sub)}"
                                               for k, sub in g.groupby(by))


PAPER_SETUP = (
    ("β grid", "{0, 0.05, 0.1, 0.3, 1}: **unconfirmed [KIMI]**"),
    ("group size", "G = 5 samples per prompt: **unconfirmed [KIMI]**"),
    ("training steps", "250 steps on MATH [REV]"),
    ("off-policy runs", "Dr. GRPO, async level 10 [PW]; Qwen2.5-7B on MATH and Qwen3-4B-Instruct-2507 on Countdown: "
                        "**unconfirmed [KIMI]**"),
)
"""The paper's setup as ``docs/paper.md`` §2 gives it, each fact with its source tag; **unconfirmed** marks a fact
resting only on an unreliable or secondary source."""


def _setup_rows(tables: RunTables) -> list[tuple[str, str, str, str]]:
    res = tables.results
    on, lagged = res[res["setting"] == ON_POLICY], res[res["async_lag"] > 0]
    ours = {
        "β grid": "{" + ", ".join(f"{b:g}" for b in sorted(on["beta"].unique())) + "} (on-policy)",
        "group size": (f"G = {', '.join(str(int(g)) for g in sorted(res['group_size'].unique()))}"
                       if "group_size" in res else "see configs/sweep.yaml"),
        "training steps": ", ".join(str(int(s)) for s in sorted(res["steps"].unique())) + " steps",
        "off-policy runs": (f"PPO-clip, Dr. GRPO, lags {sorted(int(l) for l in lagged['async_lag'].unique())}"
                            + (f" × {sorted(int(m) for m in lagged['ppo_minibatches'].unique())} minibatches per batch"
                               if "ppo_minibatches" in lagged and lagged["ppo_minibatches"].nunique() > 1 else "")
                            + ", the same model as on-policy" if len(lagged) else "none"),
    }
    return [(f"setup: {name}", paper, ours[name], "—") for name, paper in PAPER_SETUP]


def paper_comparison(tables: RunTables, accuracy: pd.DataFrame, outcomes: pd.DataFrame,
                     findings: list[Finding]) -> pd.DataFrame:
    """The paper's reported outcomes (7–8B LLMs on MATH) next to ours (a 0.9 M-parameter model on arithmetic).

    Every entry of the "this compendium" column is computed from the runs; the paper's column quotes
    ``docs/paper.md`` §3 with its source tags.
    """
    by_id = {f.id: f for f in findings}
    on = outcomes["setting"] == ON_POLICY
    lagged = (outcomes["policy_loss"] == "ppo") & (outcomes["async_lag"] > 0)
    base = {s: tables.base_accuracy(s) for s in SPLITS}
    ent = outcomes[on].groupby("label")[["final_entropy", "final_forward_kl"]].mean()

    def ent_str(label: str) -> str:
        if label not in ent.index:
            return f"{label}: no runs"
        return (f"{label}: entropy {ent.loc[label, 'final_entropy']:.3f} nats/token, forward KL "
                f"{ent.loc[label, 'final_forward_kl']:.3f} nats")

    def lagged_acc(label: str) -> str:
        return "; ".join(f"{s}: {_acc(accuracy, s, label, 'id_test')}" for s in
                         sorted(outcomes.loc[lagged, "setting"].unique(), key=setting_key))

    rows = [*_setup_rows(tables),
        ("OOD accuracy: k1 in reward vs k3 in loss",
         "0.508 vs 0.429 pass@1 (Qwen2.5-7B, OOD physics); ≈19% relative gain over OOD tasks [PW]",
         f"OOD pass@1 k1 in reward {_acc(accuracy, ON_POLICY, 'k1 in reward', 'ood_test')} vs k3 in loss "
         f"{_acc(accuracy, ON_POLICY, K3_LOSS, 'ood_test')} (base {base['ood_test']:.3f})", "F2"),
        ("ID accuracy: k1 in reward vs k3 in loss",
         "k1 in reward ≥ k3 in loss on every task of Fig. 4 [PW]",
         f"ID pass@1 k1 in reward {_acc(accuracy, ON_POLICY, 'k1 in reward', 'id_test')} vs k3 in loss "
         f"{_acc(accuracy, ON_POLICY, K3_LOSS, 'id_test')} (base {base['id_test']:.3f})", "F2"),
        ("k3 in reward+loss (the fix)",
         "≈ k1 in reward > k3 in loss (Fig. 6) [PW]",
         f"ID pass@1 {_acc(accuracy, ON_POLICY, 'k3 in reward+loss', 'id_test')}; OOD "
         f"{_acc(accuracy, ON_POLICY, 'k3 in reward+loss', 'ood_test')}", "F2"),
        ("k3 in reward", "collapses, Pass@1 → ≈0, partially or fully for every β [PW, HFB]",
         f"{_unstable(outcomes, on, 'k3 in reward')}; ID pass@1 {_acc(accuracy, ON_POLICY, 'k3 in reward', 'id_test')}",
         "F1"),
        ("k1 in loss", "unstable [HFB, REV]; Qwen at β ≥ 0.3 and Llama even at β = 0.05: **unconfirmed [KIMI]**",
         f"{_unstable(outcomes, on, 'k1 in loss')}; ID pass@1 {_acc(accuracy, ON_POLICY, 'k1 in loss', 'id_test')}",
         "F1"),
        ("k3 in loss", "stable but lower than k1 in reward [HFB, PW]",
         f"{_unstable(outcomes, on, K3_LOSS)}", "F1"),
        ("Off-policy, no KL", "unstable or collapses (async level 10, Dr. GRPO) [PW]",
         _unstable(outcomes, lagged, NO_KL, "unstable", "async_lag"), "F3"),
        ("Off-policy, k1 in loss", "also collapses [PW]", _unstable(outcomes, lagged, "k1 in loss", "unstable", "async_lag"),
         "—"),
        ("Off-policy, k1 in reward and k3 in loss", "both stabilise training; k1 in reward stays ahead [PW]",
         f"{_unstable(outcomes, lagged, 'k1 in reward', 'unstable', 'async_lag')}; "
         f"{_unstable(outcomes, lagged, K3_LOSS, 'unstable', 'async_lag')}"
         f". ID pass@1 k1 in reward {lagged_acc('k1 in reward')}; k3 in loss {lagged_acc(K3_LOSS)}", "F3"),
        ("Entropy and forward KL (Fig. 7)",
         "k1 in reward keeps lower entropy (mode-seeking); k3 in loss acts like a mode-covering forward KL [PW]",
         f"end of training, on-policy, mean over runs: {ent_str('k1 in reward')}; {ent_str(K3_LOSS)}", "—"),
    ]
    out = pd.DataFrame(rows, columns=["outcome", "paper (Qwen2.5-7B / Llama-3.1-8B, MATH, 250 steps)",
                                      "this compendium (0.9M-parameter model, arithmetic; different scale)",
                                      "finding"])
    out["verdict here"] = out["finding"].map(lambda f: by_id[f].verdict if f in by_id else "—")
    return out
