"""Gemma 2 hyper-parameters, read from a Hugging Face `config.json` of either generation.

Two generations of config.json exist on the Hub and in the wild:

    older (transformers 4.42-4.4x)          newer (transformers 5)
    "rope_theta": 10000.0                   "rope_parameters": {"rope_type": "default", "rope_theta": ...}
    "torch_dtype": "float32"                "dtype": "float32"
    "hidden_act" and "hidden_activation"    "hidden_activation"
    (no "layer_types": sliding on even L)   "layer_types": ["sliding_attention", "full_attention", ...]

`Gemma2Config.from_dict` accepts both and refuses what minisae does not implement (another
activation, attention biases, RoPE scaling, bidirectional attention) with an error naming the key.
"""

import math
import pathlib
from dataclasses import dataclass

from minisae.errors import FileFormatError
from minisae.io.files import read_json

SLIDING = "sliding_attention"
FULL = "full_attention"
# hidden_activation values that mean GELU with the tanh approximation (transformers' ACT2FN names)
GELU_TANH_NAMES = ("gelu_pytorch_tanh", "gelu_tanh")
# integer sizes every Gemma 2 config.json carries; no default is guessed for these
_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim")


class ConfigError(FileFormatError):
    """A config.json that is not a Gemma 2 config minisae can run; the message names the key."""


# Upper bounds on config sizes, far above any released Gemma (27B: 46 layers, D 4608, I 36864,
# V 262144, 128K positions), checked before anything is built from them: a hostile config.json
# with num_hidden_layers = 20,000,000 must not make minisae build 20 million layer entries. The
# real check, against the tensors present, follows in weights.check_shapes.
SIZE_LIMITS = {"vocab_size": 2**22, "hidden_size": 2**16, "intermediate_size": 2**18, "num_hidden_layers": 1024,
               "num_attention_heads": 1024, "num_key_value_heads": 1024, "head_dim": 2**12,
               "max_position_embeddings": 2**24, "sliding_window": 2**24}


def check_sizes(d, source):
    """ConfigError unless every size in config dict `d` that SIZE_LIMITS names is absent, null, or a
    positive integer within its limit (JSON booleans and floats are not integers here)."""
    for key, limit in SIZE_LIMITS.items():
        value = d.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
            raise ConfigError(f"{source}: {key}: expected a positive integer <= {limit}, found {value!r:.80}")


