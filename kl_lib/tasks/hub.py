r"""The paper's datasets, loaded with ``datasets.load_dataset``: MATH, MATH500, GSM8K and MMLU's college sciences.

Registered tasks (``kl_lib.tasks.get_task(name)``):

    task    rl_train                          id_test                    ood_test
    math    MATH train, 7 subjects (7,500)    MATH500 (500)              MMLU college physics + chemistry + biology
                                                                         (test splits: 102 + 100 + 144)
    gsm8k   GSM8K train (7,473)               GSM8K test (1,319)         the same MMLU college sciences

Every problem's ``skill`` names its source: ``math/<subject>``, ``math500/<subject>``, ``gsm8k``,
``mmlu/<subject>``; ids are stable across loads: ``math/<subject>/<row>``, ``math500/<unique_id>``,
``gsm8k/<split>/<row>``, ``mmlu/<subject>/<row>`` (row = the row's index in its hub split, so ids survive a
skipped row). Loads are deterministic: the dataset's own row order, subjects in the order of :data:`HUB_DATASETS`.

Prompts: a math problem is followed by "Please reason step by step, and put your final answer within
\boxed{}." (the Qwen2.5-Math instruction); an MMLU question by its lettered choices and an instruction to box the
letter. ``Problem.answer`` is the reference: the last ``\boxed{}`` of a MATH solution, MATH500's ``answer``
column, the number after GSM8K's ``####``, the MMLU letter. Reward (:func:`reward`): 0 for an unfinished
response; for ``mmlu/*`` problems 1 iff :func:`~kl_lib.tasks.answers.extract_choice` gives the reference letter;
otherwise 1 iff :func:`~kl_lib.tasks.answers.is_equivalent` (extracted answer, reference).

``source``: ``None`` loads from the Hugging Face Hub (or the local ``datasets`` cache, e.g. with
``HF_HUB_OFFLINE=1`` after one online load); a directory loads files in the hub datasets' own schemas laid out as

    <source>/<key>/<config>/<split>.jsonl      (or .json, or .parquet)

with ``key`` and ``config`` from :data:`HUB_DATASETS` ("default" for a dataset without configs), e.g.
``<source>/hendrycks_math/algebra/train.jsonl``, ``<source>/math500/default/test.jsonl``,
``<source>/gsm8k/main/test.jsonl``, ``<source>/mmlu/college_physics/test.jsonl``. Both go through
``datasets.load_dataset`` and then the same column mapping. ``python -m kl_lib.tasks.hub --download DIR`` writes
that layout from the hub, for machines without network. An unreachable hub raises :class:`DatasetUnreachableError`
naming the dataset and the fixes.

Departures from the paper: the OOD set is the paper's three OOD subjects as MMLU college-level subsets, scored by the boxed
letter after free-form reasoning (Pass@1 of sampled responses), not by MMLU's usual next-token letter likelihood.
MATH² (the paper's second in-domain test set) is not included. For ``gsm8k`` (not a task of the paper) the OOD set
is the same MMLU sciences rather than MATH500, so that OOD numbers are comparable across the two tasks. MATH
train rows whose solution has no ``\boxed{}`` (none in the released data, as far as we know) are skipped with a
warning.
"""

from __future__ import annotations

import argparse
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kl_lib.files import atomic_write
from kl_lib.tasks.answers import (
    extract_answer,
    extract_choice,
    extract_gsm8k_reference,
    is_equivalent,
    last_boxed,
)
from kl_lib.tasks.base import Problem, Task, register

if TYPE_CHECKING:
    import datasets

__all__ = ["HUB_DATASETS", "MATH_SUBJECTS", "MMLU_OOD_SUBJECTS", "DatasetUnreachableError", "HubDataset",
           "download", "load_rows", "local_path", "main", "math_prompt", "mmlu_prompt", "reward"]


@dataclass(frozen=True)
class HubDataset:
    path: str
    """The hub id passed to ``datasets.load_dataset``."""
    configs: tuple[str, ...]
    """Config names, loaded in this order ("default" = the dataset has no configs)."""
    splits: tuple[str, ...]
    """The hub splits the tasks use (what ``--download`` fetches)."""
    columns: tuple[str, ...]
    """The columns the mapping reads (the schema local files must have)."""


MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")
MMLU_OOD_SUBJECTS = ("college_physics", "college_chemistry", "college_biology")

