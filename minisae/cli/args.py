"""Checks on the `minisae` command line, made before any work starts, and how --help reads.

    parser = OneLineParser(prog="minisae")       # argparse errors: one line, exit status 2
    show_defaults(parser)                        # every subcommand's --help shows each default
    check_values(parser, args)                   # ranges and finiteness, named by the flag
    check_arch_flags(args)                       # --k with jumprelu, --lambda with topk, ... refused;
                                                 # train's required --steps and --lambda or --k, by flag

The ranges live in one table, RANGES, keyed by the argument's dest, so a flag added to any
subcommand is checked by adding one line here.
"""

import argparse
import math
import sys

from minisae.errors import InputError


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (plus the --help hint) and exit 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to every option that has a default its help does not state already."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is False or default == argparse.SUPPRESS
                or "default" in text.lower()):
            return text
        shown = default if not isinstance(default, float) else f"{default:g}"
        return f"{text} (default: {shown})".strip()


def show_defaults(parser):
    """Give `parser` and each of its subcommands the DefaultsHelpFormatter; options without help
    text get an empty one, so that their default is shown too."""
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    for p in parsers:
        p.formatter_class = DefaultsHelpFormatter
        for action in p._actions:
            if action.help is None and action.option_strings and not (action.default is None or action.default is False):
                action.help = "(default: %(default)s)"


# dest (or (command, dest) where one command differs) -> (kind, low, high, low inclusive);
# kind "int" or "float"; None bounds are open. A list-valued option (the sweep) has each element checked.
RANGES = {
    "d_sae": ("int", 1, None, True), "k": ("int", 1, None, True), "aux_k": ("int", 1, None, True),
    "steps": ("int", 1, None, True), "tokens": ("int", 1, None, True), "batch_size": ("int", 1, None, True),
    "warmup_steps": ("int", 0, None, True), "sparsity_warmup_steps": ("int", 0, None, True),
    "l0_warmup_steps": ("int", 0, None, True),
    "dead_window_tokens": ("int", 1, None, True), "checkpoint_every": ("int", 1, None, True),
    "log_every": ("int", 1, None, True), "eval_tokens": ("int", 0, None, True),
    "holdout_tokens": ("int", 0, None, True), "seed": ("int", 0, 2**63 - 1, True),
    "data_seed": ("int", 0, 2**63 - 1, True), "lm_tokens": ("int", 1, None, True),
    "lm_batch_size": ("int", 1, None, True), "seq_len": ("int", 2, None, True),
    "max_tokens": ("int", 1, None, True), "shard_tokens": ("int", 1, None, True), "jobs": ("int", 1, None, True),
    "d_in": ("int", 1, None, True), "n_features": ("int", 1, None, True), "topk": ("int", 1, None, True),
    "lr": ("float", 0, None, False), "sparsity_coeff": ("float", 0, None, True),
    "decay_frac": ("float", 0, 1, True), "bandwidth": ("float", 0, None, False),
    "aux_coeff": ("float", 0, None, True), "true_l0": ("float", 0, None, False),
    "max_freq": ("float", 0, 1, False), "noise_std": ("float", 0, None, True),
    "offset_norm": ("float", 0, None, True), "target_l0": ("float", 0, None, False),
    "threshold_init": ("float", 0, None, False), "freq_coeff": ("float", 0, None, True),
    ("eval", "eval_tokens"): ("int", 1, None, True),  # train: 0 = no final evaluation
    "freq_target": ("float", 0, 1, True), "threshold_rate": ("float", 0, 1, False),
    "shards": ("int", 1, None, True), "accumulate": ("int", 1, None, True), "jumprelu": ("float", 0, None, True), "gated": ("float", 0, None, True),
    "targets": ("float", 0, None, False), "seeds": ("int", 1, None, True), "threshold_lr_mult": ("float", 0, None, False),
}


