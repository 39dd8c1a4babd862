"""Schulman's Gaussian experiment: bias and spread of the KL estimators k1, k2, k3, by Monte Carlo and exactly.

Setting (J. Schulman, "Approximating KL divergence", 2020). Samples x ~ q = N(0, 1), reference p = N(μ, 1),
target KL(q ‖ p) = μ²/2. In the notation of docs/contract.md q plays π_θ and p plays π_ref, so that

    logp = log q(x),   ref_logp = log p(x),   δ = logp − ref_logp = −log r,   r = p(x)/q(x) = ρ,

and the estimators are computed by ``kl_lib.estimators`` (no second copy here):

    k1 = −log r = δ,   k2 = ½ (log r)² = ½ δ²,   k3 = (r − 1) − log r = expm1(−δ) + δ.

Closed forms. For x ~ N(0, 1), z := log r = μx − μ²/2 ~ N(m, s²) with m = −μ²/2, s² = μ². Gaussian moments
give E[e^z] = e^{m+s²/2} = 1, E[e^{2z}] = e^{2m+2s²} = e^{μ²}, E[z e^z] = (m + s²) e^{m+s²/2} = μ²/2,
Var(z²) = 2s⁴ + 4m²s², hence, with KL = μ²/2,

    k1:  E = KL,                   Var = μ²                    std/KL = 2/μ
    k2:  E = ½(μ² + μ⁴/4),         Var = μ⁴/2 + μ⁶/4           bias/KL = μ²/4,  std/KL = √(2 + μ²)
    k3:  E = KL (E[r − 1] = 0),    Var = e^{μ²} − 1 − μ²       std/KL = 2 √(e^{μ²} − 1 − μ²) / μ²

(Var k3 = Var r + Var z − 2 Cov(r, z) = (e^{μ²} − 1) + μ² − 2μ².)

Monte Carlo standard errors, for N i.i.d. samples with sample standard deviation s and sample fourth central
moment m₄: SE(mean) = s/√N, and by the delta method SE(s) ≈ √((m₄ − s⁴) / (4 N s²)). Both are divided by KL.

Departure from Schulman's blog: float64 instead of float32, every Monte Carlo number carries its standard
error, and the closed forms above are given beside them. His published table is the constant
``SCHULMAN_PUBLISHED``, with the rounding of each printed number.
"""

from __future__ import annotations

import math
from typing import Sequence

import pandas as pd
import torch
from torch import Tensor

from kl_lib.estimators import k1, k2, k3

__all__ = [
    "ESTIMATOR_NAMES",
    "SCHULMAN_PUBLISHED",
    "log_densities",
    "sample_estimates",
    "closed_form_table",
    "monte_carlo_table",
    "compare_with_published",
]

ESTIMATOR_NAMES: tuple[str, ...] = ("k1", "k2", "k3")

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _published() -> pd.DataFrame:
    # Printed strings as in the blog; the rounding half-width is half a unit of the last printed digit, except
    # that a printed "0" bias (k1, k3: unbiased by construction) is taken as exactly 0.
    rows = [
        (0.1, "k1", "0", "20"), (0.1, "k2", "0.002", "1.42"), (0.1, "k3", "0", "1.42"),
        (1.0, "k1", "0", "2.0"), (1.0, "k2", "0.25", "1.73"), (1.0, "k3", "0", "1.70"),
    ]

    def half_unit(printed: str) -> float:
        if printed == "0":
            return 0.0
        decimals = len(printed.split(".")[1]) if "." in printed else 0
        return 0.5 * 10.0**-decimals

    return pd.DataFrame(
        [
            {"mu": mu, "true_kl": mu**2 / 2, "estimator": name,
             "bias_over_true": float(b), "bias_rounding": half_unit(b),
             "std_over_true": float(s), "std_rounding": half_unit(s)}
            for mu, name, b, s in rows
        ]
    )


SCHULMAN_PUBLISHED: pd.DataFrame = _published()
"""Schulman's table: one row per (μ, estimator) with published ``bias_over_true`` and ``std_over_true`` and the
half-width of their rounding (``bias_rounding``, ``std_rounding``)."""


def _check_mu(mu: float) -> float:
    mu = float(mu)
    if not math.isfinite(mu) or mu == 0.0:
        raise ValueError(f"mu must be finite and non-zero (KL = mu²/2 divides every ratio), got {mu!r}")
    return mu


def log_densities(x: Tensor, mu: float) -> tuple[Tensor, Tensor]:
    """``(logp, ref_logp)`` = (log N(x; 0, 1), log N(x; μ, 1)), elementwise, same shape as ``x``."""
    mu = _check_mu(mu)
    return -0.5 * x.square() - _LOG_SQRT_2PI, -0.5 * (x - mu).square() - _LOG_SQRT_2PI


