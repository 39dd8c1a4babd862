"""kl_lib.toy.literature: each published variant's identity, by enumeration."""

from __future__ import annotations

import pytest
import torch

from kl_lib.toy import TabularPolicy, literature

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("seed", [0, 1])
def test_literature_map_identities_hold_and_are_not_trivial(seed):
    g = torch.Generator().manual_seed(seed)
    pi, ref, mu = (TabularPolicy.random(3, 3, generator=g) for _ in range(3))
    table = literature.literature_map(pi, ref, mu).set_index("variant")
    assert (table["max |difference|"] < 1e-12).all()
    assert (table["max |right side|"] > 1e-2).all()
    rel = table["‖E[g] − G*‖ / ‖G*‖"]
    assert rel.iloc[0] < 1e-12  # Liu et al.: k1 in reward, unbiased
    assert (rel.iloc[1:] > 1e-2).all()  # M twice, and −∇CE(μ, π): biased
