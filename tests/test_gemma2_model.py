"""minisae.models.gemma2 on tiny random checkpoints written by the test itself (no torch, no goldens).

Covers: config.json of both generations and its errors; single-file, sharded, BF16 and F16
checkpoints; every tensor name / shape error; capture vs forward; splices; the final soft-cap;
the sliding window (and an explicit layer_types list); right padding; cross_entropy on a case
computed by hand; and the whole model against an independent float64 reference written below
with per-head loops, repeat_kv and rotate_half spelled out (tests/test_gemma2_parity.py holds the
model against transformers' own outputs).
"""

import json
import math
import re

import numpy
import pytest

from minisae.models.gemma2 import (CheckpointError, ConfigError, Gemma2Config, Gemma2Model, cross_entropy, load,
                            parse_site)
from minisae.models.gemma2.weights import expected_shapes
from minisae.io.safetensors_io import bf16_bits_to_float32, float32_to_bf16_bits, save_file
from minisae.xp import to_numpy
from helpers import assert_close
from tolerances import F32_ATOL, F32_RTOL, REF64_ATOL, REF64_RTOL

B, T = 2, 9
W = 3  # sliding window, shorter than T


def config_dict(style="new", **over):
    d = dict(model_type="gemma2", architectures=["Gemma2ForCausalLM"], vocab_size=64, hidden_size=16,
             intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             head_dim=6, query_pre_attn_scalar=5, sliding_window=W, attn_logit_softcapping=4.0,
             final_logit_softcapping=3.0, rms_norm_eps=1e-5, bos_token_id=2, eos_token_id=1,
             pad_token_id=0, max_position_embeddings=128, attention_bias=False)
    if style == "new":  # transformers 5
        d.update(rope_parameters={"rope_type": "default", "rope_theta": 500.0}, dtype="float32",
                 hidden_activation="gelu_pytorch_tanh",
                 layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    else:  # the Hub's original Gemma 2 files
        d.update(rope_theta=500.0, torch_dtype="float32", hidden_act="gelu_pytorch_tanh",
                 hidden_activation="gelu_pytorch_tanh")
    d.update(over)
    return d


def random_weights(cfg, seed=0, scale=0.6):
    """Weights large enough that both soft-caps act; norm weights random (not the zero init)."""
    rng = numpy.random.default_rng(seed)
    w = {}
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 1:
            w[name] = (0.5 * rng.standard_normal(shape)).astype(numpy.float32)
        else:
            w[name] = (scale / math.sqrt(shape[1]) * 3 * rng.standard_normal(shape)).astype(numpy.float32)
    w["model.embed_tokens.weight"] *= 2.0
    return w


def write_checkpoint(folder, cfg_dict, weights, *, shards=1, dtypes=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg_dict))
    names = sorted(weights)
    if shards == 1:
        save_file(weights, folder / "model.safetensors", dtypes=dtypes)
        return folder
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: weights[n] for n in part}, folder / fname,
                  dtypes={n: dtypes[n] for n in part} if dtypes else None)
        weight_map.update({n: fname for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def make_ids(seed=0, b=B, t=T, vocab=64):
    ids = numpy.random.default_rng(100 + seed).integers(3, vocab, (b, t))
    ids[:, 0] = 2  # BOS first
    return ids


@pytest.fixture(scope="module")
def cfg():
    return Gemma2Config.from_dict(config_dict())


@pytest.fixture(scope="module")
def weights(cfg):
    return random_weights(cfg)


# ---- config ----------------------------------------------------------------------------------------

def test_both_config_generations_read_the_same():
    new = Gemma2Config.from_dict(config_dict("new"))
    old = Gemma2Config.from_dict(config_dict("old"))
    assert new == old
    assert old.layer_types == ("sliding_attention", "full_attention", "sliding_attention")  # even L slide
    assert old.rope_theta == 500.0 and old.torch_dtype == "float32" and old.n_groups == 2
    assert [old.is_sliding(i) for i in range(3)] == [True, False, True]
    assert Gemma2Config.from_dict(new.to_dict()) == new
    it = Gemma2Config.from_dict(config_dict(eos_token_id=[1, 107], torch_dtype="bfloat16", dtype=None))
    assert it.eos_token_ids == (1, 107) and it.eos_token_id == 1 and it.torch_dtype == "bfloat16"
    only_act = config_dict("old")
    del only_act["hidden_activation"]  # hidden_act alone is read too
    assert Gemma2Config.from_dict(only_act) == old
    assert Gemma2Config.from_dict(config_dict(sliding_window=None)).is_sliding(0) is False


@pytest.mark.parametrize("change, needle", [
    (dict(model_type="gemma"), "model_type"),
    (dict(hidden_activation="gelu"), "hidden_activation"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(head_dim=5), "head_dim"),
    (dict(layer_types=["sliding_attention"]), "layer_types"),
    (dict(layer_types=["sliding_attention", "local", "full_attention"]), "layer_types[1]"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}), "rope_type"),
    (dict(rope_parameters={"rope_type": "default"}), "rope_parameters"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(sliding_window=-4), "sliding_window"),
    (dict(query_pre_attn_scalar=0), "query_pre_attn_scalar"),
    (dict(final_logit_softcapping=-30.0), "final_logit_softcapping"),
])
def test_config_errors_name_the_key(change, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        Gemma2Config.from_dict(config_dict(**change))


def test_config_file_errors(tmp_path):
    d = config_dict()
    del d["head_dim"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="missing required key 'head_dim'") as e:
        Gemma2Config.from_file(tmp_path)
    assert str(tmp_path / "config.json") in str(e.value)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Gemma2Config.from_file(tmp_path / "config.json")
    with pytest.raises(ConfigError, match="no such file"):
        Gemma2Config.from_file(tmp_path / "absent")


# ---- loading ---------------------------------------------------------------------------------------

def test_single_file_sharded_and_old_config_load_alike(tmp_path, cfg, weights, xp):
    ids = make_ids()
    single = load(write_checkpoint(tmp_path / "single", config_dict(), weights), xp=xp)
    sharded = load(write_checkpoint(tmp_path / "sharded", config_dict(), weights, shards=3), xp=xp)
    old = load(write_checkpoint(tmp_path / "old", config_dict("old"), weights), xp=xp)
    want = to_numpy(Gemma2Model(cfg, weights, xp=xp).forward(ids))
    for m in (single, sharded, old):
        assert m.config == cfg and m.xp is xp
        numpy.testing.assert_array_equal(to_numpy(m.forward(xp.asarray(ids))), want)


def test_float32_weights_stay_memory_mapped(tmp_path, weights):
    m = load(write_checkpoint(tmp_path / "c", config_dict(), weights))
    for arr in (m.embed, m.layers[0]["q"], m.layers[2]["down"]):
        assert arr.dtype == numpy.float32 and not arr.flags.writeable and not arr.flags.owndata


@pytest.mark.parametrize("store", ["BF16", "F16"])
def test_half_precision_checkpoints_convert_exactly(tmp_path, cfg, weights, store, xp):
    if store == "BF16":
        rounded = {k: bf16_bits_to_float32(float32_to_bf16_bits(v)) for k, v in weights.items()}
    else:
        rounded = {k: v.astype(numpy.float16).astype(numpy.float32) for k, v in weights.items()}
    folder = write_checkpoint(tmp_path / store, config_dict(dtype=store.lower()), weights, shards=2,
                              dtypes={k: store for k in weights})
    m = load(folder, xp=xp)
    ids = make_ids(1)
    numpy.testing.assert_array_equal(to_numpy(m.forward(xp.asarray(ids))),
                                     to_numpy(Gemma2Model(cfg, rounded, xp=xp).forward(ids)))
    assert to_numpy(m.layers[1]["up"]).dtype == numpy.float32


def _load_error(tmp_path, weights, cfg_over=None, **kw):
    folder = write_checkpoint(tmp_path / "bad", config_dict(**(cfg_over or {})), weights, **kw)
    with pytest.raises(CheckpointError) as e:
        load(folder)
    return str(e.value)


def test_missing_tensor_is_named(tmp_path, weights):
    w = dict(weights)
    del w["model.layers.2.self_attn.k_proj.weight"]
    msg = _load_error(tmp_path, w)
    assert "missing tensor model.layers.2.self_attn.k_proj.weight (expected shape (12, 16))" in msg


def test_unexpected_tensor_is_named(tmp_path, weights):
    w = dict(weights, **{"model.layers.3.mlp.up_proj.weight": weights["model.layers.0.mlp.up_proj.weight"]})
    assert "unexpected tensor model.layers.3.mlp.up_proj.weight with shape (24, 16)" in _load_error(tmp_path, w)


def test_wrong_shape_is_named(tmp_path, weights):
    w = dict(weights)
    w["model.layers.1.mlp.up_proj.weight"] = numpy.ascontiguousarray(w["model.layers.1.mlp.up_proj.weight"].T)
    assert "model.layers.1.mlp.up_proj.weight: expected shape (24, 16), found (16, 24)" in _load_error(tmp_path, w)


def test_lm_head(tmp_path, cfg, weights):
    embed = weights["model.embed_tokens.weight"]
    tied = write_checkpoint(tmp_path / "tied", config_dict(), dict(weights, **{"lm_head.weight": embed}))
    ids = make_ids()
    numpy.testing.assert_array_equal(load(tied).forward(ids), Gemma2Model(cfg, weights).forward(ids))
    msg = _load_error(tmp_path, dict(weights, **{"lm_head.weight": embed[:, :8].copy()}))
    assert "lm_head.weight: expected shape (64, 16) (tied to embed_tokens), found (64, 8)" in msg
    assert "missing tensor lm_head.weight" in _load_error(tmp_path, weights, dict(tie_word_embeddings=False))
    # untied: the separate output matrix is used
    head = (embed[::-1] * 0.5).copy()
    untied = load(write_checkpoint(tmp_path / "untied", config_dict(tie_word_embeddings=False),
                                   dict(weights, **{"lm_head.weight": head})))
    assert untied.lm_head is not untied.embed
    assert not numpy.allclose(untied.forward(ids), Gemma2Model(cfg, weights).forward(ids))


def test_folder_and_index_errors(tmp_path, weights):
    ints = dict(weights, **{"model.norm.weight": numpy.arange(16, dtype=numpy.int32)})
    assert "model.norm.weight: expected a float dtype" in _load_error(tmp_path, ints)
    folder = write_checkpoint(tmp_path / "sh", config_dict(), weights, shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "model.norm.weight"
    other = next(f for f in set(index["weight_map"].values()) if f != index["weight_map"][name])
    index["weight_map"][name] = other  # points at the wrong shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{name}: in .* but model.safetensors.index.json places it in"):
        load(folder)
    index["weight_map"][name] = "model-00009-of-00009.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lists shard.* not in the folder: model-00009"):
        load(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(config_dict()))
    with pytest.raises(CheckpointError, match="expected model.safetensors or model.safetensors.index.json"):
        load(empty)
    with pytest.raises(CheckpointError, match="found a file"):
        load(empty / "config.json")
    with pytest.raises(ValueError, match="dtype"):
        load(folder, dtype="float16")


# ---- the model -------------------------------------------------------------------------------------

@pytest.fixture
def model(cfg, weights, xp):
    return Gemma2Model(cfg, weights, xp=xp)


def test_sites(model, cfg):
    assert parse_site("blocks.12.attn.hook_z") == (12, "attn.hook_z")
    assert parse_site("blocks.0.hook_resid_post") == (0, "hook_resid_post")
    assert model.site_width("blocks.1.attn.hook_z") == cfg.num_attention_heads * cfg.head_dim == 24
    assert model.site_width("blocks.2.hook_mlp_out") == model.site_width("blocks.0.hook_resid_post") == 16
    for bad in ("blocks.1.hook_resid_pre", "blocks.x.attn.hook_z", "layers.1.hook_mlp_out", 3):
        with pytest.raises(ValueError, match="expected 'blocks.<layer>.<kind>'"):
            parse_site(bad)
    with pytest.raises(ValueError, match="layer 3 out of range"):
        model.site_width("blocks.3.hook_resid_post")
    with pytest.raises(ValueError, match="layer 5 out of range"):
        model.capture(make_ids(), "blocks.5.hook_mlp_out")


def test_ids_are_checked(model):
    with pytest.raises(ValueError, match=r"expected a \(B, T\) array"):
        model.forward(numpy.arange(5))
    with pytest.raises(ValueError, match="token id 64 out of range"):
        model.forward(numpy.array([[2, 64]]))
    with pytest.raises(ValueError, match="integer token ids"):
        model.forward(numpy.array([[2.0, 3.0]]))


def test_capture_matches_forward(model, cfg, weights, xp):
    ids = make_ids()
    logits = to_numpy(model.forward(ids))
    assert logits.shape == (B, T, cfg.vocab_size) and logits.dtype == numpy.float32
    h = to_numpy(model.capture(ids, "blocks.2.hook_resid_post")).astype(numpy.float64)  # last layer
    hn = h / numpy.sqrt((h * h).mean(-1, keepdims=True) + cfg.rms_norm_eps) * (1 + weights["model.norm.weight"])
    want = 3.0 * numpy.tanh(hn @ weights["model.embed_tokens.weight"].T / 3.0)
    assert_close(logits, want, F32_RTOL, F32_ATOL, "logits from the captured last resid_post")

    sites = [f"blocks.{L}.{k}" for L in range(3) for k in ("hook_resid_post", "attn.hook_z", "hook_mlp_out")]
    together = model.capture(ids, sites)
    assert list(together) == sites
    for s in sites:
        alone = model.capture(ids, s)
        assert alone.shape == (B, T, model.site_width(s))
        numpy.testing.assert_array_equal(to_numpy(alone), to_numpy(together[s]), err_msg=s)
    with pytest.raises(ValueError, match="non-empty list"):
        model.capture(ids, [])


def test_capture_stops_after_the_deepest_site(model, monkeypatch):
    calls = []
    block = model._block
    def counting_block(h, layer, *args, **kwargs):
        calls.append((layer, kwargs))
        return block(h, layer, *args, **kwargs)

    monkeypatch.setattr(model, "_block", counting_block)
    model.capture(make_ids(), ["blocks.0.hook_mlp_out", "blocks.1.attn.hook_z"])
    assert [c[0] for c in calls] == [0, 1] and calls[-1][1]["stop_after_z"] is True
    calls.clear()
    model.capture(make_ids(), "blocks.0.hook_resid_post")
    assert [c[0] for c in calls] == [0]
    calls.clear()
    model.forward(make_ids())
    assert [c[0] for c in calls] == [0, 1, 2]


def test_splice(model, cfg, weights, xp):
    ids = make_ids()
    clean = to_numpy(model.forward(ids))
    kinds = ("hook_resid_post", "attn.hook_z", "hook_mlp_out")
    every = {f"blocks.{L}.{k}": (lambda a: a) for L in range(3) for k in kinds}
    numpy.testing.assert_array_equal(to_numpy(model.forward(ids, splice=every)), clean)
    for site in ("blocks.0.hook_mlp_out", "blocks.1.attn.hook_z", "blocks.2.hook_resid_post"):
        zeroed = to_numpy(model.forward(ids, splice={site: lambda a: a * 0.0}))
        assert numpy.abs(zeroed - clean).max() > 1e-2, site
    # splicing upstream changes what is captured downstream; the captured site itself shows the splice
    acts = model.capture(ids, ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_post"],
                         splice={"blocks.0.hook_mlp_out": lambda a: a * 0.0 + 1.0})
    assert (to_numpy(acts["blocks.0.hook_mlp_out"]) == 1.0).all()
    assert not numpy.allclose(to_numpy(acts["blocks.1.hook_resid_post"]),
                              to_numpy(model.capture(ids, "blocks.1.hook_resid_post")))
    with pytest.raises(ValueError, match=r"splice\['blocks.1.attn.hook_z'\]: .* shape \(2, 9, 24\)"):
        model.forward(ids, splice={"blocks.1.attn.hook_z": lambda a: a[..., :16]})
    with pytest.raises(TypeError, match="expected a function"):
        model.forward(ids, splice={"blocks.1.attn.hook_z": 0.0})


def test_final_softcap_bounds_logits(cfg, weights, xp):
    loud = dict(weights, **{"model.norm.weight": weights["model.norm.weight"] + 40.0})
    capped = to_numpy(Gemma2Model(cfg, loud, xp=xp).forward(make_ids()))
    assert numpy.abs(capped).max() <= cfg.final_logit_softcapping
    assert numpy.abs(capped).max() > 0.99 * cfg.final_logit_softcapping  # the cap is acting
    free = Gemma2Config.from_dict(config_dict(final_logit_softcapping=None))
    free_logits = to_numpy(Gemma2Model(free, loud, xp=xp).forward(make_ids()))
    assert numpy.abs(free_logits).max() > 10 * cfg.final_logit_softcapping


@pytest.mark.parametrize("types", [("sliding_attention", "full_attention", "sliding_attention"),
                                   ("full_attention", "sliding_attention", "sliding_attention")])
def test_sliding_window_on_layer_0(types, weights, xp):
    """z at query i on a sliding layer sees keys i - W < j <= i only; a global layer sees all j <= i."""
    m = Gemma2Model(Gemma2Config.from_dict(config_dict(layer_types=list(types))), weights, xp=xp)
    ids = make_ids(2)
    i = T - 1
    z = to_numpy(m.capture(ids, "blocks.0.attn.hook_z"))[:, i]  # (B, H*d) at query i

    def z_after_changing(j):
        changed = ids.copy()
        changed[:, j] = 3 + (changed[:, j] - 3 + 17) % 61  # another non-special token
        return to_numpy(m.capture(changed, "blocks.0.attn.hook_z"))[:, i]

    if types[0] == "sliding_attention":
        for j in range(0, i - W + 1):  # j <= i - W: out of the window
            numpy.testing.assert_array_equal(z_after_changing(j), z, err_msg=f"key {j} leaked into query {i}")
        for j in range(i - W + 1, i + 1):
            assert numpy.abs(z_after_changing(j) - z).max() > 1e-3, f"key {j} should be visible to query {i}"
    else:
        for j in range(0, i + 1):
            assert numpy.abs(z_after_changing(j) - z).max() > 1e-3, f"key {j} should be visible to query {i}"


def test_right_padding_leaves_real_tokens_alone(model, xp):
    ids = make_ids(3)
    padded = numpy.concatenate([ids, numpy.zeros((B, 4), dtype=ids.dtype)], axis=1)
    assert_close(to_numpy(model.forward(padded))[:, :T], to_numpy(model.forward(ids)), F32_RTOL, F32_ATOL,
          "logits of real tokens with right padding")


# ---- cross-entropy ---------------------------------------------------------------------------------

def test_cross_entropy_by_hand(xp):
    logits = numpy.zeros((1, 3, 4), dtype=numpy.float32)
    logits[0, 1] = numpy.log([1.0, 2.0, 3.0, 4.0])
    logits[0, 2] = 100.0  # the last position predicts nothing
    ids = numpy.array([[2, 3, 3]])
    # position 0: uniform over 4 -> ln 4; position 1: p(3) = 4 / 10 -> ln 2.5
    loss, n = cross_entropy(xp.asarray(logits), xp.asarray(ids), None)
    assert n == 2 and loss == pytest.approx((math.log(4) + math.log(2.5)) / 2, rel=1e-7)
    loss, n = cross_entropy(xp.asarray(logits), ids, numpy.array([[True, True, False]]))
    assert n == 1 and loss == pytest.approx(math.log(4), rel=1e-7)
    loss, n = cross_entropy(xp.asarray(logits), numpy.array([[2, 3, 1]]), None)  # target EOS: excluded
    assert n == 1 and loss == pytest.approx(math.log(4), rel=1e-7)
    loss, n = cross_entropy(xp.asarray(logits), numpy.array([[2, 0, 1]]), None, exclude_ids=())
    assert n == 2 and loss == pytest.approx((math.log(4) + math.log(10 / 2)) / 2, rel=1e-7)
    loss, n = cross_entropy(xp.asarray(logits), numpy.array([[2, 0, 0]]), None)
    assert n == 0 and math.isnan(loss)
    with pytest.raises(ValueError, match="mask: expected shape"):
        cross_entropy(xp.asarray(logits), ids, numpy.ones((1, 2), bool))


def test_model_loss_equals_cross_entropy_of_forward(model, xp, monkeypatch):
    import minisae.models.gemma2.model as gm

    monkeypatch.setattr(gm, "_LOSS_ROWS", 5)  # several chunks
    ids = make_ids(4)
    ids[1, 6] = 1  # an EOS target, excluded
    mask = numpy.ones((B, T), bool)
    mask[0, 7:] = False
    want = cross_entropy(model.forward(ids), ids, mask)
    got = model.loss(ids, mask)
    assert got[1] == want[1] == (T - 1) * B - 2 - 1 and got[0] == pytest.approx(want[0], rel=1e-6)
    splice = {"blocks.1.hook_mlp_out": lambda a: a * 0.5}
    assert model.loss(ids, mask, splice=splice)[0] == pytest.approx(
        cross_entropy(model.forward(ids, splice=splice), ids, mask)[0], rel=1e-6)


def test_attention_by_query_blocks_equals_the_full_masked_attention(model, xp, monkeypatch):
    # query blocks of 2 positions, each against only the keys it sees (causal; sliding window W=3
    # on the sliding layers): the same logits as the full (T, T) scores with the mask, up to the
    # order of float32 sums; and so do the captured activations at every layer
    import minisae.models.gemma2.model as gm

    ids = make_ids(6)
    full = to_numpy(model.forward(ids))
    acts = {s: to_numpy(a) for s, a in model.capture(ids, ["blocks.0.attn.hook_z", "blocks.2.hook_resid_post"]).items()}
    monkeypatch.setattr(gm, "_ATTN_QBLOCK", 2)  # T = 9 > 2 blocks: the blocked path runs
    calls = []
    real = model._attention_blocked
    monkeypatch.setattr(model, "_attention_blocked", lambda *a: calls.append(a[-1]) or real(*a))
    blocked = to_numpy(model.forward(ids))
    assert sorted(set(calls), key=str) == sorted({W, None}, key=str)  # sliding and global layers both ran
    numpy.testing.assert_allclose(blocked, full, rtol=F32_RTOL, atol=F32_ATOL)
    got = model.capture(ids, list(acts))
    for s in acts:
        numpy.testing.assert_allclose(to_numpy(got[s]), acts[s], rtol=F32_RTOL, atol=F32_ATOL)


def test_blocked_nll_equals_float64_nll_of_the_whole_logits(model, xp, monkeypatch):
    # _nll_sum makes the logits (rows x vocabulary block) at a time with an online log-sum-exp in
    # float32; nll_sum takes the whole (n, V) logits in float64: the same number within float32
    # rounding of the exp terms (1e-6 relative, well inside GEMMA_RTOL), soft-cap included
    import minisae.models.gemma2.model as gm

    assert model.config.final_logit_softcapping is not None  # the cap is exercised too
    h = xp.asarray(numpy.random.default_rng(3).standard_normal((37, model.config.hidden_size)) * 3,
                   dtype=numpy.float32)  # (n, D)
    targets = xp.asarray(numpy.random.default_rng(4).integers(0, model.config.vocab_size, 37))
    from minisae.models.gemma2.loss import nll_sum

    want = nll_sum(model._logits(h), targets, xp)
    for cols in (model.config.vocab_size, 7, 16):  # one block; blocks not dividing V; several
        monkeypatch.setattr(gm, "_LOSS_COLS", cols)
        assert model._nll_sum(h, targets) == pytest.approx(want, rel=1e-6)


def test_losses_of_several_splices_equal_one_loss_per_splice_bitwise(model, xp, monkeypatch):
    # the shared prefix (layers below the lowest spliced one, run once) changes no number
    import minisae.models.gemma2.model as gm

    monkeypatch.setattr(gm, "_LOSS_ROWS", 5)
    ids = make_ids(5)
    mask = numpy.ones((B, T), bool)
    mask[1, 6:] = False
    last = model.config.num_hidden_layers - 1
    splices = [None, {f"blocks.{last}.hook_resid_post": lambda a: a * 0.5},
               {f"blocks.{last}.hook_mlp_out": lambda a: a * 0.0},
               {f"blocks.{last}.hook_resid_post": lambda a: a + 1.0, "blocks.0.hook_mlp_in": lambda a: a}]
    runs = []
    real_run = model._run
    monkeypatch.setattr(model, "_run", lambda *a, **k: runs.append(k.get("stop")) or real_run(*a, **k))
    got = model.losses(ids, mask, splices)
    assert runs == [None] * 4  # the lowest splice is at layer 0 here: nothing to share
    want = [model.loss(ids, mask, splice=sp) for sp in splices]
    assert got == want
    runs.clear()
    got = model.losses(ids, mask, splices[:3])
    assert runs == [last] + [None] * 3  # layers 0..last-1 once, then the top layer per splice
    assert got == want[:3] and len({g[0] for g in got}) == 3  # and the splices do differ


# ---- an independent float64 reference --------------------------------------------------------------

def reference_logits(cfg, w, ids):
    """Gemma 2 in float64 written the long way: per-head loops, repeat_kv, rotate_half, masks by loops."""
    w = {k: v.astype(numpy.float64) for k, v in w.items()}
    D, H, K, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    Bn, Tn = ids.shape

    def norm(x, weight):
        return x / numpy.sqrt(numpy.mean(x ** 2, axis=-1, keepdims=True) + cfg.rms_norm_eps) * (1.0 + weight)

    def rope(x):  # x (T, d)
        inv = 1.0 / cfg.rope_theta ** (numpy.arange(0, d, 2) / d)
        ang = numpy.outer(numpy.arange(Tn), inv)
        cos, sin = numpy.cos(numpy.concatenate([ang, ang], 1)), numpy.sin(numpy.concatenate([ang, ang], 1))
        rot = numpy.concatenate([-x[:, d // 2:], x[:, :d // 2]], axis=1)
        return x * cos + rot * sin

    def gelu(x):
        return 0.5 * x * (1.0 + numpy.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))

    out = numpy.empty((Bn, Tn, cfg.vocab_size))
    for b in range(Bn):
        h = w["model.embed_tokens.weight"][ids[b]] * math.sqrt(D)
        for L in range(cfg.num_hidden_layers):
            p = f"model.layers.{L}."
            x = norm(h, w[p + "input_layernorm.weight"])
            q = x @ w[p + "self_attn.q_proj.weight"].T
            k = x @ w[p + "self_attn.k_proj.weight"].T
            v = x @ w[p + "self_attn.v_proj.weight"].T
            heads = []
            for hh in range(H):
                kv = hh // (H // K)  # repeat_kv: query head hh reads kv head hh // G
                qh, kh = rope(q[:, hh * d:(hh + 1) * d]), rope(k[:, kv * d:(kv + 1) * d])
                s = qh @ kh.T * cfg.query_pre_attn_scalar ** -0.5
                s = cfg.attn_logit_softcapping * numpy.tanh(s / cfg.attn_logit_softcapping)
                for i in range(Tn):
                    for j in range(Tn):
                        hidden = j > i or (cfg.is_sliding(L) and j <= i - cfg.sliding_window)
                        if hidden:
                            s[i, j] = -numpy.inf
                pr = numpy.exp(s - s.max(1, keepdims=True))
                pr /= pr.sum(1, keepdims=True)
                heads.append(pr @ v[:, kv * d:(kv + 1) * d])
            a = numpy.concatenate(heads, axis=1) @ w[p + "self_attn.o_proj.weight"].T
            h = h + norm(a, w[p + "post_attention_layernorm.weight"])
            x = norm(h, w[p + "pre_feedforward_layernorm.weight"])
            act = gelu(x @ w[p + "mlp.gate_proj.weight"].T) * (x @ w[p + "mlp.up_proj.weight"].T)
            mlp = act @ w[p + "mlp.down_proj.weight"].T
            h = h + norm(mlp, w[p + "post_feedforward_layernorm.weight"])
        z = norm(h, w["model.norm.weight"]) @ w["model.embed_tokens.weight"].T
        out[b] = cfg.final_logit_softcapping * numpy.tanh(z / cfg.final_logit_softcapping)
    return out


def test_against_float64_reference(cfg, weights, xp):
    ids = make_ids(5)
    want = reference_logits(cfg, weights, ids)
    assert (numpy.abs(want) > 0.5 * cfg.final_logit_softcapping).mean() > 0.1  # the final cap acts
    m64 = Gemma2Model(cfg, weights, xp=xp, dtype="float64")
    got64 = to_numpy(m64.forward(ids))
    assert got64.dtype == numpy.float64
    assert_close(got64, want, REF64_RTOL, REF64_ATOL, "float64 model vs float64 reference")
    assert_close(Gemma2Model(cfg, weights, xp=xp).forward(ids), want, F32_RTOL, F32_ATOL, "float32 model vs reference")
    # the attention soft-cap acts too: without it the logits move
    uncapped = Gemma2Config.from_dict(config_dict(attn_logit_softcapping=None))
    assert numpy.abs(to_numpy(Gemma2Model(uncapped, weights, xp=xp).forward(ids)) - got64).max() > 0.1


def test_attention_chunked_over_batch_rows_is_the_same(model, monkeypatch):
    import minisae.models.gemma2.model as gm

    ids = make_ids(6, b=3)
    whole = to_numpy(model.capture(ids, "blocks.2.attn.hook_z"))
    monkeypatch.setattr(gm, "_ATTN_BYTES", 1)  # one batch row per chunk
    numpy.testing.assert_array_equal(to_numpy(model.capture(ids, "blocks.2.attn.hook_z")), whole)


def test_linear_layouts_agree(cfg, weights, monkeypatch):
    """linear() computes x @ W.T as (W @ x.T).T for few tokens: the same product, C-ordered,
    and a forward through either layout gives the same logits to float32 rounding."""
    from minisae.models.gemma2 import layers

    rng = numpy.random.default_rng(0)
    W = rng.standard_normal((7, 5)).astype("float32")
    for n in (1, 3, layers.LINEAR_SWAP_MAX_TOKENS + 1):
        x = rng.standard_normal((n, 5)).astype("float32")
        y = layers.linear(x, W)
        assert y.flags.c_contiguous and y.shape == (n, 7) and y.dtype == numpy.float32
        assert_close(y, x @ W.T, F32_RTOL, F32_ATOL, f"linear n={n}")
    ids = make_ids()
    swapped = Gemma2Model(cfg, weights).forward(ids)
    monkeypatch.setattr(layers, "LINEAR_SWAP_MAX_TOKENS", 0)
    assert_close(Gemma2Model(cfg, weights).forward(ids), swapped, F32_RTOL, F32_ATOL, "logits")


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_fused_gelu_times_up_is_bitwise_the_plain_passes(order, n_threads, monkeypatch):
    """gelu_tanh_times_ (blocks of the flat array, split over threads) gives exactly
    gelu_tanh_(g) * u, for C- and Fortran-ordered operands (linear() returns either)."""
    from minisae import threads
    from minisae.models.gemma2 import layers, layers_fast

    monkeypatch.setattr(layers_fast, "PASS_BLOCK", 7)  # many blocks, a ragged last one
    monkeypatch.setattr(threads, "threads", lambda: n_threads)
    rng = numpy.random.default_rng(0)
    g = numpy.asarray(rng.standard_normal((37, 11), dtype=numpy.float32) * 4, order=order)
    u = numpy.asarray(rng.standard_normal((37, 11), dtype=numpy.float32), order=order)
    want = layers.gelu_tanh_(g.copy(order="K"), numpy) * u
    got = layers_fast.gelu_tanh_times_(g, u, numpy)
    assert got is g
    numpy.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("cap", [None, 50.0])
@pytest.mark.parametrize("n_threads", [1, 3])
def test_blocked_attention_softmax_is_bitwise_the_whole_array(cap, n_threads, monkeypatch):
    """attention_scores_to_probs in blocks of query rows (never crossing a head), split over
    threads, gives exactly the passes over the whole (b, K, G, T, T) array."""
    from minisae import threads
    from minisae.models.gemma2 import layers, layers_fast

    monkeypatch.setattr(layers_fast, "PASS_BLOCK", 5 * 6)  # 5 rows of T = 6 per block
    monkeypatch.setattr(threads, "threads", lambda: n_threads)
    rng = numpy.random.default_rng(1)
    s = rng.standard_normal((2, 2, 3, 6, 6), dtype=numpy.float32) * 30  # (b, K, G, T, T)
    mask = numpy.where(numpy.tril(numpy.ones((6, 6), dtype=bool)), 0.0,
                       numpy.finfo(numpy.float32).min).astype(numpy.float32)  # (T, T)
    want = layers.scores_to_probs(s.copy(), mask, 0.0625, cap, numpy)
    numpy.testing.assert_array_equal(layers_fast.attention_scores_to_probs(s, mask, 0.0625, cap, numpy), want)


@pytest.mark.parametrize("n_threads", [1, 3])
def test_blocked_rms_norm_and_rope_are_bitwise_the_whole_array(n_threads, monkeypatch):
    """rms_norm and apply_rope in blocks of rows (RoPE's never crossing a batch row), split over
    threads, give exactly the passes over the whole array; rms_norm's mean is numpy.mean's."""
    from minisae import threads
    from minisae.models.gemma2 import layers, layers_fast

    monkeypatch.setattr(layers_fast, "PASS_BLOCK", 3 * 2 * 8)  # 3 positions of 2 heads x d = 8 per block
    monkeypatch.setattr(threads, "threads", lambda: n_threads)
    rng = numpy.random.default_rng(2)
    x = rng.standard_normal((2, 7, 2, 8), dtype=numpy.float32) * 5  # (B, T, n, d): T = 7 is not a multiple of 3
    w1 = 1 + rng.standard_normal(8, dtype=numpy.float32)  # (d,)
    want = (x * (1.0 / numpy.sqrt(numpy.mean(x * x, axis=-1, keepdims=True) + 1e-6))) * w1
    numpy.testing.assert_array_equal(layers_fast.rms_norm(x, w1, 1e-6), want)
    cos, sin = layers.rope_tables(7, 8, 10_000.0, numpy, numpy.float32)  # (T, 1, d) each
    numpy.testing.assert_array_equal(layers_fast.apply_rope(x, cos, sin), layers.apply_rope(x, cos, sin, numpy))
    cos64, sin64 = cos.astype(numpy.float64), sin.astype(numpy.float64)  # tables of another dtype: the plain piece
    got = layers_fast.apply_rope(x, cos64, sin64)
    assert got.dtype == numpy.float64
    numpy.testing.assert_array_equal(got, layers.apply_rope(x, cos64, sin64, numpy))
    h = rng.standard_normal((13, 11), dtype=numpy.float32)  # (N, D): D = 11 does not divide a block
    w = 1 + rng.standard_normal(11, dtype=numpy.float32)
    want = (h * (1.0 / numpy.sqrt(numpy.mean(h * h, axis=-1, keepdims=True) + 1e-6))) * w
    numpy.testing.assert_array_equal(layers_fast.rms_norm(h, w, 1e-6), want)
