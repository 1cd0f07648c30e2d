"""The SAE variants, one module each with the same interface (see minisae/sae/jumprelu.py):

    ARCHITECTURE, PARAM_NAMES, init, forward, backward, forward_backward, loss_and_grads,
    encode, decode

`forward_backward(params, x, **hyper) -> (out, grads)` is forward's out and backward's grads in
one call; on NumPy, JumpReLU, TopK and BatchTopK take a row-sparse path there when few latents fire.
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
