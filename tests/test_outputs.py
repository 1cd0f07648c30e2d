"""The output rule and the operating system: every command that writes (train, cache, compare,
convert, eval --json) refuses a folder of another kind (even with --overwrite) and touches nothing
there; replaces its own outputs only with --overwrite; and a full or read-only disk (a mocked
os.replace / write failure) ends in one line naming the path, no temp file left, the previous
checkpoint intact."""

import errno
import json
import os
from pathlib import Path

import numpy
import pytest
from test_activations import SITE, TINY, make_tokenizer, write_texts
from test_cli import TINY_TRAIN, _error_line

from minisae.cli import main
from minisae.errors import OutputExistsError, StorageError
from minisae.io import files
from minisae.io.saefile import SAE


def _snapshot(folder):
    return {p.relative_to(folder): (p.read_bytes() if p.is_file() else None) for p in sorted(Path(folder).rglob("*"))}


@pytest.fixture
def foreign(tmp_path):
    """A model folder that is not minisae's: config.json, weights, a README."""
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "gemma2", "hidden_size": 64}\n')
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (d / "README.md").write_text("mine\n")
    return d


@pytest.fixture(scope="module")
def tiny_sae(tmp_path_factory):
    d = tmp_path_factory.mktemp("sae") / "run"
    assert main(["train", "--arch", "jumprelu", "--sparsity-coeff", "1e-2", "--out", str(d)] + TINY_TRAIN) == 0
    return d


def _gemma_args(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    make_tokenizer(tok)
    texts = [str(p) for p in write_texts(tmp_path, n_docs=4)]
    return ["--model", str(TINY), "--tokenizer", str(tok / "tokenizer.json"), "--seq-len", "16",
            "--site", SITE, "--text", *texts]


def test_train_refuses_a_foreign_folder_and_touches_nothing(foreign, capsys):
    before = _snapshot(foreign)
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert main(["train", "--arch", "topk", "--k", "4", "--out", str(foreign)] + TINY_TRAIN + extra) == 2
        assert "not a minisae train run folder" in _error_line(capsys)
        assert _snapshot(foreign) == before


def test_train_replaces_its_own_run_only_with_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["train", "--arch", "topk", "--k", "4", "--out", str(run)] + TINY_TRAIN
    assert main(args) == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert main(args) == 2
    assert "--overwrite" in _error_line(capsys) and _snapshot(run) == before
    assert main(args + ["--overwrite", "--seed", "1"]) == 0
    assert (run / "sae" / "cfg.json").is_file() and _snapshot(run) != before
    assert not [p for p in run.rglob("*") if files.is_temp_name(p.name)]


def test_cache_refuses_a_foreign_folder(foreign, tmp_path, capsys):
    before = _snapshot(foreign)
    gemma = _gemma_args(tmp_path)
    for extra in ([], ["--overwrite"]):
        assert main(["cache", "--out", str(foreign), "--no-progress"] + gemma + extra) == 2
        assert "not a minisae activation cache folder" in _error_line(capsys)
    assert _snapshot(foreign) == before


def test_cache_of_empty_text_writes_nothing_and_overwrite_starts_over(tmp_path, capsys):
    gemma = _gemma_args(tmp_path)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    acts = tmp_path / "acts"
    base = ["cache", "--out", str(acts), "--no-progress", "--max-tokens", "40"]
    assert main(base + gemma[:-3] + ["--text", str(empty)]) == 2
    assert "no tokens" in _error_line(capsys)
    assert not (acts / "manifest.json").exists()  # the folder stays free for the real texts
    assert main(base + gemma) == 0
    capsys.readouterr()
    assert main(base[:-1] + ["30"] + gemma) == 2  # a different cache: refused without --overwrite
    assert "--overwrite" in _error_line(capsys)
    assert main(base[:-1] + ["30", "--overwrite"] + gemma) == 0
    assert json.loads((acts / "manifest.json").read_text())["count"] == 30
    assert sorted(p.name for p in acts.iterdir()) == ["manifest.json", "shard_00000.npy"]


def test_compare_refuses_a_foreign_folder_before_any_work(foreign, capsys):
    before = _snapshot(foreign)
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert main(["compare", "--quick", "--out", str(foreign), "--no-progress"] + extra) == 2
        assert "not a minisae compare report folder" in _error_line(capsys)
    assert _snapshot(foreign) == before


def test_compare_checks_eval_text_before_training(tmp_path, capsys):
    out = tmp_path / "cmp"
    gemma = _gemma_args(tmp_path)
    assert main(["compare", "--quick", "--out", str(out), "--no-progress", "--eval-text",
                 str(tmp_path / "missing.txt")] + gemma) == 2
    assert "--eval-text" in _error_line(capsys) and not out.exists()
    assert main(["compare", "--quick", "--out", str(out), "--eval-text", gemma[-1]]) == 2  # no model to score with
    assert "needs --model" in _error_line(capsys) and not out.exists()
    assert main(["compare", "--quick", "--out", str(out), "--lm-tokens", "512"]) == 2
    assert "--lm-tokens is for delta LM loss and needs --model" in _error_line(capsys) and not out.exists()
    assert main(["compare", "--quick", "--out", str(out), "--max-norm-ratio", "5"]) == 2
    assert "--max-norm-ratio is for a real model's activations and needs --model" in _error_line(capsys)
    assert not out.exists()


def test_convert_refuses_a_foreign_folder(foreign, tiny_sae, tmp_path, capsys):
    before = _snapshot(foreign)
    for extra in ([], ["--overwrite"]):
        assert main(["convert", str(tiny_sae / "sae"), str(foreign)] + extra) == 2
        assert "not a minisae SAE folder" in _error_line(capsys)
        for to in ("gemma-scope", "gemma-scope-2"):  # a model's config.json is not a Gemma Scope 2 config
            assert main(["convert", str(tiny_sae / "sae"), str(foreign), "--to", to] + extra) == 2
            assert "not a minisae SAE folder" in _error_line(capsys)
    assert _snapshot(foreign) == before
    npz = tmp_path / "x.npz"
    assert main(["convert", str(tiny_sae / "sae"), str(npz)]) == 0
    first = npz.read_bytes()
    assert main(["convert", str(tiny_sae / "sae"), str(npz)]) == 2
    assert "--overwrite" in _error_line(capsys) and npz.read_bytes() == first
    assert main(["convert", str(tiny_sae / "sae"), str(npz), "--overwrite"]) == 0


def test_eval_json_is_not_replaced_without_overwrite(tiny_sae, tmp_path, capsys):
    out = tmp_path / "e.json"
    out.write_text("precious\n")
    args = ["eval", "--sae", str(tiny_sae / "sae"), "--eval-tokens", "512", "--json", str(out), "--no-progress"]
    assert main(args) == 2
    assert "--overwrite" in _error_line(capsys) and out.read_text() == "precious\n"
    assert main(args + ["--overwrite"]) == 0 and "fvu" in json.loads(out.read_text())


# ---- the operating system says no -------------------------------------------------------------

def _failing_replace(code, name):
    real = os.replace

    def replace(src, dst, *a, **k):
        if Path(dst).name == name:
            raise OSError(code, os.strerror(code), str(dst))
        return real(src, dst, *a, **k)
    return replace


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only"),
                                          (errno.EACCES, "permission denied")])
