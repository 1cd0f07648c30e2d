"""SAE invariants as properties: TopK sparsity and gradient routing, JumpReLU's zero region, the
Gated = JumpReLU equivalence, the API contract (keys, shapes, dtypes), float32 vs float64, the
JumpReLU sparse path vs the plain one, the row-sparse kernels vs dense products, init, the
geometric median, and NumPy vs CuPy.
"""

import math
from unittest import mock

import numpy
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from minisae import threads
from minisae.sae import VARIANTS, auxk, common, gated, get_variant, jumprelu, sparse, topk
from minisae.xp import asarray, cupy_available, get_xp, to_numpy
from helpers import HSETTINGS, assert_close, problem, seeds, shapes, to_xp
from tolerances import KINK_MARGIN
from tolerances import F32_ATOL, F32_RTOL, GOLDEN64_ATOL, XP32_RTOL, XP64_RTOL

HYPER = {"jumprelu": dict(sparsity_coeff=0.7, bandwidth=0.3),
         "gated": dict(sparsity_coeff=0.7),
         "topk": dict(k=3, aux_k=2, aux_coeff=0.5),
         "batchtopk": dict(k=3, aux_k=2, aux_coeff=0.5)}


def hyper_for(variant, M, xp, dead_host=None):
    h = dict(HYPER[variant])
    if variant in ("topk", "batchtopk"):
        h["k"] = min(h["k"], M)
        if dead_host is not None:
            h["dead_mask"] = asarray(dead_host, xp)
    return h


# ----------------------------------------------------------------------------------------------
# TopK


@HSETTINGS
@given(shape=shapes, seed=seeds, data=st.data())
def test_topk_keeps_at_most_k_and_routes_gradient_only_through_kept(xp, shape, seed, data):
    B, D, M = shape
    k = data.draw(st.integers(1, M), label="k")
    rng = numpy.random.default_rng(seed)
    p_host, x_host = problem("topk", rng, B, D, M)
    pi = (x_host - p_host["b_dec"]) @ p_host["W_enc"] + p_host["b_enc"]  # (B, M)
    s = -numpy.sort(-pi, axis=1)
    assume(k == M or numpy.all(s[:, k - 1] - s[:, k] > KINK_MARGIN))  # a unique top-k set
    params, x = to_xp(p_host, xp), asarray(x_host, xp, "float64")
    out, cache = topk.forward(params, x, k=k)
    z = to_numpy(out["f"])  # (B, M)
    assert numpy.all(numpy.count_nonzero(z, axis=1) <= k)
    assert numpy.all(z >= 0.0)
    kept = pi >= s[:, k - 1:k]  # (B, M) the top-k set of each row
    numpy.testing.assert_array_equal(z, numpy.where(kept, numpy.maximum(pi, 0.0), 0.0))
    numpy.testing.assert_array_equal(to_numpy(topk.encode(params, x, k=k)), z)
    grads = {n: to_numpy(g) for n, g in topk.backward(params, cache).items()}
    # a latent kept (with a positive value) in no row gets no gradient at all
    unused = ~numpy.any(kept & (pi > 0.0), axis=0)  # (M,)
    assert numpy.all(grads["b_enc"][unused] == 0.0)
    assert numpy.all(grads["W_enc"][:, unused] == 0.0)
    assert numpy.all(grads["W_dec"][unused] == 0.0)
    if B == 1:  # one token: dpi is b_enc's gradient, non-zero only on the kept set
        assert numpy.all(grads["b_enc"][~kept[0]] == 0.0)


def test_topk_aux_is_zero_without_dead_latents(xp):
    rng = numpy.random.default_rng(3)
    p_host, x_host = problem("topk", rng, 5, 4, 7)
    params, x = to_xp(p_host, xp), asarray(x_host, xp, "float64")
    none, _ = topk.forward(params, x, k=2)
    all_alive, _ = topk.forward(params, x, k=2, dead_mask=asarray(numpy.zeros(7, bool), xp))
    for out in (none, all_alive):
        assert float(out["aux"]) == 0.0 and float(out["loss"]) == float(out["mse"])
    some_dead, _ = topk.forward(params, x, k=2, dead_mask=asarray(numpy.arange(7) < 3, xp))
    assert float(some_dead["aux"]) > 0.0
    with pytest.raises(ValueError, match="dead_mask"):
        topk.forward(params, x, k=2, dead_mask=asarray(numpy.ones(6, bool), xp))
    with pytest.raises(ValueError, match="k an integer"):
        topk.forward(params, x, k=8)


# ----------------------------------------------------------------------------------------------
# JumpReLU and Gated


