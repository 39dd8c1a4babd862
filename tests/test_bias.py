"""kl_lib.toy.bias: exact bias/variance/cosine tables and the length and staleness sweeps."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from kl_lib.toy import bias, exact
from kl_lib.config import KLConfig

UNBIASED = {"k1 in reward", "k1 in reward (reward-to-go)", "k3 in reward+loss", "analytic in reward+loss"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind,vocab_size,length", [("tabular", 2, 4), ("markov", 3, 5)])
def test_gradient_table_reproduces_design_table(kind, vocab_size, length):
    gen = torch.Generator().manual_seed(0)
    policy, ref = bias.perturbed_pair(kind, vocab_size, length, scale=1.0, ref_noise=0.5, generator=gen)
    table = bias.gradient_table(policy, ref, bias.figure2_configs()).set_index("config")
    assert (table.loc[sorted(UNBIASED), "rel_bias"] < 1e-10).all()
    assert table.loc["k1 in loss", "grad_norm"] < 1e-12 and math.isnan(table.loc["k1 in loss", "cos_reverse"])
    assert table.loc["k3 in loss", "rel_dist_myopic_forward"] < 1e-10
    assert (table.loc[["k2 in loss", "analytic in loss"], "rel_dist_myopic_reverse"] < 1e-10).all()
    assert table.loc["k3 in reward", "rel_bias"] > 0.1
    assert (table["variance"] > 0).all()


def test_variance_is_exact_below_the_cap_and_nan_above():
    """The enumeration cap applies to TabularPolicy (and to sequence weights off-policy); a MarkovPolicy has DP."""
    gen = torch.Generator().manual_seed(1)
    policy, ref = bias.perturbed_pair("tabular", 2, 6, scale=1.0, ref_noise=0.5, generator=gen)
    config = KLConfig("k3", "loss")
    assert bias.grad_variance(policy, ref, config) == pytest.approx(exact.kl_grad_variance(policy, ref, config))
    assert math.isnan(bias.grad_variance(policy, ref, config, max_sequences=2**5))
    markov, markov_ref = bias.perturbed_pair("markov", 2, 6, scale=1.0, ref_noise=0.5, generator=gen)
    assert bias.grad_variance(markov, markov_ref, config, max_sequences=2**5) == pytest.approx(
        exact.kl_grad_variance(markov, markov_ref, config, method="enumerate"))
    seq_is = KLConfig("k1", "reward", importance_weighting="sequence")
    assert math.isnan(bias.grad_variance(markov, markov_ref, seq_is, markov_ref, max_sequences=2**5))


def test_cosine():
    a = torch.tensor([[1.0, 2.0], [3.0, -1.0]], dtype=torch.float64)
    assert bias.cosine(a, a) == pytest.approx(1.0)
    assert bias.cosine(a, -2 * a) == pytest.approx(-1.0)
    assert math.isnan(bias.cosine(a, torch.zeros_like(a)))


def test_perturbed_pair_is_deterministic_and_checks_kind():
    make = lambda: bias.perturbed_pair("tabular", 2, 3, scale=1.0, ref_noise=0.3,
                                       generator=torch.Generator().manual_seed(bias.pair_seed(4, 3)))
    (p1, r1), (p2, r2) = make(), make()
    assert_close(p1.logits, p2.logits) and assert_close(r1.logits, r2.logits)
    assert 0.1 < float((r1.logits - p1.logits).std()) < 0.6
    with pytest.raises(ValueError, match="kind"):
        bias.perturbed_pair("gaussian", 2, 3, scale=1.0, ref_noise=0.3, generator=torch.Generator())


def test_sweep_lengths_shape():
    configs = bias.figure2_configs()[:3]
    df = bias.sweep_lengths("tabular", 2, [1, 3], [0, 1], configs, max_variance_sequences=4)
    assert len(df) == 2 * 2 * 3
    assert df.loc[df["T"] == 1, "variance"].notna().all() and df.loc[df["T"] == 3, "variance"].isna().all()
    assert set(df["config"]) == {c.label for c in configs}


def test_sweep_staleness_importance_weighting_identities():
    df = bias.sweep_staleness("markov", 3, 4, [0.0, 0.5], [0], bias.offpolicy_configs())
    on = df[df["staleness"] == 0].set_index("config")
    off = df[df["staleness"] == 0.5].set_index("config")
    assert on.loc["k1 in reward", "rel_bias"] < 1e-10 and off.loc["k1 in reward", "rel_bias"] > 1e-3
    assert off.loc["k1 in reward (sequence IS)", "rel_bias"] < 1e-10
    assert off.loc["k3 in loss (token IS)", "rel_dist_myopic_reverse"] < 1e-10
    assert off.loc["k1 in loss (token IS)", "rel_dist_myopic_reverse"] < 1e-10
    assert off.loc["k3 in loss (sequence IS)", "rel_dist_myopic_forward"] < 1e-10  # F at π's own states
    assert on["kl_behavior"].max() == 0 and off["kl_behavior"].min() > 0
