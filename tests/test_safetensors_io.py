"""minisae.io.safetensors_io against the reference `safetensors` library, hand-written files, and
exact arithmetic (BF16 / F8 decoding, BF16 rounding)."""

import json
import math
import mmap
import os
import struct
import tracemalloc
from fractions import Fraction

import numpy
import pytest
import safetensors
import safetensors.numpy
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minisae.io.safetensors_io import (
    MAX_HEADER_BYTES,
    SafetensorsError,
    SafetensorsFile,
    TensorInfo,
    bf16_bits_to_float32,
    f8_table,
    float32_to_bf16_bits,
    load_file,
    save_file,
)

# header dtype -> NumPy dtype, for every dtype both this module and safetensors.numpy handle
COMMON = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "C64": "<c8", "I64": "<i8", "I32": "<i4",
          "I16": "<i2", "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}

SMALL_ALLOC = 1 << 20  # malformed files must fail without allocating more than this


def write_raw(path, header, data=b"", n=None):
    """A file with an arbitrary header (dict -> JSON, or raw bytes) and data; `n` overrides N."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes((len(raw) if n is None else n).to_bytes(8, "little") + raw + data)
    return path


def same_bits(a, b):
    a, b = numpy.asarray(a), numpy.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


# --- round trips against the reference library ------------------------------------------------

@st.composite
def tensor_dicts(draw):
    names = draw(st.lists(st.text(min_size=1, max_size=8).filter(lambda s: s != "__metadata__"),
                          max_size=5, unique=True))
    out = {}
    for name in names:
        dtype = numpy.dtype(COMMON[draw(st.sampled_from(sorted(COMMON)))])
        shape = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
        n = math.prod(shape)
        if dtype == numpy.bool_:
            arr = numpy.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool)
        else:  # arbitrary bit patterns: NaN payloads, -0, subnormals, extremes
            arr = numpy.frombuffer(draw(st.binary(min_size=n * dtype.itemsize,
                                                  max_size=n * dtype.itemsize)), dtype)
        out[name] = arr.reshape(shape)
    return out


metadata_dicts = st.one_of(st.none(), st.dictionaries(st.text(max_size=6), st.text(max_size=6),
                                                      max_size=3))


@given(tensors=tensor_dicts(), metadata=metadata_dicts)
def test_round_trip_with_reference_library(tmp_path_factory, tensors, metadata):
    d = tmp_path_factory.mktemp("rt")
    ours, theirs = d / "ours.safetensors", d / "theirs.safetensors"
    save_file(tensors, ours, metadata=metadata)
    safetensors.numpy.save_file(tensors, theirs, metadata=metadata)

    back = safetensors.numpy.load_file(ours)  # ours read by the reference
    assert sorted(back) == sorted(tensors)
    assert all(same_bits(back[k], tensors[k]) for k in tensors)
    with safetensors.safe_open(ours, framework="np") as f:
        assert (f.metadata() or {}) == (metadata or {})

    if not tensors and metadata == {}:
        # safetensors 0.8.0 writes the invalid header '{},"__metadata__":{}}' for this input
        # (its issues #466/#601 fixed only the non-empty metadata case); nothing to compare
        return
    with SafetensorsFile(theirs) as f:  # theirs read by us
        assert f.metadata == (metadata or {})
        assert f.keys() == sorted(tensors)
        assert all(same_bits(f.get(k), tensors[k]) for k in tensors)

    # same layout rules -> same bytes (the reference orders metadata keys at random, so only
    # compare when that order cannot differ)
    if metadata is None or len(metadata) <= 1:
        assert ours.read_bytes() == theirs.read_bytes()


def test_round_trip_non_native_inputs(tmp_path, xp):
    """Big-endian, non-contiguous, scalar, list and xp (NumPy/CuPy) inputs are written by value."""
    big = numpy.arange(6, dtype=">f4").reshape(2, 3)
    tensors = {"big": big, "t": numpy.arange(12.0).reshape(3, 4).T, "s": 2.5, "l": [1, 2, 3],
               "dev": xp.asarray(numpy.arange(5, dtype=numpy.int16))}
    save_file(tensors, tmp_path / "x.safetensors")
    got = load_file(tmp_path / "x.safetensors")
    assert got["big"].dtype == numpy.float32 and numpy.array_equal(got["big"], big)
    assert numpy.array_equal(got["t"], numpy.arange(12.0).reshape(3, 4).T)
    assert got["s"].shape == () and got["s"] == 2.5
    assert numpy.array_equal(got["l"], [1, 2, 3]) and got["l"].dtype == numpy.int64
    assert numpy.array_equal(got["dev"], numpy.arange(5)) and got["dev"].dtype == numpy.int16


def test_empty_file_and_padding(tmp_path):
    save_file({}, tmp_path / "e.safetensors")
    raw = (tmp_path / "e.safetensors").read_bytes()
    assert raw == safetensors.numpy.save({})  # b'{}' padded with spaces to 8 bytes
    assert len(raw) % 8 == 0
    with SafetensorsFile(tmp_path / "e.safetensors") as f:
        assert f.keys() == [] and f.metadata == {}


def test_tensor_info_and_layout(tmp_path):
    save_file({"b": numpy.zeros(3, numpy.float32), "a": numpy.zeros(2, numpy.float64)},
              tmp_path / "x.safetensors", metadata={"k": "v"})
    f = SafetensorsFile(tmp_path / "x.safetensors")
    # widest dtype first, each tensor aligned to its item size
    assert f.tensors["a"] == TensorInfo("a", "F64", (2,), 0, 16)
    assert f.tensors["b"] == TensorInfo("b", "F32", (3,), 16, 28)
    assert "a" in f and len(f) == 2 and list(f) == ["a", "b"]
    with pytest.raises(KeyError, match="x.safetensors: no tensor 'c'"):
        f.get("c")


# --- BF16 ---------------------------------------------------------------------------------------

def test_bf16_read_is_exact_for_every_bit_pattern(tmp_path):
    bits = numpy.arange(1 << 16, dtype="<u2")
    path = write_raw(tmp_path / "bf16.safetensors",
                     {"x": {"dtype": "BF16", "shape": [256, 256], "data_offsets": [0, 1 << 17]}},
                     bits.tobytes())
    got = SafetensorsFile(path).get("x")
    assert got.dtype == numpy.float32 and got.shape == (256, 256)
    # independent decoding: the two BF16 bytes are the high half of a little-endian float32
    want = numpy.array([struct.unpack("<f", b"\0\0" + struct.pack("<H", b))[0] for b in range(1 << 16)],
                       numpy.float32).reshape(256, 256)
    nan = numpy.isnan(want)
    assert numpy.array_equal(numpy.isnan(got), nan)
    assert same_bits(got[~nan], want[~nan])  # -0.0 and infinities included
    assert numpy.array_equal(SafetensorsFile(path).get("x", dtype="float64")[~nan],
                             want[~nan].astype(numpy.float64))


def test_bf16_written_by_reference_library(tmp_path):
    """safetensors' own serializer writes BF16 bits (from float32 values exact in BF16)."""
    values = numpy.array([1.0, -2.5, 3.140625, 0.0, -0.0, 2.0 ** -130, numpy.inf, 65280.0], numpy.float32)
    bits = numpy.ascontiguousarray((values.view(numpy.uint32) >> 16).astype("<u2"))
    raw = safetensors.serialize({"w": safetensors.TensorSpec(dtype="bfloat16", shape=[2, 4],
                                                             data_ptr=bits.ctypes.data,
                                                             data_len=bits.nbytes)}, metadata=None)
    (tmp_path / "w.safetensors").write_bytes(bytes(raw))
    with SafetensorsFile(tmp_path / "w.safetensors") as f:
        assert f.tensors["w"].dtype == "BF16"
        assert same_bits(f.get("w"), values.reshape(2, 4))


