"""SAE training-step speed: minisae `loss_and_grads` vs the dense-matmul floor vs PyTorch autograd.

The issue's requirement: for float32 on CPU at B=2048, D=512, M=8192 (JumpReLU, L0 about 1% of
M), `jumprelu.loss_and_grads` takes at most 1.3x the time of the five dense products a dense SAE
step needs, measured in the same run, and beats a PyTorch autograd version of the same loss.
Three things are timed, interleaved, in one process:

  floor    the five dense float32 products of a dense SAE step on preallocated inputs and
           outputs (`matmul(..., out=...)`), nothing else: x @ W_enc (B,D)(D,M); f @ W_dec
           (B,M)(M,D); dxhat @ W_dec.T (B,D)(D,M); f.T @ dxhat (M,B)(B,D); x.T @ dpre (D,B)(B,M)
  minisae  `minisae.sae.<variant>.loss_and_grads(params, x, **hyper)`, float32; the 2025-26
           losses as variants of their own: jumprelu_quadratic (raw theta, Gemma Scope 2's
           quadratic L0 penalty, the frequency penalty), jumprelu_matryoshka, batchtopk and
           batchtopk_matryoshka (prefixes M/16, M/4, M)
  torch    an independent autograd version of the loss (below, from the papers: arXiv 2407.14435,
           2404.16014, 2406.04093; custom autograd.Functions for the JumpReLU / Heaviside
           pseudo-derivatives, torch.topk + scatter for TopK), forward + backward, float32, same
           threads, tensors made beforehand

Each round times every variant's three in a rotated order, sleeping --pause seconds before each
call (so the other library's spinning worker threads are idle); the table shows medians over
the timed rounds, plus a best-of line. Before timing, minisae's and torch's loss and gradients
are compared once (max relative difference printed), so both really compute the same thing.

Problems (minisae's own `init`, then sparsified; seeded): x ~ N(0, 1/D) (E||x||^2 = 1), b_dec
small and non-zero. jumprelu: log_threshold per latent so that ~density*B tokens fire (L0 ~
density*M, 1% = ~82 at M=8192), sparsity_coeff 6e-4, bandwidth 0.001; gated: b_gate likewise
(~density*M gates open), sparsity_coeff 6e-4; topk: k = density*M, aux_k 512, aux_coeff 1/32,
--dead-frac (10%) of the latents marked dead. Thresholds sit in a gap of the batch's values,
away from every kink (theta, theta +- eps/2; pi_gate = 0), so float32 rounding cannot flip a
discrete choice between minisae and torch. The measured L0 (minisae's forward) is printed.

The 2025-26 losses (docs/benchmarks.md; 15-40 minutes on 2 busy cores):
    /work/refvenv/bin/python reference/bench_sae.py --batch 4096 --d-in 512 --d-sae 8192 \
        --variants jumprelu,jumprelu_quadratic,jumprelu_matryoshka,topk,batchtopk,batchtopk_matryoshka \
        --repeats 3 --warmup 1 --threads 2 --json /tmp/bench9.json

Run (repository root; the issue's setting; 4-7 minutes on 2 cores):
    /work/venvs/ref/bin/python reference/bench_sae.py --batch 2048 --d-in 512 --d-sae 8192 \\
        --variants jumprelu,gated,topk --repeats 7 --warmup 2 --json /tmp/bench_sae.json
  --threads N     NumPy's BLAS and torch on N threads (default: leave both as they are)
  --backend cupy  minisae with xp=cupy, torch on cuda, the floor in CuPy (synchronised before
                  every clock read); needs CuPy, a CUDA build of torch and a GPU
  --profile       also minisae's plain forward/backward times and a cProfile of one call
Needs numpy, torch and minisae (pip install -e . --no-deps in the torch venv). The exit code is
0 whether or not the requirement holds; the verdict is printed and written to --json.
"""

import argparse
import cProfile
import datetime
import importlib
import io
import json
import os
import platform
import pstats
import shlex
import sys
import tempfile
import time


