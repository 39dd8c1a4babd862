"""A directory of RL runs as tables: the input of ``kl_lib.study.findings``, notebooks 04–05 and the report.

A sweep (``kl_lib.rl.sweep``) leaves, under ``<runs_dir>/``, one directory per run (``config.json``,
``metrics.jsonl``, ``summary.json``, ``DONE``, ``eval.json``) and the base model's ``base_eval.json``.
:func:`load_tables` reads all of it into a :class:`RunTables`:

* ``results``: one row per finished run: configuration (``setting``, ``label``, ``beta``, ``seed``,
  ``async_lag``, ...), how it ended (``status``, ``diverged``, ``reward_collapse`` from ``summary.json``),
  ``final_kl`` (``kl/analytic`` of the last step), ``final_entropy``, and greedy / pass@1 accuracy of the
  final model on ``id_test`` and ``ood_test`` (NaN when the run has no final model);
* ``metrics``: every step of every run (``kl_lib.study.runs.load_runs``);
* ``scores[split][run]``: per-problem pass@1 of the final model, ``correct_counts / num_samples``: what the
  bootstrap resamples;
* ``base``: the same for the base model (``base_scores``, ``base_accuracy``);
* ``checkpoints``: pass@1 and greedy accuracy of every evaluated model of every run (intermediate
  checkpoints ``step_*`` and ``final``), long format.

**Settings.** ``setting`` names the training recipe a run belongs to: ``"on-policy"`` (REINFORCE with RLOO,
``async_lag = 0``: the paper's main study), ``"PPO lag k"`` (PPO-clip with rollouts ``k`` steps old: the
off-policy study; ``k = 0`` is the same recipe on-policy). Configurations are compared within a setting.

**Diverged runs.** A run that diverged has no final model. Its per-problem scores are recorded as 0 (it
delivered nothing usable, as a collapsed run in the paper reports Pass@1 ≈ 0) and flagged in
``results.scored_as_zero``; the accuracy columns of ``results`` stay NaN so that the table does not pretend it
was evaluated. A finished run without ``eval.json`` is left out of the scores (``evaluated = False``).

The smoke sweep that notebooks 04–05 read in smoke mode is built by ``kl_lib.rl.sweep.ensure_smoke_sweep``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from kl_lib.study.runs import is_finished, load_runs, read_json, run_dirs, run_label

__all__ = [
    "SPLITS",
    "RunTables",
    "checkpoint_table",
    "complete_seeds",
    "restrict_to_runs",
    "load_scores",
    "load_tables",
    "results_table",
    "setting_name",
]

SPLITS = ("id_test", "ood_test")
"""The evaluation splits: in-domain (the RL task, held out) and out-of-domain."""


def setting_name(policy_loss: str, async_lag: int, ppo_minibatches: int = 1) -> str:
    """``"on-policy"`` for REINFORCE without lag, else ``"PPO lag k"`` (``"<loss> lag k"`` in general), with
    ``", m minibatches"`` when each batch is split into m > 1 PPO updates."""
    if policy_loss == "reinforce" and async_lag == 0 and ppo_minibatches == 1:
        return "on-policy"
    minibatches = f", {ppo_minibatches} minibatches" if ppo_minibatches > 1 else ""
    return f"{'PPO' if policy_loss == 'ppo' else policy_loss} lag {async_lag}{minibatches}"


def _finished_runs(runs_dir: Path) -> list[Path]:
    """Finished runs only (``kl_lib.study.runs.is_finished``): an incomplete one is never reported as done."""
    return [d for d in run_dirs(runs_dir) if is_finished(d)]


def results_table(runs_dir: str | Path) -> pd.DataFrame:
    """One row per finished run under ``runs_dir`` (see the module docstring for the columns)."""
    runs_dir = Path(runs_dir)
    rows = []
    for d in _finished_runs(runs_dir):
        cfg = json.loads((d / "config.json").read_text())["config"]
        summary = json.loads((d / "summary.json").read_text())
        ev = read_json(d / "eval.json") or {}
        final = ev.get("final")
        diverged = summary["status"] == "diverged"
        row = {
            "run": d.name, "setting": setting_name(cfg["policy_loss"], cfg["async_lag"], cfg.get("ppo_minibatches", 1)),
            "label": run_label(cfg), "beta": cfg["kl"]["beta"], "seed": cfg["seed"], "async_lag": cfg["async_lag"],
            "ppo_minibatches": cfg.get("ppo_minibatches", 1), "group_size": cfg["group_size"],
            "policy_loss": cfg["policy_loss"], "advantage": cfg["advantage"], "steps": cfg["steps"],
            "status": summary["status"], "steps_completed": summary.get("steps_completed"),
            "diverged": diverged, "reward_collapse": bool(summary.get("reward_collapse", False)),
            "reward_final": summary.get("reward/final"), "reward_peak": summary.get("reward/peak"),
            "final_kl": summary.get("kl/final_analytic"), "final_entropy": summary.get("policy/final_entropy"),
            "evaluated": final is not None, "scored_as_zero": diverged and final is None,
            "num_samples": final["settings"]["num_samples"] if final else None,
        }
        for split in SPLITS:
            res = final["results"].get(split) if final else None
            for metric in ("pass@1", "greedy"):
                row[f"{split} {metric}"] = res[metric] if res else np.nan
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"no finished runs under {runs_dir}; run the sweep first (make sweep)")
    return pd.DataFrame(rows)


def _per_problem(record: dict, split: str) -> np.ndarray:
    """pass@1 of each problem: correct samples / samples (float64, one entry per problem)."""
    res = record["results"][split]
    return np.asarray(res["correct_counts"], dtype=float) / record["settings"]["num_samples"]


def load_scores(runs_dir: str | Path, results: pd.DataFrame) -> tuple[dict[str, dict[str, np.ndarray]],
                                                                        dict[str, np.ndarray]]:
    """``(scores, base)``: ``scores[split][run]`` per-problem pass@1 of each run's final model (zeros for a
    diverged run, see the module docstring) and ``base[split]`` the base model's, from ``base_eval.json``."""
    runs_dir = Path(runs_dir)
    base_record = read_json(runs_dir / "base_eval.json")
    if base_record is None:
        raise FileNotFoundError(f"{runs_dir / 'base_eval.json'} is missing; the sweep writes it (make sweep)")
    base = {split: _per_problem(base_record, split) for split in SPLITS}
    scores: dict[str, dict[str, np.ndarray]] = {split: {} for split in SPLITS}
    for row in results.itertuples():
        if row.evaluated:
            final = json.loads((runs_dir / row.run / "eval.json").read_text())["final"]
            for split in SPLITS:
                scores[split][row.run] = _per_problem(final, split)
        elif row.scored_as_zero:
            for split in SPLITS:
                scores[split][row.run] = np.zeros_like(base[split])
    return scores, base


