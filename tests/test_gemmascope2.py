"""Gemma Scope 2 files (minisae.io.gemmascope2) and transcoders in minisae.SAE.

tests/golden/gemma_scope_2/ is written by reference/check_gemma_scope_2.py: folders in the released
layout (written without minisae), the outputs SAELens computes on them through its own Gemma Scope 2
loader, minisae's re-written Gemma Scope 2 folders and SAELens's outputs on those, and minisae's
SAELens-format folders loaded by SAELens's load_from_disk. No torch here.
"""

import json
import shutil
from pathlib import Path

import numpy
import pytest
from helpers import assert_close
from test_hub import offline_hub, populate_cache  # noqa: F401 (offline_hub is a fixture)

from minisae.errors import FileFormatError, InputError, OutputExistsError
from minisae.io.gemmascope2 import GemmaScope2Error
from minisae.io.safetensors_io import save_file
from minisae.io.saefile import SAE, SAEFileError

GOLDEN = Path(__file__).parent / "golden" / "gemma_scope_2"
CASES = {
    "resid_post/layer_3_width_48_l0_small": ("jumprelu", "blocks.3.hook_resid_post", None),
    "attn_out/layer_3_width_48_l0_small": ("jumprelu", "blocks.3.attn.hook_z", None),
    "transcoder_all/layer_3_width_48_l0_small": ("jumprelu_transcoder", "blocks.3.hook_mlp_in", "blocks.3.hook_mlp_out"),
    "transcoder_all/layer_3_width_48_l0_small_affine": ("jumprelu_skip_transcoder", "blocks.3.hook_mlp_in",
                                                        "blocks.3.hook_mlp_out"),
}


