"""Evaluation of a model on the held-out splits: greedy accuracy, pass@1 and pass@k at temperature 1.

For each problem i we draw n samples (temperature 1, plain softmax, as the paper evaluates) and count the
correct ones c_i. Then

    pass@1  = mean_i c_i / n                                   (the paper's metric)
    pass@k  = mean_i [1 − C(n − c_i, k) / C(n, k)]             (unbiased, Chen et al. 2021), k ≤ n
    greedy  = mean_i 1[greedy completion correct]

:func:`evaluate_path` caches a model directory's results in a JSON file under a key made of the model files'
digest, the evaluation settings and the problems, so they are recomputed only when one of them changes (a run
directory's checkpoints are evaluated by ``kl_lib.rl.checkpoints.evaluate_run`` with the same keys).

Departure from the paper: MATH500 / MMLU subsets are replaced by the arithmetic ``id_test`` / ``ood_test``
splits; min-p sampling is not used.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kl_lib.files import config_digest, file_digest, write_json
from kl_lib.lm.models import encode_prompts, load_model, load_tokenizer, quiet_progress_bars
from kl_lib.tasks import Problem, Task, get_task, problems_digest

__all__ = ["EvalSettings", "data_key", "evaluate_model", "evaluate_path", "evaluate_splits", "greedy_accuracy",
           "load_for_eval", "load_splits", "model_digest", "pass_at_k", "response_statistics"]


@dataclass(frozen=True)
class EvalSettings:
    num_samples: int = 8
    """Samples per problem for pass@1 / pass@k (temperature 1)."""
    max_new_tokens: int = 6
    seed: int = 1234
    batch_size: int = 512
    splits: tuple[str, ...] = ("id_test", "ood_test")
    task: str = "arithmetic"
    """The registered task whose splits and reward are used (``kl_lib.tasks``)."""
    temperature: float = 1.0
    """Sampling temperature of pass@k (the paper evaluates at 1.0)."""
    max_problems: int = 0
    """Evaluate the first N problems of each split (they are drawn i.i.d., so the first N are a random sample);
    0 = all. Left out of :meth:`key` at 0, so evaluations made before the field existed keep their cache."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_problems, int) or self.max_problems < 0:
            raise ValueError(f"EvalSettings.max_problems={self.max_problems!r} must be an integer ≥ 0 (0 = every problem)")

    def key(self) -> str:
        fields = asdict(self)
        if not self.max_problems:
            del fields["max_problems"]
        return config_digest(fields)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (1 − C(n−c, k)/C(n, k))."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 ≤ c ≤ n and 1 ≤ k ≤ n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _encode(tokenizer, problems: list[Problem], device) -> dict[str, torch.Tensor]:
    ids, mask = encode_prompts(tokenizer, [p.prompt for p in problems], device)
    return {"input_ids": ids, "attention_mask": mask}


def _score(tokenizer, problems: list[Problem], responses: torch.Tensor, task: Task) -> list[float]:
    out = []
    for p, row in zip(problems, responses):
        finished = bool((row == tokenizer.eos_token_id).any())
        out.append(task.reward(tokenizer.decode(row, skip_special_tokens=True), p, finished))
    return out


@torch.no_grad()
def greedy_accuracy(model, tokenizer, problems: list[Problem], max_new_tokens: int = 6, batch_size: int = 512,
                    task: str = "arithmetic") -> float:
    """Fraction of problems whose greedy completion earns reward 1."""
    model.eval()
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(problems), batch_size):
        batch = problems[start: start + batch_size]
        enc = _encode(tokenizer, batch, device)
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        scores += _score(tokenizer, batch, out[:, enc["input_ids"].shape[1]:], get_task(task))
    return sum(scores) / max(len(scores), 1)


