"""The SAE object used at inference time, and its file formats (SAELens, Gemma Scope 1 and 2).

Dimensions: B tokens, D = d_in, M = d_sae (latents), K = k (TopK).

Release-form parameters (what the files hold; `SAE.from_training` folds training ones into these):
    jumprelu: W_enc (D,M), b_enc (M,), W_dec (M,D), b_dec (D,), threshold (M,)
    topk:     W_enc (D,M), b_enc (M,), W_dec (M,D), b_dec (D,)
    gated:    W_enc (D,M), b_gate (M,), r_mag (M,), b_mag (M,), W_dec (M,D), b_dec (D,)

Inference (x_c = x - b_dec when cfg["apply_b_dec_to_input"], else x):
    jumprelu: pre = x_c @ W_enc + b_enc;  f = pre * H(pre - threshold) * H(pre)
              (SAELens: ReLU, then the threshold mask; the same as Gemma Scope's
              pre * H(pre - threshold) for every threshold >= 0, which is all a trained SAE
              can have)
    topk:     pre = x_c @ W_enc + b_enc (times ||W_dec rows|| if rescale_acts_by_decoder_norm);
              keep the K largest per row, ReLU on the kept values, zero elsewhere
    gated:    f = H(x_c @ W_enc + b_gate) * ReLU(x_c @ (W_enc * exp(r_mag)) + b_mag)
    all:      xhat = f @ W_dec + b_dec   (f / ||W_dec rows|| first for rescaled TopK)

Transcoders (jumprelu_transcoder, jumprelu_skip_transcoder; Gemma Scope 2) encode like jumprelu
on their input site and decode to another site, D_out wide: W_dec (M, D_out), b_dec (D_out,), no
b_dec subtracted from the input; a skip transcoder adds x @ W_skipᵀ, W_skip (D_out, D_in).

Formats:
- SAELens folder: cfg.json + sae_weights.safetensors (read by minisae.io.saelens, through minisae.io.safetensors_io; no torch).
- Gemma Scope 2 folder: params.safetensors + config.json (minisae.io.gemmascope2).
- Gemma Scope params.npz: W_enc, W_dec, b_enc, b_dec, threshold, float32, pre-encoder bias folded
  into b_enc (inference subtracts no b_dec). Read with allow_pickle=False (minisae.io.gemmascope).

Folding (Gemma Scope, arXiv 2408.05147, App. A), from training (input x = x_raw / C, pre-encoder
bias) to release form: every bias and the threshold are multiplied by C; W_enc, W_dec and r_mag are
kept; apply_b_dec_to_input = the training option pre_enc_bias (True for gated and topk). Each
pre-activation is then C times the training one, so f_release = C * f_train and xhat_raw =
C * xhat_train exactly, float rounding apart, for all three variants (a positive scale changes
neither TopK's choice nor a Heaviside).
A Gemma Scope file has no apply_b_dec_to_input flag, so `save_gemma_scope` also folds b_dec into
b_enc: b_enc' = C*b_enc - (C*b_dec) @ W_enc (Gemma Scope App. A).
"""

import json
import math
from pathlib import Path

import numpy

from minisae.errors import FileFormatError, MissingInputError, OutputExistsError
from minisae.io import gemmascope, gemmascope2, saelens
from minisae.io.files import atomic_path, check_output_dir, make_dir
from minisae.xp import asarray, to_numpy, xp_of

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
GEMMA_SCOPE_FILENAME = "params.npz"
# The cfg.json layout written here. SAELens >= 6 reads a file without metadata.sae_lens_version
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


