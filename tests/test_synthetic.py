"""minisae.data.synthetic: reproducibility (batches are pure functions of seed and index), the
planted dictionary, the capped power law, magnitudes, the group copula and noise."""

import dataclasses

import numpy
import pytest

from tolerances import F32_ATOL, F32_RTOL, GOLDEN64_RTOL

from minisae.data.synthetic import SyntheticActivations, SyntheticConfig, power_law_frequencies


def test_defaults_and_shapes():
    s = SyntheticActivations()
    assert (s.d_in, s.n_features) == (64, 512)
    assert s.directions.shape == (512, 64) and s.directions.dtype == numpy.float32
    numpy.testing.assert_allclose(numpy.linalg.norm(s.directions, axis=1), 1.0, rtol=F32_RTOL)
    assert s.frequencies.shape == (512,)
    assert s.expected_l0 == pytest.approx(s.cfg.target_l0, rel=GOLDEN64_RTOL)
    x = s.batch(0, 256)
    assert x.shape == (256, 64) and x.dtype == numpy.float32 and isinstance(x, numpy.ndarray)


def test_batches_are_pure_functions_of_seed_and_index():
    a, b = SyntheticActivations(seed=3), SyntheticActivations(SyntheticConfig(seed=3))
    numpy.testing.assert_array_equal(a.batch(17, 128), b.batch(17, 128))
    a.batch(0, 64)  # drawing other batches first changes nothing
    numpy.testing.assert_array_equal(a.batch(17, 128), b.batch(17, 128))
    numpy.testing.assert_array_equal(a.directions, b.directions)
    assert not numpy.array_equal(a.batch(17, 128), a.batch(18, 128))
    assert not numpy.array_equal(a.batch(17, 128), SyntheticActivations(seed=4).batch(17, 128))
    # held-out samples: prefix-consistent, offsets independent, never a training batch
    numpy.testing.assert_array_equal(a.sample(100, offset=2), a.sample(5000, offset=2)[:100])
    assert not numpy.array_equal(a.sample(100, offset=2), a.sample(100, offset=3))
    assert not numpy.array_equal(a.sample(128), a.batch(0, 128))
    assert a.sample(5000).shape == (5000, 64)
    numpy.testing.assert_array_equal(a.eval_sample(10), a.sample(10, offset=1))
    assert a.sae_metadata()["synthetic_config"]["seed"] == 3


def test_power_law_frequencies():
    p = power_law_frequencies(1000, 1.2, 0.05, 10.0)
    assert p.sum() == pytest.approx(10.0, rel=GOLDEN64_RTOL)
    assert p.max() == pytest.approx(0.05) and (numpy.diff(p) <= 0).all()
    tail = p < 0.05  # the uncapped tail follows i^-alpha exactly
    i = numpy.nonzero(tail)[0] + 1
    numpy.testing.assert_allclose(p[tail] * i**1.2, p[tail][0] * i[0] ** 1.2, rtol=GOLDEN64_RTOL)
    assert tail.sum() > 500
    flat = power_law_frequencies(100, 0.0, 0.5, 7.0)
    numpy.testing.assert_allclose(flat, 0.07, rtol=GOLDEN64_RTOL)


def test_codes_frequencies_and_magnitudes():
    s = SyntheticActivations(d_in=32, n_features=200, target_l0=6.0, max_freq=0.1, magnitude_mean=2.0,
                             magnitude_std=0.5)
    x, codes = s.batch(0, 40000, return_codes=True)
    numpy.testing.assert_array_equal(x, s.batch(0, 40000))
    numpy.testing.assert_allclose(x, codes @ s.directions, rtol=F32_RTOL, atol=F32_ATOL)  # no noise, no offset
    fired = codes > 0
    assert (codes >= 0).all()
    assert fired.sum(axis=1).mean() == pytest.approx(s.expected_l0, abs=0.05)  # sd of the mean ~ 0.012
    freq = fired.mean(axis=0)
    numpy.testing.assert_allclose(freq[:20], s.frequencies[:20], atol=0.006)  # binomial sd ~ 0.0015
    mags = codes[fired]
    assert mags.mean() == pytest.approx(2.0, rel=0.02) and mags.std() == pytest.approx(0.5, rel=0.05)
    const = SyntheticActivations(n_features=50, d_in=8, target_l0=2.0, magnitude_std=0.0)
    const = const.batch(1, 100, return_codes=True)[1]
    numpy.testing.assert_allclose(const[const > 0], 1.0, rtol=F32_RTOL)


def test_group_copula_keeps_marginals_and_correlates():
    kw = dict(d_in=16, n_features=64, target_l0=6.4, max_freq=0.1, freq_exponent=0.0, group_size=4)
    corr = SyntheticActivations(**kw, correlation=0.8)
    ind = SyntheticActivations(**kw)
    fc = corr.batch(0, 50000, return_codes=True)[1] > 0
    fi = ind.batch(0, 50000, return_codes=True)[1] > 0
    numpy.testing.assert_allclose(fc.mean(axis=0), 0.1, atol=0.01)  # marginals unchanged by the copula
    numpy.testing.assert_allclose(fi.mean(axis=0), 0.1, atol=0.01)
    both_same_group = (fc[:, 0] & fc[:, 1]).mean()
    both_other_group = (fc[:, 0] & fc[:, 4]).mean()
    assert both_same_group > 0.04  # chance would be 0.01
    assert both_other_group == pytest.approx(0.01, abs=0.003)
    assert (fi[:, 0] & fi[:, 1]).mean() == pytest.approx(0.01, abs=0.003)


def test_offset_and_noise():
    base = dict(d_in=32, n_features=100, target_l0=3.0)
    clean = SyntheticActivations(**base, seed=5)
    noisy = SyntheticActivations(**base, seed=5, noise_std=0.1, offset_norm=4.0)
    assert numpy.linalg.norm(noisy.offset) == pytest.approx(4.0, rel=F32_RTOL)
    x, codes = noisy.batch(2, 20000, return_codes=True)
    residual = x - codes @ noisy.directions - noisy.offset
    assert residual.std() == pytest.approx(0.1, rel=0.02) and abs(residual.mean()) < 0.002
    numpy.testing.assert_array_equal(codes, clean.batch(2, 20000, return_codes=True)[1])  # same firing stream
    numpy.testing.assert_allclose(x.mean(axis=0), noisy.offset + noisy.frequencies @ noisy.directions, atol=0.03)


def test_config_validation():
    with pytest.raises(ValueError, match="target_l0"):
        SyntheticActivations(n_features=10, max_freq=0.1, target_l0=2.0)
    with pytest.raises(ValueError, match=r"SyntheticConfig.correlation: expected a value in \[0, 1\), found 1.0"):
        SyntheticActivations(correlation=1.0)
    with pytest.raises(ValueError, match="d_in"):
        SyntheticActivations(d_in=0)
    with pytest.raises(ValueError, match="batch_size"):
        SyntheticActivations().batch(0, 0)
    cfg = dataclasses.replace(SyntheticConfig(), n_features=600)
    assert SyntheticActivations(cfg, seed=9).cfg.seed == 9 and SyntheticActivations(cfg).n_features == 600
    assert SyntheticActivations(cfg.to_dict()).cfg == cfg
