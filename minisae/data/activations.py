"""Gemma 2 activations on disk: text → tokens → sequences → `capture` at a site → float32 shards.

    model = gemma2.load("google/gemma-2-2b"); tok = gemma2.load_tokenizer("google/gemma-2-2b")
    cache_activations(model, tok, ["corpus.jsonl"], "blocks.12.hook_resid_post", "acts/",
                      max_tokens=2_000_000)
    store = ActivationStore("acts/")         # a training source: store.batch(step, 4096)

Text: `.jsonl` files hold one JSON object per line with the document in field `text` (the name is
an argument); `.txt` files hold documents separated by blank lines (a run of non-empty lines is one
document, its lines joined by "\\n"), so a file with one document per line also works when the
lines are separated by blank lines, and a book becomes one document per paragraph.
Each document is tokenized with BOS first and cut into sequences of at most T tokens, each starting
with BOS (later pieces of a long document get a BOS of their own). A batch of sequences is padded
on the right with PAD (causal attention: padding never changes earlier positions), run to the site,
and only positions holding a real token are kept: BOS, EOS and PAD positions are dropped (as in
Gemma Scope's training data: Lieberum et al. 2024, arXiv 2408.05147). With max_norm_ratio = r,
positions whose activation norm exceeds r × the median norm of the batch's real tokens are dropped
too (`norm_outliers`): the "massive activations" some models put on a few ordinary tokens. At layer
6 of Gemma 3 270M 0.3 % of the tokens (mostly full stops) have 10–20 × the median norm and, after
centring, hold 75 % of the variance; dictionary_learning drops them the same way
(max_activation_norm_multiple). evaluate_lm leaves the same positions unspliced.

On disk (folder out_dir):
    manifest.json       {"format", "model", "site", "layer", "d_in", "dtype": "float32", "count",
                         "seq_len", "text_files", "text_field", "max_norm_ratio", "outliers",
                         "sequences_done", "complete", "shards": [{"file", "count"}, ...]}
    shard_00000.npy     (count, d_in) float32, written to a temp name then renamed
The manifest is rewritten atomically after every shard, so an interrupted run resumes after the
last complete shard (sequences are regenerated deterministically and the done ones skipped).
Memory stays at one shard (shard_tokens × d_in floats) plus one batch of the model.

Legend: B sequences in a batch, T tokens per sequence, D site width, N cached tokens.
"""

import json
import os
from pathlib import Path

import numpy

from minisae.errors import FileFormatError, InputError, MinisaeError, OutputExistsError, storage_error
from minisae.io.files import NPY_ERRORS, atomic_path, check_output_dir, make_dir, read_json, write_atomic
from minisae.progress import progress_bar
from minisae.xp import to_numpy, xp_of

MANIFEST = "manifest.json"
FORMAT = "minisae-activations-1"


class ActivationsError(FileFormatError):
    """A cache folder, manifest, shard or text file is missing, corrupt or does not fit."""


# ---------------------------------------------------------------------------------------------
# text → documents → sequences → padded batches

CORPUS_PREFIX = "corpus:"  # a text source "corpus:NAME[:SPLIT]" names an installed corpus (data.corpora)


def corpus_ref(source):
    """(name, split) of a "corpus:NAME[:SPLIT]" text source (split "train" by default), else None."""
    source = str(source)
    if not source.startswith(CORPUS_PREFIX):
        return None
    name, _, split = source[len(CORPUS_PREFIX):].partition("@")[0].partition(":")  # a manifest's @version dropped
    return name, split or "train"


def text_source_ids(sources):
    """How a cache manifest records its texts: a file's resolved path, a corpus's name, split and
    installed version (so a resume against another release of the corpus is refused)."""
    from minisae.data import corpora

    out = []
    for src in sources:
        ref = corpus_ref(src)
        if ref is None:
            path = Path(src).resolve()
            if not path.is_file():
                raise ActivationsError(f"text file {path} does not exist")
            out.append(str(path))
        else:
            corpora.corpus_root(ref[0])  # an unknown or missing corpus: one line saying how to install it
            if ref[1] not in corpora.SPLITS:
                raise InputError(f"{src}: split: expected one of {', '.join(corpora.SPLITS)}, found {ref[1]!r}")
            version = corpora.describe(ref[0]).get("version")
            out.append(f"{CORPUS_PREFIX}{ref[0]}:{ref[1]}@{version}")
    return out


