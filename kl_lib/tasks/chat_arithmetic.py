"""Single-digit arithmetic asked in plain English: a task a small *pretrained* chat model partly solves.

    user:      Compute 7 + 5. Reply with the result only, as a single number.
    assistant: 7 + 5 = 12

For the real pretrained model of notebook 06 (SmolLM2-135M-Instruct) the arithmetic family of the tiny model is
out of reach (it scores ~0 on 2-digit sums), while single-digit sums are half-known: greedy accuracy 0.65, and
0.35 when sampling at temperature 0.7 with a 12-token budget (measured on 40 problems) — room for RL to help.

Splits (generated in memory, deterministic; no files): all 100 pairs 0 ≤ a, b ≤ 9 of ``a + b``, shuffled with
a fixed seed, 70 for ``rl_train`` and 30 held out as ``id_test``; ``ood_test`` is single-digit subtraction
``a − b`` with a ≥ b (55 problems): the same format, an operation RL does not train.

Reward: 1 when the response ends with the end-of-turn token within the budget and its *last* integer is the
answer (models write "7 + 5 = 12", so the first number is an operand), compared as digit strings (exact at any
length; digits in any Unicode script count as theirs, as in every task, see :mod:`kl_lib.tasks.answers`); else 0.
Never raises.

Departure from the paper: MATH is far beyond a 135 M-parameter model; this keeps the structure (a verifiable
in-domain task the model partly knows, an out-of-domain one it also partly knows) at a size that trains on a CPU.
"""

from __future__ import annotations

import random
import re

from kl_lib.tasks.answers import (
    MAX_NUMBER_DIGITS,
    ascii_digits,
    canonical_integer,
    integer_reward,
)
from kl_lib.tasks.base import Problem, Task, answer_reward, register

__all__ = ["PROMPT", "last_integer", "make_splits", "reward"]

PROMPT = "Compute {a} {op} {b}. Reply with the result only, as a single number."
_INTEGER = re.compile(r"-?\d+")


def make_splits(seed: int = 0) -> dict[str, list[Problem]]:
    """``{"rl_train": 70, "id_test": 30, "ood_test": 55}`` problems, deterministic in ``seed``."""
    sums = [(a, b) for a in range(10) for b in range(10)]
    random.Random(f"chat_arithmetic:{seed}").shuffle(sums)

    def add(pairs):
        return [Problem(f"add-{a}-{b}", "add1", PROMPT.format(a=a, op="+", b=b), str(a + b)) for a, b in pairs]

    subs = [Problem(f"sub-{a}-{b}", "sub1", PROMPT.format(a=a, op="-", b=b), str(a - b))
            for a in range(10) for b in range(a + 1)]
    return {"rl_train": add(sums[:70]), "id_test": add(sums[70:]), "ood_test": subs}


def _last_integer_text(response: str) -> str | None:
    found = _INTEGER.findall(ascii_digits(response)) if isinstance(response, str) else []
    return found[-1] if found else None


def last_integer(response: str) -> int | None:
    """The last integer written in the response (any Unicode decimal digits), or None; None too if it has over
    ``MAX_NUMBER_DIGITS`` digits."""
    text = canonical_integer(_last_integer_text(response))
    return int(text) if text is not None and len(text) <= MAX_NUMBER_DIGITS else None


def reward(response: str, answer: str, finished: bool = True) -> float:
    """1.0 for a finished response whose last integer is the answer, else 0.0; exact at any length, never raises."""
    return integer_reward(_last_integer_text(response), answer, finished)


def _load(split: str, source: str | None) -> list[Problem]:
    if source:
        raise ValueError(f"task 'chat_arithmetic' generates its problems in memory; got data_dir={source!r}, "
                         "leave data_dir empty")
    return make_splits()[split]


TASK = register(Task(
    name="chat_arithmetic",
    load=_load,
    reward=answer_reward(reward),
    description="single-digit sums (in-domain) and differences (out-of-domain) in plain English, for chat LMs",
))
