"""Execute one notebook with papermill, atomically, and export it to HTML.

    python -m kl_lib.study.nbrun notebooks/01_kl_estimators.ipynb --out runs/notebooks [--smoke] \
        [-p NAME VALUE ...] [-y YAML ...] [-f FILE ...]

writes, and only when every cell succeeded,

    <out>/<stem>.meta.json   resolved parameters, git commit, versions, wall time
    <out>/<stem>.html        nbconvert HTML export of the executed notebook (figures embedded)
    <out>/<stem>.ipynb       the executed notebook, moved into place last: it is the Make target
    <out>/<stem>/            whatever the notebook itself writes (its ``output_dir`` parameter)

Contract with the notebooks (tests/test_notebooks.py checks it):

* one cell tagged ``parameters`` declaring at least ``smoke = False`` (cheap settings for tests and CI) and
  ``output_dir = "runs/interactive/<stem>"`` (where figures and tables go); the runner always passes both,
  ``output_dir = <out>/<stem>`` unless ``-p output_dir ...`` says otherwise;
* every parameter passed must be declared in that cell. papermill only logs a warning for an unknown name, so
  a typo (``-p sedd 3``) would silently run the defaults; here it is an error that lists the declared names;
* a value must have the type of the declared default (or of its annotation, ``n: int = 3``): bool, int, float
  (an int is accepted and passed as a float), str, list (a tuple default takes a list too) or dict; a default
  that is ``None`` or not a constant expression takes any value. ``-p NAME VALUE`` text is read as that type
  (``-p seed abc`` for ``seed = 0`` is an error naming ``seed`` and ``int``; a str parameter takes the text as
  typed), or as the papermill CLI reads it when the type is open. Lists and dicts are passed as YAML, as with
  papermill: ``-y/--parameters_yaml 'YAML'`` and ``-f/--parameters_file FILE`` (a mapping each; later ones
  override earlier ones, files before ``-y`` before ``-p``). Elements of lists and dicts are not checked.
  All of this is checked before a kernel starts;
* the kernel is the ``kl-compendium`` kernelspec that ``make env`` registers inside ``.venv``;
* the kernel's working directory is the repository root (the nearest ancestor of the notebook holding
  ``pyproject.toml`` and ``kl_lib/``), so paths in notebooks are written from the root: ``runs/...``.
  JupyterLab starts kernels in ``notebooks/`` instead; :func:`chdir_to_repo_root` makes the two agree.

Why a temporary file and a rename. papermill writes the output notebook after each cell and again when a
cell fails, so if its output were the Make target a failed run would leave a file newer than its sources and
the next ``make`` would call it up to date. We execute into a hidden temporary file in ``<out>`` (same
filesystem, so :func:`os.replace` is atomic) and rename it to ``<stem>.ipynb`` only on success. A failed run
is kept as ``<stem>.failed.ipynb`` for debugging; it is never a Make target. A previous successful output is
left where it is: it is older than the changed source, so Make retries it next time. The temporary file is
``.<stem>.<pid>.<random>.tmp.ipynb`` and is removed on success, on failure and on SIGTERM or Ctrl-C; a run
killed outright (SIGKILL, power loss) leaves it behind, so each run first removes the leftovers of earlier
runs of the same stem: those whose writer process is gone (no process with that id, or one started after the
file was last written) and those without a process id that are older than this run.

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
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import yaml

from kl_lib.files import current_umask, environment_info, git_commit, write_text

__all__ = [
    "KERNEL_NAME",
    "REQUIRED_PARAMETERS",
    "UsageError",
    "NotebookFailed",
    "Declared",
    "find_repo_root",
    "chdir_to_repo_root",
    "MissingPrerequisite",
    "require",
    "parse_value",
    "declared_parameters",
    "type_text",
    "check_value",
    "read_yaml_parameters",
    "check_parameters",
    "remove_stale_temporaries",
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


class MissingPrerequisite(FileNotFoundError):
    """What a notebook reads is not built yet; the message names the one command that builds it."""


def require(paths: Sequence[str | os.PathLike], command: str, minutes: float) -> None:
    """For a notebook's first cells in full mode: raise :class:`MissingPrerequisite` naming ``command`` (e.g.
    ``make sweep``) and how long it takes unless every path exists (relative to the current directory, the
    repository root after :func:`chdir_to_repo_root`)."""
    missing = [str(p) for p in paths if not Path(p).exists()]
    if missing:
        raise MissingPrerequisite(
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: run `{command}` in a terminal at "
            f"the repository root {Path.cwd()} (about {minutes:g} min on 2 CPU cores), then run this notebook "
            "again; or set smoke = True in the parameters cell for a quick miniature")


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


class Declared(NamedTuple):
    """A parameter of the notebook's ``parameters`` cell: its default's source and the type values must have."""

    default: str
    type: type | None
    """bool, int, float, str, list, tuple or dict; None when any value goes (default None or an expression)."""


_TYPES = {t.__name__: t for t in (bool, int, float, str, list, tuple, dict)}
_CONSTANT_NODES = (ast.Expression, ast.Constant, ast.BinOp, ast.UnaryOp, ast.List, ast.Tuple, ast.Dict,
                   ast.operator, ast.unaryop, ast.Load)


def _constant(source: str) -> Any:
    """The value of a constant expression (``5_000_000``, ``[1, 2]``, ``2**16``); ValueError for anything else."""
    try:
        return ast.literal_eval(source)
    except (ValueError, SyntaxError):
        pass
    try:
        tree = ast.parse(source, mode="eval")
    except SyntaxError:
        raise ValueError(source) from None
    if not all(isinstance(node, _CONSTANT_NODES) for node in ast.walk(tree)):
        raise ValueError(source)
    return eval(compile(tree, "<default>", "eval"), {"__builtins__": {}})  # constants and operators only


def _declared_type(default: str, annotation: str) -> type | None:
    if annotation in _TYPES:
        return _TYPES[annotation]
    try:
        value = _constant(default)
    except (ValueError, ArithmeticError):
        return None
    return type(value) if type(value) in _TYPES.values() else None


def declared_parameters(nb_path: Path, kernel_name: str = KERNEL_NAME) -> dict[str, Declared]:
    """``{name: Declared}`` of the notebook's ``parameters`` cell; UsageError if it has none.

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
    return {p.name: Declared(p.default, _declared_type(p.default, p.inferred_type_name))
            for p in translator.inspect(cells[0])}


