"""Raw corpus files → plain prose: the cleaning steps of minisae.data.corpora, one function per source.

    sotu_to_prose(raw)      # a State of the Union transcript: audience notes ([Laughter]) removed
    rest_to_prose(raw)      # a reStructuredText page (Python's docs): markup, code, tables removed

Both return paragraphs separated by one blank line ("\\n\\n"), with no blank line inside a
paragraph and no leading or trailing whitespace, so a document written to a .txt file with its blank
lines made single (corpora.write_corpus) reads back as one document. Each function is pure (str in,
str out) and has no limits of its own: the caller bounds what it reads (corpora.MAX_FILE_BYTES).
"""

import re

# ---------------------------------------------------------------------------------------------
# shared

_BLANK_RUNS = re.compile(r"\n\s*\n+")


def paragraphs(text):
    """The blank-line separated paragraphs of `text`, each with its lines' outer whitespace removed."""
    out = []
    for block in _BLANK_RUNS.split(text.replace("\r\n", "\n").replace("\r", "\n")):
        lines = [ln.strip() for ln in block.split("\n")]
        block = "\n".join(ln for ln in lines if ln)
        if block:
            out.append(block)
    return out


_LETTERS = re.compile(r"[^\W\d_]+")  # runs of letters (str.isalpha, but whole runs at a time)


def letter_fraction(text):
    """Letters / non-space characters of `text` (0.0 for text without any): prose is about 0.95."""
    non_space = len("".join(text.split()))
    return (len(text) - len(_LETTERS.sub("", text))) / non_space if non_space else 0.0


# ---------------------------------------------------------------------------------------------
# State of the Union transcripts (the `sotu` package: UCSB American Presidency Project texts)
#
# The texts are clean plain prose with paragraphs separated by blank lines. What is not the
# President's words: the transcribers' audience notes inside a paragraph ("[Laughter]",
# "[Applause]", "[Inaudible]", "[see APP Note]"), whole paragraphs that are notes ("[Before speaking,
# the President presented ...]"), a speaker label "The President." opening a paragraph in the
# transcripts of spoken addresses, and "[word; White House correction]" for a corrected word.

_AUDIENCE_NOTE = re.compile(r"\s*\[(?:laughter|applause|inaudible|see app note\.?)\]", re.IGNORECASE)
_CORRECTION = re.compile(r"\[([^\[\];]*); White House correction\]")
_NOTE_PARAGRAPH = re.compile(r"\[[^\[\]]*\]")
_SPEAKER = re.compile(r"^(?:The President\.\s+)+")


def sotu_to_prose(raw):
    """One address's text without the transcribers' notes; paragraphs separated by blank lines."""
    kept = []
    for para in paragraphs(raw):
        para = _CORRECTION.sub(r"\1", _AUDIENCE_NOTE.sub("", para))
        para = "\n".join(ln.strip() for ln in para.split("\n") if ln.strip())
        para = _SPEAKER.sub("", para)
        if para and not _NOTE_PARAGRAPH.fullmatch(para):  # "[As delivered in person before ...]"
            kept.append(para)
    return "\n\n".join(kept)


# ---------------------------------------------------------------------------------------------
# reStructuredText (Python's documentation sources: html/_sources/**/*.rst.txt)
#
# Line by line, one block at a time. Dropped: section adornments and transitions, comments and
# labels (".. _x:"), directives whose body is not prose (code, tables, toctrees, index entries,
# images, ...) with their whole body, literal blocks (the indented block after a paragraph ending
# in "::"), doctest blocks (">>>" to the next blank line), grid and simple tables. Kept as prose:
# the bodies of admonitions (note, warning, seealso, ...) and of the API-description directives
# (function, class, method, ...: their signature line is dropped, their description kept). Inline
# markup is reduced to its text: :func:`~json.dumps` → dumps, `title <url>`_ → title, ``x`` → x,
# **x** / *x* → x, footnote references removed. Wrapped lines of a paragraph are joined with
# spaces; list items become paragraphs of their own, their marker removed. Paragraphs in which
# letters make less than MIN_LETTERS of the non-space characters (leftover numbers, grammar
# fragments) are dropped.

