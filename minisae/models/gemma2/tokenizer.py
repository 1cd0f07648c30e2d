"""The Gemma 2 tokenizer: `tokenizer.json` through the `tokenizers` library, BOS exactly once.

Gemma expects every sequence to start with <bos> (id 2). The released tokenizer.json adds it in
its post-processor, other files may not, and a text that itself begins with "<bos>" would add a
second one; `encode` normalises all of these to exactly one BOS at the front.

    tok = load_tokenizer("google/gemma-2-2b")        # or a local folder / tokenizer.json
    ids = tok.encode("The quick brown fox")          # [2, ...]
    ids, mask = tok.encode_batch(texts, max_length=128)   # (B, T) int64, (B, T) bool

Dimension legend: B texts in a batch, T tokens (the longest sequence, or max_length).
"""

from pathlib import Path

import numpy

from minisae.errors import FileFormatError
from minisae.io.hub import resolve_file

# defaults when the vocabulary lacks the named special tokens (Gemma's own ids)
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2


class TokenizerError(FileFormatError):
    """A tokenizer.json that cannot be read, or text the tokenizer cannot take."""


def _is_panic(e):
    # a Rust panic inside `tokenizers` (e.g. an unk_token missing from the vocabulary) arrives as
    # pyo3's PanicException, a BaseException: caught by name, never KeyboardInterrupt and the like
    return type(e).__name__ == "PanicException"


def _guarded(fn, *args, path=None, **kw):
    """fn(*args, **kw), with a panic of the `tokenizers` library turned into a TokenizerError."""
    try:
        return fn(*args, **kw)
    except BaseException as e:
        if not _is_panic(e):
            raise
        raise TokenizerError(f"{path}: the tokenizer failed ({e}); the tokenizer.json is broken") from None


class Gemma2Tokenizer:
    """Wraps a `tokenizers.Tokenizer`; ids are Python ints, batches NumPy arrays."""

    def __init__(self, tokenizer, path=None, *, bos_id=None, eos_id=None, pad_id=None):
        """The special ids are looked up by name ("<bos>", ...) unless given (a GGUF file states them)."""
        self.tokenizer = tokenizer
        self.path = path
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.pad_id = vocab.get("<pad>", PAD_ID) if pad_id is None else pad_id
        self.eos_id = vocab.get("<eos>", EOS_ID) if eos_id is None else eos_id
        self.bos_id = vocab.get("<bos>", BOS_ID) if bos_id is None else bos_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def _with_one_bos(self, ids):
        start = 0
        while start < len(ids) and ids[start] == self.bos_id:  # the post-processor's, or the text's
            start += 1
        return [self.bos_id] + list(ids[start:])

    def encode(self, text):
        """Token ids of `text`, with exactly one BOS at the front."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, found {type(text).__name__}")
        return self._with_one_bos(_guarded(self.tokenizer.encode, text, add_special_tokens=True, path=self.path).ids)

    def encode_batch(self, texts, *, max_length=None, truncate=True, pad_to_max_length=False):
        """Encode texts to right-padded arrays: ids (B, T) int64 with PAD after each sequence, and
        mask (B, T) bool, True on real tokens (BOS included).

        T is the longest sequence (after truncation), or max_length with pad_to_max_length=True.
        Sequences longer than max_length keep their first max_length tokens (BOS stays first);
        with truncate=False they are an error instead.
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("encode_batch expects a list of str")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be at least 1 (room for BOS), found {max_length}")
        encodings = _guarded(self.tokenizer.encode_batch, list(texts), add_special_tokens=True, path=self.path)
        seqs = [self._with_one_bos(e.ids) for e in encodings]
        if max_length is not None:
            too_long = [(i, len(s)) for i, s in enumerate(seqs) if len(s) > max_length]
            if too_long and not truncate:
                i, n = too_long[0]
                raise ValueError(f"text {i} is {n} tokens long (with BOS), more than "
                                 f"max_length={max_length}; pass truncate=True to cut it")
            seqs = [s[:max_length] for s in seqs]
        T = max((len(s) for s in seqs), default=0)
        if max_length is not None and pad_to_max_length:
            T = max_length
        ids = numpy.full((len(seqs), T), self.pad_id, dtype=numpy.int64)  # (B, T)
        mask = numpy.zeros((len(seqs), T), dtype=bool)  # (B, T)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = s
            mask[b, : len(s)] = True
        return ids, mask

    def decode(self, ids, skip_special_tokens=True):
        """Text of a 1-D sequence of ids (list or array); special tokens dropped by default."""
        ids = numpy.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"decode expects a 1-D sequence of ids, found shape {ids.shape}")
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __repr__(self):
        return f"Gemma2Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path_or_repo_id, *, revision=None):
    """Load tokenizer.json from a local file or folder, or a Hub repo (see minisae.io.hub)."""
    from tokenizers import Tokenizer

    local = Path(path_or_repo_id).expanduser()
    if local.is_file():  # any local file name is taken as the tokenizer.json
        path = local
    else:
        path = resolve_file(path_or_repo_id, "tokenizer.json", revision=revision)
    try:
        tokenizer = Tokenizer.from_file(str(path))
        tokenizer.encode("a probe, 1 2 3.", add_special_tokens=True)  # a broken vocabulary fails here, not later
    except BaseException as e:  # tokenizers raises a bare Exception for malformed files, a panic for some
        if not (isinstance(e, Exception) or _is_panic(e)):
            raise
        raise TokenizerError(f"{path}: not a valid tokenizer.json for the `tokenizers` library "
                             f"({e})") from None
    return Gemma2Tokenizer(tokenizer, Path(path))
