"""Toy autoregressive policies over sequences of length T from a vocabulary of size V.

``TabularPolicy`` has one free logit vector per prefix, so it can represent *any* distribution over V^T
sequences: π(y) = Π_t softmax(logits[prefix(y_<t)])[y_t]. Its ``logits`` are ``(P, V)`` with
P = 1 + V + … + V^(T−1) rows: the empty prefix first, then all prefixes of length 1, then 2, …, each length in
lexicographic order (``itertools.product(range(V), repeat=len)``). The row of prefix (a_0..a_{t−1}) is therefore
``(V^t − 1)/(V − 1) + Σ_i a_i V^(t−1−i)``.

``MarkovPolicy`` ties parameters: ``logits`` are ``(T, V, V)`` and the logit of token v at position t is
``logits[t, y_{t−1}, v]`` (y_{−1} := 0, so only ``logits[0, 0]`` matters at t = 0). It is a TabularPolicy whose
rows at one depth depend only on the last token (``as_tabular``), and its exact quantities can be computed by
dynamic programming over (position, previous token) for T in the hundreds.

Both expose the same small interface used by ``kl_lib.toy.exact``: ``gather_logits(sequences, logits)`` returns the
``(N, T, V)`` logits that sequence n sees at each step, with the property that a sequence never reads the
same parameter row twice (which makes per-sequence gradients cheap, see ``kl_lib.toy.exact``).

Departure from the paper: the paper's toy model is a parametric binary autoregressive model; the tabular
policy is the fully expressive version and the Markov policy the long-horizon one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["TabularPolicy", "MarkovPolicy", "prefix_count"]


def prefix_count(vocab_size: int, length: int) -> int:
    """P = 1 + V + … + V^(T−1), the number of prefixes of length < T."""
    return sum(vocab_size**t for t in range(length))


class _Policy:
    logits: Tensor

    @property
    def vocab_size(self) -> int:
        return int(self.logits.shape[-1])

    @property
    def length(self) -> int:
        raise NotImplementedError

    def param_rows(self, sequences: Tensor) -> Tensor:
        """Row of ``logits.reshape(-1, V)`` read at each step, ``(N, T)``; distinct across t within a sequence."""
        raise NotImplementedError

    def gather_logits(self, sequences: Tensor, logits: Tensor | None = None) -> Tensor:
        """Logits seen by each sequence at each step, ``(N, T, V)``; ``logits`` overrides ``self.logits``."""
        logits = self.logits if logits is None else logits
        return logits.reshape(-1, self.vocab_size)[self.param_rows(sequences)]

    def with_logits(self, logits: Tensor):
        return type(self)(logits)

    def _check_sequences(self, sequences: Tensor) -> None:
        if sequences.ndim != 2 or sequences.shape[1] != self.length:
            raise ValueError(f"sequences must be (N, {self.length}), got {tuple(sequences.shape)}")

    def token_logprobs(self, sequences: Tensor, logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(logp, logprobs)``: sampled-token log-probs ``(N, T)`` and full log-probs ``(N, T, V)``."""
        self._check_sequences(sequences)
        logprobs = torch.log_softmax(self.gather_logits(sequences, logits), dim=-1)
        return logprobs.gather(-1, sequences.unsqueeze(-1)).squeeze(-1), logprobs

    def log_prob(self, sequences: Tensor) -> Tensor:
        """log π(y) for each sequence, ``(N,)``."""
        return self.token_logprobs(sequences)[0].sum(-1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``n`` sequences ``(n, T)`` autoregressively (LongTensor)."""
        seqs = torch.zeros(n, self.length, dtype=torch.long)
        for t in range(self.length):
            step_logits = self.gather_logits(seqs, None)[:, t]  # (n, V); only the prefix y_<t is read
            seqs[:, t] = torch.multinomial(torch.softmax(step_logits.double(), -1), 1, generator=generator)[:, 0]
        return seqs

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, length={self.length}, dtype={self.logits.dtype})"


class TabularPolicy(_Policy):
    """Autoregressive softmax policy with one free logit vector per prefix; ``logits`` is ``(P, V)``."""

    def __init__(self, logits: Tensor):
        if not isinstance(logits, Tensor) or logits.ndim != 2 or not logits.is_floating_point():
            raise ValueError("TabularPolicy logits must be a float tensor of shape (P, V)")
        num_rows, vocab = logits.shape
        if vocab < 1:
            raise ValueError("TabularPolicy needs a vocabulary of at least one token")
        length, total = 0, 0
        while total < num_rows:
            total += vocab**length
            length += 1
        if total != num_rows or length == 0:
            raise ValueError(
                f"TabularPolicy logits have {num_rows} rows, which is not 1 + V + … + V^(T−1) for V={vocab}; "
                f"e.g. T=3 needs {prefix_count(vocab, 3)} rows"
            )
        self.logits = logits
        self._length = length
        # Row offset of the first prefix of each length t, and the place value of each position.
        self._offsets = torch.tensor([prefix_count(vocab, t) for t in range(length)], dtype=torch.long)

    @property
    def length(self) -> int:
        return self._length

    @classmethod
    def random(cls, vocab_size: int, length: int, scale: float = 1.0, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float64) -> "TabularPolicy":
        """Logits i.i.d. N(0, scale²)."""
        if vocab_size < 1 or length < 1:
            raise ValueError(f"need vocab_size ≥ 1 and length ≥ 1, got {vocab_size}, {length}")
        rows = prefix_count(vocab_size, length)
        return cls(scale * torch.randn(rows, vocab_size, generator=generator, dtype=dtype))

    def param_rows(self, sequences: Tensor) -> Tensor:
        """Row of ``logits`` used at each step, ``(N, T)``: the row of the prefix y_<t."""
        V, T = self.vocab_size, self.length
        rows = torch.empty_like(sequences)
        code = torch.zeros(sequences.shape[0], dtype=torch.long)
        for t in range(T):
            rows[:, t] = self._offsets[t] + code
            code = code * V + sequences[:, t]
        return rows


class MarkovPolicy(_Policy):
    """Autoregressive policy whose step-t logits depend on (t, y_{t−1}) only; ``logits`` is ``(T, V, V)``."""

    def __init__(self, logits: Tensor):
        if not isinstance(logits, Tensor) or logits.ndim != 3 or not logits.is_floating_point():
            raise ValueError("MarkovPolicy logits must be a float tensor of shape (T, V, V)")
        if logits.shape[1] != logits.shape[2] or logits.shape[0] < 1:
            raise ValueError(f"MarkovPolicy logits must be (T, V, V) with T ≥ 1, got {tuple(logits.shape)}")
        self.logits = logits

    @property
    def length(self) -> int:
        return int(self.logits.shape[0])

    @classmethod
    def random(cls, vocab_size: int, length: int, scale: float = 1.0, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float64) -> "MarkovPolicy":
        """Logits i.i.d. N(0, scale²)."""
        if vocab_size < 1 or length < 1:
            raise ValueError(f"need vocab_size ≥ 1 and length ≥ 1, got {vocab_size}, {length}")
        return cls(scale * torch.randn(length, vocab_size, vocab_size, generator=generator, dtype=dtype))

    @staticmethod
    def previous_tokens(sequences: Tensor) -> Tensor:
        """y_{t−1} for each step, ``(N, T)``, with y_{−1} = 0."""
        return torch.nn.functional.pad(sequences[:, :-1], (1, 0), value=0)

    def param_rows(self, sequences: Tensor) -> Tensor:
        positions = torch.arange(self.length).expand_as(sequences)
        return positions * self.vocab_size + self.previous_tokens(sequences)

    def as_tabular(self) -> TabularPolicy:
        """The same distribution as a TabularPolicy (rows tied); for tests and small V**T only."""
        V, T = self.vocab_size, self.length
        rows = []
        for t in range(T):
            if t == 0:
                rows.append(self.logits[0, 0].unsqueeze(0))
            else:
                last = torch.arange(V**t) % V  # last token of each length-t prefix in lexicographic order
                rows.append(self.logits[t, last])
        return TabularPolicy(torch.cat(rows, 0))

    def num_sequences(self) -> int:
        return self.vocab_size**self.length


def _same_shape(policy: _Policy, other: _Policy, what: str) -> None:
    if type(policy) is not type(other) or policy.logits.shape != other.logits.shape:
        raise ValueError(
            f"{what} must be a {type(policy).__name__} with logits of shape {tuple(policy.logits.shape)}, "
            f"got {type(other).__name__} {tuple(other.logits.shape)}"
        )


def check_compatible(policy: _Policy, ref: _Policy, behavior: _Policy | None = None) -> None:
    """Raise a ValueError unless policy, ref (and behavior) are the same kind with the same shape."""
    _same_shape(policy, ref, "ref")
    if behavior is not None:
        _same_shape(policy, behavior, "behavior")
    if not math.isfinite(float(policy.logits.detach().abs().max())):
        raise ValueError("policy logits contain NaN or Inf")
