"""Evaluation metrics for SAEs (L0, FVU, shrinkage, firing, feature recovery), on NumPy or CuPy
arrays, accumulated in float64.

Dimensions: B tokens, D = d_in, M = d_sae (latents), F planted features (synthetic data).

- L0: mean number of non-zero latents per token.
- FVU: sum_b ||x_b - xhat_b||^2 / sum_b ||x_b - mean_tokens(x)||^2. The mean is the mean over
  tokens (a D-vector), not the mean of all entries and not per batch: predicting every token by
  the dataset mean scores exactly 1. Across batches the denominator is combined with Chan's
  parallel-variance formula, so it never cancels catastrophically.
- MSE: mean over tokens of sum over dimensions of (x - xhat)^2 (the training loss's term).
- Relative reconstruction bias gamma = E||xhat||^2 / E[xhat . x] (1 = no shrinkage).
- Firing frequency per latent; dead = never fired in the accumulated window; dense = active on
  more than 10% of tokens.
- Feature recovery (synthetic data): for each true direction, the best cosine similarity with
  any decoder row; mean max cosine similarity (MMCS) and the fraction above a cut-off.
- Ground truth (SynthSAEBench's definitions, Chanin & Garriga-Alonso, arXiv 2602.14687; MCC as in
  arXiv 2505.20254): explained variance EV = 1 - FVU; shrinkage = mean over tokens of
  ||xhat|| / ||x||; MCC = mean |cos| over the one-to-one matching of decoder rows to true features
  that maximises the total |cos| (Hungarian algorithm: scipy, the optional extra
  `minisae[metrics]`); each latent's true feature = the argmax |cos|; per latent precision =
  P(its feature fires | it fires), recall = P(it fires | its feature fires), F1 their harmonic
  mean, each averaged over latents with an undefined value counting 0; uniqueness = distinct
  argmax features / M.
"""

import math

import numpy

from minisae.errors import DependencyError
from minisae.xp import asarray, to_numpy, xp_of

DENSE_FREQ = 0.1  # a latent active on more than this fraction of tokens is "dense"


def _rows(a):
    """View (..., W) as (N, W)."""
    return a.reshape(-1, a.shape[-1])


def _check_pair(x, xhat):
    if x.shape != xhat.shape:
        raise ValueError(f"x and xhat must have the same shape: found {x.shape} and {xhat.shape}")


def l0(f):
    """Mean number of non-zero latents per token; f (..., M)."""
    f = _rows(f)  # (N, M)
    xp = xp_of(f)
    return float(xp.count_nonzero(f)) / f.shape[0]


def mse(x, xhat):
    """Mean over tokens of sum over dimensions of (x - xhat)^2."""
    _check_pair(x, xhat)
    x, xhat = _rows(x), _rows(xhat)  # (N, D)
    xp = xp_of(x)
    diff = x.astype(xp.float64) - xhat.astype(xp.float64)  # (N, D)
    return float(xp.sum(diff * diff)) / x.shape[0]


def fvu(x, xhat):
    """Fraction of variance unexplained: sum ||x - xhat||^2 / sum ||x - mean_tokens(x)||^2."""
    _check_pair(x, xhat)
    x, xhat = _rows(x), _rows(xhat)  # (N, D)
    xp = xp_of(x)
    x64 = x.astype(xp.float64)  # (N, D)
    diff = x64 - xhat.astype(xp.float64)  # (N, D)
    centred = x64 - xp.mean(x64, axis=0, keepdims=True)  # (N, D) - (1, D)
    return float(xp.sum(diff * diff)) / float(xp.sum(centred * centred))


def relative_reconstruction_bias(x, xhat):
    """gamma = E||xhat||^2 / E[xhat . x]; below 1 means the SAE shrinks its reconstructions."""
    _check_pair(x, xhat)
    x, xhat = _rows(x), _rows(xhat)  # (N, D)
    xp = xp_of(x)
    xh64 = xhat.astype(xp.float64)  # (N, D)
    return float(xp.sum(xh64 * xh64)) / float(xp.sum(xh64 * x.astype(xp.float64)))


