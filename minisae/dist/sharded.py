"""Latent sharding: the grid of processes, an initialisation that does not depend on the number
of shards, and one SAE step over S latent shards (docs/scale.md). The training loop is
minisae.training.train.

P = R * S processes form a grid; rank = r * S + s holds replica r's copy of shard s: the latents
[lo_s, hi_s) (a contiguous slice of M), i.e. W_enc[:, lo:hi], W_dec[lo:hi], every per-latent
vector, plus b_dec (replicated). One step on one shard (`shard_forward_backward`):

  1. encode with this shard's latents (JumpReLU, Gated: per latent; TopK: local top-k, then an
     all-gather of the S candidate lists picks the global top-k, as OpenAI did; BatchTopK: the
     same over the whole micro-batch);
  2. decode a partial reconstruction f_s @ W_dec_s; one sum over the shard group gives xhat
     (with Gated's frozen-decoder reconstruction, AuxK's and Matryoshka's prefixes in the same
     message);
  3. run the variant's own backward on the shard with the global error x - xhat; complete
     b_dec's gradient with its sum over shards; everything else is shard-local.

`sharded_step` is a training step on the grid: a replica's micro-batches through that step, their
gradients summed in order and over the replicas, every rank's errors.

The parameters at init do not depend on S: the dictionary is drawn in chunks of INIT_CHUNK latents,
chunk c from the generator seeded (seed, c) (`init_shard`). A sharded step therefore agrees with
the unsharded variant up to floating-point rounding (the sum over shards adds in another order;
tests/test_dist.py holds it to 1e-12 in float64). With S = 1 it is the variant's forward and
backward bit for bit.

Legend: b tokens in the micro-batch, D d_in, M d_sae, m = hi - lo latents on this shard, K top-k,
N kept entries (BatchTopK), P ranks, R replicas, S shards.
"""

import dataclasses
import math

import numpy

from minisae.dist.comm import on_every_rank, ordered_sum
from minisae.errors import InputError, TrainingError
from minisae.sae import VARIANTS
from minisae.sae.common import squared_error, squared_error_backward, unit_rows
from minisae.sae.common import scatter_rows as _scatter_rows
from minisae.sae.topk import topk_rows
from minisae.xp import asarray, to_numpy, xp_of

