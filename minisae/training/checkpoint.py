"""Training checkpoints and the run folder's text files.

The checkpoint every run writes is sharded (`save_sharded` / `load_sharded`; one shard on one
process): out_dir/checkpoint/ holds step-NNNNNNNN/shard-SSSSS.safetensors (one per latent shard,
written by replica 0's ranks; replicas are bitwise identical) and checkpoint.json, written last,
atomically, naming the step folder; older step folders are removed after it. Loading reads any
latent range from the files that overlap it, so a run resumes on another S (`reshard` writes a
converted copy); every field and shard is checked before any collective (`read_manifest`,
`load_sharded`). The one-file checkpoint.safetensors of earlier versions (`load_checkpoint`) is read,
not written. Also here: the check that a resumed run's config matches its checkpoint's, and
metrics.jsonl appends and truncation on resume. minisae.training.train uses them.
"""

import dataclasses
import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy

from minisae.dist.sharded import latent_range
from minisae.errors import CheckpointError, FileFormatError, InputError, storage_error
from minisae.io.files import check_output_dir, check_regular_file, make_dir, parse_json, read_json, temp_name, write_atomic
from minisae.io.safetensors_io import SafetensorsError, SafetensorsFile, save_file
from minisae.training.config import param_names
from minisae.xp import asarray, to_numpy

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "minisae-checkpoint-1"
SHARDED_DIR, SHARDED_MANIFEST = "checkpoint", "checkpoint.json"  # the parallel trainer's (minisae.training.train)


# Config fields a resumed run may change without changing its result.
_RESUME_FREE = {"checkpoint_every", "log_every", "backend", "eval_tokens", "eval_batch_size",
                "prefetch"}


def save_checkpoint(path, state, cfg):
    """Write the whole training state to one safetensors file, atomically (temp, fsync, replace)."""
    path = Path(path)
    tensors = {"since_fired": to_numpy(state["since_fired"])}
    for k, v in state["params"].items():
        tensors[f"params.{k}"] = to_numpy(v)
        tensors[f"adam_m.{k}"] = to_numpy(state["adam"]["m"][k])
        tensors[f"adam_v.{k}"] = to_numpy(state["adam"]["v"][k])
    info = {
        "format": CHECKPOINT_FORMAT,
        "step": state["step"],
        "adam_step": int(state["adam"]["step"]),
        "scale": state["scale"],
        "batchtopk_threshold": float(state.get("batchtopk_threshold", 0.0)),
        "threshold_updates": int(state.get("threshold_updates", 0)),
        "controller": state.get("controller"),
        "config": dataclasses.asdict(cfg),
    }
    # save_file writes a temp file, fsyncs and renames it; on a failure (a full disk: StorageError)
    # the temp file is removed and the previous checkpoint is left as it was
    save_file(tensors, path, metadata={"minisae": json.dumps(info)})


