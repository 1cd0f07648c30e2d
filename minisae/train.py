"""Training loop for the three SAE variants: the Gemma Scope recipe (arXiv 2408.05147),
checkpoints, resume.

    from minisae.data.synthetic import SyntheticActivations, SyntheticConfig
    from minisae.train import TrainConfig, train
    source = SyntheticActivations(SyntheticConfig(d_in=64, n_features=512))
    result = train(TrainConfig("jumprelu", d_sae=1024, sparsity_coeff=3e-3, steps=2000,
                               batch_size=1024), source, "runs/jr")
    result.sae.save("my_sae")   # already saved to runs/jr/sae

One step: x = x_raw / C (C set once so that E‖x‖² = 1) → the variant's `forward_backward` (its
hand-written backward; row-sparse on NumPy when few latents fire, the latents never held as a
dense (B, M) array) → the decoder gradient's component along each decoder row removed → Adam →
decoder rows renormalised; the last three in place (minisae.optim). The learning rate follows a cosine warm-up, the sparsity coefficient a linear one.

A data source is any object with
    d_in                          width of the activations
    batch(step, batch_size)       (batch_size, d_in) float32 NumPy: the training batch of `step`,
                                  a pure function of step (so a resumed run sees the same data)
    sample(n)                     (n, d_in) float32 NumPy: a fixed sample to estimate C and TopK's b_dec
minisae.data.synthetic.SyntheticActivations and minisae.data.activations.ActivationStore are two.
`batch` is called from a background thread, one step ahead of the training step (minisae.prefetch;
TrainConfig.prefetch = 0 calls it in the loop instead); nothing else calls the source meanwhile.

Resume guarantee: a checkpoint holds everything the next step reads (parameters, Adam moments and
step count, the dead-latent counters, the step number, C, the config). Data and schedules are pure
functions of the step, so `train(..., resume=True)` after an interruption ends with parameters
bitwise equal to those of an uninterrupted run (tests/test_train.py proves it).

Files in out_dir: config.json, checkpoint.safetensors (atomic, replaced every checkpoint_every
steps; never written with non-finite values), metrics.jsonl (one JSON object per log step),
sae/ (the release SAE, SAELens folder format, C and the pre-encoder bias folded in), eval.json.

Legend: B tokens in a batch, D d_in, M d_sae (latents).
"""

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy

from minisae import l0control, optim
from minisae.errors import (FileFormatError, InputError, MinisaeError, OutputExistsError, ResourceError, TrainingError,
                            storage_error)
from minisae.io.files import check_output_dir, make_dir, memory_limit_bytes, parse_json, read_json, write_atomic
from minisae.prefetch import Prefetcher
from minisae.progress import progress_bar
from minisae.sae import VARIANTS
from minisae.io.safetensors_io import SafetensorsError, SafetensorsFile, save_file
from minisae.xp import asarray, get_xp, to_numpy

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "minisae-checkpoint-1"

# Default learning rates: JumpReLU per the Gemma Scope recipe (Lieberum et al. 2024,
# arXiv 2408.05147, App. A), Gated per its paper (Rajamanoharan et al. 2024, arXiv 2404.16014);
# TopK follows Gao et al. (arXiv 2406.04093), lr ∝ 1/√M (optim.topk_lr).
DEFAULT_LR = {"jumprelu": 7e-5, "gated": 3e-4}
# The λ controller's starting λ when target_l0 is given without a sparsity coefficient (on inputs
# normalised to E‖x‖² = 1; the controller moves it by up to a factor e per 100 steps).
START_COEFF = {"jumprelu": 1e-2, "gated": 0.1}


class CheckpointError(FileFormatError):
    """A checkpoint is missing, unreadable, truncated or does not fit the config."""


