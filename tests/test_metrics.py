"""minisae.eval.metrics: known-answer checks (FVU especially: SAELens has computed it wrong twice, so it
is checked on cases with a known answer), streaming accumulation equal to one-shot computation,
dead/dense counting, and feature recovery."""

import math

import numpy
import pytest
from tolerances import GOLDEN64_ATOL, GOLDEN64_RTOL

from minisae.eval.metrics import (
    EvalAccumulator,
    feature_recovery,
    fvu,
    l0,
    max_cosine_similarity,
    mse,
    relative_reconstruction_bias,
)
from minisae.xp import asarray, to_numpy


def approx(value):
    return pytest.approx(value, rel=GOLDEN64_RTOL, abs=GOLDEN64_ATOL)


def test_fvu_known_answers(xp):
    # tokens (1, 2) and (3, 2): mean over tokens (2, 2), total variance 1 + 1 = 2
    x = asarray(numpy.array([[1.0, 2.0], [3.0, 2.0]], numpy.float32), xp)
    assert fvu(x, x) == 0.0
    assert fvu(x, asarray(numpy.array([[1.0, 2.0], [2.0, 2.0]], numpy.float32), xp)) == approx(0.5)
    assert fvu(x, asarray(numpy.array([[2.0, 2.0], [2.0, 2.0]], numpy.float32), xp)) == approx(1.0)


def test_fvu_of_the_token_mean_is_one(xp):
    """Predicting every token by the dataset mean explains nothing: FVU = 1 exactly. The mean is
    a D-vector over tokens; dimensions with very different means make the other readings differ
    (mean over all entries gives ~ 25 here; per-dimension variance ratios averaged differ too)."""
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((500, 6)) * numpy.array([1, 2, 3, 1, 1, 1]) + numpy.array([10, -5, 0, 3, 0, 100])
    mean = numpy.broadcast_to(x.mean(axis=0), x.shape)  # (N, D)
    assert fvu(asarray(x, xp), asarray(mean, xp)) == approx(1.0)
    wrong = numpy.full_like(x, x.mean())  # mean over everything
    assert fvu(asarray(x, xp), asarray(wrong, xp)) > 20
    # xhat halfway between x and the mean leaves a quarter of the variance unexplained
    assert fvu(asarray(x, xp), asarray(0.5 * (x + mean), xp)) == approx(0.25)


def test_l0_mse_and_bias_known_answers(xp):
    f = numpy.zeros((4, 10), numpy.float32)
    f[0, :3] = 1.0
    f[1, 5] = -2.0  # negative values count as active too
    f[3, :] = 0.5
    assert l0(asarray(f, xp)) == approx((3 + 1 + 0 + 10) / 4)
    x = numpy.array([[1.0, 2.0], [3.0, 4.0]])
    assert mse(asarray(x, xp), asarray(x + numpy.array([[1.0, 0.0], [2.0, 2.0]]), xp)) == approx((1 + 8) / 2)
    assert relative_reconstruction_bias(asarray(x, xp), asarray(0.8 * x, xp)) == approx(0.8)
    assert relative_reconstruction_bias(asarray(x, xp), asarray(x, xp)) == approx(1.0)
    # an orthogonal error does not shrink: gamma = (|x|^2 + |e|^2) / |x|^2
    x1, e = numpy.array([[3.0, 0.0]]), numpy.array([[0.0, 1.0]])
    assert relative_reconstruction_bias(asarray(x1, xp), asarray(x1 + e, xp)) == approx(10.0 / 9.0)
    with pytest.raises(ValueError, match="same shape"):
        fvu(asarray(x, xp), asarray(x[:1], xp))


def test_accumulator_equals_one_shot(xp):
    rng = numpy.random.default_rng(1)
    N, D, M = 1000, 8, 30
    x = (rng.standard_normal((N, D)) * 0.3 + 1e4).astype(numpy.float32)  # a large mean: no cancellation
    xhat = (x + 0.1 * rng.standard_normal((N, D))).astype(numpy.float32)
    f = numpy.maximum(rng.standard_normal((N, M)) - 1.0, 0.0).astype(numpy.float32)
    acc = EvalAccumulator(M, xp)
    for start, stop in [(0, 1), (1, 300), (300, 301), (301, 1000)]:  # uneven batches, incl. single tokens
        acc.update(asarray(x[start:stop], xp), asarray(xhat[start:stop], xp), asarray(f[start:stop], xp))
    s = acc.summary()
    assert set(s) == {"l0", "fvu", "explained_variance", "mse", "dead_frac", "dense_frac", "rel_recon_bias",
                      "shrinkage", "n_tokens"}
    x64, xh64 = x.astype(numpy.float64), xhat.astype(numpy.float64)
    expected_fvu = ((x64 - xh64) ** 2).sum() / ((x64 - x64.mean(axis=0)) ** 2).sum()
    assert s["n_tokens"] == N
    assert s["fvu"] == pytest.approx(expected_fvu, rel=GOLDEN64_RTOL)
    assert s["fvu"] == pytest.approx(fvu(x, xhat), rel=GOLDEN64_RTOL)
    assert s["mse"] == pytest.approx(mse(x, xhat), rel=GOLDEN64_RTOL)
    assert s["l0"] == approx(l0(f))
    assert s["rel_recon_bias"] == pytest.approx(relative_reconstruction_bias(x, xhat), rel=GOLDEN64_RTOL)
    numpy.testing.assert_array_equal(acc.firing_freq, (f != 0).mean(axis=0))


