"""A released SAE encodes exactly as the trained one: for every variant and every file format
minisae writes, SAE.from_training(scale=1) -> save -> SAE.load -> encode gives the same bits as
the variant module's encode (and forward's f) on the same parameters and inputs, ties included
(TopK: all pre-activations equal, the lowest latents are kept; JumpReLU / BatchTopK: pi exactly at
the threshold, not kept; Gated: a gate pre-activation exactly 0, closed)."""

import numpy
import pytest

from minisae.io.saefile import SAE
from minisae.sae import batchtopk, gated, jumprelu, topk

D, M, K, B = 6, 24, 3, 16
PREFIXES = (8, 16)
# variant name -> (module, training hyper for forward, release hyper, encode options)
VARIANTS = ("jumprelu", "jumprelu_raw_input", "gated", "topk", "batchtopk", "matryoshka")
FORMATS = ("saelens", "gemma_scope", "gemma_scope_2")
JUMPRELU_FAMILY = ("jumprelu", "jumprelu_raw_input", "batchtopk", "matryoshka")  # released as jumprelu


def training_params(variant, *, zero_b_dec):
    """float32 training parameters whose pre-activations tie on the rows where x_c = 0: there
    pre = b_enc, whose entries repeat (TopK: every one of the 1.0s ties), and where some equal
    the threshold exactly (JumpReLU, BatchTopK) or are exactly 0 (Gated's gate)."""
    rng = numpy.random.default_rng(VARIANTS.index(variant))
    module = {"gated": gated, "topk": topk}.get(variant, batchtopk if "batchtopk" in variant or
                                                 variant == "matryoshka" else jumprelu)
    p = module.init(D, M, seed=3)
    p["W_enc"] = p["W_enc"] + numpy.float32(0.2) * rng.standard_normal((D, M), dtype=numpy.float32)
    p["b_dec"] = numpy.zeros(D, numpy.float32) if zero_b_dec else rng.standard_normal(D, dtype=numpy.float32)
    ties = rng.choice(numpy.float32([0.5, 1.0, 0.0, -0.25]), M).astype(numpy.float32)  # (M,) repeats
    if variant == "gated":
        p["b_gate"] = ties  # 0.0 entries: the gate is exactly at its kink (closed)
        p["r_mag"] = numpy.float32(0.3) * rng.standard_normal(M, dtype=numpy.float32)
        p["b_mag"] = ties[::-1].copy()
    else:
        p["b_enc"] = ties
    if variant in ("jumprelu", "jumprelu_raw_input"):
        p["log_threshold"] = numpy.log(numpy.float32(rng.uniform(0.05, 1.5, M)))
        p["log_threshold"][::3] = numpy.log(numpy.float32(0.5))
        p["b_enc"][::3] = numpy.exp(p["log_threshold"][::3])  # pi = theta exactly at x_c = 0
    return p


def variant_setup(variant):
    """(module, forward hyper, SAE.from_training arch and hyper, encode options)."""
    if variant in ("jumprelu", "jumprelu_raw_input"):
        pre_enc_bias = variant == "jumprelu"
        return (jumprelu, {"sparsity_coeff": 1e-3, "pre_enc_bias": pre_enc_bias},
                ("jumprelu", {"pre_enc_bias": pre_enc_bias}), {"pre_enc_bias": pre_enc_bias})
    if variant == "gated":
        return gated, {"sparsity_coeff": 1e-3}, ("gated", {}), {}
    if variant == "topk":
        return topk, {"k": K}, ("topk", {"k": K}), {"k": K}
    theta = 0.5  # BatchTopK's running threshold; b_enc holds 0.5s: pi = theta exactly there
    prefixes = {"prefixes": PREFIXES} if variant == "matryoshka" else {}
    return batchtopk, {"k": K, **prefixes}, ("batchtopk", {"threshold": theta}), {"threshold": theta}


def inputs(params, seed):
    """(B, D) float32: random rows, then rows where x_c = x - b_dec is exactly 0 (the tie rows)."""
    x = numpy.random.default_rng(seed).standard_normal((B, D), dtype=numpy.float32)
    x[B // 2:] = params["b_dec"]
    return x


def released(sae, fmt, folder):
    if fmt == "saelens":
        return SAE.load(sae.save(folder / "sae"))
    if fmt == "gemma_scope":
        return SAE.load(sae.save_gemma_scope(folder / "gs"))
    return SAE.load(sae.save_gemma_scope_2(folder / "gs2"))


def assert_same_bits(a, b, what):
    a, b = numpy.asarray(a), numpy.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert a.tobytes() == b.tobytes(), f"{what}: {int((a != b).sum())} entries differ"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_released_sae_encodes_bit_for_bit_as_the_trained_one(tmp_path, variant, fmt):
    if fmt != "saelens" and variant not in JUMPRELU_FAMILY:
        pytest.skip(f"the {fmt} format holds JumpReLU SAEs only")
    # the Gemma Scope formats fold b_dec into b_enc (no flag for it): exact only when b_dec = 0
    params = training_params(variant, zero_b_dec=fmt != "saelens")
    module, hyper, (arch, release_hyper), enc = variant_setup(variant)
    x = inputs(params, seed=len(variant))
    f_train = module.encode(params, x, **enc)  # (B, M)
    if module is not batchtopk:  # BatchTopK's forward selects over the batch; inference is encode
        assert_same_bits(module.forward(params, x, **hyper)[0]["f"], f_train, "forward's f vs encode")
    sae = SAE.from_training(arch, params, scale=1.0, hyper=release_hyper)
    assert_same_bits(sae.encode(x), f_train, "SAE.from_training encode")
    assert_same_bits(released(sae, fmt, tmp_path).encode(x), f_train, f"{fmt} file's encode")


def test_topk_ties_keep_the_lowest_latents_in_the_released_sae(tmp_path):
    """All pre-activations tied, k = 3: training keeps latents 0 1 2, and so does the release."""
    params = {"W_enc": numpy.zeros((D, M), numpy.float32), "b_enc": numpy.ones(M, numpy.float32),
              "W_dec": numpy.eye(M, D, dtype=numpy.float32), "b_dec": numpy.zeros(D, numpy.float32)}
    x = numpy.ones((2, D), numpy.float32)
    f_train = topk.encode(params, x, k=3)
    assert numpy.flatnonzero(f_train[0]).tolist() == [0, 1, 2]
    sae = SAE.load(SAE.from_training("topk", params, scale=1.0, hyper={"k": 3}).save(tmp_path / "sae"))
    assert numpy.flatnonzero(sae.encode(x)[0]).tolist() == [0, 1, 2]


@pytest.mark.parametrize("module, options", [(jumprelu, {"pre_enc_bias": True}), (gated, {}),
                                             (topk, {"k": K}), (batchtopk, {"threshold": 0.5})])
@pytest.mark.parametrize("option", ["sparsity_coef", "sparsity_coeff", "aux_k", "prefixes"])
def test_encode_refuses_an_option_it_does_not_use_naming_it(module, options, option):
    """encode takes only what inference uses: a training option or a typo is an error, not ignored."""
    params = module.init(D, M)
    x = numpy.zeros((2, D), numpy.float32)
    module.encode(params, x, **options)  # the options it does take
    with pytest.raises(TypeError, match=option):
        module.encode(params, x, **options, **{option: 1})