INIT_CHUNK = 4096  # latents per init chunk (each drawn from its own seeded generator)

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
        raise InputError(f"shards: expected a divisor of the {P} processes, found {shards}")
    if d_sae < S:
        raise InputError(f"shards: cannot split d_sae={d_sae} latents into {S} shards")
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
    mod = VARIANTS[cfg.architecture]
    kw = {}
    if cfg.architecture == "jumprelu":
        kw = dict(threshold_param=cfg.threshold_param, threshold_init=cfg.threshold_init or mod.THRESHOLD_INIT)
    one = mod.init(d_in, 1, seed=0, dtype=cfg.dtype, **kw)  # the variant's init values, one latent
    W_dec = init_dictionary_chunked(d_in, lo, hi, seed=cfg.seed, dtype=cfg.dtype)  # (m, D)
    params = {}
    for name in one:  # the variant's parameter names, in its order
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
    BatchTopK adds min_kept; with S = 1 also fired_count, (m,) tokens each latent fired on); grads: this shard's gradients (b_dec's summed over shards);
    fired: (m,) bool. With S = 1 this is the variant's own step, `forward_backward` (its fastest
    exact path, the one minisae.training.train runs), bit for bit."""
    mod = VARIANTS[arch]
    if comm.size == 1:  # the variant's own step
        out, grads = mod.forward_backward(params, x, **hyper, path="auto", dense_f=False)
        stats = {k: float(to_numpy(out[k])) for k in ("loss", "mse", "l0", "min_kept") if k in out}
        stats["fired_count"] = out["fired"]  # (M,) tokens each latent fired on (the L0 controller reads it)
        return stats, grads, out["fired"] != 0
    if arch == "topk":
        return _topk(params, x, hyper, comm)
    if arch == "batchtopk":
        return _batchtopk(params, x, hyper, comm, lo, d_sae)
    if comm.size > 1 and hyper.get("penalty", "l0") != "l0":
        raise InputError(f"the {hyper['penalty']} penalty couples every latent of a token (its total L0); "
                         "it cannot be split over latent shards: train it with --shards 1")
    if comm.size > 1 and hyper.get("prefixes") is not None:  # JumpReLU with Matryoshka prefixes
        return _jumprelu_matryoshka(params, x, hyper, comm, lo, d_sae)
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


def sharded_step(cfg, params, X, bad_batch, hyper, grid, xp, accumulate, threshold, *, count_fired, where, kept):
    """One training step's gradients on a grid (R replicas x S shards, `accumulate` micro-batches):
    each micro-batch of this replica's rows X (A*b, D) through `shard_forward_backward`, the
    gradients summed in order, over the replicas too, and scaled by 1 / (R·A). Returns (grads,
    fired (m,), counts (m,) when count_fired else None, (loss, mse, l0) the batch's means,
    threshold: BatchTopK's running θ, updated). bad_batch: 1.0 when X held NaN or inf. Errors (such
    a batch anywhere, a non-finite loss) are every rank's (dist.on_every_rank); `where` and kept()
    say at which step and what is kept. cfg: the run's TrainConfig."""
    n_micro = grid.R * accumulate
    b = X.shape[0] // accumulate  # rows per micro-batch
    counts = None
    # sums: loss, mse, l0 over the micro-batches, and 1 where a batch held NaN or inf
    fired, sums, parts = None, numpy.array([0.0, 0.0, 0.0, bad_batch]), []
    low = math.inf  # BatchTopK: the smallest kept activation of the step's micro-batches
    for j in range(accumulate):
        xj = asarray(X[j * b:(j + 1) * b], xp)  # (b, D)
        stats, g, f = shard_forward_backward(cfg.architecture, params, xj, hyper, grid.shard, grid.lo, cfg.d_sae)
        if count_fired:  # (m,) firing counts (the L0 controller's; it runs on one shard)
            c = to_numpy(stats.pop("fired_count")).astype(numpy.float64)
            counts = c if j == 0 else counts + c
        parts.append(g)
        fired = f if fired is None else fired | f
        sums[:3] += (stats["loss"], stats["mse"], stats["l0"])
        if math.isfinite(stats.get("min_kept", math.nan)):  # BatchTopK (NaN: nothing kept)
            low = min(low, stats["min_kept"])
    grads = parts[0] if len(parts) == 1 else {k: ordered_sum([g[k] for g in parts]) for k in parts[0]}
    if grid.R > 1:  # the replicas' gradients, summed in rank order; fired OR-ed
        grads = {k: grid.replica.sum(v) for k, v in grads.items()}
        fired = grid.replica.any(fired)
        sums = grid.replica.sum(sums)
        if count_fired:
            counts = grid.replica.sum(counts)
    if cfg.architecture == "batchtopk":  # the running inference threshold, the same on every rank
        if grid.R > 1:
            low = float(grid.replica.allgather(numpy.array([low]))[:, 0].min())
        threshold = VARIANTS["batchtopk"].update_threshold(*threshold, low if math.isfinite(low) else math.nan,
                                                          cfg.threshold_rate)
    if sums[3] > 0:  # every rank sees it after the sum, so every rank stops here (and says so once)
        raise on_every_rank(TrainingError(f"{where}: the activation batch holds NaN or inf values; " + kept()))
    if n_micro > 1:
        for v in grads.values():
            v *= 1.0 / n_micro
    loss, mse, l0 = (float(v) / n_micro for v in sums[:3])
    if not math.isfinite(loss):
        raise on_every_rank(TrainingError(f"{where}: the loss is {loss}; " + kept() + "; try a lower learning rate"))
    return grads, fired, counts, (loss, mse, l0), threshold


