"""The arithmetic task family: deterministic splits, disjoint test sets, a verifier that never raises."""

import json
import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kl_lib.lm.models import build_tokenizer, format_prompt
from kl_lib.tasks.arithmetic import (
    SKILLS,
    generate_split,
    load_dataset_split,
    load_split,
    parse_answer,
    reward,
    write_splits,
)

SIZES = {"sft": 400, "rl_train": 200, "id_test": 50, "ood_test": 50}


def test_splits_are_deterministic_disjoint_and_correct(tmp_path):
    a = write_splits(tmp_path / "a", seed=3, sizes=SIZES)
    b = write_splits(tmp_path / "b", seed=3, sizes=SIZES)
    for name in SIZES:
        assert a[name].read_bytes() == b[name].read_bytes()
    splits = {name: load_split(path) for name, path in a.items()}
    assert {name: len(p) for name, p in splits.items()} == SIZES
    prompts = {name: {p.prompt for p in ps} for name, ps in splits.items()}
    assert not prompts["id_test"] & (prompts["rl_train"] | prompts["sft"])
    assert not prompts["ood_test"] & (prompts["rl_train"] | prompts["sft"])
    assert {p.skill for p in splits["rl_train"]} == {p.skill for p in splits["id_test"]} == {"add3"}
    assert {p.skill for p in splits["ood_test"]} == {"sub3"}
    for problem in (p for ps in splits.values() for p in ps):
        assert eval(problem.prompt.rstrip("=")) == int(problem.answer)  # the reference answer is right
    assert write_splits(tmp_path / "c", seed=4, sizes=SIZES)["id_test"].read_bytes() != a["id_test"].read_bytes()


def test_loads_as_a_datasets_dataset(tmp_path):
    paths = write_splits(tmp_path, seed=0, sizes=SIZES)
    ds = load_dataset_split(paths["id_test"])
    assert len(ds) == SIZES["id_test"] and set(ds.column_names) == {"id", "skill", "prompt", "answer"}
    assert ds[0] == json.loads(paths["id_test"].read_text().splitlines()[0])


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="make data"):
        load_split(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="unknown split"):
        generate_split("train")
    with pytest.raises(ValueError, match="unknown split"):
        write_splits(tmp_path, sizes={"test": 3})


@pytest.mark.parametrize("response, answer, finished, expected", [
    ("579", "579", True, 1.0), (" 579 ", "579", True, 1.0), ("579", "579", False, 0.0), ("578", "579", True, 0.0),
    ("5 79", "579", True, 0.0), ("579=", "579", True, 0.0), ("", "579", True, 0.0), ("-3", "-3", True, 1.0),
    ("0579", "579", True, 1.0), ("+-=", "5", True, 0.0), (None, "5", True, 0.0), ("5", "five", True, 0.0),
])
def test_reward(response, answer, finished, expected):
    assert reward(response, answer, finished) == expected


@given(st.text())
def test_reward_never_raises(text):
    assert reward(text, "12") in (0.0, 1.0)
    assert parse_answer(text) is None or isinstance(parse_answer(text), int)


def test_tokenizer_round_trip_and_chat_template():
    tok = build_tokenizer()
    text = format_prompt(tok, "123+456=")
    assert text == "<bos><|user|>123+456=<|assistant|>"
    ids = tok(text + "579" + tok.eos_token, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "123+456=579"
    assert len(ids) == 1 + 1 + 8 + 1 + 3 + 1  # one token per character
    assert set(SKILLS) == {"add2", "sub2", "add3", "sub3"}


# ---- chat_arithmetic: the task of the real pretrained model (notebook 06)

def test_chat_arithmetic_splits_are_deterministic_and_disjoint():
    from kl_lib.tasks import get_task
    from kl_lib.tasks.chat_arithmetic import make_splits

    task = get_task("chat_arithmetic")
    splits = {name: task.load_split(name) for name in ("rl_train", "id_test", "ood_test")}
    assert {k: len(v) for k, v in splits.items()} == {"rl_train": 70, "id_test": 30, "ood_test": 55}
    assert splits == make_splits(0) and make_splits(1) != make_splits(0)
    assert not {p.prompt for p in splits["rl_train"]} & {p.prompt for p in splits["id_test"]}
    for p in splits["rl_train"] + splits["id_test"]:
        a, b = (int(x) for x in p.id.split("-")[1:])
        assert p.answer == str(a + b) and f"{a} + {b}" in p.prompt
    with pytest.raises(ValueError, match="leave data_dir empty"):
        task.load_split("rl_train", "data/somewhere")


@pytest.mark.parametrize("response,finished,expected", [
    ("7 + 5 = 12", True, 1.0), ("12", True, 1.0), ("The answer is 12.", True, 1.0),
    ("12 is 7 + 5", True, 0.0),  # the last integer counts
    ("7 + 5 = 12", False, 0.0),  # truncated
    ("", True, 0.0), ("twelve", True, 0.0), ("-12", True, 0.0),
])
def test_chat_arithmetic_reward(response, finished, expected):
    from kl_lib.tasks.chat_arithmetic import reward as chat_reward

    assert chat_reward(response, "12", finished) == expected


@given(st.text(max_size=60), st.booleans())
def test_chat_arithmetic_reward_never_raises(text, finished):
    from kl_lib.tasks.chat_arithmetic import reward as chat_reward

    assert chat_reward(text, "12", finished) in (0.0, 1.0)


# ---- the registry

def test_a_task_module_runs_as_a_script(tmp_path):
    """``python -m kl_lib.tasks.arithmetic`` executes the module twice (imported by the package, then as __main__):
    the second declaration of the same task is not a conflict."""
    sizes = [arg for split, n in SIZES.items() for arg in ("--size", f"{split}={n}")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run([sys.executable, "-m", "kl_lib.tasks.arithmetic", "--out", str(tmp_path), *sizes],
                          check=False, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "id_test.jsonl").read_bytes() == write_splits(tmp_path / "again", sizes=SIZES)["id_test"].read_bytes()


def test_another_task_under_a_taken_name_is_an_error():
    from kl_lib.tasks import Task, get_task, register

    task = get_task("arithmetic")
    assert register(task) is task
    with pytest.raises(ValueError, match="'arithmetic' is already registered"):
        register(Task(name="arithmetic", load=task.load, reward=task.reward, description="something else"))
