"""A sweep of RL runs defined in one YAML file, run in parallel worker processes, resumable.

    python -m kl_lib.rl.sweep configs/sweep.yaml [--smoke] [--jobs 2] [--dry-run]

The file has a ``base`` mapping of ``RLConfig`` fields shared by every run, an ``eval`` mapping of
``kl_lib.lm.evaluate.EvalSettings`` (every finished run's final model and kept checkpoints, and the base model,
are evaluated with them; results cached in ``<run>/eval.json`` and ``<runs_dir>/base_eval.json``), an optional
``smoke`` mapping (applied on top with ``--smoke``: it may also shrink ``seeds`` / ``betas`` and hold its own
``eval``), and ``groups``; each group has

    set:    RLConfig fields for this group (e.g. async_lag, policy_loss)
    seeds:  [0, 1, 2]
    betas:  [0.05, 0.3]
    kl:     list of KL settings (estimator, placement, ...); an entry with ``beta: 0`` is the no-KL
            control and is run once per seed, not once per β

Runs are named deterministically (``RLConfig.run_name``) under ``<runs_dir>/``; a run whose directory holds
``DONE`` with the same config digest is skipped, an interrupted one resumes, one whose ``steps`` grew continues
from its last checkpoint, and a directory holding a run of another config is refused and left untouched (with
``--move-aside`` it is renamed to ``<name>.old-<time>`` and the run starts; ``kl_lib.rl.checkpoints``). A run
that another process is training (its directory is locked, ``kl_lib.rl.runlock``) is reported ``locked``, not
trained twice. A run that raises is reported and the sweep goes on, and so is one whose worker process dies
(killed, out of memory: each run trains in a process of its own; run the sweep again to resume it); the exit
status is non-zero if any run failed or was locked (a diverged run is a result, not a failure).
``<runs_dir>/sweep.json`` lists every run with its status.

On CPU each worker uses one thread: for a model of a million parameters, two single-threaded runs side by side
finish much sooner than two-threaded runs one after the other.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fnmatch
import json
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from queue import Empty
from typing import Any

import torch
from tqdm.auto import tqdm

from kl_lib.files import write_json
from kl_lib.lm.evaluate import EvalSettings, evaluate_path
from kl_lib.lm.sft import smoke_config, train_base_model
from kl_lib.rl.checkpoints import evaluate_run
from kl_lib.rl.config import (
    RLConfig,
    apply_overrides,
    check_sweep_spec,
    fields_help,
    from_dict,
    load_sweep_spec,
)
from kl_lib.rl.runlock import RunLockedError
from kl_lib.rl.train import resolve_device, train

__all__ = ["ensure_smoke_sweep", "eval_settings", "expand_sweep", "run_sweep", "select_runs"]



def expand_sweep(spec: dict[str, Any], smoke: bool = False, overrides: list[str] | None = None) -> list[RLConfig]:
    """Every run of the sweep as a validated ``RLConfig`` (all errors before any compute)."""
    check_sweep_spec(spec)
    base = dict(spec.get("base") or {})
    smoke_spec = dict(spec.get("smoke") or {}) if smoke else {}
    smoke_seeds, smoke_betas = smoke_spec.pop("seeds", None), smoke_spec.pop("betas", None)
    smoke_spec.pop("eval", None)
    base.update(smoke_spec)
    configs: list[RLConfig] = []
    for group_name, group in (spec.get("groups") or {}).items():
        seeds = smoke_seeds if smoke_seeds is not None else group.get("seeds", [0])
        betas = smoke_betas if smoke_betas is not None else group.get("betas", [0.1])
        for kl in group.get("kl", [{}]):
            kl = dict(kl)
            fixed_beta = kl.pop("beta", None)
            for beta in ([fixed_beta] if fixed_beta is not None else betas):
                for seed in seeds:
                    raw = {**base, **(group.get("set") or {}), "seed": seed, "kl": {**kl, "beta": beta}}
                    try:
                        configs.append(from_dict(apply_overrides(raw, overrides or [])))
                    except ValueError as err:
                        raise ValueError(f"sweep group {group_name!r}, kl={kl}, beta={beta}, seed={seed}: {err}") from None
    names = [c.run_name() for c in configs]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ValueError(f"the sweep defines several runs with the same name: {sorted(duplicates)}")
    return configs


def eval_settings(spec: dict[str, Any], smoke: bool = False) -> EvalSettings:
    """The sweep's evaluation settings: its ``eval`` mapping, with ``smoke.eval`` on top in smoke mode."""
    raw = dict(spec.get("eval") or {})
    if smoke:
        raw.update((spec.get("smoke") or {}).get("eval") or {})
    valid = {f.name for f in dataclasses.fields(EvalSettings)}
    if set(raw) - valid:
        raise ValueError(f"unknown eval key(s) {sorted(set(raw) - valid)}; valid keys are {sorted(valid)}")
    if "splits" in raw:
        raw["splits"] = tuple(raw["splits"])
    return EvalSettings(**raw)


