"""The task registry and what every task shares: problems, splits, JSONL files, disjoint split generation.

See ``kl_lib.tasks`` for what a task is; the tasks themselves live in the sibling modules and register here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from collections.abc import Callable, Hashable, Iterable
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path

from kl_lib.files import atomic_write

__all__ = ["SPLIT_NAMES", "Problem", "Task", "answer_reward", "draw_distinct", "draw_from_mixture", "file_task",
           "get_task", "problems_digest", "read_problems", "register", "task_names", "write_disjoint_splits",
           "write_problems", "write_splits_main", "write_splits_parser"]

SPLIT_NAMES = ("rl_train", "id_test", "ood_test")


@dataclass(frozen=True)
class Problem:
    id: str
    skill: str  # sub-task or source subset (e.g. "add3", "math/algebra", "mmlu/college_physics")
    prompt: str  # the user message, ready for the chat template
    answer: str  # the reference answer in the form the task's reward compares against


@dataclass(frozen=True)
class Task:
    name: str
    load: Callable[[str, str | None], list[Problem]]
    """``load(split, source) -> list[Problem]``; ``split`` is one of ``splits``."""
    reward: Callable[[str, Problem, bool], float]
    """``reward(response, problem, finished) -> float`` in [0, 1]; never raises."""
    splits: tuple[str, ...] = SPLIT_NAMES
    description: str = ""
    default_source: str | None = None
    """Where ``load`` looks when no source is given (documentation; ``load`` applies it)."""
    extra: dict = field(default_factory=dict)

    def load_split(self, split: str, source: str | None = None) -> list[Problem]:
        if split not in self.splits:
            raise ValueError(f"task {self.name!r} has no split {split!r}; its splits are {', '.join(self.splits)}")
        return self.load(split, source)


def answer_reward(reward: Callable[[str, str, bool], float]) -> Callable[[str, Problem, bool], float]:
    """A task's ``reward(response, problem, finished)`` from one that scores against ``problem.answer``."""
    return lambda response, problem, finished: reward(response, problem.answer, finished)


def file_task(name: str, load_split: Callable[[Path], list[Problem]], reward: Callable[[str, str, bool], float],
              description: str, default_dir: str) -> Task:
    """A task whose splits are the files ``<source or default_dir>/<split>.jsonl`` (read by ``load_split``) and
    whose ``reward(response, answer, finished)`` scores against ``Problem.answer``."""
    return Task(name=name, load=lambda split, source: load_split(Path(source or default_dir) / f"{split}.jsonl"),
                reward=answer_reward(reward), description=description, default_source=default_dir)


_REGISTRY: dict[str, Task] = {}


def _declaration(task: Task) -> tuple:
    """What a task's source declares; a module executed twice (``python -m kl_lib.tasks.arithmetic`` imports it as
    ``kl_lib.tasks.arithmetic`` and runs it as ``__main__``) declares the same one twice."""
    def code(f):
        return getattr(f, "__code__", f)
    return task.name, code(task.load), code(task.reward), task.splits, task.description, task.default_source


def register(task: Task) -> Task:
    """Add ``task`` to the registry and return it; a second declaration of the same task (the module run again)
    returns the first, and a different task under a registered name is an error."""
    registered = _REGISTRY.get(task.name)
    if registered is not None:
        if _declaration(registered) != _declaration(task):
            raise ValueError(f"task {task.name!r} is already registered; give the new task another name")
        return registered
    _REGISTRY[task.name] = task
    return task


def task_names() -> list[str]:
    """The names of the registered tasks, sorted."""
    return sorted(_REGISTRY)


def get_task(name: str) -> Task:
    """The registered task called ``name``; the error lists the known tasks."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; known tasks are {', '.join(map(repr, sorted(_REGISTRY)))}")
    return _REGISTRY[name]


def problems_digest(problems: list[Problem]) -> str:
    """A digest of the problems (ids, prompts, answers, in order): identifies a run's data wherever it came from."""
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps(astuple(p)).encode())
    return h.hexdigest()[:16]


def write_problems(path: str | os.PathLike, problems: list[Problem]) -> Path:
    """Write problems as JSONL, atomically (a temporary file renamed into place)."""
    path = Path(path)
    with atomic_write(path) as f:
        for p in problems:
            f.write(json.dumps(asdict(p)) + "\n")
    return path


