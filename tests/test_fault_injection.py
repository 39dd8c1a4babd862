"""Faults done for real to a tiny model's RL runs: nothing is lost, and a resumed run's metrics are an
uninterrupted run's (``time/*`` aside).

* ``kill -9`` of a training process mid-run (its lock left behind, stale) and resumption;
* a second process on a run directory that one is training (refused, naming the holder; a sweep reports it);
* ``kill -9`` of one sweep worker (its run reported failed, the others finish, a second sweep resumes it);
* a torn last line of ``metrics.jsonl``; a damaged line before the end;
* a truncated and a bit-flipped newest checkpoint (the older intact one is used);
* a pickle that would run code, where a checkpoint belongs (refused, never unpickled);
* a changed config on a finished run (refused, nothing touched; moved aside on request), a model typo or a dtype
  the device lacks on a finished run's name (refused before anything is written);
* a full disk: a small tmpfs where this machine allows mounting one (root), and always a file-size limit
  (``RLIMIT_FSIZE``, writes fail with ``EFBIG``) in a subprocess; the error names the file and the run resumes.
"""

import contextlib
import hashlib
import importlib
import json
import os
import pickle
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from kl_lib.rl.checkpoints import (
    CheckpointError,
    DiskFullError,
    RunConflictError,
    evaluate_run,
    load_checkpoint,
)
from kl_lib.rl.config import RLConfig
from kl_lib.rl.runlock import RunLockedError
from kl_lib.rl.sweep import main as sweep_main
from kl_lib.rl.sweep import run_sweep
from kl_lib.rl.train import main as train_main
from kl_lib.rl.train import train
from kl_lib.study.tables import results_table

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


def _cfg(tiny, runs_dir=None, **kw):
    root, model_dir = tiny
    base = {"model": str(model_dir), "data_dir": str(root / "data"), "steps": STEPS, "prompts_per_step": 4,
            "group_size": 2, "max_new_tokens": 4, "lr": 1e-3, "runs_dir": str(runs_dir or root / "runs"),
            "checkpoint_every": 2}
    return RLConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def straight(tiny):
    """The uninterrupted run every faulty one is compared with."""
    result = train(_cfg(tiny, name="straight"), progress=False)
    assert result.status == "done"
    return _rows(result.run_dir)


def _rows(run_dir):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
            for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _tree(d):
    """Every file under ``d`` with its SHA-256: to show that nothing was touched."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).rglob("*"))
            if p.is_file()}


def _cli(cfg, tmp_path, *args, limit=None):
    """``python -m kl_lib.rl.train`` on ``cfg`` in a subprocess (optionally under a file-size limit)."""
    config = tmp_path / f"{cfg.name}.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))

    def file_size_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, not a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.Popen([sys.executable, "-m", "kl_lib.rl.train", "--config", str(config), "--no-progress", *args],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=file_size_limit if limit else None)


def _wait_for(condition, proc, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the training process ended before {what}: {proc.communicate()[1][-2000:]}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _lines(path):
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_kill_9_mid_run_then_a_second_process_is_refused_and_the_run_resumes(tiny, straight, tmp_path):
    """A CLI run holds the run directory: a second trainer, the CLI and a sweep are refused naming its pid and
    nothing is mixed; ``kill -9`` after its third step leaves a stale lock that the resumption takes over, and
    the resumed metrics are the uninterrupted run's."""
    cfg = _cfg(tiny, name="killed")
    run_dir = Path(cfg.runs_dir) / cfg.name
    proc = _cli(cfg, tmp_path)
    try:
        _wait_for(lambda: _lines(run_dir / "metrics.jsonl") >= 1, proc, "the first step")
        with pytest.raises(RunLockedError, match=rf"in use by pid {proc.pid} on host .* since "):
            train(cfg, progress=False)
        threads = torch.get_num_threads()
        try:
            [record] = run_sweep([cfg], jobs=1, progress=False)
        finally:
            torch.set_num_threads(threads)  # the sweep's worker setting must not change this process's numbers
        assert record["status"] == "locked" and f"pid {proc.pid}" in record["error"]
        _wait_for(lambda: _lines(run_dir / "metrics.jsonl") >= 3, proc, "the third step")
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    assert not (run_dir / "DONE").exists() and (run_dir / "LOCK").exists()
    assert json.loads((run_dir / "LOCK").read_text())["pid"] == proc.pid
    with pytest.warns(UserWarning, match=rf"taking over a stale lock left by pid {proc.pid}"):
        result = train(cfg, progress=False)
    assert result.status == "done" and _rows(run_dir) == straight
    assert not (run_dir / "LOCK").exists()  # released at the end