def _jumprelu_matryoshka(params, x, hyper, comm, lo, d_sae):
    """JumpReLU with Matryoshka prefixes over shards: the shard's forward without prefixes (its
    encoder and penalties are per latent), one partial reconstruction per prefix summed over shards,
    then jumprelu.backward with the prefixes cut to this shard's latents."""
    from minisae.sae import jumprelu
    from minisae.sae.common import check_prefixes, prefix_decoder_gradients

    xp = xp_of(x)
    b, m = x.shape[0], params["W_enc"].shape[1]
    prefixes = check_prefixes(hyper["prefixes"], d_sae, "jumprelu")
    local = tuple(min(max(p, lo), lo + m) - lo for p in prefixes)  # each prefix cut to [lo, lo + m)
    out, cache = jumprelu.forward(params, x, **{**hyper, "prefixes": None})
    f, W_dec, b_dec = cache["f"], params["W_dec"], params["b_dec"]
    parts, acc, start = [], xp.zeros_like(x), 0
    for end in local:  # this shard's part of each prefix's reconstruction
        acc = acc + f[:, start:end] @ W_dec[start:end]  # (b, D)
        parts.append(acc)
        start = end
    summed = comm.sum(xp.stack(parts))  # (n_prefixes, b, D)
    errs = [x - (summed[j] + b_dec) for j in range(len(prefixes))]  # each (b, D)
    cache["err"], cache["errs_inner"] = errs[-1], errs[:-1]
    cache["hyper"] = dataclasses.replace(cache["hyper"], prefixes=local)
    grads = jumprelu.backward(params, cache)
    _fix_b_dec(grads, None, comm, dsum=prefix_decoder_gradients(errs, prefixes)[0].sum(axis=0))
    sq = [float(to_numpy((e * e).sum())) for e in errs]  # sum_bd (x - xhat_j)^2 per prefix
    total = sum(sq) / b
    counts = _sum_scalars(comm, [float(to_numpy(out["l0"])), float(to_numpy(out["loss"])) - float(to_numpy(out["mse"]))])
    stats = {"loss": total + counts[1], "mse": sq[-1] / b, "l0": counts[0]}
    return stats, grads, (f != 0).any(axis=0)


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


TOPK_BLOCK = 2 ** 22  # entries of pi per top_k call: bounds the selection's (b, m) temporaries


def _topk_rows_blocked(vals, w):
    """topk.topk_rows(vals, w) a block of rows at a time (each row's selection is its own, so the
    result is the same): where common.top_k selects on whole rows (on CuPy, or when m is small
    next to w) its partitioned copy and masks of vals would otherwise be the step's largest
    temporaries."""
    xp = xp_of(vals)
    rows = max(1, TOPK_BLOCK // max(1, vals.shape[1]))
    if rows >= vals.shape[0]:
        return topk_rows(vals, w)
    idx = xp.empty((vals.shape[0], w), dtype=xp.int64)  # (b, w)
    out = xp.empty((vals.shape[0], w), dtype=vals.dtype)  # (b, w)
    for a in range(0, vals.shape[0], rows):
        idx[a:a + rows], out[a:a + rows] = topk_rows(vals[a:a + rows], w)
    return idx, out


def _global_topk(vals, k, comm):
    """This shard's part of each row's k largest over all shards.

    vals (b, m) are this shard's candidates. Returns idx (b, w) local columns, w = min(k, m),
    and their values (b, w), set to -inf where the entry is not among the row's global top k.
    Each shard sends its top w (padded to k with -inf) to all; every rank picks the same k."""
    xp = xp_of(vals)
    b, m = vals.shape
    w = min(k, m)
    if w > 0:
        idx, v = _topk_rows_blocked(vals, w)  # (b, w), (b, w)
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
    return {"n_dead": n_dead, "dead": dead, "z_aux": z_aux,
            "parts": [z_aux @ W_dec[dead]]}  # (b, Nd_s) @ (Nd_s, D) -> (b, D), no bias


def _auxk_finish(auxk, err, summed):
    """AuxK, second half: (aux, the AuxK cache topk.backward reads, None without local dead
    latents) from the global error and the summed reconstruction of it."""
    if auxk["n_dead"] == 0:
        return 0.0, None
    aux, err_aux = squared_error(err, summed[0])
    if auxk["dead"].shape[0] == 0:
        return aux, None
    return aux, {**{k: auxk[k] for k in ("dead", "z_aux")}, "err_aux": err_aux}


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
    sq = [float(to_numpy((e * e).sum())) for e in errs]  # sum_bd (x - xhat_j)^2 per prefix
    total, mse = sum(sq) / b, sq[-1] / b
    aux, aux_cache = _auxk_finish(auxk, errs[-1], summed[len(prefixes):])
    aux_coeff = float(hyper["aux_coeff"])
    cache = {"x_c": x_c, "z": z, "passes": passes, "errs": errs, "prefixes": local, "aux_coeff": aux_coeff,
             "aux": aux_cache}
    grads = batchtopk.backward(params, cache)
    _fix_b_dec(grads, None, comm, dsum=prefix_decoder_gradients(errs, prefixes)[0].sum(axis=0))
    low = float(to_numpy(xp.where(passes, z, math.inf).min())) if z.size else math.inf  # inf: none kept
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