KNOWN_VARIANTS = ("jumprelu", "gated", "topk", "jumprelu_quadratic", "jumprelu_matryoshka", "batchtopk",
                  "batchtopk_matryoshka")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=2048, help="B, tokens per batch")
    p.add_argument("--d-in", type=int, default=512, help="D, input width")
    p.add_argument("--d-sae", type=int, default=8192, help="M, number of latents")
    p.add_argument("--variants", default="jumprelu,gated,topk", help="comma-separated subset")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (the median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for NumPy's BLAS and torch (default: leave as is)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("--density", type=float, default=0.01, help="target L0 / M (default 0.01)")
    p.add_argument("--dead-frac", type=float, default=0.1, help="TopK: fraction marked dead")
    p.add_argument("--pause", type=float, default=0.2,
                   help="seconds slept before each timed call (lets idle thread pools settle)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--path", choices=("auto", "sparse", "dense"), default="auto",
                   help="minisae's path: auto (sparse when few latents fire), or forced (where "
                        "the sparse path stops paying)")
    p.add_argument("--profile", action="store_true",
                   help="also split minisae into forward/backward and cProfile one call")
    p.add_argument("--json", default=None, metavar="PATH", help="write all timings here")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in args.variants:
        if v not in KNOWN_VARIANTS:
            p.error(f"--variants: unknown variant {v!r}; expected one of {', '.join(KNOWN_VARIANTS)}")
    if args.repeats < 1 or args.warmup < 0 or args.pause < 0 or not 0.0 < args.density < 1.0:
        p.error(f"expected --repeats >= 1, --warmup >= 0, --pause >= 0 and --density in (0, 1), "
                f"found {args.repeats}, {args.warmup}, {args.pause}, {args.density}")
    return args


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads is not None:
    # BLAS libraries read these once, when loaded: set them before numpy and torch import.
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(ARGS.threads)

import minisae  # noqa: E402,F401  first: its OpenBLAS setting applies only before NumPy loads
import numpy as np  # noqa: E402
import torch  # noqa: E402

# B tokens, D input width, M latents, K top-k, Nd dead latents.


# ----------------------------------------------------------------------------------------------
# PyTorch autograd versions of the three losses (JumpReLU arXiv 2407.14435, Gated 2404.16014,
# TopK 2406.04093), independent of minisae

def _rect(u):
    """Rectangle kernel K(u): 1 on the open interval (-1/2, 1/2), else 0."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLUFn(torch.autograd.Function):
    """pi * H(pi - theta). Backward: H(pi - theta) to pi (no straight-through) and the KDE
    pseudo-derivative -(theta/eps) K((pi - theta)/eps) to theta (not the forward's derivative)."""

    @staticmethod
    def forward(ctx, pi, theta, eps):
        ctx.save_for_backward(pi, theta)
        ctx.eps = eps
        return pi * (pi > theta).to(pi.dtype)

    @staticmethod
    def backward(ctx, g):
        pi, theta = ctx.saved_tensors
        eps = ctx.eps
        dpi = g * (pi > theta).to(g.dtype)
        dtheta = (g * _rect((pi - theta) / eps)).sum(0) * (-theta / eps)
        return dpi, dtheta, None


class _StepFn(torch.autograd.Function):
    """H(pi - theta). Backward: 0 to pi, pseudo-derivative -(1/eps) K((pi - theta)/eps) to theta."""

    @staticmethod
    def forward(ctx, pi, theta, eps):
        ctx.save_for_backward(pi, theta)
        ctx.eps = eps
        return (pi > theta).to(pi.dtype)

    @staticmethod
    def backward(ctx, g):
        pi, theta = ctx.saved_tensors
        dtheta = (g * _rect((pi - theta) / ctx.eps)).sum(0) * (-1.0 / ctx.eps)
        return None, dtheta, None


def _sq_err(a, b):
    return ((a - b) ** 2).sum(1).mean()  # mean over tokens of the sum over dims


def torch_jumprelu(p, x, *, sparsity_coeff, bandwidth=0.001, pre_enc_bias=True):
    x_c = x - p["b_dec"] if pre_enc_bias else x                  # (B, D)
    pi = torch.relu(x_c @ p["W_enc"] + p["b_enc"])               # (B, M)
    theta = torch.exp(p["log_threshold"])                        # (M,)
    f = _JumpReLUFn.apply(pi, theta, bandwidth)                  # (B, M)
    xhat = f @ p["W_dec"] + p["b_dec"]                           # (B, D)
    l0 = _StepFn.apply(pi, theta, bandwidth).sum(1).mean()
    return _sq_err(x, xhat) + sparsity_coeff * l0, f


def torch_gated(p, x, *, sparsity_coeff):
    x_c = x - p["b_dec"]                                         # (B, D)
    pi_gate = x_c @ p["W_enc"] + p["b_gate"]                     # (B, M)
    pi_mag = x_c @ (p["W_enc"] * torch.exp(p["r_mag"])) + p["b_mag"]  # (B, M)
    f = (pi_gate > 0).to(x.dtype) * torch.relu(pi_mag)           # (B, M); the gate passes no grad
    xhat = f @ p["W_dec"] + p["b_dec"]                           # (B, D)
    gate = torch.relu(pi_gate)                                   # (B, M)
    xhat_frozen = gate @ p["W_dec"].detach() + p["b_dec"].detach()  # (B, D); stop-gradient
    loss = _sq_err(x, xhat) + sparsity_coeff * gate.sum(1).mean() + _sq_err(x, xhat_frozen)
    return loss, f


def torch_topk(p, x, *, k, aux_k=512, aux_coeff=1.0 / 32, dead_idx=None):
    pi = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]              # (B, M)
    vals, idx = torch.topk(pi, k, dim=1, sorted=False)           # (B, K)
    z = torch.zeros_like(pi).scatter(1, idx, torch.relu(vals))   # (B, M)
    xhat = z @ p["W_dec"] + p["b_dec"]                           # (B, D)
    loss = _sq_err(x, xhat)
    if dead_idx is not None and dead_idx.numel() > 0:
        e = (x - xhat).detach()                                  # (B, D) target, no gradient
        pi_dead = pi[:, dead_idx]                                # (B, Nd)
        dv, di = torch.topk(pi_dead, min(aux_k, dead_idx.numel()), dim=1, sorted=False)
        z_aux = torch.zeros_like(pi_dead).scatter(1, di, torch.relu(dv))  # (B, Nd)
        ehat = z_aux @ p["W_dec"][dead_idx]                      # (B, D), no bias
        loss = loss + aux_coeff * _sq_err(e, ehat)
    return loss, z


def _prefix_sq_err(x, f, W_dec, b_dec, prefixes):
    """(sum over Matryoshka prefixes of the squared error, the full reconstruction)."""
    total = 0.0
    for m in (prefixes or (f.shape[1],)):
        xhat = f[:, :m] @ W_dec[:m] + b_dec                      # (B, D)
        total = total + _sq_err(x, xhat)
    return total, xhat


def torch_jumprelu_recipe(p, x, *, sparsity_coeff, bandwidth=0.001, penalty="l0", target_l0=None,
                          freq_coeff=0.0, freq_target=0.1, prefixes=None):
    """Gemma Scope 2's quadratic L0 penalty, the frequency penalty, raw theta, Matryoshka."""
    x_c = x - p["b_dec"]                                         # (B, D)
    pi = torch.relu(x_c @ p["W_enc"] + p["b_enc"])               # (B, M)
    theta = p["threshold"] if "threshold" in p else torch.exp(p["log_threshold"])  # (M,)
    f = _JumpReLUFn.apply(pi, theta, bandwidth)                  # (B, M)
    a = _StepFn.apply(pi, theta, bandwidth)                      # (B, M)
    l0_b = a.sum(1)                                              # (B,)
    if penalty == "quadratic":
        pen = (sparsity_coeff * 2.0 / target_l0 * (l0_b - target_l0) ** 2).mean()
    else:
        pen = sparsity_coeff * l0_b.mean()
    if freq_coeff:
        pen = pen + freq_coeff * (torch.relu(a.mean(0) - freq_target) ** 2).sum()
    rec, _ = _prefix_sq_err(x, f, p["W_dec"], p["b_dec"], prefixes)
    return rec + pen, f


def torch_batchtopk(p, x, *, k, aux_k=512, aux_coeff=1.0 / 32, dead_idx=None, prefixes=None):
    pi = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]              # (B, M)
    vals, idx = torch.topk(pi.reshape(-1), int(k * x.shape[0]), sorted=False)  # the batch's B*k
    z = torch.zeros_like(pi).reshape(-1).scatter(0, idx, torch.relu(vals)).reshape(pi.shape)
    loss, xhat = _prefix_sq_err(x, z, p["W_dec"], p["b_dec"], prefixes)
    if dead_idx is not None and dead_idx.numel() > 0:
        e = (x - xhat).detach()                                  # (B, D) target, no gradient
        pi_dead = pi[:, dead_idx]                                # (B, Nd)
        dv, di = torch.topk(pi_dead, min(aux_k, dead_idx.numel()), dim=1, sorted=False)
        z_aux = torch.zeros_like(pi_dead).scatter(1, di, torch.relu(dv))  # (B, Nd)
        loss = loss + aux_coeff * _sq_err(e, z_aux @ p["W_dec"][dead_idx])
    return loss, z


