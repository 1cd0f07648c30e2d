"""Activation caching on a tiny random Gemma 2 (tests/data/gemma2/tiny_f32) with a word-level
tokenizer built here with the `tokenizers` library: the cache holds exactly the model's site
activations at real-token positions, resumes after an interruption to the same bytes, reads back
as shuffled batches, and refuses missing/corrupt files and SAEs of the wrong width; delta LM loss
splices correctly (an identity SAE costs nothing, a zero SAE is the zero ablation, BOS is kept)."""

import json
from pathlib import Path

import numpy
import pytest
from tolerances import GEMMA_ATOL, GEMMA_RTOL

from minisae.models import gemma2
from minisae.data.activations import (ActivationsError, ActivationStore, cache_activations, iter_documents,
                                 iter_sequences)
from minisae.eval.evaluate import evaluate_lm, evaluate_sae
from minisae.io.saefile import SAE

TINY = Path(__file__).parent / "data" / "gemma2" / "tiny_f32"
SITE = "blocks.1.hook_resid_post"
WORDS = ("the cat dog sat on a mat and ran to big small red blue house tree car bird fish sun moon "
         "star day night was is it he she they we you saw ate").split()


def make_tokenizer(folder):
    """A word-level tokenizer.json with Gemma's special ids (PAD 0, EOS 1, BOS 2) that adds BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for w in WORDS + [".", ","]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    path = Path(folder) / "tokenizer.json"
    tok.save(str(path))
    return gemma2.load_tokenizer(path)


def write_texts(folder, n_docs=12, seed=0):
    """A .txt (blank-line separated documents, some of two lines) and a .jsonl of random sentences."""
    rng = numpy.random.default_rng(seed)

    def sentence(n):
        return " ".join(rng.choice(WORDS, size=n)) + " ."

    docs = [sentence(int(rng.integers(3, 30))) for _ in range(n_docs)]
    txt = Path(folder) / "corpus.txt"
    txt.write_text("\n\n".join(d if i % 3 else d + "\n" + sentence(4) for i, d in enumerate(docs)) + "\n")
    jsonl = Path(folder) / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": sentence(int(rng.integers(5, 40))), "id": i}) + "\n"
                             for i in range(n_docs)))
    return [txt, jsonl]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    return gemma2.load(TINY), make_tokenizer(folder), write_texts(folder)


def test_documents_and_sequences(tmp_path, tiny):
    _, tok, texts = tiny
    docs = list(iter_documents(texts))
    assert len(docs) == 24 and "\n" in docs[0]  # the first .txt document has two lines
    seqs = list(iter_sequences(tok, texts, 8))
    assert all(s[0] == tok.bos_id and 2 <= len(s) <= 8 and tok.bos_id not in s[1:] for s in seqs)
    # the pieces of a document, BOS removed, are the document's tokens in order
    first = tok.encode(docs[0])[1:]
    n = -(-len(first) // 7)
    assert sum((s[1:] for s in seqs[:n]), []) == first
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the cat"}\n{"body": "no text"}\n')
    with pytest.raises(ActivationsError, match=r"bad.jsonl:2: .*'text'"):
        list(iter_documents([bad]))
    with pytest.raises(ActivationsError, match="does not exist"):
        list(iter_documents([tmp_path / "missing.txt"]))


def test_cache_holds_exactly_the_site_activations(tmp_path, tiny):
    model, tok, texts = tiny
    man = cache_activations(model, tok, texts, SITE, tmp_path, seq_len=16, batch_size=3, shard_tokens=40,
                            model_name="tiny_f32", progress=False)
    seqs = list(iter_sequences(tok, texts, 16))
    assert man["complete"] and man["d_in"] == 64 and man["layer"] == 1 and man["dtype"] == "float32"
    assert man["count"] == sum(len(s) - 1 for s in seqs)  # every token but BOS (no EOS/PAD in text)
    assert len(man["shards"]) > 2 and sum(s["count"] for s in man["shards"]) == man["count"]
    rows = numpy.concatenate([numpy.load(tmp_path / s["file"]) for s in man["shards"]])
    expect = [model.capture(numpy.array([s]), SITE)[0, 1:] for s in seqs]  # unpadded, one at a time
    numpy.testing.assert_allclose(rows, numpy.concatenate(expect), rtol=GEMMA_RTOL, atol=GEMMA_ATOL)
    # a complete cache is returned as it is; another site in the same folder is refused
    assert cache_activations(model, tok, texts, SITE, tmp_path, seq_len=16, batch_size=3, shard_tokens=40,
                             model_name="tiny_f32", progress=False) == man
    with pytest.raises(ActivationsError, match="site: cache 'blocks.1.hook_resid_post', now 'blocks.2.hook_mlp_out'"):
        cache_activations(model, tok, texts, "blocks.2.hook_mlp_out", tmp_path, seq_len=16, batch_size=3,
                          model_name="tiny_f32", progress=False)
    with pytest.raises(FileExistsError):
        cache_activations(model, tok, texts, SITE, tmp_path, seq_len=16, resume=False, model_name="tiny_f32")


class _Interrupt(Exception):
    pass


class _Dies:
    """A model that raises after `n` capture calls (a crash in the middle of caching)."""

    def __init__(self, model, n):
        self.model, self.n, self.xp = model, n, model.xp

    def site_width(self, site):
        return self.model.site_width(site)

    def capture(self, ids, site):
        self.n -= 1
        if self.n < 0:
            raise _Interrupt()
        return self.model.capture(ids, site)


def test_cache_resumes_to_the_same_bytes(tmp_path, tiny):
    model, tok, texts = tiny
    kw = dict(seq_len=16, batch_size=2, shard_tokens=30, model_name="m", progress=False, max_tokens=300)
    straight = cache_activations(model, tok, texts, SITE, tmp_path / "a", **kw)
    with pytest.raises(_Interrupt):
        cache_activations(_Dies(model, 7), tok, texts, SITE, tmp_path / "b", **kw)
    part = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert not part["complete"] and 0 < part["count"] < 300
    resumed = cache_activations(model, tok, texts, SITE, tmp_path / "b", **kw)
    assert resumed["count"] == straight["count"] == 300
    assert [s["count"] for s in resumed["shards"]] == [s["count"] for s in straight["shards"]]
    for s in straight["shards"]:
        assert (tmp_path / "a" / s["file"]).read_bytes() == (tmp_path / "b" / s["file"]).read_bytes()


def test_store_batches_are_shuffled_deterministic_and_cover_an_epoch(tmp_path, tiny):
    model, tok, texts = tiny
    man = cache_activations(model, tok, texts, SITE, tmp_path, seq_len=16, batch_size=4, shard_tokens=50,
                            max_tokens=200, model_name="m", progress=False)
    store = ActivationStore(tmp_path, seed=3, holdout_tokens=40)
    every = numpy.concatenate([numpy.load(tmp_path / s["file"]) for s in man["shards"]])  # (200, 64)
    assert store.d_in == 64 and store.count == 200
    epoch = numpy.concatenate([store.batch(i, 32) for i in range(5)])  # 160 = all training rows
    held = store.eval_sample(40)
    # each row exactly once (as multisets: the same context gives the same row twice)
    assert sorted(r.tobytes() for r in numpy.concatenate([epoch, held])) == sorted(r.tobytes() for r in every)
    assert not numpy.array_equal(epoch, every[:160])  # shuffled
    assert numpy.array_equal(store.batch(7, 32), ActivationStore(tmp_path, seed=3, holdout_tokens=40).batch(7, 32))
    assert not numpy.array_equal(store.batch(0, 32), ActivationStore(tmp_path, seed=4, holdout_tokens=40).batch(0, 32))
    assert store.sample(50).shape == (50, 64)


def test_store_errors(tmp_path, tiny):
    model, tok, texts = tiny
    with pytest.raises(ActivationsError, match="no activation manifest"):
        ActivationStore(tmp_path)
    man = cache_activations(model, tok, texts, SITE, tmp_path, seq_len=16, shard_tokens=50, max_tokens=120,
                            model_name="m", progress=False)
    shard = tmp_path / man["shards"][1]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(ActivationsError, match=f"shard .*{shard.name}"):
        ActivationStore(tmp_path)
    shard.unlink()
    with pytest.raises(ActivationsError, match="does not exist"):
        ActivationStore(tmp_path)
    shard.write_bytes(data)
    ActivationStore(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "minisae-activations-1", "site"')
    with pytest.raises(ActivationsError, match="not valid JSON"):
        ActivationStore(tmp_path)


def _identity_sae(D):
    """f = ReLU([x, -x]) and x̂ = f @ [I; -I] = x: a perfect JumpReLU SAE with threshold 0."""
    eye = numpy.eye(D, dtype=numpy.float32)
    params = {"W_enc": numpy.concatenate([eye, -eye], axis=1), "b_enc": numpy.zeros(2 * D, numpy.float32),
              "W_dec": numpy.concatenate([eye, -eye], axis=0), "b_dec": numpy.zeros(D, numpy.float32),
              "threshold": numpy.zeros(2 * D, numpy.float32)}
    return SAE("jumprelu", params)


def test_delta_lm_loss(tiny):
    model, tok, texts = tiny
    kw = dict(seq_len=16, batch_size=3, max_tokens=150)
    ident = evaluate_lm(_identity_sae(64), model, tok, texts, SITE, **kw)
    assert ident["lm_tokens"] >= 150 and ident["ce_zero"] > ident["ce_clean"]
    # ReLU(x) - ReLU(-x) through identity matrices is exact in float32: the spliced model is the model
    assert ident["delta_lm_loss"] == 0.0 and ident["loss_recovered"] == 1.0
    zero = _identity_sae(64)
    zero.params["W_dec"][:] = 0.0
    z = evaluate_lm(zero, model, tok, texts, SITE, **kw)
    assert z["ce_sae"] == z["ce_zero"] and z["loss_recovered"] == 0.0
    assert z["ce_clean"] == ident["ce_clean"]

    # BOS is not spliced: the zero ablation keeps the BOS activations, so it differs from
    # zeroing every position
    ids, mask = tok.encode_batch(list(iter_documents(texts))[:3], max_length=16)
    every = model.forward(ids, splice={SITE: numpy.zeros_like})
    keep_bos = model.forward(ids, splice={SITE: lambda a: numpy.where((ids == 2)[..., None], a, 0.0)})
    loss_every, n = gemma2.cross_entropy(every, ids, mask)
    loss_bos, _ = gemma2.cross_entropy(keep_bos, ids, mask)
    assert n > 0 and loss_every != loss_bos


def test_width_mismatch_is_refused(tmp_path, tiny):
    model, tok, texts = tiny
    with pytest.raises(ValueError, match=r"SAE d_in=32 does not match site blocks.1.attn.hook_z .*width 96"):
        evaluate_lm(_identity_sae(32), model, tok, texts, "blocks.1.attn.hook_z", seq_len=16)
    cache_activations(model, tok, texts, SITE, tmp_path, seq_len=16, max_tokens=64, model_name="m", progress=False)
    with pytest.raises(ValueError, match="SAE d_in=32 does not match the activation source .width 64"):
        evaluate_sae(_identity_sae(32), ActivationStore(tmp_path))
    ok = evaluate_sae(_identity_sae(64), ActivationStore(tmp_path), n_tokens=64)
    assert ok["fvu"] == 0.0 and ok["rel_recon_bias"] == 1.0


def test_norm_outliers_are_the_real_tokens_over_ratio_times_the_batch_median():
    from minisae.data.activations import check_norm_ratio, norm_outliers

    rng = numpy.random.default_rng(0)
    acts = rng.standard_normal((2, 50, 8)).astype(numpy.float32)  # (B, T, D)
    acts[0, 7] *= 20.0
    acts[1, 3] *= 20.0   # a real token with a massive activation
    acts[1, 40] *= 20.0  # ... and one at a padded position: not real, never flagged
    real = numpy.ones((2, 50), dtype=bool)
    real[1, 30:] = False
    norms = numpy.linalg.norm(acts, axis=-1)
    want = real & (norms > 5.0 * numpy.median(norms[real]))
    got = norm_outliers(acts, real, 5.0)
    assert (got == want).all() and got[0, 7] and got[1, 3] and not got[1, 40] and got.sum() == 2
    assert not norm_outliers(acts, real, None).any() and not norm_outliers(acts, ~numpy.ones_like(real), 5.0).any()
    for bad in (1.0, 0.5, -3, float("nan"), float("inf"), True, "5"):
        with pytest.raises(ValueError, match="max_norm_ratio: expected a number > 1"):
            check_norm_ratio(bad)


class _Massive:
    """The tiny model with every 'sat' token's site activation scaled 50 × (a planted massive activation)."""

    def __init__(self, model, sat_id):
        self.model, self.xp, self.sat_id = model, model.xp, sat_id

    def site_width(self, site):
        return self.model.site_width(site)

    def capture(self, ids, site):
        acts = self.model.capture(ids, site)  # (B, T, D)
        return numpy.where((numpy.asarray(ids) == self.sat_id)[..., None], 50.0 * acts, acts)


