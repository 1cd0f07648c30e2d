"""Independent PyTorch goldens for the three SAE losses of minisae.

Sources: JumpReLU, Rajamanoharan et al. 2024 (arXiv 2407.14435); Gated, Rajamanoharan et al.
2024 (arXiv 2404.16014); TopK with AuxK, Gao et al. 2024 (arXiv 2406.04093).

What this is
    A second implementation of the JumpReLU, Gated and TopK (with AuxK) training losses, written
    from the papers' equations alone (not from minisae/sae/*.py), in float64 PyTorch. True gradients
    come from autograd; the places where the forward has no useful derivative are written as
    `torch.autograd.Function` subclasses whose backward is the pseudo-derivative the papers prescribe:

      - JumpReLU: the jump z * H(z - theta) and the L0 step H(z - theta) pass their *true*
        derivative to z (H(z - theta) and 0) and the rectangle-kernel KDE pseudo-derivative to
        theta: -(theta/eps) K((z - theta)/eps) and -(1/eps) K((z - theta)/eps).
      - Gated: the Heaviside gate H(pi_gate) passes no gradient at all; the auxiliary
        reconstruction uses W_dec.detach() and b_dec.detach() (stop-gradient).
      - TopK: no custom function is needed: topk + scatter routes gradients to the kept entries
        only; the AuxK target e = (x - xhat).detach().

What it writes
    tests/golden/sae_jumprelu.npz, sae_gated.npz, sae_topk.npz (committed, each well under
    200 KB, read by tests/test_sae_goldens.py with NumPy only). Each file holds several cases;
    key names are "<case>__<name>":
        cases                      (C,) str   the case names in this file
        <case>__note               ()   str   what the case exercises
        <case>__x                  (B, D)     the input batch
        <case>__<param>            ...        every parameter under minisae's names
        <case>__hyper_<name>       ()  / (M,) every hyper-parameter (dead_mask is a bool (M,))
        <case>__<intermediate>     ...        pre-activations, f, xhat, ... (see each builder)
        <case>__loss, __mse, ...   ()         the loss and its (unscaled) terms
        <case>__grad_<param>       ...        d loss / d param (pseudo-gradients where noted above)

    Inputs are arranged to keep every kink at a safe distance (|pre| at ReLUs, |pi - theta| and
    the kernel edges |pi - theta| = eps/2, top-k gaps), so that a float32 run of the same math
    makes the same discrete choices, and so that the JumpReLU kernel window holds several
    pre-activations (non-trivial theta pseudo-gradients).

    Cases: JumpReLU eps = 0.05 with and without the pre-encoder bias, eps = 0.001 (the paper's),
    and eps = 0.05 with thresholds below eps/2 (tokens with pi = 0 inside the window); Gated
    with non-zero r_mag, b_gate, b_mag at two lambdas; TopK with no dead latents (mask None and
    all False), aux_k < #dead and aux_k > #dead. Decoder rows have norms in [0.6, 1.4], so an
    implementation that assumes unit rows fails.

Self-check before anything is written (`_self_check`): central differences for every true
gradient (of the loss with its stop-gradient quantities held at the base point), and the
JumpReLU theta pseudo-gradient against its closed form (arXiv 2407.14435):
    dL/dtheta_i = (1/(B eps)) sum_b [2 theta_i d_i.(x_b - xhat_b) - lambda] K((pi_bi - theta_i)/eps),
    dL/dlog theta_i = theta_i dL/dtheta_i   (d_i = row i of W_dec, K the rectangle kernel).

Rerun (from the repository root; deterministic, overwrites the three files atomically):
    /work/venvs/ref/bin/python reference/sae_goldens.py            # or any python with torch
    /work/venvs/ref/bin/python reference/sae_goldens.py --out DIR  # write elsewhere
"""

import argparse
import os
import pathlib
import tempfile

import numpy as np
import torch

# B tokens in the batch, D input width, M latents. Small on purpose: the files are committed.
B, D, M = 16, 8, 24
DT = torch.float64


# ----------------------------------------------------------------------------------------------
# pseudo-derivative building blocks

def rect(u):
    """Rectangle kernel K(u) = 1 on the open interval (-1/2, 1/2), else 0."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLU(torch.autograd.Function):
    """y = z * H(z - theta), H strict. Backward (not the derivative of the forward in theta):
    dy/dz = H(z - theta) (no straight-through), dy/dtheta := -(theta/eps) K((z - theta)/eps)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, gy):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        gz = gy * (z > theta).to(z.dtype)
        gtheta = (gy * (-(theta / eps)) * rect((z - theta) / eps)).sum(dim=0)
        return gz, gtheta, None


