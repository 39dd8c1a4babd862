"""Rollouts (``transformers.generate``, or a KV-cache loop) and the per-token log-probs the trainer differentiates.

Shapes: B sequences, P prompt tokens (left-padded), R response tokens (right-padded after the first EOS).

* :func:`generate` samples responses at a given temperature (no top-k/top-p/min-p: the plain tempered softmax,
  as the paper samples) and returns the sampler's own log-probs of the sampled tokens, ``behavior_logp``
  ``(B, R)``, computed from the raw logits ``generate`` reports: they are the behaviour policy μ for
  importance weights and PPO ratios.
* :func:`token_logprobs` recomputes log π(y_t | s_t) with one forward pass over prompt + response, with
  position ids taken from the attention mask (cumsum − 1), so left padding changes nothing: a test holds it
  against the sampler's log-probs to 1e-5. Its pieces are public for the trainer: :func:`response_logits` (the
  forward pass, ``(B, R, V)`` tempered logits) and :func:`sampled_logprobs` (log π of the sampled tokens as
  ``logits[y] − logsumexp(logits)``, which keeps no ``(B, R, V)`` log-softmax alive for the backward pass).

For long answers of varied length (the trainer's ``long_answers``) two variants skip the padding that
dominates the work there: :func:`sample` draws :func:`generate`'s tokens in a no-grad KV-cache loop that takes
finished rows out of the batch, and :func:`trimmed_response_logits` computes :func:`response_logits` in slices of
rows of similar length, each cut to its longest response (same numbers up to rounding, tested).

Memory: full-vocabulary tensors cost ``4·B·R·V`` bytes each (Qwen's V = 152k: 0.6 GB per 1000 response
tokens), so nothing here builds more of them than it must: the model computes logits only at the positions
that predict response tokens (``logits_to_keep``, on the unshared path), the temperature divides them in
place, and :func:`generate` turns the sampler's logits into log-probs one step at a time. What remains is
``generate``'s own record of the raw step logits (``output_logits``, float32): 4 bytes per response token ×
vocabulary entry for the whole batch while it samples.

Sampling randomness comes from ``torch``'s global generator inside :func:`torch.random.fork_rng`, seeded per
call: a rollout is a pure function of (weights, prompts, seed), which makes resumed runs identical.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

from kl_lib.lm.models import is_checkpointing

__all__ = ["Rollout", "concat_rollouts", "generate", "response_logits", "response_mask", "sample", "sampled_logprobs",
           "token_logprobs", "trimmed_response_logits"]


@dataclass
class Rollout:
    prompt_ids: Tensor  # (B, P) left-padded
    prompt_mask: Tensor  # (B, P) 1 on real prompt tokens
    response_ids: Tensor  # (B, R) right-padded with pad_token_id after the first EOS
    response_mask: Tensor  # (B, R) bool, True up to and including the first EOS
    finished: Tensor  # (B,) bool, the response ended with EOS within the budget
    behavior_logp: Tensor  # (B, R) float32, log μ(y_t | s_t) of the sampler (0 at masked positions)
    texts: list[str]  # decoded responses (special tokens removed)


def response_mask(response_ids: Tensor, eos_token_id: int) -> tuple[Tensor, Tensor]:
    """``(mask, finished)``: mask is True up to and including the first EOS ``(B, R)``; finished ``(B,)``."""
    is_eos = response_ids == eos_token_id
    finished = is_eos.any(-1)
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the first EOS
    return ~after_eos, finished


def _autocast(model: torch.nn.Module, dtype: torch.dtype | None):
    device = next(model.parameters()).device
    if dtype is None or device.type == "cpu":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int,
             temperature: float, seed: int, autocast_dtype: torch.dtype | None = None,
             group_size: int = 1) -> Rollout:
    """Sample one response per row of ``prompt_ids`` ``(B, P)``.

    With consecutive groups of ``group_size`` identical prompts, the prompts (all but their last token) are
    encoded once and the cache handed to ``generate`` for the whole group (prefix caching).
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _autocast(model, autocast_dtype):
        torch.manual_seed(seed)
        prefix = {}
        if _shared_prompt_groups(prompt_ids, prompt_mask, group_size) and prompt_ids.shape[1] > 1:
            G, head = group_size, prompt_mask[::group_size, :-1].long()
            positions = (head.cumsum(-1) - 1).clamp_min(0)
            cache = _returned_cache(model(input_ids=prompt_ids[::G, :-1], attention_mask=head, position_ids=positions,
                                          use_cache=True))
            cache.batch_repeat_interleave(G)
            prefix = {_cache_kwarg(model): cache}  # a prefix cache, under the name this transformers uses
        recorder = _SampledLogProbs(temperature)
        out = model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True,
            temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            logits_processor=[recorder], return_dict_in_generate=True, **prefix,
        )
    model.train(was_training)
    response_ids = out.sequences[:, prompt_ids.shape[1]:]  # (B, R)
    logp = recorder.finish(response_ids[:, -1])  # (B, R)
    del out  # the KV cache
    mask, finished = response_mask(response_ids, tokenizer.eos_token_id)
    response_ids = response_ids.masked_fill(~mask, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, response_ids, mask, finished,
                   logp.masked_fill(~mask, 0.0), texts)


