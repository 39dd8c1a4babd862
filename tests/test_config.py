"""KLConfig validation: every bad input fails with an error that names the field and the valid values."""

import math

import pytest

from kl_lib.config import IMPORTANCE_WEIGHTINGS, PLACEMENTS, KLConfig, is_finite_number
from kl_lib.estimators import ESTIMATORS


def test_defaults_are_the_unbiased_configuration():
    cfg = KLConfig()
    assert (cfg.estimator, cfg.placement, cfg.beta, cfg.reward_to_go, cfg.importance_weighting) == (
        "k1", "reward", 1.0, False, "none")
    assert cfg.in_reward and not cfg.in_loss


@pytest.mark.parametrize(
    "field, value, valid",
    [("estimator", "k4", ESTIMATORS), ("estimator", None, ESTIMATORS), ("placement", "advantage", PLACEMENTS),
     ("importance_weighting", "seq", IMPORTANCE_WEIGHTINGS)],
)
def test_unknown_names_list_the_valid_values(field, value, valid):
    with pytest.raises(ValueError) as err:
        KLConfig(**{field: value})
    message = str(err.value)
    assert f"KLConfig.{field}" in message
    for name in valid:
        assert repr(name) in message


@pytest.mark.parametrize("beta", [-0.1, math.nan, math.inf, -math.inf, "0.1", True, None, 10**400, [0.1]])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="KLConfig.beta=.* must be a finite number ≥ 0"):
        KLConfig(beta=beta)


def test_beta_zero_and_integers_are_fine():
    assert KLConfig(beta=0).beta == 0
    assert KLConfig(beta=2).beta == 2


def test_reward_to_go_with_loss_placement_is_a_silent_no_op_so_it_is_refused():
    with pytest.raises(ValueError, match="reward_to_go"):
        KLConfig(placement="loss", reward_to_go=True)
    with pytest.raises(ValueError, match="reward_to_go"):
        KLConfig(reward_to_go=1)
    assert KLConfig(placement="both", reward_to_go=True).reward_to_go


@pytest.mark.parametrize("clamp", [0.0, -1.0, math.inf, math.nan, True, 10**400, "10"])
def test_bad_clamp(clamp):
    with pytest.raises(ValueError, match="KLConfig.log_ratio_clamp=.* must be a finite number > 0, or null"):
        KLConfig(log_ratio_clamp=clamp)


@pytest.mark.parametrize("value, finite", [(1, True), (-2.5, True), (10**400, False), (math.inf, False),
                                           (math.nan, False), (True, False), ("1", False), (None, False)])
def test_is_finite_number(value, finite):
    assert is_finite_number(value) is finite


def test_clamp_is_refused_for_the_analytic_estimator():
    with pytest.raises(ValueError, match="analytic"):
        KLConfig(estimator="analytic", log_ratio_clamp=10.0)


def test_names_and_labels_are_distinct_and_deterministic():
    configs = [KLConfig(e, p, importance_weighting=w) for e in ESTIMATORS for p in PLACEMENTS
               for w in IMPORTANCE_WEIGHTINGS]
    configs += [KLConfig("k1", "reward", reward_to_go=True), KLConfig("k3", "loss", log_ratio_clamp=10)]
    assert len({c.name for c in configs}) == len(configs)
    assert len({c.label for c in configs}) == len(configs)
    assert KLConfig("k3", "loss", importance_weighting="token").name == "k3-loss-tokenIS"
    assert KLConfig("k1", "reward").label == "k1 in reward"
    assert KLConfig("k3", "both").label == "k3 in reward+loss"


def test_configs_are_frozen_and_serialisable():
    cfg = KLConfig("k3", "loss", beta=0.1)
    with pytest.raises(AttributeError):
        cfg.beta = 1.0
    assert KLConfig(**cfg.to_dict()) == cfg
