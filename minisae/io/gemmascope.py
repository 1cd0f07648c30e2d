"""Gemma Scope (first generation) files: a JumpReLU SAE for Gemma 2 as one params.npz.

A released Gemma Scope SAE (repos google/gemma-scope-{2b,9b,27b}-pt-{res,mlp,att}) is a file such as
`layer_20/width_16k/average_l0_71/params.npz` holding W_enc (D, M), W_dec (M, D), b_enc (M,),
b_dec (D,), threshold (M,), float32, with the pre-encoder bias folded into b_enc (inference
subtracts no b_dec; arXiv 2408.05147, App. A). Read with allow_pickle=False, after the archive's
sizes and headers are checked (minisae.io.files.npz_members). minisae.io.saefile.SAE.load and
SAE.save_gemma_scope call `load` and `write` here.
"""

import re

import numpy

from minisae.errors import FileFormatError, InputError
from minisae.io.files import NPY_ERRORS, npz_members
from minisae.io.sae import SAE, SAEFileError, expected_shape
from minisae.xp import to_numpy

FILENAME = "params.npz"
FILES = (FILENAME,)

_GEMMA_SCOPE_NAMES = {"W_enc": ("W_enc", "w_enc"), "W_dec": ("W_dec", "w_dec"), "b_enc": ("b_enc",),
                      "b_dec": ("b_dec",), "threshold": ("threshold",)}
_GEMMA_SCOPE_MODELS = {"2b": "gemma-2-2b", "9b": "gemma-2-9b", "27b": "gemma-2-27b"}
_GEMMA_SCOPE_HOOKS = {"res": "blocks.{L}.hook_resid_post", "mlp": "blocks.{L}.hook_mlp_out",
                      "att": "blocks.{L}.attn.hook_z"}


def _gemma_scope_metadata(ref):
    """Model and hook names read off a Gemma Scope reference such as
    google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71/params.npz."""
    meta = {"model_name": None, "hook_name": None}
    repo = re.search(r"gemma-scope-(2b|9b|27b)-pt-(res|mlp|att)", ref)
    layer = re.search(r"layer_(\d+)", ref)
    if repo:  # Gemma Scope was trained on 1024-token sequences starting with BOS
        meta.update(model_name=_GEMMA_SCOPE_MODELS[repo.group(1)], context_size=1024, prepend_bos=True)
        if layer:
            meta["hook_name"] = _GEMMA_SCOPE_HOOKS[repo.group(2)].format(L=int(layer.group(1)))
    return meta


def _check_npz_members(path, names, expected_shapes):
    """Before anything is decompressed: the archive's declared sizes and .npy headers are sane
    (minisae.io.files.npz_members: no zip bombs, no header claiming more than the member holds),
    and each array in `names` ({ours: (aliases...)}) is floating point with the shape that
    expected_shapes(d_in, d_sae) gives, d_in and d_sae read off W_enc."""
    try:
        members = npz_members(path)
    except FileFormatError as e:
        raise SAEFileError(str(e).replace("not a readable .npz", "not a readable Gemma Scope .npz")) from None
    shapes = {}
    for name, aliases in names.items():
        key = next((a for a in aliases if a in members), None)
        if key is None:
            continue  # reported by the loader, with the names found
        shape, dt = members[key]
        if dt.kind != "f":
            raise SAEFileError(f"{path}: array {key!r}: expected a floating-point dtype, found {dt}")
        shapes[name] = shape
    if len(shapes.get("W_enc", ())) != 2:
        if "W_enc" in shapes:
            raise SAEFileError(f"{path}: array W_enc: expected shape (d_in, d_sae), found {shapes['W_enc']}")
        return
    d_in, d_sae = shapes["W_enc"]
    for name, shape in shapes.items():
        want = expected_shapes(name, d_in, d_sae)
        if shape != want:
            raise SAEFileError(f"{path}: W_enc has shape {(d_in, d_sae)} (d_in, d_sae), so array {name} should "
                               f"have shape {want}, found {shape}")


def load(path, xp, dtype, ref, cls=SAE):
    """Read a Gemma Scope params.npz at `path` into a jumprelu SAE of class `cls` (`ref`: the name
    the user gave, for metadata)."""
    _check_npz_members(path, _GEMMA_SCOPE_NAMES, expected_shape)
    try:
        with numpy.load(path, allow_pickle=False) as npz:
            found, params = list(npz.files), {}
            for name, aliases in _GEMMA_SCOPE_NAMES.items():
                key = next((a for a in aliases if a in found), None)
                if key is None:
                    raise SAEFileError(f"{path}: missing array {name!r} (Gemma Scope params.npz); found {found}")
                params[name] = numpy.asarray(npz[key]).astype(dtype)
    except SAEFileError:
        raise
    except NPY_ERRORS as e:
        raise SAEFileError(f"{path}: not a readable Gemma Scope .npz archive ({type(e).__name__}: {e})") from e
    cfg = {"apply_b_dec_to_input": False, "metadata": _gemma_scope_metadata(ref)}
    if str(cfg["metadata"]["hook_name"] or "").endswith("hook_z"):
        cfg["reshape_activations"] = "hook_z"
    return cls("jumprelu", params, cfg, xp=xp, source=str(path))


def check_writable(sae):
    """Refuse an SAE the format cannot hold (it holds JumpReLU SAEs only)."""
    if sae.architecture != "jumprelu":
        raise InputError(f"the Gemma Scope format (params.npz) holds JumpReLU SAEs only, this is a "
                         f"{sae.architecture} SAE: write a SAELens folder instead (--to saelens)")


def write(sae, path):
    """Write `sae` as a Gemma Scope .npz at `path` (float32; b_dec folded into b_enc when the SAE
    subtracts it from its input, since the format has no such flag)."""
    check_writable(sae)
    p = {n: to_numpy(v).astype(numpy.float64) for n, v in sae.params.items()}
    b_enc = p["b_enc"] - p["b_dec"] @ p["W_enc"] if sae.cfg["apply_b_dec_to_input"] else p["b_enc"]  # (M,)
    arrays = {"W_enc": p["W_enc"], "W_dec": p["W_dec"], "b_enc": b_enc, "b_dec": p["b_dec"],
              "threshold": p["threshold"]}
    with open(path, "wb") as fh:
        numpy.savez(fh, **{n: a.astype(numpy.float32) for n, a in arrays.items()})
