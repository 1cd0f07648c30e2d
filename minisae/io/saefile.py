"""minisae's SAE: the SAE object of minisae.io.sae with its files, loaded and saved through the formats.

    sae = SAE.load("google/gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71")  # or a local path
    sae.save("out/sae")                   # a SAELens folder: cfg.json + sae_weights.safetensors
    sae.save_gemma_scope("out/gs")        # a Gemma Scope params.npz (JumpReLU only)
    sae.save_gemma_scope_2("out/gs2")     # a Gemma Scope 2 folder (JumpReLU SAEs and transcoders)

Formats, one module each, none importing another or this one:
- SAELens folder: cfg.json + sae_weights.safetensors (minisae.io.saelens, through
  minisae.io.safetensors_io; no torch).
- Gemma Scope 2 folder: params.safetensors + config.json (minisae.io.gemmascope2).
- Gemma Scope params.npz: W_enc, W_dec, b_enc, b_dec, threshold, float32, pre-encoder bias folded
  into b_enc (inference subtracts no b_dec). Read with allow_pickle=False (minisae.io.gemmascope).
A Gemma Scope file has no apply_b_dec_to_input flag, so `save_gemma_scope` also folds b_dec into
b_enc: b_enc' = b_enc - b_dec @ W_enc (Gemma Scope App. A).

This module chooses the format from a path or a Hub reference (minisae.io.hub) and applies the
output-folder rule (minisae.io.files) when saving. The object itself, its shapes, encode, decode
and `SAE.from_training` are minisae.io.sae's; the names below are re-exported from there.
"""

import contextlib
import os
import re
import shutil
from pathlib import Path

import numpy

from minisae.errors import MinisaeError, MissingInputError, OutputExistsError, storage_error
from minisae.io import gemmascope, gemmascope2, hub, sae, saelens
from minisae.io.files import atomic_path, check_output_dir, is_temp_name, make_dir, temp_name
from minisae.io.sae import (ARCHITECTURES, RELEASE_PARAMS, SAELENS_FORMAT_VERSION, TRAINING_PARAMS,  # noqa: F401
                            TRANSCODERS, SAEFileError, expected_shape)

CFG_FILENAME = saelens.CFG_FILENAME
WEIGHTS_FILENAME = saelens.WEIGHTS_FILENAME
GEMMA_SCOPE_FILENAME = gemmascope.FILENAME


