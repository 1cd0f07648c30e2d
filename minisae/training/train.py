"""The training loop of minisae: the Gemma Scope recipe (arXiv 2408.05147), checkpoints, resume, on
one process (`train`) or on a grid of processes (`train_parallel`; `train` is it on the 1 x 1 grid).

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

Files in out_dir: config.json, checkpoint/ (one shard file and a manifest written last, replaced
every checkpoint_every steps; never written with non-finite values; a checkpoint.safetensors of
earlier versions is resumed and replaced), metrics.jsonl (one JSON object per log step),
sae/ (the release SAE, SAELens folder format, C and the pre-encoder bias folded in), eval.json,
.minisae.lock (held while a process writes the folder; a second writer is refused).

The run folder changes as a unit: a step's metrics lines are on disk (fsync) before its checkpoint
is written, and a resume cuts metrics.jsonl back to the checkpoint's step, so a kill at any point
leaves the log equal to an uninterrupted run's after the resume; a resume or a fresh start removes
sae/ and eval.json first, and --overwrite removes the old checkpoint and log before the new
config.json is written, so no folder holds one run's SAE beside another run's config.

The config (TrainConfig, its defaults and checks) lives in minisae.training.config, the checkpoint
files and metrics.jsonl handling in minisae.training.checkpoint, the per-step pieces of the recipe
in minisae.training.recipe.

Past one process: R data-parallel replicas x S latent shards (docs/scale.md). One process is the
1 x 1 grid, where the step is the variant's own `forward_backward` and its numbers are read back to
the host only at log and checkpoint steps; any other grid runs the latent-sharded step.

    mpiexec -n 4 minisae train --arch topk --k 32 --d-sae 65536 --shards 2 --steps 1000 --out run/

P = R * S processes form a grid (minisae.dist.sharded: the grid, the S-independent init and the
sharded step); rank = r * S + s holds replica r's copy of shard s and its Adam moments and
dead-latent counters. One step of `train_parallel`:

  1. replica r reads its rows of the step's batch (rows r*B/R ... (r+1)*B/R): its shard-0 rank
     reads them and broadcasts them to the replica's other shards;
  2. `sharded.sharded_step`: each of its `accumulate` micro-batches goes through
     `sharded.shard_forward_backward` (the shard group's sums inside), and the micro-batches'
     gradients are added in order;
  3. ... and summed over the replica group in rank order (minisae.dist: bitwise the same as one
     process accumulating the R micro-batches in rank order), "fired" is OR-ed;
  4. Adam and the unit-norm decoder constraint run locally (both are per latent).

Checkpoints: minisae.training.checkpoint (`save_sharded` / `load_sharded`, any grid resumes on any other).

The run folder (docs/pipeline.md): rank 0 holds its lock (minisae.io.files.FolderLock); a step's
metrics lines are fsynced before its checkpoint, and a resume cuts them back to the checkpoint.

Legend: B tokens in the step's batch, b per micro-batch, D d_in, M d_sae, m = hi - lo latents on
this shard, P ranks, R replicas, S shards, A micro-batches per rank.
"""

import dataclasses
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy

from minisae import dist

from minisae.training import l0control, optim
from minisae.errors import InputError, OutputExistsError
from minisae.io.files import FolderLock, check_output_dir, make_dir, write_atomic
from minisae.sae import VARIANTS
from minisae.dist.sharded import _sum_scalars, init_shard, make_grid, sharded_step
from minisae.training.checkpoint import (CHECKPOINT_DIR, CHECKPOINT_NAME, MANIFEST_NAME, CheckpointError,
                                         _append_jsonl, _truncate_metrics, clear_results, clear_run, kill_point,
                                         load_checkpoint, load_sharded, read_manifest, save_checkpoint, save_sharded)
