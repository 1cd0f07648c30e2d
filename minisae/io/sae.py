"""The SAE object used at inference time: release-form parameters, their checks, encode and
decode, and `SAE.from_training`. No file format here: minisae.io.saelens, gemmascope and
gemmascope2 read and write files into this object, and minisae.io.saefile (the SAE users import,
`minisae.SAE`) adds load and save, dispatching on the path, the Hub reference and the format.

Dimensions: B tokens, D = d_in, M = d_sae (latents), K = k (TopK).

Release-form parameters (what the files hold; `SAE.from_training` folds training ones into these):
    jumprelu: W_enc (D,M), b_enc (M,), W_dec (M,D), b_dec (D,), threshold (M,)
    topk:     W_enc (D,M), b_enc (M,), W_dec (M,D), b_dec (D,)
    gated:    W_enc (D,M), b_gate (M,), r_mag (M,), b_mag (M,), W_dec (M,D), b_dec (D,)

Inference (x_c = x - b_dec when cfg["apply_b_dec_to_input"], else x):
    jumprelu: pi = ReLU(x_c @ W_enc + b_enc);  f = pi * H(pi - threshold)
              (SAELens: ReLU, then the threshold mask; the same as Gemma Scope's
              pre * H(pre - threshold) for every threshold >= 0, which is all a trained SAE
              can have)
    topk:     pre = x_c @ W_enc + b_enc (times ||W_dec rows|| if rescale_acts_by_decoder_norm);
              keep the K largest per row (ties: the lowest latents, as in training), ReLU on
              the kept values, zero elsewhere
    gated:    f = H(x_c @ W_enc + b_gate) * ReLU(x_c @ (W_enc * exp(r_mag)) + b_mag)
    all:      xhat = f @ W_dec + b_dec   (f / ||W_dec rows|| first for rescaled TopK)
Each encoder runs the same array operations as the training module's `encode`
(minisae.sae.<variant>), so a released SAE encodes bit for bit as the trained one did.

Transcoders (jumprelu_transcoder, jumprelu_skip_transcoder; Gemma Scope 2) encode like jumprelu
on their input site and decode to another site, D_out wide: W_dec (M, D_out), b_dec (D_out,), no
b_dec subtracted from the input; a skip transcoder adds x @ W_skipᵀ, W_skip (D_out, D_in).

Folding (Gemma Scope, arXiv 2408.05147, App. A), from training (input x = x_raw / C, pre-encoder
bias) to release form: every bias and the threshold are multiplied by C; W_enc, W_dec and r_mag are
kept; apply_b_dec_to_input = the training option pre_enc_bias (True for gated and topk). Each
pre-activation is then C times the training one, so f_release = C * f_train and xhat_raw =
C * xhat_train exactly, float rounding apart, for all three variants (a positive scale changes
neither TopK's choice nor a Heaviside).

The file formats (minisae.io.saefile.SAE.load and save): a SAELens folder (minisae.io.saelens), a
Gemma Scope params.npz (minisae.io.gemmascope), a Gemma Scope 2 folder (minisae.io.gemmascope2).
"""

import math

import numpy

from minisae.errors import FileFormatError
from minisae.sae.common import top_k
from minisae.xp import asarray, xp_of

# The cfg.json layout SAE.cfg follows. SAELens >= 6 reads a file without metadata.sae_lens_version
# as pre-6.0 and then drops model_name, hook_name, context_size from its metadata.
SAELENS_FORMAT_VERSION = "6.0.0"

