"""The project's two RL studies, by name: what each runs, where its runs live, and its fixed analysis constants.

* ``long`` — the **long-answer study** (issue 11, ``configs/study.yaml``, ``docs/preregistration.md``): worked
  column arithmetic, answers of ~41 tokens, the paper's β grid {0.05, 0.1, 0.3, 1} (unconfirmed [KIMI]), 250 steps,
  G = 5, RLOO with the KL penalty folded into the reward before the leave-one-out baseline, and an off-policy axis
  at lag 10 with 1 or 4 PPO minibatches per batch. This is the study that can test the paper's findings.
* ``short`` — the earlier **short-answer study** (``configs/sweep.yaml``): one-step arithmetic answers of 4–6
  tokens, β ∈ {0.1, 0.5}, 100 steps; kept as a contrast (a regime where the phenomena cannot appear: the sequence
  KL stays below ~1 nat).

The one constant that differs between them is the KL blow-up threshold of ``kl_lib.study.findings``: the rule of
``docs/statistics.md`` §7, max(3 × the base model's sequence entropy, 1 nat × its median answer length), applied
to each study's base model before its runs (5 nats for the short study, 41 nats for the long one, whose base model
answers in a median of 41 tokens with 2.10 nats of sequence entropy: ``docs/preregistration.md`` §2–3).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

__all__ = ["STUDIES", "Study", "get_study", "study_of_runs"]


@dataclass(frozen=True)
class Study:
    """One RL study: its sweep file, its runs (full and smoke), its base model and its blow-up threshold."""

    name: str
    title: str
    sweep: str
    runs_dir: str
    smoke_runs_dir: str
    base_model: str
    kl_blowup_nats: float
    """KL blow-up threshold, nats per sequence (fixed before the study's runs; module docstring)."""
    reference_runs: str = ""
    """The committed runs of the complete study (``kl_lib.study.reference``), if any: where a reader of a reduced
    or unfinished study finds the pre-registered analysis."""


STUDIES: dict[str, Study] = {
    "long": Study("long", "long-answer study (worked column arithmetic, ~41-token answers)", "configs/study.yaml",
                  "runs/study", "runs/smoke/study", "data/models/worked-base", kl_blowup_nats=41.0,
                  reference_runs="runs/reference/study/runs"),
    "short": Study("short", "short-answer study (one-step arithmetic, 4–6-token answers)", "configs/sweep.yaml",
                   "runs/rl", "runs/smoke/rl", "data/models/tiny-base", kl_blowup_nats=5.0),
}


def get_study(name: str) -> Study:
    """The study called ``name``; a clear error lists the known ones."""
    try:
        return STUDIES[name]
    except KeyError:
        raise ValueError(f"unknown study {name!r}; choose one of {', '.join(map(repr, STUDIES))}") from None


def study_of_runs(runs_dir: str | Path) -> Study:
    """The study whose sweep produced ``runs_dir``: read from its ``sweep.json`` (the sweep file it names), else
    from the directory's name; the short study when neither says (runs made before the long study existed)."""
    runs_dir = Path(runs_dir)
    try:
        sweep = Path(json.loads((runs_dir / "sweep.json").read_text())["sweep"]).name
    except (OSError, ValueError, KeyError, TypeError):
        sweep = None
    for study in STUDIES.values():
        if sweep == Path(study.sweep).name or runs_dir.name == Path(study.runs_dir).name:
            return study
    return STUDIES["short"]
