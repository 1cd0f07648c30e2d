"""Checks that run inside `mpiexec -n P python tests/mpi_worker.py CASE TMPDIR` (tests/test_dist.py
starts them). Every rank runs the case; a failed assert exits non-zero and mpiexec reports it.

Cases: collectives (P = 2), dataparallel (P = 2), shard (P = 2), grid (P = 4), nccl (P = 1, GPU).
"""

import shutil
import sys
from pathlib import Path

import numpy

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tolerances import SHARD32_ATOL, SHARD32_RTOL, SHARD64_RTOL, XP32_RTOL  # noqa: E402

from minisae import dist  # noqa: E402
from minisae.data.synthetic import SyntheticActivations, SyntheticConfig
from minisae.training.checkpoint import load_sharded, reshard  # noqa: E402
from minisae.training.train import train_parallel  # noqa: E402
from minisae.errors import InputError  # noqa: E402
from minisae.dist.sharded import init_shard, latent_range, shard_forward_backward  # noqa: E402
from minisae.sae import VARIANTS
from minisae.training.train import TrainConfig, hypers_at

SOURCE = SyntheticActivations(SyntheticConfig(d_in=16, n_features=64, target_l0=2.0))
ARCHS = {
    "jumprelu": dict(sparsity_coeff=1e-3, threshold_init=0.05),
    "gated": dict(sparsity_coeff=1e-3),
    "topk": dict(k=4, aux_k=6, dead_window_tokens=64),  # latents die fast: AuxK is exercised
    "batchtopk": dict(k=4, aux_k=6, dead_window_tokens=64, matryoshka=[10, 25]),
}

OPTIONS = [("gated", dict(target_l0=3.0)), ("jumprelu", dict(target_l0=3.0, threshold_lr_mult=0.1))]


def config(arch, **over):
    kw = dict(d_sae=40, steps=6, batch_size=64, checkpoint_every=3, log_every=2, eval_tokens=0,
              warmup_steps=2, sparsity_warmup_steps=2, lr=3e-3)
    kw.update(ARCHS[arch])
    kw.update(over)
    return TrainConfig(arch, **kw)