TORCH_LOSSES = {"jumprelu": torch_jumprelu, "gated": torch_gated, "topk": torch_topk,
                "jumprelu_quadratic": torch_jumprelu_recipe, "jumprelu_matryoshka": torch_jumprelu_recipe,
                "batchtopk": torch_batchtopk, "batchtopk_matryoshka": torch_batchtopk}


def matryoshka_prefixes(M):
    return (M // 16, M // 4, M)


# ----------------------------------------------------------------------------------------------
# problems: minisae's init, then sparsified to the target density (all on the host, float32)

def _kink_free_threshold(s, n_keep, offsets=(0.0,)):
    """(t (M,), margin): per column of s (B, M) a threshold with ~n_keep entries above it and
    no s_b near t + o for o in offsets (the kinks: the step; JumpReLU's kernel edges +- eps/2),
    so float32 rounding in minisae and torch cannot flip a discrete choice. Candidates lie in the
    gap below the r-th largest entry, r = n_keep, then n_keep -+ 1, -+ 2; a column takes the
    first candidate `safe` from every kink, else its best. margin: the smallest such distance."""
    B, M = s.shape
    ranks = sorted({min(max(n_keep + d, 1), B - 1) for d in (0, -1, 1, -2, 2)},
                   key=lambda r: abs(r - n_keep))
    part = np.partition(s, sorted({B - r - 1 for r in ranks} | {B - r for r in ranks}), axis=0)
    safe = 1e-4 * float(np.std(s))
    best_t, best_d = np.zeros(M, s.dtype), np.full(M, -1.0)
    for r in ranks:
        lo, hi = part[B - r - 1], part[B - r]  # (M,) the gap (lo, hi) has r entries above it
        for frac in (0.5, 0.25, 0.75, 0.125, 0.375, 0.625, 0.875):
            todo = np.flatnonzero(best_d < safe)  # columns still without a safe threshold
            if todo.size == 0:
                return best_t, float(best_d.min())
            t = lo[todo] + frac * (hi[todo] - lo[todo])  # (m,)
            d = np.full(todo.size, np.inf)
            for o in offsets:
                d = np.minimum(d, np.abs(s[:, todo] - (t + o)).min(axis=0))  # (m,)
            better = d > best_d[todo]
            best_t[todo[better]], best_d[todo[better]] = t[better], d[better]
    return best_t, float(best_d.min())


def _tie_free_tokens(x, params, ks, rng, rounds=20):
    """Redraw the tokens (rows of x, in place) where a top-k choice sits on a near-tie, until none
    does: the k-th and (k+1)-th largest pre-activation of the row within `safe` of each other, or
    a kept one within `safe` of ReLU's kink at 0, for each (columns, k) in ks. float32 rounding
    differs between NumPy's and torch's products (~1e-7 here), so at such a token the two would
    keep different latents and their gradients could not be compared. Returns (x, margin)."""
    B, D = x.shape
    for _ in range(rounds):
        pi = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]    # (B, M)
        safe = 1e-5 * float(np.abs(pi).max())
        bad, margin = np.zeros(B, dtype=bool), np.inf
        for cols, k in ks:
            a = pi if cols is None else pi[:, cols]                         # (B, m)
            if k >= a.shape[1]:
                continue
            top2 = -np.partition(-a, (k - 1, k), axis=1)[:, k - 1:k + 1]   # (B, 2) k-th, (k+1)-th
            near_zero = np.abs(np.where(a >= top2[:, :1], a, np.inf)).min(axis=1)  # (B,)
            gap = np.minimum(top2[:, 0] - top2[:, 1], near_zero)            # (B,)
            bad |= gap < safe
            margin = min(margin, float(gap[gap >= safe].min(initial=np.inf)))
        if not bad.any():
            return x, margin
        x[bad] = (rng.standard_normal((int(bad.sum()), D), dtype=np.float32) / np.sqrt(D))
    raise RuntimeError(f"could not draw {B} tokens without near-ties at the top-k in {rounds} rounds")


