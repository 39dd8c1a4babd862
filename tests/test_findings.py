"""The findings' definitions and verdict rules on synthetic run tables: every verdict branch of F1–F3 is
reachable and gives the verdict the rule in kl_lib.study.findings says it should."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from kl_lib.study import findings as fnd
from kl_lib.study import stats
from kl_lib.study.tables import RunTables

P = 60  # problems per split
STEPS = 40  # steps per synthetic run (window W = 4)
ON_LABELS = [("k1 in reward", 0.1), ("k1 in reward", 0.5), ("k1 in loss", 0.1), ("k1 in loss", 0.5),
             ("k3 in reward", 0.1), ("k3 in reward", 0.5), ("k3 in loss", 0.1), ("k3 in loss", 0.5),
             ("k3 in reward+loss", 0.1), ("k3 in reward+loss", 0.5), ("no KL", 0.0)]
OFF_LABELS = [("no KL", 0.0), ("k1 in reward", 0.1), ("k3 in loss", 0.1), ("k1 in loss", 0.1),
              ("k3 in loss (token IS)", 0.1)]


def steady(level=0.5):
    return np.full(STEPS, level)


def collapsing(level=0.5):
    r = np.full(STEPS, level)
    r[STEPS // 2:] = 0.05  # sustained: far below half of the running peak
    return r


def run_spec(label, beta, seed, setting="on-policy", lag=0, reward=None, kl=0.1, acc=(0.5, 0.3), diverged=False,
             minibatches=1):
    return dict(label=label, beta=beta, seed=seed, setting=setting, async_lag=lag, ppo_minibatches=minibatches,
                policy_loss="reinforce" if setting == "on-policy" else "ppo",
                reward=steady() if reward is None else reward, kl=kl, acc=acc, diverged=diverged)


def make_tables(specs, seed=0):
    """A RunTables from run specs: metrics from the reward curve and a constant KL, per-problem scores drawn
    around each split's target accuracy (one draw per run)."""
    rng = np.random.default_rng(seed)
    results, metrics = [], []
    scores = {"id_test": {}, "ood_test": {}}
    difficulty = {s: rng.uniform(-0.2, 0.2, P) for s in scores}
    for i, s in enumerate(specs):
        run = f"run{i}"
        n = STEPS if not s["diverged"] else STEPS // 2
        results.append({"run": run, "setting": s["setting"], "label": s["label"], "beta": s["beta"],
                        "seed": s["seed"], "async_lag": s["async_lag"], "policy_loss": s["policy_loss"],
                        "ppo_minibatches": s["ppo_minibatches"],
                        "steps": STEPS, "status": "diverged" if s["diverged"] else "done", "diverged": s["diverged"],
                        "evaluated": not s["diverged"], "scored_as_zero": s["diverged"]})
        kl = np.broadcast_to(np.asarray(s["kl"], float), (STEPS,))
        for t in range(n):
            metrics.append({"run": run, "step": t, "reward/mean": s["reward"][t], "kl/analytic": kl[t],
                            "kl/forward_myopic": kl[t] * 1.5, "policy/entropy": 0.3, "label": s["label"],
                            "beta": s["beta"], "seed": s["seed"], "setting": s["setting"]})
        for split, target in zip(scores, s["acc"]):
            p = np.clip(target + difficulty[split] + rng.normal(0, 0.05, P), 0, 1)
            scores[split][run] = np.zeros(P) if s["diverged"] else np.round(p * 4) / 4  # 4 samples per problem
    base = {split: np.clip(0.4 + difficulty[split], 0, 1) for split in scores}
    return RunTables(results=pd.DataFrame(results), metrics=pd.DataFrame(metrics), scores=scores, base_scores=base)


def on_policy(unstable=(), acc=None, seeds=(0, 1, 2)):
    """The on-policy grid; labels in ``unstable`` collapse; ``acc`` maps label → (ID, OOD) accuracy."""
    acc = acc or {}
    return [run_spec(label, beta, seed, reward=collapsing() if label in unstable else None,
                     acc=acc.get(label, (0.5, 0.3)))
            for label, beta in ON_LABELS for seed in seeds]


def off_policy(unstable=(), acc=None, lags=(0, 2, 8), seeds=(0, 1, 2)):
    acc = acc or {}
    return [run_spec(label, beta, seed, setting=f"PPO lag {lag}", lag=lag,
                     reward=collapsing() if (label in unstable and lag > 0) else None, acc=acc.get(label, (0.5, 0.3)))
            for lag in lags for label, beta in OFF_LABELS for seed in seeds]


