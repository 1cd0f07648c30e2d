"""Where a Gemma 3 270M forward's time goes: the 18 layers, the tied head, the head's GEMM alone in
NumPy (OpenBLAS) whole, written as (V, T) instead of (T, V), and in the loss's 8,192-column blocks,
`cross_entropy` of C-ordered and of transposed logits, the loss head (`_nll_sum`: blocked GEMM,
soft-cap, online log-sum-exp), and, when --ref-python has torch, the GEMM in torch (MKL).

    /work/venv/bin/python reference/bench_head.py --model /work/models/gemma-3-270m-hf \\
        --ref-python /work/benchvenv/bin/python

Prints one table (best of --repeats, seconds, 2 threads by default). Nothing here is minisae's
API: `_run` and `_logits` are the forward's two halves (minisae.models.gemma2.model).
"""

import argparse
import os
import subprocess
import sys
import time

TORCH_GEMM = """
import time, torch
torch.set_num_threads({threads})
x = torch.randn({T}, {D}); W = torch.randn({V}, {D})
best = min((lambda t0: (x @ W.T, time.perf_counter() - t0)[1])(time.perf_counter()) for _ in range({repeats}))
print(best)
"""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="/work/models/gemma-3-270m-hf")
    p.add_argument("--ref-python", default="/work/benchvenv/bin/python")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(a.threads)
    import numpy

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import minisae

    model = minisae.load_model(a.model)
    ids = numpy.random.default_rng(0).integers(10, 200_000, size=(1, a.tokens))
    rows = {}
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        h, _, _ = model._run(ids, splice=None, capture=())  # (T, D) after the last layer
        t1 = time.perf_counter()
        model._logits(h)  # (T, V) final norm, tied head, soft-cap
        t2 = time.perf_counter()
        rows["layers"] = min(rows.get("layers", 1e9), t1 - t0)
        rows["head + soft-cap"] = min(rows.get("head + soft-cap", 1e9), t2 - t1)
    V, D = model.embed.shape
    x = numpy.random.default_rng(1).standard_normal((a.tokens, D)).astype(numpy.float32)
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        x @ model.embed.T  # (T, D) @ (D, V)
        t1 = time.perf_counter()
        model.embed @ x.T  # (V, D) @ (D, T): the same numbers, written as (V, T)
        t2 = time.perf_counter()
        rows["head GEMM, numpy"] = min(rows.get("head GEMM, numpy", 1e9), t1 - t0)
        rows["head GEMM written as (V, T), numpy"] = min(rows.get("head GEMM written as (V, T), numpy", 1e9), t2 - t1)
    from minisae.models.gemma2.loss import cross_entropy
    z = x @ model.embed.T  # (T, V) C-ordered
    zt = (model.embed @ x.T).T  # (T, V), a transposed view of (V, T) memory
    ids = numpy.random.default_rng(3).integers(10, V, size=(1, a.tokens))
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        cross_entropy(z[None], ids)
        t1 = time.perf_counter()
        cross_entropy(zt[None], ids)
        t2 = time.perf_counter()
        rows["cross_entropy of (T, V) logits"] = min(rows.get("cross_entropy of (T, V) logits", 1e9), t1 - t0)
        rows["cross_entropy of the transposed view"] = min(rows.get("cross_entropy of the transposed view", 1e9), t2 - t1)
    del z, zt
    out = numpy.empty((a.tokens, 8192), dtype=numpy.float32)
    targets = numpy.random.default_rng(2).integers(0, V, a.tokens)
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        for v0 in range(0, V, 8192):  # what the loss does: blocks of 8,192 columns, never the (T, V) logits
            numpy.matmul(x, model.embed[v0:v0 + 8192].T, out=out[:, :min(8192, V - v0)])
        t1 = time.perf_counter()
        model._nll_sum(x, targets)  # the whole loss head: blocked GEMM, soft-cap, online log-sum-exp
        t2 = time.perf_counter()
        rows["head GEMM in 8,192-column blocks, numpy"] = min(rows.get("head GEMM in 8,192-column blocks, numpy", 1e9), t1 - t0)
        rows["loss head (_nll_sum)"] = min(rows.get("loss head (_nll_sum)", 1e9), t2 - t1)
    if a.ref_python and os.path.exists(a.ref_python):
        code = TORCH_GEMM.format(threads=a.threads, T=a.tokens, D=D, V=V, repeats=a.repeats)
        out = subprocess.run([a.ref_python, "-c", code], capture_output=True, text=True, check=True)
        rows["head GEMM, torch"] = float(out.stdout.strip().splitlines()[-1])
    print(f"| Gemma 3 270M, 1 × {a.tokens} tokens, {a.threads} threads | seconds (best of {a.repeats}) |")
    print("|---|---|")
    for name, secs in rows.items():
        print(f"| {name} | {secs:.2f} |")


if __name__ == "__main__":
    main()
