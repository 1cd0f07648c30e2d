"""Write tiny random Gemma 2 checkpoints and their transformers goldens for tests/test_gemma2_parity.py.

The goldens come from an independent implementation: Hugging Face transformers' Gemma2ForCausalLM,
run eagerly (`attn_implementation="eager"`; SDPA would skip the attention soft-cap) in float32
(`dtype=torch.float32` explicitly; transformers v5 otherwise loads in the checkpoint's dtype).

Each model is built to exercise every Gemma 2 quirk, not to be a realistic language model:
random RMSNorm weights (a fresh model has all-zero ones), weights scaled up until both tanh
soft-caps act on a good share of their inputs (the fractions are printed), a sliding window shorter
than the sequence, grouped-query attention, `query_pre_attn_scalar != head_dim`, and
`H * head_dim != hidden_size` so attn.hook_z is wider than the residual stream.

Variants (each a folder `tests/data/gemma2/<name>/` written by `save_pretrained`, plus
`tests/data/gemma2/<name>.npz` with the goldens):
  tiny_f32         float32, one model.safetensors, config.json as transformers writes it today.
  tiny_bf16_shards bfloat16, sharded (model.safetensors.index.json + >= 2 shards); goldens are
                   computed from the bf16-rounded weights upcast to float32.
  tiny_oldconfig   float32, config.json rewritten in the older style of the Hub's Gemma 2 files:
                   `rope_theta` at top level (non-default value), no `layer_types`, `torch_dtype`
                   instead of `dtype`, `hidden_act` beside `hidden_activation`; an odd layer
                   count and a large rms_norm_eps (1e-2, so reading it matters). Checked here to load into transformers
                   exactly as the original.
  tiny_f16_types   float16, with an explicit, non-alternating `layer_types` list that a loader must
                   honour instead of assuming "sliding on even layers".

Golden keys (float32 unless noted):
  "ids" (B, T) int64, BOS (2) first in every row; "logits" (B, T, V);
  "blocks.L.hook_resid_post" (B, T, D), "blocks.L.attn.hook_z" (B, T, H*head_dim),
  "blocks.L.hook_mlp_out" (B, T, D) for every layer L;
  "splice.<site>" (B, T, V): logits when that site's activations a are replaced by
  `a * 0.5 + 0.25` (SPLICE_SCALE, SPLICE_SHIFT) -- tests Gemma2Model.forward(ids, splice=...);
  "meta": a JSON string (transformers/torch versions, seeds, soft-cap statistics, command).

Sites use the SAELens / TransformerLens names that Gemma Scope uses: resid_post is the decoder
layer's output (a forward hook; for the last layer HF's hidden_states[-1] already has the final norm
applied, so hooks are used for all layers and checked against hidden_states[L+1] for the others);
hook_z is the input of o_proj (a forward pre-hook); hook_mlp_out is the output of post_feedforward_layernorm.

The files are committed; rerun only to regenerate them (deterministic seeds), from the repo root:

    /work/venvs/ref/bin/python reference/make_tiny_gemma2.py            # writes tests/data/gemma2/
    /work/venvs/ref/bin/python reference/make_tiny_gemma2.py --out /tmp/g2   # elsewhere

Needs torch and transformers (the reference venv); minisae itself never imports them.
"""

import argparse
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
from transformers import Gemma2Config, Gemma2ForCausalLM
from transformers.models.gemma2 import modeling_gemma2

B, T = 2, 12
BOS = 2
SPLICE_SCALE, SPLICE_SHIFT = 0.5, 0.25