# key (local directory name) -> where the data lives on the hub and what it looks like
HUB_DATASETS: dict[str, HubDataset] = {
    "hendrycks_math": HubDataset("EleutherAI/hendrycks_math", MATH_SUBJECTS, ("train",),
                                 ("problem", "level", "type", "solution")),
    "math500": HubDataset("HuggingFaceH4/MATH-500", ("default",), ("test",),
                          ("problem", "solution", "answer", "subject", "level", "unique_id")),
    "gsm8k": HubDataset("openai/gsm8k", ("main",), ("train", "test"), ("question", "answer")),
    "mmlu": HubDataset("cais/mmlu", MMLU_OOD_SUBJECTS, ("test",), ("question", "subject", "choices", "answer")),
}

LOCAL_EXTENSIONS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MMLU_INSTRUCTION = "Please reason step by step, and put the letter of the correct choice ({letters}) within \\boxed{{}}."
LETTERS = "ABCD"


class DatasetUnreachableError(ConnectionError):
    """A hub dataset could not be reached (offline, or no connection) and is not in the local cache."""


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]  # OfflineModeIsEnabled is a ConnectionError
    try:
        import httpx

        errors.append(httpx.TransportError)
    except ImportError:
        pass
    try:
        import requests

        errors.extend([requests.ConnectionError, requests.Timeout])
    except ImportError:
        pass
    return tuple(errors)


def local_path(source: str | os.PathLike, key: str, config: str, split: str) -> Path | None:
    """The local file for (dataset key, config, split) under ``source``, or None if there is none."""
    base = Path(source) / key / config
    for ext in LOCAL_EXTENSIONS:
        if (base / f"{split}{ext}").is_file():
            return base / f"{split}{ext}"
    return None


def load_rows(key: str, config: str, split: str, source: str | os.PathLike | None = None) -> datasets.Dataset:
    """One split of one config of a dataset in :data:`HUB_DATASETS`, from the hub (``source=None``) or a directory.

    Raises :class:`DatasetUnreachableError` when the hub cannot be reached and ``FileNotFoundError`` when a local
    file is missing; both say how to fix it.
    """
    import datasets

    spec = HUB_DATASETS[key]
    if source is not None:
        if not Path(source).is_dir():
            raise FileNotFoundError(f"data source {str(source)!r} is not a directory; pass a directory laid out as "
                                    "<source>/<key>/<config>/<split>.jsonl (see kl_lib.tasks.hub), or None for the hub")
        path = local_path(source, key, config, split)
        if path is None:
            expected = Path(source) / key / config / f"{split}.jsonl"
            raise FileNotFoundError(
                f"no local copy of {spec.path} (config {config!r}, split {split!r}): expected {expected} (or .json / "
                f".parquet) with columns {', '.join(spec.columns)}; `python -m kl_lib.tasks.hub --download {source}` "
                "writes it from the hub")
        return datasets.load_dataset(LOCAL_EXTENSIONS[path.suffix], data_files=str(path), split="train")
    try:
        return datasets.load_dataset(spec.path, None if config == "default" else config, split=split)
    except _unreachable_errors() as err:
        raise DatasetUnreachableError(
            f"dataset {spec.path!r} (config {config!r}, split {split!r}) could not be reached on the Hugging Face "
            f"Hub and is not in the local `datasets` cache ({type(err).__name__}: {err}). Fixes: connect to the "
            "network (and unset HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); or load it once with network so that "
            "`datasets` caches it, after which it loads offline; or, on a machine with network, run "
            "`python -m kl_lib.tasks.hub --download DIR`, copy DIR here and pass it as the source "
            f"(layout DIR/{key}/{config}/{split}.jsonl).") from err


# ---------------------------------------------------------------------------------------------------------------
# Column mapping: hub rows -> Problems (the same code for hub data and local files)
# ---------------------------------------------------------------------------------------------------------------

def math_prompt(problem: str) -> str:
    return f"{problem.strip()}\n\n{MATH_INSTRUCTION}"


def mmlu_prompt(question: str, choices: list[str]) -> str:
    letters = LETTERS[:len(choices)]
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, choices))
    instruction = MMLU_INSTRUCTION.format(letters=", ".join(letters[:-1]) + " or " + letters[-1])
    return f"{question.strip()}\n\n{options}\n\n{instruction}"


