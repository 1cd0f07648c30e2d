"""Independent PyTorch goldens for the 2025-26 SAE losses of minisae: JumpReLU with Gemma Scope 2's
quadratic L0 penalty, the frequency penalty and raw thresholds; BatchTopK with AuxK; Matryoshka
prefixes on both.

Written from the specification (the papers' equations, as restated in minisae's derivation pages),
not from minisae/sae/*.py. float64 PyTorch; true gradients from autograd. The straight-through
pieces reuse reference/sae_goldens.py's `JumpReLU` and `Step` autograd functions (rectangle-kernel
pseudo-derivatives in theta, true derivative to the input), so every penalty here is written as a
plain function of the step's output and autograd applies the chain rule:

    quadratic:  l0_b = Step(pi, theta).sum(1);  S = mean_b lambda (2/L0*) (l0_b - L0*)^2
    frequency:  p_i  = Step(pi, theta).mean(0); F = mu * sum_i relu(p_i - tau)^2
    Matryoshka: sum_j mean_b ||x - (f[:, :m_j] @ W_dec[:m_j] + b_dec)||^2
    BatchTopK:  torch.topk over the flattened (B*M) pre-activations, ReLU on the kept values,
                AuxK per token on the dead latents against the detached full residual.

Raw theta: the parameter `threshold` enters the same functions directly (no exp).

Writes tests/golden/sae_jumprelu_recipes.npz and tests/golden/sae_batchtopk.npz (same layout as
reference/sae_goldens.py: "<case>__<name>" keys, `cases`, hypers as `hyper_<name>`, `grad_<param>`).
Before writing, every true gradient is checked by central differences (`_self_check`).

Rerun (from the repository root; deterministic):
    /work/refvenv/bin/python reference/sae_goldens_recipes.py [--out DIR]
"""

import argparse
import pathlib
import sys

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from sae_goldens import DT, JumpReLU, Step, _decoder, _inputs, save_npz_atomic, sq_err  # noqa: E402

B, D, M = 16, 8, 24


# ----------------------------------------------------------------------------------------------
# the losses

def recon(x, f, W_dec, b_dec, prefixes):
    """(sum over prefixes of the squared error, the full one's, the full reconstruction)."""
    sizes = list(prefixes) if prefixes else []
    if not sizes or sizes[-1] != f.shape[1]:
        sizes.append(f.shape[1])  # the full SAE is always the last prefix
    total = 0.0
    for m in sizes:
        xhat = f[:, :m] @ W_dec[:m] + b_dec
        total = total + sq_err(x, xhat)
    return total, sq_err(x, xhat), xhat


def _rect(u):
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUToInput(torch.autograd.Function):
    """y = z * H(z - theta); backward to z: H(z - theta) g + (theta/eps) K g (SAELens' STE to the
    input); to theta: -(theta/eps) K g."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        k = _rect((z - theta) / ctx.eps) * (theta / ctx.eps) * g
        return (z > theta).to(z.dtype) * g + k, -k.sum(dim=0), None


class StepToInput(torch.autograd.Function):
    """y = H(z - theta); backward to z: (1/eps) K g; to theta: -(1/eps) K g."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        k = _rect((z - theta) / ctx.eps) * g / ctx.eps
        return k, -k.sum(dim=0), None


def jumprelu_recipe_loss(p, x, *, sparsity_coeff, bandwidth, penalty, target_l0=None, freq_coeff=0.0,
                         freq_target=0.1, prefixes=None, tanh_scale=4.0, pre_act_coeff=0.0, dead_mask=None,
                         ste_to_input=False):
    xc = x - p["b_dec"]
    pre = xc @ p["W_enc"] + p["b_enc"]
    pi = torch.relu(pre)
    theta = p["threshold"] if "threshold" in p else torch.exp(p["log_threshold"])
    jump, step = (JumpReLUToInput, StepToInput) if ste_to_input else (JumpReLU, Step)
    f = jump.apply(pi, theta, bandwidth)
    a = step.apply(pi, theta, bandwidth)                              # (B, M) indicators
    l0_b = a.sum(dim=1)                                               # (B,)
    norms = p["W_dec"].norm(dim=1)                                    # (M,)
    if penalty == "l0":
        sparsity = sparsity_coeff * l0_b.mean()
    elif penalty == "tanh":
        sparsity = sparsity_coeff * torch.tanh(tanh_scale * f * norms).sum(dim=1).mean()
    else:
        sparsity = (sparsity_coeff * (2.0 / target_l0) * (l0_b - target_l0) ** 2).mean()
    freq = freq_coeff * (torch.relu(a.mean(dim=0) - freq_target) ** 2).sum()
    pre_act = torch.zeros((), dtype=x.dtype)
    if pre_act_coeff:
        dead = torch.as_tensor(dead_mask)
        pre_act = pre_act_coeff * (torch.relu(theta - pre)[:, dead] * norms[dead]).sum(dim=1).mean()
    total, mse, xhat = recon(x, f, p["W_dec"], p["b_dec"], prefixes)
    loss = total + sparsity + freq + pre_act
    terms = dict(mse=mse, matryoshka=total - mse, sparsity=sparsity, freq=freq, l0=l0_b.mean(), pre_act=pre_act)
    return loss, terms, dict(pi=pi, f=f, xhat=xhat)


