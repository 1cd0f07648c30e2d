"""Where the time of two real-pipeline stages goes, part by part, on Gemma 3 270M.

    capture   minisae's capture of B x T tokens at a site, split by the block's pieces (the
              projections, attention by query blocks with its softmax, the RMSNorms, RoPE, the
              GELU), beside transformers' capture of the same tokens split by aten operator
              (torch.profiler: matrix products, SDPA, elementwise)
    topk      one TopK training step at the real experiment's size (B 1024, D 640, M 4096,
              k 32, layer-6 activations from a `minisae cache` folder), split into the encoder's
              product, the top-k, the sparse products and the rest, and the optimiser step
    step      a JumpReLU or Gated step on reference/bench_sae.py's problem (B 2048, D 512,
              M 8192, L0 about 1 %), split by the functions of its fast path, beside the
              encoder's product alone (the 1-GEMM floor)

    /work/venv/bin/python reference/bench_parts.py capture --model /work/models/gemma-3-270m-hf \\
        --ref-python /work/benchvenv/bin/python
    /work/venv/bin/python reference/bench_parts.py topk --cache /work/exp/gemma_l6
    /work/refvenv/bin/python reference/bench_parts.py step --variant jumprelu   # imports bench_sae.py: torch

Prints tables (seconds or milliseconds per call; 2 threads by default). The parts are timed by
wrapping minisae's own functions, so they include the Python around each call and sum to a
little less than the whole. Nothing here is minisae's API.
"""

import argparse
import collections
import os
import subprocess
import sys
import time

TORCH_CAPTURE = """
import time, torch
torch.set_num_threads({threads})
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({model!r}, dtype=torch.float32).eval()
ids = torch.randint(10, 200_000, ({B}, {T}), generator=torch.Generator().manual_seed(0))
class Stop(Exception):
    pass
def stop(module, args, output):
    raise Stop
m.model.layers[{layer}].register_forward_hook(stop)
def capture():
    try:
        with torch.no_grad():
            m(ids)
    except Stop:
        pass
capture()
best = 1e9
for _ in range({repeats}):
    t0 = time.perf_counter(); capture(); best = min(best, time.perf_counter() - t0)
print("WHOLE", best)
from torch.profiler import ProfilerActivity, profile
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range({repeats}):
        capture()
for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]:
    print("PART", e.key, e.self_cpu_time_total / 1e6 / {repeats})
"""


