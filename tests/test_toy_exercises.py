"""kl_lib.toy.exercises: every reference answer passes its checker, a wrong one fails, None is 'not answered'."""

from __future__ import annotations

import math

import pytest

from kl_lib.config import KLConfig
from kl_lib.toy import exercises

pytestmark = pytest.mark.usefixtures("one_thread")

WRONG = {
    "01.1": "M", "01.2": {"k1"}, "01.3": {1: True, 3: True}, "01.4": [0.0, 0.0, 0.0],
    "01.5": lambda mass: 0.0, "01.6": lambda c: c - c.mean(), "01.7": lambda probs, c, s2: float((probs * c).sum()),
    "01.8": KLConfig("k2", "loss"), "02.1": lambda p, beta: p, "02.2": lambda p, q: 1.0,
    "02.3": lambda beta, kl, target: beta * kl / target, "02.4": lambda ref, rewards: 0.0,
}


def test_there_are_enough_exercises():
    assert len(exercises.EXERCISES) >= 8 and set(WRONG) == set(exercises.EXERCISES)


@pytest.mark.parametrize("key", list(exercises.EXERCISES))
def test_reference_answer_passes_and_wrong_answer_fails(key):
    assert "not answered yet" in exercises.check(key, None)
    assert "correct" in exercises.check(key, exercises.reference(key))
    with pytest.raises(AssertionError):
        exercises.check(key, WRONG[key])


def test_unknown_exercise_is_an_error():
    with pytest.raises(ValueError, match="01.1"):
        exercises.check("9.9", None)
    assert math.isfinite(exercises.reference("01.5")(0.5))
