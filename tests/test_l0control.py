"""--target-l0 for JumpReLU and Gated (minisae.training.l0control): thresholds calibrated to the
target on batch 0, then moved every step outside Adam. The trajectories run on the toy preset
(d_sae 64, 256 tokens a step, 300 steps, target L0 4; Gated d_sae 256 and 1,024 tokens, 500 steps):
a few seconds each."""

import json
import math

import numpy
import pytest

from minisae.eval.compare import CompareConfig, make_source
from minisae.training import l0control, optim
from minisae.training.train import TrainConfig, TrainingError, train

TARGET = 4.0
STEPS = 300
IN_BAND_FROM = 100  # every 50-step window of batch L0s from here on lies within ±5 % of the target
WINDOW = 50


def toy():
    return make_source(CompareConfig(preset="toy"))


def toy_config(arch, **kw):
    base = dict(architecture=arch, d_sae=64, target_l0=TARGET, steps=STEPS, batch_size=256, log_every=1,
                checkpoint_every=STEPS, eval_tokens=8192)
    base.update(kw)
    return TrainConfig(**base)


def batch_l0s(run):
    return [json.loads(line)["l0"] for line in (run / "metrics.jsonl").read_text().splitlines()]


CASES = [  # (architecture, lr, options)
    ("jumprelu", 7e-5, {}), ("jumprelu", 1e-3, {}), ("jumprelu", 1e-2, {}),
    ("jumprelu", 7e-5, {"threshold_param": "raw"}), ("jumprelu", 7e-5, {"penalty": "quadratic"}),
]


@pytest.mark.parametrize("arch,lr,opts", CASES, ids=[f"{a}-{lr:g}-{'-'.join(o.values()) or 'default'}"
                                                      for a, lr, o in CASES])
def test_target_l0_is_in_band_from_step_100_and_stays_there_at_any_lr(tmp_path, arch, lr, opts):
    # every 50-step mean of the batch L0 from step 100 to 300 within ±5 % of the target, and the
    # released SAE's L0 on held-out tokens within ±5 % at the end
    res = train(toy_config(arch, lr=lr, **opts), toy(), tmp_path, progress=False)
    l0 = batch_l0s(tmp_path)
    windows = [numpy.mean(l0[i:i + WINDOW]) for i in range(IN_BAND_FROM, STEPS - WINDOW + 1, 10)]
    assert max(abs(w / TARGET - 1) for w in windows) < 0.05, windows
    assert res.summary["l0"] == pytest.approx(TARGET, rel=0.05)


def test_gated_is_in_band_from_step_100_and_stays_there_at_lr_7e_5(tmp_path):
    # Gated in the setting (d_sae 256, 1,024 tokens a step, target 8, warm-ups 50 / 200),
    # at JumpReLU's lr, where λ alone could not move b_gate: every 50-step mean of the batch L0
    # from step 100 to 500 within ±5 %, and the released SAE's held-out L0 within ±5 %. (Gated at
    # 3e-4 and 1e-2 is measured by the 800-step runs of docs/derivations/l0_controller.md.)
    cfg = TrainConfig("gated", d_sae=256, target_l0=8.0, steps=500, batch_size=1024, warmup_steps=50,
                      sparsity_warmup_steps=200, lr=7e-5, log_every=1, checkpoint_every=500, eval_tokens=16384)
    res = train(cfg, toy(), tmp_path, progress=False)
    assert res.summary["l0"] == pytest.approx(8.0, rel=0.05)
    l0 = batch_l0s(tmp_path)
    windows = [numpy.mean(l0[i:i + WINDOW]) for i in range(100, 500 - WINDOW + 1, 10)]
    assert max(abs(w / 8.0 - 1) for w in windows) < 0.05, windows


def test_calibration_starts_each_latent_at_the_target_rate():
    # on the sample it was calibrated on, every latent fires on exactly c = n·L0*/M tokens
    from minisae.sae import gated, jumprelu

    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((512, 16)).astype(numpy.float32)
    for mod, arch in ((jumprelu, "jumprelu"), (gated, "gated")):
        params = mod.init(16, 32, seed=1)
        unit = l0control.calibrate(arch, params, x, target=2.0)
        f = mod.encode(params, x)
        assert (numpy.count_nonzero(f, axis=0) == 32).all()  # c = 512 · 2 / 32
        assert numpy.count_nonzero(f) / 512 == 2.0
        assert unit > 0


