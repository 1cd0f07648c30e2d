"""The exception family: every error minisae raises on purpose is a minisae.MinisaeError that still
is the builtin it used to be, and the `minisae` command prints it as one line with exit status 2
(1 for a failed training run), or its traceback with --debug."""

import errno

import pytest

import minisae
from minisae import errors
from minisae.cli import commands as cli
from minisae.data.activations import ActivationsError
from minisae.io.hub import HubError
from minisae.io.saefile import SAEFileError
from minisae.io.safetensors_io import SafetensorsError
from minisae.models.gemma2.config import ConfigError
from minisae.models.gemma2.tokenizer import TokenizerError
from minisae.models.gemma2.weights import CheckpointError as ModelCheckpointError
from minisae.training.train import CheckpointError, TrainingError
from minisae.xp import cupy_available, get_xp


@pytest.mark.parametrize("cls, builtin", [
    (SafetensorsError, ValueError), (SAEFileError, ValueError), (ConfigError, ValueError),
    (TokenizerError, ValueError), (ModelCheckpointError, ValueError), (ActivationsError, ValueError),
    (CheckpointError, ValueError), (TrainingError, RuntimeError), (HubError, RuntimeError),
    (errors.InputError, ValueError), (errors.FileFormatError, ValueError),
    (errors.OutputExistsError, FileExistsError), (errors.MissingInputError, FileNotFoundError),
    (errors.StorageError, OSError), (errors.DependencyError, RuntimeError), (errors.ResourceError, MemoryError),
])
def test_every_error_is_in_the_family_and_keeps_its_builtin(cls, builtin):
    assert issubclass(cls, minisae.MinisaeError) and issubclass(cls, builtin)
    assert minisae.MinisaeError is errors.MinisaeError


def test_storage_error_names_the_path_and_what_to_do(tmp_path):
    e = errors.storage_error(OSError(errno.ENOSPC, "No space left on device"), tmp_path / "x.bin")
    assert isinstance(e, errors.StorageError) and e.errno == errno.ENOSPC
    assert errors.one_line(e) == f"cannot write {tmp_path / 'x.bin'}: the disk is full: free space or choose another folder"
    bare = PermissionError(errno.EACCES, "Permission denied", "/root/x")
    assert errors.one_line(bare).startswith("/root/x: permission denied")


def _raising(exc):
    def cmd(a):
        raise exc
    return cmd


@pytest.mark.parametrize("exc, status", [
    (errors.InputError("--lr: expected a value > 0, found -1\nsecond line"), 2),
    (SAEFileError("sae/cfg.json: 'd_in' must be an integer"), 2),
    (TrainingError("step 3: the loss is nan"), 1),
    (OSError(errno.EROFS, "Read-only file system", "/ro/x"), 2),
    (MemoryError("Unable to allocate 1 TiB"), 2),
])
def test_cli_prints_one_line_and_exit_status(monkeypatch, capsys, exc, status):
    monkeypatch.setitem(cli.COMMANDS, "convert", _raising(exc))
    assert cli.main(["convert", "a", "b"]) == status
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("minisae convert: error: ")
    with pytest.raises(type(exc)):  # --debug: the exception itself, with its traceback
        cli.main(["convert", "a", "b", "--debug"])


def test_cli_keeps_the_traceback_of_a_bug(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "convert", _raising(KeyError("bug")))
    with pytest.raises(KeyError):
        cli.main(["convert", "a", "b"])


@pytest.mark.skipif(cupy_available(), reason="CuPy is usable here")
def test_cupy_backend_without_cupy_is_a_clear_error(capsys):
    with pytest.raises(errors.DependencyError, match="pip install"):
        get_xp("cupy")
    assert cli.main(["eval", "--sae", "nope", "--backend", "cupy"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "CuPy" in err
