"""The arithmetic floor of one RL step on the long-answer study's workload, measured on this machine.

    python benchmarks/bench_floor.py [--model data/models/worked-base] [--prompts 8] [--group-size 5]
        [--max-new-tokens 72] [--threads 1] [--trl runs/benchmarks/trl_study.json]
        [--out runs/benchmarks/floor_study.json]

(``make bench-floor``.) **Question.** ``make bench-trl-study`` measures our trainer at 1.20× TRL's
``GRPOTrainer`` on the study's workload, against a 2× target. Is 2× reachable by a faster implementation of the
same step, or is the step's arithmetic alone already slower than half of TRL's measured step?

**Method.** One real rollout of the study's base model (our sampler, ``kl_lib.rl.rollout.sample``, seed 0, on the
first ``--prompts`` problems of the seed-0 ``rl_train`` split, each ``--group-size`` times; the task's prompts all
have one length, 13 tokens) fixes the work of a step: the rows still running at each decode step, and the
response lengths that set the slices of the training passes. For each phase of a step
the script lists the matrix products a Llama forward performs (seven projections per layer and the output head,
at the phase's number of token rows) and its attention (query and key lengths), and, for a backward pass, the two
products per forward product (input and weight gradient) and attention's backward. It then times exactly those
kernels alone on random float32 tensors of those shapes, with the benchmark's thread count, each the faster of
two implementations (``torch.mm`` or ``linear``'s transposed layout; ``scaled_dot_product_attention`` or the
explicit softmax(QKᵀ/√d + mask)V, forward and backward), and sums them. The sum is a
*floor*: the time of the arithmetic alone, leaving out everything else a step does (embedding, norms, rotary,
the sampler's softmax and draws, the loss, the optimizer, Python), so no eager float32 implementation of that
work on this machine and BLAS can be faster. Three designs are counted:

* ``ours`` as built: sample without a graph (finished rows dropped), then the reference forward, the policy
  forward and its backward, each prompt encoded once per group, responses in four length-sorted slices;
* ``ours, training on the sampling forward``: no policy forward (the sampler keeps its graph), the backward
  runs at the decode steps' shapes (the design that made short answers fast);
* ``TRL``: ``generate`` runs every row to the longest response, the reference and policy passes run the padded
  batch (prompt and longest response per row), no prompt shared across the group.

Reported: GFLOP and floor per phase and design, the measured steps of both trainers (from ``--trl``, the output
of ``make bench-trl-study``) and what 2× would need. Results go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from kl_lib.files import environment_info, write_json
from kl_lib.lm.models import encode_prompts, load_model, load_tokenizer
from kl_lib.rl.rollout import sample
from kl_lib.tasks import worked_arithmetic


@dataclass
class Work:
    """The kernels of one phase: products ``(M, K, N)`` (an ``(M, K)`` by ``(K, N)`` matrix product) and attention
    calls ``(rows, query length, key length)``, each with its number of occurrences."""

    products: Counter = field(default_factory=Counter)
    attention: Counter = field(default_factory=Counter)
    attention_backward: Counter = field(default_factory=Counter)

    def __iadd__(self, other: Work) -> Work:
        self.products.update(other.products)
        self.attention.update(other.attention)
        self.attention_backward.update(other.attention_backward)
        return self

    def product_gflop(self) -> float:
        return sum(2 * m * k * n * c for (m, k, n), c in self.products.items()) / 1e9

    def gflop(self, heads: int, head_dim: int) -> float:
        """Products and attention (QKᵀ and the weighted sum: 4·q·k·d per head; backward twice that)."""
        att = sum(4 * b * heads * q * kv * head_dim * c for (b, q, kv), c in self.attention.items())
        att += sum(8 * b * heads * q * kv * head_dim * c for (b, q, kv), c in self.attention_backward.items())
        return self.product_gflop() + att / 1e9


@dataclass(frozen=True)
class Dims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config) -> Dims:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, config.num_key_value_heads, head_dim, config.vocab_size)


def forward_work(d: Dims, rows: int, queries: int, keys: int, head_rows: int) -> Work:
    """A Llama forward of ``rows`` sequences × ``queries`` new tokens attending to ``keys`` positions, with the
    output head on ``head_rows`` token rows."""
    m, w = rows * queries, Work()
    for k, n in [(d.hidden, d.heads * d.head_dim), (d.hidden, d.kv_heads * d.head_dim),
                 (d.hidden, d.kv_heads * d.head_dim), (d.heads * d.head_dim, d.hidden),
                 (d.hidden, d.intermediate), (d.hidden, d.intermediate), (d.intermediate, d.hidden)]:
        w.products[(m, k, n)] += d.layers
    w.attention[(rows, queries, keys)] += d.layers
    if head_rows:
        w.products[(head_rows, d.hidden, d.vocab)] += 1
    return w


def backward_of(w: Work) -> Work:
    """The backward of a forward: per product (M, K, N), the input gradient (M, N, K) and the weight gradient
    (K, M, N); attention's backward at the forward's shapes."""
    b = Work()
    for (m, k, n), c in w.products.items():
        b.products[(m, n, k)] += c
        b.products[(k, m, n)] += c
    b.attention_backward.update(w.attention)
    return b


def decode_rows(lengths: list[int], max_new_tokens: int) -> list[int]:
    """Rows the model runs at each decode step of ``kl_lib.rl.rollout.sample`` (its rule: the batch is cut to the
    running rows when a quarter of it has ended), from the responses' lengths (EOS included)."""
    running, out = len(lengths), []
    for t in range(max_new_tokens):
        live = sum(n > t + 1 for n in lengths)
        if live == 0 or t == max_new_tokens - 1:
            break
        if live <= 3 * running // 4:
            running = live
        out.append(running)
    return out


