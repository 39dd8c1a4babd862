r"""The hub tasks (math, gsm8k) on tiny local files in the hub datasets' own schemas; the hub is never contacted.

Every test runs in `datasets`' offline mode with its cache in tmp_path, so a load that would touch the network
fails fast with the error we test for, instead of hanging or reading a real cache.
"""

import json

import datasets
import huggingface_hub.constants
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kl_lib.tasks import Problem, get_task, task_names
from kl_lib.tasks.hub import (
    HUB_DATASETS,
    MATH_INSTRUCTION,
    MATH_SUBJECTS,
    MMLU_OOD_SUBJECTS,
    DatasetUnreachableError,
    download,
    load_rows,
    main,
    reward,
)

# ----- a few rows per dataset, in the hub schemas ---------------------------------------------------------------

MATH_TRAIN = {  # EleutherAI/hendrycks_math: problem, level, type, solution
    "algebra": [
        {"problem": "What is the value of $x$ if $2x + 3 = 9$?", "level": "Level 1", "type": "Algebra",
         "solution": "Subtracting 3 from both sides gives $2x = 6$, so $x = \\boxed{3}$."},
        {"problem": "Evaluate $\\left(\\frac{1}{2}\\right)^{2} + \\frac{1}{4}$.", "level": "Level 2",
         "type": "Algebra", "solution": "We have $\\frac14 + \\frac14 = \\boxed{\\frac{1}{2}}$."},
    ],
    "counting_and_probability": [
        {"problem": "How many ways are there to choose 2 books from 5?", "level": "Level 2",
         "type": "Counting & Probability", "solution": "$\\binom{5}{2} = \\boxed{10}$."},
    ],
    "geometry": [
        {"problem": "A right triangle has legs 3 and 4. What is its hypotenuse?", "level": "Level 1",
         "type": "Geometry", "solution": "By Pythagoras, $\\sqrt{3^2+4^2} = \\boxed{5}$."},
    ],
    "intermediate_algebra": [
        {"problem": "Find the sum of the roots of $x^2 - 5x + 6 = 0$.", "level": "Level 2",
         "type": "Intermediate Algebra", "solution": "By Vieta, the sum is $\\boxed{5}$."},
    ],
    "number_theory": [
        {"problem": "What is the remainder when 100 is divided by 7?", "level": "Level 1", "type": "Number Theory",
         "solution": "$100 = 14 \\cdot 7 + 2$, so the remainder is $\\boxed{2}$."},
    ],
    "prealgebra": [
        {"problem": "What is $15\\%$ of 80?", "level": "Level 2", "type": "Prealgebra",
         "solution": "$0.15 \\cdot 80 = \\boxed{12}$."},
    ],
    "precalculus": [  # written as parquet, to test that path
        {"problem": "Compute $\\cos 60^\\circ$.", "level": "Level 1", "type": "Precalculus",
         "solution": "$\\cos 60^\\circ = \\boxed{\\frac{1}{2}}$."},
    ],
}
MATH500 = [  # HuggingFaceH4/MATH-500: problem, solution, answer, subject, level, unique_id
    {"problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.",
     "solution": "We have $r = 3$ and $\\theta = \\frac{\\pi}{2}$, so $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$.",
     "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
     "unique_id": "test/precalculus/807.json"},
    {"problem": "What is $\\frac{9}{2}$ expressed as a decimal?", "solution": "$\\boxed{4.5}$", "answer": "4.5",
     "subject": "Prealgebra", "level": 2, "unique_id": "test/prealgebra/2057.json"},
    {"problem": "How many positive divisors does 6 have?", "solution": "1, 2, 3, 6: $\\boxed{4}$.", "answer": "4",
     "subject": "Counting & Probability", "level": 1, "unique_id": "test/counting_and_probability/1.json"},
]
GSM8K = {  # openai/gsm8k, config main: question, answer ("... #### n")
    "train": [
        {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                     "How many clips did Natalia sell altogether in April and May?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
                   "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
        {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                     "How much did she earn?",
         "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned "
                   "0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
    ],
    "test": [
        {"question": "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
                     "muffins for her friends every day with four. She sells the remainder at the farmers' market "
                     "daily for $2 per fresh duck egg. How much in dollars does she make every day?",
         "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\n"
                   "She makes 9 * 2 = $<<9*2=18>>18 every day at the farmer's market.\n#### 18"},
    ],
}
MMLU = {  # cais/mmlu: question, subject, choices (4 strings), answer (int 0-3)
    "college_physics": [
        {"question": "A ball is dropped from rest. Ignoring air resistance, how far does it fall in 2 s? "
                     "(g = 10 m/s^2)", "subject": "college_physics", "choices": ["5 m", "10 m", "20 m", "40 m"],
         "answer": 2},
        {"question": "Which quantity is conserved in a perfectly elastic collision but not in an inelastic one?",
         "subject": "college_physics", "choices": ["Momentum", "Kinetic energy", "Mass", "Charge"], "answer": 1},
    ],
    "college_chemistry": [
        {"question": "What is the pH of a 0.01 M HCl solution?", "subject": "college_chemistry",
         "choices": ["1", "2", "7", "12"], "answer": 1},
    ],
    "college_biology": [
        {"question": "Which organelle is the site of oxidative phosphorylation?", "subject": "college_biology",
         "choices": ["Ribosome", "Golgi apparatus", "Nucleus", "Mitochondrion"], "answer": 3},
    ],
}


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    """A local directory in the layout ``<dir>/<key>/<config>/<split>.jsonl`` (one parquet file)."""
    root = tmp_path_factory.mktemp("hub")
    for subject, rows in MATH_TRAIN.items():
        if subject == "precalculus":
            (root / "hendrycks_math" / subject).mkdir(parents=True)
            pd.DataFrame(rows).to_parquet(root / "hendrycks_math" / subject / "train.parquet")
        else:
            _write_jsonl(root / "hendrycks_math" / subject / "train.jsonl", rows)
    _write_jsonl(root / "math500" / "default" / "test.jsonl", MATH500)
    for split, rows in GSM8K.items():
        _write_jsonl(root / "gsm8k" / "main" / f"{split}.jsonl", rows)
    for subject, rows in MMLU.items():
        _write_jsonl(root / "mmlu" / subject / "test.jsonl", rows)
    return str(root)


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    """No network: offline mode both in the environment and in the flags `datasets` / `huggingface_hub` read at
    import; a fresh cache, so that nothing real is found there and nothing is written to the user's cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))
        datasets.disable_progress_bars()
        yield


@pytest.fixture(scope="module")
def loaded(offline, hub_dir):
    """Every split of both tasks, loaded once (module scope: `datasets` prepares a cache per load)."""
    return {(task, split): get_task(task).load_split(split, hub_dir)
            for task in ("math", "gsm8k") for split in ("rl_train", "id_test", "ood_test")}


def test_tasks_are_registered():
    assert {"math", "gsm8k"} <= set(task_names())
    assert get_task("math").default_source is None


def test_math_train_from_local_files(loaded):
    problems = loaded["math", "rl_train"]
    assert len(problems) == sum(map(len, MATH_TRAIN.values()))
    assert [p.skill for p in problems] == [f"math/{s}" for s in MATH_SUBJECTS for _ in MATH_TRAIN[s]]
    assert problems[0] == Problem(id="math/algebra/0", skill="math/algebra",
                                  prompt=f"What is the value of $x$ if $2x + 3 = 9$?\n\n{MATH_INSTRUCTION}",
                                  answer="3")
    assert problems[1].id == "math/algebra/1" and problems[1].answer == "\\frac{1}{2}"  # nested braces
    assert problems[-1].skill == "math/precalculus" and problems[-1].answer == "\\frac{1}{2}"  # from parquet
    assert all(p.prompt.endswith("within \\boxed{}.") for p in problems)


def test_math500_is_the_in_domain_test(loaded):
    problems = loaded["math", "id_test"]
    assert [p.id for p in problems] == [f"math500/{row['unique_id']}" for row in MATH500]
    assert [p.skill for p in problems] == ["math500/precalculus", "math500/prealgebra",
                                           "math500/counting_and_probability"]
    assert [p.answer for p in problems] == [row["answer"] for row in MATH500]


def test_mmlu_college_sciences_are_the_ood_test(loaded):
    problems = loaded["math", "ood_test"]
    assert [p.skill for p in problems] == [f"mmlu/{s}" for s in MMLU_OOD_SUBJECTS for _ in MMLU[s]]
    assert [p.answer for p in problems] == ["C", "B", "B", "D"]
    assert problems[0].id == "mmlu/college_physics/0"
    assert "\n\nA. 5 m\nB. 10 m\nC. 20 m\nD. 40 m\n\n" in problems[0].prompt
    assert "(A, B, C or D) within \\boxed{}" in problems[0].prompt
    assert loaded["gsm8k", "ood_test"] == problems  # the same OOD set for both tasks


def test_gsm8k_from_local_files(loaded):
    train, test = loaded["gsm8k", "rl_train"], loaded["gsm8k", "id_test"]
    assert [(p.id, p.skill, p.answer) for p in train] == [("gsm8k/train/0", "gsm8k", "72"),
                                                          ("gsm8k/train/1", "gsm8k", "10")]
    assert [p.answer for p in test] == ["18"] and test[0].prompt.startswith("Janet's ducks")


def test_loads_are_deterministic(loaded, hub_dir):
    assert get_task("math").load_split("rl_train", hub_dir) == loaded["math", "rl_train"]


def test_reward(loaded):
    half = loaded["math", "rl_train"][1]  # answer \frac{1}{2}
    assert reward("So the sum is $\\boxed{\\frac12}$.", half, True) == 1.0
    assert reward("So the sum is $\\boxed{0.5}$.", half, True) == 1.0
    assert reward("So the sum is $\\boxed{0.5}$.", half, False) == 0.0  # truncated
    assert reward("So the sum is $\\boxed{1/3}$.", half, True) == 0.0
    polar = loaded["math", "id_test"][0]
    assert reward("$\\boxed{(3, \\frac{\\pi}{2})}$", polar, True) == 1.0
    ducks = loaded["gsm8k", "id_test"][0]
    assert reward("9 eggs at $2 each.\n#### 18", ducks, True) == 1.0
    assert reward("She makes $\\boxed{\\$18}$ a day.", ducks, True) == 1.0
    physics = loaded["math", "ood_test"][0]  # answer C
    assert reward("d = g t^2 / 2 = 20 m, so the answer is $\\boxed{C}$.", physics, True) == 1.0
    assert reward("The answer is (C).", physics, True) == 1.0
    assert reward("\\boxed{B}", physics, True) == 0.0
    assert reward("\\boxed{20}", physics, True) == 0.0  # the value, not the letter
    assert get_task("math").reward("\\boxed{C}", physics, True) == 1.0


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(), st.booleans())
def test_reward_never_raises(loaded, text, finished):
    for problem in (loaded["math", "rl_train"][1], loaded["gsm8k", "rl_train"][0], loaded["math", "ood_test"][0]):
        assert reward(text, problem, finished) in (0.0, 1.0)


def test_unreachable_hub_is_a_clear_error():
    assert datasets.config.HF_HUB_OFFLINE  # else this test would try the network
    with pytest.raises(DatasetUnreachableError, match="'HuggingFaceH4/MATH-500'.*could not be reached") as info:
        get_task("math").load_split("id_test")
    message = str(info.value)
    assert "HF_HUB_OFFLINE" in message and "--download" in message and "math500/default/test.jsonl" in message
    assert isinstance(info.value, ConnectionError)


def test_a_connection_error_is_a_clear_error(monkeypatch):
    httpx = pytest.importorskip("httpx")

    def no_network(*args, **kwargs):
        raise httpx.ConnectError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(datasets, "load_dataset", no_network)
    with pytest.raises(DatasetUnreachableError, match="'openai/gsm8k'.*could not be reached"):
        get_task("gsm8k").load_split("rl_train")


def test_missing_local_files_are_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"openai/gsm8k.*gsm8k/main/train\.jsonl.*question, answer"):
        get_task("gsm8k").load_split("rl_train", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        get_task("gsm8k").load_split("rl_train", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no split 'train'"):
        get_task("math").load_split("train", str(tmp_path))


def test_download_writes_the_local_layout(monkeypatch, hub_dir, loaded, tmp_path):
    """``--download`` fetches every (config, split) the tasks use; what it writes loads back to the same problems.
    The hub is simulated by serving each hub id from the local fixture files."""
    real_load_dataset = datasets.load_dataset
    requested = []

    def fake_hub(path, name=None, split=None, **kwargs):
        if path in ("json", "parquet"):
            return real_load_dataset(path, split=split, **kwargs)
        requested.append((path, name, split))
        key = next(k for k, spec in HUB_DATASETS.items() if spec.path == path)
        return load_rows(key, name or "default", split, hub_dir)

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    out = tmp_path / "downloaded"
    main(["--download", str(out)])
    assert requested == [(spec.path, None if config == "default" else config, split)
                         for spec in HUB_DATASETS.values() for config in spec.configs for split in spec.splits]
    assert (out / "hendrycks_math" / "precalculus" / "train.jsonl").is_file()
    for (task, split), problems in loaded.items():
        assert get_task(task).load_split(split, str(out)) == problems
    assert download(tmp_path / "only_gsm8k", ("gsm8k",)) == [tmp_path / "only_gsm8k" / "gsm8k" / "main" / f"{s}.jsonl"
                                                             for s in ("train", "test")]
    with pytest.raises(ValueError, match="unknown dataset"):
        download(tmp_path, ("math",))
