"""Fuzzing every file format minisae reads: valid files are mutated (bytes flipped, cut, inserted or
repeated; JSON values replaced by hostile ones — wrong types, "false" strings, huge numbers, deep
nesting — or deleted; safetensors headers edited as JSON), then loaded and used. Each run must end in
a correct load or a minisae.MinisaeError, never another exception, within a set time and memory.

    python -m pytest tests/test_fuzz.py                             # CI: few examples, derandomised
    HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_fuzz.py # locally: many more

Adding a format (Gemma Scope 2 was added this way) is one entry in FORMATS: how to write a valid
one into a folder, which of its files to mutate (as bytes or as JSON), and how to load and use it.
"""

import copy
import dataclasses
import json
import math
import shutil
import struct
import time
import tracemalloc
from pathlib import Path
from typing import Callable

import numpy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_saefile import D, M, make_sae

from minisae import MinisaeError
from minisae.data.activations import ActivationStore
from minisae.io.safetensors_io import SafetensorsFile, save_file
from minisae.io.saefile import SAE
from minisae.models import load_model

TINY_MODEL = Path(__file__).parent / "data" / "gemma2" / "tiny_f32"
SECONDS, MIB = 10.0, 256  # the budget of one load: time, and tracemalloc peak

# ---- mutations --------------------------------------------------------------------------------

HOSTILE = [None, True, False, "false", "true", 0, -1, 1, 2, 2**31, 2**63, 10**30, 20_000_000, 0.5, -1e308,
           1e308, math.nan, math.inf, "", "x", "A" * 4096, [], {}, [1, 2], {"a": 1}, [[[[[[[[]]]]]]]],
           "../../etc/passwd", "/dev/zero", "jumprelu", "topk", "F32", "I64", [2**40, 2**40], [0, 2**62]]

byte_ops = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "repeat", "zero"]),
                              st.floats(0, 1, exclude_max=True), st.integers(0, 255), st.integers(1, 64)),
                    min_size=1, max_size=4)
json_ops = st.lists(st.tuples(st.sampled_from(["replace", "delete", "wrap", "stringify", "nest"]),
                              st.integers(0, 2**16), st.sampled_from(HOSTILE)), min_size=1, max_size=3)


def mutate_bytes(data, ops):
    data = bytearray(data)
    for op, where, value, n in ops:
        # half the positions fall in the first 256 bytes, where the headers are
        pos = int(where * len(data)) if where >= 0.5 or len(data) < 512 else int(where * 512)
        pos = min(pos, max(0, len(data) - 1))
        if op == "flip" and data:
            data[pos] ^= value or 1
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = bytes([value]) * n
        elif op == "repeat":
            data[pos:pos] = data[pos:pos + n]
        elif op == "zero":
            data[pos:pos + n] = bytes(len(data[pos:pos + n]))
    return bytes(data)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:8]):
            yield from _paths(v, prefix + (i,))


def mutate_json(obj, ops):
    """Apply JSON mutations to a copy of obj; the path of each is picked among all its value paths."""
    obj = json.loads(json.dumps(obj))
    for op, which, value in ops:
        paths = [p for p in _paths(obj) if p]
        value = copy.deepcopy(value)  # never the shared HOSTILE object itself
        if not paths:
            return value
        path = paths[which % len(paths)]
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        key, old = path[-1], parent[path[-1]]
        if op == "delete":
            del parent[key]
        elif op == "replace":
            parent[key] = value
        elif op == "wrap":
            parent[key] = [old]
        elif op == "stringify":
            parent[key] = json.dumps(old).lower()
        elif op == "nest":  # 2000 levels, spliced in as text by dumps (deeper than Python's recursion limit)
            parent[key] = DEEP if isinstance(value, list) else {"v": old}
    return obj


DEEP = "__deeply_nested__"


def dumps(obj):
    return json.dumps(obj).replace(json.dumps(DEEP), "[" * 2000 + "1" + "]" * 2000)