@HSETTINGS
@given(shape=shapes, seed=seeds, pre_enc_bias=st.booleans())
def test_jumprelu_output_is_zero_where_pi_at_or_below_theta(xp, shape, seed, pre_enc_bias):
    rng = numpy.random.default_rng(seed)
    p_host, x_host = problem("jumprelu", rng, *shape)
    # make some thresholds coincide with a pre-activation: H is strict, so those give 0
    x_c = x_host - p_host["b_dec"] if pre_enc_bias else x_host
    pi = numpy.maximum(x_c @ p_host["W_enc"] + p_host["b_enc"], 0.0)  # (B, M)
    log_pi0 = numpy.log(numpy.where(pi[0] > 0.0, pi[0], 1.0))  # (M,)
    p_host["log_threshold"] = numpy.where(pi[0] > 0.0, log_pi0, p_host["log_threshold"])
    params, x = to_xp(p_host, xp), asarray(x_host, xp, "float64")
    f = to_numpy(jumprelu.encode(params, x, pre_enc_bias=pre_enc_bias))  # (B, M)
    out, _ = jumprelu.forward(params, x, sparsity_coeff=0.1, pre_enc_bias=pre_enc_bias)
    x_c = x - params["b_dec"] if pre_enc_bias else x
    pi_m = numpy.maximum(to_numpy(x_c @ params["W_enc"] + params["b_enc"]), 0.0)  # (B, M)
    theta = numpy.exp(to_numpy(params["log_threshold"]))  # (M,)
    assert numpy.all(f[pi_m <= theta] == 0.0)
    numpy.testing.assert_array_equal(f[pi_m > theta], pi_m[pi_m > theta])
    numpy.testing.assert_array_equal(to_numpy(out["f"]), f)
    assert float(out["l0"]) == numpy.count_nonzero(pi_m > theta) / shape[0]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_jumprelu_heaviside_is_strict(xp, dtype):
    """Latents whose pre-activation equals theta exactly (zero encoder column, b_enc = theta)
    stay off on every path: H(0) = 0."""
    rng = numpy.random.default_rng(7)
    p_host, x_host = problem("jumprelu", rng, 6, 4, 10)
    p_host["W_enc"][:, :5] = 0.0
    params, x = to_xp(p_host, xp, dtype), asarray(x_host, xp, dtype)
    theta = xp.exp(params["log_threshold"])  # (M,) exactly as the module computes it
    params["b_enc"][:5] = theta[:5]  # pre = 0 + theta
    hyper = dict(sparsity_coeff=10.0, bandwidth=0.5)
    out, _ = jumprelu.forward(params, x, **hyper)
    f = to_numpy(out["f"])
    assert numpy.all(f[:, :5] == 0.0)
    assert float(out["l0"]) == numpy.count_nonzero(f) / 6
    paths = ["auto", "dense"] + (["sparse"] if xp is numpy else [])
    for path in paths:
        loss, _ = jumprelu.loss_and_grads(params, x, path=path, **hyper)
        assert_close(loss, out["loss"], F32_RTOL if dtype == "float32" else XP64_RTOL, 0.0, path)


@HSETTINGS
@given(shape=shapes, seed=seeds)
def test_gated_equals_jumprelu_with_folded_threshold(xp, shape, seed):
    """f_gated = JumpReLU_theta(pi_mag) with theta = b_mag - exp(r_mag) * b_gate (theta > 0)."""
    rng = numpy.random.default_rng(seed)
    p_host, x_host = problem("gated", rng, *shape)
    M = shape[2]
    s = numpy.exp(p_host["r_mag"])  # (M,)
    p_host["b_mag"] = s * p_host["b_gate"] + rng.uniform(0.05, 1.0, M)  # so that theta > 0
    theta = p_host["b_mag"] - s * p_host["b_gate"]  # (M,)
    pi_mag = (x_host - p_host["b_dec"]) @ (p_host["W_enc"] * s) + p_host["b_mag"]  # (B, M)
    assume(numpy.all(numpy.abs(pi_mag - theta) > KINK_MARGIN))
    j_host = {"W_enc": p_host["W_enc"] * s, "b_enc": p_host["b_mag"], "W_dec": p_host["W_dec"],
              "b_dec": p_host["b_dec"], "log_threshold": numpy.log(theta)}
    x = asarray(x_host, xp, "float64")
    f_gated = to_numpy(gated.encode(to_xp(p_host, xp), x))
    f_jump = to_numpy(jumprelu.encode(to_xp(j_host, xp), x, pre_enc_bias=True))
    assert numpy.array_equal(f_gated != 0.0, f_jump != 0.0)
    numpy.testing.assert_allclose(f_gated, f_jump, rtol=XP64_RTOL, atol=GOLDEN64_ATOL)


