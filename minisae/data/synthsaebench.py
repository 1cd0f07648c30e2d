"""SynthSAEBench in NumPy: realistic synthetic activations with known true features.

The recipe of Chanin & Garriga-Alonso, "SynthSAEBench" (arXiv 2602.14687), as SAELens
implements it in `sae_lens/synthetic/` (6.37-6.54). Unlike a planted dictionary with fewer
features than latents, it has what real activations have: far more true features than any SAE
has latents (superposition), Zipfian firing, a hierarchy with mutually exclusive children, and
correlated firing. Each token is

    x = a @ Dict + b,   a in R^N, a >= 0 (no noise, no normalisation)

built in this order (N features, D = d_in, R = correlation rank):

1. Dictionary (N, D): unit rows of N(0, I_D), then `ortho_steps` Adam steps (lr `ortho_lr`,
   betas (0.9, 0.999)) on  sum_{i != j} (d_i . d_j)^2 + N * sum_i (|d_i|^2 - 1)^2,  the Gram
   matrix computed `ortho_chunk` rows at a time; rows renormalised at the end. Bias b: a random
   direction of norm `bias_norm`.
2. Base firing probability (Zipf): p_i = p_min + (p_max - p_min) (r^-e - N^-e) / (1 - N^-e),
   r = i + 1, so feature 0 is the most frequent.
3. Hierarchy: `n_roots` trees, branching `branching`, `depth` levels below the roots, indices
   assigned breadth first (all roots, then all their children, ...); the rest are independent.
   Every parent's children are mutually exclusive. Probability compensation: a non-root child
   fires (before the hierarchy is applied) with q_i = min(1, p_i / p_par (1 + sum_{siblings j}
   p_j / p_par)), so that its rate after gating and exclusion comes near p_i.
4. Correlated firing, a low-rank Gaussian copula: F (N, R) with N(0, corr_scale^2) entries
   (scaled down if a row's squared norm passes 0.99), d_i = 1 - |F_i|^2. Per token
   z = F eps + sqrt(d) * eta (eps ~ N(0, I_R), eta ~ N(0, I_N)), so z_i ~ N(0, 1), and feature
   i fires iff z_i > Phi^-1(1 - q_i) (= sqrt(2) erfinv(1 - 2 q_i)).
5. Magnitudes of the firing features: ReLU(mu_i + sigma_i xi), mu = linspace(mag_mean_start,
   mag_mean_end) over the index, sigma_i = |mag_std_mean + mag_std_std g_i| drawn once.
6. Hierarchy applied top down, level by level: among an active parent's active children one,
   chosen uniformly, stays on (mutual exclusion); a child is multiplied by a_parent / mu_parent
   (0 when the parent is off; "parent scaling", the v2 SynthSAEBench-16k model); ReLU at the end.

Presets (PRESETS): `synthsaebench-16k` is the published SynthSAEBench-16k (N = 16,384,
D = 768); `synthsaebench-cpu` keeps its proportions at a size two CPU cores can train a sweep on
(N = 2,048, D = 96: N/D = 21.3 as published, 16 roots so the trees cover the same 66% of the
features; see docs/pipeline.md).

Reproducibility: the model (dictionary, bias, copula factor, magnitudes) comes from
SeedSequence([seed, 10 + k]); training batch `index` from SeedSequence([seed, 1, index]);
held-out samples from SeedSequence([seed, 2, offset, chunk]). `batch(index, B)` is a pure
function of (seed, index, B). Generation is vectorised: no Python loop over features or tokens
(one loop over the `depth` hierarchy levels).

Legend: n tokens, N features, D = d_in, R copula rank, G sibling groups, b = branching.
"""

import dataclasses
import math
import statistics
from dataclasses import asdict, dataclass

import numpy

from minisae.data.synthetic import SeededSource

_STREAM_DICTIONARY, _STREAM_BIAS, _STREAM_COPULA, _STREAM_MAGNITUDE = 10, 11, 12, 13
DRAW_ROWS = 1024  # rows drawn at once inside a batch: bounds the (rows, N) temporaries