def read_problems(path: str | os.PathLike, how_to_create: str) -> list[Problem]:
    """Problems from a JSONL file; a missing file raises an error that says ``how_to_create`` it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; {how_to_create}")
    with open(path) as f:
        return [Problem(**json.loads(line)) for line in f if line.strip()]


def draw_distinct(split: str, size: int, draw: Callable[[int], Problem], key: Callable[[Problem], Hashable],
                  exclude: Iterable[Hashable] = ()) -> list[Problem]:
    """``size`` problems ``draw(index)`` whose ``key`` is new: not in ``exclude`` and not drawn before.

    Rejection sampling with a bound on the attempts, so that asking for more distinct problems than a generator
    can make fails with a clear error instead of looping forever.
    """
    seen = set(exclude)
    problems: list[Problem] = []
    attempts = 0
    while len(problems) < size:
        attempts += 1
        if attempts > 50 * size + 1000:
            raise ValueError(f"split {split!r}: cannot draw {size} distinct problems; ask for fewer")
        problem = draw(len(problems))
        k = key(problem)
        if k in seen:
            continue
        seen.add(k)
        problems.append(problem)
    return problems



def draw_from_mixture(split: str, splits: dict[str, tuple[int, dict[str, float]]],
                      make_problem: Callable[[str, random.Random, int], Problem], seed_key: str,
                      size: int | None = None, exclude: Iterable[Hashable] = ()) -> list[Problem]:
    """``size`` problems of ``split`` (default: its size in ``splits``) with distinct prompts, none in
    ``exclude``: each of a skill drawn from the split's mixture ``{skill: weight}`` and made by
    ``make_problem(skill, rng, index)``, all from ``random.Random(seed_key)``, so a split is deterministic in
    its key."""
    if split not in splits:
        raise ValueError(f"unknown split {split!r}; valid splits are {', '.join(map(repr, splits))}")
    default_size, mixture = splits[split]
    rng = random.Random(seed_key)
    skills, weights = zip(*mixture.items())
    return draw_distinct(split, default_size if size is None else size,
                         lambda i: make_problem(rng.choices(skills, weights)[0], rng, i),
                         key=lambda p: p.prompt, exclude=exclude)

def write_disjoint_splits(data_dir: str | os.PathLike, order: tuple[str, ...],
                          generate: Callable[..., list[Problem]], key: Callable[[Problem], Hashable], seed: int,
                          sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write ``<data_dir>/<split>.jsonl`` for each split in ``order`` (atomically), each drawn by
    ``generate(split, seed, size, exclude=keys of the earlier splits)``: list test splits first, and training
    data never repeats a test problem. ``sizes`` overrides the generator's default size per split."""
    sizes = sizes or {}
    unknown = set(sizes) - set(order)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; valid splits are {', '.join(map(repr, order))}")
    out: dict[str, Path] = {}
    seen: set = set()
    for name in order:
        problems = generate(name, seed, sizes.get(name), exclude=seen)
        seen.update(key(p) for p in problems)
        out[name] = write_problems(Path(data_dir) / f"{name}.jsonl", problems)
    return out


def write_splits_parser(description: str, default_dir: str,
                        write_splits: Callable[..., dict[str, Path]]) -> argparse.ArgumentParser:
    """The parser of :func:`write_splits_main`, named after the module of ``write_splits``
    (``python -m kl_lib.tasks.arithmetic``, also when that module runs as ``__main__``)."""
    spec = sys.modules[write_splits.__module__].__spec__
    prog = f"python -m {spec.name if spec is not None else write_splits.__module__}"
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     epilog=f"example: {prog} --out {default_dir} --size rl_train=1000")
    parser.add_argument("--out", default=default_dir, metavar="DIR",
                        help=f"directory to write <split>.jsonl to (default {default_dir})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated problems (default 0)")
    parser.add_argument("--size", action="append", default=[], metavar="SPLIT=N",
                        help="override a split's size, e.g. --size rl_train=1000 (repeatable)")
    return parser


def write_splits_main(argv: list[str] | None, description: str, default_dir: str,
                      write_splits: Callable[..., dict[str, Path]]) -> None:
    """The command line of a generated task: ``--out DIR --seed N [--size SPLIT=N ...]`` calls
    ``write_splits(out, seed=, sizes=)`` and prints each split's size."""
    parser = write_splits_parser(description, default_dir, write_splits)
    args = parser.parse_args(argv)
    sizes = {}
    for item in args.size:
        name, _, number = item.partition("=")
        if not number.isdigit():
            parser.error(f"--size expects SPLIT=N, got {item!r}")
        sizes[name] = int(number)
    for name, path in write_splits(args.out, seed=args.seed, sizes=sizes).items():
        print(f"{name:9s} {len(path.read_text().splitlines()):6d} problems -> {path}")
