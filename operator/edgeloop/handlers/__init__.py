"""Kopf handlers: one module per custom resource, what they share (shared), the one startup (operator), and
the runner that serialises and coalesces the syncs of each object."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

log = logging.getLogger(__name__)


class KeyedRunner(Generic[K]):
    """Runs `work(key)` for one key at a time.

    `request(key)` schedules a run shortly; requests arriving before it starts fold into it, so a burst
    of watch events (a DaemonSet's status changing as each pod becomes ready) costs one run. A failed
    requested run is retried with backoff. `run(key)` runs at once and lets errors reach the caller.
    """

    def __init__(
        self,
        work: Callable[[K], Awaitable[None]],
        *,
        delay: float,
        retry_delays: Sequence[float] = (1, 2, 5, 10, 30, 60),
    ):
        self._work = work
        self._delay = delay
        self._retry_delays = retry_delays
        self._locks: dict[K, asyncio.Lock] = {}
        # Each scheduled run: when it starts (the event loop's clock) and the task asleep until then.
        self._scheduled: dict[K, tuple[float, asyncio.Task[None]]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._failures: Counter[K] = Counter()

    def lock(self, key: K) -> asyncio.Lock:
        """Held by every run for `key`; hold it to work on the key outside `run`."""
        return self._locks.setdefault(key, asyncio.Lock())

    async def run(self, key: K) -> None:
        async with self.lock(key):
            await self._work(key)

    def request(self, key: K, delay: float | None = None) -> None:
        """Runs `work(key)` after `delay` (default: the coalescing delay), or sooner if already scheduled so."""
        delay = self._delay if delay is None else delay
        due = asyncio.get_running_loop().time() + delay
        if (scheduled := self._scheduled.get(key)) is not None:
            scheduled_due, task = scheduled
            if scheduled_due <= due:
                return
            task.cancel()  # still asleep: a scheduled task leaves _scheduled when it wakes
        self._scheduled[key] = (due, asyncio.create_task(self._run_later(key, delay)))

    async def _run_later(self, key: K, delay: float) -> None:
        await asyncio.sleep(delay)
        # A request from now on needs another run, after this one. The event loop keeps only weak
        # references to tasks, so this one stays referenced until it is done.
        self._running.add(self._scheduled.pop(key)[1])
        try:
            await self.run(key)
        except Exception:
            self._failures[key] += 1
            retry = self._retry_delays[min(self._failures[key], len(self._retry_delays)) - 1]
            log.exception("sync of %s failed (%d in a row); retrying in %s s", key, self._failures[key], retry)
            self.request(key, retry)
        else:
            self._failures.pop(key, None)
        finally:
            self._running.discard(asyncio.current_task())

    def forget(self, key: K) -> None:
        """Drops what is kept for a key whose object is gone."""
        self._locks.pop(key, None)
        self._failures.pop(key, None)

    async def close(self) -> None:
        tasks = [*(task for _, task in self._scheduled.values()), *self._running]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._scheduled.clear()
