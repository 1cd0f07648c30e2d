"""Training end to end on tiny synthetic data: each variant learns, files are written, resume is
bitwise exact, and bad input (NaN activations, truncated or mismatched checkpoints) gives a clear
error without losing the last good checkpoint."""

import dataclasses
import math
import json

import numpy
import pytest
from tolerances import F32_ATOL, F32_RTOL

from minisae.sae import VARIANTS
from minisae.io.saefile import SAE
from minisae.data.synthetic import SyntheticActivations, SyntheticConfig
from minisae.training.train import (CheckpointError, TrainConfig, TrainingError, estimate_scale,
                           load_checkpoint, read_state, train)

SETTING = {"jumprelu": {"sparsity_coeff": 1e-2}, "gated": {"sparsity_coeff": 3e-2}, "topk": {"k": 4}}


def tiny_source(seed=0):
    return SyntheticActivations(SyntheticConfig(d_in=16, n_features=32, target_l0=3.0, max_freq=0.2,
                                                offset_norm=1.0, noise_std=0.01, seed=seed))


def tiny_config(arch, **kw):
    base = dict(architecture=arch, d_sae=32, steps=50, batch_size=128, lr=3e-3, warmup_steps=5,
                sparsity_warmup_steps=10, checkpoint_every=25, log_every=5, eval_tokens=2048,
                eval_batch_size=1024, norm_sample_tokens=2048, dead_window_tokens=1024)
    base.update(SETTING[arch])
    base.update(kw)
    return TrainConfig(**base)


class Interrupt(Exception):
    pass


class Faulty:
    """Wraps a source; at step `at` either raises Interrupt or returns a NaN batch."""

    def __init__(self, source, at, mode):
        self.source, self.at, self.mode = source, at, mode
        self.d_in = source.d_in

    def batch(self, step, batch_size):
        x = self.source.batch(step, batch_size)
        if step == self.at:
            if self.mode == "interrupt":
                raise Interrupt(step)
            x = x.copy()
            x[3, 2] = numpy.nan
        return x

    def sample(self, n, **kw):
        return self.source.sample(n, **kw)


def _metrics(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


@pytest.mark.parametrize("arch", ["jumprelu", "gated", "topk"])
def test_train_end_to_end(tmp_path, arch):
    source = tiny_source()
    res = train(tiny_config(arch), source, tmp_path, progress=False)
    for name in ("config.json", "checkpoint/checkpoint.json", "metrics.jsonl", "eval.json",
                 "sae/cfg.json", "sae/sae_weights.safetensors"):
        assert (tmp_path / name).is_file(), name
    rows = _metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(5, 51, 5))
    assert rows[-1]["mse"] < 0.75 * rows[0]["mse"], "reconstruction error did not fall"
    norms = numpy.linalg.norm(res.params["W_dec"], axis=1)
    numpy.testing.assert_allclose(norms, 1.0, rtol=F32_RTOL, atol=F32_ATOL)
    assert 0 < res.summary["fvu"] < 0.5 and res.summary["l0"] > 0
    assert {"mmcs", "frac_recovered", "dead_frac", "dense_frac", "rel_recon_bias"} <= set(res.summary)
    assert len(res.summary["firing_freq"]) == 32
    if arch == "topk":
        assert res.summary["l0"] <= 4

    # the saved release SAE (C and the pre-encoder bias folded) reconstructs raw activations
    # exactly as the training-form parameters reconstruct x_raw / C, scaled back by C
    x_raw = source.sample(256, offset=7)
    sae = SAE.load(tmp_path / "sae")
    mod = VARIANTS[arch]
    hyper = {"k": 4} if arch == "topk" else {"sparsity_coeff": 0.0}
    out, _ = mod.forward(res.params, x_raw / res.scale, **hyper)
    numpy.testing.assert_allclose(sae(x_raw), res.scale * out["xhat"], rtol=F32_RTOL, atol=F32_ATOL)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["train"]["architecture"] == arch and saved["source"]["config"]["d_in"] == 16