class SAE(sae.SAE):
    """A sparse autoencoder in release form: encode, decode (minisae.io.sae.SAE), load and save.

    Attributes: architecture, cfg (SAELens-style dict), params (release-form arrays on xp),
    d_in, d_sae, dtype, xp. `source` names the file (or "params") in error messages."""

    # --------------------------------------------------------------------------------------
    # saving

    def save(self, folder, *, overwrite=False):
        """Write a SAELens folder (cfg.json + sae_weights.safetensors); returns it as a Path.
        The folder is written whole as a temporary sibling and swapped into place (a kill leaves
        the old SAE or the new one). An existing SAE folder (one holding any format's files) is
        refused unless overwrite=True, which replaces its SAE files, whatever their format, and
        keeps its other files; any other non-empty folder is always refused (minisae.io.files)."""
        return _save_folder(self, folder, saelens.write, overwrite, "its SAE files")

    def save_gemma_scope(self, path, *, overwrite=False):
        """Write a Gemma Scope params.npz (JumpReLU only; float32; b_dec folded into b_enc when
        the SAE subtracts it from its input). `path`: the .npz file (replaced atomically), or a
        folder to hold params.npz (replaced as one unit, as `save` does). Refuses to overwrite
        unless overwrite=True. Returns the file's Path."""
        gemmascope.check_writable(self)
        path = Path(path)
        if path.suffix != ".npz":
            folder = _save_folder(self, path, lambda obj, new: gemmascope.write(obj, new / GEMMA_SCOPE_FILENAME),
                                  overwrite, f"its {GEMMA_SCOPE_FILENAME}")
            return folder / GEMMA_SCOPE_FILENAME
        _recover(path, clean=True)  # a temporary left by a killed save of this file
        if path.is_dir() or (path.exists() and not overwrite):
            raise OutputExistsError(f"{path}: exists; pass --overwrite to replace it")
        make_dir(path.parent)
        with atomic_path(path) as tmp:
            gemmascope.write(self, tmp)
        return path

    def save_gemma_scope_2(self, folder, *, overwrite=False):
        """Write a Gemma Scope 2 folder (params.safetensors + config.json; JumpReLU SAEs and
        transcoders only), as minisae.io.gemmascope2.write describes. Returns the folder's Path."""
        gemmascope2.check_writable(self)
        return _save_folder(self, folder, gemmascope2.write, overwrite, "its Gemma Scope 2 files")

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
        for folder in (local, local.parent):  # the SAE folder, or the folder of the file named
            if not folder.exists() and folder.parent.is_dir():
                _recover(folder, clean=False)  # a save killed between its two renames
        if local.is_dir():
            found = formats_in(local)
            if len(found) > 1:
                raise SAEFileError(f"{local}: holds two SAE formats, {' and '.join(found)}; minisae writes one "
                                   "per folder: remove one, or load one of the files by its path")
            if (local / CFG_FILENAME).exists() or (local / WEIGHTS_FILENAME).exists():
                return saelens.load(local / CFG_FILENAME, local / WEIGHTS_FILENAME, xp, dtype, str(local), cls)
            if (local / GEMMA_SCOPE_FILENAME).exists():
                return gemmascope.load(local / GEMMA_SCOPE_FILENAME, xp, dtype, ref, cls)
            if (local / gemmascope2.PARAMS_FILENAME).exists():
                return gemmascope2.load(local, xp=xp, dtype=dtype, source=ref, cls=cls)
            raise MissingInputError(f"{local}: no SAE here; expected {CFG_FILENAME} + {WEIGHTS_FILENAME} "
                                    f"(SAELens), {GEMMA_SCOPE_FILENAME} (Gemma Scope) or "
                                    f"{gemmascope2.PARAMS_FILENAME} + {gemmascope2.CONFIG_FILENAME} (Gemma Scope 2)")
        if local.exists():
            if local.name in (CFG_FILENAME, WEIGHTS_FILENAME):
                folder = local.parent
                return saelens.load(folder / CFG_FILENAME, folder / WEIGHTS_FILENAME, xp, dtype, str(folder), cls)
            if local.suffix == ".npz":
                return gemmascope.load(local, xp, dtype, ref, cls)
            if local.name == gemmascope2.PARAMS_FILENAME:
                return gemmascope2.load(local.parent, xp=xp, dtype=dtype, source=ref, cls=cls)
            raise SAEFileError(f"{local}: not an SAE file; expected a SAELens folder or a Gemma Scope .npz")
        parts = [s for s in ref.split("/") if s]
        if ref.startswith(("/", ".", "~")) or len(parts) < 2 or hub.looks_like_path(ref):
            raise MissingInputError(f"{ref}: no such file or folder (and not a Hub reference 'org/repo/path')")

        repo_id, sub = "/".join(parts[:2]), "/".join(parts[2:])
        if "gemma-scope-2-" in parts[1].lower() or sub.endswith(gemmascope2.PARAMS_FILENAME):  # not gemma-scope-2b
            sub = sub.removesuffix(gemmascope2.PARAMS_FILENAME).rstrip("/")
            prefix = f"{sub}/" if sub else ""
            config_path = hub.resolve_file(repo_id, prefix + gemmascope2.CONFIG_FILENAME, revision=revision)
            params_path = hub.resolve_file(repo_id, prefix + gemmascope2.PARAMS_FILENAME, revision=revision)
            return gemmascope2.load(Path(params_path).parent, xp=xp, dtype=dtype, source=ref,
                                    params_path=params_path, config_path=config_path, cls=cls)
        if sub.endswith(".npz") or "gemma-scope" in parts[1].lower():
            filename = sub if sub.endswith(".npz") else "/".join(parts[2:] + [GEMMA_SCOPE_FILENAME])
            return gemmascope.load(Path(hub.resolve_file(repo_id, filename, revision=revision)), xp, dtype, ref, cls)
        prefix = f"{sub}/" if sub else ""
        cfg_path = Path(hub.resolve_file(repo_id, prefix + CFG_FILENAME, revision=revision))
        weights_path = Path(hub.resolve_file(repo_id, prefix + WEIGHTS_FILENAME, revision=revision))
        return saelens.load(cfg_path, weights_path, xp, dtype, ref, cls)


# ------------------------------------------------------------------------------------------
# folders


def is_sae_folder(folder):
    """A folder of SAE files: a SAELens, Gemma Scope or Gemma Scope 2 file, or a config.json that
    names architecture jump_relu. A model's config.json is not one: it is never replaced."""
    folder = Path(folder)
    if any((folder / name).is_file() for name in saelens.FILES + gemmascope.FILES + (gemmascope2.PARAMS_FILENAME,)):
        return True
    return gemmascope2.is_config(folder / gemmascope2.CONFIG_FILENAME)


