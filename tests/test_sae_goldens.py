"""minisae's three SAE losses against goldens from an independent PyTorch implementation.

The golden files in tests/golden/ were written by reference/sae_goldens.py (float64 PyTorch,
autograd for true gradients, autograd.Function for the pseudo-derivatives). This test reads them
with NumPy only (no torch), runs minisae.sae.<variant>.forward / backward / loss_and_grads on the
stored params and hypers, and compares the loss, its terms, f, xhat and every gradient:
in float64 to GOLDEN64_RTOL/ATOL, and a float32 run of minisae to F32_RTOL/ATOL. On a mismatch
it prints, llm.c-style, the first few (minisae, golden) pairs and the largest difference.

Regenerate the goldens (needs torch): python reference/sae_goldens.py
"""

import importlib
import pathlib

import numpy
import pytest
from helpers import assert_close
from tolerances import F32_ATOL, F32_RTOL, GOLDEN64_ATOL, GOLDEN64_RTOL

from minisae.xp import asarray, to_numpy

GOLDEN_DIR = pathlib.Path(__file__).parent / "golden"

# variant -> (golden file, the loss terms `forward` reports besides loss/f/xhat, unscaled)
VARIANTS = {
    "jumprelu": ("sae_jumprelu.npz", ("mse", "l0")),
    "gated": ("sae_gated.npz", ("mse", "l1", "aux")),
    "topk": ("sae_topk.npz", ("mse", "aux")),
}


def _load(variant):
    path = GOLDEN_DIR / VARIANTS[variant][0]
    with numpy.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _cases():
    out = []
    for variant in VARIANTS:
        for case in _load(variant)["cases"]:
            out.append(pytest.param(variant, str(case), id=f"{variant}-{case}"))
    return out


CASES = _cases()


def golden_case(variant, case):
    """(x, params, hyper, expected) for one case; params/grads named as in the golden file."""
    data = _load(variant)
    prefix = case + "__"
    g = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
    names = [k[len("grad_"):] for k in g if k.startswith("grad_")]
    params = {n: g[n] for n in names}
    hyper = {}
    for k, v in g.items():
        if k.startswith("hyper_"):
            hyper[k[len("hyper_"):]] = v.item() if v.ndim == 0 else v  # Python scalars
    return g["x"], params, hyper, g


def _run_minisae(variant, case, xp, dtype, **extra):
    """forward + backward, and loss_and_grads (with `extra` keywords, e.g. path="sparse")."""
    mod = importlib.import_module(f"minisae.sae.{variant}")
    x, params, hyper, want = golden_case(variant, case)
    assert set(params) == set(mod.PARAM_NAMES), (
        f"{variant}: golden params {sorted(params)} vs minisae PARAM_NAMES {sorted(mod.PARAM_NAMES)}")
    xs = asarray(x, xp, dtype=dtype)
    ps = {n: asarray(params[n], xp, dtype=dtype) for n in mod.PARAM_NAMES}
    hs = {k: (asarray(v, xp) if isinstance(v, numpy.ndarray) else v) for k, v in hyper.items()}
    before = {n: to_numpy(a).copy() for n, a in ps.items()} | {"x": to_numpy(xs).copy()}
    out, cache = mod.forward(ps, xs, **hs)
    grads_bw = mod.backward(ps, cache)
    loss, grads = mod.loss_and_grads(ps, xs, **hs, **extra)
    for n, a in [*ps.items(), ("x", xs)]:
        assert numpy.array_equal(to_numpy(a), before[n]), f"{variant}: {n} was modified in place"
    return mod, want, out, grads_bw, loss, grads


def _compare(variant, case, out, grads_bw, loss, grads, want, rtol, atol):
    tag = f"{variant}/{case}"
    assert_close(out["loss"], want["loss"], rtol, atol, f"{tag} forward loss")
    assert_close(loss, want["loss"], rtol, atol, f"{tag} loss_and_grads loss")
    for term in VARIANTS[variant][1]:
        assert term in out, f"{tag}: forward's out has no {term!r} (keys: {sorted(out)})"
        assert_close(out[term], want[term], rtol, atol, f"{tag} {term}")
    # L0 = mean number of non-zero latents per token (not stored for gated/topk: count golden f)
    l0 = want["l0"] if "l0" in want else numpy.mean(numpy.sum(want["f"] != 0, axis=1))
    assert_close(out["l0"], l0, rtol, atol, f"{tag} l0")
    assert_close(out["f"], want["f"], rtol, atol, f"{tag} f")
    assert_close(out["xhat"], want["xhat"], rtol, atol, f"{tag} xhat")
    for source, gs in (("backward", grads_bw), ("loss_and_grads", grads)):
        expected = sorted(k[len("grad_"):] for k in want if k.startswith("grad_"))
        assert sorted(gs) == expected, f"{tag} {source}: gradient keys {sorted(gs)}, expected {expected}"
        for n in expected:
            assert_close(gs[n], want["grad_" + n], rtol, atol, f"{tag} {source} d{n}")


@pytest.mark.parametrize("variant, case", CASES)
def test_golden_float64(variant, case, xp):
    mod, want, out, grads_bw, loss, grads = _run_minisae(variant, case, xp, "float64")
    _compare(variant, case, out, grads_bw, loss, grads, want, GOLDEN64_RTOL, GOLDEN64_ATOL)