def _estimates(mu: float, num_samples: int, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
    if not isinstance(num_samples, int) or num_samples < 2:
        raise ValueError(f"num_samples must be an integer ≥ 2 (a standard error needs two samples), got {num_samples!r}")
    x = torch.randn(num_samples, generator=generator, dtype=torch.float64)  # x ~ q = N(0, 1)
    logp, ref_logp = log_densities(x, mu)
    return x, {"k1": k1(logp, ref_logp), "k2": k2(logp, ref_logp), "k3": k3(logp, ref_logp)}


def sample_estimates(mu: float, num_samples: int, generator: torch.Generator) -> pd.DataFrame:
    """Draw x ~ N(0, 1) and evaluate every estimator at each sample.

    Returns:
        A DataFrame with ``num_samples`` rows and columns ``x``, ``log_r`` (= log p(x)/q(x) = −δ), ``k1``,
        ``k2``, ``k3``.
    """
    x, ks = _estimates(mu, num_samples, generator)
    return pd.DataFrame({"x": x.numpy(), "log_r": (-ks["k1"]).numpy(), **{n: v.numpy() for n, v in ks.items()}})


def closed_form_table(mus: Sequence[float] = (0.1, 1.0)) -> pd.DataFrame:
    """Exact ``bias_over_true`` and ``std_over_true`` of k1, k2, k3 (module docstring), one row per (μ, estimator)."""
    rows = []
    for mu in map(_check_mu, mus):
        m2 = mu * mu
        exact = {
            "k1": (0.0, 2.0 / abs(mu)),
            "k2": (m2 / 4.0, math.sqrt(2.0 + m2)),
            "k3": (0.0, 2.0 * math.sqrt(math.expm1(m2) - m2) / m2),
        }
        for name, (bias, std) in exact.items():
            rows.append({"mu": mu, "true_kl": m2 / 2, "estimator": name, "bias_over_true": bias, "std_over_true": std})
    return pd.DataFrame(rows)


def monte_carlo_table(mus: Sequence[float], num_samples: int, generator: torch.Generator) -> pd.DataFrame:
    """Monte Carlo ``bias_over_true`` and ``std_over_true`` of k1, k2, k3 with their standard errors.

    Args:
        mus: means μ of the reference p = N(μ, 1); the true KL is μ²/2.
        num_samples: samples x ~ N(0, 1) per μ (drawn afresh for each μ, in order, from ``generator``).
        generator: the only source of randomness.

    Returns:
        One row per (μ, estimator): ``mu``, ``true_kl``, ``estimator``, ``bias_over_true``,
        ``bias_over_true_se``, ``std_over_true``, ``std_over_true_se``, ``num_samples``.
    """
    rows = []
    for mu in map(_check_mu, mus):
        true_kl = mu * mu / 2
        _, ks = _estimates(mu, num_samples, generator)
        for name in ESTIMATOR_NAMES:
            k = ks[name]
            mean = k.mean()
            centred = k - mean
            var = centred.square().sum() / (num_samples - 1)
            m4 = centred.pow(4).mean()
            std = var.sqrt()
            std_se = ((m4 - var.square()).clamp_min(0.0) / (4 * num_samples * var)).sqrt()
            rows.append({
                "mu": mu, "true_kl": true_kl, "estimator": name,
                "bias_over_true": float((mean - true_kl) / true_kl),
                "bias_over_true_se": float(std / math.sqrt(num_samples) / true_kl),
                "std_over_true": float(std / true_kl),
                "std_over_true_se": float(std_se / true_kl),
                "num_samples": num_samples,
            })
    return pd.DataFrame(rows)


def compare_with_published(table: pd.DataFrame, num_se: float = 5.0) -> pd.DataFrame:
    """Hold a ``monte_carlo_table`` against ``SCHULMAN_PUBLISHED``.

    An entry agrees when |ours − published| ≤ ``num_se``·SE(ours) + the rounding half-width of the published
    number. Only the (μ, estimator) rows present in both tables are compared.

    Returns:
        One row per (μ, estimator) and quantity (``bias_over_true``, ``std_over_true``): ``ours``, ``se``,
        ``published``, ``difference``, ``tolerance``, ``agrees``.
    """
    merged = table.merge(SCHULMAN_PUBLISHED, on=["mu", "estimator"], suffixes=("", "_published"))
    if merged.empty:
        raise ValueError("no (mu, estimator) rows in common with SCHULMAN_PUBLISHED (published mus are 0.1 and 1.0)")
    rows = []
    for _, r in merged.iterrows():
        for quantity, rounding in (("bias_over_true", "bias_rounding"), ("std_over_true", "std_rounding")):
            ours, published, se = r[quantity], r[f"{quantity}_published"], r[f"{quantity}_se"]
            tolerance = num_se * se + r[rounding]
            rows.append({
                "true_kl": r["true_kl"], "estimator": r["estimator"], "quantity": quantity,
                "ours": ours, "se": se, "published": published, "difference": ours - published,
                "tolerance": tolerance, "agrees": abs(ours - published) <= tolerance,
            })
    return pd.DataFrame(rows)
