"""Dynamic batching: requests that arrive together run as one backend call, on one of the model's instances.

Whenever an instance is free, the gatherer takes the oldest request, adds the queued requests that can share
its batch (same shapes past the batch dimension), and, when the server is under concurrent load, waits up to
the batch window for more. Under a single stream of requests it never waits, so a lone client pays no window.
A batch runs only at one of the model's allowed batch sizes, so that the backend sees a bounded set of shapes
(a GPU backend tunes itself per shape, and warm-up has run each one): a batch between two sizes gives its
last requests back to the queue when the smaller size is nearer, else it is padded up to the larger size
with copies of its last row, and the padding is cut off the outputs.
Batches run in worker threads, one per instance (the backends release the GIL), so that the event loop keeps
decoding requests meanwhile. Handing a batch to a thread costs two thread wake-ups (tens of µs, far more on a
busy node), so a batch runs on the event loop itself when the model's recent batches ran faster than the
hand-off, or, for models of a few milliseconds, when nothing else is waiting or running.
The queue is bounded: a full queue refuses at once instead of growing.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from edgeloop_runtime.errors import ServingError, Unavailable
from edgeloop_runtime.metrics import Metrics
from edgeloop_runtime.model import Model

# Recent backend time per batch under which a batch runs on the event loop: always, or when no other
# request waits. The second bound caps how long health probes and metrics scrapes can be kept waiting.
INLINE_BELOW_S = 0.0003
INLINE_IDLE_BELOW_S = 0.025


@dataclass(eq=False)
class Pending:
    feeds: dict[str, np.ndarray]
    size: int  # samples along the batch dimension
    future: asyncio.Future
    enqueued_ns: int = field(default_factory=time.perf_counter_ns)

    @property
    def key(self) -> tuple:
        """Requests batch together only when every input matches past the batch dimension."""
        return tuple((name, array.shape[1:], array.dtype) for name, array in self.feeds.items())


def split(outputs: dict[str, np.ndarray], sizes: list[int]) -> list[dict[str, np.ndarray]]:
    """Cuts a batch's outputs back into one result per request, along the first dimension."""
    total = sum(sizes)
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise ServingError(f"output '{name}' has shape {list(array.shape)}: no batch dimension of {total}")
    bounds = np.cumsum(sizes)[:-1]
    parts = {name: np.split(array, bounds) for name, array in outputs.items()}
    return [{name: parts[name][i] for name in outputs} for i in range(len(sizes))]


def trim_or_pad(sizes: list[int], allowed: tuple[int, ...]) -> tuple[int, int]:
    """For a batch of requests of `sizes` (in queue order): how many of them run now, and the batch size they
    run at. The nearer allowed size wins: the smaller one when the first requests add up to it exactly (the
    others go back to the queue), else the larger one, padded."""
    total = sum(sizes)
    if not allowed or total in allowed:
        return len(sizes), total
    larger = next(size for size in allowed if size > total)
    smaller = max((size for size in allowed if size < total), default=0)
    if total - smaller <= larger - total:
        prefix = 0
        for count, size in enumerate(sizes, start=1):
            prefix += size
            if prefix == smaller:
                return count, smaller
    return len(sizes), larger


