"""BatchTopK (with AuxK and Matryoshka prefixes): gradients against float64 finite differences, the
selection invariants (exactly N = floor(B k) entries kept per batch, ties in row-major order, no
gradient outside the kept set), Matryoshka with the single prefix M = the plain loss, the sparse
path = the plain one, the running threshold's update rule and the inference encoder."""

import math

import numpy
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from minisae.sae import batchtopk, common, jumprelu
from minisae.xp import asarray, to_numpy
from helpers import HSETTINGS, assert_close, fd_check, host, problem, seeds, shapes, to_xp
from test_sae_invariants import assert_paths_agree
from tolerances import GOLDEN64_ATOL, KINK_MARGIN, XP64_RTOL


def pre_acts(p, x):
    return (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]  # (B, M)


def gap_ok(values, n):
    """The n-th largest of `values` (any shape, flattened) KINK_MARGIN clear of the (n+1)-th."""
    s = -numpy.sort(-values.ravel())
    return n >= s.size or s[n - 1] - s[n] > KINK_MARGIN


def draw_prefixes(data, M):
    """None, or a random strictly increasing tuple ending at M (or one short of it: M appended)."""
    inner = sorted(set(data.draw(st.lists(st.integers(1, M), max_size=3), label="prefix sizes")))
    if data.draw(st.booleans(), label="no prefixes") or not inner:
        return None
    return tuple(inner)


@HSETTINGS
@given(shape=shapes, seed=seeds, data=st.data(), aux_coeff=st.floats(0.0, 2.0))
def test_batchtopk_true_gradients(xp, shape, seed, data, aux_coeff):
    B, D, M = shape
    k = data.draw(st.integers(1, M), label="k")
    aux_k = data.draw(st.integers(1, M), label="aux_k")
    dead_host = numpy.array(data.draw(st.lists(st.booleans(), min_size=M, max_size=M), label="dead"))
    prefixes = draw_prefixes(data, M)
    rng = numpy.random.default_rng(seed)
    p_host, x_host = problem("batchtopk", rng, B, D, M)
    pi = pre_acts(p_host, x_host)
    assume(gap_ok(pi, B * k))
    assume(numpy.all(numpy.abs(pi) > KINK_MARGIN))
    dead = numpy.flatnonzero(dead_host)
    k_aux = min(aux_k, dead.size)
    if dead.size:
        s = -numpy.sort(-pi[:, dead], axis=1)
        assume(k_aux == dead.size or numpy.all(s[:, k_aux - 1] - s[:, k_aux] > KINK_MARGIN))
    params, x = to_xp(p_host, xp), asarray(x_host, xp, "float64")
    hyper = dict(k=k, aux_k=aux_k, aux_coeff=aux_coeff, dead_mask=asarray(dead_host, xp),
                 prefixes=prefixes)
    out, cache = batchtopk.forward(params, x, **hyper)
    e0 = x_host - to_numpy(out["xhat"])  # (B, D) the AuxK target, held fixed

    def aux_sg(ps):
        if dead.size == 0:
            return 0.0
        pd = pre_acts(host(ps), x_host)[:, dead]  # (B, Nd)
        keep = numpy.argsort(-pd, axis=1)[:, :k_aux]
        z_aux = numpy.zeros_like(pd)
        numpy.put_along_axis(z_aux, keep, numpy.maximum(numpy.take_along_axis(pd, keep, 1), 0), 1)
        return float(((e0 - z_aux @ host(ps)["W_dec"][dead]) ** 2).sum() / B)

    sizes = common.check_prefixes(prefixes, M, "test")

    def loss_fn(ps):
        """Written here with argsort: the global top B*k, ReLU, the prefix reconstructions."""
        h = host(ps)
        p = pre_acts(h, x_host)
        keep = numpy.zeros(p.size, bool)
        keep[numpy.argsort(-p.ravel(), kind="stable")[:B * k]] = True
        z = numpy.where(keep.reshape(p.shape), numpy.maximum(p, 0.0), 0.0)
        rec = sum(((x_host - (z[:, :m] @ h["W_dec"][:m] + h["b_dec"])) ** 2).sum() / B for m in sizes)
        return float(rec) + aux_coeff * aux_sg(ps)

    assert numpy.isclose(float(out["loss"]), loss_fn(params), rtol=1e-12, atol=1e-300)
    grads = batchtopk.backward(params, cache)
    fd_check(loss_fn, params, grads, list(batchtopk.PARAM_NAMES), rng,
             f"batchtopk k={k}, dead={dead.tolist()}, prefixes={prefixes}")


