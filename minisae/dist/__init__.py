"""Training past one process: communicators (`comm`: single process, MPI, NCCL), the latent-sharded
SAE step (`sharded`) and the data- and latent-parallel trainer (`parallel`).

The communicator API is this package's front door:

    from minisae import dist
    comm = dist.world()                 # MPI when started by mpiexec, else the single process
"""

from minisae.dist.comm import (
    MPI_ENV,
    Comm,
    DistError,
    MPIComm,
    NCCLComm,
    SingleProcess,
    abort_on_error,
    launched_by_mpiexec,
    ordered_sum,
    world,
)

__all__ = ["MPI_ENV", "Comm", "DistError", "MPIComm", "NCCLComm", "SingleProcess", "abort_on_error",
           "launched_by_mpiexec", "ordered_sum", "world"]
