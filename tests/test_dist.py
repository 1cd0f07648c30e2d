"""Distributed training (minisae.dist, minisae.training.train): in-process checks of the pieces, and the
multi-process claims under real `mpiexec` (tests/mpi_worker.py; skipped without mpi4py/mpiexec):

- collectives: the sum is the rank-ordered sum, bitwise the same on every rank; traffic counted;
- data parallel: 2 ranks end bitwise equal to one process accumulating the same 2 micro-batches;
- latent sharding: one step's loss and gradients on 2 shards equal the unsharded variant's to 1e-12
  (float64); training on 2 shards agrees with 1 shard within float32 rounding; resume on the same
  grid is bit-identical; a checkpoint resumes on another S and converts with `reshard`;
- the 2 x 2 grid on 4 ranks ends bitwise equal to 2 shards accumulating 2 micro-batches.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from helpers import mpiexec_or_skip

from minisae import dist
from minisae.dist.sharded import init_shard, latent_range, make_grid, shard_forward_backward
from minisae.sae import VARIANTS
from minisae.training.train import TrainConfig, hypers_at
from minisae.xp import cupy_available

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # mpi_worker's source and configs


def run_mpi(case, n, tmp_path, timeout=120):
    """Run tests/mpi_worker.py CASE under `mpiexec -n n`; fail with its output if it fails."""
    exe, env = mpiexec_or_skip()
    env["MKL_NUM_THREADS"] = "1"
    cmd = [exe, "-n", str(n), sys.executable, "-m", "mpi4py", str(ROOT / "tests" / "mpi_worker.py"),
           case, str(tmp_path)]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mpiexec -n {n} {case}: no result after {timeout} s (a deadlock?)\n{e.stdout}\n{e.stderr}")
    assert p.returncode == 0, f"mpiexec -n {n} {case} failed:\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    assert f"{case}: ok on {n} ranks" in p.stdout


@pytest.mark.parametrize("case", ["collectives", "dataparallel", "shard"])
def test_under_mpiexec_2(case, tmp_path):
    run_mpi(case, 2, tmp_path)


def test_grid_2x2_under_mpiexec_4(tmp_path):
    run_mpi("grid", 4, tmp_path)


@pytest.mark.gpu
def test_nccl_smoke_under_mpiexec(tmp_path):
    if not cupy_available():
        pytest.skip("CuPy with a CUDA device is not available")
    run_mpi("nccl", 1, tmp_path)


# ----------------------------------------------------------------------------------------------
# in process


def test_single_process_collectives_are_identities():
    comm = dist.world()
    assert isinstance(comm, dist.SingleProcess) and comm.size == 1
    a = numpy.arange(6.0).reshape(2, 3)
    for out in (comm.sum(a), comm.allgather(a)[0], comm.broadcast(a)):
        assert numpy.array_equal(out, a) and out is not a
    assert dist.ordered_sum([a, a, a]).tolist() == ((a + a) + a).tolist()


def test_world_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match="dist backend"):
        dist.world("gloo")


def test_latent_ranges_tile_the_latents():
    for M, S in ((40, 3), (7, 7), (131072, 8)):
        bounds = [latent_range(M, S, s) for s in range(S)]
        assert bounds[0][0] == 0 and bounds[-1][1] == M
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(h - l for l, h in bounds) - min(h - l for l, h in bounds) <= 1


def test_grid_needs_a_divisor():
    with pytest.raises(ValueError, match="divisor"):
        make_grid(dist.SingleProcess(), 2, 40)


@pytest.mark.parametrize("arch", ["jumprelu", "gated", "topk", "batchtopk"])
def test_one_shard_is_the_variant_bit_for_bit(arch):
    """With S = 1 the sharded step is the variant's own forward and backward."""
    kw = {"jumprelu": dict(sparsity_coeff=1e-3), "gated": dict(sparsity_coeff=1e-3), "topk": dict(k=3),
          "batchtopk": dict(k=3, matryoshka=[8])}[arch]
    cfg = TrainConfig(arch, d_sae=24, steps=1, **kw).resolved(8)
    params = init_shard(cfg, 8, 0, 24, numpy)
    x = numpy.random.default_rng(1).standard_normal((32, 8)).astype(numpy.float32)
    dead = numpy.arange(24) % 4 == 0
    hyper = hypers_at(cfg, 3, dead)
    out, cache = VARIANTS[arch].forward(params, x, **hyper)
    ref = VARIANTS[arch].backward(params, cache)
    stats, grads, fired = shard_forward_backward(arch, params, x, hyper, dist.SingleProcess())
    for k in ref:
        assert numpy.array_equal(grads[k], ref[k]), k
    assert numpy.array_equal(fired, (out["f"] != 0).any(axis=0))
    assert stats["loss"] == pytest.approx(float(out["loss"]), rel=1e-6)