def iter_documents(paths, *, text_field="text"):
    """Yield the documents of each source in order: a file (.txt: blank-line separated; .jsonl:
    `text_field`) or an installed corpus, "corpus:NAME[:SPLIT]" (minisae.data.corpora)."""
    for source in paths:
        ref = corpus_ref(source)
        if ref is not None:
            from minisae.data import corpora

            yield from corpora.corpus_documents(*ref)
            continue
        path = Path(source)
        if not path.is_file():
            raise ActivationsError(f"text file {path} does not exist")
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ActivationsError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                    if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                        raise ActivationsError(f"{path}:{lineno}: expected an object with a string field {text_field!r}")
                    if obj[text_field]:
                        yield obj[text_field]
        elif path.suffix == ".txt":
            with open(path, encoding="utf-8") as fh:
                lines = []
                for line in fh:
                    if line.strip():
                        lines.append(line.rstrip("\n"))
                    elif lines:
                        yield "\n".join(lines)
                        lines = []
                if lines:
                    yield "\n".join(lines)
        else:
            raise ActivationsError(f"text file {path}: expected a .txt or .jsonl file, found suffix {path.suffix!r}")


def iter_sequences(tokenizer, paths, seq_len, *, text_field="text"):
    """Yield token lists of length <= seq_len, each starting with BOS (one document → 1+ pieces)."""
    if seq_len < 2:
        raise ValueError(f"seq_len: expected at least 2 (BOS and one token), found {seq_len}")
    bos = tokenizer.bos_id
    for doc in iter_documents(paths, text_field=text_field):
        ids = list(tokenizer.encode(doc))
        body = ids[1:] if ids and ids[0] == bos else ids  # encode puts BOS first exactly once
        for start in range(0, len(body), seq_len - 1):
            yield [bos] + body[start:start + seq_len - 1]


def pad_batch(seqs, pad_id):
    """(ids (B, T) int64, mask (B, T) bool) padded on the right to the longest sequence."""
    T = max(len(s) for s in seqs)
    ids = numpy.full((len(seqs), T), pad_id, dtype=numpy.int64)  # (B, T)
    mask = numpy.zeros((len(seqs), T), dtype=bool)  # (B, T)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = True
    return ids, mask


def iter_batches(tokenizer, paths, seq_len, batch_size, *, text_field="text", skip=0):
    """Yield (first_sequence_index, ids, mask) for batches of sequences, skipping the first `skip`."""
    batch, first = [], skip
    for i, seq in enumerate(iter_sequences(tokenizer, paths, seq_len, text_field=text_field)):
        if i < skip:
            continue
        batch.append(seq)
        if len(batch) == batch_size:
            yield first, *pad_batch(batch, tokenizer.pad_id)
            first, batch = i + 1, []
    if batch:
        yield first, *pad_batch(batch, tokenizer.pad_id)


def real_token_mask(ids, mask, tokenizer):
    """(B, T) bool: positions holding a real token (not BOS, EOS or PAD, not padding)."""
    special = (ids == tokenizer.bos_id) | (ids == tokenizer.eos_id) | (ids == tokenizer.pad_id)
    return mask & ~special


def norm_outliers(acts, real, ratio):
    """(B, T) bool: real positions (`real`, (B, T) bool) whose activation norm exceeds ratio × the
    median norm over the batch's real positions; all False when ratio is None or none is real.
    acts (B, T, D) on NumPy or CuPy (the result is on the same backend)."""
    xp = xp_of(acts)
    out = xp.zeros(real.shape, dtype=bool)  # (B, T)
    if ratio is None or not bool(real.any()):
        return out
    norms = xp.sqrt(xp.sum(xp.square(acts.astype(xp.float32, copy=False)), axis=-1))  # (B, T)
    cut = float(ratio) * float(xp.median(norms[real]))
    return real & (norms > cut)


def check_norm_ratio(ratio):
    """ratio unchanged when None or a number > 1 (an InputError otherwise)."""
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 1
                              or not ratio < float("inf")):
        raise InputError(f"max_norm_ratio: expected a number > 1 (times the median norm) or None, found {ratio!r}")
    return ratio


# ---------------------------------------------------------------------------------------------
# writing the cache

