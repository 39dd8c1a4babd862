"""Countdown: solvable deterministic disjoint splits, and a safe exact verifier that never raises."""

import json
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kl_lib.tasks import get_task
from kl_lib.tasks.countdown import (
    MAX_EXPRESSION_CHARS,
    NUMBER_RANGE,
    TARGET_RANGE,
    evaluate,
    extract_expression,
    generate_split,
    load_split,
    main,
    reward,
    verify,
    write_splits,
)

SIZES = {"rl_train": 300, "id_test": 60, "ood_test": 60}
ANSWER = json.dumps({"numbers": [25, 3, 7], "target": 46, "solution": "25 + 3 * 7"})


def _key(problem):
    data = json.loads(problem.answer)
    return tuple(sorted(data["numbers"])), data["target"]


def test_splits_are_deterministic_disjoint_and_solvable(tmp_path):
    a = write_splits(tmp_path / "a", seed=3, sizes=SIZES)
    b = write_splits(tmp_path / "b", seed=3, sizes=SIZES)
    for name in SIZES:
        assert a[name].read_bytes() == b[name].read_bytes()
    assert write_splits(tmp_path / "c", seed=4, sizes=SIZES)["id_test"].read_bytes() != a["id_test"].read_bytes()
    splits = {name: load_split(path) for name, path in a.items()}
    assert {name: len(ps) for name, ps in splits.items()} == SIZES
    keys = {name: [_key(p) for p in ps] for name, ps in splits.items()}
    for name in SIZES:
        assert len(set(keys[name])) == len(keys[name])  # unique within a split
    assert not set(keys["rl_train"]) & (set(keys["id_test"]) | set(keys["ood_test"]))
    assert {p.skill for p in splits["rl_train"]} == {p.skill for p in splits["id_test"]} == {"countdown3", "countdown4"}
    assert {p.skill for p in splits["ood_test"]} == {"countdown5"}
    ids = [p.id for ps in splits.values() for p in ps]
    assert len(set(ids)) == len(ids)
    for problem in (p for ps in splits.values() for p in ps):
        data = json.loads(problem.answer)
        assert len(data["numbers"]) == int(problem.skill.removeprefix("countdown"))
        assert all(NUMBER_RANGE[0] <= n <= NUMBER_RANGE[1] for n in data["numbers"])
        assert TARGET_RANGE[0] <= data["target"] <= TARGET_RANGE[1]
        assert f"{data['target']}" in problem.prompt and str(data["numbers"]) in problem.prompt
        assert verify(data["solution"], data["numbers"], data["target"])  # solvable: the stored solution works
        assert reward(f"Let me try.\n<answer>{data['solution']}</answer>", problem.answer) == 1.0


def test_task_loads_the_written_splits(tmp_path):
    write_splits(tmp_path, seed=0, sizes=SIZES)
    task = get_task("countdown")
    assert task.default_source == "data/countdown"
    problems = task.load_split("id_test", str(tmp_path))
    assert problems == load_split(tmp_path / "id_test.jsonl")
    solution = json.loads(problems[0].answer)["solution"]
    assert task.reward(f"<answer>{solution}</answer>", problems[0], True) == 1.0
    assert task.reward(f"<answer>{solution}</answer>", problems[0], False) == 0.0


def test_missing_data_says_how_to_create_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m kl_lib.tasks.countdown --out"):
        get_task("countdown").load_split("rl_train", str(tmp_path))
    with pytest.raises(ValueError, match="unknown split"):
        generate_split("train")
    with pytest.raises(ValueError, match="unknown split"):
        write_splits(tmp_path, sizes={"sft": 3})


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path), "--seed", "1", "--size", "rl_train=20", "--size", "id_test=5",
          "--size", "ood_test=5"])
    assert len(load_split(tmp_path / "rl_train.jsonl")) == 20
    assert "ood_test" in capsys.readouterr().out