MIN_LETTERS = 0.5

# directives whose body is prose, in two kinds: admonitions, whose body may start on the next line
# (after the directive's options, ":name: value"); and object descriptions, whose signature may go
# on over more lines (more signatures, a "\\" continuation, options) up to the first blank line.
ADMONITIONS = frozenset("""
    note warning seealso attention caution danger error hint important tip admonition deprecated
    versionadded versionchanged deprecated-removed impl-detail topic sidebar glossary availability
    """.split())
DESCRIPTIONS = frozenset("""
    describe function class method classmethod staticmethod attribute data exception module
    decorator decoratormethod coroutinefunction coroutinemethod abstractmethod opcode cmdoption
    option envvar pdbcommand c:function c:type c:member c:macro c:var c:struct c:data
    """.split())

_DIRECTIVE = re.compile(r"\.\.\s+([\w:.-]+)::(.*)")
_ADORNMENT = re.compile(r"([=\-~^*#\"'`+:._!$%&,;/<>?@\\|])\1{2,}")  # a line of one repeated punctuation
_SIMPLE_TABLE_BORDER = re.compile(r"=+(?: +=+)+")
_GRID_TABLE_BORDER = re.compile(r"\+(?:[-=]+\+)+")
_BULLET = re.compile(r"(?:[*+\-•]|#\.|\d+\.|\(?\d+\)|\(?[a-z]\))\s+")
_FIELD = re.compile(r":[^:`]+:(?:\s|$)")


def _indent(line):
    return len(line) - len(line.lstrip(" "))


def _end_of_block(lines, start, indent):
    """Index of the first non-blank line at or after `start` indented `indent` or less."""
    i = start
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
        i += 1
    return i


# inline markup, applied in this order
_ROLE = re.compile(r":(?:[\w.+-]+:)*([\w.+-]+):`([^`]*)`")
_TARGET = re.compile(r"^(.*?)\s*<[^<>]*>$", re.DOTALL)
_LINK = re.compile(r"`([^`<]*?)\s*<[^`>]*>`__?")
_NAMED_LINK = re.compile(r"`([^`]+)`__?")
_LITERAL = re.compile(r"``(.+?)``")
_DEFAULT_ROLE = re.compile(r"`([^`]+)`")
_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_EMPHASIS = re.compile(r"(?<![\w*\\])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")
_FOOTNOTE_REF = re.compile(r"\s*\[(?:#[\w-]*|\d+|\*)\]_")
_SUBSTITUTION = re.compile(r"\|([\w.-]+)\|_{0,2}")


def _role_text(m):
    role, inner = m.group(1), m.group(2)
    titled = _TARGET.match(inner)
    if titled and titled.group(1):
        return titled.group(1)             # :ref:`the tutorial <tut-intro>` → the tutorial
    inner = inner.lstrip("!")
    if inner.startswith("~"):
        inner = inner[1:].rsplit(".", 1)[-1]  # :meth:`~str.join` → join
    if role in ("rfc", "pep"):
        return f"{role.upper()} {inner}"   # :pep:`8` → PEP 8
    return inner


def _inline_outside_literals(text):
    text = _ROLE.sub(_role_text, text)
    text = _LINK.sub(r"\1", text)
    text = _NAMED_LINK.sub(r"\1", text)
    text = _DEFAULT_ROLE.sub(r"\1", text)
    text = _STRONG.sub(r"\1", text)
    text = _EMPHASIS.sub(r"\1", text)
    text = _FOOTNOTE_REF.sub("", text)
    text = _SUBSTITUTION.sub(r"\1", text)
    text = text.replace("\\ ", "").replace(" --- ", " — ")
    return re.sub(r"\\(.)", r"\1", text)  # backslash escapes


