"""The operator's client of a FederatedRound aggregator: one GET of its status report (FEDERATED.md).

With TLS (the default) the aggregator requires a client certificate (mTLS): the operator presents the
round's, trusts the namespace's CA, and verifies the certificate for the aggregator Service's name
wherever the URL points (an operator outside the cluster reaches the Service through another address).
Whatever goes wrong, the caller sees one error, AggregatorUnreachable, whose message says what. The
aggregator runs an image of the namespace's choosing, so the read is bounded in bytes and in time.

Blocking; the handler calls it through `asyncio.to_thread`.
"""

from __future__ import annotations

import functools
import http.client
import os
import ssl
import tempfile
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from edgeloop.status.federatedround import AggregatorReport, parse_report

# The aggregator runs an image the round's namespace chooses: what the operator reads of it is bounded.
MAX_REPORT_BYTES = 1 << 20  # a report with a thousand rounds of history is about 200 KiB
TIMEOUT_SECONDS = 5.0  # the whole read, from connecting to the last byte


class AggregatorUnreachable(Exception):
    """No status report could be read from the aggregator: the message says why."""


@dataclass(frozen=True)
class ClientTLS:
    """mTLS for a status read: the namespace CA, the client certificate, and the name the aggregator's
    server certificate must carry (its Service's, wherever the URL points)."""

    ca: str
    cert: str
    key: str
    server_name: str


def read_report(
    url: str, tls: ClientTLS | None = None, *, max_bytes: int = MAX_REPORT_BYTES, timeout: float = TIMEOUT_SECONDS
) -> AggregatorReport:
    """The aggregator's report at `url`, read within `max_bytes` and `timeout`; raises AggregatorUnreachable."""
    try:
        return parse_report(_read(url, tls, max_bytes, time.monotonic() + timeout))
    except (OSError, http.client.HTTPException, ValueError) as error:  # ssl.SSLError is an OSError
        raise AggregatorUnreachable(f"GET {url}: {error}") from error


def _read(url: str, tls: ClientTLS | None, max_bytes: int, deadline: float) -> str:
    parts = urlsplit(url)
    timeout = max(deadline - time.monotonic(), 0.001)
    if tls is None:
        if parts.scheme != "http":
            raise ValueError(f"{parts.scheme}:// needs the round's client certificate")
        connection: http.client.HTTPConnection = http.client.HTTPConnection(
            parts.hostname or "", parts.port or 80, timeout=timeout
        )
    else:
        context = _client_context(tls.ca, tls.cert, tls.key)
        connection = _ServerNameHTTPS(parts.hostname or "", parts.port or 443, tls.server_name, context, timeout)
    try:
        connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        response = connection.getresponse()
        body = _bounded(response, max_bytes, deadline).decode(errors="replace")
        if response.status != 200:
            raise http.client.HTTPException(f"HTTP {response.status}: {body[:200]}")
        return body
    finally:
        connection.close()


def _bounded(response: http.client.HTTPResponse, max_bytes: int, deadline: float) -> bytes:
    chunks, size = [], 0
    while chunk := response.read1(16 << 10):
        size += len(chunk)
        if size > max_bytes:
            raise ValueError(f"the answer is larger than {max_bytes} bytes")
        if time.monotonic() > deadline:
            raise TimeoutError("the answer took longer than its deadline")
        chunks.append(chunk)
    return b"".join(chunks)


class _ServerNameHTTPS(http.client.HTTPSConnection):
    """HTTPS to host:port, verifying the certificate for `server_name` rather than for the host."""

    def __init__(self, host: str, port: int, server_name: str, context: ssl.SSLContext, timeout: float):
        super().__init__(host, port, timeout=timeout, context=context)
        self._server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_name)  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=64)
def _client_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca)
    with tempfile.TemporaryDirectory() as directory:  # load_cert_chain reads files only
        path = os.path.join(directory, "client.pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as file:
            file.write(cert + key)
        context.load_cert_chain(path)
    return context