def load_checkpoint(path, cfg, xp):
    """Read a checkpoint written by save_checkpoint; every name, shape and the config are checked."""
    path = Path(path)
    try:
        with SafetensorsFile(path) as f:
            info = parse_json((f.metadata or {}).get("minisae", "null") or "null", f"{path}: metadata",
                              error=CheckpointError)
            if not isinstance(info, dict) or info.get("format") != CHECKPOINT_FORMAT:
                raise CheckpointError(f"{path}: not a minisae training checkpoint (no {CHECKPOINT_FORMAT!r} metadata)")
            _check_checkpoint_info(path, info)
            arrays = {name: numpy.array(f.get(name)) for name in f.keys()}
    except (SafetensorsError, OSError) as e:
        raise CheckpointError(
            f"{path}: cannot read the checkpoint ({e}); it may be truncated or corrupt. It was left "
            "untouched: restore it, or move it away to start training over"
        ) from None
    _check_resume_config(path, info, cfg)
    params, m, v = {}, {}, {}
    for k in param_names(cfg):
        for store, prefix in ((params, "params"), (m, "adam_m"), (v, "adam_v")):
            name = f"{prefix}.{k}"
            if name not in arrays:
                raise CheckpointError(f"{path}: tensor {name!r} is missing")
            store[k] = asarray(arrays[name], xp)
    if "since_fired" not in arrays or arrays["since_fired"].shape != (cfg.d_sae,):
        raise CheckpointError(f"{path}: tensor 'since_fired' missing or not of shape ({cfg.d_sae},)")
    for k, a in params.items():
        if numpy.dtype(str(a.dtype)).kind != "f" or m[k].shape != a.shape or v[k].shape != a.shape:
            raise CheckpointError(f"{path}: params.{k} ({a.dtype} {tuple(a.shape)}) and its Adam moments "
                                  f"({tuple(m[k].shape)}, {tuple(v[k].shape)}) must be floating point of one shape")
    if tuple(params["W_enc"].shape)[1:] != (cfg.d_sae,):
        raise CheckpointError(f"{path}: params.W_enc has shape {tuple(params['W_enc'].shape)}, expected (d_in, {cfg.d_sae})")
    for k, a in params.items():
        if not bool(xp.isfinite(a).all()):
            raise CheckpointError(f"{path}: params.{k} holds non-finite values")
    return {
        "step": int(info["step"]),
        "scale": float(info["scale"]),
        "params": params,
        "adam": {"step": int(info["adam_step"]), "m": m, "v": v},
        "since_fired": asarray(arrays["since_fired"], xp),
        "batchtopk_threshold": float(info.get("batchtopk_threshold", 0.0)),
        "threshold_updates": int(info.get("threshold_updates", 0)),
        "controller": info.get("controller"),
    }


def _check_checkpoint_info(path, info):
    """The checkpoint metadata's fields have the types save_checkpoint writes."""
    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    ok = (isinstance(info.get("config"), dict) and count(info.get("step")) and count(info.get("adam_step"))
          and isinstance(info.get("scale"), (int, float)) and not isinstance(info.get("scale"), bool)
          and math.isfinite(info["scale"]) and info["scale"] > 0)
    if not ok:
        raise CheckpointError(f"{path}: corrupt checkpoint metadata (expected config, step, adam_step and a "
                              "positive scale); it was left untouched: restore it, or move it away to start over")


def _check_resume_config(path, info, cfg):
    saved, now = info["config"], dataclasses.asdict(cfg)
    free = set(_RESUME_FREE)
    if cfg.decay_frac == 0 and saved.get("decay_frac", 0) == 0:
        free |= {"steps", "tokens"}  # without decay the schedule does not depend on the length
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in now if k not in free and saved.get(k) != now[k]]
    if diff:
        raise CheckpointError(f"{path}: cannot resume, the config differs from the checkpoint's: " + "; ".join(diff))
    if int(info["step"]) > cfg.steps:
        raise CheckpointError(f"{path}: the checkpoint is at step {info['step']}, past steps={cfg.steps}")