# ----------------------------------------------------------------------------------------------
# contract: keys, shapes, dtypes; float32 vs float64


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_outputs_and_grads_keep_keys_shapes_dtypes(xp, variant, dtype):
    module = get_variant(variant)
    params = module.init(5, 12, seed=1, xp=xp, dtype=dtype)
    assert tuple(params) == module.PARAM_NAMES and module.ARCHITECTURE == variant
    x = asarray(numpy.random.default_rng(0).standard_normal((4, 5)), xp, dtype)
    hyper = hyper_for(variant, 12, xp, numpy.arange(12) % 3 == 0)
    out, cache = module.forward(params, x, **hyper)
    for key in ("loss", "mse", "l0"):
        assert out[key].shape == () and out[key].dtype == dtype, key
    assert out["f"].shape == (4, 12) and out["f"].dtype == dtype
    assert out["xhat"].shape == (4, 5) and out["xhat"].dtype == dtype
    all_grads = [module.backward(params, cache), module.loss_and_grads(params, x, **hyper)[1]]
    paths = [{"path": "auto"}, {"path": "dense"}] + ([{"path": "sparse"}] if xp is numpy else [])
    tol = (F32_RTOL, F32_ATOL) if dtype == "float32" else (XP64_RTOL, GOLDEN64_ATOL)
    for path in paths:
        fb_out, fb_grads = module.forward_backward(params, x, **hyper, **path)
        assert set(fb_out) == set(out) | {"fired"}, path
        fired = xp.count_nonzero(out["f"], axis=0)  # (M,) tokens each latent fired on
        assert fb_out["fired"].dtype == numpy.int64 and bool((fb_out["fired"] == fired).all()), path
        for key in out:
            assert fb_out[key].shape == out[key].shape and fb_out[key].dtype == dtype, (path, key)
            assert_close(fb_out[key], out[key], *tol, f"forward_backward {path} out[{key!r}]")
        all_grads.append(fb_grads)
    for grads in all_grads:
        assert tuple(grads) == module.PARAM_NAMES
        for k in module.PARAM_NAMES:
            assert grads[k].shape == params[k].shape and grads[k].dtype == params[k].dtype, k
            assert isinstance(grads[k], type(params[k])), k
    encode_options = {n: hyper[n] for n in ("k", "pre_enc_bias") if n in hyper}  # the rest train only
    assert_close(module.encode(params, x, **encode_options), out["f"], 0, 0, "encode vs forward's f")
    assert_close(module.decode(params, out["f"]), out["xhat"], 0, 0, "decode vs forward's xhat")


def test_bad_inputs_name_what_was_expected(xp):
    params = jumprelu.init(5, 12, xp=xp, dtype="float64")
    with pytest.raises(ValueError, match=r"input x: expected shape \(B, 5\).*found \(4, 6\)"):
        jumprelu.forward(params, xp.zeros((4, 6)), sparsity_coeff=0.1)
    bad = dict(params, b_enc=xp.zeros(11))
    with pytest.raises(ValueError, match=r"params\['b_enc'\]: expected shape \(12,\)"):
        jumprelu.forward(bad, xp.zeros((4, 5)), sparsity_coeff=0.1)
    expected = r"gated params: .*missing \[.b_gate., .r_mag., .b_mag.\], unexpected \[.b_enc.\]"
    with pytest.raises(ValueError, match=expected):
        gated.forward({k: v for k, v in params.items() if k != "log_threshold"}, xp.zeros((4, 5)),
                      sparsity_coeff=0.1)
    with pytest.raises(ValueError, match="bandwidth > 0"):
        jumprelu.forward(params, xp.zeros((4, 5)), sparsity_coeff=0.1, bandwidth=0.0)
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        get_variant("relu")