class Batcher:
    def __init__(self, model: Model, metrics: Metrics, *, max_queue: int, window_us: int) -> None:
        self.model = model
        self.metrics = metrics
        self.max_queue = max_queue
        self.window = window_us / 1e6
        self.queue: deque[Pending] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=model.instances, thread_name_prefix="instance")
        self._concurrent = False  # whether the last batch held more than one request
        self._recent_run_s: float | None = None  # moving average of backend time per batch
        self._worker: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        for task in (self._worker, *self._running):
            if task:
                task.cancel()
        await asyncio.gather(*(t for t in (self._worker, *self._running) if t), return_exceptions=True)
        self._executor.shutdown(wait=True)

    def submit(self, feeds: dict[str, np.ndarray], size: int) -> asyncio.Future:
        """A future for (outputs, (ns queued, the batch's input, infer and output ns)); raises Unavailable when the
        queue is full."""
        if len(self.queue) >= self.max_queue:
            raise Unavailable(f"the request queue is full ({self.max_queue} waiting); retry later")
        future = asyncio.get_running_loop().create_future()
        self.queue.append(Pending(feeds, size, future))
        self._arrived.set()
        return future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        free = asyncio.Semaphore(self.model.instances)
        while True:
            await free.acquire()  # requests gather into bigger batches while every instance is busy
            while not self.queue:
                self._arrived.clear()
                await self._arrived.wait()
            batch = await self._gather(loop)
            self._concurrent = len(batch) > 1
            recent = self._recent_run_s if self._recent_run_s is not None else float("inf")
            # A batch of a few ms runs inline only when nothing else waits or runs: with other instances busy,
            # it would hold their responses and the decoding of new requests.
            idle = not self.queue and not self._running
            if recent < INLINE_BELOW_S or (recent < INLINE_IDLE_BELOW_S and idle):
                self._finish(batch, *self._attempt(batch))
                free.release()
                await asyncio.sleep(0)  # let this batch's responses go out before the next batch runs
                continue
            task = loop.create_task(self._execute(loop, batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
            task.add_done_callback(lambda _: free.release())

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> list[Pending]:
        first = self.queue.popleft()
        batch, size = [first], first.size
        limit = self.model.max_batch_size
        if not limit:
            return batch
        size = self._take_matching(batch, size, limit)
        if size < limit and self.window > 0 and self._concurrent:
            deadline = loop.time() + self.window
            while size < limit and (remaining := deadline - loop.time()) > 0:
                self._arrived.clear()
                timer = loop.call_later(remaining, self._arrived.set)
                await self._arrived.wait()
                timer.cancel()
                size = self._take_matching(batch, size, limit)
        count, _ = trim_or_pad([item.size for item in batch], self.model.batch_sizes)
        self.queue.extendleft(reversed(batch[count:]))
        return batch[:count]

    def _take_matching(self, batch: list[Pending], size: int, limit: int) -> int:
        """Moves queued requests that fit into the batch, keeping the others in order."""
        key = batch[0].key
        kept: list[Pending] = []
        while self.queue and size < limit:
            item = self.queue.popleft()
            if item.size + size <= limit and item.key == key:
                batch.append(item)
                size += item.size
            else:
                kept.append(item)
        self.queue.extendleft(reversed(kept))
        return size

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[Pending]) -> None:
        self._finish(batch, *await loop.run_in_executor(self._executor, self._attempt, batch))

    def _attempt(self, batch: list[Pending]) -> tuple:
        """(results, timings, started, None) or (None, None, started, the error)."""
        started = time.perf_counter_ns()
        try:
            return (*self._infer(batch), started, None)
        except Exception as error:  # the model failed: every request of the batch gets the error
            return None, None, started, error

    def _finish(self, batch: list[Pending], results, timings, started: int, error: Exception | None) -> None:
        if error is not None:
            failure = error if isinstance(error, ServingError) else ServingError(f"inference failed: {error}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(failure)
            return
        run_s = timings[1] / 1e9
        self._recent_run_s = run_s if self._recent_run_s is None else 0.8 * self._recent_run_s + 0.2 * run_s
        self.metrics.batch_done(sum(item.size for item in batch), *timings)
        for item, result in zip(batch, results, strict=True):
            if not item.future.done():  # a gRPC call whose client went away is cancelled
                item.future.set_result((result, (started - item.enqueued_ns, *timings)))

    def _infer(self, batch: list[Pending]) -> tuple[list[dict[str, np.ndarray]], tuple[int, int, int]]:
        """Runs in an instance's thread, or inline for a fast model."""
        t0 = time.perf_counter_ns()
        sizes = [item.size for item in batch]
        total = sum(sizes)
        padding = self.model.batch_size_for(total) - total if self.model.batch_sizes else 0
        if len(batch) == 1 and not padding:
            feeds = batch[0].feeds
        else:
            feeds = {}
            for name in batch[0].feeds:
                parts = [item.feeds[name] for item in batch]
                if padding:
                    parts.append(np.repeat(parts[-1][-1:], padding, axis=0))
                feeds[name] = np.concatenate(parts) if len(parts) > 1 else parts[0]
        t1 = time.perf_counter_ns()
        outputs = self.model.run(feeds)
        t2 = time.perf_counter_ns()
        if padding:
            outputs = unpad(outputs, total + padding, total)
        results = [outputs] if len(batch) == 1 else split(outputs, sizes)
        t3 = time.perf_counter_ns()
        return results, (t1 - t0, t2 - t1, t3 - t2)

    def depth(self) -> int:
        return len(self.queue)


def unpad(outputs: dict[str, np.ndarray], padded: int, total: int) -> dict[str, np.ndarray]:
    """The outputs of a padded batch without the padding rows."""
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != padded:
            raise ServingError(f"output '{name}' has shape {list(array.shape)}: no batch dimension of {padded}")
    return {name: array[:total] for name, array in outputs.items()}
