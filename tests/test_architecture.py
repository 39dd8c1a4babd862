"""The package reads as one house: layers, no private or hidden imports, no cycles, short functions, docstrings.

Rules checked on the source of every module under ``kl_lib/`` (parsed with :mod:`ast`, nothing is imported):

(a) layering: a module imports kl_lib modules of its own layer or below only:
    0 core ``kl_lib`` (the package), ``kl_lib.estimators``, ``kl_lib.config``, ``kl_lib.objectives``,
      ``kl_lib.files``; 1 ``kl_lib.toy.*``, ``kl_lib.audit.*``, ``kl_lib.lm.*``, ``kl_lib.tasks.*``; 2 ``kl_lib.rl.*``;
    3 ``kl_lib.study.*``. The one exception is the entry-point shim ``kl_lib/nbrun.py``, which must stay a
    shim (no function or class definitions);
(b) no private name (``_name``) imported from, or read off, another kl_lib module;
(c) no kl_lib import inside a function (optional third-party dependencies may stay lazy);
(d) no import cycle among kl_lib modules (every import counts, wherever it stands);
(e) no function longer than 80 lines unless the line right above its ``def`` (or first decorator) is a
    comment ``# long: <why>``;
(f) every module opens with a docstring.

Each failure names the file, the line and the rule. The ``test_checker_*`` tests run the same checks on a small
package written to ``tmp_path`` so that a check which silently finds nothing would be noticed.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "kl_lib"
MAX_FUNCTION_LINES = 80
LONG_MARK = "# long:"
SHIM = "kl_lib.nbrun"
CORE = ("kl_lib", "kl_lib.estimators", "kl_lib.config", "kl_lib.objectives", "kl_lib.files")
LAYERS = {"toy": 1, "lm": 1, "tasks": 1, "audit": 1, "rl": 2, "study": 3}
LAYER_NAMES = {0: "core", 1: "toy/lm/tasks", 2: "rl", 3: "study"}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.rule}] {self.message}"


@dataclass
class Module:
    name: str
    path: Path
    rel: str
    tree: ast.Module
    lines: list[str]
    is_package: bool


@dataclass(frozen=True)
class Edge:
    """One import of a kl_lib module: ``target`` is the module, ``names`` what was taken from it."""

    source: str
    target: str
    line: int
    names: tuple[str, ...] = ()
    in_function: bool = False


@dataclass
class Package:
    modules: dict[str, Module] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------
# Reading the package


def load_package(root: Path, package: str = PACKAGE) -> Package:
    """Every module under ``root/package`` (parsed) and every import of one of them."""
    pkg = Package()
    for path in sorted((root / package).rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        source = path.read_text()
        pkg.modules[name] = Module(
            name, path, path.relative_to(root).as_posix(), ast.parse(source, str(path)), source.splitlines(),
            is_package,
        )
    for module in pkg.modules.values():
        pkg.edges.extend(_imports(module, pkg.modules))
    return pkg


def _function_nodes(tree: ast.AST) -> set[ast.AST]:
    """Every node that stands inside a function body."""
    inside: set[ast.AST] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for child in ast.walk(node):
                if child is not node:
                    inside.add(child)
    return inside


def _resolve_relative(module: Module, level: int, name: str | None) -> str:
    base = module.name.split(".")
    if not module.is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)] if level > 1 else base
    return ".".join([*base, name] if name else base)


def _imports(module: Module, known: dict[str, Module]) -> list[Edge]:
    inside = _function_nodes(module.tree)
    edges: list[Edge] = []
    for node in ast.walk(module.tree):
        local = node in inside
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    edges.append(Edge(module.name, alias.name, node.lineno, (), local))
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, node.level, node.module) if node.level else (node.module or "")
            if base != PACKAGE and not base.startswith(PACKAGE + "."):
                continue
            plain: list[str] = []
            for alias in node.names:
                if f"{base}.{alias.name}" in known:  # ``from package import submodule``
                    edges.append(Edge(module.name, f"{base}.{alias.name}", node.lineno, (), local))
                else:
                    plain.append(alias.name)
            if plain:
                edges.append(Edge(module.name, base, node.lineno, tuple(plain), local))
    return edges


def layer_of(name: str) -> int | None:
    """Layer of a kl_lib module, or None for a module that is in no layer."""
    if name in CORE:
        return 0
    parts = name.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


# ---------------------------------------------------------------------------------------------------------
# The rules


def check_layering(pkg: Package) -> list[Violation]:
    found = []
    for name, module in pkg.modules.items():
        if name != SHIM and layer_of(name) is None:
            found.append(Violation(module.rel, 1, "layering", f"{name} belongs to no layer"))
    for edge in pkg.edges:
        if edge.source == SHIM:
            continue
        rel = pkg.modules[edge.source].rel
        source_layer, target_layer = layer_of(edge.source), layer_of(edge.target)
        if edge.target not in pkg.modules:
            found.append(Violation(rel, edge.line, "layering", f"imports {edge.target}, which does not exist"))
        elif target_layer is None:
            found.append(Violation(rel, edge.line, "layering", f"imports {edge.target}, which is in no layer"))
        elif source_layer is not None and target_layer > source_layer:
            found.append(Violation(
                rel, edge.line, "layering",
                f"{edge.source} (layer {source_layer}, {LAYER_NAMES[source_layer]}) imports {edge.target} "
                f"(layer {target_layer}, {LAYER_NAMES[target_layer]}): import only from your layer or below",
            ))
    return found


def check_shim(pkg: Package) -> list[Violation]:
    module = pkg.modules.get(SHIM)
    if module is None:
        return []
    return [
        Violation(module.rel, node.lineno, "shim", f"{SHIM} must stay an entry-point shim: it defines {node.name}")
        for node in ast.walk(module.tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    ]


def check_private_imports(pkg: Package) -> list[Violation]:
    found = []
    for edge in pkg.edges:
        if edge.target == edge.source:
            continue
        rel = pkg.modules[edge.source].rel
        private_parts = [part for part in edge.target.split(".") if _private(part)]
        if private_parts:
            found.append(Violation(rel, edge.line, "private", f"imports the private module {edge.target}"))
        for name in edge.names:
            if _private(name):
                found.append(Violation(
                    rel, edge.line, "private", f"imports the private name {name} from {edge.target}",
                ))
    for module in pkg.modules.values():
        found.extend(_private_attributes(module, pkg))
    return found


def _private_attributes(module: Module, pkg: Package) -> list[Violation]:
    """``alias._name`` where ``alias`` is bound to another kl_lib module by an import."""
    aliases: dict[str, str] = {}
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in pkg.modules:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_relative(module, node.level, node.module) if node.level else (node.module or "")
            for alias in node.names:
                if f"{base}.{alias.name}" in pkg.modules:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
    return [
        Violation(module.rel, node.lineno, "private", f"reads the private name {node.attr} of {aliases[node.value.id]}")
        for node in ast.walk(module.tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
        and aliases[node.value.id] != module.name and _private(node.attr)
    ]


def check_function_local_imports(pkg: Package) -> list[Violation]:
    return [
        Violation(
            pkg.modules[edge.source].rel, edge.line, "local-import",
            f"imports {edge.target} inside a function: import kl_lib modules at the top of the module",
        )
        for edge in pkg.edges
        if edge.in_function
    ]


def check_cycles(pkg: Package) -> list[Violation]:
    graph: dict[str, dict[str, int]] = {name: {} for name in pkg.modules}
    for edge in pkg.edges:
        if edge.target in graph and edge.target != edge.source:
            graph[edge.source].setdefault(edge.target, edge.line)
    found = []
    for component in _strongly_connected(graph):
        if len(component) < 2:
            continue
        cycle = _cycle_in(graph, component)
        steps = " -> ".join([*cycle, cycle[0]])
        first = pkg.modules[cycle[0]]
        found.append(Violation(first.rel, graph[cycle[0]][cycle[1]], "cycle", f"circular import: {steps}"))
    return found


def _strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative), components in discovery order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _cycle_in(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """One cycle through the first module of a strongly connected component (breadth-first, shortest)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(graph[node]):
            if child == start:
                return paths[node]
            if child in members and child not in paths:
                paths[child] = [*paths[node], child]
                queue.append(child)
    raise AssertionError(f"no cycle through {start} in {component}")