from minisae.training.config import TrainConfig, param_names
from minisae.training.recipe import (TrainingError, TrainResult, _progress_bar, _release_hyper, _sae_metadata,
                                     _source_info, centred_sum_of_squares, check_memory, estimate_scale, hypers_at,
                                     is_run_folder, log_row, lr_multipliers, memory_estimate)

# what callers import from here: the loop's inputs and outputs, its checkpoints, its helpers
__all__ = ["train", "train_parallel", "read_state", "TrainConfig", "TrainResult", "TrainingError", "CheckpointError",
           "CHECKPOINT_DIR", "CHECKPOINT_NAME", "MANIFEST_NAME", "load_checkpoint", "save_checkpoint", "load_sharded",
           "save_sharded", "read_manifest", "check_memory", "memory_estimate", "estimate_scale", "hypers_at"]
from minisae.xp import asarray, get_xp, to_numpy

# one process on the 1 x 1 grid takes the loop's fast path (its numbers read back to the host only at
# log and checkpoint steps); tests/test_dist.py turns it off to hold the grid path equal to it
ALONE_FAST_PATH = True
LEGACY_CHECKPOINT = "checkpoint.safetensors"  # the one-file checkpoint of earlier one-process runs: read, not written

# ----------------------------------------------------------------------------------------------
# the training loop


def train_parallel(cfg, source, out_dir, *, shards=1, accumulate=1, comm=None, resume=False,
                   overwrite=False, progress=True):
    """The training loop of minisae (`minisae.training.train.train` is this on dist.SingleProcess,
    the 1 x 1 grid) on a grid of R x S processes (comm: the world, default dist.world()).

    Every rank calls it with the same arguments; rank 0 alone writes config.json, metrics.jsonl,
    the manifest, sae/ and eval.json (all atomically), replica 0's ranks the shard files.
    accumulate: micro-batches per rank per step (gradients summed in order): one process with
    accumulate=R ends bitwise equal to R ranks with accumulate=1 (tests/test_dist.py).
    Returns minisae.training.train.TrainResult on rank 0 (on other ranks its sae, summary are None, {}).
    Rank 0 holds the run folder's lock (minisae.io.files.FolderLock) from the first look at the
    folder to the end."""
    from minisae.training.config import param_names

    world = dist.world() if comm is None else comm
    cfg = cfg.resolved(int(source.d_in))
    xp = get_xp(cfg.backend)
    names = param_names(cfg)
    with dist.agreed():  # the same arguments on every rank (checked first): an error here is every rank's
        world.check_same({"config": dataclasses.asdict(cfg), "shards": int(shards), "accumulate": int(accumulate),
                          "d_in": int(source.d_in), "resume": bool(resume), "overwrite": bool(overwrite)},
                         "the training arguments (every process must be started with the same command)")
        grid = make_grid(world, shards, cfg.d_sae)
        if grid.S > 1 and cfg.penalty != "l0":
            raise InputError(f"penalty {cfg.penalty!r} couples every latent of a token (its total L0); "
                             "it cannot be split over latent shards: train it with --shards 1")
        if grid.S > 1 and cfg.uses_controller():
            raise InputError(f"--target-l0 for {cfg.architecture} is met by the L0 controller, whose calibration and "
                             "step read every latent's firing count: train it with --shards 1 (data parallelism works)")
        n_micro = grid.R * int(accumulate)
        if int(accumulate) < 1 or cfg.batch_size % n_micro:
            raise InputError(f"batch_size {cfg.batch_size} must split into {grid.R} replicas x "
                             f"{accumulate} micro-batches (accumulate >= 1)")
        b, mine = cfg.batch_size // n_micro, cfg.batch_size // grid.R  # rows per micro-batch, per replica
        # this rank's share: its latents, its micro-batch
        check_memory(SimpleNamespace(dtype=cfg.dtype, d_sae=grid.hi - grid.lo, batch_size=b), int(source.d_in), xp)
    out_dir = Path(out_dir)
    ckdir = out_dir / CHECKPOINT_DIR
    lock = []  # rank 0's FolderLock: one writer per run folder

    def look():  # the output-folder rule (minisae.io.files): new, empty, or a run folder of ours
        check_output_dir(out_dir, "train run", is_own=is_run_folder)
        make_dir(out_dir)
        lock.append(FolderLock(out_dir, what="training run"))
        return ((ckdir / MANIFEST_NAME).exists(), (out_dir / LEGACY_CHECKPOINT).exists(),
                (out_dir / "sae").exists())

    try:
        return _train_locked(cfg, source, out_dir, world, grid, xp, names, look, int(accumulate),
                             n_micro, mine, resume, overwrite, progress)
    finally:
        for held in lock:
            held.release()


