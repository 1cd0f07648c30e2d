"""Small GGUF files written as llama.cpp's convert_hf_to_gguf.py writes Gemma 2 / Gemma 3, for the
tests and for reference/gguf_goldens.py (which loads the same files into transformers).

    write_gguf(TINY3, tmp / "tiny.gguf", types={"ffn_down": "Q8_0"})   # tests/data/gemma3/tiny_f32 as GGUF

What the converter does and this writer copies (convert_hf_to_gguf.py, Gemma2Model / Gemma3Model):
the config as `<arch>.*` keys (set_gguf_parameters: no query_pre_attn_scalar, no layer pattern, no
local RoPE base -- they cannot be stored), every `*norm.weight` plus 1, the llama.cpp tensor names,
the SentencePiece vocabulary as `tokenizer.ggml.*` (here TINY_VOCAB, padded with <unusedN>), no
output.weight for tied embeddings. Tensors are F32 unless `types` names another type per tensor kind.
Needs the gguf package (the test extra); torch and transformers are not needed.
"""

import json
from pathlib import Path

import numpy

from minisae.models import gemma2, gemma3
from minisae.models.gguf import gguf_name

TINY2 = Path(__file__).parent / "data" / "gemma2" / "tiny_f32"
TINY3 = Path(__file__).parent / "data" / "gemma3" / "tiny_f32"

# llama.cpp token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# A SentencePiece-like vocabulary in Gemma's layout: specials first, "\n" runs and space runs as
# user-defined tokens (the space runs stored with real spaces), a few byte tokens, then pieces.
TINY_VOCAB = (
    [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", CONTROL), ("<mask>", CONTROL),
     ("[multimodal]", USER_DEFINED), ("<start_of_turn>", CONTROL), ("<end_of_turn>", CONTROL),
     ("\n", USER_DEFINED), ("\n\n", USER_DEFINED), ("  ", USER_DEFINED), ("   ", USER_DEFINED), ("\t", NORMAL)]
    + [(f"<0x{b:02X}>", BYTE) for b in (0x00, 0x0A, 0x41, 0x82, 0x97, 0x99, 0x9F, 0xA5, 0xA9, 0xC3, 0xE6, 0xF0)]
    + [(t, NORMAL) for t in ("▁", "t", "h", "e", "c", "a", "s", "o", "n", "é", "日", "本", ".", ",", "!",
                             "▁t", "th", "he", "▁th", "▁the", "at", "▁c", "▁cat", "▁s", "on", "▁on",
                             "▁a", "an", "▁an", "at.", "▁▁▁▁", "日本", "▁é", "hé")]
)