def rest_inline_to_text(text):
    """Inline reST markup of one paragraph reduced to its words (``literals`` kept as written)."""
    parts = _LITERAL.split(text)  # even: marked-up text; odd: the insides of ``literals``
    return "".join(p if k % 2 else _inline_outside_literals(p) for k, p in enumerate(parts))


def _rest_blocks(lines):
    """Yield the raw text of each prose paragraph of reST `lines` (tabs already expanded)."""
    para, para_indent = [], None
    i = 0
    while i < len(lines):
        line = lines[i]
        s = line.strip()
        ind = _indent(line)
        if not s:
            if para:
                yield " ".join(para)
            para, para_indent = [], None
            i += 1
            continue
        if _ADORNMENT.fullmatch(s) or _GRID_TABLE_BORDER.fullmatch(s):
            if para:  # a section title's underline ends the title
                yield " ".join(para)
            para, para_indent = [], None
            i += 1  # a section over/underline, a transition, a grid-table border
            continue
        new_block = para_indent is None or ind != para_indent  # a paragraph's lines share one indent
        bullet = _BULLET.match(s) if new_block else None  # "- x" inside a paragraph is no list item
        if para and new_block:
            yield " ".join(para)
            para, para_indent = [], None
        if para_indent is None:  # the first line of a block: what kind of block is it?
            if s.startswith(".. ") or s == "..":
                end = _end_of_block(lines, i + 1, ind)
                d = _DIRECTIVE.match(s)
                body = lines[i + 1:end]
                if d and d.group(1) in DESCRIPTIONS:
                    while body and body[0].strip():
                        body = body[1:]  # more signatures and the options, up to a blank line
                    yield from _rest_blocks(body)
                elif d and d.group(1) in ADMONITIONS:
                    while body and (not body[0].strip() or _FIELD.match(body[0].strip())):
                        body = body[1:]  # the directive's options (:class: ..., :noindex:)
                    yield from _rest_blocks(body)
                i = end  # comments, labels and every other directive: dropped with their bodies
                continue
            if _SIMPLE_TABLE_BORDER.fullmatch(s):  # to the border that a blank line follows
                i += 1
                while i < len(lines) and not (_SIMPLE_TABLE_BORDER.fullmatch(lines[i].strip())
                                              and (i + 1 == len(lines) or not lines[i + 1].strip())):
                    i += 1
                i += 1
                continue
            if s.startswith(">>>") or (s.startswith("|") and s.endswith("|") and len(s) > 1):
                while i < len(lines) and lines[i].strip():
                    i += 1  # a doctest block or a grid-table row, to the next blank line
                continue
        if bullet:
            s = s[bullet.end():]
            if s.startswith(".."):  # "*  .. _label:": the item opens with a label or a directive
                lines[i] = " " * (ind + bullet.end()) + s
                continue
            para_indent = ind + bullet.end()
        elif para_indent is None:
            para_indent = ind
        if s.endswith("::"):  # the paragraph introduces a literal block: keep the words, drop the block
            s = s[:-2].rstrip()
            s = s + ":" if s and not s.endswith(":") else s
            if s:
                para.append(s)
            if para:
                yield " ".join(para)
            i = _end_of_block(lines, i + 1, para_indent)  # the literal block is indented more
            para, para_indent = [], None
            continue
        para.append(s)
        i += 1
    if para:
        yield " ".join(para)


def rest_to_prose(raw):
    """A reStructuredText page as prose paragraphs separated by blank lines (see the notes above)."""
    lines = raw.replace("\r\n", "\n").replace("\r", "\n").expandtabs(8).split("\n")
    kept = []
    for block in _rest_blocks(lines):
        text = " ".join(rest_inline_to_text(block).split())
        if text and letter_fraction(text) >= MIN_LETTERS:
            kept.append(text)
    return "\n\n".join(kept)