def make_problem(variant, module, B, D, M, *, density, dead_frac, seed):
    """(params, x, hyper, note) with float32 NumPy arrays; hyper's arrays are NumPy too."""
    rng = np.random.default_rng([seed, 1])
    x = (rng.standard_normal((B, D), dtype=np.float32) / np.sqrt(D)).astype(np.float32)  # (B, D)
    params = {k: np.array(v, dtype=np.float32)  # a writable host copy
              for k, v in module.init(D, M, seed=seed, xp=np, dtype="float32").items()}
    params["b_dec"] = (0.01 * rng.standard_normal(D)).astype(np.float32)  # (D,)
    x_c = x - params["b_dec"]                                              # (B, D)
    n_keep = max(1, int(round(density * B)))  # firing tokens per latent -> L0 = density * M
    if variant == "jumprelu":
        hyper = dict(sparsity_coeff=6e-4, bandwidth=0.001)
        eps = hyper["bandwidth"]
        pi = np.maximum(x_c @ params["W_enc"] + params["b_enc"], 0.0)     # (B, M)
        theta, margin = _kink_free_threshold(pi, n_keep, (0.0, -0.5 * eps, 0.5 * eps))  # (M,)
        params["log_threshold"] = np.log(np.maximum(theta, 1e-6)).astype(np.float32)
        note = (f"theta_i set so ~{n_keep}/{B} tokens fire per latent, no pi within "
                f"{margin:.1e} of theta or theta +- eps/2")
    elif variant == "gated":
        s = x_c @ params["W_enc"]                                           # (B, M)
        t, margin = _kink_free_threshold(s, n_keep)                         # (M,)
        params["b_gate"] = (-t).astype(np.float32)
        hyper = dict(sparsity_coeff=6e-4)
        note = (f"b_gate set so ~{n_keep}/{B} gates open per latent, no pi_gate within "
                f"{margin:.1e} of 0")
    elif variant == "jumprelu_quadratic":  # every 2025-26 JumpReLU option at once
        params, x, hyper, note = make_problem("jumprelu", module, B, D, M, density=density,
                                              dead_frac=dead_frac, seed=seed)
        params["threshold"] = np.exp(params.pop("log_threshold")).astype(np.float32)  # raw theta
        hyper.update(penalty="quadratic", target_l0=density * M, freq_coeff=1.0, freq_target=0.005)
        note += "; raw theta, quadratic penalty (L0* = density*M), frequency penalty (tau 0.005)"
    elif variant == "jumprelu_matryoshka":
        params, x, hyper, note = make_problem("jumprelu", module, B, D, M, density=density,
                                              dead_frac=dead_frac, seed=seed)
        hyper["prefixes"] = matryoshka_prefixes(M)
        note += f"; Matryoshka prefixes {hyper['prefixes']}"
    elif variant in ("batchtopk", "batchtopk_matryoshka"):
        params, x, hyper, note = make_problem("topk", module, B, D, M, density=density,
                                              dead_frac=dead_frac, seed=seed)
        note = "top B*k of the batch; " + note
        if variant == "batchtopk_matryoshka":
            hyper["prefixes"] = matryoshka_prefixes(M)
            note += f"; Matryoshka prefixes {hyper['prefixes']}"
    elif variant == "topk":
        k = max(1, int(round(density * M)))
        n_dead = int(round(dead_frac * M))
        dead_mask = np.zeros(M, dtype=bool)
        dead_mask[rng.permutation(M)[:n_dead]] = True
        hyper = dict(k=k, aux_k=512, aux_coeff=1.0 / 32, dead_mask=dead_mask)
        x, margin = _tie_free_tokens(x, params, [(None, k), (np.flatnonzero(dead_mask), 512)], rng)
        note = (f"k={k}, aux_k=512, {n_dead} of {M} latents marked dead; tokens drawn with no "
                f"near-tie at the k-th place (margin {margin:.1e})")
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return params, x, hyper, note