def _resume_state(cfg, source, out_dir, world, grid, xp, names, legacy):
    """The state of this rank's latents from the run's checkpoint: the sharded one, or else (legacy)
    the one-file checkpoint.safetensors earlier one-process runs wrote, cut to [lo, hi)."""
    from minisae.training.checkpoint import CheckpointError, _check_resume_config, load_checkpoint

    ckdir = out_dir / CHECKPOINT_DIR
    if not legacy:
        def load():  # the config first: a mismatch is named as such, not as the shards that do not fit it
            _check_resume_config(ckdir / MANIFEST_NAME, read_manifest(ckdir), cfg)
            return load_sharded(ckdir, grid.lo, grid.hi, xp, names=names)

        man, state = world.together(load)
        d_in, where = int(man["d_in"]), ckdir
    else:  # every rank reads the one file and keeps its latents
        path = out_dir / LEGACY_CHECKPOINT
        state = world.together(lambda: load_checkpoint(path, cfg, numpy))
        d_in, where = int(state["params"]["W_enc"].shape[0]), path
        cut = {k: (v if k == "b_dec" else v[:, grid.lo:grid.hi] if k == "W_enc" else v[grid.lo:grid.hi])
               for k, v in state["params"].items()}
        for store in ("m", "v"):
            state["adam"][store] = {k: asarray(v if k == "b_dec" else v[:, grid.lo:grid.hi] if k == "W_enc"
                                               else v[grid.lo:grid.hi], xp)
                                    for k, v in state["adam"][store].items()}
        state["params"] = {k: asarray(v, xp) for k, v in cut.items()}
        state["since_fired"] = asarray(state["since_fired"][grid.lo:grid.hi], xp)
    if d_in != source.d_in:
        raise CheckpointError(f"{where}: trained on d_in={d_in}, the source has {source.d_in}")
    return state


