"""The sweep's training runs in worker processes: each run is one `train` call (minisae.training),
in a process of its own held to one BLAS thread, several at a time (`minisae compare --jobs`).

A worker rebuilds its activation source from a picklable description (`source_spec`: the cache
folder, seed and held-out size), once per process; it ends itself when the compare process that
started it is gone (`watch_parent`), so a killed compare leaves no worker writing into its folder.
A worker that dies (often killed for memory) ends the sweep with a ResourceError that says the
finished runs are kept for --resume.
"""

import json
import os
import time

from minisae.errors import ResourceError, TrainingError
from minisae.training.train import train


def train_job(source, train_cfg, run_dir, resume, force, progress=False, allow_fail=False):
    """Seconds one training took; with allow_fail, (seconds, None) or (seconds, why) for a run that
    diverged (a pilot setting may be too fast for a variant: that is a result, not an error)."""
    t0 = time.time()
    try:
        train(train_cfg, source, run_dir, resume=resume, overwrite=force, progress=progress)
    except TrainingError as e:
        if not allow_fail:
            raise
        return time.time() - t0, str(e)
    return (time.time() - t0, None) if allow_fail else time.time() - t0


def source_spec(source):
    """A picklable description a worker rebuilds the source from (None: train in this process)."""
    from minisae.data.activations import ActivationStore

    if isinstance(source, ActivationStore):
        return ("activations", str(source.folder), source.seed, int(source.holdout_rows.size))
    return None


_worker_sources = {}


def worker_job(spec, *args):
    """train_job(source, *args) in a worker, the source rebuilt from source_spec's `spec`."""
    key = json.dumps(spec)
    if key not in _worker_sources:  # one source per (folder, seed) per worker process
        from minisae.data.activations import ActivationStore

        _worker_sources[key] = ActivationStore(spec[1], seed=spec[2], holdout_tokens=spec[3])
    return train_job(_worker_sources[key], *args)


ONE_THREAD = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
PARENT_POLL_SECONDS = 1.0  # a worker checks this often that the compare process that started it still lives


def watch_parent(parent_pid):
    """A worker's initializer: a daemon thread ends the worker as soon as its parent is gone (a
    compare killed by a signal runs no clean-up, and its workers would go on writing runs into
    the folder, racing a rerun)."""
    import threading

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def run_in_workers(specs, args, n_workers, finish, job=None):
    """Runs job(spec, *a) for each spec and args a in spawned processes, n_workers at a time, each
    held to one BLAS thread; finish(j, result) on this process as each ends."""
    import concurrent.futures
    import multiprocessing

    job = worker_job if job is None else job

    saved = {k: os.environ.get(k) for k in ONE_THREAD}
    os.environ.update({k: "1" for k in ONE_THREAD})  # read by each worker's BLAS at start-up
    try:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=watch_parent,
                                                    initargs=(os.getpid(),)) as pool:
            futures = {pool.submit(job, spec, *a): j for j, (spec, a) in enumerate(zip(specs, args))}
            try:
                for fut in concurrent.futures.as_completed(futures):
                    finish(futures[fut], fut.result())
            except concurrent.futures.process.BrokenProcessPool:
                for fut in futures:
                    fut.cancel()
                raise ResourceError("a training worker process died (killed by the system, often for lack of "
                                    "memory); the finished runs are kept: rerun the same command with --resume, "
                                    "with fewer --jobs if memory is short") from None
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
