"""Scaling of minisae's parallel trainer on one machine: step time, bytes sent per step (measured
by minisae.dist's counters, against the formula of docs/scale.md) and peak memory per rank.

    python reference/bench_dist.py                 # every case at P = 1 and 2 processes
    python reference/bench_dist.py --quick         # smaller sizes, seconds
    python reference/bench_dist.py --memory-only   # the M = 131,072 peak-memory rows only

Cases (TopK, k = 32, float32, synthetic data, no AuxK):
  dp-strong   data parallel, the batch B fixed, R = P replicas
  dp-weak     data parallel, B/P rows per process fixed
  shard       latent shards S = P, M fixed (strong scaling over latents)
  memory      one step at M = 131,072, S = 1 vs S = 2: peak resident memory per rank

Each case runs `mpiexec -n P python -m mpi4py reference/bench_dist.py --worker CASE_JSON` (the
case's sizes as a JSON object); the worker trains a few warm-up steps and then the timed ones (the
step time is read off metrics.jsonl).
Needs the dist extra (mpi4py, mpich). Processes share the machine's cores: on a 2-core machine
P = 2 is the ceiling, and the timings move with whatever else runs; compare rows of one run.
"""

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
F = 4  # bytes per float32


def worker(spec):
    from minisae import dist
    from minisae.data.synthetic import SyntheticActivations, SyntheticConfig
    from minisae.training.train import train_parallel
    from minisae.training.train import TrainConfig

    world = dist.world("mpi")
    source = SyntheticActivations(SyntheticConfig(d_in=spec["D"], n_features=4 * spec["D"], target_l0=8.0))
    warm, timed = spec["warm"], spec["timed"]
    cfg = TrainConfig("topk", k=32, d_sae=spec["M"], steps=warm + timed, batch_size=spec["B"], log_every=warm,
                      checkpoint_every=10 ** 9, eval_tokens=0, norm_sample_tokens=4096, warmup_steps=1,
                      dead_window_tokens=10 ** 12)
    out = Path(spec["out"]) / "run"
    before = world.sent_bytes
    t0 = time.time()
    train_parallel(cfg, source, out, shards=spec["S"], comm=world, progress=False)
    wall = time.time() - t0
    sent = world.sent_bytes - before
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    every = world.allgather_obj({"rss": rss, "sent": sent})
    if world.rank == 0:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        per_step = (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / timed
        print("RESULT " + json.dumps({"step_s": per_step, "wall_s": wall, "steps": warm + timed,
                                      "sent": [e["sent"] for e in every], "rss": [e["rss"] for e in every]}))


def chunk_bytes(n, P, itemsize=F):
    """Bytes one rank sends in minisae.dist's deterministic sum of n elements over P ranks."""
    return 0 if P == 1 else 2 * (P - 1) * math.ceil(n / P) * itemsize


def formula(case, P, B, D, M, steps, k=32, log_steps=2):
    """Bytes per step one rank sends (docs/scale.md), TopK without dead latents."""
    if case.startswith("dp"):
        R = P
        grads = sum(chunk_bytes(n, R) for n in (D * M, M, M * D, D))  # W_enc, b_enc, W_dec, b_dec
        fired = chunk_bytes(M, R)  # int32 OR
        scalars = chunk_bytes(4, R, 8)  # loss, mse, l0, NaN flag
        per_log = chunk_bytes(D + 1, R, 8)  # FVU denominators
        return grads + fired + scalars + per_log * log_steps / steps
    S = P
    b = B
    recon = chunk_bytes(b * D, S)  # the partial reconstructions
    data = (S - 1) * b * D * F  # shard 0 broadcasts the batch (counted on the root: the max over ranks)
    topk = (S - 1) * b * k * F  # candidate all-gather
    bdec = chunk_bytes(D, S)
    scalars = 2 * chunk_bytes(1, S, 8)  # dead count, l0
    per_log = chunk_bytes(1, S, 8)  # dead count at log steps
    return data + recon + topk + bdec + scalars + per_log * log_steps / steps


def run_case(name, P, spec, mpiexec):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        spec = {**spec, "out": tmp}
        cmd = [mpiexec, "-n", str(P), sys.executable, "-m", "mpi4py", __file__, "--worker", json.dumps(spec)]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        raise SystemExit(f"{name} P={P} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return json.loads(line[0][len("RESULT "):])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--memory-only", action="store_true", help="only the M = 131,072 memory rows")
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args()
    if a.worker:
        return worker(json.loads(a.worker))
    here = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(here) if here.exists() else "mpiexec"
    q = a.quick
    D = 64 if q else 256
    cases = []
    if not a.memory_only:
        for P in (1, 2):
            cases.append(("dp-strong", P, dict(B=1024 if q else 4096, D=D, M=1024 if q else 4096, S=1)))
            cases.append(("dp-weak", P, dict(B=(512 if q else 2048) * P, D=D, M=1024 if q else 4096, S=1)))
            cases.append(("shard", P, dict(B=512 if q else 1024, D=D, M=4096 if q else 16384, S=P)))
    for P in (1, 2):
        cases.append(("memory", P, dict(B=256 if q else 1024, D=D, M=16384 if q else 131072, S=P)))
    rows = []
    print(f"# minisae parallel trainer, {platform.node()}, {os.cpu_count()} CPUs, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; TopK k=32, float32, 1 BLAS thread per process")
    print(f"{'case':10} {'P':>2} {'B':>6} {'D':>4} {'M':>7} {'S':>2} {'step ms':>9} {'tokens/s':>10} "
          f"{'sent/step (measured)':>21} {'formula':>12} {'peak RSS/rank':>14}")
    for name, P, spec in cases:
        warm, timed = (2, 2) if name == "memory" else ((3, 6) if q else (3, 12))
        spec = {**spec, "warm": warm, "timed": timed}
        r = run_case(name, P, spec, mpiexec)
        sent = max(r["sent"]) / r["steps"]
        est = formula(name, P, spec["B"], spec["D"], spec["M"], r["steps"])
        row = {"case": name, "P": P, **{k: spec[k] for k in ("B", "D", "M", "S")}, "step_s": r["step_s"],
               "tokens_per_s": spec["B"] / r["step_s"], "sent_per_step": sent, "formula_per_step": est,
               "peak_rss_per_rank": max(r["rss"])}
        rows.append(row)
        print(f"{name:10} {P:>2} {spec['B']:>6} {spec['D']:>4} {spec['M']:>7} {spec['S']:>2} "
              f"{1e3 * r['step_s']:>9.1f} {row['tokens_per_s']:>10.0f} {sent / 2**20:>17.3f} MiB "
              f"{est / 2**20:>8.3f} MiB {max(r['rss']) / 2**30:>10.2f} GiB", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