@HSETTINGS
@given(B=st.integers(1, 12), M=st.integers(1, 20), seed=seeds, data=st.data())
def test_batch_topk_mask_keeps_exactly_n_with_row_major_ties(xp, B, M, seed, data):
    n = data.draw(st.integers(1, B * M), label="n")
    rng = numpy.random.default_rng(seed)
    pi = rng.integers(-3, 4, size=(B, M)).astype("float64")  # many ties on purpose
    kept = to_numpy(batchtopk.batch_topk_mask(asarray(pi, xp), n))  # (B, M)
    assert kept.sum() == n
    # the kept set is the first n of a stable descending sort: higher values first, ties in
    # row-major order (earlier token, then lower latent index)
    order = numpy.argsort(-pi.ravel(), kind="stable")
    expect = numpy.zeros(B * M, bool)
    expect[order[:n]] = True
    numpy.testing.assert_array_equal(kept.ravel(), expect)


@HSETTINGS
@given(shape=shapes, seed=seeds, data=st.data())
def test_batchtopk_keeps_b_k_and_routes_gradient_only_through_kept(xp, shape, seed, data):
    B, D, M = shape
    k = data.draw(st.integers(1, M), label="k")
    rng = numpy.random.default_rng(seed)
    p_host, x_host = problem("batchtopk", rng, B, D, M)
    pi = pre_acts(p_host, x_host)
    params, x = to_xp(p_host, xp), asarray(x_host, xp, "float64")
    out, cache = batchtopk.forward(params, x, k=k)
    kept = to_numpy(batchtopk.batch_topk_mask(asarray(pi, xp), B * k))
    assert kept.sum() == B * k
    z = to_numpy(out["f"])
    numpy.testing.assert_array_equal(z, numpy.where(kept, numpy.maximum(pi, 0.0), 0.0))
    numpy.testing.assert_array_equal(to_numpy(batchtopk.encode(params, x, k=k)), z)
    grads = {n: to_numpy(g) for n, g in batchtopk.backward(params, cache).items()}
    unused = ~numpy.any(kept & (pi > 0.0), axis=0)  # (M,) latents kept positive in no row
    assert numpy.all(grads["b_enc"][unused] == 0.0)
    assert numpy.all(grads["W_enc"][:, unused] == 0.0)
    assert numpy.all(grads["W_dec"][unused] == 0.0)
    if B == 1:
        assert numpy.all(grads["b_enc"][~kept[0]] == 0.0)
    # a fractional k keeps floor(B k) entries
    kf = (M + 1) / 2  # floor(B * kf) >= 1
    n = batchtopk.n_kept(kf, B, M)
    assert n == math.floor(B * kf)
    out_f, _ = batchtopk.forward(params, x, k=kf)
    kept_f = to_numpy(batchtopk.batch_topk_mask(asarray(pi, xp), n))
    assert kept_f.sum() == n
    numpy.testing.assert_array_equal(to_numpy(out_f["f"]), numpy.where(kept_f, numpy.maximum(pi, 0.0), 0.0))


