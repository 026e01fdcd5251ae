"""A listening socket and its connections, for both protocols: the connection cap and the timeouts' sweep.

A connection is `waiting` while it waits for a request (idle, or still sending its request's head): at the
cap, a new connection closes the one that has waited longest, or is refused when no connection is waiting.
Every so often each connection is asked to `expire` whatever has taken too long.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Protocol

from edgeloop_runtime.limits import Limits


class Connection(Protocol):
    transport: asyncio.Transport | None

    def expire(self, now: float) -> None: ...

    def evict(self) -> None: ...


class Listener:
    def __init__(self, limits: Limits, factory: Callable[[Listener], asyncio.Protocol]) -> None:
        self.limits = limits
        self.factory = factory
        self.connections: set[Connection] = set()
        self.waiting: dict[Connection, None] = {}  # insertion order: the longest-waiting first
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task | None = None

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: self.factory(self),
            host,
            port,
            ssl=tls,
            ssl_handshake_timeout=self.limits.header_timeout if tls else None,
            backlog=1024,
        )
        self._sweeper = loop.create_task(self._sweep())

    def admit(self, connection: Connection) -> bool:
        """Takes a new connection, making room at the cap; False when there is none to make."""
        if len(self.connections) >= self.limits.max_connections:
            if not self.waiting:
                return False
            oldest = next(iter(self.waiting))
            self.forget(oldest)
            oldest.evict()
        self.connections.add(connection)
        self.waiting[connection] = None
        return True

    def forget(self, connection: Connection) -> None:
        self.connections.discard(connection)
        self.waiting.pop(connection, None)

    async def _sweep(self) -> None:
        limits = self.limits
        interval = min(1.0, max(0.05, min(limits.header_timeout, limits.body_timeout, limits.idle_timeout) / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for connection in list(self.connections):
                connection.expire(now)

    def close(self) -> None:
        """Stops listening and closes every connection (after sending what was written to it)."""
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for connection in list(self.connections):
            connection.evict()
