"""SAELens folders (cfg.json + sae_weights.safetensors): read into an SAE and written from one, without torch.

cfg.json gives the architecture, d_in, d_sae (and d_out for transcoders) and the inference options
kept in SAE.cfg; the safetensors header is checked (floating-point dtypes, every tensor's shape
against the cfg) before any tensor is read. Older SAELens files are accepted too: metadata keys at
the top level (SAELens < 6) and JumpReLU's log_threshold in place of threshold. `write` fills a
new folder; minisae.io.saefile.SAE.save puts it in place as one unit.
"""

import json
from pathlib import Path

import numpy

from minisae.io import safetensors_io
from minisae.io.files import read_json
from minisae.io.sae import (ARCHITECTURES, RELEASE_PARAMS, SAE, TRANSCODERS, SAEFileError, check_architecture,
                            expected_shape)
from minisae.xp import to_numpy

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
FILES = (CFG_FILENAME, WEIGHTS_FILENAME)

# SAELens < 6 kept these at the top level of cfg.json instead of under "metadata"
_OLD_METADATA_KEYS = ("model_name", "hook_name", "hook_head_index", "context_size", "prepend_bos")
_CFG_KEYS = ("d_in", "d_sae", "d_out", "device", "apply_b_dec_to_input", "normalize_activations", "reshape_activations",
             "k", "rescale_acts_by_decoder_norm")


def load(cfg_path, weights_path, xp, dtype, source, cls=SAE):
    """Read a SAELens folder's cfg.json and sae_weights.safetensors into an SAE of class `cls`
    (`source`: its name in errors)."""
    for path in (cfg_path, weights_path):
        if not path.exists():
            raise FileNotFoundError(f"{source}: missing {path.name} (a SAELens folder holds {CFG_FILENAME} "
                                    f"and {WEIGHTS_FILENAME})")
    cfg = read_json(cfg_path, error=SAEFileError)  # size and nesting limits; a JSON object
    architecture = cfg.get("architecture")
    if architecture is None:
        raise SAEFileError(f"{cfg_path}: no 'architecture' key (a SAELens < 6 'standard' SAE?); "
                           f"expected one of {ARCHITECTURES}")
    check_architecture(architecture, str(cfg_path))
    for key in ("d_in", "d_sae") + (("d_out",) if architecture in TRANSCODERS else ()):
        v = cfg.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SAEFileError(f"{cfg_path}: expected a positive integer {key!r}, found {v!r:.80}")
    if not isinstance(cfg.get("metadata") or {}, dict):
        raise SAEFileError(f"{cfg_path}: 'metadata' must be a JSON object, found {type(cfg['metadata']).__name__}")
    cfg_out = {k: cfg[k] for k in _CFG_KEYS if k in cfg}
    cfg_out["architecture"] = architecture
    cfg_out["metadata"] = dict(cfg.get("metadata") or {k: cfg[k] for k in _OLD_METADATA_KEYS if k in cfg})

    with safetensors_io.SafetensorsFile(weights_path) as st:
        names = set(st.keys())
        for name in sorted(names):  # from the header, before any tensor is read
            info = st.tensors[name]
            if info.dtype not in ("F16", "BF16", "F32", "F64"):
                raise SAEFileError(f"{weights_path}: tensor {name}: expected a floating-point dtype, found {info.dtype}")
        params = {}
        if architecture == "jumprelu" and "threshold" not in names and "log_threshold" in names:
            names.discard("log_threshold")  # older SAELens JumpReLU files store log(theta)
            params["threshold"] = numpy.exp(st.get("log_threshold", dtype=numpy.float64))
        for name in names:
            params[name] = numpy.array(st.get(name), dtype=dtype)  # a copy, off the memory map
    missing = [n for n in RELEASE_PARAMS[architecture] if n not in params]
    if missing:
        raise SAEFileError(f"{weights_path}: {architecture} SAE is missing tensor(s) {missing}; found {sorted(params)}")
    order = RELEASE_PARAMS[architecture] + tuple(sorted(set(params) - set(RELEASE_PARAMS[architecture])))
    for name in order:  # W_enc first: a cfg d_in / d_sae mismatch is reported on it
        expected = expected_shape(name, cfg["d_in"], cfg["d_sae"], cfg.get("d_out"))
        if tuple(params[name].shape) != expected:
            raise SAEFileError(f"{weights_path}: tensor {name}: expected shape {expected} (cfg d_in={cfg['d_in']}, "
                               f"d_sae={cfg['d_sae']}), found {tuple(params[name].shape)}")
    params = {n: a.astype(dtype, copy=False) for n, a in params.items()}
    return cls(architecture, params, cfg_out, xp=xp, source=str(weights_path))


def write(sae, folder):
    """Write `sae`'s cfg.json and sae_weights.safetensors into `folder` (an existing, empty one)."""
    folder = Path(folder)
    tensors = {n: numpy.ascontiguousarray(to_numpy(sae.params[n])) for n in RELEASE_PARAMS[sae.architecture]}
    safetensors_io.save_file(tensors, folder / WEIGHTS_FILENAME)
    (folder / CFG_FILENAME).write_text(json.dumps(sae.cfg, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, numpy.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cfg value {value!r} of type {type(value).__name__} is not JSON-serialisable")