# ----------------------------------------------------------------------------------------------
# the backend (where arrays live, how to wait for them) and the floor

class Backend:
    def __init__(self, name):
        self.name, self.xp, self.device = name, np, "cpu"
        if name == "cupy":
            from minisae.xp import get_xp
            self.xp = get_xp("cupy")  # raises a clear RuntimeError without CuPy or a device
            if not torch.cuda.is_available():
                raise RuntimeError(f"--backend cupy needs a CUDA build of torch and a GPU; torch "
                                   f"{torch.__version__} says torch.cuda.is_available() is False")
            self.device = "cuda"

    def sync(self):
        if self.name == "cupy":
            self.xp.cuda.Device().synchronize()
            torch.cuda.synchronize()

    def to_xp(self, a):
        return a if self.xp is np or not isinstance(a, np.ndarray) else self.xp.asarray(a)

    def to_host(self, a):
        on_gpu = self.xp is not np and isinstance(a, self.xp.ndarray)
        return self.xp.asnumpy(a) if on_gpu else np.asarray(a)

    def to_torch(self, a, grad=False):
        return torch.from_numpy(np.array(a)).to(self.device).requires_grad_(grad)


def make_floor(backend, B, D, M, seed):
    """A closure running the five dense products of a dense SAE step on preallocated arrays."""
    xp, rng = backend.xp, np.random.default_rng([seed, 2])
    rnd = lambda *shape: backend.to_xp(rng.standard_normal(shape, dtype=np.float32))  # noqa: E731

    x, W_enc, W_dec = rnd(B, D), rnd(D, M), rnd(M, D)             # (B, D) (D, M) (M, D)
    f, dxhat, dpre = rnd(B, M), rnd(B, D), rnd(B, M)               # (B, M) (B, D) (B, M)
    out_BM, out_BD = xp.empty((B, M), xp.float32), xp.empty((B, D), xp.float32)
    out_MD, out_DM = xp.empty((M, D), xp.float32), xp.empty((D, M), xp.float32)

    def floor():
        xp.matmul(x, W_enc, out=out_BM)        # (B, D) @ (D, M)
        xp.matmul(f, W_dec, out=out_BD)        # (B, M) @ (M, D)
        xp.matmul(dxhat, W_dec.T, out=out_BM)  # (B, D) @ (D, M)
        xp.matmul(f.T, dxhat, out=out_MD)      # (M, B) @ (B, D)
        xp.matmul(x.T, dpre, out=out_DM)       # (D, B) @ (B, M)

    return floor


