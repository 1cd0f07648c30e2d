"""Bad and hostile GGUF files: one line naming the file and what is wrong (a minisae.MinisaeError),
fast and small, never a traceback, a hang, or memory and work out of proportion to the file.

Three parts: gguf.quants' dequantisation checked against plain per-block decoders (written here from
ggml's block layouts); one test per bad-file class; and hypothesis fuzzing in tests/test_fuzz.py's
style (its byte mutations, plus mutations aimed at every integer field of the header: counts,
lengths, types, dims, offsets), each run loading the model and the tokenizer and using both.

    python -m pytest tests/test_gguf_hostile.py                              # CI profile
    HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_gguf_hostile.py  # many more examples
"""

import os
import struct
import sys
import threading

import numpy
import pytest
from gguf_tiny import FOLDERS, write_golden_gguf, write_gguf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz import Format, _bounded_load, byte_ops, mutate_bytes
from test_hostile_files import bounded

from minisae import MinisaeError
from minisae.errors import DependencyError, MissingInputError
from minisae.io.gguf import GGUFError, GGUFFile
from minisae.models import load_model, load_tokenizer

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install minisae[gguf]) is not installed")
Q = gguf.GGMLQuantizationType


# ---- dequantisation: gguf.quants against plain per-block decoders ----------------------------------
# Block layouts from ggml (ggml-common.h block_q8_0, block_q5_0, block_q4_K, block_q6_K; the decoders
# follow ggml-quants.c dequantize_row_*): d is an IEEE half, the rest bytes.

def f16(b):
    return float(numpy.frombuffer(bytes(b), "<f2")[0])


def dequant_q8_0(block):  # 34 bytes: d, 32 x int8
    d = f16(block[:2])
    return [d * q for q in numpy.frombuffer(bytes(block[2:]), numpy.int8)]


def dequant_q5_0(block):  # 22 bytes: d, qh (32 high bits), 16 bytes of low nibbles
    d, qh, qs = f16(block[:2]), int.from_bytes(bytes(block[2:6]), "little"), block[6:]
    y = [0.0] * 32
    for j in range(16):
        hi0, hi1 = ((qh >> j) & 1) << 4, ((qh >> (j + 16)) & 1) << 4
        y[j] = d * (((qs[j] & 0x0F) | hi0) - 16)
        y[j + 16] = d * (((qs[j] >> 4) | hi1) - 16)
    return y


def _scale_min_k4(j, q):
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def dequant_q4_k(block):  # 144 bytes: d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
    d, dmin, scales, qs = f16(block[0:2]), f16(block[2:4]), block[4:16], block[16:]
    y = []
    for half in range(4):  # 64 values each: low nibbles (sub-block 2 half), then high (2 half + 1)
        q = qs[32 * half:32 * half + 32]
        for sub, shift in ((2 * half, 0), (2 * half + 1, 4)):
            sc, m = _scale_min_k4(sub, scales)
            y += [d * sc * ((x >> shift) & 0x0F) - dmin * m for x in q]
    return y