class Step(torch.autograd.Function):
    """y = H(z - theta). Backward: nothing to z, dy/dtheta := -(1/eps) K((z - theta)/eps)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, gy):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        gtheta = (gy * (-1.0 / eps) * rect((z - theta) / eps)).sum(dim=0)
        return torch.zeros_like(z), gtheta, None


class Gate(torch.autograd.Function):
    """y = H(z) (strict). Backward passes no gradient (the Gated SAE's Heaviside)."""

    @staticmethod
    def forward(ctx, z):
        return (z > 0).to(z.dtype)

    @staticmethod
    def backward(ctx, gy):
        return torch.zeros_like(gy)


def sq_err(a, b):
    """mean over the batch of the squared error summed over dimensions."""
    return ((a - b) ** 2).sum(dim=1).mean()


# ----------------------------------------------------------------------------------------------
# the three losses, from the papers (arXiv 2407.14435, 2404.16014, 2406.04093)

def jumprelu_loss(p, x, *, sparsity_coeff, bandwidth, pre_enc_bias):
    xc = x - p["b_dec"] if pre_enc_bias else x                       # (B, D)
    pre = xc @ p["W_enc"] + p["b_enc"]                               # (B, M)
    pi = torch.relu(pre)                                             # (B, M)
    theta = torch.exp(p["log_threshold"])                            # (M,)
    f = JumpReLU.apply(pi, theta, bandwidth)                         # (B, M)
    xhat = f @ p["W_dec"] + p["b_dec"]                               # (B, D)
    mse = sq_err(x, xhat)
    l0 = Step.apply(pi, theta, bandwidth).sum(dim=1).mean()
    loss = mse + sparsity_coeff * l0
    inter = dict(pre=pre, pi=pi, theta=theta, f=f, xhat=xhat)
    return loss, dict(mse=mse, l0=l0), inter


def gated_loss(p, x, *, sparsity_coeff, frozen=None):
    """`frozen` (self-check only): params whose values the stop-gradient places take."""
    sg = p if frozen is None else frozen
    xc = x - p["b_dec"]                                              # (B, D)
    pi_gate = xc @ p["W_enc"] + p["b_gate"]                          # (B, M)
    W_mag = p["W_enc"] * torch.exp(p["r_mag"])                       # (D, M) column scaling
    pi_mag = xc @ W_mag + p["b_mag"]                                 # (B, M)
    f = Gate.apply(pi_gate) * torch.relu(pi_mag)                     # (B, M)
    xhat = f @ p["W_dec"] + p["b_dec"]                               # (B, D)
    mse = sq_err(x, xhat)
    gate_act = torch.relu(pi_gate)                                   # (B, M)
    l1 = gate_act.sum(dim=1).mean()
    xhat_frozen = gate_act @ sg["W_dec"].detach() + sg["b_dec"].detach()  # (B, D)
    aux = sq_err(x, xhat_frozen)
    loss = mse + sparsity_coeff * l1 + aux
    inter = dict(pi_gate=pi_gate, pi_mag=pi_mag, f=f, xhat=xhat, xhat_frozen=xhat_frozen)
    return loss, dict(mse=mse, l1=l1, aux=aux), inter


def topk_loss(p, x, *, k, aux_k, aux_coeff, dead_mask=None, frozen=None):
    """`frozen` (self-check only): params at which the stop-gradient target e is evaluated."""
    pi = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]                  # (B, M)
    vals, idx = torch.topk(pi, k, dim=1)                             # (B, k)
    z = torch.zeros_like(pi).scatter(1, idx, torch.relu(vals))       # (B, M)
    xhat = z @ p["W_dec"] + p["b_dec"]                               # (B, D)
    mse = sq_err(x, xhat)
    inter = dict(pi=pi, f=z, xhat=xhat)
    n_dead = 0 if dead_mask is None else int(dead_mask.sum())
    if n_dead == 0:
        aux = torch.zeros((), dtype=x.dtype)
        inter["z_aux"] = torch.zeros_like(pi)
    else:
        dead_idx = torch.nonzero(torch.as_tensor(dead_mask)).squeeze(1)  # (Nd,)
        e = (x - xhat).detach()                                      # (B, D) target, no gradient
        if frozen is not None:
            _, _, at = topk_loss(frozen, x, k=k, aux_k=aux_k, aux_coeff=aux_coeff)
            e = (x - at["xhat"]).detach()
        pi_dead = pi[:, dead_idx]                                    # (B, Nd)
        kk = min(aux_k, n_dead)
        dvals, didx = torch.topk(pi_dead, kk, dim=1)                 # (B, kk)
        z_dead = torch.zeros_like(pi_dead).scatter(1, didx, torch.relu(dvals))  # (B, Nd)
        ehat = z_dead @ p["W_dec"][dead_idx]                         # (B, D), no bias
        aux = sq_err(e, ehat)
        z_aux = torch.zeros_like(pi)
        z_aux[:, dead_idx] = z_dead.detach()
        inter["z_aux"] = z_aux
        inter["ehat"] = ehat
    loss = mse + aux_coeff * aux
    return loss, dict(mse=mse, aux=aux), inter


