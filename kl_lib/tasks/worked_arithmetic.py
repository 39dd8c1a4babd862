"""Column arithmetic written out digit by digit: long, verifiable answers (30–60 tokens) for the RL study.

A problem is ``"<a><op><b>="``; the answer works the columns from the right, one step per column, then states
the result after ``" ="``:

    4736+2958=   →   6+8+0=14 3+5+1=9 7+9+0=16 4+2+1=7 =7694
    5203-1867=   →   3-7-0=-4+10=6 0-6-1=-7+10=3 2-8-1=-7+10=3 5-1-1=3 =3336

Addition steps are ``x+y+carry=sum`` (the next carry is sum's tens digit); subtraction steps are
``x−y−borrow=d`` and, when d < 0, ``+10=d+10`` (then the next borrow is 1). Operands have the same number of
digits (``b`` zero-padded in the steps); only the characters ``0-9 + - = `` and space appear, so the character
tokenizer of :func:`kl_lib.lm.models.build_tokenizer` covers the task unchanged.

Skills (see ``SKILLS``): ``add2``/``sub2`` (2 digits), ``add4``/``sub4`` (4 digits, a ≥ b for subtraction).
Splits (``SPLITS``): ``sft`` is mostly the 2-digit skills and a little of the 4-digit ones (so the base model
*partly* knows them); ``rl_train`` and ``id_test`` are ``add4``; ``ood_test`` is ``sub4``, written with borrows,
a skill RL on addition does not train. Deterministic from a seed; test problems never appear in training
splits (:func:`kl_lib.tasks.base.write_disjoint_splits`).

Reward (:func:`reward`): 1 if the response is finished (end-of-sequence within the budget) and the integer after
its *last* ``" ="`` is exactly the answer (spaces and leading zeros allowed, any Unicode digits, see
:mod:`kl_lib.tasks.answers`), else 0; never raises. **The worked steps are not graded**: only the final answer
is; a response with wrong steps and the right result earns 1 (the steps are what makes the answer long and
what the model conditions its result on).

Departure from the paper: MATH chains of thought (hundreds of tokens, free text) are replaced by a fixed
scratchpad format a small from-scratch model can learn on a CPU; what matters for the study is that answers are
tens of tokens long, so a sequence-summed KL is tens of times a token's, as in the paper.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from pathlib import Path

from kl_lib.tasks.answers import integer_reward
from kl_lib.tasks.base import (
    Problem,
    draw_from_mixture,
    file_task,
    read_problems,
    register,
    write_disjoint_splits,
    write_splits_main,
)

__all__ = ["ANSWER_MARK", "DEFAULT_DIR", "SKILLS", "SPLITS", "final_answer", "generate_split", "load_split",
           "make_problem", "reward", "worked_addition", "worked_subtraction", "write_splits"]

ANSWER_MARK = " ="
DEFAULT_DIR = "data/worked_arithmetic"


def worked_addition(a: int, b: int, digits: int) -> str:
    """The column addition of ``a + b`` (each < 10**digits), right to left, then ``" =<a+b>"``."""
    steps, carry = [], 0
    for x, y in zip(reversed(f"{a:0{digits}d}"), reversed(f"{b:0{digits}d}")):
        total = int(x) + int(y) + carry
        steps.append(f"{x}+{y}+{carry}={total}")
        carry = total // 10
    return " ".join(steps) + f"{ANSWER_MARK}{a + b}"


def worked_subtraction(a: int, b: int, digits: int) -> str:
    """The column subtraction of ``a − b`` (a ≥ b, each < 10**digits) with borrows, then ``" =<a−b>"``."""
    if a < b:
        raise ValueError(f"worked_subtraction needs a ≥ b, got {a} - {b}")
    steps, borrow = [], 0
    for x, y in zip(reversed(f"{a:0{digits}d}"), reversed(f"{b:0{digits}d}")):
        d = int(x) - int(y) - borrow
        steps.append(f"{x}-{y}-{borrow}={d}" + (f"+10={d + 10}" if d < 0 else ""))
        borrow = int(d < 0)
    return " ".join(steps) + f"{ANSWER_MARK}{a - b}"


def _add(rng: random.Random, digits: int) -> tuple[str, str, str]:
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    return f"{a}+{b}=", worked_addition(a, b, digits), str(a + b)


def _sub(rng: random.Random, digits: int) -> tuple[str, str, str]:
    lo, hi = 10 ** (digits - 1), 10 ** digits - 1
    a, b = sorted((rng.randint(lo, hi), rng.randint(lo, hi)), reverse=True)
    return f"{a}-{b}=", worked_subtraction(a, b, digits), str(a - b)


SKILLS = {
    "add2": lambda rng: _add(rng, 2),
    "sub2": lambda rng: _sub(rng, 2),
    "add4": lambda rng: _add(rng, 4),
    "sub4": lambda rng: _sub(rng, 4),
}

# split name -> (size, {skill: weight}); sizes are the defaults of write_splits.
SPLITS: dict[str, tuple[int, dict[str, float]]] = {
    "sft": (40_000, {"add2": 0.4, "sub2": 0.4, "add4": 0.1, "sub4": 0.1}),
    "rl_train": (5_000, {"add4": 1.0}),
    "id_test": (300, {"add4": 1.0}),
    "ood_test": (300, {"sub4": 1.0}),
}


def make_problem(skill: str, rng: random.Random, index: int) -> Problem:
    """One problem of ``skill``; its ``answer`` is the worked solution (what SFT trains on and the reward checks
    the final result of)."""
    if skill not in SKILLS:
        raise ValueError(f"unknown skill {skill!r}; valid skills are {', '.join(map(repr, SKILLS))}")
    prompt, worked, _ = SKILLS[skill](rng)
    return Problem(id=f"{skill}-{index}", skill=skill, prompt=prompt, answer=worked)


def generate_split(name: str, seed: int = 0, size: int | None = None, exclude: Iterable[str] = ()) -> list[Problem]:
    """Problems of one split, deterministic in (name, seed, size), unique prompts, none in ``exclude``."""
    return draw_from_mixture(name, SPLITS, make_problem, f"worked_arithmetic:{name}:{seed}", size, exclude)


def write_splits(data_dir: str | os.PathLike = DEFAULT_DIR, seed: int = 0,
                 sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write every split as ``<data_dir>/<split>.jsonl``; test splits first, then disjoint training splits."""
    return write_disjoint_splits(data_dir, ("id_test", "ood_test", "rl_train", "sft"), generate_split,
                                 lambda p: p.prompt, seed, sizes)


