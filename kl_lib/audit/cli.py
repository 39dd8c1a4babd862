"""``python -m kl_lib.audit``: which gradient does my library's KL give?

Given a library and its flags (``--set``) or its config file (``--config``), print the KL terms the flags
produce (``kl_lib.audit.registry``), each term's expected gradient in the table's terms (G*, F, M, 0, G* − F, …;
docs/contract.md §4) with a sentence, the exact relative bias, cosine with G* and noise-to-signal on reference toy
policies at a few lengths T (``kl_lib.audit.analysis``), the known upstream bugs of that version, and the flags that
give the unbiased gradient, and the ``--set`` overrides that run the same KL term in kl_lib's trainer
(``python -m kl_lib.rl.train``; :func:`trainer_overrides`). Bad input (unknown library, flag, value or file) is one
line on stderr, exit status 2.

Config files: YAML or JSON (nested keys are joined with dots), or any other text file read as arguments
(``--flag value``, ``--flag=value``, ``key=value``, as in a launch script). In a file, keys the registry does not
know are ignored (and counted) unless their last part mentions ``kl``, which is an error (a likely typo).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from kl_lib.audit import analysis
from kl_lib.audit.registry import LIBRARIES, Library, Resolution, get_library, resolve, unknown_flag_error
from kl_lib.config import KLSetting

__all__ = ["main", "read_config_file", "render", "trainer_overrides"]

SENTENCES = {
    "G*": "the true gradient of the sequence-level KL(π‖π_ref): unbiased",
    "0": "zero in expectation: no regularisation, only noise",
    "F": "a per-token forward KL, KL(π_ref‖π), with the visited states held fixed: biased",
    "M": "the per-token reverse KL with the visited states held fixed (myopic): it ignores how the policy changes "
         "which states are visited; equals G* only at T = 1",
    "G* − F": "the true gradient minus the forward-KL direction (the paper's unstable k3 in reward): biased",
    "G* − M": "the true gradient minus the myopic part: biased",
    "M − F": "the myopic reverse minus the forward direction: biased",
    "F + (G* − F)/T": "mostly F, plus a 1/T share of the true gradient's remaining part: biased",
    "biased": "none of the table's terms: biased",
}
MILD_SCALE, STRONG_SCALE = 0.5, 3.0
EXAMPLES = """examples:
  python -m kl_lib.audit --lib verl
  python -m kl_lib.audit --lib verl --set algorithm.use_kl_in_reward=true --set algorithm.adv_estimator=grpo \\
      --set actor_rollout_ref.rollout.n=8
  python -m kl_lib.audit --lib verl --set actor_rollout_ref.actor.use_kl_loss=true
  python -m kl_lib.audit --lib trl-grpo --set beta=0.04
  python -m kl_lib.audit --lib trl-grpo --config configs/libraries/trl_grpo.yaml
  python -m kl_lib.audit --lib openrlhf --config configs/libraries/openrlhf_args.txt
  python -m kl_lib.audit --lib nemo-rl --lengths 1,4,16
  python -m kl_lib.audit --list-flags verl
"""


def _flatten(data: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(data, dict):
        return {prefix: data} if prefix else {}
    out: dict[str, object] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


def _read_arguments(text: str, library: Library) -> dict[str, object]:
    tokens = shlex.split(text.replace("\\\n", " "), comments=True)
    out: dict[str, object] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i].lstrip("-") if tokens[i].startswith("--") else tokens[i]
        key, eq, value = token.partition("=")
        flag = library.flag_index.get(key)
        if eq:
            out[key] = value
        elif tokens[i].startswith("--"):
            takes_value = not (flag is not None and flag.kind is bool) and i + 1 < len(tokens) \
                and not tokens[i + 1].startswith("--")
            out[key] = tokens[i + 1] if takes_value else True
            i += takes_value
        i += 1
    return out


def read_config_file(path: Path, library: Library) -> tuple[dict[str, object], list[str]]:
    """The registry's flags found in ``path`` and the names of the other (ignored) keys; ValueError if unreadable."""
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist or is not a file")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml", ".json"):
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as exc:
            raise ValueError(f"{path}: not valid {path.suffix[1:].upper()}: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of keys to values at the top level")
        found = _flatten(data)
    else:
        found = _read_arguments(text, library)
    suspicious = [k for k in found if k not in library.flag_index and "kl" in k.rsplit(".", 1)[-1].lower()]
    if suspicious:
        raise unknown_flag_error(library, suspicious)
    ignored = [k for k in found if k not in library.flag_index]
    return {k: v for k, v in found.items() if k in library.flag_index}, ignored