# ---------------------------------------------------------------------------------------------------------
# Definitions


def test_smoothing_window():
    assert fnd.smoothing_window(100) == 10 and fnd.smoothing_window(4) == 2 and fnd.smoothing_window(1) == 2


def test_outcomes_ignore_a_single_noisy_step_but_catch_a_sustained_collapse():
    dip = steady(0.6)
    dip[25] = 0.0  # one bad batch: the 4-step mean only falls to 0.45 > 0.3
    low = steady(0.02)  # never earned reward: below the floor, so no "collapse" from noise
    low[10:] = 0.0
    specs = [run_spec("k1 in reward", 0.1, 0, reward=dip), run_spec("k1 in reward", 0.1, 1, reward=collapsing()),
             run_spec("k1 in reward", 0.1, 2, reward=low), run_spec("k3 in loss", 0.1, 0, diverged=True)]
    out = fnd.run_outcomes(make_tables(specs)).set_index("seed")
    k1 = out[out["label"] == "k1 in reward"]
    assert not k1.loc[0, "collapsed"] and k1.loc[1, "collapsed"] and not k1.loc[2, "collapsed"]
    # the first step whose 4-step mean is below half the running peak (0.25): 0.5,0.05,0.05,0.05 → 0.1625
    # (one step earlier, 0.5,0.5,0.05,0.05 → 0.275, is not yet)
    assert k1.loc[1, "collapse_step"] == STEPS // 2 + 2
    div = out[out["label"] == "k3 in loss"].iloc[0]
    assert div["diverged"] and div["unstable"] and div["final_reward"] == 0.0
    inst = fnd.instability_table(fnd.run_outcomes(make_tables(specs)))
    assert sorted(inst["seed"]) == [0, 1] and set(inst["label"]) == {"k1 in reward", "k3 in loss"}
    # a run that diverged before logging any step still counts
    tables = make_tables(specs)
    tables.metrics = tables.metrics[tables.metrics["run"] != "run3"]
    out = fnd.run_outcomes(tables).set_index("run")
    assert out.loc["run3", "diverged"] and out.loc["run3", "unstable"] and out.loc["run3", "steps_completed"] == 0


def test_kl_blowup_is_a_fixed_threshold_in_nats():
    nan_kl = np.full(STEPS, 0.1)
    nan_kl[5] = np.nan
    specs = [run_spec("k3 in reward", 0.1, 0, kl=fnd.KL_BLOWUP_NATS - 0.1),  # just below: not a blow-up
             run_spec("k3 in reward", 0.1, 1, kl=fnd.KL_BLOWUP_NATS + 0.1),  # just above
             run_spec("no KL", 0.0, 0, kl=fnd.KL_BLOWUP_NATS + 1.0),  # the threshold does not depend on other runs
             run_spec("k1 in loss", 0.1, 0, kl=nan_kl)]  # non-finite at some step
    out = fnd.run_outcomes(make_tables(specs))
    blow = dict(zip(zip(out["label"], out["seed"]), out["kl_blowup"]))
    assert not blow[("k3 in reward", 0)] and blow[("k3 in reward", 1)]
    assert blow[("no KL", 0)] and blow[("k1 in loss", 0)]
    assert not out["unstable"].any() and out["unstable_incl_blowup"].sum() == 3


def test_kl_blowup_threshold_is_the_studys():
    """The long-answer study's threshold (41 nats, fixed in docs/preregistration.md) replaces the default."""
    specs = [run_spec("k3 in reward", 0.1, 0, kl=20.0), run_spec("k3 in reward", 0.1, 1, kl=45.0)]
    default = fnd.run_outcomes(make_tables(specs))
    long = fnd.run_outcomes(make_tables(specs), kl_blowup_nats=41.0)
    assert default["kl_blowup"].tolist() == [True, True]
    assert long["kl_blowup"].tolist() == [False, True] and long.attrs["kl_blowup_nats"] == 41.0
    f1 = fnd.finding_f1(long)
    assert "final KL > 41 nats" in f1.test


def test_collapse_is_judged_at_the_end_of_training():
    recovered = steady(0.6)
    recovered[10:20] = 0.0  # a dip that recovers is not a collapse
    out = fnd.run_outcomes(make_tables([run_spec("k1 in reward", 0.1, 0, reward=recovered)]))
    assert not out.loc[0, "collapsed"]