@dataclasses.dataclass
class TrainConfig:
    architecture: str = "jumprelu"        # "jumprelu" | "gated" | "topk" | "batchtopk"
    d_sae: int = 1024                     # M, number of latents
    sparsity_coeff: float | None = None   # λ (JumpReLU: L0 weight, Gated: L1 weight)
    k: int | None = None                  # TopK: latents kept per token (BatchTopK: on average, B·k per batch)
    threshold_rate: float = 0.01          # BatchTopK: averaging rate of the running inference threshold
    matryoshka: tuple | None = None       # BatchTopK, JumpReLU: nested prefix sizes m_1 < m_2 < ... (≤ d_sae)
    bandwidth: float = 0.001              # JumpReLU: ε of the threshold pseudo-derivative
    threshold_init: float | None = None   # JumpReLU: θ at init; None = 0.001, Gemma Scope's (see below)
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
    warmup_steps: int = 1000              # cosine lr warm-up from 0.1·lr
    sparsity_warmup_steps: int = 10000    # linear λ warm-up from 0 (JumpReLU, Gated)
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
    controller_kp: float = l0control.DEFAULT_KP  # λ controller gains (with target_l0; minisae.l0control)
    controller_ki: float = l0control.DEFAULT_KI

    def uses_controller(self):
        """True when target_l0 is met by the λ controller: Gated, and JumpReLU with the L0 (or tanh) penalty.
        (TopK/BatchTopK meet it through k, JumpReLU's quadratic penalty through its own target.)"""
        return self.target_l0 is not None and (
            self.architecture == "gated" or (self.architecture == "jumprelu" and self.penalty in ("l0", "tanh")))

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
        if c.uses_controller() and not c.sparsity_coeff > 0:
            raise ValueError(f"sparsity_coeff: the λ controller starts from a value > 0, found {c.sparsity_coeff}")
        if not (c.threshold_lr_mult > 0 and math.isfinite(c.threshold_lr_mult)):
            raise ValueError(f"threshold_lr_mult: expected a value > 0, found {c.threshold_lr_mult!r}")
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
    "sparsity_warmup_steps": (0, None, True, True), "dead_window_tokens": (1, None, True, True),
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


def memory_estimate(cfg, d_in):
    """Bytes one training run holds, roughly: the parameters four times over (values, Adam m and
    v, gradients) and about six (B, M) arrays of a step (pre-activations, latents, gradients, masks)."""
    itemsize = numpy.dtype(cfg.dtype).itemsize
    n_params = 2 * d_in * cfg.d_sae + 4 * cfg.d_sae + d_in  # W_enc, W_dec, the (M,) vectors, b_dec
    return itemsize * (4 * n_params + 6 * cfg.batch_size * cfg.d_sae)


def check_memory(cfg, d_in, xp):
    """ResourceError, before anything is allocated, when the run cannot fit this machine's memory
    (host memory on NumPy, the device's on CuPy)."""
    need = memory_estimate(cfg, d_in)
    have, where = memory_limit_bytes(), "memory"
    if xp is not numpy:
        try:
            have, where = int(xp.cuda.Device().mem_info[1]), "GPU memory"
        except Exception:  # no device query: the host bound stands
            pass
    if need > have:
        raise ResourceError(f"d_sae={cfg.d_sae}, d_in={d_in}, batch_size={cfg.batch_size} ({cfg.dtype}) needs about "
                            f"{need / 2**30:.1f} GiB, more than this machine's {have / 2**30:.1f} GiB of {where}: "
                            "choose a smaller --d-sae or --batch-size")


@dataclasses.dataclass
class TrainResult:
    sae: object            # minisae.io.saefile.SAE, release form (what sae/ holds)
    params: dict           # training-form parameters (NumPy), on inputs x_raw / scale
    scale: float           # C
    steps: int
    summary: dict          # final evaluation (minisae.evaluate.evaluate_sae), {} if eval_tokens = 0
    out_dir: Path


# Config fields a resumed run may change without changing its result.
_RESUME_FREE = {"checkpoint_every", "log_every", "backend", "eval_tokens", "eval_batch_size",
                "prefetch"}


def param_names(cfg):
    """The trained parameters' names (JumpReLU's depend on threshold_param)."""
    mod = VARIANTS[cfg.architecture]
    if cfg.architecture == "jumprelu":
        return mod.param_names(cfg.threshold_param)
    return mod.PARAM_NAMES


