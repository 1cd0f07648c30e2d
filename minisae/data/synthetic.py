"""Synthetic activations with a planted dictionary: data whose true features are known.

Each token is a sparse, non-negative combination of F planted unit directions in R^D (F may
exceed D: features in superposition), plus optional isotropic noise:

    x = sum_i c_i * d_i + b + noise,   c_i = fire_i * magnitude_i >= 0

- Directions d_i: F unit rows, Gaussian then normalised (a random, nearly orthogonal
  overcomplete dictionary).
- Firing: feature i fires with probability p_i = min(max_freq, c * i^-alpha) (i = 1..F, a
  power law capped at max_freq); c is solved so that sum_i p_i = target_l0, so the mean number
  of active true features per token (`expected_l0`) is exactly target_l0.
- Correlation (optional): features are cut into consecutive groups of `group_size` in rank
  order (so group members have similar frequencies). Each group has a shared latent
  z_g ~ N(0, 1) per token; feature i fires iff sqrt(rho) z_g + sqrt(1 - rho) e_i > q_i with
  e_i ~ N(0, 1) and q_i = Phi^-1(1 - p_i): a Gaussian copula. Every marginal stays exactly p_i,
  and members of a group co-fire more often than chance; rho = 0 is independent firing.
- Magnitudes: log-normal with mean `magnitude_mean` and standard deviation `magnitude_std`
  (std 0 gives constant magnitudes), drawn independently per firing.
- Offset b (optional): a fixed random vector of norm `offset_norm` added to every token (real
  activations have a non-zero mean, which the SAE's b_dec must learn).
- Noise (optional): isotropic Gaussian with per-dimension standard deviation `noise_std`.

Reproducibility: the dictionary comes from the stream SeedSequence([seed, 0]); training batch
`index` from SeedSequence([seed, 1, index]); held-out samples from SeedSequence([seed, 2,
offset, chunk]). So `batch(index, batch_size)` is a pure function of (seed, index, batch_size):
a resumed run sees exactly the batches an uninterrupted run would.

Dimensions: B tokens in a batch, D = d_in, F = n_features (planted features).
"""

import math
import statistics
from dataclasses import asdict, dataclass, replace

import numpy

_STREAM_DICTIONARY = 0
_STREAM_TRAIN = 1
_STREAM_HELD_OUT = 2
SAMPLE_CHUNK = 4096  # rows per independent stream chunk in `sample`


@dataclass
class SyntheticConfig:
    d_in: int = 64  # D, width of the activations
    n_features: int = 512  # F, planted features (may exceed d_in)
    freq_exponent: float = 1.0  # alpha in p_i ∝ i^-alpha
    max_freq: float = 0.05  # cap on any feature's firing probability
    target_l0: float = 8.0  # mean number of active true features per token (= sum_i p_i)
    magnitude_mean: float = 1.0  # mean of the log-normal magnitude of a firing feature
    magnitude_std: float = 0.25  # its standard deviation (0 = constant magnitude)
    correlation: float = 0.0  # rho of the group copula (0 = independent firing)
    group_size: int = 4  # features per co-firing group (used when correlation > 0)
    offset_norm: float = 0.0  # norm of a fixed offset added to every token
    noise_std: float = 0.0  # isotropic Gaussian noise per dimension
    seed: int = 0

    def to_dict(self):
        return asdict(self)