def test_rate_comparison_branches():
    assert fnd.rate_comparison(6, 6, 0, 6)["verdict"] == "supported"
    assert fnd.rate_comparison(0, 6, 6, 6)["verdict"] == "not supported"
    assert fnd.rate_comparison(1, 6, 1, 6)["verdict"] == "inconclusive at this scale"
    assert fnd.rate_comparison(0, 0, 3, 6)["verdict"] == "not testable at this scale"
    assert fnd.rate_comparison(3, 3, 0, 3)["verdict"] == "not testable at this scale"  # min p = 0.1 ≥ α
    # stratified: 2/3 vs 0/3 in each of two β strata is significant only when the strata are combined
    both = fnd.stratified_rate_comparison([(3, 3, 0, 3), (3, 3, 0, 3)])
    assert both["verdict"] == "supported" and both["min_p"] == pytest.approx(2 / 400)


def test_bootstrap_difference_covers_the_true_difference():
    rng = np.random.default_rng(0)
    d, lo, hi = fnd.bootstrap_difference(np.full(5, 1.0) + rng.normal(0, 0.1, 5), np.zeros(4), rng, 2000)
    assert lo < d < hi and 0.8 < d < 1.2 and lo > 0
    assert all(math.isnan(x) for x in fnd.bootstrap_difference([], [1.0], rng))


def test_accuracy_table_means_cis_and_difference_to_base():
    specs = on_policy(acc={"k1 in reward": (0.8, 0.6)})
    specs[0]["diverged"] = True  # a k1 in reward run (β = 0.1, seed 0) is scored 0
    tables = make_tables(specs)
    acc = fnd.accuracy_table(tables, np.random.default_rng(0), n_boot=400).set_index(["label", "beta"])
    assert len(acc) == len(ON_LABELS) and acc.loc[("k1 in reward", 0.1), "n_diverged"] == 1
    runs = tables.results.query("label == 'k1 in reward' and beta == 0.1")["run"]
    expected = np.mean([tables.scores["id_test"][r].mean() for r in runs])
    row = acc.loc[("k1 in reward", 0.5)]
    assert math.isclose(acc.loc[("k1 in reward", 0.1), "ID pass@1"], expected)
    assert row["ID low"] <= row["ID pass@1"] <= row["ID high"]
    assert math.isclose(row["ID Δbase"], row["ID pass@1"] - tables.base_accuracy("id_test"))
    assert row["ID Δbase low"] > 0 and row["OOD Δbase low"] > 0  # 0.8 / 0.6 vs a base of about 0.4
    text = fnd.format_accuracy(acc.reset_index()).set_index(["configuration", "β"])
    cell = text.loc[("k1 in reward", 0.5), "ID pass@1 [95% CI]"]
    assert cell == f"{row['ID pass@1']:.3f} [{row['ID low']:.3f}, {row['ID high']:.3f}]"
    assert text.loc[("k1 in reward", 0.5), "OOD − base [95% CI]"].startswith("+")
    assert list(dict.fromkeys(acc.index.get_level_values("label")))[:3] == ["k1 in reward", "k3 in reward+loss",
                                                                              "k3 in loss"]


# ---------------------------------------------------------------------------------------------------------
# F1: biased configurations are unstable


@pytest.mark.parametrize("unstable, expected", [
    (("k3 in reward", "k1 in loss"), "supported"),
    (("k1 in reward", "k3 in loss", "k3 in reward+loss"), "not supported"),
    ((), "inconclusive at this scale"),
    (("k3 in reward", "k1 in reward"), "inconclusive at this scale"),
    (("no KL",), "inconclusive at this scale"),  # the control is in neither group
])
def test_f1_verdicts(unstable, expected):
    f = fnd.finding_f1(fnd.run_outcomes(make_tables(on_policy(unstable=unstable))))
    assert f.verdict == expected, f.numbers
    assert f.numbers["biased_runs"] == 12 and f.numbers["other_runs"] == 18


# ---------------------------------------------------------------------------------------------------------
# F2: unbiased configurations beat k3 in loss, ID and OOD