@pytest.mark.parametrize("variant, case", CASES)
def test_golden_float32(variant, case, xp):
    mod, want, out, grads_bw, loss, grads = _run_minisae(variant, case, xp, "float32")
    for name, arr in [("loss", out["loss"]), ("f", out["f"]), ("xhat", out["xhat"])] + [
            ("d" + n, g) for n, g in grads.items()]:
        assert arr.dtype == numpy.float32, f"{variant}/{case} {name}: expected float32, found {arr.dtype}"
    _compare(variant, case, out, grads_bw, loss, grads, want, F32_RTOL, F32_ATOL)


JUMPRELU_CASES = [p for p in CASES if p.values[0] == "jumprelu"]


@pytest.mark.parametrize("variant, case", JUMPRELU_CASES)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_golden_jumprelu_sparse_path(variant, case, dtype):
    """loss_and_grads' row-sparse NumPy path (taken automatically when few latents are active or
    in the kernel window) forced on the golden cases, which are too dense to select it."""
    mod, want, out, grads_bw, loss, grads = _run_minisae(variant, case, numpy, dtype,
                                                         path="sparse")
    rtol, atol = (GOLDEN64_RTOL, GOLDEN64_ATOL) if dtype == "float64" else (F32_RTOL, F32_ATOL)
    _compare(variant, case, out, grads_bw, loss, grads, want, rtol, atol)


# ----------------------------------------------------------------------------------------------
# the goldens themselves: small, self-consistent, and exercising what they are meant to

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_golden_files_small(variant):
    size = (GOLDEN_DIR / VARIANTS[variant][0]).stat().st_size
    assert size < 200 * 1024, f"{VARIANTS[variant][0]}: {size} bytes, expected < 200 KB"


@pytest.mark.parametrize("variant, case", CASES)
def test_golden_terms_add_up(variant, case):
    _, _, hyper, g = golden_case(variant, case)
    if variant == "jumprelu":
        total = g["mse"] + hyper["sparsity_coeff"] * g["l0"]
        assert g["l0"] == numpy.mean(numpy.sum(g["f"] != 0, axis=1))
    elif variant == "gated":
        total = g["mse"] + hyper["sparsity_coeff"] * g["l1"] + g["aux"]
    else:
        total = g["mse"] + hyper["aux_coeff"] * g["aux"]
        assert (numpy.sum(g["f"] != 0, axis=1) <= hyper["k"]).all()
    numpy.testing.assert_allclose(g["loss"], total, rtol=1e-13)
    numpy.testing.assert_allclose(g["mse"], numpy.mean(numpy.sum((g["x"] - g["xhat"]) ** 2, 1)),
                                  rtol=1e-13)


@pytest.mark.parametrize("variant, case", CASES)
def test_golden_cases_exercise_the_pseudo_gradients(variant, case):
    _, params, hyper, g = golden_case(variant, case)
    if variant == "jumprelu":
        theta = numpy.exp(params["log_threshold"])
        inside = numpy.abs(g["pi"] - theta) < hyper["bandwidth"] / 2      # (B, M)
        assert inside.sum() >= 12, f"{case}: only {inside.sum()} pre-activations in the window"
        # a latent has a non-zero theta pseudo-gradient exactly when its window is occupied
        # (up to exact cancellation of the reconstruction and L0 parts, which has measure zero)
        assert ((g["grad_log_threshold"] != 0) == inside.any(axis=0)).all()
    elif variant == "gated":
        for n in ("r_mag", "b_gate", "b_mag"):
            assert numpy.abs(params[n]).min() > 0, f"{case}: {n} has zero entries"
        assert ((g["pi_gate"] > 0) & (g["pi_mag"] <= 0)).any()   # gate open, magnitude clipped
        assert ((g["pi_gate"] <= 0) & (g["pi_mag"] > 0)).any()   # gate shut, magnitude positive
    else:
        dead = hyper.get("dead_mask")
        if dead is None or not dead.any():
            assert g["aux"] == 0.0 and not g["z_aux"].any()
        else:
            assert g["aux"] > 0.0
            assert not g["z_aux"][:, ~dead].any()
            kk = min(hyper["aux_k"], int(dead.sum()))
            assert (numpy.sum(g["z_aux"] != 0, axis=1) <= kk).all()
            # a decoder row that the main top-k never uses learns only through AuxK
            aux_only = (g["z_aux"] != 0).any(axis=0) & ~(g["f"] != 0).any(axis=0)   # (M,)
            assert aux_only.any()
            assert (numpy.abs(g["grad_W_dec"][aux_only]).sum(axis=1) > 0).all()


def test_golden_jumprelu_covers_theta_below_half_eps():
    """One case has theta < eps/2: tokens with pi = ReLU(pre) = 0 then sit inside the window and
    vote in the theta pseudo-gradient (where the paper's ReLU-then-JumpReLU differs from
    applying the JumpReLU to the raw pre-activation)."""
    voting_zeros = 0
    for p in JUMPRELU_CASES:
        _, params, hyper, g = golden_case(*p.values)
        theta = numpy.exp(params["log_threshold"])
        voting_zeros += int(((g["pi"] == 0) & (numpy.abs(g["pi"] - theta) < hyper["bandwidth"] / 2)).sum())
    assert voting_zeros >= 10