def _bf16_round_reference(x):
    """Nearest BF16 value to the float x (ties to even), with exact rationals; inf on overflow."""
    if math.isnan(x) or math.isinf(x):
        return x
    mag = Fraction(abs(x))
    if mag == 0:
        return x  # keeps the sign of zero
    e = max(math.frexp(abs(x))[1] - 1, -126)  # exponent of the BF16 grid holding |x|
    ulp = Fraction(2) ** (e - 7)
    lo_units = math.floor(mag / ulp)
    lo, hi = lo_units * ulp, (lo_units + 1) * ulp
    if mag - lo < hi - mag or (mag - lo == hi - mag and lo_units % 2 == 0):
        r = lo
    else:
        r = hi
    if r >= Fraction(2) ** 128:
        return math.copysign(math.inf, x)
    return math.copysign(float(r), x)


def _check_bf16_rounding(xs):
    bits = float32_to_bf16_bits(xs)
    got = bf16_bits_to_float32(bits)
    assert bits.dtype == numpy.uint16 and bits.shape == numpy.shape(xs)
    with numpy.errstate(invalid="ignore"):  # signalling NaN inputs
        wide = numpy.asarray(xs, numpy.float64).ravel().tolist()
    for x, g in zip(wide, got.ravel().tolist()):
        want = _bf16_round_reference(x)
        if math.isnan(want):
            assert math.isnan(g)
        else:
            assert g == want and math.copysign(1.0, g) == math.copysign(1.0, want), (x, g, want)


