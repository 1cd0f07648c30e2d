"""Training past one process: R data-parallel replicas x S latent shards (docs/scale.md).

    mpiexec -n 4 minisae train --arch topk --k 32 --d-sae 65536 --shards 2 --steps 1000 --out run/

P = R * S processes form a grid; rank = r * S + s holds replica r's copy of shard s: the latents
[lo_s, hi_s) (a contiguous slice of M), i.e. W_enc[:, lo:hi], W_dec[lo:hi], every per-latent
vector, their Adam moments and dead-latent counters, plus b_dec (replicated). One step:

  1. replica r reads its rows of the step's batch (rows r*B/R ... (r+1)*B/R): its shard-0 rank
     reads them and broadcasts them to the replica's other shards;
  2. each shard encodes with its own latents (TopK: local top-k, then an all-gather of the
     S candidate lists picks the global top-k, as OpenAI did) and decodes a partial
     reconstruction f_s @ W_dec_s; one sum over the shard group gives xhat (B, D);
  3. the variant's own backward runs on the shard with the global error x - xhat; b_dec's
     gradient gets its sum over shards; everything else is shard-local;
  4. gradients are summed over the replica group in rank order (minisae.dist: bitwise the same
     as one process accumulating the R micro-batches in rank order), "fired" is OR-ed;
  5. Adam and the unit-norm decoder constraint run locally (both are per latent).

The parameters at init do not depend on S: the dictionary is drawn in chunks of INIT_CHUNK latents,
chunk c from the generator seeded (seed, c) (`init_shard`). A sharded run therefore agrees with the
unsharded one (S = 1) up to floating-point rounding (the sum over shards adds in another order;
tests/test_dist.py holds it within float32 rounding, and 1e-12 in float64). It is not bitwise equal
to `minisae.train.train`, whose init draws the whole dictionary from one generator.

Checkpoints (`save_sharded` / `load_sharded`): folder out_dir/checkpoint/ holds step-NNNNNNNN/
shard-SSSSS.safetensors (one per shard, written by replica 0's ranks; replicas are bitwise
identical) and checkpoint.json, written last, atomically, naming the step folder; older step
folders are removed after it. Loading reads any latent range from the files that overlap it, so a
run resumes on another S (resharding; `reshard` writes a converted copy).

Legend: B tokens in the step's batch, b = B / R per replica, D d_in, M d_sae, m = hi - lo latents
on this shard, K top-k, P ranks, R replicas, S shards.
"""

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import numpy

from minisae import dist, optim
from minisae.errors import OutputExistsError
from minisae.io.files import check_output_dir, make_dir, write_atomic
from minisae.io.safetensors_io import SafetensorsError, SafetensorsFile, save_file
from minisae.sae import VARIANTS
from minisae.sae.common import squared_error, squared_error_backward, unit_rows
from minisae.sae.topk import _scatter_rows, topk_rows
from minisae.xp import asarray, get_xp, to_numpy, xp_of

INIT_CHUNK = 4096  # latents per init chunk (each drawn from its own seeded generator)
CHECKPOINT_DIR = "checkpoint"
MANIFEST_NAME = "checkpoint.json"
MANIFEST_FORMAT = "minisae-sharded-checkpoint-1"


# ----------------------------------------------------------------------------------------------
# the grid


@dataclasses.dataclass
class Grid:
    """This rank's place: replica r of R, shard s of S; `shard` spans the S ranks of replica r,
    `replica` the R ranks holding shard s; latents [lo, hi) of M."""
    world: object
    shard: object
    replica: object
    r: int
    R: int
    s: int
    S: int
    lo: int
    hi: int


def latent_range(M, S, s):
    """[lo, hi) of shard s: contiguous, sizes differing by at most one."""
    return s * M // S, (s + 1) * M // S