def batchtopk_loss(p, x, *, k, aux_k, aux_coeff, dead_mask=None, prefixes=None, frozen=None):
    pi = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]                   # (B, M)
    n = int(np.floor(k * x.shape[0]))
    vals, idx = torch.topk(pi.reshape(-1), n)                         # the batch's n largest
    z = torch.zeros_like(pi).reshape(-1).scatter(0, idx, torch.relu(vals)).reshape(pi.shape)
    total, mse, xhat = recon(x, z, p["W_dec"], p["b_dec"], prefixes)
    aux = torch.zeros((), dtype=x.dtype)
    if dead_mask is not None and dead_mask.any():
        dead = torch.nonzero(torch.as_tensor(dead_mask)).squeeze(1)
        if frozen is not None:  # self-check: the stop-gradient target at the base point
            xhat_target = batchtopk_loss(frozen, x, k=k, aux_k=aux_k, aux_coeff=aux_coeff,
                                         prefixes=prefixes)[2]["xhat"]
        else:
            xhat_target = xhat
        e = (x - xhat_target).detach()
        pd = pi[:, dead]
        dv, di = torch.topk(pd, min(aux_k, len(dead)), dim=1)
        z_dead = torch.zeros_like(pd).scatter(1, di, torch.relu(dv))
        aux = sq_err(e, z_dead @ p["W_dec"][dead])
    loss = total + aux_coeff * aux
    kept = z[z > 0]
    terms = dict(mse=mse, matryoshka=total - mse, aux=aux, l0=(z != 0).sum(dim=1).to(x.dtype).mean(),
                 min_kept=kept.min() if kept.numel() else torch.tensor(float("nan"), dtype=x.dtype))
    return loss, terms, dict(pi=pi, f=z, xhat=xhat)


# ----------------------------------------------------------------------------------------------
# cases

def _jumprelu_case(seed, *, bandwidth, raw, hyper, small_b=False):
    """Thresholds placed near observed pre-activations so the kernel window holds many entries;
    every kink (ReLU, jump, window edges, the frequency penalty's p = tau) kept 1e-4 away."""
    margin = 1e-4
    for attempt in range(2000):
        rng = np.random.default_rng([seed, attempt])
        x = _inputs(rng, B, D)
        W_dec = _decoder(rng, M, D)
        W_enc = W_dec.T * 0.8 + 0.3 * rng.standard_normal((D, M))
        b_enc = 0.1 * rng.standard_normal(M)
        b_dec = 0.2 * rng.standard_normal(D)
        pre = (x - b_dec) @ W_enc + b_enc
        pi = np.maximum(pre, 0.0)
        theta = np.empty(M)
        for i in range(M):
            pos = np.sort(pi[pi[:, i] > 0, i])
            if i % 5 == 4 or len(pos) == 0:
                theta[i] = np.exp(rng.uniform(np.log(0.01), np.log(0.3)))  # low: a frequent latent
            else:
                theta[i] = max(pos[rng.integers(len(pos))] + rng.uniform(-0.4, 0.4) * bandwidth,
                               2 * bandwidth)
        u = pi - theta
        ok = (np.abs(pre).min() > margin and np.abs(u).min() > margin
              and np.abs(np.abs(u) - bandwidth / 2).min() > margin)
        if hyper.get("freq_coeff", 0.0):
            p_i = (pi > theta).mean(axis=0)
            ok = ok and np.abs(p_i - hyper["freq_target"]).min() > margin and (p_i > hyper["freq_target"]).any()
        if hyper.get("pre_act_coeff"):
            ok = ok and np.abs(pre - theta).min() > margin
        if hyper.get("penalty") == "quadratic":
            l0_b = (pi > theta).sum(axis=1)
            ok = ok and (l0_b < hyper["target_l0"]).any() and (l0_b > hyper["target_l0"]).any()
        if ok and int((np.abs(u) < bandwidth / 2).sum()) >= M // 2:
            break
    else:
        raise RuntimeError(f"jumprelu recipe seed {seed}: no draw met the conditions")
    params = dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)
    params["threshold" if raw else "log_threshold"] = theta if raw else np.log(theta)
    if hyper.get("pre_act_coeff"):
        hyper["dead_mask"] = np.arange(M) % 3 == 0
    hyper = dict(sparsity_coeff=hyper.pop("sparsity_coeff"), bandwidth=bandwidth, **hyper)
    note = (f"raw={raw}, {hyper}; {int((np.abs(u) < bandwidth / 2).sum())} window entries; "
            f"L0 per token {int((pi > theta).sum(1).min())}..{int((pi > theta).sum(1).max())}")
    return x, params, hyper, note