def _run_one(cfg_dict: dict[str, Any], settings: dict[str, Any] | None, on_conflict: str = "refuse") -> dict[str, Any]:
    torch.set_num_threads(int(os.environ.get("KL_SWEEP_THREADS", "1")))
    cfg = from_dict(cfg_dict)
    start = time.time()
    try:
        result = train(cfg, progress=False, on_conflict=on_conflict)
        if settings is not None and result.status in ("done", "skipped"):
            evaluate_run(result.run_dir, cfg.data_dir, EvalSettings(**{**settings, "task": cfg.task}),
                         device=resolve_device(cfg)[0])  # on the run's device: the GPU when it trained there
        return {"name": cfg.run_name(), "status": result.status, "steps": result.steps_completed,
                "seconds": time.time() - start}
    except RunLockedError as err:  # another process trains it: reported, not trained twice
        return {"name": cfg.run_name(), "status": "locked", "error": str(err), "seconds": time.time() - start}
    except Exception as err:  # noqa: BLE001 — one broken run must not stop the sweep; it is reported
        return {"name": cfg.run_name(), "status": "failed", "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(), "seconds": time.time() - start}


def run_sweep(configs: list[RLConfig], jobs: int = 2, progress: bool = True,
              settings: EvalSettings | None = None, on_conflict: str = "refuse") -> list[dict[str, Any]]:
    """Train (and, with ``settings``, evaluate) every run; returns one status record per run (``status``: done,
    skipped, diverged, failed, or locked by another process). ``on_conflict``: see ``kl_lib.rl.train.train``.

    With ``jobs`` > 1 each run trains in a process of its own (:func:`_run_in_processes`), so a worker that dies
    (killed, out of memory) fails its run only; with ``jobs`` = 1 the runs train one after another in this process.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    results = []
    evaluation = None if settings is None else dataclasses.asdict(settings)
    payloads = [c.to_dict() for c in configs]
    bar = tqdm(total=len(configs), desc="sweep", unit="run", disable=not progress, file=sys.stderr)

    def report(record: dict[str, Any]) -> None:
        results.append(record)
        bar.set_postfix_str(f"{record['name']}: {record['status']}")
        bar.update()

    if jobs == 1:
        for payload in payloads:
            report(_run_one(payload, evaluation, on_conflict))
    else:
        _run_in_processes(payloads, jobs, evaluation, on_conflict, report)
    bar.close()
    return sorted(results, key=lambda r: r["name"])


def _worker(index: int, payload: dict[str, Any], settings: dict[str, Any] | None, on_conflict: str,
            results: mp.Queue) -> None:
    results.put((index, _run_one(payload, settings, on_conflict)))


def _run_in_processes(payloads: list[dict[str, Any]], jobs: int, settings: dict[str, Any] | None, on_conflict: str,
                      report: Callable[[dict[str, Any]], None]) -> None:
    """Each run in a spawned process of its own, at most ``jobs`` at once, its record reported as it ends.

    A process that ends without sending its record (killed by a signal, out of memory) is reported as a failed
    run naming how it ended; the others go on. Its run directory keeps its last checkpoint and a stale lock, so
    running the sweep again resumes it. On an exception here (Ctrl-C) the running workers are terminated.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    waiting = list(enumerate(payloads))
    running: dict[int, tuple[Any, float]] = {}  # index -> (process, start time)
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                index, payload = waiting.pop(0)
                proc = ctx.Process(target=_worker, args=(index, payload, settings, on_conflict, queue))
                proc.start()
                running[index] = (proc, time.time())
            for index, record in _received(queue, wait=1.0):
                running.pop(index)[0].join()
                report(record)
            for index, (proc, start) in list(running.items()):
                if proc.is_alive():
                    continue
                for sent, record in _received(queue, wait=5.0):  # a record sent just before it ended
                    running.pop(sent)[0].join()
                    report(record)
                if index in running:
                    running.pop(index)
                    report(_lost_worker(payloads[index], proc.exitcode, time.time() - start))
    finally:
        for proc, _ in running.values():
            proc.terminate()
            proc.join()


def _received(queue: mp.Queue, wait: float) -> list[tuple[int, dict[str, Any]]]:
    """The records in ``queue``, waiting up to ``wait`` seconds for the first."""
    try:
        records = [queue.get(timeout=wait)]
    except Empty:
        return []
    with contextlib.suppress(Empty):
        while True:
            records.append(queue.get_nowait())
    return records


def _lost_worker(payload: dict[str, Any], exitcode: int | None, seconds: float) -> dict[str, Any]:
    how = (f"was killed by {signal.Signals(-exitcode).name}" if exitcode is not None and exitcode < 0
           else f"exited with status {exitcode}")
    return {"name": from_dict(payload).run_name(), "status": "failed", "seconds": seconds,
            "error": f"its worker process {how} before reporting (out of memory, or killed by hand?); the run "
                     "keeps its last checkpoint and resumes from it when the sweep is run again",
            "traceback": ""}


def ensure_smoke_sweep(runs_dir: str | Path = "runs/smoke/rl", sweep: str | Path = "configs/sweep.yaml",
                       model_dir: str | Path = "data/models/tiny-base-smoke", data_dir: str | Path = "data/arithmetic",
                       jobs: int = 2) -> Path:
    """Build what ``make base-model sweep SMOKE=1`` builds for ``sweep`` (its task's data, the 200-step smoke SFT
    model of that task, the smoke sweep with its evaluations and ``base_eval.json``), reusing everything already
    there; returns ``runs_dir``.

    This is how notebooks 04–05 run on a fresh clone in smoke mode. Only runs that are not finished (or finished
    but not evaluated) are handed to the sweep runner, so a complete smoke sweep costs a directory listing.
    """
    runs_dir, model_dir, data_dir = Path(runs_dir), Path(model_dir), Path(data_dir)
    spec = load_sweep_spec(sweep)
    overrides = [f"runs_dir={runs_dir}", f"model={model_dir}", f"data_dir={data_dir}"]
    configs = expand_sweep(spec, smoke=True, overrides=overrides)
    task = configs[0].task
    settings = dataclasses.replace(eval_settings(spec, smoke=True), task=task)

    def complete(cfg: RLConfig) -> bool:
        d = runs_dir / cfg.run_name()
        if not all((d / name).is_file() for name in ("DONE", "summary.json", "metrics.jsonl", "config.json")):
            return False  # incomplete: the trainer resumes it (or skips it, if only the evaluation is missing)
        try:
            evaluated = (d / "eval.json").exists() and "final" in json.loads((d / "eval.json").read_text())
        except ValueError:
            return False
        return (d / "DONE").read_text().strip() == "diverged" or evaluated

    todo = [c for c in configs if not complete(c)]
    if not todo and (runs_dir / "base_eval.json").exists():
        return runs_dir
    train_base_model(model_dir, smoke_config(task, data_dir))  # writes the task's splits first; reused if current
    evaluate_path(model_dir, data_dir, runs_dir / "base_eval.json", settings)  # cached by weights and settings
    # Finished runs whose config and base weights are unchanged are skipped by the trainer itself.
    results = run_sweep(todo, jobs=jobs, progress=False, settings=settings)
    failed = [r for r in results if r["status"] in ("failed", "locked")]
    if failed:
        raise RuntimeError(f"smoke sweep: {len(failed)} run(s) failed or locked by another process, first: "
                           f"{failed[0]['name']}: {failed[0]['error']}")
    done = {r["name"] for r in results}
    records = results + [{"name": c.run_name(), "status": "skipped"} for c in configs if c.run_name() not in done]
    write_json(runs_dir / "sweep.json", {"sweep": str(sweep), "smoke": True,
                                         "runs": sorted(records, key=lambda r: r["name"])})
    return runs_dir


_SWEEP_EXAMPLES = """examples:
  python -m kl_lib.rl.sweep configs/sweep.yaml --dry-run          list the runs and their digests
  python -m kl_lib.rl.sweep configs/sweep.yaml --jobs 2           the short-answer sweep (make sweep)
  python -m kl_lib.rl.sweep configs/study.yaml --order seed       the long-answer study (make study)
  python -m kl_lib.rl.sweep configs/sweep.yaml --smoke --set runs_dir=runs/rl-smoke
  KL_TRACKING=tensorboard python -m kl_lib.rl.sweep ...           also <run_dir>/tensorboard/ (tracking extra)

A sweep file has base (fields shared by every run), eval, smoke and groups (set, seeds, betas, kl);
see configs/sweep.yaml and the docstring of kl_lib.rl.sweep. --set and base/set take these fields:
"""


def _number_list(kind: type) -> Any:
    """An argparse type: a comma-separated list of ``kind`` numbers, with a clear error."""
    def parse(text: str) -> list:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__} numbers, "
                                             "e.g. 0,1") from None
    return parse