@pytest.mark.parametrize("response, expected", [
    ("<answer>25 + 3 * 7</answer>", 1.0),
    ("<answer>3 * 7 + 25</answer>", 1.0),
    ("<answer> (25 + 3*7) </answer>", 1.0),
    ("thinking <answer>1 + 1</answer> no wait <answer>7 * 3 + 25</answer>", 1.0),  # the last tag counts
    ("so $\\boxed{25 + 3 \\times 7}$", 1.0),
    ("<answer>25 + 3 × 7 = 46</answer>", 1.0),  # "= target" is ignored
    ("<answer>(25 - 3) * 7 / 7 + 24</answer>", 0.0),  # numbers not given
    ("<answer>25 + 3 * 7 + 0</answer>", 0.0),  # an extra number
    ("<answer>25 + 21</answer>", 0.0),  # 21 is not given
    ("<answer>25 * 3 - 7</answer>", 0.0),  # 68: wrong value
    ("<answer>25 + 3 * 7 + 7 - 7</answer>", 0.0),  # 7 used three times
    ("<answer>25 + 3 * 7 / (3 - 3)</answer>", 0.0),  # division by zero
    ("<answer>25 + 3 ** 7</answer>", 0.0),  # no powers
    ("<answer>25 + 3 // 7</answer>", 0.0),
    ("<answer>__import__('os').system('true')</answer>", 0.0),
    ("<answer>25.0 + 3 * 7</answer>", 0.0),  # integer literals only
    ("<answer>25 + 3 * 7", 0.0),  # no closing tag and no box
    ("25 + 3 * 7", 0.0),
    ("", 0.0),
    (None, 0.0),
])
def test_reward(response, expected):
    assert reward(response, ANSWER) == expected


def test_reward_needs_a_finished_response():
    assert reward("<answer>25 + 3 * 7</answer>", ANSWER, finished=False) == 0.0


@pytest.mark.parametrize("expression, expected", [
    ("1 + 2 * 3", (Fraction(7), [1, 2, 3])),
    ("-(4 - 6)", (Fraction(2), [4, 6])),
    ("7 / 2", (Fraction(7, 2), [7, 2])),
    ("(1 + 2) / (3 - 3)", None),
    ("2 ** 3", None), ("1 if 1 else 2", None), ("x + 1", None), ("abs(-3)", None), ("1_000", None), ("0x10", None),
    ("1e3", None), ("01 + 2", None), ("1 (2)", None), ("[1, 2]", None), ("", None),
    ("1" + " + 1" * (MAX_EXPRESSION_CHARS // 4), None),  # over the length cap
    ("(" * 90 + "1" + ")" * 90, (Fraction(1), [1])),
    ("-" * 150 + "1", (Fraction(1), [1])),
])
def test_evaluate(expression, expected):
    assert evaluate(expression) == expected


def test_extract_expression():
    assert extract_expression("<answer>(1 + 2) \\cdot 3 = 9</answer>") == "(1 + 2) * 3"
    assert extract_expression("$\\boxed{8 \\div 2 − 1}$") == "8 / 2 - 1"
    assert extract_expression("no answer") is None


_NUMBERS = st.integers(1, 99)
_EXPRESSIONS = st.recursive(
    _NUMBERS.map(lambda n: (str(n), Fraction(n))),
    lambda inner: st.tuples(inner, st.sampled_from("+-*/"), inner).map(lambda t: (
        f"({t[0][0]} {t[1]} {t[2][0]})",
        None if t[0][1] is None or t[2][1] is None or (t[1] == "/" and t[2][1] == 0)
        else {"+": t[0][1] + t[2][1], "-": t[0][1] - t[2][1], "*": t[0][1] * t[2][1],
              "/": t[0][1] / t[2][1] if t[2][1] else None}[t[1]])),
    max_leaves=6)


@settings(max_examples=200, deadline=None)
@given(_EXPRESSIONS)
def test_evaluate_matches_exact_arithmetic(expression_and_value):
    """The ast evaluator agrees with Fraction arithmetic on the expression tree (None iff it divides by zero)."""
    expression, value = expression_and_value
    result = evaluate(expression)
    assert (result is None) if value is None else (result[0] == value)


@settings(max_examples=300, deadline=None)
@given(st.text(), st.booleans())
def test_reward_never_raises(text, finished):
    assert reward(text, ANSWER, finished) in (0.0, 1.0)
    assert reward(f"<answer>{text}</answer>", ANSWER, finished) in (0.0, 1.0)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789 +-*/()._xe", max_size=80))
def test_evaluate_never_raises_on_expression_like_text(text):
    result = evaluate(text)
    assert result is None or isinstance(result[0], Fraction)


def test_a_malformed_reference_answer_is_a_clear_error():
    with pytest.raises(ValueError, match="must be the JSON of Problem.answer"):
        reward("<answer>1 + 2</answer>", "46")