def load_split(path: str | os.PathLike) -> list[Problem]:
    return read_problems(path, "create the data with `python -m kl_lib.tasks.worked_arithmetic` "
                               "(or kl_lib.tasks.worked_arithmetic.write_splits)")


def final_answer(text: object) -> str | None:
    """The text after the last ``" ="`` (the stated result), or None if there is none or ``text`` is not a str."""
    if not isinstance(text, str) or ANSWER_MARK not in text:
        return None
    return text.rpartition(ANSWER_MARK)[2]


def reward(response: str, answer: str, finished: bool = True) -> float:
    """1.0 for a finished response whose final result equals the worked ``answer``'s, else 0.0; the steps are
    not graded; never raises."""
    expected = final_answer(answer)
    if expected is None:
        return 0.0
    return integer_reward(final_answer(response), expected, finished)


TASK = register(file_task(
    "worked_arithmetic", load_split, reward,
    description="4-digit column addition written digit by digit (in-domain), subtraction with borrows "
                "(out-of-domain): 30-60 token answers",
    default_dir=DEFAULT_DIR,
))


def main(argv: list[str] | None = None) -> None:
    write_splits_main(argv, "Write the worked-arithmetic task splits as JSONL.", DEFAULT_DIR, write_splits)


if __name__ == "__main__":
    main()
