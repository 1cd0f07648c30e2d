"""Produce the next items of a sequence in a background thread while the caller works on this one.

    with Prefetcher(lambda step: source.batch(step, 4096), start=0, stop=1000) as batches:
        for step in range(1000):
            x = batches.get(step)        # usually already made while the last step ran

`produce(i)` is called for i = start, start + 1, ..., stop - 1, in that order, in one worker
thread, at most `depth` items ahead of the consumer (plus the one being made). The consumer must
ask for the items in the same order. Because `produce` is called with the index, not "the next
one", the items are the same as in a plain loop: a training run stays deterministic, and a
resumed run (start > 0) sees exactly the items an uninterrupted one would.

Errors: an exception raised by produce(i) is raised again, as the same object (type, message and
the worker's traceback), by get(i), and not before: items before i are delivered normally. On
close() (or leaving the `with` block, including by an exception or KeyboardInterrupt) the worker
stops after the item it is making; it never outlives the process (a daemon thread).

Why a thread is enough: NumPy releases the GIL inside its array loops, BLAS and random number
generators, and file reads release it too, so the worker runs beside the training step's matrix
products. With CuPy the worker still only makes the host array; the caller moves it.
"""

import queue
import threading

_POLL_S = 0.05  # how often a blocked worker checks whether it should stop


class Prefetcher:
    def __init__(self, produce, start, stop, *, depth=1, name="minisae-prefetch"):
        if depth < 1:
            raise ValueError(f"Prefetcher: expected depth >= 1, found {depth}")
        self._produce, self._next = produce, int(start)
        self._stop = int(stop)
        self._queue = queue.Queue(maxsize=int(depth))
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(int(start), int(stop)), name=name,
                                        daemon=True)
        self._thread.start()

    def _work(self, start, stop):
        for i in range(start, stop):
            if self._closing.is_set():
                return
            try:
                item = (i, self._produce(i), None)
            except BaseException as e:  # handed to the consumer, who raises it at get(i)
                item = (i, None, e)
            while not self._closing.is_set():
                try:
                    self._queue.put(item, timeout=_POLL_S)
                    break
                except queue.Full:
                    continue
            if item[2] is not None:
                return

    def get(self, i):
        """Item i (the next one in order); raises what produce(i) raised."""
        if i != self._next or i >= self._stop:
            raise ValueError(f"Prefetcher.get: expected item {self._next} (items in order, below "
                             f"{self._stop}), found a request for {i}")
        while True:
            try:
                got, item, error = self._queue.get(timeout=_POLL_S)
                break
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError(f"Prefetcher: the worker stopped before item {i}") from None
        if got != i:  # cannot happen while the consumer asks in order (checked above)
            raise RuntimeError(f"Prefetcher: the worker delivered item {got} for {i}")
        self._next += 1
        if error is not None:
            try:
                raise error
            finally:
                error = None  # no reference cycle through the traceback
        return item

    def close(self):
        """Stop the worker (after the item it is making) and drop what it had made."""
        self._closing.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