def test_the_cli_refuses_a_locked_run_with_one_line(tiny, capsys):
    cfg = _cfg(tiny, name="held")
    run_dir = Path(cfg.runs_dir) / cfg.name
    run_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], "
                               "os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, "
                               "b'{\"pid\": %d, \"host\": \"h\", \"started\": \"t\"}' % os.getpid()); "
                               "print(flush=True); time.sleep(60)", str(run_dir / "LOCK")],
                              stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()  # the lock is held
        assert train_main(["--set", f"model={cfg.model}", "--set", f"data_dir={cfg.data_dir}", "--set",
                           f"runs_dir={cfg.runs_dir}", "--set", "name=held", "--no-progress"]) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"in use by pid {holder.pid} on host 'h'" in err
    assert sorted(p.name for p in run_dir.iterdir()) == ["LOCK"]  # nothing else was written


def test_a_torn_metrics_line_is_dropped_and_a_damaged_one_is_named(tiny, straight):
    cfg = _cfg(tiny, name="torn")
    train(cfg, stop_after=3, progress=False)  # checkpoint at 2, metrics of steps 0..2
    metrics = Path(cfg.runs_dir) / "torn" / "metrics.jsonl"
    intact = metrics.read_text()
    metrics.write_text(intact + '{"step": 3, "reward/me')  # the disk filled (or the power went) mid-line
    with pytest.warns(UserWarning, match=r"metrics.jsonl:4: dropping a torn last line"):
        assert train(cfg, progress=False).status == "done"
    assert _rows(metrics.parent) == straight
    lines = intact.splitlines()
    metrics.write_text("\n".join([lines[0], lines[1][:30], lines[2]]) + "\n")  # damage before the end: not a tear
    (metrics.parent / "DONE").unlink()
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not a metrics row; the file is damaged before its end"):
        train(cfg, progress=False)


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(tiny, straight, damage):
    cfg = _cfg(tiny, name=f"damaged-{damage}", keep_checkpoints=1)  # the minimum: the newest and one older
    train(cfg, stop_after=4, progress=False)
    ckpts = sorted((Path(cfg.runs_dir) / cfg.name / "checkpoints").glob("step_*"))
    assert [c.name for c in ckpts] == ["step_000002", "step_000004"]
    weights = ckpts[-1] / "trainable.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="trainable.safetensors is damaged"):
        load_checkpoint(ckpts[-1])
    with pytest.warns(UserWarning, match="skipping a damaged checkpoint.*step_000004"):
        result = train(cfg, progress=False)
    assert result.status == "done" and _rows(result.run_dir) == straight


