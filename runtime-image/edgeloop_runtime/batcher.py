"""Dynamic batching: requests that arrive together run as one ONNX Runtime call.

One worker takes the oldest request, adds the queued requests that can share its batch (same shapes
past the batch dimension), and, when the server is under concurrent load, waits up to the batch
window for more. Under a single stream of requests it never waits, so a lone client pays no window.
While other requests wait, ONNX Runtime runs in one worker thread, which releases the GIL, so that
the event loop keeps decoding them meanwhile. Handing a batch to that thread costs two thread
wake-ups (tens of µs, far more on a busy node), so a batch runs on the event loop itself when the
model's recent batches ran faster than the hand-off, or, for models of a few milliseconds, when nothing
else is waiting.
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

# Recent ONNX Runtime time per batch under which a batch runs on the event loop: always, or when no other
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


class Batcher:
    def __init__(self, model: Model, metrics: Metrics, *, max_queue: int, window_us: int) -> None:
        self.model = model
        self.metrics = metrics
        self.max_queue = max_queue
        self.window = window_us / 1e6
        self.queue: deque[Pending] = deque()
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
        self._concurrent = False  # whether the last batch held more than one request
        self._recent_run_s: float | None = None  # moving average of ONNX Runtime time per batch
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._worker:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def submit(self, feeds: dict[str, np.ndarray], size: int) -> asyncio.Future:
        """A future for (outputs, nanoseconds queued); raises Unavailable when the queue is full."""
        if len(self.queue) >= self.max_queue:
            raise Unavailable(f"the request queue is full ({self.max_queue} waiting); retry later")
        future = asyncio.get_running_loop().create_future()
        self.queue.append(Pending(feeds, size, future))
        self._arrived.set()
        return future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self._arrived.clear()
                await self._arrived.wait()
            batch = await self._gather(loop)
            self._concurrent = len(batch) > 1
            await self._execute(loop, batch)

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
        return batch

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
        started = time.perf_counter_ns()
        recent = self._recent_run_s if self._recent_run_s is not None else float("inf")
        inline = recent < INLINE_BELOW_S or (recent < INLINE_IDLE_BELOW_S and not self.queue)
        try:
            if inline:
                results, timings = self._infer(batch)
            else:
                results, timings = await loop.run_in_executor(self._executor, self._infer, batch)
        except Exception as error:  # the model failed: every request of the batch gets the error
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
                item.future.set_result((result, started - item.enqueued_ns))
        if inline:
            await asyncio.sleep(0)  # let this batch's responses go out before the next batch runs

    def _infer(self, batch: list[Pending]) -> tuple[list[dict[str, np.ndarray]], tuple[int, int, int]]:
        """Runs in the ONNX Runtime thread, or inline for a fast model."""
        t0 = time.perf_counter_ns()
        if len(batch) == 1:
            feeds = batch[0].feeds
        else:
            feeds = {name: np.concatenate([item.feeds[name] for item in batch]) for name in batch[0].feeds}
        t1 = time.perf_counter_ns()
        outputs = self.model.run(feeds)
        t2 = time.perf_counter_ns()
        results = [outputs] if len(batch) == 1 else split(outputs, [item.size for item in batch])
        t3 = time.perf_counter_ns()
        return results, (t1 - t0, t2 - t1, t3 - t2)

    def depth(self) -> int:
        return len(self.queue)
