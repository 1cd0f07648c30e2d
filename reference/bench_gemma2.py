"""Speed and memory of minisae's Gemma 2 / Gemma 3 forward against transformers' eager float32 models.

--model picks the shapes: gemma2-2b (the default, described below), gemma3-270m (D=640, I=2048,
4 heads / 1 kv, head_dim 256, V=262144, window 512, 18 layers) or gemma3-1b (D=1152, I=6912, 4 / 1,
head_dim 256, V=262144, window 512, 26 layers); Gemma 3 runs Gemma3ForCausalLM. --layers defaults to
the model's own count for gemma3-270m and to 4 otherwise (fewer layers keep the 1B and 2B shapes
within a shared machine's memory; the table says how many were used).

A Gemma-2-2B-shaped model (D=2304, I=9216, 8 heads / 4 kv, head_dim 256, query_pre_attn_scalar
256, V=256000, sliding window 4096) with only --layers decoder layers and random weights is written
once with transformers' save_pretrained (float32) to a temporary folder; both sides load that
folder. Each measurement runs in its own subprocess (same thread count for both sides), so the
peak resident memory (VmHWM) belongs to that one side and workload:

  forward   logits (B, T, V) for B x T tokens
  capture   blocks.{layers//2}.hook_resid_post; minisae's capture stops after that layer, and the
            transformers side stops there too (a forward hook that raises), so neither computes
            the later layers or the unembedding.

Tokens/s = B*T / median wall time of --repeats timed calls after one warm-up call. Each worker also
writes the last position's logits (forward) or the captured activations (capture); the parent
prints the max relative difference between the two sides, so the table compares like with like.

--gemm-limit adds two rows per measurement: the same call's matrix products alone (projections,
attention scores and values, the unembedding for forward) on random arrays, with numpy's BLAS
(minisae's) and with torch's (transformers'). No implementation on that BLAS runs the call faster
than its row, so the rows show how far each side is from its own limit, and how much faster one
side could possibly be than the other.

Run from the repo root with the reference venv (torch + transformers; minisae importable there,
e.g. `pip install -e . --no-deps`):

    /work/venvs/ref/bin/python reference/bench_gemma2.py                       # CPU defaults
    /work/venvs/ref/bin/python reference/bench_gemma2.py --layers 4 --batch 1 4 --seq 128 256 --repeats 5
    python reference/bench_gemma2.py --backend cupy    # minisae on CuPy vs torch CUDA eager

With --backend cupy the memory column is the allocator's peak device memory (CuPy's default pool
total bytes, torch.cuda.max_memory_reserved) rather than host RSS.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import minisae  # noqa: E402,F401  first: its OpenBLAS setting applies only before NumPy loads
import numpy as np  # noqa: E402

GEMMA2_2B = dict(
    vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_attention_heads=8,
    num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
    attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
)
GEMMA3_270M = dict(vocab_size=262144, hidden_size=640, intermediate_size=2048, num_attention_heads=4,
                   num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512)
GEMMA3_1B = dict(GEMMA3_270M, hidden_size=1152, intermediate_size=6912)
# --model -> (shapes, transformers class name, real layer count, default --layers)
MODELS = {"gemma2-2b": (GEMMA2_2B, "Gemma2ForCausalLM", 26, 4), "gemma3-270m": (GEMMA3_270M, "Gemma3ForCausalLM", 18, 18),
          "gemma3-1b": (GEMMA3_1B, "Gemma3ForCausalLM", 26, 4)}


def rss_now_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib():
    """This process's peak resident set. VmHWM belongs to the current address space; ru_maxrss would
    also carry the parent's resident size at fork time across the exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def make_checkpoint(folder, layers, seed=0, name="gemma2-2b"):
    import torch
    import transformers

    shapes, cls, _, _ = MODELS[name]
    torch.manual_seed(seed)
    config = getattr(transformers, cls.replace("ForCausalLM", "TextConfig" if "3" in cls else "Config"))(
        num_hidden_layers=layers, **shapes)
    model = getattr(transformers, cls)(config)  # default init (normal, std 0.02): speed does not depend on it
    with torch.no_grad():  # make the norms and soft-caps do real work anyway
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    model.save_pretrained(folder, max_shard_size="2GB")
    del model


