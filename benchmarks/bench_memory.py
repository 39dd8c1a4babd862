"""Peak memory of LoRA training with a reference against LoRA training without one (issue target: ≤ 5 % more);
with ``--vocab``, the full-vocabulary cost of a training step, whole batch against micro-batches.

    python benchmarks/bench_memory.py [--steps 2] [--repeats 2] [--hidden-size 512] [--num-layers 8]
        [--intermediate-size 1536] [--prompts 4] [--group-size 4] [--max-new-tokens 6] [--threads 1]
        [--configs trainer_lora_ref,loop_lora_noref,...] [--out runs/benchmarks/memory.json]
    python benchmarks/bench_memory.py --vocab [--vocab-size 49152] [--batch-prompts 2,4] [--group-size 4]
        [--max-new-tokens 32] [--estimator k3] [--pythonpath DIR] [--out runs/benchmarks/memory_vocab.json]

With LoRA our trainer's reference is the policy itself with its adapters disabled
(``kl_lib.rl.train.reference``), so a reference should cost no second copy of the weights, only the
transient activations of one no-grad forward. This measures it. Configurations, each in a fresh process:

    trainer_lora_ref   kl_lib.rl.train.train, LoRA, k3 in the loss (β = 0.04): reference = disabled adapters
    trainer_lora_ref_recompute   the same with ``rollout_grad`` off: sample without a graph, recompute the forward
    loop_lora_ref      the trainer's step functions in a loop here (rollout, reference forward, LoRA update)
    loop_lora_noref    the same loop without any reference forward or KL term: LoRA without a reference
    trainer_full_ref   kl_lib.rl.train.train, full fine-tuning: reference = a frozen copy (for contrast)
    loop_full_ref      the loop, full fine-tuning, frozen-copy reference
    loop_full_noref    the loop, full fine-tuning, no reference (and no frozen copy)

Why a loop of its own: the trainer cannot train without a reference. With β = 0 it still runs the reference
forward, because the KL estimates are logged for every run (``KLConfig.beta``: "the term is still computed
for logging"), so "our trainer with β = 0" is not "LoRA without a reference". ``loop_lora_noref`` calls the
trainer's own steps (``kl_lib.rl.train``: ``prepare``, ``rollout``, ``score``, ``forward_logits``, then
``kl_lib.rl.losses.policy_loss`` and ``optimizer_step``: AdamW with clipping) minus the reference forward
(``reference_logprobs``) and the KL term (``losses.kl_loss``); ``loop_lora_ref`` adds exactly those two back, so
loop_lora_ref / loop_lora_noref isolates the reference's cost, and trainer_lora_ref / loop_lora_noref is the
issue's comparison (it also charges the trainer's logging: full-vocabulary log-probs, entropy, KL metrics, and
its default ``rollout_grad``, which trains on the sampling forward and so keeps the decode loop's graph until the
backward; the loop recomputes the forward). trainer_lora_ref_recompute / loop_lora_noref is the same comparison
with the trainer on the loop's recomputing path, which separates the logging from the kept graph.

What is measured. CPU: the peak resident set size (``VmHWM`` of ``/proc/self/status``, the value
``getrusage(RUSAGE_SELF).ru_maxrss`` reports) over the training steps. The peak is reset
(``/proc/self/clear_refs``) once the models are built, so that loading does not hide the training peak, and read
when the trainer starts saving its final checkpoint (both through ``kl_lib.rl.train.Hooks``; the peak including the checkpoint and ``save_pretrained``,
and the whole-process peak including loading, are reported too). Resident memory includes the interpreter and
libraries (``baseline``: after importing torch, transformers and peft), so each ratio is also given for memory
above that baseline. Three measures make resident memory track live tensors, the same for every configuration:

* the weights are in anonymous memory (transformers maps the safetensors file; untouched pages are not
  resident, and the kernel may drop read-only ones at any time): full fine-tuning's trainer copies them itself,
  LoRA's frozen base is copied once the models are built;
* ``MALLOC_MMAP_THRESHOLD_=65536``: glibc maps every block of 64 KiB or more and unmaps it on free. With its
  default dynamic threshold, freed activations stay in the heap and the peak reflected allocator history
  (±40 MiB between identical runs here); with it, identical runs agree to < 1 MiB;
* one intra-op thread per run (``--threads``), which also keeps the runs short on a busy machine.

``--repeats`` runs of every configuration, in alternating order; medians and spreads are reported. GPU (when
CUDA is available): ``torch.cuda.max_memory_allocated`` over the same window instead.

The model is a random Llama (``kl_lib.lm.models.save_untrained_model``): 512 hidden, 8 layers, 1536 MLP width,
≈ 27 M parameters ≈ 104 MiB in fp32, the largest single item in a LoRA run on this small batch (4 prompts × 4
samples × 6 tokens, ~90 MiB of activations), so a second copy of the weights would add ~20 % to the LoRA
run's peak, four times the 5 % target.

**``--vocab``: bytes per response token × vocabulary entry.** The trainer's step (full fine-tuning, frozen-copy
reference, ``--estimator`` in the loss, GRPO) on a random Llama with a large vocabulary and a tiny body
(``--vocab-size 49152``, SmolLM2's; 64 hidden, 2 layers), so that the ``(B, R, V)`` tensors dominate. Two
configurations, each in a fresh process per batch size (``--batch-prompts`` prompts × ``--group-size``):

    vocab_micro0   micro_batch_size = 0, the whole batch in one forward/backward pass
    vocab_microG   micro_batch_size = group_size, one prompt group per pass

Each step's peak is taken in two windows (peak reset at each boundary, through ``kl_lib.rl.train.Hooks``): the
rollout (``generate``, with ``rollout_grad`` off so that the update recomputes the policy's forward in its
micro-batches) and the update (from the end of the rollout to the next one: reference, policy
forward/backward, optimizer, logging).
Reported for the last step (AdamW state already allocated): the update's peak above its start, divided by
B·R·V (R the padded response width), and the slope of that over the batch sizes, Δ bytes / Δ(B·R·V), in which
everything per-parameter (gradients) cancels: the marginal cost of one more response token × vocab entry.
``--pythonpath DIR`` puts DIR first on the children's path, to measure another version of ``kl_lib`` (e.g.
``git archive HEAD kl_lib | tar -x -C DIR``; versions before ``micro_batch_size`` run ``vocab_micro0`` only).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CONFIGS = ("trainer_lora_ref", "trainer_lora_ref_recompute", "loop_lora_ref", "loop_lora_noref", "trainer_full_ref",
           "loop_full_ref", "loop_full_noref")
VOCAB_CONFIGS = ("vocab_micro0", "vocab_microG")
BETA = 0.04
# glibc keeps freed blocks below its (dynamic) mmap threshold for reuse, so resident memory would reflect the
# allocator's history as much as live tensors (±40 MiB run to run here). A fixed threshold of 64 KiB maps every
# tensor-sized block and unmaps it on free: the peak then tracks live memory, reproducibly to < 1 MiB.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------------------------------------------------
# Peak-memory probes (run in the child)
# ------------------------------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class Probe:
    """Resident (CPU) or allocated (CUDA) memory: current value, peak, and a reset of the peak."""

    def __init__(self, cuda: bool):
        import torch

        self.torch, self.cuda = torch, cuda

    def current_mib(self) -> float:
        if self.cuda:
            return self.torch.cuda.memory_allocated() / 2**20
        return _status_kib("VmRSS") / 1024

    def peak_mib(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / 2**20
        return _status_kib("VmHWM") / 1024

    def reset_peak(self) -> None:
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
            return
        with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS to the current RSS (Linux ≥ 4.0)
            f.write("5")


# ------------------------------------------------------------------------------------------------------------
# The child: one configuration
# ------------------------------------------------------------------------------------------------------------


def written_out_steps(tr: Any, with_ref: bool) -> None:
    """``tr.cfg.steps`` steps of the trainer ``tr`` (a prepared ``kl_lib.rl.train.Trainer``) written out: rollout,
    score, policy forward, REINFORCE loss, and with ``with_ref`` the reference forward and k3 in the loss; none of
    the trainer's logging statistics. Holds the trainer's lock, as ``train()`` does."""
    import torch

    import kl_lib.rl.train as rl_train
    from kl_lib.rl import losses
    from kl_lib.rl.rollout import sampled_logprobs

    cfg = tr.cfg
    with tr.lock:
        for step in range(cfg.steps):
            batch = rl_train.rollout(tr, step)
            _, advantages = rl_train.score(tr, batch)
            roll = batch.roll
            rows = torch.arange(roll.response_ids.shape[0], device=roll.response_ids.device)
            tr.optimizer.zero_grad(set_to_none=True)
            if with_ref:  # first, as in the trainer: its activations are freed before the policy's graph is built
                ref_logp, _ = rl_train.reference_logprobs(tr, roll, rows, cfg.group_size, full=False)
            logp = sampled_logprobs(rl_train.forward_logits(tr, tr.policy, roll, rows, cfg.group_size),
                                    roll.response_ids)
            loss, _ = losses.policy_loss("reinforce", logp, advantages, roll.response_mask, None, cfg.clip_eps,
                                         cfg.aggregation)
            if with_ref:
                kl, _ = losses.kl_loss(cfg.kl, logp, ref_logp, roll.response_mask, behavior_logp=None,
                                       logprobs=None, ref_logprobs=None, aggregation=cfg.aggregation)
                loss = loss + kl
            loss.backward()
            rl_train.optimizer_step(tr, loss.detach(), step)


def child(args: argparse.Namespace) -> dict[str, Any]:
    import peft  # noqa: F401  (imported before the baseline so that it counts libraries, not the run)
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401

    import kl_lib.rl.train as rl_train
    from kl_lib.config import KLConfig
    from kl_lib.lm.models import load_model
    from kl_lib.rl.config import RLConfig

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    probe = Probe(cuda)
    out: dict[str, Any] = {"config": args.child, "device": device.type, "baseline_mib": probe.current_mib(),
                           "peak_before_training_mib": None}
    finetune = "lora" if "_lora_" in args.child else "full"
    with_ref = args.child.endswith("_ref")
    cfg = RLConfig(model=args.model_dir, data_dir=args.data_dir, seed=0, steps=args.steps,
                   prompts_per_step=args.prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                   advantage="grpo", aggregation="token_mean", kl=KLConfig("k3", "loss", beta=BETA),
                   finetune=finetune, checkpoint_every=10**9, device=device.type, dtype="float32",
                   runs_dir=args.runs_dir, name=args.child, rollout_grad=not args.child.endswith("_recompute"))

    def models_built(tr: rl_train.Trainer) -> None:
        if not cuda and tr.cfg.finetune == "lora":
            # transformers maps the safetensors file and LoRA's frozen base weights stay file-backed pages: not
            # resident until first touched, and droppable by the kernel at any time, which makes resident memory
            # noisy. Copied to anonymous memory they count like weights on a GPU (full fine-tuning's trainer
            # already copies the policy's weights, and its reference is a deep copy).
            with torch.no_grad():
                for p in tr.policy.parameters():
                    p.data = p.data.clone()
        out["peak_before_training_mib"] = probe.peak_mib()  # includes loading the weights
        out["after_setup_mib"] = probe.current_mib()
        out["after_setup_rss_anon_mib"] = _status_kib("RssAnon") / 1024
        out["after_setup_rss_file_mib"] = _status_kib("RssFile") / 1024
        probe.reset_peak()

    t = time.perf_counter()
    if args.child.startswith("trainer_"):
        def before_final_checkpoint(tr: rl_train.Trainer, step: int) -> None:  # once: checkpoint_every > steps
            out.setdefault("peak_training_mib", probe.peak_mib())

        hooks = rl_train.Hooks(after_setup=models_built, before_checkpoint=before_final_checkpoint)
        result = rl_train.train(cfg, progress=False, hooks=hooks)
        out["train_s"] = time.perf_counter() - t
        out["status"] = result.status
        out["peak_incl_save_mib"] = probe.peak_mib()
    else:
        # the trainer's own steps, written out, with or without the reference (rollout_grad off: the update
        # recomputes the policy's forward, as its written-out form)
        tr = rl_train.prepare(dataclasses.replace(cfg, rollout_grad=False))
        if not with_ref:
            tr.ref = None  # no frozen copy either (full fine-tuning)
        models_built(tr)
        t = time.perf_counter()
        written_out_steps(tr, with_ref)
        out["train_s"] = time.perf_counter() - t
        out["status"] = "done"
        out["peak_training_mib"] = probe.peak_mib()
        out["peak_incl_save_mib"] = out["peak_training_mib"]  # nothing is saved
    out["end_rss_anon_mib"] = _status_kib("RssAnon") / 1024
    out["end_rss_file_mib"] = _status_kib("RssFile") / 1024
    out["peak_process_mib"] = max(out["peak_before_training_mib"], out["peak_incl_save_mib"])
    out["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # since the last reset
    out["params"] = sum(p.numel() for p in load_model(cfg.model).parameters())
    return out


def child_vocab(args: argparse.Namespace) -> dict[str, Any]:
    """One trainer run on the large-vocabulary model; peaks of the rollout and update windows of every step."""
    import torch

    import kl_lib.rl.train as rl_train
    from kl_lib.config import KLConfig
    from kl_lib.rl.config import RLConfig

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    probe = Probe(cuda)
    micro = {"micro_batch_size": args.group_size} if args.child == "vocab_microG" else {}
    cfg = RLConfig(model=args.model_dir, data_dir=args.data_dir, seed=0, steps=args.steps,
                   prompts_per_step=args.prompts, group_size=args.group_size, max_new_tokens=args.max_new_tokens,
                   advantage="grpo", kl=KLConfig(args.estimator, "loss", beta=BETA), finetune="full",
                   checkpoint_every=10**9, device=device.type, dtype="float32", runs_dir=args.runs_dir,
                   name=args.child, rollout_grad=False, **micro)
    windows: list[dict[str, float]] = []  # one per step: rollout and update peaks, and where each began

    def end_update(*_: Any) -> None:
        if windows:
            windows[-1]["update_peak_mib"] = probe.peak_mib()

    def before_rollout(tr: rl_train.Trainer, step: int) -> None:
        end_update()
        windows.append({"rollout_start_mib": probe.current_mib()})
        probe.reset_peak()

    def after_rollout(tr: rl_train.Trainer, batch: rl_train.Batch) -> None:
        windows[-1].update(rollout_peak_mib=probe.peak_mib(), update_start_mib=probe.current_mib(),
                           batch=batch.roll.response_ids.shape[0], response_width=batch.roll.response_ids.shape[1])
        probe.reset_peak()

    # The trainer's weights are fresh allocations (anonymous memory) already: full fine-tuning copies them.
    hooks = rl_train.Hooks(after_setup=lambda tr: probe.reset_peak(), before_rollout=before_rollout,
                           after_rollout=after_rollout, before_checkpoint=end_update)
    t = time.perf_counter()
    result = rl_train.train(cfg, progress=False, hooks=hooks)
    if not cuda and any(w.get("update_peak_mib") is None for w in windows):
        raise RuntimeError("the final checkpoint was not saved: the last update's peak is missing")
    return {"config": args.child, "device": device.type, "status": result.status,
            "train_s": time.perf_counter() - t, "windows": windows,
            "vocab_size": args.vocab_size, "prompts": args.prompts, "group_size": args.group_size}


def _save_vocab_model(out_dir: Path, args: argparse.Namespace) -> None:
    """A random Llama with the arithmetic tokenizer and ``--vocab-size`` output rows (ids past the tokenizer's
    decode to nothing: such responses score 0, and almost none ends early, so R = max_new_tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kl_lib.lm.models import build_tokenizer, tiny_llama_config

    tokenizer = build_tokenizer()
    config = tiny_llama_config(args.vocab_size, hidden_size=args.vocab_hidden_size, num_layers=2, num_heads=4,
                               intermediate_size=4 * args.vocab_hidden_size, max_positions=256,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def main_vocab(args: argparse.Namespace) -> int:
    from kl_lib.files import environment_info, write_json
    from kl_lib.tasks.arithmetic import write_splits

    configs = args.configs
    prompts = [int(x) for x in args.batch_prompts.split(",")]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory(prefix="bench_memory_vocab_") as tmp:
        tmp = Path(tmp)
        write_splits(tmp / "data", seed=0, sizes={"sft": 1})
        _save_vocab_model(tmp / "model", args)
        for name in configs:
            for n in prompts:
                m = _run_child(name, argparse.Namespace(**{**vars(args), "prompts": n}), tmp)
                last = m["windows"][-1]
                entries = last["batch"] * last["response_width"] * args.vocab_size
                m["last_step"] = {
                    "entries": entries,
                    "update_added_mib": last["update_peak_mib"] - last["update_start_mib"],
                    "rollout_added_mib": last["rollout_peak_mib"] - last["rollout_start_mib"],
                }
                m["last_step"]["update_bytes_per_entry"] = m["last_step"]["update_added_mib"] * 2**20 / entries
                m["last_step"]["rollout_bytes_per_entry"] = m["last_step"]["rollout_added_mib"] * 2**20 / entries
                runs[name].append(m)
                s = m["last_step"]
                print(f"  {name:13s} B={last['batch']:3d} R={last['response_width']} V={args.vocab_size}: update "
                      f"+{s['update_added_mib']:7.1f} MiB = {s['update_bytes_per_entry']:5.1f} B/entry, rollout "
                      f"+{s['rollout_added_mib']:6.1f} MiB = {s['rollout_bytes_per_entry']:4.1f} B/entry; update peak "
                      f"{last['update_peak_mib']:7.1f} MiB ({m['train_s']:.1f} s)", flush=True)

    def slope(rs: list[dict[str, Any]], key: str) -> float | None:
        """Δ peak / Δ(B·R·V) between the smallest and the largest batch, in bytes per entry."""
        a, b = rs[0], rs[-1]
        d = b["last_step"]["entries"] - a["last_step"]["entries"]
        return (b["windows"][-1][key] - a["windows"][-1][key]) * 2**20 / d if d else None

    summary = {}
    for name, rs in runs.items():
        summary[name] = {
            "batch": [r["windows"][-1]["batch"] for r in rs],
            "step_peak_mib": [max(r["windows"][-1]["update_peak_mib"], r["windows"][-1]["rollout_peak_mib"])
                              for r in rs],
            "update_peak_mib": [r["windows"][-1]["update_peak_mib"] for r in rs],
            "rollout_peak_mib": [r["windows"][-1]["rollout_peak_mib"] for r in rs],
            "update_bytes_per_entry": [r["last_step"]["update_bytes_per_entry"] for r in rs],
            "update_peak_slope_bytes_per_entry": slope(rs, "update_peak_mib"),
            "rollout_peak_slope_bytes_per_entry": slope(rs, "rollout_peak_mib"),
        }
        s = summary[name]
        peaks = ", ".join(f"B={b}: {u:.0f}" for b, u in zip(s["batch"], s["update_peak_mib"]))
        print(f"{name:13s} update peak {peaks} MiB; marginal bytes per response token × vocab entry: update "
              f"{s['update_peak_slope_bytes_per_entry'] or float('nan'):.1f}, rollout "
              f"{s['rollout_peak_slope_bytes_per_entry'] or float('nan'):.1f}")
    write_json(args.out, {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(),
                    "child_env": {**CHILD_ENV, "OMP_NUM_THREADS": str(args.threads)}},
        "environment": environment_info(packages=("torch", "transformers", "kl_lib")),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "child", "model_dir", "data_dir",
                                                                       "runs_dir")} | {"beta": BETA},
        "summary": summary, "runs": runs,
    })
    print(f"wrote {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------------------
# The parent: every configuration in a fresh process
# ------------------------------------------------------------------------------------------------------------


def _run_child(name: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", name, "--model-dir", str(tmp / "model"), "--data-dir",
           str(tmp / "data"), "--runs-dir", str(tmp / f"runs-{name}"), "--steps", str(args.steps),
           "--prompts", str(args.prompts), "--group-size", str(args.group_size),
           "--max-new-tokens", str(args.max_new_tokens)]
    if name in VOCAB_CONFIGS:
        cmd += ["--vocab-size", str(args.vocab_size), "--estimator", args.estimator]
    env = {**os.environ, **CHILD_ENV, "OMP_NUM_THREADS": str(args.threads)}
    if args.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([args.pythonpath, *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"configuration {name} failed (exit {proc.returncode})")
    shutil.rmtree(tmp / f"runs-{name}", ignore_errors=True)  # the trainer's run directory (checkpoint, model)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, with their defaults resolved and unknown configurations refused before any work."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", action="store_true",
                        help="measure the full-vocabulary cost, micro_batch_size 0 vs group_size (see above)")
    parser.add_argument("--vocab-size", type=int, default=49152, help="--vocab: output rows of the model")
    parser.add_argument("--vocab-hidden-size", type=int, default=64, help="--vocab: hidden size of the model")
    parser.add_argument("--batch-prompts", default="2,4", help="--vocab: prompts per step, one run each")
    parser.add_argument("--estimator", default="k3", help="--vocab: KL estimator in the loss")
    parser.add_argument("--pythonpath", default="", help="prepended to the children's PYTHONPATH")
    parser.add_argument("--steps", type=int, default=2, help="training steps per configuration")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration (order alternates)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=4, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 6 (--vocab: 32)")
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--intermediate-size", type=int, default=1536)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run (memory, not speed)")
    parser.add_argument("--configs", default="", help=f"comma-separated subset of {', '.join(CONFIGS)} "
                        f"(--vocab: of {', '.join(VOCAB_CONFIGS)})")
    parser.add_argument("--out", default=None, help="default runs/benchmarks/memory.json (--vocab: memory_vocab.json)")
    # internal: run one configuration and print its measurements as JSON
    parser.add_argument("--child", choices=CONFIGS + VOCAB_CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--runs-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.max_new_tokens is None:
        args.max_new_tokens = 32 if args.vocab or args.child in VOCAB_CONFIGS else 6
    if args.out is None:
        args.out = "runs/benchmarks/memory_vocab.json" if args.vocab else "runs/benchmarks/memory.json"
    known = VOCAB_CONFIGS if args.vocab else CONFIGS
    args.configs = args.configs.split(",") if args.configs else list(known)
    unknown = set(args.configs) - set(known)
    if unknown:
        parser.error(f"unknown configuration(s) {sorted(unknown)}; choose from {', '.join(known)}")
    return args


def summarise_configs(runs: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Median peaks of each configuration over its repeats, and the ratios of training peaks the README reports
    (those whose two configurations both ran)."""
    def med(name: str, key: str) -> float:
        return statistics.median(m[key] for m in runs[name])

    summary = {name: {key: med(name, key) for key in ("peak_training_mib", "baseline_mib", "after_setup_mib",
                                                      "peak_process_mib", "peak_incl_save_mib")}
               | {"peak_training_spread_mib": [min(m["peak_training_mib"] for m in runs[name]),
                                               max(m["peak_training_mib"] for m in runs[name])]}
               for name in runs}

    def ratio(a: str, b: str) -> dict[str, Any] | None:
        if a not in runs or b not in runs:
            return None
        per_repeat = [ra["peak_training_mib"] / rb["peak_training_mib"] for ra, rb in zip(runs[a], runs[b])]
        sa, sb = summary[a], summary[b]
        return {"total": sa["peak_training_mib"] / sb["peak_training_mib"],
                "total_per_repeat": per_repeat,
                "above_baseline": (sa["peak_training_mib"] - sa["baseline_mib"])
                / (sb["peak_training_mib"] - sb["baseline_mib"]),
                "difference_mib": sa["peak_training_mib"] - sb["peak_training_mib"]}

    comparisons = {
        "trainer_lora_ref / loop_lora_noref (issue: <= 1.05)": ratio("trainer_lora_ref", "loop_lora_noref"),
        "trainer_lora_ref_recompute / loop_lora_noref": ratio("trainer_lora_ref_recompute", "loop_lora_noref"),
        "loop_lora_ref / loop_lora_noref (the reference alone)": ratio("loop_lora_ref", "loop_lora_noref"),
        "trainer_full_ref / loop_full_noref": ratio("trainer_full_ref", "loop_full_noref"),
        "loop_full_ref / loop_full_noref (a frozen copy)": ratio("loop_full_ref", "loop_full_noref"),
        "trainer_full_ref / trainer_lora_ref": ratio("trainer_full_ref", "trainer_lora_ref"),
    }
    return summary, {k: v for k, v in comparisons.items() if v is not None}


def main_configs(args: argparse.Namespace) -> int:
    import torch

    from kl_lib.files import environment_info, write_json
    from kl_lib.lm.models import save_untrained_model
    from kl_lib.tasks.arithmetic import write_splits

    configs = args.configs
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        tmp = Path(tmp)
        write_splits(tmp / "data", seed=0, sizes={"sft": 1})  # only rl_train is used
        save_untrained_model(tmp / "model", seed=0, hidden_size=args.hidden_size, num_layers=args.num_layers,
                             intermediate_size=args.intermediate_size, num_heads=8)
        for r in range(args.repeats):
            for name in configs if r % 2 == 0 else configs[::-1]:
                runs[name].append(_run_child(name, args, tmp))
                m = runs[name][-1]
                print(f"  repeat {r} {name:26s} training peak {m['peak_training_mib']:7.1f} MiB "
                      f"(baseline {m['baseline_mib']:6.1f}, after set-up {m['after_setup_mib']:6.1f}, "
                      f"incl. loading and saving {m['peak_process_mib']:7.1f}; {m['train_s']:.1f} s)", flush=True)

    summary, comparisons = summarise_configs(runs)
    params = next(iter(runs.values()))[0]["params"]
    weights_mib = params * 4 / 2**20
    print(f"\nmodel {params / 1e6:.1f} M parameters = {weights_mib:.1f} MiB in fp32; median peaks over the training "
          f"steps ({args.repeats} repeats):")
    for name in configs:
        s = summary[name]
        print(f"  {name:26s} {s['peak_training_mib']:7.1f} MiB (spread {s['peak_training_spread_mib'][0]:.1f}-"
              f"{s['peak_training_spread_mib'][1]:.1f}), {s['peak_training_mib'] - s['baseline_mib']:6.1f} above "
              f"the {s['baseline_mib']:.1f} MiB baseline")
    for label, c in comparisons.items():
        spread = ", ".join(f"{x:.3f}" for x in c["total_per_repeat"])
        print(f"  {label:55s} {c['total']:.3f} total (per repeat {spread}), {c['above_baseline']:.3f} above "
              f"baseline, {c['difference_mib']:+.1f} MiB")

    cuda = torch.cuda.is_available()
    write_json(args.out, {
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor(), "device": "cuda" if cuda else "cpu",
                    "metric": "torch.cuda.max_memory_allocated" if cuda else "VmHWM (peak resident set size)",
                    "child_env": {**CHILD_ENV, "OMP_NUM_THREADS": str(args.threads)}},
        "environment": environment_info(packages=("torch", "transformers", "peft", "kl_lib")),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "child", "model_dir", "data_dir",
                                                                       "runs_dir")}
        | {"beta": BETA, "params": params, "weights_mib": weights_mib},
        "summary": summary, "comparisons": comparisons, "runs": runs,
    })
    print(f"wrote {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:  # internal: one configuration, its measurements printed as JSON
        print(json.dumps(child_vocab(args) if args.child in VOCAB_CONFIGS else child(args)))
        return 0
    return main_vocab(args) if args.vocab else main_configs(args)


if __name__ == "__main__":
    sys.exit(main())