def _train_locked(cfg, source, out_dir, world, grid, xp, names, look, accumulate, n_micro, mine,
                  resume, overwrite, progress):
    from minisae.training.prefetch import Prefetcher

    ckdir = out_dir / CHECKPOINT_DIR
    metrics_path = out_dir / "metrics.jsonl"
    lead = world.rank == 0
    with dist.agreed():  # each check below reads what every rank holds alike: its error is every rank's
        have, legacy, done_sae = world.on_root(look)
        if (have or legacy or done_sae) and not (resume and (have or legacy)) and not overwrite:
            raise OutputExistsError(f"{out_dir} already holds a training run; resume it (--resume), start it "
                                    "over (--overwrite) or choose a new folder")
        state = None
        if (have or legacy) and resume:
            state = _resume_state(cfg, source, out_dir, world, grid, xp, names, legacy=not have)
            world.on_root(lambda: (clear_results(out_dir), _truncate_metrics(metrics_path, state["step"])))
        else:  # a fresh run (overwrite: the old run's results, state and record go first, config.json last)
            world.on_root(lambda: clear_run(out_dir))
            legacy = False

        def record():
            info = {"train": dataclasses.asdict(cfg), "source": _source_info(source),
                    "grid": {"processes": world.size, "replicas": grid.R, "shards": grid.S,
                             "accumulate": accumulate, "backend": world.name}}
            write_atomic(out_dir / "config.json", json.dumps(info, indent=2) + "\n")

        world.on_root(record)
    if state is None:  # (outside: an error of one rank alone here is not every rank's)
        state = _fresh_state(cfg, source, grid, xp)

    scale, params, adam, since_fired = state["scale"], state["params"], state["adam"], state["since_fired"]
    threshold = (state["batchtopk_threshold"], state["threshold_updates"])  # BatchTopK's running θ
    # target_l0 (JumpReLU, Gated): thresholds calibrated on batch 0 in a fresh run (every rank reads all of
    # it, so every rank calibrates alike), then moved after every step (minisae.training.l0control);
    # None where cfg uses no controller
    controller = l0control.make(cfg, params, state.get("controller"), None if state["step"] else lambda: numpy.divide(
        _replica_rows(source, 0, cfg.batch_size, 0, cfg.batch_size), scale, dtype=cfg.dtype))  # (B, D)
    lr_mult = lr_multipliers(cfg)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    mod = VARIANTS[cfg.architecture]
    # one process (the 1 x 1 grid, one micro-batch): the variant's own step, its numbers read back to
    # the host only at log and checkpoint steps (on CuPy a read is a sync); else the sharded step
    alone = ALONE_FAST_PATH and world.size == 1 and grid.S == 1 and n_micro == 1
    last_good = state["step"] if (have or legacy) and resume else None
    bar = _bar(cfg, state["step"], progress if lead else False)  # progress may be "nested" (compare)
    pending, t0 = [], time.time()
    losses, min_kept = [], []  # (alone) 0-d losses and BatchTopK's smallest kept values since the last read

    def rows(i):  # shard 0 of each replica: its rows of batch i, normalised (x_raw / C, cfg.dtype), and
        X = numpy.divide(_replica_rows(source, i, cfg.batch_size, grid.r * mine, (grid.r + 1) * mine), scale,
                         dtype=cfg.dtype)  # (A*b, D) a fresh array
        return X, float(not numpy.isfinite(X).all())  # 1.0: NaN or inf (seen alike by the shards it is sent to)

    # shard 0's rows are made one step ahead in a background thread (cfg.prefetch = 0: in the loop)
    batches = Prefetcher(rows, state["step"], cfg.steps, depth=cfg.prefetch) \
        if cfg.prefetch > 0 and grid.s == 0 else None
    try:
        for step in range(state["step"], cfg.steps):
            try:
                X, bad_batch = (batches.get(step) if batches else rows(step)) if grid.s == 0 else (None, 0.0)
            except TrainingError as e:  # a batch of the wrong shape
                raise TrainingError(f"{e}; {_kept(ckdir, last_good)}") from None
            if grid.S > 1:  # shard 0 broadcasts the replica's rows (A*b, D) to its other shards
                X = grid.shard.broadcast(numpy.empty((mine, source.d_in), cfg.dtype) if X is None else X, root=0)
                bad_batch = float(not numpy.isfinite(X).all())
            dead = since_fired >= cfg.dead_window_tokens if cfg.uses_dead_mask() else None  # (m,)
            hyper = hypers_at(cfg, step, dead, coeff=controller.coeff() if controller else None)
            if alone:
                if bad_batch:
                    raise TrainingError(f"step {step}: the activation batch holds NaN or inf values; "
                                        + _kept(ckdir, last_good))
                x = asarray(X, xp)  # (B, D) normalised: E‖x‖² = 1
                # the variant's fastest exact path (row-sparse on NumPy when few latents fire); the
                # latents are never held as a dense (B, M) array: out["fired"] counts them per latent
                out, grads = mod.forward_backward(params, x, **hyper, path="auto", dense_f=False)
                fired = out["fired"] != 0  # (M,)
                losses.append(out["loss"])
                if cfg.architecture == "batchtopk":
                    min_kept.append(out["min_kept"])
                counts = out["fired"]  # (M,) tokens each latent fired on
                l0 = float(to_numpy(out["l0"])) if controller else None  # a host read: the controller needs it
            else:
                out, x = None, None
                grads, fired, counts, (loss, mse, l0), threshold = sharded_step(
                    cfg, params, X, bad_batch, hyper, grid, xp, accumulate, threshold, count_fired=controller is not None,
                    where=f"step {step}", kept=lambda: _kept(ckdir, last_good))
            lr = optim.lr_at(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                             decay_frac=cfg.decay_frac)
            # Adam with the decoder's rows held at unit norm: dW_dec loses its component along each
            # row first, each row is renormalised after (fused, one pass over W_dec)
            optim.adam_update(params, grads, adam, lr=lr, betas=betas, eps=cfg.adam_eps, lr_mult=lr_mult,
                              unit_rows="W_dec")
            if "threshold" in params:  # raw θ: kept >= 0 by projection (a θ < 0 would count π = 0 as active)
                xp.maximum(params["threshold"], 0.0, out=params["threshold"])
            if controller:  # the thresholds moved toward target_l0 from the whole batch's L0 and counts
                controller.after_step(params, l0, counts, step)
            del grads  # the next step's gradients need the room
            since_fired += cfg.batch_size  # (m,) tokens since each latent last fired ...
            since_fired *= ~fired  # ... reset where it fired in this step's batch
            done = step + 1
            log_now = done % cfg.log_every == 0 or done == cfg.steps
            checkpoint_now = done % cfg.checkpoint_every == 0 or done == cfg.steps
            if alone and (log_now or checkpoint_now):  # the host reads of the steps since the last one
                loss = _check_losses(xp, losses, done - len(losses), ckdir, last_good,
                                     lambda: optim.nonfinite_cause(params, adam, sparsity_coeff=hyper.get("sparsity_coeff")))
                losses = []
                for m in min_kept:  # in step order: the same θ as updating at every step
                    threshold = VARIANTS["batchtopk"].update_threshold(*threshold, float(to_numpy(m)),
                                                                       cfg.threshold_rate)
                min_kept = []
                mse, l0 = float(to_numpy(out["mse"])), float(to_numpy(out["l0"])) if l0 is None else l0
            if log_now:  # collective: every rank takes part
                if grid.R == 1:  # the whole batch is here: Σ ‖x_b − x̄‖² in its dtype
                    fvu_denom = centred_sum_of_squares(x if alone else asarray(X, xp))
                else:
                    fvu_denom = _centred_sum_of_squares(X, grid.replica, cfg.batch_size)
                dead = _sum_dead(grid, since_fired >= cfg.dead_window_tokens)
                row = log_row(cfg, done, loss=loss, mse=mse, l0=l0, fvu_denom=fvu_denom, batch_rows=cfg.batch_size,
                              lr=lr, hyper=hyper, dead_frac=dead / cfg.d_sae, elapsed=time.time() - t0,
                              threshold=threshold[0])
                if lead:
                    pending.append(row)
                    bar.set_postfix(loss=f"{loss:.4g}", L0=f"{l0:.1f}", FVU=f"{row['fvu']:.4f}")
            if checkpoint_now:
                bad = world.sum(numpy.array([0 if _finite(params, xp) and _finite(adam["v"], xp) else 1],
                                            dtype=numpy.int64))[0]
                if bad:
                    raise dist.on_every_rank(TrainingError(
                        f"step {step}: the parameters became NaN or inf; " + _kept(ckdir, last_good)
                        + "; " + optim.nonfinite_cause(params, adam)))
                # the step's metrics lines reach the disk first, its checkpoint after: a kill between
                # leaves lines past the checkpoint, which a resume cuts and writes again
                world.on_root(lambda: _append_jsonl(metrics_path, pending, durable=True))
                pending = []
                kill_point("metrics", done)
                save_sharded(ckdir, grid, {"step": done, "scale": scale, "params": params, "adam": adam,
                                           "since_fired": since_fired, "batchtopk_threshold": threshold[0],
                                           "threshold_updates": threshold[1],
                                           "controller": controller.state() if controller else None}, cfg)
                if legacy:  # the run now lives in checkpoint/: the one-file checkpoint it resumed from goes
                    world.on_root(lambda: _remove_legacy(out_dir))
                    legacy = False
                last_good = done
                kill_point("checkpoint", done)
            bar.update(1)
    finally:
        if batches:
            batches.close()
        bar.close()
        if lead:
            _append_jsonl(metrics_path, pending)  # after an error: the lines since the last checkpoint
    coeff = controller.coeff() if controller else None
    live = {k: to_numpy(v) for k, v in params.items()} if grid.S == 1 and lead else None
    return _finish(cfg, source, out_dir, ckdir, world, names, scale, threshold[0], coeff, live)


