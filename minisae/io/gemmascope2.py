"""Gemma Scope 2 files: JumpReLU SAEs and transcoders for Gemma 3, read into and written from minisae.SAE.

A released Gemma Scope 2 SAE (repos google/gemma-scope-2-{270m,1b,4b,12b,27b}-{pt,it}) is a folder such
as `resid_post/layer_9_width_16k_l0_small/` holding two files:

    params.safetensors   w_enc (D_in, M), w_dec (M, D_out), b_enc (M,), b_dec (D_out,), threshold (M,),
                         and for skip ("affine") transcoders affine_skip_connection (D_in, D_out)
    config.json          {"architecture": "jump_relu", "type": "sae" | "transcoder",
                          "affine_connection": false, "model_name": "google/gemma-3-270m",
                          "hf_hook_point_in": "model.layers.9.output", "hf_hook_point_out": "model.layers.9.output",
                          "width": 16384, "l0": 60}

Inference (no pre-encoder bias is subtracted; the threshold is raw):
    f = ReLU(pre) * (pre > threshold),  pre = x @ w_enc + b_enc
    y = f @ w_dec + b_dec  (+ x @ affine_skip_connection for a skip transcoder)
An SAE reads and writes the same site (D_out = D_in); a transcoder reads the MLP's normed input
(`pre_feedforward_layernorm.output`) and predicts the MLP's normed output
(`post_feedforward_layernorm.output`). SAELens loads these as "jumprelu", "jumprelu_transcoder" and
"jumprelu_skip_transcoder" with W_skip = affine_skip_connectionᵀ; minisae uses the same names.
"""

import json
import math
from pathlib import Path

import numpy

from minisae.errors import FileFormatError, InputError
from minisae.io import safetensors_io
from minisae.io.files import read_json
from minisae.io.sae import SAE, TRANSCODERS
from minisae.sites import hf_name, saelens_name
from minisae.xp import to_numpy

PARAMS_FILENAME = "params.safetensors"
CONFIG_FILENAME = "config.json"
MAX_CONFIG_BYTES = 1 << 20  # a config.json is a few hundred bytes; refuse to parse anything huge
TENSORS = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold")
SKIP = "affine_skip_connection"
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
ARCHITECTURE = "jump_relu"  # the only one Gemma Scope 2 releases
TYPES = ("sae", "transcoder")
FILES = (PARAMS_FILENAME, CONFIG_FILENAME)


class GemmaScope2Error(FileFormatError):
    """A Gemma Scope 2 folder that is missing a file, or whose config.json or tensors are wrong."""


def _site_names(hf_site):
    """(SAELens name, Hugging Face name) of a config's hook point; the SAELens one None if unknown."""
    if hf_site is None:
        return None, None
    try:
        return saelens_name(hf_site), hf_site
    except ValueError:
        return None, hf_site  # a hook minisae cannot run (e.g. an embedding SAE): kept, not refused


