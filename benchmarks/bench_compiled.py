"""How fast can a compiled decode step sample the long-answer study's rollouts, and does that open 2× TRL?

    python benchmarks/bench_compiled.py [--model data/models/worked-base] [--prompts 8] [--group-size 5]
        [--max-new-tokens 72] [--threads 1] [--trl runs/benchmarks/trl_study.json]
        [--out runs/benchmarks/compiled_study.json]

(``make bench-compiled``.) **Question.** ``make bench-floor`` shows that 2× TRL's measured step (217 ms on the
study's workload) leaves almost nothing above our step's arithmetic floor, so only a compiled step could reach
it: the training passes would have to run at their floor and the sampling loop close to it. The training passes
compile well (``torch.compile``: 89% of their floor, README). Is the decode loop compiled fast enough?

**Method.** :class:`LeanLlama` is the study's Llama written as plain tensor code from the model's own weights
(the query/key/value and gate/up projections fused into one product each; a static key/value cache of
``prompt + max_new_tokens`` positions; a decode step that writes nothing in place and returns the new keys and
values, so inductor compiles it as one pure graph). It is checked before anything is timed: its logits equal
the Hugging Face model's (to 1e-4), and its rollout, drawn like ``kl_lib.rl.rollout.sample`` (the same
``torch.multinomial`` stream for a seed), gives the same tokens. One decode step at the full batch is then timed
in three forms: eager, ``torch.compile`` (inductor) and inductor with its C++ wrapper (no Python between
kernels), each against the step's arithmetic floor (``bench_floor``'s kernels at that shape, timed alone). The
best form's efficiency (floor / time) bounds the whole step from below:

    step ≥ floor(reference forward + policy forward + backward) + floor(sampling) / efficiency(decode step),

optimistic on both counts: the training passes at 100% of their floor, and every decode step as efficient as a
full-batch one (steps after rows are dropped have fewer rows, so more overhead per product). The compiled
rollout itself (every row to the longest answer, as a static shape needs) is also timed end to end against our
sampler. Results go to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from bench_floor import Dims, KernelClock, designs, forward_work, measured_steps
from kl_lib.files import environment_info, write_json
from kl_lib.lm.models import encode_prompts, load_model, load_tokenizer
from kl_lib.rl.rollout import sample
from kl_lib.tasks import worked_arithmetic


class LeanLlama:
    """A Llama (``LlamaForCausalLM``: RMSNorm, rotary positions, SiLU-gated MLP, no biases, as many key/value
    heads as query heads) as plain tensor code over a static key/value cache. Shapes: B rows, P prompt tokens
    (left-padded), S = P + the token budget cache positions, L layers, H heads of D dims, V vocabulary."""

    def __init__(self, model: torch.nn.Module) -> None:
        c = model.config
        if c.model_type != "llama" or c.num_key_value_heads != c.num_attention_heads or c.hidden_act != "silu" \
                or getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
            raise ValueError(f"LeanLlama covers a plain Llama (silu, no biases, kv heads = heads); got {c}")
        rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"LeanLlama covers the default rotary embedding, not {rope['rope_type']!r}")
        theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        w = {k: v.detach() for k, v in model.state_dict().items()}
        self.L, self.H = c.num_hidden_layers, c.num_attention_heads
        self.D = getattr(c, "head_dim", None) or c.hidden_size // self.H
        self.eps = c.rms_norm_eps
        self.embed, self.norm = w["model.embed_tokens.weight"], w["model.norm.weight"]
        self.head = w.get("lm_head.weight", self.embed)

        def layer(i: int, name: str) -> Tensor:
            return w[f"model.layers.{i}.{name}.weight"]
        self.layers = [{"qkv": torch.cat([layer(i, f"self_attn.{p}_proj") for p in "qkv"]),
                        "o": layer(i, "self_attn.o_proj"), "d": layer(i, "mlp.down_proj"),
                        "gu": torch.cat([layer(i, "mlp.gate_proj"), layer(i, "mlp.up_proj")]),
                        "n1": layer(i, "input_layernorm"), "n2": layer(i, "post_attention_layernorm")}
                       for i in range(self.L)]
        self.inv_freq = 1.0 / theta ** (torch.arange(0, self.D, 2, dtype=torch.int64).float() / self.D)

    def _rms(self, x: Tensor, weight: Tensor) -> Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _rotary(self, position: Tensor) -> tuple[Tensor, Tensor]:
        """cos, sin ``(B, 1, T, D)`` of position ids ``(B, T)``."""
        angles = position[..., None].float() * self.inv_freq  # (B, T, D/2)
        angles = torch.cat([angles, angles], -1)[:, None]
        return angles.cos(), angles.sin()

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def _qkv(self, x: Tensor, w: dict, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys, values ``(B, H, T, D)`` of hidden states ``(B, T, C)``."""
        B, T, _ = x.shape
        q, k, v = (self._rms(x, w["n1"]) @ w["qkv"].T).view(B, T, 3, self.H, self.D).transpose(1, 3).unbind(2)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin), v

    def _finish_layer(self, x: Tensor, attended: Tensor, w: dict) -> Tensor:
        """The residual stream after the attention output ``(B, H, T, D)`` and the MLP."""
        B, _, T, _ = attended.shape
        x = x + attended.transpose(1, 2).reshape(B, T, self.H * self.D) @ w["o"].T
        gate, up = (self._rms(x, w["n2"]) @ w["gu"].T).chunk(2, -1)
        return x + (F.silu(gate) * up) @ w["d"].T

    def prompt(self, ids: Tensor, mask: Tensor, max_new_tokens: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(logits, keys, values, valid)``: the next token's logits ``(B, V)``, the cache ``(L, B, H, S, D)``
        holding the prompt, and which cache positions a query may attend to ``(B, S)``."""
        B, P = ids.shape
        position = (mask.long().cumsum(-1) - 1).clamp_min(0)
        cos, sin = self._rotary(position)
        # Causal over the real tokens (a left-padding row attends to nothing: scaled_dot_product_attention gives 0)
        allowed = torch.ones(P, P, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]  # (B, P, P)
        keys = torch.zeros(self.L, B, self.H, P + max_new_tokens, self.D)
        values = torch.zeros_like(keys)
        x = self.embed[ids]
        for i, w in enumerate(self.layers):
            q, k, v = self._qkv(x, w, cos, sin)
            keys[i, :, :, :P], values[i, :, :, :P] = k, v
            x = self._finish_layer(x, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None]), w)
        valid = torch.zeros(B, P + max_new_tokens, dtype=torch.bool)
        valid[:, :P] = mask.bool()
        return self._rms(x[:, -1], self.norm) @ self.head.T, keys, values, valid

    def step(self, y: Tensor, position: Tensor, keys: Tensor, values: Tensor,
             valid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One decode step of tokens ``y`` ``(B,)`` at position ids ``(B,)``: ``(logits (B, V), new keys, new
        values (L, B, H, D))``. The new token attends to the cache where ``valid`` ``(B, S)`` and to itself; the
        caller writes the new keys and values into the cache (nothing here is modified in place)."""
        cos, sin = self._rotary(position[:, None])
        x, new_keys, new_values = self.embed[y][:, None], [], []
        for i, w in enumerate(self.layers):
            q, k, v = self._qkv(x, w, cos, sin)  # (B, H, 1, D)
            cached = (q @ keys[i].transpose(-1, -2)).masked_fill(~valid[:, None, None], -math.inf)  # (B, H, 1, S)
            weights = torch.softmax(torch.cat([cached, (q * k).sum(-1, keepdim=True)], -1) * self.D ** -0.5, -1)
            attended = weights[..., :-1] @ values[i] + weights[..., -1:] * v
            x = self._finish_layer(x, attended, w)
            new_keys.append(k[:, :, 0])
            new_values.append(v[:, :, 0])
        return (self._rms(x[:, 0], self.norm) @ self.head.T), torch.stack(new_keys), torch.stack(new_values)


Step = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor]]


