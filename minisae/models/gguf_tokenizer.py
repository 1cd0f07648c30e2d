"""The Gemma tokenizer rebuilt from a GGUF file's vocabulary, as transformers' GGUF loader builds it.

A GGUF carries no tokenizer.json. llama.cpp's converter stores Gemma's SentencePiece vocabulary as
metadata (convert_hf_to_gguf.py, `_set_vocab_sentencepiece`):

    tokenizer.ggml.model        "llama" (a SentencePiece vocabulary)
    tokenizer.ggml.tokens       V strings, in id order ("<pad>", "<eos>", "<bos>", ..., "▁the", ...)
    tokenizer.ggml.scores       V floats (not used: Gemma's scores do not follow its merge order)
    tokenizer.ggml.token_type   V ints: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id, add_bos_token, ...

transformers (5.25, integrations/gguf/gguf_tokenizer_mapping.py: `gemma_tokenizer`,
`add_gguf_special_tokens`; models/gemma/tokenization_gemma.py: `GemmaTokenizer`) turns that into a
`tokenizers` BPE model with byte fallback, and so does `build_tokenizer` here, step for step:

1. Tokens made only of whitespace that contain a space ("  ", the runs of 2..31 spaces) are stored
   with real spaces; they are respelled as that many "▁" (the normalizer turns spaces into "▁").
2. The vocabulary is {respelled token: id} (a repeated spelling keeps its last id).
3. No merges are stored, so they are derived: every split of a token into two vocabulary tokens is a
   merge, ranked by the token's position in the file (earlier = merged first), and within one token
   the longest left piece first. (tokenization_utils_base.generate_merges with -position scores.)
4. BPE(unk "<unk>", fuse_unk, byte_fallback: a character outside the vocabulary becomes its UTF-8
   bytes <0xNN>), normalizer Replace(" " -> "▁"), pre-tokenizer Split(" ", merged_with_previous)
   (a no-op after the normalizer, kept to match), decoder Replace("▁" -> " ") + ByteFallback + Fuse,
   post-processor "<bos> $A".
5. Control tokens (type 3: <pad>, <bos>, <start_of_turn>, <unused0>, ...) are added as special tokens
   and user-defined ones (type 4: "\\n", "\\n\\n", "[multimodal]", ...) as plain added tokens, both
   matched whole in the raw text; a user-defined token whose spelling was changed in step 1 is
   no longer in the vocabulary and is not added (as in transformers).

tests/test_gguf.py checks the ids against transformers' GGUF tokenizer on tricky texts (goldens from
reference/gguf_goldens.py); minisae's Gemma2Tokenizer wrapper then keeps exactly one BOS in front.

Dimension legend: V tokens in the vocabulary (no arrays here; batches come from Gemma2Tokenizer).
"""

from minisae.errors import FileFormatError
from minisae.models.gemma2.tokenizer import Gemma2Tokenizer, TokenizerError, _is_panic

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types (gguf.TokenType)
MAX_TOKEN_CHARS = 512  # Gemma's longest token has 31; bounds the merge search (quadratic in length)


def _vocabulary(metadata, where):
    """(tokens, token types, bos id, eos id, pad id, unk id) from the metadata, checked."""
    model = metadata.get("tokenizer.ggml.model")
    if model != "llama":
        raise TokenizerError(f"{where}: tokenizer.ggml.model: expected 'llama' (a SentencePiece vocabulary, "
                             f"as Gemma's), found {model!r:.60}")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise TokenizerError(f"{where}: tokenizer.ggml.tokens: expected a non-empty array of strings")
    types = metadata.get("tokenizer.ggml.token_type")
    if types is None or getattr(types, "dtype", None) is None or types.dtype.kind not in "iu" \
            or len(types) != len(tokens):
        raise TokenizerError(f"{where}: tokenizer.ggml.token_type: expected {len(tokens)} integers "
                             "(one per token)")
    long = next((i for i, t in enumerate(tokens) if len(t) > MAX_TOKEN_CHARS), None)
    if long is not None:
        raise TokenizerError(f"{where}: token {long} is {len(tokens[long])} characters long, more than "
                             f"the {MAX_TOKEN_CHARS} minisae accepts")
    ids = {}
    for key, default in (("bos", 2), ("eos", 1), ("padding", 0), ("unknown", 3)):
        value = metadata.get(f"tokenizer.ggml.{key}_token_id", default)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < len(tokens):
            raise TokenizerError(f"{where}: tokenizer.ggml.{key}_token_id: expected an id below "
                                 f"{len(tokens)}, found {value!r:.40}")
        ids[key] = value
    return tokens, [int(t) for t in types], ids


def respell(token):
    """Step 1: a whitespace-only token with a space ("   ") as that many "▁"; others unchanged."""
    return "\u2581" * len(token) if " " in token and not token.strip() else token


def bpe_merges(vocab):
    """Step 3: (left, right) pairs best first, from {token: id} (ids give the file order)."""
    ranked = []
    for token, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        for k in range(len(token) - 1, 0, -1):  # longest left piece first
            if token[:k] in vocab and token[k:] in vocab:
                ranked.append((token[:k], token[k:]))
    return ranked


def build_tokenizer(metadata, where="GGUF"):
    """A `tokenizers.Tokenizer` from GGUF metadata (steps 1-5 above)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    tokens, types, ids = _vocabulary(metadata, where)
    vocab = {respell(t): i for i, t in enumerate(tokens)}  # step 2: a repeated spelling keeps its last id
    merges = metadata.get("tokenizer.ggml.merges")  # absent in SentencePiece files; used when given
    if merges is not None:
        if not isinstance(merges, list) or not all(m.count(" ") == 1 for m in merges):
            raise TokenizerError(f"{where}: tokenizer.ggml.merges: expected strings 'left right'")
        merges = [tuple(m.split(" ")) for m in merges]
    else:
        merges = bpe_merges(vocab)
    unk = tokens[ids["unknown"]]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    bos = tokens[ids["bos"]]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                       special_tokens=[(bos, ids["bos"])])
    # step 5: whole-token matches in the raw text, in file order
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, kind in zip(tokens, types) if kind == CONTROL])
    in_vocab = tok.get_vocab(with_added_tokens=True)
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, kind in zip(tokens, types) if kind == USER_DEFINED and t in in_vocab])
    return tok


def load_tokenizer(path):
    """Gemma2Tokenizer (BOS exactly once, right-padded batches) over the vocabulary of a GGUF file."""
    from minisae.io.gguf import GGUFFile

    f = GGUFFile(path)
    try:
        tok = build_tokenizer(f.metadata, str(path))
        tok.encode("a probe, 1 2 3.", add_special_tokens=True)  # a broken vocabulary fails here, not later
    except BaseException as e:  # tokenizers raises bare Exceptions for bad input, a panic for some
        if isinstance(e, FileFormatError) or not (isinstance(e, Exception) or _is_panic(e)):
            raise
        raise TokenizerError(f"{path}: the GGUF vocabulary does not make a tokenizer ({e})") from None
    _, _, ids = _vocabulary(f.metadata, str(path))
    return Gemma2Tokenizer(tok, f.path, bos_id=ids["bos"], eos_id=ids["eos"], pad_id=ids["padding"])


__all__ = ["build_tokenizer", "load_tokenizer", "bpe_merges", "respell"]
