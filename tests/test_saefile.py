"""minisae.io.saefile: inference per architecture, from_training folding, SAELens folder and Gemma
Scope npz round trips, Hub references loaded through the real huggingface_hub from an offline
cache, clear errors, and goldens written by SAELens itself
(reference/check_saelens.py -> tests/golden/saelens/)."""

import importlib
import json
from pathlib import Path

import numpy
import pytest
from helpers import assert_close
from test_hub import SHA as HUB_SHA
from test_hub import offline_hub, populate_cache  # noqa: F401 (offline_hub is a fixture)
from tolerances import F32_ATOL, F32_RTOL, GOLDEN64_ATOL, GOLDEN64_RTOL

from minisae.io import saefile
from minisae.io.hub import HubError
from minisae.io.safetensors_io import SafetensorsError
from minisae.io.saefile import SAE, SAEFileError
from minisae.xp import asarray, to_numpy

D, M, K = 12, 40, 5
ARCHS = ("jumprelu", "gated", "topk")
GOLDEN = Path(__file__).parent / "golden" / "saelens"


def release_params(arch, seed=0, dtype=numpy.float32):
    rng = numpy.random.default_rng([seed, ARCHS.index(arch)])
    W_dec = rng.standard_normal((M, D))  # (M, D)
    W_dec /= numpy.linalg.norm(W_dec, axis=1, keepdims=True)
    p = {"W_enc": W_dec.T + 0.3 * rng.standard_normal((D, M)), "W_dec": W_dec, "b_dec": 0.3 * rng.standard_normal(D)}
    if arch == "jumprelu":
        p.update(b_enc=0.2 * rng.standard_normal(M), threshold=rng.uniform(0.05, 1.0, M))
    elif arch == "topk":
        p.update(b_enc=0.2 * rng.standard_normal(M))
    else:
        p.update(b_gate=0.3 * rng.standard_normal(M), r_mag=0.3 * rng.standard_normal(M),
                 b_mag=0.3 * rng.standard_normal(M))
    return {k: v.astype(dtype) for k, v in p.items()}


def make_sae(arch, xp=numpy, seed=0, dtype=numpy.float32, **cfg):
    if arch == "topk":
        cfg.setdefault("k", K)
    params = {k: asarray(v, xp) for k, v in release_params(arch, seed, dtype).items()}
    return SAE(arch, params, cfg)


def inputs(n=64, seed=1, dtype=numpy.float32):
    return (1.5 * numpy.random.default_rng(seed).standard_normal((n, D)) + 0.2).astype(dtype)  # (n, D)


def reference_encode(arch, p, x, cfg):
    """The Gemma Scope / SAELens inference written out plainly in float64 (brute-force TopK)."""
    p = {k: to_numpy(v).astype(numpy.float64) for k, v in p.items()}
    x_c = x.astype(numpy.float64) - (p["b_dec"] if cfg["apply_b_dec_to_input"] else 0.0)
    if arch == "jumprelu":
        pre = x_c @ p["W_enc"] + p["b_enc"]
        return numpy.where(pre > p["threshold"], pre, 0.0)  # thresholds here are > 0
    if arch == "gated":
        gate = x_c @ p["W_enc"] + p["b_gate"] > 0
        return gate * numpy.maximum(x_c @ (p["W_enc"] * numpy.exp(p["r_mag"])) + p["b_mag"], 0.0)
    pre = x_c @ p["W_enc"] + p["b_enc"]
    if cfg.get("rescale_acts_by_decoder_norm"):
        pre = pre * numpy.linalg.norm(p["W_dec"], axis=1)
    f = numpy.zeros_like(pre)
    for b in range(pre.shape[0]):
        top = numpy.argsort(-pre[b])[: cfg["k"]]
        f[b, top] = numpy.maximum(pre[b, top], 0.0)
    return f