def mutate_safetensors_header(data, ops):
    """Edit a safetensors file's JSON header (dtypes, shapes, offsets, metadata) and re-prefix it."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    text = dumps(mutate_json(header, ops)).encode()
    return struct.pack("<Q", len(text)) + text + data[8 + n:]


# ---- formats ------------------------------------------------------------------------------------

@dataclasses.dataclass
class Format:
    name: str
    make: Callable      # make(folder) -> the path to load (a file or folder inside `folder`)
    targets: dict       # file name inside the made path's folder -> "bytes" | "json" | "safetensors"
    load: Callable      # load(path): read and use it; returns a summary of what it read
    expected: object    # the summary `load` returns for the unmutated file


def _sae_use(sae):
    x = numpy.random.default_rng(0).standard_normal((4, sae.d_in)).astype(numpy.float32)
    out = sae(x)
    assert out.shape == (4, sae.d_out)
    return sae.architecture, sae.d_in, sae.d_sae


def _make_safetensors(folder):
    p = folder / "t.safetensors"
    save_file({"a": numpy.arange(12, dtype=numpy.float32).reshape(3, 4), "b": numpy.ones(5, numpy.float64),
               "c": numpy.zeros((2, 0), numpy.int64)}, p, metadata={"k": "v"})
    return p


def _load_safetensors(path):
    with SafetensorsFile(path) as f:
        return {name: tuple(f.get(name).shape) for name in f.keys()}


def _make_saelens(arch):
    def make(folder):
        make_sae(arch, k=5).save(folder / "sae") if arch == "topk" else make_sae(arch).save(folder / "sae")
        return folder / "sae"
    return make


def _make_npz(folder):
    return make_sae("jumprelu").save_gemma_scope(folder / "params.npz")


def _make_gs2(folder):
    return make_sae("jumprelu").save_gemma_scope_2(folder / "gs2")


def _load_sae(path):
    return _sae_use(SAE.load(path))


def _make_model(folder):
    shutil.copytree(TINY_MODEL, folder / "model")
    return folder / "model"


def _load_model(path):
    return type(load_model(path)).__name__


def _make_cache(folder):
    rng = numpy.random.default_rng(0)
    cache = folder / "cache"
    cache.mkdir()
    shards = []
    for i, n in enumerate((40, 24)):
        numpy.save(cache / f"shard_{i:05d}.npy", rng.standard_normal((n, 6)).astype(numpy.float32))
        shards.append({"file": f"shard_{i:05d}.npy", "count": n})
    man = {"format": "minisae-activations-1", "model": "m", "site": "blocks.0.hook_resid_post", "layer": 0,
           "kind": "hook_resid_post", "d_in": 6, "dtype": "float32", "seq_len": 16, "text_files": ["t.txt"],
           "text_field": "text", "max_tokens": None, "count": 64, "sequences_done": 8, "complete": True,
           "shards": shards}
    (cache / "manifest.json").write_text(json.dumps(man))
    return cache


def _load_cache(path):
    store = ActivationStore(path, holdout_tokens=4)
    assert store.batch(3, 16).shape == (16, store.d_in)
    return store.sample(8).shape


_CKPT = {}


def _train_cfg():
    from minisae.training.train import TrainConfig

    return TrainConfig("topk", d_sae=16, k=3, steps=4, batch_size=32, warmup_steps=1, eval_tokens=0,
                       checkpoint_every=2, log_every=2)


def _make_checkpoint(folder):
    from minisae.data.synthetic import SyntheticActivations, SyntheticConfig
    from minisae.training.train import train

    if "bytes" not in _CKPT:
        run = folder / "run0"
        train(_train_cfg(), SyntheticActivations(SyntheticConfig(d_in=8, n_features=16, target_l0=2.0, max_freq=0.5)), run,
              progress=False)
        _CKPT["bytes"] = (run / "checkpoint.safetensors").read_bytes()
    (folder / "run").mkdir()
    path = folder / "run" / "checkpoint.safetensors"
    path.write_bytes(_CKPT["bytes"])
    return path


def _load_checkpoint(path):
    from minisae.training.train import load_checkpoint

    return load_checkpoint(path, _train_cfg().resolved(8), numpy)["step"]


def _make_tokenizer(folder):
    from test_activations import make_tokenizer

    make_tokenizer(folder)
    return folder / "tokenizer.json"


def _load_tokenizer(path):
    from minisae.models import load_tokenizer

    tok = load_tokenizer(path)
    return tok.decode(tok.encode("the cat sat on a mat ."))


ST_SHAPES = {"a": (3, 4), "b": (5,), "c": (2, 0)}
FORMATS = [
    Format("safetensors", _make_safetensors, {"t.safetensors": "bytes"}, _load_safetensors, ST_SHAPES),
    Format("safetensors-header", _make_safetensors, {"t.safetensors": "safetensors"}, _load_safetensors, ST_SHAPES),
    Format("saelens-jumprelu", _make_saelens("jumprelu"),
           {"cfg.json": "json", "sae_weights.safetensors": "safetensors"}, _load_sae, ("jumprelu", D, M)),
    Format("saelens-topk", _make_saelens("topk"), {"cfg.json": "json", "sae_weights.safetensors": "bytes"}, _load_sae,
           ("topk", D, M)),
    Format("saelens-gated", _make_saelens("gated"), {"cfg.json": "json"}, _load_sae, ("gated", D, M)),
    Format("gemma-scope-npz", _make_npz, {"params.npz": "bytes"}, _load_sae, ("jumprelu", D, M)),
    Format("gemma-scope-2", _make_gs2, {"config.json": "json", "params.safetensors": "safetensors"}, _load_sae,
           ("jumprelu", D, M)),
    Format("model-config", _make_model, {"config.json": "json"}, _load_model, "Gemma2Model"),
    Format("model-weights", _make_model, {"model.safetensors": "safetensors"}, _load_model, "Gemma2Model"),
    Format("cache-manifest", _make_cache, {"manifest.json": "json", "shard_00001.npy": "bytes"}, _load_cache, (8, 6)),
    Format("checkpoint", _make_checkpoint, {"checkpoint.safetensors": "bytes"}, _load_checkpoint, 4),
    Format("checkpoint-header", _make_checkpoint, {"checkpoint.safetensors": "safetensors"}, _load_checkpoint, 4),
    Format("tokenizer", _make_tokenizer, {"tokenizer.json": "json"}, _load_tokenizer,
           "<bos> the cat sat on a mat ."),
]


def _target_file(made, name):
    return made / name if made.is_dir() else made.parent / name


def _apply(path, how, bops, jops):
    data = path.read_bytes()
    if how == "bytes":
        path.write_bytes(mutate_bytes(data, bops))
    elif how == "json":
        path.write_text(dumps(mutate_json(json.loads(data), jops)))
    else:
        path.write_bytes(mutate_safetensors_header(data, jops))


def _bounded_load(fmt, made):
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        fmt.load(made)
    except MinisaeError:
        pass  # the other outcome allowed; anything else fails the test with its traceback
    finally:
        seconds, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert seconds < SECONDS, f"{fmt.name}: {seconds:.1f} s"
    assert peak < MIB * 2**20, f"{fmt.name}: {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("fmt", FORMATS, ids=[f.name for f in FORMATS])
def test_valid_files_load(fmt, tmp_path):
    """The unmutated file of each format loads and is usable (so a mutation is what fails)."""
    assert fmt.load(fmt.make(tmp_path)) == fmt.expected


@pytest.mark.parametrize("fmt", FORMATS, ids=[f.name for f in FORMATS])
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(target=st.integers(0, 7), bops=byte_ops, jops=json_ops)
def test_mutated_files_fail_cleanly(fmt, tmp_path_factory, target, bops, jops):
    folder = tmp_path_factory.mktemp(fmt.name)
    made = fmt.make(folder)
    name, how = list(fmt.targets.items())[target % len(fmt.targets)]
    _apply(_target_file(made, name), how, bops, jops)
    _bounded_load(fmt, made)