def _write_json_atomic(path, obj):
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def _write_shard(path, rows):
    with atomic_path(path) as tmp:  # a full disk: StorageError naming the shard, no temp file left
        with open(tmp, "wb") as fh:
            numpy.save(fh, rows)
            fh.flush()
            os.fsync(fh.fileno())


def is_cache_folder(folder):
    """True when `folder` holds a manifest.json written by cache_activations."""
    try:
        return read_json(Path(folder) / MANIFEST).get("format") == FORMAT
    except (MinisaeError, OSError):
        return False


def read_manifest(folder):
    """The manifest of a cache folder, checked for the keys the readers need."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ActivationsError(f"{path}: no activation manifest here (expected a folder written by `minisae cache`)")
    man = read_json(path, error=ActivationsError)
    need = ("format", "site", "d_in", "dtype", "count", "shards")
    if any(k not in man for k in need) or man.get("format") != FORMAT:
        raise ActivationsError(f"{path}: not a {FORMAT} manifest (expected keys {need})")
    _check_manifest_types(path, man)
    return man


def _check_manifest_types(path, man):
    def is_count(v):
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62

    if not isinstance(man["site"], str):
        raise ActivationsError(f"{path}: 'site' must be a string, found {man['site']!r:.80}")
    if not (is_count(man["d_in"]) and 0 < man["d_in"] <= 2**20):
        raise ActivationsError(f"{path}: 'd_in' must be an integer in [1, 2^20], found {man['d_in']!r:.80}")
    if not is_count(man["count"]):
        raise ActivationsError(f"{path}: 'count' must be a non-negative integer, found {man['count']!r:.80}")
    if not isinstance(man["shards"], list):
        raise ActivationsError(f"{path}: 'shards' must be a list, found {type(man['shards']).__name__}")
    for i, sh in enumerate(man["shards"]):
        if not (isinstance(sh, dict) and isinstance(sh.get("file"), str) and is_count(sh.get("count"))):
            raise ActivationsError(f"{path}: shards[{i}] must be an object with a string 'file' and an integer "
                                   f"'count', found {sh!r:.80}")
        if Path(sh["file"]).name != sh["file"] or sh["file"] in ("", ".", ".."):
            raise ActivationsError(f"{path}: shards[{i}]: file {sh['file']!r:.80} must be a plain name in the cache folder")


def cache_activations(model, tokenizer, text_paths, site, out_dir, *, seq_len=1024, batch_size=8,
                      max_tokens=None, shard_tokens=65536, resume=True, overwrite=False, text_field="text",
                      model_name=None, progress=True, max_norm_ratio=None):
    """Capture `site` activations of `model` on the texts into float32 shards; returns the manifest.

    resume=True continues an interrupted cache of the same model/site/texts (a complete one is
    returned as it is); resume=False refuses a folder that already holds a manifest;
    overwrite=True starts over there (the old cache's shards and manifest are removed). Any other
    non-empty folder is refused (minisae.io.files). No manifest is written before the first shard.
    max_norm_ratio: also drop tokens whose norm exceeds this × the batch's median (`norm_outliers`);
    the manifest counts them ("outliers").
    """
    from minisae.sites import parse_site

    for name, value, least in (("batch_size", batch_size, 1), ("shard_tokens", shard_tokens, 1), ("seq_len", seq_len, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise InputError(f"{name}: expected an integer >= {least}, found {value!r}")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise InputError(f"max_tokens: expected an integer >= 1, found {max_tokens!r}")
    check_norm_ratio(max_norm_ratio)
    out = Path(out_dir)
    state = check_output_dir(out, "activation cache", is_own=is_cache_folder)
    layer, kind = parse_site(site)
    d_in = int(model.site_width(site))
    text_files = text_source_ids(text_paths)
    want = {"format": FORMAT, "model": str(model_name), "site": site, "layer": layer, "kind": kind,
            "d_in": d_in, "dtype": "float32", "seq_len": seq_len, "text_files": text_files,
            "text_field": text_field, "max_tokens": max_tokens, "max_norm_ratio": max_norm_ratio}
    if state == "own" and overwrite:
        _remove_cache(out)
    elif state == "own":
        if not resume:
            raise OutputExistsError(f"{out} already holds an activation cache; resume it, start it over "
                                    "(--overwrite) or choose a new folder")
        man = read_manifest(out)
        diff = [f"{k}: cache {man.get(k)!r}, now {v!r}" for k, v in want.items() if man.get(k) != v]
        if diff:
            raise ActivationsError(f"{out}: cannot resume, the cache was made differently: " + "; ".join(diff)
                                   + " (--overwrite starts it over)")
        if man.get("complete"):
            return man
    if state != "own" or overwrite:
        man = {**want, "count": 0, "outliers": 0, "sequences_done": 0, "complete": False, "shards": []}
        make_dir(out)

    bar = _bar(progress, max_tokens, man["count"])
    buf, buf_n, dropped = [], 0, 0
    next_seq = man["sequences_done"]
    try:
        for first, ids, mask in iter_batches(tokenizer, text_files, seq_len, batch_size,
                                              text_field=text_field, skip=man["sequences_done"]):
            acts = to_numpy(model.capture(model.xp.asarray(ids), site))  # (B, T, D)
            real = real_token_mask(ids, mask, tokenizer)  # (B, T)
            outliers = norm_outliers(acts, real, max_norm_ratio)  # (B, T)
            rows = numpy.ascontiguousarray(acts[real & ~outliers], dtype=numpy.float32)  # (n, D)
            n_out = int(outliers.sum())
            room = None if max_tokens is None else max_tokens - man["count"] - buf_n  # rows still taken, >= 1
            if room is not None and rows.shape[0] > room:  # max_tokens cuts this batch: only the outliers
                flags = outliers[real]  # (n_real,) among the real tokens in order; the others are the rows
                n_out = int(flags[:numpy.flatnonzero(~flags)[room]].sum())  # before the first row cut count
                rows = rows[:room]
            dropped += n_out
            buf.append(rows)
            buf_n += rows.shape[0]
            next_seq = first + ids.shape[0]
            bar.update(rows.shape[0])
            reached = max_tokens is not None and man["count"] + buf_n >= max_tokens
            if buf_n >= shard_tokens or reached:
                _flush(out, man, buf, next_seq, dropped)
                buf, buf_n, dropped = [], 0, 0
                if reached:
                    break
        if buf_n:
            _flush(out, man, buf, next_seq, dropped)
        if man["count"] == 0:  # no manifest was written: the folder stays free for other texts
            raise ActivationsError(f"the texts gave no tokens to cache ({', '.join(text_files)}); "
                                   f"nothing was written to {out}")
        man["complete"] = True
        _write_json_atomic(out / MANIFEST, man)
    finally:
        bar.close()
    return man


def _remove_cache(out):
    """Remove a cache's manifest and the shards it lists (nothing else in the folder)."""
    man = read_manifest(out)
    try:
        for sh in man["shards"]:
            (out / sh["file"]).unlink(missing_ok=True)
        (out / MANIFEST).unlink()
    except OSError as e:
        raise storage_error(e, out, "remove the old cache in") from e


def _flush(out, man, buf, next_seq, dropped=0):
    rows = numpy.concatenate(buf, axis=0)  # (n, D)
    name = f"shard_{len(man['shards']):05d}.npy"
    _write_shard(out / name, rows)
    man["shards"].append({"file": name, "count": int(rows.shape[0])})
    man["count"] += int(rows.shape[0])
    man["outliers"] = int(man.get("outliers", 0)) + int(dropped)
    man["sequences_done"] = next_seq
    _write_json_atomic(out / MANIFEST, man)


def _bar(enabled, total, initial, desc="cache"):
    return progress_bar(total, enabled=bool(enabled), initial=initial, desc=desc, unit="tok",
                        unit_scale=True)


# ---------------------------------------------------------------------------------------------
# reading the cache

class ActivationStore:
    """A training source over a cache folder: memory-mapped shards, shuffled batches.

    batch(step, B) is a pure function of (seed, step): epoch e = step·B // N_train visits the
    training rows in the order of permutation(seed, e). The last `holdout_tokens` rows of a fixed
    permutation are kept out of training and serve `eval_sample`.
    """

    def __init__(self, folder, *, seed=0, holdout_tokens=0):
        self.folder = Path(folder)
        self.manifest = man = read_manifest(self.folder)
        if man["dtype"] != "float32":
            raise ActivationsError(f"{self.folder / MANIFEST}: expected dtype float32, found {man['dtype']!r}")
        self.d_in, self.seed = int(man["d_in"]), int(seed)
        self.site, self.model = man["site"], man.get("model")
        self.shards, counts = [], []
        for sh in man["shards"]:
            self.shards.append(self._open_shard(self.folder / sh["file"], int(sh["count"])))
            counts.append(int(sh["count"]))
        self.offsets = numpy.concatenate([[0], numpy.cumsum(counts)]).astype(numpy.int64)  # (S+1,)
        self.count = int(self.offsets[-1])
        if self.count != int(man["count"]):
            raise ActivationsError(f"{self.folder / MANIFEST}: count {man['count']} but its shards hold {self.count} rows")
        if not 0 <= holdout_tokens < self.count:
            raise ActivationsError(f"{self.folder}: holdout_tokens must be in [0, {self.count}), found {holdout_tokens}")
        split = numpy.random.default_rng([self.seed, 0x5EED]).permutation(self.count)  # (N,)
        self.train_rows = numpy.sort(split[:self.count - holdout_tokens])  # (N_train,)
        self.holdout_rows = numpy.sort(split[self.count - holdout_tokens:])  # (N_hold,)
        self._perm = {}

    def _open_shard(self, path, count):
        if not path.is_file():
            raise ActivationsError(f"shard {path} listed in the manifest does not exist")
        try:
            arr = numpy.load(path, mmap_mode="r", allow_pickle=False)
        except NPY_ERRORS as e:
            if isinstance(e, MinisaeError):
                raise
            raise ActivationsError(f"shard {path}: unreadable or truncated ({type(e).__name__}: {e})") from None
        if arr.dtype != numpy.float32 or arr.shape != (count, self.d_in):
            raise ActivationsError(f"shard {path}: expected float32 ({count}, {self.d_in}), "
                                   f"found {arr.dtype} {arr.shape}")
        return arr

    def describe(self):
        return {"type": "activations", "folder": str(self.folder), "model": self.model,
                "site": self.site, "count": self.count, "seed": self.seed,
                "holdout_tokens": int(self.holdout_rows.size),
                **({"max_norm_ratio": self.manifest["max_norm_ratio"], "outliers": self.manifest.get("outliers")}
                   if self.manifest.get("max_norm_ratio") is not None else {})}

    def sae_metadata(self):
        return {"model_name": self.model, "hook_name": self.site,
                "context_size": self.manifest.get("seq_len"), "prepend_bos": True}

    def rows(self, index):
        """The cached rows at global indices `index` (sorted or not), float32 (n, D)."""
        index = numpy.asarray(index, dtype=numpy.int64)
        order = numpy.argsort(index, kind="stable")
        sorted_idx = index[order]
        out = numpy.empty((index.size, self.d_in), dtype=numpy.float32)  # (n, D)
        shard_of = numpy.searchsorted(self.offsets, sorted_idx, side="right") - 1  # (n,)
        for s in numpy.unique(shard_of):
            sel = shard_of == s
            out[order[sel]] = self.shards[s][sorted_idx[sel] - self.offsets[s]]
        return out

    def _epoch_perm(self, epoch):
        if epoch not in self._perm:
            if len(self._perm) > 1:
                self._perm.pop(min(self._perm))
            rng = numpy.random.default_rng([self.seed, int(epoch)])
            self._perm[epoch] = self.train_rows[rng.permutation(self.train_rows.size)]
        return self._perm[epoch]

    def batch(self, step, batch_size):
        """Training batch `step`: (batch_size, D) float32, rows in sorted file order."""
        n = self.train_rows.size
        pos = numpy.arange(step * batch_size, (step + 1) * batch_size, dtype=numpy.int64)  # (B,)
        epochs, within = pos // n, pos % n
        index = numpy.empty(batch_size, dtype=numpy.int64)
        for e in numpy.unique(epochs):
            sel = epochs == e
            index[sel] = self._epoch_perm(int(e))[within[sel]]
        return self.rows(numpy.sort(index))

    def sample(self, n, *, offset=0):
        """A fixed sample of n training rows (for the normalising constant, TopK's b_dec)."""
        rng = numpy.random.default_rng([self.seed, 0x5A3])
        pick = rng.permutation(self.train_rows.size)[offset:offset + n]
        return self.rows(numpy.sort(self.train_rows[pick]))

    def eval_sample(self, n):
        """Up to n held-out rows (training rows when holdout_tokens = 0)."""
        if self.holdout_rows.size == 0:
            return self.sample(n)
        return self.rows(self.holdout_rows[:n])