# name -> (config kwargs, weight-scale kwargs, seed, save dtype, config style)
VARIANTS = {
    "tiny_f32": dict(
        seed=1,
        dtype=torch.float32,
        shard=None,
        style="current",
        config=dict(
            vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=20,
            sliding_window=4, attn_logit_softcapping=8.0, final_logit_softcapping=4.0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    "tiny_bf16_shards": dict(
        seed=2,
        dtype=torch.bfloat16,
        shard="120KB",
        style="current",
        config=dict(
            vocab_size=200, hidden_size=48, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
            sliding_window=5, attn_logit_softcapping=6.0, final_logit_softcapping=5.0,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    "tiny_oldconfig": dict(
        seed=3,
        dtype=torch.float32,
        shard=None,
        style="old",
        config=dict(
            vocab_size=160, hidden_size=32, intermediate_size=80, num_hidden_layers=3,
            num_attention_heads=8, num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12,
            sliding_window=3, attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
            rms_norm_eps=1e-2, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        ),
    ),
    "tiny_f16_types": dict(
        seed=4,
        dtype=torch.float16,
        shard=None,
        style="current",
        config=dict(
            vocab_size=128, hidden_size=40, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=16,
            sliding_window=4, attn_logit_softcapping=7.0, final_logit_softcapping=4.0,
            layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
}


def randomise_weights(model, seed):
    """Draw every weight from a seeded generator, scaled so the soft-caps act (see module docstring)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    D = cfg.hidden_size

    def normal(shape, std):
        return torch.randn(shape, generator=g, dtype=torch.float32) * std

    def uniform(shape, lo, hi):
        return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float32)

    new = {}
    for name, p in model.state_dict().items():
        shape = tuple(p.shape)
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            w = uniform(shape, -0.6, 0.9)  # stored raw w; RMSNorm multiplies by (1 + w)
        elif name == "model.embed_tokens.weight":
            w = normal(shape, 0.4)  # also the tied unembedding: sets the final-logit scale
        elif name.endswith(("q_proj.weight", "k_proj.weight")):
            w = normal(shape, 1.6 / math.sqrt(D))  # large q/k: attention scores reach the cap
        elif name.endswith(("v_proj.weight", "gate_proj.weight", "up_proj.weight")):
            w = normal(shape, 1.0 / math.sqrt(D))
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            w = normal(shape, 1.0 / math.sqrt(shape[1]))
        elif name == "lm_head.weight":
            continue  # tied to embed_tokens
        else:
            raise KeyError(f"unexpected parameter {name} {shape}")
        new[name] = w
    missing, unexpected = model.load_state_dict(new, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "lm_head not tied"


def make_ids(vocab, seed):
    """(B, T) int64; BOS first in every row, then random tokens; row 1 also carries an EOS (1)."""
    rng = np.random.default_rng(1000 + seed)
    ids = rng.integers(3, vocab, size=(B, T), dtype=np.int64)
    ids[:, 0] = BOS
    ids[1, T // 2] = 1
    return ids


def softcap_stats(model, ids_t):
    """Fractions of soft-cap inputs s with |s| > c/2 and |s| > c (attention: visible entries only)."""
    cfg = model.config
    seen = []
    original = modeling_gemma2.eager_attention_forward

    def recording(module, query, key, value, attention_mask, scaling=None, softcap=None, **kw):
        k = modeling_gemma2.repeat_kv(key, module.num_key_value_groups)
        s = torch.matmul(query, k.transpose(2, 3)) * scaling  # (B, H, T, T) before the cap
        visible = attention_mask == 0 if attention_mask is not None else torch.ones_like(s, dtype=torch.bool)
        seen.append(s.masked_select(visible.expand_as(s)).abs())
        return original(module, query, key, value, attention_mask, scaling=scaling, softcap=softcap, **kw)

    pre = {}
    h = model.lm_head.register_forward_hook(lambda m, i, o: pre.__setitem__("logits", o.detach()))
    modeling_gemma2.eager_attention_forward = recording
    try:
        with torch.no_grad():
            model(input_ids=ids_t)
    finally:
        modeling_gemma2.eager_attention_forward = original
        h.remove()
    a = torch.cat(seen)
    c_a, c_f = cfg.attn_logit_softcapping, cfg.final_logit_softcapping
    lg = pre["logits"].abs()
    return {
        "attn_frac_above_half_cap": float((a > c_a / 2).float().mean()),
        "attn_frac_above_cap": float((a > c_a).float().mean()),
        "attn_max_abs_score": float(a.max()),
        "final_frac_above_half_cap": float((lg > c_f / 2).float().mean()),
        "final_frac_above_cap": float((lg > c_f).float().mean()),
        "final_max_abs_logit": float(lg.max()),
    }


def site_names(n_layers):
    return [f"blocks.{L}.{kind}" for L in range(n_layers) for kind in ("hook_resid_post", "attn.hook_z", "hook_mlp_out")]


def hook_modules(model, site, fn):
    """Register the hook that passes a site's activations through fn (returns a value to replace them)."""
    parts = site.split(".")
    layer = model.model.layers[int(parts[1])]
    kind = ".".join(parts[2:])
    if kind == "hook_resid_post":
        def post(m, args, out):
            if isinstance(out, tuple):
                return (fn(out[0]),) + tuple(out[1:])
            return fn(out)
        return layer.register_forward_hook(post)
    if kind == "attn.hook_z":
        return layer.self_attn.o_proj.register_forward_pre_hook(lambda m, args: (fn(args[0]),) + tuple(args[1:]))
    if kind == "hook_mlp_out":
        return layer.post_feedforward_layernorm.register_forward_hook(lambda m, args, out: fn(out))
    raise ValueError(f"unknown site {site!r}")


def run_goldens(model, ids):
    """Logits and every site in one eager float32 pass, cross-checked against output_hidden_states."""
    n = model.config.num_hidden_layers
    ids_t = torch.from_numpy(ids)
    acts, handles = {}, []
    for site in site_names(n):
        def grab(a, site=site):
            acts[site] = a.detach().clone()
            return a
        handles.append(hook_modules(model, site, grab))
    try:
        with torch.no_grad():
            out = model(input_ids=ids_t, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    hs = out.hidden_states
    assert len(hs) == n + 1
    for L in range(n - 1):
        assert torch.equal(hs[L + 1], acts[f"blocks.{L}.hook_resid_post"]), f"hidden_states[{L + 1}] != hook"
    # HF's last hidden state is after the final norm; the hooked one must be before it.
    last = acts[f"blocks.{n - 1}.hook_resid_post"]
    assert torch.allclose(model.model.norm(last), hs[n], rtol=0, atol=0), "last hidden state is not norm(resid_post)"
    assert not torch.allclose(last, hs[n]), "final norm had no effect"
    g = {"ids": ids, "logits": out.logits.float().numpy()}
    for site, a in acts.items():
        assert a.dtype == torch.float32, (site, a.dtype)
        g[site] = a.numpy()
    return g


def run_splices(model, ids, sites):
    out = {}
    for site in sites:
        h = hook_modules(model, site, lambda a: a * SPLICE_SCALE + SPLICE_SHIFT)
        try:
            with torch.no_grad():
                out[f"splice.{site}"] = model(input_ids=torch.from_numpy(ids)).logits.float().numpy()
        finally:
            h.remove()
    return out


def load_f32(folder):
    model = Gemma2ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    assert model.config._attn_implementation == "eager"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model


def rewrite_old_style(folder):
    """Rewrite config.json in the style of the Hub's 2024 Gemma 2 files (transformers 4.42)."""
    path = pathlib.Path(folder) / "config.json"
    cfg = json.loads(path.read_text())
    old = {
        "architectures": ["Gemma2ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": cfg["attn_logit_softcapping"],
        "bos_token_id": 2,
        "cache_implementation": "hybrid",
        "eos_token_id": 1,
        "final_logit_softcapping": cfg["final_logit_softcapping"],
        "head_dim": cfg["head_dim"],
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": cfg["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": cfg["intermediate_size"],
        "max_position_embeddings": 8192,
        "model_type": "gemma2",
        "num_attention_heads": cfg["num_attention_heads"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_key_value_heads": cfg["num_key_value_heads"],
        "pad_token_id": 0,
        "query_pre_attn_scalar": cfg["query_pre_attn_scalar"],
        "rms_norm_eps": cfg["rms_norm_eps"],
        "rope_theta": cfg["rope_parameters"]["rope_theta"],
        "sliding_window": cfg["sliding_window"],
        "torch_dtype": "float32",
        "transformers_version": "4.42.4",
        "use_cache": True,
        "vocab_size": cfg["vocab_size"],
    }
    path.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")


def build(name, spec, out_dir):
    torch.manual_seed(spec["seed"])
    config = Gemma2Config(**spec["config"])
    model = Gemma2ForCausalLM(config)
    model.eval()
    randomise_weights(model, spec["seed"])

    final = out_dir / name
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out_dir))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the committed folder should not be
    try:
        kw = {} if spec["shard"] is None else {"max_shard_size": spec["shard"]}
        model.to(spec["dtype"]).save_pretrained(tmp, **kw)
        if spec["style"] == "old":
            reference = load_f32(tmp)
            rewrite_old_style(tmp)
        files = sorted(p.name for p in tmp.iterdir())
        if spec["shard"] is not None:
            index = json.loads((tmp / "model.safetensors.index.json").read_text())
            n_shards = len(set(index["weight_map"].values()))
            assert n_shards >= 2, f"{name}: expected >= 2 shards, got {n_shards}"
        else:
            assert "model.safetensors" in files, files

        model = load_f32(tmp)  # goldens always from what is on disk, upcast to float32
        ids = make_ids(model.config.vocab_size, spec["seed"])
        if spec["style"] == "old":
            c = model.config
            assert c.layer_types == [("sliding_attention" if i % 2 == 0 else "full_attention") for i in range(c.num_hidden_layers)]
            assert c.rope_parameters["rope_theta"] == spec["config"]["rope_parameters"]["rope_theta"]
            assert c.hidden_activation == "gelu_pytorch_tanh" and c.rms_norm_eps == spec["config"]["rms_norm_eps"]
            with torch.no_grad():
                a = reference(input_ids=torch.from_numpy(ids)).logits
                b = model(input_ids=torch.from_numpy(ids)).logits
            assert torch.equal(a, b), "old-style config.json loads differently"
        if "layer_types" in spec["config"]:
            assert model.config.layer_types == spec["config"]["layer_types"]

        stats = softcap_stats(model, torch.from_numpy(ids))
        g = run_goldens(model, ids)
        n = model.config.num_hidden_layers
        mid = n // 2
        g.update(run_splices(model, ids, [f"blocks.{mid}.attn.hook_z", f"blocks.{mid - 1}.hook_mlp_out",
                                           f"blocks.{mid}.hook_resid_post", f"blocks.{n - 1}.hook_resid_post"]))
        for k, v in g.items():
            if k.startswith("splice."):
                assert not np.allclose(v, g["logits"], rtol=1e-3, atol=1e-3), f"{k} did not change the logits"
        meta = {
            "variant": name,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "seed": spec["seed"],
            "saved_dtype": str(spec["dtype"]).replace("torch.", ""),
            "config_style": spec["style"],
            "files": files,
            "softcap_stats": stats,
            "splice_fn": f"a * {SPLICE_SCALE} + {SPLICE_SHIFT}",
            "attn_implementation": "eager",
            "compute_dtype": "float32",
            "created": datetime.date.today().isoformat(),
            "command": "python reference/make_tiny_gemma2.py",
        }
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
    print(f"{name}: {files}  {size / 1024:.0f} KiB  V={model.config.vocab_size} D={model.config.hidden_size} "
          f"layers={n} layer_types={model.config.layer_types}")
    print("   soft-caps:", json.dumps(stats))
    # both soft-caps must act on a real share of their inputs, yet not saturate everything
    assert stats["attn_frac_above_half_cap"] > 0.15 and stats["attn_frac_above_cap"] < 0.8, stats
    assert stats["final_frac_above_half_cap"] > 0.15 and stats["final_frac_above_cap"] < 0.8, stats


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent.parent / "tests" / "data" / "gemma2"))
    p.add_argument("--only", nargs="*", choices=sorted(VARIANTS), help="variants to (re)build (default: all)")
    args = p.parse_args(argv)
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # fixed summation order, reproducible files
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    for name in args.only or VARIANTS:
        build(name, VARIANTS[name], out_dir)
    total = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    print(f"total size of {out_dir}: {total / 1024:.0f} KiB")
    assert total < 5 * 1024 * 1024, "tests/data/gemma2 must stay under 5 MB"


if __name__ == "__main__":
    main()
