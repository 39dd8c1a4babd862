"""A run directory's identity, checkpoints and metrics, for the trainer (resume) and for evaluation.

``runs/rl/<name>/`` holds ``LOCK`` while a process trains it (``kl_lib.rl.runlock``), ``config.json`` (with the
run's identity), ``metrics.jsonl``, ``checkpoints/step_N/``, ``final/`` (a model directory), ``summary.json``,
``DONE`` (written last) and, once evaluated, ``eval.json``. A run is *finished* only when ``DONE``,
``summary.json``, ``metrics.jsonl`` and ``config.json`` are all there and readable; otherwise it is incomplete
and resumes.

* :func:`run_identity` hashes what a run's results depend on: the config digest (which includes ``steps``), the
  base model's weights and the training prompts. A finished run is skipped only under the same identity.
  The run's *lineage* is its identity with ``steps`` set to 1 (``run_identity(cfg, steps=1)``): configs that
  differ only in ``steps`` are the same run at different lengths. :func:`open_run_dir` extends a run whose stored
  identity is the new config's identity at the stored number of steps (more steps continue from its last
  checkpoint; fewer are refused); identities of existing runs are unchanged by this rule.
* :func:`open_run_dir` never deletes a run: a directory holding another run is refused with the changed fields
  (or, on request, moved aside to ``<name>.old-<time>``).
* A checkpoint ``checkpoints/step_N/`` is ``trainable.safetensors`` (the weights training changes),
  ``optimizer.safetensors`` and ``snapshots.safetensors`` (the optimizer's tensors and the async-lag snapshots),
  ``state.json`` (the step, identity, lineage and everything else, as JSON) and, written last,
  ``MANIFEST.json`` with each file's SHA-256; the directory is built under a temporary name and renamed. Nothing
  is unpickled: opening a run directory never runs code. :func:`load_checkpoint` verifies the manifest;
  :func:`resume_point` takes the newest intact checkpoint that the metrics reach and warns about damaged ones;
  :func:`save_checkpoint` keeps the newest and ``max(1, keep)`` older ones, so a damaged newest one always has an
  intact predecessor. Checkpoints of the earlier ``state.pt`` (pickle) format are refused with a message.
* :func:`read_metrics` reads ``metrics.jsonl``, dropping a torn last line with a warning; :func:`truncate_metrics`
  keeps the steps before the checkpoint a run resumes from, so a resumed run writes the same ``metrics.jsonl``
  as an uninterrupted one.
* :func:`disk_errors` turns a full disk (``ENOSPC``, ``EDQUOT``, ``EFBIG``) into an error naming the file and
  saying that the run resumes once there is room (every file is written atomically or appended line by line).
* :func:`load_checkpoint_model` rebuilds a checkpoint's model (the base model plus the saved weights, LoRA
  merged) and :func:`evaluate_run` evaluates a run's final model and kept checkpoints, cached in ``eval.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import hashlib
import json
import os
import shutil
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import Tensor

from kl_lib.files import atomic_write, file_digest, read_jsonl, write_json
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
from kl_lib.rl.runlock import RunLock
from kl_lib.tasks import Problem, get_task, problems_digest

__all__ = ["ON_CONFLICT", "CheckpointError", "DiskFullError", "RunConflictError", "disk_errors", "evaluate_run",
           "finished_summary", "latest_checkpoint", "load_checkpoint", "load_checkpoint_model", "load_trainable",
           "open_run_dir", "read_metrics", "resume_point", "run_identity", "save_checkpoint", "trainable_state",
           "truncate_metrics"]

ON_CONFLICT = ("refuse", "move")
"""What :func:`open_run_dir` does with a directory holding another run: refuse, or move it aside."""
FORMAT = 2  # of a checkpoint directory; 1 was one pickled ``state.pt``
_MANIFEST, _STATE = "MANIFEST.json", "state.json"
_FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: damaged, of another run, or of the old pickle format."""


class RunConflictError(FileExistsError):
    """The run directory holds another run (refused; nothing was changed)."""


class DiskFullError(OSError):
    """A write failed for lack of space (or over a file-size limit); the run is left resumable."""


# ------------------------------------------------------------------------------------------------------------
# Identity and the run directory
# ------------------------------------------------------------------------------------------------------------