def test_matryoshka_with_the_single_prefix_m_equals_the_plain_loss(xp):
    rng = numpy.random.default_rng(4)
    p_host, x_host = problem("batchtopk", rng, 16, 6, 20)
    params, x = to_xp(p_host, xp), asarray(x_host, xp, "float64")
    dead = asarray(numpy.arange(20) % 4 == 0, xp)
    base = dict(k=3, aux_k=2, aux_coeff=0.3, dead_mask=dead)
    plain = batchtopk.loss_and_grads(params, x, path="dense", **base)
    for prefixes in [(20,), [20]]:
        one = batchtopk.loss_and_grads(params, x, path="dense", prefixes=prefixes, **base)
        assert float(one[0]) == float(plain[0])
        for k in plain[1]:
            numpy.testing.assert_array_equal(to_numpy(one[1][k]), to_numpy(plain[1][k]))
    # (5, 12) is (5, 12, 20): the inner prefixes add their errors, the full one stays the "mse"
    out, _ = batchtopk.forward(params, x, prefixes=(5, 12), **base)
    f, W, b = to_numpy(out["f"]), p_host["W_dec"], p_host["b_dec"]
    inner = sum(((x_host - (f[:, :m] @ W[:m] + b)) ** 2).sum() / 16 for m in (5, 12))
    assert numpy.isclose(float(out["matryoshka"]), inner, rtol=1e-12)
    assert numpy.isclose(float(out["loss"]), inner + float(out["mse"]) + 0.3 * float(out["aux"]), rtol=1e-12)
    for bad in [(0, 5), (5, 5), (12, 5), (30,), ("a",)]:
        with pytest.raises(ValueError, match="prefixes"):
            batchtopk.forward(params, x, prefixes=bad, **base)


@HSETTINGS
@given(B=st.integers(1, 24), D=st.integers(1, 8), M=st.integers(1, 40), seed=seeds, data=st.data(),
       aux_coeff=st.floats(0.0, 1.0))
def test_batchtopk_sparse_path_equals_plain(B, D, M, seed, data, aux_coeff):
    k = data.draw(st.integers(1, M), label="k")
    aux_k = data.draw(st.integers(1, M), label="aux_k")
    rng = numpy.random.default_rng(seed)
    p, x = problem("batchtopk", rng, B, D, M)
    dead = rng.random(M) < data.draw(st.floats(0.0, 1.0), label="dead fraction")
    # dead latents pushed negative: few AuxK entries, held sparse (auxk.sparse_step); none at 50
    p["b_enc"][dead] -= data.draw(st.sampled_from([0.0, 2.0, 50.0]), label="dead latents' shift")
    hyper = dict(k=k, aux_k=aux_k, aux_coeff=aux_coeff, dead_mask=dead,
                 prefixes=draw_prefixes(data, M))
    assert_paths_agree(batchtopk, p, x, hyper)


def test_running_threshold_update_rule():
    t, n = 0.0, 0
    samples = [2.0, 4.0, float("nan"), 6.0]
    for s in samples:
        t, n = batchtopk.update_threshold(t, n, s, rate=0.01)
    assert (t, n) == (4.0, 3)  # the plain mean of the first batches; NaN (nothing kept) skipped
    t2, n2 = t, n
    for _ in range(200):
        t2, n2 = batchtopk.update_threshold(t2, n2, 1.0, rate=0.01)
    # after 1/rate batches the weight stays at the rate: an exponential moving average
    w = [max(1.0 / i, 0.01) for i in range(4, 204)]
    expect = 4.0
    for wi in w:
        expect += wi * (1.0 - expect)
    assert t2 == pytest.approx(expect, rel=1e-15) and n2 == 203


def test_inference_encoder_is_a_jumprelu_with_one_threshold(xp):
    rng = numpy.random.default_rng(2)
    p_host, x_host = problem("batchtopk", rng, 30, 5, 12)
    params, x = to_xp(p_host, xp), asarray(x_host, xp, "float64")
    out, _ = batchtopk.forward(params, x, k=2)
    theta = float(out["min_kept"])
    z = to_numpy(out["f"])
    assert theta == z[z > 0].min()
    f = to_numpy(batchtopk.encode(params, x, threshold=theta))
    pi = pre_acts(p_host, x_host)
    numpy.testing.assert_array_equal(f, numpy.where(pi > theta, pi, 0.0))
    jp = batchtopk.inference_params(params, theta)
    assert_close(jumprelu.encode(jp, x), f, XP64_RTOL, GOLDEN64_ATOL, "jumprelu encoder")
    with pytest.raises(ValueError, match="give k"):
        batchtopk.encode(params, x)
    with pytest.raises(ValueError, match="k a number"):
        batchtopk.forward(params, x, k=13)