def _remove_legacy(out_dir):
    from minisae.training.checkpoint import _remove_now

    _remove_now(Path(out_dir) / LEGACY_CHECKPOINT)


def _kept(ckdir, last_good):
    if last_good is None:
        return "no checkpoint had been written yet"
    return f"the last good checkpoint (step {last_good}) is kept in {ckdir}"


def _check_losses(xp, losses, first_step, ckdir, last_good, cause=lambda: "try a lower learning rate"):
    """Read the losses of steps first_step, first_step + 1, ... back at once; raise a
    TrainingError naming the first non-finite one; return the last as a Python float."""

    values = to_numpy(xp.stack(losses)).astype(numpy.float64)  # (n,)
    bad = numpy.flatnonzero(~numpy.isfinite(values))
    if bad.size:
        raise TrainingError(f"step {first_step + int(bad[0])}: the loss is {values[bad[0]]}; "
                            + _kept(ckdir, last_good) + "; " + cause())
    return float(values[-1])


def _fresh_state(cfg, source, grid, xp):
    """Initial state of this rank: C and TopK's b_dec from rank 0, the shard's parameters."""

    def measure():
        scale, sample = estimate_scale(source, cfg.norm_sample_tokens)  # C, (N, D)
        b_dec = None
        if cfg.architecture in ("topk", "batchtopk"):  # b_dec = geometric median of the normalised sample
            from minisae.sae.common import geometric_median
            b_dec = to_numpy(geometric_median(asarray(sample / scale, numpy, cfg.dtype)))  # (D,)
        return scale, b_dec

    scale, b_dec = grid.world.on_root(measure)
    params = init_shard(cfg, source.d_in, grid.lo, grid.hi, xp, b_dec=b_dec)
    return {"step": 0, "scale": scale, "params": params, "adam": optim.adam_init(params),
            "since_fired": xp.zeros(grid.hi - grid.lo, dtype=xp.int64),
            "batchtopk_threshold": 0.0, "threshold_updates": 0}