class EvalAccumulator:
    """Streaming evaluation over batches: update(x, xhat, f) per batch, then summary().

    Sums stay on the device of `xp` in float64 (counts in int64) and are read back only in
    summary() / firing_freq, so a GPU evaluation loop does not synchronise per batch."""

    def __init__(self, d_sae, xp=numpy):
        self.d_sae = int(d_sae)
        self.xp = xp
        self.n_tokens = 0
        self.fire_count = xp.zeros(self.d_sae, dtype=xp.int64)  # (M,)
        self.sum_sq_err = xp.zeros((), dtype=xp.float64)  # sum ||x - xhat||^2
        self.sum_xhat_sq = xp.zeros((), dtype=xp.float64)  # sum ||xhat||^2
        self.sum_xhat_dot_x = xp.zeros((), dtype=xp.float64)  # sum xhat . x
        self.nnz = xp.zeros((), dtype=xp.int64)  # sum over tokens of ||f||_0
        self.mean_x = None  # (D,) running mean over tokens
        self.m2_x = xp.zeros((), dtype=xp.float64)  # sum ||x - mean_x||^2 so far
        self.sum_norm_ratio = xp.zeros((), dtype=xp.float64)  # sum ||xhat_b|| / ||x_b|| (x_b != 0)
        self.n_ratio = xp.zeros((), dtype=xp.int64)

    def update(self, x, xhat, f):
        """Add a batch: x, xhat (..., D) and f (..., M) (leading dimensions are flattened)."""
        _check_pair(x, xhat)
        xp = self.xp
        x, xhat, f = _rows(x), _rows(xhat), _rows(f)  # (B, D), (B, D), (B, M)
        if f.shape[1] != self.d_sae:
            raise ValueError(f"EvalAccumulator: expected f with {self.d_sae} latents, found shape {f.shape}")
        if f.shape[0] != x.shape[0]:
            raise ValueError(f"EvalAccumulator: x has {x.shape[0]} tokens but f has {f.shape[0]}")
        B = x.shape[0]
        if B == 0:
            return
        x64 = x.astype(xp.float64)  # (B, D)
        xh64 = xhat.astype(xp.float64)  # (B, D)
        diff = x64 - xh64  # (B, D)
        self.sum_sq_err += xp.sum(diff * diff)
        self.sum_xhat_sq += xp.sum(xh64 * xh64)
        self.sum_xhat_dot_x += xp.sum(xh64 * x64)
        norm_x = xp.sqrt(xp.sum(x64 * x64, axis=1))  # (B,)
        ok = norm_x > 1e-6
        self.sum_norm_ratio += xp.sum(xp.where(ok, xp.sqrt(xp.sum(xh64 * xh64, axis=1)) / xp.where(ok, norm_x, 1.0), 0.0))
        self.n_ratio += xp.sum(ok, dtype=xp.int64)
        active = f != 0  # (B, M)
        self.fire_count += xp.sum(active, axis=0, dtype=xp.int64)  # (M,)
        self.nnz += xp.sum(active, dtype=xp.int64)
        # Chan et al.: merge (n_a, mean_a, M2_a) with this batch's (n_b, mean_b, M2_b)
        mean_b = xp.mean(x64, axis=0)  # (D,)
        centred = x64 - mean_b  # (B, D)
        m2_b = xp.sum(centred * centred)
        n_a, n = self.n_tokens, self.n_tokens + B
        if self.mean_x is None:
            self.mean_x, self.m2_x = mean_b, m2_b
        else:
            delta = mean_b - self.mean_x  # (D,)
            self.m2_x = self.m2_x + m2_b + xp.sum(delta * delta) * (n_a * B / n)
            self.mean_x = self.mean_x + delta * (B / n)  # (D,)
        self.n_tokens = n

    @property
    def firing_freq(self):
        """Fraction of tokens on which each latent was non-zero: NumPy float64 (M,)."""
        count = to_numpy(self.fire_count).astype(numpy.float64)  # (M,)
        return count / self.n_tokens if self.n_tokens else count

    def summary(self):
        """dict of Python floats: l0, fvu, explained_variance (1 - fvu), mse, dead_frac, dense_frac,
        rel_recon_bias, shrinkage (mean ||xhat|| / ||x||), n_tokens."""
        if self.n_tokens == 0:
            raise ValueError("EvalAccumulator.summary: no tokens were added (call update first)")
        n = self.n_tokens
        freq = self.firing_freq  # (M,)
        m2 = float(self.m2_x)
        return {
            "l0": float(self.nnz) / n,
            "fvu": float(self.sum_sq_err) / m2 if m2 > 0 else float("nan"),
            "explained_variance": 1.0 - float(self.sum_sq_err) / m2 if m2 > 0 else float("nan"),
            "mse": float(self.sum_sq_err) / n,
            "dead_frac": float(numpy.mean(freq == 0)),
            "dense_frac": float(numpy.mean(freq > DENSE_FREQ)),
            "rel_recon_bias": (float(self.sum_xhat_sq) / float(self.sum_xhat_dot_x)  # NaN for an all-zero xhat
                               if float(self.sum_xhat_dot_x) != 0 else float("nan")),
            "shrinkage": float(self.sum_norm_ratio) / int(self.n_ratio) if int(self.n_ratio) else float("nan"),
            "n_tokens": n,
        }