@dataclass
class SynthSAEBenchConfig:
    n_features: int = 16384  # N, true features
    d_in: int = 768  # D, width of the activations
    p_max: float = 0.4  # base firing probability of feature 0
    p_min: float = 5e-4  # ... of feature N - 1
    zipf_exponent: float = 0.5  # e
    n_roots: int = 128  # hierarchy trees (0 = no hierarchy)
    branching: int = 4  # children per parent
    depth: int = 3  # levels below the roots
    corr_rank: int = 25  # R (0 = independent firing)
    corr_scale: float = 0.1  # standard deviation of the copula factor's entries
    mag_mean_start: float = 5.0  # mean magnitude of feature 0
    mag_mean_end: float = 4.0  # ... of feature N - 1
    mag_std_mean: float = 0.5  # sigma_i = |mag_std_mean + mag_std_std * g_i|
    mag_std_std: float = 0.5
    bias_norm: float = 0.5  # norm of b
    ortho_steps: int = 100  # Adam steps of the dictionary orthogonalisation (0 = plain Gaussian)
    ortho_lr: float = 3e-4
    ortho_chunk: int = 1024  # Gram rows per chunk
    seed: int = 0

    def to_dict(self):
        return asdict(self)


PRESETS = {
    "synthsaebench-16k": {},
    "synthsaebench-cpu": {"n_features": 2048, "d_in": 96, "n_roots": 16},
}