def hypers_at(cfg, step, dead_mask=None, coeff=None):
    """The variant's forward/backward keyword arguments at `step` (sparsity warm-up applied to
    `coeff`, the λ controller's value, or else cfg.sparsity_coeff)."""
    if cfg.architecture == "topk":
        return {"k": cfg.k, "aux_k": cfg.aux_k, "aux_coeff": cfg.aux_coeff, "dead_mask": dead_mask}
    if cfg.architecture == "batchtopk":
        return {"k": cfg.k, "aux_k": cfg.aux_k, "aux_coeff": cfg.aux_coeff, "dead_mask": dead_mask,
                "prefixes": None if cfg.matryoshka is None else tuple(cfg.matryoshka)}
    coeff = optim.sparsity_coeff_at(step, coeff=cfg.sparsity_coeff if coeff is None else coeff,
                                    warmup_steps=cfg.sparsity_warmup_steps)
    if cfg.architecture == "jumprelu":
        h = {"sparsity_coeff": coeff, "bandwidth": cfg.bandwidth, "penalty": cfg.penalty}
        if cfg.penalty == "quadratic":
            h["target_l0"] = cfg.target_l0
        if cfg.freq_coeff > 0:
            h.update(freq_coeff=cfg.freq_coeff, freq_target=cfg.freq_target)
        if cfg.matryoshka is not None:
            h["prefixes"] = tuple(cfg.matryoshka)
        if cfg.penalty == "tanh":
            h["tanh_scale"] = cfg.tanh_scale
        if cfg.pre_act_coeff > 0:
            h.update(pre_act_coeff=cfg.pre_act_coeff, dead_mask=dead_mask)
        if cfg.ste_to_input:
            h["ste_to_input"] = True
        return h
    return {"sparsity_coeff": coeff}


SCALE_REL_SE = 0.005    # stop sampling for C once the standard error of E‖x‖² is this fraction of it
SCALE_FIRST_TOKENS = 4096  # first sample size for C; doubled until the rule above holds
SCALE_CHUNK_ROWS = 8192    # rows per float32 pass when summing squared norms


def scale_statistics(x):
    """(n, sum ‖x_b‖², sum ‖x_b‖⁴) of a sample x (N, D), read in float32 chunks of
    SCALE_CHUNK_ROWS rows: the squared norm of each row in float32 (a D-term sum), the sums over
    rows in float64. No float64 copy of the sample is made."""
    s1 = s2 = 0.0
    for i in range(0, x.shape[0], SCALE_CHUNK_ROWS):
        chunk = numpy.asarray(x[i:i + SCALE_CHUNK_ROWS], dtype=numpy.float32)  # (n, D)
        if not numpy.isfinite(chunk).all():
            raise TrainingError("the sample used to estimate the normalising constant holds NaN or inf values")
        sq = numpy.einsum("bd,bd->b", chunk, chunk).astype(numpy.float64)  # (n,) ‖x_b‖²
        s1 += float(sq.sum())
        s2 += float((sq * sq).sum())
    return x.shape[0], s1, s2


def estimate_scale(source, max_tokens, *, rel_se=SCALE_REL_SE, first=SCALE_FIRST_TOKENS):
    """(C, sample): C = sqrt(mean ‖x‖²) over a sample of the source sized by its own standard error.

    Draws source.sample(n) with n = first, 2·first, 4·first, ... and stops as soon as the
    standard error of the mean squared norm, sqrt(var(‖x‖²) / n), is at most rel_se of that
    mean, or n reaches max_tokens. With rel_se = 0.5 % C is then known to about 0.25 % (one
    standard error), which is all a fixed rescaling of the inputs needs; typical activations stop
    after 4k–32k tokens instead of reading max_tokens. The sample the estimate stopped at is
    returned too (TopK's geometric median uses it). Raises TrainingError on NaN/inf or an
    all-zero sample.
    """
    n = max(1, min(int(first), int(max_tokens)))
    while True:
        sample = numpy.asarray(source.sample(n), dtype=numpy.float32)  # (n, D)
        count, s1, s2 = scale_statistics(sample)
        mean = s1 / count
        var = max(s2 / count - mean * mean, 0.0) * count / max(count - 1, 1)
        if n >= max_tokens or math.sqrt(var / count) <= rel_se * mean:
            break
        n = min(2 * n, int(max_tokens))
    if not mean > 0:
        raise TrainingError("the activation sample is all zeros: cannot normalise it (E‖x‖² = 0)")
    return math.sqrt(mean), sample