@HSETTINGS
@given(variant=st.sampled_from(sorted(VARIANTS)), shape=shapes, seed=seeds)
def test_float32_matches_float64(xp, variant, shape, seed):
    B, D, M = shape
    rng = numpy.random.default_rng(seed)
    p_host, x_host = problem(variant, rng, B, D, M)
    dead = rng.random(M) < 0.5
    hyper = hyper_for(variant, M, xp, dead)
    # every discrete choice must be the same in both precisions: keep pre-activations clear
    x_c = x_host - p_host["b_dec"]  # (B, D)
    if variant == "jumprelu":
        pi = numpy.maximum(x_c @ p_host["W_enc"] + p_host["b_enc"], 0.0)  # (B, M)
        theta = numpy.exp(p_host["log_threshold"])
        for edge in (theta, theta - 0.5 * hyper["bandwidth"], theta + 0.5 * hyper["bandwidth"]):
            assume(numpy.all(numpy.abs(pi - edge) > KINK_MARGIN))
    elif variant == "gated":
        pre = x_c @ p_host["W_enc"]  # (B, M)
        assume(numpy.all(numpy.abs(pre + p_host["b_gate"]) > KINK_MARGIN))
        pi_mag = pre * numpy.exp(p_host["r_mag"]) + p_host["b_mag"]  # (B, M)
        assume(numpy.all(numpy.abs(pi_mag) > KINK_MARGIN))
    elif variant == "batchtopk":
        pi = x_c @ p_host["W_enc"] + p_host["b_enc"]  # (B, M)
        assume(numpy.all(numpy.abs(pi) > KINK_MARGIN))
        s = -numpy.sort(-pi.ravel())  # the global top-B*k gap
        n = B * hyper["k"]
        assume(n >= s.size or s[n - 1] - s[n] > KINK_MARGIN)
        dead_cols = numpy.flatnonzero(dead)
        s = -numpy.sort(-pi[:, dead_cols], axis=1)
        assume(hyper["aux_k"] >= len(dead_cols) or numpy.all(s[:, hyper["aux_k"] - 1] - s[:, hyper["aux_k"]] > KINK_MARGIN))
    else:
        pi = x_c @ p_host["W_enc"] + p_host["b_enc"]  # (B, M)
        assume(numpy.all(numpy.abs(pi) > KINK_MARGIN))
        for cols, kk in ((numpy.arange(M), hyper["k"]), (numpy.flatnonzero(dead), hyper["aux_k"])):
            s = -numpy.sort(-pi[:, cols], axis=1)
            assume(kk >= len(cols) or numpy.all(s[:, kk - 1] - s[:, kk] > KINK_MARGIN))
    module = get_variant(variant)
    results = {}
    for dtype in ("float64", "float32"):
        params, x = to_xp(p_host, xp, dtype), asarray(x_host, xp, dtype)
        loss, grads = module.loss_and_grads(params, x, **hyper)
        assert loss.dtype == dtype and all(g.dtype == dtype for g in grads.values())
        results[dtype] = (loss, grads)
    (l64, g64), (l32, g32) = results["float64"], results["float32"]
    assert_close(l32, l64, F32_RTOL, F32_ATOL, f"{variant} loss")
    for k in module.PARAM_NAMES:
        assert_close(g32[k], g64[k], F32_RTOL, F32_ATOL, f"{variant} grad {k}")


# ----------------------------------------------------------------------------------------------
# the sparse paths (JumpReLU, TopK) and the row-sparse kernels


def assert_paths_agree(module, p, x, hyper):
    """forward_backward's sparse path (out and grads) equals the plain forward + backward."""
    out_d, cache = module.forward(p, x, **hyper)
    g_dense = module.backward(p, cache)
    out_s, g_sparse = module.forward_backward(p, x, path="sparse", **hyper)
    assert set(out_s) == set(out_d) | {"fired"}
    numpy.testing.assert_array_equal(out_s["fired"], numpy.count_nonzero(out_d["f"], axis=0))
    for k in out_d:
        assert_close(out_s[k], out_d[k], XP64_RTOL, GOLDEN64_ATOL, f"out[{k!r}]")
    assert set(g_sparse) == set(g_dense) == set(p)
    for k in p:
        assert_close(g_sparse[k], g_dense[k], XP64_RTOL, GOLDEN64_ATOL, f"grad {k}")
    loss, grads = module.loss_and_grads(p, x, path="sparse", **hyper)
    assert float(loss) == float(out_s["loss"])
    for k in p:
        numpy.testing.assert_array_equal(grads[k], g_sparse[k])


@HSETTINGS
@given(B=st.integers(1, 24), D=st.integers(1, 8), M=st.integers(1, 40), seed=seeds,
       density=st.floats(0.0, 0.5), pre_enc_bias=st.booleans(), lam=st.floats(0.0, 1.0))
def test_jumprelu_sparse_path_equals_plain(B, D, M, seed, density, pre_enc_bias, lam):
    rng = numpy.random.default_rng(seed)
    p, x = problem("jumprelu", rng, B, D, M)
    x_c = x - p["b_dec"] if pre_enc_bias else x
    pi = numpy.maximum(x_c @ p["W_enc"] + p["b_enc"], 0.0)  # (B, M)
    bandwidth = 0.2
    # thresholds at the (1 - density) quantile, some inside the window of a token, and a few
    # below eps/2 (then every entry of that latent is stored, pi = 0 ones in the window)
    theta = numpy.quantile(pi, 1.0 - density, axis=0) + rng.uniform(-0.3, 0.3, M) * bandwidth
    theta = numpy.where(rng.random(M) < 0.15, 0.3 * bandwidth, numpy.maximum(theta, 1e-3))
    p["log_threshold"] = numpy.log(theta)
    hyper = dict(sparsity_coeff=lam, bandwidth=bandwidth, pre_enc_bias=pre_enc_bias)
    assert_paths_agree(jumprelu, p, x, hyper)
    p32 = {k: v.astype("float32") for k, v in p.items()}
    l32, g32 = jumprelu.loss_and_grads(p32, x.astype("float32"), path="sparse", **hyper)
    assert l32.dtype == numpy.float32 and all(g.dtype == numpy.float32 for g in g32.values())


