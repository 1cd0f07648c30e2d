"""Sums in one fixed order, checked with three parts, where the order of float additions shows:
with two, (a + b) and (b + a) are the same bits, so a sum taken in reverse would pass.

- dist.ordered_sum adds ((p0 + p1) + p2), and the MPI communicator's deterministic sum adds the
  ranks' pieces in rank order (a fake 3-rank MPI communicator, in this process);
- training on 3 ranks ends bitwise equal to one process accumulating the same 3 micro-batches
  in order (`minisae train --accumulate 3` against `mpiexec -n 3 minisae train`).
"""

import subprocess
import sys
from pathlib import Path

import numpy
import pytest
from helpers import mpiexec_or_skip

from minisae.dist import comm as dist_comm
from minisae.dist import ordered_sum

ROOT = Path(__file__).resolve().parent.parent

# three float32 values whose sum depends on the order: (a + b) + c != a + (b + c) != (c + b) + a
A, B, C = numpy.float32(1.0), numpy.float32(1e8), numpy.float32(-1e8)
PARTS = [numpy.array([A, B, A], numpy.float32), numpy.array([B, C, C], numpy.float32),
         numpy.array([C, A, B], numpy.float32)]  # each column sums differently left to right and right to left


def test_three_values_whose_sum_depends_on_the_order():
    assert (A + B) + C != A + (B + C)
    assert (A + B) + C != (C + B) + A


def test_ordered_sum_adds_three_parts_left_to_right():
    got = ordered_sum([p.copy() for p in PARTS])
    want = numpy.array([(p0 + p1) + p2 for p0, p1, p2 in zip(*PARTS)], numpy.float32)
    assert got.tobytes() == want.tobytes()
    assert got.tobytes() != ordered_sum([p.copy() for p in PARTS[::-1]]).tobytes()


class FakeMPI:
    """Rank `rank` of 3 whose peers hold PARTS[j]: Alltoall delivers their pieces of this rank's
    chunk; Allgather hands back this rank's summed chunk in every slot."""

    def __init__(self, rank, arrays):
        self.rank, self.arrays = rank, arrays

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return len(self.arrays)

    def Alltoall(self, send, recv):
        P, c = send.shape
        for j, a in enumerate(self.arrays):  # what rank j sends: its array cut into P chunks
            chunks = numpy.zeros((P, c), a.dtype)
            chunks.reshape(-1)[:a.size] = a.reshape(-1)
            recv[j] = chunks[self.rank]

    def Allgather(self, mine, full):
        full[:] = mine


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_mpi_sum_adds_the_ranks_in_rank_order(rank):
    comm = dist_comm.MPIComm(FakeMPI(rank, PARTS), deterministic=True)
    got = comm.sum(PARTS[rank])
    want = (PARTS[0][rank] + PARTS[1][rank]) + PARTS[2][rank]  # chunk `rank` is element `rank`
    assert got[rank].tobytes() == want.tobytes()
    reverse = (PARTS[2][rank] + PARTS[1][rank]) + PARTS[0][rank]
    assert got[rank].tobytes() != reverse.tobytes()


def test_three_ranks_equal_one_process_accumulating_three_micro_batches(tmp_path):
    exe, env = mpiexec_or_skip()
    train = ["-m", "minisae.cli", "train", "--arch", "topk", "--k", "4", "--d-sae", "48", "--steps", "3",
             "--batch-size", "96", "--d-in", "16", "--eval-tokens", "0", "--no-progress", "--lr", "0.01"]
    one = subprocess.run([sys.executable] + train + ["--accumulate", "3", "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    three = subprocess.run([exe, "-n", "3", sys.executable, "-m", "mpi4py"] + train
                           + ["--out", str(tmp_path / "three")], env=env, capture_output=True, text=True, timeout=300)
    assert three.returncode == 0, three.stdout[-2000:] + three.stderr[-2000:]
    weights = [(tmp_path / run / "sae" / "sae_weights.safetensors").read_bytes() for run in ("one", "three")]
    assert weights[0] == weights[1]