@pytest.mark.parametrize("arch", ["jumprelu", "gated", "topk"])
def test_resume_is_bitwise_identical(tmp_path, arch):
    cfg = tiny_config(arch, steps=30, checkpoint_every=10, log_every=3)
    if arch == "topk":  # a one-batch dead window, so AuxK acts and its counters must be restored
        cfg = dataclasses.replace(cfg, d_sae=64, dead_window_tokens=128)
    straight = train(cfg, tiny_source(), tmp_path / "a", progress=False)
    with pytest.raises(Interrupt):  # killed between checkpoints: steps 20..24 are lost and redone
        train(cfg, Faulty(tiny_source(), 25, "interrupt"), tmp_path / "b", progress=False)
    state = read_state(tmp_path / "b", cfg.resolved(16))
    assert state["step"] == 20
    resumed = train(cfg, tiny_source(), tmp_path / "b", resume=True, progress=False)
    for k, v in straight.params.items():
        assert v.dtype == resumed.params[k].dtype
        assert numpy.array_equal(v, resumed.params[k]), f"{k} differs after resume"
    assert straight.scale == resumed.scale
    assert _metrics(tmp_path / "a" / "metrics.jsonl") == _metrics(tmp_path / "b" / "metrics.jsonl")
    if arch == "topk":  # the AuxK path (dead latents) was exercised after the checkpoint
        assert any(r["dead_frac"] > 0 for r in _metrics(tmp_path / "a" / "metrics.jsonl") if r["step"] > 20)


def test_nan_activations_stop_with_clear_error_and_keep_checkpoint(tmp_path):
    cfg = tiny_config("jumprelu", steps=30, checkpoint_every=10)
    with pytest.raises(TrainingError, match=r"step 15: .*NaN.*last good checkpoint \(step 10\)"):
        train(cfg, Faulty(tiny_source(), 15, "nan"), tmp_path, progress=False)
    state = read_state(tmp_path, cfg.resolved(16))
    assert state["step"] == 10
    assert all(numpy.isfinite(v).all() for v in state["params"].values())
    assert not (tmp_path / "sae").exists()
    # with clean data the run continues from that checkpoint to the uninterrupted result
    resumed = train(cfg, tiny_source(), tmp_path, resume=True, progress=False)
    straight = train(cfg, tiny_source(), tmp_path / "ref", progress=False)
    for k in straight.params:
        assert numpy.array_equal(straight.params[k], resumed.params[k])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_names_the_step(tmp_path):
    cfg = tiny_config("gated", lr=1e30, steps=20, checkpoint_every=5, warmup_steps=1)
    with pytest.raises(TrainingError, match=r"step \d+: .*(loss is|NaN or inf)"):
        train(cfg, tiny_source(), tmp_path, progress=False)


