"""Gemma 2 and Gemma 3 from llama.cpp GGUF files: the config, the tensor names, the converter's changes.

    from minisae.models import load_model, load_tokenizer
    model = load_model("gemma-3-270m-q4_k_m.gguf")     # a Gemma3Model, weights dequantised to float32
    tok = load_tokenizer("gemma-3-270m-q4_k_m.gguf")   # the vocabulary in the file's metadata

A GGUF written by llama.cpp's convert_hf_to_gguf.py holds what a Hugging Face folder holds, renamed:

* the config as metadata keys `<arch>.<name>` (CONFIG_KEYS below, arch "gemma2" or "gemma3"),
  the vocabulary as `tokenizer.ggml.*` (minisae.models.gguf_tokenizer);
* the tensors under llama.cpp's names (NAMES, BLOCK_NAMES: gguf-py/gguf/tensor_mapping.py), in the
  Hugging Face shapes (minisae.io.gguf: the dims are stored reversed), possibly quantised;
* every RMSNorm weight plus 1: Gemma scales by (1 + w) and llama.cpp's RMSNorm by w, so the converter
  stores 1 + w (`Gemma2Model.modify_tensors`: `if name.endswith("norm.weight"): data_torch + 1`;
  `Gemma3Model.norm_shift`, q_norm and k_norm included). `load_weights` subtracts 1 again in
  float32, as transformers' GGUF loader does (modeling_gguf_pytorch_utils.Gemma2TensorProcessor,
  used for "gemma2" and "gemma3": `if "norm.weight" in name: weights = weights - 1`);
* an output.weight only when the output projection is not tied to the embedding.

What the file does not store is filled as transformers' GGUF loader fills it (FILLED): it builds the
config from the stored keys alone, so the rest are its Gemma2Config / Gemma3TextConfig defaults.
Where llama.cpp stores a value that loader ignores (Gemma 2's soft-caps, RoPE scaling, a Gemma 3
final soft-cap), minisae reads it: docs/gemma3.md, "GGUF checkpoints", lists each case.

    FILLED                  Gemma 2                   Gemma 3
    query_pre_attn_scalar   256                       256
    layer_types             sliding on even layers    every 6th layer global (5, 11, ...)
    local RoPE base         (one base for all)        10,000
    soft-caps               attn 50, final 30         none
    hidden_activation       gelu_pytorch_tanh         gelu_pytorch_tanh

The 27B models are the exception llama.cpp knows and transformers does not: their scores are
scaled by (D / H)^-1/2 (Gemma 2 27B: 144, Gemma 3 27B: 168), not 256^-1/2 (llama-model.cpp,
LLM_ARCH_GEMMA2 / GEMMA3: `type == LLM_TYPE_27B ? 1/sqrt(n_embd/n_head) : ...`). minisae follows
transformers here, so a 27B GGUF runs as transformers runs it.

Dimension legend as in minisae.models.gemma2.model: V vocab_size, D hidden_size, I intermediate_size,
H query heads, K key/value heads, d head_dim.
"""

import re

import numpy

from minisae.io.gguf import GGUFFile, GGUFError
from minisae.xp import asarray, get_xp

# ---- the config --------------------------------------------------------------------------------

# GGUF key (after "<arch>.") -> config.json key. The first block is transformers' GGUF_CONFIG_MAPPING
# for "gemma2" / "gemma3" (integrations/ggml.py); llama.cpp's Gemma converters write all of them.
CONFIG_KEYS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",  # = value_length = head_dim for Gemma
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
    "context_length": "max_position_embeddings",
    "rope.freq_base": "rope_theta",  # Gemma 3: the global layers' base
    "vocab_size": "vocab_size",
    # written by llama.cpp, ignored by transformers' loader (whose defaults are the released values)
    "attn_logit_softcapping": "attn_logit_softcapping",  # Gemma2Model.set_gguf_parameters
    "final_logit_softcapping": "final_logit_softcapping",  # Gemma 2; Gemma 3 only when not null
}
REQUIRED = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
            "attention.head_count_kv", "attention.key_length")

