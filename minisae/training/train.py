"""Training loop for the three SAE variants: the Gemma Scope recipe (arXiv 2408.05147),
checkpoints, resume.

    from minisae.data.synthetic import SyntheticActivations, SyntheticConfig
    from minisae.training.train import TrainConfig, train
    source = SyntheticActivations(SyntheticConfig(d_in=64, n_features=512))
    result = train(TrainConfig("jumprelu", d_sae=1024, sparsity_coeff=3e-3, steps=2000,
                               batch_size=1024), source, "runs/jr")
    result.sae.save("my_sae")   # already saved to runs/jr/sae

One step: x = x_raw / C (C set once so that E‖x‖² = 1) → the variant's `forward_backward` (its
hand-written backward; row-sparse on NumPy when few latents fire, the latents never held as a
dense (B, M) array) → the decoder gradient's component along each decoder row removed → Adam →
decoder rows renormalised; the last three in place (minisae.training.optim). The learning rate follows a cosine warm-up, the sparsity coefficient a linear one.

A data source is any object with
    d_in                          width of the activations
    batch(step, batch_size)       (batch_size, d_in) float32 NumPy: the training batch of `step`,
                                  a pure function of step (so a resumed run sees the same data)
    sample(n)                     (n, d_in) float32 NumPy: a fixed sample to estimate C and TopK's b_dec
minisae.data.synthetic.SyntheticActivations and minisae.data.activations.ActivationStore are two.
`batch` is called from a background thread, one step ahead of the training step (minisae.training.prefetch;
TrainConfig.prefetch = 0 calls it in the loop instead); nothing else calls the source meanwhile.

Resume guarantee: a checkpoint holds everything the next step reads (parameters, Adam moments and
step count, the dead-latent counters, the step number, C, the config). Data and schedules are pure
functions of the step, so `train(..., resume=True)` after an interruption ends with parameters
bitwise equal to those of an uninterrupted run (tests/test_train.py proves it).

Files in out_dir: config.json, checkpoint.safetensors (atomic, replaced every checkpoint_every
steps; never written with non-finite values), metrics.jsonl (one JSON object per log step),
sae/ (the release SAE, SAELens folder format, C and the pre-encoder bias folded in), eval.json.

The config (TrainConfig, its defaults and checks) lives in minisae.training.config, the checkpoint
files and metrics.jsonl handling in minisae.training.checkpoint; both are re-exported here.

Legend: B tokens in a batch, D d_in, M d_sae (latents).
"""

import dataclasses
import json
import math
import time
from pathlib import Path

import numpy

from minisae.training import l0control, optim
# re-exported: minisae.training.train keeps every name it had
from minisae.training.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, _RESUME_FREE, CheckpointError,  # noqa: F401
                                _append_jsonl, _check_checkpoint_info, _check_resume_config, _truncate_metrics,
                                load_checkpoint, save_checkpoint)
from minisae.errors import MinisaeError, OutputExistsError, ResourceError, TrainingError
from minisae.io.files import check_output_dir, make_dir, memory_limit_bytes, read_json, write_atomic
from minisae.training.prefetch import Prefetcher
from minisae.progress import progress_bar
from minisae.sae import VARIANTS
from minisae.training.config import (_RANGES, DEFAULT_LR, START_COEFF, TrainConfig, check_values,  # noqa: F401
                                 param_names)
from minisae.xp import asarray, get_xp, to_numpy


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
        "controller": None,          # the λ controller's state (minisae.training.l0control), when target_l0 uses it
    }


def _params_finite(params, xp):
    return all(bool(xp.isfinite(a).all()) for a in params.values())


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
    from minisae.eval.evaluate import evaluate_sae
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
    write_atomic(out_dir / "config.json", json.dumps(
        {"train": dataclasses.asdict(cfg), "source": _source_info(source)}, indent=2) + "\n")

    scale, params, adam = state["scale"], state["params"], state["adam"]
    since_fired = state["since_fired"]
    threshold = (state["batchtopk_threshold"], state["threshold_updates"])  # BatchTopK's running θ
    # target_l0 (JumpReLU, Gated): θ calibrated on batch 0 in a fresh run, then moved every step
    controller = l0control.make(cfg, params, state.get("controller"),
                                sample=None if state["step"] else lambda: _training_batch(source, 0, cfg, scale))
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
            dead = since_fired >= cfg.dead_window_tokens if cfg.uses_dead_mask() else None  # (M,)
            hyper = hypers_at(cfg, step, dead, coeff=controller.coeff() if controller else None)
            # the variant's fastest exact path (row-sparse on NumPy when few latents fire); the
            # latents are never held as a dense (B, M) array: out["fired"] counts them per latent
            out, grads = mod.forward_backward(params, x, **hyper, path="auto", dense_f=False)
            losses.append(out["loss"])
            if cfg.architecture == "batchtopk":
                min_kept.append(out["min_kept"])
            lr = optim.lr_at(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                             total_steps=cfg.steps, decay_frac=cfg.decay_frac)
            # Adam with the decoder's rows held at unit norm: dW_dec loses its component along each
            # row first, each row is renormalised after (fused, one pass over W_dec)
            optim.adam_update(params, grads, adam, lr=lr, betas=betas, eps=cfg.adam_eps, lr_mult=lr_mult,
                              unit_rows="W_dec")
            if "threshold" in params:  # raw θ: kept >= 0 by projection (a θ < 0 would count π = 0 as active)
                xp.maximum(params["threshold"], 0.0, out=params["threshold"])
            if controller:  # thresholds moved toward target_l0 from the batch L0 (a host read, a CuPy sync)
                controller.after_step(params, float(to_numpy(out["l0"])), out["fired"])
            del grads  # the next step's gradients need the room
            since_fired += cfg.batch_size  # (M,) tokens since each latent last fired ...
            since_fired *= out["fired"] == 0  # ... reset where it fired in this batch
            done = step + 1

            log_now = done % cfg.log_every == 0 or done == cfg.steps
            checkpoint_now = done % cfg.checkpoint_every == 0 or done == cfg.steps
            if log_now or checkpoint_now:  # the loss's host reads (the controller's L0 is the other)
                loss = _check_losses(xp, losses, done - len(losses), ckpt, last_good,
                                     lambda: optim.nonfinite_cause(params, adam, sparsity_coeff=hyper.get("sparsity_coeff")))
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
                if not (_params_finite(params, xp) and _params_finite(adam["v"], xp)):
                    raise TrainingError(f"step {step}: the parameters became NaN or inf; "
                                        + _kept(ckpt, last_good) + "; " + optim.nonfinite_cause(params, adam))
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
        if controller and controller.coeff() is not None:
            summary["sparsity_coeff_final"] = controller.coeff()
        write_atomic(out_dir / "eval.json", json.dumps(summary, indent=2) + "\n")
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


def _check_losses(xp, losses, first_step, ckpt, last_good, cause=lambda: "try a lower learning rate"):
    """Read the losses of steps first_step, first_step + 1, ... back at once; raise a
    TrainingError naming the first non-finite one; return the last as a Python float."""
    values = to_numpy(xp.stack(losses)).astype(numpy.float64)  # (n,)
    bad = numpy.flatnonzero(~numpy.isfinite(values))
    if bad.size:
        raise TrainingError(f"step {first_step + int(bad[0])}: the loss is {values[bad[0]]}; "
                            + _kept(ckpt, last_good) + "; " + cause())
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