@pytest.mark.parametrize("acc, expected", [
    ({"k1 in reward": (0.8, 0.6), "k3 in reward+loss": (0.8, 0.6), "k3 in loss": (0.4, 0.2)}, "supported"),
    ({"k1 in reward": (0.3, 0.2), "k3 in reward+loss": (0.3, 0.2), "k3 in loss": (0.8, 0.6)}, "not supported"),
    ({"k1 in reward": (0.8, 0.1), "k3 in reward+loss": (0.8, 0.1), "k3 in loss": (0.4, 0.6)}, "not supported"),
    ({"k1 in reward": (0.8, 0.4), "k3 in reward+loss": (0.8, 0.4), "k3 in loss": (0.4, 0.4)},
     "inconclusive at this scale"),
])
def test_f2_verdicts(acc, expected):
    tables = make_tables(on_policy(acc=acc))
    if expected.startswith("inconclusive"):  # OOD identical in distribution: make it identical in fact
        for label in ("k1 in reward", "k3 in reward+loss"):
            for run in tables.results.query("label == @label")["run"]:
                tables.scores["ood_test"][run] = np.full(P, 0.4)
        for run in tables.results.query("label == 'k3 in loss'")["run"]:
            tables.scores["ood_test"][run] = np.full(P, 0.4)
    f = fnd.finding_f2(tables, np.random.default_rng(0), n_boot=400)
    assert f.verdict == expected, f.evidence
    primary = f.evidence[f.evidence["role"] == "primary"].set_index("split")
    assert set(primary.index) == {"ID", "OOD"} and (primary["beta"] == "all").all()
    assert math.isclose(f.numbers["ID_difference"], primary.loc["ID", "difference"])
    # secondary: each unbiased configuration over all β, and per β the unbiased mean and each configuration
    assert len(f.evidence) == 2 * (1 + 2 + 2 * 3) and f.numbers["testable"]
    sec = f.evidence[(f.evidence["role"] == "secondary") & (f.evidence["min_p"] < 0.05)]
    assert (sec["p_holm"] >= sec["p_value"] - 1e-12).all()
    assert set(f.evidence.loc[f.evidence["min_p"] >= 0.05, "verdict"]) <= {"not testable at this scale"}


def test_f2_is_stratified_by_beta():
    """A large β effect (β = 0.5 far below β = 0.1) and a small, consistent configuration effect: the primary
    difference is the mean of the per-β differences, and its interval is not inflated by the β effect."""
    acc = {0.1: {"k1 in reward": 0.82, "k3 in reward+loss": 0.82, "k3 in loss": 0.72},
           0.5: {"k1 in reward": 0.32, "k3 in reward+loss": 0.32, "k3 in loss": 0.22}}
    specs = [run_spec(label, beta, seed, acc=(acc[beta][label], acc[beta][label]) if beta in acc and label in acc[beta]
                      else (0.5, 0.3)) for label, beta in ON_LABELS for seed in (0, 1, 2)]
    tables = make_tables(specs)
    f = fnd.finding_f2(tables, np.random.default_rng(0), n_boot=400)
    run_mean = {r: tables.scores["id_test"][r].mean() for r in tables.results["run"]}
    res = tables.results.assign(acc=tables.results["run"].map(run_mean)).groupby(["label", "beta"])["acc"].mean()
    expected = np.mean([(res[("k1 in reward", b)] + res[("k3 in reward+loss", b)]) / 2 - res[("k3 in loss", b)]
                        for b in (0.1, 0.5)])
    assert math.isclose(f.numbers["ID_difference"], expected)
    assert f.numbers["ID_high"] - f.numbers["ID_low"] < 0.1  # pooled across β the runs' spread is ±0.25
    assert f.verdict == "supported"


def test_f2_with_two_seeds_per_cell_and_one_beta_is_not_testable():
    specs = [s for s in on_policy(seeds=(0, 1)) if s["beta"] in (0.1, 0.0)]
    specs = [s for s in specs if s["label"] in ("k1 in reward", "k3 in loss", "no KL")]
    f = fnd.finding_f2(make_tables(specs), np.random.default_rng(0), n_boot=100)
    assert f.verdict == "inconclusive at this scale" and not f.numbers["testable"]
    assert "not testable at this scale" in f.numbers["note"] and f.numbers["ID_min_p"] >= 0.05


def test_f2_without_k3_in_loss_runs_is_inconclusive():
    specs = [s for s in on_policy() if s["label"] != "k3 in loss"]
    f = fnd.finding_f2(make_tables(specs), np.random.default_rng(0), n_boot=200)
    assert f.verdict == "inconclusive at this scale" and f.numbers["k3_loss_runs"] == 0


# ---------------------------------------------------------------------------------------------------------
# F3: KL stabilises off-policy training