def _append_jsonl(path, rows, *, durable=False):
    """Append rows to metrics.jsonl; durable=True: on the disk (fsync) before returning, as it must
    be before the checkpoint of their step is written (a kill between leaves the lines ahead of the
    checkpoint, which resume cuts, never behind it)."""
    if not rows:
        return
    try:
        with open(path, "a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
    except OSError as e:
        raise storage_error(e, path) from e


def _truncate_metrics(path, step):
    """On resume, drop metric lines logged after the checkpoint (they will be logged again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the interruption
    write_atomic(path, "".join(s + "\n" for s in keep), durable=True)


def _remove_now(path):
    """Remove a file or folder so that it is gone at once: a folder is renamed to a hidden temp
    name first (one atomic step; a kill during the removal leaves only that temp name)."""
    path = Path(path)
    try:
        if path.is_dir() and not path.is_symlink():
            import shutil

            tmp = temp_name(path)
            os.replace(path, tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
    except OSError as e:
        raise storage_error(e, path, "remove") from e


def clear_results(out_dir):
    """Remove a run's results (sae/, eval.json) before its training goes on or starts over: until
    the run writes them again its folder is plainly unfinished (evaluating sae/ finds none)."""
    for name in ("sae", "eval.json"):
        _remove_now(Path(out_dir) / name)


def clear_run(out_dir):
    """Remove a run's record so that a new run can start in its folder: results first, then both
    checkpoint formats and metrics.jsonl; config.json goes last (the new run replaces it). A kill at
    any point leaves the old run without its results (resumable from its checkpoint while that is
    there), never the old run's files beside the new run's config."""
    make_dir(out_dir)
    clear_results(out_dir)
    for name in (CHECKPOINT_NAME, SHARDED_DIR, "metrics.jsonl"):
        _remove_now(Path(out_dir) / name)


def kill_point(point, step):
    """The kill -9 tests' hook (tests/test_run_folder.py): MINISAE_TEST_KILL="<point>:<step>" ends this
    process with SIGKILL at that point of that step ("metrics": its lines are on disk, its checkpoint
    not yet; "checkpoint": the checkpoint is written). Unset, it does nothing."""
    if os.environ.get("MINISAE_TEST_KILL") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------
# sharded checkpoints (the format every run writes; S = 1 is one shard)

CHECKPOINT_DIR = "checkpoint"
MANIFEST_NAME = "checkpoint.json"
MANIFEST_FORMAT = "minisae-sharded-checkpoint-1"


def _latent_axis(name):
    """The axis of a parameter that runs over latents (None for b_dec, which every shard holds)."""
    return {"W_enc": 1, "b_dec": None}.get(name, 0)


def save_sharded(ckdir, grid, state, cfg):
    """Write this shard's state (replica 0's ranks), then rank 0 writes checkpoint.json naming it.

    Collective: every rank of the grid calls it. Files: ckdir/step-NNNNNNNN/shard-SSSSS.safetensors;
    the manifest is replaced atomically after every shard file is complete, then the step folders
    it no longer names are removed."""
    ckdir = Path(ckdir)
    step_dir = f"step-{state['step']:08d}"
    grid.world.together(lambda: _write_shard(ckdir, step_dir, grid, state) if grid.r == 0 else None)
    grid.world.on_root(lambda: _write_manifest(ckdir, step_dir, grid, state, cfg))


def _write_shard(ckdir, step_dir, grid, state):
    make_dir(ckdir / step_dir)
    tensors = {"since_fired": to_numpy(state["since_fired"])}
    for k, v in state["params"].items():
        tensors[f"params.{k}"] = to_numpy(v)
        tensors[f"adam_m.{k}"] = to_numpy(state["adam"]["m"][k])
        tensors[f"adam_v.{k}"] = to_numpy(state["adam"]["v"][k])
    info = {"format": MANIFEST_FORMAT, "lo": grid.lo, "hi": grid.hi, "step": state["step"]}
    save_file(tensors, ckdir / step_dir / f"shard-{grid.s:05d}.safetensors",
              metadata={"minisae": json.dumps(info)})


def _write_manifest(ckdir, step_dir, grid, state, cfg):
    shards = [{"file": f"{step_dir}/shard-{s:05d}.safetensors", "lo": lo, "hi": hi}
              for s, (lo, hi) in enumerate(latent_range(cfg.d_sae, grid.S, s) for s in range(grid.S))]
    manifest = {"format": MANIFEST_FORMAT, "step": state["step"], "adam_step": int(state["adam"]["step"]),
                "batchtopk_threshold": float(state.get("batchtopk_threshold", 0.0)),
                "threshold_updates": int(state.get("threshold_updates", 0)),
                "scale": state["scale"], "d_sae": cfg.d_sae, "d_in": int(state["params"]["b_dec"].shape[0]),
                "replicas": grid.R, "shards": shards, "config": dataclasses.asdict(cfg),
                "controller": state.get("controller")}
    write_atomic(ckdir / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    for old in ckdir.glob("step-*"):
        if old.name != step_dir:
            shutil.rmtree(old, ignore_errors=True)


def _count(v, least=0):
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _corrupt(path, what):

    return CheckpointError(f"{path}: {what}; the checkpoint was left untouched: restore it, or move it away "
                           "to start over")


def read_manifest(ckdir):
    """The sharded checkpoint's manifest, read with the JSON limits of every minisae JSON file
    (minisae.io.files.read_json: size, depth, a regular file) and checked field by field: counts
    are non-negative integers, C a positive finite number, the shard list tiles [0, d_sae) with
    one entry per latent range, each file a relative path inside the checkpoint folder. A wrong
    manifest is one CheckpointError line naming the field."""

    path = Path(ckdir) / MANIFEST_NAME
    man = read_json(path, error=CheckpointError)
    if man.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{path}: not a {MANIFEST_FORMAT} manifest (format {man.get('format')!r:.60})")
    checks = (("step", _count(man.get("step"))), ("adam_step", _count(man.get("adam_step"))),
              ("d_sae", _count(man.get("d_sae"), 1)), ("d_in", _count(man.get("d_in"), 1)),
              ("scale", _number(man.get("scale")) and math.isfinite(man["scale"]) and man["scale"] > 0),
              ("replicas", _count(man.get("replicas", 1), 1)),
              ("threshold_updates", _count(man.get("threshold_updates", 0))),
              ("batchtopk_threshold", _number(man.get("batchtopk_threshold", 0.0))),
              ("controller", man.get("controller") is None or isinstance(man["controller"], dict)),
              ("config", isinstance(man.get("config"), dict)
               and man["config"].get("d_sae") == man.get("d_sae")
               and man["config"].get("dtype") in ("float32", "float64")),
              ("shards", isinstance(man.get("shards"), list) and 0 < len(man["shards"]) <= max(1, man.get("d_sae", 1))
               if _count(man.get("d_sae"), 1) else False))
    for field, ok in checks:
        if not ok:
            want = {"scale": "a positive finite number", "config": "an object whose d_sae and dtype "
                    "(float32 or float64) match", "shards": "a non-empty list of at most d_sae entries",
                    "batchtopk_threshold": "a number", "controller": "null or an object"}.get(field, "a non-negative integer")
            raise _corrupt(path, f"{field} must be {want}, found {man.get(field)!r:.60}")
    expected, seen = 0, set()
    for i, sh in enumerate(man["shards"]):
        if not (isinstance(sh, dict) and isinstance(sh.get("file"), str) and _count(sh.get("lo"))
                and _count(sh.get("hi"))):
            raise _corrupt(path, f"shards[{i}] must be an object with a string file and integer lo, hi; found {sh!r:.80}")
        parts = Path(sh["file"]).parts
        if (not parts or Path(sh["file"]).is_absolute() or ".." in parts or "\\" in sh["file"]
                or len(parts) != 2 or not parts[0].startswith("step-")):
            raise _corrupt(path, f"shards[{i}].file {sh['file']!r:.80} is not step-NNNNNNNN/<shard file> inside the checkpoint folder")
        if sh["file"] in seen:
            raise _corrupt(path, f"shards[{i}].file {sh['file']!r:.80} is listed twice")
        seen.add(sh["file"])
        if sh["lo"] != expected or sh["hi"] <= sh["lo"]:
            raise _corrupt(path, f"shards[{i}] covers latents [{sh['lo']}, {sh['hi']}), expected to start at "
                                 f"{expected} and be non-empty (the shards must tile [0, d_sae) in order)")
        expected = sh["hi"]
    if expected != man["d_sae"]:
        raise _corrupt(path, f"the shards cover latents [0, {expected}), not [0, {man['d_sae']}) (d_sae)")
    return man


_SAFETENSORS_DTYPE = {"float32": "F32", "float64": "F64"}


def _check_shard(f, path, sh, man, names, prefixes):
    """One shard file against its manifest entry, from its header alone (nothing is read): its own
    record (format, lo, hi, step) equals the entry's, every tensor has the run's dtype and this
    shard's shape. Refuses before anything reaches a collective."""

    own = parse_json((f.metadata or {}).get("minisae", "null") or "null", f"{path}: metadata", error=CheckpointError)
    if not isinstance(own, dict) or own.get("format") != MANIFEST_FORMAT:
        raise _corrupt(path, f"not a shard of a {MANIFEST_FORMAT} checkpoint (no such metadata)")
    for key in ("lo", "hi", "step"):
        want = man["step"] if key == "step" else sh[key]
        if own.get(key) != want or not _count(own.get(key)):
            raise _corrupt(path, f"the shard says {key} = {own.get(key)!r:.40}, its manifest entry {want}")
    m, d_in, dtype = sh["hi"] - sh["lo"], man["d_in"], _SAFETENSORS_DTYPE[man["config"]["dtype"]]
    shapes = {"since_fired": ((m,), "I64")}
    for prefix in prefixes:
        for k in names:
            shape = {"W_enc": (d_in, m), "W_dec": (m, d_in), "b_dec": (d_in,)}.get(k, (m,))
            shapes[f"{prefix}.{k}"] = (shape, dtype)
    for name, (shape, dt) in shapes.items():
        t = f.tensors.get(name)
        if t is None:
            raise CheckpointError(f"{path}: tensor {name!r} is missing")
        if t.dtype != dt or tuple(t.shape) != shape:
            raise _corrupt(path, f"tensor {name!r} is {t.dtype} {list(t.shape)}, expected {dt} {list(shape)} "
                                 f"(latents [{sh['lo']}, {sh['hi']}) of a {man['config']['dtype']} run)")


