"""A pure-NumPy safetensors reader and writer (no torch; BF16 and F8 read exactly).

Why not `safetensors.numpy`? Its NumPy binding cannot return BF16 (NumPy has no bfloat16), and
Gemma 2 `-it` checkpoints are BF16. The format is small enough to read by hand:

    [8 bytes]  N, the header length, unsigned little-endian
    [N bytes]  JSON: {"__metadata__": {str: str}  (optional),
                      "<name>": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}
               padded with spaces so the data starts on an 8-byte boundary
    [rest]     the data section; offsets are relative to its start, every tensor is C-contiguous
               little-endian, and the tensors cover it exactly, without holes or overlaps

Reads are memory-mapped: `SafetensorsFile(path)` reads and validates the header only, and
`get(name)` returns a read-only view of the mapped file for native dtypes, so a 10 GB checkpoint
costs no RAM until its pages are touched. BF16 becomes float32 exactly (a BF16 number is the top
half of a float32): `(u16.astype(uint32) << 16).view(float32)`. The F8 formats become float32
exactly through a 256-entry table. F16 stays float16 (NumPy has it); `dtype=` casts.

    with SafetensorsFile("model.safetensors") as f:
        w = f.get("model.embed_tokens.weight", dtype="float32")   # (V, D)
    save_file({"W_enc": W_enc, "b_enc": b_enc}, "sae_weights.safetensors")

Dimension legend: none; tensors keep the shapes their headers give.
"""

import json
import math
import mmap
import os
import secrets
from pathlib import Path
from typing import NamedTuple

import numpy

from minisae.errors import FileFormatError, storage_error
from minisae.io.files import check_regular_file
from minisae.xp import to_numpy

MAX_HEADER_BYTES = 100_000_000  # the reference library's limit on N

# header dtype -> (bits per element, NumPy dtype of the stored bits or None if unreadable here)
_STORED = {
    "BOOL": (8, numpy.dtype("?")),
    "U8": (8, numpy.dtype("u1")),
    "I8": (8, numpy.dtype("i1")),
    "U16": (16, numpy.dtype("<u2")),
    "I16": (16, numpy.dtype("<i2")),
    "U32": (32, numpy.dtype("<u4")),
    "I32": (32, numpy.dtype("<i4")),
    "U64": (64, numpy.dtype("<u8")),
    "I64": (64, numpy.dtype("<i8")),
    "F16": (16, numpy.dtype("<f2")),
    "F32": (32, numpy.dtype("<f4")),
    "F64": (64, numpy.dtype("<f8")),
    "C64": (64, numpy.dtype("<c8")),
    "BF16": (16, numpy.dtype("<u2")),  # decoded to float32
    "F8_E4M3": (8, numpy.dtype("u1")),  # decoded to float32 through a table
    "F8_E5M2": (8, numpy.dtype("u1")),
    "F8_E4M3FNUZ": (8, numpy.dtype("u1")),
    "F8_E5M2FNUZ": (8, numpy.dtype("u1")),
    "F8_E8M0": (8, numpy.dtype("u1")),
    "F4": (4, None),  # packed sub-byte formats: known to the format, not readable here
    "F6_E2M3": (6, None),
    "F6_E3M2": (6, None),
}

# NumPy dtype -> header dtype, for writing
_WRITE = {
    numpy.dtype(numpy.bool_): "BOOL",
    numpy.dtype(numpy.uint8): "U8",
    numpy.dtype(numpy.int8): "I8",
    numpy.dtype(numpy.uint16): "U16",
    numpy.dtype(numpy.int16): "I16",
    numpy.dtype(numpy.uint32): "U32",
    numpy.dtype(numpy.int32): "I32",
    numpy.dtype(numpy.uint64): "U64",
    numpy.dtype(numpy.int64): "I64",
    numpy.dtype(numpy.float16): "F16",
    numpy.dtype(numpy.float32): "F32",
    numpy.dtype(numpy.float64): "F64",
    numpy.dtype(numpy.complex64): "C64",
}