def check_function_length(pkg: Package) -> list[Violation]:
    found = []
    for module in pkg.modules.values():
        for node in ast.walk(module.tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            if length <= MAX_FUNCTION_LINES:
                continue
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            above = module.lines[first - 2].strip() if first >= 2 else ""
            if above.startswith(LONG_MARK) and above[len(LONG_MARK):].strip():
                continue
            found.append(Violation(
                module.rel, node.lineno, "long-function",
                f"{node.name} is {length} lines (limit {MAX_FUNCTION_LINES}): split it into named steps, or put "
                f"'{LONG_MARK} <why>' on the line above the def",
            ))
    return found


def check_docstrings(pkg: Package) -> list[Violation]:
    return [
        Violation(module.rel, 1, "docstring", f"{module.name} has no module docstring")
        for module in pkg.modules.values()
        if not (ast.get_docstring(module.tree) or "").strip()
    ]


RULES = {
    "layering": check_layering,
    "shim": check_shim,
    "private": check_private_imports,
    "local-import": check_function_local_imports,
    "cycle": check_cycles,
    "long-function": check_function_length,
    "docstring": check_docstrings,
}


# ---------------------------------------------------------------------------------------------------------
# The package


@pytest.fixture(scope="module")
def kl_lib_package() -> Package:
    return load_package(ROOT)


def test_every_layer_is_present(kl_lib_package: Package) -> None:
    """Guards the rules below against checking nothing (a moved package, a wrong root)."""
    names = set(kl_lib_package.modules)
    assert set(CORE) <= names, sorted(set(CORE) - names)
    assert {"kl_lib.toy", "kl_lib.lm", "kl_lib.tasks", "kl_lib.rl", "kl_lib.study", SHIM} <= names
    assert len(kl_lib_package.edges) > 40, len(kl_lib_package.edges)


@pytest.mark.parametrize("rule", RULES)
def test_rule_holds(kl_lib_package: Package, rule: str) -> None:
    found = RULES[rule](kl_lib_package)
    assert not found, f"{len(found)} violation(s) of rule {rule!r}:\n" + "\n".join(map(str, found))


# ---------------------------------------------------------------------------------------------------------
# The checker itself, on a package that breaks every rule once


BROKEN = {
    "kl_lib/__init__.py": '"""Core."""\n',
    "kl_lib/estimators.py": '"""Core."""\nfrom kl_lib.study.report import build\n',
    "kl_lib/files.py": '"""Core."""\n',
    "kl_lib/nbrun.py": '"""Shim."""\nfrom kl_lib.study.report import build\n\ndef main():\n    return build()\n',
    "kl_lib/extra.py": '"""In no layer."""\n',
    "kl_lib/toy/__init__.py": '"""Toy."""\n',
    "kl_lib/toy/a.py": (
        '"""A."""\nfrom kl_lib.toy.b import _helper\nfrom kl_lib.toy import b\n\n'
        "def f():\n    import kl_lib.files\n    import json\n    return b._other\n"
    ),
    "kl_lib/toy/b.py": '"""B."""\nfrom . import a\n\ndef _helper():\n    pass\n',
    "kl_lib/rl/__init__.py": "",
    "kl_lib/study/__init__.py": '"""Study."""\n',
    "kl_lib/study/report.py": (
        '"""Report."""\n\ndef build():\n' + "    x = 1\n" * 80 + "\n\n# long: one table row per line\ndef table():\n"
        + "    x = 1\n" * 80 + "\n\n# long:\n@staticmethod\ndef empty_reason():\n" + "    x = 1\n" * 80
    ),
}


@pytest.fixture
def broken(tmp_path: Path) -> Package:
    for rel, text in BROKEN.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return load_package(tmp_path)


def _found(pkg: Package, rule: str) -> set[str]:
    return {f"{v.path}:{v.line}" for v in RULES[rule](pkg)}


def test_checker_finds_layering_violations(broken: Package) -> None:
    assert _found(broken, "layering") == {"kl_lib/estimators.py:2", "kl_lib/extra.py:1"}
    assert _found(broken, "shim") == {"kl_lib/nbrun.py:4"}


def test_checker_finds_private_imports(broken: Package) -> None:
    assert _found(broken, "private") == {"kl_lib/toy/a.py:2", "kl_lib/toy/a.py:8"}


def test_checker_finds_function_local_imports_of_kl_lib_only(broken: Package) -> None:
    assert _found(broken, "local-import") == {"kl_lib/toy/a.py:6"}


def test_checker_finds_cycles(broken: Package) -> None:
    (violation,) = check_cycles(broken)
    assert violation.message == "circular import: kl_lib.toy.a -> kl_lib.toy.b -> kl_lib.toy.a", violation


def test_checker_finds_long_functions_without_a_reason(broken: Package) -> None:
    messages = [str(v) for v in check_function_length(broken)]
    assert [m.split(" is ")[0] for m in messages] == [
        "kl_lib/study/report.py:3: [long-function] build",
        "kl_lib/study/report.py:172: [long-function] empty_reason",
    ], messages
    assert "build is 81 lines (limit 80)" in messages[0]


def test_checker_finds_missing_docstrings(broken: Package) -> None:
    assert _found(broken, "docstring") == {"kl_lib/rl/__init__.py:1"}