def load_sharded(ckdir, lo, hi, xp, *, names, params_only=False):
    """(manifest, state) of latents [lo, hi) from a sharded checkpoint written with any S: each
    per-latent tensor is put together from the shard files that overlap [lo, hi). params_only:
    leave out Adam's moments (a third of the memory; for the release SAE).

    Every shard it reads is checked first (a regular file; its header's own lo, hi, step, every
    tensor's dtype and shape against the manifest), and the parameters must be finite: a bad shard
    is one CheckpointError, raised before the caller's next collective (callers run it inside
    comm.together, so every rank raises it)."""

    prefixes = ("params",) if params_only else ("params", "adam_m", "adam_v")
    ckdir = Path(ckdir)
    man = read_manifest(ckdir)
    pieces = {}  # tensor name -> list of slices
    for sh in man["shards"]:
        a, b = max(lo, sh["lo"]), min(hi, sh["hi"])
        if a >= b and not (sh is man["shards"][0]):
            continue
        path = ckdir / sh["file"]
        check_regular_file(path, error=CheckpointError)  # a FIFO would block the open
        try:
            with SafetensorsFile(path) as f:
                _check_shard(f, path, sh, man, names, prefixes)
                for prefix in prefixes:
                    for k in names:
                        name = f"{prefix}.{k}"
                        arr, axis = f.get(name), _latent_axis(k)
                        if axis is None:
                            pieces.setdefault(name, [numpy.array(arr)])
                        elif a < b:
                            sl = [slice(None)] * arr.ndim
                            sl[axis] = slice(a - sh["lo"], b - sh["lo"])
                            pieces.setdefault(name, []).append(numpy.array(arr[tuple(sl)]))
                if a < b:
                    pieces.setdefault("since_fired", []).append(numpy.array(f.get("since_fired")[a - sh["lo"]:b - sh["lo"]]))
        except (SafetensorsError, OSError) as e:
            if isinstance(e, CheckpointError):
                raise
            raise CheckpointError(f"{path}: cannot read the checkpoint shard ({e}); it may be truncated "
                                  "or corrupt") from None
    state = {"params": {}, "adam": {"step": int(man["adam_step"]), "m": {}, "v": {}}}
    for prefix, store in (("params", state["params"]), ("adam_m", state["adam"]["m"]), ("adam_v", state["adam"]["v"])):
        if prefix not in prefixes:
            continue
        for k in names:
            axis = _latent_axis(k)
            arr = pieces[f"{prefix}.{k}"][0] if axis is None else numpy.concatenate(pieces[f"{prefix}.{k}"], axis=axis)
            if axis is not None and arr.shape[axis] != hi - lo:
                raise CheckpointError(f"{ckdir}: the shards cover {arr.shape[axis]} of latents [{lo}, {hi})")
            if prefix == "params" and not numpy.isfinite(arr).all():
                raise _corrupt(ckdir / MANIFEST_NAME, f"params.{k} holds NaN or inf values (a corrupt checkpoint, "
                                                      "not a divergence: training never writes them)")
            store[k] = asarray(arr, xp)
    state["since_fired"] = asarray(numpy.concatenate(pieces["since_fired"]), xp)
    state["step"], state["scale"] = int(man["step"]), float(man["scale"])
    state["batchtopk_threshold"] = float(man.get("batchtopk_threshold", 0.0))
    state["threshold_updates"] = int(man.get("threshold_updates", 0))
    state["controller"] = man.get("controller")
    return man, state


