"""Data-parallel training: two CPU processes (gloo) under ``accelerate launch``, each accumulating its share in
micro-batches, make the same update as one process on the same global batch in one pass, and only rank 0
writes the run directory."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kl_lib.lm.models import save_untrained_model
from kl_lib.rl import distributed
from kl_lib.rl.config import RLConfig
from kl_lib.rl.train import train
from kl_lib.tasks.arithmetic import write_splits

SIZES = {"rl_train": 64, "id_test": 8, "ood_test": 8, "sft": 8}
# k1 in the loss has a non-zero per-sample gradient even at π = π_ref (its *expectation* is zero), so the
# update is non-trivial for an untrained model whose rewards are all 0.
OVERRIDES = {"steps": 2, "prompts_per_step": 4, "group_size": 2, "max_new_tokens": 4, "lr": 1e-2,
             "rollout_shards": 2, "kl.estimator": "k1", "kl.placement": "loss", "kl.beta": 1.0, "seed": 3}


def test_split_gives_each_rank_its_consecutive_shards():
    one, two = distributed.Dist(0, 1), [distributed.Dist(r, 2) for r in range(2)]
    assert distributed.split(8, one, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert distributed.split(8, two[0], 4) == [(0, 2), (2, 4)]
    assert distributed.split(8, two[1], 4) == [(4, 6), (6, 8)]
    assert distributed.split(8, two[1]) == [(4, 8)]  # 0 = one shard per process
    with pytest.raises(ValueError, match="rollout_shards must divide"):
        distributed.split(8, two[0], 3)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    if shutil.which("accelerate", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("accelerate is a dependency of kl_lib: its launcher should sit next to the Python executable")
    model = save_untrained_model(tmp_path / "model", seed=0, hidden_size=32, num_layers=2, num_heads=2,
                                 intermediate_size=64)
    write_splits(tmp_path / "data", seed=0, sizes=SIZES)
    common = {"model": str(model), "data_dir": str(tmp_path / "data"), **OVERRIDES}

    # two processes, launched the way a user launches them on a GPU node
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29517"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           "29517", "-m", "kl_lib.rl.train", "--no-progress", "--set", f"runs_dir={tmp_path / 'ddp'}",
           "--set", "micro_batch_size=2"]  # and each process accumulates its share in passes of one group
    for key, value in common.items():
        cmd += ["--set", f"{key}={value}"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # one process, the same global batch
    torch.set_num_threads(1)
    kl = {k[3:]: v for k, v in common.items() if k.startswith("kl.")}
    fields = {k: v for k, v in common.items() if not k.startswith("kl.")}
    cfg = RLConfig(**fields, kl={"estimator": kl["estimator"], "placement": kl["placement"], "beta": kl["beta"]},
                   runs_dir=str(tmp_path / "single"))
    single = train(cfg, progress=False)
    assert single.status == "done"

    ddp_run = tmp_path / "ddp" / cfg.run_name()
    assert json.loads((ddp_run / "config.json").read_text())["world_size"] == 2
    assert json.loads((ddp_run / "summary.json").read_text())["status"] == "done"
    ddp_metrics = [json.loads(line) for line in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    one_metrics = [json.loads(line) for line in (single.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(ddp_metrics) == len(one_metrics) == 2  # rank 1 wrote nothing: one line per step
    for a, b in zip(ddp_metrics, one_metrics):
        for key in ("reward/mean", "response/length", "kl/k1", "loss/total", "grad/norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key

    ddp_weights = load_file(ddp_run / "final" / "model.safetensors")
    one_weights = load_file(single.run_dir / "final" / "model.safetensors")
    base = load_file(Path(model) / "model.safetensors")
    moved = max(float((one_weights[k] - base[k]).abs().max()) for k in base)
    assert moved > 1e-3, "the update should move the weights (otherwise the comparison says nothing)"
    for name, value in one_weights.items():
        torch.testing.assert_close(ddp_weights[name], value, atol=1e-6, rtol=1e-5, msg=name)
