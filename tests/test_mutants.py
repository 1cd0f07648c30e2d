"""Claims a planted bug once got past the whole suite with (mutation testing, 2026-12-05):

- MCC over the min(M, N) matched pairs, with more latents than true features (dividing by M
  gives 0.5 for a perfect dictionary with twice the latents);
- an older SAELens JumpReLU folder that stores log_threshold: the threshold is exp of it;
- a SAELens folder with apply_b_dec_to_input false round-trips and encodes without b_dec;
- the FVU in a run's metrics.jsonl is eval's fvu (centred denominator) on the same batch.
(The sums in order with three parts: tests/test_order_of_sums.py.)
"""

import json

import numpy
import pytest
from test_saefile import D, M, inputs, make_sae, release_params

from minisae.data.synthetic import SyntheticActivations, SyntheticConfig
from minisae.eval import metrics
from minisae.io.saefile import SAE
from minisae.io.safetensors_io import save_file
from minisae.sae import jumprelu


def test_mcc_with_more_latents_than_true_features_averages_the_matched_pairs():
    pytest.importorskip("scipy")
    rng = numpy.random.default_rng(0)
    T = rng.standard_normal((4, 10))  # (N, D) true features
    T /= numpy.linalg.norm(T, axis=1, keepdims=True)
    W = numpy.concatenate([T, rng.standard_normal((4, 10))])  # (M = 2N, D): the features, and 4 more
    assert metrics.mcc(W, T) == pytest.approx(1.0)  # min(M, N) = 4 pairs, each |cos| = 1
    W[0] = -T[0]  # sign does not matter; a wrong direction does
    assert metrics.mcc(W, T) == pytest.approx(1.0)


def test_an_old_saelens_jumprelu_folder_with_log_threshold_loads_exp_of_it(tmp_path):
    sae = make_sae("jumprelu")
    folder = sae.save(tmp_path / "new")
    old = tmp_path / "old"
    old.mkdir()
    cfg = json.loads((folder / "cfg.json").read_text())
    (old / "cfg.json").write_text(json.dumps(cfg))
    tensors = {k: numpy.asarray(v) for k, v in sae.params.items() if k != "threshold"}
    tensors["log_threshold"] = numpy.log(numpy.asarray(sae.params["threshold"], numpy.float64)).astype(numpy.float32)
    save_file(tensors, old / "sae_weights.safetensors")
    loaded = SAE.load(old)
    numpy.testing.assert_allclose(loaded.params["threshold"], sae.params["threshold"], rtol=1e-6)
    x = inputs()
    numpy.testing.assert_allclose(loaded.encode(x), sae.encode(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "gated"])
def test_saelens_folder_with_apply_b_dec_to_input_false_round_trips_and_encodes_without_b_dec(tmp_path, arch):
    sae = make_sae(arch, apply_b_dec_to_input=False)
    assert sae.cfg["apply_b_dec_to_input"] is False
    loaded = SAE.load(sae.save(tmp_path / "sae"))
    assert loaded.cfg["apply_b_dec_to_input"] is False
    x = inputs()
    assert loaded.encode(x).tobytes() == sae.encode(x).tobytes()
    # without b_dec subtracted: the same SAE with b_dec = 0 encodes alike, and b_dec still decodes
    p = {k: numpy.asarray(v) for k, v in release_params(arch).items()}
    zero = SAE(arch, {**p, "b_dec": numpy.zeros(D, numpy.float32)}, {"k": 5} if arch == "topk" else None)
    assert loaded.encode(x).tobytes() == zero.encode(x).tobytes()
    with_b_dec = make_sae(arch)  # apply_b_dec_to_input true (the default): a different encoding
    assert not numpy.array_equal(with_b_dec.encode(x), loaded.encode(x))
    f = loaded.encode(x)
    numpy.testing.assert_allclose(loaded.decode(f), f @ p["W_dec"] + p["b_dec"], rtol=1e-5, atol=1e-5)


def offset_source():
    # offset_norm: the tokens' mean is far from 0, so a denominator left uncentred is far off
    return SyntheticActivations(SyntheticConfig(d_in=16, n_features=32, target_l0=3.0, max_freq=0.2,
                                                offset_norm=3.0, noise_std=0.01, seed=0))


@pytest.mark.parametrize("trainer", ["train", "train_parallel"])
def test_the_logged_fvu_is_evals_fvu_on_the_same_batch(tmp_path, trainer):
    from minisae.training.train import TrainConfig, train

    source = offset_source()
    cfg = TrainConfig(architecture="jumprelu", d_sae=M, steps=1, batch_size=128, log_every=1, checkpoint_every=1,
                      eval_tokens=0, sparsity_coeff=1e-2, norm_sample_tokens=2048)
    if trainer == "train":
        result = train(cfg, source, tmp_path / "run", progress=False)
    else:
        from minisae.dist.parallel import train_parallel

        result = train_parallel(cfg, source, tmp_path / "run", accumulate=2, progress=False)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["step"] == 1
    # step 1's row is the forward of the initial parameters on batch 0 (normalised by the scale C)
    x = numpy.divide(source.batch(0, cfg.batch_size), result.scale, dtype=numpy.float32)  # (B, D)
    params = jumprelu.init(16, M, seed=cfg.seed, dtype="float32", threshold_param=cfg.threshold_param,
                           threshold_init=cfg.threshold_init or jumprelu.THRESHOLD_INIT)
    out, _ = jumprelu.forward(params, x, sparsity_coeff=cfg.sparsity_coeff)
    assert row["mse"] == pytest.approx(float(out["mse"]), rel=1e-5)
    assert row["fvu"] == pytest.approx(metrics.fvu(x, out["xhat"]), rel=1e-5)