@pytest.mark.parametrize("unstable, expected", [
    (("no KL",), "supported"),
    (("k1 in reward", "k3 in loss", "k3 in loss (token IS)"), "not supported"),
    ((), "inconclusive at this scale"),
    (("no KL", "k1 in reward", "k3 in loss", "k3 in loss (token IS)"), "inconclusive at this scale"),
    (("k1 in loss",), "inconclusive at this scale"),  # k1 in loss is in neither group
])
def test_f3_verdicts(unstable, expected):
    tables = make_tables(off_policy(unstable=unstable) + on_policy())
    outcomes = fnd.run_outcomes(tables)
    f = fnd.finding_f3(tables, outcomes, np.random.default_rng(0), n_boot=400)
    assert f.verdict == expected, f.numbers
    assert f.numbers["no_kl_runs"] == 6 and f.numbers["kl_runs"] == 18  # lags 2 and 8 only
    if expected == "supported":  # the collapsed no-KL runs end with less reward
        assert f.numbers["final_reward_verdict"] == "supported" and f.numbers["final_reward_low"] > 0


def minibatch_axis(unstable=(), seeds=(0, 1, 2)):
    """The long study's off-policy axis: lag 10 with 1 or 4 PPO minibatches; ``unstable`` maps minibatch count →
    labels that collapse there."""
    return [run_spec(label, beta, seed, setting=f"PPO lag 10{', 4 minibatches' if mb == 4 else ''}", lag=10,
                     minibatches=mb, reward=collapsing() if label in unstable.get(mb, ()) else None)
            for mb in (1, 4) for label, beta in OFF_LABELS for seed in seeds]


def test_f3_strata_are_lag_and_minibatch_count():
    """Runs at lag 10 with 1 and with 4 minibatches are two strata, never pooled: the per-stratum rows exist, and a
    no-KL collapse only with 4 minibatches shows in that stratum's row alone."""
    tables = make_tables(minibatch_axis(unstable={4: ("no KL",)}))
    f = fnd.finding_f3(tables, fnd.run_outcomes(tables), np.random.default_rng(0), n_boot=400)
    tests = f.evidence[(f.evidence["kind"] == "test") & (f.evidence["comparison"] == "unstable, no KL vs KL")]
    per = tests.set_index("lag")
    assert list(per.index) == ["all", 10, "10, 4 minibatches"]
    assert per.loc[10, "events_a"] == 0 and per.loc["10, 4 minibatches", "events_a"] == 3
    assert per.loc["10, 4 minibatches", "runs_b"] == 9  # three KL configurations × three seeds
    assert f.numbers["no_kl_runs"] == 6 and f.numbers["kl_runs"] == 18
    # 3 of 3 vs 0 of 9 in one stratum, 0 vs 0 in the other: the exact stratified p is 2/C(12, 3) = 0.009
    assert f.verdict == "supported" and f.numbers["p_two_sided"] == pytest.approx(2 / math.comb(12, 3))


def test_offpolicy_strata_and_settings_sort_by_lag_then_minibatches():
    assert fnd.offpolicy_stratum(10, 1) == 10 and fnd.offpolicy_stratum(10, 4) == "10, 4 minibatches"
    settings = ["PPO lag 10, 4 minibatches", "PPO lag 10", "on-policy", "PPO lag 2", "other"]
    assert sorted(settings, key=fnd.setting_key) == ["on-policy", "PPO lag 2", "PPO lag 10",
                                                     "PPO lag 10, 4 minibatches", "other"]


def test_f3_accuracy_difference_has_its_own_verdict():
    acc = {"no KL": (0.2, 0.1), **{l: (0.7, 0.5) for l in fnd.OFFPOLICY_KL}}
    tables = make_tables(off_policy(acc=acc))
    f = fnd.finding_f3(tables, fnd.run_outcomes(tables), np.random.default_rng(0), n_boot=400)
    assert f.verdict == "inconclusive at this scale"  # nothing unstable: the primary test decides
    assert f.numbers["ID_pass@1_verdict"] == "supported" and f.numbers["OOD_pass@1_verdict"] == "supported"


# ---------------------------------------------------------------------------------------------------------
# Together


