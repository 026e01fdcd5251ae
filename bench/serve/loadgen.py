"""A closed-loop HTTP/1.1 load generator: N keep-alive connections, each sending the same pre-encoded
request as soon as the previous answer arrives. It is deliberately minimal (no HTTP library, the
request bytes built once) so that the client costs every contender the same, and as little as possible.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Result:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    latencies: np.ndarray  # seconds, successful requests only

    @property
    def rps(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if len(self.latencies) else float("nan")


def build_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = None
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    elif length:
        await reader.readexactly(length)
    return status


async def _worker(host, port, request, deadline, max_requests, counter, latencies, errors):
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < deadline and counter[0] < max_requests:
            counter[0] += 1
            start = time.perf_counter()
            try:
                writer.write(request)
                status = await _read_response(reader)
            except (ConnectionError, asyncio.IncompleteReadError) as error:  # the server closed: reconnect
                errors.append(type(error).__name__)
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            if status == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors.append(status)
    finally:
        writer.close()


async def run(
    host: str, port: int, request: bytes, *, concurrency: int, seconds: float, max_requests: int, warmup: int = 20
) -> Result:
    """Warms up, then runs `concurrency` closed loops for `seconds` or `max_requests`, whichever ends first."""
    if warmup:
        await _run_loops(host, port, request, 1, time.perf_counter() + 10, warmup)
    started = time.perf_counter()
    latencies, errors = await _run_loops(host, port, request, concurrency, started + seconds, max_requests)
    elapsed = time.perf_counter() - started
    return Result(concurrency, len(latencies) + len(errors), len(errors), elapsed, np.array(latencies))


async def _run_loops(host, port, request, concurrency, deadline, max_requests):
    counter, latencies, errors = [0], [], []
    await asyncio.gather(
        *(_worker(host, port, request, deadline, max_requests, counter, latencies, errors) for _ in range(concurrency))
    )
    return latencies, errors