def make_ids(batch, seq, vocab, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(batch, seq), dtype=np.int64)
    ids[:, 0] = 2  # BOS
    return ids


# ---------------------------------------------------------------- workers (run in subprocesses)

def time_calls(call, repeats):
    """One warm-up call, then `repeats` timed ones: (seconds list, major page faults while timed, last output).

    Major faults count pages read from disk during the timed calls: non-zero means memory-mapped
    weights were evicted and re-read, and the timing measures the disk, not the arithmetic.
    """
    out = call()  # warm-up: also pages in memory-mapped weights
    times = []
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    for _ in range(repeats):
        del out
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
    return times, resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults0, out


def worker_minisae(a):
    import minisae.xp
    from minisae.models import load_model

    xp = minisae.xp.get_xp(a.backend)
    t0 = time.perf_counter()
    model = load_model(a.ckpt, xp=xp)  # Gemma 2 or Gemma 3, from config.json
    minisae.xp.synchronize(xp)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_now_mib()
    ids = xp.asarray(make_ids(a.batch, a.seq, MODELS[a.model][0]["vocab_size"]))
    site = f"blocks.{a.layer}.hook_resid_post"

    def call():
        if a.mode == "forward":
            out = model.forward(ids)
        else:
            out = model.capture(ids, site)
        minisae.xp.synchronize(xp)
        return out

    times, faults, out = time_calls(call, a.repeats)
    out = minisae.xp.to_numpy(out)
    keep = out[:, -1, :] if a.mode == "forward" else out
    dev_peak = None
    if a.backend == "cupy":
        import cupy

        dev_peak = cupy.get_default_memory_pool().total_bytes() / 2**20
    return times, faults, load_s, rss_loaded, dev_peak, keep


def worker_transformers(a):
    import torch
    import transformers

    torch.set_num_threads(a.threads)
    device = "cuda" if a.backend == "cupy" else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    cls = getattr(transformers, MODELS[a.model][1])
    model = cls.from_pretrained(a.ckpt, dtype=torch.float32, attn_implementation="eager")
    model.to(device).eval()
    sync()
    load_s = time.perf_counter() - t0
    rss_loaded = rss_now_mib()
    ids = torch.from_numpy(make_ids(a.batch, a.seq, MODELS[a.model][0]["vocab_size"])).to(device)

    class Stop(Exception):
        pass

    grabbed = {}

    def stop_here(module, args, output):
        grabbed["acts"] = output[0] if isinstance(output, tuple) else output
        raise Stop  # like minisae's capture: compute nothing after the layer we need

    def call():
        with torch.inference_mode():
            if a.mode == "forward":
                out = model(input_ids=ids, use_cache=False).logits
            else:
                h = model.model.layers[a.layer].register_forward_hook(stop_here)
                try:
                    model(input_ids=ids, use_cache=False)
                except Stop:
                    pass
                finally:
                    h.remove()
                out = grabbed.pop("acts")
        sync()
        return out

    times, faults, out = time_calls(call, a.repeats)
    out = out.float().cpu().numpy()
    keep = out[:, -1, :] if a.mode == "forward" else out
    dev_peak = torch.cuda.max_memory_reserved() / 2**20 if device == "cuda" else None
    return times, faults, load_s, rss_loaded, dev_peak, keep


