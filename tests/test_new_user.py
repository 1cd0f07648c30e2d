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


# --- 12. minisae --version --------------------------------------------------------------------

def test_version_flag_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"minisae {minisae.__version__}"
