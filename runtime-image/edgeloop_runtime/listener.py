"""A listening socket and its connections, for both protocols: the connection cap, TLS, the timeouts' sweep,
and what a connection does when its client reads slower than it is answered.

A connection is `waiting` while it waits for a request (its TLS handshake, idle, or still sending its request's
head): at the cap, a new connection closes the one that has waited longest, or is refused when no connection is
waiting. Connections count from the moment they are accepted: TLS is set up by each connection (`secure`), so
that a flood of handshakes that never finish meets the cap, not the open-files limit. Every so often each
connection is asked to `expire` whatever has taken too long.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Protocol

from edgeloop_runtime.limits import Limits, MemoryBudget


class Connection(Protocol):
    transport: asyncio.Transport | None

    def expire(self, now: float) -> None: ...

    def evict(self) -> None: ...


class Listener:
    def __init__(self, limits: Limits, factory: Callable[[Listener], asyncio.Protocol]) -> None:
        self.limits = limits
        self.factory = factory
        self.tls: ssl.SSLContext | None = None
        self.connections: set[Connection] = set()
        self.waiting: dict[Connection, None] = {}  # insertion order: the longest-waiting first
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task | None = None

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        self.tls = tls
        self._server = await loop.create_server(lambda: self.factory(self), host, port, backlog=1024)
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

    def secure(self, connection: asyncio.Protocol, transport: asyncio.Transport, ready: Callable) -> None:
        """Sets TLS up on a connection just admitted (called from its `connection_made`), within --header-timeout;
        then `ready(tls_transport)`. A handshake that fails, or is evicted, closes the connection (its
        `connection_lost` follows). This is `loop.start_tls` done at once: reading starts when `connection_made`
        returns, and no byte may reach the connection in clear before TLS has the transport."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        tls = _ssl_protocol(loop)(
            loop, connection, self.tls, waiter, server_side=True, call_connection_made=False,
            ssl_handshake_timeout=self.limits.header_timeout,
        )  # fmt: skip
        transport.set_protocol(tls)
        tls.connection_made(transport)
        secured = tls._get_app_transport()

        def handshaken(waiter: asyncio.Future) -> None:
            if waiter.cancelled() or waiter.exception() is not None:
                transport.abort()
            else:
                ready(secured)

        waiter.add_done_callback(handshaken)

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


def _ssl_protocol(loop: asyncio.AbstractEventLoop) -> type:
    """The event loop's own TLS protocol (what its start_tls and create_server use)."""
    import uvloop

    if isinstance(loop, uvloop.Loop):
        return uvloop.loop.SSLProtocol
    return asyncio.sslproto.SSLProtocol


class Backpressure:
    """For a connection whose client reads slower than it is answered (the transport's buffer went above its
    high-water mark, asyncio's `pause_writing`): it reads nothing more from that client until the buffer drains
    (`reading_blocked`, `reading_unblocked`), what waits to be sent counts against the memory budget, and a
    client that takes none of it for --idle-timeout is cut off (`send_stalled`)."""

    transport: asyncio.Transport | None
    budget: MemoryBudget
    write_paused = False
    unsent = 0  # bytes waiting in the transport, held in the budget
    sent_since = 0.0  # when the client last took some of them

    def reading_blocked(self) -> None:
        raise NotImplementedError

    def reading_unblocked(self) -> None:
        raise NotImplementedError

    def pause_writing(self) -> None:
        self.write_paused = True
        self.sent_since = time.monotonic()
        self.hold_unsent()
        self.reading_blocked()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.release_unsent()
        self.reading_unblocked()

    def hold_unsent(self) -> None:
        """Holds in the budget what the transport holds now."""
        size = self.transport.get_write_buffer_size() if self.transport is not None else 0
        self.budget.hold(size - self.unsent)
        self.unsent = size

    def release_unsent(self) -> None:
        self.budget.release(self.unsent)
        self.unsent = 0

    def send_stalled(self, now: float, timeout: float) -> bool:
        """Whether the client has taken nothing of what waits for it for `timeout` seconds."""
        if not self.write_paused or self.transport is None:
            return False
        if self.transport.get_write_buffer_size() < self.unsent:
            self.sent_since = now
        self.hold_unsent()
        return now - self.sent_since > timeout
