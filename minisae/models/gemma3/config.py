"""Gemma 3 (text) hyper-parameters, read from any of the config.json layouts on the Hub.

A Gemma 3 config is a Gemma 2 config (same fields, same meaning) plus two RoPE settings, because
Gemma 3 rotates its sliding (local) and global layers with different bases:

    local (sliding) layers   theta = rope_local_theta (10,000), no scaling
    global (full) layers     theta = rope_theta (1,000,000), positions divided by rope_global_factor
                             (1 for 270M and 1B; 8, "linear" scaling, for 4B and larger)

Layouts found in the wild (transformers' Gemma3TextConfig reads all of them):

    text-only files (270M, 1B: model_type "gemma3_text")   multimodal files (4B+: model_type "gemma3")
        every key at the top level                              the language model's keys under "text_config",
                                                                often only those that differ from the defaults

    older (transformers 4.50-4.5x)                newer (transformers 5)
    "rope_theta": 1000000.0                       "rope_parameters": {
    "rope_local_base_freq": 10000.0                   "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
    "rope_scaling": {"rope_type": "linear",           "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
                     "factor": 8.0} (or null)
    "sliding_window_pattern": 6 (no layer_types)  "layer_types": ["sliding_attention", ..., "full_attention", ...]
    "torch_dtype"                                 "dtype"

Keys a file leaves out take transformers' Gemma3TextConfig defaults (DEFAULTS below), as the 4B
text_config relies on. With neither layer_types nor a pattern, every 6th layer is global (5, 11, ...).
"""

from dataclasses import dataclass

from minisae.models.gemma2.config import FULL, SLIDING, ConfigError, Gemma2Config, _is_number, check_sizes

TEXT_TYPE, MULTIMODAL_TYPE = "gemma3_text", "gemma3"
# transformers' Gemma3TextConfig defaults (configuration_gemma3.py), used for keys a file omits
DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                sliding_window=4096, rms_norm_eps=1e-6, max_position_embeddings=131_072,
                hidden_activation="gelu_pytorch_tanh", bos_token_id=2, eos_token_id=1, pad_token_id=0,
                tie_word_embeddings=True, attn_logit_softcapping=None, final_logit_softcapping=None)
GLOBAL_THETA, LOCAL_THETA = 1_000_000.0, 10_000.0  # Gemma3TextConfig.default_theta
SLIDING_WINDOW_PATTERN = 6  # 5 local : 1 global
ROPE_TYPES = ("default", "linear")
# the keys a Gemma 3 file must spell out itself: defaults for these would only hide a broken file
_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers")


