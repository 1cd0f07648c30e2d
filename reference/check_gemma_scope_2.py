"""Gemma Scope 2 files: write them in the released layout, load them in SAELens, and check that SAELens
loads minisae's own Gemma Scope 2 (and SAELens-format) output alike. Writes tests/golden/gemma_scope_2/.

Run with the reference venv from the repo root (torch + sae-lens; minisae from the working tree):
    PYTHONPATH=$PWD /work/refvenv/bin/python reference/check_gemma_scope_2.py

1. Released layout, written here without minisae (safetensors + json): four folders named as in
   google/gemma-scope-2-* repos, under tests/golden/gemma_scope_2/released/:
     resid_post/layer_3_width_48_l0_small              SAE on model.layers.3.output (D 16)
     attn_out/layer_3_width_48_l0_small                SAE on model.layers.3.self_attn.o_proj.input (D 24)
     transcoder_all/layer_3_width_48_l0_small          transcoder pre_ -> post_feedforward_layernorm (16 -> 16)
     transcoder_all/layer_3_width_48_l0_small_affine   skip transcoder (affine_skip_connection (16, 16))
   SAELens reads each through its own Gemma Scope 2 loader (sae_lens.loading.pretrained_sae_loaders.
   gemma_3_sae_huggingface_loader, its Hub download pointed at the local folder), and its outputs
   on fixed inputs go to saelens_outputs.npz in the folder: x, f (latents), y (SAELens forward: decode,
   plus the skip term for skip transcoders), the SAELens cfg dict (JSON) and the SAELens version.
2. minisae loads each released folder, writes it again with SAE.save_gemma_scope_2 into
   tests/golden/gemma_scope_2/minisae_written/<same path>/, and SAELens loads that output through the
   same loader: its outputs must equal those of step 1 (they are stored beside it as well).
3. minisae writes each as a SAELens folder (SAE.save) into minisae_saelens/<name>/; SAELens's
   SAE.load_from_disk must give the same outputs and architecture.

tests/test_gemmascope2.py reads all of it without torch and compares minisae with SAELens's outputs.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import sae_lens
import torch
from safetensors.numpy import save_file
from sae_lens import SAE as LensSAE
from sae_lens.loading import pretrained_sae_loaders as loaders

from minisae.io.saefile import SAE

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "golden" / "gemma_scope_2"
REPO = "google/gemma-scope-2-270m-pt"
M, N_TOKENS, LAYER = 48, 32, 3
CASES = {  # folder -> (type, affine, d_in, d_out, hf_hook_point_in, hf_hook_point_out)
    "resid_post/layer_3_width_48_l0_small": ("sae", False, 16, 16, "model.layers.3.output", "model.layers.3.output"),
    "attn_out/layer_3_width_48_l0_small": ("sae", False, 24, 24, "model.layers.3.self_attn.o_proj.input",
                                           "model.layers.3.self_attn.o_proj.input"),
    "transcoder_all/layer_3_width_48_l0_small": ("transcoder", False, 16, 16,
                                                 "model.layers.3.pre_feedforward_layernorm.output",
                                                 "model.layers.3.post_feedforward_layernorm.output"),
    "transcoder_all/layer_3_width_48_l0_small_affine": ("transcoder", True, 16, 16,
                                                        "model.layers.3.pre_feedforward_layernorm.output",
                                                        "model.layers.3.post_feedforward_layernorm.output"),
}


def write_released(folder, kind, affine, d_in, d_out, hook_in, hook_out, rng):
    """params.safetensors + config.json exactly as the release has them (float32, lower-case names)."""
    w_dec = rng.standard_normal((M, d_out))
    w_dec /= np.linalg.norm(w_dec, axis=1, keepdims=True)
    t = {"w_enc": rng.standard_normal((d_in, M)) * 0.6, "w_dec": w_dec, "b_enc": 0.2 * rng.standard_normal(M),
         "b_dec": 0.3 * rng.standard_normal(d_out), "threshold": rng.uniform(0.05, 1.0, M)}
    if affine:
        t["affine_skip_connection"] = 0.3 * rng.standard_normal((d_in, d_out))
    folder.mkdir(parents=True)
    save_file({k: v.astype(np.float32) for k, v in t.items()}, str(folder / "params.safetensors"))
    cfg = {"hf_hook_point_in": hook_in, "hf_hook_point_out": hook_out, "width": M,
           "model_name": "google/gemma-3-270m", "architecture": "jump_relu", "l0": 10,
           "affine_connection": affine, "type": kind}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def saelens_from(root, folder_name):
    """SAELens's Gemma Scope 2 loader with its Hub access pointed at `root` (a local repo copy)."""
    def download(repo_id, filename, subfolder=None, force_download=False, **kw):
        assert repo_id == REPO, repo_id
        path = root / (f"{subfolder}/{filename}" if subfolder else filename)
        if not path.exists():
            raise loaders.EntryNotFoundError(str(path))
        return str(path)

    def shapes(repo_id, filename):
        from safetensors import safe_open

        with safe_open(str(root / filename), "np") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}

    saved = loaders.hf_hub_download, loaders.get_safetensors_tensor_shapes
    loaders.hf_hub_download, loaders.get_safetensors_tensor_shapes = download, shapes
    try:
        cfg, state, _ = loaders.gemma_3_sae_huggingface_loader(REPO, folder_name, device="cpu")
    finally:
        loaders.hf_hub_download, loaders.get_safetensors_tensor_shapes = saved
    lens = LensSAE.from_dict(loaders.handle_config_defaulting(dict(cfg)))  # as SAE.from_pretrained does
    lens.process_state_dict_for_loading(state)
    lens.load_state_dict(state, assign=True)
    return lens.eval(), cfg


