"""Execute one notebook with papermill, atomically, and export it to HTML.

    python -m kl_lib.study.nbrun notebooks/01_kl_estimators.ipynb --out runs/notebooks [--smoke] [-p name value ...]

writes, and only when every cell succeeded,

    <out>/<stem>.meta.json   resolved parameters, git commit, versions, wall time
    <out>/<stem>.html        nbconvert HTML export of the executed notebook (figures embedded)
    <out>/<stem>.ipynb       the executed notebook, moved into place last: it is the Make target
    <out>/<stem>/            whatever the notebook itself writes (its ``output_dir`` parameter)

Contract with the notebooks (tests/test_notebooks.py checks it):

* one cell tagged ``parameters`` declaring at least ``smoke = False`` (cheap settings for tests and CI) and
  ``output_dir = "runs/interactive/<stem>"`` (where figures and tables go); the runner always passes both,
  ``output_dir = <out>/<stem>`` unless ``-p output_dir ...`` says otherwise;
* every ``-p`` name must be declared in that cell. papermill only logs a warning for an unknown name, so a
  typo (``-p sedd 3``) would silently run the defaults; here it is an error that lists the declared names;
* the kernel is the ``kl-compendium`` kernelspec that ``make env`` registers inside ``.venv``;
* the kernel's working directory is the repository root (the nearest ancestor of the notebook holding
  ``pyproject.toml`` and ``kl_lib/``), so paths in notebooks are written from the root: ``runs/...``.
  JupyterLab starts kernels in ``notebooks/`` instead; :func:`chdir_to_repo_root` makes the two agree.

Why a temporary file and a rename. papermill writes the output notebook after each cell and again when a
cell fails, so if its output were the Make target a failed run would leave a file newer than its sources and
the next ``make`` would call it up to date. We execute into a hidden temporary file in ``<out>`` (same
filesystem, so :func:`os.replace` is atomic) and rename it to ``<stem>.ipynb`` only on success. A failed run
is kept as ``<stem>.failed.ipynb`` for debugging; it is never a Make target. A previous successful output is
left where it is: it is older than the changed source, so Make retries it next time.

On failure the last line on stderr is

    FAILED: notebooks/NN_x.ipynb, cell [k] (first line of the cell's source): ExceptionType: message

with ``k`` the 0-based index of the cell in the *source* notebook (papermill's own index counts the
injected-parameters cell it inserts). Exit status: 0 success, 1 the notebook failed, 2 bad invocation.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import logging
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from kl_lib.files import current_umask, environment_info, git_commit, write_text

__all__ = [
    "KERNEL_NAME",
    "REQUIRED_PARAMETERS",
    "UsageError",
    "NotebookFailed",
    "find_repo_root",
    "chdir_to_repo_root",
    "run_notebook",
    "main",
]

KERNEL_NAME = "kl-compendium"
REQUIRED_PARAMETERS = ("smoke", "output_dir")

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class UsageError(Exception):
    """Bad invocation or notebook that breaks the contract above (exit status 2)."""


class NotebookFailed(Exception):
    """A cell raised, a cell timed out or the kernel died (exit status 1); already reported on stderr."""


# ---------------------------------------------------------------------------------------------------------
# Repository root


def find_repo_root(start: Path | str | None = None) -> Path | None:
    """Nearest ancestor of ``start`` (default: the cwd) holding both ``pyproject.toml`` and ``kl_lib/``."""
    here = Path(start if start is not None else Path.cwd()).absolute()
    for candidate in (here, *here.parents):
        if (candidate / "pyproject.toml").is_file() and (candidate / "kl_lib").is_dir():
            return candidate
    return None


def chdir_to_repo_root() -> Path:
    """``os.chdir`` to the repository root and return it, for a notebook's first code cell.

    papermill (via this runner) already starts the kernel there; JupyterLab starts it in ``notebooks/``.
    """
    root = find_repo_root()
    if root is None:
        raise FileNotFoundError(f"no ancestor of {Path.cwd()} holds pyproject.toml and kl_lib/")
    os.chdir(root)
    return root


# ---------------------------------------------------------------------------------------------------------
# Parameters


def parse_value(text: str) -> Any:
    """Type a ``-p`` value the way the papermill CLI does: True/False/None, int, float, else str."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def declared_parameters(nb_path: Path, kernel_name: str = KERNEL_NAME) -> dict[str, str]:
    """``{name: default source}`` of the notebook's ``parameters`` cell; UsageError if it has none.

    Same parser papermill uses (its Python translator), so what we accept is what it injects against.
    """
    import nbformat
    from papermill.translators import papermill_translators

    nb = nbformat.read(nb_path, as_version=4)
    cells = [cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", [])]
    if not cells:
        raise UsageError(f"{nb_path}: no cell is tagged 'parameters'")
    language = nb.metadata.get("kernelspec", {}).get("language", "python")
    translator = papermill_translators.find_translator(kernel_name, language)
    return {p.name: p.default for p in translator.inspect(cells[0])}


def resolve_parameters(declared: dict[str, str], passed: dict[str, Any]) -> dict[str, Any]:
    """Every declared parameter with the value this run uses (defaults evaluated when they are literals)."""
    resolved: dict[str, Any] = {}
    for name, default in declared.items():
        if name in passed:
            resolved[name] = passed[name]
            continue
        try:
            resolved[name] = ast.literal_eval(default)
        except (ValueError, SyntaxError):
            resolved[name] = default  # an expression; recorded as its source
    return resolved


def _relative_to_cwd(path: Path, cwd: Path) -> str:
    """``path`` as the kernel (running in ``cwd``) should see it: relative when inside ``cwd``."""
    try:
        return Path(path).absolute().relative_to(cwd).as_posix()
    except ValueError:
        return str(Path(path).absolute())


# ---------------------------------------------------------------------------------------------------------
# Provenance


def provenance(root: Path, kernel_name: str) -> dict[str, Any]:
    """:func:`kl_lib.files.environment_info` (git commit taken at ``root``) plus the kernel's interpreter."""
    from jupyter_client.kernelspec import KernelSpecManager

    info = environment_info()
    info["git_commit"] = git_commit(root)
    info["kernel"] = {"name": kernel_name, "argv0": KernelSpecManager().get_kernel_spec(kernel_name).argv[0]}
    return info


# ---------------------------------------------------------------------------------------------------------
# Failure report


def _first_line(source: str, width: int = 70) -> str:
    line = next((ln.strip() for ln in source.splitlines() if ln.strip()), "")
    return line if len(line) <= width else line[: width - 1] + "…"


def describe_failure(nb_display: str, source_nb: Any, executed_path: Path | None, exc: BaseException) -> str:
    """The ``FAILED: ...`` line: notebook, failing cell in the source notebook, exception."""
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        ename, evalue = exc.ename, exc.evalue
    else:
        ename, evalue = type(exc).__name__, str(exc)
    evalue = _first_line(_ANSI.sub("", str(evalue)), width=300)
    where = ""
    index = _failed_cell_index(source_nb, executed_path)
    if index is not None:
        where = f", cell [{index}] ({_first_line(source_nb.cells[index].source)})"
    return f"FAILED: {nb_display}{where}: {ename}: {evalue}"


def _failed_cell_index(source_nb: Any, executed_path: Path | None) -> int | None:
    """Index in the source notebook of the cell that failed (or was running when the kernel died)."""
    import nbformat

    if executed_path is None or not executed_path.is_file() or executed_path.stat().st_size == 0:
        return None
    try:
        executed = nbformat.read(executed_path, as_version=4)
    except Exception:  # a half-written file tells us nothing more than the exception already does
        return None
    # Drop papermill's error banners; then the only extra cell is the injected-parameters one.
    cells = [c for c in executed.cells if "papermill-error-cell-tag" not in c.metadata.get("tags", [])]
    injected = 0
    for cell in cells:
        tags = cell.metadata.get("tags", [])
        if "injected-parameters" in tags:
            injected += 1
            continue
        status = cell.metadata.get("papermill", {}).get("status")
        has_error = any(out.get("output_type") == "error" for out in cell.get("outputs", []))
        if status in ("failed", "running") or has_error:
            index = cells.index(cell) - injected
            if 0 <= index < len(source_nb.cells) and source_nb.cells[index].source == cell.source:
                return index
            return None
    return None


# ---------------------------------------------------------------------------------------------------------
# Execution



def run_notebook(
    notebook: Path | str,
    out: Path | str,
    *,
    smoke: bool = False,
    parameters: dict[str, Any] | None = None,
    kernel_name: str = KERNEL_NAME,
    cwd: Path | str | None = None,
    progress_bar: bool = True,
    log_output: bool = False,
    execution_timeout: float | None = None,
) -> Path:
    """Execute ``notebook`` into ``out`` (see the module docstring); return the executed notebook's path.

    Raises UsageError before starting a kernel when the invocation breaks the contract, and NotebookFailed
    (after printing the traceback and then the ``FAILED`` line to stderr) when execution fails.
    """
    import nbformat
    import papermill
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    from nbconvert import HTMLExporter

    nb_path, out = Path(notebook), Path(out)
    if not nb_path.is_file():
        raise UsageError(f"{nb_path}: no such notebook")
    stem = nb_path.stem
    root = find_repo_root(nb_path.parent) or Path.cwd().absolute()
    cwd = Path(cwd).absolute() if cwd is not None else root

    passed = dict(parameters or {})
    if "smoke" in passed:
        raise UsageError("pass --smoke, not -p smoke ...")
    passed["smoke"] = smoke
    passed.setdefault("output_dir", _relative_to_cwd(out / stem, cwd))
    declared = declared_parameters(nb_path, kernel_name)
    missing = [name for name in REQUIRED_PARAMETERS if name not in declared]
    if missing:
        raise UsageError(f"{nb_path}: the parameters cell must declare {', '.join(missing)}")
    unknown = sorted(set(passed) - set(declared))
    if unknown:
        raise UsageError(
            f"{nb_path}: unknown parameter(s) {', '.join(unknown)}; declared: {', '.join(declared)}"
        )
    try:
        KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel:
        raise UsageError(
            f"kernelspec {kernel_name!r} is not registered in this environment; run `make env` "
            f"(or: python -m ipykernel install --sys-prefix --name {kernel_name})"
        ) from None

    out.mkdir(parents=True, exist_ok=True)
    target, failed = out / f"{stem}.ipynb", out / f"{stem}.failed.ipynb"
    fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp.ipynb", dir=out)
    os.fchmod(fd, 0o666 & ~current_umask())  # papermill keeps the mode; a kept .failed.ipynb should be readable
    os.close(fd)
    tmp = Path(tmp_name)
    source_nb = nbformat.read(nb_path, as_version=4)
    started_at = dt.datetime.now(dt.timezone.utc)
    t0 = time.perf_counter()
    try:
        try:
            papermill.execute_notebook(
                str(nb_path),
                str(tmp),
                parameters=passed,
                kernel_name=kernel_name,
                cwd=str(cwd),
                progress_bar=progress_bar,
                log_output=log_output,
                execution_timeout=execution_timeout,
            )
        except Exception as exc:
            keep = tmp.is_file() and tmp.stat().st_size > 0
            if keep:
                os.replace(tmp, failed)
            line = _print_failure(nb_path, source_nb, failed if keep else None, exc)
            raise NotebookFailed(line) from exc
        wall_s = time.perf_counter() - t0

        executed = nbformat.read(tmp, as_version=4)
        # papermill recorded the temporary name; record the real one.
        executed.metadata.setdefault("papermill", {})["output_path"] = str(target)
        meta = {
            "notebook": str(nb_path),
            "executed": str(target),
            "parameters": resolve_parameters(declared, passed),
            "parameters_passed": passed,
            "cwd": str(cwd),
            "started_at": started_at.isoformat(timespec="seconds"),
            "wall_time_s": round(wall_s, 3),
            **provenance(root, kernel_name),
        }
        html, _ = HTMLExporter().from_notebook_node(executed)
        write_text(out / f"{stem}.meta.json", json.dumps(meta, indent=2, default=str) + "\n")
        write_text(out / f"{stem}.html", html)
        write_text(target, nbformat.writes(executed) + "\n")
        failed.unlink(missing_ok=True)
        return target
    finally:
        tmp.unlink(missing_ok=True)


def _print_failure(nb_path: Path, source_nb: Any, failed: Path | None, exc: BaseException) -> str:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError) and exc.traceback:
        print("\n".join(_ANSI.sub("", line) for line in exc.traceback), file=sys.stderr)
    elif not isinstance(exc, PapermillExecutionError):
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
    if failed is not None:
        print(f"executed notebook kept for debugging: {failed}", file=sys.stderr)
    line = describe_failure(str(nb_path), source_nb, failed, exc)
    print(line, file=sys.stderr)
    return line


