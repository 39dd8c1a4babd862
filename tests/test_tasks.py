"""The arithmetic task family: deterministic splits, disjoint test sets, a verifier that never raises."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kl_lib.models import build_tokenizer, format_prompt
from kl_lib.tasks.arithmetic import (SKILLS, generate_split, load_dataset_split, load_split, parse_answer, reward,
                                     write_splits)

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