# ------------------------------------------------------------------------------------------
# inference


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_decode_match_plain_reference(xp, arch):
    sae = make_sae(arch, xp)
    x = inputs()
    f = sae.encode(asarray(x, xp))
    ref = reference_encode(arch, sae.params, x, sae.cfg)
    assert f.dtype == numpy.float32 and f.shape == (64, M)
    assert numpy.array_equal(to_numpy(f) != 0, ref != 0)
    assert 0 < numpy.count_nonzero(ref) < ref.size  # some latents fire, some do not
    assert_close(f, ref)
    W_dec, b_dec = (to_numpy(sae.params[n]).astype(numpy.float64) for n in ("W_dec", "b_dec"))
    assert_close(sae.decode(f), ref @ W_dec + b_dec)
    assert_close(sae(asarray(x, xp)), ref @ W_dec + b_dec)


def test_topk_keeps_k_and_relu(xp):
    sae = make_sae("topk", xp)
    sae.params["b_enc"] = sae.params["b_enc"] - 3.0  # push many pre-activations below 0
    f = to_numpy(sae.encode(asarray(inputs(), xp)))
    nnz = numpy.count_nonzero(f, axis=1)
    assert nnz.max() == K and nnz.min() < K  # at most k; ReLU removes kept negatives
    assert (f >= 0).all()
    assert numpy.array_equal(f != 0, reference_encode("topk", sae.params, inputs(), sae.cfg) != 0)


def test_topk_rescale_by_decoder_norm(xp):
    sae = make_sae("topk", xp, rescale_acts_by_decoder_norm=True)
    scale = numpy.random.default_rng(5).uniform(0.5, 2.0, (M, 1)).astype(numpy.float32)
    sae.params["W_dec"] = sae.params["W_dec"] * asarray(scale, xp)  # rows of unequal norm
    x = inputs()
    f = sae.encode(asarray(x, xp))
    ref = reference_encode("topk", sae.params, x, sae.cfg)
    assert_close(f, ref)
    W_dec = to_numpy(sae.params["W_dec"]).astype(numpy.float64)
    assert_close(sae.decode(f), (ref / numpy.linalg.norm(W_dec, axis=1)) @ W_dec + to_numpy(sae.params["b_dec"]))


def test_gated_equals_jumprelu_on_magnitude_path():
    """Gated (arXiv 2404.16014): f = JumpReLU_theta(pi_mag) with theta = b_mag - exp(r_mag) * b_gate (theta >= 0)."""
    p = release_params("gated", dtype=numpy.float64)
    p["b_gate"], p["b_mag"] = -numpy.abs(p["b_gate"]), numpy.abs(p["b_mag"]) + 0.01  # makes theta > 0
    theta = p["b_mag"] - numpy.exp(p["r_mag"]) * p["b_gate"]
    assert (theta > 0).all()
    gated = SAE("gated", p)
    jump = SAE("jumprelu", {"W_enc": p["W_enc"] * numpy.exp(p["r_mag"]), "b_enc": p["b_mag"], "threshold": theta,
                            "W_dec": p["W_dec"], "b_dec": p["b_dec"]})
    x = inputs(dtype=numpy.float64)
    numpy.testing.assert_allclose(gated.encode(x), jump.encode(x), rtol=GOLDEN64_RTOL, atol=GOLDEN64_ATOL)


def test_leading_dims_and_hook_z_reshape():
    sae = make_sae("jumprelu", reshape_activations="hook_z")
    x = inputs(24).reshape(2, 12, D)
    f = sae.encode(x)
    assert f.shape == (2, 12, M)
    numpy.testing.assert_array_equal(f.reshape(24, M), sae.encode(inputs(24)))
    numpy.testing.assert_array_equal(sae.encode(x.reshape(2, 12, 3, 4)), f)  # (..., H, d_head) accepted
    assert sae.decode(f).shape == (2, 12, D)
    with pytest.raises(ValueError, match=r"d_in=12.*\(5, 7\)"):
        sae.encode(numpy.zeros((5, 7), numpy.float32))
    with pytest.raises(ValueError, match=r"d_sae=40"):
        sae.decode(numpy.zeros((5, 7), numpy.float32))


# ------------------------------------------------------------------------------------------
# folding training parameters into release form


def training_params(arch, seed, dtype):
    """Training-form parameters: release_params' draws (another seed stream), with JumpReLU's
    threshold trained as log_threshold."""
    p = release_params(arch, seed=1000 + seed, dtype=numpy.float64)
    if arch == "jumprelu":
        p["log_threshold"] = numpy.log(p.pop("threshold"))
    return {k: v.astype(dtype) for k, v in p.items()}


