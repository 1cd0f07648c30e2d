"""Each class of bad or hostile file the issue found, one test each: a one-line minisae error, fast
and small, instead of a traceback, minutes of work, gigabytes of memory or a silently wrong result."""

import json
import shutil
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy
import pytest
from test_cli import _error_line
from test_saefile import D, M, make_sae

from minisae import MinisaeError
from minisae.cli import main
from minisae.data.activations import ActivationsError, ActivationStore
from minisae.io.files import npz_members, read_json
from minisae.io.safetensors_io import save_file
from minisae.io.saefile import SAE, SAEFileError
from minisae.models import gemma2, load_model
from minisae.models.gemma2.config import ConfigError
from minisae.models.gemma2.weights import CheckpointError

TINY = Path(__file__).parent / "data" / "gemma2" / "tiny_f32"


class bounded:
    """Asserts the block takes under `seconds` and allocates under `mib` MiB (tracemalloc peak)."""

    def __init__(self, seconds=5.0, mib=64):
        self.seconds, self.mib = seconds, mib

    def __enter__(self):
        tracemalloc.start()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert time.perf_counter() - self.t0 < self.seconds
        assert peak < self.mib * 2**20, f"peak {peak / 2**20:.0f} MiB"
        return False


def saelens_folder(tmp_path, arch="jumprelu", **cfg_changes):
    folder = tmp_path / "sae"
    make_sae(arch).save(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(cfg_changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("dtype", [numpy.int32, numpy.bool_])
def test_integer_or_boolean_weights_are_refused(tmp_path, dtype):
    folder = saelens_folder(tmp_path)
    p = {n: numpy.asarray(a) for n, a in make_sae("jumprelu").params.items()}
    p["W_enc"] = (p["W_enc"] > 0).astype(dtype)
    save_file(p, folder / "sae_weights.safetensors")
    with pytest.raises(SAEFileError, match="W_enc: expected a floating-point dtype"):
        SAE.load(folder)
    with pytest.raises(SAEFileError, match="floating-point"):
        SAE("jumprelu", p)


def test_nan_weights_are_refused_and_eval_fails_in_one_line(tmp_path, capsys):
    folder = saelens_folder(tmp_path)
    p = {n: numpy.asarray(a) for n, a in make_sae("jumprelu").params.items()}
    p["b_enc"][3] = numpy.nan
    save_file(p, folder / "sae_weights.safetensors")
    with pytest.raises(SAEFileError, match="b_enc holds 1 NaN or infinite"):
        SAE.load(folder)
    assert main(["eval", "--sae", str(folder), "--synthetic", "--d-in", str(D), "--eval-tokens", "64"]) == 2
    assert "NaN" in _error_line(capsys)


@pytest.mark.parametrize("key, value, words", [
    ("apply_b_dec_to_input", "false", "must be a JSON boolean"),
    ("apply_b_dec_to_input", 0, "must be a JSON boolean"),
    ("architecture", ["jumprelu"], "unknown SAE architecture"),
    ("d_in", True, "expected a positive integer 'd_in'"),
    ("metadata", [1, 2], "'metadata' must be a JSON object"),
])
def test_cfg_values_of_the_wrong_type_are_refused(tmp_path, key, value, words):
    with pytest.raises(SAEFileError, match=words):
        SAE.load(saelens_folder(tmp_path, **{key: value}))


def test_topk_k_larger_than_d_sae_is_refused(tmp_path):
    with pytest.raises(SAEFileError, match=rf"integer cfg 'k' in \[1, d_sae={M}\], found {M + 1}"):
        SAE.load(saelens_folder(tmp_path, "topk", k=M + 1))


def test_deeply_nested_json_is_a_clear_error(tmp_path):
    folder = saelens_folder(tmp_path)
    (folder / "cfg.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with bounded(), pytest.raises(SAEFileError, match="nested too deeply"):
        SAE.load(folder)
    model = tmp_path / "model"
    shutil.copytree(TINY, model)
    (model / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_model(model)


def test_manifest_shard_without_count(tmp_path):
    numpy.save(tmp_path / "shard_00000.npy", numpy.zeros((4, 3), numpy.float32))
    man = {"format": "minisae-activations-1", "site": "s", "d_in": 3, "dtype": "float32", "count": 4,
           "shards": [{"file": "shard_00000.npy"}]}
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ActivationsError, match=r"shards\[0\] must be an object with a string 'file' and an integer 'count'"):
        ActivationStore(tmp_path)
    man["shards"] = [{"file": "../../etc/passwd", "count": 4}]
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ActivationsError, match="plain name"):
        ActivationStore(tmp_path)


@pytest.mark.parametrize("weight_map", [["model.safetensors"], "x", {"a": 3}, None])
def test_wrong_typed_weight_map(tmp_path, weight_map):
    model = tmp_path / "model"
    shutil.copytree(TINY, model)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="weight_map"):
        gemma2.load(model)


@pytest.mark.parametrize("key, value", [("num_hidden_layers", 20_000_000), ("vocab_size", 10**12),
                                        ("hidden_size", True), ("num_hidden_layers", 2.0)])
def test_huge_or_mistyped_config_numbers_fail_at_once(tmp_path, key, value):
    model = tmp_path / "model"
    shutil.copytree(TINY, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.pop("layer_types", None)  # old-style config: layer_types would be built from num_hidden_layers
    cfg[key] = value
    (model / "config.json").write_text(json.dumps(cfg))
    with bounded(seconds=2), pytest.raises(ConfigError, match=key):
        load_model(model)


def test_config_numbers_are_checked_against_the_tensors(tmp_path):
    model = tmp_path / "model"
    shutil.copytree(TINY, model)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(num_hidden_layers=900, layer_types=None)
    (model / "config.json").write_text(json.dumps(cfg))
    with bounded(seconds=5), pytest.raises(MinisaeError, match="missing tensor model.layers.4"):
        load_model(model)


def _npz_with_member(path, name, header_shape, payload, compress):
    """An .npz whose member `name` has an .npy header for float32 `header_shape` then `payload` bytes."""
    header = numpy.lib.format.header_data_from_array_1_0(numpy.zeros(0, numpy.float32))
    header["shape"] = header_shape
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        with zf.open(name + ".npy", "w", force_zip64=True) as fh:
            numpy.lib.format.write_array_header_1_0(fh, header)
            for chunk in payload:
                fh.write(chunk)


def test_zip_bomb_is_refused_before_decompression(tmp_path):
    bomb = tmp_path / "params.npz"
    zeros = bytes(2**20)
    n = 256  # 256 MiB of zeros: about 250 KB compressed
    _npz_with_member(bomb, "W_enc", (D, n * 2**18 // D), (zeros for _ in range(n)), compress=True)
    assert bomb.stat().st_size < 2**20
    with bounded(seconds=2), pytest.raises(SAEFileError, match="zip bomb"):
        SAE.load(bomb)


def test_npz_header_claiming_a_huge_array_is_refused(tmp_path):
    path = tmp_path / "params.npz"
    _npz_with_member(path, "W_enc", (10**6, 10**6), [bytes(64)], compress=False)
    with bounded(seconds=2), pytest.raises(SAEFileError, match=r"header says float32 \(1000000, 1000000\)"):
        SAE.load(path)
    numpy.savez(tmp_path / "ok.npz", a=numpy.ones((3, 4), numpy.float32))
    assert {k: (s, str(d)) for k, (s, d) in npz_members(tmp_path / "ok.npz").items()} == {"a": ((3, 4), "float32")}


def test_huge_json_file_is_refused_unread(tmp_path):
    big = tmp_path / "cfg.json"
    with open(big, "wb") as fh:
        fh.truncate(65 * 2**20)  # sparse: 65 MiB of nothing
    with bounded(seconds=1, mib=8), pytest.raises(MinisaeError, match="byte limit"):
        read_json(big)


def test_shard_with_a_mangled_npy_header(tmp_path):
    """numpy reads an .npy header as a Python literal: a mangled one raises SyntaxError or
    tokenize.TokenError inside numpy; minisae reports the shard instead (found by tests/test_fuzz.py)."""
    numpy.save(tmp_path / "shard_00000.npy", numpy.zeros((4, 3), numpy.float32))
    data = (tmp_path / "shard_00000.npy").read_bytes()
    (tmp_path / "shard_00000.npy").write_bytes(data.replace(b"(4, 3)", b"(4, 3) 3)", 1)[:len(data)])
    man = {"format": "minisae-activations-1", "site": "s", "d_in": 3, "dtype": "float32", "count": 4,
           "shards": [{"file": "shard_00000.npy", "count": 4}]}
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ActivationsError, match="shard_00000.npy: unreadable or truncated"):
        ActivationStore(tmp_path)


def test_tokenizer_whose_unk_token_is_not_in_the_vocabulary(tmp_path):
    """The `tokenizers` library panics (a BaseException) on such a file; minisae reports the file
    (found by tests/test_fuzz.py)."""
    from test_activations import make_tokenizer

    from minisae.models import load_tokenizer
    from minisae.models.gemma2.tokenizer import TokenizerError

    make_tokenizer(tmp_path)
    tok = json.loads((tmp_path / "tokenizer.json").read_text())
    tok["model"]["unk_token"] = "<not-in-vocab>"
    (tmp_path / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "tokenizer.json")