@HSETTINGS
@given(B=st.integers(1, 24), D=st.integers(1, 8), M=st.integers(1, 40), seed=seeds, data=st.data(),
       aux_coeff=st.floats(0.0, 1.0))
def test_topk_sparse_path_equals_plain(B, D, M, seed, data, aux_coeff):
    k = data.draw(st.integers(1, M), label="k")
    aux_k = data.draw(st.integers(1, M), label="aux_k")
    rng = numpy.random.default_rng(seed)
    p, x = problem("topk", rng, B, D, M)
    dead = rng.random(M) < data.draw(st.floats(0.0, 1.0), label="dead fraction")
    # dead latents pushed negative: few AuxK entries, held sparse (auxk.sparse_step); none at 50
    p["b_enc"][dead] -= data.draw(st.sampled_from([0.0, 2.0, 50.0]), label="dead latents' shift")
    hyper = dict(k=k, aux_k=aux_k, aux_coeff=aux_coeff, dead_mask=dead)
    assert_paths_agree(topk, p, x, hyper)


@HSETTINGS
@given(B=st.integers(1, 24), D=st.integers(1, 8), M=st.integers(1, 40), seed=seeds,
       density=st.floats(0.0, 1.0), lam=st.floats(0.0, 1.0))
def test_gated_sparse_path_equals_plain(B, D, M, seed, density, lam):
    rng = numpy.random.default_rng(seed)
    p, x = problem("gated", rng, B, D, M)
    pre = (x - p["b_dec"]) @ p["W_enc"]  # (B, M)
    p["b_gate"] = -numpy.quantile(pre, 1.0 - density, axis=0)  # about density of gates open
    assert_paths_agree(gated, p, x, dict(sparsity_coeff=lam))


@HSETTINGS
@given(B=st.integers(1, 12), M=st.integers(1, 20), D=st.integers(1, 6), seed=seeds,
       density=st.floats(0.0, 1.0), n_threads=st.sampled_from([1, 3]))
def test_sparse_kernels_equal_dense_products(B, M, D, seed, density, n_threads):
    """Every implementation equals the dense products, on one thread and split into pieces on
    three (pieces of any size here, so that tiny matrices are split too)."""
    with mock.patch.object(threads, "threads", lambda: n_threads), \
            mock.patch.object(sparse, "MIN_PIECE_ENTRIES", 1):
        _check_sparse_kernels(B, M, D, seed, density)


