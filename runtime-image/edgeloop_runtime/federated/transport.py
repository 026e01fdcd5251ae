"""The wire between clients and aggregator: HTTP/1.1 (mTLS when certificates are given), compact bodies.

A request body is a 4-byte big-endian length, a JSON header of that length, then raw bytes (public keys,
ciphertexts, shares, or a little-endian float32/uint32 vector), so that what the byte counts in the
benchmark measure is the data, not an encoding of it.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import time
from urllib.parse import urlsplit

from ..bounded_http import server_context  # noqa: F401 - the aggregator's, like the store's


class RoundGone(Exception):
    """The aggregator moved on (or restarted): the round this client was in no longer exists."""


def pack(header: dict, payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return len(head).to_bytes(4, "big") + head + payload


MAX_HEADER_BYTES = 64 << 10


def unpack(body: bytes) -> tuple[dict, bytes]:
    if len(body) < 4:
        raise ValueError("body too short")
    n = int.from_bytes(body[:4], "big")
    if n > min(len(body) - 4, MAX_HEADER_BYTES):
        raise ValueError(f"a JSON header of {n} bytes does not fit")
    header = json.loads(body[4 : 4 + n])
    if not isinstance(header, dict):
        raise ValueError("the header must be a JSON object")
    return header, body[4 + n :]


def client_context(ca: str | None, cert: str | None, key: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    if cert:
        context.load_cert_chain(cert, key)
    return context


class Client:
    """A keep-alive HTTP(S) connection to one base URL that reconnects after errors."""

    def __init__(self, base_url: str, context: ssl.SSLContext | None = None, timeout: float = 120.0):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"{base_url}: only http and https URLs")
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port
        self.prefix = parts.path.rstrip("/")
        self.context = context if context is not None or not self.https else client_context(None, None, None)
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.https:
                self._conn = http.client.HTTPSConnection(
                    self.host, self.port, timeout=self.timeout, context=self.context
                )
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            self._conn.connect()
            self._conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small messages, no Nagle wait
        return self._conn

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        """One exchange. A kept-alive connection that the server closed meanwhile (its idle timeout) fails
        before the server reads anything: that request is sent once more, on a new connection."""
        if self._conn is not None:
            try:
                return self._exchange(method, path, body, headers)
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
        return self._exchange(method, path, body, headers)

    def _exchange(self, method, path, body, headers) -> tuple[int, bytes]:
        try:
            conn = self._connection()
            conn.request(method, self.prefix + path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def retry(call, give_up_after: float, what: str):
    """`call()` until it stops raising OSError/HTTPException, with backoff, for at most `give_up_after` s."""
    start, delay = time.monotonic(), 0.1
    while True:
        try:
            return call()
        except (OSError, http.client.HTTPException) as error:
            if time.monotonic() - start > give_up_after:
                raise ConnectionError(f"{what}: unreachable for {give_up_after:.0f}s: {error}") from error
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