def _check_config(cfg):
    def bad(field, expected):
        return ValueError(f"SyntheticConfig.{field}: expected {expected}, found {getattr(cfg, field)!r}")

    for field in ("d_in", "n_features", "group_size"):
        if not isinstance(getattr(cfg, field), (int, numpy.integer)) or getattr(cfg, field) < 1:
            raise bad(field, "a positive integer")
    if not (0.0 < cfg.max_freq <= 1.0):
        raise bad("max_freq", "a probability in (0, 1]")
    if not (0.0 < cfg.target_l0 <= cfg.n_features * cfg.max_freq):
        raise ValueError(
            f"SyntheticConfig.target_l0: expected a value in (0, n_features * max_freq = "
            f"{cfg.n_features * cfg.max_freq:g}] so the capped power law can reach it, found {cfg.target_l0!r}"
        )
    if cfg.freq_exponent < 0:
        raise bad("freq_exponent", "a value >= 0")
    if cfg.magnitude_mean <= 0:
        raise bad("magnitude_mean", "a value > 0")
    if cfg.magnitude_std < 0:
        raise bad("magnitude_std", "a value >= 0")
    if not (0.0 <= cfg.correlation < 1.0):
        raise bad("correlation", "a value in [0, 1)")
    if cfg.offset_norm < 0:
        raise bad("offset_norm", "a value >= 0")
    if cfg.noise_std < 0:
        raise bad("noise_std", "a value >= 0")
    if not isinstance(cfg.seed, (int, numpy.integer)) or cfg.seed < 0:
        raise bad("seed", "a non-negative integer")


def power_law_frequencies(n_features, exponent, max_freq, target_l0):
    """p_i = min(max_freq, c * i^-exponent), i = 1..F, with c solved so that sum(p) = target_l0."""
    base = numpy.arange(1, n_features + 1, dtype=numpy.float64) ** (-exponent)  # (F,)

    def total(c):
        return float(numpy.minimum(max_freq, c * base).sum())

    lo, hi = 0.0, max_freq / base[-1]  # total(hi) = F * max_freq >= target_l0
    for _ in range(200):  # bisection; total(c) is continuous and increasing
        mid = 0.5 * (lo + hi)
        if total(mid) < target_l0:
            lo = mid
        else:
            hi = mid
    return numpy.minimum(max_freq, hi * base)  # (F,)


