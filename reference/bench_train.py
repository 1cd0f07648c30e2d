"""Training-loop speed and memory: `minisae.training.train` per step vs the step function it calls, vs the
1-GEMM floor, vs a PyTorch training loop of the same recipe; peak memory vs the lower bound.

For each variant at one shape (B tokens, D = d_in, M latents, L0 about `density` of M):

  step     `forward_backward(params, x, path="auto", dense_f=False)` alone: what
           reference/bench_sae.py times (its loss_and_grads is this call)
  loop     `minisae.training.train.train` (what `minisae train` runs): batches from an in-memory pool of
           activations (like a cached store), the recipe's projection, Adam, renormalisation,
           dead-latent counters, logging; per-step time read from metrics.jsonl (log_every=1)
           between its 3rd and last step, so start-up and the final save are not counted
  floor    one dense (B, D) @ (D, M) product, preallocated output (the encoder's cost)
  torch    (--torch) a PyTorch loop of the same recipe: the same loss as an autograd function
           (reference/bench_sae.py's), torch.optim.Adam with the recipe's betas/eps, the
           decoder-gradient projection and renormalisation, on the same batches, same threads

The training state starts where reference/bench_sae.py's problems sit (thresholds / gates /
TopK's dead latents set so L0 is about density * M), written as a step-0 checkpoint that the
loop resumes; the learning rate is tiny so L0 stays put. Rounds are interleaved (step, loop,
floor, torch per variant per round); medians are shown. Peak memory (--memory): Python's
tracemalloc peak (NumPy registers its buffers there) over a few loop steps, against the lower
bound: parameters + Adam's two moments + gradients + one (B, M) float32 array + the batch.

Run (repository root):
    python reference/bench_train.py --d-in 512 --d-sae 8192 --batch 2048 --threads 2
    /work/refvenv/bin/python reference/bench_train.py --d-in 512 --d-sae 8192 --torch --memory
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import minisae  # noqa: E402,F401  first: its OpenBLAS setting applies only before NumPy loads
import numpy as np  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=8192)
    p.add_argument("--variants", default="jumprelu,gated,topk")
    p.add_argument("--density", type=float, default=0.01, help="target L0 / M")
    p.add_argument("--dead-frac", type=float, default=0.1, help="TopK: latents kept dead (AuxK on)")
    p.add_argument("--loop-steps", type=int, default=10, help="steps per timed loop run")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    p.add_argument("--threads", type=int, default=None, help="BLAS (and torch) threads")
    p.add_argument("--torch", action="store_true", help="also a PyTorch loop of the same recipe")
    p.add_argument("--memory", action="store_true", help="also the tracemalloc peak of the loop")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    return args


class PoolSource:
    """Activations from an in-memory pool (as a cached store serves them): batch i = pool row block."""

    def __init__(self, pool, batch_size):
        self.pool, self.B = pool, batch_size
        self.d_in = pool.shape[1]
        self.n = pool.shape[0] // batch_size
        self.on_batch = None  # called with each step asked for (the memory probe below)

    def batch(self, step, batch_size):
        if self.on_batch:
            self.on_batch(step)
        i = step % self.n
        return self.pool[i * batch_size:(i + 1) * batch_size].copy()  # (B, D) a read, like a store

    def sample(self, n, **_):
        return self.pool[:n]


def make_state(variant, mod, pool, B, M, density, dead_frac, seed=0):
    """(params, hyper): float32 params with L0 about density * M on the pool's first batch."""
    D = pool.shape[1]
    rng = np.random.default_rng(seed)
    params = {k: np.array(v) for k, v in mod.init(D, M, seed=seed, dtype="float32").items()}
    params["b_dec"] = (0.01 * rng.standard_normal(D)).astype(np.float32)
    x_c = pool[:B] - params["b_dec"]  # (B, D)
    n_keep = max(1, int(round(density * B)))
    pre = x_c @ params["W_enc"]  # (B, M)
    kth = -np.partition(-pre, n_keep, axis=0)[n_keep]  # (M,) the (n_keep+1)-th largest per latent
    if variant == "jumprelu":
        params["log_threshold"] = np.log(np.maximum(kth, 1e-6)).astype(np.float32)
        hyper = dict(sparsity_coeff=6e-4, bandwidth=0.001)
    elif variant == "gated":
        params["b_gate"] = (-kth).astype(np.float32)
        hyper = dict(sparsity_coeff=6e-4)
    else:
        k = max(1, int(round(density * M)))
        dead = rng.permutation(M)[: int(round(dead_frac * M))]
        params["b_enc"][dead] = -100.0  # never in any top-k: dead for good, AuxK runs every step
        dead_mask = np.zeros(M, dtype=bool)
        dead_mask[dead] = True
        hyper = dict(k=k, aux_k=512, aux_coeff=1 / 32, dead_mask=dead_mask)
    return params, hyper