def fresh_state(cfg, source, xp):
    """Initial training state: parameters (each variant's published init), Adam, counters, C."""
    mod = VARIANTS[cfg.architecture]
    scale, sample = estimate_scale(source, cfg.norm_sample_tokens)  # C, (N, D)
    if cfg.architecture == "jumprelu":
        # log θ moves by about lr per Adam step, so a short run cannot travel from 0.001 to the
        # scale of its pre-activations; small-D runs (minisae compare) start θ nearer to it
        params = mod.init(source.d_in, cfg.d_sae, seed=cfg.seed, xp=xp, dtype=cfg.dtype,
                          threshold_param=cfg.threshold_param,
                          threshold_init=cfg.threshold_init or mod.THRESHOLD_INIT)
    else:
        params = mod.init(source.d_in, cfg.d_sae, seed=cfg.seed, xp=xp, dtype=cfg.dtype)
    if cfg.architecture in ("topk", "batchtopk"):  # b_dec = geometric median of the (normalised) data (Gao et al.)
        from minisae.sae.common import geometric_median

        xs = asarray(sample / scale, xp, cfg.dtype)  # (N, D)
        params["b_dec"] = asarray(geometric_median(xs, xp=xp), xp, cfg.dtype)  # (D,)
    return {
        "step": 0,
        "scale": scale,
        "params": params,
        "adam": optim.adam_init(params),
        "since_fired": xp.zeros(cfg.d_sae, dtype=xp.int64),  # (M,) tokens since each latent fired
        "batchtopk_threshold": 0.0,  # BatchTopK's running inference threshold (batchtopk.update_threshold)
        "threshold_updates": 0,      # ... and how many batches it has averaged
        "controller": None,          # the λ controller's state (minisae.l0control), when target_l0 uses it
    }


def save_checkpoint(path, state, cfg):
    """Write the whole training state to one safetensors file, atomically (temp, fsync, replace)."""
    path = Path(path)
    tensors = {"since_fired": to_numpy(state["since_fired"])}
    for k, v in state["params"].items():
        tensors[f"params.{k}"] = to_numpy(v)
        tensors[f"adam_m.{k}"] = to_numpy(state["adam"]["m"][k])
        tensors[f"adam_v.{k}"] = to_numpy(state["adam"]["v"][k])
    info = {
        "format": CHECKPOINT_FORMAT,
        "step": state["step"],
        "adam_step": int(state["adam"]["step"]),
        "scale": state["scale"],
        "batchtopk_threshold": float(state.get("batchtopk_threshold", 0.0)),
        "threshold_updates": int(state.get("threshold_updates", 0)),
        "controller": state.get("controller"),
        "config": dataclasses.asdict(cfg),
    }
    # save_file writes a temp file, fsyncs and renames it; on a failure (a full disk: StorageError)
    # the temp file is removed and the previous checkpoint is left as it was
    save_file(tensors, path, metadata={"minisae": json.dumps(info)})