def timed(fn, name, totals):
    """fn, its calls adding their wall time to totals[name] (a method too: self is one of the args)."""
    def wrapped(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            totals[name] += time.perf_counter() - t0
    return wrapped


def timers(module, names, totals):
    """Wrap module.<name> for each name with `timed`."""
    for name in names:
        setattr(module, name, timed(getattr(module, name), name, totals))


def capture_parts(a):
    import numpy

    import minisae
    import minisae.models.gemma3.model as g3
    from minisae.models.gemma2 import model as gm

    model = minisae.load_model(a.model)
    layer = int(a.site.split(".")[1])
    if a.pass_block:  # only the block sizes, interleaved in this process: the best capture of each per round
        from minisae.models.gemma2 import layers_fast
        sizes = [int(v) for v in a.pass_block.split(",")]
        ids = numpy.random.default_rng(0).integers(10, 200_000, size=(a.batch, a.seq))
        model.capture(ids, a.site)
        print(f"\nminisae: capture of {a.batch} x {a.seq} tokens at {a.site}, best of {a.repeats} a round")
        print("| round | " + " | ".join(f"PASS_BLOCK {v}" for v in sizes) + " |")
        print("|---|" + "---:|" * len(sizes))
        for r in range(a.rounds):
            best = []
            for v in sizes:
                layers_fast.PASS_BLOCK = v
                runs = []
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    model.capture(ids, a.site)
                    runs.append(time.perf_counter() - t0)
                best.append(min(runs))
            print(f"| {r} | " + " | ".join(f"{t:.3f}" for t in best) + " |")
        return
    ids = numpy.random.default_rng(0).integers(10, 200_000, size=(a.batch, a.seq))
    totals = collections.Counter()
    timers(gm, ["linear", "rms_norm", "apply_rope", "gelu_tanh_times_", "attention_scores_to_probs"], totals)
    gm.Gemma2Model._attention_blocked = timed(gm.Gemma2Model._attention_blocked, "attention by query blocks", totals)
    g3.rms_norm = gm.rms_norm  # QK-norm's RMSNorms count with the others
    model.capture(ids, a.site)
    totals.clear()
    whole = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        model.capture(ids, a.site)
        whole.append(time.perf_counter() - t0)
    print(f"\nminisae: capture of {a.batch} x {a.seq} tokens at {a.site} (layers 0-{layer})")
    print("| part (mean over the calls) | seconds per capture |\n|---|---:|")
    print(f"| whole capture (wall, best of {a.repeats}; mean {sum(whole) / a.repeats:.3f}) | {min(whole):.3f} |")
    labels = {"linear": "projections (linear: q, k, v, o, gate, up, down)",
              "attention by query blocks": "attention by query blocks (products, copies, softmax)",
              "attention_scores_to_probs": "  of which the softmax passes",
              "rms_norm": "RMSNorms (4 a block and QK-norm's 2)", "apply_rope": "RoPE",
              "gelu_tanh_times_": "GELU(gate) * up"}
    for name, label in labels.items():
        print(f"| {label} | {totals[name] / a.repeats:.3f} |")
    if a.ref_python and os.path.exists(a.ref_python):
        code = TORCH_CAPTURE.format(threads=a.threads, model=a.model, B=a.batch, T=a.seq, layer=layer,
                                    repeats=a.repeats)
        out = subprocess.run([a.ref_python, "-c", code], capture_output=True, text=True, check=True).stdout
        print(f"\ntransformers: the same capture (stopping hook after layer {layer})")
        print("| aten operator (self CPU time of the calling thread, mean over the calls) | seconds per capture |\n|---|---:|")
        for line in out.splitlines():
            if line.startswith("WHOLE"):
                print(f"| whole capture (wall, best of {a.repeats}) | {float(line.split()[1]):.3f} |")
            elif line.startswith("PART"):
                _, key, s = line.split(maxsplit=2)
                print(f"| {key} | {float(s):.3f} |")


def topk_parts(a):
    import numpy

    from minisae.sae import common, sparse, topk, topk_fast
    from minisae.threads import in_background
    from minisae.training import optim

    x = numpy.load(os.path.join(a.cache, "shard_00000.npy"), mmap_mode="r")[:a.tokens].copy()  # (B, D)
    x /= numpy.sqrt((x * x).sum(axis=1).mean())  # E||x||^2 = 1, as the trainer scales
    B, D = x.shape
    M, k = a.d_sae, a.k
    params = topk.init(D, M, seed=0)
    params["b_dec"] = x.mean(axis=0)
    dead = numpy.zeros(0, dtype=numpy.int64)
    rows_ms = {}

    def median_ms(name, fn):
        fn()
        runs = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = fn()
            runs.append(time.perf_counter() - t0)
        rows_ms[name] = 1e3 * float(numpy.median(runs))
        return out

    median_ms("the step (topk_fast.forward_backward)",
              lambda: topk_fast.forward_backward(params, x, k, 512, 1 / 32, dead, dense_f=False))
    x_c = x - params["b_dec"]
    pi = median_ms("  encoder product x_c @ W_enc", lambda: x_c @ params["W_enc"])
    idx, vals = median_ms("  top_k", lambda: common.top_k(pi, k))
    rows, cols, rowptr = numpy.repeat(numpy.arange(B), k), idx.ravel(), numpy.arange(B + 1) * k
    z = numpy.maximum(vals, 0.0).ravel()
    xhat = median_ms("  decode (sparse_matmul)", lambda: sparse.sparse_matmul(rowptr, cols, z, params["W_dec"]))
    err = x - xhat
    grouped = sparse.by_column(rows, cols, B, M)
    median_ms("  sampled product dxhat W_dec^T", lambda: sparse.sampled_matmul(rowptr, cols, err, params["W_dec"]))
    median_ms("  dW_enc (sparse_t_matmul, transposed)",
              lambda: sparse.sparse_t_matmul(rows, cols, M, [(z, x_c)], transposed=(0,), grouped=grouped))
    median_ms("  dW_dec (sparse_t_matmul)", lambda: sparse.sparse_t_matmul(rows, cols, M, [(z, err)], grouped=grouped))

    def backward_products():  # as the step runs them: dW_dec beside the other two
        later = in_background(sparse.sparse_t_matmul, rows, cols, M, [(z, err)], grouped=grouped)
        sparse.sampled_matmul(rowptr, cols, err, params["W_dec"])
        sparse.sparse_t_matmul(rows, cols, M, [(z, x_c)], transposed=(0,), grouped=grouped)
        later.result()

    median_ms("  the three backward products as the step runs them", backward_products)
    _, grads = topk_fast.forward_backward(params, x, k, 512, 1 / 32, dead, dense_f=False)
    state = optim.adam_init(params)
    median_ms("the optimiser step (adam_update, W_dec rows kept unit)",
              lambda: optim.adam_update(params, grads, state, lr=1e-4, betas=(0.9, 0.999), unit_rows="W_dec"))
    print(f"\nminisae TopK step: B {B}, D {D}, M {M}, k {k}, median of {a.repeats} calls")
    print("| part | ms |\n|---|---:|")
    for name, ms in rows_ms.items():
        print(f"| {name} | {ms:.2f} |")


def step_parts(a):
    """JumpReLU's or Gated's training step on bench_sae.py's problem, split by wrapping the
    functions its fast path calls (each call's wall time, summed; some run beside others)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import importlib

    import bench_sae

    module = importlib.import_module(f"minisae.sae.{a.variant}")
    fast = importlib.import_module(f"minisae.sae.{a.variant}_fast")
    params, x, hyper = bench_sae.make_problem(a.variant, module, a.batch_sae, a.d_in, a.d_sae_step,
                                              density=0.01, dead_frac=0.1, seed=0)[:3]
    totals = collections.Counter()
    names = [n for n, f in vars(fast).items() if callable(f) and not isinstance(f, type)
             and getattr(f, "__module__", "").startswith("minisae") and n != "forward_backward"
             and not n.startswith("_") or n == "_sparse"]
    timers(fast, names, totals)
    for _ in range(2):
        module.loss_and_grads(params, x, **hyper)
    totals.clear()
    t0 = time.perf_counter()
    for _ in range(a.repeats):
        module.loss_and_grads(params, x, **hyper)
    whole = (time.perf_counter() - t0) / a.repeats
    x_c = x - params["b_dec"]
    t0 = time.perf_counter()
    for _ in range(a.repeats):
        x_c @ params["W_enc"]
    gemm = (time.perf_counter() - t0) / a.repeats
    print(f"\nminisae {a.variant} step (loss_and_grads): B {a.batch_sae}, D {a.d_in}, M {a.d_sae_step}, "
          f"L0 about 1 % of M; means of {a.repeats} calls")
    print("| part | ms |\n|---|---:|")
    print(f"| the step | {whole * 1e3:.1f} |")
    print(f"| the encoder's product alone (the 1-GEMM floor) | {gemm * 1e3:.1f} |")
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        if t / a.repeats >= 5e-4:
            print(f"| {name} | {t / a.repeats * 1e3:.1f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=("capture", "topk", "step"))
    p.add_argument("--variant", choices=("jumprelu", "gated"), default="jumprelu", help="step: the SAE")
    p.add_argument("--batch-sae", type=int, default=2048, help="step: B")
    p.add_argument("--d-in", type=int, default=512, help="step: D")
    p.add_argument("--d-sae-step", type=int, default=8192, help="step: M")
    p.add_argument("--model", default="/work/models/gemma-3-270m-hf")
    p.add_argument("--ref-python", default="/work/benchvenv/bin/python")
    p.add_argument("--site", default="blocks.6.hook_resid_post")
    p.add_argument("--batch", type=int, default=4, help="capture: rows of --seq tokens")
    p.add_argument("--pass-block", default=None, metavar="N,N,...",
                   help="capture: time only these block sizes of the blocked elementwise passes, interleaved")
    p.add_argument("--rounds", type=int, default=3, help="capture --pass-block: rounds")
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--cache", default="/work/exp/gemma_l6", help="topk: a `minisae cache` folder")
    p.add_argument("--tokens", type=int, default=1024, help="topk: B")
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), f"threads {a.threads}")
    {"capture": capture_parts, "topk": topk_parts, "step": step_parts}[a.stage](a)


if __name__ == "__main__":
    main()
