"""The worked (column) arithmetic task: the worked steps are right, answers are long, splits are deterministic and
disjoint, the reward reads only the final answer and never raises, the tokenizer covers it."""

import dataclasses
import json
import random

import pytest

from kl_lib.lm.models import ALPHABET, build_tokenizer, format_prompt
from kl_lib.lm.sft import SMOKE, TASK_PRESETS, SFTConfig, train_base_model
from kl_lib.tasks import get_task
from kl_lib.tasks.worked_arithmetic import (
    SPLITS,
    final_answer,
    generate_split,
    reward,
    worked_addition,
    worked_subtraction,
    write_splits,
)


def test_the_documented_examples():
    assert worked_addition(4736, 2958, 4) == "6+8+0=14 3+5+1=9 7+9+0=16 4+2+1=7 =7694"
    assert worked_subtraction(5203, 1867, 4) == "3-7-0=-4+10=6 0-6-1=-7+10=3 2-8-1=-7+10=3 5-1-1=3 =3336"


@pytest.mark.parametrize("seed", range(3))
def test_every_step_and_result_is_right(seed):
    rng = random.Random(seed)
    for _ in range(500):
        a, b = rng.randint(0, 9999), rng.randint(0, 9999)
        text = worked_addition(a, b, 4)
        assert int(final_answer(text)) == a + b
        for step in text.split(" =")[0].split():
            lhs, _, rhs = step.partition("=")
            assert sum(map(int, lhs.split("+"))) == int(rhs)
        a, b = max(a, b), min(a, b)
        text = worked_subtraction(a, b, 4)
        assert int(final_answer(text)) == a - b
        digits = [int(step.split("=")[-1]) for step in text.split(" =")[0].split()]
        assert all(0 <= d <= 9 for d in digits) and int("".join(map(str, reversed(digits)))) == a - b


def test_splits_are_deterministic_disjoint_and_long(tmp_path):
    sizes = {"sft": 400, "rl_train": 100, "id_test": 50, "ood_test": 50}
    paths = write_splits(tmp_path / "a", seed=3, sizes=sizes)
    again = write_splits(tmp_path / "b", seed=3, sizes=sizes)
    task = get_task("worked_arithmetic")
    prompts = {}
    for name in sizes:
        assert paths[name].read_bytes() == again[name].read_bytes()
        problems = task.load(name, str(tmp_path / "a"))
        assert len(problems) == sizes[name]
        assert {p.skill for p in problems} <= set(SPLITS[name][1])
        prompts[name] = {p.prompt for p in problems}
    for x in sizes:
        for y in sizes:
            assert x == y or not prompts[x] & prompts[y], (x, y)
    tokenizer = build_tokenizer()
    for name in ("rl_train", "id_test", "ood_test"):
        lengths = sorted(len(tokenizer(p.answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"])
                         for p in task.load(name, str(tmp_path / "a")))
        assert 30 <= lengths[len(lengths) // 2] and lengths[-1] <= 100, (name, lengths[0], lengths[-1])
    assert generate_split("id_test", seed=4, size=20) != generate_split("id_test", seed=3, size=20)


def test_the_char_tokenizer_covers_the_task_unchanged():
    problems = generate_split("sft", seed=0, size=300)
    tokenizer = build_tokenizer()
    for p in problems:
        assert set(p.prompt + p.answer) <= set(ALPHABET)
        text = format_prompt(tokenizer, p.prompt) + p.answer
        assert tokenizer.unk_token_id not in tokenizer(text, add_special_tokens=False)["input_ids"]


def test_reward_reads_the_final_answer_only_and_never_raises():
    answer = worked_addition(4736, 2958, 4)
    assert reward(answer, answer, True) == 1.0
    assert reward(answer, answer, False) == 0.0  # truncated
    assert reward("1+1+0=5 =7694", answer, True) == 1.0  # steps are not graded
    assert reward(" = 07694 ", answer, True) == 1.0
    assert reward(answer[:-1], answer, True) == 0.0
    assert reward("7694", answer, True) == 0.0  # no final-answer mark
    for junk in ("", " =", " =-", "=7694", None, 7694, " =7694 =1", "\x00 =9" * 50):
        assert reward(junk, answer, True) in (0.0, 1.0)
    assert reward("x =7694 =1", answer, True) == 0.0  # the last mark counts


def test_sft_digests_of_the_arithmetic_base_model_are_unchanged():
    """The fields added for other tasks are left out of the digest at their defaults (values from before)."""
    assert SFTConfig().digest() == "091edf0e5c00" and SMOKE.digest() == "d33fae79e52e"
    assert TASK_PRESETS["arithmetic"] == SFTConfig()
    assert TASK_PRESETS["worked_arithmetic"].digest() != SFTConfig().digest()
    with pytest.raises(ValueError, match="SFTConfig.task"):
        SFTConfig(task="nope")


def test_sft_trains_a_model_on_the_worked_task(tmp_path):
    write_splits(tmp_path / "data", seed=0, sizes={"sft": 64, "rl_train": 16, "id_test": 4, "ood_test": 4})
    config = dataclasses.replace(TASK_PRESETS["worked_arithmetic"], data_dir=str(tmp_path / "data"), steps=3,
                                 batch_size=8, warmup=1, hidden_size=32, num_layers=1, intermediate_size=64,
                                 probe_every=2, probe_size=4)
    out = train_base_model(tmp_path / "model", config)
    meta = json.loads((out / "sft.json").read_text())
    assert meta["config"]["task"] == "worked_arithmetic" and meta["steps_trained"] == 3
    assert set(meta["greedy_accuracy"]) == {"id_test", "ood_test"} and len(meta["probe_curve"]) == 1
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 128
