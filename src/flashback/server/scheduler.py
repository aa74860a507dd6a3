"""The model thread(s): which generation's step runs next.

The lowest priority runs next: for generations, the token positions they have computed so far, so a request
whose steps are expensive (prepend, large k, stride 1) cannot starve a cheap one. A new short generation starts up
to one chunk of work below the clock, so it runs ahead of the steps already queued instead of between them.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Protocol

from flashback.server.protocol import ShuttingDown, Step

SHORT_CREDITS = 2  # a generation planned to compute at most this many credits of work is short: it may start early


class Steps(Protocol):
    """What the scheduler runs again and again: a generation, one step at a time (generation.py)."""

    priority: float

    def step(self) -> Step: ...


class Scheduler:
    """The model thread(s). The lowest priority runs next: for generations, the tokens they have computed.

    A generation's next step is queued by the thread that ran its previous step, as soon as that step is done,
    so which generation runs next never depends on how fast the event loop picks up results, and no generation
    ever has two steps running. `workers` > 1 is for engines whose work waits on another process (upstream).
    """

    def __init__(self, workers: int = 1, credit: float = 0.0) -> None:
        self._heap: list = []
        self._order = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self.clock = 0.0  # the virtual time: where the work that runs now stands
        self.credit = credit  # how far below the clock a new generation may start
        self.floor = -float("inf")  # where the work done on credit stands
        self._threads = [
            threading.Thread(target=self._run, name=f"flashback-model-{i}", daemon=True) for i in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def arrival(self) -> float:
        """The priority a new generation starts at: up to `credit` below the clock, ahead of the queued steps.

        The credit is shared, not given to each: a new generation starts where the work done on credit stands, so
        generations arriving back to back use the credit once, then share the model with the queued ones by work.
        """
        return min(self.clock, max(self.clock - self.credit, self.floor))

    def place(self, arrival: float, work: int) -> float:
        """Where a generation that arrived at `arrival` (see `arrival`) and plans `work` token positions starts.

        A short one (at most SHORT_CREDITS credits of work) keeps its place ahead of the queue. A long one starts a
        credit behind the clock instead, so the generation running when it arrived ends first.
        """
        return arrival if work <= SHORT_CREDITS * self.credit else max(arrival, self.clock + self.credit)

    def submit(self, priority: float, job: Callable[[], object]) -> asyncio.Future:
        """Run `job` once; its result (or exception) lands in the returned future."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._push(priority, _Once(job, loop, future))
        return future

    def stream(self, gen: Steps) -> StepStream:
        """Run `gen.step` again and again, by `gen.priority`, until a step finishes it or it is cancelled."""
        handle = StepStream(gen, asyncio.get_running_loop())
        self._push(gen.priority, handle)
        return handle

    def _push(self, priority: float, item) -> None:
        with self._cv:
            if self._closed:
                raise ShuttingDown()
            heapq.heappush(self._heap, (priority, next(self._order), item))
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                priority, _, item = heapq.heappop(self._heap)
                if item.cancelled:
                    continue
                self.clock = max(self.clock, priority)
            again = item.run()
            with self._cv:
                if priority < self.clock:  # it ran on credit: the next new generation starts where it stands
                    self.floor = max(self.floor, priority if again is None else again)
                if again is not None and not self._closed:
                    heapq.heappush(self._heap, (again, next(self._order), item))

    def join(self, timeout: float) -> None:
        """Wait for the model threads to finish the step they run (after close)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        with self._cv:
            self._closed = True
            pending, self._heap = self._heap, []
            self._cv.notify_all()
        for _, _, item in pending:
            item.fail(ShuttingDown())


class _Once:
    def __init__(self, job: Callable[[], object], loop: asyncio.AbstractEventLoop, future: asyncio.Future):
        self.job, self.loop, self.future = job, loop, future

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()

    def run(self) -> None:
        try:
            result, error = self.job(), None
        except BaseException as exc:  # handed to the waiting request, which decides
            result, error = None, exc
        _call_soon(self.loop, _settle, self.future, result, error)

    def fail(self, error: BaseException) -> None:
        _call_soon(self.loop, _settle, self.future, None, error)


class StepStream:
    """A generation's steps as they come off the model thread, in an asyncio queue."""

    def __init__(self, gen: Steps, loop: asyncio.AbstractEventLoop):
        self.gen, self.loop = gen, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancelled = False

    def run(self) -> float | None:
        """One step on the model thread; the priority to run again at, or None when done."""
        try:
            step = self.gen.step()
        except BaseException as exc:
            self.fail(exc)
            return None
        _call_soon(self.loop, self.queue.put_nowait, step)
        return None if step.finish or self.cancelled else self.gen.priority

    def fail(self, error: BaseException) -> None:
        _call_soon(self.loop, self.queue.put_nowait, error)

    def cancel(self) -> None:
        self.cancelled = True

    async def next(self) -> Step:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


def _call_soon(loop: asyncio.AbstractEventLoop, callback, *args) -> None:
    """Hand a result to the event loop; a loop that has closed (the server stopped) has nobody left to tell."""
    with suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


def ignore_result(future: asyncio.Future) -> None:
    """A done-callback for a future nobody awaits: its exception counts as retrieved."""
    if not future.cancelled():
        future.exception()  # no "never retrieved" warning at shutdown


def _settle(future: asyncio.Future, result, error) -> None:
    if not future.done():
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def release_memory() -> None:
    """Return memory freed by finished requests to the OS (the service queues it on a model thread when the last
    request ends). glibc keeps freed memory for reuse, so without this a server's RSS stays at the peak of its
    largest prefill long after the request ended. The collection comes first: measured after the adversarial load,
    trimming alone returned nothing and both returned the prefills' peak."""
    gc.collect()
    with suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)