def _check_sparse_kernels(B, M, D, seed, density):
    rng = numpy.random.default_rng(seed)
    mask = rng.random((B, M)) < density  # (B, M), empty rows and columns included
    A = numpy.where(mask, rng.standard_normal((B, M)), 0.0)  # (B, M)
    W, E = rng.standard_normal((M, D)), rng.standard_normal((B, D))  # (M, D), (B, D)
    E2 = rng.standard_normal((B, D + 1))  # (B, D + 1)
    rows, cols, rowptr, flat = sparse.sparse_from_mask(mask)
    numpy.testing.assert_array_equal(flat, numpy.flatnonzero(mask))
    vals = A.ravel()[flat]  # (N,)
    # entries_above: the same entries as the mask, with the values, from a threshold per column
    lo = rng.standard_normal(M)  # (M,)
    above = A > lo  # (B, M)
    got = sparse.entries_above(A, lo)
    for g, want in zip(got, sparse.sparse_from_mask(above) + (A[above],)):
        numpy.testing.assert_array_equal(g, want)
    n_above = int(above.sum())
    assert (sparse.entries_above(A, lo, max_entries=n_above) is None) is False
    assert n_above == 0 or sparse.entries_above(A, lo, max_entries=n_above - 1) is None
    # by_column: a stable sort of the entries by column
    order, rows_c, colptr = sparse.by_column(rows, cols, B, M)
    numpy.testing.assert_array_equal(order, numpy.argsort(cols, kind="stable"))
    numpy.testing.assert_array_equal(rows_c, rows[order])
    numpy.testing.assert_array_equal(colptr, numpy.searchsorted(cols[order], numpy.arange(M + 1)))
    tol = dict(rtol=XP64_RTOL, atol=GOLDEN64_ATOL)
    for dtype in ("float64", "float32"):  # every implementation, against the dense products
        v, W_, E_, E2_ = (a.astype(dtype) for a in (vals, W, E, E2))
        tol = dict(rtol=XP64_RTOL, atol=GOLDEN64_ATOL) if dtype == "float64" else dict(rtol=1e-5, atol=1e-5)
        for impl in (None,) + sparse.SPARSE_IMPLS:
            mm = sparse.sparse_matmul(rowptr, cols, v, W_, impl=impl)
            assert mm.dtype == dtype and mm.shape == (B, D)
            numpy.testing.assert_allclose(mm, A @ W, **tol, err_msg=str(impl))
            if impl != "scipy":
                sm = sparse.sampled_matmul(rowptr, cols, E_, W_, impl=impl)
                assert sm.dtype == dtype
                numpy.testing.assert_allclose(sm, (E @ W.T)[rows, cols], **tol, err_msg=str(impl))
                sm1, sm2 = sparse.sampled_matmul(rowptr, cols, [E_, 2 * E_], W_, impl=impl)
                numpy.testing.assert_allclose(sm1, sm, **tol, err_msg=str(impl))  # one result per E
                numpy.testing.assert_allclose(sm2, 2 * (E @ W.T)[rows, cols], **tol, err_msg=str(impl))
            out1, out2 = sparse.sparse_t_matmul(rows, cols, M, [(v, E_), (2 * v, E2_)], impl=impl)
            assert out1.dtype == out2.dtype == dtype and out1.shape == (M, D)
            numpy.testing.assert_allclose(out1, A.T @ E, **tol, err_msg=str(impl))
            numpy.testing.assert_allclose(out2, 2.0 * A.T @ E2, **tol, err_msg=str(impl))
            out1, out2 = sparse.sparse_t_matmul(rows, cols, M, [(v, E_), (2 * v, E2_)], impl=impl,
                                                transposed=(1,))  # E2.T @ A, C-ordered (D + 1, M)
            assert out2.shape == (D + 1, M) and out2.flags.c_contiguous and out2.dtype == dtype
            numpy.testing.assert_allclose(out1, A.T @ E, **tol, err_msg=str(impl))
            numpy.testing.assert_allclose(out2, 2.0 * E2.T @ A, **tol, err_msg=str(impl))
    with pytest.raises(ValueError, match="impl must be one of"):
        sparse.sparse_matmul(rowptr, cols, vals, W, impl="fast")
    numpy.testing.assert_allclose(sparse.column_sums(cols, vals, M, "float64"), A.sum(0), **tol)


def test_sparse_products_fall_back_to_numpy_without_optional_packages(monkeypatch):
    """Without SciPy and threadpoolctl the products choose the NumPy-only einsum loops, and
    asking for a missing one says what to install."""
    monkeypatch.setattr(sparse, "_optional", {"scipy": None})
    monkeypatch.setattr(threads, "_optional", {"threadpoolctl": None})
    assert sparse._pick(None, ("scipy", "blas1", "einsum"), "f") == "einsum"
    mask = numpy.eye(3, 4, dtype=bool)
    rows, cols, rowptr, _ = sparse.sparse_from_mask(mask)
    W = numpy.arange(8.0).reshape(4, 2)
    numpy.testing.assert_array_equal(sparse.sparse_matmul(rowptr, cols, numpy.ones(3), W), W[:3])
    with pytest.raises(ValueError, match=r"impl='scipy' needs SciPy \(pip install 'minisae\[fast\]'\)"):
        sparse.sparse_matmul(rowptr, cols, numpy.ones(3), W, impl="scipy")


# ----------------------------------------------------------------------------------------------
# init and the geometric median


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_init_follows_the_recipe(xp, variant):
    module = get_variant(variant)
    p = {k: to_numpy(v) for k, v in module.init(7, 30, seed=5, xp=xp, dtype="float64").items()}
    numpy.testing.assert_allclose(numpy.linalg.norm(p["W_dec"], axis=1), 1.0, rtol=1e-12)
    numpy.testing.assert_array_equal(p["W_enc"], p["W_dec"].T)
    for k in module.PARAM_NAMES:
        if k not in ("W_enc", "W_dec", "log_threshold"):
            assert numpy.all(p[k] == 0.0), k
    if variant == "jumprelu":
        numpy.testing.assert_allclose(numpy.exp(p["log_threshold"]), 0.001, rtol=1e-12)
    again = module.init(7, 30, seed=5, xp=numpy, dtype="float32")  # same draws on the host
    for k in module.PARAM_NAMES:
        numpy.testing.assert_array_equal(again[k], p[k].astype("float32"))
    assert not numpy.array_equal(module.init(7, 30, seed=6)["W_dec"], again["W_dec"])


