"""Writing outputs off the main thread, in order.

Drawing a film's overlay and encoding it as PNG (with its heatmap, JSON and DICOM outputs)
costs about as much as the film network; OpenCV and the file system release the GIL meanwhile,
so a small thread pool writes one batch's films while the main thread runs the next batch.
:class:`OrderedWriter` hands the results back in the order the films were queued, so the
tables list them as a run without it would, and holds at most ``max_pending`` unfinished jobs
(each keeps its overlay's pixels in memory).
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

# a core is left to the networks: one thread writes faster than a CPU runs the networks for a film,
# and each thread's memory arena holds on to what it freed
WRITER_THREADS = max(1, min(4, (os.cpu_count() or 2) - 1))
MAX_PENDING = 8  # a batch's films: more only holds more overlays in memory


class OrderedWriter:
    """Jobs run on ``threads`` background threads; :meth:`done` returns the finished ones in the
    order they were queued: ``(key, result, None)`` or ``(key, None, exception)``. A value that
    needs no job (:meth:`put`) keeps its place in that order."""

    def __init__(self, threads: int = WRITER_THREADS, max_pending: int = MAX_PENDING):
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="outputs")
        self._queue: deque[tuple[Any, Future | None, Any]] = deque()
        self._running = 0
        self.max_pending = max_pending

    def submit(self, key, job: Callable, *args, **kwargs) -> list[tuple]:
        """Queue ``job(*args, **kwargs)``; returns what finished meanwhile (waiting for the oldest
        jobs while more than ``max_pending`` are unfinished)."""
        self._queue.append((key, self._pool.submit(job, *args, **kwargs), None))
        self._running += 1
        finished = self.done()
        while self._running > self.max_pending:
            finished += self._pop_oldest()
        return finished

    def put(self, key, value) -> None:
        """Queue a value that is known already (it comes out after the jobs queued before it)."""
        self._queue.append((key, None, value))

    def done(self, wait: bool = False) -> list[tuple]:
        """The finished entries at the front of the queue; with ``wait``, every entry."""
        out = []
        while self._queue and (wait or self._queue[0][1] is None or self._queue[0][1].done()):
            out += self._pop_oldest()
        return out

    def _pop_oldest(self) -> list[tuple]:
        key, future, value = self._queue.popleft()
        if future is None:
            return [(key, value, None)]
        self._running -= 1
        try:
            return [(key, future.result(), None)]
        except Exception as exc:  # the job's failure is its result
            return [(key, None, exc)]

    def close(self) -> list[tuple]:
        """Wait for every job; returns the entries not yet handed back."""
        try:
            return self.done(wait=True)
        finally:
            self._pool.shutdown(wait=True)


class InlineWriter:
    """:class:`OrderedWriter`'s interface, each job run at once on the calling thread (its
    exception raised there)."""

    def __init__(self):
        self._done: list[tuple] = []

    def submit(self, key, job: Callable, *args, **kwargs) -> list[tuple]:
        self._done.append((key, job(*args, **kwargs), None))
        return []

    def put(self, key, value) -> None:
        self._done.append((key, value, None))

    def done(self, wait: bool = False) -> list[tuple]:
        out, self._done = self._done, []
        return out

    def close(self) -> list[tuple]:
        return self.done()