def load_checkpoint(path, cfg, xp):
    """Read a checkpoint written by save_checkpoint; every name, shape and the config are checked."""
    path = Path(path)
    try:
        with SafetensorsFile(path) as f:
            info = parse_json((f.metadata or {}).get("minisae", "null") or "null", f"{path}: metadata",
                              error=CheckpointError)
            if not isinstance(info, dict) or info.get("format") != CHECKPOINT_FORMAT:
                raise CheckpointError(f"{path}: not a minisae training checkpoint (no {CHECKPOINT_FORMAT!r} metadata)")
            _check_checkpoint_info(path, info)
            arrays = {name: numpy.array(f.get(name)) for name in f.keys()}
    except (SafetensorsError, OSError) as e:
        raise CheckpointError(
            f"{path}: cannot read the checkpoint ({e}); it may be truncated or corrupt. It was left "
            "untouched: restore it, or move it away to start training over"
        ) from None
    _check_resume_config(path, info, cfg)
    params, m, v = {}, {}, {}
    for k in param_names(cfg):
        for store, prefix in ((params, "params"), (m, "adam_m"), (v, "adam_v")):
            name = f"{prefix}.{k}"
            if name not in arrays:
                raise CheckpointError(f"{path}: tensor {name!r} is missing")
            store[k] = asarray(arrays[name], xp)
    if "since_fired" not in arrays or arrays["since_fired"].shape != (cfg.d_sae,):
        raise CheckpointError(f"{path}: tensor 'since_fired' missing or not of shape ({cfg.d_sae},)")
    for k, a in params.items():
        if numpy.dtype(str(a.dtype)).kind != "f" or m[k].shape != a.shape or v[k].shape != a.shape:
            raise CheckpointError(f"{path}: params.{k} ({a.dtype} {tuple(a.shape)}) and its Adam moments "
                                  f"({tuple(m[k].shape)}, {tuple(v[k].shape)}) must be floating point of one shape")
    if tuple(params["W_enc"].shape)[1:] != (cfg.d_sae,):
        raise CheckpointError(f"{path}: params.W_enc has shape {tuple(params['W_enc'].shape)}, expected (d_in, {cfg.d_sae})")
    for k, a in params.items():
        if not bool(xp.isfinite(a).all()):
            raise CheckpointError(f"{path}: params.{k} holds non-finite values")
    return {
        "step": int(info["step"]),
        "scale": float(info["scale"]),
        "params": params,
        "adam": {"step": int(info["adam_step"]), "m": m, "v": v},
        "since_fired": asarray(arrays["since_fired"], xp),
        "batchtopk_threshold": float(info.get("batchtopk_threshold", 0.0)),
        "threshold_updates": int(info.get("threshold_updates", 0)),
        "controller": info.get("controller"),
    }


def _check_checkpoint_info(path, info):
    """The checkpoint metadata's fields have the types save_checkpoint writes."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    ok = (isinstance(info.get("config"), dict) and count(info.get("step")) and count(info.get("adam_step"))
          and isinstance(info.get("scale"), (int, float)) and not isinstance(info.get("scale"), bool)
          and math.isfinite(info["scale"]) and info["scale"] > 0)
    if not ok:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata (expected config, step, adam_step and a "
                              "positive scale); it was left untouched: restore it, or move it away to start over")


def _check_resume_config(path, info, cfg):
    saved, now = info["config"], dataclasses.asdict(cfg)
    free = set(_RESUME_FREE)
    if cfg.decay_frac == 0 and saved.get("decay_frac", 0) == 0:
        free |= {"steps", "tokens"}  # without decay the schedule does not depend on the length
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in now if k not in free and saved.get(k) != now[k]]
    if diff:
        raise CheckpointError(f"{path}: cannot resume, the config differs from the checkpoint's: " + "; ".join(diff))
    if int(info["step"]) > cfg.steps:
        raise CheckpointError(f"{path}: the checkpoint is at step {info['step']}, past steps={cfg.steps}")


def _params_finite(params, xp):
    return all(bool(xp.isfinite(a).all()) for a in params.values())


def _append_jsonl(path, rows):
    if not rows:
        return
    try:
        with open(path, "a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
    except OSError as e:
        raise storage_error(e, path) from e


def _truncate_metrics(path, step):
    """On resume, drop metric lines logged after the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the interruption
    _write_text_atomic(path, "".join(s + "\n" for s in keep))


def _write_text_atomic(path, text):
    write_atomic(path, text)


