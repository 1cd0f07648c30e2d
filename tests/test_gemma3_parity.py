"""minisae.models.gemma3 against transformers' eager float32 Gemma 3 on tiny random checkpoints,
and the planted bugs that these goldens catch.

tests/data/gemma3/ is written by reference/make_tiny_gemma3.py: a text-only float32 model (transformers
5 config.json), a BF16 sharded one with the Hub's older config.json layout, and a real multimodal
Gemma3ForConditionalGeneration in the 4B layout (text_config, linear RoPE scaling on global layers,
tensors under language_model.model., a vision tower to skip). All have random norm weights (q_norm and
k_norm included), window 4 < T 12, one kv head, a global layer between sliding ones. No torch here.
"""

import dataclasses
import functools
import json
import pathlib

import numpy
import pytest
from helpers import assert_close
from tolerances import GEMMA_ATOL, GEMMA_RTOL

from minisae.models import load_model
from minisae.models.gemma2.layers_fast import apply_rope, rms_norm
from minisae.models.gemma3 import Gemma3Model
from minisae.models.gemma3.config import Gemma3Config
from minisae.models.gemma3.weights import load_weights
from minisae.sites import hf_name
from minisae.xp import to_numpy

DATA = pathlib.Path(__file__).parent / "data" / "gemma3"
VARIANTS = ["tiny_f32", "tiny_bf16_shards", "tiny_4b_mm"]


@functools.lru_cache(maxsize=None)
def golden(name):
    with numpy.load(DATA / f"{name}.npz", allow_pickle=False) as z:
        g = {k: z[k] for k in z.files}
    g["meta"] = json.loads(str(g["meta"]))
    return g


@functools.lru_cache(maxsize=None)
def model(name, xp_name):
    return load_model(DATA / name, xp=xp_name)


def sites_of(g):
    return sorted(k for k in g if k.startswith("blocks."))


@pytest.fixture(params=VARIANTS)
def name(request):
    return request.param


def test_goldens_exercise_gemma3(name):
    """Guard the goldens: both RoPE bases, the window (and, 4B-style, the scaling) change the logits."""
    g = golden(name)
    sens = g["meta"]["sensitivity"]
    assert sens["sliding_window"] > 1.0 and sens["rope_bases_swapped"] > 0.1, sens
    if name == "tiny_4b_mm":
        assert g["meta"]["multimodal"] and sens["no_linear_scaling"] > 1.0, sens
    assert len(sites_of(g)) == 4 * 7 and (g["ids"][:, 0] == 2).all()


def test_loads_as_gemma3(name):
    m = model(name, "numpy")
    assert isinstance(m, Gemma3Model)
    c = m.config
    assert c.layer_types == ("sliding_attention",) * 5 + ("full_attention", "sliding_attention")
    assert c.attn_logit_softcapping is None and c.final_logit_softcapping is None
    assert c.multimodal == (name == "tiny_4b_mm")
    want = {"tiny_f32": (1e4, 1e6, 1.0), "tiny_bf16_shards": (500.0, 2e4, 1.0), "tiny_4b_mm": (1e4, 1e6, 8.0)}[name]
    assert (c.rope_local_theta, c.rope_theta, c.rope_global_factor) == want


def test_logits_and_every_site(name, xp):
    g = golden(name)
    m = model(name, xp.__name__)
    ids = xp.asarray(g["ids"])
    assert_close(m.forward(ids), g["logits"], GEMMA_RTOL, GEMMA_ATOL, f"{name} logits", dtype=numpy.float32)
    sites = sites_of(g)
    acts = m.capture(ids, sites)
    for site in sites:
        assert_close(acts[site], g[site], GEMMA_RTOL, GEMMA_ATOL, f"{name} {site}", dtype=numpy.float32)


def test_hugging_face_site_names(name):
    """Gemma Scope 2's hook names read the same activations as the SAELens names."""
    g = golden(name)
    m = model(name, "numpy")
    hf = [hf_name(s) for s in sites_of(g)]
    acts = m.capture(g["ids"], hf)
    for site, h in zip(sites_of(g), hf):
        assert_close(acts[h], g[site], GEMMA_RTOL, GEMMA_ATOL, f"{name} {h}", dtype=numpy.float32)
        assert m.site_width(h) == g[site].shape[-1]