# The reference writer lays tensors out by dtype (this order, widest first), then by name; we do
# the same, so files written here are byte-identical to safetensors' own (metadata aside).
_LAYOUT_ORDER = ["U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
                 "F8_E5M2FNUZ", "F8_E4M3FNUZ", "F8_E8M0", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"]
_LAYOUT_RANK = {name: i for i, name in enumerate(_LAYOUT_ORDER)}


class SafetensorsError(FileFormatError):
    """A malformed or unreadable safetensors file; the message names the file and the tensor."""


class TensorInfo(NamedTuple):
    name: str
    dtype: str  # header dtype, e.g. "F32", "BF16"
    shape: tuple
    begin: int  # byte offsets relative to the start of the data section
    end: int


# ----------------------------------------------------------------------------------------------
# exact conversions

def bf16_bits_to_float32(u16):
    """BF16 bit patterns (uint16) -> float32, exactly: a BF16 number is the top half of a float32."""
    return (numpy.asarray(u16).astype(numpy.uint32) << 16).view(numpy.float32)


def float32_to_bf16_bits(x):
    """float32 (or float64) -> BF16 bit patterns (uint16), rounding to nearest, ties to even.

    NaNs stay NaN (quiet, sign kept); values past the largest BF16 round to +-inf. float64 input
    is rounded once, correctly: it first goes to float32 rounding to odd, which keeps enough
    information for the second rounding to land where a direct one would (torch instead rounds
    float64 to float32 to nearest first, and can differ from this in the last bit on rare ties).
    """
    x = numpy.asarray(x)
    if x.dtype == numpy.float64:
        with numpy.errstate(over="ignore"):  # past float32 range -> inf, handled below
            r = x.astype(numpy.float32)  # (shape) round to nearest even
        inexact = (r.astype(numpy.float64) != x) & numpy.isfinite(x)
        # step back toward zero where rounding went away from it, then set the sticky (odd) bit
        away = inexact & (numpy.abs(r.astype(numpy.float64)) > numpy.abs(x))
        r = numpy.where(away, numpy.nextafter(r, numpy.float32(0)), r)  # (shape)
        u = r.view(numpy.uint32) | inexact.astype(numpy.uint32)  # (shape) round to odd
    else:
        u = numpy.asarray(x, dtype=numpy.float32, order="C").view(numpy.uint32)  # (shape)
    top = (u >> 16).astype(numpy.uint16)  # (shape) truncated BF16 bits
    lsb = top & 1  # the last kept bit decides ties
    rounded = ((u + 0x7FFF + lsb) >> 16).astype(numpy.uint16)  # wraps only for NaN
    nan = numpy.isnan(u.view(numpy.float32))
    quiet_nan = top | 0x0040  # keep sign and payload top, set the quiet bit
    return numpy.where(nan, quiet_nan, rounded)


def _f8_table(exp_bits, man_bits, bias, kind):
    """float32 value of every byte of an 8-bit float format.

    kind "ieee": all-ones exponent is inf (mantissa 0) or NaN (E5M2);
    "fn": no inf, only all-ones exponent and mantissa is NaN (E4M3FN);
    "fnuz": no inf, no negative zero, 0x80 is the only NaN (the FNUZ formats).
    """
    table = numpy.empty(256, numpy.float32)
    e_max = (1 << exp_bits) - 1
    for b in range(256):
        sign = -1.0 if b >> 7 else 1.0
        e = (b >> man_bits) & e_max
        m = b & ((1 << man_bits) - 1)
        if e == 0:  # zero and subnormals
            v = math.ldexp(m, 1 - bias - man_bits)
        else:
            v = math.ldexp((1 << man_bits) + m, e - bias - man_bits)
        if kind == "ieee" and e == e_max:
            v = math.inf if m == 0 else math.nan
        elif kind == "fn" and e == e_max and m == (1 << man_bits) - 1:
            v = math.nan
        elif kind == "fnuz" and b == 0x80:
            v, sign = math.nan, 1.0
        table[b] = sign * v
    return table


def _e8m0_table():
    """F8_E8M0 (float8_e8m0fnu): unsigned powers of two 2**(b - 127); 0xFF is NaN; no zero."""
    table = numpy.array([math.ldexp(1.0, b - 127) for b in range(255)] + [math.nan], numpy.float32)
    return table


_F8_SPECS = {
    "F8_E4M3": (4, 3, 7, "fn"),
    "F8_E5M2": (5, 2, 15, "ieee"),
    "F8_E4M3FNUZ": (4, 3, 8, "fnuz"),
    "F8_E5M2FNUZ": (5, 2, 16, "fnuz"),
}
_F8_TABLES = {}


def f8_table(dtype):
    """The 256-entry float32 decoding table of an F8 header dtype ("F8_E4M3", ...)."""
    if dtype not in _F8_TABLES:
        _F8_TABLES[dtype] = _e8m0_table() if dtype == "F8_E8M0" else _f8_table(*_F8_SPECS[dtype])
    return _F8_TABLES[dtype]


# ----------------------------------------------------------------------------------------------
# reading

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {k!r}")
        d[k] = v
    return d


class SafetensorsFile:
    """One safetensors file: the header is read and validated at construction, data on `get`."""

    def __init__(self, path):
        self.path = Path(path)
        self._mm = None
        check_regular_file(self.path, error=SafetensorsError)  # a FIFO would block the open
        with open(self.path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            self._file_size = size
            if size < 8:
                raise SafetensorsError(f"{self.path}: file is {size} bytes, shorter than the "
                                       "8-byte header-length prefix; not a safetensors file")
            n = int.from_bytes(fh.read(8), "little")
            if n > MAX_HEADER_BYTES:
                raise SafetensorsError(f"{self.path}: header length {n} bytes exceeds the "
                                       f"{MAX_HEADER_BYTES}-byte limit; not a safetensors file")
            if 8 + n > size:
                raise SafetensorsError(f"{self.path}: header length {n} bytes runs past the end of "
                                       f"the {size}-byte file; the file is truncated or not safetensors")
            raw = fh.read(n)
        self._data_start = 8 + n
        self.metadata, self.tensors = self._parse_header(raw, size - 8 - n)

    def _parse_header(self, raw, data_size):
        where = str(self.path)
        if not raw.startswith(b"{"):
            raise SafetensorsError(f"{where}: header should be a JSON object starting with '{{', "
                                   f"found {raw[:16]!r}")
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, ValueError) as e:
            raise SafetensorsError(f"{where}: header is not valid UTF-8 JSON ({e})") from None
        except RecursionError:
            raise SafetensorsError(f"{where}: header JSON is nested too deeply") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{where}: header should be a JSON object, found "
                                   f"{type(header).__name__}")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise SafetensorsError(f"{where}: __metadata__ should map strings to strings, "
                                   f"found {metadata!r:.200}")
        tensors = {}
        for name, entry in header.items():
            tensors[name] = self._parse_entry(name, entry)
        # the tensors must tile the data section exactly: sorted by offsets, each begins where the
        # previous one ended, and the last one ends where the file ends
        expected, previous = 0, None
        for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
            if t.begin < expected:
                raise SafetensorsError(f"{where}: tensor {t.name!r} data [{t.begin}, {t.end}) "
                                       f"overlaps tensor {previous!r} ending at {expected}")
            if t.begin > expected:
                after = f"after tensor {previous!r} " if previous else ""
                raise SafetensorsError(f"{where}: tensor {t.name!r} data begins at {t.begin}, "
                                       f"expected {expected}: {t.begin - expected} bytes {after}"
                                       "belong to no tensor")
            expected, previous = t.end, t.name
        if expected > data_size:
            raise SafetensorsError(f"{where}: tensor {previous!r} data ends at byte {expected} of "
                                   f"the data section, but the file holds only {data_size} data "
                                   "bytes; the file is truncated")
        if expected < data_size:
            raise SafetensorsError(f"{where}: the data section has {data_size} bytes, but the "
                                   f"tensors cover only {expected}; {data_size - expected} "
                                   "trailing bytes belong to no tensor")
        return metadata, tensors

    def _parse_entry(self, name, entry):
        where = f"{self.path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise SafetensorsError(f"{where}: header entry should be an object with dtype, shape "
                                   f"and data_offsets, found {entry!r:.200}")
        missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
        if missing:
            raise SafetensorsError(f"{where}: header entry lacks {', '.join(missing)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _STORED:
            raise SafetensorsError(f"{where}: unknown dtype {dtype!r}; expected one of "
                                   f"{', '.join(_STORED)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise SafetensorsError(f"{where}: shape should be a list of non-negative integers, "
                                   f"found {shape!r:.200}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets))
                or not 0 <= offsets[0] <= offsets[1]):
            raise SafetensorsError(f"{where}: data_offsets should be [begin, end] with "
                                   f"0 <= begin <= end, found {offsets!r:.200}")
        bits = _STORED[dtype][0]
        n_elements = math.prod(shape)  # a Python int: no overflow, no allocation
        n_bytes, rest = divmod(n_elements * bits, 8)
        if rest or n_bytes != offsets[1] - offsets[0]:
            raise SafetensorsError(f"{where}: dtype {dtype} with shape {tuple(shape)} needs "
                                   f"{n_elements * bits / 8:g} bytes, but data_offsets "
                                   f"{offsets} span {offsets[1] - offsets[0]}")
        return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])

    # --- access ---

    def keys(self):
        """Tensor names, sorted."""
        return sorted(self.tensors)

    def __contains__(self, name):
        return name in self.tensors

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self.tensors)

    def _map(self):
        if self._mm is None:
            with open(self.path, "rb") as fh:
                if os.fstat(fh.fileno()).st_size != self._file_size:
                    raise SafetensorsError(f"{self.path}: file changed size since its header was read")
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def get(self, name, *, dtype=None):
        """Tensor `name` as a NumPy array.

        Native dtypes come back as read-only views of the memory-mapped file (no copy, nothing read
        until touched); BF16 and F8 as new float32 arrays (exact). `dtype` casts (a copy unless it
        is already that dtype).
        """
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor {name!r}; the file has {len(self.tensors)} "
                           f"tensors, e.g. {self.keys()[:5]}")
        t = self.tensors[name]
        stored = _STORED[t.dtype][1]
        if stored is None:
            raise SafetensorsError(f"{self.path}: tensor {name!r} has dtype {t.dtype}, a packed "
                                   "sub-byte format minisae does not read")
        count = math.prod(t.shape)
        if count == 0:
            bits = numpy.empty(t.shape, stored)  # (shape) nothing to map
        else:
            bits = numpy.frombuffer(self._map(), dtype=stored, count=count,
                                    offset=self._data_start + t.begin).reshape(t.shape)  # (shape)
        if t.dtype == "BF16":
            arr = bf16_bits_to_float32(bits)  # (shape) float32
        elif t.dtype.startswith("F8_"):
            arr = f8_table(t.dtype)[bits]  # (shape) float32
        else:
            arr = bits
        if dtype is not None:
            with numpy.errstate(invalid="ignore"):  # signalling NaNs in the file stay NaN quietly
                arr = arr.astype(dtype, copy=False)
        return arr

    def close(self):
        """Forget the mapping; arrays already returned keep it alive until they are freed."""
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # views of it are still in use; the GC closes it after them
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"SafetensorsFile({str(self.path)!r}, {len(self.tensors)} tensors)"