def training_forward(arch, p, x, hyper):
    """The training-time forward of JumpReLU, Gated and TopK in float64: (f, xhat, kink margin)."""
    p = {k: v.astype(numpy.float64) for k, v in p.items()}
    pre_enc = arch != "jumprelu" or hyper.get("pre_enc_bias", True)
    x_c = x - p["b_dec"] if pre_enc else x
    if arch == "jumprelu":
        pi = numpy.maximum(x_c @ p["W_enc"] + p["b_enc"], 0.0)
        theta = numpy.exp(p["log_threshold"])
        f, margin = pi * (pi > theta), numpy.abs(pi - theta).min()  # the jump at theta
    elif arch == "gated":
        pi_gate = x_c @ p["W_enc"] + p["b_gate"]
        pi_mag = x_c @ (p["W_enc"] * numpy.exp(p["r_mag"])) + p["b_mag"]
        f = (pi_gate > 0) * numpy.maximum(pi_mag, 0.0)
        margin = numpy.abs(pi_gate).min()  # the gate's jump
    else:
        pre = x_c @ p["W_enc"] + p["b_enc"]
        srt = -numpy.sort(-pre, axis=1)
        f = numpy.where(pre >= srt[:, hyper["k"] - 1 : hyper["k"]], numpy.maximum(pre, 0.0), 0.0)
        margin = (srt[:, hyper["k"] - 1] - srt[:, hyper["k"]]).min()  # the k-th / (k+1)-th swap
    return f, f @ p["W_dec"] + p["b_dec"], margin


@pytest.mark.parametrize(
    "arch,hyper", [("jumprelu", {}), ("jumprelu", {"pre_enc_bias": False}), ("gated", {}), ("topk", {"k": K})]
)
@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_from_training_folds_scale_and_bias(xp, arch, hyper, dtype):
    C = 37.3
    for seed in range(3):
        params = training_params(arch, seed, dtype)
        x = inputs(48, seed=10 + seed, dtype=numpy.float64)  # training input x = x_raw / C
        f_train, xhat_train, margin = training_forward(arch, params, x, hyper)
        assert margin > 1e-5, "test data too close to a discontinuity for a float32 comparison"
        sae = SAE.from_training(arch, {k: asarray(v, xp) for k, v in params.items()}, scale=C, hyper=hyper,
                                metadata={"hook_name": "blocks.3.hook_resid_post"})
        assert sae.xp is xp and sae.dtype == dtype and sae.architecture == arch
        assert sae.cfg["apply_b_dec_to_input"] == hyper.get("pre_enc_bias", True)
        assert sae.cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
        x_raw = asarray((C * x).astype(dtype), xp)
        f = sae.encode(x_raw)
        if dtype == numpy.float64:
            tol = dict(rtol=GOLDEN64_RTOL, atol=C * GOLDEN64_ATOL)
        else:
            tol = dict(rtol=F32_RTOL, atol=C * F32_ATOL)
        assert_close(f, C * f_train, **tol)  # (ReLU's kink is continuous: no margin needed there)
        assert_close(sae.decode(f), C * xhat_train, **tol)
        if arch == "jumprelu":
            assert_close(sae.params["threshold"], C * numpy.exp(params["log_threshold"].astype(numpy.float64)), **tol)


@pytest.mark.parametrize("arch", ARCHS)
def test_from_training_matches_variant_forward(arch):
    """The release SAE on x_raw equals C times minisae.sae.<variant>.forward on x_raw / C."""
    mod = importlib.import_module(f"minisae.sae.{arch}")
    hyper = {"k": K} if arch == "topk" else {"sparsity_coeff": 1e-3}
    C = 5.5
    params = training_params(arch, 0, numpy.float64)
    x = inputs(32, dtype=numpy.float64)
    out, _ = mod.forward(params, x, **hyper)
    sae = SAE.from_training(arch, params, scale=C, hyper=hyper)
    f = sae.encode(C * x)
    numpy.testing.assert_allclose(f, C * out["f"], rtol=GOLDEN64_RTOL, atol=C * GOLDEN64_ATOL)
    numpy.testing.assert_allclose(sae.decode(f), C * out["xhat"], rtol=GOLDEN64_RTOL, atol=C * GOLDEN64_ATOL)


