"""How close do compiled decode steps and training passes come to their arithmetic floor, and does that open 2× TRL?

    python benchmarks/bench_compiled.py [--model data/models/worked-base] [--prompts 8] [--group-size 5]
        [--max-new-tokens 72] [--threads 1] [--trl runs/benchmarks/trl_study.json]
        [--out runs/benchmarks/compiled_study.json]

(``make bench-compiled``.) **Question.** ``make bench-floor`` shows that 2× TRL's measured step (217 ms on the
study's workload) leaves almost nothing above our step's arithmetic floor, so only a compiled step could reach
it: the training passes would have to run at their floor and the sampling loop close to it. How close does
compiled PyTorch get to each, on this workload and core?

**Method.** :class:`LeanLlama` is the study's Llama written as plain tensor code from the model's own weights
(the query/key/value and gate/up projections fused into one product each; a static key/value cache of
``prompt + max_new_tokens`` positions; a decode step that writes nothing in place and returns the new keys and
values, so inductor compiles it as one pure graph). It is checked before anything is timed: its logits equal
the Hugging Face model's (to 1e-4), and its rollout, drawn like ``kl_lib.rl.rollout.sample`` (the same
``torch.multinomial`` stream for a seed), gives the same tokens. Two kernels are then timed in three forms each
(eager, ``torch.compile`` with inductor, and inductor with its C++ wrapper: no Python between kernels), each
against its arithmetic floor (``bench_floor``'s kernels at that shape, timed alone):

- one decode step at the full batch (B rows, the whole static cache), its logits checked against the eager
  step's and its rollout's tokens against our sampler's;
- one training pass over the padded rollout (B × (P + R − 1) tokens: the negative log-likelihood of the
  response tokens, forward and backward), its loss and gradients checked against the eager pass's.

The best efficiencies (floor / time) turn the floors of our step's phases into a bound and an estimate:

    step ≥ floor(reference forward + policy forward + backward) + floor(sampling) / efficiency(decode step)
    step ≈ floor(training passes) / efficiency(training pass) + floor(sampling) / efficiency(decode step)

Both are optimistic: every decode step is taken to be as efficient as a full-batch one (steps after rows are
dropped have fewer rows, so more overhead per product), and the optimizer step is left out. With TRL's measured
step (``make bench-trl-study``) the report gives the decode efficiency 2× would need in each case. The compiled
rollout itself (every row to the longest answer, as a static shape needs) is also timed end to end against our
sampler. Results go to ``--out``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.nn import functional as F

from bench_floor import (Dims, KernelClock, backward_of, designs, forward_work, measured_steps, parse_workload,
                         study_batch)
from kl_lib.files import environment_info, write_json
from kl_lib.rl.rollout import sample


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

    def parameters(self) -> list[Tensor]:
        """The weights (made trainable with ``requires_grad_``: each is a leaf tensor of its own)."""
        return [self.embed, self.norm, self.head, *(t for w in self.layers for t in w.values())]

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

    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """A pass over whole sequences ``(B, T)``: the final hidden states ``(B, T, C)`` and each layer's keys and
        values ``(B, H, T, D)``."""
        T = ids.shape[1]
        cos, sin = self._rotary((mask.long().cumsum(-1) - 1).clamp_min(0))
        # Causal over the real tokens (a left-padding row attends to nothing: scaled_dot_product_attention gives 0)
        allowed = torch.ones(T, T, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]  # (B, T, T)
        x, keys, values = self.embed[ids], [], []
        for w in self.layers:
            q, k, v = self._qkv(x, w, cos, sin)
            keys.append(k)
            values.append(v)
            x = self._finish_layer(x, F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None]), w)
        return self._rms(x, self.norm), keys, values

    def logits(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Every position's logits ``(B, T, V)``: a training forward."""
        return self.forward(ids, mask)[0] @ self.head.T

    def prompt(self, ids: Tensor, mask: Tensor, max_new_tokens: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(logits, keys, values, valid)``: the next token's logits ``(B, V)``, the cache ``(L, B, H, S, D)``
        holding the prompt, and which cache positions a query may attend to ``(B, S)``."""
        (B, P), S = ids.shape, ids.shape[1] + max_new_tokens
        hidden, prompt_keys, prompt_values = self.forward(ids, mask)
        keys, values = torch.zeros(self.L, B, self.H, S, self.D), torch.zeros(self.L, B, self.H, S, self.D)
        keys[:, :, :, :P], values[:, :, :, :P] = torch.stack(prompt_keys), torch.stack(prompt_values)
        valid = torch.zeros(B, S, dtype=torch.bool)
        valid[:, :P] = mask.bool()
        return hidden[:, -1] @ self.head.T, keys, values, valid

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


def forms_of(fn: Callable) -> Iterator[tuple[str, Callable]]:
    """``(name, form)`` of ``fn`` for each of :data:`FORMS`, eager or compiled (static shapes, one graph), with the
    form's inductor settings in force while the caller uses it; the compile caches are cleared before each."""
    import torch._dynamo
    import torch._inductor.config as inductor

    for name, settings in FORMS.items():
        torch._dynamo.reset()
        with inductor.patch(settings or {}):
            yield name, fn if settings is None else torch.compile(fn, dynamic=False, fullgraph=True)


def first_call(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its seconds (for a compiled form: the compile)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def measure_decode(lean: LeanLlama, state: tuple, rollout: Callable[[Step], Tensor],
                   expected: list[list[int]], eos: int) -> dict[str, dict[str, float]]:
    """For each form of the decode step, its compile time, its time on ``state`` (the arguments of one
    full-batch step) and the time of a whole ``rollout``, in seconds. Each form is checked first: logits equal
    the eager step's to 1e-4, the rollout's tokens equal ``expected``."""
    with torch.inference_mode():
        reference = lean.step(*state)[0]
    results = {}
    for name, step in forms_of(lean.step):
        with torch.inference_mode():
            (logits, *_), compile_s = first_call(lambda: step(*state))
            if not torch.allclose(logits, reference, atol=1e-4, rtol=0):
                raise SystemExit(f"the {name} step's logits differ from the eager step's by "
                                 f"{(logits - reference).abs().max():.2e}")
            if up_to_eos(rollout(step), eos) != expected:
                raise SystemExit(f"the {name} rollout draws other tokens than kl_lib.rl.rollout.sample")
            step_s = best_time(lambda: step(*state), rounds=7, calls=20)
            rollout_s = best_time(lambda: rollout(step), rounds=5)
        results[name] = {"compile_s": compile_s, "step_s": step_s, "rollout_s": rollout_s}
        print(f"  decode step, {name:24s} {step_s * 1e3:6.2f} ms   rollout {rollout_s * 1e3:6.1f} ms   "
              f"(compile {compile_s:.1f} s)", flush=True)
    return results


def measure_training(lean: LeanLlama, ids: Tensor, mask: Tensor, targets: Tensor,
                     target_mask: Tensor) -> dict[str, dict[str, float]]:
    """For each form of a training forward (negative log-likelihood of ``targets`` ``(B, T)`` where
    ``target_mask``), its compile time and the seconds of that forward and its backward. Each compiled form's loss
    and gradients are checked against the eager form's (to 1e-4 relative)."""
    weights = lean.parameters()
    for w in weights:
        w.requires_grad_(True)

    def loss(ids: Tensor, mask: Tensor, targets: Tensor, target_mask: Tensor) -> Tensor:
        logits = lean.logits(ids, mask)
        nll = logits.logsumexp(-1) - logits.gather(-1, targets[..., None])[..., 0]
        return (nll * target_mask).sum()

    def train(fn: Callable) -> tuple[Tensor, list[Tensor]]:
        value = fn(ids, mask, targets, target_mask)
        grads = torch.autograd.grad(value, weights)
        return value.detach(), grads

    reference = train(loss)
    results = {}
    for name, form in forms_of(loss):
        (value, grads), compile_s = first_call(lambda: train(form))
        for got, want in zip([value, *grads], [reference[0], *reference[1]]):
            if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
                raise SystemExit(f"the {name} training pass's loss or gradients differ from the eager pass's")
        seconds = best_time(lambda: train(form), rounds=5)
        results[name] = {"compile_s": compile_s, "step_s": seconds}
        print(f"  training pass, {name:22s} {seconds * 1e3:6.1f} ms   (compile {compile_s:.1f} s)", flush=True)
    return results


def check_lean(lean: LeanLlama, model: torch.nn.Module, ids: Tensor, mask: Tensor) -> float:
    """The largest difference between the lean prompt pass's logits and the model's; stops above 1e-4."""
    with torch.inference_mode():
        position = (mask.long().cumsum(-1) - 1).clamp_min(0)
        expected = model(input_ids=ids, attention_mask=mask, position_ids=position).logits[:, -1]
        gap = float((lean.prompt(ids, mask, 1)[0] - expected).abs().max())
    if gap > 1e-4:
        raise SystemExit(f"LeanLlama's logits differ from the model's by {gap:.2e}: it does not compute this model")
    return gap


def bound(table: dict[str, float], decode: float, training: float, budget: float | None) -> dict[str, Any]:
    """Bounds on a compiled step from the floors of our design's phases (``table``, seconds) and the best
    efficiencies measured (floor / time) of a decode step and of a training pass: with the training passes at
    100% of their floor (a lower bound) and at ``training`` (an optimistic estimate), and the decode efficiency
    2× needs in each case (None: none suffices)."""
    train_floor = table["reference forward"] + table["policy forward"] + table["backward"]
    sampling = table["sampling"] / decode

    def needed(train_s: float) -> float | None:
        room = None if budget is None else budget - train_s
        return None if room is None or room <= 0 else table["sampling"] / room
    return {"training_floor_s": train_floor, "sampling_floor_s": table["sampling"], "budget_s": budget,
            "step_lower_bound_s": train_floor + sampling, "step_estimate_s": train_floor / training + sampling,
            "decode_efficiency_needed": needed(train_floor),
            "decode_efficiency_needed_at_measured_training": needed(train_floor / training)}


def training_batch(ids: Tensor, mask: Tensor, roll: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inputs, attention mask, targets and target mask ``(B, P + R − 1)`` of the padded rollout: a training
    forward over every row's prompt and response, scored on the response tokens."""
    sequence = torch.cat([ids, roll.response_ids], 1)
    attention = torch.cat([mask, roll.response_mask.long()], 1)
    scored = torch.cat([torch.zeros_like(mask[:, 1:]), roll.response_mask.long()], 1)
    return sequence[:, :-1], attention[:, :-1], sequence[:, 1:], scored.float()


def main(argv: list[str] | None = None) -> int:
    args = parse_workload(__doc__, "runs/benchmarks/compiled_study.json", argv)

    tokenizer, model, ids, mask = study_batch(args.model, args.prompts, args.group_size)
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
    decode = measure_decode(lean, state, lambda step: lean_rollout(lean, step, ids, mask, max_new_tokens=max_new,
                                                                   eos=eos), up_to_eos(roll.response_ids, eos), eos)
    batch = training_batch(ids, mask, roll)
    training = measure_training(lean, *batch)  # the decode measurements are done: its weights may now need gradients

    d = Dims.of(model.config)
    clock = KernelClock(d)
    T = batch[0].shape[1]
    floors = {"decode step": clock.floor(forward_work(d, B, 1, P + max_new, B))}
    forward = forward_work(d, B, T, T, B * T)
    floors["training pass"] = clock.floor(forward) + clock.floor(backward_of(forward))
    for kind, forms in (("decode step", decode), ("training pass", training)):
        for form in forms.values():
            form["efficiency"] = floors[kind] / form["step_s"]
    table = {phase: clock.floor(w) for phase, w in designs(d, lengths, P, args.group_size, max_new)["ours"].items()}
    measured = measured_steps(args.trl)
    result = bound(table, max(f["efficiency"] for f in decode.values()),
                   max(f["efficiency"] for f in training.values()),
                   None if measured is None else measured["trl_step_s"] / 2)
    report(decode, training, floors, result, measured, args)
    write_json(args.out, {"environment": environment_info(), "settings": {k: str(v) for k, v in vars(args).items()},
                          "workload": {"response_lengths": lengths, "prompt_tokens": P, "dims": vars(d)},
                          "our_sampler_s": sample_s, "floors_s": floors, "decode": decode, "training": training,
                          "design_floors_s": table, "bound": result, "measured": measured})
    print(f"wrote {args.out}")
    return 0


def report(decode: dict, training: dict, floors: dict[str, float], result: dict, measured: dict | None,
           args: argparse.Namespace) -> None:
    print()
    for kind, forms in (("decode step", decode), ("training pass", training)):
        print(f"{kind} floor (its products and attention, timed alone): {floors[kind] * 1e3:.2f} ms; "
              + ", ".join(f"{name} {f['efficiency']:.0%}" for name, f in forms.items()) + " of it")
    print(f"\nfloors of our step: training passes {result['training_floor_s'] * 1e3:.0f} ms, sampling "
          f"{result['sampling_floor_s'] * 1e3:.0f} ms. Every decode step as efficient as the best full-batch form: a "
          f"step takes at least {result['step_lower_bound_s'] * 1e3:.0f} ms with the training passes at 100% of "
          f"their floor, about {result['step_estimate_s'] * 1e3:.0f} ms at the best efficiency measured here.")
    if measured is None:
        print(f"(no {args.trl}: run `make bench-trl-study` for TRL's measured step)")
        return

    def needs(value: float | None) -> str:
        if value is None:
            return "not even a free sampler"
        return f"decode steps at {value:.0%} of their floor or better" + (" (faster than it: impossible)"
                                                                          if value > 1 else "")
    print(f"2× TRL ({measured['trl_step_s'] * 1e3:.0f} ms) allows {result['budget_s'] * 1e3:.0f} ms: "
          f"{needs(result['decode_efficiency_needed'])} with perfect training passes, "
          f"{needs(result['decode_efficiency_needed_at_measured_training'])} at the measured ones.")


if __name__ == "__main__":
    sys.exit(main())
