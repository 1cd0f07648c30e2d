"""Gemma 3 (text) in NumPy / CuPy: Gemma 2's forward pass plus QK-norm and two RoPE bases.

    from minisae.models import gemma3
    model = gemma3.load("google/gemma-3-270m")                # a local folder or a Hub repo id
    tok = gemma3.load_tokenizer("google/gemma-3-270m")
    ids, mask = tok.encode_batch(["The cat sat on the mat."])
    logits = model.forward(ids)                                # (B, T, V) float32, no soft-cap
    x = model.capture(ids, "model.layers.6.pre_feedforward_layernorm.output")  # Gemma Scope 2 names work

Multimodal checkpoints (4B and larger, model_type "gemma3") load too: the language model only;
the vision tower is skipped. `minisae.models.load_model(path)` picks Gemma 2 or Gemma 3 from
config.json. See docs/gemma3.md for each difference from Gemma 2 and its source.
"""

import numpy

from minisae.models.gemma2 import cross_entropy
from minisae.models.gemma2.config import ConfigError
from minisae.models.gemma2.weights import CheckpointError, checkpoint_dir
from minisae.sites import SITE_KINDS, parse_site
from minisae.xp import get_xp

from .config import Gemma3Config
from .model import Gemma3Model
from .weights import load_weights


def load(path_or_repo_id, *, xp=numpy, revision=None, dtype="float32"):
    """Gemma3Model from a checkpoint folder (config.json + safetensors) or a Hub repo id.

    `xp` is numpy or cupy (or "numpy"/"cupy"); `dtype` the compute dtype ("float32", or "float64").
    float32 weights stay memory-mapped on NumPy; BF16 ones (the Hub's) are converted exactly.
    """
    xp = get_xp(xp)
    folder = checkpoint_dir(path_or_repo_id, revision=revision)
    config = Gemma3Config.from_file(folder / "config.json")
    weights = load_weights(folder, config, xp=xp, dtype=dtype)
    return Gemma3Model(config, weights, xp=xp, dtype=dtype)


def __getattr__(name):
    # the same tokenizer wrapper as Gemma 2 (BOS exactly once); `tokenizers` imported only when asked
    if name == "load_tokenizer":
        from minisae.models.gemma2.tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["load", "load_tokenizer", "Gemma3Model", "Gemma3Config", "parse_site", "cross_entropy", "SITE_KINDS",
           "ConfigError", "CheckpointError"]
