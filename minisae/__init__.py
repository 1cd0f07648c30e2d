"""minisae: sparse autoencoders (JumpReLU, Gated, TopK) in NumPy/CuPy, and Gemma 2 / Gemma 3 forward passes.

    from minisae.sae import jumprelu
    params = jumprelu.init(d_in=512, d_sae=8192)
    loss, grads = jumprelu.loss_and_grads(params, x, sparsity_coeff=6e-4)
"""

import os

__version__ = "0.1.0"

# After each parallel product, OpenBLAS's worker threads spin for 2^28 cycles (about 0.1 s)
# before they sleep. On a machine with few cores they then hold a core that minisae's threaded
# passes (minisae.threads: the sparse products right after the encoder's product) need: the
# JumpReLU step at d_in 512, 8192 latents took 10-25 % longer (docs/benchmarks.md). 2^16 cycles
# (tens of microseconds) still covers back-to-back products. OpenBLAS reads this when it loads,
# so it applies when minisae is imported before NumPy (as the `minisae` command does); a value
# the user set is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "16")


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
