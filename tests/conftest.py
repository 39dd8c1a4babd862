"""Shared fixtures."""

import pytest
import torch

from kl_lib.lm.models import save_untrained_model
from kl_lib.tasks.arithmetic import write_splits

TINY_SIZES = {"rl_train": 64, "id_test": 16, "ood_test": 16, "sft": 32}
"""Arithmetic splits of the ``tiny`` fixture: enough rl_train prompts for a few steps, small test splits."""


@pytest.fixture(scope="module")
def one_thread():
    """Toy-sized tensors: intra-op threads only add overhead (and contend with other processes)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(root, model_dir)``: a randomly initialised 2-layer Llama and arithmetic splits (``TINY_SIZES``) under
    ``root / "data"``, one per test module: what the trainer's tests train on."""
    root = tmp_path_factory.mktemp("tiny")
    model_dir = save_untrained_model(root / "model", seed=0, hidden_size=32, num_layers=2, num_heads=2,
                                     intermediate_size=64)
    write_splits(root / "data", seed=0, sizes=TINY_SIZES)
    return root, model_dir