def _expected_shape(name, d_in, d_sae, d_out=None):
    d_out = d_in if d_out is None else d_out  # an SAE writes what it reads; a transcoder d_out wide
    return {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_dec": (d_out,), "W_skip": (d_out, d_in)}.get(name, (d_sae,))


def _check_architecture(architecture, where):
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
    pre = x_c @ p["W_enc"] + p["b_enc"]  # (B, D) @ (D, M) -> (B, M)
    active = (pre > p["threshold"]) & (pre > 0)  # (B, M)
    return pre * active.astype(pre.dtype)  # (B, M)


def _decoder_norms(p):
    return xp_of(p["W_dec"]).linalg.norm(p["W_dec"], axis=1)  # (M,)


def _encode_topk(p, x_c, cfg):
    xp = xp_of(x_c)
    pre = x_c @ p["W_enc"] + p["b_enc"]  # (B, D) @ (D, M) -> (B, M)
    if cfg.get("rescale_acts_by_decoder_norm", False):
        pre = pre * _decoder_norms(p)  # (B, M) * (M,)
    B, M = pre.shape
    k = int(cfg["k"])
    if k >= M:
        return xp.maximum(pre, 0)  # (B, M): every latent kept
    top = xp.argpartition(pre, M - k, axis=1)[:, M - k :]  # (B, K) indices of the k largest
    rows = xp.arange(B)[:, None]  # (B, 1)
    f = xp.zeros_like(pre)  # (B, M)
    f[rows, top] = xp.maximum(pre[rows, top], 0)  # (B, K): ReLU on the kept values
    return f


def _encode_gated(p, x_c, cfg):
    xp = xp_of(x_c)
    pi_gate = x_c @ p["W_enc"] + p["b_gate"]  # (B, D) @ (D, M) -> (B, M)
    W_mag = p["W_enc"] * xp.exp(p["r_mag"])  # (D, M) * (M,): weight sharing
    pi_mag = x_c @ W_mag + p["b_mag"]  # (B, M)
    return (pi_gate > 0).astype(x_c.dtype) * xp.maximum(pi_mag, 0)  # (B, M)


_ENCODERS = {"jumprelu": _encode_jumprelu, "topk": _encode_topk, "gated": _encode_gated,
             "jumprelu_transcoder": _encode_jumprelu, "jumprelu_skip_transcoder": _encode_jumprelu}


def _default_cfg(architecture, d_in, d_sae, dtype):
    metadata = {"sae_lens_version": SAELENS_FORMAT_VERSION, "model_name": None, "hook_name": None,
                "context_size": None, "prepend_bos": True}
    return {"architecture": architecture, "d_in": int(d_in), "d_sae": int(d_sae), "dtype": str(dtype),
            "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
            "reshape_activations": "none", "metadata": metadata}


class SAE:
    """A sparse autoencoder in release form: encode, decode, load and save.

    Attributes: architecture, cfg (SAELens-style dict), params (release-form arrays on xp),
    d_in, d_sae, dtype, xp. `source` names the file (or "params") in error messages."""

    def __init__(self, architecture, params, cfg=None, *, xp=None, source="params"):
        _check_architecture(architecture, source)
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
            expected, found = _expected_shape(name, d_in, d_sae, d_out), tuple(params[name].shape)
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
        _check_architecture(architecture, "SAE.from_training")
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

    # --------------------------------------------------------------------------------------
    # saving

    def save(self, folder, *, overwrite=False):
        """Write a SAELens folder (cfg.json + sae_weights.safetensors); returns it as a Path.
        A new or empty folder is written as a temporary sibling and renamed into place (all or
        nothing). An existing SAE folder (one holding cfg.json, sae_weights.safetensors or
        params.npz) is refused unless overwrite=True, which replaces just those two files, each
        atomically; any other non-empty folder is always refused (minisae.io.files)."""
        from minisae.io.safetensors_io import save_file

        folder = Path(folder)
        state = check_output_dir(folder, "SAE", is_own=_is_sae_folder, flag="output folder")
        non_empty = state == "own"
        if non_empty and not overwrite:
            raise OutputExistsError(f"{folder}: folder exists and is not empty (an SAE folder); "
                                    "pass --overwrite to replace its SAE files")
        tensors = {n: numpy.ascontiguousarray(to_numpy(self.params[n])) for n in RELEASE_PARAMS[self.architecture]}
        cfg_text = json.dumps(self.cfg, indent=2, default=_json_default) + "\n"
        if non_empty:
            save_file(tensors, folder / WEIGHTS_FILENAME)
            _atomic_write_bytes(folder / CFG_FILENAME, cfg_text.encode())
            return folder
        make_dir(folder.parent)
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            save_file(tensors, tmp / WEIGHTS_FILENAME)
            (tmp / CFG_FILENAME).write_text(cfg_text)
            if folder.is_dir():
                folder.rmdir()  # empty, checked above
        return folder

    def save_gemma_scope(self, path, *, overwrite=False):
        """Write a Gemma Scope params.npz (JumpReLU only; float32; b_dec folded into b_enc when
        the SAE subtracts it from its input). `path`: the .npz file, or a folder to hold
        params.npz. Atomic; refuses to overwrite unless overwrite=True. Returns the file's Path."""
        return gemmascope.save(self, path, overwrite=overwrite)

    def save_gemma_scope_2(self, folder, *, overwrite=False):
        """Write a Gemma Scope 2 folder (params.safetensors + config.json; JumpReLU SAEs and
        transcoders only), as minisae.io.gemmascope2.save describes. Returns the folder's Path."""
        return gemmascope2.save(self, folder, overwrite=overwrite)

    # --------------------------------------------------------------------------------------
    # loading

    @classmethod
    def load(cls, path_or_hub_ref, *, xp=numpy, revision=None, dtype="float32"):
        """Load a SAELens folder, a Gemma Scope params.npz or a Gemma Scope 2 folder: a local path
        (a folder, its cfg.json / params.safetensors, or an .npz file), or a Hub reference
        "org/repo[/path/in/repo]" resolved with minisae.io.hub (a path in a google/gemma-scope-2-*
        repo (not gemma-scope-2b-*), or ending in params.safetensors, is a Gemma Scope 2 folder; a path ending in .npz is
        that file; a path in a google/gemma-scope-* repo means its params.npz; anything else is a
        SAELens folder). Tensors are cast to `dtype`."""
        dtype = numpy.dtype(dtype)
        if dtype.kind != "f":
            raise ValueError(f"SAE.load: expected a floating-point dtype, found {dtype}")
        ref = str(path_or_hub_ref)
        local = Path(ref).expanduser()
        if local.is_dir():
            if (local / CFG_FILENAME).exists() or (local / WEIGHTS_FILENAME).exists():
                return saelens.load(local / CFG_FILENAME, local / WEIGHTS_FILENAME, xp, dtype, str(local))
            if (local / GEMMA_SCOPE_FILENAME).exists():
                return gemmascope.load(local / GEMMA_SCOPE_FILENAME, xp, dtype, ref)
            if (local / gemmascope2.PARAMS_FILENAME).exists():
                return gemmascope2.load(local, xp=xp, dtype=dtype, source=ref)
            raise MissingInputError(f"{local}: no SAE here; expected {CFG_FILENAME} + {WEIGHTS_FILENAME} "
                                    f"(SAELens), {GEMMA_SCOPE_FILENAME} (Gemma Scope) or "
                                    f"{gemmascope2.PARAMS_FILENAME} + {gemmascope2.CONFIG_FILENAME} (Gemma Scope 2)")
        if local.exists():
            if local.name in (CFG_FILENAME, WEIGHTS_FILENAME):
                folder = local.parent
                return saelens.load(folder / CFG_FILENAME, folder / WEIGHTS_FILENAME, xp, dtype, str(folder))
            if local.suffix == ".npz":
                return gemmascope.load(local, xp, dtype, ref)
            if local.name == gemmascope2.PARAMS_FILENAME:
                return gemmascope2.load(local.parent, xp=xp, dtype=dtype, source=ref)
            raise SAEFileError(f"{local}: not an SAE file; expected a SAELens folder or a Gemma Scope .npz")
        parts = [s for s in ref.split("/") if s]
        from minisae.io import hub

        if ref.startswith(("/", ".", "~")) or len(parts) < 2 or hub._looks_like_path(ref):
            raise MissingInputError(f"{ref}: no such file or folder (and not a Hub reference 'org/repo/path')")

        repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
        if "gemma-scope-2-" in parts[1].lower() or sub.endswith(gemmascope2.PARAMS_FILENAME):  # not gemma-scope-2b
            sub = sub.removesuffix(gemmascope2.PARAMS_FILENAME).rstrip("/")
            prefix = f"{sub}/" if sub else ""
            config_path = hub.resolve_file(repo_id, prefix + gemmascope2.CONFIG_FILENAME, revision=revision)
            params_path = hub.resolve_file(repo_id, prefix + gemmascope2.PARAMS_FILENAME, revision=revision)
            return gemmascope2.load(Path(params_path).parent, xp=xp, dtype=dtype, source=ref,
                                    params_path=params_path, config_path=config_path)
        if sub.endswith(".npz") or "gemma-scope" in parts[1].lower():
            filename = sub if sub.endswith(".npz") else "/".join(parts[2:] + [GEMMA_SCOPE_FILENAME])
            return gemmascope.load(Path(hub.resolve_file(repo_id, filename, revision=revision)), xp, dtype, ref)
        prefix = f"{sub}/" if sub else ""
        cfg_path = Path(hub.resolve_file(repo_id, prefix + CFG_FILENAME, revision=revision))
        weights_path = Path(hub.resolve_file(repo_id, prefix + WEIGHTS_FILENAME, revision=revision))
        return saelens.load(cfg_path, weights_path, xp, dtype, ref)


# ------------------------------------------------------------------------------------------
# file helpers


def _json_default(value):
    if isinstance(value, numpy.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cfg value {value!r} of type {type(value).__name__} is not JSON-serialisable")


def _atomic_write(path, write):
    """Call write(file_handle) on a temporary file beside `path`, then rename it into place."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            write(fh)


def _is_sae_folder(folder):
    return any((folder / name).is_file() for name in (CFG_FILENAME, WEIGHTS_FILENAME, GEMMA_SCOPE_FILENAME))


def _atomic_write_bytes(path, data):
    _atomic_write(path, lambda fh: fh.write(data))