def test_geometric_median(xp):
    rng = numpy.random.default_rng(0)
    # 1-D: the median of an odd sample
    one_d = rng.standard_normal((41, 1)) ** 3
    gm = to_numpy(common.geometric_median(asarray(one_d, xp), iters=2000, tol=1e-12))
    numpy.testing.assert_allclose(gm, numpy.median(one_d, axis=0), atol=1e-6)
    # D-dim: no better than small moves in any direction, and robust to a far outlier
    pts = rng.standard_normal((200, 5))
    pts[0] = 1e6
    gm = to_numpy(common.geometric_median(asarray(pts, xp), iters=500, tol=1e-12))

    def cost(y):
        return numpy.linalg.norm(pts - y, axis=1).sum()

    for d in numpy.vstack([numpy.eye(5), -numpy.eye(5)]):
        assert cost(gm) <= cost(gm + 1e-3 * d)
    assert numpy.linalg.norm(gm) < 1.0  # the mean would sit near 5000 * ones
    assert common.geometric_median(asarray(pts.astype("float32"), xp)).dtype == numpy.float32
    p = topk.init(5, 9, xp=xp, dtype="float32", sample=asarray(pts, xp))
    numpy.testing.assert_allclose(to_numpy(p["b_dec"]), gm, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# NumPy vs CuPy on the same inputs


@pytest.mark.gpu
@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("dtype, rtol", [("float64", XP64_RTOL), ("float32", XP32_RTOL)])
def test_numpy_and_cupy_agree(variant, dtype, rtol):
    if not cupy_available():
        pytest.skip("CuPy with a CUDA device is not available")
    cp = get_xp("cupy")
    module = get_variant(variant)
    rng = numpy.random.default_rng(11)
    p_host, x_host = problem(variant, rng, 64, 16, 96)
    dead = rng.random(96) < 0.3
    res = {}
    for xp in (numpy, cp):
        hyper = hyper_for(variant, 96, xp, dead)
        params, x = to_xp(p_host, xp, dtype), asarray(x_host, xp, dtype)
        res[xp.__name__] = module.loss_and_grads(params, x, **hyper)
    (ln, gn), (lc, gc) = res["numpy"], res["cupy"]
    atol = GOLDEN64_ATOL if dtype == "float64" else F32_ATOL
    assert_close(lc, ln, rtol, atol, f"{variant} loss")
    for k in module.PARAM_NAMES:
        assert_close(gc[k], gn[k], rtol, atol, f"{variant} {k}")
    assert math.isfinite(float(ln))


@HSETTINGS
@given(B=st.integers(1, 30), M=st.integers(1, 700), seed=seeds, data=st.data())
def test_top_k_equals_the_plain_rule_with_ties(B, M, seed, data):
    """common.top_k (threshold from a sample, exact fix-up) keeps exactly the entries of the
    stable-sort rule: the k largest, ties to the lowest columns; NaN never beats a number."""
    k = data.draw(st.integers(1, M), label="k")
    rng = numpy.random.default_rng(seed)
    levels = data.draw(st.sampled_from([0, 2, 5]), label="distinct values (0 = continuous)")
    a = rng.standard_normal((B, M)) if levels == 0 else rng.integers(0, levels, (B, M)) * 1.0
    if data.draw(st.booleans(), label="a few rows made hard for the sampled threshold"):
        a[:: 3, :: common.TOPK_SAMPLE_STRIDE] += 10.0  # the sample's top sits above the rest
    for dtype in ("float64", "float32"):
        x = a.astype(dtype)
        idx, vals = common.top_k(x, k)
        ref_idx, ref_vals = common.top_k_plain(x, k)
        numpy.testing.assert_array_equal(idx, ref_idx)
        numpy.testing.assert_array_equal(vals, ref_vals)
        assert vals.dtype == dtype
    with_nan = a.copy()
    with_nan[0, 0] = numpy.nan
    idx, _ = common.top_k(with_nan, k)
    assert idx.shape == (B, k) and (k == M or 0 not in idx[0])


@HSETTINGS
@given(B=st.integers(1, 30), M=st.integers(1, 300), seed=seeds, data=st.data())
def test_relu_top_k_equals_relu_of_the_selected_entries(B, M, seed, data):
    """auxk.relu_top_k (AuxK's z_aux: rows with at most k positive entries skip the selection)
    equals ReLU of common.top_k's entries scattered into zeros, with ties, zeros and NaN."""
    k = data.draw(st.integers(1, M), label="k")
    rng = numpy.random.default_rng(seed)
    levels = data.draw(st.sampled_from([0, 3, 6]), label="distinct values (0 = continuous)")
    a = rng.standard_normal((B, M)) if levels == 0 else rng.integers(-levels // 2, levels // 2 + 1, (B, M)) * 1.0
    a -= data.draw(st.sampled_from([0.0, 1.0, 2.5]), label="shift (fewer positive entries)")
    a[rng.random((B, M)) < 0.05] = numpy.nan
    for dtype in ("float64", "float32"):
        x = a.astype(dtype)
        idx, vals = common.top_k(x, k)  # NaN counts as -inf there, so it is never a kept positive
        ref = numpy.zeros_like(x)
        numpy.put_along_axis(ref, idx, numpy.maximum(numpy.nan_to_num(vals, nan=-numpy.inf), 0.0), axis=1)
        got = auxk.relu_top_k(x, k)
        numpy.testing.assert_array_equal(got, ref)
        assert got.dtype == dtype and got.flags.c_contiguous


@pytest.mark.parametrize("n_threads", [1, 3])
def test_top_k_large_rows_take_the_sampled_path(n_threads, monkeypatch):
    """The sampled path, on one thread and with the rows split over three (pieces of 3 rows)."""
    monkeypatch.setattr(threads, "threads", lambda: n_threads)
    monkeypatch.setattr(common, "TOPK_PIECE_ENTRIES", 3 * 4096)
    rng = numpy.random.default_rng(3)
    a = rng.standard_normal((40, 4096)).astype("float32")
    a[:, 100] = a[:, 7]  # a tie that can sit at the k-th place
    a[5] = numpy.round(a[5])  # a row full of ties
    for k in (1, 16, 64, 1024):  # 1024: too large for the sample, each piece on its whole rows
        idx, vals = common.top_k(a, k)
        ref_idx, ref_vals = common.top_k_plain(a, k)
        numpy.testing.assert_array_equal(idx, ref_idx)
        numpy.testing.assert_array_equal(vals, ref_vals)


@pytest.mark.parametrize("n_threads", [1, 3])
def test_sampled_product_with_k_entries_per_row_is_bitwise_the_row_loop(n_threads, monkeypatch):
    """TopK's pattern (every row holds k entries) takes the stacked product in blocks of rows:
    the same numbers as one BLAS call per row, for one E and for two."""
    from minisae import threads
    from minisae.sae import sparse

    if threads.blas_controller() is None:
        pytest.skip("needs threadpoolctl (impl 'blas1')")
    monkeypatch.setattr(threads, "threads", lambda: n_threads)
    monkeypatch.setattr(sparse, "SAMPLED_BLOCK", 3 * 4 * 37)  # 3 rows of k = 4 per block
    monkeypatch.setattr(sparse, "MIN_PIECE_ENTRIES", 8)  # several pieces
    rng = numpy.random.default_rng(3)
    B, M, D, k = 50, 40, 37, 4
    cols = numpy.argsort(rng.random((B, M)), axis=1)[:, :k].ravel()  # (B * k,) k latents a row
    rowptr = numpy.arange(B + 1) * k  # (B + 1,)
    W = rng.standard_normal((M, D), dtype=numpy.float32)  # (M, D)
    E = rng.standard_normal((B, D), dtype=numpy.float32)  # (B, D)
    want = sparse.sampled_matmul(rowptr, cols, E, W, impl="loop")
    numpy.testing.assert_array_equal(sparse.sampled_matmul(rowptr, cols, E, W, impl="blas1"), want)
    numpy.testing.assert_allclose(want, numpy.einsum("bkd,bd->bk", W[cols.reshape(B, k)], E).ravel(), rtol=1e-5, atol=1e-5)
    got = sparse.sampled_matmul(rowptr, cols, [E, 2 * E], W, impl="blas1")
    for g, w in zip(got, sparse.sampled_matmul(rowptr, cols, [E, 2 * E], W, impl="loop")):
        numpy.testing.assert_array_equal(g, w)
    # one entry a row and Fortran-ordered E's: their stack is strided, and takes the row loop
    one = numpy.arange(B + 1)  # (B + 1,)
    W64 = rng.standard_normal((M, 64), dtype=numpy.float32)  # (M, 64): a width where the sums differ
    Fs = [numpy.asfortranarray(rng.standard_normal((B, 64), dtype=numpy.float32)) for _ in range(2)]
    for g, w in zip(sparse.sampled_matmul(one, cols[:B], Fs, W64, impl="blas1"),
                    sparse.sampled_matmul(one, cols[:B], Fs, W64, impl="loop")):
        numpy.testing.assert_array_equal(g, w)