def is_run_folder(folder):
    """True when `folder` is a training run folder: its config.json was written by train()."""
    try:
        cfg = read_json(Path(folder) / "config.json")
    except (MinisaeError, OSError):
        return False
    return isinstance(cfg.get("train"), dict) and "source" in cfg


def _source_info(source):
    describe = getattr(source, "describe", None)
    info = describe() if callable(describe) else {"type": type(source).__name__}
    scfg = getattr(source, "cfg", None)
    if dataclasses.is_dataclass(scfg):  # e.g. SyntheticActivations: its whole config
        info["config"] = dataclasses.asdict(scfg)
    return {**info, "d_in": int(source.d_in)}


def train(cfg, source, out_dir, *, resume=False, overwrite=False, progress=True):
    """Train an SAE on `source`; write checkpoints, metrics and the release SAE into out_dir.

    resume=True continues from out_dir/checkpoint.safetensors (or starts afresh if there is none);
    resume=False refuses a folder that already holds a checkpoint unless overwrite=True.
    Raises TrainingError (non-finite values; the last good checkpoint stays) and CheckpointError.
    """
    from minisae.evaluate import evaluate_sae
    from minisae.io.saefile import SAE

    cfg = cfg.resolved(int(source.d_in))
    xp = get_xp(cfg.backend)
    check_memory(cfg, int(source.d_in), xp)
    mod = VARIANTS[cfg.architecture]
    out_dir = Path(out_dir)
    check_output_dir(out_dir, "train run", is_own=is_run_folder)
    ckpt = out_dir / CHECKPOINT_NAME
    metrics_path = out_dir / "metrics.jsonl"

    if ckpt.exists() and resume:
        state = load_checkpoint(ckpt, cfg, xp)
        if int(state["params"]["W_enc"].shape[0]) != source.d_in:
            raise CheckpointError(f"{ckpt}: trained on d_in={state['params']['W_enc'].shape[0]}, the source has {source.d_in}")
        _truncate_metrics(metrics_path, state["step"])
    elif (ckpt.exists() or (out_dir / "sae").exists()) and not overwrite:
        raise OutputExistsError(f"{out_dir} already holds a training run; resume it (--resume), start it over "
                                "(--overwrite) or choose a new folder")
    else:  # a fresh run (overwrite=True: the old run's state and results go first)
        state = fresh_state(cfg, source, xp)
        make_dir(out_dir)
        for old in (ckpt, metrics_path, out_dir / "eval.json"):
            if old.exists():
                old.unlink()
    _write_text_atomic(out_dir / "config.json", json.dumps(
        {"train": dataclasses.asdict(cfg), "source": _source_info(source)}, indent=2) + "\n")

    scale, params, adam = state["scale"], state["params"], state["adam"]
    since_fired = state["since_fired"]
    threshold = (state["batchtopk_threshold"], state["threshold_updates"])  # BatchTopK's running θ
    controller = None
    if cfg.uses_controller():  # λ set every step from the batch L0 (minisae.l0control)
        controller = l0control.L0Controller(cfg.target_l0, cfg.sparsity_coeff, kp=cfg.controller_kp,
                                            ki=cfg.controller_ki, start_step=cfg.sparsity_warmup_steps,
                                            state=state.get("controller"))
    lr_mult = None
    if cfg.architecture == "jumprelu" and cfg.threshold_lr_mult != 1.0:
        lr_mult = {"log_threshold" if cfg.threshold_param == "log" else "threshold": cfg.threshold_lr_mult}
    min_kept = []  # 0-d smallest kept activations since the last fold into `threshold`
    last_good = state["step"] if ckpt.exists() and resume else None
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    bar = _progress_bar(cfg.steps, state["step"], cfg.architecture, progress)
    pending, t0 = [], time.time()
    losses = []  # 0-d loss arrays since the last check, read back to the host in one go
    # the batches, checked and normalised, are made one step ahead in a background thread
    batches = Prefetcher(lambda i: _training_batch(source, i, cfg, scale), state["step"], cfg.steps,
                         depth=cfg.prefetch) if cfg.prefetch > 0 else None
    try:
        for step in range(state["step"], cfg.steps):
            try:
                x = batches.get(step) if batches else _training_batch(source, step, cfg, scale)
            except _BadBatch as e:
                raise TrainingError(f"step {step}: {e}; " + _kept(ckpt, last_good)) from None
            x = asarray(x, xp)  # (B, D) normalised: E‖x‖² = 1
            hyper = hypers_at(cfg, step, since_fired >= cfg.dead_window_tokens,
                              coeff=controller.coeff() if controller else None)
            # the variant's fastest exact path (row-sparse on NumPy when few latents fire); the
            # latents are never held as a dense (B, M) array: out["fired"] counts them per latent
            out, grads = mod.forward_backward(params, x, **hyper, path="auto", dense_f=False)
            losses.append(out["loss"])
            if controller:  # one host read per step (a sync on CuPy): the next λ needs it
                controller.update(step, float(to_numpy(out["l0"])))
            if cfg.architecture == "batchtopk":
                min_kept.append(out["min_kept"])
            optim.remove_parallel_decoder_grad(params["W_dec"], grads["W_dec"], out=grads["W_dec"])
            lr = optim.lr_at(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                             total_steps=cfg.steps, decay_frac=cfg.decay_frac)
            optim.adam_update(params, grads, adam, lr=lr, betas=betas, eps=cfg.adam_eps, lr_mult=lr_mult)
            optim.normalize_decoder_rows(params["W_dec"])
            if "threshold" in params:  # raw θ: kept >= 0 by projection (a θ < 0 would count π = 0 as active)
                xp.maximum(params["threshold"], 0.0, out=params["threshold"])
            del grads  # the next step's gradients need the room
            since_fired += cfg.batch_size  # (M,) tokens since each latent last fired ...
            since_fired *= out["fired"] == 0  # ... reset where it fired in this batch
            done = step + 1

            log_now = done % cfg.log_every == 0 or done == cfg.steps
            checkpoint_now = done % cfg.checkpoint_every == 0 or done == cfg.steps
            if log_now or checkpoint_now:  # the only host reads of a step; on NumPy they are free
                loss = _check_losses(xp, losses, done - len(losses), ckpt, last_good)
                losses = []
                for m in min_kept:  # in step order: the same θ as updating at every step
                    threshold = VARIANTS["batchtopk"].update_threshold(*threshold, float(to_numpy(m)),
                                                                       cfg.threshold_rate)
                min_kept = []
            if log_now:
                row = _log_row(cfg, done, out, x, lr, hyper, since_fired, loss, time.time() - t0, threshold[0])
                pending.append(row)
                bar.set_postfix(loss=f"{row['loss']:.4g}", L0=f"{row['l0']:.1f}", FVU=f"{row['fvu']:.4f}")
            if checkpoint_now:
                if not _params_finite(params, xp):
                    raise TrainingError(f"step {step}: the parameters became NaN or inf; "
                                        + _kept(ckpt, last_good) + "; try a lower learning rate")
                save_checkpoint(ckpt, {"step": done, "scale": scale, "params": params, "adam": adam,
                                       "since_fired": since_fired, "batchtopk_threshold": threshold[0],
                                       "threshold_updates": threshold[1],
                                       "controller": controller.state() if controller else None}, cfg)
                last_good = done
                _append_jsonl(metrics_path, pending)  # metrics only ever run up to the checkpoint
                pending = []
            bar.update(1)
    finally:
        if batches:
            batches.close()
        bar.close()
        _append_jsonl(metrics_path, pending)  # after an error: the lines since the last checkpoint

    params_np = {k: to_numpy(v) for k, v in params.items()}
    sae = SAE.from_training(cfg.architecture, params_np, scale=scale, hyper=_release_hyper(cfg, threshold[0], controller.coeff() if controller else None),
                            metadata=_sae_metadata(source))
    sae.save(out_dir / "sae", overwrite=True)
    summary = {}
    if cfg.eval_tokens > 0:
        summary = evaluate_sae(sae, source, n_tokens=cfg.eval_tokens, batch_size=cfg.eval_batch_size)
        if controller:
            summary["sparsity_coeff_final"] = controller.coeff()
        _write_text_atomic(out_dir / "eval.json", json.dumps(summary, indent=2) + "\n")
    return TrainResult(sae=sae, params=params_np, scale=scale, steps=cfg.steps, summary=summary, out_dir=out_dir)


