"""Committed reference results: a study's analysable files, small enough for git, re-analysable without training.

    python -m kl_lib.study.reference --runs runs/study --report runs/report --out runs/reference/study

Copies, for every *finished* run under ``--runs``, the files the analysis reads (``config.json``, ``summary.json``,
``metrics.jsonl``, ``eval.json``, ``DONE``; no checkpoints or weights: ~170 KB per run instead of ~24 MB), plus
``base_eval.json`` and ``sweep.json``, into ``<out>/runs/``; and the report's tables and figures (``*.csv``,
``*.json``, ``*.png`` of ``--report``) into ``<out>/``. ``kl_lib.study.tables.load_tables`` reads
``<out>/runs`` like the original directory, so the notebooks and the report can be rerun on the committed results
(``-p runs_dir runs/reference/study/runs``). The copy is built in a temporary directory next to ``<out>`` and
renamed into place, so an interrupted export leaves the previous reference intact.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from kl_lib.study.runs import is_finished

__all__ = ["RUN_FILES", "export_reference", "main"]

RUN_FILES = ("config.json", "summary.json", "metrics.jsonl", "eval.json", "DONE")
"""What the analysis reads from a run directory."""

REPORT_SUFFIXES = (".csv", ".json", ".png")  # PNG figures; the SVG copies stay in the report


def export_reference(runs_dir: str | Path, out_dir: str | Path, report_dir: str | Path | None = None) -> list[str]:
    """Copy the finished runs' analysable files (and the report's tables and figures) to ``out_dir``, replacing
    it atomically; returns the names of the runs copied."""
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    if not (runs_dir / "base_eval.json").is_file():
        raise FileNotFoundError(f"{runs_dir}/base_eval.json is missing: is {runs_dir} a study's runs directory "
                                "(make study)?")
    runs = sorted(d for d in runs_dir.iterdir() if d.is_dir() and is_finished(d))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for name in ("base_eval.json", "sweep.json"):
            if (runs_dir / name).is_file():
                (tmp / "runs").mkdir(exist_ok=True)
                shutil.copy2(runs_dir / name, tmp / "runs" / name)
        for run in runs:
            (tmp / "runs" / run.name).mkdir(parents=True)
            for name in RUN_FILES:
                if (run / name).is_file():
                    shutil.copy2(run / name, tmp / "runs" / run.name / name)
        if report_dir is not None:
            for f in sorted(Path(report_dir).iterdir()):
                if f.is_file() and f.suffix in REPORT_SUFFIXES:
                    shutil.copy2(f, tmp / f.name)
        old = out_dir.with_name(f".{out_dir.name}.old")
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [r.name for r in runs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kl_lib.study.reference", description=__doc__.split("\n\n")[0],
                                     epilog="example: python -m kl_lib.study.reference --runs runs/study "
                                            "--report runs/report --out runs/reference/study")
    parser.add_argument("--runs", required=True, metavar="DIR", help="a study's runs directory, e.g. runs/study")
    parser.add_argument("--report", metavar="DIR", help="its report directory (tables and figures), e.g. runs/report")
    parser.add_argument("--out", required=True, metavar="DIR", help="where the reference goes, e.g. runs/reference/study")
    args = parser.parse_args(argv)
    try:
        copied = export_reference(args.runs, args.out, args.report)
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(copied)} finished runs copied to {args.out}/runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