def _replica_rows(source, step, batch_size, start, stop):
    """Rows [start, stop) of the step's batch: read alone where the source offers batch_slice
    (minisae.data.stream.ShardStream), else cut from the whole batch."""
    if hasattr(source, "batch_slice"):
        X = numpy.asarray(source.batch_slice(step, batch_size, start, stop))
    else:
        X = numpy.asarray(source.batch(step, batch_size))
        if X.shape != (batch_size, source.d_in):
            raise _shape_error(step, X.shape, (batch_size, source.d_in))
        X = X[start:stop]
    if X.shape != (stop - start, source.d_in):
        raise _shape_error(step, X.shape, (stop - start, source.d_in))
    return X


def _shape_error(step, found, expected):

    return TrainingError(f"step {step}: the source returned a batch of shape {found}, expected {expected}")


def _centred_sum_of_squares(x, replica, batch_size):
    """sum_b ||x_b - mean(x)||^2 over the step's whole batch, from each replica's rows (float64)."""
    x = numpy.asarray(x, dtype=numpy.float64)  # (A*b, D)
    parts = numpy.concatenate([x.sum(axis=0), [(x * x).sum()]])  # (D + 1,)
    if replica.size > 1:
        parts = replica.sum(parts)
    mean = parts[:-1] / batch_size  # (D,)
    return float(parts[-1] - batch_size * (mean * mean).sum())


