"""Gemma 2 in NumPy / CuPy: load a checkpoint, run it, read and splice SAE sites.

    from minisae.models import gemma2
    model = gemma2.load("google/gemma-2-2b")                 # a local folder or a Hub repo id
    tok = gemma2.load_tokenizer("google/gemma-2-2b")
    ids, mask = tok.encode_batch(["The cat sat on the mat."])
    logits = model.forward(ids)                               # (B, T, V) float32, soft-capped
    z = model.capture(ids, "blocks.12.attn.hook_z")           # (B, T, H*d)
    loss, n = gemma2.cross_entropy(logits, ids, mask)

See docs/gemma2.md for the block, its quirks and their sources, and the site definitions.
"""

import numpy

from minisae.xp import get_xp

from .config import ConfigError, Gemma2Config
from .loss import cross_entropy
from .model import SITE_KINDS, Gemma2Model, parse_site
from .weights import CheckpointError, checkpoint_dir, load_weights


def load(path_or_repo_id, *, xp=numpy, revision=None, dtype="float32"):
    """Gemma2Model from a checkpoint folder (config.json + safetensors) or a Hub repo id.

    `xp` is numpy or cupy (or "numpy"/"cupy"); `dtype` the compute dtype ("float32", or
    "float64" for reference computations). float32 weights stay memory-mapped on NumPy.
    """
    xp = get_xp(xp)
    folder = checkpoint_dir(path_or_repo_id, revision=revision)
    config = Gemma2Config.from_file(folder / "config.json")
    weights = load_weights(folder, config, xp=xp, dtype=dtype)
    return Gemma2Model(config, weights, xp=xp, dtype=dtype)


def __getattr__(name):
    # the tokenizer (and the `tokenizers` library) is imported only when asked for
    if name in ("load_tokenizer", "Gemma2Tokenizer"):
        from . import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["load", "load_tokenizer", "Gemma2Model", "Gemma2Config", "parse_site", "cross_entropy",
           "SITE_KINDS", "ConfigError", "CheckpointError"]