def test_truncated_checkpoint_is_a_clear_error_and_left_alone(tmp_path):
    cfg = tiny_config("topk", steps=10, checkpoint_every=5)
    train(cfg, tiny_source(), tmp_path, progress=False)
    ckpt = next((tmp_path / "checkpoint").glob("step-*/shard-00000.safetensors"))
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        train(dataclasses.replace(cfg, steps=20), tiny_source(), tmp_path, resume=True, progress=False)
    assert ckpt.read_bytes() == data[: len(data) // 2]


def test_existing_run_and_config_mismatch_are_refused(tmp_path):
    cfg = tiny_config("jumprelu", steps=10, checkpoint_every=5, eval_tokens=0)
    res = train(cfg, tiny_source(), tmp_path, progress=False)
    assert res.summary == {} and not (tmp_path / "eval.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, tiny_source(), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="d_sae: checkpoint 32, now 48"):
        train(dataclasses.replace(cfg, d_sae=48), tiny_source(), tmp_path, resume=True, progress=False)
    # a finished run resumed with more steps (no lr decay) continues where it stopped
    longer = train(dataclasses.replace(cfg, steps=20), tiny_source(), tmp_path, resume=True, progress=False)
    straight = train(dataclasses.replace(cfg, steps=20), tiny_source(), tmp_path / "ref", progress=False)
    assert numpy.array_equal(longer.params["W_enc"], straight.params["W_enc"])


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="k: TopK needs"):
        TrainConfig("topk", d_sae=8, steps=1).resolved(4)
    with pytest.raises(ValueError, match="sparsity_coeff"):
        TrainConfig("gated", steps=1).resolved(4)
    with pytest.raises(ValueError, match="steps or tokens"):
        TrainConfig("jumprelu", sparsity_coeff=1.0).resolved(4)
    with pytest.raises(ValueError, match="threshold_init"):
        TrainConfig("jumprelu", sparsity_coeff=1.0, steps=1, threshold_init=0.0).resolved(4)
    c = TrainConfig("topk", k=2, d_sae=2**14, tokens=1000, batch_size=300).resolved(64)
    assert c.steps == 4 and c.aux_k == 32 and c.adam_eps == 6.25e-10 and c.lr == pytest.approx(2e-4)
    c = TrainConfig("jumprelu", sparsity_coeff=1.0, steps=1).resolved(64)
    assert (c.lr, c.adam_beta1, c.adam_eps, c.aux_k) == (7e-5, 0.0, 1e-8, 32)


def test_threshold_init_sets_theta(tmp_path):
    cfg = tiny_config("jumprelu", steps=1, threshold_init=0.05, lr=1e-12, eval_tokens=0)
    res = train(cfg, tiny_source(), tmp_path, progress=False)
    numpy.testing.assert_allclose(numpy.exp(res.params["log_threshold"]), 0.05, rtol=F32_RTOL)


class ArraySource:
    """A source whose `sample(n)` is the first n rows of a fixed array; records each n asked."""

    def __init__(self, x):
        self.x, self.d_in, self.asked = x, x.shape[1], []

    def sample(self, n):
        self.asked.append(n)
        return self.x[:n]


def test_scale_sample_is_sized_by_its_own_standard_error():
    rng = numpy.random.default_rng(0)
    # norms that barely vary: the first 4096 tokens already pin E‖x‖² to 0.5 %
    steady = ArraySource(rng.standard_normal((10_000, 128)).astype("float32"))
    c, sample = estimate_scale(steady, 10_000)
    assert steady.asked == [4096] and sample.shape == (4096, 128)
    expected = math.sqrt(numpy.mean(numpy.sum(sample.astype("float64") ** 2, axis=1)))
    assert c == pytest.approx(expected, rel=1e-6)
    # heavy-tailed norms (a few tokens 30x larger): the sample doubles until the cap
    x = rng.standard_normal((20_000, 8)).astype("float32")
    x[rng.random(20_000) < 0.01] *= 30.0
    heavy = ArraySource(x)
    c, sample = estimate_scale(heavy, 20_000)
    assert heavy.asked == [4096, 8192, 16384, 20_000] and sample.shape == (20_000, 8)
    assert c == pytest.approx(math.sqrt(numpy.mean(numpy.sum(x.astype("float64") ** 2, axis=1))), rel=1e-6)
    with pytest.raises(TrainingError, match="NaN or inf"):
        estimate_scale(ArraySource(numpy.full((10, 3), numpy.inf, dtype="float32")), 10)
    with pytest.raises(TrainingError, match="all zeros"):
        estimate_scale(ArraySource(numpy.zeros((10, 3), dtype="float32")), 10)


def test_prefetch_and_plain_loop_train_identically(tmp_path):
    """The background batch producer changes nothing: same parameters as making each batch in
    the loop; its errors (here a bad batch shape) stop the run naming the step."""
    cfg = tiny_config("topk", steps=12, checkpoint_every=6, eval_tokens=0, d_sae=64,
                      dead_window_tokens=128)
    a = train(cfg, tiny_source(), tmp_path / "a", progress=False)
    b = train(dataclasses.replace(cfg, prefetch=0), tiny_source(), tmp_path / "b", progress=False)
    for k in a.params:
        numpy.testing.assert_array_equal(a.params[k], b.params[k])

    class Short(Faulty):
        def batch(self, step, batch_size):
            return self.source.batch(step, batch_size - (step == 7))

    with pytest.raises(TrainingError, match=r"step 7: the source returned a batch of shape \(127, 16\).*step 6"):
        train(cfg, Short(tiny_source(), 0, ""), tmp_path / "c", progress=False)


# ---------------------------------------------------------------------------------------------
# exact target L0: the λ controller (minisae.training.l0control), k from target_l0, θ's learning rate

def test_l0_controller_reaches_its_target(tmp_path):
    # a short Gated run on tiny data: the evaluated L0 ends within ±5 % of the target, and λ
    # was moved (started at 0.1, the controller takes it to about 0.3, within its bound)
    from minisae.training import l0control

    cfg = tiny_config("gated", steps=800, lr=1e-2, target_l0=6.0, sparsity_coeff=None, sparsity_warmup_steps=50,
                      checkpoint_every=800, log_every=50, eval_tokens=8192)
    res = train(cfg, tiny_source(), tmp_path, progress=False)
    assert res.summary["l0"] == pytest.approx(6.0, rel=0.05)
    lambdas = [r["sparsity_coeff"] for r in _metrics(tmp_path / "metrics.jsonl")]
    assert 0.2 < max(lambdas) <= 0.1 * l0control.COEFF_RANGE


@pytest.mark.parametrize("arch", ["gated", "jumprelu"])
def test_l0_controller_resumes_bitwise(tmp_path, arch):
    cfg = tiny_config(arch, steps=30, checkpoint_every=10, log_every=3, target_l0=5.0, sparsity_warmup_steps=4,
                      threshold_lr_mult=0.1 if arch == "jumprelu" else 1.0)
    straight = train(cfg, tiny_source(), tmp_path / "a", progress=False)
    with pytest.raises(Interrupt):
        train(cfg, Faulty(tiny_source(), 25, "interrupt"), tmp_path / "b", progress=False)
    resumed = train(cfg, tiny_source(), tmp_path / "b", resume=True, progress=False)
    for k, v in straight.params.items():
        assert numpy.array_equal(v, resumed.params[k]), f"{k} differs after resume"
    rows = _metrics(tmp_path / "a" / "metrics.jsonl")
    assert rows == _metrics(tmp_path / "b" / "metrics.jsonl")
    if arch == "gated":  # Gated's λ moves with the controller (JumpReLU's stays fixed)
        assert len({r["sparsity_coeff"] for r in rows if r["step"] > 20}) > 1  # λ moved after the checkpoint


def test_target_l0_sets_k_and_options_are_checked():
    assert TrainConfig("topk", d_sae=32, target_l0=6.4, steps=1).resolved(16).k == 6
    with pytest.raises(ValueError, match="disagree"):
        TrainConfig("topk", d_sae=32, k=4, target_l0=6, steps=1).resolved(16)
    with pytest.raises(ValueError, match="target_l0"):
        TrainConfig("gated", d_sae=32, target_l0=0, steps=1).resolved(16)
    with pytest.raises(ValueError, match="JumpReLU option"):
        TrainConfig("gated", d_sae=32, sparsity_coeff=1.0, threshold_lr_mult=0.1, steps=1).resolved(16)
    c = TrainConfig("gated", d_sae=32, target_l0=5, steps=1).resolved(16)
    assert c.uses_controller() and c.sparsity_coeff > 0
    assert TrainConfig("jumprelu", d_sae=32, penalty="quadratic", target_l0=5, sparsity_coeff=1.0,
                       steps=1).resolved(16).uses_controller()  # every JumpReLU penalty (minisae.training.l0control)


def test_threshold_lr_mult_slows_only_the_threshold(tmp_path):
    base = tiny_config("jumprelu", steps=5, checkpoint_every=5, log_every=5, eval_tokens=0)
    a = train(base, tiny_source(), tmp_path / "a", progress=False)
    b = train(dataclasses.replace(base, threshold_lr_mult=0.0001), tiny_source(), tmp_path / "b", progress=False)
    init = math.log(0.001)
    assert numpy.abs(b.params["log_threshold"] - init).max() < 0.01 * numpy.abs(a.params["log_threshold"] - init).max()


def test_threshold_lr_mult_past_its_range_is_refused_by_name(capsys):
    """--threshold-lr-mult 1e300 was accepted and made θ NaN (exit 1); now one line, exit 2."""
    from minisae.cli.commands import main

    with pytest.raises(ValueError, match=r"threshold_lr_mult: expected a value in \(0, 10000\]"):
        TrainConfig("jumprelu", d_sae=8, sparsity_coeff=1e-3, threshold_lr_mult=1e300).resolved(4)
    assert main(["train", "--arch", "jumprelu", "--threshold-lr-mult", "1e300", "--out", "never-written",
                 "--steps", "10", "--lambda", "1e-3", "--warmup-steps", "1", "--sparsity-warmup-steps", "1",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "threshold_lr_mult" in err[0]


def test_threshold_rate_is_refused_for_the_variants_that_ignore_it():
    """--threshold-rate with topk or jumprelu was accepted and ignored."""
    for arch, kw in (("topk", dict(k=2)), ("jumprelu", dict(sparsity_coeff=1e-3))):
        with pytest.raises(ValueError, match="threshold_rate is a BatchTopK option"):
            TrainConfig(arch, d_sae=8, steps=1, threshold_rate=0.5, **kw).resolved(4)
    assert TrainConfig("batchtopk", d_sae=8, k=2, steps=1, threshold_rate=0.5).resolved(4).threshold_rate == 0.5


def test_the_nested_progress_bar_of_compare_reaches_the_loop(tmp_path, monkeypatch):
    """`minisae compare` asks for progress="nested" (its runs' bars below its own, cleared after)."""
    import minisae.training.train as train_module

    seen = []
    real = train_module._progress_bar
    monkeypatch.setattr(train_module, "_progress_bar", lambda total, initial, desc, enabled: (
        seen.append(enabled), real(total, initial, desc, False))[1])
    train(tiny_config("topk", steps=2), tiny_source(), tmp_path, progress="nested")
    assert seen == ["nested"]