class _Exploit:
    """Unpickling this creates a file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_malicious_pickle_where_a_checkpoint_belongs_is_never_unpickled(tiny, tmp_path):
    cfg = _cfg(tiny, name="pickled", steps=2)
    result = train(cfg, progress=False)
    ckpt = result.run_dir / "checkpoints" / "step_000002"
    marker = tmp_path / "pwned"
    # the old format: a pickled state.pt and nothing else
    old = result.run_dir / "checkpoints" / "step_000001"
    old.mkdir()
    (old / "state.pt").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(CheckpointError, match="old pickle format.*unpickling a file can run code"):
        load_checkpoint(old)
    # the new format with the weights replaced by a pickle and a manifest that matches it
    for name in ("trainable.safetensors", "optimizer.safetensors"):
        (ckpt / name).write_bytes(pickle.dumps(_Exploit(marker)))
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    manifest["files"].update({n: hashlib.sha256((ckpt / n).read_bytes()).hexdigest()
                              for n in ("trainable.safetensors", "optimizer.safetensors")})
    (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="is not a valid checkpoint"):
        load_checkpoint(ckpt)
    (result.run_dir / "final").rename(result.run_dir / "final.bak")  # so that evaluation opens the checkpoints
    with pytest.raises(CheckpointError):
        evaluate_run(result.run_dir, cfg.data_dir)
    (result.run_dir / "DONE").unlink()
    with pytest.raises(CheckpointError, match="old pickle format"), \
            pytest.warns(UserWarning, match="step_000002 is not a valid checkpoint"):
        train(cfg, progress=False)  # resuming skips the invalid newest checkpoint and refuses the old one
    assert not marker.exists()


def test_a_finished_run_of_the_old_checkpoint_format_is_kept_and_skipped(tiny):
    """Runs finished before checkpoints became safetensors (a pickled ``state.pt``) stay finished and skipped; more
    steps for one is refused (nothing read, nothing changed) instead of unpickling its checkpoint."""
    cfg = _cfg(tiny, name="oldformat", steps=2)
    run_dir = train(cfg, progress=False).run_dir
    for ckpt in (run_dir / "checkpoints").iterdir():
        for f in ckpt.iterdir():
            f.unlink()
        (ckpt / "state.pt").write_bytes(pickle.dumps({"step": 2}))
    before = _tree(run_dir)
    assert train(cfg, progress=False).status == "skipped"
    with pytest.raises(RunConflictError, match=r"holds this run with steps=2, which cannot be continued \(.*old "
                                               r"pickle format.*\); nothing was changed"):
        train(_cfg(tiny, name="oldformat", steps=4), progress=False)
    assert _tree(run_dir) == before


def test_no_file_is_unpickled_anywhere_in_kl_lib():
    """Run directories and data are read as JSON, JSONL, YAML (with safe loaders) and safetensors only."""
    sources = {p: p.read_text() for p in (ROOT / "kl_lib").rglob("*.py")}
    for needle in ("torch.load(", "import pickle", "pickle.load", "yaml.unsafe_load", "yaml.full_load", "np.load(",
                   "numpy.load(", "yaml.Loader", "yaml.FullLoader", "yaml.UnsafeLoader"):
        assert not [str(p) for p, text in sources.items() if needle in text], needle
    for path, text in sources.items():  # every yaml.load names a loader derived from yaml.SafeLoader
        calls = list(re.finditer(r"yaml\.load\((.*)", text))
        if not calls:
            continue  # (importing every module would run entry points such as kl_lib/audit/__main__.py)
        module = importlib.import_module(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for call in calls:
            loader = re.search(r"Loader=(\w+)", call.group(1))
            assert loader and issubclass(getattr(module, loader.group(1)), yaml.SafeLoader), f"{path}: {call.group()}"


def test_a_changed_config_never_touches_a_finished_run(tiny, tmp_path):
    """Refused with the changed field and the way out; a model typo or a dtype the device lacks is refused before
    anything is written; with move-aside the old run is kept whole under <name>.old-<time>."""
    cfg = _cfg(tiny, name="finished", steps=2)
    run_dir = train(cfg, progress=False).run_dir
    before = _tree(run_dir)
    changed = _cfg(tiny, name="finished", steps=2, lr=2e-3)
    with pytest.raises(RunConflictError, match=r"holds another run \(changed lr: 0\.001 → 0\.002\); nothing was "
                                               r"changed\. Train under a new name .* --move-aside"):
        train(changed, progress=False)
    with pytest.raises(FileNotFoundError):
        train(_cfg(tiny, name="finished", steps=2, model=str(tmp_path / "typo")), progress=False)
    with pytest.raises(ValueError, match="bfloat16"):
        train(_cfg(tiny, name="finished", steps=2, lr=2e-3, device="cpu", dtype="bfloat16"), progress=False)
    assert _tree(run_dir) == before
    with pytest.warns(UserWarning, match=r"moved the run that was in .*finished to .*finished\.old-"):
        result = train(changed, progress=False, on_conflict="move")
    assert result.status == "done"
    [aside] = [p for p in run_dir.parent.iterdir() if p.name.startswith("finished.old-")]
    assert _tree(aside) == before
    assert json.loads((run_dir / "config.json").read_text())["config"]["lr"] == 2e-3
    assert "finished.old-" not in " ".join(results_table(run_dir.parent)["run"])  # the old run is not a result


def _full_disk_then_resume(cfg, straight, error_text):
    """The run stopped with ``error_text`` naming a file; it resumes to the uninterrupted run's metrics."""
    run_dir = Path(cfg.runs_dir) / cfg.name
    assert not (run_dir / "DONE").exists() and not list((run_dir / "checkpoints").glob(".step_*"))
    assert "make room and rerun the same command" in error_text
    result = train(cfg, progress=False)
    assert result.status == "done" and _rows(run_dir) == straight