def test_splice(name, xp):
    g = golden(name)
    m = model(name, xp.__name__)
    ids = xp.asarray(g["ids"])
    for key in (k for k in g if k.startswith("splice.")):
        site = key.removeprefix("splice.")
        assert_close(m.forward(ids, splice={site: lambda a: a * 0.5 + 0.25}), g[key],
                     GEMMA_RTOL, GEMMA_ATOL, f"{name} {key}", dtype=numpy.float32)
        assert_close(m.forward(ids, splice={hf_name(site): lambda a: a * 0.5 + 0.25}), g[key],
                     GEMMA_RTOL, GEMMA_ATOL, f"{name} {key} (HF)", dtype=numpy.float32)


def test_prefix_is_causal(name):
    g = golden(name)
    m = model(name, "numpy")
    assert_close(m.forward(g["ids"][:, :5]), g["logits"][:, :5],
                 GEMMA_RTOL, GEMMA_ATOL, f"{name} logits of ids[:, :5]", dtype=numpy.float32)


# ---- planted bugs: each one must break parity with transformers --------------------------------

def parity_breaks(m, name):
    g = golden(name)
    try:
        assert_close(m.forward(g["ids"]), g["logits"], GEMMA_RTOL, GEMMA_ATOL, "planted", dtype=numpy.float32)
    except AssertionError:
        return True
    return False


def rebuilt(name, **config_changes):
    """The checkpoint loaded into a Gemma3Model whose config has `config_changes` applied."""
    config = dataclasses.replace(Gemma3Config.from_file(DATA / name), **config_changes)
    return Gemma3Model(config, load_weights(DATA / name, config))


@pytest.mark.parametrize("variant", VARIANTS)
def test_planted_rope_bases_swapped(variant, monkeypatch):
    m = rebuilt(variant)
    assert not parity_breaks(m, variant)
    c = m.config
    swapped = lambda layer: (c.rope_theta, 1.0) if c.is_sliding(layer) else (c.rope_local_theta, c.rope_global_factor)
    monkeypatch.setattr(m, "_rope_params", swapped)
    assert parity_breaks(m, variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_planted_qk_norm_after_rope(variant, monkeypatch):
    m = rebuilt(variant)
    eps = m.config.rms_norm_eps

    def rope_then_norm(q, k, lw, cos, sin):
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return rms_norm(q, lw["q_norm"], eps), rms_norm(k, lw["k_norm"], eps)

    monkeypatch.setattr(m, "_position_qk", rope_then_norm)
    assert parity_breaks(m, variant)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("cap", ["attn_logit_softcapping", "final_logit_softcapping"])
def test_planted_gemma2_softcap_left_on(variant, cap):
    """Gemma 2's soft-caps (attention 50, final 30) carried over into Gemma 3."""
    value = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}[cap]
    assert parity_breaks(rebuilt(variant, **{cap: value}), variant)


def test_planted_linear_scaling_dropped():
    assert parity_breaks(rebuilt("tiny_4b_mm", rope_global_factor=1.0), "tiny_4b_mm")


def test_planted_qk_norm_without_one_plus(monkeypatch):
    m = rebuilt("tiny_f32")
    for lw in m.layers:
        lw["q_norm"] = lw["q_norm"] - 1.0  # w instead of (1 + w)
        lw["k_norm"] = lw["k_norm"] - 1.0
    assert parity_breaks(m, "tiny_f32")


def test_multimodal_vision_tensors_are_skipped_unread():
    from minisae.io.safetensors_io import SafetensorsFile

    names = list(SafetensorsFile(DATA / "tiny_4b_mm" / "model.safetensors").tensors)
    assert any(n.startswith("vision_tower.") for n in names)
    assert all(n.startswith(("language_model.model.", "vision_tower.", "multi_modal_projector.")) for n in names)
    m = model("tiny_4b_mm", "numpy")
    assert to_numpy(m.embed).shape == (100, 16)
