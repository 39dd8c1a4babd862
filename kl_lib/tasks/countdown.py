r"""Countdown: reach a target number with + − × ÷ over given numbers; the paper's off-policy task (Qwen3-4B).

A problem is a list of numbers and a target, e.g. numbers [25, 3, 7], target 46; a solution is an arithmetic
expression that uses **each number exactly once** (the rule of TinyZero's Countdown verifier, which RL work on
Countdown follows), with ``+ - * /``, unary minus and parentheses, and evaluates to the target exactly:
``(25 - 3) * 2`` is not a solution (2 is not given), ``25 + 3 * 7`` is one (25 + 21 = 46).

Generator (:func:`generate_split`): numbers uniform in ``NUMBER_RANGE`` (repeats allowed); the target is built by
combining two random items of the pool with a random operation until one is left, so every problem is solvable by
construction (its solution is stored). "−" keeps the larger operand first and "÷" is only drawn when it divides
exactly (else it becomes "+"), so the stored solution stays in positive integers; a target outside
``TARGET_RANGE`` is redrawn. Deterministic in (split, seed, size).

Splits (:data:`SPLITS`): ``rl_train`` and ``id_test`` have 3 or 4 numbers (half each), ``ood_test`` has 5: one
number more than training ever sees, the out-of-domain generalisation a KL term is meant to protect. A problem is
identified by (multiset of numbers, target); ``write_splits`` draws the test splits first and keeps training
disjoint from them.

Verifier (:func:`reward`): the expression is the content of the last ``<answer>…</answer>`` (else the last
``\boxed{}``), with ``×``/``\times``/``\cdot`` read as ``*``, ``÷``/``\div`` as ``/``, ``−`` as ``-``, ``$`` dropped,
digits in any Unicode script as their ASCII digits (as in every task, see :mod:`kl_lib.tasks.answers`) and anything
from the first ``=`` on ignored. It is parsed with ``ast`` (never ``eval``), at most
:data:`MAX_EXPRESSION_CHARS` characters, and only integer literals, binary ``+ - * /``, unary ``+ -`` and
parentheses are allowed (no names, calls, powers or floats), so it cannot run code or hang. It is evaluated in
exact ``fractions.Fraction`` arithmetic; division by zero, a number used the wrong number of times, or a value
other than the target scores 0, a correct expression 1. ``Problem.answer`` is JSON:
``{"numbers": [...], "target": n, "solution": "..."}``.

Departure from the paper: the paper's Countdown data is not published with it; this follows the common
TinyZero-style 3-to-4-number setup (numbers 1–99) and adds a 5-number out-of-domain split of our own.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from fractions import Fraction
from pathlib import Path

from kl_lib.tasks.answers import ascii_digits, last_boxed
from kl_lib.tasks.base import (
    Problem,
    draw_distinct,
    file_task,
    read_problems,
    register,
    write_disjoint_splits,
    write_splits_main,
)

__all__ = ["DEFAULT_DIR", "MAX_EXPRESSION_CHARS", "NUMBER_RANGE", "SPLITS", "TARGET_RANGE", "evaluate",
           "extract_expression", "generate_split", "load_split", "main", "make_problem", "reward", "verify",
           "write_splits"]

NUMBER_RANGE = (1, 99)  # each given number, inclusive
TARGET_RANGE = (1, 999)  # the target, inclusive
MAX_EXPRESSION_CHARS = 200  # longer candidate expressions score 0 unparsed (5 two-digit numbers need ~40)

# split -> (default size, number counts drawn uniformly per problem)
SPLITS: dict[str, tuple[int, tuple[int, ...]]] = {
    "rl_train": (50_000, (3, 4)),
    "id_test": (500, (3, 4)),
    "ood_test": (500, (5,)),
}

PROMPT = ("Using the numbers {numbers}, write an arithmetic expression that equals {target}. Use each number "
          "exactly once; you may use +, -, *, / and parentheses. Think it through, then give only the expression "
          "inside <answer></answer> tags, for example <answer>(1 + 2) * 3</answer>.")

DEFAULT_DIR = "data/countdown"


# ---------------------------------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------------------------------

def _random_solution(rng: random.Random, numbers: Sequence[int]) -> tuple[Fraction, str]:
    """Combine random pairs of the pool with random operations until one (value, expression) is left."""
    pool = [(Fraction(n), str(n)) for n in numbers]
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        (a, expr_a), (b, expr_b) = pool[i], pool[j]
        op = rng.choice("+-*/")
        if op == "-" and a < b:
            (a, expr_a), (b, expr_b) = (b, expr_b), (a, expr_a)
        if op == "/" and (b == 0 or a % b != 0):  # keep the reference solution in integers
            op = "+"
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else a}[op]
        pool = [item for k, item in enumerate(pool) if k not in (i, j)] + [(value, f"({expr_a} {op} {expr_b})")]
    value, expression = pool[0]
    return value, expression[1:-1] if expression.startswith("(") else expression


def make_problem(rng: random.Random, n_numbers: int, problem_id: str) -> Problem:
    """A solvable problem with ``n_numbers`` numbers; its ``answer`` JSON includes one solution."""
    while True:
        numbers = [rng.randint(*NUMBER_RANGE) for _ in range(n_numbers)]
        target, solution = _random_solution(rng, numbers)
        if target.denominator == 1 and TARGET_RANGE[0] <= target <= TARGET_RANGE[1]:
            break
    target = int(target)
    answer = json.dumps({"numbers": numbers, "target": target, "solution": solution})
    prompt = PROMPT.format(numbers="[" + ", ".join(map(str, numbers)) + "]", target=target)
    return Problem(id=problem_id, skill=f"countdown{n_numbers}", prompt=prompt, answer=answer)


def _key(problem: Problem) -> tuple[tuple[int, ...], int]:
    data = json.loads(problem.answer)
    return tuple(sorted(data["numbers"])), data["target"]


def generate_split(name: str, seed: int = 0, size: int | None = None,
                   exclude: Iterable[tuple[tuple[int, ...], int]] = ()) -> list[Problem]:
    """Problems of one split, deterministic in (name, seed, size); (sorted numbers, target) keys in ``exclude``
    are skipped and keys are unique within the split."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; valid splits are {', '.join(map(repr, SPLITS))}")
    default_size, counts = SPLITS[name]
    size = default_size if size is None else size
    rng = random.Random(f"countdown:{name}:{seed}")
    return draw_distinct(name, size, lambda i: make_problem(rng, rng.choice(counts), f"countdown/{name}/{i}"),
                         key=_key, exclude=exclude)