def _parse_sets(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set algorithm.use_kl_in_reward=true")
        out[key.strip()] = value.strip()
    return out


def _class_text(term: analysis.Term, name: str) -> str:
    s = term.setting
    suffix = {"sum": "", "token_mean": "/T", "global_token_mean": "/T",
              "constant": "/C" if term.aggregation_constant else "/T"}[term.aggregation]
    factor = f"(1 − 1/{s.group_size})·" if s.reward_normalization == "group_mean" else ""
    if s.reward_normalization == "group_std":
        return f"≈ G* direction, group-std normalised (Monte Carlo; β cancels){suffix}"
    shown = name if name.startswith(("0", "biased")) else f"{factor}β·({name}){suffix}"
    return f"{shown}: {SENTENCES.get(name, '')}".rstrip(": ")


def _term_lines(term: analysis.Term, lengths: list[int], mc_groups: int) -> list[str]:
    s = term.setting
    lines = [f"  {s.label} — aggregation {term.aggregation}"
             + (f" (C = {term.aggregation_constant:g})" if term.aggregation_constant else "")
             + f", β = {s.beta:g}; from {term.origin}"]
    if s.reward_normalization == "group_std":
        name = "G* direction (Monte Carlo)"
    else:
        name = analysis.classify(term, [analysis.reference_pair(T, MILD_SCALE, seed=T) for T in (1, 2, 4)])
    lines.append(f"    expected gradient: {_class_text(term, name)}")
    lines.append("    T   policies  rel. bias   cos(E g, G*)  noise/signal (one sample)")
    for T in lengths:
        for label, scale in (("mild", MILD_SCALE), ("strong", STRONG_SCALE)):
            r = analysis.analyse_term(term, *analysis.reference_pair(T, scale, seed=T), mc_groups=mc_groups)
            tag = " (Monte Carlo)" if r.monte_carlo else ""
            bias = "n/a" if s.reward_normalization == "group_std" else f"{r.relative_bias:9.3g}"
            lines.append(f"    {T:<3d} {label:<8s}  {bias:>9s}   {r.cosine:11.4f}  {r.noise_to_signal:10.3g}{tag}")
    return lines


def render(library: Library, values: dict[str, object], resolution: Resolution, lengths: list[int],
           mc_groups: int = 2000) -> str:
    """The audit report as text."""
    changed = {k: v for k, v in values.items() if v != library.flag_index[k].default}
    out = [f"library: {library.name} — {library.version}",
           "read from: " + "; ".join(library.sources),
           "flags: " + (", ".join(f"{k}={v}" for k, v in changed.items()) if changed else "all defaults")]
    if library.defaults_note and not changed:
        out.append(f"note: {library.defaults_note}")
    out.append("KL terms:")
    if not resolution.terms:
        out.append("  none — expected gradient 0: the KL is off, so nothing regularises toward the reference")
    for term in resolution.terms:
        out.extend(_term_lines(term, lengths, mc_groups))
    if resolution.terms:
        out.append(f"  (rel. bias: ‖E g − β·a·G*‖/‖β·a·G*‖ with a the aggregation's 1/T; 'mild' policies have logits "
                   f"N(0, {MILD_SCALE}²), 'strong' N(0, {STRONG_SCALE}²), where clamps bind; V = 3, exact unless marked)")
    out.extend(f"note: {n}" for n in resolution.notes)
    out.extend(_trainer_lines(resolution))
    out.append("known upstream bugs for this version:")
    out.extend(f"  - {b.title} [{b.reference}]: {b.status}" for b in library.bugs) if library.bugs else out.append("  none recorded")
    out.append(f"unbiased gradient (G*) in {library.name}: {library.unbiased}")
    return "\n".join(out)


_ALWAYS_SHOWN = ("estimator", "placement", "beta")
_SETTING_DEFAULTS = {f.name: f.default for f in dataclasses.fields(KLSetting)}


def _override_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def trainer_overrides(term: analysis.Term) -> list[str]:
    """The ``--set`` items (``kl.estimator=k3``, …) with which ``python -m kl_lib.rl.train`` runs ``term``'s KL term:
    its estimator, placement and β, every other ``KLSetting`` field that is not at its default, the aggregation
    (which kl_lib's trainer applies to the policy loss too, as verl does) and, for a group-normalised penalty,
    the trainer's ``group_size`` (the groups the penalty is normalised in)."""
    s = term.setting
    items = [f"kl.{name}={_override_value(getattr(s, name))}" for name in _SETTING_DEFAULTS
             if name in _ALWAYS_SHOWN or getattr(s, name) != _SETTING_DEFAULTS[name]]
    items.append(f"aggregation={term.aggregation}")
    if term.aggregation_constant is not None:
        items.append(f"aggregation_constant={_override_value(float(term.aggregation_constant))}")
    if s.reward_normalization != "none":
        items.append(f"group_size={s.group_size}")
    return items


def _trainer_lines(resolution: Resolution) -> list[str]:
    if not resolution.terms:
        return []
    out = ["in kl_lib's trainer (the same KL term; the advantage, policy loss and sampling are kl_lib's own):"]
    if len(resolution.terms) > 1:
        out.append(f"  not as one run: the trainer runs one KL term per run and these flags give "
                   f"{len(resolution.terms)}; each term alone:")
    for term in resolution.terms:
        out.append("  python -m kl_lib.rl.train " + " ".join(f"--set {item}" for item in trainer_overrides(term)))
        if term.setting.reward_normalization != "none":
            out.append("    (the trainer normalises the KL penalty within the group on its own, not the task reward "
                       "plus the penalty)")
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kl_lib.audit", description=__doc__.split("\n\n")[0],
                                epilog=EXAMPLES + "\nlibraries: " + ", ".join(LIBRARIES),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lib", help=f"library: {', '.join(LIBRARIES)}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a flag value (repeatable)")
    p.add_argument("--config", type=Path, help="the library's config file (YAML/JSON, or arguments as text)")
    p.add_argument("--lengths", default="1,2,4,8", help="sequence lengths T of the toy analysis (default 1,2,4,8)")
    p.add_argument("--mc-groups", type=int, default=2000, help="Monte Carlo groups for group-std normalisation")
    p.add_argument("--list-flags", metavar="LIB", help="list a library's known flags with defaults and exit")
    return p


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--lengths {text!r}: expected comma-separated integers, e.g. 1,2,4,8") from None
    if not lengths or min(lengths) < 1 or max(lengths) > 8:
        raise ValueError(f"--lengths {text!r}: each T must be between 1 and 8 (V**T sequences are enumerated)")
    return lengths


def _run(args: argparse.Namespace) -> str:
    if args.list_flags:
        lib = get_library(args.list_flags)
        return "\n".join(f"{f.name} (default {f.default!r}{', one of ' + ', '.join(f.choices) if f.choices else ''})"
                         for f in lib.flags)
    if not args.lib:
        raise ValueError(f"--lib is required; known libraries: {', '.join(LIBRARIES)}")
    library = get_library(args.lib)
    lengths = _lengths(args.lengths)
    values: dict[str, object] = {}
    ignored: list[str] = []
    if args.config is not None:
        values, ignored = read_config_file(args.config, library)
    values.update(_parse_sets(args.set))
    full, resolution = resolve(library, values)
    report = render(library, full, resolution, lengths, args.mc_groups)
    return report + (f"\nignored {len(ignored)} key(s) of {args.config} that do not concern the KL" if ignored else "")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        print(_run(args))
    except ValueError as exc:
        print(f"kl-audit: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