def outputs(folder):
    with numpy.load(folder / "saelens_outputs.npz", allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(params=sorted(CASES))
def case(request):
    return request.param


def test_released_layout_matches_saelens(case):
    arch, hook, hook_out = CASES[case]
    sae = SAE.load(GOLDEN / "released" / case)
    want = outputs(GOLDEN / "released" / case)
    assert sae.architecture == arch and sae.is_transcoder == (hook_out is not None)
    meta = sae.cfg["metadata"]
    assert (meta["hook_name"], meta.get("hook_name_out"), meta["model_name"]) == (hook, hook_out, "google/gemma-3-270m")
    assert sae.cfg["apply_b_dec_to_input"] is False
    lens_cfg = json.loads(str(want["cfg"]))
    assert lens_cfg["architecture"] == arch and lens_cfg["hook_name"] == hook
    assert_close(sae.encode(want["x"]), want["f"])
    assert_close(sae(want["x"]), want["y"])


def test_minisae_written_files_load_in_saelens_alike(case):
    """SAELens's outputs on minisae's Gemma Scope 2 output equal its outputs on the released files."""
    released, written = GOLDEN / "released" / case, GOLDEN / "minisae_written" / case
    numpy.testing.assert_array_equal(outputs(written)["y"], outputs(released)["y"])
    assert json.loads((written / "config.json").read_text()) == json.loads((released / "config.json").read_text())
    a, b = SAE.load(released), SAE.load(written)
    for name in a.params:
        numpy.testing.assert_array_equal(a.params[name], b.params[name])


def test_saelens_format_transcoders_round_trip(case, tmp_path):
    folder = GOLDEN / "minisae_saelens" / case.replace("/", "__")
    want = outputs(folder)
    sae = SAE.load(folder)
    assert sae.architecture == CASES[case][0]
    assert_close(sae(want["x"]), want["y"])
    again = SAE.load(sae.save_gemma_scope_2(tmp_path / "gs2"))  # SAELens folder -> Gemma Scope 2 -> minisae
    assert_close(again(want["x"]), want["y"])
    assert again.cfg["metadata"]["hook_name"] == sae.cfg["metadata"]["hook_name"]


def test_skip_term():
    sae = SAE.load(GOLDEN / "released" / "transcoder_all/layer_3_width_48_l0_small_affine")
    x = outputs(GOLDEN / "released" / "transcoder_all/layer_3_width_48_l0_small_affine")["x"]
    assert_close(sae(x), sae.decode(sae.encode(x)) + x @ sae.params["W_skip"].T)
    with pytest.raises(ValueError, match="has no skip connection"):
        SAE.load(GOLDEN / "released" / "transcoder_all/layer_3_width_48_l0_small").skip(x)


def test_jumprelu_with_b_dec_subtracted_is_folded(tmp_path):
    rng = numpy.random.default_rng(0)
    p = {"W_enc": rng.standard_normal((8, 20)), "W_dec": rng.standard_normal((20, 8)), "b_enc": rng.standard_normal(20),
         "b_dec": rng.standard_normal(8), "threshold": rng.uniform(0.1, 1, 20)}
    sae = SAE("jumprelu", {k: v.astype(numpy.float32) for k, v in p.items()},
              {"metadata": {"hook_name": "blocks.2.hook_resid_post"}})
    assert sae.cfg["apply_b_dec_to_input"]
    out = SAE.load(sae.save_gemma_scope_2(tmp_path / "gs2"))
    assert out.cfg["apply_b_dec_to_input"] is False
    assert json.loads((tmp_path / "gs2" / "config.json").read_text())["hf_hook_point_in"] == "model.layers.2.output"
    x = rng.standard_normal((30, 8)).astype(numpy.float32)
    assert_close(out(x), sae(x))


def test_what_cannot_be_converted_says_so(tmp_path):
    transcoder = SAE.load(GOLDEN / "released" / "transcoder_all/layer_3_width_48_l0_small")
    with pytest.raises(ValueError, match=r"Gemma Scope format \(params.npz\) holds JumpReLU SAEs only.*jumprelu_transcoder"):
        transcoder.save_gemma_scope(tmp_path / "p.npz")
    rng = numpy.random.default_rng(1)
    topk = SAE("topk", {"W_enc": rng.standard_normal((4, 6)), "W_dec": rng.standard_normal((6, 4)),
                        "b_enc": rng.standard_normal(6), "b_dec": rng.standard_normal(4)}, {"k": 2})
    with pytest.raises(InputError, match="Gemma Scope 2 files hold JumpReLU SAEs and transcoders only; this is a 'topk'"):
        topk.save_gemma_scope_2(tmp_path / "t")
    out = transcoder.save_gemma_scope_2(tmp_path / "x")
    with pytest.raises(OutputExistsError, match="not empty"):
        transcoder.save_gemma_scope_2(out)
    transcoder.save_gemma_scope_2(out, overwrite=True)


def copy_released(tmp_path, case="transcoder_all/layer_3_width_48_l0_small_affine"):
    dst = tmp_path / "sae"
    shutil.copytree(GOLDEN / "released" / case, dst)
    (dst / "saelens_outputs.npz").unlink()
    return dst


def rewrite(folder, cfg=None, tensors=None):
    if cfg is not None:
        (folder / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        save_file(tensors, folder / "params.safetensors")


def released_tensors(folder):
    from minisae.io.safetensors_io import SafetensorsFile

    with SafetensorsFile(folder / "params.safetensors") as f:
        return {n: numpy.array(f.get(n)) for n in f.keys()}


@pytest.mark.parametrize("change, needle", [
    (dict(architecture="topk"), "architecture: expected 'jump_relu', found 'topk'"),
    (dict(type="clt"), "type: expected one of .*cross-layer transcoders are not supported"),
    (dict(affine_connection="yes"), "affine_connection: expected true or false"),
    (dict(affine_connection=False), r"unexpected \['affine_skip_connection'\]"),
    (dict(hf_hook_point_in=3), "hf_hook_point_in: expected a string"),
    (dict(width=47), "width is 47 but w_enc has 48 latents"),
    (dict(l0=-1), "l0: expected a non-negative number"),
])
def test_config_errors(tmp_path, change, needle):
    folder = copy_released(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    rewrite(folder, cfg={**cfg, **change})
    with pytest.raises(GemmaScope2Error, match=needle):
        SAE.load(folder)


def test_tensor_errors(tmp_path):
    folder = copy_released(tmp_path)
    t = released_tensors(folder)
    for change, needle in (({"w_dec": t["w_dec"][:40]}, r"tensor w_dec: expected shape \(48, 16\)"),
                           ({"threshold": numpy.full(48, numpy.nan, numpy.float32)}, "threshold holds NaN"),
                           ({"b_enc": numpy.zeros(48, numpy.int32)}, "b_enc: expected a float dtype"),
                           ({"affine_skip_connection": None}, r"missing \['affine_skip_connection'\]")):
        tensors = {k: v for k, v in {**t, **change}.items() if v is not None}
        rewrite(folder, tensors=tensors)
        with pytest.raises(GemmaScope2Error, match=needle):
            SAE.load(folder)
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(GemmaScope2Error, match="expected a JSON object"):
        SAE.load(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileFormatError, match="config.json: missing"):
        SAE.load(folder)


def test_sae_must_write_what_it_reads(tmp_path):
    folder = copy_released(tmp_path, "resid_post/layer_3_width_48_l0_small")
    cfg = json.loads((folder / "config.json").read_text())
    rewrite(folder, cfg={**cfg, "hf_hook_point_out": "model.layers.4.output"})
    with pytest.raises(GemmaScope2Error, match="must write the site it reads"):
        SAE.load(folder)


def test_transcoder_cfg_checks():
    rng = numpy.random.default_rng(2)
    p = {"W_enc": rng.standard_normal((4, 6)), "W_dec": rng.standard_normal((6, 3)), "b_enc": rng.standard_normal(6),
         "b_dec": rng.standard_normal(3), "threshold": rng.uniform(0, 1, 6)}
    sae = SAE("jumprelu_transcoder", p)
    assert (sae.d_in, sae.d_out, sae.cfg["d_out"]) == (4, 3, 3)
    with pytest.raises(SAEFileError, match="apply_b_dec_to_input must be false for a transcoder"):
        SAE("jumprelu_transcoder", p, {"apply_b_dec_to_input": True})
    with pytest.raises(SAEFileError, match=r"tensor W_dec should have shape \(6, 4\)"):
        SAE("jumprelu", p)
    with pytest.raises(SAEFileError, match=r"tensor W_skip: expected shape \(3, 4\)"):
        SAE("jumprelu_skip_transcoder", {**p, "W_skip": rng.standard_normal((4, 3))})


def test_hub_reference_from_offline_cache(offline_hub):
    case = "transcoder_all/layer_3_width_48_l0_small_affine"
    files = {f"{case}/{n}": (GOLDEN / "released" / case / n).read_bytes() for n in ("params.safetensors", "config.json")}
    populate_cache(offline_hub, "google/gemma-scope-2-270m-pt", files)
    want = outputs(GOLDEN / "released" / case)
    for ref in (f"google/gemma-scope-2-270m-pt/{case}", f"google/gemma-scope-2-270m-pt/{case}/params.safetensors"):
        sae = SAE.load(ref)
        assert sae.architecture == "jumprelu_skip_transcoder"
        assert_close(sae(want["x"]), want["y"])