def test_a_cache_with_max_norm_ratio_leaves_out_exactly_the_massive_tokens(tmp_path, tiny):
    model, tok, texts = tiny
    sat = tok.encode("sat")[-1]
    massive = _Massive(model, sat)
    kw = dict(seq_len=16, batch_size=3, shard_tokens=40, model_name="tiny_f32", progress=False)
    every = cache_activations(massive, tok, texts, SITE, tmp_path / "all", **kw)
    kept = cache_activations(massive, tok, texts, SITE, tmp_path / "kept", max_norm_ratio=10.0, **kw)
    n_sat = sum(s[1:].count(sat) for s in iter_sequences(tok, texts, 16))
    assert n_sat > 0 and every["outliers"] == 0 and every["max_norm_ratio"] is None
    assert kept["outliers"] == n_sat and kept["count"] == every["count"] - n_sat
    rows = numpy.concatenate([numpy.load(tmp_path / "all" / s["file"]) for s in every["shards"]])
    left = numpy.concatenate([numpy.load(tmp_path / "kept" / s["file"]) for s in kept["shards"]])
    ids = numpy.concatenate([numpy.array(s[1:]) for s in iter_sequences(tok, texts, 16)])
    numpy.testing.assert_array_equal(left, rows[ids != sat])
    assert ActivationStore(tmp_path / "kept").describe()["outliers"] == n_sat
    with pytest.raises(ActivationsError, match="max_norm_ratio: cache 10.0, now None"):  # resume: same rule only
        cache_activations(massive, tok, texts, SITE, tmp_path / "kept", **kw)
    # a max_tokens cut inside a batch: the outliers after the last row kept are not counted
    for n in (kept["count"] - 5, kept["count"] // 2):
        cut = cache_activations(massive, tok, texts, SITE, tmp_path / f"cut{n}", max_norm_ratio=10.0,
                                max_tokens=n, **kw)
        first_left_out = numpy.flatnonzero(ids != sat)[n]  # the first row the cut leaves out
        assert cut["count"] == n and cut["outliers"] == int((ids[:first_left_out] == sat).sum())


def test_delta_lm_loss_leaves_the_massive_tokens_unspliced(tiny):
    # a zero SAE spliced everywhere but at BOS and at tokens over 1.05 × the batch's median norm is
    # the model run with exactly those positions kept, zeroed elsewhere (computed here by hand)
    from minisae.data.activations import iter_batches, real_token_mask

    model, tok, texts = tiny
    zero = _identity_sae(64)
    zero.params["W_dec"][:] = 0.0
    kw = dict(seq_len=16, batch_size=3, max_tokens=60)
    z = evaluate_lm(zero, model, tok, texts, SITE, max_norm_ratio=1.05, **kw)
    total = n_total = n_out = 0
    for _, ids, mask in iter_batches(tok, texts, 16, 3):
        acts = model.capture(ids, SITE)  # (B, T, D)
        real = real_token_mask(ids, mask, tok)
        norms = numpy.linalg.norm(acts, axis=-1)
        out = real & (norms > 1.05 * numpy.median(norms[real]))
        keep = ((ids == tok.bos_id) | out)[..., None]
        loss, n = gemma2.cross_entropy(model.forward(ids, splice={SITE: lambda a: numpy.where(keep, a, 0.0)}), ids, mask)
        total, n_total, n_out = total + float(loss) * n, n_total + n, n_out + int(out.sum())
        if n_total >= 60:
            break
    assert z["unspliced_outliers"] == n_out > 0 and z["lm_tokens"] == n_total
    assert z["ce_sae"] == pytest.approx(total / n_total, rel=1e-5) and z["ce_sae"] == z["ce_zero"]
    plain = evaluate_lm(zero, model, tok, texts, SITE, **kw)
    assert plain["unspliced_outliers"] == 0 and plain["ce_sae"] != z["ce_sae"] and plain["ce_clean"] == z["ce_clean"]
    huge = evaluate_lm(zero, model, tok, texts, SITE, max_norm_ratio=1e30, **kw)
    assert huge["ce_sae"] == plain["ce_sae"] and huge["unspliced_outliers"] == 0


def test_a_shared_baseline_gives_the_same_numbers_with_one_pass_per_batch(tiny):
    # compare evaluates many SAEs on the same tokens: the clean and zero-ablated losses are computed
    # once and reused; every number equals the plain three-pass evaluation bitwise
    model, tok, texts = tiny
    zero = _identity_sae(64)
    zero.params["W_dec"] *= 0.5  # an SAE that changes the loss
    ident = _identity_sae(64)
    kw = dict(seq_len=16, batch_size=3, max_tokens=60, max_norm_ratio=1.05)
    plain = [evaluate_lm(s, model, tok, texts, SITE, **kw) for s in (zero, ident)]
    calls = []
    real_losses = model.losses

    def counting(ids, mask, splices, **k):
        calls.append(len(splices))
        return real_losses(ids, mask, splices, **k)

    model.losses = counting
    try:
        shared = {}
        cached = [evaluate_lm(s, model, tok, texts, SITE, baseline=shared, **kw) for s in (zero, ident)]
    finally:
        del model.losses
    assert cached == plain and len(shared) == 1
    first = len(shared[next(iter(shared))])
    assert calls == [3] * first + [1] * first  # three passes a batch the first time, one after
    other = evaluate_lm(ident, model, tok, texts, SITE, baseline=shared, **{**kw, "max_tokens": 30})
    assert other == evaluate_lm(ident, model, tok, texts, SITE, **{**kw, "max_tokens": 30}) and len(shared) == 2
