"""minisae.data.stream: every row exactly once per epoch, batches pure in (seed, step), a
replica's slice equal to the batch's rows, bounded windows, bfloat16 caches."""

import json

import numpy
import pytest

from minisae.data.activations import ActivationsError
from minisae.data.stream import ShardStream, convert_cache
from minisae.io.safetensors_io import bf16_bits_to_float32, float32_to_bf16_bits

D = 3


def make_cache(folder, counts):
    """A cache whose row i holds (i, -i, i / 7): every row names its global index."""
    folder.mkdir()
    shards, start = [], 0
    for j, c in enumerate(counts):
        ids = numpy.arange(start, start + c, dtype=numpy.float32)
        numpy.save(folder / f"shard_{j:05d}.npy", numpy.stack([ids, -ids, ids / 7], axis=1))
        shards.append({"file": f"shard_{j:05d}.npy", "count": c})
        start += c
    man = {"format": "minisae-activations-1", "site": "blocks.0.hook_resid_post", "d_in": D,
           "dtype": "float32", "count": start, "shards": shards}
    (folder / "manifest.json").write_text(json.dumps(man))
    return folder


@pytest.mark.parametrize("buffer_tokens", [1, 20, 1000])
def test_every_row_exactly_once_per_epoch(tmp_path, buffer_tokens):
    counts = [7, 13, 1, 9, 10]  # 40 rows; windows of different sizes
    src = ShardStream(make_cache(tmp_path / "c", counts), seed=3, buffer_tokens=buffer_tokens)
    B = 8
    for epoch in range(2):
        ids = numpy.concatenate([src.batch(step, B)[:, 0] for step in range(epoch * 5, epoch * 5 + 5)])
        assert sorted(ids.astype(int).tolist()) == list(range(40))
    windows, starts = src.plan(0)
    assert sorted(s for w in windows for s in w) == list(range(5))
    for w in windows:  # a window exceeds the buffer only when it is a single shard
        assert len(w) == 1 or sum(counts[s] for s in w) <= buffer_tokens


def test_batches_are_pure_and_slices_read_the_same_rows(tmp_path):
    folder = make_cache(tmp_path / "c", [6, 6, 6, 6, 6])
    a = ShardStream(folder, seed=1, buffer_tokens=12)
    b = ShardStream(folder, seed=1, buffer_tokens=12, prefetch=False)
    steps = [4, 0, 9, 3]  # out of order, across epochs (30 rows, batches of 7)
    for step in steps:
        full = a.batch(step, 7)
        assert numpy.array_equal(full, b.batch(step, 7))
        assert numpy.array_equal(b.batch_slice(step, 7, 2, 5), full[2:5])
    assert not numpy.array_equal(ShardStream(folder, seed=2, buffer_tokens=12).batch(0, 7), a.batch(0, 7))
    first = numpy.concatenate([a.batch(s, 6)[:, 0] for s in range(5)])
    assert not numpy.array_equal(first, numpy.arange(30))  # shuffled


def test_holdout_sample_and_errors(tmp_path):
    folder = make_cache(tmp_path / "c", [5, 5, 5, 5])
    src = ShardStream(folder, seed=0, buffer_tokens=10, holdout_shards=1)
    held = set(src.eval_sample(100)[:, 0].astype(int).tolist())
    seen = set(numpy.concatenate([src.batch(s, 5)[:, 0] for s in range(3)]).astype(int).tolist())
    assert len(held) == 5 and not held & seen and len(seen) == 15
    assert src.sample(4).shape == (4, D) and numpy.array_equal(src.sample(4), src.sample(4))
    with pytest.raises(ActivationsError, match="holdout_shards"):
        ShardStream(folder, holdout_shards=4)
    (folder / "shard_00002.npy").write_bytes(b"\x93NUMPY broken")
    with pytest.raises(ActivationsError, match="shard_00002.npy"):
        ShardStream(folder, buffer_tokens=1, prefetch=False).batch(0, 20)


def test_bfloat16_cache_halves_the_bytes_and_rounds_to_nearest_even(tmp_path):
    folder = make_cache(tmp_path / "c", [4, 4])
    half = convert_cache(folder, tmp_path / "h", "bfloat16")
    assert json.loads((half / "manifest.json").read_text())["dtype"] == "bfloat16"
    assert numpy.load(half / "shard_00000.npy").dtype == numpy.uint16
    x, y = ShardStream(folder, seed=5).batch(0, 8), ShardStream(half, seed=5).batch(0, 8)
    assert numpy.array_equal(y, bf16_bits_to_float32(float32_to_bf16_bits(x)))
    with pytest.raises(FileExistsError):
        convert_cache(folder, tmp_path / "h", "bfloat16")


def test_train_reads_a_streamed_cache(tmp_path):
    from minisae.cli import main

    rng = numpy.random.default_rng(0)
    folder = tmp_path / "acts"
    folder.mkdir()
    for j in range(3):
        numpy.save(folder / f"shard_{j:05d}.npy", rng.standard_normal((64, 8)).astype(numpy.float32))
    man = {"format": "minisae-activations-1", "site": "blocks.0.hook_resid_post", "d_in": 8, "dtype": "float32",
           "count": 192, "shards": [{"file": f"shard_{j:05d}.npy", "count": 64} for j in range(3)]}
    (folder / "manifest.json").write_text(json.dumps(man))
    out = tmp_path / "run"
    assert main(["train", "--arch", "topk", "--k", "2", "--d-sae", "16", "--steps", "3", "--batch-size", "32",
                 "--activations", str(folder), "--shuffle-buffer", "100", "--out", str(out), "--eval-tokens", "64",
                 "--no-progress"]) == 0
    info = json.loads((out / "config.json").read_text())
    assert info["source"]["type"] == "activation-stream" and info["source"]["buffer_tokens"] == 100
    assert main(["train", "--arch", "topk", "--k", "2", "--shuffle-buffer", "100", "--steps", "1",
                 "--out", str(tmp_path / "x"), "--no-progress"]) == 2  # no --activations