def test_accumulator_fvu_is_one_for_the_global_mean_across_batches(xp):
    rng = numpy.random.default_rng(2)
    drift = numpy.linspace(0, 3, 600)[:, None] * numpy.array([1.0, 2.0, 3.0, 4.0, 5.0])  # (N, D) a drifting mean
    x = rng.standard_normal((600, 5)) + drift
    mean = numpy.broadcast_to(x.mean(axis=0), x.shape)
    acc = EvalAccumulator(3, xp)
    f = numpy.zeros((200, 3))
    for b in range(3):  # per-batch means differ a lot: a per-batch variance would be far too small
        rows = slice(200 * b, 200 * (b + 1))
        acc.update(asarray(x[rows], xp), asarray(mean[rows], xp), asarray(f, xp))
    assert acc.summary()["fvu"] == approx(1.0)


def test_dead_and_dense(xp):
    M = 10
    acc = EvalAccumulator(M, xp)
    for b in range(5):  # 5 batches of 20 tokens
        f = numpy.zeros((20, M), numpy.float32)
        f[:, 0] = 1.0  # always on: dense
        f[:3, 1] = 1.0  # 15% of tokens: dense
        f[:2, 2] = 1.0  # exactly 10%: not dense (> 10% is)
        if b == 4:
            f[7, 3] = 1.0  # fires once in the whole window: alive
        # latents 4..9 never fire: dead
        x = numpy.ones((20, 2), numpy.float32) * numpy.arange(20)[:, None]
        acc.update(asarray(x, xp), asarray(x, xp), asarray(f, xp))
    s = acc.summary()
    assert s["dead_frac"] == approx(6 / 10)
    assert s["dense_frac"] == approx(2 / 10)
    assert s["fvu"] == 0.0 and s["n_tokens"] == 100
    numpy.testing.assert_allclose(acc.firing_freq[:4], [1.0, 0.15, 0.1, 0.01])
    with pytest.raises(ValueError, match="expected f with 10 latents"):
        acc.update(asarray(x, xp), asarray(x, xp), asarray(numpy.zeros((20, 9)), xp))
    with pytest.raises(ValueError, match="no tokens"):
        EvalAccumulator(3, xp).summary()


def test_feature_recovery_known_answers(xp):
    rng = numpy.random.default_rng(3)
    F, D = 20, 8
    true = rng.standard_normal((F, D))
    true /= numpy.linalg.norm(true, axis=1, keepdims=True)
    # a decoder holding every true direction (permuted, rescaled) plus junk rows: all recovered
    W = numpy.concatenate([3.0 * true[rng.permutation(F)], rng.standard_normal((15, D))])
    r = feature_recovery(true, asarray(W, xp))
    assert r == {"mmcs": approx(1.0), "frac_recovered": 1.0}
    # in 2-D: true directions e1 and e2, one decoder row at angle a from e1 only
    a = 0.3
    true2 = numpy.array([[1.0, 0.0], [0.0, 1.0]])
    W2 = numpy.array([[math.cos(a), math.sin(a)], [0.0, 0.0]])  # a dead (zero) row has cosine 0
    best = max_cosine_similarity(true2, asarray(W2, xp))
    numpy.testing.assert_allclose(best, [math.cos(a), math.sin(a)], rtol=GOLDEN64_RTOL)
    r2 = feature_recovery(true2, asarray(W2, xp), cutoff=0.9)
    assert r2["mmcs"] == approx((math.cos(a) + math.sin(a)) / 2) and r2["frac_recovered"] == 0.5
    assert feature_recovery(true2, asarray(W2, xp), cutoff=0.99)["frac_recovered"] == 0.0


def test_max_cosine_similarity_chunks(xp):
    rng = numpy.random.default_rng(4)
    true, W = rng.standard_normal((30, 6)), rng.standard_normal((50, 6))
    whole = max_cosine_similarity(true, asarray(W, xp))
    numpy.testing.assert_allclose(max_cosine_similarity(true, asarray(W, xp), chunk=7), whole, rtol=GOLDEN64_RTOL)
    unit = lambda a: a / numpy.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    cos = unit(true) @ unit(W).T  # (F, M)
    numpy.testing.assert_allclose(whole, cos.max(axis=1), rtol=GOLDEN64_RTOL)
    assert isinstance(whole, numpy.ndarray) and to_numpy(whole).shape == (30,)
    with pytest.raises(ValueError, match=r"\(F, D\).*\(30, 6\) and \(50, 5\)"):
        max_cosine_similarity(true, asarray(W[:, :5], xp))


