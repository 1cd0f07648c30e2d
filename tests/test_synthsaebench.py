"""SynthSAEBench generator (minisae.data.synthsaebench) against its recipe: Zipf firing rates,
exact mutual exclusion, parent gating and scaling, mean L0 against the value computed from the
probabilities, the copula's covariance and rank, determinism, and the activation-cache copy."""

import math

import numpy
import pytest

from minisae.data.activations import ActivationStore
from minisae.data.synthsaebench import (PRESETS, SynthSAEBench, SynthSAEBenchConfig, compensated_probabilities,
                                        hierarchy_levels, normal_quantile, orthogonalize, preset_config,
                                        write_cache, zipf_probabilities)

# 4 roots, branching 4, depth 3: 340 features in trees, 172 independent ones
SMALL = dict(n_features=512, d_in=32, n_roots=4, corr_rank=5, ortho_steps=10, ortho_lr=1e-2, seed=3)


@pytest.fixture(scope="module")
def small():
    return SynthSAEBench(SynthSAEBenchConfig(**SMALL))


@pytest.fixture(scope="module")
def codes(small):
    return small.sample(40960, return_codes=True)


def test_zipf_formula_and_published_16k_structure():
    p = zipf_probabilities(16384, 0.5, 0.4, 5e-4)
    assert p[0] == pytest.approx(0.4) and p[-1] == pytest.approx(5e-4)
    assert numpy.all(numpy.diff(p) < 0)
    c = preset_config("synthsaebench-16k")
    levels = hierarchy_levels(c)
    assert [(int(par[0]), int(par[-1]), int(ch[0, 0]), int(ch[-1, -1])) for par, ch in levels] == [
        (0, 127, 128, 639), (128, 639, 640, 2687), (640, 2687, 2688, 10879)]


def test_expected_l0_of_the_published_model_matches_saelens():
    # SAELens 6.54 (sae_lens.synthetic, the SynthSAEBench-16k config) measured mean true L0 34.51 on
    # 82k tokens; per tree level 8.21, 7.32, 7.32, 7.13 and 4.52 for the independent features.
    src = SynthSAEBench(preset_config("synthsaebench-16k", ortho_steps=0, d_in=8))
    on = src.expected_firing()
    bounds = [0, 128, 640, 2688, 10880, 16384]
    per_level = [on[a:b].sum() for a, b in zip(bounds, bounds[1:])]
    assert per_level == pytest.approx([8.21, 7.32, 7.32, 7.13, 4.52], abs=0.03)
    assert src.expected_l0 == pytest.approx(34.51, rel=0.005)


def test_compensation():
    p = numpy.array([0.5, 0.2, 0.1, 0.1, 0.1])  # one root (0) with four children... of branching 4
    levels = [(numpy.array([0]), numpy.array([[1, 2, 3, 4]]))]
    q = compensated_probabilities(p, levels)
    assert q[0] == 0.5
    assert q[1] == pytest.approx(0.2 / 0.5 * (1 + 0.3 / 0.5))
    assert q[2] == pytest.approx(0.1 / 0.5 * (1 + 0.4 / 0.5))


def test_normal_quantile():
    u = numpy.array([0.0, 1e-12, 0.025, 0.5, 0.975, 1.0])
    z = normal_quantile(u)
    assert z[0] == -math.inf and z[-1] == math.inf
    assert z[1:-1] == pytest.approx([-7.034483825, -1.959963985, 0.0, 1.959963985], abs=1e-8)


def test_orthogonalize_lowers_interference():
    rng = numpy.random.default_rng(0)
    E0 = rng.standard_normal((256, 16)).astype(numpy.float32)
    E0 /= numpy.linalg.norm(E0, axis=1, keepdims=True)

    def interference(E):  # the off-diagonal part of the loss: sum_{i != j} cos^2
        G = E.astype(numpy.float64) @ E.T.astype(numpy.float64)
        return (G * G).sum() - numpy.trace(G * G)

    E1 = orthogonalize(E0, steps=50, lr=1e-2, chunk=100)  # chunks that do not divide N
    assert numpy.allclose(numpy.linalg.norm(E1, axis=1), 1, atol=1e-5)
    assert interference(E1) < 0.95 * interference(E0)
    assert numpy.allclose(orthogonalize(E0, steps=5, lr=1e-2, chunk=100),
                          orthogonalize(E0, steps=5, lr=1e-2, chunk=7), atol=1e-5)


def test_firing_rates_follow_the_zipf_law_within_sampling_error(small, codes):
    _, a = codes
    n = a.shape[0]
    freq = (a > 0).mean(axis=0)
    # roots and independent features fire at their base rate p_i times P(magnitude > 0)
    free = numpy.flatnonzero(small.parent < 0)
    on = small.expected_firing()
    alive = on[free] / small.base_probability[free]  # P(mu + sigma xi > 0): ~1, less for large sigma
    assert numpy.all(alive <= 1 + 1e-12) and alive.mean() > 0.99
    se = numpy.sqrt(on * (1 - on) / n)
    z = (freq - on) / se
    assert numpy.abs(z[free]).max() < 5.0
    # every feature, children included, within sampling error of the computed rate
    assert numpy.abs(z).mean() < 1.5