def read_config(path):
    """config.json as a checked dict: architecture, type, affine_connection, hook points, width, l0."""
    path = Path(path)
    if not path.is_file():
        raise GemmaScope2Error(f"{path}: missing (a Gemma Scope 2 folder holds {PARAMS_FILENAME} and {CONFIG_FILENAME})")
    cfg = read_json(path, max_bytes=MAX_CONFIG_BYTES, error=GemmaScope2Error)  # a JSON object, size-limited
    arch = cfg.get("architecture", ARCHITECTURE)
    if arch != ARCHITECTURE:
        raise GemmaScope2Error(f"{path}: architecture: expected {ARCHITECTURE!r}, found {arch!r}")
    kind = cfg.get("type", "sae")
    if kind not in TYPES:
        raise GemmaScope2Error(f"{path}: type: expected one of {TYPES} (cross-layer transcoders are not "
                               f"supported), found {kind!r}")
    affine = cfg.get("affine_connection", False)
    if not isinstance(affine, bool):
        raise GemmaScope2Error(f"{path}: affine_connection: expected true or false, found {affine!r}")
    if affine and kind != "transcoder":
        raise GemmaScope2Error(f"{path}: affine_connection is true but type is {kind!r}; only transcoders skip")
    for key in ("hf_hook_point_in", "hf_hook_point_out", "model_name"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise GemmaScope2Error(f"{path}: {key}: expected a string, found {cfg[key]!r}")
    for key in ("width", "l0"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            raise GemmaScope2Error(f"{path}: {key}: expected a non-negative number, found {v!r}")
    return {**cfg, "architecture": arch, "type": kind, "affine_connection": affine}


def load(folder, *, xp, dtype, source=None, params_path=None, config_path=None, cls=SAE):
    """An SAE of class `cls` from a Gemma Scope 2 folder (or its two files); tensors cast to `dtype`."""
    folder = Path(folder)
    params_path = Path(params_path or folder / PARAMS_FILENAME)
    config_path = Path(config_path or folder / CONFIG_FILENAME)
    source = source or str(folder)
    cfg = read_config(config_path)
    if not params_path.is_file():
        raise GemmaScope2Error(f"{params_path}: missing (a Gemma Scope 2 folder holds {PARAMS_FILENAME} and "
                               f"{CONFIG_FILENAME})")
    want = TENSORS + ((SKIP,) if cfg["affine_connection"] else ())
    with safetensors_io.SafetensorsFile(params_path) as st:
        found = set(st.keys())
        missing, extra = [n for n in want if n not in found], sorted(found - set(want))
        if missing or extra:
            raise GemmaScope2Error(f"{params_path}: expected tensors {list(want)} (config.json affine_connection="
                                   f"{str(cfg['affine_connection']).lower()}); missing {missing}, unexpected {extra}")
        raw = {}
        for name in want:
            info = st.tensors[name]
            if info.dtype not in FLOAT_DTYPES:
                raise GemmaScope2Error(f"{params_path}: tensor {name}: expected a float dtype {FLOAT_DTYPES}, "
                                       f"found {info.dtype}")
            raw[name] = numpy.array(st.get(name), dtype=dtype)  # a copy, off the memory map
    if raw["w_enc"].ndim != 2:
        raise GemmaScope2Error(f"{params_path}: tensor w_enc: expected shape (d_in, width), found {raw['w_enc'].shape}")
    d_in, m = raw["w_enc"].shape
    d_out = raw["w_dec"].shape[-1] if raw["w_dec"].ndim == 2 else None
    transcoder = cfg["type"] == "transcoder"
    shapes = {"w_dec": (m, d_out if transcoder else d_in), "b_enc": (m,), "b_dec": (d_out if transcoder else d_in,),
              "threshold": (m,), SKIP: (d_in, d_out)}
    for name in want[1:]:
        if raw[name].shape != shapes[name]:
            raise GemmaScope2Error(f"{params_path}: tensor {name}: expected shape {shapes[name]} (w_enc is "
                                   f"{(d_in, m)}), found {raw[name].shape}")
    for name, a in raw.items():
        if not numpy.isfinite(a).all():
            raise GemmaScope2Error(f"{params_path}: tensor {name} holds NaN or infinite values")
    if cfg.get("width") is not None and cfg["width"] != m:
        raise GemmaScope2Error(f"{config_path}: width is {cfg['width']} but w_enc has {m} latents")

    hook_in, hf_in = _site_names(cfg.get("hf_hook_point_in"))
    hook_out, hf_out = _site_names(cfg.get("hf_hook_point_out"))
    metadata = {"model_name": cfg.get("model_name"), "hook_name": hook_in or hf_in, "hf_hook_name": hf_in,
                "context_size": 1024, "prepend_bos": True}  # as SAELens's Gemma Scope 2 loader records them
    if cfg.get("l0") is not None:
        metadata["gemma_scope_2_l0"] = cfg["l0"]
    params = {"W_enc": raw["w_enc"], "W_dec": raw["w_dec"], "b_enc": raw["b_enc"], "b_dec": raw["b_dec"],
              "threshold": raw["threshold"]}
    if transcoder:
        architecture = "jumprelu_skip_transcoder" if cfg["affine_connection"] else "jumprelu_transcoder"
        metadata.update(hook_name_out=hook_out or hf_out, hf_hook_name_out=hf_out)
        if cfg["affine_connection"]:
            params["W_skip"] = numpy.ascontiguousarray(raw[SKIP].T)  # (D_out, D_in), SAELens's layout
    else:
        architecture = "jumprelu"
        if hf_out is not None and hf_out != hf_in:
            raise GemmaScope2Error(f"{config_path}: an SAE (type 'sae') must write the site it reads; "
                                   f"hf_hook_point_in {hf_in!r}, hf_hook_point_out {hf_out!r}")
    # inputs are flat even at attn.hook_z (o_proj's input, H*d wide): reshape "none", as SAELens records it
    sae_cfg = {"apply_b_dec_to_input": False, "reshape_activations": "none", "metadata": metadata}
    return cls(architecture, params, sae_cfg, xp=xp, source=source)


def check_writable(sae):
    """Refuse an SAE the format cannot hold (JumpReLU SAEs and transcoders only)."""
    if sae.architecture not in ("jumprelu",) + TRANSCODERS:
        raise InputError(f"Gemma Scope 2 files hold JumpReLU SAEs and transcoders only; this is a "
                         f"{sae.architecture!r} SAE (save it as a SAELens folder instead)")


def write(sae, folder):
    """Write `sae` as params.safetensors + config.json (float32) into `folder`, an existing, empty one.

    JumpReLU SAEs and (skip) transcoders only. An SAE that subtracts b_dec from its input has it folded
    into b_enc (b_enc' = b_enc - b_dec @ W_enc), since the format has no such flag.
    """
    check_writable(sae)
    p = {n: to_numpy(v).astype(numpy.float64) for n, v in sae.params.items()}
    b_enc = p["b_enc"] - p["b_dec"] @ p["W_enc"] if sae.cfg["apply_b_dec_to_input"] else p["b_enc"]  # (M,)
    tensors = {"w_enc": p["W_enc"], "w_dec": p["W_dec"], "b_enc": b_enc, "b_dec": p["b_dec"],
               "threshold": p["threshold"]}
    if "W_skip" in p:
        tensors[SKIP] = p["W_skip"].T  # (D_in, D_out)
    tensors = {n: numpy.ascontiguousarray(a, dtype=numpy.float32) for n, a in tensors.items()}

    meta = sae.cfg["metadata"]

    def hf(hf_key, key):  # the Hugging Face hook name, from the metadata or translated from a SAELens name
        if meta.get(hf_key):
            return meta[hf_key]
        try:
            return hf_name(meta[key]) if meta.get(key) else None
        except ValueError:
            return meta[key]

    hook_in = hf("hf_hook_name", "hook_name")
    config = {"hf_hook_point_in": hook_in,
              "hf_hook_point_out": hf("hf_hook_name_out", "hook_name_out") if sae.is_transcoder else hook_in,
              "width": sae.d_sae, "model_name": meta.get("model_name"), "architecture": ARCHITECTURE,
              "l0": meta.get("gemma_scope_2_l0"), "affine_connection": "W_skip" in p,
              "type": "transcoder" if sae.is_transcoder else "sae"}
    text = (json.dumps(config, indent=2) + "\n").encode()

    folder = Path(folder)
    safetensors_io.save_file(tensors, folder / PARAMS_FILENAME)
    (folder / CONFIG_FILENAME).write_bytes(text)


def is_config(path):
    """True when `path` is a Gemma Scope 2 config.json (it names architecture jump_relu); a model's
    config.json is not one. Only a regular file is read (a FIFO would block)."""
    try:
        if not Path(path).is_file():
            return False
        return read_json(path, max_bytes=MAX_CONFIG_BYTES).get("architecture") == ARCHITECTURE
    except (FileFormatError, OSError):
        return False