def test_the_controller_state_stays_bounded_whatever_the_l0():
    # a run stuck far from its target (L0 1e30, then 0) for 100,000 steps: the integral and λ
    # stop at their bounds, the thresholds stay finite (no wind-up, nothing to overflow)
    params = {"b_gate": numpy.zeros(8, numpy.float32), "W_enc": numpy.ones((4, 8), numpy.float32)}
    ctrl = l0control.L0Controller(4.0, "b_gate", unit=0.1, coeff0=0.1)
    ctrl.start(params)
    fired = numpy.ones(8, numpy.int64)
    for l0 in (1e30, 0.0):
        for _ in range(100_000 // 2):
            ctrl.after_step(params, l0, fired)
        assert abs(ctrl.integral) == l0control.INTEGRAL_MAX
        assert abs(math.log(ctrl.coeff() / 0.1)) <= math.log(l0control.COEFF_RANGE) + 1e-12
        assert numpy.isfinite(params["b_gate"]).all()
    state = json.loads(json.dumps(ctrl.state()))
    again = l0control.L0Controller(4.0, "b_gate", coeff0=0.1, unit=state["unit"], integral=state["integral"],
                                   log_coeff=state["log_coeff"])
    assert again.state() == ctrl.state()


@pytest.mark.parametrize("arch", ["jumprelu", "gated"])
def test_a_resumed_controlled_run_is_bitwise_the_uninterrupted_one(tmp_path, arch):
    class Interrupt(Exception):
        pass

    class Stop:
        def __init__(self, source, at):
            self.source, self.at, self.d_in = source, at, source.d_in

        def batch(self, step, n):
            if step == self.at:
                raise Interrupt(step)
            return self.source.batch(step, n)

        def sample(self, n, **kw):
            return self.source.sample(n, **kw)

    cfg = toy_config(arch, steps=40, checkpoint_every=20, log_every=5, eval_tokens=0, lr=1e-3, prefetch=0)
    straight = train(cfg, toy(), tmp_path / "a", progress=False)
    with pytest.raises(Interrupt):
        train(cfg, Stop(toy(), 30), tmp_path / "b", progress=False)
    resumed = train(cfg, toy(), tmp_path / "b", resume=True, progress=False)
    for k, v in straight.params.items():
        assert numpy.array_equal(v, resumed.params[k]), f"{k} differs after resume"
    assert batch_l0s(tmp_path / "a") == batch_l0s(tmp_path / "b")


def test_warmups_scale_with_the_run_unless_given(tmp_path):
    short = TrainConfig("jumprelu", d_sae=32, sparsity_coeff=1e-3, steps=1000).resolved(16)
    assert (short.warmup_steps, short.sparsity_warmup_steps) == (50, 200)
    long = TrainConfig("jumprelu", d_sae=32, sparsity_coeff=1e-3, tokens=4096 * 10**6).resolved(16)
    assert (long.warmup_steps, long.sparsity_warmup_steps) == (1000, 10000)
    given = TrainConfig("jumprelu", d_sae=32, sparsity_coeff=1e-3, steps=1000, warmup_steps=7,
                        sparsity_warmup_steps=0).resolved(16)
    assert (given.warmup_steps, given.sparsity_warmup_steps) == (7, 0)
    # the run's config.json records the values it used
    train(toy_config("jumprelu", steps=40, eval_tokens=0), toy(), tmp_path, progress=False)
    saved = json.loads((tmp_path / "config.json").read_text())["train"]
    assert (saved["warmup_steps"], saved["sparsity_warmup_steps"]) == (2, 8)


def test_the_cli_help_states_the_scaled_warmups():
    import argparse

    from minisae.cli.parser import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    helps = {a.dest: a.help for a in sub.choices["train"]._actions}
    assert "5 %% of the steps" in helps["warmup_steps"] and "20 %% of the steps" in helps["sparsity_warmup_steps"]


def test_every_jumprelu_penalty_and_gated_use_the_controller_and_its_options_are_checked():
    for kw in ({"penalty": "l0"}, {"penalty": "quadratic"}, {"penalty": "tanh"}):
        assert TrainConfig("jumprelu", d_sae=32, target_l0=5, steps=1, **kw).resolved(16).uses_controller()
    assert TrainConfig("gated", d_sae=32, target_l0=5, steps=1).resolved(16).uses_controller()
    assert not TrainConfig("topk", d_sae=32, target_l0=5, steps=1).resolved(16).uses_controller()
    with pytest.raises(ValueError, match="controller_gain"):
        TrainConfig("gated", d_sae=32, target_l0=5, controller_gain=0.0, steps=1).resolved(16)


def test_the_released_sae_records_thresholds_and_no_lambda(tmp_path):
    res = train(toy_config("jumprelu", steps=30, eval_tokens=1024), toy(), tmp_path, progress=False)
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert not any("sparsity" in k or "coeff" in k for k in cfg)
    assert "sparsity_coeff_final" not in res.summary  # JumpReLU's λ never moves
    assert res.sae.params["threshold"].shape == (64,)


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning")
def test_a_float32_overflow_of_adams_second_moment_is_named(tmp_path):
    # λ = 1e36: the threshold's gradient squared overflows float32; the error says so instead
    # of advising a lower learning rate
    cfg = toy_config("jumprelu", target_l0=None, sparsity_coeff=1e36, steps=10, checkpoint_every=5,
                     sparsity_warmup_steps=0, lr=1e-3, eval_tokens=0)
    with pytest.raises(TrainingError, match="second moment") as err:
        train(cfg, toy(), tmp_path, progress=False)
    assert "lower learning rate" not in str(err.value)
    params = {"a": numpy.ones(3, numpy.float32)}
    state = optim.adam_init(params)
    assert "lower learning rate" in optim.nonfinite_cause(params, state)