class SeededSource:
    """The streams every synthetic source shares, given its `cfg.seed` and its `_draw(rng, n,
    return_codes)`: training batches and held-out samples, each a pure function of the seed and
    its index, drawn from independent NumPy generator streams (so resumed runs see the same data)."""

    def batch(self, index, batch_size, *, return_codes=False):
        """Training batch number `index`: float32 (batch_size, D), a pure function of
        (seed, index, batch_size). With return_codes=True also the true codes
        (batch_size, number of true features)."""
        if index < 0 or batch_size < 1:
            raise ValueError(f"batch: expected index >= 0 and batch_size >= 1, found {index}, {batch_size}")
        rng = numpy.random.default_rng([int(self.cfg.seed), _STREAM_TRAIN, int(index)])
        x, codes = self._draw(rng, int(batch_size), return_codes)
        return (x, codes) if return_codes else x

    def sample(self, n, *, offset=0, return_codes=False):
        """n held-out tokens (never equal to training batches): float32 (n, D). Different
        `offset`s give independent samples (e.g. one for the normalising constant, one for
        evaluation); sample(n, offset=o) is a prefix of sample(m, offset=o) for n <= m."""
        if n < 1 or offset < 0:
            raise ValueError(f"sample: expected n >= 1 and offset >= 0, found {n}, {offset}")
        xs, cs = [], []
        for chunk in range(-(-int(n) // SAMPLE_CHUNK)):
            rng = numpy.random.default_rng([int(self.cfg.seed), _STREAM_HELD_OUT, int(offset), chunk])
            x, codes = self._draw(rng, SAMPLE_CHUNK, return_codes)
            xs.append(x)
            cs.append(codes)
        x = numpy.concatenate(xs)[:n]  # (n, D)
        return (x, numpy.concatenate(cs)[:n]) if return_codes else x

    def eval_sample(self, n, *, return_codes=False):
        """The evaluation set: sample(n, offset=1), apart from the default sample (offset 0) that
        training uses for its estimates (normalising constant, geometric median)."""
        return self.sample(n, offset=1, return_codes=return_codes)


class SyntheticActivations(SeededSource):
    """A seeded source of planted-dictionary activations (see the module docstring)."""

    def __init__(self, cfg=None, **overrides):
        """`cfg`: a SyntheticConfig (or a dict of its fields); keyword overrides replace fields."""
        if cfg is None:
            cfg = SyntheticConfig(**overrides)
        elif isinstance(cfg, dict):
            cfg = SyntheticConfig(**{**cfg, **overrides})
        elif overrides:
            cfg = replace(cfg, **overrides)
        _check_config(cfg)
        self.cfg = cfg
        self.d_in = int(cfg.d_in)
        self.n_features = int(cfg.n_features)
        F, D = self.n_features, self.d_in

        rng = numpy.random.default_rng([int(cfg.seed), _STREAM_DICTIONARY])
        dirs = rng.standard_normal((F, D))  # (F, D)
        dirs /= numpy.linalg.norm(dirs, axis=1, keepdims=True)
        self.directions = dirs.astype(numpy.float32)  # (F, D) unit rows, the planted dictionary
        offset = rng.standard_normal(D)  # (D,)
        self.offset = (cfg.offset_norm * offset / numpy.linalg.norm(offset)).astype(numpy.float32)  # (D,)

        self.frequencies = power_law_frequencies(F, cfg.freq_exponent, cfg.max_freq, cfg.target_l0)  # (F,)
        self.expected_l0 = float(self.frequencies.sum())
        self.group = numpy.arange(F) // cfg.group_size  # (F,) group id of each feature
        self._n_groups = int(self.group[-1]) + 1
        normal = statistics.NormalDist()
        # fire iff the copula variable exceeds q_i = Phi^-1(1 - p_i); p_i = 1 means always
        self._quantile = numpy.array(
            [-math.inf if p >= 1.0 else normal.inv_cdf(1.0 - p) for p in self.frequencies],
            dtype=numpy.float32,
        )  # (F,)

        m, s = cfg.magnitude_mean, cfg.magnitude_std
        self._log_sigma = math.sqrt(math.log1p((s / m) ** 2))
        self._log_mu = math.log(m) - 0.5 * self._log_sigma**2

    # ---------------------------------------------------------------------------------------
    def _draw(self, rng, n, return_codes):
        """n tokens from generator `rng`: (x (n, D) float32, codes (n, F) float32 or None)."""
        cfg, F = self.cfg, self.n_features
        if cfg.correlation > 0.0:
            rho = cfg.correlation
            shared = rng.standard_normal((n, self._n_groups), dtype=numpy.float32)  # (n, G)
            shared = numpy.repeat(shared, cfg.group_size, axis=1)[:, :F]  # (n, F): z_g of each feature
            own = rng.standard_normal((n, F), dtype=numpy.float32)  # (n, F)
            u = math.sqrt(rho) * shared + math.sqrt(1.0 - rho) * own  # (n, F), each ~ N(0, 1)
            fire = u > self._quantile  # (n, F)
        else:
            fire = rng.random((n, F)) < self.frequencies  # (n, F)
        rows, cols = numpy.nonzero(fire)  # active (token, feature) pairs
        mags = numpy.exp(self._log_mu + self._log_sigma * rng.standard_normal(rows.size))  # (nnz,)
        codes = numpy.zeros((n, F), dtype=numpy.float32)  # (n, F)
        codes[rows, cols] = mags
        x = codes @ self.directions + self.offset  # (n, F) @ (F, D) -> (n, D)
        if cfg.noise_std > 0.0:
            x += (cfg.noise_std * rng.standard_normal((n, self.d_in))).astype(numpy.float32)
        return x.astype(numpy.float32, copy=False), (codes if return_codes else None)

    def sae_metadata(self):
        """What a trained SAE's cfg.json metadata records about this source."""
        return {"synthetic_config": self.cfg.to_dict()}

    def __repr__(self):
        return (
            f"SyntheticActivations(d_in={self.d_in}, n_features={self.n_features}, "
            f"expected_l0={self.expected_l0:.3g}, seed={self.cfg.seed})"
        )
