"""minisae: sparse autoencoders (JumpReLU, Gated, TopK) in NumPy/CuPy, and a Gemma 2 forward pass.

    from minisae.sae import jumprelu
    params = jumprelu.init(d_in=512, d_sae=8192)
    loss, grads = jumprelu.loss_and_grads(params, x, sparsity_coeff=6e-4)
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import minisae` stays cheap: the SAE object pulls in the file readers.
    if name == "SAE":
        from minisae.io.saefile import SAE

        return SAE
    if name == "MinisaeError":
        from minisae.errors import MinisaeError

        return MinisaeError
    raise AttributeError(f"module 'minisae' has no attribute {name!r}")