def sampling_work(d: Dims, lengths: list[int], prompt: int, group: int, max_new: int, drop: bool) -> Work:
    """The prompt pass (each prompt once per group) and one decode step per token after the first."""
    w = forward_work(d, len(lengths) // group, prompt, prompt, len(lengths) // group)
    steps = decode_rows(lengths, max_new) if drop else [len(lengths)] * (max(lengths) - 1)
    for t, n in enumerate(steps):
        w += forward_work(d, n, 1, prompt + t + 1, n)
    return w


def scoring_work(d: Dims, lengths: list[int], prompt: int, group: int, chunks: int = 4) -> Work:
    """``trimmed_response_logits``: the shared prompt pass, then length-sorted slices cut to their longest."""
    w = forward_work(d, len(lengths) // group, prompt, prompt, len(lengths) // group * prompt)
    ordered = sorted(lengths)
    for piece in torch.tensor(ordered).tensor_split(chunks):
        r = int(piece.max())
        w += forward_work(d, len(piece), r, prompt + r, len(piece) * r)
    return w


def padded_work(d: Dims, lengths: list[int], prompt: int) -> Work:
    """One pass over the padded batch (every row: the prompt and the longest response), head on the responses."""
    r = max(lengths)
    return forward_work(d, len(lengths), prompt + r, prompt + r, len(lengths) * (r + 1))


def designs(d: Dims, lengths: list[int], prompt: int, group: int, max_new: int) -> dict[str, dict[str, Work]]:
    scored = scoring_work(d, lengths, prompt, group)  # the reference's forward and the policy's: the same work
    sampled = sampling_work(d, lengths, prompt, group, max_new, drop=True)
    padded = padded_work(d, lengths, prompt)
    return {
        "ours": {"sampling": sampled, "reference forward": scored, "policy forward": scored,
                 "backward": backward_of(scored)},
        "ours, training on the sampling forward": {
            "sampling (graph kept)": sampled, "reference forward": scored,
            "backward (decode shapes)": backward_of(sampled)},
        "TRL": {"generation": sampling_work(d, lengths, prompt, 1, max_new, drop=False),
                "reference forward": padded, "policy forward": padded, "backward": backward_of(padded)},
    }


class KernelClock:
    """Seconds of each kernel shape (the best of ``repeats`` rounds), timed alone on random float32 tensors
    (memoised)."""

    def __init__(self, d: Dims, repeats: int = 7) -> None:
        self.d, self.repeats, self.cache = d, repeats, {}

    def _time(self, fn) -> float:
        fn()  # warm up (allocations, the BLAS's packing buffers)
        reps = 5
        times = []
        for _ in range(self.repeats):
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            times.append((time.perf_counter() - t) / reps)
        return min(times)  # a floor: the best the machine did

    def product(self, m: int, k: int, n: int) -> float:
        """The faster of the two layouts a product comes in: ``(M, K) @ (K, N)`` and ``linear``'s ``(M, K) @
        (N, K)ᵀ``."""
        key = ("mm", m, k, n)
        if key not in self.cache:
            a, b, bt = torch.randn(m, k), torch.randn(k, n), torch.randn(n, k)
            self.cache[key] = min(self._time(lambda: torch.mm(a, b)), self._time(lambda: F.linear(a, bt)))
        return self.cache[key]

    def attention(self, rows: int, q: int, kv: int, backward: bool) -> float:
        """The faster of ``scaled_dot_product_attention`` and the explicit softmax(QKᵀ/√d + mask) V; with
        ``backward``, the backward's time alone (forward and backward, less the forward)."""
        key = ("attention", rows, q, kv, backward)
        if key not in self.cache:
            d = self.d
            qs = torch.randn(rows, d.heads, q, d.head_dim, requires_grad=backward)
            ks = torch.randn(rows, d.heads, kv, d.head_dim, requires_grad=backward)
            mask = torch.ones(q, kv, dtype=torch.bool).tril(kv - q)  # causal over the new tokens
            bias = torch.zeros(q, kv).masked_fill(~mask, float("-inf"))

            def fused():
                return F.scaled_dot_product_attention(qs, ks, ks, attn_mask=mask)

            def explicit():
                return torch.softmax(qs @ ks.transpose(-1, -2) * d.head_dim ** -0.5 + bias, -1) @ ks

            def timed(fn) -> float:
                return self._time(lambda: fn().sum().backward() if backward else fn())
            total = min(timed(fused), timed(explicit))
            self.cache[key] = total - self.attention(rows, q, kv, False) if backward else total
        return self.cache[key]

    def floor(self, w: Work) -> float:
        s = sum(self.product(*shape) * c for shape, c in w.products.items())
        s += sum(self.attention(*shape, False) * c for shape, c in w.attention.items())
        s += sum(self.attention(*shape, True) * c for shape, c in w.attention_backward.items())
        return s


def study_batch(model_dir: str, prompts: int, group: int) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    """The tokenizer, the model and the study's first rollout batch: the seed-0 ``rl_train`` prompts, each
    ``group`` times, ``(B, P)``. The task's prompts all have one length, which the counts here assume."""
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    problems = worked_arithmetic.generate_split("rl_train", seed=0, size=prompts)
    ids, mask = encode_prompts(tokenizer, [p.prompt for p in problems])
    if bool((mask == 0).any()):
        raise SystemExit("the prompts have different lengths; this count assumes one prompt length")
    return tokenizer, model, ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)


def study_rollout(model_dir: str, prompts: int, group: int, max_new: int) -> tuple[list[int], int, Any]:
    """One rollout of the study's base model on :func:`study_batch`: the responses' lengths, the prompt length,
    the model's config."""
    tokenizer, model, ids, mask = study_batch(model_dir, prompts, group)
    roll = sample(model, tokenizer, ids, mask, max_new_tokens=max_new, temperature=1.0, seed=0, group_size=group)
    return [int(n) for n in roll.response_mask.sum(-1)], ids.shape[1], model.config


def measured_steps(path: Path) -> dict[str, Any] | None:
    """Median step and split of both trainers from ``bench_trl.py``'s output, or None if it is absent."""
    if not path.exists():
        return None
    s = json.loads(path.read_text())["summary"]
    return {"ours_step_s": s["ours_step_median_s"], "ours_split_s": s["ours_split_median_s"],
            "trl_step_s": s["trl_step_median_s"], "trl_split_s": s["trl_split_median_s"],
            "ratio": s["ratio_ours_over_trl"]["median"]}


def parse_workload(doc: str, out: str, argv: list[str] | None) -> argparse.Namespace:
    """The study workload's options (shared with ``bench_compiled.py``; ``doc``: the script's docstring, ``out``:
    its default output file), checked before any work: a missing model or a count below 1 is a usage error. Sets
    torch's intra-op threads."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="data/models/worked-base")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=72)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads, as bench_trl.py (default 1)")
    parser.add_argument("--trl", type=Path, default=Path("runs/benchmarks/trl_study.json"),
                        help="bench_trl.py's output on the same workload, for the measured steps")
    parser.add_argument("--out", type=Path, default=Path(out))
    args = parser.parse_args(argv)
    if not Path(args.model).exists():
        parser.error(f"model directory {args.model} does not exist (build it with `make study-base-model`)")
    if min(args.threads, args.prompts, args.group_size, args.max_new_tokens) < 1:
        parser.error("--threads, --prompts, --group-size and --max-new-tokens must be at least 1")
    torch.set_num_threads(args.threads)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_workload(__doc__, "runs/benchmarks/floor_study.json", argv)
    torch.manual_seed(0)

    lengths, prompt, config = study_rollout(args.model, args.prompts, args.group_size, args.max_new_tokens)
    d = Dims.of(config)
    clock = KernelClock(d)
    table = {}
    for name, phases in designs(d, lengths, prompt, args.group_size, args.max_new_tokens).items():
        rows = {phase: {"gflop": w.gflop(d.heads, d.head_dim), "floor_s": clock.floor(w)}
                for phase, w in phases.items()}
        rows["total"] = {k: sum(r[k] for r in rows.values()) for k in ("gflop", "floor_s")}
        table[name] = rows
    measured = measured_steps(args.trl)
    report(table, measured, lengths, prompt, d, args)
    write_json(args.out, {"environment": environment_info(), "settings": {k: str(v) for k, v in vars(args).items()},
                          "workload": {"response_lengths": lengths, "prompt_tokens": prompt, "dims": vars(d)},
                          "designs": table, "measured": measured})
    print(f"wrote {args.out}")
    return 0


def report(table: dict, measured: dict | None, lengths: list[int], prompt: int, d: Dims,
           args: argparse.Namespace) -> None:
    print(f"workload: {len(lengths)} responses of {min(lengths)}–{max(lengths)} tokens (mean "
          f"{statistics.fmean(lengths):.1f}) after a {prompt}-token prompt; model {d.layers} layers × {d.hidden} "
          f"wide; {args.threads} thread(s)")
    for name, rows in table.items():
        print(f"\n{name}:")
        for phase, r in rows.items():
            print(f"  {phase:28s} {r['gflop']:6.2f} GFLOP   floor {r['floor_s'] * 1e3:6.1f} ms")
    if measured is None:
        print(f"\n(no {args.trl}: run `make bench-trl-study` for the measured steps)")
        return
    budget = measured["trl_step_s"] / 2
    floor = table["ours"]["total"]["floor_s"]
    fused = table["ours, training on the sampling forward"]["total"]["floor_s"]
    print(f"\nmeasured (bench_trl.py): ours {measured['ours_step_s'] * 1e3:.0f} ms, "
          f"TRL {measured['trl_step_s'] * 1e3:.0f} ms per step (ours/TRL {measured['ratio']:.2f}×); "
          f"2× TRL needs a step of at most {budget * 1e3:.0f} ms.")
    print(f"floor of our design {floor * 1e3:.0f} ms ({floor / budget:.2f}× that budget); training on the sampling "
          f"forward {fused * 1e3:.0f} ms ({fused / budget:.2f}×); TRL's floor "
          f"{table['TRL']['total']['floor_s'] * 1e3:.0f} ms against its measured {measured['trl_step_s'] * 1e3:.0f}.")


if __name__ == "__main__":
    sys.exit(main())
