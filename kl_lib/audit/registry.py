"""Registry of library settings: how each library's flags map to KL terms of ``kl_lib`` (docs/libraries.md).

A ``Library`` holds its version, the source files its mapping was read from, its KL-relevant flags with their
defaults (``Flag``), the reported upstream bugs for that version and the flags that give the unbiased gradient.
``resolve(library, values)`` turns flag values into a ``Resolution``: a tuple of ``analysis.Term`` (a library may
put one estimator in the reward and another in the loss, each with its own β and aggregation) and notes on what
the mapping does not model. Unknown libraries, unknown flags and invalid values are ``ValueError``s that name
them and list the valid ones.

The mappings are read from the libraries' sources (never copied):

* verl 0.9.1 (PyPI wheel): k3 = ``low_var_kl`` clamps δ to ±20 and the value to ±10; a ``+`` suffix keeps the
  value and takes k2's gradient (straight-through); the reward penalty is −β k_t per token, then GAE/REINFORCE++
  returns (reward-to-go) or GRPO/RLOO/ReMax sequence sums; GRPO normalises by the group (std, Bessel, ε = 1e-6);
  the KL loss is aggregated like the policy loss (``loss_agg_mode``).
* TRL 1.16.0 GRPOTrainer: k3 in the loss, times the differentiable ratio with ``use_bias_correction_kl`` (token
  level, or exp(mean log ratio) at sequence level); ``loss_type`` fixes the aggregation. RLOOTrainer: Σ_t k1 in
  the reward, leave-one-out baseline, per-sequence loss.
* OpenRLHF 0.11.2: every estimate's value clamped to ±10; reward: −β k_t per token then cumulative returns
  (γ = 1, reward-to-go); ``--algo.kl.use_loss``: the loss instead; ``--algo.kl.unbiased_gradient``: k2's gradient
  under the chosen value (straight-through, detached clamped ratio off-policy).
* NeMo-RL: as surveyed in docs/libraries.md at 7ea279ab, **not re-read here** (unverified).

Departure from the paper: the paper's Table 2 covers verl and OpenRLHF defaults → k1 in reward; here every flag.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field

from kl_lib.audit.analysis import Term
from kl_lib.config import KLSetting

__all__ = ["LIBRARIES", "Bug", "Flag", "Library", "Resolution", "get_library", "parse_flag", "resolve"]

_NONE_WORDS = ("null", "none", "~", "")


@dataclass(frozen=True)
class Flag:
    """A KL-relevant flag: its default, its type (bool/int/float/str) and allowed values (None = any)."""

    name: str
    default: object
    kind: type
    choices: tuple[str, ...] | None = None
    optional: bool = False
    help: str = ""


@dataclass(frozen=True)
class Bug:
    title: str
    reference: str
    status: str


@dataclass(frozen=True)
class Resolution:
    terms: tuple[Term, ...]
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Library:
    name: str
    version: str
    sources: tuple[str, ...]
    flags: tuple[Flag, ...]
    build: Callable[[dict], Resolution]
    bugs: tuple[Bug, ...]
    unbiased: str
    config_format: str
    defaults_note: str = ""
    flag_index: dict[str, Flag] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "flag_index", {f.name: f for f in self.flags})


def parse_flag(flag: Flag, raw: object) -> object:
    """A flag's value from a string (``--set``, argument files) or a YAML/JSON value; ValueError naming the flag."""
    if flag.optional and (raw is None or (isinstance(raw, str) and raw.strip().lower() in _NONE_WORDS)):
        return None
    try:
        if flag.kind is bool:
            if isinstance(raw, bool):
                return raw
            word = str(raw).strip().lower()
            if word not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return word in ("true", "1", "yes")
        if flag.kind in (int, float):
            if isinstance(raw, bool):
                raise ValueError
            value = flag.kind(float(raw)) if flag.kind is float else int(str(raw))
            return value
        value = str(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{flag.name}={raw!r} is not a valid {flag.kind.__name__}") from None
    if flag.choices is not None and value not in flag.choices:
        raise ValueError(f"{flag.name}={value!r} is not valid; choose one of {', '.join(flag.choices)}")
    return value


def unknown_flag_error(library: Library, names: list[str]) -> ValueError:
    """The error for flags the registry does not know: names them, suggests close ones, lists the known flags."""
    hints = []
    for name in names:
        close = difflib.get_close_matches(name, list(library.flag_index), n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ValueError(f"unknown {library.name} flag(s) {', '.join(hints)}; known flags: {', '.join(library.flag_index)}")


def resolve(library: Library, values: dict[str, object]) -> tuple[dict[str, object], Resolution]:
    """The full flag values (defaults filled in, parsed) and their resolution into KL terms."""
    unknown = [k for k in values if k not in library.flag_index]
    if unknown:
        raise unknown_flag_error(library, unknown)
    full = {f.name: f.default for f in library.flags}
    full.update({k: parse_flag(library.flag_index[k], v) for k, v in values.items()})
    return full, library.build(full)


# ---------------------------------------------------------------------------------------------------------- verl

_VERL_BASE = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}
_VERL_ESTIMATORS = tuple([*_VERL_BASE, "full", *(f"{k}+" for k in _VERL_BASE)])
_VERL_AGG = {"token-mean": "global_token_mean", "token-sum": "sum", "seq-mean-token-sum": "sum",
             "seq-mean-token-mean": "token_mean", "seq-mean-token-sum-norm": "constant"}


def _verl_estimator(name: str, beta: float, placement: str, **extra: object) -> KLSetting:
    if name == "full":
        raise ValueError("verl kl estimator 'full' raises NotImplementedError in verl (core_algos.kl_penalty_forward)")
    base = name.rstrip("+")
    est = _VERL_BASE[base]
    clamps = {"log_ratio_clamp": 20.0, "value_clamp": 10.0} if est == "k3" else {}
    straight = {"gradient_estimator": "k2"} if name.endswith("+") and est != "k2" else {}
    return KLSetting(est, placement, beta=beta, **clamps, **straight, **extra)


def _verl_reward(v: dict, notes: list[str]) -> dict:
    adv = v["algorithm.adv_estimator"]
    if v["algorithm.gamma"] != 1.0 or (adv == "gae" and v["algorithm.lam"] != 1.0):
        raise ValueError("algorithm.gamma < 1 (or lam < 1 under GAE) discounts the KL penalty; kl_lib cannot express a "
                         "discount: set algorithm.gamma=1.0 and algorithm.lam=1.0 to audit")
    if adv in ("gae", "reinforce_plus_plus"):
        if adv == "reinforce_plus_plus":
            notes.append("REINFORCE++ whitens the returns over the batch (masked_whiten): a data-dependent shift and "
                         "scale, not modelled; in the large-batch limit it keeps the direction")
        else:
            notes.append("GAE subtracts the critic's value V(s_t): a state-dependent baseline, unbiased (λ = γ = 1)")
        return {"reward_to_go": True}
    if adv == "grpo":
        n = v["actor_rollout_ref.rollout.n"]
        if n < 2:
            raise ValueError("algorithm.adv_estimator=grpo needs actor_rollout_ref.rollout.n ≥ 2 (the group size)")
        norm = "group_std" if v["algorithm.norm_adv_by_std_in_grpo"] else "group_mean"
        return {"reward_normalization": norm, "group_size": n}
    notes.append(f"{adv}: a baseline from the other samples (unbiased); the penalty enters as a sequence sum")
    return {}


def _verl_build(v: dict) -> Resolution:
    notes: list[str] = []
    agg = _VERL_AGG[v["actor_rollout_ref.actor.loss_agg_mode"]]
    constant = v["actor_rollout_ref.actor.loss_scale_factor"] if agg == "constant" else None
    terms = []
    if v["algorithm.use_kl_in_reward"]:
        setting = _verl_estimator(v["algorithm.kl_penalty"], v["algorithm.kl_ctrl.kl_coef"], "reward",
                                  **_verl_reward(v, notes))
        terms.append(Term(setting, agg, constant, "algorithm.use_kl_in_reward (ray_trainer.apply_kl_penalty)"))
        if v["algorithm.kl_ctrl.type"] == "adaptive":
            notes.append("kl_ctrl.type=adaptive: β changes between steps (not modelled; each step has the class shown)")
    if v["actor_rollout_ref.actor.use_kl_loss"]:
        setting = _verl_estimator(v["actor_rollout_ref.actor.kl_loss_type"], v["actor_rollout_ref.actor.kl_loss_coef"],
                                  "loss")
        terms.append(Term(setting, agg, constant, "actor.use_kl_loss (workers/utils/losses.py)"))
    if len(terms) == 2:
        notes.append("both switches on: the KL is applied twice, once in the reward and once in the loss (verl #265)")
    if v["actor_rollout_ref.actor.loss_agg_mode"] == "token-sum":
        notes.append("token-sum: the sum over the whole batch, B times seq-mean-token-sum")
    if v["actor_rollout_ref.actor.ppo_epochs"] > 1 and terms:
        notes.append("ppo_epochs > 1: the reward penalty is frozen at rollout and later epochs are off-policy")
    return Resolution(tuple(terms), tuple(notes))


_VERL = Library(
    name="verl",
    version="0.9.1 (PyPI wheel verl-0.9.1, read for this registry)",
    sources=("verl/trainer/ppo/core_algos.py (kl_penalty, kl_penalty_forward, agg_loss, "
             "compute_grpo_outcome_advantage, compute_reinforce_plus_plus_outcome_advantage)",
             "verl/trainer/ppo/ray_trainer.py (apply_kl_penalty)", "verl/workers/utils/losses.py (KL loss)",
             "verl/trainer/config/ppo_trainer.yaml", "verl/trainer/config/actor/actor.yaml"),
    flags=(
        Flag("algorithm.use_kl_in_reward", False, bool, help="KL as a per-token reward penalty"),
        Flag("algorithm.kl_penalty", "kl", str, _VERL_ESTIMATORS, help="reward estimator"),
        Flag("algorithm.kl_ctrl.type", "fixed", str, ("fixed", "adaptive")),
        Flag("algorithm.kl_ctrl.kl_coef", 0.001, float, help="reward β"),
        Flag("algorithm.kl_ctrl.horizon", 10000, int),
        Flag("algorithm.kl_ctrl.target_kl", 0.1, float),
        Flag("algorithm.adv_estimator", "gae", str, ("gae", "grpo", "reinforce_plus_plus", "rloo", "remax")),
        Flag("algorithm.norm_adv_by_std_in_grpo", True, bool),
        Flag("algorithm.gamma", 1.0, float),
        Flag("algorithm.lam", 1.0, float),
        Flag("actor_rollout_ref.actor.use_kl_loss", False, bool, help="KL as a loss term"),
        Flag("actor_rollout_ref.actor.kl_loss_coef", 0.001, float, help="loss β"),
        Flag("actor_rollout_ref.actor.kl_loss_type", "low_var_kl", str, _VERL_ESTIMATORS),
        Flag("actor_rollout_ref.actor.loss_agg_mode", "token-mean", str, tuple(_VERL_AGG)),
        Flag("actor_rollout_ref.actor.loss_scale_factor", None, float, optional=True),
        Flag("actor_rollout_ref.actor.ppo_epochs", 1, int),
        Flag("actor_rollout_ref.rollout.n", 1, int, help="samples per prompt (GRPO group size)"),
    ),
    build=_verl_build,
    bugs=(
        Bug("'+' estimators (k1+, k3+, low_var_kl+) raised NotImplementedError", "PR #6058",
            "fixed in this version (kl_penalty strips the '+'; verified in the 0.9.1 source)"),
        Bug("REINFORCE++ returns reset at interior mask zeros", "PR #7300",
            "fixed in this version (the running return is carried across mask zeros; verified in the 0.9.1 source)"),
        Bug("KL applied twice when both use_kl_in_reward and use_kl_loss are set", "issue #265",
            "by design in this version: both terms are added (flagged in the notes when it happens)"),
    ),
    unbiased=("algorithm.use_kl_in_reward=true algorithm.kl_penalty=kl actor_rollout_ref.actor.use_kl_loss=false "
              "with algorithm.adv_estimator in gae/reinforce_plus_plus/rloo/remax gives G* (k1 in the reward); add "
              "actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-sum to keep the sequence-level scale (token "
              "means scale it by 1/T). Under grpo, norm_adv_by_std_in_grpo=false gives (1 − 1/G)·G*; with the std "
              "the direction is only approximately G* (Monte Carlo)."),
    config_format="a verl YAML (nested keys, e.g. algorithm: {use_kl_in_reward: true})",
    defaults_note="both switches are off by default: no KL at all",
)


# ----------------------------------------------------------------------------------------------------------- TRL

_TRL_AGG = {"grpo": "token_mean", "sapo": "token_mean", "bnpo": "global_token_mean", "dapo": "global_token_mean",
            "cispo": "global_token_mean", "vespo": "global_token_mean", "dr_grpo": "constant", "luspo": "sum"}


def _trl_grpo_build(v: dict) -> Resolution:
    if v["beta"] == 0:
        return Resolution((), ("beta=0.0: no KL term and no reference model",))
    weights: dict[str, object] = {}
    if v["use_bias_correction_kl"]:
        weights = ({"importance_weighting": "token"} if v["importance_sampling_level"] == "token"
                   else {"importance_weighting": "sequence", "sequence_weight": "geometric_mean"})
    setting = KLSetting("k3", "loss", beta=v["beta"], **weights)
    agg = _TRL_AGG[v["loss_type"]]
    constant = float(v["max_completion_length"]) if agg == "constant" else None
    notes = ["k3 is not clamped: exp(ref − logp) overflows in float32 for log-ratios below about −88 (issue #6637)"]
    if v["num_iterations"] > 1:
        notes.append("num_iterations > 1: later iterations are off-policy; the weight then also corrects the states")
    return Resolution((Term(setting, agg, constant, "beta > 0 (grpo_trainer._compute_loss)"),), tuple(notes))


_TRL_GRPO = Library(
    name="trl-grpo",
    version="TRL 1.16.0 GRPOTrainer (PyPI wheel trl-1.16.0, read for this registry)",
    sources=("trl/trainer/grpo_trainer.py (_compute_loss: per_token_kl, coef_1, loss_type)",
             "trl/trainer/grpo_config.py (defaults)"),
    flags=(
        Flag("beta", 0.0, float, help="KL coefficient; 0 switches the KL off"),
        Flag("use_bias_correction_kl", True, bool, help="multiply k3 by the differentiable ratio"),
        Flag("importance_sampling_level", "token", str, ("token", "sequence")),
        Flag("loss_type", "dapo", str, tuple(_TRL_AGG)),
        Flag("max_completion_length", 512, int, help="the dr_grpo constant"),
        Flag("num_generations", 8, int),
        Flag("num_iterations", 1, int),
    ),
    build=_trl_grpo_build,
    bugs=(
        Bug("importance_sampling_level='sequence' broadcasts exp(mean log ratio) onto the per-token KL, adding "
            "(Σ_t k3_t)·∇mean_t log π (gradient F + (G* − F)/T)", "issue #6586",
            "present in this version (verified in the 1.16.0 source)"),
        Bug("k3 overflow to inf for large negative log-ratios (no clamp)", "issues #3015, #6637",
            "present in this version (no clamp in the 1.16.0 source)"),
        Bug("use_bias_correction_kl=True by default changes the on-policy gradient from F to M", "PR #6503",
            "in this version (default True, verified)"),
    ),
    unbiased=("No GRPOConfig flag gives G*: the KL is k3 in the loss, whose best on-policy gradient is M (the default "
              "use_bias_correction_kl=True, importance_sampling_level='token'); loss_type='luspo' or 'dr_grpo' avoid "
              "the 1/T scaling. For G* use RLOOTrainer with beta > 0 (k1 summed into the reward)."),
    config_format="a GRPOConfig as YAML or JSON (flat keys: beta, loss_type, ...)",
    defaults_note="beta=0.0 by default: no KL at all",
)


def _trl_rloo_build(v: dict) -> Resolution:
    if v["beta"] == 0:
        return Resolution((), ("beta=0.0: no KL term and no reference model",))
    notes = ["the leave-one-out baseline is subtracted from the penalised reward: unbiased, lower variance "
             "(kl_lib's variance is without a baseline)"]
    if v["normalize_advantages"]:
        notes.append("normalize_advantages=True whitens the advantages over the batch: not modelled (Monte Carlo "
                     "territory, like a group std)")
    setting = KLSetting("k1", "reward", beta=v["beta"])
    return Resolution((Term(setting, "sum", None, "beta > 0 (rloo_trainer: rewards − beta·Σ_t k1)"),), tuple(notes))


_TRL_RLOO = Library(
    name="trl-rloo",
    version="TRL 1.16.0 RLOOTrainer (PyPI wheel trl-1.16.0, read for this registry)",
    sources=("trl/trainer/rloo_trainer.py (_generate_and_score_completions: rewards − beta·kl; _compute_loss: "
             "per-sequence ratio, mean)", "trl/trainer/rloo_config.py (defaults)"),
    flags=(
        Flag("beta", 0.05, float, help="KL coefficient; 0 switches the KL off"),
        Flag("num_generations", 2, int),
        Flag("normalize_advantages", False, bool),
        Flag("num_iterations", 1, int),
    ),
    build=_trl_rloo_build,
    bugs=(),
    unbiased="The default (beta > 0): k1 summed over the sequence into the reward gives G*.",
    config_format="an RLOOConfig as YAML or JSON (flat keys)",
)


# ------------------------------------------------------------------------------------------------------ OpenRLHF

_ORLHF_AGG = {"token-mean": "global_token_mean", "seq-mean-token-mean": "token_mean"}
_ORLHF_ADV = ("gae", "reinforce", "rloo", "reinforce_baseline", "group_norm", "dr_grpo", "flash_reinforce")


def _openrlhf_build(v: dict) -> Resolution:
    if v["algo.kl.init_coef"] <= 0:
        return Resolution((), ("algo.kl.init_coef ≤ 0: no KL and no reference model",))
    est, beta, notes = v["algo.kl.estimator"], v["algo.kl.init_coef"], []
    agg = _ORLHF_AGG[v["actor.loss_agg_mode"]]
    if v["algo.kl.target"] is not None:
        notes.append("algo.kl.target set: adaptive β between steps (not modelled)")
    if v["algo.kl.use_loss"]:
        extra = {"gradient_estimator": "k2"} if v["algo.kl.unbiased_gradient"] else {}
        if extra:
            notes.append("unbiased_gradient off-policy multiplies k2's gradient by the detached ratio clamped at 10 "
                         "(token_weight='detached'); on-policy it is 1")
        setting = KLSetting(est, "loss", beta=beta, value_clamp=10.0, **extra)
        return Resolution((Term(setting, agg, None, "--algo.kl.use_loss (ppo_actor: aggregate_loss(kl) × kl_ctl)"),),
                          tuple(notes))
    adv = v["algo.advantage.estimator"]
    if v["algo.advantage.gamma"] != 1.0 or (adv == "gae" and v["algo.advantage.lambd"] != 1.0):
        raise ValueError("algo.advantage.gamma < 1 (or lambd < 1 under gae) discounts the KL penalty; kl_lib cannot "
                         "express a discount: set both to 1 to audit")
    if v["algo.kl.unbiased_gradient"]:
        notes.append("algo.kl.unbiased_gradient has no effect without --algo.kl.use_loss")
    if adv in ("gae", "reinforce", "reinforce_baseline"):
        notes.append("the advantages are whitened over the batch (mean" + ("" if v["algo.advantage.no_std_norm"]
                     else " and std") + "): not modelled; in the large-batch limit it keeps the direction")
    setting = KLSetting(est, "reward", beta=beta, reward_to_go=True, value_clamp=10.0)
    return Resolution((Term(setting, agg, None, "reward (experience_maker: compute_reward, cumulative returns)"),),
                      tuple(notes))


_OPENRLHF = Library(
    name="openrlhf",
    version="OpenRLHF 0.11.2 (PyPI wheel, read for this registry)",
    sources=("openrlhf/models/utils.py (compute_approx_kl, compute_reward)",
             "openrlhf/trainer/ppo_utils/experience_maker.py (returns, baselines, whitening)",
             "openrlhf/trainer/ray/ppo_actor.py (KL loss)", "openrlhf/cli/train_ppo_ray.py (flags)"),
    flags=(
        Flag("algo.kl.estimator", "k1", str, ("k1", "k2", "k3")),
        Flag("algo.kl.init_coef", 0.01, float),
        Flag("algo.kl.target", None, float, optional=True),
        Flag("algo.kl.horizon", 10000, int),
        Flag("algo.kl.use_loss", False, bool),
        Flag("algo.kl.unbiased_gradient", False, bool),
        Flag("algo.advantage.estimator", "gae", str, _ORLHF_ADV),
        Flag("algo.advantage.gamma", 1.0, float),
        Flag("algo.advantage.lambd", 1.0, float),
        Flag("algo.advantage.no_std_norm", False, bool),
        Flag("actor.loss_agg_mode", "token-mean", str, tuple(_ORLHF_AGG)),
        Flag("rollout.n_samples_per_prompt", 1, int),
    ),
    build=_openrlhf_build,
    bugs=(
        Bug("k3's gradient is NaN at log-ratio ≤ −89 in float32 although the value is clamped", "PR #1335",
            "fixed in this version (δ clamped at −10 before exp; verified in the 0.11.2 source)"),
        Bug("KL loss gradients are biased (k1: 0, k3: F); opt-in fix --algo.kl.unbiased_gradient", "PR #1309",
            "in this version (flag present, default off; verified)"),
    ),
    unbiased=("The default gives G*: --algo.kl.estimator k1 without --algo.kl.use_loss (k1 per token in the reward, "
              "cumulative returns); --actor.loss_agg_mode token-mean scales it by 1/T. rloo/group_norm/dr_grpo "
              "avoid the batch whitening of gae/reinforce."),
    config_format="OpenRLHF command-line arguments in a text file (e.g. a launch script: --algo.kl.estimator k3 ...)",
)


# ------------------------------------------------------------------------------------------------------- NeMo-RL

def _nemo_build(v: dict) -> Resolution:
    beta = v["loss_fn.reference_policy_kl_penalty"]
    if beta <= 0:
        return Resolution((), ("reference_policy_kl_penalty = 0: no KL",))
    clamps = {"log_ratio_clamp": v["loss_fn.kl_input_clamp_value"], "value_clamp": v["loss_fn.kl_output_clamp_value"]}
    agg = "global_token_mean" if v["loss_fn.token_level_loss"] else "token_mean"
    notes = ["NeMo-RL was not re-read for this registry: mapping from docs/libraries.md (7ea279ab), unverified"]
    if v["loss_fn.use_kl_in_reward"]:
        notes.append("REINFORCE++ whitens the advantages globally: not modelled")
        setting = KLSetting(v["loss_fn.reference_policy_kl_type"], "reward", beta=beta, local_reward=True, **clamps)
        return Resolution((Term(setting, agg, None, "use_kl_in_reward (REINFORCE++: adv − coef·kl_t)"),), tuple(notes))
    weight = "detached_where_clamped" if clamps["log_ratio_clamp"] is not None else "differentiable"
    if v["loss_fn.use_on_policy_kl_approximation"]:
        notes.append("use_on_policy_kl_approximation: the ratio is to the generation log-probs (1 on-policy)")
    setting = KLSetting(v["loss_fn.reference_policy_kl_type"], "loss", beta=beta, importance_weighting="token",
                        token_weight=weight, **clamps)
    return Resolution((Term(setting, agg, None, "loss_fn (ClippedPGLossFn: weighted, clamped KL)"),), tuple(notes))


_NEMO = Library(
    name="nemo-rl",
    version="NeMo-RL 7ea279ab (2026-08-22) as surveyed in docs/libraries.md; NOT re-read here (unverified)",
    sources=("nemo_rl/algorithms/utils.py (calculate_kl) [unverified]",
             "nemo_rl/algorithms/loss_functions.py (ClippedPGLossConfig) [unverified]",
             "examples/configs/grpo_math_1B.yaml (defaults; reference_policy_kl_penalty, token_level_loss and "
             "use_on_policy_kl_approximation verified at 54bec9d1, 2025-06)"),
    flags=(
        Flag("loss_fn.reference_policy_kl_penalty", 0.01, float),
        Flag("loss_fn.reference_policy_kl_type", "k3", str, ("k1", "k2", "k3")),
        Flag("loss_fn.kl_input_clamp_value", 20.0, float, optional=True),
        Flag("loss_fn.kl_output_clamp_value", 10.0, float, optional=True),
        Flag("loss_fn.use_on_policy_kl_approximation", False, bool),
        Flag("loss_fn.token_level_loss", True, bool),
        Flag("loss_fn.use_kl_in_reward", False, bool, help="flag path unverified"),
    ),
    build=_nemo_build,
    bugs=(
        Bug("KL backward lacked the score-function term (k3 in loss gave F; k2 'acted like k1')", "PR #2506",
            "reported fixed before 7ea279ab (unverified here)"),
        Bug("the clamp and the importance weight interact: the weight is detached where the input clamp binds",
            "PR #2958", "reported (unverified here)"),
    ),
    unbiased=("No flag gives G*: the default (k3 in the loss with the weight exp(logp − sg logp)) gives M; "
              "use_kl_in_reward gives a local per-token penalty (k1: M, k3: M − F)."),
    config_format="a NeMo-RL YAML (nested keys under loss_fn:)",
)

LIBRARIES: dict[str, Library] = {lib.name: lib for lib in (_TRL_GRPO, _TRL_RLOO, _VERL, _OPENRLHF, _NEMO)}


def get_library(name: str) -> Library:
    """The registered library ``name``; unknown names raise a ``ValueError`` listing the known ones."""
    try:
        return LIBRARIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown library {name!r}; known libraries: {', '.join(LIBRARIES)}") from None
