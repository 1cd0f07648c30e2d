"""Training checkpoints and the run folder's text files: save_checkpoint / load_checkpoint (one
safetensors file holding everything the next step reads, written atomically), the check that a
resumed run's config matches its checkpoint's, and metrics.jsonl appends and truncation on resume.
minisae.training.train uses them and re-exports every name here.
"""

import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import numpy

from minisae.errors import FileFormatError, storage_error
from minisae.io.files import make_dir, parse_json, temp_name, write_atomic
from minisae.io.safetensors_io import SafetensorsError, SafetensorsFile, save_file
from minisae.training.config import param_names
from minisae.xp import asarray, to_numpy

CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "minisae-checkpoint-1"
SHARDED_DIR, SHARDED_MANIFEST = "checkpoint", "checkpoint.json"  # the parallel trainer's (minisae.dist.parallel)


class CheckpointError(FileFormatError):
    """A checkpoint is missing, unreadable, truncated or does not fit the config."""


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

