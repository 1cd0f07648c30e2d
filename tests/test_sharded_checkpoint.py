"""Every file a run reads is bounded and typed (docs/pipeline.md, docs/scale.md):

- a FIFO where a file is expected (a checkpoint shard, an SAE's cfg.json, a manifest) is refused
  before it is opened, as one line, never a hang;
- the sharded checkpoint's manifest is read with the JSON limits of every other minisae JSON
  (size, depth), each field's type checked (one line naming it), every entry checked against the
  shard file it names (lo, hi, step, dtype, shape; no `..` or absolute paths, no shard listed
  twice, no float16 shard), and non-finite parameters are named as a corrupt checkpoint;
- the messages of finding 9 in the trainer: a negative or string Adam step, a zero scale, a bf16
  cache manifest whose dtype is a list, an empty cache.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from minisae.cli.commands import main
from minisae.training.checkpoint import CHECKPOINT_DIR, MANIFEST_NAME, load_sharded, read_manifest, reshard
from minisae.errors import FileFormatError
from minisae.io.safetensors_io import SafetensorsFile, save_file
from minisae.training.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--arch", "topk", "--k", "4", "--d-in", "16", "--n-features", "32", "--true-l0", "3", "--max-freq", "0.2",
       "--d-sae", "32", "--steps", "6", "--batch-size", "64", "--warmup-steps", "2", "--lr", "3e-3",
       "--eval-tokens", "0", "--checkpoint-every", "3", "--no-progress"]
NAMES = ["W_enc", "b_enc", "W_dec", "b_dec"]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """A finished parallel-trainer run (one process) and a copy of its checkpoint in 2 shards."""
    base = tmp_path_factory.mktemp("sharded")
    assert main(["train", "--out", str(base / "one"), "--accumulate", "2"] + RUN) == 0
    reshard(base / "one", base / "two", 2)
    return base


def copy_run(sharded_run, tmp_path):
    import shutil

    return Path(shutil.copytree(sharded_run / "two", tmp_path / "run"))


def manifest(run):
    return json.loads((run / CHECKPOINT_DIR / MANIFEST_NAME).read_text())


def write_manifest(run, man):
    (run / CHECKPOINT_DIR / MANIFEST_NAME).write_text(json.dumps(man))


def refused(run, *needles):
    """load_sharded refuses the checkpoint with one CheckpointError line holding every needle."""
    with pytest.raises(FileFormatError) as e:
        load_sharded(run / CHECKPOINT_DIR, 0, 32, numpy, names=NAMES)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg
    return msg


def test_a_good_two_shard_checkpoint_loads(sharded_run):
    man, st = load_sharded(sharded_run / "two" / CHECKPOINT_DIR, 0, 32, numpy, names=NAMES)
    _, one = load_sharded(sharded_run / "one" / CHECKPOINT_DIR, 0, 32, numpy, names=NAMES)
    for k in NAMES:
        assert numpy.array_equal(st["params"][k], one["params"][k])


@pytest.mark.parametrize("field,value,needle", [
    ("step", "3", "step must be a non-negative integer"),
    ("adam_step", -1, "adam_step must be a non-negative integer"),
    ("scale", 0.0, "scale must be a positive finite number"),
    ("d_sae", [32], "d_sae must be"),
    ("shards", {"a": 1}, "shards must be"),
    ("config", "x", "config must be"),
])
def test_manifest_fields_of_the_wrong_type_are_one_line_naming_the_field(sharded_run, tmp_path, field, value, needle):
    run = copy_run(sharded_run, tmp_path)
    man = manifest(run)
    man[field] = value
    write_manifest(run, man)
    refused(run, needle, MANIFEST_NAME)


def test_a_manifest_past_the_json_size_limit_is_refused_before_it_is_read(sharded_run, tmp_path):
    run = copy_run(sharded_run, tmp_path)
    with open(run / CHECKPOINT_DIR / MANIFEST_NAME, "r+b") as fh:
        fh.truncate(70 * 2**20)  # sparse: 70 MB on paper, nothing on disk
    refused(run, "byte limit")


def test_a_manifest_nested_too_deeply_is_one_line(sharded_run, tmp_path):
    run = copy_run(sharded_run, tmp_path)
    (run / CHECKPOINT_DIR / MANIFEST_NAME).write_text("[" * 5000 + "]" * 5000)
    refused(run, "nested too deeply")


@pytest.mark.parametrize("edit,needle", [
    (lambda sh: sh[1].update(file="../../" + sh[1]["file"]), "inside the checkpoint folder"),
    (lambda sh: sh[1].update(file="/etc/passwd"), "inside the checkpoint folder"),
    (lambda sh: sh.__setitem__(1, dict(sh[0])), "listed twice"),
    (lambda sh: sh[1].update(file=sh[0]["file"]), "listed twice"),
    (lambda sh: sh[1].update(lo=8), "tile"),
    (lambda sh: sh.pop(), "the shards cover latents [0, 16)"),
    (lambda sh: sh[0].update(lo="0"), "integer lo, hi"),
])
def test_manifest_entries_are_checked(sharded_run, tmp_path, edit, needle):
    run = copy_run(sharded_run, tmp_path)
    man = manifest(run)
    edit(man["shards"])
    write_manifest(run, man)
    refused(run, needle)


def _rewrite_shard(path, change):
    with SafetensorsFile(path) as f:
        tensors = {k: numpy.array(f.get(k)) for k in f.keys()}
        meta = dict(f.metadata)
    change(tensors, meta)
    os.unlink(path)
    save_file(tensors, path, metadata=meta)


@pytest.mark.parametrize("change,needle", [
    (lambda t, m: t.update({k: v.astype(numpy.float16) for k, v in t.items() if v.dtype == numpy.float32}),
     "expected F32"),
    (lambda t, m: t.update({k: v[..., :8] if k.endswith("W_enc") else v for k, v in t.items()}), "W_enc"),
    (lambda t, m: m.update(minisae=json.dumps({**json.loads(m["minisae"]), "lo": 0, "hi": 16})), "the shard says lo"),
    (lambda t, m: m.update(minisae=json.dumps({**json.loads(m["minisae"]), "step": 3})), "the shard says step"),
    (lambda t, m: t["params.W_dec"].__setitem__((0, 0), numpy.nan), "params.W_dec holds NaN or inf"),
])
def test_each_shard_is_checked_against_its_manifest_entry(sharded_run, tmp_path, change, needle):
    run = copy_run(sharded_run, tmp_path)
    _rewrite_shard(run / CHECKPOINT_DIR / manifest(run)["shards"][1]["file"], change)
    refused(run, needle)


def _unblock_later(fifo, seconds=5.0):
    """Should the code under test open the FIFO after all, open its other end after `seconds` (and
    close it), so that the test fails instead of hanging."""
    import threading

    def poke():
        fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # O_RDWR on a FIFO never blocks (Linux)
        os.close(fd)

    t = threading.Timer(seconds, poke)
    t.daemon = True
    t.start()
    return t


def test_a_fifo_as_a_shard_is_refused_not_waited_on(sharded_run, tmp_path):
    run = copy_run(sharded_run, tmp_path)
    shard = run / CHECKPOINT_DIR / manifest(run)["shards"][1]["file"]
    shard.unlink()
    os.mkfifo(shard)
    timer = _unblock_later(shard)
    refused(run, "a FIFO, not a regular file")
    timer.cancel()


def _cli(args, timeout=120):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    try:
        return subprocess.run([sys.executable, "-m", "minisae.cli"] + args, env=env, capture_output=True,
                              text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"minisae {' '.join(args)}: still running after {timeout} s (blocked on a FIFO?)")


def test_a_fifo_as_an_sae_cfg_json_is_one_line_exit_2(sharded_run, tmp_path):
    import shutil

    sae = Path(shutil.copytree(sharded_run / "one" / "sae", tmp_path / "sae"))
    (sae / "cfg.json").unlink()
    os.mkfifo(sae / "cfg.json")
    for args in (["eval", "--sae", str(sae), "--synthetic"], ["convert", str(sae), str(tmp_path / "out")]):
        p = _cli(args)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "FIFO" in p.stderr, p.stderr


def test_a_fifo_as_sae_weights_is_one_line_exit_2(sharded_run, tmp_path):
    import shutil

    sae = Path(shutil.copytree(sharded_run / "one" / "sae", tmp_path / "sae"))
    weights = next(sae.glob("*.safetensors"))
    weights.unlink()
    os.mkfifo(weights)
    p = _cli(["eval", "--sae", str(sae), "--synthetic"])
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "FIFO" in p.stderr, p.stderr


def test_a_bad_sharded_checkpoint_is_one_line_exit_2_on_resume(sharded_run, tmp_path):
    run = tmp_path / "run"
    import shutil

    shutil.copytree(sharded_run / "one", run)
    man = manifest(run)
    man["adam_step"] = -3  # was "math domain error"
    write_manifest(run, man)
    p = _cli(["train", "--out", str(run), "--accumulate", "2", "--resume"] + RUN)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "adam_step" in p.stderr, p.stderr


def test_reshard_refuses_a_bad_manifest_by_name(sharded_run, tmp_path):
    run = copy_run(sharded_run, tmp_path)
    man = manifest(run)
    man["shards"][0]["file"] = "../x"
    write_manifest(run, man)
    with pytest.raises(CheckpointError, match="inside the checkpoint folder"):
        reshard(run, tmp_path / "copy", 1)
    assert read_manifest(sharded_run / "two" / CHECKPOINT_DIR)["d_sae"] == 32


def _cache(folder, dtype, shards):
    folder.mkdir()
    man = {"format": "minisae-activations-1", "site": "blocks.0.hook_resid_post", "d_in": 4, "dtype": dtype,
           "count": 0, "shards": shards, "layer": 0, "model": "m"}
    (folder / "manifest.json").write_text(json.dumps(man))
    return folder


def test_cache_manifest_whose_dtype_is_a_list_is_one_line(tmp_path):
    from minisae.data.activations import FORMAT, ActivationsError
    from minisae.data.stream import ShardStream

    folder = _cache(tmp_path / "c", ["bfloat16"], [])
    man = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**man, "format": FORMAT}))
    with pytest.raises(ActivationsError, match="expected dtype float32 or bfloat16"):
        ShardStream(folder)


def test_an_empty_cache_says_it_holds_no_shards(tmp_path):
    from minisae.data.activations import FORMAT, ActivationsError
    from minisae.data.stream import ShardStream

    folder = _cache(tmp_path / "c", "float32", [])
    man = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**man, "format": FORMAT}))
    with pytest.raises(ActivationsError, match="holds no shards"):
        ShardStream(folder)