def test_disk_failure_keeps_the_checkpoint_and_leaves_no_temp_file(tmp_path, monkeypatch, capsys, code, words):
    run = tmp_path / "run"
    args = ["train", "--arch", "topk", "--k", "4", "--out", str(run)] + TINY_TRAIN
    assert main(args + ["--steps", "10"]) == 0
    ckpt = {p: p.read_bytes() for p in (run / "checkpoint").rglob("*") if p.is_file()}
    monkeypatch.setattr(os, "replace", _failing_replace(code, "shard-00000.safetensors"))
    assert main(args + ["--resume"]) == 2  # steps 10 → 20: its first checkpoint write fails
    err = _error_line(capsys)
    assert words in err and "shard-00000.safetensors" in err
    assert {p: p.read_bytes() for p in ckpt} == ckpt  # the step-10 checkpoint, whole
    assert not [p for p in run.rglob("*") if files.is_temp_name(p.name)]


def test_write_failure_midway_removes_the_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    target.write_text("old\n")

    class FullDisk:  # the file is created, then the disk fills up
        def __init__(self, path, mode):
            self.fh = open(path, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[:1])
            raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files, "open", FullDisk, raising=False)
    with pytest.raises(StorageError, match="disk is full"):
        files.write_atomic(target, "new\n")
    assert target.read_text() == "old\n" and os.listdir(tmp_path) == ["a.json"]


def test_cache_on_a_full_disk_says_so(tmp_path, monkeypatch, capsys):
    gemma = _gemma_args(tmp_path)
    def save(fh, arr, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(numpy, "save", save)
    acts = tmp_path / "acts"
    assert main(["cache", "--out", str(acts), "--no-progress"] + gemma) == 2
    err = _error_line(capsys)
    assert "disk is full" in err and "shard_00000.npy" in err
    assert not [p for p in acts.rglob("*") if files.is_temp_name(p.name)]


def test_check_output_dir_rules(tmp_path):
    own = lambda d: (d / "mine").exists()  # noqa: E731
    assert files.check_output_dir(tmp_path / "new", "x", is_own=own) == "new"
    assert files.check_output_dir(tmp_path, "x", is_own=own) == "empty"
    (tmp_path / ".a.json.1234abcd.tmp").write_text("")
    assert files.check_output_dir(tmp_path, "x", is_own=own) == "empty"
    (tmp_path / "mine").write_text("")
    assert files.check_output_dir(tmp_path, "x", is_own=own) == "own"
    with pytest.raises(OutputExistsError, match="not a folder"):
        files.check_output_dir(tmp_path / "mine", "x", is_own=own)
    (tmp_path / "mine").unlink()
    (tmp_path / "theirs").write_text("")
    with pytest.raises(OutputExistsError, match="holds .a.json.1234abcd.tmp, theirs"):
        files.check_output_dir(tmp_path, "x", is_own=own)
    assert not (tmp_path / "new").exists()
