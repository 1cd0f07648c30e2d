"""minisae.training.optim against hand computations: Adam steps, the decoder-gradient projection and
row renormalisation, and the learning-rate and sparsity-coefficient schedules."""

import math

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minisae import threads

from minisae.training import optim
from minisae.xp import asarray, to_numpy
from helpers import HSETTINGS, seeds
from tolerances import F32_ATOL, F32_RTOL, GOLDEN64_ATOL, XP64_RTOL

# ----------------------------------------------------------------------------------------------
# Adam


def adam_by_hand(p, grads_seq, lr, b1, b2, eps):
    """Textbook bias-corrected Adam on one float64 array, one scalar at a time."""
    p = p.copy().ravel()
    m, v = numpy.zeros_like(p), numpy.zeros_like(p)
    for t, g in enumerate(grads_seq, start=1):
        g = g.ravel()
        for j in range(p.size):
            m[j] = b1 * m[j] + (1 - b1) * g[j]
            v[j] = b2 * v[j] + (1 - b2) * g[j] ** 2
            m_hat = m[j] / (1 - b1 ** t)
            v_hat = v[j] / (1 - b2 ** t)
            p[j] -= lr * m_hat / (math.sqrt(v_hat) + eps)
    return p


@pytest.mark.parametrize("betas, eps", [((0.0, 0.999), 1e-8), ((0.9, 0.99), 1e-3),
                                        ((0.5, 0.999), optim.TOPK_ADAM_EPS)])
def test_adam_matches_hand_computation(xp, betas, eps):
    rng = numpy.random.default_rng(0)
    p0 = {"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    grads_seq = [{k: rng.standard_normal(v.shape) * 10.0 ** rng.integers(-4, 2)  # mixed scales
                  for k, v in p0.items()} for _ in range(4)]
    params = {k: asarray(v.copy(), xp, "float64") for k, v in p0.items()}  # p0 stays the start
    state = optim.adam_init(params)
    assert state["step"] == 0 and all(float(abs(m).sum()) == 0.0 for m in state["m"].values())
    for t, g in enumerate(grads_seq, start=1):
        optim.adam_update(params, {k: asarray(v, xp, "float64") for k, v in g.items()}, state,
                          lr=3e-3, betas=betas, eps=eps)
        assert state["step"] == t
    for k in p0:
        expected = adam_by_hand(p0[k], [g[k] for g in grads_seq], 3e-3, betas[0], betas[1], eps)
        numpy.testing.assert_allclose(to_numpy(params[k]).ravel(), expected, rtol=XP64_RTOL,
                                      atol=GOLDEN64_ATOL, err_msg=k)


def test_adam_keeps_float32_and_updates_in_place(xp):
    rng = numpy.random.default_rng(1)
    params = {"W": asarray(rng.standard_normal((5, 2)), xp, "float32")}
    before = to_numpy(params["W"]).astype("float64")
    W_obj = params["W"]
    state = optim.adam_init(params)
    g = rng.standard_normal((5, 2))
    optim.adam_update(params, {"W": asarray(g, xp, "float32")}, state, lr=1e-2)
    assert params["W"] is W_obj and params["W"].dtype == numpy.float32
    assert state["m"]["W"].dtype == numpy.float32 and state["v"]["W"].dtype == numpy.float32
    expected = adam_by_hand(before, [g], 1e-2, 0.0, 0.999, 1e-8).reshape(5, 2)
    numpy.testing.assert_allclose(to_numpy(params["W"]), expected, rtol=F32_RTOL, atol=F32_ATOL)
    with pytest.raises(ValueError, match="grads"):
        optim.adam_update(params, {"V": params["W"]}, state, lr=1e-2)
    with pytest.raises(ValueError, match=r"grads\[.W.\] expected float32 \(5, 2\), found float64"):
        optim.adam_update(params, {"W": asarray(g, xp, "float64")}, state, lr=1e-2)


# ----------------------------------------------------------------------------------------------
# unit-norm decoder rows


@HSETTINGS
@given(M=st.integers(1, 12), D=st.integers(1, 8), seed=seeds, lr=st.floats(1e-4, 1.0),
       dtype=st.sampled_from(["float32", "float64"]))