def test_init_does_not_depend_on_the_shards():
    cfg = TrainConfig("jumprelu", d_sae=9000, sparsity_coeff=0.0, steps=1).resolved(4)
    full = init_shard(cfg, 4, 0, 9000, numpy)["W_dec"]  # three init chunks
    for lo, hi in ((0, 4500), (4500, 9000), (4000, 8200)):
        assert numpy.array_equal(init_shard(cfg, 4, lo, hi, numpy)["W_dec"], full[lo:hi])
    assert numpy.allclose((full.astype(numpy.float64) ** 2).sum(axis=1), 1.0, atol=1e-6)


def test_parallel_trainer_follows_the_output_rule(tmp_path):
    from minisae.data.synthetic import SyntheticActivations, SyntheticConfig
    from minisae.errors import OutputExistsError
    from minisae.training.train import train_parallel

    source = SyntheticActivations(SyntheticConfig(d_in=8, n_features=32, target_l0=1.0))
    cfg = TrainConfig("topk", k=2, d_sae=16, steps=2, batch_size=32, eval_tokens=0)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="not a minisae train run folder"):
        train_parallel(cfg, source, tmp_path / "other", comm=dist.SingleProcess(), progress=False)
    train_parallel(cfg, source, tmp_path / "run", comm=dist.SingleProcess(), progress=False)
    with pytest.raises(OutputExistsError, match="--resume"):
        train_parallel(cfg, source, tmp_path / "run", comm=dist.SingleProcess(), progress=False)
    again = train_parallel(cfg, source, tmp_path / "run", comm=dist.SingleProcess(), overwrite=True, progress=False)
    assert again.steps == 2 and (tmp_path / "run" / "sae").is_dir()


def test_blocked_topk_is_the_plain_one(monkeypatch):
    import minisae.dist.sharded as sharded
    from minisae.sae.topk import topk_rows

    x = numpy.random.default_rng(0).standard_normal((100, 50)).astype(numpy.float32)
    monkeypatch.setattr(sharded, "TOPK_BLOCK", 120)  # 2 rows per block
    for got, want in zip(sharded._topk_rows_blocked(x, 5), topk_rows(x, 5)):
        assert numpy.array_equal(got, want)