def train_config(variant, hyper, args, steps, lr=1e-7):
    from minisae.training.train import TrainConfig

    extra = {"k": hyper["k"], "aux_k": hyper["aux_k"]} if variant == "topk" else \
        {"sparsity_coeff": hyper["sparsity_coeff"]}
    return TrainConfig(variant, d_sae=args.d_sae, steps=steps, batch_size=args.batch, lr=lr,
                       warmup_steps=0, sparsity_warmup_steps=0, checkpoint_every=10 ** 9,
                       log_every=1, eval_tokens=0, dead_window_tokens=10 ** 6, **extra)


def run_loop(variant, mod, params, hyper, source, args, steps, *, memory=False):
    """Per-step seconds of minisae.training.train.train over `steps` steps, resumed from these params."""
    from minisae.training import optim
    from minisae.training.train import CHECKPOINT_NAME, save_checkpoint, train

    cfg = train_config(variant, hyper, args, steps).resolved(source.d_in)
    since = np.zeros(args.d_sae, dtype=np.int64)
    if variant == "topk":
        since[hyper["dead_mask"]] = 10 ** 9  # AuxK's dead latents, from the first step
    with tempfile.TemporaryDirectory() as tmp:
        state = {"step": 0, "scale": 1.0, "params": params, "adam": optim.adam_init(params),
                 "since_fired": since}
        save_checkpoint(Path(tmp) / CHECKPOINT_NAME, state, cfg)
        (Path(tmp) / "config.json").write_text(json.dumps({"train": {}, "source": {}}))  # a run folder
        peaks = []
        if memory:  # the peak over the steps in the middle: start-up and final save left out

            def probe(step):
                if step == 2:
                    tracemalloc.reset_peak()
                elif step == steps - 1:
                    peaks.append(tracemalloc.get_traced_memory()[1])

            source.on_batch = probe
            tracemalloc.start()
        try:
            train(cfg, source, tmp, resume=True, progress=False)
        finally:
            source.on_batch = None
            if memory:
                tracemalloc.stop()
        peak = peaks[0] if peaks else None
        rows = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    el = [r["elapsed_s"] for r in rows]
    per_step = [b - a for a, b in zip(el[2:], el[3:])]
    return statistics.median(per_step), rows[-1]["l0"], peak


