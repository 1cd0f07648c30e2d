"""Write tiny random Gemma 3 checkpoints and their transformers goldens for tests/test_gemma3_parity.py.

The goldens come from an independent implementation: Hugging Face transformers' Gemma3ForCausalLM
(text-only files) and Gemma3ForConditionalGeneration (the multimodal 4B+ layout), run eagerly
(`attn_implementation="eager"`) in float32 (`dtype=torch.float32`; transformers v5 otherwise keeps
the checkpoint's dtype).

Every model is built to make each Gemma 3 difference from Gemma 2 visible, not to be a language model:
random RMSNorm weights everywhere, q_norm / k_norm included (a fresh model has all-zero ones, which
would hide a QK-norm applied in the wrong place only partly); 7 layers so the 5 : 1 pattern has a
global layer (5) between sliding ones; a sliding window (4) shorter than the sequence (12);
grouped-query attention with one kv head; query_pre_attn_scalar != head_dim; H * head_dim != D;
both RoPE bases (local 10,000, global 1,000,000) and, for the 4B-style model, linear scaling
(factor 8) on the global layer. The script asserts that each of these changes the logits
(`sensitivity` in meta: max |Δlogit| when the model is rebuilt with the property removed).

Variants (each a folder tests/data/gemma3/<name>/ written by save_pretrained, plus <name>.npz):
  tiny_f32         model_type gemma3_text, float32, one file, config.json as transformers 5 writes it
                   (layer_types, rope_parameters per layer type).
  tiny_bf16_shards gemma3_text, bfloat16, 2 shards + index, config.json rewritten in the older
                   layout of the Hub's 270M / 1B files (sliding_window_pattern instead of layer_types,
                   rope_theta / rope_local_base_freq at top level -- non-default values 20000 / 500,
                   so reading them matters -- rope_scaling null, torch_dtype); checked here to load
                   into transformers exactly as the original. Goldens from the bf16-rounded weights.
  tiny_4b_mm       model_type gemma3: a real (tiny) Gemma3ForConditionalGeneration with a one-layer
                   SigLIP vision tower and projector, float32; the language model's tensors are saved
                   under `language_model.model.` as on the Hub; text_config rewritten in the Hub's 4B
                   style (rope_scaling {"rope_type": "linear", "factor": 8.0}, no layer_types).
                   Checked to load into transformers exactly as the original.

Golden keys (float32 unless noted): "ids" (B, T) int64 with BOS first; "logits" (B, T, V); for every
layer L "blocks.L.hook_resid_post" (the decoder layer's output), "blocks.L.attn.hook_z" (o_proj's
input), "blocks.L.hook_mlp_in" (pre_feedforward_layernorm's output), "blocks.L.hook_mlp_out"
(post_feedforward_layernorm's output); "splice.<site>" (B, T, V): logits with that site's activations
a replaced by a * 0.5 + 0.25; "meta": a JSON string (versions, seeds, sensitivities, command).

Rerun only to regenerate (deterministic seeds), from the repo root:

    /work/refvenv/bin/python reference/make_tiny_gemma3.py            # writes tests/data/gemma3/

Needs torch and transformers (the reference venv); minisae itself never imports them.
"""

import argparse
import copy
import datetime
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile

import numpy as np
import torch
import transformers
from transformers import Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration, Gemma3TextConfig

B, T = 2, 12
BOS = 2
SPLICE_SCALE, SPLICE_SHIFT = 0.5, 0.25
KINDS = ("hook_resid_post", "attn.hook_z", "hook_mlp_in", "hook_mlp_out")

TEXT = dict(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=7, num_attention_heads=4,
            num_key_value_heads=1, head_dim=6, query_pre_attn_scalar=10, sliding_window=4, rms_norm_eps=1e-6)
