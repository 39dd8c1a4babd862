"""Rollouts with ``transformers.generate`` and the per-token log-probs the trainer differentiates.

Shapes: B sequences, P prompt tokens (left-padded), R response tokens (right-padded after the first EOS).

* :func:`generate` samples responses at a given temperature (no top-k/top-p/min-p: the plain tempered softmax,
  as the paper samples) and returns the sampler's own log-probs of the sampled tokens, ``behavior_logp``
  ``(B, R)``, computed from the raw logits ``generate`` reports: they are the behaviour policy μ for
  importance weights and PPO ratios.
* :func:`token_logprobs` recomputes log π(y_t | s_t) with one forward pass over prompt + response, with
  position ids taken from the attention mask (cumsum − 1), so left padding changes nothing: a test holds it
  against the sampler's log-probs to 1e-5.

Sampling randomness comes from ``torch``'s global generator inside :func:`torch.random.fork_rng`, seeded per
call: a rollout is a pure function of (weights, prompts, seed), which makes resumed runs identical.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Rollout", "concat_rollouts", "generate", "response_mask", "token_logprobs"]


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
            cache = model(input_ids=prompt_ids[::G, :-1], attention_mask=head, position_ids=positions,
                          use_cache=True).past_key_values
            cache.batch_repeat_interleave(G)
            prefix = {"past_key_values": cache}  # generate's name for a prefix cache
        out = model.generate(
            input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True,
            temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            output_logits=True, return_dict_in_generate=True, **prefix,
        )
    model.train(was_training)
    response_ids = out.sequences[:, prompt_ids.shape[1]:]  # (B, R)
    logits = torch.stack(out.logits, 1).float() / temperature  # (B, R, V) raw logits of each step
    logp = torch.log_softmax(logits, -1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    mask, finished = response_mask(response_ids, tokenizer.eos_token_id)
    response_ids = response_ids.masked_fill(~mask, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, response_ids, mask, finished,
                   logp.masked_fill(~mask, 0.0), texts)


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


@functools.lru_cache(maxsize=8)
def _cache_kwarg_of(forward) -> str:
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _cache_kwarg(model) -> str:
    """Name of the forward argument that takes a KV cache (``cache`` in recent transformers)."""
    return _cache_kwarg_of(type(model).forward)


def token_logprobs(model, prompt_ids: Tensor, prompt_mask: Tensor, response_ids: Tensor, response_mask: Tensor,
                   temperature: float = 1.0, autocast_dtype: torch.dtype | None = None,
                   group_size: int = 1) -> tuple[Tensor, Tensor]:
    """``(logp, logprobs)``: log π of the response tokens ``(B, R)`` and the full log-probs ``(B, R, V)``.

    Both are float32 and differentiable through ``model``; the full log-probs feed the analytic estimator,
    entropy and the forward-KL estimate. When the batch is groups of ``group_size`` samples of the same prompt
    (as a rollout is), each prompt is encoded once and its key/value cache shared by the group (gradients
    flow through the shared prompt pass, summed over the group): the same numbers for a fraction of the work.
    """
    attention = torch.cat([prompt_mask.long(), response_mask.long()], 1)  # (B, P + R)
    position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
    P = prompt_ids.shape[1]
    # Gradient checkpointing (in training mode, with grad) drops KV caches, so the shared prompt pass is off there.
    checkpointing = torch.is_grad_enabled() and model.training and any(
        getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    with _autocast(model, autocast_dtype):
        if not checkpointing and _shared_prompt_groups(prompt_ids, prompt_mask, group_size):
            G = group_size
            prompt_out = model(input_ids=prompt_ids[::G], attention_mask=prompt_mask[::G].long(),
                               position_ids=position_ids[::G, :P], use_cache=True)
            cache = prompt_out.past_key_values
            cache.batch_repeat_interleave(G)  # (B/G, …) -> (B, …), differentiable
            first = prompt_out.logits[:, -1:].repeat_interleave(G, 0)  # distribution of the first response token
            rest = model(input_ids=response_ids, attention_mask=attention, position_ids=position_ids[:, P:],
                         use_cache=False, **{_cache_kwarg(model): cache}).logits[:, :-1]
            logits = torch.cat([first, rest], 1)
        else:
            input_ids = torch.cat([prompt_ids, response_ids], 1)
            logits = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids).logits[:, P - 1: -1]
    logits = logits.float() / temperature  # (B, R, V): the distribution of each response token
    logprobs = torch.log_softmax(logits, -1)
    logp = logprobs.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    return logp, logprobs
