"""Training with the 2025-26 recipes: JumpReLU with the quadratic L0 penalty, raw thresholds and the
frequency penalty (and, through the CLI, the same flags): runs end to end, resumes bitwise,
saves a release SAE that reconstructs like the training parameters."""

import json

import numpy
import pytest
from tolerances import F32_ATOL, F32_RTOL

from minisae.cli import main
from minisae.io.saefile import SAE
from minisae.sae import batchtopk, jumprelu
from minisae.training.train import TrainConfig, read_state, train
from test_cli import TINY_TRAIN
from test_train import Faulty, Interrupt, _metrics, tiny_config, tiny_source

RECIPE = dict(penalty="quadratic", target_l0=3.0, threshold_param="raw", threshold_init=0.05,
              freq_coeff=1.0, freq_target=0.3)


def test_recipe_trains_saves_and_resumes_bitwise(tmp_path):
    cfg = tiny_config("jumprelu", steps=30, checkpoint_every=10, log_every=3, **RECIPE)
    straight = train(cfg, tiny_source(), tmp_path / "a", progress=False)
    assert set(straight.params) == set(jumprelu.PARAM_NAMES_RAW)
    assert numpy.all(straight.params["threshold"] >= 0.0)
    assert not numpy.all(straight.params["threshold"] == numpy.float32(0.05)), "theta never moved"
    with pytest.raises(Interrupt):
        train(cfg, Faulty(tiny_source(), 25, "interrupt"), tmp_path / "b", progress=False)
    assert read_state(tmp_path / "b", cfg.resolved(16))["step"] == 20
    resumed = train(cfg, tiny_source(), tmp_path / "b", resume=True, progress=False)
    for k, v in straight.params.items():
        assert numpy.array_equal(v, resumed.params[k]), f"{k} differs after resume"
    assert _metrics(tmp_path / "a" / "metrics.jsonl") == _metrics(tmp_path / "b" / "metrics.jsonl")
    # the release file: threshold = C * theta, reconstructs as the training parameters do
    x_raw = tiny_source().sample(256, offset=7)
    sae = SAE.load(tmp_path / "a" / "sae")
    out, _ = jumprelu.forward(straight.params, x_raw / straight.scale, sparsity_coeff=0.0)
    numpy.testing.assert_allclose(sae(x_raw), straight.scale * out["xhat"], rtol=F32_RTOL, atol=F32_ATOL)
    numpy.testing.assert_allclose(sae.params["threshold"], straight.scale * straight.params["threshold"],
                                  rtol=F32_RTOL)


def test_recipe_config_errors():
    with pytest.raises(ValueError, match="target_l0"):
        TrainConfig("jumprelu", sparsity_coeff=1.0, steps=1, penalty="quadratic").resolved(4)
    with pytest.raises(ValueError, match="threshold_param"):
        TrainConfig("jumprelu", sparsity_coeff=1.0, steps=1, threshold_param="exp").resolved(4)
    with pytest.raises(ValueError, match="JumpReLU options"):
        TrainConfig("gated", sparsity_coeff=1.0, steps=1, penalty="quadratic", target_l0=3).resolved(4)


def test_cli_recipe_flags(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--arch", "jumprelu", "--sparsity-coeff", "1e-2", "--penalty", "quadratic",
            "--target-l0", "3", "--threshold-param", "raw", "--freq-coeff", "0.5", "--out", str(run)] + TINY_TRAIN
    assert main(args) == 0
    saved = json.loads((run / "config.json").read_text())["train"]
    assert (saved["penalty"], saved["target_l0"], saved["threshold_param"], saved["freq_coeff"]) == \
        ("quadratic", 3.0, "raw", 0.5)
    assert SAE.load(run / "sae").architecture == "jumprelu"