VARIANTS = {
    "tiny_f32": dict(seed=11, dtype=torch.float32, shard=None, style="current", multimodal=False, text=dict(
        TEXT, rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
    "tiny_bf16_shards": dict(seed=12, dtype=torch.bfloat16, shard="20KB", style="old", multimodal=False, text=dict(
        TEXT, vocab_size=80, rms_norm_eps=1e-2,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 20_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}})),
    "tiny_4b_mm": dict(seed=13, dtype=torch.float32, shard=None, style="old", multimodal=True, text=dict(
        TEXT, vocab_size=100,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})),
}
VISION = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)


def make_model(spec, text=None):
    text = dict(spec["text"] if text is None else text)
    if spec["multimodal"]:
        cfg = Gemma3Config(text_config=text, vision_config=VISION, mm_tokens_per_image=1, boi_token_index=text["vocab_size"] - 3,
                           eoi_token_index=text["vocab_size"] - 2, image_token_index=text["vocab_size"] - 1)
        cfg._attn_implementation = "eager"  # SDPA would ignore a soft-cap (the planted-bug check below)
        cfg.text_config._attn_implementation = "eager"
        return Gemma3ForConditionalGeneration(cfg).eval()
    cfg = Gemma3TextConfig(**text)
    cfg._attn_implementation = "eager"
    return Gemma3ForCausalLM(cfg).eval()


def text_model(model):
    """The Gemma3TextModel inside either class (its .layers, .norm)."""
    return model.model.language_model if isinstance(model, Gemma3ForConditionalGeneration) else model.model


def randomise_weights(model, seed):
    """Draw every language-model weight from a seeded generator; norms (q/k norms included) random."""
    g = torch.Generator().manual_seed(seed)
    D = text_model(model).config.hidden_size
    new = {}
    for name, p in model.state_dict().items():
        shape = tuple(p.shape)
        if "vision_tower" in name or "multi_modal_projector" in name or name == "lm_head.weight":
            continue  # the vision tower keeps its init (never run); lm_head is tied
        if name.endswith("norm.weight"):
            w = -0.6 + 1.5 * torch.rand(shape, generator=g)  # stored raw w; RMSNorm multiplies by (1 + w)
        elif name.endswith("embed_tokens.weight"):
            w = torch.randn(shape, generator=g) * 0.4
        elif name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")):
            w = torch.randn(shape, generator=g) / math.sqrt(D)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            w = torch.randn(shape, generator=g) / math.sqrt(shape[1])
        else:
            raise KeyError(f"unexpected parameter {name} {shape}")
        new[name] = w
    missing, unexpected = model.load_state_dict(new, strict=False)
    assert not unexpected, unexpected
    assert all("vision_tower" in n or "multi_modal_projector" in n or n == "lm_head.weight" for n in missing), missing


def make_ids(vocab, seed):
    rng = np.random.default_rng(1000 + seed)
    ids = rng.integers(3, vocab - 3, size=(B, T), dtype=np.int64)  # no image tokens
    ids[:, 0] = BOS
    ids[1, T // 2] = 1
    return ids


def hook_modules(model, site, fn):
    parts = site.split(".")
    layer = text_model(model).layers[int(parts[1])]
    kind = ".".join(parts[2:])
    if kind == "hook_resid_post":
        return layer.register_forward_hook(lambda m, a, out: (fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple)
                                           else fn(out))
    if kind == "attn.hook_z":
        return layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: (fn(args[0]),) + tuple(args[1:]))
    if kind == "hook_mlp_in":
        return layer.pre_feedforward_layernorm.register_forward_hook(lambda m, a, out: fn(out))
    if kind == "hook_mlp_out":
        return layer.post_feedforward_layernorm.register_forward_hook(lambda m, a, out: fn(out))
    raise ValueError(site)


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.float()