def _pattern_list(text: str) -> list[str]:
    """An argparse type: a comma-separated list of shell patterns (``fnmatch``) over run names."""
    patterns = [x.strip() for x in text.split(",") if x.strip()]
    if not patterns:
        raise argparse.ArgumentTypeError(f"{text!r} holds no run-name pattern, e.g. 'nokl-*,*-b1-s*'")
    return patterns


def select_runs(configs: list[RLConfig], seeds: list[int] | None = None, betas: list[float] | None = None,
                patterns: list[str] | None = None) -> list[RLConfig]:
    """The runs of ``configs`` with one of ``seeds``, one of ``betas`` and a name matching one of ``patterns``
    (each ``None`` = no restriction), in their order. A pattern that matches no run of ``configs`` raises
    ``ValueError`` naming it: a mistyped pattern would otherwise drop runs without a word."""
    for pattern in patterns or []:
        if not any(fnmatch.fnmatchcase(c.run_name(), pattern) for c in configs):
            raise ValueError(f"--runs pattern {pattern!r} matches no run of the sweep; list the names with --dry-run")
    return [c for c in configs if (seeds is None or c.seed in seeds) and (betas is None or c.kl.beta in betas)
            and (patterns is None or any(fnmatch.fnmatchcase(c.run_name(), p) for p in patterns))]


