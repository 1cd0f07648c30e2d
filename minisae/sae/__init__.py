"""The SAE variants, one module each with the same interface (see minisae/sae/jumprelu.py):

    ARCHITECTURE, PARAM_NAMES, init, forward, backward, forward_backward, loss_and_grads,
    encode, decode

`forward_backward(params, x, **hyper) -> (out, grads)` is forward's out and backward's grads in
one call; on NumPy it runs the variant's fast paths (<variant>_fast.py: row-sparse when few latents
fire), which tests hold equal to the plain forward + backward of the variant's own file.
Shared pieces: common.py (decoding, squared error, exact top-k, Matryoshka prefixes), auxk.py
(TopK's and BatchTopK's auxiliary loss), penalties.py (JumpReLU's penalties and its threshold's
pseudo-derivative), sparse.py (the row-sparse products).
"""

from minisae.sae import batchtopk, gated, jumprelu, topk

VARIANTS = {"jumprelu": jumprelu, "gated": gated, "topk": topk, "batchtopk": batchtopk}


def get_variant(architecture):
    """The module for "jumprelu", "gated", "topk" or "batchtopk"."""
    try:
        return VARIANTS[architecture]
    except KeyError:
        raise ValueError(f"unknown SAE architecture {architecture!r}: expected one of "
                         f"{sorted(VARIANTS)}") from None