def dequant_q6_k(block):  # 210 bytes: 128 low-nibble bytes, 64 bytes of 2-bit highs, 16 int8 scales, d
    ql, qh = block[:128], block[128:192]
    sc = numpy.frombuffer(bytes(block[192:208]), numpy.int8)
    d = f16(block[208:210])
    y = [0.0] * 256
    for n in range(2):  # 128 values each
        l_, h_, s_ = ql[64 * n:], qh[32 * n:], sc[8 * n:]
        for i in range(32):
            q1 = ((l_[i] & 0xF) | (((h_[i] >> 0) & 3) << 4)) - 32
            q2 = ((l_[i + 32] & 0xF) | (((h_[i] >> 2) & 3) << 4)) - 32
            q3 = ((l_[i] >> 4) | (((h_[i] >> 4) & 3) << 4)) - 32
            q4 = ((l_[i + 32] >> 4) | (((h_[i] >> 6) & 3) << 4)) - 32
            for k, q in enumerate((q1, q2, q3, q4)):
                y[128 * n + 32 * k + i] = d * int(s_[i // 16 + 2 * k]) * q
    return y


def dequant_f16(block):
    return numpy.frombuffer(bytes(block), "<f2").astype(numpy.float64).tolist()


def dequant_bf16(block):
    u = numpy.frombuffer(bytes(block), "<u2").astype(numpy.uint32) << 16
    return u.view(numpy.float32).astype(numpy.float64).tolist()


DECODERS = {Q.Q8_0: dequant_q8_0, Q.Q5_0: dequant_q5_0, Q.Q4_K: dequant_q4_k, Q.Q6_K: dequant_q6_k,
            Q.F16: dequant_f16, Q.BF16: dequant_bf16}


def random_blocks(qtype, n_blocks, rng):
    """Random bytes for n blocks, with every f16 scale a finite number in [-2, 2]."""
    _, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=numpy.uint8)
    halves = {Q.Q8_0: [0], Q.Q5_0: [0], Q.Q4_K: [0, 2], Q.Q6_K: [208]}.get(qtype, [])
    for at in halves:
        raw[:, at:at + 2] = rng.uniform(-2, 2, n_blocks).astype("<f2").view(numpy.uint8).reshape(n_blocks, 2)
    if qtype in (Q.F16, Q.BF16):  # every value finite
        vals = rng.uniform(-4, 4, n_blocks * size // 2).astype(numpy.float32)
        raw = (vals.astype("<f2").view(numpy.uint8) if qtype == Q.F16
               else (vals.view(numpy.uint32) >> 16).astype("<u2").view(numpy.uint8)).reshape(n_blocks, size)
    return raw


@pytest.mark.parametrize("qtype", list(DECODERS), ids=[q.name for q in DECODERS])
def test_dequantisation_matches_plain_decoders(tmp_path, qtype):
    """A GGUF holding one (2, 512) tensor of random blocks: GGUFFile.read = the plain decoder."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 2, 512
    raw = random_blocks(qtype, rows * cols // block, numpy.random.default_rng(int(qtype)))
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "gemma3")
    w.add_tensor("t", raw.reshape(rows, cols // block * size), raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    got = GGUFFile(tmp_path / "q.gguf").read("t")
    want = numpy.array([x for b in raw for x in DECODERS[qtype](bytes(b))], numpy.float64).reshape(rows, cols)
    assert got.shape == (rows, cols) and got.dtype == numpy.float32
    numpy.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


# ---- the header, field by field ------------------------------------------------------------------

def header_fields(data):
    """[(position, size, what)] of every integer field of a valid GGUF's header (a walker for the tests)."""
    fields, pos = [(4, 4, "version"), (8, 8, "tensor_count"), (16, 8, "kv_count")], 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(what):
        nonlocal pos
        fields.append((pos, 8, f"length of {what}"))
        n = struct.unpack_from("<Q", data, pos)[0]
        pos += 8 + n
        return data[pos - n:pos].decode("utf-8", "replace")

    def value(vtype, what):
        nonlocal pos
        if vtype == 8:
            string(what)
        elif vtype == 9:
            fields.extend([(pos, 4, f"element type of {what}"), (pos + 4, 8, f"count of {what}")])
            etype, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for i in range(count):
                value(etype, f"{what}[{i}]")
        else:
            if vtype in (4, 5, 10, 11):
                fields.append((pos, sizes[vtype], what))
            pos += sizes[vtype]

    for i in range(n_kv):
        key = string(f"key {i}")
        fields.append((pos, 4, f"type of {key}"))
        vtype = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        value(vtype, key)
    for i in range(n_tensors):
        string(f"tensor {i}")
        n_dims = struct.unpack_from("<I", data, pos)[0]
        fields.append((pos, 4, f"n_dims of tensor {i}"))
        fields.extend((pos + 4 + 8 * k, 8, f"dim {k} of tensor {i}") for k in range(n_dims))
        pos += 4 + 8 * n_dims
        fields.extend([(pos, 4, f"type of tensor {i}"), (pos + 4, 8, f"offset of tensor {i}")])
        pos += 12
    return fields


def set_field(data, field, value):
    pos, size, _ = field
    data = bytearray(data)
    data[pos:pos + size] = (value % 2 ** (8 * size)).to_bytes(size, "little")
    return bytes(data)


def field(data, what):
    return next(f for f in header_fields(data) if f[2] == what)


def tensor_index(path, name):
    return list(GGUFFile(path).tensors).index(name)


@pytest.fixture
def tiny(tmp_path):
    """A valid tiny Gemma 3 GGUF (mixed tensor types)."""
    path = tmp_path / "tiny.gguf"
    write_golden_gguf("gemma3", "mixed", path)
    return path


def refused(path, *words, load=load_model, error=MinisaeError, seconds=5.0, mib=64):
    """`load(path)` raises `error` within the bounds; its one-line message names the file and `words`."""
    with bounded(seconds, mib), pytest.raises(error) as e:
        load(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


@pytest.mark.parametrize("cut", [3, 20, 30, 200, 2000, -100, -1])
def test_truncated_file(tiny, cut):
    data = tiny.read_bytes()
    tiny.write_bytes(data[:cut])
    msg = refused(tiny)
    assert any(w in msg for w in ("truncated", "shorter than", "beyond the end")), msg


@pytest.mark.parametrize("what, value, words", [
    ("tensor_count", 2**63, ["claims", "tensors"]),
    ("kv_count", 2**40, ["claims", "metadata keys"]),
    ("kv_count", 60_000, ["truncated"]),  # within the limit, more than the file holds
    ("length of key 0", 2**62, ["metadata key 0", "limit"]),
    ("length of general.architecture", 2**62, ["truncated"]),
    ("count of tokenizer.ggml.tokens", 2**40, ["truncated", "elements"]),  # 2^40 strings in a small file
    ("count of tokenizer.ggml.scores", 2**61, ["truncated", "elements"]),
    ("length of tokenizer.ggml.tokens[5]", 2**40, ["truncated", "tokenizer.ggml.tokens[5]"]),
    ("length of tensor 0", 2**20, ["limit"]),
    ("n_dims of tensor 0", 2**31, ["n_dims"]),
    ("dim 0 of tensor 1", 0, ["positive"]),
    ("offset of tensor 2", 2**40, ["beyond the end"]),
    ("offset of tensor 2", 7, ["not a multiple of the alignment"]),
    ("type of gemma3.block_count", 13, ["value type 13"]),
    ("element type of tokenizer.ggml.token_type", 9, ["array inside an array"]),
    ("gemma3.block_count", 2**31, ["num_hidden_layers"]),
    ("version", 1, ["version 1"]),
    ("version", 3 << 24, ["big-endian"]),
])
def test_hostile_header_fields(tiny, what, value, words):
    data = tiny.read_bytes()
    tiny.write_bytes(set_field(data, field(data, what), value))
    refused(tiny, *words)


def test_dims_whose_product_overflows_64_bits(tiny):
    """(2^32)^4 elements: a Python int, checked against the file size; nothing is allocated."""
    data = tiny.read_bytes()
    i = tensor_index(tiny, "blk.0.attn_q.weight")
    for k in range(2):
        data = set_field(data, field(data, f"dim {k} of tensor {i}"), 2**32)
    tiny.write_bytes(data)
    refused(tiny, "blk.0.attn_q.weight", "expected shape")  # the shape check comes first
    with bounded(), pytest.raises(GGUFError, match="beyond the end"):
        GGUFFile(tiny).read("blk.0.attn_q.weight")


@pytest.mark.parametrize("type_id, words", [(99, ["unknown ggml tensor type 99"]), (26, ["I32", "not a float"])])
def test_unknown_or_integer_tensor_types(tiny, type_id, words):
    data = tiny.read_bytes()
    i = tensor_index(tiny, "blk.2.ffn_up.weight")
    tiny.write_bytes(set_field(data, field(data, f"type of tensor {i}"), type_id))
    refused(tiny, "blk.2.ffn_up.weight", *words)


def test_not_a_regular_file_is_refused_before_opening(tmp_path):
    """A FIFO named x.gguf: os.stat, not open (which would wait for a writer forever)."""
    fifo = tmp_path / "x.gguf"
    os.mkfifo(fifo)
    result = {}
    t = threading.Thread(target=lambda: result.update(msg=refused(fifo, "not a regular file")), daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the reader so the test run can end, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail("reading a FIFO blocked")
    assert "msg" in result
    folder = tmp_path / "folder.gguf"
    folder.mkdir()
    refused(folder, "not a regular file")
    refused(tmp_path / "absent.gguf", "no such file", error=MissingInputError)


def test_not_a_gguf(tmp_path):
    for content, words in ((b"", "shorter than"), (b'{"model_type": "gemma3"}' + b" " * 40, "GGUF magic")):
        path = tmp_path / "x.gguf"
        path.write_bytes(content)
        refused(path, words)


@pytest.mark.parametrize("change, words", [
    (dict(skip=("blk.3.attn_q.weight",)), ["missing tensor blk.3.attn_q.weight"]),
    (dict(skip=("token_embd.weight",)), ["missing tensor token_embd.weight"]),
    (dict(extra={"blk.3.attn_q.weight": numpy.zeros((7, 16), numpy.float32)}), ["blk.3.attn_q.weight", "expected shape"]),
    (dict(extra={"rope_freqs.weight": numpy.zeros(3, numpy.float32)}), ["unexpected tensor rope_freqs.weight"]),
    (dict(extra={"blk.7.attn_q.weight": numpy.zeros((24, 16), numpy.float32)}), ["unexpected tensor blk.7"]),
    (dict(metadata={"general.architecture": "llama"}), ["general.architecture", "'llama'"]),
    (dict(metadata={"gemma3.block_count": 20_000_000}), ["num_hidden_layers"]),
    (dict(metadata={"gemma3.block_count": "7"}), ["num_hidden_layers"]),
    (dict(metadata={"gemma3.attention.head_count": 0}), ["num_attention_heads"]),
    (dict(metadata={"gemma3.attention.head_count_kv": 3}), ["multiple"]),
    (dict(metadata={"gemma3.attention.value_length": 8}), ["value_length"]),
    (dict(metadata={"gemma3.attention.key_length": [6, 6]}), ["head_dim"]),
    (dict(metadata={"gemma3.rope.freq_base": -1.0}), ["rope_theta"]),
    (dict(metadata={"gemma3.rope.scaling.type": "yarn"}), ["rope_type", "yarn"]),
    (dict(metadata={"general.alignment": 3}), ["alignment"]),
])
def test_bad_model_files(tmp_path, change, words):
    path = tmp_path / "bad.gguf"
    write_gguf(FOLDERS["gemma3"], path, **change)
    refused(path, *words)


def test_missing_required_metadata(tmp_path):
    path = tmp_path / "bad.gguf"
    write_gguf(FOLDERS["gemma3"], path)
    data = path.read_bytes()
    key = b"gemma3.block_count"  # renamed in place, same length: the file stays well-formed
    path.write_bytes(data.replace(key, b"gemma3.block_coun_"))
    refused(path, "missing metadata gemma3.block_count")


@pytest.mark.parametrize("metadata, words", [
    ({"tokenizer.ggml.model": "gpt2"}, ["tokenizer.ggml.model"]),
    ({"tokenizer.ggml.token_type": [1, 2, 3]}, ["token_type"]),
    ({"tokenizer.ggml.bos_token_id": 10**6}, ["bos_token_id"]),
    ({"tokenizer.ggml.tokens": ["a"] * 95 + ["x" * 10_000]}, ["token 95", "characters"]),
    ({"tokenizer.ggml.merges": ["a b c"]}, ["merges"]),
])
def test_bad_vocabularies(tmp_path, metadata, words):
    path = tmp_path / "bad.gguf"
    write_gguf(FOLDERS["gemma3"], path, metadata=metadata)
    refused(path, *words, load=load_tokenizer)


def test_missing_gguf_package_is_one_line(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)
    monkeypatch.setitem(sys.modules, "gguf.quants", None)
    with pytest.raises(DependencyError, match=r"pip install minisae\[gguf\]") as e:
        load_model(tiny)
    assert "\n" not in str(e.value)
    assert load_tokenizer(tiny).encode("the cat")[0] == 2  # the vocabulary is read without gguf


def test_cli_reports_a_bad_gguf_in_one_line(tiny, tmp_path, capsys):
    from test_cli import _error_line

    from minisae.cli import main

    tiny.write_bytes(tiny.read_bytes()[:1000])
    (tmp_path / "t.txt").write_text("the cat sat on the mat.\n")
    assert main(["cache", "--model", str(tiny), "--site", "blocks.0.hook_resid_post", "--text",
                 str(tmp_path / "t.txt"), "--out", str(tmp_path / "acts"), "--no-progress"]) == 2
    line = _error_line(capsys)
    assert str(tiny) in line and "truncated" in line


# ---- fuzzing --------------------------------------------------------------------------------------

HOSTILE_INTS = [0, 1, 2, 3, 7, 8, 9, 13, 30, 99, 2**16, 2**20, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63,
                2**64 - 1]
field_ops = st.lists(st.tuples(st.integers(0, 2**16), st.sampled_from(HOSTILE_INTS)), min_size=1, max_size=3)


def _make_gguf(folder):
    path = folder / "tiny.gguf"
    write_golden_gguf("gemma3", "mixed", path)
    return path


def _use_gguf(path):
    with numpy.errstate(all="ignore"):  # a mutated weight may be inf or NaN: a valid file, silly numbers
        model = load_model(path)
        logits = model.forward(numpy.array([[2, 40, 41, 3, 7]]) % model.config.vocab_size)
    ids, _ = load_tokenizer(path).encode_batch(["the cat sat.", "  日本 <bos>"], max_length=8)
    return type(model).__name__, logits.shape, ids.shape


GGUF_FORMAT = Format("gguf", _make_gguf, {"tiny.gguf": "bytes"}, _use_gguf, None)


def test_valid_gguf_loads(tmp_path):
    name, logits_shape, ids_shape = _use_gguf(_make_gguf(tmp_path))
    assert name == "Gemma3Model" and logits_shape[:2] == (1, 5) and ids_shape[0] == 2


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(bops=byte_ops)
def test_byte_mutated_gguf_fails_cleanly(tmp_path_factory, bops):
    path = _make_gguf(tmp_path_factory.mktemp("gguf"))
    path.write_bytes(mutate_bytes(path.read_bytes(), bops))
    _bounded_load(GGUF_FORMAT, path)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ops=field_ops)
def test_header_field_mutated_gguf_fails_cleanly(tmp_path_factory, ops):
    """Hostile values in the integer fields byte flips rarely reach: counts, lengths, types, dims, offsets."""
    path = _make_gguf(tmp_path_factory.mktemp("gguf"))
    data = path.read_bytes()
    fields = header_fields(data)
    for which, value in ops:
        data = set_field(data, fields[which % len(fields)], value)
    path.write_bytes(data)
    _bounded_load(GGUF_FORMAT, path)