def reshard(src_run, dst_run, shards):
    """Copy a run folder's sharded checkpoint to dst_run/checkpoint with `shards` shards (single
    process; memory holds one output shard at a time). Training resumes on any S without it: this
    is for moving a checkpoint to a grid whose ranks should each read one file."""
    src, dst = Path(src_run) / CHECKPOINT_DIR, Path(dst_run) / CHECKPOINT_DIR
    man = read_manifest(src)
    if int(shards) < 1 or int(shards) > int(man["d_sae"]):
        raise InputError(f"shards: expected 1 ... {man['d_sae']} (d_sae), found {shards}")
    check_output_dir(dst_run, "train run", is_own=lambda d: False)  # new or empty only
    check_regular_file(src / man["shards"][0]["file"], error=FileFormatError)
    with SafetensorsFile(src / man["shards"][0]["file"]) as f:
        names = [k[len("params."):] for k in f.keys() if k.startswith("params.")]
    step_dir = f"step-{man['step']:08d}"
    (dst / step_dir).mkdir(parents=True)
    out = []
    for s in range(int(shards)):
        lo, hi = latent_range(man["d_sae"], shards, s)
        _, st = load_sharded(src, lo, hi, numpy, names=names)
        tensors = {"since_fired": st["since_fired"]}
        for k in names:
            tensors[f"params.{k}"] = st["params"][k]
            tensors[f"adam_m.{k}"] = st["adam"]["m"][k]
            tensors[f"adam_v.{k}"] = st["adam"]["v"][k]
        info = {"format": MANIFEST_FORMAT, "lo": lo, "hi": hi, "step": man["step"]}
        save_file(tensors, dst / step_dir / f"shard-{s:05d}.safetensors", metadata={"minisae": json.dumps(info)})
        out.append({"file": f"{step_dir}/shard-{s:05d}.safetensors", "lo": lo, "hi": hi})
    write_atomic(dst / MANIFEST_NAME, json.dumps({**man, "shards": out}, indent=1) + "\n")
    for name in ("config.json", "metrics.jsonl"):  # the run's record, so the copy resumes as a run
        if (Path(src_run) / name).exists():
            write_atomic(Path(dst_run) / name, (Path(src_run) / name).read_bytes())
    return dst