def make_grid(world, shards, d_sae):
    P, S = world.size, int(shards)
    if S < 1 or P % S != 0:
        raise ValueError(f"shards: expected a divisor of the {P} processes, found {shards}")
    if d_sae < S:
        raise ValueError(f"shards: cannot split d_sae={d_sae} latents into {S} shards")
    r, s = divmod(world.rank, S)
    lo, hi = latent_range(d_sae, S, s)
    return Grid(world, world.split(r, s), world.split(s, r), r, P // S, s, S, lo, hi)


# ----------------------------------------------------------------------------------------------
# initialisation, independent of S


def init_dictionary_chunked(d_in, lo, hi, *, seed, dtype):
    """Rows [lo, hi) of the (M, D) decoder: He-uniform then unit rows, chunk c of INIT_CHUNK rows
    drawn by numpy.random.default_rng((seed, c)). Drawn in float64 one chunk at a time; (m, D)."""
    bound = math.sqrt(6.0 / d_in)
    out = numpy.empty((hi - lo, d_in), dtype=dtype)  # (m, D)
    for c in range(lo // INIT_CHUNK, -(-hi // INIT_CHUNK)):
        c_lo, c_hi = c * INIT_CHUNK, (c + 1) * INIT_CHUNK
        rows = unit_rows(numpy.random.default_rng((seed, c)).uniform(-bound, bound, (INIT_CHUNK, d_in)))
        a, b = max(lo, c_lo), min(hi, c_hi)
        out[a - lo:b - lo] = rows[a - c_lo:b - c_lo]
    return out


def init_shard(cfg, d_in, lo, hi, xp, b_dec=None):
    """Training-form parameters of latents [lo, hi): W_dec chunk-keyed, W_enc = W_dec^T, every
    per-latent vector at its variant's init value (JumpReLU: threshold_init, threshold_param),
    b_dec given or 0."""
    from minisae.train import param_names

    mod = VARIANTS[cfg.architecture]
    kw = {}
    if cfg.architecture == "jumprelu":
        kw = dict(threshold_param=cfg.threshold_param, threshold_init=cfg.threshold_init or mod.THRESHOLD_INIT)
    one = mod.init(d_in, 1, seed=0, dtype=cfg.dtype, **kw)  # the variant's init values, one latent
    W_dec = init_dictionary_chunked(d_in, lo, hi, seed=cfg.seed, dtype=cfg.dtype)  # (m, D)
    params = {}
    for name in param_names(cfg):
        if name == "W_dec":
            params[name] = asarray(W_dec, xp)  # (m, D)
        elif name == "W_enc":
            params[name] = asarray(numpy.ascontiguousarray(W_dec.T), xp)  # (D, m)
        elif name == "b_dec":
            params[name] = asarray(numpy.zeros(d_in) if b_dec is None else b_dec, xp, cfg.dtype)  # (D,)
        else:
            params[name] = xp.full((hi - lo,), float(one[name][0]), dtype=cfg.dtype)  # (m,)
    return params


# ----------------------------------------------------------------------------------------------
# one micro-batch on one shard: forward, the shard-group sums, the variant's backward


def shard_forward_backward(arch, params, x, hyper, comm, lo=0, d_sae=None):
    """(stats, grads, fired) of the variant's loss on x (b, D) with this shard's latents
    [lo, lo + m) of d_sae (lo, d_sae: only BatchTopK needs them, for its global order and prefixes).

    comm is the shard group (size S). stats: loss, mse, l0 (Python floats, over all latents;
    BatchTopK adds min_kept); grads: this shard's gradients (b_dec's summed over shards);
    fired: (m,) bool. With S = 1 this is the variant's own forward and backward, bit for bit."""
    if arch == "topk":
        return _topk(params, x, hyper, comm)
    mod = VARIANTS[arch]
    if arch == "batchtopk":
        if comm.size > 1:
            return _batchtopk(params, x, hyper, comm, lo, d_sae)
        out, cache = mod.forward(params, x, **hyper)
        stats = {k: float(to_numpy(out[k])) for k in ("loss", "mse", "l0", "min_kept")}
        return stats, mod.backward(params, cache), (out["f"] != 0).any(axis=0)
    if comm.size > 1 and hyper.get("penalty", "l0") != "l0":
        raise ValueError(f"the {hyper['penalty']} penalty couples every latent of a token (its total L0); "
                         "it cannot be split over latent shards: train it with --shards 1")
    if comm.size > 1 and hyper.get("prefixes") is not None:
        raise ValueError("a Matryoshka loss sums reconstructions from latent prefixes; it cannot be split "
                         "over latent shards: train it with --shards 1")
    out, cache = mod.forward(params, x, **hyper)
    xp = xp_of(x)
    b_dec = params["b_dec"]
    parts = [out["xhat"]] + ([x - cache["err_frozen"]] if arch == "gated" else [])  # each (b, D)
    if comm.size > 1:  # sum the partial reconstructions f_s @ W_dec_s over shards, b_dec once
        summed = comm.sum(xp.stack(parts) - b_dec) + b_dec  # (1 or 2, b, D)
        cache["err"] = x - summed[0]  # (b, D)
        if arch == "gated":
            cache["err_frozen"] = x - summed[1]  # (b, D)
    grads = mod.backward(params, cache)
    mse = float(to_numpy((cache["err"] ** 2).sum())) / x.shape[0]
    # the penalties are sums over latents (JumpReLU: lambda L0 and the frequency penalty; Gated:
    # lambda L1), so their shard parts add up
    if arch == "jumprelu":
        counts = [float(to_numpy(out["l0"])), float(to_numpy(out["loss"])) - float(to_numpy(out["mse"]))]
    else:
        counts = [float(to_numpy(out["l0"])), hyper["sparsity_coeff"] * float(to_numpy(out["l1"]))]
    counts = _sum_scalars(comm, counts)
    stats = {"mse": mse, "l0": counts[0]}
    if arch == "jumprelu":
        stats["loss"] = mse + counts[1] if comm.size > 1 else float(to_numpy(out["loss"]))
    else:
        aux = float(to_numpy((cache["err_frozen"] ** 2).sum())) / x.shape[0]
        stats["loss"] = mse + counts[1] + aux
    _fix_b_dec(grads, cache["err"], comm)
    return stats, grads, (out["f"] != 0).any(axis=0)


def _sum_scalars(comm, values):
    if comm.size == 1:
        return values
    return [float(v) for v in comm.sum(numpy.asarray(values, dtype=numpy.float64))]


def _fix_b_dec(grads, err, comm, dsum=None):
    """b_dec's gradient from every shard: backward gave dxhat.sum(0) - u_s, u_s = W_enc_s @ (the
    shard's summed pre-activation gradient); the full one is dxhat.sum(0) - sum_s u_s."""
    if comm.size == 1:
        return
    if dsum is None:
        dsum = squared_error_backward(err).sum(axis=0)  # (D,), the same on every shard
    grads["b_dec"] = dsum - comm.sum(dsum - grads["b_dec"])  # (D,)


def _global_topk(vals, k, comm):
    """This shard's part of each row's k largest over all shards.

    vals (b, m) are this shard's candidates. Returns idx (b, w) local columns, w = min(k, m),
    and their values (b, w), set to -inf where the entry is not among the row's global top k.
    Each shard sends its top w (padded to k with -inf) to all; every rank picks the same k."""
    xp = xp_of(vals)
    b, m = vals.shape
    w = min(k, m)
    if w > 0:
        idx, v = topk_rows(vals, w)  # (b, w), (b, w)
    else:  # no candidates here (no dead latent on this shard): still take part in the gather
        idx, v = xp.zeros((b, 0), dtype=xp.int64), vals[:, :0]
    if comm.size == 1:
        return idx, v
    padded = xp.full((b, k), -xp.inf, dtype=vals.dtype)  # (b, k)
    padded[:, :w] = v
    every = comm.allgather(padded)  # (S, b, k)
    cat = every.transpose(1, 0, 2).reshape(b, comm.size * k)  # (b, S*k)
    pos, _ = topk_rows(cat, k)  # (b, k) positions in cat
    mine = (pos >= comm.rank * k) & (pos < comm.rank * k + w)  # (b, k)
    keep = xp.zeros((b, w), dtype=bool)  # (b, w)
    rows = xp.broadcast_to(xp.arange(b)[:, None], pos.shape)  # (b, k)
    keep[rows[mine], pos[mine] - comm.rank * k] = True
    return idx, xp.where(keep, v, -xp.inf)


def _auxk_start(pi, dead_mask, aux_k, W_dec, comm):
    """AuxK over shards, first half: the global top-k' of the dead latents per token and this
    shard's partial reconstruction of the error from them (parts: [] when no latent is dead)."""
    xp = xp_of(pi)
    dead = xp.flatnonzero(dead_mask) if dead_mask is not None else xp.zeros((0,), dtype=xp.int64)
    n_dead = int(_sum_scalars(comm, [float(dead.shape[0])])[0])
    if n_dead == 0:
        return {"n_dead": 0, "parts": []}
    aux_idx, aux_vals = _global_topk(pi[:, dead], min(aux_k, n_dead), comm)  # (b, wa), (b, wa)
    z_aux = _scatter_rows(xp.maximum(aux_vals, 0.0), aux_idx, dead.shape[0])  # (b, Nd_s)
    return {"n_dead": n_dead, "dead": dead, "z_aux": z_aux, "aux_idx": aux_idx, "aux_vals": aux_vals,
            "parts": [z_aux @ W_dec[dead]]}  # (b, Nd_s) @ (Nd_s, D) -> (b, D), no bias


def _auxk_finish(auxk, err, summed):
    """AuxK, second half: (aux, the AuxK cache topk.backward reads, None without local dead
    latents) from the global error and the summed reconstruction of it."""
    if auxk["n_dead"] == 0:
        return 0.0, None
    aux, err_aux = squared_error(err, summed[0])
    if auxk["dead"].shape[0] == 0:
        return aux, None
    return aux, {**{k: auxk[k] for k in ("dead", "z_aux", "aux_idx", "aux_vals")}, "err_aux": err_aux}


def _global_batch_topk_mask(pi, n_keep, comm, lo, d_sae):
    """This shard's part (b, m) of batchtopk.batch_topk_mask over all shards' latents: the n_keep
    largest entries of the whole (b, M) matrix, ties at the n_keep-th value kept in row-major order
    of the global matrix. Each shard sends its n_keep largest values; all pick the same cut."""
    xp = xp_of(pi)
    flat = pi.reshape(-1)  # (b*m,)
    size = flat.shape[0]
    cand = xp.full((n_keep,), -xp.inf, dtype=pi.dtype)  # (N,)
    w = min(n_keep, size)
    if w > 0:
        cand[:w] = xp.partition(flat, size - w)[size - w:]
    every = comm.allgather(cand).reshape(-1)  # (S*N,)
    v = xp.partition(every, every.shape[0] - n_keep)[every.shape[0] - n_keep]  # the N-th largest of all
    keep = flat > v  # (b*m,)
    short = n_keep - int(comm.sum(numpy.array([int(xp.count_nonzero(keep))], dtype=numpy.int64))[0])
    if short > 0:  # ties at v: the first `short` in the global row-major order (row, global latent)
        b, m = pi.shape
        tied = xp.flatnonzero(flat == v)  # (t,)
        keys = (tied // m) * d_sae + lo + tied % m  # (t,) global row-major positions
        counts = comm.allgather(numpy.array([int(tied.shape[0])], dtype=numpy.int64))[:, 0]
        padded = xp.full((int(counts.max()),), numpy.iinfo(numpy.int64).max, dtype=xp.int64)
        padded[:tied.shape[0]] = keys
        chosen = xp.sort(comm.allgather(padded).reshape(-1))[:short]  # (short,)
        keep[tied[xp.isin(keys, chosen)]] = True
    return keep.reshape(pi.shape)


def _batchtopk(params, x, hyper, comm, lo, d_sae):
    """BatchTopK (optionally Matryoshka) with AuxK over shards: the global batch selection of
    `_global_batch_topk_mask`, one partial reconstruction per prefix summed over shards, then the
    cache batchtopk.backward reads, with the prefixes cut to this shard's latents."""
    from minisae.sae import batchtopk
    from minisae.sae.common import check_prefixes, prefix_decoder_gradients

    xp = xp_of(x)
    W_enc, W_dec, b_dec = params["W_enc"], params["W_dec"], params["b_dec"]
    b, m = x.shape[0], W_enc.shape[1]
    n_keep = batchtopk.n_kept(hyper["k"], b, d_sae)
    prefixes = check_prefixes(hyper.get("prefixes"), d_sae, "batchtopk")
    local = [min(max(p, lo), lo + m) - lo for p in prefixes]  # each prefix cut to [lo, lo + m)
    x_c = x - b_dec  # (b, D)
    pi = x_c @ W_enc + params["b_enc"]  # (b, D) @ (D, m) -> (b, m)
    passes = _global_batch_topk_mask(pi, n_keep, comm, lo, d_sae) & (pi > 0.0)  # (b, m)
    z = xp.where(passes, pi, 0.0)  # (b, m)
    parts, acc, start = [], xp.zeros_like(x), 0
    for end in local:  # partial reconstruction of each prefix from this shard's latents
        acc = acc + z[:, start:end] @ W_dec[start:end]  # (b, D)
        parts.append(acc)
        start = end
    auxk = _auxk_start(pi, hyper.get("dead_mask"), int(hyper["aux_k"]), W_dec, comm)
    summed = comm.sum(xp.stack(parts + auxk["parts"]))  # (P + 0 or 1, b, D)
    errs = [x - (summed[j] + b_dec) for j in range(len(prefixes))]  # each (b, D)
    total = sum(float(to_numpy((e * e).sum())) for e in errs) / b
    mse = float(to_numpy((errs[-1] * errs[-1]).sum())) / b
    aux, aux_cache = _auxk_finish(auxk, errs[-1], summed[len(prefixes):])
    aux_coeff = float(hyper["aux_coeff"])
    cache = {"x_c": x_c, "z": z, "passes": passes, "errs": errs, "prefixes": local, "aux_coeff": aux_coeff,
             "aux": aux_cache}
    grads = batchtopk.backward(params, cache)
    _fix_b_dec(grads, None, comm, dsum=prefix_decoder_gradients(errs, prefixes)[0].sum(axis=0))
    kept = z[passes]
    low = float(to_numpy(kept.min())) if kept.size else math.inf
    low = float(comm.allgather(numpy.array([low]))[:, 0].min())
    l0 = _sum_scalars(comm, [float(to_numpy(xp.count_nonzero(z)))])[0] / b
    stats = {"loss": total + aux_coeff * float(to_numpy(aux)), "mse": mse, "l0": l0,
             "min_kept": low if math.isfinite(low) else math.nan}
    return stats, grads, (z != 0).any(axis=0)


def _topk(params, x, hyper, comm):
    """TopK with AuxK over shards: the global top-k (and top-k' of the dead latents) chosen by
    `_global_topk`, then the cache topk.backward reads, built from this shard's entries."""
    from minisae.sae import topk

    xp = xp_of(x)
    k, aux_k, aux_coeff = int(hyper["k"]), int(hyper["aux_k"]), float(hyper["aux_coeff"])
    dead_mask = hyper.get("dead_mask")
    W_enc, W_dec, b_dec = params["W_enc"], params["W_dec"], params["b_dec"]
    b, m = x.shape[0], W_enc.shape[1]
    x_c = x - b_dec  # (b, D)
    pi = x_c @ W_enc + params["b_enc"]  # (b, D) @ (D, m) -> (b, m)
    idx, vals = _global_topk(pi, k, comm)  # (b, w), (b, w)
    z = _scatter_rows(xp.maximum(vals, 0.0), idx, m)  # (b, m)
    parts = [z @ W_dec]  # (b, D) partial reconstruction
    auxk = _auxk_start(pi, dead_mask, aux_k, W_dec, comm)
    parts += auxk["parts"]
    summed = comm.sum(xp.stack(parts)) if comm.size > 1 else parts  # (1 or 2, b, D)
    xhat = summed[0] + b_dec  # (b, D)
    mse, err = squared_error(x, xhat)
    aux, aux_cache = _auxk_finish(auxk, err, summed[1:])
    cache = {"x_c": x_c, "z": z, "idx": idx, "vals": vals, "err": err, "aux_coeff": aux_coeff,
             "aux": aux_cache}
    grads = topk.backward(params, cache)
    _fix_b_dec(grads, err, comm)
    l0 = _sum_scalars(comm, [float(to_numpy(xp.count_nonzero(z)))])[0] / b
    mse, aux = float(to_numpy(mse)), float(to_numpy(aux))
    return {"loss": mse + aux_coeff * aux, "mse": mse, "l0": l0}, grads, (z != 0).any(axis=0)


# ----------------------------------------------------------------------------------------------
# sharded checkpoints


def _latent_axis(name):
    """The axis of a parameter that runs over latents (None for b_dec, which every shard holds)."""
    return {"W_enc": 1, "b_dec": None}.get(name, 0)


def save_sharded(ckdir, grid, state, cfg):
    """Write this shard's state (replica 0's ranks), then rank 0 writes checkpoint.json naming it.

    Collective: every rank of the grid calls it. Files: ckdir/step-NNNNNNNN/shard-SSSSS.safetensors;
    the manifest is replaced atomically after every shard file is complete, then the step folders
    it no longer names are removed."""
    ckdir = Path(ckdir)
    step_dir = f"step-{state['step']:08d}"
    if grid.r == 0:
        (ckdir / step_dir).mkdir(parents=True, exist_ok=True)
        tensors = {"since_fired": to_numpy(state["since_fired"])}
        for k, v in state["params"].items():
            tensors[f"params.{k}"] = to_numpy(v)
            tensors[f"adam_m.{k}"] = to_numpy(state["adam"]["m"][k])
            tensors[f"adam_v.{k}"] = to_numpy(state["adam"]["v"][k])
        info = {"format": MANIFEST_FORMAT, "lo": grid.lo, "hi": grid.hi, "step": state["step"]}
        save_file(tensors, ckdir / step_dir / f"shard-{grid.s:05d}.safetensors",
                  metadata={"minisae": json.dumps(info)})
    grid.world.barrier()
    if grid.world.rank == 0:
        shards = [{"file": f"{step_dir}/shard-{s:05d}.safetensors", "lo": lo, "hi": hi}
                  for s, (lo, hi) in enumerate(latent_range(cfg.d_sae, grid.S, s) for s in range(grid.S))]
        manifest = {"format": MANIFEST_FORMAT, "step": state["step"], "adam_step": int(state["adam"]["step"]),
                    "batchtopk_threshold": float(state.get("batchtopk_threshold", 0.0)),
                    "threshold_updates": int(state.get("threshold_updates", 0)),
                    "scale": state["scale"], "d_sae": cfg.d_sae, "d_in": int(state["params"]["b_dec"].shape[0]),
                    "replicas": grid.R, "shards": shards, "config": dataclasses.asdict(cfg)}
        _write_text_atomic(ckdir / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
        for old in ckdir.glob("step-*"):
            if old.name != step_dir:
                shutil.rmtree(old, ignore_errors=True)
    grid.world.barrier()


def read_manifest(ckdir):
    from minisae.train import CheckpointError

    path = Path(ckdir) / MANIFEST_NAME
    try:
        man = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the sharded checkpoint manifest ({e})") from None
    need = ("format", "step", "adam_step", "scale", "d_sae", "d_in", "shards", "config")
    if not isinstance(man, dict) or man.get("format") != MANIFEST_FORMAT or any(k not in man for k in need):
        raise CheckpointError(f"{path}: not a {MANIFEST_FORMAT} manifest (expected keys {need})")
    return man


def load_sharded(ckdir, lo, hi, xp, *, names, params_only=False):
    """(manifest, state) of latents [lo, hi) from a sharded checkpoint written with any S: each
    per-latent tensor is put together from the shard files that overlap [lo, hi). params_only:
    leave out Adam's moments (a third of the memory; for the release SAE)."""
    prefixes = ("params",) if params_only else ("params", "adam_m", "adam_v")
    from minisae.train import CheckpointError

    ckdir = Path(ckdir)
    man = read_manifest(ckdir)
    pieces = {}  # tensor name -> list of slices
    for sh in man["shards"]:
        a, b = max(lo, sh["lo"]), min(hi, sh["hi"])
        if a >= b and not (sh is man["shards"][0]):
            continue
        path = ckdir / sh["file"]
        try:
            with SafetensorsFile(path) as f:
                for prefix in prefixes:
                    for k in names:
                        name = f"{prefix}.{k}"
                        if name not in f:
                            raise CheckpointError(f"{path}: tensor {name!r} is missing")
                        arr, axis = f.get(name), _latent_axis(k)
                        if axis is None:
                            pieces.setdefault(name, [numpy.array(arr)])
                        elif a < b:
                            sl = [slice(None)] * arr.ndim
                            sl[axis] = slice(a - sh["lo"], b - sh["lo"])
                            pieces.setdefault(name, []).append(numpy.array(arr[tuple(sl)]))
                if a < b:
                    pieces.setdefault("since_fired", []).append(numpy.array(f.get("since_fired")[a - sh["lo"]:b - sh["lo"]]))
        except (SafetensorsError, OSError) as e:
            raise CheckpointError(f"{path}: cannot read the checkpoint shard ({e}); it may be truncated "
                                  "or corrupt") from None
    state = {"params": {}, "adam": {"step": int(man["adam_step"]), "m": {}, "v": {}}}
    for prefix, store in (("params", state["params"]), ("adam_m", state["adam"]["m"]), ("adam_v", state["adam"]["v"])):
        if prefix not in prefixes:
            continue
        for k in names:
            axis = _latent_axis(k)
            arr = pieces[f"{prefix}.{k}"][0] if axis is None else numpy.concatenate(pieces[f"{prefix}.{k}"], axis=axis)
            if axis is not None and arr.shape[axis] != hi - lo:
                raise CheckpointError(f"{ckdir}: the shards cover {arr.shape[axis]} of latents [{lo}, {hi})")
            store[k] = asarray(arr, xp)
    state["since_fired"] = asarray(numpy.concatenate(pieces["since_fired"]), xp)
    state["step"], state["scale"] = int(man["step"]), float(man["scale"])
    state["batchtopk_threshold"] = float(man.get("batchtopk_threshold", 0.0))
    state["threshold_updates"] = int(man.get("threshold_updates", 0))
    return man, state


def reshard(src_run, dst_run, shards):
    """Copy a run folder's sharded checkpoint to dst_run/checkpoint with `shards` shards (single
    process; memory holds one output shard at a time). Training resumes on any S without it: this
    is for moving a checkpoint to a grid whose ranks should each read one file."""
    src, dst = Path(src_run) / CHECKPOINT_DIR, Path(dst_run) / CHECKPOINT_DIR
    man = read_manifest(src)
    if int(shards) < 1 or int(shards) > int(man["d_sae"]):
        raise ValueError(f"shards: expected 1 ... {man['d_sae']} (d_sae), found {shards}")
    check_output_dir(dst_run, "train run", is_own=lambda d: False)  # new or empty only
    with SafetensorsFile(src / man["shards"][0]["file"]) as f:
        names = [k[len("params."):] for k in f.keys() if k.startswith("params.")]
    step_dir = f"step-{man['step']:08d}"
    (dst / step_dir).mkdir(parents=True)
    out = []
    for s in range(int(shards)):
        lo, hi = latent_range(man["d_sae"], shards, s)
        _, st = load_sharded(src, lo, hi, numpy, names=names)
        tensors = {"since_fired": st["since_fired"]}
        for k in names:
            tensors[f"params.{k}"] = st["params"][k]
            tensors[f"adam_m.{k}"] = st["adam"]["m"][k]
            tensors[f"adam_v.{k}"] = st["adam"]["v"][k]
        info = {"format": MANIFEST_FORMAT, "lo": lo, "hi": hi, "step": man["step"]}
        save_file(tensors, dst / step_dir / f"shard-{s:05d}.safetensors", metadata={"minisae": json.dumps(info)})
        out.append({"file": f"{step_dir}/shard-{s:05d}.safetensors", "lo": lo, "hi": hi})
    _write_text_atomic(dst / MANIFEST_NAME, json.dumps({**man, "shards": out}, indent=1) + "\n")
    for name in ("config.json", "metrics.jsonl"):  # the run's record, so the copy resumes as a run
        if (Path(src_run) / name).exists():
            write_atomic(Path(dst_run) / name, (Path(src_run) / name).read_bytes())
    return dst


def _write_text_atomic(path, text):
    write_atomic(path, text)


# ----------------------------------------------------------------------------------------------
# the training loop


def train_parallel(cfg, source, out_dir, *, shards=1, accumulate=1, comm=None, resume=False,
                   overwrite=False, progress=True):
    """minisae.train.train on a grid of R x S processes (comm: the world, default dist.world()).

    Every rank calls it with the same arguments; rank 0 alone writes config.json, metrics.jsonl,
    the manifest, sae/ and eval.json (all atomically), replica 0's ranks the shard files.
    accumulate: micro-batches per rank per step (gradients summed in order): one process with
    accumulate=R ends bitwise equal to R ranks with accumulate=1 (tests/test_dist.py).
    Returns minisae.train.TrainResult on rank 0 (on other ranks its sae, summary are None, {})."""
    from minisae.train import (CheckpointError, TrainingError, _check_resume_config, hypers_at, is_run_folder,
                               param_names)

    world = dist.world() if comm is None else comm
    cfg = cfg.resolved(int(source.d_in))
    xp = get_xp(cfg.backend)
    names = param_names(cfg)
    grid = make_grid(world, shards, cfg.d_sae)
    if grid.S > 1 and cfg.penalty != "l0":
        raise ValueError(f"penalty {cfg.penalty!r} couples every latent of a token (its total L0); "
                         "it cannot be split over latent shards: train it with --shards 1")
    if cfg.uses_controller() or cfg.threshold_lr_mult != 1.0:
        raise ValueError("the λ controller (--target-l0 for Gated / JumpReLU) and --threshold-lr-mult run in "
                         "single-process training only for now: train without --shards/--accumulate/mpiexec")
    n_micro = grid.R * int(accumulate)
    if int(accumulate) < 1 or cfg.batch_size % n_micro:
        raise ValueError(f"batch_size {cfg.batch_size} must split into {grid.R} replicas x "
                         f"{accumulate} micro-batches (accumulate >= 1)")
    b, mine = cfg.batch_size // n_micro, cfg.batch_size // grid.R  # rows per micro-batch, per replica
    out_dir = Path(out_dir)
    ckdir = out_dir / CHECKPOINT_DIR
    metrics_path = out_dir / "metrics.jsonl"
    lead = world.rank == 0

    if lead:  # the output-folder rule (minisae.io.files): new, empty, or a run folder of ours
        check_output_dir(out_dir, "train run", is_own=is_run_folder)
    have = world.bcast_obj(((ckdir / MANIFEST_NAME).exists(), (out_dir / "sae").exists()) if lead else None)
    if any(have) and not (resume and have[0]) and not overwrite:
        raise OutputExistsError(f"{out_dir} already holds a training run; resume it (--resume), start it "
                                "over (--overwrite) or choose a new folder")
    have = have[0]
    if have and resume:
        man, state = load_sharded(ckdir, grid.lo, grid.hi, xp, names=names)
        _check_resume_config(ckdir / MANIFEST_NAME, man, cfg)
        if int(man["d_in"]) != source.d_in:
            raise CheckpointError(f"{ckdir}: trained on d_in={man['d_in']}, the source has {source.d_in}")
        if lead:
            _truncate_metrics(metrics_path, state["step"])
    else:
        if lead:
            make_dir(out_dir)
            if ckdir.exists():
                shutil.rmtree(ckdir)
            for old in (metrics_path, out_dir / "eval.json"):
                if old.exists():
                    old.unlink()
        state = _fresh_state(cfg, source, grid, xp)
    if lead:
        from minisae.train import _source_info
        info = {"train": dataclasses.asdict(cfg), "source": _source_info(source),
                "grid": {"processes": world.size, "replicas": grid.R, "shards": grid.S,
                         "accumulate": int(accumulate), "backend": world.name}}
        _write_text_atomic(out_dir / "config.json", json.dumps(info, indent=2) + "\n")
    world.barrier()

    scale, params, adam, since_fired = state["scale"], state["params"], state["adam"], state["since_fired"]
    threshold = (state["batchtopk_threshold"], state["threshold_updates"])  # BatchTopK's running θ
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    bar = _bar(cfg, state["step"], progress and lead)
    pending, t0 = [], time.time()
    try:
        for step in range(state["step"], cfg.steps):
            # shard 0 of each replica reads the replica's rows and broadcasts them to the other shards
            X = None
            if grid.s == 0:
                X = _replica_rows(source, step, cfg.batch_size, grid.r * mine, (grid.r + 1) * mine)  # (A*b, D)
            if grid.S > 1:
                X = grid.shard.broadcast(numpy.empty((mine, source.d_in), numpy.float32) if X is None
                                         else numpy.ascontiguousarray(X, dtype=numpy.float32), root=0)
            hyper = hypers_at(cfg, step, since_fired >= cfg.dead_window_tokens)
            # sums: loss, mse, l0 over the micro-batches, and 1 where a batch held NaN or inf
            fired, sums, parts = None, numpy.array([0.0, 0.0, 0.0, float(not numpy.isfinite(X).all())]), []
            low = math.inf  # BatchTopK: the smallest kept activation of the step's micro-batches
            for j in range(int(accumulate)):
                x = asarray(X[j * b:(j + 1) * b], xp, cfg.dtype) / scale  # (b, D)
                stats, g, f = shard_forward_backward(cfg.architecture, params, x, hyper, grid.shard,
                                                     grid.lo, cfg.d_sae)
                parts.append(g)
                fired = f if fired is None else fired | f
                sums[:3] += (stats["loss"], stats["mse"], stats["l0"])
                low = min(low, stats.get("min_kept", math.inf) if math.isfinite(stats.get("min_kept", math.nan)) else math.inf)
            grads = parts[0] if len(parts) == 1 else {k: dist.ordered_sum([g[k] for g in parts]) for k in parts[0]}
            if grid.R > 1:  # the replicas' gradients, summed in rank order; fired OR-ed
                grads = {k: grid.replica.sum(v) for k, v in grads.items()}
                fired = grid.replica.any(fired)
                sums = grid.replica.sum(sums)
            if cfg.architecture == "batchtopk":  # the running inference threshold, the same on every rank
                if grid.R > 1:
                    low = float(grid.replica.allgather(numpy.array([low]))[:, 0].min())
                threshold = VARIANTS["batchtopk"].update_threshold(
                    *threshold, low if math.isfinite(low) else math.nan, cfg.threshold_rate)
            if sums[3] > 0:  # every rank sees it after the sum, so every rank stops here
                raise TrainingError(f"step {step}: the activation batch holds NaN or inf values; the last good "
                                    f"checkpoint is kept in {ckdir}")
            if n_micro > 1:
                for v in grads.values():
                    v *= 1.0 / n_micro
            loss, mse, l0 = (float(v) / n_micro for v in sums[:3])
            if not math.isfinite(loss):
                raise TrainingError(f"step {step}: the loss is {loss}; try a lower learning rate")
            optim.remove_parallel_decoder_grad(params["W_dec"], grads["W_dec"], out=grads["W_dec"])
            lr = optim.lr_at(step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.steps,
                             decay_frac=cfg.decay_frac)
            optim.adam_update(params, grads, adam, lr=lr, betas=betas, eps=cfg.adam_eps)
            optim.normalize_decoder_rows(params["W_dec"])
            if "threshold" in params:  # raw θ (JumpReLU option): kept >= 0, as minisae.train does
                xp.maximum(params["threshold"], 0.0, out=params["threshold"])
            since_fired = xp.where(fired, 0, since_fired + cfg.batch_size)  # (m,)
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.steps:  # collective: every rank takes part
                fvu_denom = _centred_sum_of_squares(X / scale, grid.replica, cfg.batch_size)
                dead = _sum_dead(grid, since_fired >= cfg.dead_window_tokens)
                row = {"step": done, "tokens": done * cfg.batch_size, "loss": loss, "mse": mse, "l0": l0,
                       "fvu": mse * cfg.batch_size / fvu_denom if fvu_denom > 0 else float("nan"), "lr": lr,
                       "dead_frac": dead / cfg.d_sae, "elapsed_s": round(time.time() - t0, 3)}
                if "sparsity_coeff" in hyper:
                    row["sparsity_coeff"] = hyper["sparsity_coeff"]
                if lead:
                    pending.append(row)
                    bar.set_postfix(loss=f"{loss:.4g}", L0=f"{l0:.1f}")
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                bad = world.sum(numpy.array([0 if _finite(params, xp) else 1], dtype=numpy.int64))[0]
                if bad:
                    raise TrainingError(f"step {step}: the parameters became NaN or inf; the last good "
                                        f"checkpoint is kept in {ckdir}; try a lower learning rate")
                save_sharded(ckdir, grid, {"step": done, "scale": scale, "params": params, "adam": adam,
                                           "since_fired": since_fired, "batchtopk_threshold": threshold[0],
                                           "threshold_updates": threshold[1]}, cfg)
                if lead:
                    _append_jsonl(metrics_path, pending)
                pending = []
            bar.update(1)
    finally:
        bar.close()
        if lead:
            _append_jsonl(metrics_path, pending)
    return _finish(cfg, source, out_dir, ckdir, world, names, scale, threshold[0])


def _fresh_state(cfg, source, grid, xp):
    """Initial state of this rank: C and TopK's b_dec from rank 0, the shard's parameters."""
    from minisae.train import estimate_scale

    scale, b_dec = None, None
    if grid.world.rank == 0:
        scale, sample = estimate_scale(source, cfg.norm_sample_tokens)  # C, (N, D)
        if cfg.architecture == "topk":  # b_dec = geometric median of the normalised sample
            from minisae.sae.common import geometric_median
            b_dec = to_numpy(geometric_median(asarray(sample / scale, numpy, cfg.dtype)))  # (D,)
    scale, b_dec = grid.world.bcast_obj((scale, b_dec))
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
    from minisae.train import TrainingError

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


def _finish(cfg, source, out_dir, ckdir, world, names, scale, batchtopk_threshold):
    """Rank 0 puts the whole SAE together from the final checkpoint, saves and evaluates it."""
    from minisae.evaluate import evaluate_sae
    from minisae.io.saefile import SAE
    from minisae.train import TrainResult, _release_hyper, _sae_metadata

    sae, summary, params_np = None, {}, None
    if world.rank == 0:
        _, st = load_sharded(ckdir, 0, cfg.d_sae, numpy, names=names, params_only=True)
        params_np = st["params"]
        sae = SAE.from_training(cfg.architecture, params_np, scale=scale, hyper=_release_hyper(cfg, batchtopk_threshold),
                                metadata=_sae_metadata(source))
        sae.save(out_dir / "sae", overwrite=True)
        if cfg.eval_tokens > 0:
            summary = evaluate_sae(sae, source, n_tokens=cfg.eval_tokens, batch_size=cfg.eval_batch_size)
            _write_text_atomic(out_dir / "eval.json", json.dumps(summary, indent=2) + "\n")
    world.barrier()
    return TrainResult(sae=sae, params=params_np, scale=scale, steps=cfg.steps, summary=summary, out_dir=out_dir)


def _append_jsonl(path, rows):
    with open(path, "a") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")


def _truncate_metrics(path, step):
    from minisae.train import _truncate_metrics as truncate
    truncate(path, step)


def _bar(cfg, initial, enabled):
    from minisae.progress import progress_bar
    return progress_bar(cfg.steps, enabled=bool(enabled), initial=initial, desc=cfg.architecture, unit="step")