# The files tests/golden/gguf/tiny_*.npz were made from (reference/gguf_goldens.py): all F32, and a
# mix of types (per tensor kind; Q8_0 / Q5_0 only where rows are whole blocks of 32). Gemma 2's
# soft-caps are stored as released (50, 30): transformers' loader ignores the stored values and
# uses those, minisae reads them (docs/gemma3.md), so only the released values compare.
VARIANTS = {
    "gemma3": {"f32": {}, "mixed": {"token_embd": "F16", "attn_output": "BF16", "ffn_down": "Q8_0", "attn_q": "F16"}},
    "gemma2": {"f32": {}, "mixed": {"token_embd": "F16", "attn_q": "Q8_0", "attn_k": "Q5_0", "attn_v": "Q8_0",
                                    "attn_output": "BF16", "ffn_gate": "Q8_0", "ffn_up": "Q5_0", "ffn_down": "Q8_0"}},
}
GOLDEN_METADATA = {"gemma3": {}, "gemma2": {"gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0}}
FOLDERS = {"gemma3": TINY3, "gemma2": TINY2}


def write_golden_gguf(arch, variant, path):
    """The tiny file `variant` ("f32", "mixed") of `arch` that the goldens were computed from."""
    return write_gguf(FOLDERS[arch], path, types=VARIANTS[arch][variant], metadata=GOLDEN_METADATA[arch])


def tiny_vocab(vocab_size):
    """(tokens, scores, types) of TINY_VOCAB padded with <unusedN> control tokens to vocab_size."""
    entries = list(TINY_VOCAB) + [(f"<unused{i}>", CONTROL) for i in range(vocab_size - len(TINY_VOCAB))]
    assert len(entries) == vocab_size, (len(entries), vocab_size)
    tokens = [t for t, _ in entries]
    scores = numpy.array([0.0 if k != NORMAL else -float(i) for i, (_, k) in enumerate(entries)], numpy.float32)
    return tokens, scores, numpy.array([k for _, k in entries], numpy.int32)


def _kind(name):
    """The tensor kind a `types` dict keys on: "attn_q", "ffn_down", "token_embd", "output_norm", ..."""
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def write_gguf(folder, path, *, types=None, metadata=None, skip=(), extra=None, rope_scaling=None):
    """Write the tiny checkpoint `folder` as GGUF `path`.

    types: {tensor kind: "F32" | "F16" | "BF16" | "Q8_0" | "Q5_0" | ...} (default F32);
    metadata: {key: value} written instead of the converter's keys of the same name, or in addition;
    skip: GGUF tensor names left out; extra: {GGUF name: float32 array} added;
    rope_scaling: (type, factor) stored as llama.cpp stores Gemma 3 4B's.
    """
    import gguf

    types, metadata = dict(types or {}), dict(metadata or {})
    is3 = json.loads((Path(folder) / "config.json").read_text())["model_type"].startswith("gemma3")
    module = gemma3 if is3 else gemma2
    config = module.Gemma3Config.from_file(folder) if is3 else module.Gemma2Config.from_file(folder)
    weights = gemma3.load_weights(folder, config) if is3 else gemma2.load_weights(folder, config)
    arch = "gemma3" if is3 else "gemma2"

    meta = {f"{arch}.{key}": value for key, value in {  # Gemma2Model / Gemma3Model.set_gguf_parameters
        "context_length": config.max_position_embeddings, "embedding_length": config.hidden_size,
        "block_count": config.num_hidden_layers, "feed_forward_length": config.intermediate_size,
        "attention.head_count": config.num_attention_heads, "attention.head_count_kv": config.num_key_value_heads,
        "attention.layer_norm_rms_epsilon": config.rms_norm_eps, "attention.key_length": config.head_dim,
        "attention.value_length": config.head_dim, "attention.sliding_window": config.sliding_window,
        "rope.freq_base": config.rope_theta}.items()}
    if not is3:
        meta.update({"gemma2.attn_logit_softcapping": config.attn_logit_softcapping,
                     "gemma2.final_logit_softcapping": config.final_logit_softcapping})
    if rope_scaling is not None:
        meta.update({f"{arch}.rope.scaling.type": rope_scaling[0], f"{arch}.rope.scaling.factor": rope_scaling[1]})
    tokens, scores, token_types = tiny_vocab(config.vocab_size)
    meta.update({  # _set_vocab_sentencepiece
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.scores": scores.tolist(),
        "tokenizer.ggml.token_type": token_types.tolist(), "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False})
    meta.update(metadata)
    w = gguf.GGUFWriter(str(path), meta.pop("general.architecture", arch))  # writes general.architecture
    for key, value in meta.items():
        _add(w, key, value)

    tensors = {}
    for name, a in weights.items():
        a = numpy.asarray(a, numpy.float32)
        if name.endswith("norm.weight"):
            a = a + numpy.float32(1)  # the converter stores Gemma's norm weights plus 1
        tensors[gguf_name(name)] = a
    tensors.update(extra or {})
    for name, a in tensors.items():
        if name in skip:
            continue
        kind = types.get(_kind(name), "F32")
        if kind == "F32":
            w.add_tensor(name, a)
        elif kind == "F16":
            w.add_tensor(name, a.astype(numpy.float16))
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return config


def _add(w, key, value):
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, value)