def test_mutual_exclusion_is_exact_and_children_follow_their_parent(small, codes):
    _, a = codes
    on = a > 0
    for parents, children in small.levels:
        assert on[:, children].sum(axis=2).max() <= 1  # at most one child of each parent per token
        assert not numpy.any(on[:, children] & ~on[:, parents][:, :, None])  # never without the parent
    # parent scaling: a child's magnitude divided by a_parent / mu_parent has the child's own mean
    parents, children = small.levels[0]
    kid = children.reshape(-1)
    par = numpy.repeat(parents, children.shape[1])
    tok, j = numpy.nonzero(on[:, kid])
    raw = a[tok, kid[j]] / (a[tok, par[j]] / small.mag_mean[par[j]])
    assert raw.mean() == pytest.approx(small.mag_mean[kid].mean(), rel=0.02)


def test_mean_l0_matches_the_probabilities(small, codes):
    _, a = codes
    assert (a > 0).sum(axis=1).mean() == pytest.approx(small.expected_l0, rel=0.02)


def test_cpu_preset_mean_l0_within_two_percent():
    src = SynthSAEBench("synthsaebench-cpu", ortho_steps=0)
    _, a = src.sample(16384, return_codes=True)
    assert (a > 0).sum(axis=1).mean() == pytest.approx(src.expected_l0, rel=0.02)


def test_copula_covariance_and_rank(small):
    F = small.corr_factor.astype(numpy.float64)
    assert numpy.linalg.matrix_rank(F) == SMALL["corr_rank"]
    rng = numpy.random.default_rng(1)
    n = 20000
    z = rng.standard_normal((n, small.n_features)) * small.corr_diag_sqrt + rng.standard_normal((n, F.shape[1])) @ F.T
    C = numpy.cov(z, rowvar=False)
    target = F @ F.T + numpy.diag(small.corr_diag_sqrt.astype(numpy.float64) ** 2)
    assert numpy.allclose(numpy.diag(target), 1, atol=1e-5)  # unit variances: marginals are exact
    assert numpy.abs(C - target).max() < 6 / math.sqrt(n)
    # the correlation part F F^T has rank R: its (R+1)-th largest eigenvalue is zero
    ev = numpy.sort(numpy.linalg.eigvalsh(F @ F.T))
    assert ev[-SMALL["corr_rank"]] > 1e-3 and abs(ev[-SMALL["corr_rank"] - 1]) < 1e-8


def test_correlated_firing_is_visible_in_the_codes():
    # a strong rank-1 copula makes features i, j co-fire above chance when F_i F_j > 0 and below
    # it when F_i F_j < 0; with rank 0 firing is independent
    corr = SynthSAEBench(SynthSAEBenchConfig(**{**SMALL, "corr_rank": 1, "corr_scale": 0.9, "n_roots": 0}))
    ind = SynthSAEBench(SynthSAEBenchConfig(**{**SMALL, "corr_rank": 0, "n_roots": 0}))
    sign = numpy.sign(numpy.outer(corr.corr_factor[:20, 0], corr.corr_factor[:20, 0]))
    off = ~numpy.eye(20, dtype=bool)
    for src, lo, hi in ((corr, 0.01, 1.0), (ind, -0.005, 0.005)):
        _, a = src.sample(8192, return_codes=True)
        c = numpy.corrcoef((a[:, :20] > 0).astype(numpy.float64), rowvar=False)
        assert lo < (sign * c)[off].mean() < hi


def test_batches_are_pure_functions_and_samples_prefixes(small):
    b1 = small.batch(7, 300)
    assert numpy.array_equal(b1, SynthSAEBench(SynthSAEBenchConfig(**SMALL)).batch(7, 300))
    assert not numpy.array_equal(b1, small.batch(8, 300))
    x, a = small.batch(7, 300, return_codes=True)
    assert numpy.array_equal(x, b1)
    assert numpy.allclose(x, a @ small.directions + small.bias, atol=1e-4)
    assert numpy.array_equal(small.sample(100, offset=2), small.sample(5000, offset=2)[:100])
    assert b1.dtype == numpy.float32 and b1.shape == (300, 32)


def test_write_cache_holds_exactly_the_batches(small, tmp_path):
    man = write_cache(small, tmp_path / "c", 1000, batch_size=300, shard_tokens=256)
    assert man["count"] == 1000 and [s["count"] for s in man["shards"]] == [256, 256, 256, 232]
    store = ActivationStore(tmp_path / "c")
    rows = store.rows(numpy.arange(1000))
    expect = numpy.concatenate([small.batch(i, 300) for i in range(4)])[:1000]
    assert numpy.array_equal(rows, expect)
    assert write_cache(small, tmp_path / "c", 1000, batch_size=300, shard_tokens=256) == man  # reused
    with pytest.raises(ValueError, match="other data or size"):
        write_cache(small, tmp_path / "c", 999, batch_size=300)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="hierarchy needs"):
        SynthSAEBench(n_features=100, d_in=8, n_roots=4, ortho_steps=0)
    with pytest.raises(ValueError, match="p_min < p_max"):
        SynthSAEBench(n_features=100, d_in=8, n_roots=0, p_min=0.5, p_max=0.4)
    with pytest.raises(ValueError, match="unknown SynthSAEBench preset"):
        preset_config("nope")
    assert set(PRESETS) >= {"synthsaebench-16k", "synthsaebench-cpu"}