# ---------------------------------------------------------------------------------------------
# ground-truth metrics (SynthSAEBench): known answers

def test_true_dictionary_permuted_and_rescaled_scores_one():
    from minisae.eval.metrics import ClassificationAccumulator, best_match, mcc, uniqueness

    rng = numpy.random.default_rng(0)
    T = rng.standard_normal((40, 16))  # (N, D) true features, not orthogonal
    assert mcc(T, T) == pytest.approx(1.0) and uniqueness(T, T) == 1.0
    perm = rng.permutation(40)
    W = T[perm] * rng.choice([-3.0, 0.5, 2.0], size=(40, 1))  # permuted, rescaled, some flipped
    assert mcc(W, T) == pytest.approx(1.0) and uniqueness(W, T) == 1.0
    assert numpy.array_equal(best_match(W, T), perm)
    codes = (rng.random((500, 40)) < 0.2) * rng.random((500, 40))  # (B, N) true activations
    acc = ClassificationAccumulator(best_match(W, T))
    acc.update(codes[:, perm] * 7.0, codes)  # latents = the permuted codes, rescaled
    assert acc.summary() == {"precision": 1.0, "recall": 1.0, "f1": 1.0}


def test_mcc_of_a_known_mixture_and_of_random_directions():
    from minisae.eval.metrics import expected_abs_cosine, mcc, uniqueness

    # w_i = c e_i + sqrt(1 - c^2) e_{N+i}: |cos(w_i, e_j)| = c if i == j else 0, so MCC = c exactly
    N, c = 8, 0.6
    E = numpy.eye(2 * N)
    T, W = E[:N], c * E[:N] + math.sqrt(1 - c * c) * E[N:]
    assert mcc(W, T) == pytest.approx(c) and uniqueness(W, T) == 1.0
    assert mcc(W[:3], T) == pytest.approx(c)  # fewer latents than features: mean over the 3 pairs
    # one random latent against one random feature: E MCC = E|cos| = Γ(d/2) / (√π Γ((d+1)/2))
    rng = numpy.random.default_rng(1)
    d = 10
    vals = [mcc(rng.standard_normal((1, d)), rng.standard_normal((1, d))) for _ in range(4000)]
    assert numpy.mean(vals) == pytest.approx(expected_abs_cosine(d), abs=4 * numpy.std(vals) / math.sqrt(4000))
    # many latents on one feature: uniqueness 1/M
    assert uniqueness(numpy.eye(3)[[0]] + 0.01 * rng.standard_normal((5, 3)), numpy.eye(3)) == pytest.approx(0.2)


def test_f1_of_a_random_detector_is_what_theory_says():
    from minisae.eval.metrics import ClassificationAccumulator

    # a latent firing at random with rate r against a feature with rate p: precision p, recall r
    rng = numpy.random.default_rng(2)
    n, p, r = 200_000, 0.3, 0.1
    codes = (rng.random((n, 1)) < p).astype(numpy.float64)
    f = (rng.random((n, 1)) < r).astype(numpy.float64)
    acc = ClassificationAccumulator(numpy.array([0]))
    acc.update(f, codes)
    s = acc.summary()
    assert s["precision"] == pytest.approx(p, abs=0.01) and s["recall"] == pytest.approx(r, abs=0.01)
    assert s["f1"] == pytest.approx(2 * p * r / (p + r), abs=0.01)
    # a latent that never fires: precision and F1 undefined, counted 0
    acc = ClassificationAccumulator(numpy.array([0]))
    acc.update(numpy.zeros((10, 1)), numpy.ones((10, 1)))
    assert acc.summary() == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_mcc_without_scipy_is_a_one_line_error(monkeypatch):
    import builtins

    from minisae.errors import DependencyError
    from minisae.eval.metrics import mcc

    real_import = builtins.__import__

    def no_scipy(name, *a, **k):
        if name.startswith("scipy"):
            raise ImportError("no scipy")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    with pytest.raises(DependencyError, match=r"pip install 'minisae\[metrics\]'"):
        mcc(numpy.eye(2), numpy.eye(2))


def test_explained_variance_and_shrinkage():
    from minisae.eval.metrics import EvalAccumulator

    rng = numpy.random.default_rng(3)
    x = rng.standard_normal((300, 6)) + 2.0
    acc = EvalAccumulator(4)
    acc.update(x, 0.5 * x, numpy.ones((300, 4)))
    s = acc.summary()
    assert s["explained_variance"] == pytest.approx(1 - s["fvu"])
    assert s["shrinkage"] == pytest.approx(0.5)  # every ||xhat|| / ||x|| = 0.5
