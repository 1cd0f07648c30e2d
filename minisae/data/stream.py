"""Activation caches read as a stream: shards in a seeded order, rows shuffled in a bounded buffer.

    source = ShardStream("acts/", seed=0, buffer_tokens=1_000_000)
    x = source.batch(step, 4096)                      # (4096, D) float32
    x_r = source.batch_slice(step, 4096, 0, 2048)     # replica 0's half: reads only those rows

`minisae.data.activations.ActivationStore` draws each batch from random rows of every shard: fine
for a cache on a local disk, impossible for 57 TB on object storage (which serves whole files, not
random rows). ShardStream reads whole shard files in sequence and shuffles within a buffer:

- epoch e visits the training shards in the order permutation((seed, e));
- consecutive shards of that order are grouped into windows of at most `buffer_tokens` rows (a
  single larger shard is a window of its own); the rows of window w are shuffled by
  permutation((seed, e, w));
- the epoch is the windows' shuffled rows one after another, the stream the epochs one after
  another, and batch(step, B) is rows [step·B, (step+1)·B) of the stream.

So every training row comes exactly once per epoch, batch(step) is a pure function of
(seed, step) (and a replica's slice of it, of (seed, step, rank)), and memory holds at most two
windows: the one being read and the next, which a background thread loads ahead.

Caches may store bfloat16 (`convert_cache(src, dst, "bfloat16")`: half the bytes, 57 TB -> 29 TB
for 4B tokens of Gemma 2 9B; each value rounded to nearest even, 8 significant bits); rows are
returned as float32 either way.

Legend: N training rows (tokens), D d_in, B batch size, W rows in a window.
"""

import json
import threading
from pathlib import Path

import numpy

from minisae.errors import InputError
from minisae.data.activations import MANIFEST, ActivationsError, read_manifest
from minisae.io.files import check_output_dir, check_regular_file, make_dir, write_atomic
from minisae.io.safetensors_io import bf16_bits_to_float32, float32_to_bf16_bits

STORED = {"float32": numpy.float32, "bfloat16": numpy.uint16}  # manifest dtype -> .npy dtype


