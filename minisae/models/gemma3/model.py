"""The Gemma 3 forward pass: Gemma 2's, with the three things Gemma 3 changes.

Matches transformers' eager Gemma3ForCausalLM in float32 (docs/gemma3.md names the source line of
each difference). Gemma3Model inherits everything else from Gemma2Model (minisae.models.gemma2.model):
the embedding × √D, the four RMSNorms per block, GQA, the sliding-window mask, the GELU-tanh MLP,
tied logits, capture / splice / loss and the SAE sites. What is new, all in attention:

1. QK-norm. After the q / k projections each head's query and key vector is RMS-normalised over
   its d entries (`q_norm`, `k_norm`: the same (1 + w) RMSNorm as the rest of Gemma, in float32),
   **before** RoPE. This replaces Gemma 2's attention soft-cap: scores stay bounded because q and k
   have bounded norms.
2. Two RoPEs. Sliding (local) layers rotate with base 10,000, global layers with 1,000,000; from
   4B up, global layers also divide positions by 8 (linear scaling) to reach 128K tokens.
3. No soft-caps: neither on the attention scores nor on the final logits (both null in the
   configs; if a config sets them they are applied as in Gemma 2).

Plus the layer pattern: five sliding layers, then one global (layers 5, 11, 17, ... are global),
with a 512-token window (270M, 1B) or 1024 (4B+). That lives in the config (layer_types).

Dimension legend as in Gemma 2: B batch rows, T tokens, N = B*T, D hidden, H query heads,
K key/value heads, d head_dim, L layer.
"""

import numpy

from minisae.models.gemma2.layers_fast import rms_norm
from minisae.models.gemma2.model import Gemma2Model
from minisae.xp import asarray

from .config import Gemma3Config
from .weights import expected_shapes


class Gemma3Model(Gemma2Model):
    """Gemma 3 (text) as arrays: forward, capture, splice, loss -- see Gemma2Model for each."""

    expected_shapes = staticmethod(expected_shapes)  # Gemma 2's tensors + q_norm, k_norm per layer

    def __init__(self, config: Gemma3Config, weights, *, xp=numpy, dtype="float32"):
        """`weights` is {text-only tensor name: array} (minisae.models.gemma3.weights.load_weights)."""
        super().__init__(config, weights, xp=xp, dtype=dtype)
        for n, lw in enumerate(self.layers):
            p = f"model.layers.{n}.self_attn."
            lw["q_norm"] = 1.0 + asarray(weights[p + "q_norm.weight"], xp, self.dtype)  # (d,)  (1 + w)
            lw["k_norm"] = 1.0 + asarray(weights[p + "k_norm.weight"], xp, self.dtype)  # (d,)

    def _position_qk(self, q, k, lw, cos, sin):
        """QK-norm, then RoPE: q (B, T, H, d) and k (B, T, K, d) normalised over d per head."""
        eps = self.config.rms_norm_eps
        q = rms_norm(q, lw["q_norm"], eps)  # Gemma3Attention.forward: q_norm before apply_rotary_pos_emb
        k = rms_norm(k, lw["k_norm"], eps)  # k_norm likewise (values are not normalised)
        return super()._position_qk(q, k, lw, cos, sin)  # Gemma 2's rotate_half RoPE

    def _rope_params(self, layer):
        """(theta, linear factor): 10,000 on sliding layers; 1,000,000 (/ 8 on 4B+) on global ones."""
        return self.config.rope(layer)

    def __repr__(self):
        return "Gemma3" + super().__repr__().removeprefix("Gemma2")


__all__ = ["Gemma3Model"]