def _math_train(source: str | None) -> Iterator[Problem]:
    skipped = 0
    for subject in HUB_DATASETS["hendrycks_math"].configs:
        for index, row in enumerate(load_rows("hendrycks_math", subject, "train", source)):
            answer = last_boxed(row["solution"])
            if not answer:
                skipped += 1
                continue
            yield Problem(id=f"math/{subject}/{index}", skill=f"math/{subject}", prompt=math_prompt(row["problem"]),
                          answer=answer.strip())
    if skipped:
        warnings.warn(f"MATH train: skipped {skipped} problem(s) whose solution has no \\boxed{{}} answer",
                      stacklevel=2)


def _math500(source: str | None) -> Iterator[Problem]:
    for row in load_rows("math500", "default", "test", source):
        subject = row["subject"].strip().lower().replace(" & ", "_and_").replace(" ", "_")
        yield Problem(id=f"math500/{row['unique_id']}", skill=f"math500/{subject}", prompt=math_prompt(row["problem"]),
                      answer=row["answer"].strip())


def _gsm8k(split: str, source: str | None) -> Iterator[Problem]:
    for index, row in enumerate(load_rows("gsm8k", "main", split, source)):
        yield Problem(id=f"gsm8k/{split}/{index}", skill="gsm8k", prompt=math_prompt(row["question"]),
                      answer=extract_gsm8k_reference(row["answer"]))


def _mmlu(source: str | None) -> Iterator[Problem]:
    for subject in HUB_DATASETS["mmlu"].configs:
        for index, row in enumerate(load_rows("mmlu", subject, "test", source)):
            yield Problem(id=f"mmlu/{subject}/{index}", skill=f"mmlu/{subject}",
                          prompt=mmlu_prompt(row["question"], list(row["choices"])), answer=LETTERS[int(row["answer"])])


def _load_math(split: str, source: str | None) -> list[Problem]:
    problems = {"rl_train": _math_train, "id_test": _math500, "ood_test": _mmlu}[split](source)
    return list(problems)


def _load_gsm8k(split: str, source: str | None) -> list[Problem]:
    if split == "ood_test":
        return list(_mmlu(source))
    return list(_gsm8k({"rl_train": "train", "id_test": "test"}[split], source))


def reward(response: str, problem: Problem, finished: bool = True) -> float:
    """1.0 if a finished response states the reference answer (letter for ``mmlu/*``), else 0.0; never raises."""
    if not finished or not isinstance(response, str):
        return 0.0
    if problem.skill.startswith("mmlu/"):
        return float(extract_choice(response, LETTERS) == problem.answer)
    return float(is_equivalent(extract_answer(response), problem.answer))


MATH_TASK = register(Task(
    name="math",
    load=_load_math,
    reward=reward,
    description="MATH train (RL), MATH500 (in-domain test), MMLU college physics/chemistry/biology (out-of-domain)",
    default_source=None,
))

GSM8K_TASK = register(Task(
    name="gsm8k",
    load=_load_gsm8k,
    reward=reward,
    description="GSM8K train (RL) and test (in-domain), MMLU college physics/chemistry/biology (out-of-domain)",
    default_source=None,
))


def download(out_dir: str | os.PathLike, keys: tuple[str, ...] | None = None) -> list[Path]:
    """Write every (config, split) the tasks use from the hub to ``out_dir`` in the local layout (JSONL)."""
    written = []
    for key in keys or tuple(HUB_DATASETS):
        if key not in HUB_DATASETS:
            raise ValueError(f"unknown dataset {key!r}; known datasets are {', '.join(map(repr, HUB_DATASETS))}")
        spec = HUB_DATASETS[key]
        for config in spec.configs:
            for split in spec.splits:
                rows = load_rows(key, config, split, None)
                path = Path(out_dir) / key / config / f"{split}.jsonl"
                with atomic_write(path, "wb") as f:
                    rows.to_json(f, lines=True, force_ascii=False)
                written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    """The command line that downloads the hub datasets for offline use."""
    parser = argparse.ArgumentParser(
        prog="python -m kl_lib.tasks.hub",
        description="Download the hub datasets of the math/gsm8k tasks to a directory that can be passed as their "
                    "source on a machine without network.",
        epilog="example: python -m kl_lib.tasks.hub --download data/hub --datasets gsm8k")
    parser.add_argument("--download", required=True, metavar="DIR", help="directory to write <key>/<config>/<split>.jsonl")
    parser.add_argument("--datasets", nargs="*", choices=list(HUB_DATASETS), metavar="NAME",
                        help=f"which datasets, of {', '.join(HUB_DATASETS)} (default: all)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    for path in download(args.download, tuple(args.datasets) if args.datasets else None):
        print(path)


if __name__ == "__main__":
    main()