def sample_with_logits(model, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int,
                       temperature: float, seed: int, autocast_dtype: torch.dtype | None = None,
                       group_size: int = 1, reference=None) -> tuple[Rollout, Tensor, Tensor | None]:
    """Sample like :func:`generate`, but keep the autograd graph: ``(rollout, logits, ref_logits)``.

    ``logits`` ``(B, R, V)`` are the tempered logits every sampled token was drawn from, differentiable with
    respect to the model: for an on-policy update with the sampling weights they *are* the training forward
    pass, which then need not be recomputed (a third less model compute per step). ``reference`` (a callable
    returning a context manager that yields the reference model, or None) scores the same tokens in the same
    loop, step by step and without gradients: ``ref_logits`` ``(B, R, V)``. Computed with the very operations
    and shapes of the policy's, they equal the policy's bit for bit while the weights are equal, so
    log π − log π_ref is exactly 0 at the start of training (as on the recomputing path).

    The loop is plain: one prompt pass (shared by each group of ``group_size`` identical prompts), then one
    token per step through the KV cache; tokens are drawn from softmax(logits / T) with ``torch.multinomial``
    under a forked, seeded RNG (no top-k/top-p, as :func:`generate`); rows that have ended get the pad token; it
    stops when every row has ended. Position ids follow the attention mask, so left padding changes nothing
    (tested against :func:`token_logprobs`).
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    B, eos, pad = prompt_ids.shape[0], tokenizer.eos_token_id, tokenizer.pad_token_id
    kw = _cache_kwarg(model)
    shared = _shared_prompt_groups(prompt_ids, prompt_mask, group_size)
    G = group_size if shared else 1
    positions = (prompt_mask.long().cumsum(-1) - 1).clamp_min(0)

    def prompt_pass(m):  # -> (cache, logits of the first response token (B, V))
        # Logits at every prompt position although only the last is used: a strided one-row slice's product
        # rounds by where the activations happen to sit in memory (see response_logits), so the reference
        # would not reproduce the policy bit for bit.
        out = m(input_ids=prompt_ids[::G], attention_mask=prompt_mask[::G].long(), position_ids=positions[::G],
                use_cache=True)
        cache = _returned_cache(out)
        if G > 1:
            cache.batch_repeat_interleave(G)  # (B/G, …) -> (B, …), differentiable
        return cache, out.logits[:, -1].repeat_interleave(G, 0)

    def step_pass(m, cache, y, attention, position):
        out = m(input_ids=y[:, None], attention_mask=attention, position_ids=position, use_cache=True, **{kw: cache})
        return _returned_cache(out), out.logits[:, -1]

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _autocast(model, autocast_dtype):
        torch.manual_seed(seed)
        cache, step_logits = prompt_pass(model)
        if reference is not None:
            with torch.no_grad(), reference() as ref_model:
                ref_cache, ref_step = prompt_pass(ref_model)
        attention = prompt_mask.long()
        position = prompt_mask.long().sum(-1, keepdim=True)  # (B, 1): the next token's position id
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        tokens, logits, ref_logits = [], [], []
        for t in range(max_new_tokens):
            step_logits = step_logits.float() / temperature  # (B, V)
            y = torch.multinomial(torch.softmax(step_logits.detach(), -1), 1).squeeze(-1)
            y = y.masked_fill(finished, pad)
            tokens.append(y)
            logits.append(step_logits)
            if reference is not None:
                ref_logits.append(ref_step.float() / temperature)
            finished = finished | (y == eos)
            if bool(finished.all()) or t == max_new_tokens - 1:
                break
            attention = torch.cat([attention, attention.new_ones(B, 1)], 1)
            cache, step_logits = step_pass(model, cache, y, attention, position)
            if reference is not None:
                with torch.no_grad(), reference() as ref_model:
                    ref_cache, ref_step = step_pass(ref_model, ref_cache, y, attention, position)
            position = position + 1
    del cache
    response_ids = torch.stack(tokens, 1)  # (B, R)
    logits = torch.stack(logits, 1)  # (B, R, V)
    mask, done = response_mask(response_ids, eos)
    response_ids = response_ids.masked_fill(~mask, pad)
    logp = sampled_logprobs(logits.detach(), response_ids).masked_fill(~mask, 0.0)
    texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    roll = Rollout(prompt_ids, prompt_mask, response_ids, mask, done, logp, texts)
    return roll, logits, (torch.stack(ref_logits, 1) if reference is not None else None)


def sample(model, tokenizer, prompt_ids: Tensor, prompt_mask: Tensor, *, max_new_tokens: int, temperature: float,
           seed: int, autocast_dtype: torch.dtype | None = None, group_size: int = 1) -> Rollout:
    """:func:`generate`'s rollout (the same draws for the same seed) by a plain no-grad KV-cache loop that takes
    finished rows out of the batch.

    ``generate`` runs every row until the last one ends; with answers of varied length most of that work is on
    rows that have ended (at a 48-token budget and a mean length of 20, more than half). Here the running batch
    is cut to the rows still going whenever a quarter of it has ended (the cache and mask rows are selected).
    Tokens are drawn for the whole batch ``(B, V)`` each step with ``torch.multinomial`` (ended rows get a uniform
    distribution whose draws are discarded), so the random stream, and hence every token, is the one
    ``generate`` draws; only the rounding of a smaller batch's products can differ (last bits of the logits).
    ``behavior_logp`` is log softmax(logits / T) of each drawn token, as :func:`generate` records it.
    """
    device = next(model.parameters()).device
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    B, eos, pad = prompt_ids.shape[0], tokenizer.eos_token_id, tokenizer.pad_token_id
    kw = _cache_kwarg(model)
    G = group_size if _shared_prompt_groups(prompt_ids, prompt_mask, group_size) else 1
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _autocast(model, autocast_dtype), torch.inference_mode():
        torch.manual_seed(seed)
        attention = prompt_mask.long()
        position = (attention.cumsum(-1) - 1).clamp_min(0)
        out = model(input_ids=prompt_ids[::G], attention_mask=attention[::G], position_ids=position[::G],
                    use_cache=True, logits_to_keep=1) if _accepts(model, "logits_to_keep") else \
            model(input_ids=prompt_ids[::G], attention_mask=attention[::G], position_ids=position[::G], use_cache=True)
        cache, step_logits = _returned_cache(out), out.logits[:, -1].repeat_interleave(G, 0)  # (B, V)
        if G > 1:
            cache.batch_repeat_interleave(G)
        del out
        position = attention.sum(-1, keepdim=True)  # (B, 1): the next token's position id
        running = torch.arange(B, device=device)  # rows of the batch the model runs on (some may have ended)
        live = torch.ones(B, dtype=torch.bool, device=device)  # per running row: not ended
        tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
        logp = torch.zeros(B, max_new_tokens, dtype=torch.float32, device=device)
        width = 0
        for t in range(max_new_tokens):
            width = t + 1
            logprobs = torch.log_softmax(step_logits.float() / temperature, -1)  # (n, V)
            probs = torch.full((B, logprobs.shape[-1]), 1.0 / logprobs.shape[-1], device=device)
            probs[running] = logprobs.exp()
            y = torch.multinomial(probs, 1)[running]  # (n, 1): the draws of the running rows
            rows = running[live]
            tokens[rows, t] = y[live, 0]
            logp[rows, t] = logprobs.gather(-1, y)[live, 0]
            live = live & (y[:, 0] != eos)
            n_live = int(live.sum())
            if n_live == 0 or t == max_new_tokens - 1:
                break
            if n_live <= 3 * running.shape[0] // 4:  # take the ended rows out of the batch
                keep = live.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                running, live, y = running[keep], live[keep], y[keep]
                attention, position = attention[keep], position[keep]
            attention = torch.cat([attention, attention.new_ones(attention.shape[0], 1)], 1)
            out = model(input_ids=y, attention_mask=attention, position_ids=position, use_cache=True, **{kw: cache})
            cache, step_logits = _returned_cache(out), out.logits[:, -1]
            position = position + 1
        del cache  # (and the last step's output, if any step ran: every row may end at its first token)
        out = None
    model.train(was_training)
    response_ids, logp = tokens[:, :width].clone(), logp[:, :width].clone()  # ordinary tensors again
    mask, finished = response_mask(response_ids, eos)
    texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, response_ids, mask, finished, logp, texts)


class _SampledLogProbs:
    """A logits processor that records log μ(y_t | s_t) of each sampled token, one step behind.

    ``generate`` calls it with step t's scores before sampling y_t (custom processors run before the
    temperature warper, so the scores are untempered; the recomputation test at T ≠ 1 holds this to 1e-5). At step
    t the token y_{t−1} is the last column of ``input_ids``, so only one step's (B, V) log-probs are alive at a
    time, instead of ``output_logits``' record of every step, (B, R, V) for the whole rollout.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.previous: Tensor | None = None  # (B, V) log-probs of the last step
        self.logp: list[Tensor] = []  # (B,) per completed step

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if self.previous is not None:
            self.logp.append(self.previous.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, -1)
        return scores

    def finish(self, last_tokens: Tensor) -> Tensor:
        """``(B, R)``: the recorded log-probs plus the final step's (whose token ``generate`` sampled last)."""
        self.logp.append(self.previous.gather(-1, last_tokens[:, None]).squeeze(-1))
        self.previous = None
        return torch.stack(self.logp, 1)


