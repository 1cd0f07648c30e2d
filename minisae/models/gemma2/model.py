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
from minisae.sites import SITE_KINDS, parse_site
from minisae.xp import asarray

from .config import Gemma2Config
from .layers import linear, rope_tables
from .layers_fast import apply_rope, attention_scores_to_probs, gelu_tanh_times_, rms_norm
from .loss import counted_pairs
from .weights import check_shapes, expected_shapes

_ATTN_BYTES = 256 * 2**20  # attention scores are computed for as many batch rows as fit in this
_ATTN_QBLOCK = 128  # longer than 2 blocks: attention by blocks of this many queries (_attention_blocked)
_LOSS_ROWS = 1024  # Gemma2Model.loss scores this many tokens at a time ...
_LOSS_COLS = 8192  # ... against this many vocabulary entries at a time: (rows, cols) logits, 32 MiB
# (4096-entry blocks cost 1.27x the GEMM time of the whole head with OpenBLAS, 8192 1.09x, 16384 1.09x)


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


__all__ = ["Gemma2Model", "parse_site", "SITE_KINDS"]