def timed(fn, backend, pause):
    time.sleep(pause)
    backend.sync()
    t0 = time.perf_counter()
    fn()
    backend.sync()
    return time.perf_counter() - t0


def _rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))


def setup_variant(variant, backend, args):
    try:
        module = importlib.import_module(f"minisae.sae.{variant.split('_')[0]}")
    except ImportError as e:
        raise RuntimeError(f"minisae.sae.{variant} does not import ({e}); is minisae installed "
                           "in this venv (pip install -e . --no-deps)?") from e
    B, D, M = args.batch, args.d_in, args.d_sae
    params, x, hyper, note = make_problem(variant, module, B, D, M, density=args.density,
                                          dead_frac=args.dead_frac, seed=args.seed)
    ms_params, ms_x = {k: backend.to_xp(v) for k, v in params.items()}, backend.to_xp(x)
    ms_hyper = {k: (v if k == "prefixes" else backend.to_xp(v)) for k, v in hyper.items()}
    t_params = {k: backend.to_torch(v, grad=True) for k, v in params.items()}
    t_x = backend.to_torch(x)
    t_hyper = {k: v for k, v in hyper.items() if k != "dead_mask"}
    if "dead_mask" in hyper:
        t_hyper["dead_idx"] = backend.to_torch(np.flatnonzero(hyper["dead_mask"]))
    t_loss_fn = TORCH_LOSSES[variant]
    names = list(params)

    def run_minisae():
        return module.loss_and_grads(ms_params, ms_x, **ms_hyper, path=args.path)

    def run_torch():
        loss, f = t_loss_fn(t_params, t_x, **t_hyper)
        grads = torch.autograd.grad(loss, [t_params[k] for k in names])
        return loss, dict(zip(names, grads)), f

    # once, untimed: same loss and gradients? and the L0 minisae's forward produces
    out, _ = module.forward(ms_params, ms_x, **ms_hyper)
    l0 = float(np.mean(np.count_nonzero(backend.to_host(out["f"]), axis=1)))
    m_loss, m_grads = run_minisae()
    t_loss, t_grads, t_f = run_torch()
    check = {"loss": _rel_err(backend.to_host(m_loss), t_loss.detach().cpu().numpy())}
    for k in names:
        check[k] = _rel_err(backend.to_host(m_grads[k]), t_grads[k].cpu().numpy())
    t_l0 = float((t_f != 0).sum(1).float().mean())
    return dict(module=module, run_minisae=run_minisae, run_torch=run_torch, note=note, l0=l0,
                torch_l0=t_l0, check=check, ms_params=ms_params, ms_x=ms_x, ms_hyper=ms_hyper)