@torch.inference_mode()
def lean_rollout(lean: LeanLlama, step: Step, ids: Tensor, mask: Tensor, *, max_new_tokens: int, eos: int,
                 temperature: float = 1.0, seed: int = 0) -> Tensor:
    """Response tokens ``(B, R)``, every row run to the longest response (a static batch), drawn as
    ``kl_lib.rl.rollout.sample`` draws them (one ``torch.multinomial`` over the batch per step, seeded)."""
    P = ids.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        logits, keys, values, valid = lean.prompt(ids, mask, max_new_tokens)
        position = mask.long().sum(-1)
        live = torch.ones(ids.shape[0], dtype=torch.bool)
        tokens = []
        for t in range(max_new_tokens):
            y = torch.multinomial(torch.softmax(logits.float() / temperature, -1), 1)[:, 0]
            tokens.append(y)
            live = live & (y != eos)
            if not bool(live.any()) or t == max_new_tokens - 1:
                break
            logits, k, v = step(y, position, keys, values, valid)
            keys[:, :, :, P + t], values[:, :, :, P + t] = k, v
            valid[:, P + t] = True
            position = position + 1
    return torch.stack(tokens, 1)


def up_to_eos(tokens: Tensor, eos: int) -> list[list[int]]:
    """Each row's tokens up to and including its first EOS."""
    rows = []
    for row in tokens.tolist():
        rows.append(row[:row.index(eos) + 1] if eos in row else row)
    return rows


