"""An SAE folder is written and replaced as one unit: a process killed at any point of
SAE.save(overwrite=True) / convert --overwrite leaves the old SAE or the new one, whole, and the
next save removes what the killed one left; a folder holding two formats is refused on load;
converting a folder to another format replaces the format that loads."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from test_saefile import make_sae

from minisae.cli.commands import main
from minisae.io.saefile import SAE, SAEFileError, formats_in

TESTS = Path(__file__).parent
ROOT = TESTS.parent

# The child builds SAE b (seed 1) and writes it over `folder`, dying (os._exit: no cleanup, no
# finally) at the chosen point, as kill -9 would.
CHILD = """
import os, shutil, sys
sys.path[:0] = [{root!r}, {tests!r}]
import numpy
from test_saefile import make_sae
import minisae.io.safetensors_io as st
how, n, fmt, folder = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
count = [0]
def dying(real):
    def f(*a, **k):
        count[0] += 1
        if count[0] == n:
            os._exit(9)
        return real(*a, **k)
    return f
if how == "rename":
    os.rename = dying(os.rename)
elif how == "rmtree":
    shutil.rmtree = dying(shutil.rmtree)
elif how == "write":  # dies after the first tensor file is written
    real = st.save_file
    def half(*a, **k):
        real(*a, **k)
        os._exit(9)
    st.save_file = half
elif how == "savez":
    real_savez = numpy.savez
    def half_npz(fh, **arrays):
        fh.write(b"PK" * 1000)
        os._exit(9)
    numpy.savez = half_npz
b = make_sae("jumprelu", seed=1)
getattr(b, {{"saelens": "save", "gs2": "save_gemma_scope_2", "npz": "save_gemma_scope"}}[fmt])(folder, overwrite=True)
"""


def run_child(how, n, fmt, folder):
    code = CHILD.format(root=str(ROOT), tests=str(TESTS))
    return subprocess.run([sys.executable, "-c", code, how, str(n), fmt, str(folder)],
                          capture_output=True, text=True, timeout=120).returncode


def hidden_beside(folder):
    return sorted(p.name for p in Path(folder).parent.iterdir() if p.name.startswith("."))


def which(folder, a, b):
    """"a" or "b": the SAE the folder loads, checked whole (every tensor equal to one of them)."""
    loaded = SAE.load(folder)
    for name, sae in (("a", a), ("b", b)):
        if all(numpy.array_equal(loaded.params[k], sae.params[k]) for k in ("W_enc", "W_dec", "threshold")):
            if name == "a" or not loaded.cfg["apply_b_dec_to_input"]:  # (gs2 folds b_dec: compare the rest)
                return name
            if numpy.array_equal(loaded.params["b_enc"], sae.params["b_enc"]):
                return name
    raise AssertionError(f"{folder} holds neither SAE whole")


@pytest.mark.parametrize("fmt", ["saelens", "gs2"])
@pytest.mark.parametrize("how, n", [("write", 1), ("rename", 1), ("rename", 2), ("rmtree", 1)])
def test_a_killed_save_leaves_the_old_sae_or_the_new_one_whole(tmp_path, fmt, how, n):
    a, b = make_sae("jumprelu", seed=0), make_sae("jumprelu", seed=1)
    folder = a.save(tmp_path / "sae")
    (folder / "notes.txt").write_text("kept")
    assert run_child(how, n, fmt, folder) == 9  # killed
    got = which(folder / "cfg.json" if fmt == "saelens" else folder, a, b)  # loads (an interrupted
    # swap is undone first, also when a file in the folder is named), and whole
    assert got == ("b" if how == "rmtree" else "a")
    assert (folder / "notes.txt").read_text() == "kept"
    assert len(formats_in(folder)) == 1
    b.save(folder, overwrite=True)  # the next save removes what the killed one left
    assert hidden_beside(folder) == []
    assert which(folder, a, b) == "b" and (folder / "notes.txt").read_text() == "kept"


def test_a_killed_npz_save_leaves_a_temporary_the_next_save_removes(tmp_path):
    a = make_sae("jumprelu", seed=0)
    path = a.save_gemma_scope(tmp_path / "out.npz")
    assert run_child("savez", 0, "npz", path) == 9
    assert len(hidden_beside(path)) == 1  # .out.npz.XXXXXXXX.tmp
    assert numpy.array_equal(SAE.load(path).params["W_enc"], a.params["W_enc"])  # the old file, whole
    a.save_gemma_scope(path, overwrite=True)
    assert hidden_beside(path) == []


def test_a_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    a, b = make_sae("jumprelu", seed=0), make_sae("jumprelu", seed=1)
    folder = a.save(tmp_path / "sae")
    real = os.rename

    def second_rename_fails(src, dst):
        if Path(src).name.endswith(".tmp") and not Path(src).name.endswith(".replaced.tmp") and Path(dst) == folder:
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "rename", second_rename_fails)
    with pytest.raises(OSError, match="space"):
        b.save(folder, overwrite=True)
    monkeypatch.undo()
    assert hidden_beside(folder) == [] and which(folder, a, b) == "a"


def test_a_folder_holding_two_formats_is_refused_naming_both(tmp_path):
    sae = make_sae("jumprelu")
    folder = sae.save(tmp_path / "sae")
    sae.save_gemma_scope(folder / "params.npz")
    with pytest.raises(SAEFileError, match=r"two SAE formats, SAELens \(cfg.json, sae_weights.safetensors\) "
                                           r"and Gemma Scope \(params.npz\)") as e:
        SAE.load(folder)
    assert "\n" not in str(e.value)
    SAE.load(folder / "cfg.json")  # a file named directly is unambiguous


def test_convert_overwrite_to_another_format_replaces_the_one_that_loads(tmp_path, capsys):
    a, b = make_sae("jumprelu", seed=0), make_sae("jumprelu", seed=1)
    src_a, src_b = a.save(tmp_path / "a"), b.save(tmp_path / "b")
    folder = a.save(tmp_path / "out")
    (folder / "notes.txt").write_text("kept")
    assert main(["convert", str(src_b), str(folder), "--to", "gemma-scope-2", "--overwrite"]) == 0
    assert formats_in(folder) == ["Gemma Scope 2 (params.safetensors)"] and which(folder, a, b) == "b"
    assert main(["convert", str(src_a), str(folder), "--overwrite"]) == 0  # and back: minisae wrote it
    assert formats_in(folder) == ["SAELens (cfg.json, sae_weights.safetensors)"] and which(folder, a, b) == "a"
    assert (folder / "notes.txt").read_text() == "kept" and hidden_beside(folder) == []


def test_a_symlinked_sae_folder_stays_a_link_to_the_replaced_folder(tmp_path):
    a, b = make_sae("jumprelu", seed=0), make_sae("jumprelu", seed=1)
    real = a.save(tmp_path / "real")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    assert b.save(tmp_path / "link", overwrite=True) == tmp_path / "link"
    assert (tmp_path / "link").is_symlink() and which(real, a, b) == "b" and which(tmp_path / "link", a, b) == "b"


def test_a_fifo_named_config_json_does_not_block_loading(tmp_path):
    folder = make_sae("jumprelu").save(tmp_path / "sae")
    os.mkfifo(folder / "config.json")

    def blocked(*_):
        raise AssertionError("blocked on the FIFO")

    old = signal.signal(signal.SIGALRM, blocked)
    signal.alarm(20)  # opening a FIFO for reading waits for a writer: fail instead of hanging
    try:
        assert formats_in(folder) == ["SAELens (cfg.json, sae_weights.safetensors)"]
        SAE.load(folder)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
