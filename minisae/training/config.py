"""The training configuration: TrainConfig (one field per `minisae train` flag), its defaults
(the Gemma Scope recipe, arXiv 2408.05147; TopK per Gao et al., arXiv 2406.04093) and its checks.
minisae.training.train runs it and re-exports every name here.
"""

import dataclasses
import math

from minisae.training import l0control, optim
from minisae.errors import InputError
from minisae.sae import VARIANTS

# Default learning rates: JumpReLU per the Gemma Scope recipe (Lieberum et al. 2024,
# arXiv 2408.05147, App. A), Gated per its paper (Rajamanoharan et al. 2024, arXiv 2404.16014);
# TopK follows Gao et al. (arXiv 2406.04093), lr ∝ 1/√M (optim.topk_lr).
DEFAULT_LR = {"jumprelu": 7e-5, "gated": 3e-4}
# λ when target_l0 is given without a sparsity coefficient (on inputs normalised to E‖x‖² = 1). The
# L0 controller (minisae.training.l0control) moves the thresholds themselves and λ from here:
# JumpReLU's within a factor 100 (it settles where Adam's push on θ is balanced), Gated's within 245 (a Gated λ₀ of 0.1 closed its gates for good at L0* 64 on Gemma 3 activations).
START_COEFF = {"jumprelu": 1e-2, "gated": 0.03}
MAX_THRESHOLD_LR_MULT = 1e4  # θ at 10⁴ × lr already leaves any stable step (lr·1e300 made NaN)
# Warm-ups scaled to the run when not given: the recipe's 1,000 / 10,000 steps, at most these
# fractions of the steps (a 1,000-step run warms lr over 50 steps and λ over 200).
WARMUP_FRAC, SPARSITY_WARMUP_FRAC = 0.05, 0.2
# With target_l0 (JumpReLU, Gated), the L0 warm-up: the target descends from min(8·L0*, M/4) (Gated: M/10) over
# this fraction of the steps, at most L0_WARMUP_MAX steps (minisae.training.l0control), in runs
# whose weights can travel: Adam moves each by at most lr a step, and the warm-up pays only where
# lr × steps >= L0_WARMUP_TRAVEL (measured: docs/derivations/l0_controller.md); else none.
L0_WARMUP_FRAC, L0_WARMUP_MAX, L0_WARMUP_TRAVEL = 1 / 3, 30_000, 1.0