def run_identity(cfg: RLConfig, problems: list[Problem] | None = None, steps: int | None = None) -> str:
    """What a run's results depend on: its config digest, the base model's weights and the training prompts.

    A finished run is skipped only when this is unchanged, so retraining the base model or regenerating the
    data reruns the sweep rather than silently keeping stale results. With ``steps``: the identity of the same
    config with that many steps (``steps=1`` is the run's lineage, see the module docstring).
    """
    if steps is not None:
        cfg = dataclasses.replace(cfg, steps=steps)
    if problems is None:
        problems = get_task(cfg.task).load_split("rl_train", cfg.data_dir or None)
    model = Path(model_source(cfg.model)[0])  # a preset's local cache is hashed like any model directory
    parts = [cfg.digest(), model_digest(model) if model.is_dir() else cfg.model, problems_digest(problems)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file's mapping, or None when it is missing or cannot be read."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def finished_summary(run_dir: Path, identity: str) -> dict[str, Any] | None:
    """``summary.json`` of a run finished under ``identity``; None when the run is incomplete (``DONE``,
    ``summary.json``, ``metrics.jsonl`` or ``config.json`` missing or unreadable) or another run."""
    config, summary = _read_json(run_dir / "config.json"), _read_json(run_dir / "summary.json")
    if not (run_dir / "DONE").is_file() or not (run_dir / "metrics.jsonl").is_file() or not config or not summary:
        return None
    return summary if config.get("digest") == identity else None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _changes(stored: dict[str, Any] | None, cfg: RLConfig) -> str:
    """The fields that differ between a stored ``config.json`` and ``cfg``, as ``a: old → new, …``."""
    if stored is None or not isinstance(stored.get("config"), dict):
        return "its config.json is missing or unreadable"
    old, new = _flatten(stored["config"]), _flatten(cfg.to_dict())
    diff = [f"{k}: {old.get(k, '(unset)')!r} → {new.get(k, '(unset)')!r}" for k in sorted(set(old) | set(new))
            if k != "runs_dir" and old.get(k) != new.get(k)]
    return ("changed " + ", ".join(diff)) if diff else "same config, but the base model's weights or the training data changed"


def _move_aside(run_dir: Path) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = run_dir.with_name(f"{run_dir.name}.old-{stamp}-{n}")
    run_dir.rename(aside)
    return aside


def _why_not_continue(run_dir: Path, stored: dict[str, Any] | None, cfg: RLConfig, identity: str, lineage: str,
                      problems: list[Problem]) -> str | None:
    """Why ``run_dir`` cannot be this run's (resumed or extended), or None when it can."""
    if stored is not None and stored.get("digest") == identity:
        return None
    old_steps = (stored or {}).get("config", {}).get("steps")
    if not isinstance(old_steps, int) or run_identity(cfg, problems, old_steps) != stored.get("digest"):
        return f"it holds another run ({_changes(stored, cfg)})"
    if old_steps > cfg.steps:
        return f"it holds this run with steps={old_steps}, and a run cannot be shortened to steps={cfg.steps}"
    try:
        usable, why = resume_point(run_dir, lineage, old_steps) is not None, "it has no intact checkpoint"
    except CheckpointError as err:
        usable, why = False, str(err)
    return None if usable else f"it holds this run with steps={old_steps}, which cannot be continued ({why})"


def open_run_dir(run_dir: Path, cfg: RLConfig, identity: str, lineage: str, problems: list[Problem],
                 world_size: int, environment: dict[str, Any], on_conflict: str = "refuse") -> RunLock:
    """Lock ``run_dir`` and make it this run's: new, resumed (same identity), extended (only ``steps`` grew and an
    intact checkpoint exists: ``DONE`` and ``summary.json`` are removed, the rest kept), or, when it cannot be
    this run's, :class:`RunConflictError` saying why, nothing changed (or, with ``on_conflict="move"``, the old
    run renamed to ``<name>.old-<time>``). Writes ``config.json``; returns the held lock."""
    if on_conflict not in ON_CONFLICT:
        raise ValueError(f"on_conflict={on_conflict!r}; valid values are {ON_CONFLICT}")
    lock = RunLock(run_dir).acquire()
    try:
        stored = _read_json(run_dir / "config.json")
        occupied = any(p.name != lock.path.name for p in run_dir.iterdir())
        problem = _why_not_continue(run_dir, stored, cfg, identity, lineage, problems) if occupied else None
        if problem is not None and on_conflict == "move":
            lock.moved(aside := _move_aside(run_dir))
            warnings.warn(f"moved the run that was in {run_dir} to {aside}", stacklevel=2)
            lock.release()
            lock = RunLock(run_dir).acquire()
        elif problem is not None:
            raise RunConflictError(f"{run_dir}: {problem}; nothing was changed. Train under a new name (--set "
                                   "name=...), or pass --move-aside (train(..., on_conflict='move')) to move the old "
                                   f"run to {run_dir.name}.old-<time> and start this one")
        elif occupied and stored.get("digest") != identity:  # extended: from here on the run reads as incomplete
            for name in ("DONE", "summary.json"):
                (run_dir / name).unlink(missing_ok=True)
        with disk_errors(run_dir / "config.json"):
            write_json(run_dir / "config.json", {"config": cfg.to_dict(), "digest": identity,
                                                 "world_size": world_size, "environment": environment})
    except BaseException:
        lock.release()
        raise
    return lock


@contextlib.contextmanager
def disk_errors(path: Path) -> Iterator[None]:
    """Re-raise a full disk or file-size limit met while writing ``path`` as a :class:`DiskFullError` naming it."""
    try:
        yield
    except OSError as err:
        if err.errno not in _FULL_DISK or isinstance(err, DiskFullError):
            raise
        raise DiskFullError(err.errno, f"{os.strerror(err.errno)} while writing {path}; make room and rerun the "
                                       "same command: the run resumes from its last intact checkpoint") from err


# ------------------------------------------------------------------------------------------------------------
# Trainable state and checkpoints
# ------------------------------------------------------------------------------------------------------------


def trainable_state(model: torch.nn.Module) -> dict[str, Tensor]:
    """A copy of the parameters that require gradients, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, Tensor]) -> None:
    """Copy ``state`` (from :func:`trainable_state`) into the model's parameters of the same names, in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def _split_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer's state dict as ``(tensors by "index/name", everything else as JSON-able values)``."""
    tensors, rest = {}, {}
    for index, entries in state_dict["state"].items():
        rest[str(index)] = {}
        for name, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{index}/{name}"] = value.detach().contiguous()
            else:
                rest[str(index)][name] = value
    return tensors, {"state": rest, "param_groups": state_dict["param_groups"]}


def _join_optimizer(tensors: dict[str, Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`_split_optimizer` (tuples, such as AdamW's ``betas``, come back from JSON lists)."""
    state: dict[int, dict[str, Any]] = {int(i): dict(v) for i, v in rest["state"].items()}
    for key, value in tensors.items():
        index, name = key.split("/", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def _checkpoint_files(step: int, policy: torch.nn.Module, optimizer: torch.optim.Optimizer, snapshots: deque,
                      identity: str, lineage: str) -> dict[str, bytes]:
    """A checkpoint's files, by name, as bytes (safetensors and JSON)."""
    optimizer_tensors, optimizer_rest = _split_optimizer(optimizer.state_dict())
    snapshot_tensors = {f"{i}/{name}": t.contiguous() for i, snap in enumerate(snapshots) for name, t in snap.items()}
    state = {"format": FORMAT, "step": step, "digest": identity, "lineage": lineage, "optimizer": optimizer_rest,
             "snapshots": len(snapshots)}
    return {"trainable.safetensors": safetensors_save(trainable_state(policy)),
            "optimizer.safetensors": safetensors_save(optimizer_tensors),
            "snapshots.safetensors": safetensors_save(snapshot_tensors),
            _STATE: json.dumps(state, indent=1).encode()}


def save_checkpoint(run_dir: Path, step: int, policy: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    snapshots: deque, identity: str, lineage: str, keep: int) -> Path:
    """Write ``checkpoints/step_<step>/`` (see the module docstring) and delete all but the newest and ``max(1,
    keep)`` older ones. Older checkpoints are deleted only once the new one is complete."""
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f".step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    files = _checkpoint_files(step, policy, optimizer, snapshots, identity, lineage)
    path = tmp
    try:
        tmp.mkdir(parents=True)
        for name, data in files.items():
            with disk_errors(path := tmp / name), open(path, "wb") as f:
                f.write(data)
        manifest = {"format": FORMAT, "files": {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}}
        with disk_errors(path := tmp / _MANIFEST):
            write_json(path, manifest)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # frees the space a full disk needs back
        raise
    old = sorted(p for p in ckpt_root.glob("step_*") if p != final)
    for p in old[: max(0, len(old) - max(1, keep))]:
        shutil.rmtree(p, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``checkpoints/step_*`` directory of a run (not verified), or None."""
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"))
    return ckpts[-1] if ckpts else None


def _verified(checkpoint: Path) -> dict[str, bytes]:
    """The checkpoint's files as bytes, each checked against ``MANIFEST.json``; :class:`CheckpointError` if not."""
    if not (checkpoint / _MANIFEST).exists():
        if (checkpoint / "state.pt").exists():
            raise CheckpointError(f"{checkpoint} is a checkpoint of the old pickle format (state.pt), which is not "
                                  "read because unpickling a file can run code")
        raise CheckpointError(f"{checkpoint} has no {_MANIFEST}: not a complete checkpoint")
    manifest = _read_json(checkpoint / _MANIFEST)
    if manifest is None or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{checkpoint / _MANIFEST} cannot be read")
    out = {}
    for name, digest in manifest["files"].items():
        path = checkpoint / Path(name).name
        try:
            data = path.read_bytes()
        except OSError as err:
            raise CheckpointError(f"{path} cannot be read ({err.strerror})") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise CheckpointError(f"{path} is damaged (its SHA-256 is not the one in {_MANIFEST}: truncated or corrupt)")
        out[path.name] = data
    return out


def load_checkpoint(checkpoint: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The verified state of a checkpoint directory: ``step``, ``digest``, ``lineage``, ``trainable`` (name →
    tensor), ``optimizer`` (a state dict) and ``snapshots`` (a list of name → tensor); :class:`CheckpointError`
    if it is damaged or of the old format. Reads only JSON and safetensors."""
    files = _verified(Path(checkpoint))
    try:
        state = json.loads(files[_STATE])
        tensors = {name: {k: v.to(device) for k, v in safetensors_load(files[name]).items()}
                   for name in ("trainable.safetensors", "optimizer.safetensors", "snapshots.safetensors")}
    except (KeyError, ValueError, RuntimeError, SafetensorError) as err:
        raise CheckpointError(f"{checkpoint} is not a valid checkpoint ({type(err).__name__}: {err})") from None
    snapshots: list[dict[str, Tensor]] = [{} for _ in range(state["snapshots"])]
    for key, value in tensors["snapshots.safetensors"].items():
        index, name = key.split("/", 1)
        snapshots[int(index)][name] = value
    return {"step": state["step"], "digest": state["digest"], "lineage": state["lineage"],
            "trainable": tensors["trainable.safetensors"], "snapshots": snapshots,
            "optimizer": _join_optimizer(tensors["optimizer.safetensors"], state["optimizer"])}


def resume_point(run_dir: Path, lineage: str, max_step: int, device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """The newest intact checkpoint of this run with ``step ≤ max_step`` (loaded), or None if there is none.

    A damaged checkpoint is skipped with a warning; an old-format one, or one of another run (mixed outputs),
    raises :class:`CheckpointError`.
    """
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*"), reverse=True):
        if int(ckpt.name.split("_")[1]) > max_step:
            continue  # the metrics do not reach it
        try:
            state = load_checkpoint(ckpt, device)
        except CheckpointError as err:
            if (ckpt / "state.pt").exists():
                raise
            warnings.warn(f"skipping a damaged checkpoint: {err}", stacklevel=2)
            continue
        if state["lineage"] != lineage:
            raise CheckpointError(f"{ckpt} belongs to another run (lineage {state['lineage']}, this run's is "
                                  f"{lineage}); move the run directory aside or delete the checkpoint")
        return state
    return None


# ------------------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------------------


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` ([] if it is missing); a torn last line (a crash or a full disk mid-write) is
    dropped with a warning, a damaged earlier line raises ``ValueError`` naming the file and line."""
    if not path.exists():
        return []
    return read_jsonl(path, lambda row: isinstance(row, dict) and isinstance(row.get("step"), int), "metrics row")


def truncate_metrics(path: Path, keep_below_step: int, rows: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Keep (rewritten atomically) and return the rows of ``metrics.jsonl`` of steps before ``keep_below_step``;
    ``rows``: the file's rows if already read (:func:`read_metrics`)."""
    rows = read_metrics(path) if rows is None else rows
    kept = [row for row in rows if row["step"] < keep_below_step]
    if path.exists():
        with disk_errors(path), atomic_write(path) as f:
            f.write("".join(json.dumps(row) + "\n" for row in kept))
    return kept


# ------------------------------------------------------------------------------------------------------------
# Evaluation of a run's models
# ------------------------------------------------------------------------------------------------------------


def load_checkpoint_model(run_dir: str | Path, checkpoint: str | Path, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` of an intermediate checkpoint ``<run>/checkpoints/step_N`` (trainable weights only)."""
    cfg = from_dict(json.loads((Path(run_dir) / "config.json").read_text())["config"])
    state = load_checkpoint(Path(checkpoint), device)  # verified before the model is built
    model = load_model(cfg.model, device=device)
    if cfg.finetune == "lora":
        model = add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    load_trainable(model, state["trainable"])
    if cfg.finetune == "lora":
        model = model.merge_and_unload()
    return model, load_tokenizer(cfg.model)


def _weights_key(name: str, path: Path) -> str:
    """What a cached evaluation of ``final/`` or a checkpoint is keyed by: a digest of its weights."""
    if name == "final":
        return model_digest(path)
    weights = path / "trainable.safetensors"
    return file_digest(weights if weights.exists() else path / "state.pt")[:16]  # state.pt: the old format


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
        key = f"{_weights_key(name, path)}-{settings.key()}-{data_key(splits)}"
        if cache.get(name, {}).get("key") == key:
            out[name] = cache[name]
            continue
        model, tokenizer = load_for_eval(path, device) if name == "final" else load_checkpoint_model(run_dir, path, device)
        out[name] = {"key": key, "model": str(path), "settings": asdict(settings),
                     "results": evaluate_splits(model, tokenizer, splits, settings)}
    write_json(cache_path, out)
    return json.loads(cache_path.read_text())