def profile_variant(name, v, backend, floor_ms):
    """Forward/backward split (medians of 3) and the top of a cProfile of one call."""
    module, fw, bw, held = v["module"], [], [], {}
    for _ in range(3):
        fw.append(timed(lambda: held.update(out_cache=module.forward(
            v["ms_params"], v["ms_x"], **v["ms_hyper"])), backend, 0.1))
        bw.append(timed(lambda: module.backward(v["ms_params"], held["out_cache"][1]),
                        backend, 0.1))
    print(f"\n### profile: {name}\nplain `forward` {1e3 * np.median(fw):.1f} ms + `backward` "
          f"{1e3 * np.median(bw):.1f} ms (floor {floor_ms:.1f} ms, 2/5 of it forward products); "
          "`loss_and_grads` may take another (e.g. sparse) path, profiled here:")
    prof = cProfile.Profile()
    prof.runcall(lambda: (v["run_minisae"](), backend.sync()))
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
    print("```\n" + "\n".join(s.getvalue().strip().splitlines()[-26:]) + "\n```")


# ----------------------------------------------------------------------------------------------
# report

def blas_threads():
    try:
        import threadpoolctl
        info = threadpoolctl.threadpool_info()
        return ", ".join(f"{d['internal_api']}={d['num_threads']}" for d in info
                         if d.get("user_api") == "blas") or "unknown"
    except ImportError:
        env = os.environ.get("OPENBLAS_NUM_THREADS") or os.environ.get("OMP_NUM_THREADS")
        return (f"{env} (from the environment)" if env else
                f"{os.cpu_count()} (os.cpu_count(); threadpoolctl not installed)")


def machine_info(backend):
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")),
                       platform.processor() or "unknown")
    except OSError:
        cpu = platform.processor() or "unknown"
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{blas.get('name')} {blas.get('version')}"
    except Exception:
        blas = "unknown"
    info = dict(cpu=cpu, cores=os.cpu_count(),
                affinity=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                python=platform.python_version(), numpy=np.__version__, numpy_blas=blas,
                torch=torch.__version__, torch_threads=torch.get_num_threads(),
                numpy_blas_threads=blas_threads(), backend=backend.name,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                loadavg_end=os.getloadavg() if hasattr(os, "getloadavg") else None,
                command=shlex.join([sys.executable] + sys.argv))
    if backend.name == "cupy":
        info["gpu"] = backend.xp.cuda.runtime.getDeviceProperties(0)["name"].decode()
        info["cupy"] = backend.xp.__version__
    return info