def best_time(fn: Callable[[], Any], rounds: int = 7, calls: int = 1) -> float:
    """Seconds per call, the best of ``rounds`` rounds of ``calls`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return min(times)


FORMS = {"eager": None, "inductor": {}, "inductor, C++ wrapper": {"cpp_wrapper": True}}  # inductor settings


def measure_forms(lean: LeanLlama, state: tuple, rollout: Callable[[Step], Tensor],
                  expected: list[list[int]], eos: int) -> dict[str, dict[str, float]]:
    """For each of :data:`FORMS`, the decode step's compile time, its time on ``state`` (the arguments of one
    full-batch step) and the time of a whole ``rollout``, in seconds. Each form is compiled, checked (logits equal
    the eager step's to 1e-4, the rollout's tokens equal ``expected``) and timed before the next is compiled, with
    its inductor settings in force throughout."""
    import torch._dynamo
    import torch._inductor.config as inductor

    with torch.inference_mode():
        reference = lean.step(*state)[0]
    results = {}
    for name, settings in FORMS.items():
        torch._dynamo.reset()
        step = lean.step if settings is None else torch.compile(lean.step, dynamic=False, fullgraph=True)
        with inductor.patch(settings or {}), torch.inference_mode():
            start = time.perf_counter()
            logits = step(*state)[0]
            compile_s = time.perf_counter() - start
            if not torch.allclose(logits, reference, atol=1e-4, rtol=0):
                raise SystemExit(f"the {name} step's logits differ from the eager step's by "
                                 f"{(logits - reference).abs().max():.2e}")
            if up_to_eos(rollout(step), eos) != expected:
                raise SystemExit(f"the {name} rollout draws other tokens than kl_lib.rl.rollout.sample")
            step_s = best_time(lambda: step(*state), rounds=7, calls=20)
            rollout_s = best_time(lambda: rollout(step), rounds=5)
        results[name] = {"compile_s": compile_s, "step_s": step_s, "rollout_s": rollout_s}
        print(f"  {name:22s} step {step_s * 1e3:5.2f} ms   rollout {rollout_s * 1e3:6.1f} ms   "
              f"(compile {compile_s:.1f} s)", flush=True)
    return results


def study_batch(model_dir: str, prompts: int, group: int) -> tuple[Any, Any, Tensor, Tensor]:
    """The tokenizer, the model and the study's first rollout batch: the seed-0 ``rl_train`` prompts, each
    ``group`` times, ``(B, P)``."""
    tokenizer, model = load_tokenizer(model_dir), load_model(model_dir)
    problems = worked_arithmetic.generate_split("rl_train", seed=0, size=prompts)
    ids, mask = encode_prompts(tokenizer, [p.prompt for p in problems])
    return tokenizer, model, ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)


def check_lean(lean: LeanLlama, model: torch.nn.Module, ids: Tensor, mask: Tensor) -> float:
    """The largest difference between the lean prompt pass's logits and the model's; stops above 1e-4."""
    with torch.inference_mode():
        position = (mask.long().cumsum(-1) - 1).clamp_min(0)
        expected = model(input_ids=ids, attention_mask=mask, position_ids=position).logits[:, -1]
        gap = float((lean.prompt(ids, mask, 1)[0] - expected).abs().max())
    if gap > 1e-4:
        raise SystemExit(f"LeanLlama's logits differ from the model's by {gap:.2e}: it does not compute this model")
    return gap


def bound(table: dict[str, float], efficiency: float, budget: float | None) -> dict[str, float | None]:
    """The lower bound on a compiled step and the decode efficiency 2× would need (None: none suffices)."""
    training = table["reference forward"] + table["policy forward"] + table["backward"]
    room = None if budget is None else budget - training
    return {"training_floor_s": training, "sampling_floor_s": table["sampling"],
            "step_lower_bound_s": training + table["sampling"] / efficiency,
            "budget_s": budget,
            "decode_efficiency_needed": None if room is None or room <= 0 else table["sampling"] / room}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="data/models/worked-base")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=72)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads, as bench_trl.py (default 1)")
    parser.add_argument("--trl", type=Path, default=Path("runs/benchmarks/trl_study.json"),
                        help="bench_trl.py's output on the same workload, for TRL's measured step")
    parser.add_argument("--out", type=Path, default=Path("runs/benchmarks/compiled_study.json"))
    args = parser.parse_args(argv)
    if not Path(args.model).exists():
        parser.error(f"model directory {args.model} does not exist (build it with `make study-base-model`)")
    if min(args.threads, args.prompts, args.group_size, args.max_new_tokens) < 1:
        parser.error("--threads, --prompts, --group-size and --max-new-tokens must be at least 1")
    torch.set_num_threads(args.threads)

    tokenizer, model, ids, mask = study_batch(args.model, args.prompts, args.group_size)
    if bool((mask == 0).any()):
        raise SystemExit("the prompts have different lengths; the floor's count assumes one prompt length")
    eos, (B, P), max_new = tokenizer.eos_token_id, ids.shape, args.max_new_tokens
    lean = LeanLlama(model)
    gap = check_lean(lean, model, ids, mask)

    def ours() -> Any:
        return sample(model, tokenizer, ids, mask, max_new_tokens=max_new, temperature=1.0, seed=0,
                      group_size=args.group_size)
    roll = ours()
    lengths = [int(n) for n in roll.response_mask.sum(-1)]
    sample_s = best_time(ours, rounds=5)
    print(f"our sampler (eager, Hugging Face model, finished rows dropped): {sample_s * 1e3:.1f} ms per rollout "
          f"of {B} rows, answers of {min(lengths)}–{max(lengths)} tokens; LeanLlama's logits within {gap:.1e}")

    with torch.inference_mode():
        logits, keys, values, valid = lean.prompt(ids, mask, max_new)
        state = (logits.argmax(-1), mask.long().sum(-1), keys, values, valid)
    forms = measure_forms(lean, state, lambda step: lean_rollout(lean, step, ids, mask, max_new_tokens=max_new,
                                                                 eos=eos), up_to_eos(roll.response_ids, eos), eos)
    d = Dims.of(model.config)
    clock = KernelClock(d)
    step_floor = clock.floor(forward_work(d, B, 1, P + max_new, B))
    for form in forms.values():
        form["efficiency"] = step_floor / form["step_s"]
    table = {phase: clock.floor(w) for phase, w in designs(d, lengths, P, args.group_size, max_new)["ours"].items()}
    measured = measured_steps(args.trl)
    best = max(forms, key=lambda name: forms[name]["efficiency"])
    result = bound(table, forms[best]["efficiency"], None if measured is None else measured["trl_step_s"] / 2)
    report(forms, step_floor, best, result, measured, args)
    write_json(args.out, {"environment": environment_info(), "settings": {k: str(v) for k, v in vars(args).items()},
                          "workload": {"response_lengths": lengths, "prompt_tokens": P, "dims": vars(d)},
                          "our_sampler_s": sample_s, "decode_step_floor_s": step_floor, "forms": forms,
                          "floors_s": table, "best_form": best, "bound": result, "measured": measured})
    print(f"wrote {args.out}")
    return 0


def report(forms: dict, step_floor: float, best: str, result: dict, measured: dict | None,
           args: argparse.Namespace) -> None:
    print(f"\ndecode step floor (its products and attention, timed alone): {step_floor * 1e3:.2f} ms")
    for name, f in forms.items():
        print(f"  {name:22s} {f['efficiency']:5.0%} of it")
    print(f"\nfloors of our step: training passes {result['training_floor_s'] * 1e3:.0f} ms, sampling "
          f"{result['sampling_floor_s'] * 1e3:.0f} ms. With the training passes at 100% of their floor and every "
          f"decode step as efficient as the best form ({best}), a step takes at least "
          f"{result['step_lower_bound_s'] * 1e3:.0f} ms.")
    if measured is None:
        print(f"(no {args.trl}: run `make bench-trl-study` for TRL's measured step)")
        return
    need = result["decode_efficiency_needed"]
    print(f"2× TRL ({measured['trl_step_s'] * 1e3:.0f} ms) needs a step of at most {result['budget_s'] * 1e3:.0f} ms"
          + (f": the decode steps at {need:.0%} of their floor or better." if need is not None else
             ": the training passes' floor alone exceeds it."))


if __name__ == "__main__":
    sys.exit(main())
