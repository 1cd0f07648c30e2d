"""The 2025-26 losses (JumpReLU quadratic / frequency / raw theta / Matryoshka; BatchTopK with AuxK and
Matryoshka) against goldens from an independent PyTorch float64 implementation
(reference/sae_goldens_recipes.py; regenerate with /work/refvenv/bin/python reference/sae_goldens_recipes.py).

Every case is run through forward + backward and through loss_and_grads on every path (dense, and
the row-sparse NumPy path), in float64 (GOLDEN64 tolerances) and float32 (F32 tolerances), and
every output term and gradient is compared; a mismatch prints the first pairs and the max difference.
"""

import numpy
import pytest
from helpers import assert_close
from test_sae_goldens import GOLDEN_DIR
from tolerances import F32_ATOL, F32_RTOL, GOLDEN64_ATOL, GOLDEN64_RTOL

from minisae.sae import batchtopk, jumprelu
from minisae.xp import asarray

FILES = {"jumprelu": ("sae_jumprelu_recipes.npz", jumprelu, ("mse", "matryoshka", "sparsity", "freq", "pre_act", "l0")),
         "batchtopk": ("sae_batchtopk.npz", batchtopk, ("mse", "matryoshka", "aux", "l0", "min_kept"))}


def _load(variant):
    with numpy.load(GOLDEN_DIR / FILES[variant][0], allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


CASES = [pytest.param(v, str(c), id=f"{v}-{c}") for v in FILES for c in _load(v)["cases"]]


def golden_case(variant, case):
    g = {k[len(case) + 2:]: v for k, v in _load(variant).items() if k.startswith(case + "__")}
    params = {k[len("grad_"):]: g[k[len("grad_"):]] for k in g if k.startswith("grad_")}
    hyper = {}
    for k, v in g.items():
        if k.startswith("hyper_"):
            name = k[len("hyper_"):]
            hyper[name] = tuple(int(m) for m in v) if name == "prefixes" else (v.item() if v.ndim == 0 else v)
    return g["x"], params, hyper, g


def _check(variant, case, xp, dtype, path):
    mod = FILES[variant][1]
    x, params, hyper, want = golden_case(variant, case)
    xs = asarray(x, xp, dtype)
    ps = {n: asarray(a, xp, dtype) for n, a in params.items()}
    hs = {k: (asarray(v, xp) if isinstance(v, numpy.ndarray) else v) for k, v in hyper.items()}
    rtol, atol = (GOLDEN64_RTOL, GOLDEN64_ATOL) if dtype == "float64" else (F32_RTOL, F32_ATOL)
    tag = f"{variant}/{case} {dtype} {path}"
    out, cache = mod.forward(ps, xs, **hs)
    grads_bw = mod.backward(ps, cache)
    fb_out, grads = mod.forward_backward(ps, xs, path=path, **hs)
    for source, o in (("forward", out), ("forward_backward", fb_out)):
        for term in ("loss", "f", "xhat") + FILES[variant][2]:
            assert_close(o[term], want[term], rtol, atol, f"{tag} {source} {term}")
    for source, gs in (("backward", grads_bw), ("forward_backward", grads)):
        assert sorted(gs) == sorted(params), f"{tag} {source}: keys {sorted(gs)}"
        for n in params:
            assert_close(gs[n], want["grad_" + n], rtol, atol, f"{tag} {source} d{n}")


@pytest.mark.parametrize("variant, case", CASES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_recipe_goldens(variant, case, dtype, xp):
    hyper = golden_case(variant, case)[2]
    saelens = hyper.get("penalty") == "tanh" or hyper.get("pre_act_coeff") or hyper.get("ste_to_input")
    paths = ["dense", "auto" if saelens else "sparse"] if xp is numpy else ["dense"]  # SAELens': dense only
    for path in paths:
        _check(variant, case, xp, dtype, path)


@pytest.mark.parametrize("variant, case", CASES)
def test_recipe_goldens_exercise_what_they_are_meant_to(variant, case):
    x, params, hyper, g = golden_case(variant, case)
    assert (GOLDEN_DIR / FILES[variant][0]).stat().st_size < 200 * 1024
    if variant == "jumprelu":
        raw = "threshold" in params
        theta = params["threshold"] if raw else numpy.exp(params["log_threshold"])
        window = numpy.abs(g["pi"] - theta) < hyper["bandwidth"] / 2
        assert window.sum() >= 12
        l0_b = (g["pi"] > theta).sum(axis=1)
        if hyper["penalty"] == "quadratic":  # tokens on both sides of the target
            assert (l0_b < hyper["target_l0"]).any() and (l0_b > hyper["target_l0"]).any()
        if hyper.get("pre_act_coeff"):  # dead latents below their threshold: the loss acts
            assert g["pre_act"] > 0
        if hyper.get("freq_coeff", 0.0):  # some latent above the frequency target
            assert ((g["pi"] > theta).mean(axis=0) > hyper["freq_target"]).any() and g["freq"] > 0
    else:
        n = int(numpy.floor(hyper["k"] * x.shape[0]))
        nz = numpy.count_nonzero(g["f"], axis=1)
        assert nz.sum() <= n and nz.min() != nz.max()  # a batch selection, not k per token
        if "dead_mask" in hyper:
            assert g["aux"] > 0
    if "prefixes" in hyper:
        assert g["matryoshka"] > 0
