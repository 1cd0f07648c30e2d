"""Cross-check minisae.io.saefile against SAELens and write the goldens in tests/golden/saelens/.

Run with the reference venv (torch + sae-lens; minisae installed with --no-deps):
    /work/venvs/ref/bin/python reference/check_saelens.py

Two directions, for every architecture (jumprelu, gated, topk, and topk with
rescale_acts_by_decoder_norm):
1. minisae -> SAELens: random release parameters (D=16, M=48, seeded) are saved by
   minisae's SAE.save into tests/golden/saelens/<case>/, loaded with SAELens's own
   SAE.load_from_disk, and SAELens's encode/decode outputs on fixed random inputs are stored
   beside them in saelens_outputs.npz (x, f, xhat, sae_lens_version).
2. SAELens -> minisae: SAELens builds the same kind of SAE from a cfg dict, its parameters are
   randomised, and SAELens's own save_model writes tests/golden/saelens/<case>_saved_by_saelens/
   with saelens_outputs.npz, so the test reads a cfg.json exactly as SAELens writes it.

3. Trained-form variants released as JumpReLU files (minisae train's path, SAE.from_training with
   an input scale C and the pre-encoder bias folded): "batchtopk_as_jumprelu" (BatchTopK with its one
   global inference threshold) and "jumprelu_matryoshka" (a Matryoshka JumpReLU with raw thresholds:
   the prefixes shape training only, the file is a plain JumpReLU). Each folder also holds
   training.npz (the training-form params, theta, C), and this script checks SAELens's output
   against minisae's own training-form inference encoder.

tests/test_saefile.py loads every folder with minisae (no torch) and compares with the stored
outputs; tests/test_sae_batchtopk_files.py checks the training-form encoders. This script also
prints the max differences against minisae directly.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import sae_lens
import torch
from sae_lens import SAE as LensSAE

from minisae.io.saefile import SAE

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "golden" / "saelens"
D, M, K, N_TOKENS = 16, 48, 8, 32
METADATA = {
    "model_name": "gemma-2-2b",
    "hook_name": "blocks.12.hook_resid_post",
    "context_size": 1024,
    "prepend_bos": True,
}
CASES = {  # case name -> (architecture, extra cfg)
    "jumprelu": ("jumprelu", {}),
    "gated": ("gated", {}),
    "topk": ("topk", {"k": K}),
    "topk_rescaled": ("topk", {"k": K, "rescale_acts_by_decoder_norm": True}),
}


def random_release_params(architecture, rng, *, unit_rows=True):
    """Release-form parameters whose latents fire on a fair share of N(0, 1)-ish inputs."""
    W_dec = rng.standard_normal((M, D))  # (M, D)
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    if not unit_rows:
        W_dec *= rng.uniform(0.5, 2.0, size=(M, 1))  # (M, D) rows of unequal norm
    p = {
        "W_enc": W_dec.T + 0.3 * rng.standard_normal((D, M)),  # (D, M)
        "W_dec": W_dec,
        "b_dec": 0.3 * rng.standard_normal(D),  # (D,)
    }
    if architecture == "jumprelu":
        p["b_enc"] = 0.2 * rng.standard_normal(M)
        p["threshold"] = rng.uniform(0.05, 1.0, M)
    elif architecture == "topk":
        p["b_enc"] = 0.2 * rng.standard_normal(M)
    else:
        p["b_gate"] = 0.3 * rng.standard_normal(M)
        p["r_mag"] = 0.3 * rng.standard_normal(M)
        p["b_mag"] = 0.3 * rng.standard_normal(M)
    return {k: v.astype(np.float32) for k, v in p.items()}


def run_saelens(lens, x):
    with torch.no_grad():
        f = lens.encode(torch.from_numpy(x))  # (N, M)
        xhat = lens.decode(f)  # (N, D)
        fwd = lens(torch.from_numpy(x))  # (N, D): forward = decode(encode(x))
    assert torch.equal(fwd, xhat), "SAELens forward differs from decode(encode(x))"
    return f.numpy(), xhat.numpy()


def write_outputs(folder, x, f, xhat):
    np.savez(folder / "saelens_outputs.npz", x=x, f=f, xhat=xhat, sae_lens_version=np.array(sae_lens.__version__))


def compare(label, sae, x, f_lens, xhat_lens):
    f_mini = sae.encode(x)  # (N, M)
    xhat_mini = sae.decode(f_mini)  # (N, D)
    same_support = np.array_equal(f_mini != 0, f_lens != 0)
    print(
        f"{label:28s} L0 {np.mean(np.count_nonzero(f_lens, axis=1)):5.2f}  "
        f"max|f diff| {np.abs(f_mini - f_lens).max():.2e}  max|xhat diff| {np.abs(xhat_mini - xhat_lens).max():.2e}  "
        f"same active set: {same_support}"
    )
    return same_support


def minisae_to_saelens(case, architecture, extra, rng, x):
    folder = OUT / case
    shutil.rmtree(folder, ignore_errors=True)
    params = random_release_params(architecture, rng, unit_rows=not extra.get("rescale_acts_by_decoder_norm"))
    sae = SAE(architecture, params, {**extra, "metadata": dict(METADATA)})
    sae.save(folder)
    lens = LensSAE.load_from_disk(folder, device="cpu")
    assert type(lens).__name__.lower().startswith(architecture), type(lens)
    f, xhat = run_saelens(lens, x)
    write_outputs(folder, x, f, xhat)
    return compare(f"minisae -> SAELens {case}", SAE.load(folder), x, f, xhat)


def saelens_to_minisae(case, architecture, extra, x):
    folder = OUT / f"{case}_saved_by_saelens"
    shutil.rmtree(folder, ignore_errors=True)
    cfg = {"architecture": architecture, "d_in": D, "d_sae": M, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "metadata": dict(METADATA), **extra}
    lens = LensSAE.from_dict(cfg)
    gen = torch.Generator().manual_seed(len(case) * 1000 + 7)
    with torch.no_grad():
        for name, param in lens.named_parameters():
            scale = {"W_enc": 0.5, "W_dec": 0.5, "threshold": 0.3}.get(name, 0.3)
            param.copy_(scale * torch.randn(param.shape, generator=gen, dtype=param.dtype))
            if name == "threshold":
                param.abs_()  # a JumpReLU threshold is positive
    lens.save_model(folder)
    f, xhat = run_saelens(LensSAE.load_from_disk(folder, device="cpu"), x)
    write_outputs(folder, x, f, xhat)
    return compare(f"SAELens -> minisae {case}", SAE.load(folder), x, f, xhat)


def trained_to_saelens(case, rng, x):
    """A training-form BatchTopK or raw-theta JumpReLU, released through SAE.from_training."""
    from minisae.sae import batchtopk, jumprelu

    folder = OUT / case
    shutil.rmtree(folder, ignore_errors=True)
    C = 2.5  # the input scale: training saw x / C
    W_dec = rng.standard_normal((M, D))
    W_dec /= np.linalg.norm(W_dec, axis=1, keepdims=True)
    p = {"W_enc": W_dec.T + 0.3 * rng.standard_normal((D, M)), "b_enc": 0.1 * rng.standard_normal(M),
         "W_dec": W_dec, "b_dec": 0.2 * rng.standard_normal(D)}
    p = {k: v.astype(np.float32) for k, v in p.items()}
    xt = x / np.float32(C)  # (N, D) the training-form input
    if case.startswith("batchtopk"):
        theta = 0.35
        sae = SAE.from_training("batchtopk", p, scale=C, hyper={"threshold": theta}, metadata=dict(METADATA))
        f_train = batchtopk.encode(p, xt, threshold=theta)  # (N, M)
        np.savez(folder.with_suffix(".tmp.npz"), **p, threshold=np.float64(theta), scale=np.float64(C))
    else:
        p["threshold"] = rng.uniform(0.05, 0.6, M).astype(np.float32)
        sae = SAE.from_training("jumprelu", p, scale=C, metadata=dict(METADATA))
        f_train = jumprelu.encode(p, xt)  # (N, M)
        np.savez(folder.with_suffix(".tmp.npz"), **p, scale=np.float64(C))
    sae.save(folder)
    shutil.move(folder.with_suffix(".tmp.npz"), folder / "training.npz")
    lens = LensSAE.load_from_disk(folder, device="cpu")
    assert type(lens).__name__ == "JumpReLUSAE", type(lens)
    f, xhat = run_saelens(lens, x)
    write_outputs(folder, x, f, xhat)
    print(f"{'':28s} vs the training-form encoder: max|SAELens f - C f_train| {np.abs(f - C * f_train).max():.2e}")
    return compare(f"minisae -> SAELens {case}", SAE.load(folder), x, f, xhat)


def main():
    print(f"sae_lens {sae_lens.__version__}, torch {torch.__version__}")
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20240814)
    x = (rng.standard_normal((N_TOKENS, D)) * 1.5 + 0.2).astype(np.float32)  # (N, D)
    ok = True
    for case, (architecture, extra) in CASES.items():
        ok &= minisae_to_saelens(case, architecture, extra, rng, x)
        ok &= saelens_to_minisae(case, architecture, extra, x)
    for case in ("batchtopk_as_jumprelu", "jumprelu_matryoshka"):
        ok &= trained_to_saelens(case, rng, x)
    cfg = json.loads((OUT / "topk_saved_by_saelens" / "cfg.json").read_text())
    print("cfg.json keys written by SAELens:", sorted(cfg))
    size = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {OUT} ({size / 1024:.1f} KiB)")
    if not ok:
        raise SystemExit("minisae and SAELens chose different active latents on some case")


if __name__ == "__main__":
    main()