@dataclasses.dataclass
class TrainConfig:
    architecture: str = "jumprelu"        # "jumprelu" | "gated" | "topk" | "batchtopk"
    d_sae: int = 1024                     # M, number of latents
    sparsity_coeff: float | None = None   # λ (JumpReLU: L0 weight, Gated: L1 weight)
    k: int | None = None                  # TopK: latents kept per token (BatchTopK: on average, B·k per batch)
    threshold_rate: float = 0.01          # BatchTopK: averaging rate of the running inference threshold
    matryoshka: tuple | None = None       # BatchTopK, JumpReLU: nested prefix sizes m_1 < m_2 < ... (≤ d_sae)
    bandwidth: float = 0.001              # JumpReLU: ε of the threshold pseudo-derivative
    threshold_init: float | None = None   # JumpReLU: θ at init; None = 0.001, Gemma Scope's (with target_l0: calibrated)
    threshold_param: str = "log"          # JumpReLU: train log θ ("log", the paper) or θ itself ("raw", SAELens)
    penalty: str = "l0"                   # JumpReLU: "l0" (the paper) | "quadratic" (Gemma Scope 2, needs target_l0) | "tanh" (SAELens)
    target_l0: float | None = None        # L0* of the quadratic penalty: λ·(2/L0*)·(L0_b − L0*)² per token
    freq_coeff: float = 0.0               # JumpReLU: weight of minisae's frequency penalty (0 = off)
    freq_target: float = 0.1              # JumpReLU: firing fraction above which a latent is penalised
    tanh_scale: float = 4.0               # JumpReLU penalty="tanh": λ·Σ_i tanh(c·f_i·‖d_i‖), c = tanh_scale
    pre_act_coeff: float = 0.0            # JumpReLU (SAELens): coeff·Σ_dead relu(θ − pre)·‖d‖ on dead latents
    ste_to_input: bool = False            # JumpReLU (SAELens): the θ pseudo-derivative also to π (negated)
    lr: float | None = None               # None = DEFAULT_LR / optim.topk_lr(d_sae)
    adam_beta1: float | None = None       # None = 0.0 (JumpReLU, Gated: Gemma Scope) / 0.9 (TopK, Gao)
    adam_beta2: float = 0.999
    adam_eps: float | None = None         # None = 1e-8 / optim.TOPK_ADAM_EPS (TopK)
    steps: int | None = None              # optimiser steps; or give tokens
    tokens: int | None = None             # training tokens (steps = ceil(tokens / batch_size))
    batch_size: int = 4096                # B
    warmup_steps: int | None = None       # cosine lr warm-up from 0.1·lr; None = min(1000, 5 % of steps)
    sparsity_warmup_steps: int | None = None  # linear λ warm-up from 0 (JumpReLU, Gated); None = min(10000, 20 % of steps)
    l0_warmup_steps: int | None = None    # target_l0 (JumpReLU, Gated): the target descends from 8·L0* over these; None = min(30000, a third of steps) where lr·steps >= 1, else 0
    decay_frac: float = 0.0               # linear lr decay to 0 over this last fraction of steps
    seed: int = 0                         # parameter init (data order belongs to the source)
    backend: str = "numpy"                # "numpy" | "cupy"
    dtype: str = "float32"                # parameter and compute dtype
    dead_window_tokens: int = 10_000_000  # a latent silent this many tokens is dead (AuxK, stats)
    aux_k: int | None = None              # TopK AuxK k'; None = min(512, D // 2)
    aux_coeff: float = 1 / 32             # TopK AuxK weight α
    norm_sample_tokens: int = 65536       # most tokens sampled for C (and TopK's geometric median)
    checkpoint_every: int = 1000          # steps between checkpoints (plus one at the end)
    log_every: int = 50                   # steps between metrics.jsonl lines / progress updates
    eval_tokens: int = 65536              # held-out tokens for the final evaluation (0 = none)
    eval_batch_size: int = 4096
    prefetch: int = 1                     # batches made ahead in a background thread (0 = none)
    threshold_lr_mult: float = 1.0        # JumpReLU: θ's learning rate = this × lr (1 = the paper's single lr)
    controller_gain: float | None = None  # L0 controller: threshold move per unit of error; None = l0control.GAIN (0.1 JumpReLU, 0.02 Gated)

    def uses_controller(self):
        """True when target_l0 is met by the L0 controller (θ calibrated, then moved outside Adam):
        Gated and JumpReLU, every penalty. (TopK/BatchTopK meet it through k.)"""
        return self.target_l0 is not None and self.architecture in ("jumprelu", "gated")

    def uses_dead_mask(self):
        """True when the loss reads which latents are dead (none fired for dead_window_tokens):
        TopK and BatchTopK (the AuxK loss), JumpReLU with the pre-activation penalty."""
        return self.architecture in ("topk", "batchtopk") or (self.architecture == "jumprelu"
                                                                and self.pre_act_coeff > 0)

    def resolved(self, d_in):
        """A copy with every None default filled in for inputs of width d_in; checks values."""
        c = dataclasses.replace(self)
        check_values(c)
        if c.architecture not in VARIANTS:
            raise ValueError(f"architecture: expected one of {sorted(VARIANTS)}, found {c.architecture!r}")
        if c.target_l0 is not None and not (isinstance(c.target_l0, (int, float)) and 0 < c.target_l0 <= c.d_sae):
            raise ValueError(f"target_l0: expected 0 < target_l0 <= d_sae={c.d_sae}, found {c.target_l0!r}")
        if c.target_l0 is not None and c.architecture in ("topk", "batchtopk"):
            if c.k is None:
                c.k = max(1, int(round(c.target_l0)))
            elif c.k != round(c.target_l0):
                raise ValueError(f"k={c.k} and target_l0={c.target_l0} disagree; give one of them")
        if c.uses_controller() and c.sparsity_coeff is None:
            c.sparsity_coeff = START_COEFF[c.architecture]
        if c.controller_gain is None:
            c.controller_gain = l0control.GAIN.get(c.architecture, l0control.GAIN["jumprelu"])
        if not (c.controller_gain > 0 and math.isfinite(c.controller_gain)):
            raise ValueError(f"controller_gain: expected a value > 0, found {c.controller_gain!r}")
        if not (0 < c.threshold_lr_mult <= MAX_THRESHOLD_LR_MULT):  # (NaN fails too)
            raise ValueError(f"threshold_lr_mult: expected a value in (0, {MAX_THRESHOLD_LR_MULT:g}] (θ's learning "
                             f"rate is lr times it), found {c.threshold_lr_mult!r}")
        if c.threshold_lr_mult != 1.0 and c.architecture != "jumprelu":
            raise ValueError(f"threshold_lr_mult is a JumpReLU option; found it set for {c.architecture!r}")
        if c.architecture in ("topk", "batchtopk"):
            if c.k is None or not 0 < c.k <= c.d_sae:
                raise ValueError(f"k: TopK needs 0 < k <= d_sae={c.d_sae}, found {c.k}")
        elif c.sparsity_coeff is None or not c.sparsity_coeff >= 0:
            raise ValueError(f"sparsity_coeff: {c.architecture} needs a value >= 0, found {c.sparsity_coeff}")
        if c.lr is None:
            c.lr = optim.topk_lr(c.d_sae) if c.architecture in ("topk", "batchtopk") else DEFAULT_LR[c.architecture]
        if c.adam_beta1 is None:
            c.adam_beta1 = 0.9 if c.architecture in ("topk", "batchtopk") else 0.0
        if c.adam_eps is None:
            c.adam_eps = optim.TOPK_ADAM_EPS if c.architecture in ("topk", "batchtopk") else 1e-8
        if c.aux_k is None:
            c.aux_k = max(1, min(512, d_in // 2))
        if c.steps is None:
            if c.tokens is None:
                raise ValueError("give steps or tokens (how long to train)")
            c.steps = -(-c.tokens // c.batch_size)
        c.tokens = c.steps * c.batch_size
        if c.warmup_steps is None:  # scaled to the run (the recipe's 1,000 steps at most)
            c.warmup_steps = min(1000, math.ceil(WARMUP_FRAC * c.steps))
        if c.sparsity_warmup_steps is None:
            c.sparsity_warmup_steps = min(10000, math.ceil(SPARSITY_WARMUP_FRAC * c.steps))
        if c.l0_warmup_steps is None:  # scaled to the run: it always ends inside it
            travels = c.uses_controller() and c.lr * c.steps >= L0_WARMUP_TRAVEL
            c.l0_warmup_steps = min(L0_WARMUP_MAX, int(L0_WARMUP_FRAC * c.steps)) if travels else 0
        elif c.l0_warmup_steps and not c.uses_controller():
            raise ValueError("l0_warmup_steps: the L0 warm-up belongs to target_l0 for jumprelu and gated; "
                             f"found it set for {c.architecture!r}" + ("" if c.target_l0 else " without target_l0"))
        elif c.l0_warmup_steps >= c.steps:
            raise ValueError(f"l0_warmup_steps: the target L0 is reached after the L0 warm-up's "
                             f"{c.l0_warmup_steps} steps, and the run has {c.steps}: give fewer or train longer")
        for name in ("d_sae", "steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(c, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, found {getattr(c, name)}")
        if c.threshold_init is not None and not c.threshold_init > 0:
            raise ValueError(f"threshold_init: expected a value > 0, found {c.threshold_init}")
        if c.threshold_param not in ("log", "raw"):
            raise ValueError(f"threshold_param: expected 'log' or 'raw', found {c.threshold_param!r}")
        if c.penalty not in ("l0", "quadratic", "tanh"):
            raise ValueError(f"penalty: expected 'l0', 'quadratic' or 'tanh', found {c.penalty!r}")
        if c.architecture != "jumprelu" and (c.penalty != "l0" or c.threshold_param != "log" or c.freq_coeff
                                             or c.pre_act_coeff or c.ste_to_input):
            raise ValueError(f"penalty, threshold_param, freq_coeff, pre_act_coeff and ste_to_input are "
                             f"JumpReLU options; found them set for {c.architecture!r}")
        if not c.tanh_scale > 0 or not c.pre_act_coeff >= 0:
            raise ValueError(f"tanh_scale > 0 and pre_act_coeff >= 0 expected, found {c.tanh_scale}, {c.pre_act_coeff}")
        if c.penalty == "quadratic" and not (c.target_l0 is not None and 0 < c.target_l0 <= c.d_sae):
            raise ValueError(f"target_l0: the quadratic penalty needs 0 < target_l0 <= d_sae={c.d_sae}, "
                             f"found {c.target_l0}")
        if c.matryoshka is not None:
            if c.architecture not in ("jumprelu", "batchtopk"):
                raise ValueError(f"matryoshka: a BatchTopK or JumpReLU option, found it set for {c.architecture!r}")
            from minisae.sae.common import check_prefixes

            c.matryoshka = list(check_prefixes(c.matryoshka, c.d_sae, "matryoshka"))
        if not 0 < c.threshold_rate <= 1:
            raise ValueError(f"threshold_rate: expected a value in (0, 1], found {c.threshold_rate}")
        if c.threshold_rate != TrainConfig.threshold_rate and c.architecture != "batchtopk":
            raise ValueError(f"threshold_rate is a BatchTopK option (its running inference threshold); found it "
                             f"set for {c.architecture!r}")
        if not c.freq_coeff >= 0 or not 0 <= c.freq_target <= 1:
            raise ValueError(f"freq_coeff >= 0 and 0 <= freq_target <= 1 expected, found {c.freq_coeff}, {c.freq_target}")
        if c.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype: expected 'float32' or 'float64', found {c.dtype!r}")
        if int(c.prefetch) != c.prefetch or c.prefetch < 0:
            raise ValueError(f"prefetch: expected an integer >= 0, found {c.prefetch!r}")
        return c


# field -> (low, high, low inclusive, integer); checked whenever the value is not None
_RANGES = {
    "d_sae": (1, None, True, True), "k": (1, None, True, True), "steps": (1, None, True, True),
    "tokens": (1, None, True, True), "batch_size": (1, None, True, True), "warmup_steps": (0, None, True, True),
    "sparsity_warmup_steps": (0, None, True, True), "l0_warmup_steps": (0, None, True, True),
    "dead_window_tokens": (1, None, True, True),
    "aux_k": (1, None, True, True), "norm_sample_tokens": (1, None, True, True),
    "checkpoint_every": (1, None, True, True), "log_every": (1, None, True, True),
    "eval_tokens": (0, None, True, True), "eval_batch_size": (1, None, True, True), "seed": (0, None, True, True),
    "lr": (0, None, False, False), "sparsity_coeff": (0, None, True, False), "bandwidth": (0, None, False, False),
    "adam_beta1": (0, 1, True, False), "adam_beta2": (0, 1, True, False), "adam_eps": (0, None, False, False),
    "decay_frac": (0, 1, True, False), "aux_coeff": (0, None, True, False),
}


def check_values(cfg):
    """InputError for the first TrainConfig field of the wrong type or out of range, and for
    k / sparsity_coeff given to a variant that does not take it (it would be silently ignored)."""
    for name, (low, high, low_incl, integer) in _RANGES.items():
        v = getattr(cfg, name, None)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and int(v) != v) or not math.isfinite(v):
            raise InputError(f"{name}: expected {'an integer' if integer else 'a finite number'}, found {v!r}")
        if not (v >= low if low_incl else v > low) or (high is not None and v > high):
            bound = f"in [{low}, {high}]" if high is not None else f"{'>=' if low_incl else '>'} {low}"
            raise InputError(f"{name}: expected a value {bound}, found {v!r}")
    arch = str(cfg.architecture)
    if "topk" in arch and cfg.sparsity_coeff is not None:
        raise InputError(f"sparsity_coeff: {arch} keeps the k largest latents and takes no sparsity "
                         f"coefficient; found sparsity_coeff={cfg.sparsity_coeff} (give k instead)")
    if "topk" not in arch and cfg.k is not None:
        raise InputError(f"k: only TopK variants take k; {arch} takes sparsity_coeff (found k={cfg.k})")


def param_names(cfg):
    """The trained parameters' names (JumpReLU's depend on threshold_param)."""
    mod = VARIANTS[cfg.architecture]
    if cfg.architecture == "jumprelu":
        return mod.param_names(cfg.threshold_param)
    return mod.PARAM_NAMES
