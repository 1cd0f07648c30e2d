"""The pipeline on a tiny Gemma 3: cache / train / eval / convert through the CLI with Gemma Scope 2's
site names, and transcoders evaluated by splicing their prediction at the MLP output."""

import json

import numpy
import pytest
from test_activations import make_tokenizer, write_texts
from tolerances import F32_ATOL, F32_RTOL

from minisae.cli import main
from minisae.eval.evaluate import evaluate_lm
from minisae.io.saefile import SAE
from minisae.models import load_model
from test_gemma3_parity import DATA

TINY3 = DATA / "tiny_f32"  # D 16, 7 layers


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    tok = make_tokenizer(folder)
    return tok, folder / "tokenizer.json", [str(p) for p in write_texts(folder, n_docs=20)]


def transcoder_folder(folder, *, zero=False, affine=True, layer=2, seed=0):
    """A random Gemma Scope 2 transcoder folder for the tiny model (D 16 -> 16, 32 latents)."""
    from minisae.io.safetensors_io import save_file

    rng = numpy.random.default_rng(seed)
    t = {"w_enc": 0.5 * rng.standard_normal((16, 32)), "w_dec": 0.3 * rng.standard_normal((32, 16)),
         "b_enc": 0.1 * rng.standard_normal(32), "b_dec": 0.1 * rng.standard_normal(16),
         "threshold": rng.uniform(0.0, 0.5, 32)}
    if affine:
        t["affine_skip_connection"] = 0.2 * rng.standard_normal((16, 16))
    if zero:
        t = {k: numpy.zeros_like(v) for k, v in t.items()}
        t["threshold"] += 1.0
    folder.mkdir(parents=True)
    save_file({k: v.astype(numpy.float32) for k, v in t.items()}, folder / "params.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "hf_hook_point_in": f"model.layers.{layer}.pre_feedforward_layernorm.output",
        "hf_hook_point_out": f"model.layers.{layer}.post_feedforward_layernorm.output", "width": 32,
        "model_name": "tiny", "architecture": "jump_relu", "l0": 5, "affine_connection": affine, "type": "transcoder"}))
    return folder


def test_transcoder_evaluate_lm(tmp_path, corpus):
    tok, _, texts = corpus
    model = load_model(TINY3)
    sae = SAE.load(transcoder_folder(tmp_path / "tc"))
    out = evaluate_lm(sae, model, tok, texts[:1], "model.layers.2.pre_feedforward_layernorm.output", seq_len=24,
                      max_tokens=200)
    assert out["site_out"] == "blocks.2.hook_mlp_out" and out["lm_tokens"] >= 200
    assert out["ce_zero"] != out["ce_clean"] and out["ce_sae"] != out["ce_clean"]
    # the FVU of the MLP output, recomputed here from one capture of both sites
    from minisae.data.activations import iter_batches

    num = den = 0.0
    ys = []
    rows_seen = 0
    for _, ids, mask in iter_batches(tok, texts[:1], 24, 2):
        acts = model.capture(ids, ["blocks.2.hook_mlp_in", "blocks.2.hook_mlp_out"])
        keep = mask & (ids != tok.bos_id)
        x, y = acts["blocks.2.hook_mlp_in"][keep], acts["blocks.2.hook_mlp_out"][keep]
        ys.append(y.astype(numpy.float64))
        num += float(((y - sae(x)).astype(numpy.float64) ** 2).sum())
        rows_seen += int((mask[:, :-1] & mask[:, 1:] & (ids[:, 1:] > 2)).sum())
        if rows_seen >= 200:
            break
    y = numpy.concatenate(ys)
    den = float(((y - y.mean(0)) ** 2).sum())
    assert out["fvu"] == pytest.approx(num / den, rel=1e-5)
    assert out["n_tokens"] == y.shape[0]


def test_zero_transcoder_is_zero_ablation(tmp_path, corpus):
    tok, _, texts = corpus
    sae = SAE.load(transcoder_folder(tmp_path / "tc", zero=True))
    out = evaluate_lm(sae, load_model(TINY3), tok, texts[:1], "blocks.2.hook_mlp_in", seq_len=24, max_tokens=100)
    assert out["ce_sae"] == pytest.approx(out["ce_zero"], rel=1e-6) and out["l0"] == 0.0
    assert out["loss_recovered"] == pytest.approx(0.0, abs=1e-6)


def test_transcoder_site_checks(tmp_path, corpus):
    tok, _, texts = corpus
    sae = SAE.load(transcoder_folder(tmp_path / "tc"))
    model = load_model(TINY3)
    with pytest.raises(ValueError, match="does not come after its input site"):
        evaluate_lm(sae, model, tok, texts[:1], "blocks.2.hook_mlp_in", site_out="blocks.1.hook_mlp_out")
    with pytest.raises(ValueError, match="does not match output site blocks.2.attn.hook_z"):
        evaluate_lm(sae, model, tok, texts[:1], "blocks.2.hook_mlp_in", site_out="blocks.2.attn.hook_z")


