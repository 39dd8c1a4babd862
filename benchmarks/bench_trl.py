"""Steps per second of our trainer (``kl_lib.rl.train.train``) against TRL's ``GRPOTrainer`` on the same work.

    python benchmarks/bench_trl.py [--steps 10] [--warmup 2] [--repeats 3] [--prompts 64] [--group-size 4]
        [--max-new-tokens 4] [--task arithmetic|worked_arithmetic] [--model random|PATH] [--threads 1]
        [--profile] [--trl-defaults] [--out runs/benchmarks/trl.json]

    # the long-answer study's workload (make bench-trl-study): its base model, 8 prompts × 5 samples, ≤ 72 tokens
    python benchmarks/bench_trl.py --task worked_arithmetic --model data/models/worked-base --prompts 8 \\
        --group-size 5 --max-new-tokens 72 --out runs/benchmarks/trl_study.json

needs the ``bench`` extra (``pip install -e .[bench]``, i.e. ``trl==1.16.0``).

**What is compared.** Both trainers start from the same model directory, sample ``--group-size`` completions of
at most ``--max-new-tokens`` tokens for each of ``--prompts`` prompts of the ``rl_train`` split of ``--task``
(seed 0, the split the studies train on; chat-formatted with ``kl_lib.lm.models.format_prompt``; same token ids
on both sides), score them with the task's ``reward`` and take one AdamW step per batch with a frozen-copy
reference and the k3 estimator in the loss, β = 0.04. Settings that make the objectives the same:

    ours: advantage="grpo", policy_loss="reinforce", aggregation="token_mean", kl=KLConfig("k3", "loss", 0.04)
    TRL:  scale_rewards="group", loss_type="grpo", beta=0.04, num_iterations=1, steps_per_generation=1

TRL's ``loss_type="grpo"`` averages each sequence's per-token loss over its length and then over sequences,
which is our ``aggregation="token_mean"``; on-policy (one iteration, generation every step) its clipped ratio
is exp(logπ − sg logπ) = 1 with gradient ∇logπ, i.e. REINFORCE; its per-token KL is k3 = e^{ref−logπ} −
(ref − logπ) − 1 added to the loss, our ``KLConfig("k3", "loss")`` with token-mean aggregation. Remaining
differences, none of which changes the work per step: TRL's advantage is (R − mean)/(std + 1e-4), ours
(R − mean)/(std + 1e-6); TRL samples prompts with its shuffling sampler, ours with a seeded ``random.sample``
(so the two see different prompts, of the same length: ``add3`` prompts are all 11 tokens); TRL computes
log-probs with a chunked fused LM head (no ``(B, T, V)`` logits) and no position ids, ours materialises the
full log-probs (for the analytic estimator and logging) and passes position ids from the attention mask. How
each side gets through a step differs with the answer budget: up to ``kl_lib.rl.train.SHORT_ANSWER_TOKENS`` (16)
ours trains on its sampling forward (``rollout_grad``: no recomputation); above it (``--max-new-tokens 48``) it
samples without a graph, taking finished rows out of the batch (``kl_lib.rl.rollout.sample``: ``generate``'s
tokens), and runs the reference and training passes without the padding (``trimmed_response_logits``), while
TRL's ``generate`` runs every row to the longest answer and its passes cover the padded batch. Both:
temperature 1, no top-k/top-p, fp32, no vLLM, no gradient checkpointing, constant learning rate, gradient
clipping at 1.0, no checkpoint saving or logging inside the timed steps (``report_to="none"``,
``save_strategy="no"``; ours checkpoints only after the last step).

**Model.** ``--model random`` (default) is a randomly initialised tiny Llama saved with
``kl_lib.lm.models.save_untrained_model``; any other value is a model directory (e.g. the SFT base model
``data/models/tiny-base``). The model must use rotary position embeddings: TRL passes no position ids, so a
left-padded row is scored at shifted positions, which leaves rotary attention scores (they depend only on
position differences) and hence the log-probs unchanged; with learned absolute positions TRL's log-probs of
padded rows would be wrong and the comparison would not be of the same computation. The log-prob check below
measures this directly on a batch with left-padded prompts and right-padded completions.

**How it is timed.** One process, models loaded and trainers built outside the timed region. ``--repeats``
rounds of [ours, TRL], the order reversed every other round, so that background load hits both sides alike;
each run does ``--warmup`` untimed steps then ``--steps`` timed ones. Two clocks per step:

* ``step``: ours ``time/step_s`` from ``metrics.jsonl`` (rollout to logging, inclusive); TRL the wall time from
  ``TrainerCallback.on_step_begin`` to ``on_step_end`` (generation, scoring, forward, backward, optimizer).
* ``cycle``: start-to-start time of consecutive steps (ours: consecutive ``Hooks.before_rollout`` calls of
  ``kl_lib.rl.train``; TRL: consecutive ``on_step_begin``), which adds whatever each loop does between steps (data
  loading, logging, metric files). steps/s = 1 / median cycle time of a run.

Threads: both sides use ``--threads`` intra-op threads (default 1). On the shared two-core machine this was
written on, two threads per process spin against other jobs' threads: with another job training, two threads
were ~3× slower than one on both sides, and the paired ratio ranged 0.4–2.0 between repeats (one thread:
within a few percent). ``--threads 0`` keeps torch's default (one per core) for an idle machine.

Reported: steps/s per side (median over repeats and the min–max spread), the paired ratio ours/TRL, the split of
our step into generation / training / other (reward, reference forward, metrics) and TRL's into generation /
scoring (reference forward, rewards, advantages) / training, and the log-prob agreement. Results go to
``runs/benchmarks/trl.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import kl_lib.rl.train as rl_train
from kl_lib.config import KLConfig
from kl_lib.files import environment_info, write_json
from kl_lib.lm.models import (
    format_prompt,
    load_model,
    load_tokenizer,
    save_untrained_model,
)
from kl_lib.rl.config import RLConfig
from kl_lib.rl.rollout import generate, response_mask, token_logprobs
from kl_lib.tasks import arithmetic, worked_arithmetic

# The tasks a benchmark can run on: modules with the same generate_split / write_splits / load_split / reward API.
TASKS = {"arithmetic": arithmetic, "worked_arithmetic": worked_arithmetic}

BETA = 0.04
LR = 1e-4
MAX_GRAD_NORM = 1.0


# ------------------------------------------------------------------------------------------------------------
# Ours
# ------------------------------------------------------------------------------------------------------------


def ours_config(args: argparse.Namespace, model_dir: str, data_dir: str, runs_dir: str, name: str) -> RLConfig:
    return RLConfig(
        model=model_dir, data_dir=data_dir, seed=0, steps=args.warmup + args.steps,
        prompts_per_step=args.prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
        temperature=1.0, advantage="grpo", policy_loss="reinforce", aggregation="token_mean",
        kl=KLConfig("k3", "loss", beta=BETA), finetune="full", lr=LR, weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM, checkpoint_every=10**9, device="cpu", dtype="float32",
        runs_dir=runs_dir, name=name, task=args.task)


def run_ours(args: argparse.Namespace, model_dir: str, data_dir: str, runs_dir: str, name: str) -> dict[str, Any]:
    starts: list[float] = []  # each step's start (the trainer's before_rollout hook)
    hooks = rl_train.Hooks(before_rollout=lambda tr, step: starts.append(time.perf_counter()))
    result = rl_train.train(ours_config(args, model_dir, data_dir, runs_dir, name), progress=False, hooks=hooks)
    if result.status != "done":
        raise RuntimeError(f"our trainer ended with status {result.status!r}: {result.summary}")
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = rows[args.warmup:]
    return {
        "step_s": [r["time/step_s"] for r in timed],
        "cycle_s": [b - a for a, b in zip(starts[args.warmup:], starts[args.warmup + 1:])],
        "split_s": {"generate": [r["time/generate_s"] for r in timed], "train": [r["time/train_s"] for r in timed],
                    "other": [r["time/step_s"] - r["time/generate_s"] - r["time/train_s"] for r in timed]},
        "reward_mean": statistics.fmean(r["reward/mean"] for r in rows),
        "threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------------------------------
# TRL
# ------------------------------------------------------------------------------------------------------------


def trl_trainer(args: argparse.Namespace, model_dir: str, data_dir: str, out_dir: str, max_steps: int,
                callbacks: list | None = None, reward_means: list | None = None):
    """A ``GRPOTrainer`` doing the same work per step as :func:`ours_config` (see the module docstring)."""
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    tokenizer = load_tokenizer(model_dir)
    eos = tokenizer.eos_token_id
    reward_means = [] if reward_means is None else reward_means  # mean reward of each batch, filled by TRL
    task = TASKS[args.task]
    problems = task.load_split(Path(data_dir) / "rl_train.jsonl")
    # Already chat-formatted strings: TRL tokenizes them as they are (no special tokens added for this
    # tokenizer), giving the token ids our trainer gets from format_prompt.
    dataset = datasets.Dataset.from_list([{"prompt": format_prompt(tokenizer, p.prompt), "answer": p.answer}
                                          for p in problems])

    def arithmetic_reward(prompts, completions, completion_ids, answer, **_):
        # TRL cuts each completion after its first EOS, so it finished iff its last token is EOS.
        rewards = [task.reward(text, ans, bool(ids) and ids[-1] == eos)
                   for text, ids, ans in zip(completions, completion_ids, answer)]
        reward_means.append(statistics.fmean(rewards))
        return rewards

    # TRL's own defaults on CPU are bf16 autocast and activation checkpointing (GRPOConfig's docstring);
    # --trl-defaults keeps them, to show what a user who only sets use_cpu=True gets.
    precision = {} if args.trl_defaults else {"bf16": False, "gradient_checkpointing": False}
    config = GRPOConfig(
        output_dir=out_dir, seed=0, max_steps=max_steps, use_cpu=True, fp16=False, **precision,
        report_to="none", save_strategy="no", logging_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0, model_init_kwargs={"dtype": torch.float32},
        # one generation of prompts × group completions per optimizer step, used once
        per_device_train_batch_size=args.prompts * args.group_size, gradient_accumulation_steps=1,
        steps_per_generation=1, num_generations=args.group_size, num_iterations=1,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, use_vllm=False,
        # the objective (module docstring)
        beta=BETA, loss_type="grpo", scale_rewards="group",
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM, optim="adamw_torch",
    )
    return GRPOTrainer(model=model_dir, reward_funcs=arithmetic_reward, args=config, train_dataset=dataset,
                       processing_class=tokenizer, callbacks=callbacks)


def run_trl(args: argparse.Namespace, model_dir: str, data_dir: str, out_dir: str) -> dict[str, Any]:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin: list[float] = []
            self.end: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            self.end.append(time.perf_counter())

    timer = StepTimer()
    reward_means: list[float] = []
    trainer = trl_trainer(args, model_dir, data_dir, out_dir, args.warmup + args.steps, callbacks=[timer],
                          reward_means=reward_means)

    # Split each step: generation (TRL's `_generate`: tokenize, sample, decode), scoring (the rest of
    # `_generate_and_score_completions`: reference forward, rewards, advantages), training (the rest).
    phase: dict[str, list[float]] = {"generate": [], "generate_and_score": []}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            phase[name].append(time.perf_counter() - t)
            return out
        return wrapper

    trainer._generate = timed("generate", trainer._generate)
    trainer._generate_and_score_completions = timed("generate_and_score", trainer._generate_and_score_completions)
    trainer.train()
    w = args.warmup
    step_s = [e - b for b, e in zip(timer.begin, timer.end)][w:]
    gen, gen_score = phase["generate"][w:], phase["generate_and_score"][w:]
    return {
        "step_s": step_s,
        "cycle_s": [b - a for a, b in zip(timer.begin[w:], timer.begin[w + 1:])],
        "split_s": {"generate": gen, "score": [gs - g for g, gs in zip(gen, gen_score)],
                    "train": [s - gs for s, gs in zip(step_s, gen_score)]},
        "reward_mean": statistics.fmean(reward_means),
        "threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------------------------------------------------
# Same log-probs?
# ------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def logprob_agreement(args: argparse.Namespace, model_dir: str, data_dir: str, out_dir: str) -> dict[str, Any]:
    """Max |Δ log π| between ``token_logprobs`` and TRL's ``_get_per_token_logps_and_entropies``, same weights.

    The batch mixes prompt lengths (2- and 3-digit problems, so up to 4 tokens of left padding) and completion
    lengths (an EOS forced into every other row, right padding after it), the case where TRL's missing
    position ids would matter for a model without rotary embeddings.
    """
    tokenizer = load_tokenizer(model_dir)
    task = TASKS[args.task]
    problems = task.generate_split("sft", seed=1, size=24) + task.load_split(Path(data_dir) / "rl_train.jsonl")[:8]
    enc = tokenizer([format_prompt(tokenizer, p.prompt) for p in problems], return_tensors="pt", padding=True,
                    add_special_tokens=False)
    prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]  # (B, P) left-padded
    model = load_model(model_dir).eval()
    roll = generate(model, tokenizer, prompt_ids, prompt_mask, max_new_tokens=8, temperature=1.0, seed=0)
    response_ids = roll.response_ids.clone()  # (B, R)
    g = torch.Generator().manual_seed(0)
    for i in range(0, response_ids.shape[0], 2):
        response_ids[i, int(torch.randint(0, response_ids.shape[1], (1,), generator=g))] = tokenizer.eos_token_id
    mask, _ = response_mask(response_ids, tokenizer.eos_token_id)
    response_ids = response_ids.masked_fill(~mask, tokenizer.pad_token_id)

    ours, _ = token_logprobs(model, prompt_ids, prompt_mask, response_ids, mask)  # (B, R)
    trainer = trl_trainer(args, model_dir, data_dir, out_dir, max_steps=1)
    trainer.model.eval()
    input_ids = torch.cat([prompt_ids, response_ids], 1)  # (B, P + R)
    attention = torch.cat([prompt_mask, mask.long()], 1)
    theirs, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, input_ids, attention,
                                                              logits_to_keep=response_ids.shape[1])
    diff = ((ours - theirs).abs() * mask).amax(-1)  # (B,)
    padded = prompt_mask.sum(-1) < prompt_mask.shape[1]
    # our own two code paths (sampler's log-probs from generate vs. the recomputing forward), unmodified rollout
    recomputed, _ = token_logprobs(model, roll.prompt_ids, roll.prompt_mask, roll.response_ids, roll.response_mask)
    sampler = ((recomputed - roll.behavior_logp).abs() * roll.response_mask).max()
    return {"max_abs_diff": float(diff.max()), "max_abs_diff_left_padded_rows": float(diff[padded].max()),
            "max_abs_diff_unpadded_rows": float(diff[~padded].max()), "rows": int(mask.shape[0]),
            "left_padded_rows": int(padded.sum()), "tokens_compared": int(mask.sum()),
            "ours_vs_sampler_max_abs_diff": float(sampler)}


def profile_ours(args: argparse.Namespace, model_dir: str, data_dir: str, runs_dir: str) -> dict[str, Any]:
    """One more run of ours under cProfile: the share of the step loop's time in each part of a step.

    Parts are cumulative times of the functions that do them; set-up (loading, hashing the run's inputs) and the
    end of the run (final checkpoint, ``save_pretrained``) are taken out of the total first.
    """
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    rl_train.train(ours_config(args, model_dir, data_dir, runs_dir, "ours-profile"), progress=False)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, nc, tottime, cumtime, callers)}
    total = sum(v[2] for v in stats.values())

    def cumulative(name: str, file_part: str = "") -> float:
        # built-ins are recorded as ("~", 0, "<method 'run_backward' of ...>"), hence the substring match
        return sum(v[3] for (f, _, n), v in stats.items()
                   if (n == name or (f == "~" and name in n)) and file_part in f)

    outside = {
        "set-up (models, run identity, environment)": cumulative("build_models") + cumulative("run_identity")
        + cumulative("environment_info") + cumulative("load_split"),
        "end of run (checkpoint, save_pretrained)": cumulative("save_checkpoint") + cumulative("save_pretrained"),
    }
    loop = total - sum(outside.values())
    parts = {
        "generate": cumulative("generate", "transformers/generation"),
        "sampling without a graph, finished rows dropped (long answers)": cumulative("sample", "kl_lib/rl/rollout"),
        "sampling with the graph kept (policy forward with grad + reference, rollout_grad)":
            cumulative("sample_with_logits", "kl_lib"),
        "log-prob forwards (policy with grad, reference without)": cumulative("response_logits", "kl_lib")
        + cumulative("trimmed_response_logits", "kl_lib"),
        "backward": cumulative("run_backward"),
        "optimizer step": cumulative("step", "torch/optim/adam"),
        "finite-weights check": cumulative("isfinite"),
        "prompt formatting and tokenization": cumulative("encode_prompts", "kl_lib"),
        "rewards and advantages": cumulative("reward", "kl_lib/tasks") + cumulative("compute_advantages"),
        "KL metrics and entropy (logging)": cumulative("kl_metrics") + cumulative("analytic", "kl_lib/estimators"),
    }
    parts["rest of the loop"] = max(0.0, loop - sum(parts.values()))
    top = sorted(((v[2], f"{Path(f).name}:{line}({n})") for (f, line, n), v in stats.items()), reverse=True)[:15]
    return {"steps": args.warmup + args.steps, "total_s": total, "loop_s": loop, "outside_loop_s": outside,
            "loop_seconds": parts, "loop_fractions": {k: v / loop for k, v in parts.items()},
            "top_tottime": [{"function": name, "s": t} for t, name in top]}


# ------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, checked before any work (TRL installed, counts in range, the model directory present)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of [ours, TRL] (order alternates)")
    parser.add_argument("--prompts", type=int, default=64, help="distinct prompts per step")
    parser.add_argument("--group-size", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=4, help="completion budget")
    parser.add_argument("--task", choices=sorted(TASKS), default="arithmetic",
                        help="prompts (rl_train split, seed 0) and reward; worked_arithmetic is the long-answer study's")
    parser.add_argument("--model", default="random",
                        help="'random' (a tiny untrained Llama) or a model directory, e.g. data/models/tiny-base")
    parser.add_argument("--hidden-size", type=int, default=128, help="--model random only")
    parser.add_argument("--num-layers", type=int, default=4, help="--model random only")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for both sides (0 = torch's default, one per core); see below")
    parser.add_argument("--trl-defaults", action="store_true",
                        help="leave TRL's CPU defaults bf16=True and gradient_checkpointing=True (not the same work)")
    parser.add_argument("--profile", action="store_true",
                        help="after the timed runs, run ours once more under cProfile and print where its time goes")
    parser.add_argument("--out", default="runs/benchmarks/trl.json")
    args = parser.parse_args(argv)
    if args.steps < 2 or args.repeats < 1 or args.warmup < 0:
        parser.error("need --steps ≥ 2 (cycle times are differences), --repeats ≥ 1, --warmup ≥ 0")
    if importlib.util.find_spec("trl") is None:
        parser.error("TRL is not installed; pip install -e '.[bench]'")
    if args.model != "random" and not Path(args.model).exists():
        parser.error(f"model directory {args.model} does not exist (build it with `make base-model` or "
                     "`make study-base-model`)")
    return args


def alternated_round(args: argparse.Namespace, r: int, model_dir: str, data_dir: str, tmp: Path) -> dict[str, Any]:
    """Round ``r``: ours then TRL (TRL first in odd rounds), each a run of warm-up and timed steps; their steps
    per second (cycle and step clocks), the ratio, and the load average around the round."""
    order = ["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]
    rec: dict[str, Any] = {"order": order, "loadavg_1min_before": os.getloadavg()[0]}
    for side in order:
        with contextlib.redirect_stdout(sys.stderr):  # keep TRL's end-of-training print off the table
            if side == "ours":
                rec[side] = run_ours(args, model_dir, data_dir, str(tmp / "runs"), f"ours-{r}")
            else:
                rec[side] = run_trl(args, model_dir, data_dir, str(tmp / f"trl-{r}"))
        rec[side]["steps_per_s"] = 1 / statistics.median(rec[side]["cycle_s"])
        rec[side]["steps_per_s_step_clock"] = 1 / statistics.median(rec[side]["step_s"])
        print(f"  repeat {r} {side:4s}: {rec[side]['steps_per_s']:.2f} steps/s "
              f"(median cycle {statistics.median(rec[side]['cycle_s']) * 1e3:.0f} ms, "
              f"step {statistics.median(rec[side]['step_s']) * 1e3:.0f} ms)", flush=True)
    rec["loadavg_1min_after"] = os.getloadavg()[0]
    rec["ratio"] = rec["ours"]["steps_per_s"] / rec["trl"]["steps_per_s"]
    rec["ratio_step_clock"] = rec["ours"]["steps_per_s_step_clock"] / rec["trl"]["steps_per_s_step_clock"]
    return rec


def summarise(repeats: list[dict[str, Any]], agreement: dict[str, Any]) -> dict[str, Any]:
    """Median (and min, max) steps per second and ratio over the rounds, and the median split of each step."""
    def median_of(side: str, key: str) -> float:
        return statistics.median(v for r in repeats for v in r[side][key])

    def split_of(side: str, parts: tuple[str, ...]) -> dict[str, float]:
        return {k: statistics.median(v for r in repeats for v in r[side]["split_s"][k]) for k in parts}
    return {
        "ours_steps_per_s": _stats([r["ours"]["steps_per_s"] for r in repeats]),
        "trl_steps_per_s": _stats([r["trl"]["steps_per_s"] for r in repeats]),
        "ratio_ours_over_trl": _stats([r["ratio"] for r in repeats]),
        "ratio_ours_over_trl_step_clock": _stats([r["ratio_step_clock"] for r in repeats]),
        "ours_split_median_s": split_of("ours", ("generate", "train", "other")),
        "ours_step_median_s": median_of("ours", "step_s"),
        "trl_split_median_s": split_of("trl", ("generate", "score", "train")),
        "trl_step_median_s": median_of("trl", "step_s"),
        "logprob_agreement": agreement,
        "loadavg_1min": _stats([r[k] for r in repeats for k in ("loadavg_1min_before", "loadavg_1min_after")]),
    }


def report(s: dict[str, Any], profile: dict[str, Any] | None) -> None:
    """The table of steps per second and ratios, each side's step split, and the profile if one was taken."""
    print(f"\n{'':22s}{'median':>9s}{'min':>9s}{'max':>9s}")
    for label, key in (("ours steps/s", "ours_steps_per_s"), ("TRL steps/s", "trl_steps_per_s"),
                       ("ours/TRL", "ratio_ours_over_trl"), ("ours/TRL (step clock)", "ratio_ours_over_trl_step_clock")):
        print(f"{label:22s}{s[key]['median']:9.2f}{s[key]['min']:9.2f}{s[key]['max']:9.2f}")
    o, t = s["ours_split_median_s"], s["trl_split_median_s"]
    print(f"ours step {s['ours_step_median_s'] * 1e3:.0f} ms = generate {o['generate'] * 1e3:.0f} + train "
          f"{o['train'] * 1e3:.0f} + other (reward, reference, metrics) {o['other'] * 1e3:.0f} (medians)")
    print(f"TRL  step {s['trl_step_median_s'] * 1e3:.0f} ms = generate {t['generate'] * 1e3:.0f} + score "
          f"(reference, rewards) {t['score'] * 1e3:.0f} + train {t['train'] * 1e3:.0f} (medians)")
    print(f"load average (1 min) during the runs: {s['loadavg_1min']['min']:.1f}-{s['loadavg_1min']['max']:.1f} "
          f"on {os.cpu_count()} cores")
    if profile:
        print(f"ours under cProfile, {profile['steps']} steps, {profile['loop_s']:.2f} s in the step loop:")
        for k, v in profile["loop_fractions"].items():
            print(f"  {v:6.1%}  {k}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import trl
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp:
        tmp = Path(tmp)
        data_dir = str(tmp / "data")
        TASKS[args.task].write_splits(data_dir, seed=0, sizes={"sft": 1})  # only rl_train is used (seed 0: the study's)
        model_dir = args.model if args.model != "random" else str(save_untrained_model(
            tmp / "model", seed=0, hidden_size=args.hidden_size, num_layers=args.num_layers))
        n_params = sum(p.numel() for p in load_model(model_dir).parameters())

        print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}; model {args.model} "
              f"({n_params / 1e6:.2f} M params); {args.prompts} prompts × {args.group_size} samples × "
              f"≤{args.max_new_tokens} tokens per step; {args.warmup} warm-up + {args.steps} timed steps; "
              f"{args.repeats} repeats", flush=True)
        agreement = logprob_agreement(args, model_dir, data_dir, str(tmp / "trl_check"))
        print(f"log-prob agreement (ours token_logprobs vs TRL _get_per_token_logps_and_entropies, "
              f"{agreement['tokens_compared']} tokens, {agreement['left_padded_rows']}/{agreement['rows']} rows "
              f"left-padded): max |Δ| = {agreement['max_abs_diff']:.2e} "
              f"(padded rows {agreement['max_abs_diff_left_padded_rows']:.2e}, "
              f"unpadded {agreement['max_abs_diff_unpadded_rows']:.2e}); rotary positions, so TRL's missing "
              f"position ids do not change log-probs", flush=True)
        repeats = [alternated_round(args, r, model_dir, data_dir, tmp) for r in range(args.repeats)]
        profile = profile_ours(args, model_dir, data_dir, str(tmp / "runs")) if args.profile else None

    summary = summarise(repeats, agreement)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings.update({"beta": BETA, "lr": LR, "max_grad_norm": MAX_GRAD_NORM, "n_params": n_params,
                     "ours": "advantage=grpo, policy_loss=reinforce, aggregation=token_mean, kl=k3 in loss, full",
                     "trl": "loss_type=grpo, scale_rewards=group, num_iterations=1, steps_per_generation=1, "
                            "ref = frozen copy, no vLLM, use_cpu",
                     "trl_version": trl.__version__})
    write_json(args.out, {"machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                                      "torch_threads": torch.get_num_threads(), "device": "cpu"},
                          "environment": environment_info(packages=("torch", "transformers", "trl", "peft",
                                                                    "accelerate", "datasets", "kl_lib")),
                          "settings": settings, "summary": summary, "repeats": repeats, "profile_ours": profile})
    report(summary, profile)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