@given(hnp.arrays(numpy.float32, hnp.array_shapes(min_dims=0, max_dims=2, max_side=8),
                  elements=st.floats(width=32)))
def test_bf16_rounding_float32(xs):
    _check_bf16_rounding(xs)


@given(hnp.arrays(numpy.float64, st.integers(0, 8), elements=st.floats()))
def test_bf16_rounding_float64_rounds_once(xs):
    _check_bf16_rounding(xs)


def test_bf16_rounding_edge_cases():
    ties = numpy.array([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001,  # ties to even, near ties
                        0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF,  # overflow boundary
                        0x00008000, 0x00018000, 0x00000001, 0x80008000,  # subnormals
                        0x7F800000, 0xFF800000, 0x7F800001, 0xFFC00000], numpy.uint32)
    xs = ties.view(numpy.float32)
    _check_bf16_rounding(xs)
    # a float64 a hair above a BF16 midpoint that float32 rounding would turn into the tie itself
    mid = 1.0 + 2.0 ** -8
    _check_bf16_rounding(numpy.array([mid + 2.0 ** -40, mid - 2.0 ** -40, 1e300, -1e-300]))
    assert float(bf16_bits_to_float32(float32_to_bf16_bits(numpy.float64(mid + 2.0 ** -40)))) \
        == 1.0 + 2.0 ** -7


def test_write_bf16(tmp_path):
    x = numpy.array([[1.0, 1.00390625, 1.01171875], [-3.0e38, 3.4e38, numpy.nan]], numpy.float32)
    y = numpy.array([1.0, 2.0 ** -20, 1.0 + 2.0 ** -11, 70000.0], numpy.float64)
    with numpy.errstate(over="ignore"):
        y16 = y.astype(numpy.float16)  # round to nearest even; 70000 -> inf
    with pytest.warns(RuntimeWarning, match="overflow"):  # NumPy's cast says 70000 became inf
        save_file({"x": x, "y": y}, tmp_path / "b.safetensors", dtypes={"x": "BF16", "y": "F16"})
    f = SafetensorsFile(tmp_path / "b.safetensors")
    assert f.tensors["x"].dtype == "BF16" and f.tensors["y"].dtype == "F16"
    got = f.get("x")
    assert got[0].tolist() == [1.0, 1.0, 1.015625]  # 1 + 2**-8 ties to even (down)
    assert got[1, 0] == numpy.float32(-3.0040553e38) and numpy.isinf(got[1, 1]) and numpy.isnan(got[1, 2])
    assert same_bits(f.get("y"), y16)


# --- F16 and F8 -------------------------------------------------------------------------------

def test_f16_to_float32_exact(tmp_path):
    bits = numpy.arange(1 << 16, dtype="<u2")
    path = write_raw(tmp_path / "h.safetensors",
                     {"h": {"dtype": "F16", "shape": [1 << 16], "data_offsets": [0, 1 << 17]}},
                     bits.tobytes())
    f = SafetensorsFile(path)
    assert same_bits(f.get("h"), bits.view("<f2"))  # stays float16 by default
    wide = f.get("h", dtype=numpy.float32)
    finite = numpy.isfinite(wide)
    # float16 -> float32 is exact: every value round-trips back to the same bits
    assert same_bits(wide[finite].astype("<f2"), bits.view("<f2")[finite])