def test_cli_cache_train_eval_convert_on_gemma3(tmp_path, corpus, capsys):
    _, tok_path, texts = corpus
    model = ["--model", str(TINY3), "--tokenizer", str(tok_path), "--seq-len", "24", "--no-progress"]
    acts = tmp_path / "acts"
    assert main(["cache", "--site", "model.layers.3.output", "--text", *texts, "--out", str(acts),
                 "--max-tokens", "400"] + model) == 0
    assert json.loads((acts / "manifest.json").read_text())["d_in"] == 16
    run = tmp_path / "run"
    assert main(["train", "--arch", "jumprelu", "--sparsity-coeff", "1e-3", "--activations", str(acts), "--d-sae", "32",
                 "--steps", "10", "--batch-size", "64", "--warmup-steps", "2", "--sparsity-warmup-steps", "2",
                 "--eval-tokens", "64", "--out", str(run), "--no-progress"]) == 0
    gs2 = tmp_path / "gs2"
    assert main(["convert", str(run / "sae"), str(gs2), "--to", "gemma-scope-2"]) == 0
    cfg = json.loads((gs2 / "config.json").read_text())
    assert cfg["hf_hook_point_in"] == "model.layers.3.output" and cfg["type"] == "sae"
    capsys.readouterr()
    # no --site: the Gemma Scope 2 file names its own
    assert main(["eval", "--sae", str(gs2), "--text", texts[0], "--lm-tokens", "64", "--json",
                 str(tmp_path / "e.json")] + model) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["lm_tokens"] >= 64 and res["ce_zero"] > res["ce_clean"] and res["unspliced_outliers"] == 0
    # --max-norm-ratio: the cache leaves the tokens over it out and says how many; eval leaves them unspliced
    capsys.readouterr()
    assert main(["cache", "--site", "model.layers.3.output", "--text", *texts, "--out", str(tmp_path / "few"),
                 "--max-tokens", "400", "--max-norm-ratio", "1.05"] + model) == 0
    few = json.loads((tmp_path / "few" / "manifest.json").read_text())
    assert few["max_norm_ratio"] == 1.05 and few["outliers"] > 0 and f"{few['outliers']} outlier tokens left out" in capsys.readouterr().out
    assert main(["eval", "--sae", str(gs2), "--text", texts[0], "--lm-tokens", "64", "--max-norm-ratio", "1.05",
                 "--json", str(tmp_path / "e2.json")] + model) == 0
    res2 = json.loads((tmp_path / "e2.json").read_text())
    assert res2["unspliced_outliers"] > 0 and res2["ce_clean"] == res["ce_clean"] and res2["ce_sae"] != res["ce_sae"]

    tc = transcoder_folder(tmp_path / "tc")
    assert main(["eval", "--sae", str(tc), "--text", texts[0], "--lm-tokens", "64", "--json",
                 str(tmp_path / "t.json")] + model) == 0
    res = json.loads((tmp_path / "t.json").read_text())
    assert res["site_out"] == "blocks.2.hook_mlp_out" and 0 < res["fvu"] and res["l0"] > 0
    capsys.readouterr()
    assert main(["eval", "--sae", str(tc), "--activations", str(acts)]) == 2
    assert "a transcoder is evaluated on a model" in capsys.readouterr().err
    assert main(["convert", str(tc), str(tmp_path / "p.npz")]) == 2
    assert "Gemma Scope format (params.npz) holds JumpReLU SAEs only" in capsys.readouterr().err
    assert main(["convert", str(tc), str(tmp_path / "lens")]) == 0  # a SAELens transcoder folder
    back = tmp_path / "back"
    assert main(["convert", str(tmp_path / "lens"), str(back), "--to", "gemma-scope-2"]) == 0
    assert json.loads((back / "config.json").read_text()) == json.loads((tc / "config.json").read_text())


def test_eval_of_a_transcoder_whose_outputs_overflow_writes_no_nan(tmp_path, corpus, capsys):
    """A transcoder with a finite but huge W_skip (3e38) wrote NaN into eval.json with exit 0; now one
    line, exit 2, and no file."""
    from minisae.io.safetensors_io import SafetensorsFile, save_file

    _, tok_path, texts = corpus
    tc = transcoder_folder(tmp_path / "tc")
    with SafetensorsFile(tc / "params.safetensors") as f:
        t = {k: f.get(k) for k in f.keys()}
    t["affine_skip_connection"] = numpy.full_like(t["affine_skip_connection"], 3e38)
    save_file(t, tc / "params.safetensors")
    capsys.readouterr()
    assert main(["eval", "--sae", str(tc), "--text", texts[0], "--lm-tokens", "64", "--json", str(tmp_path / "t.json"),
                 "--model", str(TINY3), "--tokenizer", str(tok_path), "--seq-len", "24", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "non-finite" in err[0] and not (tmp_path / "t.json").exists()