def test_projection_and_renormalisation_keep_unit_rows(xp, M, D, seed, lr, dtype):
    rng = numpy.random.default_rng(seed)
    W = asarray(rng.standard_normal((M, D)) * rng.uniform(0.1, 10.0, (M, 1)), xp, dtype)
    optim.normalize_decoder_rows(W)
    tol = (F32_RTOL, F32_ATOL) if dtype == "float32" else (XP64_RTOL, GOLDEN64_ATOL)
    numpy.testing.assert_allclose(numpy.linalg.norm(to_numpy(W).astype("float64"), axis=1), 1.0,
                                  rtol=tol[0], atol=tol[1])
    dW = asarray(rng.standard_normal((M, D)) * 10.0, xp, dtype)
    dW_before = to_numpy(dW).copy()
    proj = optim.remove_parallel_decoder_grad(W, dW)
    assert proj.dtype == dtype and proj.shape == (M, D)
    numpy.testing.assert_array_equal(to_numpy(dW), dW_before)  # the input is untouched
    Wn, Pn = to_numpy(W).astype("float64"), to_numpy(proj).astype("float64")
    # orthogonal to each row, and it only removed the parallel part
    numpy.testing.assert_allclose((Wn * Pn).sum(1), 0.0,
                                  atol=tol[1] * max(1.0, abs(dW_before).max()))
    along = (Wn * dW_before).sum(1, keepdims=True)  # (M, 1)
    numpy.testing.assert_allclose(Pn + along * Wn, dW_before, rtol=tol[0], atol=tol[1] * 10)
    W -= lr * proj
    optim.normalize_decoder_rows(W)
    numpy.testing.assert_allclose(numpy.linalg.norm(to_numpy(W).astype("float64"), axis=1), 1.0,
                                  rtol=tol[0], atol=tol[1])
    assert W.dtype == dtype


def test_projection_matches_hand_example(xp):
    W = asarray([[1.0, 0.0], [0.6, 0.8]], xp, "float64")
    dW = asarray([[3.0, 4.0], [1.0, 0.0]], xp, "float64")
    got = to_numpy(optim.remove_parallel_decoder_grad(W, dW))
    # row 0: drop the x-component; row 1: 1*(1,0) - 0.6*(0.6,0.8) = (0.64, -0.48)
    numpy.testing.assert_allclose(got, [[0.0, 4.0], [0.64, -0.48]], rtol=1e-14, atol=1e-15)
    Z = asarray([[0.0, 0.0], [3.0, 4.0]], xp, "float64")
    optim.normalize_decoder_rows(Z)  # a zero row stays zero instead of becoming NaN
    numpy.testing.assert_allclose(to_numpy(Z), [[0.0, 0.0], [0.6, 0.8]], rtol=1e-15)


@HSETTINGS
@given(M=st.integers(1, 40), D=st.integers(1, 9), seed=seeds, dtype=st.sampled_from(["float32", "float64"]),
       block=st.integers(1, 64), b1=st.sampled_from([0.0, 0.9]))
def test_in_place_versions_equal_plain_ones_bitwise(xp, M, D, seed, dtype, block, b1, monkeypatch):
    """adam_update, remove_parallel_decoder_grad and normalize_decoder_rows (in place, blocked,
    no temporaries), and the three fused (adam_update's unit_rows), give bit for bit what their
    plain versions give, over several steps."""
    monkeypatch.setattr(optim, "ROW_BLOCK_ELEMENTS", block)  # blocks of a few rows, uneven at the end
    monkeypatch.setattr(optim, "ADAM_BLOCK_ELEMENTS", block)
    monkeypatch.setattr(threads, "threads", lambda: 3)  # large parameters split over 3 ranges
    rng = numpy.random.default_rng(seed)
    start = {"W_dec": rng.standard_normal((M, D)), "b": rng.standard_normal(D)}
    start["W_dec"][0] = 0.0  # a zero row stays zero
    # three separate copies (asarray alone returns `start`'s own arrays when the dtype matches)
    fast = {k: asarray(v.copy(), xp, dtype) for k, v in start.items()}
    plain = {k: asarray(v.copy(), xp, dtype) for k, v in start.items()}
    fused = {k: asarray(v.copy(), xp, dtype) for k, v in start.items()}  # adam_update(unit_rows="W_dec")
    s_fast, s_plain, s_fused = optim.adam_init(fast), optim.adam_init(plain), optim.adam_init(fused)
    for _ in range(3):
        g = {k: asarray(rng.standard_normal(v.shape) * 10.0 ** rng.integers(-3, 2), xp, dtype)
             for k, v in start.items()}
        g_plain = dict(g, W_dec=optim.remove_parallel_decoder_grad_plain(plain["W_dec"], g["W_dec"]))
        g_fast = {k: v.copy() for k, v in g.items()}
        out = optim.remove_parallel_decoder_grad(fast["W_dec"], g_fast["W_dec"], out=g_fast["W_dec"])
        assert out is g_fast["W_dec"]
        numpy.testing.assert_array_equal(to_numpy(g_fast["W_dec"]), to_numpy(g_plain["W_dec"]))
        optim.adam_update(fast, g_fast, s_fast, lr=1e-2, betas=(b1, 0.999), eps=1e-8)
        optim.adam_update_plain(plain, g_plain, s_plain, lr=1e-2, betas=(b1, 0.999), eps=1e-8)
        optim.normalize_decoder_rows(fast["W_dec"])
        optim.normalize_decoder_rows_plain(plain["W_dec"])
        g_fused = {k: v.copy() for k, v in g.items()}
        optim.adam_update(fused, g_fused, s_fused, lr=1e-2, betas=(b1, 0.999), eps=1e-8, unit_rows="W_dec")
        numpy.testing.assert_array_equal(to_numpy(g_fused["W_dec"]), to_numpy(g_plain["W_dec"]))
        for k in start:
            for other, s_other in ((fast, s_fast), (fused, s_fused)):
                for a, b in ((other[k], plain[k]), (s_other["m"][k], s_plain["m"][k]),
                             (s_other["v"][k], s_plain["v"][k])):
                    assert a.dtype == dtype
                    numpy.testing.assert_array_equal(to_numpy(a), to_numpy(b), err_msg=k)
    assert s_fast["step"] == s_plain["step"] == s_fused["step"] == 3
    with pytest.raises(ValueError, match="unit_rows"):
        optim.adam_update(fused, g_fused, s_fused, lr=1e-2, unit_rows="b")