def max_cosine_similarity(true_dirs, W_dec, *, chunk=8192):
    """For each true direction (F, D), its largest cosine similarity with any row of W_dec
    (M, D): NumPy float64 (F,). Zero-norm rows count as cosine 0."""
    xp = xp_of(W_dec)
    T = asarray(true_dirs, xp).astype(xp.float64)  # (F, D)
    W = W_dec.astype(xp.float64)  # (M, D)
    if T.ndim != 2 or W.ndim != 2 or T.shape[1] != W.shape[1]:
        raise ValueError(f"feature_recovery: expected true_dirs (F, D) and W_dec (M, D), found {T.shape} and {W.shape}")
    T = T / xp.maximum(xp.linalg.norm(T, axis=1, keepdims=True), 1e-30)  # (F, D)
    best = xp.full(T.shape[0], -numpy.inf, dtype=xp.float64)  # (F,)
    for start in range(0, W.shape[0], chunk):
        Wc = W[start : start + chunk]  # (m, D)
        Wc = Wc / xp.maximum(xp.linalg.norm(Wc, axis=1, keepdims=True), 1e-30)  # (m, D)
        best = xp.maximum(best, xp.max(T @ Wc.T, axis=1))  # (F, D) @ (D, m) -> (F, m) -> (F,)
    return to_numpy(best)


def feature_recovery(true_dirs, W_dec, cutoff=0.9):
    """Mean max cosine similarity between the true directions and the decoder rows, and the
    fraction of true features whose best match reaches `cutoff`."""
    best = max_cosine_similarity(true_dirs, W_dec)  # (F,)
    return {"mmcs": float(best.mean()), "frac_recovered": float(numpy.mean(best >= cutoff))}


# ---------------------------------------------------------------------------------------------
# ground truth (SynthSAEBench)

def abs_cosine(W_dec, true_dirs):
    """|cos| between every decoder row (M, D) and every true feature (N, D): NumPy float64 (M, N).
    Zero-norm rows count as cosine 0."""
    W = numpy.asarray(to_numpy(W_dec), dtype=numpy.float64)  # (M, D)
    T = numpy.asarray(to_numpy(true_dirs), dtype=numpy.float64)  # (N, D)
    if W.ndim != 2 or T.ndim != 2 or W.shape[1] != T.shape[1]:
        raise ValueError(f"expected W_dec (M, D) and true_dirs (N, D), found {W.shape} and {T.shape}")
    W = W / numpy.maximum(numpy.linalg.norm(W, axis=1, keepdims=True), 1e-30)
    T = T / numpy.maximum(numpy.linalg.norm(T, axis=1, keepdims=True), 1e-30)
    return numpy.abs(W @ T.T)  # (M, N)


def best_match(W_dec, true_dirs):
    """Each latent's true feature: argmax over features of |cos|, int64 (M,)."""
    return abs_cosine(W_dec, true_dirs).argmax(axis=1)


def uniqueness(W_dec, true_dirs):
    """Distinct best-matching true features / M (1 = every latent tracks its own feature)."""
    match = best_match(W_dec, true_dirs)
    return len(numpy.unique(match)) / match.size


def mcc(W_dec, true_dirs):
    """Mean |cos| over the one-to-one matching of decoder rows and true features with the
    largest total |cos| (min(M, N) pairs; Hungarian algorithm via scipy, an optional extra)."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise DependencyError("MCC needs scipy for the Hungarian matching: pip install 'minisae[metrics]'") from None
    cos = abs_cosine(W_dec, true_dirs)  # (M, N)
    rows, cols = linear_sum_assignment(cos, maximize=True)
    return float(cos[rows, cols].mean())


class ClassificationAccumulator:
    """Per-latent precision / recall / F1 of each latent as a detector of its best-matching true
    feature, over batches: update(f, codes) with latents f (B, M) and true codes (B, N)."""

    def __init__(self, match):
        self.match = numpy.asarray(match, dtype=numpy.int64)  # (M,) true feature of each latent
        M = self.match.size
        self.tp = numpy.zeros(M, dtype=numpy.int64)  # latent and feature both on
        self.fp = numpy.zeros(M, dtype=numpy.int64)  # latent on, feature off
        self.fn = numpy.zeros(M, dtype=numpy.int64)  # latent off, feature on

    def update(self, f, codes):
        fires = numpy.asarray(to_numpy(f)) != 0  # (B, M)
        truth = numpy.asarray(to_numpy(codes))[:, self.match] > 0  # (B, M) matched feature on
        if fires.shape != truth.shape:
            raise ValueError(f"ClassificationAccumulator: latents {fires.shape} and codes do not fit")
        self.tp += numpy.sum(fires & truth, axis=0)
        self.fp += numpy.sum(fires & ~truth, axis=0)
        self.fn += numpy.sum(~fires & truth, axis=0)

    def summary(self):
        """{"precision", "recall", "f1"}: means over latents, an undefined value counting 0."""
        tp = self.tp.astype(numpy.float64)

        def ratio(a, b):
            return numpy.divide(a, b, out=numpy.zeros_like(a), where=b > 0)

        precision = ratio(tp, tp + self.fp)  # (M,)
        recall = ratio(tp, tp + self.fn)  # (M,)
        f1 = ratio(2 * precision * recall, precision + recall)  # (M,)
        return {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())}


def expected_abs_cosine(d):
    """E|cos| between two independent uniformly random directions in R^d:
    Gamma(d/2) / (sqrt(pi) Gamma((d+1)/2))."""
    return math.exp(math.lgamma(d / 2) - math.lgamma((d + 1) / 2)) / math.sqrt(math.pi)
