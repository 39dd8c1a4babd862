"""Tasks with verifiable rewards, by name: what the trainer samples prompts from and how it scores responses.

A task maps the study's split names to problems and scores a response against a problem:

    rl_train   the prompts RL trains on            id_test   held-out problems of the same task
    ood_test   other skills/domains the model partly knows (what a KL term is meant to protect)

``get_task(name).load(split, source)`` returns ``list[Problem]`` and ``task.reward(response, problem, finished)``
a float in [0, 1] that never raises on model output (truncated responses, ``finished=False``, score 0).
``source`` is where the data lives: a local directory (the project's generated JSONL, or local files in a hub
dataset's own schema) or ``None`` for the task's default (its hub dataset, or ``data/<task>``).

Tasks register themselves with :func:`register`; an unknown name raises an error listing the known ones.
"""

from kl_lib.tasks.base import (
    SPLIT_NAMES,
    Problem,
    Task,
    draw_distinct,
    get_task,
    problems_digest,
    read_problems,
    register,
    task_names,
    write_disjoint_splits,
    write_problems,
)

# The task modules register themselves on import (hub datasets load their data only when asked).
from kl_lib.tasks import arithmetic, chat_arithmetic, countdown, hub, worked_arithmetic  # noqa: F401  isort: skip

__all__ = ["SPLIT_NAMES", "Problem", "Task", "draw_distinct", "get_task", "problems_digest", "read_problems",
           "register", "task_names", "write_disjoint_splits", "write_problems"]