def test_from_training_errors():
    p = training_params("topk", 0, numpy.float32)
    with pytest.raises(ValueError, match=r"hyper\['k'\]"):
        SAE.from_training("topk", p, scale=2.0, hyper={})
    with pytest.raises(ValueError, match="scale > 0"):
        SAE.from_training("topk", p, scale=0.0, hyper={"k": K})
    with pytest.raises(SAEFileError, match="log_threshold"):
        SAE.from_training("jumprelu", p, scale=2.0)
    with pytest.raises(SAEFileError, match="unknown SAE architecture 'relu'"):
        SAE.from_training("relu", p, scale=2.0)


# ------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("arch", ARCHS)
def test_saelens_folder_round_trip(xp, tmp_path, arch):
    sae = make_sae(arch, xp, metadata={"model_name": "gemma-2-2b", "hook_name": "blocks.5.hook_mlp_out"})
    folder = sae.save(tmp_path / "sae")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name != "sae"]  # no temporary left behind
    cfg = json.loads((folder / "cfg.json").read_text())
    for key in ("d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
                "reshape_activations"):
        assert key in cfg
    assert cfg["architecture"] == arch and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["hook_name"] == "blocks.5.hook_mlp_out" and "sae_lens_version" in cfg["metadata"]
    if arch == "topk":
        assert cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False
    back = SAE.load(folder, xp=xp)
    assert back.cfg == sae.cfg
    for name, value in sae.params.items():
        numpy.testing.assert_array_equal(to_numpy(back.params[name]), to_numpy(value))
    x = asarray(inputs(), xp)
    numpy.testing.assert_array_equal(to_numpy(back.encode(x)), to_numpy(sae.encode(x)))
    numpy.testing.assert_array_equal(to_numpy(back(x)), to_numpy(sae(x)))
    assert SAE.load(folder / "cfg.json").cfg == sae.cfg  # the cfg.json path works too
    assert SAE.load(folder, dtype="float64").dtype == numpy.float64


@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_gemma_scope_round_trip(xp, tmp_path, apply_b_dec):
    sae = make_sae("jumprelu", xp, apply_b_dec_to_input=apply_b_dec)
    path = sae.save_gemma_scope(tmp_path / "layer_3")
    assert path == tmp_path / "layer_3" / "params.npz"
    with numpy.load(path, allow_pickle=False) as npz:
        assert sorted(npz.files) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
        assert all(npz[n].dtype == numpy.float32 for n in npz.files)
    back = SAE.load(path, xp=xp)
    assert back.cfg["apply_b_dec_to_input"] is False and back.architecture == "jumprelu"
    x = asarray(inputs(), xp)
    if apply_b_dec:  # b_dec folded into b_enc: same function, float32 rounding apart
        assert_close(back.encode(x), sae.encode(x))
        assert_close(back(x), sae(x))
    else:
        for name, value in sae.params.items():
            numpy.testing.assert_array_equal(to_numpy(back.params[name]), to_numpy(value))
        numpy.testing.assert_array_equal(to_numpy(back.encode(x)), to_numpy(sae.encode(x)))
    assert SAE.load(tmp_path / "layer_3").d_sae == M  # a folder holding params.npz
    with pytest.raises(FileExistsError, match="params.npz"):
        sae.save_gemma_scope(path)
    sae.save_gemma_scope(path, overwrite=True)
    with pytest.raises(ValueError, match="JumpReLU SAEs only"):
        make_sae("topk").save_gemma_scope(tmp_path / "t.npz")


