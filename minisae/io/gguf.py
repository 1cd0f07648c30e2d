"""GGUF files (llama.cpp's single-file checkpoints): a bounded header reader, and tensors as float32.

    f = GGUFFile("gemma-3-270m-q4_k_m.gguf")       # reads and checks the header; no tensor data
    f.metadata["gemma3.block_count"]                 # 18
    f.tensors["blk.0.attn_q.weight"]                 # TensorInfo(shape=(1024, 640), type_id=6, ...)
    w = f.read("blk.0.attn_q.weight")                # (1024, 640) float32, dequantised by gguf.quants

The format (ggml's docs/gguf.md; little-endian throughout):

    magic b"GGUF" | version u32 (2 or 3) | tensor_count u64 | kv_count u64
    kv_count     x  key: string | value_type u32 | value
    tensor_count x  name: string | n_dims u32 | dims u64[n_dims] | type u32 | offset u64
    zero padding up to a multiple of general.alignment (default 32): the data section starts here
    tensor data, each tensor at data_start + offset (offset a multiple of the alignment)

    string = byte length u64 + UTF-8 bytes          array = element type u32 + count u64 + elements
    value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array,
                 10 u64, 11 i64, 12 f64

Shapes: `dims` lists ggml's ne[0] first, the fastest-varying axis (the columns), so the NumPy (C
order) shape is dims reversed. A llama.cpp file of a Hugging Face model therefore has the HF shape:
token_embd (V, D) = embed_tokens, attn_q (H*d, D) = q_proj, no transposition. A quantised row of
ne[0] values is ne[0] / block_size blocks of type_size bytes (Q8_0: 32 values in 34 bytes).

Dequantisation is delegated to the `gguf` package (llama.cpp's own Python code, gguf.quants; an
optional dependency: `pip install minisae[gguf]`); tests/test_gguf_hostile.py checks its Q8_0,
Q5_0, Q4_K and Q6_K against plain per-block decoders. Any type it dequantises is read; F32 tensors
are memory-mapped views (no copy). The header is read here, not with gguf.GGUFReader: that reader
builds NumPy views of every metadata item (10-50 s for the 262,144-token vocabulary of Gemma 3
270M on a shared 2-core machine, against 0.15-0.4 s here) and can be kept busy for minutes by a
100-byte file claiming a 2^40-element array; this one checks every count and length against the
file size before it loops or allocates, so a small hostile file cannot ask for large memory or work.

Dimension legend: none; tensors keep the shapes their headers give (reversed, as above).
"""

import math
import mmap
import os
import stat
import struct
from pathlib import Path
from typing import NamedTuple

import numpy

from minisae.errors import DependencyError, FileFormatError, MissingInputError, storage_error

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 counted with u32s; llama.cpp stopped reading it in 2023
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
# limits far above any real file (Gemma 3 270M: 33 keys, 236 tensors), checked before any loop
MAX_KV, MAX_TENSORS = 2**16, 2**20
MAX_NAME_BYTES = 2**16  # a key or tensor name (llama.cpp's names are < 64 bytes)
DEQUANT_CHUNK = 2**24  # values dequantised per call, so the temporaries stay ~100 MB

# value type -> (name, struct format, bytes); 8 (string) and 9 (array) have no fixed size
SCALARS = {0: ("u8", "<B", 1), 1: ("i8", "<b", 1), 2: ("u16", "<H", 2), 3: ("i16", "<h", 2),
           4: ("u32", "<I", 4), 5: ("i32", "<i", 4), 6: ("f32", "<f", 4), 7: ("bool", "<?", 1),
           10: ("u64", "<Q", 8), 11: ("i64", "<q", 8), 12: ("f64", "<d", 8)}
STRING, ARRAY = 8, 9
_MIN_BYTES = {**{t: size for t, (_, _, size) in SCALARS.items()}, STRING: 8, ARRAY: 12}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
          10: "<u8", 11: "<i8", 12: "<f8"}  # arrays of numbers are read as NumPy arrays


