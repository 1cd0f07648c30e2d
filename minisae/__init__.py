"""minisae: sparse autoencoders (JumpReLU, Gated, TopK) in NumPy/CuPy, and Gemma 2 / Gemma 3 forward passes.

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
    if name in ("load_model", "load_tokenizer"):
        import minisae.models

        return getattr(minisae.models, name)
    if name == "MinisaeError":
        from minisae.errors import MinisaeError

        return MinisaeError
    raise AttributeError(f"module 'minisae' has no attribute {name!r}")