def test_gemma_scope_lowercase_names_and_metadata(tmp_path):
    p = release_params("jumprelu")
    path = tmp_path / "gemma-scope-9b-pt-att" / "layer_20" / "width_16k" / "average_l0_71" / "params.npz"
    path.parent.mkdir(parents=True)
    numpy.savez(path, w_enc=p["W_enc"], w_dec=p["W_dec"], b_enc=p["b_enc"], b_dec=p["b_dec"],
                threshold=p["threshold"].astype(numpy.float64))
    sae = SAE.load(path)
    assert sae.dtype == numpy.float32 and sae.params["threshold"].dtype == numpy.float32
    numpy.testing.assert_array_equal(sae.params["W_enc"], p["W_enc"])
    meta = sae.cfg["metadata"]
    assert meta["model_name"] == "gemma-2-9b" and meta["hook_name"] == "blocks.20.attn.hook_z"
    assert sae.cfg["reshape_activations"] == "hook_z"


# Hub references go through minisae.io.hub and the real huggingface_hub code, offline, reading a
# cache laid out as the library writes it (test_hub's `offline_hub` fixture and `populate_cache`).

GS_REPO = "google/gemma-scope-2b-pt-res"
GS_FILE = "layer_3/width_16k/average_l0_10/params.npz"


def gemma_scope_arrays(d_in=8, d_sae=16):
    rng = numpy.random.default_rng(11)
    W_dec = rng.standard_normal((d_sae, d_in))  # (M, D)
    W_dec /= numpy.linalg.norm(W_dec, axis=1, keepdims=True)
    arrays = {"W_enc": W_dec.T + 0.3 * rng.standard_normal((d_in, d_sae)), "W_dec": W_dec,
              "b_enc": 0.2 * rng.standard_normal(d_sae), "b_dec": 0.3 * rng.standard_normal(d_in),
              "threshold": rng.uniform(0.05, 1.0, d_sae)}
    return {k: v.astype(numpy.float32) for k, v in arrays.items()}


def test_hub_gemma_scope_from_offline_cache(offline_hub):
    arrays = gemma_scope_arrays()
    snapshot = populate_cache(offline_hub, GS_REPO, {})
    (snapshot / GS_FILE).parent.mkdir(parents=True)
    numpy.savez(snapshot / GS_FILE, **arrays)
    for kwargs in ({}, {"revision": "main"}, {"revision": HUB_SHA}):
        sae = SAE.load(f"{GS_REPO}/{GS_FILE}", **kwargs)
        assert sae.architecture == "jumprelu" and (sae.d_in, sae.d_sae) == (8, 16)
        for name, value in arrays.items():
            numpy.testing.assert_array_equal(sae.params[name], value)
    meta = sae.cfg["metadata"]
    assert meta["hook_name"] == "blocks.3.hook_resid_post" and meta["model_name"] == "gemma-2-2b"
    assert meta["context_size"] == 1024 and meta["prepend_bos"] is True
    assert sae.cfg["apply_b_dec_to_input"] is False and sae.cfg["reshape_activations"] == "none"
    x = numpy.random.default_rng(3).standard_normal((16, 8)).astype(numpy.float32)  # (16, D)
    assert_close(sae.encode(x), reference_encode("jumprelu", arrays, x, sae.cfg))
    folder_ref = SAE.load(f"{GS_REPO}/{GS_FILE.rsplit('/', 1)[0]}")  # a folder in the repo: its params.npz
    numpy.testing.assert_array_equal(folder_ref.params["W_enc"], arrays["W_enc"])
    assert folder_ref.cfg == sae.cfg
    with pytest.raises(HubError, match=r"Hub repo 'google/gemma-scope-2b-pt-res' \(revision 'v2'\)"):
        SAE.load(f"{GS_REPO}/{GS_FILE}", revision="v2")  # the revision reaches huggingface_hub
    with pytest.raises(HubError, match=r"file 'layer_4/width_16k/average_l0_10/params.npz' of Hub repo "
                                       r"'google/gemma-scope-2b-pt-res'.*not in the local"):
        SAE.load(f"{GS_REPO}/layer_4/width_16k/average_l0_10/params.npz")


