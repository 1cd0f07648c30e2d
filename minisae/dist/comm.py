"""Communicators for training past one process: single process, MPI (CPU), NCCL (GPU).

    from minisae import dist
    comm = dist.world()                 # MPI when started by mpiexec, else the single process
    g = comm.sum(g_local)               # the same bits on every rank, summed in rank order
    parts = comm.allgather(a)           # (size, *a.shape)
    a = comm.broadcast(a, root=0)
    sub = comm.split(color, key)        # a communicator over the ranks that gave `color`

Launch: `mpiexec -n P minisae train ...` (the `dist` extra installs the pip wheels mpi4py and mpich,
so nothing needs a system MPI). Without mpiexec, `world()` is the single process and mpi4py is never
imported. On CuPy arrays the NCCL backend moves device buffers (bootstrapped over MPI: rank 0 draws
the NCCL id and broadcasts it); it has never run on a GPU in minisae's development (no device was
available), and its test skips cleanly without CuPy.

Determinism. `sum` never lets the network choose the order of additions: rank r gets every rank's
contribution to its 1/P of the elements (an all-to-all), adds them in rank order 0, 1, ..., P-1,
and the P pieces are all-gathered. Each element is therefore ((a_0 + a_1) + a_2) + ... exactly
as `ordered_sum` adds a list in one process, so a P-rank run is bitwise equal to one process that
accumulates the same P micro-batches in rank order; a plain MPI_Allreduce is not (MPICH picks the
reduction tree by message size and P). Traffic per rank is 2(P-1)/P of the array, as for a ring
all-reduce. `deterministic=False` uses the library's all-reduce instead.

Every collective counts the bytes this rank sends (`comm.sent_bytes`, shared with the communicators
split from it), which the scaling benchmark
(reference/bench_dist.py) compares with the formula in docs/scale.md.

Legend: P ranks in a communicator, n elements of an array.
"""

import contextlib
import os
import sys

import numpy

from minisae.errors import DependencyError, InputError, MinisaeError

MPI_ENV = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


class DistError(MinisaeError, RuntimeError):
    """A distributed run cannot go on (ranks that disagree)."""


def ordered_sum(parts):
    """((parts[0] + parts[1]) + parts[2]) + ...: the one order of addition every backend uses."""
    out = parts[0].copy()
    for p in parts[1:]:
        out += p
    return out


def launched_by_mpiexec():
    """The world size mpiexec announced in the environment (1 when not started by mpiexec)."""
    for key in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 1


def world(backend="auto", *, deterministic=True):
    """The communicator over every process of this run.

    backend: "auto" (MPI when mpiexec started more than one process, else single), "single",
    "mpi", or "nccl" (CuPy buffers; bootstrapped over MPI).
    """
    if backend not in ("auto", "single", "mpi", "nccl"):
        raise InputError(f"dist backend: expected 'auto', 'single', 'mpi' or 'nccl', found {backend!r}")
    if backend == "single" or (backend == "auto" and launched_by_mpiexec() == 1):
        return SingleProcess()
    try:
        mpi4py = _mpi4py()
    except DependencyError as e:  # the same on every rank
        raise on_every_rank(e) from None
    mpi = MPIComm(mpi4py.COMM_WORLD, deterministic=deterministic)
    if backend == "nccl":
        return NCCLComm(mpi, deterministic=deterministic)
    return mpi


def _mpi4py():
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise DependencyError(f"this run was started by mpiexec (or asked for MPI) but mpi4py cannot be "
                        f"imported ({e}); install the dist extra: pip install 'minisae[dist]'") from None
    return MPI


def on_every_rank(e):
    """Mark exception `e` as raised on every rank of the run (by on_root, together, check_same, or
    a check every rank makes on the same summed values): the command reports it once, from rank 0,
    and every rank exits with its status. Returns e."""
    e.on_every_rank = True
    return e


@contextlib.contextmanager
def agreed():
    """Code whose checks read only what every rank holds alike (the same arguments, results of
    on_root or a collective): an exception it raises is marked as every rank's (`on_every_rank`)."""
    try:
        yield
    except Exception as e:
        on_every_rank(e)
        raise