def load_file(path, *, dtype=None):
    """Every tensor of a safetensors file, as {name: numpy array} (see `SafetensorsFile.get`)."""
    with SafetensorsFile(path) as f:
        return {name: f.get(name, dtype=dtype) for name in f.keys()}


# ----------------------------------------------------------------------------------------------
# writing

_CAST_TARGETS = {"BF16": None, "F16": numpy.float16, "F32": numpy.float32, "F64": numpy.float64}


def _prepare(name, value, target):
    """(header dtype, little-endian C-contiguous NumPy array of the bits to write) for one tensor."""
    if not isinstance(name, str) or name == "__metadata__":
        raise ValueError(f"tensor names must be strings other than '__metadata__', found {name!r}")
    arr = to_numpy(value)  # CuPy -> host; lists and scalars -> arrays
    if target is not None:
        if target not in _CAST_TARGETS:
            raise ValueError(f"tensor {name!r}: cannot write as {target!r}; expected one of "
                             f"{', '.join(_CAST_TARGETS)}")
        if arr.dtype.kind != "f":
            raise ValueError(f"tensor {name!r}: writing as {target} needs a floating-point array, "
                             f"found {arr.dtype}")
        if target == "BF16":
            return "BF16", float32_to_bf16_bits(arr).astype("<u2", copy=False)
        arr = arr.astype(_CAST_TARGETS[target])
    key = arr.dtype.newbyteorder("=") if arr.dtype.byteorder in "<>" else arr.dtype
    if key not in _WRITE:
        raise ValueError(f"tensor {name!r}: dtype {arr.dtype} has no safetensors equivalent; "
                         f"expected one of {', '.join(str(d) for d in _WRITE)}")
    header_dtype = _WRITE[key]
    return header_dtype, numpy.asarray(arr, dtype=_STORED[header_dtype][1], order="C")


