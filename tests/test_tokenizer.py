"""minisae.models.gemma2.tokenizer on small tokenizer.json files built here with the `tokenizers` library."""

import numpy
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import TemplateProcessing

from minisae.models.gemma2.tokenizer import Gemma2Tokenizer, TokenizerError, load_tokenizer
from minisae.io.hub import HubError

SPECIALS = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
WORDS = ["hello", "world", "the", "quick", "brown", "fox"]
GEMMA_VOCAB = {**SPECIALS, **{w: i + 4 for i, w in enumerate(WORDS)}}


def build(vocab, *, bos_post_processor, bos="<bos>"):
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([t for t in vocab if t.startswith("<")])
    if bos_post_processor:  # what Gemma's released tokenizer.json does
        tok.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                special_tokens=[(bos, vocab[bos])])
    return tok


@pytest.fixture(params=[True, False], ids=["bos-post-processor", "no-post-processor"])
def tok(request, tmp_path):
    build(GEMMA_VOCAB, bos_post_processor=request.param).save(str(tmp_path / "tokenizer.json"))
    return load_tokenizer(tmp_path)


def test_special_ids(tok):
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    assert tok.vocab_size == len(GEMMA_VOCAB)


def test_encode_bos_exactly_once(tok):
    assert tok.encode("hello world") == [2, 4, 5]
    assert tok.encode("") == [2]
    assert tok.encode("<bos> hello") == [2, 4]  # a BOS in the text itself is not doubled
    assert tok.encode("<bos><bos>fox") == [2, 9]
    assert tok.encode("hello <bos> fox") == [2, 4, 2, 9]  # only leading BOS are merged
    assert tok.encode("hello dog") == [2, 4, 3]


def test_encode_batch_pads_and_masks(tok):
    ids, mask = tok.encode_batch(["hello world the", "fox", ""])
    assert ids.dtype == numpy.int64 and mask.dtype == bool
    assert ids.tolist() == [[2, 4, 5, 6], [2, 9, 0, 0], [2, 0, 0, 0]]
    assert mask.tolist() == [[True] * 4, [True, True, False, False], [True, False, False, False]]

    ids, mask = tok.encode_batch(["hello world the", "fox"], max_length=3)
    assert ids.tolist() == [[2, 4, 5], [2, 9, 0]] and mask.sum(axis=1).tolist() == [3, 2]

    ids, mask = tok.encode_batch(["fox"], max_length=5, pad_to_max_length=True)
    assert ids.tolist() == [[2, 9, 0, 0, 0]] and mask.tolist() == [[True, True, False, False, False]]

    ids, mask = tok.encode_batch([])
    assert ids.shape == (0, 0) and mask.shape == (0, 0)


def test_encode_batch_truncation_errors(tok):
    with pytest.raises(ValueError, match=r"text 1 is 4 tokens long \(with BOS\), more than max_length=3"):
        tok.encode_batch(["fox", "the quick fox"], max_length=3, truncate=False)
    with pytest.raises(ValueError, match="max_length must be at least 1"):
        tok.encode_batch(["fox"], max_length=0)
    with pytest.raises(TypeError, match="list of str"):
        tok.encode_batch("fox")
    with pytest.raises(TypeError, match="expects a str"):
        tok.encode(["fox"])


def test_decode(tok):
    ids, _ = tok.encode_batch(["the quick brown fox", "hello"])
    assert tok.decode(ids[0]) == "the quick brown fox"
    assert tok.decode(ids[1]) == "hello"  # BOS and PAD are special: skipped
    assert tok.decode(ids[1], skip_special_tokens=False) == "<bos> hello <pad> <pad> <pad>"
    assert tok.decode([2, 4, 1]) == "hello"
    with pytest.raises(ValueError, match=r"1-D sequence of ids, found shape \(2, 5\)"):
        tok.decode(ids)


@given(st.lists(st.lists(st.sampled_from(WORDS), max_size=6), min_size=1, max_size=4),
       st.one_of(st.none(), st.integers(1, 8)))
def test_batch_agrees_with_encode(tmp_path_factory, texts_words, max_length):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build(GEMMA_VOCAB, bos_post_processor=True).save(str(path))
    tok = load_tokenizer(path)
    texts = [" ".join(words) for words in texts_words]
    ids, mask = tok.encode_batch(texts, max_length=max_length)
    for b, (text, words) in enumerate(zip(texts, texts_words)):
        want = ([2] + [GEMMA_VOCAB[w] for w in words])[:max_length]
        assert tok.encode(text)[:max_length] == want
        n = int(mask[b].sum())
        assert ids[b, :n].tolist() == want and mask[b, :n].all()
        assert not mask[b, n:].any() and (ids[b, n:] == 0).all()
        if max_length is None or len(words) < max_length:
            assert tok.decode(ids[b]) == text


def test_special_ids_read_from_vocab(tmp_path):
    vocab = {"<unk>": 0, "a": 1, "b": 2, "<bos>": 5, "<eos>": 6, "<pad>": 7}
    build(vocab, bos_post_processor=True).save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (5, 6, 7)
    assert tok.encode("a b") == [5, 1, 2]
    ids, mask = tok.encode_batch(["a b", "a"])
    assert ids.tolist() == [[5, 1, 2], [5, 1, 7]] and mask.tolist() == [[True] * 3, [True, True, False]]


def test_defaults_without_special_tokens(tmp_path):
    vocab = {"[UNK]": 0, "a": 1, "b": 2, "c": 3}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tmp_path / "my-tokenizer.json"))  # any local file name is accepted
    t = load_tokenizer(tmp_path / "my-tokenizer.json")
    assert isinstance(t, Gemma2Tokenizer)
    assert (t.bos_id, t.eos_id, t.pad_id) == (2, 1, 0)
    assert t.encode("a c") == [2, 1, 3]


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(HubError, match="has no file 'tokenizer.json'"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match="tokenizer.json: not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{truncated")
    with pytest.raises(TokenizerError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
    with pytest.raises(HubError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
