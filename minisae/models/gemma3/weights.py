"""Gemma 3 checkpoints: Gemma 2's tensor names plus the two QK-norm weights per layer.

    model.layers.N.self_attn.q_norm.weight     (d,)   RMSNorm over each query head, (1 + w) form
    model.layers.N.self_attn.k_norm.weight     (d,)   RMSNorm over each key head

Everything else (finding the folder or Hub repo, shards, F32 / BF16 / F16, the name and shape check,
memory-mapping float32) is minisae.models.gemma2.weights, reused as it is.

Multimodal checkpoints (model_type "gemma3": 4B, 12B, 27B) hold a vision tower and a projector
beside the language model, and name the language model's tensors with a prefix:

    language_model.model.layers.N....    the files on the Hub (saved by transformers 4.50)
    model.language_model.layers.N....    saved by transformers >= 4.52 (Gemma3Model.language_model)

Only the language model is read: its tensors are renamed to the text-only names above, and the
vision tower (`vision_tower.*`, `model.vision_tower.*`) and projector (`multi_modal_projector.*`,
`model.multi_modal_projector.*`) are skipped without being read.
"""

import numpy

from minisae.models.gemma2.weights import CheckpointError, checkpoint_dir, load_weights as _load_weights
from minisae.models.gemma2.weights import expected_shapes as gemma2_shapes

from .config import Gemma3Config

# stored prefix of the language model -> text-only prefix
TEXT_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.",
                 "language_model.lm_head.": "lm_head."}
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def expected_shapes(config: Gemma3Config):
    """Every tensor name the config implies (text-only names), with its shape."""
    shapes = gemma2_shapes(config)
    d = config.head_dim
    for n in range(config.num_hidden_layers):
        shapes[f"model.layers.{n}.self_attn.q_norm.weight"] = (d,)
        shapes[f"model.layers.{n}.self_attn.k_norm.weight"] = (d,)
    return shapes


def text_name(name):
    """The text-only name of a tensor in a multimodal checkpoint, or None for the vision parts."""
    if name.startswith(VISION_PREFIXES):
        return None
    for stored, text in TEXT_PREFIXES.items():
        if name.startswith(stored):
            return text + name[len(stored):]
    return name  # e.g. lm_head.weight at the top level: checked (and refused if unexpected) as it is


def load_weights(folder, config: Gemma3Config, *, xp=numpy, dtype="float32"):
    """Check the checkpoint in `folder` against `config` and read its language model."""
    rename = text_name if config.multimodal else None
    return _load_weights(folder, config, xp=xp, dtype=dtype, expected=expected_shapes(config), rename=rename)


__all__ = ["expected_shapes", "load_weights", "text_name", "checkpoint_dir", "CheckpointError"]