def worker_gemm(a):
    """The GEMM-only limit: the time of the matrix products alone that the call must do (the
    decoder layers up to the captured one, or all of them plus the unembedding), on random
    arrays of the same shapes, with numpy (OpenBLAS: minisae's BLAS) or torch (MKL:
    transformers'). Each linear product is timed as x @ W.T and as (W @ x.T).T and the faster
    one counts, so no implementation on that BLAS could beat the sum by choosing a layout."""
    cfg = MODELS[a.model][0]
    D, I, H, K, hd = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                       "num_key_value_heads", "head_dim"))
    B, T = a.batch, a.seq
    layers = a.layer + 1 if a.mode == "capture" else a.layers
    rng = np.random.default_rng(0)
    linears = [(H * hd, D), (K * hd, D), (K * hd, D), (D, H * hd), (I, D), (I, D), (D, I)]  # q k v o gate up down
    if a.mode == "forward":
        linears_last = [(cfg["vocab_size"], D)]  # the unembedding
    else:
        linears_last = []
    if a.worker == "gemm-torch":
        import torch

        torch.set_num_threads(a.threads)
        arr = lambda shape: torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))  # noqa: E731
        ctx = torch.inference_mode
    else:
        import contextlib

        arr = lambda shape: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
        ctx = contextlib.nullcontext
    shapes = linears * layers + linears_last
    total = 0.0
    with ctx():
        for (out, inp) in sorted(set(shapes)):
            x, W = arr((B * T, inp)), arr((out, inp))
            best = min(min(time_calls(lambda: x @ W.T, a.repeats)[0]),
                       min(time_calls(lambda: (W @ x.T).T, a.repeats)[0]))
            total += best * shapes.count((out, inp))
            del x, W
        q, k = arr((B, H, T, hd)), arr((B, H, hd, T))
        total += layers * min(time_calls(lambda: q @ k, a.repeats)[0])  # scores
        p_, v = arr((B, H, T, T)), arr((B, H, T, hd))
        total += layers * min(time_calls(lambda: p_ @ v, a.repeats)[0])  # probabilities @ values
    return [total], 0, 0.0, rss_now_mib(), None, None


def worker(a):
    work = {"minisae": worker_minisae, "transformers": worker_transformers}.get(a.worker, worker_gemm)
    times, faults, load_s, rss_loaded, dev_peak, keep = work(a)
    np.save(a.result + ".npy", keep if keep is not None else np.zeros(0))
    res = dict(times=times, major_faults=faults, load_s=load_s, rss_loaded_mib=rss_loaded, peak_rss_mib=peak_rss_mib(),
               peak_device_mib=dev_peak)
    with open(a.result + ".json", "w") as f:
        json.dump(res, f)


# ---------------------------------------------------------------- parent