def _type_error(name: str, declared: Declared, got: str) -> UsageError:
    expected = declared.type.__name__
    hint = ""
    if declared.type in (list, tuple, dict):
        hint = "; pass lists and dicts as YAML: -y/--parameters_yaml 'NAME: VALUE' or -f/--parameters_file FILE"
    return UsageError(f"parameter {name!r} expects {expected} (declared default {declared.default}), got {got}{hint}")


def type_text(name: str, text: str, declared: Declared) -> Any:
    """A ``-p NAME TEXT`` value read as the declared type (papermill's CLI typing when the type is open)."""
    expected = declared.type
    if expected is None:
        return parse_value(text)
    if expected is str:
        return text
    if expected is bool and text in ("True", "False", "true", "false"):
        return text.lower() == "true"
    if expected in (int, float):
        try:
            return expected(text)
        except ValueError:
            pass
    raise _type_error(name, declared, f"{text!r}")


def check_value(name: str, value: Any, declared: Declared) -> Any:
    """``value`` if it has the declared type (an int for a float parameter comes back as a float)."""
    expected = declared.type
    if expected is None:
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    accepted = (list, tuple) if expected is tuple else (expected,)
    if isinstance(value, accepted) and not (expected is int and isinstance(value, bool)):
        return value
    raise _type_error(name, declared, f"{value!r} ({type(value).__name__})")


class _NoDatesLoader(yaml.SafeLoader):
    """YAML without timestamp parsing, as papermill reads parameters (a date stays the string it was)."""


_NoDatesLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def read_yaml_parameters(texts: Sequence[str] = (), files: Sequence[Path | str] = ()) -> dict[str, Any]:
    """Merge YAML mappings: every file, then every text, later keys overriding earlier ones (as papermill)."""
    merged: dict[str, Any] = {}
    sources = [(f"--parameters_file {f}", Path(f)) for f in files] + [(f"--parameters_yaml {t!r}", t) for t in texts]
    for where, source in sources:
        try:
            text = source.read_text() if isinstance(source, Path) else source
            loaded = yaml.load(text, Loader=_NoDatesLoader)
        except OSError as exc:
            raise UsageError(f"{where}: cannot read it ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise UsageError(f"{where}: not valid YAML: {' '.join(str(exc).split())}") from None
        if loaded is None:
            continue
        if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
            raise UsageError(f"{where}: must be a YAML mapping of parameter names to values, got {loaded!r}")
        merged.update(loaded)
    return merged


def check_parameters(
    nb_path: Path, declared: dict[str, Declared], passed: dict[str, Any], texts: dict[str, str]
) -> dict[str, Any]:
    """Every passed value (``texts`` from ``-p``, overriding ``passed``) typed and checked against ``declared``."""
    missing = [name for name in REQUIRED_PARAMETERS if name not in declared]
    if missing:
        raise UsageError(f"{nb_path}: the parameters cell must declare {', '.join(missing)}")
    unknown = sorted((set(passed) | set(texts)) - set(declared))
    if unknown:
        raise UsageError(
            f"{nb_path}: unknown parameter(s) {', '.join(unknown)}; declared: {', '.join(declared)}"
        )
    checked = {name: check_value(name, value, declared[name]) for name, value in passed.items()}
    checked.update({name: type_text(name, text, declared[name]) for name, text in texts.items()})
    return checked


def resolve_parameters(declared: dict[str, Declared], passed: dict[str, Any]) -> dict[str, Any]:
    """Every declared parameter with the value this run uses (defaults evaluated when they are literals)."""
    resolved: dict[str, Any] = {}
    for name, parameter in declared.items():
        if name in passed:
            resolved[name] = passed[name]
            continue
        try:
            resolved[name] = ast.literal_eval(parameter.default)
        except (ValueError, SyntaxError):
            resolved[name] = parameter.default  # an expression; recorded as its source
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
# Temporary outputs

_TMP_SUFFIX = ".tmp.ipynb"


def _temporary_output(out: Path, stem: str) -> Path:
    """An empty ``.<stem>.<pid>.<random>.tmp.ipynb`` in ``out`` (same filesystem as the target)."""
    fd, name = tempfile.mkstemp(prefix=f".{stem}.{os.getpid()}.", suffix=_TMP_SUFFIX, dir=out)
    os.fchmod(fd, 0o666 & ~current_umask())  # papermill keeps the mode; a kept .failed.ipynb should be readable
    os.close(fd)
    return Path(name)


def _process_state(pid: int) -> tuple[str, float] | None:
    """(state letter, start time in seconds since the epoch) of process ``pid`` from /proc; None if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        btime = next(ln for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime "))
        return fields[0], float(btime.split()[1]) + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, StopIteration, ValueError):
        return None


def _writer_gone(pid: int, last_written: float) -> bool:
    """Whether process ``pid`` cannot be the one that last wrote a file at ``last_written``."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, owned by someone else
    state = _process_state(pid)
    # A zombie has finished; a process started after the last write (1 s: /proc's boot time is whole seconds)
    # holds a reused id.
    return state is not None and (state[0] == "Z" or state[1] > last_written + 1.0)


def remove_stale_temporaries(out: Path, stem: str, started: float) -> list[Path]:
    """Remove the temporary notebooks that earlier runs of ``stem`` left in ``out`` (module docstring).

    ``started``: this run's start (seconds since the epoch); a leftover without a process id in its name
    (an older runner's) is removed when it was last written before that. Returns the removed paths.
    """
    with_pid = re.compile(rf"\.{re.escape(stem)}\.(\d+)\.[a-z0-9_]+{re.escape(_TMP_SUFFIX)}")
    without_pid = re.compile(rf"\.{re.escape(stem)}\.[a-z0-9_]+{re.escape(_TMP_SUFFIX)}")
    removed = []
    for path in sorted(out.glob(f".{stem}.*{_TMP_SUFFIX}")):
        try:
            last_written = path.stat().st_mtime
        except FileNotFoundError:
            continue
        match = with_pid.fullmatch(path.name)
        if match:
            stale = _writer_gone(int(match.group(1)), last_written)
        else:
            stale = without_pid.fullmatch(path.name) is not None and last_written < started
        if stale:
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# ---------------------------------------------------------------------------------------------------------
# Execution


def _check_kernel(kernel_name: str) -> None:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(kernel_name)
    except NoSuchKernel:
        raise UsageError(
            f"kernelspec {kernel_name!r} is not registered in this environment; run `make env` "
            f"(or: python -m ipykernel install --sys-prefix --name {kernel_name})"
        ) from None


def _run_parameters(
    nb_path: Path, declared: dict[str, Declared], smoke: bool, output_dir: str,
    parameters: dict[str, Any], texts: dict[str, str],
) -> dict[str, Any]:
    """The parameters papermill injects: ``smoke``, ``output_dir`` (unless passed) and the checked values."""
    if "smoke" in parameters or "smoke" in texts:
        raise UsageError("pass --smoke, not a parameter smoke")
    given = {"smoke": smoke, **parameters}
    if "output_dir" not in given and "output_dir" not in texts:
        given["output_dir"] = output_dir
    return check_parameters(nb_path, declared, given, texts)


def _execute(nb_path: Path, source_nb: Any, tmp: Path, failed: Path, passed: dict[str, Any],
             options: dict[str, Any]) -> float:
    """papermill into ``tmp``; returns the wall time. On failure a non-empty ``tmp`` is kept as ``failed``,
    the failure is reported on stderr and NotebookFailed raised."""
    import papermill

    t0 = time.perf_counter()
    try:
        papermill.execute_notebook(str(nb_path), str(tmp), parameters=passed, **options)
    except Exception as exc:
        keep = tmp.is_file() and tmp.stat().st_size > 0
        if keep:
            os.replace(tmp, failed)
        line = _print_failure(nb_path, source_nb, failed if keep else None, exc)
        raise NotebookFailed(line) from exc
    return time.perf_counter() - t0


def _write_outputs(out: Path, stem: str, tmp: Path, meta: dict[str, Any]) -> Path:
    """``<stem>.meta.json``, ``<stem>.html`` and, last, ``<stem>.ipynb`` from the executed ``tmp``."""
    import nbformat
    from nbconvert import HTMLExporter

    target = out / f"{stem}.ipynb"
    executed = nbformat.read(tmp, as_version=4)
    # papermill recorded the temporary name; record the real one.
    executed.metadata.setdefault("papermill", {})["output_path"] = str(target)
    html, _ = HTMLExporter().from_notebook_node(executed)
    write_text(out / f"{stem}.meta.json", json.dumps(meta, indent=2, default=str) + "\n")
    write_text(out / f"{stem}.html", html)
    write_text(target, nbformat.writes(executed) + "\n")
    (out / f"{stem}.failed.ipynb").unlink(missing_ok=True)
    return target


def run_notebook(
    notebook: Path | str,
    out: Path | str,
    *,
    smoke: bool = False,
    parameters: dict[str, Any] | None = None,
    parameter_texts: dict[str, str] | None = None,
    kernel_name: str = KERNEL_NAME,
    cwd: Path | str | None = None,
    progress_bar: bool = True,
    log_output: bool = False,
    execution_timeout: float | None = None,
) -> Path:
    """Execute ``notebook`` into ``out`` (see the module docstring); return the executed notebook's path.

    ``parameters``: typed values (Python, YAML); ``parameter_texts``: ``-p NAME TEXT`` values, read as the
    declared types and overriding ``parameters``. Raises UsageError before starting a kernel when the
    invocation breaks the contract, and NotebookFailed (after printing the traceback and then the ``FAILED``
    line to stderr) when execution fails.
    """
    import nbformat

    nb_path, out = Path(notebook), Path(out)
    if not nb_path.is_file():
        raise UsageError(f"{nb_path}: no such notebook")
    stem = nb_path.stem
    root = find_repo_root(nb_path.parent) or Path.cwd().absolute()
    cwd = Path(cwd).absolute() if cwd is not None else root
    declared = declared_parameters(nb_path, kernel_name)
    passed = _run_parameters(nb_path, declared, smoke, _relative_to_cwd(out / stem, cwd), dict(parameters or {}),
                             dict(parameter_texts or {}))
    _check_kernel(kernel_name)

    started_at = dt.datetime.now(dt.timezone.utc)
    out.mkdir(parents=True, exist_ok=True)
    for path in remove_stale_temporaries(out, stem, started_at.timestamp()):
        print(f"removed {path}, left by an earlier run that was killed", file=sys.stderr)
    source_nb = nbformat.read(nb_path, as_version=4)
    tmp = _temporary_output(out, stem)
    try:
        options = {"kernel_name": kernel_name, "cwd": str(cwd), "progress_bar": progress_bar,
                   "log_output": log_output, "execution_timeout": execution_timeout}
        wall_s = _execute(nb_path, source_nb, tmp, out / f"{stem}.failed.ipynb", passed, options)
        meta = {
            "notebook": str(nb_path),
            "executed": str(out / f"{stem}.ipynb"),
            "parameters": resolve_parameters(declared, passed),
            "parameters_passed": passed,
            "cwd": str(cwd),
            "started_at": started_at.isoformat(timespec="seconds"),
            "wall_time_s": round(wall_s, 3),
            **provenance(root, kernel_name),
        }
        return _write_outputs(out, stem, tmp, meta)
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
        help="set a declared parameter, read as the type of its default (papermill's CLI typing when open)",
    )
    p.add_argument(
        "-y", "--parameters_yaml", action="append", default=[], metavar="YAML",
        help="parameters as a YAML mapping, e.g. -y 'staleness: [0.0, 0.5]' (lists, dicts); -p overrides it",
    )
    p.add_argument(
        "-f", "--parameters_file", action="append", default=[], type=Path, metavar="FILE",
        help="parameters from a YAML file (a mapping); -y and -p override it",
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


def _parameter_texts(pairs: Sequence[Sequence[str]]) -> dict[str, str]:
    texts: dict[str, str] = {}
    for name, value in pairs:
        if name in texts:
            raise UsageError(f"parameter {name!r} given twice")
        texts[name] = value
    return texts


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM (``kill``, a CI timeout) as SystemExit, so that ``finally`` removes the temporary notebook."""
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.log_output else logging.WARNING, format="%(message)s")
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        target = run_notebook(
            args.notebook,
            args.out,
            smoke=args.smoke,
            parameters=read_yaml_parameters(args.parameters_yaml, args.parameters_file),
            parameter_texts=_parameter_texts(args.parameter),
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
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"wrote {target} (+ .html, .meta.json)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
