"""File rules every minisae reader and writer follows: atomic writes, the output-folder rule, and
bounded reading of JSON and .npz files that may be corrupt or hostile.

    with atomic_path(out / "report.md") as tmp:      # write tmp; renamed into place on success,
        tmp.write_text(text)                         # removed on any failure
    check_output_dir(out, "train run", is_own=lambda d: (d / "config.json").is_file())
    cfg = read_json(folder / "cfg.json")             # size and nesting limits, one-line errors
    arrays = read_npz(path)                          # declared sizes and shapes checked first

The output rule: a command writes only into a folder that is new, empty, or one of its own kind
(recognised by the file that kind of folder always holds: a run's config.json, a cache's
manifest.json, ...), and replaces nothing there without --overwrite. A folder of another kind is
refused even with --overwrite: minisae never deletes or replaces files it did not write.

Operating-system failures while writing (disk full, read-only disk, no permission) become a
minisae.errors.StorageError naming the path and saying what to do; the temporary file is removed,
so the file that was there before (a checkpoint, say) is left exactly as it was.
"""

import contextlib
import datetime
import fcntl
import json
import os
import secrets
import shutil
import socket
import stat
import tokenize
import zipfile
from pathlib import Path

import numpy

from minisae.errors import FileFormatError, MinisaeError, OutputExistsError, ResourceError, storage_error

MAX_JSON_BYTES = 64 * 2**20  # a config, cfg, manifest or index file; real ones are < 1 MiB
MAX_JSON_DEPTH = 64          # real ones nest < 6 deep
MAX_NPZ_RATIO = 100          # uncompressed / compressed size of a large .npz member (weights: about 1)
NPZ_RATIO_FREE_BYTES = 2**24 # members smaller than this (16 MiB) may compress any amount


# what numpy.load / numpy's .npy header parser raise on a corrupt file (the header is a Python
# literal read with ast.literal_eval, so syntax and tokenizer errors too)
NPY_ERRORS = (ValueError, OSError, EOFError, SyntaxError, TypeError, OverflowError, tokenize.TokenError,
              zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError)


def temp_name(path):
    """A hidden, unique temporary name beside `path` (same folder, so os.replace is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def is_temp_name(name):
    """True for the names temp_name (and minisae's earlier writers) give temporary files."""
    return name.startswith(".") and (name.endswith(".tmp") or ".tmp-" in name or ".tmp." in name)


@contextlib.contextmanager
def atomic_path(path, *, doing="write"):
    """Yield a temporary path beside `path`; on success it is renamed to `path` (replacing it), on
    any failure it is removed and `path` is untouched. An OSError becomes a one-line StorageError."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if isinstance(e, MinisaeError):
            raise
        raise storage_error(e, path, doing) from e
    finally:
        _remove(tmp)


def _remove(tmp):
    try:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()
    except OSError:
        pass  # nothing more can be done; the name is hidden and says .tmp


def write_atomic(path, data, *, durable=False):
    """Write str or bytes to `path` atomically; durable=True also fsyncs before the rename."""
    data = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())


def make_dir(folder):
    """mkdir -p, with an OSError turned into a one-line StorageError."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputExistsError(f"{folder}: exists and is not a folder; choose another output path") from None
    except OSError as e:
        raise storage_error(e, folder, "create the folder") from e


def check_output_dir(folder, kind, *, is_own, flag="--out"):
    """Refuse (OutputExistsError) unless `folder` is new, empty, or `is_own(folder)` says it is a
    folder of this `kind`; returns "new", "empty" or "own". Reads only; creates nothing."""
    folder = Path(folder)
    if not folder.exists():
        if folder.is_symlink():
            raise OutputExistsError(f"{folder}: a broken symbolic link; choose another {flag}")
        return "new"
    if not folder.is_dir():
        raise OutputExistsError(f"{folder}: exists and is not a folder; choose a new or empty folder for {flag}")
    try:
        names = sorted(p.name for p in folder.iterdir())
    except OSError as e:
        raise storage_error(e, folder, "read the folder") from e
    if all(is_temp_name(n) or n == LOCK_NAME for n in names):  # only what an interrupted minisae writer left
        return "empty"
    if is_own(folder):
        return "own"
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    raise OutputExistsError(
        f"{folder}: not empty and not a minisae {kind} folder (it holds {shown}); minisae writes only "
        f"into a new or empty folder or one of its own {kind} folders, and never replaces other files, "
        f"even with --overwrite: choose another {flag}")


# ---------------------------------------------------------------------------------------------
# one writer per folder

LOCK_NAME = ".minisae.lock"  # in a folder being written: who holds it (pid, host, start time)


class FolderLock:
    """An exclusive lock on `folder` for this process (fcntl.flock on folder/.minisae.lock).

    The kernel releases it when the process ends, however it ends (kill -9 included), so a lock
    file left behind by a dead run locks nothing. A second writer is refused with one line naming
    the holder, which the lock file records. `release()` (or the end of a `with`) lets it go."""

    def __init__(self, folder, *, what="run", flag="--out"):
        self.path = Path(folder) / LOCK_NAME
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as e:
            raise storage_error(e, self.path, "create the lock file") from e
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OutputExistsError(f"{self.path}: not a regular file; minisae keeps its lock there: "
                                        f"remove it or choose another {flag}")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 400, 0).decode("utf-8", "replace").strip() or "a process that has not said who it is"
                raise OutputExistsError(f"{folder}: another minisae process is writing this {what} ({holder}); "
                                        f"wait for it to end, or choose another {flag}") from None
            now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {now}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def release(self):
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)  # no holder any more (a file left by a killed holder names it: harmless)
            except OSError:
                pass
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