def write_json(path, obj):
    path = os.path.abspath(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".bench_sae.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(obj, fh, indent=2)
    os.replace(tmp, path)


def main(args):
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None  # 1, 5, 15 min
    try:
        backend = Backend(args.backend)
    except RuntimeError as e:  # CuPy or CUDA torch missing: say so, without a traceback
        sys.exit(f"bench_sae.py: error: {e}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    B, D, M = args.batch, args.d_in, args.d_sae
    floor = make_floor(backend, B, D, M, args.seed)
    variants = {name: setup_variant(name, backend, args) for name in args.variants}

    samples = {name: {"floor": [], "minisae": [], "torch": []} for name in variants}
    kinds = ["floor", "minisae", "torch"]
    for r in range(args.warmup + args.repeats):
        for name, v in variants.items():
            fns = {"floor": floor, "minisae": v["run_minisae"], "torch": v["run_torch"]}
            for kind in kinds[r % 3:] + kinds[:r % 3]:  # rotate the order every round
                dt = timed(fns[kind], backend, args.pause)
                if r >= args.warmup:
                    samples[name][kind].append(dt)

    info = machine_info(backend)
    print(f"# SAE step benchmark (float32, backend {backend.name})\n\n- command: "
          f"`{info['command']}`\n- date: {info['date']}")
    print(f"- machine: {info['cpu']}, {info['cores']} cores"
          + (f", GPU {info['gpu']}" if "gpu" in info else "")
          + (f"; load average at start {load0[0]:.2f}, at end {info['loadavg_end'][0]:.2f}"
             " (other processes share these cores when it exceeds 0)" if load0 else ""))
    print(f"- numpy {info['numpy']} ({info['numpy_blas']}), BLAS threads "
          f"{info['numpy_blas_threads']}; torch {info['torch']}, threads {info['torch_threads']}")
    print(f"- B={B}, D={D}, M={M}; median of {args.repeats} interleaved rounds after "
          f"{args.warmup} warm-up, {args.pause:g} s pause before each call; minisae path={args.path}")
    for name, v in variants.items():
        worst = max(v["check"].values())
        print(f"- {name}: {v['note']}; measured L0 = {v['l0']:.1f} ({100 * v['l0'] / M:.2f}% of M;"
              f" torch {v['torch_l0']:.1f}); minisae vs torch max rel. diff over loss and "
              f"grads {worst:.1e}" + ("  WARNING: the two disagree" if worst > 1e-3 else ""))
    print("\n| variant | minisae ms | torch ms | floor ms | minisae/floor | torch/floor |"
          " minisae vs torch speedup |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = {}
    for name in variants:
        med = {k: 1e3 * float(np.median(s)) for k, s in samples[name].items()}
        best = {k: 1e3 * float(np.min(s)) for k, s in samples[name].items()}
        rows[name] = dict(med_ms=med, min_ms=best,
                          min_ratios=dict(minisae_over_floor=best["minisae"] / best["floor"],
                                          torch_over_floor=best["torch"] / best["floor"]),
                          samples_ms={k: [1e3 * t for t in s] for k, s in samples[name].items()},
                          minisae_over_floor=med["minisae"] / med["floor"],
                          torch_over_floor=med["torch"] / med["floor"],
                          speedup_vs_torch=med["torch"] / med["minisae"],
                          l0=variants[name]["l0"], note=variants[name]["note"],
                          check_rel_err=variants[name]["check"])
        r = rows[name]
        print(f"| {name} | {med['minisae']:.1f} | {med['torch']:.1f} | {med['floor']:.1f} | "
              f"{r['minisae_over_floor']:.2f} | {r['torch_over_floor']:.2f} | "
              f"{r['speedup_vs_torch']:.2f}x |")
    print("\nbest of the rounds (least disturbed): " + "; ".join(
        f"{n} minisae/floor {r['min_ratios']['minisae_over_floor']:.2f}, torch/floor "
        f"{r['min_ratios']['torch_over_floor']:.2f}" for n, r in rows.items()))
    verdict, r = None, rows.get("jumprelu")
    if r is not None:
        ok, fast = r["minisae_over_floor"] <= 1.3, r["speedup_vs_torch"] > 1.0
        at_issue_sizes = (B, D, M) == (2048, 512, 8192)
        verdict = dict(within_1_3x_floor=ok, beats_torch=fast, issue_sizes=at_issue_sizes)
        where = "" if at_issue_sizes else "; stated at B=2048, D=512, M=8192"
        print(f"\nrequirement (jumprelu{where}): minisae/floor = {r['minisae_over_floor']:.2f} "
              f"({'PASS' if ok else 'FAIL'}, limit 1.30); faster than torch: "
              f"{'PASS' if fast else 'FAIL'} ({r['speedup_vs_torch']:.2f}x)")
    if args.profile:
        for name, v in variants.items():
            profile_variant(name, v, backend, rows[name]["med_ms"]["floor"])
    if args.json:
        write_json(args.json, dict(info=info, args=vars(args), results=rows, verdict=verdict))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