# ----------------------------------------------------------------------------------------------
# case construction (NumPy draws, deterministic)

def _decoder(rng, m, d):
    """Random rows with norms in [0.6, 1.4]: non-unit on purpose, the losses must not assume it."""
    W = rng.standard_normal((m, d))
    W /= np.linalg.norm(W, axis=1, keepdims=True)
    return W * rng.uniform(0.6, 1.4, size=(m, 1))


def _inputs(rng, b, d):
    return rng.standard_normal((b, d)) / np.sqrt(d) * 1.5         # E||x||^2 ~ 2


def _jumprelu_case(seed, *, bandwidth, pre_enc_bias, sparsity_coeff, small_theta=False):
    """Params with theta placed so several pre-activations fall inside (theta +- eps/2).
    small_theta: every third theta in (0.1 eps, 0.4 eps), below eps/2, so that the tokens with
    pi = ReLU(pre) = 0 sit inside that latent's kernel window and vote for it."""
    margin = min(1e-4, bandwidth / 20)
    for attempt in range(1000):
        rng = np.random.default_rng([seed, attempt])
        x = _inputs(rng, B, D)
        W_dec = _decoder(rng, M, D)
        W_enc = W_dec.T * 0.8 + 0.3 * rng.standard_normal((D, M))
        b_enc = 0.1 * rng.standard_normal(M)
        b_dec = 0.2 * rng.standard_normal(D)
        xc = x - b_dec if pre_enc_bias else x
        pre = xc @ W_enc + b_enc
        pi = np.maximum(pre, 0.0)
        theta = np.empty(M)
        for i in range(M):
            pos = np.sort(pi[pi[:, i] > 0, i])
            if small_theta and i % 3 == 0:
                theta[i] = rng.uniform(0.1, 0.4) * bandwidth
            elif i % 4 == 3 or len(pos) == 0:
                theta[i] = np.exp(rng.uniform(np.log(0.05), np.log(1.0)))  # anywhere
            else:
                # near an observed pre-activation: at least that one is inside the window
                centre = pos[rng.integers(len(pos))]
                theta[i] = max(centre + rng.uniform(-0.4, 0.4) * bandwidth, 2 * bandwidth)
        u = pi - theta
        ok = (np.abs(pre).min() > margin and np.abs(u).min() > margin
              and np.abs(np.abs(u) - bandwidth / 2).min() > margin)
        n_window = int((np.abs(u) < bandwidth / 2).sum())
        if ok and n_window >= M // 2:
            break
    else:
        raise RuntimeError(f"jumprelu seed {seed}: no draw met the kink margins")
    params = dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, log_threshold=np.log(theta))
    hyper = dict(sparsity_coeff=sparsity_coeff, bandwidth=bandwidth, pre_enc_bias=pre_enc_bias)
    note = (f"eps={bandwidth}, pre_enc_bias={pre_enc_bias}, lambda={sparsity_coeff}, "
            f"{int((theta < bandwidth / 2).sum())} thresholds below eps/2; "
            f"{n_window} (b, i) pairs inside the kernel window; margin {margin:g} to every kink")
    return x, params, hyper, note