def test_cli_under_mpiexec(tmp_path):
    """`mpiexec -n 2 minisae train --shards 2`: the run folder, its grid record; then a second
    launch into the same folder fails on every rank with one error line, and nothing hangs."""
    exe, env = mpiexec_or_skip()
    cmd = [exe, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "minisae.cli", "train", "--arch", "topk",
           "--k", "4", "--d-sae", "32", "--steps", "4", "--batch-size", "64", "--shards", "2", "--d-in", "16",
           "--eval-tokens", "256", "--out", str(tmp_path / "run"), "--no-progress"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stdout.count("SAE written to") == 1  # rank 0 alone prints
    info = __import__("json").loads((tmp_path / "run" / "config.json").read_text())
    assert info["grid"] == {"processes": 2, "replicas": 1, "shards": 2, "accumulate": 1, "backend": "mpi"}
    assert (tmp_path / "run" / "sae" / "cfg.json").is_file()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "already holds a training run" in p.stderr


def _mpi_cli(args, tmp_path, n=2, runner=("-m", "mpi4py")):
    exe, env = mpiexec_or_skip()
    try:
        return subprocess.run([exe, "-n", str(n), sys.executable, *runner, "-m", "minisae.cli"] + args, env=env,
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"mpiexec -n {n} minisae {' '.join(args)}: no result after 120 s (a hang?)\n{e.stderr}")


MPI_RUN = ["train", "--arch", "topk", "--k", "4", "--d-sae", "32", "--steps", "4", "--batch-size", "64", "--d-in", "16",
           "--checkpoint-every", "2", "--eval-tokens", "0", "--warmup-steps", "1", "--sparsity-warmup-steps", "1",
           "--no-progress"]


@pytest.mark.parametrize("runner", [("-m", "mpi4py"), ()], ids=["python -m mpi4py", "python"])
def test_errors_under_mpiexec_are_one_line_and_exit_2(tmp_path, runner):
    """docs/pipeline.md's promise under mpiexec: an argument error, a refused folder, a corrupt
    checkpoint shard and a folder another process writes are each one line (rank 0 speaks for
    every rank) and exit status 2 — never one line per rank, never an MPI crash."""
    import json

    from minisae.io.files import FolderLock
    from minisae.io.safetensors_io import SafetensorsFile, save_file

    run = tmp_path / "run"
    cases = {"argument": ["train", "--arch", "topk", "--no-such-flag"],
             "value": MPI_RUN + ["--d-sae", "0", "--out", str(run)]}
    for what, args in cases.items():
        p = _mpi_cli(args, tmp_path, runner=runner)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, (what, p.returncode, p.stderr)
    p = _mpi_cli(MPI_RUN + ["--shards", "2", "--out", str(run)], tmp_path, runner=runner)
    assert p.returncode == 0, p.stderr[-3000:]
    p = _mpi_cli(MPI_RUN + ["--shards", "2", "--out", str(run)], tmp_path, runner=runner)  # no --resume
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "--resume" in p.stderr, p.stderr
    with FolderLock(run):
        p = _mpi_cli(MPI_RUN + ["--shards", "2", "--out", str(run), "--resume"], tmp_path, runner=runner)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and f"pid {os.getpid()}" in p.stderr, p.stderr
    # shard 1 cut to half its latents: was "Message from rank 1 and tag 7 truncated" (MPICH, rc 142)
    man = json.loads((run / "checkpoint" / "checkpoint.json").read_text())
    shard = run / "checkpoint" / man["shards"][1]["file"]
    with SafetensorsFile(shard) as f:
        tensors = {k: numpy.array(f.get(k)) for k in f.keys()}
        meta = dict(f.metadata)
    tensors = {k: (v[..., :8] if k.endswith("W_enc") else v[:8] if v.shape[0] == 16 else v) for k, v in tensors.items()}
    shard.unlink()
    save_file(tensors, shard, metadata=meta)
    p = _mpi_cli(MPI_RUN + ["--shards", "2", "--out", str(run), "--resume", "--steps", "6"], tmp_path, runner=runner)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "latents [16, 32)" in p.stderr, p.stderr
    assert "truncated" not in p.stderr


ONE_BY_ONE = [("jumprelu", {}), ("gated", {}), ("topk", {}), ("batchtopk", {}),
              ("gated", dict(target_l0=3.0)), ("jumprelu", dict(target_l0=3.0, threshold_lr_mult=0.1)),
              ("jumprelu", dict(penalty="quadratic", target_l0=3.0)), ("jumprelu", dict(penalty="tanh")),
              ("jumprelu", dict(freq_coeff=0.5, freq_target=0.05, threshold_param="raw")),
              ("jumprelu", dict(matryoshka=[10, 25])), ("topk", dict(matryoshka=None, dtype="float64"))]


@pytest.mark.parametrize("arch,extra", ONE_BY_ONE, ids=[f"{a}{'-' + '-'.join(e) if e else ''}" for a, e in ONE_BY_ONE])
def test_one_process_is_the_parallel_trainer_on_the_1x1_grid_bitwise(tmp_path, arch, extra, monkeypatch):
    """minisae.training.train.train (one process: the loop's fast path, host reads only at log and
    checkpoint steps) and the loop's grid path on dist.SingleProcess (R = S = 1: the per-step sums
    every grid runs) end with the same parameters, the same metrics.jsonl rows (but the wall time)
    and the same sae/ files, bit for bit: one step function (the variant's own forward_backward),
    one update, one log row (BatchTopK's threshold included), the λ controller and the threshold's
    learning-rate multiplier in both."""
    import json

    import minisae.training.train as parallel
    from minisae.training.train import train
    from mpi_worker import SOURCE, config

    cfg = config(arch, steps=8, log_every=1, **extra)
    a = train(cfg, SOURCE, tmp_path / "one", progress=False)
    monkeypatch.setattr(parallel, "ALONE_FAST_PATH", False)
    b = parallel.train_parallel(cfg, SOURCE, tmp_path / "grid", comm=dist.SingleProcess(), progress=False)
    for k in a.params:
        assert numpy.array_equal(a.params[k], b.params[k]), k

    def rows(run):
        out = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in out]

    assert rows(tmp_path / "one") == rows(tmp_path / "grid")
    files = sorted(p.name for p in (tmp_path / "one" / "sae").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "grid" / "sae").iterdir())
    for name in files:
        assert (tmp_path / "one" / "sae" / name).read_bytes() == (tmp_path / "grid" / "sae" / name).read_bytes(), name


def test_kill_9_under_mpiexec_then_resume_equals_an_uninterrupted_run(tmp_path):
    """Every rank of `mpiexec -n 2 ... --shards 2` killed with -9 right after the checkpoint of
    step 2, then after step 4's metrics lines but before its checkpoint; `--resume` then ends with
    the uninterrupted run's metrics.jsonl (no gap, no duplicate) and sae/."""
    import json

    def metrics(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]

    args = MPI_RUN + ["--shards", "2", "--steps", "6", "--log-every", "1"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _mpi_cli(args + ["--out", str(ref)], tmp_path).returncode == 0
    for i, kill in enumerate(["checkpoint:2", "metrics:4"]):
        os.environ["MINISAE_TEST_KILL"] = kill
        try:
            p = _mpi_cli(args + ["--out", str(run)] + (["--resume"] if i else []), tmp_path)
        finally:
            del os.environ["MINISAE_TEST_KILL"]
        assert p.returncode != 0 and not (run / "sae").exists(), (kill, p.returncode, p.stderr[-2000:])
    p = _mpi_cli(args + ["--out", str(run), "--resume"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["step"] for r in metrics(run)] == list(range(1, 7)) and metrics(run) == metrics(ref)
    for f in (ref / "sae").iterdir():
        assert (run / "sae" / f.name).read_bytes() == f.read_bytes(), f.name