def _batchtopk_case(seed, *, k, aux_k, aux_coeff, n_dead, prefixes=None):
    margin = 1e-4
    for attempt in range(2000):
        rng = np.random.default_rng([seed, attempt])
        x = _inputs(rng, B, D)
        W_dec = _decoder(rng, M, D)
        W_enc = W_dec.T * 0.8 + 0.3 * rng.standard_normal((D, M))
        b_enc = 0.1 * rng.standard_normal(M)
        b_dec = 0.2 * rng.standard_normal(D)
        dead = np.zeros(M, dtype=bool)
        dead[rng.permutation(M)[:n_dead]] = True
        b_enc[dead] -= 0.5
        pi = (x - b_dec) @ W_enc + b_enc
        s = -np.sort(-pi.ravel())
        n = int(np.floor(k * B))
        ok = s[n - 1] - s[n] > margin and np.abs(pi).min() > margin
        if n_dead:
            sd = -np.sort(-pi[:, dead], axis=1)
            kk = min(aux_k, n_dead)
            ok = ok and (kk == n_dead or (sd[:, kk - 1] - sd[:, kk]).min() > margin)
        counts = ((pi >= s[n - 1]) & (pi > 0)).sum(axis=1)
        ok = ok and counts.min() != counts.max()  # tokens with different L0: a batch selection
        if ok:
            break
    else:
        raise RuntimeError(f"batchtopk seed {seed}: no draw met the kink margins")
    params = dict(W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec)
    hyper = dict(k=k, aux_k=aux_k, aux_coeff=aux_coeff)
    if n_dead:
        hyper["dead_mask"] = dead
    if prefixes is not None:
        hyper["prefixes"] = np.asarray(prefixes)
    note = f"k={k}, aux_k={aux_k}, aux_coeff={aux_coeff}, #dead={n_dead}, prefixes={prefixes}"
    return x, params, hyper, note


# ----------------------------------------------------------------------------------------------
# running and checking

def _torch_hyper(hyper):
    return {k: (tuple(int(m) for m in v) if k == "prefixes" else v) for k, v in hyper.items()}


def _run(loss_fn, x, params, hyper):
    names = list(params)
    tp = {n: torch.tensor(params[n], dtype=DT, requires_grad=True) for n in names}
    tx = torch.tensor(x, dtype=DT)
    loss, terms, inter = loss_fn(tp, tx, **_torch_hyper(hyper))
    loss.backward()
    out = {"x": x, "loss": loss.detach().numpy()}
    for n in names:
        out[n] = params[n]
        out["grad_" + n] = tp[n].grad.numpy().copy()
    for k, v in hyper.items():
        out["hyper_" + k] = np.asarray(v)
    for k, v in {**terms, **inter}.items():
        out[k] = v.detach().numpy() if torch.is_tensor(v) else np.asarray(v)
    return out