def _gated_case(seed, *, sparsity_coeff):
    margin = 1e-4
    for attempt in range(1000):
        rng = np.random.default_rng([seed, attempt])
        x = _inputs(rng, B, D)
        W_dec = _decoder(rng, M, D)
        W_enc = W_dec.T * 0.8 + 0.3 * rng.standard_normal((D, M))
        b_gate = 0.3 * rng.standard_normal(M)
        r_mag = 0.4 * rng.standard_normal(M)
        b_mag = 0.3 * rng.standard_normal(M)
        b_dec = 0.2 * rng.standard_normal(D)
        xc = x - b_dec
        pi_gate = xc @ W_enc + b_gate
        pi_mag = xc @ (W_enc * np.exp(r_mag)) + b_mag
        if min(np.abs(pi_gate).min(), np.abs(pi_mag).min()) > margin:
            break
    else:
        raise RuntimeError(f"gated seed {seed}: no draw met the kink margins")
    params = dict(W_enc=W_enc, b_gate=b_gate, r_mag=r_mag, b_mag=b_mag, W_dec=W_dec, b_dec=b_dec)
    both = int(((pi_gate > 0) & (pi_mag > 0)).sum())
    note = (f"lambda={sparsity_coeff}; non-zero r_mag, b_gate, b_mag; {both} of {B * M} entries "
            f"with both gate and magnitude positive; margin {margin:g} to every kink")
    return x, params, dict(sparsity_coeff=sparsity_coeff), note


def _topk_case(seed, *, k, aux_k, aux_coeff, n_dead, mask_given):
    margin = 1e-4

    def gap_ok(v, kk):  # k-th and (k+1)-th largest per row well apart, kept values away from 0
        s = -np.sort(-v, axis=1)
        kept_ok = np.abs(s[:, :kk]).min() > margin
        return kept_ok and (kk == v.shape[1] or (s[:, kk - 1] - s[:, kk]).min() > margin)

    for attempt in range(1000):
        rng = np.random.default_rng([seed, attempt])
        x = _inputs(rng, B, D)
        W_dec = _decoder(rng, M, D)
        W_enc = W_dec.T * 0.8 + 0.3 * rng.standard_normal((D, M))
        b_enc = 0.1 * rng.standard_normal(M)
        b_dec = 0.2 * rng.standard_normal(D)
        dead = np.zeros(M, dtype=bool)
        dead[rng.permutation(M)[:n_dead]] = True
        b_enc[dead] -= 0.5                                   # dead latents sit lower, often < 0
        pi = (x - b_dec) @ W_enc + b_enc
        ok = gap_ok(pi, k)
        if n_dead:
            ok = ok and gap_ok(pi[:, dead], min(aux_k, n_dead))
        if ok:
            break
    else:
        raise RuntimeError(f"topk seed {seed}: no draw met the kink margins")
    params = dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)
    hyper = dict(k=k, aux_k=aux_k, aux_coeff=aux_coeff)
    if mask_given:
        hyper["dead_mask"] = dead
    note = (f"k={k}, aux_k={aux_k}, aux_coeff={aux_coeff}, #dead={n_dead}, "
            f"dead_mask {'given' if mask_given else 'None'}; margin {margin:g} to every kink")
    return x, params, hyper, note


# ----------------------------------------------------------------------------------------------
# running a case through the torch reference

def _run(loss_fn, x, params, hyper, names):
    tp = {n: torch.tensor(params[n], dtype=DT, requires_grad=True) for n in names}
    tx = torch.tensor(x, dtype=DT)
    loss, terms, inter = loss_fn(tp, tx, **hyper)
    loss.backward()
    out = {"x": x, "loss": loss.detach().numpy()}
    for n in names:
        out[n] = params[n]
        out["grad_" + n] = tp[n].grad.numpy().copy()
    for k, v in hyper.items():
        out["hyper_" + k] = np.asarray(v)
    for k, v in terms.items():
        out[k] = v.detach().numpy()
    for k, v in inter.items():
        out[k] = v.detach().numpy()
    return out


JUMPRELU_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec", "log_threshold")
GATED_NAMES = ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec")
TOPK_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