def test_all_findings_paper_comparison_and_serialisation():
    tables = make_tables(on_policy(unstable=("k3 in reward",)) + off_policy(unstable=("no KL",)))
    found = fnd.all_findings(tables, seed=0, n_boot=200)
    assert [f.id for f in found] == ["F1", "F2", "F3"]
    assert all(f.verdict in ("supported", "not supported", "inconclusive at this scale") for f in found)
    json.dumps([f.to_dict() for f in found])  # JSON-serialisable (no NaN objects, no DataFrames)
    outcomes = fnd.run_outcomes(tables)
    acc = fnd.accuracy_table(tables, np.random.default_rng(0), n_boot=200)
    comp = fnd.paper_comparison(tables, acc, outcomes, found)
    assert len(comp) == 14 and comp.iloc[4, 1].startswith("0.508 vs 0.429")
    setup = comp[comp["outcome"].str.startswith("setup:")].set_index("outcome")
    assert "**unconfirmed [KIMI]**" in setup.loc["setup: β grid"].iloc[0]
    assert "**unconfirmed [KIMI]**" in setup.loc["setup: group size"].iloc[0]
    assert "{0, 0.1, 0.5}" in setup.loc["setup: β grid"].iloc[1]
    k1l = comp.set_index("outcome").loc["k1 in loss"].iloc[0]
    assert "[HFB, REV]" in k1l and "**unconfirmed [KIMI]**" in k1l
    assert all("[" in f.paper for f in found) and "**unconfirmed [KIMI]**" in found[0].paper
    k3r = comp.set_index("outcome").loc["k3 in reward"]
    assert "β=0.1: 3/3" in k3r.iloc[1] and k3r["verdict here"] == found[0].verdict
    assert "lag 2: 3/3, lag 8: 3/3" in comp.set_index("outcome").loc["Off-policy, no KL"].iloc[1]
    table = fnd.findings_table(found)
    assert list(table["finding"]) == ["F1", "F2", "F3"]


# ---------------------------------------------------------------------------------------------------------
# The analysis cut of a study trained in seed order (docs/preregistration.md §5)


def test_the_analysis_cut_keeps_the_seeds_complete_in_every_cell():
    from kl_lib.study.tables import complete_seeds, restrict_to_runs

    specs = on_policy(seeds=(0, 1)) + [run_spec("k1 in reward", 0.1, 2), run_spec("k3 in loss", 0.5, 2)]
    tables = make_tables(specs)
    assert complete_seeds(tables.results) == [0, 1]  # seed 2 has started in two cells only
    cut = restrict_to_runs(tables, tables.results.loc[tables.results["seed"].isin([0, 1]), "run"])
    assert set(cut.results["seed"]) == {0, 1} and len(cut.results) == 2 * len(ON_LABELS)
    assert set(cut.metrics["run"]) == set(cut.results["run"]) == set(cut.scores["id_test"])
    # a run that finished training but is not evaluated yet does not complete its seed
    results = tables.results.copy()
    results.loc[(results["seed"] == 1) & (results["label"] == "k3 in loss") & (results["beta"] == 0.1),
                "evaluated"] = False
    assert complete_seeds(results) == [0]
    # a diverged run counts (it is scored 0), a missing seed-0 run leaves nothing to analyse
    results.loc[results["seed"] == 1, "diverged"] = True
    assert complete_seeds(results) == [0, 1]
    assert complete_seeds(results[~((results["seed"] == 0) & (results["label"] == "no KL"))]) == []


def test_f2_with_four_betas_and_three_seeds_uses_a_monte_carlo_permutation_test():
    """The long study's F2 design: 4 β strata, 3 seeds per cell, two unbiased cells against k3 in loss (84⁴ ≈ 5·10⁷
    arrangements, above stats.MAX_ENUMERATION): the primary test runs (Monte Carlo, as docs/statistics.md says) and
    finds a clear effect with the smallest p-value a Monte Carlo test can give."""
    betas = (0.05, 0.1, 0.3, 1.0)
    acc = {"k1 in reward": (0.8, 0.6), "k3 in reward+loss": (0.8, 0.6), "k3 in loss": (0.4, 0.2)}
    specs = [run_spec(label, beta, seed, acc=acc[label]) for label in acc for beta in betas for seed in (0, 1, 2)]
    f = fnd.finding_f2(make_tables(specs), np.random.default_rng(0), n_boot=200)
    assert f.verdict == "supported"
    # no random arrangement reaches the observed difference (exactly, only it does: p = 2 / 84⁴), so the Monte
    # Carlo p-value, which counts the observed arrangement as one of the sample, is 2 / (N + 1)
    assert f.numbers["ID_p_value"] == pytest.approx(2 / (stats.N_PERMUTATIONS + 1))
    assert f.numbers["ID_min_p"] == pytest.approx(2 / 84 ** 4)