def test_hub_saelens_folder_in_cached_repo(offline_hub):
    snapshot = populate_cache(offline_hub, "someone/saes", {})
    sae = make_sae("topk", metadata={"hook_name": "blocks.8.hook_resid_post"})
    sae.save(snapshot / "blocks.8.hook_resid_post")
    got = SAE.load("someone/saes/blocks.8.hook_resid_post")
    assert got.architecture == "topk" and got.cfg == sae.cfg
    for name, value in sae.params.items():
        numpy.testing.assert_array_equal(got.params[name], value)
    x = inputs()
    numpy.testing.assert_array_equal(got(x), sae(x))
    root = populate_cache(offline_hub, "someone/one-sae", {})
    make_sae("gated").save(root)  # cfg.json + sae_weights.safetensors at the repo's top level
    assert SAE.load("someone/one-sae").architecture == "gated"
    with pytest.raises(HubError, match=r"file 'blocks.9.hook_resid_post/cfg.json' of Hub repo 'someone/saes'"):
        SAE.load("someone/saes/blocks.9.hook_resid_post")


def test_hub_missing_repo_offline_names_repo(offline_hub):
    with pytest.raises(HubError) as err:
        SAE.load(f"{GS_REPO}/{GS_FILE}")
    message = str(err.value)
    assert f"Hub repo {GS_REPO!r}" in message and f"file {GS_FILE!r}" in message
    assert "HF_HUB_OFFLINE" in message and f"hf download {GS_REPO}" in message
    with pytest.raises(HubError, match=r"file 'sub/cfg.json' of Hub repo 'someone/missing'.*HF_HUB_OFFLINE"):
        SAE.load("someone/missing/sub")


# ------------------------------------------------------------------------------------------
# errors and safe writing