class ShardStream:
    """A training source over a cache folder, read shard by shard (see the module docstring).

    holdout_shards: shards (chosen by a fixed seeded permutation) kept out of training; they serve
    eval_sample. prefetch: load the next window in a background thread.
    """

    def __init__(self, folder, *, seed=0, buffer_tokens=1_000_000, holdout_shards=0, prefetch=True):
        self.folder = Path(folder)
        self.manifest = man = read_manifest(self.folder)
        if not isinstance(man["dtype"], str) or man["dtype"] not in STORED:
            raise ActivationsError(f"{self.folder / MANIFEST}: expected dtype float32 or bfloat16, found {man['dtype']!r}")
        if int(buffer_tokens) < 1:
            raise InputError(f"buffer_tokens: expected a positive number of rows, found {buffer_tokens}")
        self.d_in, self.seed, self.buffer_tokens = int(man["d_in"]), int(seed), int(buffer_tokens)
        self.site, self.model = man["site"], man.get("model")
        self.files = [sh["file"] for sh in man["shards"]]
        self.counts = numpy.array([int(sh["count"]) for sh in man["shards"]], dtype=numpy.int64)  # (S,)
        if int(self.counts.sum()) != int(man["count"]):
            raise ActivationsError(f"{self.folder / MANIFEST}: count {man['count']} but its shards list {self.counts.sum()} rows")
        if not self.files:
            raise ActivationsError(f"{self.folder / MANIFEST}: the cache holds no shards (no activations to train on)")
        if not 0 <= int(holdout_shards) < len(self.files):
            raise ActivationsError(f"{self.folder}: holdout_shards must be in [0, {len(self.files)}), found {holdout_shards}")
        order = numpy.random.default_rng((self.seed, 0x5EED)).permutation(len(self.files))
        self.holdout = numpy.sort(order[len(self.files) - int(holdout_shards):])
        self.train = numpy.sort(order[:len(self.files) - int(holdout_shards)])  # shard indices
        self.count = int(self.counts[self.train].sum())  # N training rows
        if self.count == 0:
            raise ActivationsError(f"{self.folder}: no training rows (the shards are empty or all held out)")
        self._plans, self._windows, self._lock = {}, {}, threading.Lock()
        self._prefetch, self._thread = bool(prefetch), None

    def describe(self):
        return {"type": "activation-stream", "folder": str(self.folder), "model": self.model, "site": self.site,
                "count": self.count, "seed": self.seed, "buffer_tokens": self.buffer_tokens,
                "holdout_shards": int(self.holdout.size), "dtype": self.manifest["dtype"]}

    def sae_metadata(self):
        return {"model_name": self.model, "hook_name": self.site,
                "context_size": self.manifest.get("seq_len"), "prepend_bos": True}

    # -- the plan of an epoch ---------------------------------------------------------------------

    def plan(self, epoch):
        """(windows, starts): epoch's windows as lists of shard indices, and each window's first
        row within the epoch (len(windows) + 1 entries, the last = N)."""
        if epoch not in self._plans:
            order = self.train[numpy.random.default_rng((self.seed, int(epoch))).permutation(self.train.size)]
            windows, rows = [[]], 0
            for s in order.tolist():
                if windows[-1] and rows + int(self.counts[s]) > self.buffer_tokens:
                    windows.append([])
                    rows = 0
                windows[-1].append(s)
                rows += int(self.counts[s])
            starts = numpy.cumsum([0] + [int(self.counts[w].sum()) for w in windows])  # (n_windows + 1,)
            if len(self._plans) > 2:
                self._plans.pop(min(self._plans))
            self._plans[epoch] = (windows, starts)
        return self._plans[epoch]

    # -- windows: read, shuffled, cached, prefetched ------------------------------------------------

    def _read_shard(self, s):
        path = self.folder / self.files[s]
        check_regular_file(path, error=ActivationsError)  # a FIFO would block the open
        try:
            arr = numpy.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ActivationsError(f"shard {path}: unreadable or truncated ({e})") from None
        want = STORED[self.manifest["dtype"]]
        if arr.dtype != want or arr.shape != (int(self.counts[s]), self.d_in):
            raise ActivationsError(f"shard {path}: expected {numpy.dtype(want).name} ({self.counts[s]}, {self.d_in}), "
                                   f"found {arr.dtype} {arr.shape}")
        return bf16_bits_to_float32(arr) if want is numpy.uint16 else arr  # (count, D) float32

    def _load_window(self, epoch, w):
        windows, _ = self.plan(epoch)
        rows = numpy.concatenate([self._read_shard(s) for s in windows[w]])  # (W, D)
        perm = numpy.random.default_rng((self.seed, int(epoch), int(w))).permutation(rows.shape[0])  # (W,)
        return rows[perm]  # (W, D) shuffled

    def window(self, epoch, w):
        """The shuffled rows (W, D) of window w of epoch; keeps it and the next one (loaded ahead)."""
        key = (int(epoch), int(w))
        thread = self._thread
        if thread is not None and thread.key == key:
            thread.join()
        with self._lock:
            got = self._windows.get(key)
        if got is None:
            got = self._load_window(*key)
            with self._lock:
                self._windows[key] = got
        with self._lock:
            for old in [k for k in self._windows if k < key]:
                del self._windows[old]
        if self._prefetch:
            self._start_prefetch(self._next(key))
        return got

    def _next(self, key):
        epoch, w = key
        return (epoch, w + 1) if w + 1 < len(self.plan(epoch)[0]) else (epoch + 1, 0)

    def _start_prefetch(self, key):
        with self._lock:
            if key in self._windows or (self._thread is not None and self._thread.key == key):
                return

        def load():
            try:
                rows = self._load_window(*key)
            except Exception:  # the foreground read will raise it again, with its message
                return
            with self._lock:
                self._windows[key] = rows

        t = threading.Thread(target=load, daemon=True)
        t.key = key
        self._thread = t
        t.start()

    # -- the data-source interface ------------------------------------------------------------------

    def rows_at(self, start, stop):
        """Rows [start, stop) of the stream (epochs one after another), float32 (stop - start, D)."""
        out = numpy.empty((stop - start, self.d_in), dtype=numpy.float32)  # (n, D)
        pos = start
        while pos < stop:
            epoch, within = divmod(pos, self.count)
            windows, starts = self.plan(epoch)
            w = int(numpy.searchsorted(starts, within, side="right")) - 1
            rows = self.window(epoch, w)
            take = min(stop - pos, int(starts[w + 1]) - within)
            a = within - int(starts[w])
            out[pos - start:pos - start + take] = rows[a:a + take]
            pos += take
        return out

    def batch(self, step, batch_size):
        """Training batch `step`: rows [step·B, (step+1)·B) of the stream, (B, D) float32."""
        return self.rows_at(step * batch_size, (step + 1) * batch_size)

    def batch_slice(self, step, batch_size, start, stop):
        """batch(step, batch_size)[start:stop], reading only those rows (a replica's micro-batch)."""
        if not 0 <= start <= stop <= batch_size:
            raise InputError(f"batch_slice: expected 0 <= start <= stop <= {batch_size}, found {start}, {stop}")
        return self.rows_at(step * batch_size + start, step * batch_size + stop)

    def sample(self, n, *, offset=0):
        """A fixed sample of n training rows (for the normalising constant and TopK's b_dec): whole
        shards read in a seeded order until n + offset rows are in, shuffled, rows [offset, offset + n)."""
        want = min(int(n) + int(offset), self.count)
        order = self.train[numpy.random.default_rng((self.seed, 0x5A3)).permutation(self.train.size)]
        parts, have = [], 0
        for s in order.tolist():
            if have >= want:
                break
            parts.append(self._read_shard(s))
            have += parts[-1].shape[0]
        rows = numpy.concatenate(parts)  # (>= want, D)
        rows = rows[numpy.random.default_rng((self.seed, 0x5A3, 1)).permutation(rows.shape[0])]
        return rows[int(offset):want]

    def eval_sample(self, n):
        """Up to n rows of the held-out shards (training rows when holdout_shards = 0)."""
        if self.holdout.size == 0:
            return self.sample(n)
        rows = numpy.concatenate([self._read_shard(s) for s in self.holdout.tolist()])
        return rows[:n]


def convert_cache(src, dst, dtype="bfloat16"):
    """Copy an activation cache with its shards stored as `dtype` ("bfloat16": round to nearest
    even, half the bytes; "float32"). One shard in memory at a time; dst must be new or empty."""
    if dtype not in STORED:
        raise InputError(f"dtype: expected one of {sorted(STORED)}, found {dtype!r}")
    src, dst = Path(src), Path(dst)
    man = read_manifest(src)
    check_output_dir(dst, "activation cache", is_own=lambda d: False)
    make_dir(dst)
    for sh in man["shards"]:
        rows = numpy.load(src / sh["file"], allow_pickle=False)
        rows = bf16_bits_to_float32(rows) if man["dtype"] == "bfloat16" else rows.astype(numpy.float32)
        out = float32_to_bf16_bits(rows) if dtype == "bfloat16" else rows
        with open(dst / f".{sh['file']}.tmp", "wb") as fh:
            numpy.save(fh, out)
        (dst / f".{sh['file']}.tmp").replace(dst / sh["file"])
    write_atomic(dst / MANIFEST, json.dumps({**man, "dtype": dtype}, indent=2) + "\n")
    return dst