def concat_rollouts(rolls: list[Rollout], response_width: int, pad_token_id: int) -> Rollout:
    """Stack rollouts of the same prompt width ``P``, padding each response to ``response_width`` columns.

    Padding columns are masked (pad token, log-prob 0); with a fixed width the batch's layout does not depend on
    how it was cut into shards.
    """
    def pad(t: Tensor, value) -> Tensor:
        return torch.nn.functional.pad(t, (0, response_width - t.shape[1]), value=value)

    return Rollout(
        prompt_ids=torch.cat([r.prompt_ids for r in rolls]), prompt_mask=torch.cat([r.prompt_mask for r in rolls]),
        response_ids=torch.cat([pad(r.response_ids, pad_token_id) for r in rolls]),
        response_mask=torch.cat([pad(r.response_mask, False) for r in rolls]),
        finished=torch.cat([r.finished for r in rolls]),
        behavior_logp=torch.cat([pad(r.behavior_logp, 0.0) for r in rolls]),
        texts=[t for r in rolls for t in r.texts])


def _shared_prompt_groups(prompt_ids: Tensor, prompt_mask: Tensor, group_size: int) -> bool:
    """True when the batch is consecutive groups of ``group_size`` rows with identical prompts."""
    B = prompt_ids.shape[0]
    if group_size <= 1 or B % group_size:
        return False
    ids = prompt_ids.view(B // group_size, group_size, -1)
    mask = prompt_mask.view(B // group_size, group_size, -1)
    return bool((ids == ids[:, :1]).all() and (mask == mask[:, :1]).all())


def _returned_cache(output):
    """The KV cache a forward returned: ``output.cache`` in recent transformers, ``past_key_values`` before."""
    return output.cache if "cache" in output else output.past_key_values


@functools.lru_cache(maxsize=8)
def _cache_kwarg_of(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _cache_kwarg(model) -> str:
    """Name of the argument that takes a KV cache (``cache`` in recent transformers, ``past_key_values`` before),
    read from the model's forward (under a PEFT wrapper, the base model's: the wrapper's own forward hides it)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_kwarg_of(type(base).forward)


@functools.lru_cache(maxsize=8)
def _parameters_of(forward) -> frozenset[str]:
    return frozenset(inspect.signature(forward).parameters)


def _accepts(model, name: str) -> bool:
    """Whether the model's forward (under a PEFT wrapper, the base model's) takes the keyword ``name``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in _parameters_of(type(base).forward)


def response_logits(model, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
                    temperature: float = 1.0, autocast_dtype: torch.dtype | None = None,
                    group_size: int = 1) -> Tensor:
    """The tempered logits of each response token's distribution, ``(B, R, V)`` float32, differentiable.

    When the batch is groups of ``group_size`` samples of the same prompt (as a rollout is), each prompt is
    encoded once and its key/value cache shared by the group (gradients flow through the shared prompt pass,
    summed over the group): the same numbers for a fraction of the work. Without that sharing, logits are
    computed only where they predict a response token (``logits_to_keep``), not at the other prompt positions.
    """
    attention = torch.cat([prompt_mask.long(), response_mask.long()], 1)  # (B, P + R)
    position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
    P, R = prompt_ids.shape[1], response_ids.shape[1]
    keep = (lambda k: {"logits_to_keep": k}) if _accepts(model, "logits_to_keep") else (lambda k: {})
    # Gradient checkpointing (in training mode, with grad) drops KV caches, so the shared prompt pass is off there.
    checkpointing = torch.is_grad_enabled() and model.training and is_checkpointing(model)
    with _autocast(model, autocast_dtype):
        if not checkpointing and _shared_prompt_groups(prompt_ids, prompt_mask, group_size):
            G = group_size
            # All prompt positions' logits, although only the last is used: with logits_to_keep=1 the output
            # layer's product has one row per prompt, a shape whose rounding on CPU depends on the weights' memory
            # alignment, so a frozen copy of the policy would no longer give bitwise its log-probs (and k1 = 0).
            prompt_out = model(input_ids=prompt_ids[::G], attention_mask=prompt_mask[::G].long(),
                               position_ids=position_ids[::G, :P], use_cache=True)
            cache = _returned_cache(prompt_out)
            cache.batch_repeat_interleave(G)  # (B/G, …) -> (B, …), differentiable
            first = prompt_out.logits[:, -1:].repeat_interleave(G, 0)  # distribution of the first response token
            del prompt_out  # its (B/G, P, V) logits
            rest = model(input_ids=response_ids, attention_mask=attention, position_ids=position_ids[:, P:],
                         use_cache=False, **{_cache_kwarg(model): cache}).logits[:, :-1]
            logits = torch.cat([first, rest], 1)
        else:
            input_ids = torch.cat([prompt_ids, response_ids], 1)
            logits = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                           **keep(R + 1)).logits[:, -R - 1: -1]
    logits = logits.float()  # a copy only of lower-precision (autocast) logits
    # In place: `/` would hold a second (B, R, V) copy while the first is alive (nothing saved either for backward).
    return logits.div_(temperature) if temperature != 1.0 else logits  # (B, R, V): each response token's distribution


def trimmed_response_logits(model, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor,
                            response_mask: Tensor, temperature: float = 1.0,
                            autocast_dtype: torch.dtype | None = None, group_size: int = 1,
                            chunks: int = 4) -> Tensor:
    """:func:`response_logits` without computing most of the padding: ``(B, R, V)``; at masked positions, the
    logits of the padding a slice computed, or 0 past its longest response.

    A batch padded to its longest response spends most of its forward and backward pass on padding when lengths
    vary (a 48-token budget and a mean length of 20: 60% of the response positions). Here the rows are sorted by
    response length and cut into ``chunks`` slices, each run at its own longest response. Groups of
    ``group_size`` identical prompts are encoded once, as in :func:`response_logits`, and each slice reads its
    rows of that key/value cache (gradients flow back into the one prompt pass); without groups each slice runs
    its prompts too, less the left-padding columns none of its rows uses (position ids follow the mask, so
    nothing moves). The logits at valid positions are :func:`response_logits`' up to rounding (tested: log-probs
    to 1e-5, gradients to 1e-4); equal masks give equal slices, so the reference, scored by the same call, still
    equals the policy bit for bit while their weights are equal.
    """
    B, P, R = *prompt_ids.shape, response_ids.shape[1]
    attention = torch.cat([prompt_mask.long(), response_mask.long()], 1)  # (B, P + R)
    position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
    lengths = response_mask.sum(-1)
    order = torch.argsort(lengths, stable=True)
    keep = (lambda k: {"logits_to_keep": k}) if _accepts(model, "logits_to_keep") else (lambda k: {})
    checkpointing = torch.is_grad_enabled() and model.training and is_checkpointing(model)
    G = group_size if not checkpointing and _shared_prompt_groups(prompt_ids, prompt_mask, group_size) else 1
    pieces = []
    with _autocast(model, autocast_dtype):
        if G > 1:  # all prompt positions' logits, for the bitwise reference (see response_logits)
            prompt_out = model(input_ids=prompt_ids[::G], attention_mask=prompt_mask[::G].long(),
                               position_ids=position_ids[::G, :P], use_cache=True)
            cache, first = _returned_cache(prompt_out), prompt_out.logits[:, -1:]  # (B/G, 1, V)
            del prompt_out
        for rows in order.tensor_split(min(chunks, B)):
            r = max(1, int(lengths[rows].max()))
            if G > 1:
                groups = rows // G
                rest = model(input_ids=response_ids[rows, :r], attention_mask=attention[rows, :P + r],
                             position_ids=position_ids[rows, P:P + r], use_cache=False,
                             **{_cache_kwarg(model): _cache_rows(cache, groups)}).logits[:, :-1]
                logits = torch.cat([first[groups], rest], 1)  # (c, r, V)
            else:
                s = int((prompt_mask[rows].sum(0) > 0).long().argmax())  # the slice's first prompt column in use
                input_ids = torch.cat([prompt_ids[rows, s:], response_ids[rows, :r]], 1)
                logits = model(input_ids=input_ids, attention_mask=attention[rows, s:P + r],
                               position_ids=position_ids[rows, s:P + r], **keep(r + 1)).logits[:, -r - 1:-1]
            pieces.append(torch.nn.functional.pad(logits.float(), (0, 0, 0, R - r)))
    logits = torch.cat(pieces)[torch.argsort(order)]
    return logits.div_(temperature) if temperature != 1.0 else logits


def _cache_rows(cache, index: Tensor):
    """A new cache of ``cache``'s class holding the rows ``index`` of each layer's keys and values (differentiable)."""
    rows = type(cache)()
    for layer, (keys, values, *_) in enumerate(cache):
        rows.update(keys[index], values[index], layer)
    return rows


def sampled_logprobs(logits: Tensor, response_ids: Tensor) -> Tensor:
    """log softmax(logits)[y] of the sampled tokens ``(B, R)``, as ``logits[y] − logsumexp(logits)``.

    The same numbers as ``log_softmax(logits).gather(y)`` (to ~1e-6) without a ``(B, R, V)`` log-softmax: the
    backward pass keeps only ``logits`` (which autograd holds for the log-softmax path as well).
    """
    return logits.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def token_logprobs(model, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
                   temperature: float = 1.0, autocast_dtype: torch.dtype | None = None,
                   group_size: int = 1, full: bool = True) -> tuple[Tensor, Tensor | None]:
    """``(logp, logprobs)``: log π of the response tokens ``(B, R)`` and the full log-probs ``(B, R, V)``.

    Both are float32 and differentiable through ``model`` (see :func:`response_logits`, shared prompt passes
    included); the full log-probs feed the analytic estimator, entropy and the forward-KL estimate. With
    ``full=False`` only ``logp`` is computed (:func:`sampled_logprobs`, no ``(B, R, V)`` log-softmax kept for the
    backward pass) and ``logprobs`` is None.
    """
    logits = response_logits(model, prompt_ids, prompt_mask, response_ids, response_mask, temperature,
                             autocast_dtype, group_size)
    if not full:
        return sampled_logprobs(logits, response_ids), None
    logprobs = torch.log_softmax(logits, -1)
    logp = logprobs.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    return logp, logprobs