def versions(python):
    code = ("import json, platform, numpy, torch, transformers, minisae;"
            "print(json.dumps({'python': platform.python_version(), 'numpy': numpy.__version__,"
            "'torch': torch.__version__, 'transformers': transformers.__version__,"
            "'minisae': getattr(minisae, '__version__', '?')}))")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def run_one(args, ckpt, side, mode, batch, seq, scratch):
    result = os.path.join(scratch, f"{side}_{mode}_{batch}_{seq}")
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--ckpt", ckpt, "--mode", mode,
           "--batch", str(batch), "--seq", str(seq), "--repeats", str(args.repeats), "--layer", str(args.layers // 2),
           "--threads", str(args.threads), "--backend", args.backend, "--result", result, "--model", args.model]
    load_before = os.getloadavg()[0]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{side} {mode} B={batch} T={seq} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    with open(result + ".json") as f:
        res = json.load(f)
    res["out"] = np.load(result + ".npy")
    res["load_avg"] = max(load_before, os.getloadavg()[0])  # other work on the machine skews timings
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="gemma2-2b", help="shapes to benchmark")
    p.add_argument("--layers", type=int, help="decoder layers (default: 18 for gemma3-270m, 4 otherwise)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2])
    p.add_argument("--seq", type=int, nargs="+", default=[128, 256],
                   help="sequence lengths, paired with --batch (or one for all)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    p.add_argument("--modes", nargs="+", choices=["forward", "capture"], default=["forward", "capture"])
    p.add_argument("--ckpt", help="reuse a checkpoint folder instead of writing a temporary one")
    # worker-only arguments
    p.add_argument("--gemm-limit", action="store_true",
                   help="also time the matrix products alone (numpy and torch): the GEMM-only limit")
    p.add_argument("--worker", choices=["minisae", "transformers", "gemm-numpy", "gemm-torch"],
                   help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["forward", "capture"], help=argparse.SUPPRESS)
    p.add_argument("--layer", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--make-ckpt", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.layers is None:
        a.layers = MODELS[a.model][3]
    if a.make_ckpt:
        return make_checkpoint(a.make_ckpt, a.layers, name=a.model)
    if a.worker:
        a.batch, a.seq = a.batch[0], a.seq[0]
        return worker(a)

    seqs = a.seq * len(a.batch) if len(a.seq) == 1 else a.seq
    if len(seqs) != len(a.batch):
        p.error(f"--seq needs one value or as many as --batch ({len(a.batch)}), found {len(a.seq)}")
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench_gemma2_") as scratch:
        ckpt = a.ckpt
        if ckpt is None:
            ckpt = os.path.join(scratch, "ckpt")
            t0 = time.perf_counter()
            # in a subprocess, so this parent stays small (its size would leak into the workers' peaks)
            subprocess.run([sys.executable, os.path.abspath(__file__), "--make-ckpt", ckpt, "--layers", str(a.layers),
                            "--model", a.model], check=True, capture_output=True)
            print(f"wrote {ckpt} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        rows = []
        for batch, seq in zip(a.batch, seqs):
            for mode in a.modes:
                sides = ("minisae", "transformers") + (("gemm-numpy", "gemm-torch") if a.gemm_limit else ())
                r = {side: run_one(a, ckpt, side, mode, batch, seq, scratch) for side in sides}
                ref = r["transformers"]["out"].astype(np.float64)
                rel = float(np.max(np.abs(r["minisae"]["out"] - ref)) / max(np.max(np.abs(ref)), 1e-30))
                for side in sides:
                    med = statistics.median(r[side]["times"])
                    mem = r[side]["peak_device_mib"] if a.backend == "cupy" else r[side]["peak_rss_mib"]
                    rows.append((mode, batch, seq, side, batch * seq / med, med, mem, r[side]["rss_loaded_mib"],
                                 r[side]["load_s"], rel, r[side]["load_avg"], r[side]["major_faults"]))
                    print(f"  {mode} B={batch} T={seq} {side}: {batch * seq / med:.1f} tok/s", file=sys.stderr)

    v = versions(sys.executable)
    mem_name = "peak device MiB" if a.backend == "cupy" else "peak RSS MiB"
    lines = [
        f"## {a.model} forward: minisae vs transformers eager ({a.backend}, float32)",
        "",
        f"{a.model} shapes, {a.layers} of {MODELS[a.model][2]} layers, random weights; capture = blocks.{a.layers // 2}.hook_resid_post "
        f"(both sides stop after that layer); median of {a.repeats} after 1 warm-up; {a.threads} threads each.",
        "",
        f"| mode | B | T | side | tokens/s | median s | {mem_name} | RSS after load MiB | load s | max rel diff vs HF "
        f"| load avg | major faults |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, batch, seq, side, tps, med, mem, rss_loaded, load_s, rel, load_avg, faults in rows:
        lines.append(f"| {mode} | {batch} | {seq} | {side} | {tps:.1f} | {med:.3f} | {mem:.0f} | {rss_loaded:.0f} | "
                     f"{load_s:.1f} | {rel:.1e} | {load_avg:.1f} | {faults} |")
    lines += [
        "",
        "- load avg: the machine's 1-minute load average around that run (max of before/after); above the "
        "thread count, other processes competed for the CPUs and the timings are pessimistic.",
        "- gemm-numpy / gemm-torch (--gemm-limit): the matrix products of the same call alone, on random "
        "arrays, with numpy's BLAS (minisae's) and torch's (transformers'), the faster layout of each "
        "linear product: the GEMM-only limit of each side (only its time and tokens/s columns mean anything).",
        "- major faults: pages read from disk during the timed calls (evicted memory-mapped weights); "
        "non-zero means that row timed the disk too.",
        "- RSS after load is small when a side memory-maps the weights lazily; the peak includes the mapped "
        "weights once touched (gemma2-2b with 4 layers: about 3.4 GiB, the embedding alone 2.2 GiB; "
        "gemma3-270m: 1.1 GiB, embedding 0.6 GiB; gemma3-1b with 4 layers: 1.6 GiB, embedding 1.1 GiB).",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
        f"- versions: {json.dumps(v)}",
        f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}, total {time.time() - started:.0f} s",
        f"- command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}",
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