# ----------------------------------------------------------------------------------------------
# schedules


def test_lr_warmup_is_a_cosine_from_a_tenth():
    lr = 7e-5
    assert optim.lr_at(0, lr=lr) == pytest.approx(0.1 * lr, rel=1e-15)
    assert optim.lr_at(500, lr=lr) == pytest.approx(0.55 * lr, rel=1e-12)  # cosine midpoint
    quarter = 0.1 + 0.9 * (1 - math.cos(math.pi / 4)) / 2
    assert optim.lr_at(250, lr=lr) == pytest.approx(lr * quarter, rel=1e-12)
    assert optim.lr_at(1000, lr=lr) == lr and optim.lr_at(10**7, lr=lr) == lr
    warm = [optim.lr_at(s, lr=lr) for s in range(1001)]
    assert all(a < b for a, b in zip(warm, warm[1:]))
    assert optim.lr_at(3, lr=lr, warmup_steps=0) == lr
    assert optim.lr_at(0, lr=1.0, warmup_steps=10, warmup_start=0.0) == 0.0


def test_lr_linear_decay_at_the_end():
    lr, total = 1e-3, 10_000
    kw = dict(lr=lr, warmup_steps=100, total_steps=total, decay_frac=0.2)
    assert optim.lr_at(8000, **kw) == lr  # decay starts after 80% of the steps
    assert optim.lr_at(9000, **kw) == pytest.approx(0.5 * lr, rel=1e-12)
    assert optim.lr_at(total, **kw) == 0.0 and optim.lr_at(total + 5, **kw) == 0.0
    tail = [optim.lr_at(s, **kw) for s in range(8000, total + 1)]
    numpy.testing.assert_allclose(numpy.diff(tail), -lr / 2000, rtol=1e-9)  # linear, no jump
    assert optim.lr_at(9000, lr=lr, total_steps=total) == lr  # decay_frac 0: no decay
    with pytest.raises(ValueError, match="total_steps"):
        optim.lr_at(5, lr=lr, decay_frac=0.1)


def test_sparsity_coeff_warmup_is_linear():
    c = 6e-4
    assert optim.sparsity_coeff_at(0, coeff=c) == 0.0
    assert optim.sparsity_coeff_at(5000, coeff=c) == pytest.approx(0.5 * c, rel=1e-15)
    assert optim.sparsity_coeff_at(2500, coeff=c) == pytest.approx(0.25 * c, rel=1e-15)
    assert optim.sparsity_coeff_at(10000, coeff=c) == c
    assert optim.sparsity_coeff_at(10**6, coeff=c) == c
    assert optim.sparsity_coeff_at(0, coeff=c, warmup_steps=0) == c
    with pytest.raises(ValueError, match="step >= 0"):
        optim.sparsity_coeff_at(-1, coeff=c)


def test_topk_constants():
    assert optim.TOPK_ADAM_EPS == 6.25e-10
    assert optim.topk_lr(2**14) == pytest.approx(2e-4, rel=1e-15)
    assert optim.topk_lr(2**16) == pytest.approx(1e-4, rel=1e-15)  # lr proportional to 1/sqrt(M)


def test_adam_lr_mult_scales_one_parameter_only():
    # lr_mult={"t": 0.1}: "t" moves as with lr 0.1·lr, the others exactly as without it
    rng = numpy.random.default_rng(5)
    params = {"w": rng.standard_normal((4, 3)).astype(numpy.float32), "t": rng.standard_normal(3).astype(numpy.float32)}
    grads = {k: rng.standard_normal(v.shape).astype(numpy.float32) for k, v in params.items()}
    runs = {}
    for name, kw in (("mult", {"lr": 1e-2, "lr_mult": {"t": 0.1}}), ("base", {"lr": 1e-2}), ("small", {"lr": 1e-3})):
        for fn in (optim.adam_update, optim.adam_update_plain):
            p = {k: v.copy() for k, v in params.items()}
            st = optim.adam_init(p)
            for _ in range(3):
                fn(p, grads, st, **kw)
            runs[name, fn.__name__] = p
    for fn in ("adam_update", "adam_update_plain"):
        assert numpy.array_equal(runs["mult", fn]["w"], runs["base", fn]["w"])
        assert numpy.allclose(runs["mult", fn]["t"], runs["small", fn]["t"], rtol=0, atol=1e-7)
    assert numpy.array_equal(runs["mult", "adam_update"]["t"], runs["mult", "adam_update_plain"]["t"])
