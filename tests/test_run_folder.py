"""A training run folder changes as one unit (docs/pipeline.md, "The run folder"):

- kill -9 right after a checkpoint (and right after a step's metrics lines, before its checkpoint),
  three times, then --resume: metrics.jsonl and sae/ equal an uninterrupted run's, for the
  one-process trainer and the parallel one (--accumulate 2: its 1 x 1 grid);
- a second writer into a folder being written is refused with one line naming the holder; a
  holder killed with -9 holds nothing;
- a killed --overwrite never leaves the old sae/ beside the new config.json;
- a checkpoint of the earlier one-file format is resumed, never started over from step 0.

The kills use the test hook MINISAE_TEST_KILL="<point>:<step>" (minisae.training.checkpoint.kill_point).
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from minisae.cli.commands import main
from minisae.io.files import LOCK_NAME, FolderLock

ROOT = Path(__file__).resolve().parent.parent
RUN = ["--arch", "topk", "--k", "4", "--d-in", "16", "--n-features", "32", "--true-l0", "3", "--max-freq", "0.2", "--d-sae", "32",
       "--steps", "12", "--batch-size", "64", "--warmup-steps", "2", "--lr", "3e-3", "--eval-tokens", "0",
       "--checkpoint-every", "3", "--log-every", "1", "--no-progress"]
TRAINERS = {"one process": [], "parallel trainer": ["--accumulate", "2"]}  # one process, SingleProcess grid


def cli(args, kill=None):
    """`python -m minisae.cli ARGS` in a fresh process (MINISAE_TEST_KILL=kill); the CompletedProcess."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    env.pop("MINISAE_TEST_KILL", None)
    if kill:
        env["MINISAE_TEST_KILL"] = kill
    return subprocess.run([sys.executable, "-m", "minisae.cli"] + args, env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def metrics(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("elapsed_s")  # wall time: the one field two runs may not share
    return rows


def folder_bytes(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_kill_9_three_times_then_resume_equals_an_uninterrupted_run(tmp_path, trainer):
    extra = TRAINERS[trainer]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["train", "--out", str(ref)] + RUN + extra) == 0
    # right after the checkpoint of step 3; after step 6's metrics lines but before its checkpoint;
    # right after the checkpoint of step 9
    for i, kill in enumerate(["checkpoint:3", "metrics:6", "checkpoint:9"]):
        p = cli(["train", "--out", str(run)] + RUN + extra + (["--resume"] if i else []), kill=kill)
        assert p.returncode == -signal.SIGKILL, f"{kill}: not killed (rc {p.returncode}): {p.stderr[-2000:]}"
    p = cli(["train", "--out", str(run), "--resume"] + RUN + extra)
    assert p.returncode == 0, p.stderr[-2000:]
    got, want = metrics(run), metrics(ref)
    assert [r["step"] for r in got] == list(range(1, 13))  # no gap, no duplicate
    assert got == want
    assert folder_bytes(run / "sae") == folder_bytes(ref / "sae")


def test_a_second_writer_is_refused_with_one_line_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with FolderLock(run):  # this process writes the folder (as a live `minisae train` would)
        assert main(["train", "--out", str(run)] + RUN) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another minisae process is writing" in err[0] and f"pid {os.getpid()}" in err[0]
        assert main(["train", "--out", str(run), "--accumulate", "2"] + RUN) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"pid {os.getpid()}" in err[0]
    assert not (run / "config.json").exists() and not (run / "metrics.jsonl").exists()
    assert main(["train", "--out", str(run)] + RUN) == 0  # released: the folder is free again


def test_a_writer_killed_with_minus_9_holds_no_lock(tmp_path):
    run = tmp_path / "run"
    p = cli(["train", "--out", str(run)] + RUN, kill="checkpoint:3")
    assert p.returncode == -signal.SIGKILL and (run / LOCK_NAME).exists()  # the file stays, the lock does not
    assert cli(["train", "--out", str(run), "--resume"] + RUN).returncode == 0


def test_two_trainings_into_one_out_the_second_refuses(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MINISAE_TEST_KILL": ""}
    # the first holds the folder: it waits on stdin right after its first checkpoint's lock is taken
    first = subprocess.Popen([sys.executable, "-c", (
        "import sys; from minisae.io.files import FolderLock, make_dir; make_dir(sys.argv[1]); "
        "lock = FolderLock(sys.argv[1]); print('held', flush=True); sys.stdin.read()"), str(run)],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert first.stdout.readline().strip() == "held"
        p = cli(["train", "--out", str(run)] + RUN)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
        assert f"pid {first.pid}" in p.stderr
    finally:
        first.kill()
        first.wait()


@pytest.mark.parametrize("trainer", list(TRAINERS))
def test_a_killed_overwrite_never_leaves_the_old_sae_beside_the_new_config(tmp_path, trainer):
    run = tmp_path / "run"
    extra = TRAINERS[trainer]
    assert main(["train", "--out", str(run)] + RUN + extra) == 0
    old_config = (run / "config.json").read_bytes()
    new = [a if a != "32" or i != RUN.index("--d-sae") + 1 else "48" for i, a in enumerate(RUN)]  # another run
    p = cli(["train", "--out", str(run), "--overwrite"] + new + extra, kill="metrics:3")
    assert p.returncode == -signal.SIGKILL
    assert (run / "config.json").read_bytes() != old_config  # the new run's record ...
    assert not (run / "sae").exists()  # ... and no SAE of the old run beside it
    e = cli(["eval", "--sae", str(run / "sae")])
    assert e.returncode == 2 and len(e.stderr.strip().splitlines()) == 1


def test_a_checkpoint_of_the_earlier_one_file_format_is_resumed_not_restarted(tmp_path):
    """Folders written before the one loop hold checkpoint.safetensors: a resume reads it (one
    process or the parallel trainer), and replaces it with checkpoint/ at its first checkpoint."""
    import shutil

    from minisae.training.train import TrainConfig, read_state, save_checkpoint

    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["train", "--out", str(ref)] + RUN) == 0
    p = cli(["train", "--out", str(run)] + RUN, kill="checkpoint:6")
    assert p.returncode == -signal.SIGKILL
    cfg = TrainConfig(**json.loads((run / "config.json").read_text())["train"])
    save_checkpoint(run / "checkpoint.safetensors", read_state(run, cfg), cfg)  # the step-6 state, old format
    shutil.rmtree(run / "checkpoint")
    copy = Path(shutil.copytree(run, tmp_path / "copy"))
    assert main(["train", "--out", str(run), "--resume"] + RUN) == 0
    assert metrics(run) == metrics(ref) and folder_bytes(run / "sae") == folder_bytes(ref / "sae")
    assert not (run / "checkpoint.safetensors").exists() and (run / "checkpoint" / "checkpoint.json").exists()
    assert main(["train", "--out", str(copy), "--resume", "--accumulate", "2"] + RUN) == 0  # the parallel trainer
    assert [r["step"] for r in metrics(copy)] == list(range(1, 13)) and metrics(copy)[:6] == metrics(ref)[:6]


def test_a_compare_worker_that_dies_is_one_line_naming_resume():
    """A worker killed under `minisae compare` (the OOM killer, say) was a BrokenProcessPool traceback."""
    from minisae.errors import ResourceError
    from minisae.experiment.workers import run_in_workers

    with pytest.raises(ResourceError, match="rerun the same command with --resume") as e:
        run_in_workers([3], [()], 1, lambda j, r: None, job=os._exit)  # the worker ends at once, status 3
    assert "\n" not in str(e.value)


def _children(pid):
    """The pids whose parent is `pid` (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux's /proc")
def test_compare_workers_end_when_the_compare_process_is_killed(tmp_path):
    """`kill -9` of a running compare ran no clean-up, and its training workers went on writing runs
    into the folder (racing a rerun); now each worker watches its parent and ends with it."""
    import time

    script = ("import sys, time\n"
              "from minisae.experiment.workers import run_in_workers\n"
              "run_in_workers([60, 60], [(), ()], 2, lambda j, r: None, job=time.sleep)\n")
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline, workers = time.time() + 60, []
        while time.time() < deadline and len(workers) < 2:  # the resource tracker is a child too
            time.sleep(0.2)
            workers = [k for k in _children(proc.pid)
                       if "spawn_main" in Path(f"/proc/{k}/cmdline").read_text(errors="replace")]
        assert len(workers) == 2, "the two workers did not start"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "a worker outlived its compare"
    finally:
        proc.kill()