@dataclass(frozen=True)
class Gemma3Config(Gemma2Config):
    """Gemma2Config's fields (rope_theta is the global layers' base) plus local RoPE and scaling.

    Sizes (from the released config.json files): 270M D 640, I 2048, 18 layers, 4 heads / 1 kv;
    1B D 1152, I 6912, 26 layers, 4 / 1; 4B D 2560, I 10240, 34 layers, 8 / 4; head_dim 256 for all
    three; V 262,144 (270M, 1B) or 262,208 (4B+). No soft-caps.
    """

    GENERATION = "Gemma 3"  # a class attribute, not a field: names the model family in errors

    attn_logit_softcapping: float | None = None  # Gemma 3 drops Gemma 2's soft-caps (QK-norm instead)
    final_logit_softcapping: float | None = None
    rope_theta: float = GLOBAL_THETA  # RoPE base of global (full_attention) layers
    rope_local_theta: float = LOCAL_THETA  # RoPE base of sliding layers
    rope_global_factor: float = 1.0  # linear scaling of global layers: inv_freq / factor
    multimodal: bool = False  # read from a "gemma3" file: tensors under a language-model prefix

    def __post_init__(self):
        super().__post_init__()
        for key in ("rope_local_theta", "rope_global_factor"):
            value = getattr(self, key)
            if not _is_number(value) or not value > 0:
                raise ConfigError(f"config {key}: expected a positive number, found {value!r}")

    def rope(self, layer):
        """(theta, linear factor) of the RoPE that `layer` uses."""
        if self.layer_types[layer] == SLIDING:
            return self.rope_local_theta, 1.0
        return self.rope_theta, self.rope_global_factor

    # ---- reading config.json -------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d, *, source="config"):
        """Build from a config.json dict ("gemma3_text", or "gemma3" with text_config)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(d).__name__}")
        model_type = d.get("model_type")
        multimodal = model_type == MULTIMODAL_TYPE
        if multimodal:  # the language model's config; the vision tower's is ignored
            text = d.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError(f"{source}: a 'gemma3' (multimodal) config needs a 'text_config' object, "
                                  f"found {text!r}")
            if text.get("model_type", TEXT_TYPE) != TEXT_TYPE:
                raise ConfigError(f"{source}: text_config.model_type: expected {TEXT_TYPE!r}, "
                                  f"found {text['model_type']!r}")
            source, d = f"{source}: text_config", {**text, "model_type": TEXT_TYPE}
        elif model_type != TEXT_TYPE:
            raise ConfigError(f"{source}: model_type: expected {TEXT_TYPE!r} or {MULTIMODAL_TYPE!r}, "
                              f"found {model_type!r}")
        for key in _REQUIRED:
            if key not in d:
                raise ConfigError(f"{source}: missing required key {key!r}")
        check_sizes(d, source)  # before layer_types is built from num_hidden_layers
        for key in ("attention_bias", "use_bidirectional_attention"):
            if d.get(key, False):
                raise ConfigError(f"{source}: {key}: only causal attention without biases is implemented, "
                                  "found true")

        def get(key):  # a key the file omits (or sets to null) takes transformers' default
            value = d.get(key)
            return DEFAULTS[key] if value is None and DEFAULTS[key] is not None else value

        n_layers = d["num_hidden_layers"]
        layer_types = d.get("layer_types")
        if layer_types is None:
            pattern = d.get("sliding_window_pattern", d.get("_sliding_window_pattern", SLIDING_WINDOW_PATTERN))
            if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern < 1:
                raise ConfigError(f"{source}: sliding_window_pattern: expected a positive integer, found {pattern!r}")
            layer_types = [SLIDING if (i + 1) % pattern else FULL for i in range(n_layers)]  # every pattern-th global
        elif not isinstance(layer_types, list):
            raise ConfigError(f"{source}: layer_types: expected a list, found {layer_types!r}")

        global_rope, local_rope = _rope(d, source)
        act = d.get("hidden_activation") or d.get("hidden_act") or DEFAULTS["hidden_activation"]
        eos = d.get("eos_token_id", DEFAULTS["eos_token_id"])
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        dtype = d.get("dtype") or d.get("torch_dtype") or "float32"
        try:
            return cls(
                vocab_size=get("vocab_size"), hidden_size=d["hidden_size"],
                intermediate_size=d["intermediate_size"], num_hidden_layers=n_layers,
                num_attention_heads=get("num_attention_heads"), num_key_value_heads=get("num_key_value_heads"),
                head_dim=get("head_dim"), layer_types=tuple(layer_types),
                sliding_window=d.get("sliding_window", DEFAULTS["sliding_window"]),
                query_pre_attn_scalar=get("query_pre_attn_scalar"),
                # transformers runs Gemma 3 without an attention soft-cap whatever the file says
                # (Gemma3Attention.forward never passes it on), and the multimodal class without a
                # final one (Gemma3ForConditionalGeneration.forward); the released files say null.
                attn_logit_softcapping=None,
                final_logit_softcapping=None if multimodal else d.get("final_logit_softcapping"),
                rms_norm_eps=get("rms_norm_eps"), rope_theta=global_rope[0], rope_global_factor=global_rope[1],
                rope_local_theta=local_rope[0], hidden_activation=act,
                max_position_embeddings=get("max_position_embeddings"),
                bos_token_id=d.get("bos_token_id", 2), eos_token_ids=eos_ids, pad_token_id=d.get("pad_token_id", 0),
                tie_word_embeddings=get("tie_word_embeddings"), torch_dtype=str(dtype), multimodal=multimodal,
            )
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_dict(self):
        """A text-only config.json-style dict (newer layout) that from_dict reads back unchanged."""
        d = super().to_dict()
        d.update(model_type=TEXT_TYPE, architectures=["Gemma3ForCausalLM"])
        full = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_global_factor != 1.0:
            full.update(rope_type="linear", factor=self.rope_global_factor)
        d["rope_parameters"] = {"full_attention": full,
                                "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_theta}}
        return d


def _rope(d, source):
    """((global theta, global factor), (local theta, local factor)) from either RoPE layout."""
    rp = d.get("rope_parameters")
    if rp is not None:  # newer: one entry per layer type
        if not isinstance(rp, dict):
            raise ConfigError(f"{source}: rope_parameters: expected an object, found {rp!r}")
        if "rope_theta" in rp or "rope_type" in rp:  # a single set for both types: transformers reads it as global
            rp = {"full_attention": rp}
        full = _one_rope(rp.get("full_attention") or {}, GLOBAL_THETA, f"{source}: rope_parameters.full_attention")
        local = _one_rope(rp.get("sliding_attention") or {}, LOCAL_THETA,
                          f"{source}: rope_parameters.sliding_attention")
    else:  # older: rope_theta (global), rope_local_base_freq, rope_scaling on global layers only
        full = dict(d.get("rope_scaling") or {})
        full.setdefault("rope_theta", d.get("rope_theta", GLOBAL_THETA))
        full = _one_rope(full, GLOBAL_THETA, f"{source}: rope_scaling")
        local = _one_rope({"rope_theta": d.get("rope_local_base_freq", LOCAL_THETA)}, LOCAL_THETA,
                          f"{source}: rope_local_base_freq")
    if local[1] != 1.0:
        raise ConfigError(f"{source}: RoPE scaling on sliding layers is not implemented (no Gemma 3 uses it)")
    return full, local


def _one_rope(p, default_theta, where):
    if not isinstance(p, dict):
        raise ConfigError(f"{where}: expected an object, found {p!r}")
    rope_type = p.get("rope_type", p.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"{where}: rope_type: expected one of {ROPE_TYPES}, found {rope_type!r}")
    theta = p.get("rope_theta", default_theta)
    factor = p.get("factor", 1.0) if rope_type == "linear" else 1.0
    for name, value in (("rope_theta", theta), ("factor", factor)):
        if not _is_number(value) or not value > 0:
            raise ConfigError(f"{where}: {name}: expected a positive number, found {value!r}")
    return float(theta), float(factor)