class GGUFError(FileFormatError):
    """A GGUF file that is truncated, malformed, hostile or holds something minisae cannot read."""


class TensorInfo(NamedTuple):
    name: str
    shape: tuple  # NumPy order: ggml's dims reversed
    type_id: int  # ggml type (GGMLQuantizationType): 0 F32, 1 F16, 8 Q8_0, 12 Q4_K, 30 BF16, ...
    offset: int  # absolute position of the first byte in the file


def gguf_quants():
    """The `gguf` package (imported on first use); a DependencyError in one line when missing."""
    try:
        import gguf
        import gguf.quants  # noqa: F401
    except ImportError:
        raise DependencyError("reading GGUF tensors needs the gguf package: pip install minisae[gguf] "
                              "(or pip install gguf)") from None
    return gguf


def is_gguf(path):
    """True for a path named *.gguf, whatever it is (GGUFFile then says what is wrong with a missing
    file or a FIFO), or a regular file that starts with the GGUF magic (read only if regular)."""
    path = Path(path)
    if path.suffix.lower() == ".gguf":
        return True
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as fh:
            return fh.read(4) == MAGIC
    except OSError:
        return False


_DEQUANTISABLE = {}


def _dequantisable(gguf, qtype, type_size):
    """True when gguf.quants turns `qtype` into floats (F32, F16, BF16, Q8_0, Q4_K, ...; not I8..I64)."""
    if qtype not in _DEQUANTISABLE:
        try:  # one block of zeros: gguf's own answer, without reaching into its private tables
            out = gguf.quants.dequantize(numpy.zeros((1, type_size), numpy.uint8), qtype)
            _DEQUANTISABLE[qtype] = out.dtype == numpy.float32
        except (NotImplementedError, ValueError, TypeError):
            _DEQUANTISABLE[qtype] = False
    return _DEQUANTISABLE[qtype]


def _is_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


class _Cursor:
    """Reads little-endian values from the mapped file; every read is checked against its end."""

    def __init__(self, buf, where):
        self.buf, self.pos, self.size, self.where = buf, 0, len(buf), where

    def need(self, n, what):
        if n > self.size - self.pos:
            raise GGUFError(f"{self.where}: truncated: {what} needs {n} bytes at byte {self.pos}, "
                            f"but the file ends at byte {self.size}")

    def scalar(self, value_type, what):
        _, fmt, size = SCALARS[value_type]
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what, limit=None):
        n = self.scalar(10, f"the length of {what}")
        if limit is not None and n > limit:
            raise GGUFError(f"{self.where}: {what} is {n} bytes long, more than the {limit}-byte limit")
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{self.where}: {what} is not UTF-8 ({e.reason} at byte {e.start})") from None

    def value(self, value_type, what, *, in_array=False):
        if value_type in SCALARS:
            v = self.scalar(value_type, what)
            return float(v) if value_type in (6, 12) else v
        if value_type == STRING:
            return self.string(what)
        if value_type == ARRAY and not in_array:
            return self.array(what)
        kind = "an array inside an array" if value_type == ARRAY else f"value type {value_type}"
        raise GGUFError(f"{self.where}: {what}: {kind} is not a GGUF value type minisae reads "
                        f"(expected one of {sorted(_MIN_BYTES)})")

    def array(self, what):
        element_type = self.scalar(4, f"the element type of {what}")
        count = self.scalar(10, f"the length of {what}")
        if element_type not in _MIN_BYTES or element_type == ARRAY:
            return self.value(element_type, f"{what}[0]", in_array=True)  # raises, naming the type
        # every element takes at least this many bytes: a count the file cannot hold is refused
        # here, before a loop of `count` steps or an allocation of `count` items
        self.need(count * _MIN_BYTES[element_type], f"{what} ({count} elements)")
        if element_type in _NUMPY:
            a = numpy.frombuffer(self.buf, dtype=_NUMPY[element_type], count=count, offset=self.pos).copy()
            self.pos += count * _MIN_BYTES[element_type]
            return a.astype(bool) if element_type == 7 else a  # (count,)
        return self.strings(count, what)

    def strings(self, count, what):
        """`count` strings: `string` unrolled (a vocabulary holds 262,144 of them)."""
        buf, pos, end, out = self.buf, self.pos, self.size, []
        length = struct.Struct("<Q").unpack_from
        for i in range(count):
            n = length(buf, pos)[0] if pos + 8 <= end else None
            if n is None or n > end - pos - 8:
                self.pos = pos
                self.string(f"{what}[{i}]")  # raises, saying what ran past the end
            out.append(buf[pos + 8:pos + 8 + n])
            pos += 8 + n
        self.pos = pos
        try:
            return [b.decode("utf-8") for b in out]
        except UnicodeDecodeError as e:
            i = next(i for i, b in enumerate(out) if not _is_utf8(b))
            raise GGUFError(f"{self.where}: {what}[{i}] is not UTF-8 ({e.reason} at byte {e.start})") from None