def _flag_names(parser, command):
    """dest -> the option string the user typed (its longest form) for subcommand `command`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return {a.dest: max(a.option_strings, key=len) for a in action.choices[command]._actions
                    if a.option_strings}
    return {}


def _describe(kind, low, high, low_incl):
    what = "an integer" if kind == "int" else "a number"
    if high is not None and low is not None:
        return f"{what} in {'[' if low_incl else '('}{low:g}, {high:g}]"
    return f"{what} {'>=' if low_incl else '>'} {low:g}"


def check_values(parser, a):
    """Raise InputError for the first option of namespace `a` outside its RANGES entry."""
    command = getattr(a, "command", None)
    names = _flag_names(parser, command)
    for dest in [d for d in RANGES if isinstance(d, str)]:
        kind, low, high, low_incl = RANGES.get((command, dest), RANGES[dest])
        values = getattr(a, dest, None)
        if values is None or dest not in names:
            continue
        for v in (values if isinstance(values, list) else [values]):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (v >= low if low_incl else v > low) and (high is None or v <= high)
            if not ok:
                raise InputError(f"{names[dest]}: expected {_describe(kind, low, high, low_incl)}, found {v!r}")


def _uses_k(arch):
    return "topk" in arch  # TopK and its relatives keep k latents; the others take λ


# flag dest -> (the option as typed, which architectures it applies to)
_ARCH_FLAGS = {
    "sparsity_coeff": ("--sparsity-coeff/--lambda", lambda arch: not _uses_k(arch)),
    "k": ("--k", _uses_k),
    "aux_k": ("--aux-k", _uses_k),
    "aux_coeff": ("--aux-coeff", _uses_k),
    "bandwidth": ("--bandwidth", lambda arch: arch == "jumprelu"),
    "threshold_init": ("--threshold-init", lambda arch: arch == "jumprelu"),
}


# option dest -> (its flag, the option it needs, that flag): given without it, it would be ignored
_REQUIRES = {"holdout_tokens": ("--holdout-tokens", "activations", "--activations")}


def check_arch_flags(a):
    """Refuse options given on the command line that would be ignored: for the chosen --arch, or
    without the option they work with (--holdout-tokens without --activations); then the
    required ones (check_required)."""
    check_required(a)
    for dest, (flag, needs, needs_flag) in _REQUIRES.items():
        if getattr(a, dest, None) and not getattr(a, needs, None) and hasattr(a, needs):
            raise InputError(f"{flag} needs {needs_flag} (it would be ignored without it)")
    arch = getattr(a, "arch", None)
    if arch is None:
        return
    for dest, (flag, applies) in _ARCH_FLAGS.items():
        if getattr(a, dest, None) is not None and not applies(arch):
            hint = " (TopK takes --k)" if dest == "sparsity_coeff" else (
                " (JumpReLU and Gated take --sparsity-coeff/--lambda)" if dest == "k" else "")
            raise InputError(f"{flag} does not apply to --arch {arch}; leave it out{hint}")


def check_required(a):
    """`minisae train`: refuse, naming the flag, a run that lacks how long to train (--steps or
    --tokens) or its sparsity setting (--lambda for JumpReLU and Gated, --k for TopK and BatchTopK,
    either unless --target-l0 sets it), and the combinations TrainConfig would refuse in its own
    (Python) names: --k or --target-l0 above --d-sae, --k and --target-l0 at odds, --penalty
    quadratic without --target-l0, --threshold-lr-mult on a variant without θ."""
    if getattr(a, "command", None) != "train":
        return
    if a.target_l0 is not None and a.target_l0 > a.d_sae:
        raise InputError(f"--target-l0: expected at most --d-sae ({a.d_sae}) latents per token, found {a.target_l0:g}")
    if a.arch == "jumprelu" and a.penalty == "quadratic" and a.target_l0 is None:
        raise InputError("--penalty quadratic needs --target-l0, the L0* it pulls L0 towards")
    if a.arch != "jumprelu" and a.threshold_lr_mult != 1.0:
        raise InputError(f"--threshold-lr-mult does not apply to --arch {a.arch}; leave it out (JumpReLU's θ only)")
    if _uses_k(a.arch) and a.k is not None and a.target_l0 is not None and a.k != round(a.target_l0):
        raise InputError(f"--k {a.k} and --target-l0 {a.target_l0:g} disagree; give one of them")
    if a.steps is None and a.tokens is None:
        raise InputError("--steps is required: how many optimiser steps to train (or give --tokens)")
    if _uses_k(a.arch):
        if a.k is None and a.target_l0 is None:
            raise InputError(f"--k is required for --arch {a.arch}: the latents kept per token "
                             "(or give --target-l0, which sets k)")
        if a.k is not None and a.k > a.d_sae:
            raise InputError(f"--k: expected at most --d-sae ({a.d_sae}) latents per token, found {a.k}")
    elif a.sparsity_coeff is None and (a.target_l0 is None or (a.arch == "jumprelu" and a.penalty == "quadratic")):
        raise InputError(f"--lambda (--sparsity-coeff) is required for --arch {a.arch}: the sparsity "
                         "coefficient λ, e.g. --lambda 6e-4 (or give --target-l0, which sets λ as it trains)")
    warn_short_run(a)


def warn_short_run(a):
    """One line on stderr when `minisae train` would end inside warm-ups given on the command line
    (the learning rate's, and for λ-penalised variants λ's): the SAE written would be far from
    trained, silently. Warm-ups left out scale to the run and never warn."""
    steps = a.steps if a.steps is not None else -(-a.tokens // a.batch_size)
    # warm-ups left out are scaled to the run (minisae.training.config): only given ones can be too long
    inside = [f"the learning rate's ({a.warmup_steps} steps, --warmup-steps)"] \
        if a.warmup_steps is not None and steps < a.warmup_steps else []
    if not _uses_k(a.arch) and a.sparsity_warmup_steps is not None and steps < a.sparsity_warmup_steps:
        inside.append(f"λ's ({a.sparsity_warmup_steps} steps, --sparsity-warmup-steps)")
    from minisae.dist import launch_rank

    if inside and launch_rank() == 0:  # under mpiexec, once
        sys.stderr.write(f"minisae train: warning: {steps} steps end inside the warm-up of {' and '.join(inside)}: "
                         "the SAE will be far from trained; shorten the warm-ups or train longer\n")