@torch.no_grad()
def evaluate_model(model, tokenizer, problems: list[Problem], settings: EvalSettings = EvalSettings()
                   ) -> dict[str, Any]:
    """Greedy accuracy, pass@1 and pass@k (k = 1, 2, 4, …, n) over ``problems``, overall and per skill."""
    model.eval()
    device = next(model.parameters()).device
    task = get_task(settings.task)
    n = settings.num_samples
    greedy, correct = [], []
    gen = dict(max_new_tokens=settings.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id)
    per_batch = max(1, settings.batch_size // n)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        for start in range(0, len(problems), per_batch):
            batch = problems[start: start + per_batch]
            enc = _encode(tokenizer, batch, device)
            width = enc["input_ids"].shape[1]
            out = model.generate(**enc, do_sample=False, **gen)
            greedy += _score(tokenizer, batch, out[:, width:], task)
            out = model.generate(**enc, do_sample=True, temperature=settings.temperature, top_k=0, top_p=1.0,
                                 num_return_sequences=n, **gen)
            scores = _score(tokenizer, [p for p in batch for _ in range(n)], out[:, width:], task)
            correct += [int(sum(scores[i * n: (i + 1) * n])) for i in range(len(batch))]
    ks = [k for k in (1, 2, 4, 8, 16, 32) if k <= n]

    def summary(idx: list[int]) -> dict[str, float]:
        return {"n_problems": len(idx), "greedy": sum(greedy[i] for i in idx) / max(len(idx), 1),
                **{f"pass@{k}": sum(pass_at_k(n, correct[i], k) for i in idx) / max(len(idx), 1) for k in ks}}

    result = summary(list(range(len(problems))))
    skills = sorted({p.skill for p in problems})
    if len(skills) > 1:
        result["by_skill"] = {s: summary([i for i, p in enumerate(problems) if p.skill == s]) for s in skills}
    result["correct_counts"] = correct  # per problem, for bootstrap confidence intervals
    return result


@torch.no_grad()
def response_statistics(model, tokenizer, problems: list[Problem], max_new_tokens: int, num_samples: int = 4,
                        seed: int = 0, temperature: float = 1.0, batch_size: int = 512) -> dict[str, float]:
    """How long and how random a model's sampled responses are: what the study's KL blow-up threshold is read from.

    For each of ``num_samples`` responses per problem (temperature ``temperature``, end-of-sequence counted as a
    token, as the trainer's response mask does): its length T and its *sequence entropy*
    Σ_t H(π(·|s_t)) summed along the sampled path. By the chain rule the mean of the latter over samples is an
    unbiased estimate of the entropy H(π(·|x)) of the whole response, averaged over prompts. Returns
    ``median_length``, ``mean_length``, ``sequence_entropy`` (nats per response), ``token_entropy`` (nats per
    token, Σ H / Σ T), ``finished_fraction`` and ``n_responses``.
    """
    model.eval()
    device = next(model.parameters()).device
    lengths: list[torch.Tensor] = []
    entropies: list[torch.Tensor] = []
    finished: list[torch.Tensor] = []
    per_batch = max(1, batch_size // num_samples)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(problems), per_batch):
            enc = _encode(tokenizer, problems[start: start + per_batch], device)
            out = model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 num_return_sequences=num_samples, max_new_tokens=max_new_tokens,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                 output_scores=True, return_dict_in_generate=True)
            response = out.sequences[:, enc["input_ids"].shape[1]:]
            is_eos = (response == tokenizer.eos_token_id).int()
            mask = (is_eos.cumsum(-1) - is_eos) == 0  # tokens up to and including the first EOS
            logp = torch.stack(out.scores, dim=1).float().log_softmax(-1)  # (N, T, V), scores already / temperature
            token_entropy = -(logp.exp() * logp).nan_to_num().sum(-1)  # (N, T)
            lengths.append(mask.sum(-1))
            entropies.append((token_entropy * mask).sum(-1))
            finished.append(is_eos.any(-1))
    length, entropy = torch.cat(lengths).double(), torch.cat(entropies).double()
    return {"median_length": float(length.median()), "mean_length": float(length.mean()),
            "sequence_entropy": float(entropy.mean()), "token_entropy": float(entropy.sum() / length.sum()),
            "finished_fraction": float(torch.cat(finished).double().mean()), "n_responses": int(length.numel())}


def load_for_eval(path: str | Path, device: str | torch.device = "cpu"):
    """``(model, tokenizer)`` from a model directory, or from a LoRA adapter directory (merged onto its base)."""
    path = Path(path)
    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        with quiet_progress_bars():
            model = AutoPeftModelForCausalLM.from_pretrained(str(path)).merge_and_unload().to(device)
    else:
        model = load_model(path, device=device)
    return model, load_tokenizer(path)


def model_digest(path: str | Path) -> str:
    """Digest of a model directory's weight files (safetensors / bin), so a cache can tell checkpoints apart."""
    files = sorted(p for p in Path(path).iterdir() if p.suffix in (".safetensors", ".bin"))
    if not files:
        raise FileNotFoundError(f"no weight files in {path}")
    return hashlib.sha256("".join(f"{p.name}:{file_digest(p)[:16]}" for p in files).encode()).hexdigest()[:16]


def evaluate_path(model_path: str | Path, data_dir: str | Path, cache: str | Path,
                  settings: EvalSettings = EvalSettings(), device: str | torch.device = "cpu") -> dict[str, Any]:
    """Evaluate a model directory on the settings' splits, cached in the JSON file ``cache``."""
    cache = Path(cache)
    splits = load_splits(settings, data_dir)
    key = f"{model_digest(model_path)}-{settings.key()}-{data_key(splits)}"
    cached = json.loads(cache.read_text()) if cache.exists() else {}
    if cached.get("key") == key:
        return cached
    model, tokenizer = load_for_eval(model_path, device)
    record = {"key": key, "model": str(model_path), "settings": asdict(settings),
              "results": evaluate_splits(model, tokenizer, splits, settings)}
    write_json(cache, record)
    return json.loads(cache.read_text())  # the same object a cache hit returns


def evaluate_splits(model, tokenizer, splits: dict[str, list[Problem]], settings: EvalSettings) -> dict[str, Any]:
    """``{split: evaluate_model(...)}`` for each split's problems."""
    return {split: evaluate_model(model, tokenizer, problems, settings) for split, problems in splits.items()}


def load_splits(settings: EvalSettings, data_dir: str | Path | None) -> dict[str, list[Problem]]:
    """The settings' task's evaluation splits, by name (from ``data_dir``, or the task's default)."""
    task = get_task(settings.task)
    splits = {split: task.load_split(split, str(data_dir) if data_dir else None) for split in settings.splits}
    return {split: problems[: settings.max_problems or None] for split, problems in splits.items()}


def data_key(splits: dict[str, list[Problem]]) -> str:
    """A digest of the problems of every split: part of each cached result's key."""
    return hashlib.sha256("".join(problems_digest(p) for p in splits.values()).encode()).hexdigest()[:12]