def save_file(tensors, path, *, metadata=None, dtypes=None):
    """Write {name: array} to `path` as safetensors, atomically (temp file + os.replace).

    Arrays may be NumPy, CuPy or array-likes; bool, (u)int8-64, float16/32/64 and complex64 are
    written as themselves. `dtypes` maps names to "BF16" (round to nearest even), "F16", "F32" or
    "F64" to cast floating-point tensors on the way out. `metadata` is {str: str}. An existing
    file is replaced.
    """
    dtypes = dict(dtypes or {})
    unknown = sorted(set(dtypes) - set(tensors))
    if unknown:
        raise ValueError(f"dtypes names tensors that are not being written: {unknown}")
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ValueError(f"metadata should map strings to strings, found {metadata!r:.200}")
    prepared = {name: _prepare(name, value, dtypes.get(name)) for name, value in tensors.items()}
    order = sorted(prepared, key=lambda n: (_LAYOUT_RANK[prepared[n][0]], n))

    header = {}
    if metadata is not None:  # written even when empty, as the reference writer does
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for name in order:
        header_dtype, arr = prepared[name]
        header[name] = {"dtype": header_dtype, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # pad so the data section starts 8-byte aligned

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # umask applies
    except OSError as e:
        raise storage_error(e, path) from e
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(len(text).to_bytes(8, "little"))
            fh.write(text)
            for name in order:
                arr = prepared[name][1]
                if arr.size:
                    fh.write(memoryview(arr.reshape(-1).view(numpy.uint8)))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full or read-only disk: one line naming the file; the old one stays
        tmp.unlink(missing_ok=True)
        raise storage_error(e, path) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
