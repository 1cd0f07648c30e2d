"""The fair-recipe rules of `minisae compare` (minisae.experiment.tuning): pilot choice, plateau, sensitivity."""

import pytest

from minisae.experiment import tuning


def _row(variant, lr, fvu, l0=8.0, target=8.0, **extra):
    setting = {"lr": lr, **extra}
    return {"variant": variant, "setting": setting, "fvu": fvu, "l0": l0, "target": target}


def test_pilot_grid_crosses_jumprelu_lr_with_bandwidth_and_others_lr_only():
    grid = tuning.pilot_grid(["jumprelu", "topk"], lrs=(1e-3, 1e-2), bandwidths=(1e-3, 1e-2))
    assert len(grid["jumprelu"]) == 4 and {"lr", "bandwidth"} == set(grid["jumprelu"][0])
    assert grid["topk"] == [{"lr": 1e-3}, {"lr": 1e-2}]


def test_setting_tags_are_distinct_folder_names():
    grid = tuning.pilot_grid(["jumprelu"])
    tags = [tuning.setting_tag(s) for s in grid["jumprelu"]]
    assert len(set(tags)) == len(tags) and all("/" not in t and " " not in t for t in tags)
    assert tuning.setting_tag({"bandwidth": 0.001, "lr": 0.01}) == "lr1e-02-bw1e-03"


def test_pick_takes_the_lowest_fvu_among_runs_that_met_the_target():
    rows = [_row("gated", 1e-3, 0.30), _row("gated", 1e-2, 0.20),
            _row("gated", 3e-2, 0.10, l0=12.0)]  # best FVU, but 50 % denser than the target
    best, nxt = tuning.pick(rows, "gated")
    assert best["setting"]["lr"] == 1e-2 and nxt["setting"]["lr"] == 1e-3


def test_pick_skips_nonfinite_scores_and_reports_none_without_eligible_runs():
    rows = [_row("topk", 1e-2, float("nan")), _row("topk", 1e-3, 0.4, l0=20.0)]
    assert tuning.pick(rows, "topk") == (None, None)


def _log(values, steps=100):
    n = len(values)
    return [{"step": round((i + 1) * steps / n), "fvu": v} for i, v in enumerate(values)]


def test_tail_change_is_end_window_minus_window_at_80_percent():
    log = _log([1.0 - i / 100 for i in range(100)])  # still falling by 0.01 a step
    # windows: steps 75..85 (fvu 0.26..0.16, mean 0.21) and 95..100 (0.06..0.01, mean 0.035)
    assert tuning.tail_change(log) == pytest.approx(0.035 - 0.21, abs=1e-9)
    flat = _log([0.3] * 100)
    assert tuning.tail_change(flat) == pytest.approx(0.0)


def test_plateau_compares_the_tail_change_with_the_seeds_spread():
    assert tuning.plateau([-0.001, -0.002], [0.20, 0.23])["plateau"] is True      # change << spread
    assert tuning.plateau([-0.05, -0.06], [0.20, 0.201])["plateau"] is False      # still falling
    assert tuning.plateau([None], [0.2])["plateau"] is None


def test_sensitivity_reports_a_flip_when_a_next_best_setting_reverses_the_order():
    rows = [_row("jumprelu", 1e-2, 0.20, bandwidth=1e-3), _row("jumprelu", 3e-2, 0.26, bandwidth=1e-3),
            _row("gated", 1e-2, 0.22), _row("gated", 3e-3, 0.25)]
    orderings, flips = tuning.sensitivity(rows, ["jumprelu", "gated"])
    assert orderings[0]["better"] == "a"  # JumpReLU 0.20 < Gated 0.22 at their best
    assert [f["moved"] for f in flips] == ["jumprelu"]  # JumpReLU at 0.26 falls behind Gated's 0.22
    assert flips[0]["fvu_a"] == 0.26 and flips[0]["better"] == "b"


def test_sensitivity_finds_no_flip_when_the_order_holds_at_every_next_best():
    rows = [_row("topk", 1e-2, 0.10), _row("topk", 3e-3, 0.11), _row("gated", 1e-2, 0.20), _row("gated", 3e-2, 0.21)]
    _, flips = tuning.sensitivity(rows, ["topk", "gated"])
    assert flips == []
