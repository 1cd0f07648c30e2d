"""Training with the 2025-26 recipes: JumpReLU with the quadratic L0 penalty, raw thresholds and the
frequency penalty (and, through the CLI, the same flags): runs end to end, resumes bitwise,
saves a release SAE that reconstructs like the training parameters."""

import json

import numpy
import pytest
from tolerances import F32_ATOL, F32_RTOL

from minisae.cli import main
from minisae.io.saefile import SAE
from minisae.sae import jumprelu
from minisae.train import TrainConfig, load_checkpoint, train
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
    assert load_checkpoint(tmp_path / "b" / "checkpoint.safetensors", cfg.resolved(16), numpy)["step"] == 20
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