class _BadBatch(Exception):
    """A batch the source returned cannot be trained on (wrong shape, NaN or inf)."""


def _training_batch(source, step, cfg, scale):
    """Batch `step` of the source, checked (shape, finite) and normalised: x_raw / C, (B, D)
    NumPy in cfg.dtype. Runs in the prefetch thread: it reads nothing the training step writes."""
    x_raw = numpy.asarray(source.batch(step, cfg.batch_size))  # (B, D)
    if x_raw.shape != (cfg.batch_size, source.d_in):
        raise _BadBatch(f"the source returned a batch of shape {x_raw.shape}, "
                        f"expected ({cfg.batch_size}, {source.d_in})")
    if not numpy.isfinite(x_raw).all():
        raise _BadBatch("the activation batch holds NaN or inf values")
    return numpy.divide(x_raw, scale, dtype=cfg.dtype)  # (B, D) a fresh array


def _check_losses(xp, losses, first_step, ckpt, last_good):
    """Read the losses of steps first_step, first_step + 1, ... back at once; raise a
    TrainingError naming the first non-finite one; return the last as a Python float."""
    values = to_numpy(xp.stack(losses)).astype(numpy.float64)  # (n,)
    bad = numpy.flatnonzero(~numpy.isfinite(values))
    if bad.size:
        raise TrainingError(f"step {first_step + int(bad[0])}: the loss is {values[bad[0]]}; "
                            + _kept(ckpt, last_good) + "; try a lower learning rate")
    return float(values[-1])


