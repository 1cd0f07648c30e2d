"""BatchTopK and Matryoshka-JumpReLU release files: SAELens (run by reference/check_saelens.py) reads
them as JumpReLU SAEs whose outputs equal minisae's training-form inference encoders, scaled by the
input scale C; the Gemma Scope format keeps them too."""

from pathlib import Path

import numpy
import pytest
from tolerances import F32_ATOL, F32_RTOL

from minisae.io.saefile import SAE
from minisae.sae import batchtopk, jumprelu

GOLDEN = Path(__file__).parent / "golden" / "saelens"


@pytest.mark.parametrize("case", ["batchtopk_as_jumprelu", "jumprelu_matryoshka"])
def test_saelens_outputs_equal_the_training_form_encoder(case, tmp_path):
    with numpy.load(GOLDEN / case / "training.npz", allow_pickle=False) as t:
        train = {k: t[k] for k in t.files}
    with numpy.load(GOLDEN / case / "saelens_outputs.npz", allow_pickle=False) as g:
        x, f_lens, xhat_lens = g["x"], g["f"], g["xhat"]
    C = float(train.pop("scale"))
    if case.startswith("batchtopk"):
        theta = float(train.pop("threshold"))
        f = batchtopk.encode(train, x / numpy.float32(C), threshold=theta)  # (N, M)
    else:
        f = jumprelu.encode(train, x / numpy.float32(C))
    assert numpy.array_equal(f != 0, f_lens != 0)
    numpy.testing.assert_allclose(C * f, f_lens, rtol=F32_RTOL, atol=F32_ATOL)
    sae = SAE.load(GOLDEN / case)
    assert sae.architecture == "jumprelu"
    # the Gemma Scope format (pre-encoder bias folded into b_enc) gives the same SAE
    sae.save_gemma_scope(tmp_path / "params.npz")
    gs = SAE.load(tmp_path / "params.npz")
    numpy.testing.assert_allclose(gs(x), xhat_lens, rtol=F32_RTOL, atol=F32_ATOL)
    if case.startswith("batchtopk"):  # one global threshold, C * theta
        numpy.testing.assert_allclose(sae.params["threshold"], C * theta, rtol=F32_RTOL)