def run_goldens(model, ids):
    tm = text_model(model)
    n = tm.config.num_hidden_layers
    acts, handles = {}, []
    for site in [f"blocks.{L}.{k}" for L in range(n) for k in KINDS]:
        def grab(a, site=site):
            acts[site] = a.detach().clone()
            return a
        handles.append(hook_modules(model, site, grab))
    try:
        with torch.no_grad():
            out = model(input_ids=torch.from_numpy(ids), output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hs = out.hidden_states
    for L in range(n - 1):
        assert torch.equal(hs[L + 1], acts[f"blocks.{L}.hook_resid_post"]), L
    last = acts[f"blocks.{n - 1}.hook_resid_post"]
    assert torch.equal(tm.norm(last), hs[n]) and not torch.allclose(last, hs[n])
    g = {"ids": ids, "logits": out.logits.float().numpy()}
    for site, a in acts.items():
        assert a.dtype == torch.float32
        g[site] = a.numpy()
    return g


def run_splices(model, ids, sites):
    out = {}
    for site in sites:
        h = hook_modules(model, site, lambda a: a * SPLICE_SCALE + SPLICE_SHIFT)
        try:
            out[f"splice.{site}"] = logits_of(model, ids).numpy()
        finally:
            h.remove()
    return out


def load_f32(folder, multimodal):
    cls = Gemma3ForConditionalGeneration if multimodal else Gemma3ForCausalLM
    model = cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model


def sensitivity(spec, state, ids, base):
    """max |Δlogit| when one Gemma 3 property is removed from the config (same weights)."""
    t = spec["text"]
    rp = t["rope_parameters"]
    changes = {
        "sliding_window": dict(sliding_window=64),
        "rope_bases_swapped": dict(rope_parameters={"full_attention": dict(rp["full_attention"], rope_theta=rp["sliding_attention"]["rope_theta"]),
                                                    "sliding_attention": dict(rp["sliding_attention"], rope_theta=rp["full_attention"]["rope_theta"])}),
        "final_softcap_on": dict(final_logit_softcapping=1.0),
    }
    # attn_logit_softcapping is not in this list: Gemma3Attention.forward never passes it to the
    # attention function, so transformers ignores it (asserted below); minisae does the same.
    if spec["multimodal"]:  # Gemma3ForConditionalGeneration.forward applies no final soft-cap either
        m = make_model(spec, dict(copy.deepcopy(t), **changes.pop("final_softcap_on")))
        m.load_state_dict(state)
        assert torch.equal(logits_of(m, ids), base), "transformers now soft-caps multimodal Gemma 3 logits"
    if rp["full_attention"].get("rope_type") == "linear":
        changes["no_linear_scaling"] = dict(rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": rp["full_attention"]["rope_theta"]},
                                                             "sliding_attention": rp["sliding_attention"]})
    out = {}
    m = make_model(spec, dict(copy.deepcopy(t), attn_logit_softcapping=1.0))
    m.load_state_dict(state)
    assert torch.equal(logits_of(m, ids), base), "transformers now applies attn_logit_softcapping to Gemma 3"
    for name, change in changes.items():
        m = make_model(spec, dict(copy.deepcopy(t), **change))
        assert text_model(m).config._attn_implementation == "eager"
        m.load_state_dict(state)
        out[name] = float((logits_of(m, ids) - base).abs().max())
    return out