@pytest.mark.parametrize("matryoshka", [None, [8, 20]])
def test_batchtopk_trains_resumes_bitwise_and_saves_a_jumprelu(tmp_path, matryoshka):
    cfg = tiny_config("topk", architecture="batchtopk", k=4, d_sae=64, dead_window_tokens=128, steps=30,
                      checkpoint_every=10, log_every=3, matryoshka=matryoshka)
    straight = train(cfg, tiny_source(), tmp_path / "a", progress=False)
    rows = _metrics(tmp_path / "a" / "metrics.jsonl")
    assert rows[-1]["mse"] < 0.75 * rows[0]["mse"]
    assert all(r["threshold"] > 0 for r in rows) and rows[0]["threshold"] != rows[-1]["threshold"]
    with pytest.raises(Interrupt):
        train(cfg, Faulty(tiny_source(), 25, "interrupt"), tmp_path / "b", progress=False)
    state = read_state(tmp_path / "b", cfg.resolved(16))
    assert state["step"] == 20 and state["threshold_updates"] == 20
    resumed = train(cfg, tiny_source(), tmp_path / "b", resume=True, progress=False)
    for k, v in straight.params.items():
        assert numpy.array_equal(v, resumed.params[k]), f"{k} differs after resume"
    assert _metrics(tmp_path / "a" / "metrics.jsonl") == rows == _metrics(tmp_path / "b" / "metrics.jsonl")
    # released as a JumpReLU with one global threshold C * theta; encodes as batchtopk.encode(threshold=theta)
    sae = SAE.load(tmp_path / "a" / "sae")
    assert sae.architecture == "jumprelu" and sae.cfg["apply_b_dec_to_input"]
    theta = rows[-1]["threshold"]
    numpy.testing.assert_allclose(sae.params["threshold"], straight.scale * theta, rtol=F32_RTOL)
    x_raw = tiny_source().sample(256, offset=7)
    f = batchtopk.encode(straight.params, x_raw / straight.scale, threshold=theta)
    numpy.testing.assert_allclose(sae.encode(x_raw), straight.scale * f, rtol=F32_RTOL, atol=F32_ATOL)
    assert 0 < straight.summary["l0"] < 64


def test_cli_batchtopk_matryoshka(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--arch", "batchtopk", "--k", "3", "--matryoshka", "8,16", "--out", str(run)]
                + TINY_TRAIN) == 0
    assert json.loads((run / "config.json").read_text())["train"]["matryoshka"] == [8, 16, 32]
    assert SAE.load(run / "sae").architecture == "jumprelu"
    with pytest.raises(SystemExit) as e:  # argparse: usage and the one-line reason, status 2
        main(["train", "--arch", "batchtopk", "--k", "3", "--matryoshka", "8,x", "--out", str(tmp_path / "r2")]
             + TINY_TRAIN)
    assert e.value.code == 2


def test_jumprelu_matryoshka_trains_and_saves_a_jumprelu(tmp_path):
    cfg = tiny_config("jumprelu", steps=20, matryoshka=[4, 16], **RECIPE)
    res = train(cfg, tiny_source(), tmp_path, progress=False)
    assert res.sae.architecture == "jumprelu" and 0 < res.summary["fvu"] < 1
    assert json.loads((tmp_path / "config.json").read_text())["train"]["matryoshka"] == [4, 16, 32]
    with pytest.raises(ValueError, match="matryoshka"):
        TrainConfig("gated", sparsity_coeff=1.0, steps=1, matryoshka=[4]).resolved(4)


def test_saelens_options_train(tmp_path):
    cfg = tiny_config("jumprelu", steps=20, penalty="tanh", tanh_scale=2.0, pre_act_coeff=1e-3, ste_to_input=True,
                      threshold_param="raw", threshold_init=0.05)
    res = train(cfg, tiny_source(), tmp_path, progress=False)
    assert res.sae.architecture == "jumprelu" and 0 < res.summary["fvu"] < 1
    args = ["train", "--arch", "jumprelu", "--sparsity-coeff", "1e-2", "--penalty", "tanh", "--tanh-scale", "2",
            "--pre-act-coeff", "1e-3", "--ste-to-input", "--out", str(tmp_path / "cli")] + TINY_TRAIN
    assert main(args) == 0
    saved = json.loads((tmp_path / "cli" / "config.json").read_text())["train"]
    assert (saved["penalty"], saved["tanh_scale"], saved["pre_act_coeff"], saved["ste_to_input"]) == ("tanh", 2.0, 1e-3, True)
