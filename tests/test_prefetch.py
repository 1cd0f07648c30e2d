"""minisae.training.prefetch: items in order and equal to a plain loop, the producer's errors raised at
the consumer with their type and message, and the worker stopped on close (also mid-run)."""

import threading
import time

import numpy
import pytest

from minisae.training.prefetch import Prefetcher


def test_items_are_those_of_a_plain_loop_in_order():
    made = []

    def produce(i):
        made.append(i)
        return numpy.full(3, i)

    with Prefetcher(produce, 5, 12, depth=2) as p:
        got = [p.get(i) for i in range(5, 12)]
    assert [int(g[0]) for g in got] == list(range(5, 12)) and made == list(range(5, 12))
    with Prefetcher(produce, 0, 3) as p, pytest.raises(ValueError, match="expected item 0"):
        p.get(1)  # out of order


class Boom(Exception):
    pass


def test_producer_error_surfaces_at_its_item_with_its_message():
    def produce(i):
        if i == 3:
            raise Boom(f"bad item {i}")
        return i

    with Prefetcher(produce, 0, 10) as p:
        assert [p.get(i) for i in range(3)] == [0, 1, 2]  # items before the error arrive
        with pytest.raises(Boom, match="bad item 3"):
            p.get(3)
    with Prefetcher(lambda i: 1 // 0, 0, 2) as p, pytest.raises(ZeroDivisionError):
        p.get(0)


def test_close_stops_the_worker_mid_run():
    started = threading.Event()

    def produce(i):
        started.set()
        time.sleep(0.01)
        return i

    p = Prefetcher(produce, 0, 10**9)
    started.wait(5)
    try:
        raise KeyboardInterrupt  # what a Ctrl-C in the training step looks like
    except KeyboardInterrupt:
        p.close()
    assert not p._thread.is_alive()