def build():
    """{file name: {key: array}} for the three golden files."""
    files = {}

    cases = {
        "eps05_prebias": _jumprelu_case(11, bandwidth=0.05, pre_enc_bias=True, sparsity_coeff=0.3),
        "eps05_noprebias": _jumprelu_case(12, bandwidth=0.05, pre_enc_bias=False,
                                          sparsity_coeff=0.3),
        "eps001_prebias": _jumprelu_case(13, bandwidth=0.001, pre_enc_bias=True,
                                         sparsity_coeff=0.02),
        "eps05_smalltheta": _jumprelu_case(14, bandwidth=0.05, pre_enc_bias=True,
                                           sparsity_coeff=0.3, small_theta=True),
    }
    files["sae_jumprelu.npz"] = _collect(cases, jumprelu_loss, JUMPRELU_NAMES)

    cases = {
        "lam02": _gated_case(21, sparsity_coeff=0.2),
        "lam1": _gated_case(22, sparsity_coeff=1.0),
    }
    files["sae_gated.npz"] = _collect(cases, gated_loss, GATED_NAMES)

    cases = {
        "no_dead": _topk_case(31, k=4, aux_k=6, aux_coeff=1 / 32, n_dead=0, mask_given=False),
        "mask_all_alive": _topk_case(32, k=4, aux_k=6, aux_coeff=1 / 32, n_dead=0,
                                     mask_given=True),
        "auxk_lt_dead": _topk_case(33, k=5, aux_k=4, aux_coeff=0.25, n_dead=10, mask_given=True),
        "auxk_gt_dead": _topk_case(34, k=3, aux_k=8, aux_coeff=1 / 32, n_dead=5, mask_given=True),
    }
    files["sae_topk.npz"] = _collect(cases, topk_loss, TOPK_NAMES)
    return files


def _collect(cases, loss_fn, names):
    arrays = {"cases": np.array(list(cases), dtype=str)}
    for case, (x, params, hyper, note) in cases.items():
        arrays[f"{case}__note"] = np.array(note, dtype=str)
        out = _run(loss_fn, x, params, hyper, names)
        _self_check(case, loss_fn, out, params, hyper, names)
        for k, v in out.items():
            arrays[f"{case}__{k}"] = v
    return arrays


def _self_check(case, loss_fn, out, params, hyper, names, h=1e-6):
    """Before anything is written: central differences for every true gradient, and for
    JumpReLU the theta pseudo-gradient against its closed form (module docstring)."""
    tx = torch.tensor(out["x"], dtype=DT)
    extra = {}
    if loss_fn is not jumprelu_loss:  # hold the stop-gradient quantities at the base point
        extra["frozen"] = {n: torch.tensor(params[n], dtype=DT) for n in names}

    def loss_at(p):
        tp = {n: torch.tensor(p[n], dtype=DT) for n in names}
        with torch.no_grad():
            return float(loss_fn(tp, tx, **hyper, **extra)[0])

    for n in names:
        if n == "log_threshold":
            continue  # piecewise constant in theta: checked against the closed form below
        fd = np.zeros_like(params[n])
        for j in np.ndindex(params[n].shape):
            plus = {m: params[m].copy() for m in names}
            minus = {m: params[m].copy() for m in names}
            plus[n][j] += h
            minus[n][j] -= h
            fd[j] = (loss_at(plus) - loss_at(minus)) / (2 * h)
        err = np.abs(fd - out["grad_" + n]).max()
        if not np.allclose(fd, out["grad_" + n], rtol=1e-5, atol=1e-7):
            raise AssertionError(f"{case}: finite differences disagree for {n}: max |diff| {err:g}")
    if "log_threshold" in names:
        eps, lam = hyper["bandwidth"], hyper["sparsity_coeff"]
        theta, pi = np.exp(params["log_threshold"]), out["pi"]
        r = out["x"] - out["xhat"]                                   # (B, D)
        dr = r @ params["W_dec"].T                                   # (B, M): d_i . r_b
        kern = (np.abs((pi - theta) / eps) < 0.5).astype(float)      # (B, M)
        dtheta = ((2 * theta * dr - lam) * kern).sum(0) / (pi.shape[0] * eps)
        if not np.allclose(theta * dtheta, out["grad_log_threshold"], rtol=1e-12, atol=1e-12):
            raise AssertionError(f"{case}: theta pseudo-gradient disagrees with the closed form")
        if np.count_nonzero(out["grad_log_threshold"]) < 6:
            raise AssertionError(f"{case}: too few latents with a non-zero theta pseudo-gradient")


def save_npz_atomic(path, arrays):
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, **arrays)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main():
    root = pathlib.Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(root / "tests" / "golden"), help="output folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name, arrays in build().items():
        path = pathlib.Path(args.out) / name
        save_npz_atomic(path, arrays)
        cases = ", ".join(str(c) for c in arrays["cases"])
        print(f"{path}: {path.stat().st_size / 1024:.1f} KB; cases {cases}")
        for c in arrays["cases"]:
            print(f"  {c}: loss {float(arrays[f'{c}__loss']):.6f}; {arrays[f'{c}__note']}")


if __name__ == "__main__":
    main()