def torch_loop(variant, params, hyper, source, args, steps):
    """Median per-step seconds of a PyTorch loop of the same recipe."""
    import torch
    sys.path.insert(0, str(ROOT / "reference"))
    import bench_sae as bs

    p = {k: torch.from_numpy(np.array(v)).requires_grad_(True) for k, v in params.items()}
    fn = {"jumprelu": bs.torch_jumprelu, "gated": bs.torch_gated, "topk": bs.torch_topk}[variant]
    kw = dict(hyper)
    if variant == "topk":
        kw["dead_idx"] = torch.from_numpy(np.flatnonzero(kw.pop("dead_mask")))
    betas, eps = ((0.9, 0.999), 6.25e-10) if variant == "topk" else ((0.0, 0.999), 1e-8)
    opt = torch.optim.Adam(list(p.values()), lr=1e-7, betas=betas, eps=eps)
    times = []
    for step in range(steps):
        t0 = time.perf_counter()
        x = torch.from_numpy(source.batch(step, args.batch))
        loss = fn(p, x, **kw)[0]  # (loss, f)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            W, g = p["W_dec"], p["W_dec"].grad
            g -= (g * W).sum(1, keepdim=True) / (W * W).sum(1, keepdim=True) * W
            opt.step()
            W /= W.norm(dim=1, keepdim=True)
        float(loss.detach())
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def print_row(v, m, args):
    B = args.batch
    row = (f"| {v} | {m['l0']:.1f} | {m['step'] * 1e3:.0f} | {m['loop'] * 1e3:.0f} | "
           f"{m['loop'] / m['step']:.2f} | {m['step'] / m['floor']:.2f} | {B / m['loop']:.0f} |")
    if args.torch:
        row += f" {m['torch'] * 1e3:.0f} | {m['torch'] / m['loop']:.2f}x |"
    if args.memory:
        row += (f" {m['peak_bytes'] / 2 ** 20:.0f} | {m['bound_bytes'] / 2 ** 20:.0f} | "
                f"{m['peak_bytes'] / m['bound_bytes']:.2f} |")
    print(row, flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
    from minisae.sae import VARIANTS

    B, D, M = args.batch, args.d_in, args.d_sae
    rng = np.random.default_rng(1)
    pool = (rng.standard_normal((4 * B, D), dtype=np.float32) / np.sqrt(D)).astype(np.float32)
    source = PoolSource(pool, B)
    Wt = np.ascontiguousarray(rng.standard_normal((D, M), dtype=np.float32))
    out = np.empty((B, M), dtype=np.float32)
    if args.torch:
        import torch
        if args.threads:
            torch.set_num_threads(args.threads)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%MZ}, {platform.machine()}, "
          f"{os.cpu_count()} cores, numpy {np.__version__}, threads {args.threads}, load average "
          f"{os.getloadavg()[0]:.2f}; B={B} D={D} M={M}, {args.loop_steps} loop steps x {args.repeats} rounds")
    results = {}
    print("| variant | L0 | step ms | loop ms/step | loop/step | step/floor | loop tokens/s |"
          + (" torch loop ms | minisae vs torch |" if args.torch else "")
          + (" peak MiB | bound MiB | peak/bound |" if args.memory else ""))
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.torch else "")
          + ("---:|---:|---:|" if args.memory else ""))
    for variant in args.variants:
        mod = VARIANTS[variant]
        params, hyper = make_state(variant, mod, pool, B, M, args.density, args.dead_frac)
        t = {"step": [], "loop": [], "floor": [], "torch": []}
        l0 = None
        for r in range(args.repeats):
            for s in range(3):
                x = pool[s * B:(s + 1) * B]
                t0 = time.perf_counter()
                mod.forward_backward(params, x, **hyper, path="auto", dense_f=False)
                t["step"].append(time.perf_counter() - t0)
            per, l0, _ = run_loop(variant, mod, {k: v.copy() for k, v in params.items()}, hyper, source,
                                  args, args.loop_steps)
            t["loop"].append(per)
            for _ in range(3):
                t0 = time.perf_counter()
                np.matmul(pool[:B], Wt, out=out)
                t["floor"].append(time.perf_counter() - t0)
            if args.torch:
                t["torch"].append(torch_loop(variant, params, hyper, source, args, 4))
        med = {k: statistics.median(v) for k, v in t.items() if v}
        if args.memory:
            _, _, peak = run_loop(variant, mod, {k: v.copy() for k, v in params.items()}, hyper, source,
                                  args, 6, memory=True)
            P = sum(v.nbytes for v in params.values())
            med["peak_bytes"], med["bound_bytes"] = peak, 4 * P + B * M * 4 + B * D * 4
        results[variant] = {**med, "l0": l0}
        print_row(variant, results[variant], args)
    print(f"# floor (one (B,D)@(D,M) GEMM) {statistics.median([m['floor'] for m in results.values()]) * 1e3:.0f} ms; "
          f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
