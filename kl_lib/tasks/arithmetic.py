"""A synthetic arithmetic task family with verifiable answers: the small-scale stand-in for MATH.

Every problem is ``"<a><op><b>="`` with an integer answer, generated deterministically from a seed. Skills:

    add2  a + b,   0 ≤ a, b ≤ 99            sub2  a − b,   0 ≤ b ≤ a ≤ 99
    add3  a + b,   100 ≤ a, b ≤ 999         sub3  a − b,   100 ≤ b ≤ a ≤ 999

Splits (see ``SPLITS``): the base model is fine-tuned on ``sft`` (mostly the 2-digit skills, a little of the
3-digit ones, so it *partly* knows them); RL trains on ``rl_train`` (``add3``, the in-domain task);
``id_test`` holds out ``add3`` problems never seen in ``sft`` or ``rl_train``; ``ood_test`` holds ``sub3``, a
skill the base model partly knows (it saw a little of it in ``sft``) and that RL on ``add3`` does not train but
that shares its format and digit-by-digit structure, so that RL can help or hurt it: the out-of-domain
generalisation a KL term is supposed to protect. (A mixed-width addition skill was tried as a second
out-of-domain skill and dropped: the base model scored 0 on it, leaving nothing for a KL term to protect.)

Reward (:func:`reward`): 1 if the response, up to the end-of-sequence marker, is exactly the answer's integer
(surrounding spaces and leading zeros allowed; digits in any Unicode script count as theirs, as in every task,
see :mod:`kl_lib.tasks.answers`), else 0, compared as digit strings, so exactly at any length. Malformed, empty or
truncated responses (no end marker) score 0; the function never raises on model output.

Departure from the paper: MATH problems and boxed answers are replaced by integer arithmetic that a 1M-parameter
model can learn on a CPU; the structure (in-domain RL task, held-out in-domain test, out-of-domain skills
the base model partly knows) is the paper's.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable
from pathlib import Path

from kl_lib.tasks.answers import MAX_NUMBER_DIGITS, canonical_integer, integer_reward
from kl_lib.tasks.base import (
    Problem,
    draw_from_mixture,
    file_task,
    read_problems,
    register,
    write_disjoint_splits,
    write_splits_main,
)

__all__ = [
    "SKILLS",
    "SPLITS",
    "Problem",
    "generate_split",
    "load_dataset_split",
    "load_split",
    "make_problem",
    "parse_answer",
    "reward",
    "write_splits",
]


def _add(rng: random.Random, lo_a: int, hi_a: int, lo_b: int, hi_b: int) -> tuple[str, int]:
    a, b = rng.randint(lo_a, hi_a), rng.randint(lo_b, hi_b)
    return f"{a}+{b}=", a + b


def _sub(rng: random.Random, lo: int, hi: int) -> tuple[str, int]:
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    a, b = max(a, b), min(a, b)
    return f"{a}-{b}=", a - b


SKILLS = {
    "add2": lambda rng: _add(rng, 0, 99, 0, 99),
    "sub2": lambda rng: _sub(rng, 0, 99),
    "add3": lambda rng: _add(rng, 100, 999, 100, 999),
    "sub3": lambda rng: _sub(rng, 100, 999),
}

DEFAULT_DIR = "data/arithmetic"

# split name -> (size, {skill: weight}); sizes are the defaults of write_splits.
SPLITS: dict[str, tuple[int, dict[str, float]]] = {
    "sft": (40_000, {"add2": 0.48, "sub2": 0.48, "add3": 0.02, "sub3": 0.02}),
    "rl_train": (5_000, {"add3": 1.0}),
    "id_test": (300, {"add3": 1.0}),
    "ood_test": (300, {"sub3": 1.0}),
}


def make_problem(skill: str, rng: random.Random, index: int) -> Problem:
    if skill not in SKILLS:
        raise ValueError(f"unknown skill {skill!r}; valid skills are {', '.join(map(repr, SKILLS))}")
    prompt, answer = SKILLS[skill](rng)
    return Problem(id=f"{skill}-{index}", skill=skill, prompt=prompt, answer=str(answer))


def generate_split(name: str, seed: int = 0, size: int | None = None, exclude: Iterable[str] = ()) -> list[Problem]:
    """Problems of one split, deterministic in (name, seed, size); prompts in ``exclude`` are skipped.

    Within a split prompts are unique. ``write_splits`` passes earlier splits' prompts as ``exclude`` so that
    test problems never appear in training data.
    """
    return draw_from_mixture(name, SPLITS, make_problem, f"{name}:{seed}", size, exclude)


def write_splits(data_dir: str | os.PathLike = DEFAULT_DIR, seed: int = 0,
                 sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write every split as ``<data_dir>/<split>.jsonl`` (atomically); test splits first, then disjoint training."""
    return write_disjoint_splits(data_dir, ("id_test", "ood_test", "rl_train", "sft"), generate_split,
                                 lambda p: p.prompt, seed, sizes)


def load_split(path: str | os.PathLike) -> list[Problem]:
    return read_problems(path, "create the data with `make data` (or kl_lib.tasks.arithmetic.write_splits)")


def load_dataset_split(path: str | os.PathLike):
    """The split as a ``datasets.Dataset`` (columns id, skill, prompt, answer), from the JSONL file."""
    import datasets

    if not Path(path).exists():
        load_split(path)  # raises the clear error
    return datasets.Dataset.from_json(str(path))


def parse_answer(response: str) -> int | None:
    """The integer the response states, or None if it is not exactly one integer (spaces allowed; any Unicode
    decimal digits, see :mod:`kl_lib.tasks.answers`) or has over ``MAX_NUMBER_DIGITS`` digits."""
    text = canonical_integer(response)
    return int(text) if text is not None and len(text) <= MAX_NUMBER_DIGITS else None


def reward(response: str, answer: str, finished: bool = True) -> float:
    """1.0 for a finished response that states exactly the answer, else 0.0; exact at any length, never raises."""
    return integer_reward(response, answer, finished)


TASK = register(file_task(
    "arithmetic", load_split, reward,
    description="3-digit addition (in-domain) and subtraction (out-of-domain) for the tiny SFT model",
    default_dir=DEFAULT_DIR,
))


def main(argv: list[str] | None = None) -> None:
    write_splits_main(argv, "Write the arithmetic task splits as JSONL.", DEFAULT_DIR, write_splits)


if __name__ == "__main__":
    main()