def test_f8_tables():
    # E5M2 is the top byte of a float16
    e5m2 = (numpy.arange(256, dtype=numpy.uint16) << 8).view(numpy.float16).astype(numpy.float32)
    t = f8_table("F8_E5M2")
    assert numpy.array_equal(numpy.isnan(t), numpy.isnan(e5m2))
    assert same_bits(t[~numpy.isnan(t)], e5m2[~numpy.isnan(e5m2)])

    t = f8_table("F8_E4M3")  # float8_e4m3fn: bias 7, no inf, NaN at S.1111.111
    assert t[0x7E] == 448.0 and t[0x01] == 2.0 ** -9 and t[0x08] == 2.0 ** -6 and t[0x38] == 1.0
    assert t[0xFE] == -448.0 and t[0x80] == 0.0 and math.copysign(1, t[0x80]) == -1
    assert numpy.flatnonzero(numpy.isnan(t)).tolist() == [0x7F, 0xFF] and numpy.isfinite(t).sum() == 254

    for name, top in (("F8_E4M3FNUZ", 240.0), ("F8_E5M2FNUZ", 57344.0)):  # bias +1, 0x80 = NaN
        t = f8_table(name)
        assert t[0x40] == 1.0 and t[0x7F] == top and t[0xFF] == -top
        assert numpy.flatnonzero(numpy.isnan(t)).tolist() == [0x80]

    t = f8_table("F8_E8M0")  # unsigned powers of two, 0xFF = NaN
    assert t[127] == 1.0 and t[0] == 2.0 ** -127 and t[254] == 2.0 ** 127 and numpy.isnan(t[255])
    assert numpy.array_equal(t[:255], numpy.ldexp(1.0, numpy.arange(255) - 127).astype(numpy.float32))

    # every finite value is a float32 exactly and decoding is monotone in the unsigned byte
    for name in ("F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"):
        t = f8_table(name)
        pos = t[:0x80][numpy.isfinite(t[:0x80])]
        assert numpy.all(numpy.diff(pos) > 0)


def test_f8_file_from_reference_library(tmp_path):
    data = numpy.arange(256, dtype=numpy.uint8)
    specs = {name: safetensors.TensorSpec(dtype=torch_name, shape=[16, 16], data_ptr=data.ctypes.data,
                                          data_len=256)
             for name, torch_name in (("a", "float8_e4m3fn"), ("b", "float8_e5m2"), ("c", "float8_e8m0fnu"))}
    (tmp_path / "f8.safetensors").write_bytes(bytes(safetensors.serialize(specs, metadata=None)))
    f = SafetensorsFile(tmp_path / "f8.safetensors")
    for name, dtype in (("a", "F8_E4M3"), ("b", "F8_E5M2"), ("c", "F8_E8M0")):
        assert f.tensors[name].dtype == dtype
        assert same_bits(f.get(name), f8_table(dtype).reshape(16, 16))


def test_sub_byte_dtype_is_listed_but_not_read(tmp_path):
    path = write_raw(tmp_path / "f4.safetensors",
                     {"q": {"dtype": "F4", "shape": [2, 4], "data_offsets": [0, 4]}}, b"\0" * 4)
    f = SafetensorsFile(path)
    assert f.tensors["q"].dtype == "F4"
    with pytest.raises(SafetensorsError, match=r"f4.safetensors: tensor 'q' has dtype F4"):
        f.get("q")


# --- memory mapping -----------------------------------------------------------------------------

def test_reads_are_memory_mapped(tmp_path):
    n = 8 << 20  # a 32 MB float32 tensor, written as a sparse file
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}).encode()
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little") + header)
        fh.truncate(8 + len(header) + 4 * n)
    tracemalloc.start()
    try:
        f = SafetensorsFile(path)
        w = f.get("w")
        same = f.get("w", dtype=numpy.float32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < SMALL_ALLOC
    assert w.shape == (n,) and w.dtype == numpy.float32 and same.base is not None
    assert not w.flags.owndata and not w.flags.writeable
    base = w
    while isinstance(base, numpy.ndarray):
        base = base.base
    assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)
    f.close()
    assert w[-1] == 0.0  # still readable after close: the array keeps the mapping alive


def test_arrays_outlive_file_and_atomic_overwrite(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": numpy.arange(4.0)}, path)
    old = load_file(path)["a"]
    save_file({"a": numpy.zeros(4)}, path)  # replaced atomically: the old mapping is untouched
    assert old.tolist() == [0.0, 1.0, 2.0, 3.0]
    assert load_file(path)["a"].tolist() == [0.0] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # no temp files left


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    save_file({"a": numpy.arange(4.0)}, path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="'bad': dtype complex128 has no safetensors equivalent"):
        save_file({"a": numpy.zeros(2), "bad": numpy.zeros(2, complex)}, path)

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        save_file({"a": numpy.zeros(2)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]


def test_writer_argument_errors(tmp_path):
    p = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="'__metadata__'"):
        save_file({"__metadata__": numpy.zeros(1)}, p)
    with pytest.raises(ValueError, match="metadata should map strings to strings"):
        save_file({"a": numpy.zeros(1)}, p, metadata={"n": 1})
    with pytest.raises(ValueError, match=r"not being written: \['b'\]"):
        save_file({"a": numpy.zeros(1)}, p, dtypes={"b": "BF16"})
    with pytest.raises(ValueError, match="'a': writing as BF16 needs a floating-point array"):
        save_file({"a": numpy.zeros(1, numpy.int32)}, p, dtypes={"a": "BF16"})
    with pytest.raises(ValueError, match="'a': cannot write as 'F8_E4M3'"):
        save_file({"a": numpy.zeros(1)}, p, dtypes={"a": "F8_E4M3"})
    with pytest.raises(ValueError, match="'s': dtype <U1 has no safetensors equivalent"):
        save_file({"s": numpy.array(["x"])}, p)
    assert not p.exists()


# --- malformed files ----------------------------------------------------------------------------

F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}

