"""Supervised fine-tuning of the tiny base model on the ``sft`` split (the "pretrained model" of this study).

Loss: token-level cross-entropy on the assistant's answer and its end-of-sequence token only (the prompt is
context), mean over answer tokens in the batch; AdamW with linear warm-up, then a constant (default) or cosine
learning rate. Training stops once greedy accuracy on a probe of the RL task reaches a target (default 0.5), so
that the base model partly knows it. Deterministic from
the seed on CPU: the weight initialisation runs under a forked RNG seeded with ``seed``, batches are drawn
with an explicit ``torch.Generator``. ``--device cuda`` trains and probes on a GPU (weights drawn and batches
chosen on the CPU as before; not bit-identical to a CPU build, so the probe may stop it at another step).

    python -m kl_lib.lm.sft --out data/models/tiny-base [--steps 3000] [--seed 0]
    python -m kl_lib.lm.sft --task worked_arithmetic --out data/models/worked-base
    python -m kl_lib.lm.sft --task worked_arithmetic --device cuda --hidden-size 384 ...   (configs/gpu/worked-*.yaml)

``--task`` names a generated task of ``SFT_TASKS`` and starts from its preset (``TASK_PRESETS``: data directory,
model size, probe budget); other flags still apply.

writes a ``save_pretrained`` model + tokenizer, ``sft.json`` (config, versions, loss curve, greedy accuracy)
and ``DONE`` last; an existing directory with the same config is left alone (``--force`` rebuilds).

Departure from the paper: the paper starts from pretrained 4–8 B checkpoints; here the base model is trained
from scratch to *partly* know the RL task (see ``kl_lib.tasks.arithmetic``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kl_lib.lm.evaluate import greedy_accuracy
from kl_lib.lm.models import build_tokenizer, format_prompt, save_model, tiny_llama_config
from kl_lib.files import config_digest, environment_info, write_json
from kl_lib.tasks import arithmetic, worked_arithmetic
from kl_lib.tasks.base import Problem

__all__ = ["SFTConfig", "SFTTask", "SFT_TASKS", "SMOKE", "TASK_PRESETS", "encode_sft", "smoke_config", "train_base_model"]


@dataclass(frozen=True)
class SFTTask:
    """A generated task SFT can train on: how to write its splits and read one back."""
    write_splits: Callable[..., dict[str, Path]]
    load_split: Callable[[Path], list[Problem]]


SFT_TASKS: dict[str, SFTTask] = {
    "arithmetic": SFTTask(arithmetic.write_splits, arithmetic.load_split),
    "worked_arithmetic": SFTTask(worked_arithmetic.write_splits, worked_arithmetic.load_split),
}

# Fields added after the arithmetic base model was built: left out of the digest at these defaults, so its
# identity (and that of every RL run on it) is unchanged.
_LATER_FIELDS = {"task": "arithmetic", "intermediate_size": 384, "max_positions": 64, "probe_max_new_tokens": 6}
# Where the model trains, not what it is (as RLConfig.device): never in the digest; recorded in sft.json.
_NOT_DIGESTED = ("device",)


@dataclass(frozen=True)
class SFTConfig:
    data_dir: str = "data/arithmetic"
    """Directory of the task splits (created with ``write_splits`` if missing)."""
    data_seed: int = 0
    """Seed of the task splits."""
    seed: int = 0
    """Seed of the weight initialisation and batch order."""
    steps: int = 3000
    """Maximum optimizer steps (training usually stops earlier, see ``stop_at_probe_accuracy``)."""
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    hidden_size: int = 128
    num_layers: int = 4
    schedule: str = "constant"
    """``cosine`` decay to 0, or ``constant`` after warm-up (then a shorter run is a prefix of a longer one)."""
    probe_every: int = 50
    """Every this many steps, measure greedy accuracy on ``probe_size`` problems of the RL task (from
    ``rl_train``; never the test splits). 0 disables probing (and early stopping)."""
    probe_size: int = 200
    stop_at_probe_accuracy: float = 0.5
    """Stop once the probe accuracy reaches this. The 3-digit skills are learned abruptly (greedy accuracy
    jumps from ~0.05 to ~0.7 within a few hundred steps, at a step that depends on the seed and on floating-point
    details), so stopping on the probe rather than at a fixed step gives a base model that *partly* knows the RL
    task, reproducibly: what the study needs (RL has room to help; see notebook 03). 1.0 trains all steps."""

    task: str = "arithmetic"
    """The generated task (``SFT_TASKS``) whose ``sft`` split is trained on and whose ``rl_train`` is probed."""
    intermediate_size: int = 384
    """Width of the model's MLP."""
    max_positions: int = 64
    """The model's ``max_position_embeddings``: at least the longest prompt plus answer."""
    probe_max_new_tokens: int = 6
    """Token budget of the greedy completions of the probe and the final accuracy."""
    device: str = "cpu"
    """Where the model trains and is probed: ``cpu``, ``cuda`` or ``cuda:N`` (float32 either way). Not part of
    the digest: a model built on a GPU is the same recipe, its numbers differ from a CPU build's by rounding."""

    def __post_init__(self) -> None:
        if self.task not in SFT_TASKS:
            raise ValueError(f"SFTConfig.task={self.task!r} is not valid; choose one of "
                             f"{', '.join(map(repr, SFT_TASKS))}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"SFTConfig.schedule={self.schedule!r} is not valid; choose 'cosine' or 'constant'")
        for name in ("steps", "batch_size", "warmup", "probe_size", "intermediate_size", "max_positions",
                     "probe_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"SFTConfig.{name}={getattr(self, name)!r} must be ≥ 1")
        if not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"SFTConfig.device={self.device!r} is not valid; choose 'cpu', 'cuda' or 'cuda:N'")
        if not 0 < self.stop_at_probe_accuracy <= 1:
            raise ValueError(f"SFTConfig.stop_at_probe_accuracy={self.stop_at_probe_accuracy!r} must be in (0, 1]")

    def digest(self) -> str:
        fields = dataclasses.asdict(self)
        return config_digest({k: v for k, v in fields.items()
                              if k not in _NOT_DIGESTED and (k not in _LATER_FIELDS or v != _LATER_FIELDS[k])})


SMOKE = SFTConfig(steps=200, batch_size=64, hidden_size=64, num_layers=2, probe_every=0)
"""The smoke-mode base model (``make ... SMOKE=1``, notebook smoke runs): seconds to train, mechanics only."""

TASK_PRESETS: dict[str, SFTConfig] = {
    "arithmetic": SFTConfig(),
    "worked_arithmetic": SFTConfig(task="worked_arithmetic", data_dir=worked_arithmetic.DEFAULT_DIR,
                                   max_positions=128, probe_max_new_tokens=72, probe_size=100, probe_every=100,
                                   stop_at_probe_accuracy=0.4, steps=3000, batch_size=32),
}
"""The starting config of ``--task NAME``: each generated task's data directory, model and probe budget."""


def smoke_config(task: str = "arithmetic", data_dir: str | Path | None = None) -> SFTConfig:
    """The smoke base model of ``task`` (``--smoke``): ``SMOKE``'s sizes with the task's data directory and its
    preset's sequence and probe lengths; exactly ``SMOKE`` for ``arithmetic`` in its default directory."""
    preset = TASK_PRESETS[task]
    lengths = {} if task == "arithmetic" else {
        name: getattr(preset, name) for name in ("task", "max_positions", "probe_max_new_tokens")}
    return dataclasses.replace(SMOKE, data_dir=str(data_dir or preset.data_dir), **lengths)


def encode_sft(tokenizer, problems: list[Problem]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(N, L)`` input ids, attention mask and loss mask (1 on answer and EOS tokens)."""
    rows, answer_lengths = [], []
    for p in problems:
        prompt_ids = tokenizer(format_prompt(tokenizer, p.prompt), add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(p.answer + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        rows.append(prompt_ids + answer_ids)
        answer_lengths.append(len(answer_ids))
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros(len(rows), width, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (row, n_answer) in enumerate(zip(rows, answer_lengths)):
        ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        loss_mask[i, len(row) - n_answer: len(row)] = True
    return ids, attention, loss_mask


def _model_digest(config: SFTConfig, data_dir: Path) -> str:
    """The model depends on the config and on the data it is trained (``sft``) and probed (``rl_train``) on."""
    data = "".join(hashlib.sha256((data_dir / f"{name}.jsonl").read_bytes()).hexdigest()
                   for name in ("sft", "rl_train"))
    return hashlib.sha256((config.digest() + data).encode()).hexdigest()[:12]


def _initial_model(config: SFTConfig, tokenizer):
    """The tiny Llama, its weights drawn on the CPU under a forked RNG seeded with ``config.seed``, then moved to
    ``config.device``."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = AutoModelForCausalLM.from_config(
            tiny_llama_config(len(tokenizer), hidden_size=config.hidden_size, num_layers=config.num_layers,
                              intermediate_size=config.intermediate_size, max_positions=config.max_positions,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id))
    return model.to(config.device)


def _lr_factor(config: SFTConfig, step: int) -> float:
    """Multiplier of ``config.lr`` at ``step``: linear warm-up, then constant or cosine decay to 0."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.5 * (1 + math.cos(math.pi * progress))


def _train(model, tokenizer, config: SFTConfig, batches: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
           probe: list[Problem]) -> tuple[list[float], list[dict[str, float]]]:
    """The SFT loop on ``batches`` = (ids, attention, loss mask), each ``(N, L)``; returns (losses, probe curve).

    Stops early once the probe accuracy reaches ``config.stop_at_probe_accuracy``.
    """
    ids, attention, loss_mask = batches
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(config, step))
    generator = torch.Generator().manual_seed(config.seed)
    losses, curve = [], []
    model.train()
    for step in (bar := tqdm(range(config.steps), desc="SFT", unit="step", mininterval=5)):
        idx = torch.randint(len(ids), (config.batch_size,), generator=generator)
        width = int(attention[idx].sum(1).max())
        batch_ids, batch_att, batch_mask = (t[idx, :width].to(config.device) for t in (ids, attention, loss_mask))
        logits = model(input_ids=batch_ids, attention_mask=batch_att).logits[:, :-1]  # (B, L-1, V)
        targets, mask = batch_ids[:, 1:], batch_mask[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
        if config.probe_every and (step + 1) % config.probe_every == 0:
            curve.append({"step": step + 1, "probe_accuracy": _accuracy(model, tokenizer, config, probe)})
            model.train()
            if curve[-1]["probe_accuracy"] >= config.stop_at_probe_accuracy:
                print(f"step {step + 1}: probe accuracy {curve[-1]['probe_accuracy']:.2f} "
                      f"≥ {config.stop_at_probe_accuracy}: stopping", flush=True)
                break
    return losses, curve


def _accuracy(model, tokenizer, config: SFTConfig, problems: list[Problem]) -> float:
    return greedy_accuracy(model, tokenizer, problems, max_new_tokens=config.probe_max_new_tokens, task=config.task)


def _save(out_dir: Path, model, tokenizer, meta: dict) -> None:
    """Model, tokenizer, ``sft.json`` and ``DONE`` into a sibling ``.tmp`` directory, then renamed over ``out_dir``."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tokenizer, tmp)
    write_json(tmp / "sft.json", meta)
    (tmp / "DONE").write_text("ok\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)


def train_base_model(out_dir: str | Path, config: SFTConfig = SFTConfig(), force: bool = False) -> Path:
    """Train (or reuse) the base model in ``out_dir``; returns the directory."""
    out_dir = Path(out_dir)
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"SFTConfig.device={config.device!r} but no CUDA device is available; use --device cpu")
    data_dir, task = Path(config.data_dir), SFT_TASKS[config.task]
    if not (data_dir / "sft.jsonl").exists():
        task.write_splits(data_dir, seed=config.data_seed)
    digest = _model_digest(config, data_dir)
    if (out_dir / "DONE").exists() and not force:
        if json.loads((out_dir / "sft.json").read_text()).get("config_digest") == digest:
            print(f"base model in {out_dir} is up to date (config and data {digest})")
            return out_dir
    train = task.load_split(data_dir / "sft.jsonl")
    tokenizer = build_tokenizer()
    batches = encode_sft(tokenizer, train)
    model = _initial_model(config, tokenizer)
    probe = task.load_split(data_dir / "rl_train.jsonl")[: config.probe_size]
    start = time.time()
    losses, curve = _train(model, tokenizer, config, batches, probe)
    train_time = time.time() - start

    accuracy = {name: _accuracy(model, tokenizer, config, task.load_split(data_dir / f"{name}.jsonl"))
                for name in ("id_test", "ood_test")}
    _save(out_dir, model, tokenizer, {
        "config": dataclasses.asdict(config), "config_digest": digest, "greedy_accuracy": accuracy,
        "train_time_s": train_time, "steps_trained": len(losses), "loss_every_50": losses[::50],
        "probe_curve": curve, "num_parameters": model.num_parameters(), "environment": environment_info(),
    })
    print(f"base model: {model.num_parameters():,} parameters, greedy accuracy {accuracy}, in {out_dir}")
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    """The command line of the base-model SFT: ``--out``, ``--force``, ``--smoke`` and one option per SFTConfig field."""
    parser = argparse.ArgumentParser(
        prog="python -m kl_lib.lm.sft", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the tiny base model of the RL study by supervised fine-tuning on the arithmetic task "
                    "(~5 min on 2 CPU cores).\nSkipped when --out holds a model trained with the same config and "
                    "data; the task splits are written first if missing.",
        epilog="examples:\n  python -m kl_lib.lm.sft                     (make base-model)\n"
               "  python -m kl_lib.lm.sft --smoke --out /tmp/tiny-smoke\n"
               "  python -m kl_lib.lm.sft --steps 1000 --seed 1 --out data/models/tiny-base-s1")
    parser.add_argument("--out", default="data/models/tiny-base", metavar="DIR",
                        help="model directory to write (default data/models/tiny-base)")
    parser.add_argument("--force", action="store_true", help="retrain even if --out holds a model of this config")
    parser.add_argument("--smoke", action="store_true", help="start from the SMOKE preset (other flags still apply)")
    for field in dataclasses.fields(SFTConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=None,
                            metavar=type(field.default).__name__.upper(),
                            help=f"SFTConfig.{field.name} (default {field.default!r}; "
                                 f"--smoke: {getattr(SMOKE, field.name)!r})")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.task is not None and args.task not in TASK_PRESETS:
        parser.error(f"--task {args.task!r} is not valid; choose one of {', '.join(map(repr, TASK_PRESETS))}")
    task = args.task or "arithmetic"
    base = smoke_config(task) if args.smoke else TASK_PRESETS[task]
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SFTConfig) if getattr(args, f.name) is not None}
    config = dataclasses.replace(base, **given)
    train_base_model(args.out, config, force=args.force)


if __name__ == "__main__":
    main()