class GGUFFile:
    """One GGUF file: the header is read and checked at construction, tensors on `read`."""

    def __init__(self, path):
        self.path = Path(path)
        where = str(self.path)
        try:
            st = os.stat(self.path)  # before opening: opening a FIFO would block
            if not stat.S_ISREG(st.st_mode):
                raise GGUFError(f"{where}: not a regular file (a GGUF checkpoint is a file)")
            if st.st_size < 24:
                raise GGUFError(f"{where}: {st.st_size} bytes, shorter than the 24-byte GGUF header; "
                                "not a GGUF file or truncated")
            with open(self.path, "rb") as fh:
                self._mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise MissingInputError(f"{where}: no such file") from None
        except OSError as e:
            if isinstance(e, GGUFError):
                raise
            raise storage_error(e, self.path, "read") from e
        self.size = len(self._mm)
        self.version, self.metadata, self.tensors, self.data_start = self._parse(_Cursor(self._mm, where))

    def _parse(self, c):
        if c.buf[:4] != MAGIC:
            raise GGUFError(f"{c.where}: starts with {bytes(c.buf[:4])!r}, not the GGUF magic {MAGIC!r}")
        c.pos = 4
        version = c.scalar(4, "the version")
        if version not in VERSIONS:
            hint = " (a big-endian file?)" if version in (2 << 24, 3 << 24) else ""
            raise GGUFError(f"{c.where}: GGUF version {version}{hint}; minisae reads versions {VERSIONS}")
        n_tensors, n_kv = c.scalar(10, "the tensor count"), c.scalar(10, "the key count")
        for count, limit, what in ((n_tensors, MAX_TENSORS, "tensors"), (n_kv, MAX_KV, "metadata keys")):
            if count > limit:
                raise GGUFError(f"{c.where}: the header claims {count} {what}, more than the limit {limit}")
        # a key takes at least 13 bytes (length, type, one byte), a tensor entry at least 32
        c.need(13 * n_kv + 32 * n_tensors, f"{n_kv} metadata keys and {n_tensors} tensor entries")

        metadata = {}
        for i in range(n_kv):
            key = c.string(f"metadata key {i}", MAX_NAME_BYTES)
            if key in metadata:
                raise GGUFError(f"{c.where}: metadata key {key!r} appears twice")
            metadata[key] = c.value(c.scalar(4, f"the type of {key}"), key)

        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment < 1 \
                or alignment & (alignment - 1):
            raise GGUFError(f"{c.where}: general.alignment: expected a power of two, found {alignment!r:.40}")

        entries = []
        for i in range(n_tensors):
            name = c.string(f"tensor name {i}", MAX_NAME_BYTES)
            n_dims = c.scalar(4, f"n_dims of {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise GGUFError(f"{c.where}: tensor {name}: n_dims {n_dims}, expected 1 to {MAX_DIMS}")
            dims = [c.scalar(10, f"dims of {name}") for _ in range(n_dims)]
            if min(dims) < 1:
                raise GGUFError(f"{c.where}: tensor {name}: dims {dims}, expected positive sizes")
            type_id, offset = c.scalar(4, f"the type of {name}"), c.scalar(10, f"the offset of {name}")
            if offset % alignment:
                raise GGUFError(f"{c.where}: tensor {name}: offset {offset} is not a multiple of the "
                                f"alignment {alignment}")
            entries.append((name, tuple(reversed(dims)), type_id, offset))

        data_start = -(-c.pos // alignment) * alignment  # round up to the alignment
        tensors = {}
        for name, shape, type_id, offset in entries:
            if name in tensors:
                raise GGUFError(f"{c.where}: tensor {name} appears twice")
            if data_start + offset >= self.size:
                raise GGUFError(f"{c.where}: tensor {name} starts at byte {data_start + offset}, beyond "
                                f"the end of the {self.size}-byte file; the file is truncated")
            tensors[name] = TensorInfo(name, shape, type_id, data_start + offset)
        return version, metadata, tensors, data_start

    # ---- tensors ------------------------------------------------------------------------------
    def type_name(self, name):
        """The ggml type name of tensor `name` ("Q4_K", ...), or "type N" when gguf does not know it."""
        gguf = gguf_quants()
        type_id = self.tensors[name].type_id
        try:
            return gguf.GGMLQuantizationType(type_id).name
        except ValueError:
            return f"type {type_id}"

    def layout(self, name):
        """(GGMLQuantizationType, values per block, bytes per block, bytes in all) of tensor `name`,
        after checking that gguf can dequantise its type and that its data lies inside the file."""
        gguf = gguf_quants()
        info = self.tensors[name]
        where = f"{self.path}: tensor {name}"
        try:
            qtype = gguf.GGMLQuantizationType(info.type_id)
        except ValueError:
            raise GGUFError(f"{where}: unknown ggml tensor type {info.type_id}") from None
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if not _dequantisable(gguf, qtype, type_size):
            raise GGUFError(f"{where}: tensor type {qtype.name} is not a float or quantised float type "
                            "that gguf.quants dequantises")
        if info.shape[-1] % block:
            raise GGUFError(f"{where}: rows of {info.shape[-1]} values are not whole {qtype.name} blocks "
                            f"of {block}")
        nbytes = math.prod(info.shape) // block * type_size  # a Python int: no overflow
        if info.offset + nbytes > self.size:
            raise GGUFError(f"{where}: {qtype.name} {info.shape} needs bytes {info.offset} to "
                            f"{info.offset + nbytes}, beyond the end of the {self.size}-byte file; "
                            "the file is truncated")
        return qtype, block, type_size, nbytes

    def read(self, name):
        """Tensor `name` as float32 of its NumPy shape: F32 a read-only view of the mapped file,
        anything else dequantised by gguf.quants (a new array)."""
        if name not in self.tensors:
            raise GGUFError(f"{self.path}: no tensor {name}")
        gguf = gguf_quants()
        qtype, block, type_size, nbytes = self.layout(name)
        shape = self.tensors[name].shape
        raw = numpy.frombuffer(self._mm, dtype=numpy.uint8, count=nbytes, offset=self.tensors[name].offset)
        if qtype == qtype.F32:
            return raw.view("<f4").reshape(shape)  # shape: no copy
        cols = shape[-1]
        rows = raw.reshape(-1, cols // block * type_size)  # (R, bytes per row), R = prod(shape[:-1])
        out = numpy.empty((rows.shape[0], cols), numpy.float32)  # (R, cols)
        step = max(1, DEQUANT_CHUNK // cols)
        for r in range(0, rows.shape[0], step):
            out[r:r + step] = gguf.quants.dequantize(rows[r:r + step], qtype)  # (step, cols)
        return out.reshape(shape)

    def __repr__(self):
        return f"GGUFFile({str(self.path)!r}, {len(self.tensors)} tensors, {len(self.metadata)} keys)"


__all__ = ["GGUFFile", "GGUFError", "TensorInfo", "is_gguf", "gguf_quants"]
