"""The `minisae` command end to end: --help everywhere, train → eval → convert on synthetic data,
`compare --quick` on synthetic data and on a tiny random Gemma 2 (cache → train → delta LM loss),
and user errors that end in one clear line with exit status 2 and leave files alone."""

import json

import numpy
import pytest
from test_activations import SITE, TINY, make_tokenizer, write_texts
from tolerances import F32_ATOL, F32_RTOL

from minisae.cli import main
from minisae.io.saefile import SAE

SUBCOMMANDS = ["train", "eval", "compare", "cache", "convert"]
TINY_TRAIN = ["--d-in", "16", "--n-features", "32", "--true-l0", "3", "--max-freq", "0.2", "--d-sae", "32", "--steps", "20",
              "--batch-size", "128", "--warmup-steps", "2", "--sparsity-warmup-steps", "5", "--lr", "3e-3",
              "--eval-tokens", "1024", "--checkpoint-every", "10", "--no-progress"]


def _error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_import_sets_the_openblas_spin_before_numpy_loads():
    """`import minisae` loads no NumPy and sets OpenBLAS's idle spin short (read when OpenBLAS
    loads, so it must come first), keeping a value the user set."""
    import os
    import subprocess
    import sys

    code = "import os, sys, minisae; print(os.environ['OPENBLAS_THREAD_TIMEOUT'], 'numpy' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["16", "False"]
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, OPENBLAS_THREAD_TIMEOUT="28"),
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["28", "False"]