def _self_check(case, loss_fn, out, params, hyper, h=1e-6):
    """Central differences of every true gradient (theta's are pseudo-gradients: skipped)."""
    names = list(params)
    tx = torch.tensor(out["x"], dtype=DT)
    extra = {}
    if loss_fn is batchtopk_loss:
        extra["frozen"] = {n: torch.tensor(params[n], dtype=DT) for n in names}

    def loss_at(p):
        with torch.no_grad():
            tp = {n: torch.tensor(p[n], dtype=DT) for n in names}
            return float(loss_fn(tp, tx, **_torch_hyper(hyper), **extra)[0])

    for n in names:
        if n in ("log_threshold", "threshold"):
            continue
        if hyper.get("ste_to_input") and n != "W_dec":
            continue  # the straight-through estimate reaches the encoder side: not a true gradient
        fd = np.zeros_like(params[n])
        for j in np.ndindex(params[n].shape):
            plus = {m: params[m].copy() for m in names}
            minus = {m: params[m].copy() for m in names}
            plus[n][j] += h
            minus[n][j] -= h
            fd[j] = (loss_at(plus) - loss_at(minus)) / (2 * h)
        if not np.allclose(fd, out["grad_" + n], rtol=1e-5, atol=1e-7):
            raise AssertionError(f"{case}: finite differences disagree for {n}: "
                                 f"max |diff| {np.abs(fd - out['grad_' + n]).max():g}")


def _collect(cases, loss_fn):
    arrays = {"cases": np.array(list(cases), dtype=str)}
    for case, (x, params, hyper, note) in cases.items():
        arrays[f"{case}__note"] = np.array(note, dtype=str)
        out = _run(loss_fn, x, params, hyper)
        _self_check(case, loss_fn, out, params, hyper)
        for k, v in out.items():
            arrays[f"{case}__{k}"] = v
    return arrays


def build():
    files = {}
    cases = {
        "quadratic_log": _jumprelu_case(41, bandwidth=0.05, raw=False,
                                        hyper=dict(sparsity_coeff=0.3, penalty="quadratic", target_l0=6.0)),
        "quadratic_raw_freq": _jumprelu_case(42, bandwidth=0.05, raw=True,
                                             hyper=dict(sparsity_coeff=0.2, penalty="quadratic", target_l0=5.0,
                                                        freq_coeff=2.0, freq_target=0.4)),
        "l0_freq_matryoshka": _jumprelu_case(43, bandwidth=0.05, raw=False,
                                             hyper=dict(sparsity_coeff=0.3, penalty="l0", freq_coeff=1.5,
                                                        freq_target=0.3, prefixes=np.array([4, 12]))),
        "quadratic_raw_matryoshka": _jumprelu_case(44, bandwidth=0.05, raw=True,
                                                   hyper=dict(sparsity_coeff=0.1, penalty="quadratic",
                                                              target_l0=4.0, prefixes=np.array([6, 24]))),
    }
    cases.update({  # SAELens' options
        "tanh_preact_raw": _jumprelu_case(45, bandwidth=0.05, raw=True,
                                          hyper=dict(sparsity_coeff=0.2, penalty="tanh", tanh_scale=2.0,
                                                     pre_act_coeff=0.3)),
        "tanh_ste_preact_log": _jumprelu_case(46, bandwidth=0.05, raw=False,
                                              hyper=dict(sparsity_coeff=0.2, penalty="tanh", tanh_scale=4.0,
                                                         pre_act_coeff=0.3, ste_to_input=True)),
        "quadratic_ste_freq": _jumprelu_case(47, bandwidth=0.05, raw=True,
                                             hyper=dict(sparsity_coeff=0.2, penalty="quadratic", target_l0=5.0,
                                                        freq_coeff=1.0, freq_target=0.4, ste_to_input=True)),
    })
    files["sae_jumprelu_recipes.npz"] = _collect(cases, jumprelu_recipe_loss)
    cases = {
        "no_dead": _batchtopk_case(51, k=4, aux_k=6, aux_coeff=1 / 32, n_dead=0),
        "auxk_dead": _batchtopk_case(52, k=3, aux_k=4, aux_coeff=0.25, n_dead=8),
        "fractional_k": _batchtopk_case(53, k=2.5, aux_k=8, aux_coeff=1 / 32, n_dead=5),
        "matryoshka_dead": _batchtopk_case(54, k=4, aux_k=3, aux_coeff=0.5, n_dead=6, prefixes=(3, 10, 24)),
    }
    files["sae_batchtopk.npz"] = _collect(cases, batchtopk_loss)
    return files


def main():
    root = pathlib.Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(root / "tests" / "golden"), help="output folder")
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name, arrays in build().items():
        path = pathlib.Path(args.out) / name
        save_npz_atomic(path, arrays)
        print(f"{path}: {path.stat().st_size / 1024:.1f} KB")
        for c in arrays["cases"]:
            print(f"  {c}: loss {float(arrays[f'{c}__loss']):.6f}; {arrays[f'{c}__note']}")


if __name__ == "__main__":
    main()