# The config before the file's keys are laid over it: transformers' config defaults
# (configuration_gemma2.py, configuration_gemma3.py). query_pre_attn_scalar, the layer pattern, the local
# RoPE base, Gemma 3's soft-caps and the activation no GGUF can store; the rest stand for keys a file omits.
FILLED = {
    "gemma2": {"model_type": "gemma2", "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "rope_theta": 10_000.0, "sliding_window": 4096,
               "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192, "rms_norm_eps": 1e-6},
    # layer_types: Gemma2Config's default, sliding on even layers (Gemma2Config.from_dict)
    "gemma3": {"model_type": "gemma3_text", "query_pre_attn_scalar": 256, "sliding_window_pattern": 6,
               "rope_local_base_freq": 10_000.0, "rope_theta": 1_000_000.0, "rope_scaling": None,
               "attn_logit_softcapping": None, "final_logit_softcapping": None, "sliding_window": 4096,
               "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6},
}
ARCHITECTURES = tuple(FILLED)


def config_dict(f: GGUFFile):
    """A config.json-style dict from the metadata of GGUF file `f`: FILLED, then what the file stores."""
    where = str(f.path)
    arch = f.metadata.get("general.architecture")
    if arch not in FILLED:
        raise GGUFError(f"{where}: general.architecture: expected one of {ARCHITECTURES} (Gemma 2 or Gemma 3 "
                        f"text models), found {arch!r:.60}")
    missing = [f"{arch}.{k}" for k in REQUIRED if f"{arch}.{k}" not in f.metadata]
    if missing:
        raise GGUFError(f"{where}: missing metadata {', '.join(missing)}")
    d = dict(FILLED[arch])
    for key, name in CONFIG_KEYS.items():
        if f"{arch}.{key}" in f.metadata:
            d[name] = f.metadata[f"{arch}.{key}"]
    # RoPE scaling (Gemma 3 4B and larger: linear, factor 8 on the global layers), when stored
    scaling = f.metadata.get(f"{arch}.rope.scaling.type")
    if isinstance(scaling, str) and scaling != "none":  # anything else is refused by the config's checks
        d["rope_scaling"] = {"rope_type": scaling, "factor": f.metadata.get(f"{arch}.rope.scaling.factor", 1.0)}
    # vocab_size: as transformers, the vocabulary's length when <arch>.vocab_size is absent
    if "vocab_size" not in d:
        tokens = f.metadata.get("tokenizer.ggml.tokens")
        embedding = f.tensors.get("token_embd.weight")
        d["vocab_size"] = len(tokens) if isinstance(tokens, list) else embedding.shape[0] if embedding else None
    for key, name in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        if f"tokenizer.ggml.{key}_token_id" in f.metadata:
            d[name] = f.metadata[f"tokenizer.ggml.{key}_token_id"]
    d["tie_word_embeddings"] = "output.weight" not in f.tensors  # as transformers decides it
    return d


def config_from_gguf(f: GGUFFile):
    """Gemma2Config or Gemma3Config of GGUF file `f` (its checks apply: sizes, types, head counts)."""
    from minisae.models.gemma2.config import Gemma2Config
    from minisae.models.gemma3.config import Gemma3Config

    d = config_dict(f)
    cls = Gemma2Config if d["model_type"] == "gemma2" else Gemma3Config
    config = cls.from_dict(d, source=f"{f.path}: metadata")
    key = f"{f.metadata['general.architecture']}.attention.value_length"
    value_length = f.metadata.get(key, config.head_dim)
    if not (isinstance(value_length, int) and value_length == config.head_dim):
        raise GGUFError(f"{f.path}: {key} {value_length!r:.40} differs from key_length {config.head_dim}; "
                        "Gemma has one head_dim")
    return config


# ---- the tensors -------------------------------------------------------------------------------

# llama.cpp name -> Hugging Face name (gguf-py/gguf/tensor_mapping.py, MODEL_ARCH.GEMMA2 / GEMMA3)
NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
BLOCK_NAMES = {  # blk.N.<key>.weight -> model.layers.N.<value>.weight
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_q_norm": "self_attn.q_norm",  # Gemma 3
    "attn_k_norm": "self_attn.k_norm",  # Gemma 3
    "attn_output": "self_attn.o_proj",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GGUF_NAMES = {v: k for k, v in NAMES.items()}
_GGUF_BLOCK_NAMES = {v: k for k, v in BLOCK_NAMES.items()}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_MAX_LISTED = 8  # problems listed in one error message


def hf_name(gguf_name):
    """The Hugging Face name of a llama.cpp tensor name, or None for a name not in the tables."""
    if gguf_name in NAMES:
        return NAMES[gguf_name]
    m = _BLOCK.fullmatch(gguf_name)
    if m and m[2] in BLOCK_NAMES and str(int(m[1])) == m[1]:
        return f"model.layers.{m[1]}.{BLOCK_NAMES[m[2]]}.weight"
    return None


def gguf_name(name):
    """The llama.cpp name of a Hugging Face tensor name (the inverse of hf_name)."""
    if name in _GGUF_NAMES:
        return _GGUF_NAMES[name]
    layer, rest = name.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
    return f"blk.{layer}.{_GGUF_BLOCK_NAMES[rest]}.weight"


def check_tensors(f: GGUFFile, expected):
    """GGUFError listing every missing, misshapen or unexpected tensor; `expected` {HF name: shape}."""
    want = {gguf_name(n): shape for n, shape in expected.items()}
    problems = []
    for name, shape in want.items():
        if name not in f.tensors:
            problems.append(f"missing tensor {name} (expected shape {shape})")
        elif f.tensors[name].shape != shape:
            problems.append(f"{name}: expected shape {shape}, found {f.tensors[name].shape}")
    problems += [f"unexpected tensor {n} with shape {f.tensors[n].shape}" for n in f.tensors if n not in want]
    if problems:
        more = len(problems) - _MAX_LISTED
        listed = "; ".join(problems[:_MAX_LISTED]) + (f"; and {more} more" if more > 0 else "")
        raise GGUFError(f"{f.path}: tensors do not match the GGUF metadata: {listed}")
    for name in want:
        f.layout(name)  # every type readable, every tensor inside the file: before any is read


def load_weights(f: GGUFFile, config, expected, *, xp=numpy, dtype="float32"):
    """{Hugging Face name: xp array of dtype}: dequantised, norms back from 1 + w to w."""
    check_tensors(f, expected)
    weights = {}
    for name in f.tensors:
        w = f.read(name)  # float32 in the HF shape: (V, D) embedding, (H*d, D) q, (D, I) down, (D,) norms, ...
        if name.endswith("norm.weight"):
            w = w - 1.0  # the converter stored 1 + w (float32, as transformers' `weights - 1`)
        weights[hf_name(name)] = asarray(w, xp, dtype)
    return weights


def load(path, *, xp=numpy, dtype="float32"):
    """Gemma2Model or Gemma3Model from a GGUF file (general.architecture "gemma2" or "gemma3")."""
    from minisae.models.gemma2 import Gemma2Model
    from minisae.models.gemma3 import Gemma3Model

    xp = get_xp(xp)
    f = GGUFFile(path)
    config = config_from_gguf(f)
    cls = Gemma2Model if config.GENERATION == "Gemma 2" else Gemma3Model
    weights = load_weights(f, config, cls.expected_shapes(config), xp=xp, dtype=dtype)
    return cls(config, weights, xp=xp, dtype=dtype)


def load_tokenizer(path):
    """The Gemma tokenizer from the file's vocabulary (minisae.models.gguf_tokenizer)."""
    from minisae.models.gguf_tokenizer import load_tokenizer as load_gguf_tokenizer

    return load_gguf_tokenizer(path)


__all__ = ["load", "load_tokenizer", "config_from_gguf", "config_dict", "load_weights", "hf_name", "gguf_name",
           "CONFIG_KEYS", "FILLED", "NAMES", "BLOCK_NAMES"]