def launch_rank():
    """This process's rank as mpiexec announced it in the environment (0 when not started by mpiexec)."""
    for key in ("PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


@contextlib.contextmanager
def abort_on_error(comm):
    """In a run of several processes, an error on one rank alone would leave the others waiting in
    a collective for ever. An error raised on every rank (marked by `on_every_rank`) goes on up, to
    be reported once by rank 0; any other is printed as one line naming the rank and every process
    is aborted (MPI_Abort with the error's exit status: 2 for a MinisaeError, else 1)."""
    try:
        yield
    except BaseException as e:
        if comm.size == 1 or getattr(e, "on_every_rank", False):
            raise
        from minisae.errors import one_line

        status = getattr(e, "exit_status", 1) if isinstance(e, MinisaeError) else 1
        print(f"minisae (rank {comm.rank} of {comm.size}): error: {one_line(e)}", file=sys.stderr, flush=True)
        try:  # the MPI library's own "application called MPI_Abort" line would be a second one
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
        except OSError:
            pass
        comm.abort(status)
        raise


class Comm:
    """What every backend offers. Arrays go in and new arrays come out (inputs are not changed)."""

    rank = 0
    size = 1
    name = "single"

    def __init__(self, traffic=None):
        self._traffic = [0] if traffic is None else traffic  # shared with the communicators split off

    @property
    def sent_bytes(self):
        """Bytes this process has sent through this communicator and every one split from it."""
        return self._traffic[0]

    @sent_bytes.setter
    def sent_bytes(self, value):
        self._traffic[0] = value

    def sum(self, a):
        """The elementwise sum over ranks of `a`, in rank order (bitwise the same everywhere)."""
        raise NotImplementedError

    def allgather(self, a):
        """(size, *a.shape): every rank's `a`, in rank order."""
        raise NotImplementedError

    def broadcast(self, a, root=0):
        """Rank root's `a` on every rank (same shape and dtype everywhere)."""
        raise NotImplementedError

    def bcast_obj(self, obj, root=0):
        """A small picklable Python object from rank root."""
        raise NotImplementedError

    def barrier(self):
        raise NotImplementedError

    def split(self, color, key):
        """The communicator of the ranks that pass the same color, ordered by key."""
        raise NotImplementedError

    def any(self, mask):
        """Elementwise OR over ranks of a boolean array."""
        return self.sum(mask.astype("int32")) > 0

    def on_root(self, fn, root=0):
        """fn() run on rank root alone; its (small, picklable) result, or the error it raised, is
        broadcast, so every rank returns the result or raises the error: no rank is left waiting
        in a collective for a rank that failed."""
        result, error = None, None
        if self.rank == root:
            try:
                result = fn()
            except Exception as e:  # handed to every rank below
                error = e
        result, error = self.bcast_obj((result, error), root)
        if error is not None:
            raise on_every_rank(error)
        return result

    def together(self, fn):
        """fn() run on every rank; if any rank raised, every rank raises (its own error, else the
        first rank's), so no rank is left waiting for a rank that failed."""
        result, error = None, None
        try:
            result = fn()
        except Exception as e:  # compared with the other ranks' below
            error = e
        errors = [e for e in self.allgather_obj(error) if e is not None]
        if errors:
            raise on_every_rank(error if error is not None else errors[0])
        return result

    def check_same(self, value, what):
        """Raise DistError on every rank unless every rank passes an equal (JSON-able) value."""
        values = self.allgather_obj(value)
        if any(v != values[0] for v in values):
            raise on_every_rank(DistError(f"ranks disagree on {what}: {values}"))

    def allgather_obj(self, obj):
        return [obj]

    def abort(self, code):
        """End every process of the run now (MPI_Abort); a no-op in one process."""


class SingleProcess(Comm):
    """One process: every collective is the identity (sum returns a copy)."""

    def sum(self, a):
        return a.copy()

    def allgather(self, a):
        return a[None].copy()

    def broadcast(self, a, root=0):
        return a.copy()

    def bcast_obj(self, obj, root=0):
        return obj

    def barrier(self):
        pass

    def split(self, color, key):
        return SingleProcess(self._traffic)


class MPIComm(Comm):
    """MPI through mpi4py on NumPy arrays (host memory)."""

    name = "mpi"

    def __init__(self, mpi_comm, *, deterministic=True, traffic=None):
        super().__init__(traffic)
        self.comm = mpi_comm
        self.rank, self.size = mpi_comm.Get_rank(), mpi_comm.Get_size()
        self.deterministic = deterministic

    def _check(self, a):
        if not isinstance(a, numpy.ndarray):
            raise TypeError(f"the MPI communicator moves NumPy arrays, found {type(a).__name__} "
                            "(use the nccl dist backend for CuPy arrays)")
        return numpy.ascontiguousarray(a)

    def sum(self, a):
        a = self._check(a)
        P = self.size
        if P == 1:
            return a.copy()
        if not self.deterministic:
            out = numpy.empty_like(a)
            self.comm.Allreduce(a, out)
            self.sent_bytes += 2 * (P - 1) * a.nbytes // P
            return out
        # reduce-scatter by an all-to-all (rank r receives every rank's chunk r), the chunk summed
        # in rank order, then an all-gather of the summed chunks
        n = a.size
        c = -(-n // P)  # elements per chunk
        send = numpy.zeros((P, c), dtype=a.dtype)  # (P, c), zero padding past n
        send.reshape(-1)[:n] = a.reshape(-1)
        recv = numpy.empty_like(send)  # (P, c): row j = rank j's piece of my chunk
        self.comm.Alltoall(send, recv)
        mine = ordered_sum(list(recv))  # (c,)
        full = numpy.empty_like(send)  # (P, c)
        self.comm.Allgather(mine, full)
        self.sent_bytes += 2 * (P - 1) * c * a.itemsize
        return full.reshape(-1)[:n].reshape(a.shape)

    def allgather(self, a):
        a = self._check(a)
        out = numpy.empty((self.size,) + a.shape, dtype=a.dtype)
        self.comm.Allgather(a, out)
        self.sent_bytes += (self.size - 1) * a.nbytes
        return out

    def broadcast(self, a, root=0):
        a = self._check(a).copy()
        self.comm.Bcast(a, root=root)
        if self.rank == root:
            self.sent_bytes += (self.size - 1) * a.nbytes
        return a

    def bcast_obj(self, obj, root=0):
        return self.comm.bcast(obj, root=root)

    def allgather_obj(self, obj):
        return self.comm.allgather(obj)

    def barrier(self):
        self.comm.Barrier()

    def abort(self, code):
        self.comm.Abort(int(code))

    def split(self, color, key):
        return MPIComm(self.comm.Split(int(color), int(key)), deterministic=self.deterministic,
                       traffic=self._traffic)


class NCCLComm(Comm):
    """NCCL on CuPy arrays (device memory), through CuPy's NCCL bindings (cupy.cuda.nccl, on which
    cupyx.distributed is built; its NCCLBackend cannot form the sub-groups an R x S grid needs).

    The NCCL id is drawn on rank 0 and broadcast over the MPI communicator `mpi`, which also
    serves barrier, bcast_obj and split. Each process uses the device of its local rank.
    The deterministic sum all-gathers and adds in rank order on the device ((P-1) n per rank
    received, against 2(P-1)/P n for NCCL's own all-reduce, chosen by deterministic=False).
    Never run in development (no GPU was available); see docs/scale.md.
    """

    name = "nccl"

    def __init__(self, mpi, *, deterministic=True, traffic=None):
        super().__init__(traffic)
        try:
            from minisae.xp import get_xp

            cupy = get_xp("cupy")
            from cupy.cuda import nccl
        except (ImportError, RuntimeError) as e:
            raise DependencyError(f"the nccl dist backend needs CuPy with NCCL ({e}); "
                            "install the gpu extra, or use the mpi backend on NumPy") from None
        self.cupy, self.nccl, self.mpi = cupy, nccl, mpi
        self.rank, self.size, self.deterministic = mpi.rank, mpi.size, deterministic
        local = int(os.environ.get("MPI_LOCALRANKID", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", mpi.rank)))
        cupy.cuda.Device(local % cupy.cuda.runtime.getDeviceCount()).use()
        uid = mpi.bcast_obj(nccl.get_unique_id() if mpi.rank == 0 else None)
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)

    def _dtype(self, a):
        table = {"float32": self.nccl.NCCL_FLOAT32, "float64": self.nccl.NCCL_FLOAT64,
                 "int32": self.nccl.NCCL_INT32, "int64": self.nccl.NCCL_INT64,
                 "uint8": self.nccl.NCCL_UINT8, "float16": self.nccl.NCCL_FLOAT16}
        if a.dtype.name not in table:
            raise TypeError(f"the nccl communicator cannot move {a.dtype} arrays")
        return table[a.dtype.name]

    def _stream(self):
        return self.cupy.cuda.get_current_stream().ptr

    def _host(self, fn, a, *args):
        """NumPy in, NumPy out: the collective runs on a device copy (small scalars, flags)."""
        return fn(self.cupy.asarray(a), *args).get()

    def sum(self, a):
        if isinstance(a, numpy.ndarray):
            return self._host(self.sum, a)
        a = self.cupy.ascontiguousarray(a)
        if self.size == 1:
            return a.copy()
        if not self.deterministic:
            out = self.cupy.empty_like(a)
            self.comm.allReduce(a.data.ptr, out.data.ptr, a.size, self._dtype(a),
                                self.nccl.NCCL_SUM, self._stream())
            self.sent_bytes += 2 * (self.size - 1) * a.nbytes // self.size
            return out
        return ordered_sum(list(self.allgather(a)))

    def allgather(self, a):
        if isinstance(a, numpy.ndarray):
            return self._host(self.allgather, a)
        a = self.cupy.ascontiguousarray(a)
        out = self.cupy.empty((self.size,) + a.shape, dtype=a.dtype)
        self.comm.allGather(a.data.ptr, out.data.ptr, a.size, self._dtype(a), self._stream())
        self.sent_bytes += (self.size - 1) * a.nbytes
        return out

    def broadcast(self, a, root=0):
        if isinstance(a, numpy.ndarray):
            return self._host(self.broadcast, a, root)
        a = self.cupy.ascontiguousarray(a).copy()
        self.comm.bcast(a.data.ptr, a.size, self._dtype(a), root, self._stream())
        return a

    def bcast_obj(self, obj, root=0):
        return self.mpi.bcast_obj(obj, root)

    def allgather_obj(self, obj):
        return self.mpi.allgather_obj(obj)

    def barrier(self):
        self.cupy.cuda.get_current_stream().synchronize()
        self.mpi.barrier()

    def abort(self, code):
        self.mpi.abort(code)

    def split(self, color, key):
        return NCCLComm(self.mpi.split(color, key), deterministic=self.deterministic, traffic=self._traffic)