MALFORMED = [
    # (id, header (dict or bytes), data, N override, expected message)
    ("empty", None, b"", None, "file is 0 bytes, shorter than the 8-byte"),
    ("short", None, b"\1\2\3\4\5\6\7", None, "file is 7 bytes"),
    ("huge-n", b"{}", b"", 2 ** 60, f"exceeds the {MAX_HEADER_BYTES}-byte limit"),
    ("n-past-end", b"{}", b"", 5000, "header length 5000 bytes runs past the end of the 10-byte file"),
    ("not-object-start", b"[1, 2]", b"", None, "header should be a JSON object starting with '{'"),
    ("bad-json", b"{\"a\": ", b"", None, "header is not valid UTF-8 JSON"),
    ("bad-utf8", b"{\"\xff\": 1}", b"", None, "header is not valid UTF-8 JSON"),
    ("duplicate", b'{"a": {}, "a": {}}', b"", None, "duplicate key 'a'"),
    ("metadata-values", {"__metadata__": {"k": 1}}, b"", None, "__metadata__ should map strings to strings"),
    ("entry-not-object", {"w": [1]}, b"", None, "tensor 'w': header entry should be an object"),
    ("missing-keys", {"w": {"dtype": "F32"}}, b"", None, "tensor 'w': header entry lacks shape, data_offsets"),
    ("unknown-dtype", {"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16,
     None, "tensor 'w': unknown dtype 'F128'"),
    ("negative-dim", {"w": {"dtype": "F32", "shape": [-1, 2], "data_offsets": [0, 8]}}, b"\0" * 8,
     None, "tensor 'w': shape should be a list of non-negative integers, found [-1, 2]"),
    ("bool-dim", {"w": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4,
     None, "tensor 'w': shape should be a list of non-negative integers"),
    ("offsets-reversed", {"w": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, b"",
     None, "tensor 'w': data_offsets should be [begin, end] with 0 <= begin <= end, found [8, 0]"),
    ("offsets-short", {"w": {"dtype": "F32", "shape": [0], "data_offsets": [0]}}, b"",
     None, "tensor 'w': data_offsets should be [begin, end]"),
    ("byte-count", {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8,
     None, "tensor 'w': dtype F32 with shape (3,) needs 12 bytes, but data_offsets [0, 8] span 8"),
    ("huge-shape", {"w": {"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 8]}},
     b"\0" * 8, None, "tensor 'w': dtype F32 with shape (1099511627776, 1099511627776) needs"),
    ("overlap", {"a": F32_2, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
     b"\0" * 12, None, "tensor 'b' data [4, 12) overlaps tensor 'a' ending at 8"),
    ("hole", {"a": F32_2, "b": {"dtype": "F32", "shape": [1], "data_offsets": [12, 16]}},
     b"\0" * 16, None, "tensor 'b' data begins at 12, expected 8: 4 bytes after tensor 'a' belong to no tensor"),
    ("not-from-zero", {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8,
     None, "tensor 'a' data begins at 4, expected 0"),
    ("truncated", {"a": F32_2}, b"\0" * 5, None,
     "tensor 'a' data ends at byte 8 of the data section, but the file holds only 5"),
    ("trailing", {"a": F32_2}, b"\0" * 9, None, "the data section has 9 bytes, but the tensors cover only 8"),
]


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_files(tmp_path, case):
    name, header, data, n, message = case
    path = tmp_path / f"{name}.safetensors"
    if header is None:
        path.write_bytes(data)
    else:
        write_raw(path, header, data, n)
    tracemalloc.start()
    try:
        with pytest.raises(SafetensorsError) as err:
            SafetensorsFile(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(path) in str(err.value)
    assert message in str(err.value)
    assert peak < SMALL_ALLOC
    with pytest.raises(SafetensorsError):
        load_file(path)