def run(lens, x):
    with torch.no_grad():
        xt = torch.from_numpy(x)
        return lens.encode(xt).numpy(), lens(xt).numpy()


def main():
    print(f"sae_lens {sae_lens.__version__}, torch {torch.__version__}")
    shutil.rmtree(OUT, ignore_errors=True)
    rng = np.random.default_rng(20251218)
    worst = 0.0
    for folder_name, (kind, affine, d_in, d_out, hook_in, hook_out) in CASES.items():
        x = (rng.standard_normal((N_TOKENS, d_in)) * 1.5).astype(np.float32)  # (N, D_in)
        released = OUT / "released" / folder_name
        write_released(released, kind, affine, d_in, d_out, hook_in, hook_out, rng)
        lens, cfg = saelens_from(OUT / "released", folder_name)
        f, y = run(lens, x)
        np.savez(released / "saelens_outputs.npz", x=x, f=f, y=y, cfg=np.array(json.dumps(cfg, default=str)),
                 sae_lens_version=np.array(sae_lens.__version__))

        mini = SAE.load(released)
        assert mini.architecture == cfg["architecture"], (mini.architecture, cfg["architecture"])
        assert mini.cfg["metadata"]["hook_name"] == cfg["hook_name"], (mini.cfg["metadata"], cfg["hook_name"])
        assert mini.cfg["metadata"].get("hook_name_out") == cfg.get("hook_name_out")
        d_f, d_y = np.abs(mini.encode(x) - f).max(), np.abs(mini(x) - y).max()

        written = OUT / "minisae_written" / folder_name
        mini.save_gemma_scope_2(written)
        lens2, cfg2 = saelens_from(OUT / "minisae_written", folder_name)
        f2, y2 = run(lens2, x)
        assert cfg2["architecture"] == cfg["architecture"] and cfg2["hf_hook_name"] == cfg["hf_hook_name"]
        np.savez(written / "saelens_outputs.npz", x=x, f=f2, y=y2, sae_lens_version=np.array(sae_lens.__version__))
        d_w = max(np.abs(f2 - f).max(), np.abs(y2 - y).max())

        as_lens = OUT / "minisae_saelens" / folder_name.replace("/", "__")
        mini.save(as_lens)
        lens3 = LensSAE.load_from_disk(as_lens, device="cpu").eval()
        assert type(lens3) is type(lens), (type(lens3), type(lens))
        f3, y3 = run(lens3, x)
        d_l = max(np.abs(f3 - f).max(), np.abs(y3 - y).max())
        np.savez(as_lens / "saelens_outputs.npz", x=x, f=f3, y=y3, sae_lens_version=np.array(sae_lens.__version__))
        l0 = float((f != 0).sum(1).mean())
        print(f"{folder_name:50s} {cfg['architecture']:26s} L0 {l0:5.1f}  minisae vs SAELens: "
              f"max|f| {d_f:.1e} max|y| {d_y:.1e};  SAELens on minisae's GS2 {d_w:.1e}, on its SAELens folder {d_l:.1e}")
        worst = max(worst, d_f, d_y, d_w, d_l)
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({size / 1024:.0f} KiB); worst difference {worst:.1e}")
    assert worst < 1e-4, worst


if __name__ == "__main__":
    main()