def test_save_refuses_to_overwrite_and_is_atomic(tmp_path, monkeypatch):
    a, b = make_sae("jumprelu", seed=0), make_sae("jumprelu", seed=1)
    folder = a.save(tmp_path / "out")
    (tmp_path / "empty").mkdir()
    a.save(tmp_path / "empty")  # an empty folder is fine
    with pytest.raises(FileExistsError, match="not empty"):
        b.save(folder)
    numpy.testing.assert_array_equal(SAE.load(folder).params["W_enc"], a.params["W_enc"])
    (folder / "notes.txt").write_text("kept")
    b.save(folder, overwrite=True)
    numpy.testing.assert_array_equal(SAE.load(folder).params["W_enc"], b.params["W_enc"])
    assert (folder / "notes.txt").read_text() == "kept"
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"):
        a.save(tmp_path / "file")

    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("minisae.io.safetensors_io.save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        a.save(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "out"]  # nothing half-written


def test_load_errors(tmp_path):
    sae = make_sae("gated")
    folder = sae.save(tmp_path / "ok")

    def variant(name, edit_cfg=None, edit_tensors=None):
        dst = tmp_path / name
        dst.mkdir()
        cfg = json.loads((folder / "cfg.json").read_text())
        if edit_cfg:
            edit_cfg(cfg)
        (dst / "cfg.json").write_text(json.dumps(cfg))
        tensors = {k: numpy.array(v) for k, v in saefile_load_tensors(folder).items()}
        if edit_tensors:
            edit_tensors(tensors)
        from minisae.io.safetensors_io import save_file

        save_file(tensors, dst / "sae_weights.safetensors")
        return dst

    with pytest.raises(FileNotFoundError, match="no SAE here"):
        SAE.load(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        SAE.load(tmp_path / "missing")
    only_weights = tmp_path / "only_weights"
    only_weights.mkdir()
    (only_weights / "sae_weights.safetensors").write_bytes((folder / "sae_weights.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="missing cfg.json"):
        SAE.load(only_weights)
    only_cfg = tmp_path / "only_cfg"
    only_cfg.mkdir()
    (only_cfg / "cfg.json").write_text((folder / "cfg.json").read_text())
    with pytest.raises(FileNotFoundError, match="missing sae_weights.safetensors"):
        SAE.load(only_cfg)
    with pytest.raises(SAEFileError, match="unknown SAE architecture 'standard'"):
        SAE.load(variant("arch", lambda c: c.update(architecture="standard")))
    with pytest.raises(SAEFileError, match=r"missing tensor\(s\) \['r_mag'\]"):
        SAE.load(variant("missing", edit_tensors=lambda t: t.pop("r_mag")))
    with pytest.raises(SAEFileError, match=r"tensor b_mag: expected shape \(40,\).*found \(39,\)"):
        SAE.load(variant("shape", edit_tensors=lambda t: t.update(b_mag=t["b_mag"][:-1])))
    with pytest.raises(SAEFileError, match=r"W_enc: expected shape \(13, 40\).*d_in=13"):
        SAE.load(variant("d_in", lambda c: c.update(d_in=13)))
    with pytest.raises(SAEFileError, match="normalize_activations='layer_norm'"):
        SAE.load(variant("norm", lambda c: c.update(normalize_activations="layer_norm")))
    with pytest.raises(SAEFileError, match="unexpected tensor"):
        SAE.load(variant("extra", edit_tensors=lambda t: t.update(b_enc=t["b_mag"])))
    bad_json = variant("json")
    (bad_json / "cfg.json").write_text("{not json")
    with pytest.raises(SAEFileError, match="cfg.json: not valid JSON"):
        SAE.load(bad_json)
    truncated = variant("truncated")
    data = (truncated / "sae_weights.safetensors").read_bytes()
    (truncated / "sae_weights.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(SafetensorsError, match="sae_weights.safetensors"):
        SAE.load(truncated)


def test_shape_mismatch_names_both_tensors(tmp_path):
    p = release_params("jumprelu")
    p["W_dec"] = p["W_dec"].T.copy()  # (D, M) instead of (M, D)
    with pytest.raises(SAEFileError, match=r"W_enc has shape \(12, 40\).*W_dec.*\(40, 12\), found \(12, 40\)"):
        SAE("jumprelu", p)
    path = tmp_path / "params.npz"
    numpy.savez(path, **p)
    with pytest.raises(SAEFileError, match=r"params.npz: W_enc has shape .* W_dec"):
        SAE.load(path)


def test_corrupt_or_incomplete_npz(tmp_path):
    p = release_params("jumprelu")
    good = tmp_path / "good.npz"
    numpy.savez(good, **p)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(good.read_bytes()[:300])
    with pytest.raises(SAEFileError, match="bad.npz: not a readable Gemma Scope .npz"):
        SAE.load(bad)
    incomplete = tmp_path / "incomplete.npz"
    numpy.savez(incomplete, **{k: v for k, v in p.items() if k != "threshold"})
    with pytest.raises(SAEFileError, match="incomplete.npz: missing array 'threshold'"):
        SAE.load(incomplete)
    pickled = tmp_path / "pickled.npz"
    numpy.savez(pickled, **p, extra=numpy.array([{"a": 1}], dtype=object))
    assert SAE.load(pickled).d_sae == M  # an unused object array is never unpickled
    numpy.savez(pickled, **{**p, "threshold": numpy.array([{"a": 1}] * M, dtype=object)})
    with pytest.raises(SAEFileError, match="pickled.npz"):
        SAE.load(pickled)


def saefile_load_tensors(folder):
    from minisae.io.safetensors_io import load_file

    return load_file(Path(folder) / saefile.WEIGHTS_FILENAME)


# ------------------------------------------------------------------------------------------
# goldens written by SAELens (reference/check_saelens.py)

GOLDEN_CASES = sorted(p.name for p in GOLDEN.iterdir() if p.is_dir()) if GOLDEN.is_dir() else []


def test_golden_cases_present():
    archs = ("jumprelu", "gated", "topk", "topk_rescaled")
    assert set(GOLDEN_CASES) >= {f"{a}{s}" for a in archs for s in ("", "_saved_by_saelens")}


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_matches_saelens_outputs(xp, case):
    sae = SAE.load(GOLDEN / case, xp=xp)
    with numpy.load(GOLDEN / case / "saelens_outputs.npz", allow_pickle=False) as g:
        x, f_ref, xhat_ref = g["x"], g["f"], g["xhat"]
    f = sae.encode(asarray(x, xp))
    assert numpy.array_equal(to_numpy(f) != 0, f_ref != 0), "a different set of active latents than SAELens"
    assert_close(f, f_ref)
    assert_close(sae.decode(f), xhat_ref)
    assert_close(sae(asarray(x, xp)), xhat_ref)