def build_parser() -> argparse.ArgumentParser:
    """The sweep's command line; its help lists every config field (``kl_lib.rl.config.fields_help``)."""
    parser = argparse.ArgumentParser(
        prog="python -m kl_lib.rl.sweep", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a sweep of RL fine-tuning runs from a YAML file, in parallel worker processes.\nFinished "
                    "runs with an unchanged config are skipped, interrupted ones resume; every run is evaluated.",
        epilog=_SWEEP_EXAMPLES + "\n" + fields_help())
    parser.add_argument("sweep", help="sweep YAML, e.g. configs/sweep.yaml")
    parser.add_argument("--smoke", action="store_true", help="apply the file's smoke overrides (minutes, for CI)")
    parser.add_argument("--jobs", type=int, default=None, metavar="N",
                        help="runs trained at once, one worker process each with one thread on CPU (default "
                             "$KL_SWEEP_JOBS, else 2)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field in every run, e.g. --set runs_dir=runs/rl-test (repeatable)")
    parser.add_argument("--order", choices=("file", "seed"), default="file",
                        help="file: runs in the order the file defines them (default); seed: every cell's first seed "
                             "before any cell's second, so that a sweep cut short leaves complete seeds")
    parser.add_argument("--seeds", type=_number_list(int), metavar="S[,S...]",
                        help="only the runs with these seeds, e.g. 0 or 0,1 (a subset of the file's design: same "
                             "names and digests, so the rest can be added later)")
    parser.add_argument("--betas", type=_number_list(float), metavar="B[,B...]",
                        help="only the runs with these β, e.g. 0,0.1,1 (0 = the no-KL control)")
    parser.add_argument("--runs", type=_pattern_list, metavar="GLOB[,GLOB...]",
                        help="only the runs whose name matches one of these shell patterns, e.g. 'nokl-*,*-b1-s*' "
                             "(a pattern that matches no run of the design is an error)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    parser.add_argument("--move-aside", action="store_true",
                        help="a run directory holding a run of another config is renamed to <name>.old-<time> and "
                             "the run starts (by default it is reported as failed and left untouched)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.jobs is None:
        try:
            args.jobs = int(os.environ.get("KL_SWEEP_JOBS", "2"))
        except ValueError:
            parser.error(f"KL_SWEEP_JOBS={os.environ['KL_SWEEP_JOBS']!r} is not a whole number of runs trained at "
                         "once; set it to e.g. 2, or pass --jobs")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1 (runs trained at once), got {args.jobs}")
    try:
        spec = load_sweep_spec(args.sweep)
        configs = expand_sweep(spec, smoke=args.smoke, overrides=args.overrides)
        settings = eval_settings(spec, smoke=args.smoke)
        configs = select_runs(configs, args.seeds, args.betas, args.runs)
        if args.order == "seed":
            seeds = sorted({c.seed for c in configs})
            configs = sorted(configs, key=lambda c: seeds.index(c.seed))  # stable: the file's order within a seed
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not configs:
        selected = args.seeds or args.betas or args.runs
        print("error: the sweep defines no runs" + (" with these --seeds/--betas/--runs" if selected else ""),
              file=sys.stderr)
        return 2
    runs_dirs = sorted({c.runs_dir for c in configs})
    print(f"{len(configs)} runs into {', '.join(runs_dirs)}")
    if args.dry_run:
        for c in configs:
            print(f"  {c.run_name():40s} {c.digest()}")
        return 0
    tasks = sorted({(c.task, c.data_dir) for c in configs})
    if len(tasks) > 1:
        print(f"error: a sweep trains on one task; found {tasks}", file=sys.stderr)
        return 2
    task, data_dir = tasks[0]
    settings = dataclasses.replace(settings, task=task)
    for model in sorted({c.model for c in configs}):  # the base model, evaluated like the runs
        for runs_dir in runs_dirs:
            evaluate_path(model, data_dir, Path(runs_dir) / "base_eval.json", settings)
    results = run_sweep(configs, jobs=args.jobs, settings=settings, on_conflict="move" if args.move_aside else "refuse")
    for runs_dir in runs_dirs:
        write_json(Path(runs_dir) / "sweep.json", {"sweep": args.sweep, "smoke": args.smoke, "runs": results})
    failed = [r for r in results if r["status"] == "failed"]
    locked = [r for r in results if r["status"] == "locked"]
    counts = {s: sum(r["status"] == s for r in results) for s in ("done", "skipped", "diverged", "failed", "locked")}
    print(f"sweep finished: {counts}")
    for r in failed:
        print(f"FAILED run {r['name']}: {r['error']}\n{r['traceback']}", file=sys.stderr)
    for r in locked:
        print(f"LOCKED run {r['name']}: {r['error']}", file=sys.stderr)
    return 1 if failed or locked else 0


if __name__ == "__main__":
    sys.exit(main())