@pytest.mark.parametrize("cmd", [None] + SUBCOMMANDS)
def test_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main(([cmd] if cmd else []) + ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: minisae") and (cmd is None or f"minisae {cmd}" in out)


def test_train_eval_convert(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--arch", "jumprelu", "--sparsity-coeff", "1e-2", "--out", str(run)] + TINY_TRAIN) == 0
    assert "fvu=" in capsys.readouterr().out
    # eval finds the run's own (synthetic) data through run/config.json
    assert main(["eval", "--sae", str(run / "sae"), "--eval-tokens", "2048", "--json", str(tmp_path / "e.json"),
                 "--no-progress"]) == 0
    ev = json.loads((tmp_path / "e.json").read_text())
    assert 0 < ev["fvu"] < 1 and "mmcs" in ev and len(ev["firing_freq"]) == 32
    # SAELens folder -> Gemma Scope npz -> SAELens folder keeps the SAE
    assert main(["convert", str(run / "sae"), str(tmp_path / "gs" / "params.npz")]) == 0
    assert main(["convert", str(tmp_path / "gs" / "params.npz"), str(tmp_path / "back")]) == 0
    a, b = SAE.load(run / "sae"), SAE.load(tmp_path / "back")
    x = numpy.random.default_rng(0).standard_normal((64, 16)).astype(numpy.float32)
    numpy.testing.assert_allclose(b(x), a(x), rtol=F32_RTOL, atol=F32_ATOL)
    capsys.readouterr()
    assert main(["convert", str(run / "sae"), str(tmp_path / "back")]) == 2  # exists, no --overwrite
    assert "not empty" in _error_line(capsys)


def test_train_target_l0_and_synthsaebench_preset(tmp_path, capsys):
    # --target-l0 drives Gated's λ (the controller); TopK takes k from it; a SynthSAEBench preset
    # run is evaluated with the ground-truth metrics, also by `minisae eval` from the run folder
    run = tmp_path / "g"
    assert main(["train", "--arch", "gated", "--target-l0", "4", "--log-every", "2", "--out", str(run)] + TINY_TRAIN) == 0
    lambdas = {json.loads(line)["sparsity_coeff"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert len(lambdas) > 2
    assert main(["train", "--arch", "topk", "--target-l0", "3", "--out", str(tmp_path / "t")] + TINY_TRAIN) == 0
    assert json.loads((tmp_path / "t" / "config.json").read_text())["train"]["k"] == 3
    tiny = ["--steps", "20", "--batch-size", "64", "--d-sae", "32", "--eval-tokens", "512", "--no-progress",
            "--warmup-steps", "2", "--sparsity-warmup-steps", "2"]
    ssb = tmp_path / "ssb"
    assert main(["train", "--arch", "topk", "--k", "4", "--preset", "synthsaebench-cpu", "--out", str(ssb)] + tiny) == 0
    ev = json.loads((ssb / "eval.json").read_text())
    assert {"mcc", "f1", "precision", "recall", "uniqueness", "explained_variance", "shrinkage"} <= set(ev)
    capsys.readouterr()
    assert main(["train", "--arch", "topk", "--k", "4", "--preset", "synthsaebench-cpu", "--d-in", "8",
                 "--out", str(tmp_path / "bad")] + tiny) == 2
    assert "--d-in applies to --preset toy only" in _error_line(capsys)


def test_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    assert main(["eval", "--sae", str(tmp_path / "nope")]) == 2
    assert "nope" in _error_line(capsys)
    assert main(["train", "--arch", "topk", "--out", str(tmp_path / "r")] + TINY_TRAIN) == 2
    assert "--k is required for --arch topk" in _error_line(capsys)
    run = tmp_path / "run"
    assert main(["train", "--arch", "topk", "--k", "3", "--out", str(run)] + TINY_TRAIN) == 0
    capsys.readouterr()
    assert main(["train", "--arch", "topk", "--k", "3", "--out", str(run)] + TINY_TRAIN) == 2
    assert "--resume" in _error_line(capsys)
    ckpt = next((run / "checkpoint").glob("step-*/shard-00000.safetensors"))
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    assert main(["train", "--arch", "topk", "--k", "3", "--out", str(run), "--resume"] + TINY_TRAIN) == 2
    assert "truncated or corrupt" in _error_line(capsys) and ckpt.stat().st_size == 100
    assert main(["train", "--arch", "gated", "--sparsity-coeff", "1", "--activations", str(tmp_path),
                 "--out", str(tmp_path / "r2")] + TINY_TRAIN) == 2
    assert "manifest" in _error_line(capsys)


def test_compare_quick_synthetic(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--quick", "--out", str(out), "--no-progress"]) == 0
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    for title in ("## Verdict", "## Results", "Explained variance at matched L0", "MCC at matched L0",
                  "F1 at matched L0", "arXiv 2407.14435", "Dead latents are not expected"):
        assert title in report, title
    runs = results["runs"]
    assert len(runs) == 3 * 2 * 2  # 3 variants × 2 targets × 2 seeds
    assert {(r["variant"], r["target"], r["seed"]) for r in runs} == {
        (v, t, s) for v in ("jumprelu", "gated", "topk") for t in (2.0, 4.0) for s in (0, 1)}
    for r in runs:
        assert r["l0"] > 0 and 0 < r["explained_variance"] <= 1 and 0 <= r["mcc"] <= 1 and 0 <= r["f1"] <= 1
        assert isinstance(r["pathological"], bool) and (out / r["run_dir"] / "sae" / "cfg.json").is_file()
        if r["variant"] == "topk":
            assert r["l0"] <= r["target"] + 1e-9 and r["setting"] == f"k={r['target']:g}"
    summary = {(s["variant"], s["target"]): s for s in results["summary"]}
    assert summary["topk", 4.0]["explained_variance"][1] is not None  # mean ± sd over two seeds
    # the claim's verdict follows from the pairs with JumpReLU: None when none was judged, False
    # when JumpReLU is measurably worse in one, else True; and the text says the same
    pairs = [p for e in results["verdict"]["explained_variance"]["per_target"] for p in e["pairs"]
             if "jumprelu" in (p["a"], p["b"])]
    jumprelu_worse = any(p["better"] != "tie" and (p["better"] == "a") != (p["a"] == "jumprelu") for p in pairs)
    claim = results["verdict"]["paper_claim"]
    assert claim["holds"] is (None if not pairs else not jumprelu_worse)
    says = {None: "it cannot be judged here", False: "it does not hold here", True: "it holds here"}
    assert says[claim["holds"]] in claim["text"]
    assert (out / "data" / "manifest.json").is_file()  # the synthetic samples, as an activation cache
    try:
        import matplotlib  # noqa: F401  (the optional `plot` extra)
    except ImportError:
        assert not (out / "pareto.png").exists() and "matplotlib" in results["plot"]
    else:
        assert (out / "pareto.png").is_file() and results["plot"] == "pareto.png"
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert main(["compare", "--quick", "--out", str(out), "--no-progress"]) == 2
    assert "--overwrite" in _error_line(capsys)
    assert (out / "results.json").read_bytes() == before
    # --resume finishes from the runs' checkpoints: the same numbers again
    assert main(["compare", "--quick", "--out", str(out), "--no-progress", "--resume"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert [r["explained_variance"] for r in again["runs"]] == [r["explained_variance"] for r in runs]


def test_cache_and_compare_on_tiny_gemma2(tmp_path, capsys):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    make_tokenizer(tok_dir)
    texts = [str(p) for p in write_texts(tmp_path, n_docs=30)]
    model = ["--model", str(TINY), "--tokenizer", str(tok_dir / "tokenizer.json"), "--seq-len", "32"]
    acts = tmp_path / "acts"
    assert main(["cache", "--site", SITE, "--text", *texts, "--out", str(acts), "--max-tokens", "500",
                 "--no-progress"] + model) == 0
    man = json.loads((acts / "manifest.json").read_text())
    assert man["complete"] and man["count"] == 500 and man["d_in"] == 64
    out = tmp_path / "cmp"
    assert main(["compare", "--quick", "--out", str(out), "--site", SITE, "--text", *texts, "--tokens", "1500",
                 "--d-sae", "128", "--no-progress"] + model) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["data"]["type"] == "gemma2" and results["data"]["d_in"] == 64
    assert results["config"]["max_norm_ratio"] == 5.0 and results["data"]["max_norm_ratio"] == 5.0  # the default
    assert "Massive activations: tokens whose activation norm exceeds 5 ×" in (out / "report.md").read_text()
    for r in results["runs"]:
        assert r["lm_tokens"] >= 256 and r["ce_zero"] > r["ce_clean"]
        assert r["delta_lm_loss"] == pytest.approx(r["ce_sae"] - r["ce_clean"])
    report = (out / "report.md").read_text()
    assert "ΔLM loss" in report and "Delta LM loss at matched L0" in report
    # an SAE of the wrong width for the site: one line, status 2
    capsys.readouterr()
    sae_dir = out / results["runs"][0]["run_dir"] / "sae"
    assert main(["eval", "--sae", str(sae_dir), "--site", "blocks.0.attn.hook_z", "--text", texts[0],
                 "--no-progress"] + model) == 2
    assert "d_in=64 does not match site blocks.0.attn.hook_z" in _error_line(capsys)


def test_compare_on_a_model_takes_the_model_defaults_where_no_flag_is_given(tmp_path, monkeypatch):
    """compare --model without --quick: M = 4 × the site's width, the real pilot grid, the real
    targets and a norm ratio of 5 (experiment.compare.model_defaults), each flag overriding its
    own; the sweep itself is stubbed (its runs are what the other tests check)."""
    from minisae.experiment import compare

    seen = []

    def fake_run(cfg, out, **kw):
        seen.append(cfg)
        return {"wall_seconds": 0.0, "verdict": {}}

    monkeypatch.setattr(compare, "run_compare", fake_run)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    make_tokenizer(tok_dir)
    texts = [str(p) for p in write_texts(tmp_path, n_docs=30)]
    model = ["--model", str(TINY), "--tokenizer", str(tok_dir / "tokenizer.json"), "--seq-len", "32"]
    base = ["compare", "--site", SITE, "--text", *texts, "--tokens", "300", "--no-progress"] + model
    assert main(base + ["--out", str(tmp_path / "a")]) == 0
    want = compare.model_defaults(64)
    assert (seen[0].d_sae, seen[0].pilot_lrs, seen[0].targets, seen[0].max_norm_ratio) == (
        256, want["pilot_lrs"], want["targets"], 5.0) and want["tokens"] == compare.REAL_TOKENS
    assert main(base + ["--out", str(tmp_path / "b"), "--d-sae", "96", "--targets", "3", "6",
                        "--pilot-lrs", "0.02", "--max-norm-ratio", "none"]) == 0
    assert (seen[1].d_sae, seen[1].pilot_lrs, seen[1].targets, seen[1].max_norm_ratio) == (96, [0.02], [3.0, 6.0], None)
    assert "d_sae" not in compare.model_defaults(64, quick=True)  # --quick keeps its smoke-test sizes