def _sum_dead(grid, dead):
    """The number of dead latents over all shards (collective over the shard group)."""
    return int(_sum_scalars(grid.shard, [float(to_numpy(dead.sum()))])[0])


def _finite(params, xp):
    return all(bool(xp.isfinite(a).all()) for a in params.values())


def _finish(cfg, source, out_dir, ckdir, world, names, scale, batchtopk_threshold, coeff=None, live=None):
    """Rank 0 puts the whole SAE together from the final checkpoint (or `live`, its parameters when
    it holds every latent), saves and evaluates it."""
    from minisae.eval.evaluate import evaluate_sae
    from minisae.io.saefile import SAE

    done = {"sae": None, "summary": {}, "params": None}

    def release():
        if live is None:
            _, st = load_sharded(ckdir, 0, cfg.d_sae, numpy, names=names, params_only=True)
            done["params"] = st["params"]
        else:
            done["params"] = live
        done["sae"] = sae = SAE.from_training(cfg.architecture, done["params"], scale=scale,
                                              hyper=_release_hyper(cfg, batchtopk_threshold, coeff),
                                              metadata=_sae_metadata(source))
        sae.save(out_dir / "sae", overwrite=True)
        if cfg.eval_tokens > 0:
            done["summary"] = evaluate_sae(sae, source, n_tokens=cfg.eval_tokens, batch_size=cfg.eval_batch_size)
            if coeff is not None:
                done["summary"]["sparsity_coeff_final"] = coeff
            write_atomic(out_dir / "eval.json", json.dumps(done["summary"], indent=2) + "\n")

    world.on_root(release)
    return TrainResult(sae=done["sae"], params=done["params"], scale=scale, steps=cfg.steps,
                       summary=done["summary"], out_dir=out_dir)


def _bar(cfg, initial, enabled):
    return _progress_bar(cfg.steps, initial, cfg.architecture, enabled)


# ----------------------------------------------------------------------------------------------
# one process

def train(cfg, source, out_dir, *, resume=False, overwrite=False, progress=True):
    """Train an SAE on `source`; write checkpoints, metrics and the release SAE into out_dir.

    One process is the 1 x 1 grid of the one training loop, train_parallel (below),
    on dist.SingleProcess: the variant's own step, the same update, log row and checkpoint
    (out_dir/checkpoint/, one shard). resume=True continues from that checkpoint (or from the
    one-file checkpoint.safetensors earlier versions wrote; or starts afresh if there is none);
    resume=False refuses a folder that already holds a run unless overwrite=True.
    Raises TrainingError (non-finite values; the last good checkpoint stays) and CheckpointError;
    OutputExistsError while another process writes out_dir (a lock, minisae.io.files.FolderLock).
    """
    return train_parallel(cfg, source, out_dir, comm=dist.SingleProcess(), resume=resume, overwrite=overwrite,
                          progress=progress)


def read_state(run_dir, cfg, xp=numpy):
    """The whole training state held by a run folder's checkpoint (cfg: the run's resolved config):
    checkpoint/ (written by any grid), else the one-file checkpoint.safetensors of earlier versions."""
    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINT_DIR / MANIFEST_NAME).exists():
        return load_sharded(run_dir / CHECKPOINT_DIR, 0, cfg.d_sae, xp, names=param_names(cfg))[1]
    return load_checkpoint(run_dir / CHECKPOINT_NAME, cfg, xp)