def rewrite_old_style(folder, multimodal):
    """config.json as the Hub's 2025 files have it (transformers 4.50): no layer_types, RoPE at top level."""
    path = pathlib.Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    t = cfg["text_config"] if multimodal else cfg
    rp = t.pop("rope_parameters")
    t.pop("layer_types")
    t.pop("_sliding_window_pattern", None)
    t["sliding_window_pattern"] = 6
    t["rope_theta"] = rp["full_attention"]["rope_theta"]
    t["rope_local_base_freq"] = rp["sliding_attention"]["rope_theta"]
    full = {k: v for k, v in rp["full_attention"].items() if k != "rope_theta"}
    t["rope_scaling"] = full if full.get("rope_type", "default") != "default" else None
    cfg["torch_dtype"] = cfg.pop("dtype", "float32")
    t.pop("dtype", None)
    cfg["transformers_version"] = "4.50.0.dev0"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def build(name, spec, out_dir):
    torch.manual_seed(spec["seed"])
    model = make_model(spec)
    randomise_weights(model, spec["seed"])
    final = out_dir / name
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
    os.chmod(tmp, 0o755)
    try:
        kw = {} if spec["shard"] is None else {"max_shard_size": spec["shard"]}
        model.to(spec["dtype"]).save_pretrained(tmp, **kw)
        (tmp / "generation_config.json").unlink(missing_ok=True)
        ids = make_ids(spec["text"]["vocab_size"], spec["seed"])
        if spec["style"] == "old":
            reference = logits_of(load_f32(tmp, spec["multimodal"]), ids)
            rewrite_old_style(tmp, spec["multimodal"])
            again = logits_of(load_f32(tmp, spec["multimodal"]), ids)
            assert torch.equal(reference, again), f"{name}: old-style config.json loads differently"
        files = sorted(p.name for p in tmp.iterdir())
        if spec["shard"] is not None:
            index = json.loads((tmp / "model.safetensors.index.json").read_text())
            assert len(set(index["weight_map"].values())) >= 2, "expected >= 2 shards"

        model = load_f32(tmp, spec["multimodal"])
        tm = text_model(model)
        assert tm.config._attn_implementation == "eager"
        assert tm.config.layer_types == ["sliding_attention"] * 5 + ["full_attention", "sliding_attention"]
        g = run_goldens(model, ids)
        n = tm.config.num_hidden_layers
        g.update(run_splices(model, ids, ["blocks.3.attn.hook_z", "blocks.2.hook_mlp_in", "blocks.4.hook_mlp_out",
                                           "blocks.5.hook_resid_post", f"blocks.{n - 1}.hook_resid_post"]))
        for k, v in g.items():
            if k.startswith("splice."):
                assert not np.allclose(v, g["logits"], rtol=1e-3, atol=1e-3), f"{k} did not change the logits"
        sens = sensitivity(spec, model.state_dict(), ids, torch.from_numpy(g["logits"]))
        print(f"   sensitivity (max |dlogit| with the property removed): {json.dumps(sens)}")
        assert all(v > 1e-2 for v in sens.values()), sens
        meta = {"variant": name, "transformers": transformers.__version__, "torch": torch.__version__,
                "numpy": np.__version__, "seed": spec["seed"], "saved_dtype": str(spec["dtype"]).replace("torch.", ""),
                "config_style": spec["style"], "multimodal": spec["multimodal"], "files": files,
                "sensitivity": sens, "splice_fn": f"a * {SPLICE_SCALE} + {SPLICE_SHIFT}",
                "attn_implementation": "eager", "compute_dtype": "float32",
                "created": datetime.date.today().isoformat(), "command": "python reference/make_tiny_gemma3.py"}
        g["meta"] = np.array(json.dumps(meta, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    npz = out_dir / f"{name}.npz"
    tmp_npz = out_dir / f".{name}.npz.tmp"
    with open(tmp_npz, "wb") as f:
        np.savez_compressed(f, **g)
    os.replace(tmp_npz, npz)
    size = sum(p.stat().st_size for p in final.iterdir()) + npz.stat().st_size
    print(f"{name}: {files}  {size / 1024:.0f} KiB")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "gemma3"))
    p.add_argument("--only", nargs="*", choices=sorted(VARIANTS))
    args = p.parse_args(argv)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    for name in args.only or VARIANTS:
        build(name, VARIANTS[name], out_dir)
    total = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    print(f"total size of {out_dir}: {total / 1024:.0f} KiB")
    assert total < 2 * 1024 * 1024, "tests/data/gemma3 must stay under 2 MB"


if __name__ == "__main__":
    main()
