"""The Gemma 2 forward pass in NumPy / CuPy, one block top to bottom, with SAE sites.

Matches transformers' eager Gemma2ForCausalLM (models/gemma2/modeling_gemma2.py) in float32
(docs/gemma2.md names the source of every quirk). Dimension legend:

    B batch rows          T tokens per row        N = B*T tokens
    D hidden_size         I intermediate_size     V vocab_size
    H query heads         K key/value heads       G = H // K query heads per kv head
    d head_dim            W sliding_window        L layer index (0-based)

Activations inside a block are kept as (N, D) matrices so every projection is one BLAS call;
attention reshapes to heads and back. Linear weights are stored [out, in] (torch.nn.Linear), so a
projection reads `x @ W.T`: the transposed view of the (memory-mapped) weight, never a copy. For
few tokens `linear` computes it as `(W @ x.T).T` instead, the shape OpenBLAS runs faster there.

Padding: there is no attention mask argument. Rows are expected right-padded (real tokens first):
with causal attention a real token never sees a later pad, so its activations and logits are the
same as without padding; activations at pad positions are meaningless and must be masked by the
caller (cross_entropy takes that mask). Left padding would shift RoPE positions: not supported.
"""

import math

import numpy

from minisae import threads
from minisae.xp import asarray, get_xp, xp_of

from ..sites import SITE_KINDS, parse_site
from .config import Gemma2Config
from .weights import check_shapes, expected_shapes

_ATTN_BYTES = 256 * 2**20  # attention scores are computed for as many batch rows as fit in this
_ATTN_QBLOCK = 128  # longer than 2 blocks: attention by blocks of this many queries (_attention_blocked)
_CE_ELEMS = 2**22  # cross_entropy gathers about this many logits at a time (float64)
_LOSS_ROWS = 1024  # Gemma2Model.loss scores this many tokens at a time ...
_LOSS_COLS = 8192  # ... against this many vocabulary entries at a time: (rows, cols) logits, 32 MiB
# (4096-entry blocks cost 1.27x the GEMM time of the whole head with OpenBLAS, 8192 1.09x, 16384 1.09x)


# ---- the pieces of a block, in the order they run -------------------------------------------------

PASS_BLOCK = 1 << 17  # elements per block of a blocked elementwise pass (512 KiB of float32: in L2)


def rms_norm(x, w1, eps):
    """x * rsqrt(mean(x^2) + eps) * (1 + w) over the last axis; `w1` is (1 + w), precomputed once
    per weight. On NumPy the passes run over cache-sized blocks of rows split over threads
    (by_row_blocks: every row is done exactly as the whole array would be, the same numbers)."""
    xp = _module_of(x)
    if xp is not numpy or not x.flags.c_contiguous or x.dtype != w1.dtype or x.size <= PASS_BLOCK:
        return _rms_norm(x, w1, eps, xp)
    D = x.shape[-1]
    rows, out = x.reshape(-1, D), numpy.empty_like(x)  # (R, D) view, the result
    out_rows = out.reshape(-1, D)  # (R, D) view
    by_row_blocks(lambda r0, r1: _rms_norm(rows[r0:r1], w1, eps, numpy, out=out_rows[r0:r1]), rows.shape[0], D)
    return out


def _rms_norm(x, w1, eps, xp, out=None):
    """rms_norm on one array, into `out` when given."""
    if xp is numpy:  # Gemma2RMSNorm._norm: x.pow(2).mean(-1), as numpy.mean computes it ...
        ms = numpy.add.reduce(x * x, axis=-1, keepdims=True)  # (N, 1)
        numpy.true_divide(ms, numpy.intp(x.shape[-1]), out=ms, casting="unsafe")  # ... without its overhead
    else:
        ms = xp.mean(x * x, axis=-1, keepdims=True)  # (N, 1)
    r = 1.0 / xp.sqrt(ms + eps)  # (N, 1)  rsqrt(... + eps)
    if out is None:
        return (x * r) * w1  # (N, D)  output * (1.0 + weight): Gemma's (1 + w)
    xp.multiply(x, r, out=out)
    out *= w1
    return out


