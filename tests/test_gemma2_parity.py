"""minisae.models.gemma2 against transformers' eager float32 Gemma2ForCausalLM on tiny random checkpoints.

The checkpoints and goldens in tests/data/gemma2/ are written by reference/make_tiny_gemma2.py
(which says how each variant is made hard: both soft-caps acting, sliding window shorter than the
sequence, GQA, query_pre_attn_scalar != head_dim, random norm weights, BF16 shards, F16, an
older-style config.json, a non-alternating layer_types list). This file needs neither torch nor
transformers: it reads the committed .npz goldens.
"""

import functools
import json
import pathlib

import numpy
import pytest

from minisae.models.gemma2 import load, parse_site
from helpers import assert_close
from tolerances import GEMMA_ATOL, GEMMA_RTOL

DATA = pathlib.Path(__file__).parent / "data" / "gemma2"
VARIANTS = ["tiny_f32", "tiny_bf16_shards", "tiny_oldconfig", "tiny_f16_types"]
KINDS = ("hook_resid_post", "attn.hook_z", "hook_mlp_out")


@functools.lru_cache(maxsize=None)
def golden(name):
    with numpy.load(DATA / f"{name}.npz", allow_pickle=False) as z:
        g = {k: z[k] for k in z.files}
    g["meta"] = json.loads(str(g["meta"]))
    return g


@functools.lru_cache(maxsize=None)
def model(name, xp_name):
    import minisae.xp

    return load(DATA / name, xp=minisae.xp.get_xp(xp_name))


def sites_of(g):
    return sorted(k for k in g if k.startswith("blocks."))


@pytest.fixture(params=VARIANTS)
def name(request):
    return request.param


def test_goldens_exercise_the_quirks(name):
    """Guard the goldens themselves: both soft-caps act, and every layer has the three sites."""
    g = golden(name)
    s = g["meta"]["softcap_stats"]
    assert s["attn_frac_above_half_cap"] > 0.15 and s["final_frac_above_half_cap"] > 0.15, s
    assert (g["ids"][:, 0] == 2).all(), "every golden row starts with BOS"
    layers = {parse_site(k)[0] for k in sites_of(g)}
    assert len(sites_of(g)) == 3 * len(layers) and layers == set(range(len(layers)))


def test_logits(name, xp):
    g = golden(name)
    m = model(name, xp.__name__)
    logits = m.forward(xp.asarray(g["ids"]))
    assert_close(logits, g["logits"], GEMMA_RTOL, GEMMA_ATOL, f"{name} logits", dtype=numpy.float32)


def test_every_site_in_one_capture(name, xp):
    g = golden(name)
    m = model(name, xp.__name__)
    sites = sites_of(g)
    acts = m.capture(xp.asarray(g["ids"]), sites)
    assert isinstance(acts, dict) and sorted(acts) == sites, f"expected keys {sites}, found {sorted(acts)}"
    for site in sites:
        assert_close(acts[site], g[site], GEMMA_RTOL, GEMMA_ATOL, f"{name} {site}", dtype=numpy.float32)


def test_single_site_capture_and_width(name, xp):
    g = golden(name)
    m = model(name, xp.__name__)
    n_layers = len({parse_site(k)[0] for k in sites_of(g)})
    for site in (f"blocks.0.{KINDS[0]}", f"blocks.{n_layers // 2}.{KINDS[1]}", f"blocks.{n_layers - 1}.{KINDS[2]}",
                 f"blocks.{n_layers - 1}.{KINDS[0]}"):
        assert m.site_width(site) == g[site].shape[-1], site
        assert_close(m.capture(xp.asarray(g["ids"]), site), g[site],
                     GEMMA_RTOL, GEMMA_ATOL, f"{name} capture({site!r})", dtype=numpy.float32)


def test_prefix_and_single_row(name, xp):
    """Causality: logits of a prefix, or of one row alone, are the golden's slice."""
    g = golden(name)
    m = model(name, xp.__name__)
    ids = g["ids"]
    assert_close(m.forward(xp.asarray(ids[:, :7])), g["logits"][:, :7],
                 GEMMA_RTOL, GEMMA_ATOL, f"{name} logits of ids[:, :7]", dtype=numpy.float32)
    assert_close(m.forward(xp.asarray(ids[1:, :])), g["logits"][1:],
                 GEMMA_RTOL, GEMMA_ATOL, f"{name} logits of ids[1:]", dtype=numpy.float32)
    site = "blocks.1.attn.hook_z"
    assert_close(m.capture(xp.asarray(ids[:1, :5]), site), g[site][:1, :5],
                 GEMMA_RTOL, GEMMA_ATOL, f"{name} {site} of ids[:1, :5]", dtype=numpy.float32)


def test_splice(name, xp):
    g = golden(name)
    m = model(name, xp.__name__)
    ids = xp.asarray(g["ids"])
    scale, shift = 0.5, 0.25
    assert g["meta"]["splice_fn"] == f"a * {scale} + {shift}"
    spliced = [k for k in g if k.startswith("splice.")]
    assert spliced
    for key in spliced:
        site = key.removeprefix("splice.")
        got = m.forward(ids, splice={site: lambda a: a * scale + shift})
        assert_close(got, g[key],
                     GEMMA_RTOL, GEMMA_ATOL, f"{name} forward with {site} spliced to a*{scale}+{shift}",
                     dtype=numpy.float32)
    identity = m.forward(ids, splice={s: (lambda a: a) for s in sites_of(g)})
    assert_close(identity, g["logits"],
                 GEMMA_RTOL, GEMMA_ATOL, f"{name} forward with identity splices at every site", dtype=numpy.float32)