@dataclass(frozen=True)
class Gemma2Config:
    GENERATION = "Gemma 2"  # a class attribute, not a field: names the model family in errors
    vocab_size: int  # V: rows of model.embed_tokens.weight (256000 for every Gemma 2)
    hidden_size: int  # D: residual-stream width (2304 / 3584 / 4608 for 2b / 9b / 27b)
    intermediate_size: int  # I: MLP hidden width (9216 / 14336 / 36864)
    num_hidden_layers: int  # L: decoder blocks (26 / 42 / 46)
    num_attention_heads: int  # H: query heads (8 / 16 / 32)
    num_key_value_heads: int  # K: key/value heads; query head h reads kv head h // (H // K)
    head_dim: int  # d: width of one head (256 / 256 / 128); H * d need not equal D
    layer_types: tuple  # per layer "sliding_attention" or "full_attention"
    sliding_window: int | None = 4096  # W: on sliding layers query i sees keys i - W < j <= i
    query_pre_attn_scalar: float = 256  # scores are scaled by query_pre_attn_scalar ** -0.5
    attn_logit_softcapping: float | None = 50.0  # c in c * tanh(s / c) on attention scores
    final_logit_softcapping: float | None = 30.0  # c in c * tanh(z / c) on the output logits
    rms_norm_eps: float = 1e-6  # eps inside rsqrt(mean(x^2) + eps)
    rope_theta: float = 10000.0  # RoPE base: inv_freq_i = rope_theta ** (-2i / d)
    hidden_activation: str = "gelu_pytorch_tanh"  # the MLP gate nonlinearity (GELU, tanh form)
    max_position_embeddings: int = 8192  # longest sequence the model was trained on (not enforced)
    bos_token_id: int | None = 2  # <bos>; Gemma expects it first in every sequence
    eos_token_ids: tuple = (1,)  # <eos> (the -it configs list a second id, 107 <end_of_turn>)
    pad_token_id: int | None = 0  # <pad>
    tie_word_embeddings: bool = True  # logits = h @ embed_tokensᵀ (no lm_head.weight on disk)
    torch_dtype: str = "float32"  # dtype the checkpoint says it was saved in (informational)

    def __post_init__(self):
        for key in _REQUIRED:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config {key}: expected a positive integer, found {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"config head_dim: RoPE needs an even head_dim, found {self.head_dim}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"config layer_types: expected {self.num_hidden_layers} entries (num_hidden_layers), "
                f"found {len(self.layer_types)}")
        for i, t in enumerate(self.layer_types):
            if t not in (SLIDING, FULL):
                raise ConfigError(
                    f"config layer_types[{i}]: expected {SLIDING!r} or {FULL!r}, found {t!r}")
        if self.hidden_activation not in GELU_TANH_NAMES:
            raise ConfigError(
                f"config hidden_activation: expected one of {GELU_TANH_NAMES} (GELU, tanh "
                f"approximation, as in every Gemma 2), found {self.hidden_activation!r}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                or self.sliding_window <= 0):
            raise ConfigError(
                f"config sliding_window: expected a positive integer or null, found {self.sliding_window!r}")
        for key in ("query_pre_attn_scalar", "rms_norm_eps", "rope_theta"):
            value = getattr(self, key)
            if not _is_number(value) or not value > 0:
                raise ConfigError(f"config {key}: expected a positive number, found {value!r}")
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, key)
            if value is not None and (not _is_number(value) or not value > 0):
                raise ConfigError(f"config {key}: expected a positive number or null, found {value!r}")

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def n_groups(self):
        """G = H // K query heads share one key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def eos_token_id(self):
        """The first (main) end-of-sequence id (None when the config names none)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    def is_sliding(self, layer):
        """True when `layer` uses the sliding-window (local) mask, False for global causal."""
        return self.layer_types[layer] == SLIDING and self.sliding_window is not None

    # ---- reading config.json -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d, *, source="config"):
        """Build from a config.json dict of either generation; `source` names it in errors."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type != "gemma2":
            raise ConfigError(f"{source}: model_type: expected 'gemma2', found {model_type!r}")
        for key in _REQUIRED:
            if key not in d:
                raise ConfigError(f"{source}: missing required key {key!r}")
        check_sizes(d, source)
        if d.get("attention_bias", False):
            raise ConfigError(f"{source}: attention_bias: Gemma 2 has no attention biases, found true")
        if d.get("use_bidirectional_attention", False):
            raise ConfigError(f"{source}: use_bidirectional_attention: only causal attention is "
                              "implemented, found true")
        if d.get("rope_scaling") is not None:
            raise ConfigError(f"{source}: rope_scaling: only plain RoPE is implemented, "
                              f"found {d['rope_scaling']!r}")

        # RoPE base: newer files nest it in rope_parameters, older ones have rope_theta at top level
        rope_theta = d.get("rope_theta", 10000.0)
        rp = d.get("rope_parameters")
        if rp is not None:
            if not isinstance(rp, dict) or "rope_theta" not in rp:
                raise ConfigError(f"{source}: rope_parameters: expected an object with 'rope_theta', "
                                  f"found {rp!r}")
            if rp.get("rope_type", "default") != "default":
                raise ConfigError(f"{source}: rope_parameters.rope_type: only 'default' is "
                                  f"implemented, found {rp['rope_type']!r}")
            rope_theta = rp["rope_theta"]

        # activation: newer files say hidden_activation; older ones also (or only) hidden_act
        act = d.get("hidden_activation")
        if act is None:
            act = d.get("hidden_act", "gelu_pytorch_tanh")

        # layer_types only in newer files; transformers' default is sliding on even indices
        n_layers = d["num_hidden_layers"]
        layer_types = d.get("layer_types")
        if layer_types is None:
            layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(n_layers)]
        elif not isinstance(layer_types, list):
            raise ConfigError(f"{source}: layer_types: expected a list, found {layer_types!r}")

        eos = d.get("eos_token_id", 1)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"

        def get(key, default):
            value = d.get(key, default)
            return default if value is None and default is not None else value

        try:
            return cls(
                vocab_size=d["vocab_size"],
                hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"],
                num_hidden_layers=n_layers,
                num_attention_heads=d["num_attention_heads"],
                num_key_value_heads=d["num_key_value_heads"],
                head_dim=d["head_dim"],
                layer_types=tuple(layer_types),
                sliding_window=d.get("sliding_window", 4096),
                query_pre_attn_scalar=get("query_pre_attn_scalar", 256),
                attn_logit_softcapping=d.get("attn_logit_softcapping", 50.0),
                final_logit_softcapping=d.get("final_logit_softcapping", 30.0),
                rms_norm_eps=get("rms_norm_eps", 1e-6),
                rope_theta=rope_theta,
                hidden_activation=act,
                max_position_embeddings=get("max_position_embeddings", 8192),
                bos_token_id=d.get("bos_token_id", 2),
                eos_token_ids=eos_ids,
                pad_token_id=d.get("pad_token_id", 0),
                tie_word_embeddings=get("tie_word_embeddings", True),
                torch_dtype=str(dtype),
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_file(cls, path):
        """Read a config.json file (or the config.json inside a folder)."""
        path = pathlib.Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no such file (a {cls.GENERATION} checkpoint folder needs config.json)")
        d = read_json(path, error=ConfigError, expect=None)  # size and nesting limits
        return cls.from_dict(d, source=str(path))

    def to_dict(self):
        """A config.json-style dict (newer generation) that from_dict reads back unchanged."""
        return {
            "model_type": "gemma2",
            "architectures": ["Gemma2ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window,
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "attn_logit_softcapping": self.attn_logit_softcapping,
            "final_logit_softcapping": self.final_logit_softcapping,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "hidden_activation": self.hidden_activation,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": self.torch_dtype,
        }


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