def same_bits(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert a[k].dtype == b[k].dtype and numpy.array_equal(a[k], b[k]), f"{what}: {k} differs"


def params_close(a, b, what, rtol, atol):
    """Each parameter of a within atol + rtol·max|b| of b's (the scale-relative bound of sharded sums)."""
    for k in a:
        err = numpy.abs(a[k] - b[k]).max()
        bound = atol + rtol * numpy.abs(b[k]).max()
        assert err <= bound, f"{what}: {k} differs by {err:.3g} > {bound:.3g}"


def case_collectives(comm, tmp):
    P, r = comm.size, comm.rank
    for shape, dtype in (((7,), numpy.float32), ((3, 5), numpy.float64), ((2,), numpy.int64)):
        a = (numpy.random.default_rng(r).standard_normal(shape) * 1e3).astype(dtype)
        s = comm.sum(a)
        every = comm.allgather(a)  # (P, *shape)
        assert every.shape == (P,) + shape and numpy.array_equal(every[r], a)
        assert numpy.array_equal(s, dist.ordered_sum(list(every))), "sum is not the rank-ordered sum"
        assert numpy.array_equal(comm.allgather(s)[0], s), "ranks got different sums"
    b = comm.broadcast(numpy.full(3, float(r)), root=1)
    assert numpy.array_equal(b, numpy.full(3, 1.0))
    assert comm.bcast_obj({"r": r}, root=0) == {"r": 0}
    assert numpy.array_equal(comm.any(numpy.array([r == 0, False, True])), [True, False, True])
    sub = comm.split(0, P - r)  # reversed order
    assert sub.size == P and sub.rank == P - 1 - r
    # a failure on one rank reaches every rank (nobody is left waiting in a collective)
    assert comm.on_root(lambda: {"answer": 42}) == {"answer": 42}
    for run in (lambda: comm.on_root(lambda: 1 / 0), lambda: comm.together(lambda: [][comm.rank - 1] if r else 0)):
        try:
            run()
        except (ZeroDivisionError, IndexError):
            pass
        else:
            raise AssertionError(f"rank {r}: the error of another rank was not raised here")
    before = comm.sent_bytes
    comm.sum(numpy.zeros(1000, numpy.float32))
    assert comm.sent_bytes - before == 2 * (P - 1) * (1000 // P) * 4  # 2(P-1)/P of the array
    comm.barrier()


def case_dataparallel(comm, tmp):
    """R = 2 ranks end bitwise equal to one process accumulating the same 2 micro-batches."""
    for arch in ARCHS:
        res = train_parallel(config(arch), SOURCE, tmp / f"dp-{arch}", comm=comm, progress=False)
        if comm.rank == 0:
            ref = train_parallel(config(arch), SOURCE, tmp / f"ref-{arch}", accumulate=2,
                                 comm=dist.SingleProcess(), progress=False)
            same_bits(res.params, ref.params, f"{arch} data parallel vs accumulated")
            assert (tmp / f"dp-{arch}" / "sae" / "cfg.json").exists()
        comm.barrier()
    # the λ controller and the threshold's learning-rate multiplier under data parallelism
    for arch, extra in OPTIONS:
        res = train_parallel(config(arch, **extra), SOURCE, tmp / f"dp-opt-{arch}", comm=comm, progress=False)
        if comm.rank == 0:
            ref = train_parallel(config(arch, **extra), SOURCE, tmp / f"ref-opt-{arch}", accumulate=2,
                                 comm=dist.SingleProcess(), progress=False)
            same_bits(res.params, ref.params, f"{arch} {extra} data parallel vs accumulated")
        comm.barrier()
    # a streamed cache: each replica reads only its rows (ShardStream.batch_slice)
    from minisae.data.stream import ShardStream
    if comm.rank == 0:
        write_cache(tmp / "cache", [SOURCE.batch(i, 50) for i in range(5)])
    comm.barrier()
    stream = ShardStream(tmp / "cache", seed=1, buffer_tokens=100)
    res = train_parallel(config("topk"), stream, tmp / "dp-stream", comm=comm, progress=False)
    if comm.rank == 0:
        ref = train_parallel(config("topk"), stream, tmp / "ref-stream", accumulate=2, comm=dist.SingleProcess(),
                             progress=False)
        same_bits(res.params, ref.params, "streamed data parallel vs accumulated")


def write_cache(folder, shards):
    import json
    folder.mkdir()
    for j, rows in enumerate(shards):
        numpy.save(folder / f"shard_{j:05d}.npy", rows.astype(numpy.float32))
    man = {"format": "minisae-activations-1", "site": "synthetic", "d_in": int(shards[0].shape[1]),
           "dtype": "float32", "count": sum(len(r) for r in shards),
           "shards": [{"file": f"shard_{j:05d}.npy", "count": len(r)} for j, r in enumerate(shards)]}
    (folder / "manifest.json").write_text(json.dumps(man))


def case_shard(comm, tmp):
    """S = 2 shards: one step's loss and gradients against the unsharded variant (float64: 1e-12),
    training against S = 1 (float32 rounding), resume, resume on S = 1, and `reshard`."""
    M, D = 40, SOURCE.d_in
    lo, hi = latent_range(M, comm.size, comm.rank)
    x = SOURCE.batch(0, 64).astype(numpy.float64)  # (B, D)
    # BatchTopK's selection over shards, ties included (values on a coarse grid: many equal)
    from minisae.dist.sharded import _global_batch_topk_mask
    from minisae.sae.batchtopk import batch_topk_mask
    pi = numpy.round(numpy.random.default_rng(0).standard_normal((6, M)) * 2) / 2  # (6, M)
    for n_keep in (1, 7, 30, 6 * M):
        mine = _global_batch_topk_mask(pi[:, lo:hi], n_keep, comm, lo, M)
        got = numpy.concatenate(_gather_var(comm, mine, 1), axis=1)
        assert numpy.array_equal(got, batch_topk_mask(pi, n_keep)), f"batch top-{n_keep} over shards"
    recipes = dict(freq_coeff=0.5, freq_target=0.05, threshold_param="raw")  # JumpReLU options
    for arch, extra in [(a, {}) for a in ARCHS] + [("jumprelu", recipes), ("jumprelu", dict(matryoshka=[10, 25]))]:
        cfg = config(arch, dtype="float64", **extra).resolved(D)
        full = init_shard(cfg, D, 0, M, numpy)
        part = init_shard(cfg, D, lo, hi, numpy)
        assert all(numpy.array_equal(part[k], full[k] if k == "b_dec" else
                                     (full[k][:, lo:hi] if k == "W_enc" else full[k][lo:hi])) for k in full), \
            f"{arch}: init of latents [{lo}, {hi}) depends on the shards"
        full["b_dec"] = part["b_dec"] = x.mean(axis=0) * 0.5
        dead = numpy.arange(M) % 3 == 0  # TopK: some latents dead
        hyper = hypers_at(cfg, 5, dead)
        out, cache = VARIANTS[arch].forward(full, x, **{**hyper, **({"dead_mask": dead} if arch == "topk" else {})})
        ref = VARIANTS[arch].backward(full, cache)
        hyper_s = hypers_at(cfg, 5, dead[lo:hi])
        stats, g, fired = shard_forward_backward(arch, part, x, hyper_s, comm, lo, M)
        assert abs(stats["loss"] - float(out["loss"])) <= SHARD64_RTOL * abs(float(out["loss"])), arch
        got = {k: (g[k] if k == "b_dec" else numpy.concatenate(
            list(_gather_var(comm, g[k], 1 if k == "W_enc" else 0)), axis=1 if k == "W_enc" else 0)) for k in g}
        params_close(got, ref, f"{arch} sharded gradients", SHARD64_RTOL, 0.0)
        assert numpy.array_equal(numpy.concatenate(_gather_var(comm, fired, 0)), (out["f"] != 0).any(axis=0))
        if extra:
            continue

        # training: S = 2 vs S = 1, then resume (same grid: bitwise) and resume on S = 1
        res = train_parallel(config(arch), SOURCE, tmp / f"s2-{arch}", shards=2, comm=comm, progress=False)
        half = train_parallel(config(arch, steps=3), SOURCE, tmp / f"half-{arch}", shards=2, comm=comm,
                              progress=False)
        if comm.rank == 0:
            shutil.copytree(tmp / f"half-{arch}", tmp / f"copy-{arch}")
        comm.barrier()
        resumed = train_parallel(config(arch), SOURCE, tmp / f"half-{arch}", shards=2, comm=comm,
                                 resume=True, progress=False)
        if comm.rank == 0:
            assert half.steps == 3
            same_bits(resumed.params, res.params, f"{arch} resumed on the same grid")
            one = train_parallel(config(arch), SOURCE, tmp / f"s1-{arch}", comm=dist.SingleProcess(),
                                 progress=False)
            params_close(res.params, one.params, f"{arch} S=2 vs S=1 training", SHARD32_RTOL, SHARD32_ATOL)
        comm.barrier()
        if comm.rank == 0:  # the step-3 checkpoint converted to S = 3, then resumed on S = 1
            moved = reshard(tmp / f"copy-{arch}", tmp / f"re-{arch}", 3)
            names = list(res.params)
            a = load_sharded(moved, 0, 40, numpy, names=names)[1]
            b = load_sharded(tmp / f"copy-{arch}" / "checkpoint", 0, 40, numpy, names=names)[1]
            same_bits(a["params"], b["params"], f"{arch} reshard")
            same_bits(a["adam"]["v"], b["adam"]["v"], f"{arch} reshard")
            assert numpy.array_equal(a["since_fired"], b["since_fired"]) and a["step"] == 3
            on1 = train_parallel(config(arch), SOURCE, tmp / f"re-{arch}", comm=dist.SingleProcess(),
                                 resume=True, progress=False)
            params_close(on1.params, res.params, f"{arch} resumed on S=1 after S=2", SHARD32_RTOL, SHARD32_ATOL)
        comm.barrier()
    # the threshold's learning-rate multiplier is per latent: S = 2 follows S = 1
    extra = dict(threshold_lr_mult=0.1)
    res = train_parallel(config("jumprelu", **extra), SOURCE, tmp / "s2-opt-jumprelu", shards=2, comm=comm,
                         progress=False)
    if comm.rank == 0:
        one = train_parallel(config("jumprelu", **extra), SOURCE, tmp / "s1-opt-jumprelu", comm=dist.SingleProcess(),
                             progress=False)
        params_close(res.params, one.params, f"jumprelu {extra} S=2 vs S=1 training", SHARD32_RTOL, SHARD32_ATOL)
    comm.barrier()
    for arch, extra in OPTIONS:  # the L0 controller reads every latent's firing count: refused with S > 1
        try:
            train_parallel(config(arch, **extra), SOURCE, tmp / f"s2-ctl-{arch}", shards=2, comm=comm, progress=False)
        except InputError as e:
            assert "--shards 1" in str(e), e
        else:
            raise AssertionError(f"{arch} {extra}: the L0 controller ran with --shards 2")
        comm.barrier()


def _gather_var(comm, a, axis):
    """Every rank's `a` (sizes along `axis` may differ by one) in rank order, via a padded gather."""
    n = comm.allgather(numpy.array([a.shape[axis]]))[:, 0]
    width = int(n.max())
    pad = [(0, 0)] * a.ndim
    pad[axis] = (0, width - a.shape[axis])
    every = comm.allgather(numpy.pad(a, pad))
    return [numpy.take(e, numpy.arange(k), axis=axis) for e, k in zip(every, n)]


def case_grid(comm, tmp):
    """R = 2 x S = 2 on 4 ranks ends bitwise equal to S = 2 on 2 ranks accumulating 2 micro-batches."""
    sub = comm.split(0 if comm.rank < 2 else 1, comm.rank)
    for arch in ("jumprelu", "batchtopk"):  # (every variant's sharded and data-parallel steps: above)
        res = train_parallel(config(arch), SOURCE, tmp / f"grid-{arch}", shards=2, comm=comm, progress=False)
        if comm.rank < 2:
            ref = train_parallel(config(arch), SOURCE, tmp / f"acc-{arch}", shards=2, accumulate=2, comm=sub,
                                 progress=False)
            if comm.rank == 0:
                same_bits(res.params, ref.params, f"{arch} 2 x 2 grid vs 2 shards accumulating")
        comm.barrier()


def case_nccl(comm, tmp):
    """GPU smoke of the NCCL backend (CuPy arrays), and one training run on the GPU through it."""
    from minisae.xp import get_xp

    cp = get_xp("cupy")
    a = cp.arange(7, dtype=cp.float32) + comm.rank
    assert cp.array_equal(comm.sum(a), dist.ordered_sum(list(comm.allgather(a))))
    assert cp.array_equal(comm.broadcast(a, root=0), cp.arange(7, dtype=cp.float32))
    assert numpy.array_equal(comm.sum(numpy.ones(3)), numpy.full(3, float(comm.size)))
    res = train_parallel(config("topk", backend="cupy"), SOURCE, tmp / "gpu", comm=comm, progress=False)
    if comm.rank == 0:
        ref = train_parallel(config("topk"), SOURCE, tmp / "cpu", comm=dist.SingleProcess(), progress=False)
        params_close(res.params, ref.params, "GPU vs CPU", XP32_RTOL, XP32_RTOL)


if __name__ == "__main__":
    case, tmp = sys.argv[1], Path(sys.argv[2])
    world = dist.world("nccl" if case == "nccl" else "mpi")
    globals()[f"case_{case}"](world, tmp)
    world.barrier()
    if world.rank == 0:
        print(f"{case}: ok on {world.size} ranks")
