"""A run directory's identity and checkpoints, for the trainer (resume) and for evaluation.

``runs/rl/<name>/`` holds ``config.json`` (with the run's identity), ``metrics.jsonl``, ``checkpoints/step_N/``
(``state.pt``: the step, the identity, the trainable weights, the optimizer state and the async-lag snapshots),
``final/`` (a model directory), ``summary.json``, ``DONE`` and, once evaluated, ``eval.json``.

* :func:`run_identity` hashes what a run's results depend on: the config digest, the base model's weights and
  the training prompts. A finished run is skipped, and a checkpoint resumed, only under the same identity.
* :func:`trainable_state` / :func:`load_trainable` copy the weights that training changes (all of them, or the
  LoRA adapters); :func:`save_checkpoint` writes them atomically (a temporary directory renamed) and keeps the
  ``keep`` newest; :func:`latest_checkpoint` and :func:`load_checkpoint` read them back.
* :func:`truncate_metrics` drops the metrics of steps after the checkpoint a run resumes from, so a resumed run
  writes the same ``metrics.jsonl`` as an uninterrupted one.
* :func:`load_checkpoint_model` rebuilds a checkpoint's model (the base model plus the saved weights, LoRA
  merged) and :func:`evaluate_run` evaluates a run's final model and kept checkpoints, cached in ``eval.json``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kl_lib.files import atomic_write, file_digest, write_json
from kl_lib.lm.evaluate import (
    EvalSettings,
    data_key,
    evaluate_splits,
    load_for_eval,
    load_splits,
    model_digest,
)
from kl_lib.lm.models import add_lora, load_model, load_tokenizer, model_source
from kl_lib.rl.config import RLConfig, from_dict
from kl_lib.tasks import Problem, get_task, problems_digest

__all__ = ["evaluate_run", "latest_checkpoint", "load_checkpoint", "load_checkpoint_model", "load_trainable",
           "run_identity", "save_checkpoint", "trainable_state", "truncate_metrics"]


def run_identity(cfg: RLConfig, problems: list[Problem] | None = None) -> str:
    """What a run's results depend on: its config digest, the base model's weights and the training prompts.

    A finished run is skipped only when this is unchanged, so retraining the base model or regenerating the
    data reruns the sweep rather than silently keeping stale results.
    """
    if problems is None:
        problems = get_task(cfg.task).load_split("rl_train", cfg.data_dir or None)
    model = Path(model_source(cfg.model)[0])  # a preset's local cache is hashed like any model directory
    parts = [cfg.digest(), model_digest(model) if model.is_dir() else cfg.model, problems_digest(problems)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def trainable_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """A copy of the parameters that require gradients, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` (from :func:`trainable_state`) into the model's parameters of the same names, in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def save_checkpoint(run_dir: Path, step: int, policy: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    snapshots: deque, identity: str, keep: int) -> None:
    """Write ``checkpoints/step_<step>/state.pt`` atomically and delete all but the ``keep`` newest others."""
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f".step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"step": step, "digest": identity, "trainable": trainable_state(policy),
                "optimizer": optimizer.state_dict(), "snapshots": list(snapshots)}, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    old = sorted(p for p in ckpt_root.glob("step_*") if p != final)
    for p in old[: max(0, len(old) - keep)]:
        shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``checkpoints/step_*`` directory of a run, or None."""
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    return ckpts[-1] if ckpts else None


def load_checkpoint(checkpoint: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The saved state of a checkpoint directory (see :func:`save_checkpoint` for its keys)."""
    return torch.load(Path(checkpoint) / "state.pt", map_location=device, weights_only=False)


def truncate_metrics(path: Path, keep_below_step: int) -> None:
    """Keep only the lines of ``metrics.jsonl`` of steps before ``keep_below_step`` (rewritten atomically)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] < keep_below_step]
    with atomic_write(path) as f:
        f.write("".join(line + "\n" for line in kept))


def load_checkpoint_model(run_dir: str | Path, checkpoint: str | Path, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` of an intermediate checkpoint ``<run>/checkpoints/step_N`` (trainable weights only)."""
    cfg = from_dict(json.loads((Path(run_dir) / "config.json").read_text())["config"])
    model = load_model(cfg.model, device=device)
    if cfg.finetune == "lora":
        model = add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    load_trainable(model, load_checkpoint(Path(checkpoint), device)["trainable"])
    if cfg.finetune == "lora":
        model = model.merge_and_unload()
    return model, load_tokenizer(cfg.model)


def evaluate_run(run_dir: str | Path, data_dir: str | Path, settings: EvalSettings = EvalSettings(),
                 device: str | torch.device = "cpu") -> dict[str, Any]:
    """Evaluate a finished run's final model and every kept intermediate checkpoint, cached in ``eval.json``.

    Returns ``{"final": record, "step_000050": record, ...}``; each record is recomputed only when its weights
    or the settings change.
    """
    run_dir = Path(run_dir)
    splits = load_splits(settings, data_dir)
    cache_path = run_dir / "eval.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    out: dict[str, Any] = {}
    targets = [("final", run_dir / "final")] if (run_dir / "final").exists() else []
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    if targets:
        checkpoints = checkpoints[:-1]  # the last checkpoint holds the same weights as final/
    targets += [(ckpt.name, ckpt) for ckpt in checkpoints]
    for name, path in targets:
        weights = model_digest(path) if name == "final" else file_digest(path / "state.pt")[:16]
        key = f"{weights}-{settings.key()}-{data_key(splits)}"
        if cache.get(name, {}).get("key") == key:
            out[name] = cache[name]
            continue
        model, tokenizer = load_for_eval(path, device) if name == "final" else load_checkpoint_model(run_dir, path, device)
        out[name] = {"key": key, "model": str(path), "settings": asdict(settings),
                     "results": evaluate_splits(model, tokenizer, splits, settings)}
    write_json(cache_path, out)
    return json.loads(cache_path.read_text())