def checkpoint_table(runs_dir: str | Path, results: pd.DataFrame) -> pd.DataFrame:
    """Every evaluated model of every run, long: ``run``, ``checkpoint`` (``step_000050``/``final``),
    ``step`` (training steps behind it), ``split``, ``pass@1``, ``greedy`` plus the configuration columns;
    the base model appears once per run as step 0 so that a line per run can start from it."""
    runs_dir = Path(runs_dir)
    base_record = read_json(runs_dir / "base_eval.json")
    config_cols = ["run", "setting", "label", "beta", "seed", "async_lag"]
    rows = []
    for row in results.itertuples():
        ev = read_json(runs_dir / row.run / "eval.json") or {}
        entries = dict(ev)
        if base_record is not None:
            entries["base"] = base_record
        for name, record in entries.items():
            step = 0 if name == "base" else row.steps if name == "final" else int(name.split("_")[1])
            for split in SPLITS:
                res = record["results"][split]
                rows.append({**{c: getattr(row, c) for c in config_cols}, "checkpoint": name, "step": step,
                             "split": split, "pass@1": res["pass@1"], "greedy": res["greedy"]})
    columns = config_cols + ["checkpoint", "step", "split", "pass@1", "greedy"]
    return pd.DataFrame(rows, columns=columns).sort_values(["run", "split", "step"], ignore_index=True)


@dataclass
class RunTables:
    """Everything the analysis reads from a runs directory (see the module docstring)."""

    results: pd.DataFrame
    metrics: pd.DataFrame
    scores: dict[str, dict[str, np.ndarray]]
    base_scores: dict[str, np.ndarray]
    checkpoints: pd.DataFrame = field(default_factory=pd.DataFrame)
    runs_dir: str = ""

    def base_accuracy(self, split: str) -> float:
        return float(self.base_scores[split].mean())


def load_tables(runs_dir: str | Path) -> RunTables:
    """Read a runs directory (finished runs only) into a :class:`RunTables`."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(f"{runs_dir} does not exist; run the sweep first (make sweep)")
    results = results_table(runs_dir)
    metrics = load_runs(runs_dir, list(results["run"]))
    metrics = metrics.merge(results[["run", "setting"]], on="run", how="left")
    scores, base = load_scores(runs_dir, results)
    return RunTables(results=results, metrics=metrics, scores=scores, base_scores=base,
                     checkpoints=checkpoint_table(runs_dir, results), runs_dir=str(runs_dir))


def complete_seeds(results: pd.DataFrame) -> list[int]:
    """The analysis cut of a study trained in seed order (``docs/preregistration.md`` §5): the seeds 0, 1, …, k − 1
    for which *every* cell present (setting × configuration × β) has a finished run that is evaluated (or
    diverged). Runs of later seeds are left out of the analysis, so that all cells have the same seeds."""
    done = results[results["evaluated"] | results["diverged"]]
    have = set(zip(done["setting"], done["label"], done["beta"], done["seed"]))
    cells = set(zip(results["setting"], results["label"], results["beta"]))
    k = 0
    while cells and all((*cell, k) in have for cell in cells):
        k += 1
    return list(range(k))


def restrict_to_runs(tables: RunTables, runs: Iterable[str]) -> RunTables:
    """The same tables with only the runs named in ``runs`` (the base model's scores unchanged)."""
    keep = set(runs)
    checkpoints = tables.checkpoints
    if len(checkpoints):
        checkpoints = checkpoints[checkpoints["run"].isin(keep)].reset_index(drop=True)
    return RunTables(results=tables.results[tables.results["run"].isin(keep)].reset_index(drop=True),
                     metrics=tables.metrics[tables.metrics["run"].isin(keep)].reset_index(drop=True),
                     scores={split: {r: v for r, v in d.items() if r in keep} for split, d in tables.scores.items()},
                     base_scores=tables.base_scores, checkpoints=checkpoints, runs_dir=tables.runs_dir)