RELEASE_PARAMS = {
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "gated": ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"),
    # transcoders (SAELens names): read one site, predict another; W_dec (M, D_out), b_dec (D_out,)
    "jumprelu_transcoder": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    "jumprelu_skip_transcoder": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold", "W_skip"),  # W_skip (D_out, D_in)
}
TRANSCODERS = ("jumprelu_transcoder", "jumprelu_skip_transcoder")
TRAINING_PARAMS = {**RELEASE_PARAMS, "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "log_threshold")}
ARCHITECTURES = tuple(RELEASE_PARAMS)


class SAEFileError(FileFormatError):
    """A malformed SAE file or parameter set; the message names the file and the tensor."""


def expected_shape(name, d_in, d_sae, d_out=None):
    d_out = d_in if d_out is None else d_out  # an SAE writes what it reads; a transcoder d_out wide
    return {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_dec": (d_out,), "W_skip": (d_out, d_in)}.get(name, (d_sae,))


def check_architecture(architecture, where):
    if not isinstance(architecture, str) or architecture not in RELEASE_PARAMS:
        raise SAEFileError(f"{where}: unknown SAE architecture {architecture!r}; expected one of {ARCHITECTURES}")


def _check_tensor(source, name, a):
    """A parameter must be floating point and finite: integer, boolean or NaN weights are refused
    (they would evaluate to nonsense, e.g. fvu=nan, without an error)."""
    dtype = numpy.dtype(str(a.dtype))
    if dtype.kind != "f":
        raise SAEFileError(f"{source}: tensor {name}: expected a floating-point dtype, found {dtype}")
    xp = xp_of(a)
    if not bool(xp.isfinite(a).all()):
        bad = int((~xp.isfinite(a)).sum())
        raise SAEFileError(f"{source}: tensor {name} holds {bad} NaN or infinite value(s)")


# ------------------------------------------------------------------------------------------
# inference, one encoder per architecture (x_c already has b_dec removed when configured)


def _encode_jumprelu(p, x_c, cfg):
    # the same operations as minisae.sae.jumprelu.encode, so the same bits (ties pi == theta included)
    xp = xp_of(x_c)
    pre = x_c @ p["W_enc"]  # (B, D) @ (D, M) -> (B, M)
    pre += p["b_enc"]  # (B, M)
    pi = xp.maximum(pre, 0.0)  # (B, M) ReLU
    return pi * (pi > p["threshold"])  # (B, M) H(pi - threshold), strict


def _decoder_norms(p):
    return xp_of(p["W_dec"]).linalg.norm(p["W_dec"], axis=1)  # (M,)


def _encode_topk(p, x_c, cfg):
    # the selection training uses (minisae.sae.common.top_k): ties go to the lowest latents
    xp = xp_of(x_c)
    pre = x_c @ p["W_enc"] + p["b_enc"]  # (B, D) @ (D, M) -> (B, M)
    if cfg.get("rescale_acts_by_decoder_norm", False):
        pre = pre * _decoder_norms(p)  # (B, M) * (M,)
    idx, vals = top_k(pre, int(cfg["k"]))  # (B, K), (B, K): the k largest, ties to the lowest columns
    f = xp.zeros_like(pre)  # (B, M)
    f[xp.arange(pre.shape[0])[:, None], idx] = xp.maximum(vals, 0.0)  # (B, K): ReLU on the kept values
    return f


def _encode_gated(p, x_c, cfg):
    # the same operations as minisae.sae.gated.encode: one product shared by both pre-activations,
    # x_c @ (W_enc * exp(r_mag)) = (x_c @ W_enc) * exp(r_mag)
    xp = xp_of(x_c)
    pre = x_c @ p["W_enc"]  # (B, D) @ (D, M) -> (B, M)
    pi_gate = pre + p["b_gate"]  # (B, M)
    pi_mag = pre * xp.exp(p["r_mag"]) + p["b_mag"]  # (B, M)
    return (pi_gate > 0.0) * xp.maximum(pi_mag, 0.0)  # (B, M)


_ENCODERS = {"jumprelu": _encode_jumprelu, "topk": _encode_topk, "gated": _encode_gated,
             "jumprelu_transcoder": _encode_jumprelu, "jumprelu_skip_transcoder": _encode_jumprelu}


def _default_cfg(architecture, d_in, d_sae, dtype):
    metadata = {"sae_lens_version": SAELENS_FORMAT_VERSION, "model_name": None, "hook_name": None,
                "context_size": None, "prepend_bos": True}
    return {"architecture": architecture, "d_in": int(d_in), "d_sae": int(d_sae), "dtype": str(dtype),
            "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
            "reshape_activations": "none", "metadata": metadata}


class SAE:
    """A sparse autoencoder in release form: encode and decode (minisae.io.saefile.SAE, its
    subclass, adds load and save).

    Attributes: architecture, cfg (SAELens-style dict), params (release-form arrays on xp),
    d_in, d_sae, dtype, xp. `source` names the file (or "params") in error messages."""

    def __init__(self, architecture, params, cfg=None, *, xp=None, source="params"):
        check_architecture(architecture, source)
        names = RELEASE_PARAMS[architecture]
        missing = [n for n in names if n not in params]
        if missing:
            raise SAEFileError(f"{source}: {architecture} SAE is missing tensor(s) {missing}; found {sorted(params)}")
        extra = sorted(set(params) - set(names))
        if extra:
            raise SAEFileError(f"{source}: unexpected tensor(s) {extra} for a {architecture} SAE (expected {names})")
        W_enc, W_dec = params["W_enc"], params["W_dec"]
        if W_enc.ndim != 2:
            raise SAEFileError(f"{source}: tensor W_enc: expected shape (d_in, d_sae), found {tuple(W_enc.shape)}")
        d_in, d_sae = (int(n) for n in W_enc.shape)
        transcoder = architecture in TRANSCODERS
        if transcoder and W_dec.ndim == 2 and W_dec.shape[0] == d_sae:
            d_out = int(W_dec.shape[1])  # a transcoder's output width is its own
        elif tuple(W_dec.shape) != (d_sae, d_in):
            raise SAEFileError(f"{source}: W_enc has shape {(d_in, d_sae)} (d_in, d_sae), so tensor W_dec should "
                               f"have shape {(d_sae, 'd_out' if transcoder else d_in)}, found {tuple(W_dec.shape)}")
        else:
            d_out = d_in
        for name in names:
            expected, found = expected_shape(name, d_in, d_sae, d_out), tuple(params[name].shape)
            if found != expected:
                raise SAEFileError(f"{source}: tensor {name}: expected shape {expected}, found {found}")
        dtype = numpy.dtype(str(W_enc.dtype))
        for name in names:
            _check_tensor(source, name, params[name])
        self.xp = xp_of(W_enc) if xp is None else xp
        self.params = {n: asarray(params[n], self.xp, dtype) for n in names}
        self.architecture, self.d_in, self.d_sae, self.d_out = architecture, d_in, d_sae, d_out

        full = _default_cfg(architecture, d_in, d_sae, dtype)
        if transcoder:  # a transcoder never subtracts b_dec (D_out wide) from its input (SAELens refuses it)
            full.update(d_out=d_out, apply_b_dec_to_input=False)
        cfg = dict(cfg or {})
        full["metadata"].update(cfg.pop("metadata", None) or {})
        full.update(cfg, dtype=str(dtype))
        for key, value in (("architecture", architecture), ("d_in", d_in), ("d_sae", d_sae),
                           ("d_out", d_out if transcoder else full.get("d_out"))):
            if full.get(key) != value:
                raise SAEFileError(f"{source}: cfg {key} is {full.get(key)!r} but the tensors give {value!r}")
        if transcoder and full["apply_b_dec_to_input"]:
            raise SAEFileError(f"{source}: apply_b_dec_to_input must be false for a transcoder (its b_dec is "
                               "an output bias)")
        if full["normalize_activations"] not in (None, "none"):
            raise SAEFileError(f"{source}: normalize_activations={full['normalize_activations']!r} is not "
                               "supported; fold the normalisation into the weights first (minisae writes 'none')")
        full["normalize_activations"] = "none"
        if full["reshape_activations"] not in ("none", "hook_z"):
            raise SAEFileError(f"{source}: reshape_activations={full['reshape_activations']!r}; "
                               "expected 'none' or 'hook_z'")
        if architecture == "topk":
            k = full.get("k")
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= d_sae:
                raise SAEFileError(f"{source}: a topk SAE needs an integer cfg 'k' in [1, d_sae={d_sae}], found {k!r}")
            full.setdefault("rescale_acts_by_decoder_norm", False)
        for key in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
            if key in full and not isinstance(full[key], bool):
                raise SAEFileError(f"{source}: cfg {key!r} must be a JSON boolean (true or false), "
                                   f"found {full[key]!r:.80}")
        self.cfg = full

    @property
    def dtype(self):
        return self.params["W_enc"].dtype

    @property
    def is_transcoder(self):
        """True for a transcoder: it reads hook_name and predicts hook_name_out (d_out wide)."""
        return self.architecture in TRANSCODERS

    def __repr__(self):
        out = f", d_out={self.d_out}, hook_name_out={self.cfg['metadata'].get('hook_name_out')!r}" \
            if self.is_transcoder else ""
        return (f"SAE(architecture={self.architecture!r}, d_in={self.d_in}, d_sae={self.d_sae}, "
                f"hook_name={self.cfg['metadata'].get('hook_name')!r}{out})")

    # --------------------------------------------------------------------------------------
    # inference

    def encode(self, x):
        """Latent activations f (..., M) for inputs x (..., D), cast to the SAE's dtype. With
        reshape_activations "hook_z", inputs (..., H, d_head) are flattened first."""
        x = asarray(x, self.xp, self.dtype)
        D = self.d_in
        if (self.cfg["reshape_activations"] == "hook_z" and x.ndim >= 2 and x.shape[-1] != D
                and x.shape[-2] * x.shape[-1] == D):
            x = x.reshape(*x.shape[:-2], D)  # (..., H, d_head) -> (..., D)
        if x.ndim == 0 or x.shape[-1] != D:
            raise ValueError(f"SAE.encode: expected inputs (..., d_in={D}), found shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x_c = x.reshape(-1, D)  # (B, D)
        if self.cfg["apply_b_dec_to_input"]:
            x_c = x_c - self.params["b_dec"]  # (B, D)
        f = _ENCODERS[self.architecture](self.params, x_c, self.cfg)  # (B, M)
        return f.reshape(*lead, self.d_sae)

    def decode(self, f):
        """Reconstructions xhat (..., D) from latent activations f (..., M); for a transcoder the
        prediction (..., D_out) without the skip term (see __call__)."""
        f = asarray(f, self.xp, self.dtype)
        if f.ndim == 0 or f.shape[-1] != self.d_sae:
            raise ValueError(f"SAE.decode: expected latents (..., d_sae={self.d_sae}), found shape {tuple(f.shape)}")
        if self.architecture == "topk" and self.cfg.get("rescale_acts_by_decoder_norm", False):
            f = f / _decoder_norms(self.params)  # (..., M)
        return f @ self.params["W_dec"] + self.params["b_dec"]  # (..., M) @ (M, D) -> (..., D)

    def skip(self, x):
        """A skip transcoder's affine term x @ W_skipᵀ (..., D_out) for inputs x (..., D_in)."""
        if "W_skip" not in self.params:
            raise ValueError(f"SAE.skip: a {self.architecture} has no skip connection")
        x = asarray(x, self.xp, self.dtype)
        return x @ self.params["W_skip"].T  # (..., D_in) @ (D_in, D_out) -> (..., D_out)

    def __call__(self, x):
        """The reconstruction decode(encode(x)); a skip transcoder adds x @ W_skipᵀ (SAELens's forward)."""
        out = self.decode(self.encode(x))
        if "W_skip" in self.params:
            out = out + self.skip(x)  # (..., D_out)
        return out

    # --------------------------------------------------------------------------------------
    # from a training run

    @classmethod
    def from_training(cls, architecture, params, *, scale, hyper=None, metadata=None):
        """Release-form SAE from training parameters (minisae.sae.<variant> names) trained on
        x = x_raw / scale: the module docstring's folding; log_threshold -> threshold. `hyper`:
        k for topk, pre_enc_bias (default True) for jumprelu, threshold (the running inference
        threshold) for batchtopk, which becomes a jumprelu SAE with that threshold on every latent;
        other keys are ignored."""
        hyper, C = dict(hyper or {}), float(scale)
        if architecture == "batchtopk":  # inference: a JumpReLU with one global threshold
            if hyper.get("threshold") is None:
                raise ValueError("SAE.from_training: a batchtopk SAE needs hyper['threshold'] (its running threshold)")
            from minisae.sae.batchtopk import inference_params

            architecture, params = "jumprelu", inference_params(params, hyper["threshold"])
        check_architecture(architecture, "SAE.from_training")
        if not (math.isfinite(C) and C > 0):
            raise ValueError(f"SAE.from_training: expected a finite scale > 0, found {scale!r}")
        names = TRAINING_PARAMS[architecture]
        if architecture == "jumprelu" and "threshold" in params:  # theta trained raw
            names = RELEASE_PARAMS["jumprelu"]
        missing = [n for n in names if n not in params]
        if missing:
            raise SAEFileError(f"SAE.from_training: {architecture} training params lack {missing}; "
                               f"found {sorted(params)}")
        xp = xp_of(params["W_enc"])
        out = {"W_enc": params["W_enc"], "W_dec": params["W_dec"], "b_dec": C * params["b_dec"]}
        cfg = {"apply_b_dec_to_input": True}
        if architecture == "jumprelu":
            theta = params["threshold"] if "threshold" in params else xp.exp(params["log_threshold"])
            out.update(b_enc=C * params["b_enc"], threshold=C * theta)  # theta' = C theta
            cfg["apply_b_dec_to_input"] = bool(hyper.get("pre_enc_bias", True))
        elif architecture == "topk":
            if "k" not in hyper:
                raise ValueError("SAE.from_training: a topk SAE needs hyper['k']")
            out["b_enc"] = C * params["b_enc"]
            cfg.update(k=int(hyper["k"]), rescale_acts_by_decoder_norm=False)
        else:
            out.update(b_gate=C * params["b_gate"], b_mag=C * params["b_mag"], r_mag=params["r_mag"])
        cfg["metadata"] = {**(metadata or {}), "minisae_folded_scale": C}
        if str(cfg["metadata"].get("hook_name") or "").endswith("hook_z"):
            cfg["reshape_activations"] = "hook_z"
        return cls(architecture, out, cfg, xp=xp, source="SAE.from_training")