def test_a_full_disk_on_a_small_tmpfs(tiny, straight, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    # one checkpoint (~280 kB) fits, the second does not
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=420k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here (needs root); the RLIMIT_FSIZE test covers a full disk")
    try:
        cfg = _cfg(tiny, runs_dir=mount, name="tmpfs")
        with pytest.raises(DiskFullError, match=r"No space left on device while writing .*tmpfs/checkpoints/"
                                                r"\.step_000004\.tmp/") as err:
            train(cfg, progress=False)
        assert (mount / "tmpfs" / "checkpoints" / "step_000002" / "MANIFEST.json").exists()
        subprocess.run(["mount", "-o", "remount,size=16m", str(mount)], check=True)
        _full_disk_then_resume(cfg, straight, str(err.value))
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_write_error_under_a_file_size_limit(tiny, straight, tmp_path):
    """RLIMIT_FSIZE in the training subprocess: the first checkpoint's optimizer state (~180 kB) is past the limit."""
    cfg = _cfg(tiny, name="fsize")
    proc = _cli(cfg, tmp_path, limit=120_000)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-2000:]
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: [Errno 27] File too large while writing ") and "optimizer.safetensors" in line
    _full_disk_then_resume(cfg, straight, line)


def test_a_killed_sweep_worker_fails_only_its_run_and_the_run_resumes(tiny):
    """``kill -9`` of one of two sweep workers mid-run: the other run finishes, the killed one is reported failed
    naming the signal (the sweep is not aborted), and a second sweep resumes it to the metrics of the same run
    swept uninterrupted (workers train with one thread, so that is the run to compare with)."""
    root, _ = tiny
    runs = root / "sweep-kill"
    killed, other = _cfg(tiny, runs, name="killed"), _cfg(tiny, runs, name="other", seed=1)
    lock, metrics = runs / "killed" / "LOCK", runs / "killed" / "metrics.jsonl"
    threads, records = torch.get_num_threads(), {}
    sweep = threading.Thread(target=lambda: records.update(
        {r["name"]: r for r in run_sweep([killed, other], jobs=2, progress=False)}))
    sweep.start()
    try:
        deadline = time.monotonic() + 120
        while not (lock.exists() and _lines(metrics) >= 1):
            assert sweep.is_alive() and time.monotonic() < deadline, "the killed run never started"
            time.sleep(0.005)
        os.kill(json.loads(lock.read_text())["pid"], signal.SIGKILL)
    finally:
        sweep.join(timeout=300)
        torch.set_num_threads(threads)
    assert not sweep.is_alive()
    assert records["other"]["status"] == "done"
    assert records["killed"]["status"] == "failed" and "killed by SIGKILL" in records["killed"]["error"]
    assert not (runs / "killed" / "DONE").exists()
    [again] = run_sweep([killed], jobs=2, progress=False)
    [uninterrupted] = run_sweep([_cfg(tiny, runs, name="uninterrupted")], jobs=2, progress=False)
    assert again["status"] == uninterrupted["status"] == "done"
    assert _rows(runs / "killed") == _rows(runs / "uninterrupted")


def test_a_sweep_needs_at_least_one_job(tiny, capsys):
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        run_sweep([_cfg(tiny, name="never")], jobs=0, progress=False)
    with pytest.raises(SystemExit) as exit_:
        sweep_main(["configs/sweep.yaml", "--jobs", "0"])
    assert exit_.value.code == 2 and "--jobs must be at least 1" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as env, pytest.raises(SystemExit) as exit_:
        env.setenv("KL_SWEEP_JOBS", "two")
        sweep_main(["configs/sweep.yaml", "--dry-run"])
    assert exit_.value.code == 2 and "KL_SWEEP_JOBS='two' is not a whole number" in capsys.readouterr().err