def write_splits(data_dir: str | os.PathLike = DEFAULT_DIR, seed: int = 0,
                 sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write every split as ``<data_dir>/<split>.jsonl`` (atomically); test splits first, then disjoint training."""
    return write_disjoint_splits(data_dir, ("id_test", "ood_test", "rl_train"), generate_split, _key, seed, sizes)


def load_split(path: str | os.PathLike) -> list[Problem]:
    path = Path(path)
    return read_problems(path, f"create the Countdown data with `python -m kl_lib.tasks.countdown --out {path.parent}`")


# ---------------------------------------------------------------------------------------------------------------
# Verifier
# ---------------------------------------------------------------------------------------------------------------

_ALLOWED_CHARS = re.compile(r"[0-9\s+\-*/()]+")
_REPLACEMENTS = (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"), ("×", "*"), ("·", "*"), ("÷", "/"),
                 ("−", "-"), ("\\left", ""), ("\\right", ""), ("$", ""))


def extract_expression(response: str) -> str | None:
    r"""The candidate expression of a response: the last ``<answer>…</answer>`` (else the last ``\boxed{}``),
    cleaned as the module docstring says; None if there is none."""
    if not isinstance(response, str):
        return None
    response = ascii_digits(response)
    close = response.rfind("</answer>")
    open_ = response.rfind("<answer>", 0, close) if close >= 0 else -1
    if open_ >= 0:
        expression = response[open_ + len("<answer>"):close]
    else:
        expression = last_boxed(response)
        if expression is None:
            return None
    for old, new in _REPLACEMENTS:
        expression = expression.replace(old, new)
    return expression.split("=", 1)[0].strip()


def _evaluate_node(node: ast.AST, used: list[int]) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate_node(node.operand, used)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _evaluate_node(node.left, used), _evaluate_node(node.right, used)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        return a / b  # ZeroDivisionError is caught by evaluate
    raise ValueError(f"not allowed in a Countdown expression: {type(node).__name__}")


def evaluate(expression: str) -> tuple[Fraction, list[int]] | None:
    """(exact value, the integer literals used in order) of a Countdown expression, or None if it is not one
    (too long, a disallowed character or node, a syntax error) or divides by zero. Never raises."""
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    if not _ALLOWED_CHARS.fullmatch(expression):  # also rules out 1_000, 0x10, 1e3, 2.5 before ast sees them
        return None
    try:
        with warnings.catch_warnings():  # "1 (2)" parses with a SyntaxWarning (then fails as a Call node)
            warnings.simplefilter("ignore")
            tree = ast.parse(expression.strip(), mode="eval")
        used: list[int] = []
        value = _evaluate_node(tree.body, used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
        return None
    return value, used


def verify(expression: str, numbers: Sequence[int], target: int) -> bool:
    """Whether ``expression`` uses each of ``numbers`` exactly once and evaluates exactly to ``target``."""
    result = evaluate(expression)
    if result is None:
        return False
    value, used = result
    return Counter(used) == Counter(numbers) and value == target


def reward(response: str, answer: str, finished: bool = True) -> float:
    """1.0 if a finished response's expression solves the problem in ``answer`` (the JSON of ``Problem.answer``),
    else 0.0; never raises on model output (a malformed ``answer`` is a ValueError that says so)."""
    if not finished:
        return 0.0
    expression = extract_expression(response)
    if expression is None:
        return 0.0
    try:
        data = json.loads(answer)
        numbers, target = data["numbers"], data["target"]
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"a Countdown reference answer must be the JSON of Problem.answer, "
                         f'{{"numbers": [...], "target": n, ...}}; got {str(answer)[:80]!r} ({err})') from err
    return float(verify(expression, numbers, target))


TASK = register(file_task(
    "countdown", load_split, reward,
    description="Countdown: 3-4 numbers (RL and in-domain test), 5 numbers (out-of-domain); the off-policy task",
    default_dir=DEFAULT_DIR,
))


def main(argv: list[str] | None = None) -> None:
    write_splits_main(argv, "Write the Countdown task splits as JSONL.", DEFAULT_DIR, write_splits)


if __name__ == "__main__":
    main()