# ---------------------------------------------------------------------------------------------
# bounded reading

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def check_regular_file(path, *, error=FileFormatError):
    """Refuse, before it is opened, anything at `path` but a regular file (symbolic links are
    followed): opening a FIFO blocks until a writer comes, a device never ends. Returns os.stat."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise storage_error(e, path, "read") from e
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a file")
        raise error(f"{path}: {kind}, not a regular file; expected a file")
    return st

def _depth(obj):
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, d = stack.pop()
        if isinstance(value, dict):
            value = value.values()
        elif not isinstance(value, list):
            continue
        deepest = max(deepest, d)
        stack.extend((v, d + 1) for v in value)
    return deepest


def parse_json(text, where, *, max_depth=MAX_JSON_DEPTH, object_pairs_hook=None, error=FileFormatError):
    """json.loads with a nesting limit; any failure is an `error` naming `where`."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=object_pairs_hook)
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply (limit {max_depth} levels)") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except (ValueError, TypeError) as e:  # e.g. a duplicate key refused by object_pairs_hook
        if isinstance(e, MinisaeError):
            raise
        raise error(f"{where}: {e}") from None
    if _depth(value) > max_depth:
        raise error(f"{where}: JSON nested too deeply (limit {max_depth} levels)")
    return value


def read_json(path, *, max_bytes=MAX_JSON_BYTES, max_depth=MAX_JSON_DEPTH, expect=dict, error=FileFormatError):
    """Read a JSON file of at most max_bytes and max_depth levels whose top level is `expect`."""
    path = Path(path)
    size = check_regular_file(path, error=error).st_size  # a FIFO would block the open
    try:
        if size > max_bytes:
            raise error(f"{path}: {size} bytes, more than the {max_bytes}-byte limit for a JSON file here")
        with open(path, "rb") as fh:
            raw = fh.read(size + 1)  # (not max_bytes + 1: read(n) allocates n bytes up front)
        if len(raw) > max_bytes:
            raise error(f"{path}: more than the {max_bytes}-byte limit for a JSON file here")
    except OSError as e:
        if isinstance(e, MinisaeError):
            raise
        raise storage_error(e, path, "read") from e
    value = parse_json(raw, path, max_depth=max_depth, error=error)
    if expect is not None and not isinstance(value, expect):
        raise error(f"{path}: expected a JSON {_json_type_name(expect)}, found {_json_type_name(type(value))}")
    return value


def _json_type_name(t):
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(t, t.__name__)


def memory_limit_bytes():
    """Physical memory in bytes (a generous bound on any one load), or 2^40 where unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return 2**40


def npz_members(path, *, max_total_bytes=None):
    """{name: (shape, dtype)} of an .npz archive, from the zip directory and each .npy header only
    (nothing is decompressed beyond a header). Refuses members whose declared size disagrees with
    their header, that compress more than real weights do (a zip bomb), or that together exceed
    max_total_bytes (default: physical memory)."""
    path = Path(path)
    limit = memory_limit_bytes() if max_total_bytes is None else max_total_bytes
    check_regular_file(path)  # a FIFO would block the open
    out, total = {}, 0
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                if info.file_size > NPZ_RATIO_FREE_BYTES and info.file_size > MAX_NPZ_RATIO * max(1, info.compress_size):
                    raise FileFormatError(f"{path}: member {info.filename!r} claims {info.file_size} bytes from "
                                          f"{info.compress_size} compressed (a zip bomb?); refused")
                with zf.open(info) as fh:
                    shape, dtype, header_len = _npy_header(fh, f"{path}: member {info.filename!r}")
                out[name] = (shape, dtype)
                if dtype.hasobject:  # a pickle: never loaded (allow_pickle=False), so never sized
                    continue
                nbytes = int(numpy.prod(shape, dtype=object)) * dtype.itemsize
                if nbytes + header_len != info.file_size:
                    raise FileFormatError(f"{path}: member {info.filename!r}: header says {dtype} {shape} "
                                          f"({nbytes} bytes) but the member holds {info.file_size - header_len}")
                total += nbytes
                if total > limit:
                    raise ResourceError(f"{path}: its arrays need more than {limit} bytes of memory; refused")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError) as e:
        raise FileFormatError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e})") from None
    except OSError as e:
        if isinstance(e, MinisaeError):
            raise
        raise storage_error(e, path, "read") from e
    return out


def _npy_header(fh, where):
    try:
        version = numpy.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, fortran, dtype = numpy.lib.format.read_array_header_1_0(fh, max_header_size=10000)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dtype = numpy.lib.format.read_array_header_2_0(fh, max_header_size=10000)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except NPY_ERRORS as e:
        raise FileFormatError(f"{where}: not a readable .npy header ({type(e).__name__}: {e})") from None
    return tuple(int(s) for s in shape), dtype, fh.tell()
