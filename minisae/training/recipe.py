"""The pieces of the Gemma Scope recipe (arXiv 2408.05147) the training loop (minisae.training.train)
reads each step: the variants' hyper-parameters at a step (the λ warm-up; the L0 controller's λ),
the normalising constant C (E‖x / C‖² = 1), the metrics.jsonl row, the memory check before a run,
and what the released SAE records.

Legend: B tokens in a batch, D d_in, M d_sae (latents).
"""

import dataclasses
import math
from pathlib import Path

import numpy

from minisae.training import optim
from minisae.errors import MinisaeError, ResourceError, TrainingError  # noqa: F401 (TrainingError: re-exported)
from minisae.io.files import memory_limit_bytes, read_json
from minisae.progress import progress_bar
from minisae.xp import to_numpy


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
    summary: dict          # final evaluation (minisae.eval.evaluate.evaluate_sae), {} if eval_tokens = 0
    out_dir: Path


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


# the pieces of one step


def lr_multipliers(cfg):
    """Adam's per-parameter learning-rate multipliers (JumpReLU's --threshold-lr-mult), or None."""
    if cfg.architecture == "jumprelu" and cfg.threshold_lr_mult != 1.0:
        return {"log_threshold" if cfg.threshold_param == "log" else "threshold": cfg.threshold_lr_mult}
    return None


def log_row(cfg, done, *, loss, mse, l0, fvu_denom, batch_rows, lr, hyper, dead_frac, elapsed, threshold=None):
    """One metrics.jsonl row (the loop writes this one): fvu = mse·B / Σ_b ‖x_b − x̄‖² on the step's batch."""
    row = {
        "step": done,
        "tokens": done * cfg.batch_size,
        "loss": loss,
        "mse": mse,
        "l0": l0,
        "fvu": mse * batch_rows / fvu_denom if fvu_denom > 0 else float("nan"),
        "lr": lr,
        "dead_frac": dead_frac,
        "elapsed_s": round(elapsed, 3),
    }
    if "sparsity_coeff" in hyper:
        row["sparsity_coeff"] = hyper["sparsity_coeff"]
    if cfg.architecture == "batchtopk":
        row["threshold"] = threshold
    return row


def centred_sum_of_squares(x):
    """Σ_b ‖x_b − x̄‖² of a batch x (B, D), in its own dtype, as a Python float."""
    xc = x - x.mean(axis=0)  # (B, D) centred over tokens
    return float(to_numpy((xc * xc).sum()))


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