def preset_config(name, **overrides):
    """The SynthSAEBenchConfig of preset `name` with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown SynthSAEBench preset {name!r}: expected one of {sorted(PRESETS)}")
    return SynthSAEBenchConfig(**{**PRESETS[name], **overrides})


def _check_config(c):
    def bad(field, expected):
        return ValueError(f"SynthSAEBenchConfig.{field}: expected {expected}, found {getattr(c, field)!r}")

    for field in ("n_features", "d_in", "branching", "ortho_chunk"):
        v = getattr(c, field)
        if not isinstance(v, (int, numpy.integer)) or v < (2 if field == "branching" else 1):
            raise bad(field, "an integer >= 2" if field == "branching" else "a positive integer")
    for field in ("n_roots", "depth", "corr_rank", "ortho_steps", "seed"):
        v = getattr(c, field)
        if not isinstance(v, (int, numpy.integer)) or v < 0:
            raise bad(field, "a non-negative integer")
    if not 0.0 < c.p_min < c.p_max <= 1.0:
        raise ValueError(f"SynthSAEBenchConfig: expected 0 < p_min < p_max <= 1, found {c.p_min!r}, {c.p_max!r}")
    if not c.zipf_exponent > 0:
        raise bad("zipf_exponent", "a value > 0")
    for field in ("corr_scale", "mag_std_std", "bias_norm", "ortho_lr"):
        if not getattr(c, field) >= 0:
            raise bad(field, "a value >= 0")
    if not (c.mag_mean_start > 0 and c.mag_mean_end > 0):
        raise ValueError("SynthSAEBenchConfig: mag_mean_start and mag_mean_end must be > 0")
    if hierarchy_size(c) > c.n_features:
        raise ValueError(f"SynthSAEBenchConfig: the hierarchy needs {hierarchy_size(c)} features "
                         f"(n_roots × (1 + b + … + b^depth)) but n_features = {c.n_features}")


def hierarchy_size(c):
    """Features inside the trees: n_roots (1 + b + ... + b^depth)."""
    return c.n_roots * sum(c.branching ** k for k in range(c.depth + 1))


# ---------------------------------------------------------------------------------------------
# the model's fixed parts

def zipf_probabilities(n, exponent, p_max, p_min):
    """p_i = p_min + (p_max - p_min) (r^-e - N^-e) / (1 - N^-e), r = 1..N: float64 (N,)."""
    r = numpy.arange(1, n + 1, dtype=numpy.float64)
    if n == 1:
        return numpy.array([p_max])
    tail = float(n) ** -exponent
    return p_min + (p_max - p_min) * (r ** -exponent - tail) / (1.0 - tail)


def hierarchy_levels(c):
    """Breadth-first trees: a list, per parent level, of (parents (G,), children (G, b)) int64.

    Level k's parents are the features of depth k; roots are 0..n_roots-1 and each next level
    follows the previous one in index order (a parent's children are consecutive)."""
    levels, start, count = [], 0, c.n_roots
    for _ in range(c.depth):
        parents = numpy.arange(start, start + count, dtype=numpy.int64)  # (G,)
        first = start + count
        children = first + numpy.arange(count * c.branching, dtype=numpy.int64).reshape(count, c.branching)  # (G, b)
        levels.append((parents, children))
        start, count = first, count * c.branching
    return levels if c.n_roots > 0 else []


def compensated_probabilities(p, levels):
    """q_i = min(1, p_i / p_par (1 + sum_{siblings j != i} p_j / p_par)); roots and independent
    features keep p_i (SAELens' compensation, from the *base* probabilities)."""
    q = p.copy()
    for parents, children in levels:
        pc = p[children]  # (G, b)
        pp = p[parents][:, None]  # (G, 1)
        others = pc.sum(axis=1, keepdims=True) - pc  # (G, b)
        q[children] = numpy.minimum(1.0, pc / pp * (1.0 + others / pp))
    return q


def normal_quantile(u):
    """Phi^-1(u) elementwise, float64 (stdlib's Wichura AS241, accurate to float64); -inf at 0,
    +inf at 1. Called once per feature at construction, never per batch."""
    nd = statistics.NormalDist()

    def one(v):
        if v <= 0.0:
            return -math.inf
        if v >= 1.0:
            return math.inf
        return nd.inv_cdf(v)

    u = numpy.asarray(u, dtype=numpy.float64)
    return numpy.frompyfunc(one, 1, 1)(u).astype(numpy.float64)


def normal_cdf(x):
    """Phi(x) elementwise, float64 (math.erfc per element)."""
    x = numpy.asarray(x, dtype=numpy.float64)
    return numpy.frompyfunc(lambda v: 0.5 * math.erfc(-v / math.sqrt(2.0)), 1, 1)(x).astype(numpy.float64)


def orthogonalize(dirs, *, steps, lr, chunk=1024, betas=(0.9, 0.999), eps=1e-8):
    """`steps` Adam steps on L = sum_{i != j} (d_i.d_j)^2 + N sum_i (|d_i|^2 - 1)^2, rows unit
    at the start and renormalised at the end; float32 (N, D).

    dL/dE = 4 (G - diag G) E + 4 N (diag G - 1) * E with G = E E^T, computed `chunk` rows of G at
    a time so memory stays O(chunk × N)."""
    E = numpy.array(dirs, dtype=numpy.float32)  # (N, D)
    E /= numpy.maximum(numpy.linalg.norm(E, axis=1, keepdims=True), 1e-8)
    n = E.shape[0]
    m, v = numpy.zeros_like(E), numpy.zeros_like(E)  # Adam moments (N, D)
    b1, b2 = betas
    grad = numpy.empty_like(E)  # (N, D)
    for t in range(1, steps + 1):
        for s in range(0, n, chunk):
            Ec = E[s:s + chunk]  # (c, D)
            G = Ec @ E.T  # (c, N)
            rows = numpy.arange(Ec.shape[0])
            diag = G[rows, s + rows].copy()  # (c,) |d_i|^2
            G[rows, s + rows] = 0.0
            grad[s:s + chunk] = 4.0 * (G @ E) + (4.0 * n) * (diag - 1.0)[:, None] * Ec  # (c, D)
        m *= b1
        m += (1 - b1) * grad
        v *= b2
        v += (1 - b2) * grad * grad
        step = lr / (1 - b1 ** t)
        E -= step * m / (numpy.sqrt(v / (1 - b2 ** t)) + eps)
    E /= numpy.maximum(numpy.linalg.norm(E, axis=1, keepdims=True), 1e-8)
    return E


# ---------------------------------------------------------------------------------------------

class SynthSAEBench(SeededSource):
    """A seeded SynthSAEBench source (see the module docstring); a training source for
    minisae.training.train (d_in, batch, sample, eval_sample) whose true features are `directions`."""

    def __init__(self, cfg=None, **overrides):
        """`cfg`: a SynthSAEBenchConfig, a dict of its fields or a preset name; keyword
        overrides replace fields."""
        if cfg is None:
            cfg = SynthSAEBenchConfig(**overrides)
        elif isinstance(cfg, str):
            cfg = preset_config(cfg, **overrides)
        elif isinstance(cfg, dict):
            cfg = SynthSAEBenchConfig(**{**cfg, **overrides})
        elif overrides:
            cfg = dataclasses.replace(cfg, **overrides)
        _check_config(cfg)
        self.cfg = c = cfg
        self.d_in, self.n_features = int(c.d_in), int(c.n_features)
        N, D, seed = self.n_features, self.d_in, int(c.seed)

        dirs = numpy.random.default_rng([seed, _STREAM_DICTIONARY]).standard_normal((N, D), dtype=numpy.float32)
        self.directions = orthogonalize(dirs, steps=c.ortho_steps, lr=c.ortho_lr, chunk=c.ortho_chunk)  # (N, D)
        b = numpy.random.default_rng([seed, _STREAM_BIAS]).standard_normal(D)  # (D,)
        self.bias = (c.bias_norm * b / numpy.linalg.norm(b)).astype(numpy.float32)  # (D,)

        self.base_probability = zipf_probabilities(N, c.zipf_exponent, c.p_max, c.p_min)  # (N,) p
        self.levels = hierarchy_levels(c)
        self.parent = numpy.full(N, -1, dtype=numpy.int64)  # (N,) parent feature, -1 for none
        for parents, children in self.levels:
            self.parent[children] = parents[:, None]
        self._free = numpy.flatnonzero(self.parent < 0)  # roots and independent features
        self.fire_probability = compensated_probabilities(self.base_probability, self.levels)  # (N,) q
        self.threshold = normal_quantile(1.0 - self.fire_probability).astype(numpy.float32)  # (N,)

        rng = numpy.random.default_rng([seed, _STREAM_COPULA])
        R = int(c.corr_rank)
        F = rng.standard_normal((N, R)) * c.corr_scale  # (N, R)
        sq = (F * F).sum(axis=1)  # (N,)
        if R and sq.max() > 0.99:  # keep every d_i >= 0.01
            F *= math.sqrt(0.99 / sq.max())
            sq = (F * F).sum(axis=1)
        self.corr_factor = F.astype(numpy.float32)  # (N, R)
        self.corr_diag_sqrt = numpy.sqrt(1.0 - sq).astype(numpy.float32)  # (N,)

        rng = numpy.random.default_rng([seed, _STREAM_MAGNITUDE])
        self.mag_mean = numpy.linspace(c.mag_mean_start, c.mag_mean_end, N).astype(numpy.float32)  # (N,)
        self.mag_std = numpy.abs(c.mag_std_mean + c.mag_std_std * rng.standard_normal(N)).astype(numpy.float32)  # (N,)
        self.expected_l0 = float(self.expected_firing().sum())

    # -----------------------------------------------------------------------------------------
    def expected_firing(self):
        """The rate at which each feature is finally on, computed from the probabilities as if
        features fired independently (the copula's correlations are weak): float64 (N,).

        on_i = q_i Phi(mu_i / sigma_i) for roots and independent features; a child is on when
        its parent is on, it fires, and it wins the uniform draw among its active siblings:
        on_i = on_par * a_i * E[1 / (1 + K_i)], K_i = number of other active siblings, each
        active with a_j = q_j Phi(mu_j / sigma_j) independently."""
        mu, sd = self.mag_mean.astype(numpy.float64), self.mag_std.astype(numpy.float64)
        alive = numpy.where(sd > 0, normal_cdf(mu / numpy.maximum(sd, 1e-300)), (mu > 0).astype(numpy.float64))
        act = self.fire_probability * alive  # (N,) fires with a positive magnitude
        on = act.copy()
        for parents, children in self.levels:
            a = act[children]  # (G, b)
            G, b = a.shape
            win = numpy.empty_like(a)  # (G, b) E[1/(1+K_i)]
            for i in range(b):  # b is the branching factor (4), not a feature count
                others = numpy.delete(a, i, axis=1)  # (G, b-1)
                dist = numpy.zeros((G, b))  # Poisson-binomial distribution of K_i
                dist[:, 0] = 1.0
                for j in range(b - 1):
                    pj = others[:, j:j + 1]
                    dist = dist * (1 - pj) + numpy.concatenate([numpy.zeros((G, 1)), dist[:, :-1]], axis=1) * pj
                win[:, i] = (dist / numpy.arange(1, b + 1)).sum(axis=1)
            on[children] = on[parents][:, None] * a * win
        return on

    def _codes(self, rng, n):
        """True feature activations of n tokens: a float32 (n, N), non-negative, and its non-zero
        entries (rows, cols, vals). Only features that can survive are given magnitudes: a child
        is a candidate when it fires and its parent is on, so the many firings the hierarchy
        would zero (compensation pushes children's q near 1) cost nothing."""
        N, R = self.n_features, self.corr_factor.shape[1]
        z = rng.standard_normal((n, N), dtype=numpy.float32)  # (n, N) eta
        z *= self.corr_diag_sqrt
        if R:
            z += rng.standard_normal((n, R), dtype=numpy.float32) @ self.corr_factor.T  # (n, R) @ (R, N)
        fire = z > self.threshold  # (n, N) the copula's firing, before the hierarchy
        a = numpy.zeros((n, N), dtype=numpy.float32)  # (n, N)
        rows, cols = numpy.nonzero(fire[:, self._free])  # roots and independent features
        cols = self._free[cols]
        vals = numpy.maximum(self._magnitudes(rng, cols), 0.0)  # (nnz,)
        a[rows, cols] = vals
        found = [(rows, cols, vals)]
        for parents, children in self.levels:
            found.append(self._apply_level(rng, a, fire, parents, children))
        rows, cols, vals = (numpy.concatenate(v) for v in zip(*found))
        keep = vals > 0
        return a, (rows[keep], cols[keep], vals[keep])

    def _magnitudes(self, rng, cols):
        """mu_i + sigma_i xi for the features `cols` (before the ReLU): float32 (len(cols),)."""
        return self.mag_mean[cols] + self.mag_std[cols] * rng.standard_normal(cols.size, dtype=numpy.float32)

    def _apply_level(self, rng, a, fire, parents, children):
        """One level of the hierarchy, in place on a (n, N): children that fire under an active
        parent get a magnitude; among each parent's active children one, chosen uniformly, stays
        (mutual exclusion); it is multiplied by a_parent / mu_parent. Returns its (rows, cols, vals)."""
        par = a[:, parents]  # (n, G) 0 where the parent is off
        cand = fire[:, children] & (par > 0)[:, :, None]  # (n, G, b)
        tok, grp, sib = numpy.nonzero(cand)
        mags = self._magnitudes(rng, children[grp, sib])  # (k,)
        active = numpy.zeros_like(cand)  # (n, G, b) fired, parent on, magnitude > 0
        active[tok, grp, sib] = mags > 0
        conflict = numpy.nonzero(active.sum(axis=2) > 1)  # (token, group) pairs with >1 active
        if conflict[0].size:
            c = active[conflict]  # (m, b)
            score = numpy.where(c, rng.random(c.shape), -1.0)  # (m, b)
            keep = numpy.zeros_like(c)
            keep[numpy.arange(c.shape[0]), score.argmax(axis=1)] = True
            active[conflict] = keep
        on = active[tok, grp, sib]  # (k,) the candidates that stay
        tok, grp, sib, mags = tok[on], grp[on], sib[on], mags[on]
        cols = children[grp, sib]
        vals = mags * (par[tok, grp] / self.mag_mean[parents[grp]])  # scaled by a_parent / mu_parent
        a[tok, cols] = vals
        return tok, cols, vals

    def _draw(self, rng, n, return_codes):
        """n tokens from `rng`: x (n, D) float32 and, if asked, the codes (n, N) float32."""
        xs, codes = [], []
        for s in range(0, n, DRAW_ROWS):
            a, (rows, cols, vals) = self._codes(rng, min(DRAW_ROWS, n - s))  # (m, N)
            order = numpy.argsort(rows, kind="stable")
            rows, cols, vals = rows[order], cols[order], vals[order]
            contrib = vals[:, None] * self.directions[cols]  # (nnz, D)
            x = numpy.zeros((a.shape[0], self.d_in), dtype=numpy.float32)  # (m, D)
            if rows.size:
                starts = numpy.flatnonzero(numpy.r_[True, rows[1:] != rows[:-1]])
                x[rows[starts]] = numpy.add.reduceat(contrib, starts, axis=0)
            xs.append(x + self.bias)
            if return_codes:
                codes.append(a)
        x = numpy.concatenate(xs) if len(xs) > 1 else xs[0]
        return x, (numpy.concatenate(codes) if len(codes) > 1 else codes[0]) if return_codes else None

    def describe(self):
        return {"type": "synthsaebench", "config": self.cfg.to_dict(), "expected_l0": round(self.expected_l0, 4)}

    def sae_metadata(self):
        return {"synthsaebench_config": self.cfg.to_dict()}

    def __repr__(self):
        return (f"SynthSAEBench(n_features={self.n_features}, d_in={self.d_in}, "
                f"expected_l0={self.expected_l0:.3g}, seed={self.cfg.seed})")


# ---------------------------------------------------------------------------------------------
# the same samples as an activation cache (the `minisae cache` format)

def write_cache(source, folder, n_tokens, *, batch_size=4096, shard_tokens=65536, progress=False):
    """Write training batches 0, 1, ... of `source` (batch_size rows each, the last cut) as an
    activation cache: float32 shards plus manifest.json, the format `minisae cache` writes and
    minisae.data.activations.ActivationStore reads, so any trainer can use the samples. Rows
    [i·batch_size, (i+1)·batch_size) are exactly source.batch(i, batch_size).

    A folder holding a complete cache of the same source and size is reused as it is (returns
    its manifest); any other existing cache is refused. Shards and the manifest are written to
    temporary names and renamed; the manifest comes last."""
    from pathlib import Path

    from minisae.data.activations import FORMAT, MANIFEST, ActivationsError, _write_json_atomic, _write_shard
    from minisae.progress import progress_bar

    folder = Path(folder)
    n_tokens, batch_size, shard_tokens = int(n_tokens), int(batch_size), int(shard_tokens)
    if n_tokens < 1 or batch_size < 1 or shard_tokens < 1:
        raise ValueError(f"write_cache: expected positive n_tokens, batch_size and shard_tokens, "
                         f"found {n_tokens}, {batch_size}, {shard_tokens}")
    desc = {"format": FORMAT, "model": f"synthsaebench (seed {source.cfg.seed})", "site": "synthetic",
            "layer": None, "kind": "synthetic", "d_in": source.d_in, "dtype": "float32",
            "source": source.describe(), "batch_size": batch_size}
    man_path = folder / MANIFEST
    if man_path.exists():
        import json

        old = json.loads(man_path.read_text())
        same = all(old.get(k) == v for k, v in desc.items() if k != "format") and old.get("count") == n_tokens
        if same and old.get("complete"):
            return old
        raise ActivationsError(f"{folder} already holds an activation cache of other data or size; "
                               "choose another folder")
    folder.mkdir(parents=True, exist_ok=True)
    shards, buf, buffered, written = [], [], 0, 0
    n_batches = -(-n_tokens // batch_size)
    bar = progress_bar(n_batches, enabled=bool(progress), desc="synthetic cache", unit="batch")
    try:
        for i in range(n_batches):
            x = source.batch(i, batch_size)[: n_tokens - i * batch_size]  # (<= B, D)
            buf.append(x)
            buffered += x.shape[0]
            while buffered >= shard_tokens or (i == n_batches - 1 and buffered):
                rows = numpy.concatenate(buf)
                take = min(shard_tokens, rows.shape[0])
                name = f"shard_{len(shards):05d}.npy"
                _write_shard(folder / name, numpy.ascontiguousarray(rows[:take]))
                shards.append({"file": name, "count": take})
                written += take
                buf, buffered = ([rows[take:]] if take < rows.shape[0] else []), rows.shape[0] - take
            bar.update(1)
    finally:
        bar.close()
    man = {**desc, "count": written, "complete": True, "shards": shards}
    _write_json_atomic(man_path, man)
    return man
