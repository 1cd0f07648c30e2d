"""The optimiser step of `minisae train`, three calls against one fused pass.

For each shape (D = d_in, M latents; the four parameters of a TopK/JumpReLU-shaped SAE, float32)
times, interleaved over rounds (median shown):

  three    optim.remove_parallel_decoder_grad, optim.adam_update, optim.normalize_decoder_rows
           (what minisae train ran until the fused pass)
  fused    optim.adam_update(..., unit_rows="W_dec"): the same numbers (a test holds them bitwise
           equal), each block of decoder rows taken through all three steps while in cache
  other    the fused pass with other block sizes (--other-blocks; default the sizes used before
           2026-12-06), the same numbers

Run (repository root; numpy only):
    python reference/bench_optim.py --shapes 512x8192,2304x16384 --threads 2
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="512x8192,2304x16384", help="comma-separated DxM (default %(default)s)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (default %(default)s)")
    p.add_argument("--beta1", type=float, default=0.0, help="Adam's beta1 (0: JumpReLU/Gated, 0.9: TopK)")
    p.add_argument("--threads", type=int, default=None, help="BLAS threads (minisae.threads follows them)")
    p.add_argument("--other-blocks", default="32768,65536", metavar="ADAM,ROWS",
                   help="also time the fused pass with these block sizes (optim.ADAM_BLOCK_ELEMENTS, "
                        "optim.ROW_BLOCK_ELEMENTS; default %(default)s, the sizes before 2026-12-06)")
    args = p.parse_args(argv)
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    args.other_blocks = tuple(int(v) for v in args.other_blocks.split(","))
    if args.repeats < 1 or not args.shapes:
        p.error("expected --repeats >= 1 and at least one shape")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads is not None:
    os.environ["OPENBLAS_NUM_THREADS"] = str(ARGS.threads)  # read when BLAS loads

import minisae  # noqa: E402,F401  first: its OpenBLAS setting applies only before NumPy loads
import numpy as np  # noqa: E402

from minisae import threads  # noqa: E402

from minisae.training import optim
from minisae.sae.common import unit_rows  # noqa: E402


def main(args):
    print(f"# optimiser step, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%dT%H:%MZ}, "
          f"{platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, "
          f"threads {threads.threads()}, beta1 {args.beta1}, load average {os.getloadavg()[0]:.2f}")
    other = "/".join(f"2^{v.bit_length() - 1}" for v in args.other_blocks)
    mine = f"2^{optim.ADAM_BLOCK_ELEMENTS.bit_length() - 1}/2^{optim.ROW_BLOCK_ELEMENTS.bit_length() - 1}"
    print(f"| D x M | parameters | three calls ms | fused ms (blocks {mine}) | fused / three "
          f"| fused, blocks {other} ms | {mine} / {other} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for D, M in args.shapes:
        rng = np.random.default_rng(0)
        params = {"W_enc": rng.standard_normal((D, M), dtype=np.float32),
                  "b_enc": np.zeros(M, np.float32),
                  "W_dec": unit_rows(rng.standard_normal((M, D), dtype=np.float32)),
                  "b_dec": np.zeros(D, np.float32)}
        grads = {k: rng.standard_normal(v.shape, dtype=np.float32) for k, v in params.items()}
        state = optim.adam_init(params)
        kw = dict(lr=1e-7, betas=(args.beta1, 0.999))

        def three():
            optim.remove_parallel_decoder_grad(params["W_dec"], grads["W_dec"], out=grads["W_dec"])
            optim.adam_update(params, grads, state, **kw)
            optim.normalize_decoder_rows(params["W_dec"])

        def fused():
            optim.adam_update(params, grads, state, unit_rows="W_dec", **kw)

        def fused_other():  # the same pass with other block sizes (the same numbers: elementwise, per row)
            saved = optim.ADAM_BLOCK_ELEMENTS, optim.ROW_BLOCK_ELEMENTS
            optim.ADAM_BLOCK_ELEMENTS, optim.ROW_BLOCK_ELEMENTS = args.other_blocks
            try:
                fused()
            finally:
                optim.ADAM_BLOCK_ELEMENTS, optim.ROW_BLOCK_ELEMENTS = saved

        jobs = [("three", three), ("fused", fused), ("other", fused_other)]
        times = {name: [] for name, _ in jobs}
        for _, fn in jobs:
            fn()  # warm-up: scratch buffers, pages
        for r in range(args.repeats):
            for name, fn in jobs[r % 3:] + jobs[:r % 3]:  # rotated order
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        a, b, c = (1e3 * statistics.median(times[k]) for k in ("three", "fused", "other"))
        n = sum(v.size for v in params.values())
        print(f"| {D} x {M} | {n / 1e6:.1f} M | {a:.1f} | {b:.1f} | {b / a:.2f} | {c:.1f} | {b / c:.2f} |")


if __name__ == "__main__":
    main(ARGS)