# ---------------------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m kl_lib.study.nbrun",
        description="Execute a notebook with papermill into OUT/<stem>.ipynb + .html + .meta.json, atomically.",
    )
    p.add_argument("notebook", type=Path, help="source notebook, e.g. notebooks/01_kl_estimators.ipynb")
    p.add_argument("--out", type=Path, required=True, help="output directory, e.g. runs/notebooks")
    p.add_argument("--smoke", action="store_true", help="pass smoke=True (cheap settings); default smoke=False")
    p.add_argument(
        "-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
        help="set a declared parameter (typed as the papermill CLI does: True/False/None, int, float, str)",
    )
    p.add_argument("--kernel", default=KERNEL_NAME, help=f"kernelspec name (default {KERNEL_NAME})")
    p.add_argument("--cwd", type=Path, default=None, help="kernel working directory (default: repo root)")
    p.add_argument(
        "--progress-bar", action=argparse.BooleanOptionalAction, default=None,
        help="papermill's per-cell progress bar (default: on when stderr is a terminal)",
    )
    p.add_argument("--log-output", action="store_true", help="stream cell outputs to stderr as they run")
    p.add_argument("--timeout", type=float, default=None, help="per-cell timeout in seconds (default none)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.log_output else logging.WARNING, format="%(message)s")
    params: dict[str, Any] = {}
    for name, value in args.parameter:
        if name in params:
            print(f"error: parameter {name!r} given twice", file=sys.stderr)
            return 2
        params[name] = parse_value(value)
    try:
        target = run_notebook(
            args.notebook,
            args.out,
            smoke=args.smoke,
            parameters=params,
            kernel_name=args.kernel,
            cwd=args.cwd,
            progress_bar=sys.stderr.isatty() if args.progress_bar is None else args.progress_bar,
            log_output=args.log_output,
            execution_timeout=args.timeout,
        )
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NotebookFailed:  # already reported on stderr, FAILED line last
        return 1
    print(f"wrote {target} (+ .html, .meta.json)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