def by_row_blocks(fn, n_rows, row_elems, period=None):
    """fn(r0, r1) for consecutive blocks of rows [r0, r1) covering [0, n_rows): each about
    PASS_BLOCK elements (rows of row_elems each), so a block's passes run in cache; no block
    crosses a multiple of `period` rows (a head, a batch row); the blocks are split over threads
    (minisae.threads), each thread taking a contiguous run of them."""
    per_block = max(1, PASS_BLOCK // max(row_elems, 1))
    period = period or n_rows

    def piece(lo, hi):
        r0 = lo
        while r0 < hi:
            r1 = min(r0 + per_block, hi, (r0 // period + 1) * period)
            fn(r0, r1)
            r0 = r1

    n = threads.threads()
    threads.run(piece, threads.even_pieces(n_rows, n, per_block), n)


def rope_tables(T, head_dim, theta, xp, dtype, factor=1.0):
    """cos, sin (T, 1, d) for positions 0..T-1, inv_freq_i = theta^(-2i/d) / factor, all in `dtype`.

    factor != 1 is linear RoPE scaling (positions divided by factor; Gemma 3 4B+ global layers).
    """
    exponent = xp.arange(0, head_dim, 2, dtype=dtype) / head_dim  # (d/2,)  arange(0, dim, 2) / dim
    inv_freq = 1.0 / (theta ** exponent)  # (d/2,)  compute_default_rope_parameters (float32, not float64)
    if factor != 1.0:
        inv_freq = inv_freq / xp.asarray(factor, dtype=dtype)  # _compute_linear_scaling_rope_parameters
    pos = xp.arange(T, dtype=dtype)  # (T,)  position_ids from 0, no offset
    freqs = pos[:, None] * inv_freq[None, :]  # (T, d/2)  position_ids.float() * inv_freq
    emb = xp.concatenate([freqs, freqs], axis=-1)[:, None, :]  # (T, 1, d)  cat(freqs, freqs)
    return xp.cos(emb), xp.sin(emb)  # (T, 1, d) each, computed in float32


def apply_rope(x, cos, sin):
    """x (B, T, n, d) rotated by "rotate_half": pairs (i, i + d/2), not adjacent pairs; cos and
    sin (T, 1, d). On NumPy the passes run over cache-sized blocks of positions split over
    threads (by_row_blocks; the same numbers as the whole array)."""
    xp = _module_of(x)
    if xp is not numpy or not x.flags.c_contiguous or x.size <= PASS_BLOCK:
        return _apply_rope(x, cos, sin, xp)
    B, T, n, d = x.shape
    rows, out = x.reshape(B * T, n, d), numpy.empty_like(x)  # (B*T, n, d) view, the result
    out_rows = out.reshape(B * T, n, d)  # (B*T, n, d) view

    def block(r0, r1):  # positions r0..r1 of one batch row: t0..t0 + r1 - r0
        t0 = r0 % T
        _apply_rope(rows[r0:r1], cos[t0:t0 + r1 - r0], sin[t0:t0 + r1 - r0], numpy, out=out_rows[r0:r1])

    by_row_blocks(block, B * T, n * d, period=T)
    return out


def _apply_rope(x, cos, sin, xp, out=None):
    """apply_rope on one array (cos, sin broadcast against its leading axis), into `out` when given."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (..., n, d/2) each
    out = xp.multiply(x, cos, out=out)  # (..., n, d)  q * cos
    out[..., :half] -= x2 * sin[..., :half]  # + rotate_half(q) * sin; rotate_half = cat(-x2, x1)
    out[..., half:] += x1 * sin[..., half:]  # (same IEEE result as adding (-x2) * sin)
    return out


def attention_scores_to_probs(s, mask, scale, cap, xp):
    """In place on s (b, K, G, Tq, T): scale, soft-cap, mask (Tq, T), float32 softmax over keys. On NumPy
    the passes run over blocks of query rows that stay in cache, split over threads (every row
    is done exactly as the whole array would be: the same numbers)."""
    if xp is not numpy or not s.flags.c_contiguous:
        return _scores_to_probs(s, mask, scale, cap, xp)
    Tq, T = s.shape[-2], s.shape[-1]  # queries, keys (Tq < T for a block of queries)
    rows = s.reshape(-1, T)  # (R, T) view: row r is query position r % Tq of one head

    def block(r0, r1):  # query rows r0..r1 of one head: positions q0..q0 + r1 - r0
        q0 = r0 % Tq
        _scores_to_probs(rows[r0:r1], mask[q0:q0 + r1 - r0], scale, cap, numpy)

    by_row_blocks(block, rows.shape[0], T, period=Tq)
    return s


def _scores_to_probs(s, mask, scale, cap, xp):
    """attention_scores_to_probs on one array (mask broadcast against s's last two axes)."""
    s *= scale  # matmul(q, kᵀ) * scaling, scaling = query_pre_attn_scalar ** -0.5 (not head_dim)
    if cap is not None:
        s /= cap  # attention soft-cap c * tanh(s / c), c = attn_logit_softcapping ...
        xp.tanh(s, out=s)
        s *= cap  # ... applied BEFORE the mask (eager_attention_forward)
    s += mask  # (T, T) additive: 0 where visible, finfo.min where masked
    s -= s.max(axis=-1, keepdims=True)  # softmax(dim=-1, dtype=float32)
    xp.exp(s, out=s)
    s /= s.sum(axis=-1, keepdims=True)
    return s


LINEAR_SWAP_MAX_TOKENS = 256  # up to this many tokens, linear() runs (W @ x.T).T (measured below)


def linear(x, W, *, c_order=True):
    """x @ W.T for x (N, in) and a weight W (out, in): (N, out).

    The same product either way; for N <= LINEAR_SWAP_MAX_TOKENS it is computed as (W @ x.T).T,
    which OpenBLAS runs 1.4-2.3x faster for N = 16-128 with Gemma 2 2B's MLP weight (9216, 2304)
    and no slower at 512 (docs/benchmarks.md). That result is a transposed (Fortran-ordered)
    view; with c_order it is copied to C order (for the residual stream), otherwise left as is
    for a caller that reshapes (which copies anyway) or only runs elementwise passes over it.
    """
    if x.shape[0] <= LINEAR_SWAP_MAX_TOKENS:
        y = (W @ x.T).T  # (out, in) @ (in, N) -> (out, N), viewed as (N, out)
        return _module_of(x).ascontiguousarray(y) if c_order else y
    return x @ W.T  # (N, in) @ (in, out) -> (N, out)


def gelu_tanh_(x, xp, scratch=None):
    """In place: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), GELU's tanh form (gelu_pytorch_tanh).
    scratch: an array shaped like x for the intermediate (default: a new one)."""
    inner = xp.multiply(x, x, out=scratch)  # (N, I)
    inner *= x  # x^3
    inner *= 0.044715
    inner += x
    inner *= math.sqrt(2.0 / math.pi)
    xp.tanh(inner, out=inner)
    inner += 1.0
    x *= inner
    x *= 0.5
    return x


def gelu_tanh_times_(g, u, xp):
    """In place g = gelu_tanh(g) * u: the gated MLP's act(gate) * up, the same numbers as
    gelu_tanh_(g, xp); g *= u. On NumPy, with g and u laid out alike, the nine elementwise
    passes run block by block over cache-sized blocks (one trip through memory instead of nine)
    and the blocks are split over threads (minisae.threads)."""
    if xp is not numpy or g.strides != u.strides or not (g.flags.c_contiguous or g.flags.f_contiguous):
        gelu_tanh_(g, xp)
        g *= u
        return g
    gf, uf = g.ravel(order="K"), u.ravel(order="K")  # (N*I,) views in memory order, alike

    def piece(lo, hi):
        scratch = numpy.empty(min(PASS_BLOCK, hi - lo), dtype=g.dtype)  # (block,)
        for s in range(lo, hi, PASS_BLOCK):
            e = min(s + PASS_BLOCK, hi)
            gelu_tanh_(gf[s:e], numpy, scratch[:e - s])
            gf[s:e] *= uf[s:e]

    n = threads.threads()
    threads.run(piece, threads.even_pieces(gf.shape[0], n, PASS_BLOCK), n)
    return g


class Gemma2Model:
    """Gemma 2 as arrays: forward(ids) -> soft-capped logits; capture(ids, sites); splices."""

    expected_shapes = staticmethod(expected_shapes)  # {tensor name: shape} a config implies

    def __init__(self, config: Gemma2Config, weights, *, xp=numpy, dtype="float32"):
        """`weights` is {checkpoint tensor name: array} (minisae.models.gemma2.weights.load_weights)."""
        ignored = check_shapes({k: tuple(v.shape) for k, v in weights.items()}, config,
                               expected=self.expected_shapes(config))
        self.config, self.xp, self.dtype = config, xp, numpy.dtype(dtype)
        if self.dtype not in (numpy.float32, numpy.float64):
            raise ValueError(f"dtype: expected 'float32' or 'float64', found {dtype!r}")
        w = {k: asarray(v, xp, self.dtype) for k, v in weights.items() if k not in ignored}
        c = config

        def one_plus(name):  # Gemma2RMSNorm stores w (init 0) and scales by (1 + w)
            return 1.0 + w[name]  # (D,)

        self.embed = w["model.embed_tokens.weight"]  # (V, D)
        self.lm_head = self.embed if c.tie_word_embeddings else w["lm_head.weight"]  # (V, D) tied
        self.final_norm = one_plus("model.norm.weight")  # (D,)
        self.layers = []
        for n in range(c.num_hidden_layers):
            p = f"model.layers.{n}."
            self.layers.append(dict(
                input_norm=one_plus(p + "input_layernorm.weight"),
                q=w[p + "self_attn.q_proj.weight"],  # (H*d, D)
                k=w[p + "self_attn.k_proj.weight"],  # (K*d, D)
                v=w[p + "self_attn.v_proj.weight"],  # (K*d, D)
                o=w[p + "self_attn.o_proj.weight"],  # (D, H*d)
                post_attn_norm=one_plus(p + "post_attention_layernorm.weight"),
                pre_ff_norm=one_plus(p + "pre_feedforward_layernorm.weight"),
                gate=w[p + "mlp.gate_proj.weight"],  # (I, D)
                up=w[p + "mlp.up_proj.weight"],  # (I, D)
                down=w[p + "mlp.down_proj.weight"],  # (D, I)
                post_ff_norm=one_plus(p + "post_feedforward_layernorm.weight"),
            ))
        self._tables = {}  # RoPE tables and masks for the last sequence length seen

    # ---- sites -----------------------------------------------------------------------------------
    def site_width(self, site):
        """Width of the activations at `site`: H*d for attn.hook_z, D for the others."""
        _, kind = self._check_site(site)
        c = self.config
        return c.num_attention_heads * c.head_dim if kind == "attn.hook_z" else c.hidden_size

    def _check_site(self, site):
        layer, kind = parse_site(site)
        if layer >= self.config.num_hidden_layers:
            raise ValueError(f"site {site!r}: layer {layer} out of range (the model has "
                             f"{self.config.num_hidden_layers} layers, 0..{self.config.num_hidden_layers - 1})")
        return layer, kind

    # ---- public entry points ---------------------------------------------------------------------
    def forward(self, ids, splice=None):
        """Logits (B, T, V) after the final soft-cap; `splice={site: fn}` replaces a site's acts by fn(acts)."""
        h, _, (B, T) = self._run(ids, splice=splice, capture=())
        return self._logits(h).reshape(B, T, -1)  # (B, T, V)

    __call__ = forward

    def capture(self, ids, sites, splice=None):
        """Activations at one site (B, T, width) or {site: array} for a list, in one pass.

        Runs only up to the deepest layer needed. With `splice`, captured values are those after
        any splice at the same site (what flows on through the model).
        """
        names = [sites] if isinstance(sites, str) else list(sites)
        if not names:
            raise ValueError("capture: expected a site or a non-empty list of sites, found none")
        _, acts, _ = self._run(ids, splice=splice, capture=names)
        return acts[sites] if isinstance(sites, str) else {s: acts[s] for s in names}

    def loss(self, ids, mask=None, splice=None, *, exclude_ids=None):
        """cross_entropy(forward(ids, splice), ids, mask) without ever holding (B, T, V) logits.

        Only the counted positions are scored, in (_LOSS_ROWS, _LOSS_COLS) blocks of logits
        (see _nll_sum). exclude_ids defaults to the config's PAD, EOS and BOS ids. Returns
        (mean loss, count).
        """
        return self.losses(ids, mask, [splice], exclude_ids=exclude_ids)[0]

    def losses(self, ids, mask=None, splices=(None,), *, exclude_ids=None):
        """[loss(ids, mask, splice=s, exclude_ids=...) for s in splices], the same numbers, with
        the layers below the lowest spliced layer run once for all of them: those layers see the
        same tokens and no splice, so every pass would compute the same residual stream there.
        (A clean pass and an SAE pass spliced at layer 6 of 18 share layers 0-5.)"""
        c = self.config
        if exclude_ids is None:
            exclude_ids = [i for i in (c.pad_token_id, *c.eos_token_ids, c.bos_token_id) if i is not None]
        ids = self._check_ids(ids)
        B, T = ids.shape
        rows, cols, targets = counted_pairs(ids, mask, exclude_ids, (B, T), self.xp)  # (n,) each
        n = int(rows.shape[0])
        splices = list(splices)
        layers = [self._check_site(site)[0] for sp in splices for site in (sp or {})]
        split = min(layers) if layers and len(splices) > 1 else 0  # layers 0..split-1 are shared
        prefix = self._run(ids, splice=None, capture=(), stop=split)[0] if split > 0 else None  # (N, D)
        out = []
        for sp in splices:
            h, _, _ = self._run(ids, splice=sp, capture=(), start=(split, prefix) if split > 0 else None)
            if n == 0:
                out.append((float("nan"), 0))
                continue
            flat = rows * T + cols  # (n,) token index into h
            total = 0.0
            for s0 in range(0, n, _LOSS_ROWS):
                total += self._nll_sum(h[flat[s0:s0 + _LOSS_ROWS]], targets[s0:s0 + _LOSS_ROWS])
            out.append((total / n, n))
        return out

    def _nll_sum(self, h, targets):
        """sum over the rows of h (n, D) of logsumexp(z) - z[target], z = _logits(h) (n, V).

        z is made _LOSS_COLS vocabulary entries at a time: the (V, D) head is read once, the (n, V)
        logits never exist. The log-sum-exp runs online across the blocks: a running max m and a
        running sum s of exp(z - m), rescaled by exp(m_old - m_new) when the max grows; exp in the
        logits' dtype on the block, the running sums in float64. The same value as nll_sum of the
        whole logits (float64 throughout) within float32 rounding (tests/test_gemma2_model.py). On
        NumPy the elementwise passes over a block are split over threads by rows.
        """
        xp, c = self.xp, self.config
        x = rms_norm(h, self.final_norm, c.rms_norm_eps)  # (n, D)  model.norm
        n, V = x.shape[0], self.lm_head.shape[0]
        m = xp.full(n, -numpy.inf)  # (n,) float64 running max
        s = xp.zeros(n)  # (n,) float64 running sum of exp(z - m)
        picked = xp.zeros(n)  # (n,) float64 z[target]
        targets = asarray(targets, xp)
        cap = c.final_logit_softcapping

        def block(z, v0, lo, hi):  # rows lo..hi of the block z (n, Vc) holding vocabulary v0..v0+Vc
            zb = z[lo:hi]  # (r, Vc)
            if cap is not None:
                zb /= cap  # final soft-cap, as in _logits
                xp.tanh(zb, out=zb)
                zb *= cap
            t = targets[lo:hi] - v0  # (r,)
            here = xp.nonzero((t >= 0) & (t < zb.shape[1]))[0]  # rows whose target is in this block
            picked[lo + here] = zb[here, t[here]]
            new = xp.maximum(m[lo:hi], zb.max(axis=-1))  # (r,) float64; a float32 value or m
            zb -= new[:, None].astype(zb.dtype)  # exact cast: new is one of the block's values or m
            xp.exp(zb, out=zb)
            s[lo:hi] = s[lo:hi] * xp.exp(m[lo:hi] - new) + zb.sum(axis=-1)  # (r,)
            m[lo:hi] = new

        nt = threads.threads() if xp is numpy else 1
        bounds = threads.even_pieces(n, nt, 64) if nt > 1 else [0, n]
        for v0 in range(0, V, _LOSS_COLS):
            z = x @ self.lm_head[v0:v0 + _LOSS_COLS].T  # (n, D) @ (D, Vc) -> (n, Vc)  tied head, a block
            threads.run(lambda lo, hi: block(z, v0, lo, hi), bounds, nt)
        return float((m + xp.log(s) - picked).sum())

    # ---- the forward recipe ----------------------------------------------------------------------
    def _run(self, ids, *, splice, capture, start=None, stop=None):
        """(h after the last layer run, {site: acts}, (B, T)). start=(L, h): begin at layer L from
        the residual stream h (N, D) that layers 0..L-1 made; stop=L: run layers 0..L-1 only."""
        xp, c = self.xp, self.config
        ids = self._check_ids(ids)
        B, T = ids.shape
        splices = {}
        for site, fn in (splice or {}).items():
            if not callable(fn):
                raise TypeError(f"splice[{site!r}]: expected a function acts -> acts, found {type(fn).__name__}")
            key = self._check_site(site)
            if key in splices:
                raise ValueError(f"splice: {splices[key][0]!r} and {site!r} name the same site")
            splices[key] = (site, fn)
        wanted = {}  # (layer, kind) -> the names asked for (a site may be given in both spellings)
        for s in capture:
            wanted.setdefault(self._check_site(s), []).append(s)
        # capture stops after the deepest wanted site; forward runs every layer
        last = max(layer for layer, _ in wanted) if wanted else c.num_hidden_layers - 1
        only_z = bool(wanted) and all(k == "attn.hook_z" for (layer, k) in wanted if layer == last)
        acts = {}

        def hook(layer, kind, x):  # x (N, width): splice, then record
            key = (layer, kind)
            if key in splices:
                site, fn = splices[key]
                x = self._spliced(site, fn, x.reshape(B, T, -1))
            for name in wanted.get(key, ()):
                acts[name] = x.reshape(B, T, -1)  # (B, T, width)
            return x.reshape(B * T, -1)  # (N, width)

        if stop is not None:
            last = stop - 1
        first, h = start if start is not None else (0, None)
        if h is None:
            h = self.embed[ids.reshape(-1)]  # (N, D)  embedding lookup (a gather: a copy)
            h = h * xp.asarray(math.sqrt(c.hidden_size), dtype=self.dtype)  # x sqrt(D), cast first (Gemma)
        for layer in range(first, last + 1):
            h = self._block(h, layer, B, T, hook, stop_after_z=only_z and layer == last)
        return h, acts, (B, T)

    def _block(self, h, layer, B, T, hook, stop_after_z=False):
        """One decoder layer on the residual stream h (N, D): four RMSNorms, attention, MLP."""
        lw, eps = self.layers[layer], self.config.rms_norm_eps
        x = rms_norm(h, lw["input_norm"], eps)  # (N, D)  input_layernorm
        z = self._attention(x, layer, B, T)  # (N, H*d)
        z = hook(layer, "attn.hook_z", z)  # site: the input of o_proj, head-major
        if stop_after_z:
            return h
        a = linear(z, lw["o"])  # (N, H*d) @ (H*d, D) -> (N, D)  o_proj
        a = rms_norm(a, lw["post_attn_norm"], eps)  # post_attention_layernorm (Gemma 2's sandwich norm)
        h = h + a  # (N, D)  residual
        x = rms_norm(h, lw["pre_ff_norm"], eps)  # pre_feedforward_layernorm
        x = hook(layer, "hook_mlp_in", x)  # site: the MLP's input (what Gemma Scope 2 transcoders read)
        m = self._mlp(x, lw)  # (N, D)
        m = rms_norm(m, lw["post_ff_norm"], eps)  # post_feedforward_layernorm
        m = hook(layer, "hook_mlp_out", m)  # site: output of post_feedforward_layernorm
        h = h + m  # (N, D)  residual
        return hook(layer, "hook_resid_post", h)  # site: the block output

    def _attention(self, x, layer, B, T):
        """Grouped-query self-attention of x (N, D) -> z (N, H*d), before o_proj."""
        xp, c, lw = self.xp, self.config, self.layers[layer]
        H, K, G, d = c.num_attention_heads, c.num_key_value_heads, c.n_groups, c.head_dim
        cos, sin, mask = self._position_tables(T, layer)
        q = linear(x, lw["q"], c_order=False).reshape(B, T, H, d)  # (N, D) @ (D, H*d) -> (B, T, H, d)  no bias
        k = linear(x, lw["k"], c_order=False).reshape(B, T, K, d)  # (B, T, K, d)
        v = linear(x, lw["v"], c_order=False).reshape(B, T, K, d)  # (B, T, K, d)
        q, k = self._position_qk(q, k, lw, cos, sin)  # RoPE (Gemma 3: QK-norm first)
        # GQA without repeating k/v: query head h = kv*G + g reads kv head h // G. Stack the G
        # query heads of one kv head along the query axis so one matmul serves them all.
        qg = q.reshape(B, T, K, G, d).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, d)  # (B, K, G*T, d)
        kh = xp.ascontiguousarray(k.transpose(0, 2, 1, 3))  # (B, K, T, d)
        vh = xp.ascontiguousarray(v.transpose(0, 2, 1, 3))  # (B, K, T, d)
        z = xp.empty((B, T, K, G, d), dtype=self.dtype)  # (B, T, K, G, d) == (B, T, H*d) head-major
        scale = float(c.query_pre_attn_scalar) ** -0.5
        if T > 2 * _ATTN_QBLOCK:
            window = c.sliding_window if c.is_sliding(layer) else None
            self._attention_blocked(q, kh, vh, z, mask, scale, window)
            return z.reshape(B * T, H * d)  # (N, H*d)
        rows = max(1, _ATTN_BYTES // (H * T * T * self.dtype.itemsize))  # batch rows per chunk
        for b0 in range(0, B, rows):
            b1 = min(B, b0 + rows)
            s = qg[b0:b1] @ kh[b0:b1].swapaxes(-1, -2)  # (b, K, G*T, d) @ (b, K, d, T) -> (b, K, G*T, T)
            p = attention_scores_to_probs(s.reshape(b1 - b0, K, G, T, T), mask, scale,
                                          c.attn_logit_softcapping, xp)  # (b, K, G, T, T)
            o = p.reshape(b1 - b0, K, G * T, T) @ vh[b0:b1]  # (b, K, G*T, T) @ (b, K, T, d) -> (b, K, G*T, d)
            z[b0:b1] = o.reshape(b1 - b0, K, G, T, d).transpose(0, 3, 1, 2, 4)  # (b, T, K, G, d)
        return z.reshape(B * T, H * d)  # (N, H*d)

    def _attention_blocked(self, q, kh, vh, z, mask, scale, window):
        """_attention's scores, softmax and values for query blocks of _ATTN_QBLOCK positions,
        each against only the keys it can see: 0..t1 (causal) or t0-W+1..t1 (a sliding window
        of W). For T = 1024 that is 56 % (causal) or 47 % (W = 512) of the full (T, T) products
        and softmax. The keys left out are masked in the plain path (exp gives exactly 0 there),
        so only the order of the float32 sums differs (tests/test_gemma2_model.py).
        q (B, T, H, d), kh and vh (B, K, T, d); writes z (B, T, K, G, d)."""
        xp, c = self.xp, self.config
        B, T, H, d = q.shape
        K = kh.shape[1]
        G = H // K
        qh = q.reshape(B, T, K, G, d).transpose(0, 2, 3, 1, 4)  # (B, K, G, T, d) a view
        for t0 in range(0, T, _ATTN_QBLOCK):
            t1 = min(T, t0 + _ATTN_QBLOCK)
            k0 = 0 if window is None else max(0, t0 - window + 1)  # first key any query here sees
            tq, tk = t1 - t0, t1 - k0
            rows = max(1, _ATTN_BYTES // (H * tq * tk * self.dtype.itemsize))  # batch rows per chunk
            for b0 in range(0, B, rows):
                b1 = min(B, b0 + rows)
                qb = qh[b0:b1, :, :, t0:t1].reshape(b1 - b0, K, G * tq, d)  # (b, K, G*tq, d) a copy
                s = qb @ kh[b0:b1, :, k0:t1].swapaxes(-1, -2)  # (b, K, G*tq, d) @ (b, K, d, tk) -> (b, K, G*tq, tk)
                p = attention_scores_to_probs(s.reshape(b1 - b0, K, G, tq, tk), mask[t0:t1, k0:t1], scale,
                                              c.attn_logit_softcapping, xp)  # (b, K, G, tq, tk)
                o = p.reshape(b1 - b0, K, G * tq, tk) @ vh[b0:b1, :, k0:t1]  # (b, K, G*tq, tk) @ (b, K, tk, d)
                z[b0:b1, t0:t1] = o.reshape(b1 - b0, K, G, tq, d).transpose(0, 3, 1, 2, 4)  # (b, tq, K, G, d)

    def _position_qk(self, q, k, lw, cos, sin):
        """RoPE on queries (B, T, H, d) and keys (B, T, K, d); values are not rotated."""
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def _rope_params(self, layer):
        """(theta, linear scaling factor) of the RoPE `layer` uses: one base for every Gemma 2 layer."""
        return self.config.rope_theta, 1.0

    def _mlp(self, x, lw):
        """down(gelu_tanh(gate(x)) * up(x)) on x (N, D) -> (N, D)."""
        g = linear(x, lw["gate"], c_order=False)  # (N, D) @ (D, I) -> (N, I)
        u = linear(x, lw["up"], c_order=False)  # (N, D) @ (D, I) -> (N, I)
        g = gelu_tanh_times_(g, u, self.xp)  # (N, I) gated: act(gate) * up, act gelu_pytorch_tanh
        return linear(g, lw["down"])  # (N, I) @ (I, D) -> (N, D)

    def _logits(self, h):
        """Final RMSNorm, tied output projection, final soft-cap: (N, D) -> (N, V)."""
        xp, c = self.xp, self.config
        h = rms_norm(h, self.final_norm, c.rms_norm_eps)  # (N, D)  model.norm
        # one matmul: BLAS streams the (V, D) matrix once (row chunks would re-read it per chunk)
        logits = h @ self.lm_head.T  # (N, D) @ (D, V) -> (N, V)  lm_head tied to embed_tokens
        cap = c.final_logit_softcapping
        if cap is not None:
            logits /= cap  # final soft-cap cap * tanh(logits / cap), cap = 30 (final_logit_softcapping)
            xp.tanh(logits, out=logits)
            logits *= cap
        return logits  # (N, V)

    # ---- helpers ---------------------------------------------------------------------------------
    def _position_tables(self, T, layer):
        """(cos, sin, additive mask) for length T; the mask is sliding-window on sliding layers."""
        c, xp = self.config, self.xp
        window = c.sliding_window if c.is_sliding(layer) else None
        rope = self._rope_params(layer)  # (theta, factor)
        if self._tables.get("T") != T:  # a new length: forget the old one's tables (T^2 masks add up)
            self._tables = {"T": T}
        if rope not in self._tables:
            self._tables[rope] = rope_tables(T, c.head_dim, rope[0], xp, self.dtype, factor=rope[1])
        key = ("mask", window)
        if key not in self._tables:
            i = xp.arange(T)[:, None]  # (T, 1) query position
            j = xp.arange(T)[None, :]  # (1, T) key position
            visible = j <= i  # causal
            if window is not None:
                visible = visible & (j > i - window)  # sliding window: i - W < j <= i
            mask = xp.zeros((T, T), dtype=self.dtype)  # (T, T) additive
            mask[~visible] = float(numpy.finfo(self.dtype).min)  # transformers' min_dtype: exp gives 0
            self._tables[key] = mask
        cos, sin = self._tables[rope]
        return cos, sin, self._tables[key]

    def _check_ids(self, ids):
        xp = self.xp
        ids = asarray(ids, xp)
        if ids.ndim != 2:
            raise ValueError(f"ids: expected a (B, T) array of token ids, found shape {tuple(ids.shape)}")
        if ids.dtype.kind not in "iu":
            raise ValueError(f"ids: expected integer token ids, found dtype {ids.dtype}")
        if ids.size == 0:
            raise ValueError(f"ids: expected at least one token, found shape {tuple(ids.shape)}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"ids: token id {bad} out of range [0, {self.config.vocab_size})")
        return ids

    def _spliced(self, site, fn, x):
        new = fn(x)
        shape = None if new is None else tuple(getattr(new, "shape", ()))
        if shape != tuple(x.shape):
            raise ValueError(f"splice[{site!r}]: the function must return an array of shape "
                             f"{tuple(x.shape)}, found {shape}")
        return asarray(new, self.xp, self.dtype)

    def __repr__(self):
        c = self.config
        return (f"Gemma2Model(layers={c.num_hidden_layers}, D={c.hidden_size}, I={c.intermediate_size}, "
                f"H={c.num_attention_heads}, K={c.num_key_value_heads}, d={c.head_dim}, V={c.vocab_size}, "
                f"xp={self.xp.__name__}, dtype={self.dtype.name})")


def cross_entropy(logits, ids, mask=None, *, exclude_ids=(0, 1, 2)):
    """Masked next-token cross-entropy: (mean loss over counted tokens as a float, count).

    Position t's logits predict ids[:, t + 1]. The pair (t, t + 1) counts iff
      - mask[:, t] and mask[:, t + 1] are both True (both tokens real; mask None = all real), and
      - the target ids[:, t + 1] is not in `exclude_ids` (default PAD 0, EOS 1, BOS 2; () for none).
    The last position predicts nothing. Loss per pair = logsumexp(logits) - logits[target], in
    float64; the mean is over counted pairs (NaN when none count).
    """
    xp = _module_of(logits)
    B, T, V = logits.shape
    rows, cols, targets = counted_pairs(ids, mask, exclude_ids, (B, T), xp)  # (n,) each
    n = int(rows.shape[0])
    if n == 0:
        return float("nan"), 0
    total = 0.0
    step = max(1, _CE_ELEMS // V)
    for s0 in range(0, n, step):
        s1 = s0 + step
        total += nll_sum(logits[rows[s0:s1], cols[s0:s1]], targets[s0:s1], xp)  # (n, V) gathered
    return total / n, n


def counted_pairs(ids, mask, exclude_ids, shape, xp):
    """(rows, cols, targets): the positions whose next-token loss counts (see cross_entropy)."""
    B, T = shape
    ids = asarray(ids, xp)
    if tuple(ids.shape) != (B, T):
        raise ValueError(f"ids: expected shape {(B, T)} to match the logits, found {tuple(ids.shape)}")
    real = xp.ones((B, T), dtype=bool) if mask is None else asarray(mask, xp).astype(bool)
    if tuple(real.shape) != (B, T):
        raise ValueError(f"mask: expected shape {(B, T)} like ids, found {tuple(real.shape)}")
    target = ids[:, 1:]  # (B, T-1)
    counted = real[:, :-1] & real[:, 1:]  # (B, T-1) input and target both real
    for e in exclude_ids:
        counted &= target != int(e)
    rows, cols = xp.nonzero(counted)  # (n,), (n,)
    return rows, cols, target[rows, cols]


def nll_sum(z, targets, xp):
    """sum over rows of logsumexp(z) - z[target], in float64; z (n, V), targets (n,)."""
    total = 0.0
    step = max(1, _CE_ELEMS // z.shape[-1])  # rows per float64 block
    for s0 in range(0, z.shape[0], step):
        zc = z[s0:s0 + step].astype(xp.float64)  # (r, V)
        m = zc.max(axis=-1)  # (r,)
        lse = m + xp.log(xp.exp(zc - m[:, None]).sum(axis=-1))  # (r,)
        picked = zc[xp.arange(zc.shape[0]), targets[s0:s0 + step]]  # (r,)
        total += float((lse - picked).sum())
    return total


def _module_of(a):
    """numpy or cupy for `a`, also when CuPy was imported directly rather than through get_xp."""
    if type(a).__module__.startswith("cupy"):
        return get_xp("cupy")
    return xp_of(a)


__all__ = ["Gemma2Model", "cross_entropy", "parse_site", "SITE_KINDS", "rms_norm", "rope_tables",
           "apply_rope", "gelu_tanh_", "gelu_tanh_times_"]