def _kept(ckpt, last_good):
    if last_good is None:
        return "no checkpoint had been written yet"
    return f"the last good checkpoint (step {last_good}) is kept at {ckpt}"


def _log_row(cfg, done, out, x, lr, hyper, since_fired, loss, elapsed, threshold=None):
    xp_x = x - x.mean(axis=0)  # (B, D) centred over tokens
    denom = float(to_numpy((xp_x * xp_x).sum()))
    mse = float(to_numpy(out["mse"]))
    row = {
        "step": done,
        "tokens": done * cfg.batch_size,
        "loss": loss,
        "mse": mse,
        "l0": float(to_numpy(out["l0"])),
        "fvu": mse * x.shape[0] / denom if denom > 0 else float("nan"),
        "lr": lr,
        "dead_frac": float(to_numpy((since_fired >= cfg.dead_window_tokens).mean())),
        "elapsed_s": round(elapsed, 3),
    }
    if "sparsity_coeff" in hyper:
        row["sparsity_coeff"] = hyper["sparsity_coeff"]
    if cfg.architecture == "batchtopk":
        row["threshold"] = threshold
    return row


def _release_hyper(cfg, batchtopk_threshold=None, coeff=None):
    if cfg.architecture == "topk":
        return {"k": cfg.k}
    if cfg.architecture == "batchtopk":  # released as a JumpReLU with one global threshold
        return {"threshold": batchtopk_threshold}
    coeff = cfg.sparsity_coeff if coeff is None else coeff  # the λ controller's last value
    if cfg.architecture == "jumprelu":
        return {"bandwidth": cfg.bandwidth, "sparsity_coeff": coeff}
    return {"sparsity_coeff": coeff}


def _sae_metadata(source):
    meta = getattr(source, "sae_metadata", None)
    return dict(meta()) if callable(meta) else {}


def _progress_bar(total, initial, desc, enabled):
    nested = enabled == "nested"  # inside `minisae compare`: below its bar, cleared when done
    return progress_bar(total, enabled=bool(enabled), initial=initial, desc=desc, unit="step",
                        leave=not nested, position=1 if nested else None)