def formats_in(folder):
    """The SAE formats whose files `folder` holds, e.g. ["SAELens"]; more than one is refused on load."""
    folder = Path(folder)
    found = []
    for name, files in (("SAELens", saelens.FILES), ("Gemma Scope", gemmascope.FILES),
                        ("Gemma Scope 2", (gemmascope2.PARAMS_FILENAME,))):
        have = [f for f in files if (folder / f).is_file()]
        if have:
            found.append(f"{name} ({', '.join(have)})")
    gs2_config = gemmascope2.is_config(folder / gemmascope2.CONFIG_FILENAME)
    if gs2_config and not any(f.startswith("Gemma Scope 2") for f in found):
        found.append(f"Gemma Scope 2 ({gemmascope2.CONFIG_FILENAME})")
    return found


def _is_sae_file(folder, name):
    """True for a name a format writes into an SAE folder (a model's config.json is not one)."""
    if name == gemmascope2.CONFIG_FILENAME:
        return gemmascope2.is_config(folder / name)
    return name in saelens.FILES + gemmascope.FILES + gemmascope2.FILES


# A folder is replaced as one unit: the new SAE is written whole in a hidden sibling
# (.NAME.XXXXXXXX.tmp), then two renames swap it in: NAME -> .NAME.XXXXXXXX.replaced.tmp, the
# sibling -> NAME; the replaced folder is removed last. A kill leaves NAME holding the old SAE or
# the new one, whole, except between the two renames, where NAME is missing and the old SAE is
# whole in its .replaced.tmp sibling: `_recover` renames it back (on load and on save), and a save
# removes the leftovers of an interrupted one (recognised by their names).
_REPLACED = "replaced.tmp"


def _leftovers(target):
    """(temporaries, replaced folders) beside `target` left by an interrupted save, newest first."""
    target = Path(target)
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.[0-9a-f]{{8}}\.(replaced\.)?tmp$")
    try:
        found = [p for p in target.parent.iterdir() if pattern.match(p.name)]
    except OSError:
        return [], []
    found.sort(key=lambda p: p.lstat().st_mtime_ns, reverse=True)
    return ([p for p in found if not p.name.endswith(_REPLACED)], [p for p in found if p.name.endswith(_REPLACED)])


def _recover(target, *, clean):
    """Undo a replacement interrupted between its two renames (`target` missing, the old SAE in a
    .replaced.tmp sibling): rename the old SAE back. clean=True also removes the other leftovers."""
    target = Path(target)
    temporaries, replaced = _leftovers(target)
    if replaced and not os.path.lexists(target):
        try:
            os.rename(replaced[0], target)
        except OSError as e:
            raise storage_error(e, target, f"restore the SAE folder from {replaced[0].name} to") from e
        replaced = replaced[1:]
    if clean:
        for p in temporaries + replaced:
            _remove(p)


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _save_folder(obj, folder, write, overwrite, what):
    """Write SAE `obj` into `folder` with write(obj, new_folder), as one unit; returns the folder.
    Files in the folder that are no SAE format's (notes, say) are kept: hard-linked (else copied)
    into the new folder before it is swapped in. A symbolic link to a folder stays a link: the
    folder it points to is the one replaced."""
    given = folder = Path(folder)
    if folder.is_symlink() and folder.is_dir():
        folder = folder.resolve()
    _recover(folder, clean=True)
    state = check_output_dir(folder, "SAE", is_own=is_sae_folder, flag="output folder")
    if state == "own" and not overwrite:
        raise OutputExistsError(f"{folder}: folder exists and is not empty (an SAE folder); "
                                f"pass --overwrite to replace {what}")
    make_dir(folder.parent)
    tmp = temp_name(folder)
    try:
        tmp.mkdir()
        write(obj, tmp)
        if state == "own":
            _carry_other_files(folder, tmp)
        if state == "new":
            os.rename(tmp, folder)
        else:
            old = folder.with_name(f"{tmp.name[:-len('tmp')]}{_REPLACED}")
            os.rename(folder, old)
            try:
                os.rename(tmp, folder)
            except BaseException:
                os.rename(old, folder)  # put the old SAE back
                raise
            _remove(old)
    except OSError as e:
        if isinstance(e, MinisaeError):
            raise
        raise storage_error(e, folder) from e
    finally:
        _remove(tmp)
    return given


def _carry_other_files(folder, new):
    """Hard-link (or copy) into `new` what `folder` holds besides SAE files and temporaries."""
    for p in sorted(folder.iterdir()):
        if _is_sae_file(folder, p.name) or is_temp_name(p.name):
            continue
        if os.path.lexists(new / p.name):
            raise OutputExistsError(f"{folder}: its {p.name} is not minisae's and the new SAE files need that "
                                    "name; choose another output folder")
        if p.is_dir() and not p.is_symlink():
            shutil.copytree(p, new / p.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(p, new / p.name)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)
