"""The committed reference export: only finished runs, only the analysable files, replaced atomically."""

import json

import pytest

from kl_lib.rl.config import RLConfig
from kl_lib.study.reference import RUN_FILES, export_reference, main


def _run(root, name, finished=True):
    d = root / name
    (d / "checkpoints" / "step_000002").mkdir(parents=True)
    (d / "checkpoints" / "step_000002" / "model.safetensors").write_bytes(b"\0" * 1000)
    (d / "config.json").write_text(json.dumps({"config": RLConfig(name=name).to_dict(), "digest": "x"}))
    (d / "metrics.jsonl").write_text(json.dumps({"step": 0, "reward/mean": 0.5}) + "\n")
    (d / "eval.json").write_text("{}")
    if finished:
        (d / "summary.json").write_text(json.dumps({"status": "done", "steps_completed": 1}))
        (d / "DONE").write_text("done\n")


def test_export_copies_finished_runs_without_weights_and_replaces_the_old_copy(tmp_path):
    runs, report, out = tmp_path / "runs", tmp_path / "report", tmp_path / "ref" / "study"
    _run(runs, "a-s0")
    _run(runs, "b-s0", finished=False)  # still training: not part of the reference
    (runs / "base_eval.json").write_text("{}")
    (runs / "sweep.json").write_text("{}")
    report.mkdir()
    (report / "findings.json").write_text("[]")
    (report / "fig.png").write_bytes(b"png")
    (report / "index.html").write_text("<html>")
    out.mkdir(parents=True)
    (out / "stale.txt").write_text("from an earlier export")
    assert export_reference(runs, out, report) == ["a-s0"]
    assert sorted(p.name for p in (out / "runs" / "a-s0").iterdir()) == sorted(RUN_FILES)
    assert not (out / "runs" / "b-s0").exists() and not (out / "stale.txt").exists()
    assert (out / "runs" / "base_eval.json").is_file() and (out / "findings.json").is_file()
    assert (out / "fig.png").is_file() and not (out / "index.html").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["study"]  # no temporary or old copies left


def test_export_refuses_a_directory_that_is_not_a_study(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    with pytest.raises(FileNotFoundError, match="base_eval.json is missing"):
        export_reference(tmp_path / "runs", tmp_path / "out")
    assert main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 2
    assert "base_eval.json is missing" in capsys.readouterr().err and not (tmp_path / "out").exists()
