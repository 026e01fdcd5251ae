"""A threaded HTTP/1.1 server with every resource a client can hold bounded: the base of the model store and
the federated aggregator (the inference server has its own event loop).

What a client can make the server spend, and the limit on it (one `Limits` per server, from named flags):

- connections (threads): `max_connections`. At the cap, a new connection closes the oldest one that is idle
  or still sending its request line and headers (a slow client, not a working one); when every connection
  is inside a request, the newcomer gets 503 and is closed.
- time: a connection waits at most `idle_timeout` for a request's first byte (and for a TLS handshake);
  from that byte, the request line and headers must be complete within `header_timeout`; a body must
  arrive within `body_timeout` plus one second per `min_body_rate` bytes; a response whose reader stops
  reading for `idle_timeout` is cut. Deadlines are for the whole phase, so a client that trickles one
  byte at a time gains nothing.
- memory: the request line (`max_request_line`, 414), the header block (`max_header_bytes` and
  `max_headers`, 431) and the body (`max_body_bytes`, 413; Content-Length required, 411; chunked refused).
  Servers that keep bodies in memory share `body_budget` bytes among all requests at once (503 beyond it).

Framing is strict, so that a proxy in front and this server never disagree on where a request ends (request
smuggling): a Transfer-Encoding, conflicting Content-Lengths, a header line folded onto the next or holding
control characters, or an HTTP/1.1 request without exactly one Host are refused (400, 411) and the connection
closed; a body that a handler does not read (a GET with a Content-Length) closes the connection after the
answer instead of being read as the next request.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import logging
import os
import re
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, fields, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("edgeloop_runtime.http")

# A header line (RFC 9110 5.1, 5.5): a token, a colon, then no control character but HTAB. A line that begins
# with whitespace (obs-fold), whitespace before the colon, or a NUL are refused.
HEADER_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+:[^\x00-\x08\x0a-\x1f\x7f]*\r?\n\Z")


@dataclass(frozen=True)
class Limits:
    max_connections: int = 1024
    max_request_line: int = 8192
    max_header_bytes: int = 32768
    max_headers: int = 100
    max_body_bytes: int = 64 << 20
    body_budget: int = 256 << 20
    idle_timeout: float = 30.0
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    min_body_rate: int = 64 << 10


# flag name, Limits field, type, help (%(default)s filled in from the server's own defaults)
_FLAGS = [
    ("--max-connections", "max_connections", int, "concurrent connections (threads); default %(default)s"),
    ("--max-request-line", "max_request_line", int, "bytes of a request line, 414 above; default %(default)s"),
    ("--max-header-bytes", "max_header_bytes", int, "bytes of all header lines, 431 above; default %(default)s"),
    ("--max-headers", "max_headers", int, "header lines per request, 431 above; default %(default)s"),
    ("--max-body-bytes", "max_body_bytes", int, "bytes of a request body, 413 above; default %(default)s"),
    ("--body-budget", "body_budget", int, "bytes of request bodies held in memory at once; default %(default)s"),
    ("--idle-timeout", "idle_timeout", float, "seconds a connection may wait for a request; default %(default)s"),
    ("--header-timeout", "header_timeout", float, "seconds to send request line and headers; default %(default)s"),
    (
        "--body-timeout",
        "body_timeout",
        float,
        "seconds for a body, plus 1 s per --min-body-rate bytes; default %(default)s",
    ),
    ("--min-body-rate", "min_body_rate", int, "bytes/s a body may be sent at, at the least; default %(default)s"),
]


def add_arguments(
    parser: argparse.ArgumentParser, defaults: Limits, body_flag: str = "--max-body-bytes", body_help: str = ""
) -> None:
    """The limit flags, with this server's defaults; `body_flag` renames --max-body-bytes (the store's is
    --max-bytes), `body_help` says what its default means."""
    group = parser.add_argument_group("limits (see docs/security.md)")
    for flag, name, kind, help_text in _FLAGS:
        if name == "body_budget" and defaults.body_budget == 0:
            continue  # a server that streams bodies holds none in memory
        group.add_argument(
            body_flag if name == "max_body_bytes" else flag,
            dest=f"limit_{name}",
            metavar="N" if kind is int else "S",
            type=_positive(kind),
            default=getattr(defaults, name),
            help=body_help if name == "max_body_bytes" and body_help else help_text,
        )


def from_args(args: argparse.Namespace, defaults: Limits) -> Limits:
    return replace(
        defaults, **{f.name: getattr(args, f"limit_{f.name}", getattr(defaults, f.name)) for f in fields(Limits)}
    )


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not > 0")
        return value

    return parse


def server_context(cert: str | None, key: str | None, ca: str | None) -> ssl.SSLContext | None:
    """TLS for a server when it has a certificate; with a CA, clients must present a certificate it signed."""
    if not cert:
        if ca:
            raise ValueError("a client CA needs a server certificate (--tls-cert, --tls-key)")
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if ca:
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class Refused(Exception):
    """A request the server answers with `status` and closes: it broke a limit or is malformed."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# --- connections and their phases ---------------------------------------------------------------------------

IDLE, HEADERS, BUSY = "idle", "headers", "busy"


class _Connection:
    """One accepted socket: its phase (evictable while idle or sending headers) and the deadline of its reads."""

    def __init__(self, sock: socket.socket, limits: Limits):
        self.sock, self.limits = sock, limits
        self.phase, self.since = IDLE, time.monotonic()
        self.deadline = self.since + limits.idle_timeout
        self.evicted = False

    def wait_for_request(self) -> None:
        self.phase, self.since = IDLE, time.monotonic()
        self.deadline = self.since + self.limits.idle_timeout

    def first_byte(self) -> None:
        if self.phase == IDLE:
            self.phase = HEADERS
            self.deadline = time.monotonic() + self.limits.header_timeout

    def busy(self, body_length: int = 0) -> None:
        self.phase = BUSY
        self.deadline = time.monotonic() + self.limits.body_timeout + body_length / self.limits.min_body_rate

    def evict(self) -> None:
        self.evicted = True
        # The base class's shutdown: an SSLSocket's own would drop its SSL object under the reader's feet.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self.sock, socket.SHUT_RDWR)


class _DeadlineReader(io.RawIOBase):
    """The socket's reads, each given only the time left until the connection's current deadline."""

    def __init__(self, conn: _Connection):
        self.conn = conn

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.conn.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"{self.conn.phase} deadline passed")
        self.conn.sock.settimeout(left)
        n = self.conn.sock.recv_into(buffer)
        if n:
            self.conn.first_byte()
        return n


class _StallWriter(io.RawIOBase):
    """The socket's writes, cut when the reader does not take a byte for `idle_timeout` seconds."""

    def __init__(self, conn: _Connection):
        self.conn = conn

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.conn.sock.settimeout(self.conn.limits.idle_timeout)
        self.conn.sock.sendall(data)
        return len(data)


class BoundedHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a connection cap, eviction of slow connections and optional TLS."""

    daemon_threads = True
    request_queue_size = 1024  # many nodes connect at once during a rollout; 5 (the default) drops SYNs

    def __init__(self, address, handler_class, limits: Limits, tls: ssl.SSLContext | None = None):
        self.limits = limits
        self.tls = tls
        self._lock = threading.Lock()
        self._connections: dict[socket.socket, _Connection] = {}
        self.refused_connections = 0
        self.evicted_connections = 0
        self.body_budget = _BodyBudget()
        super().__init__(address, handler_class)
        if tls is not None:
            # The handshake happens in the connection's thread, under the idle deadline, so a slow client
            # never stalls accept().
            self.socket = tls.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def process_request(self, request, client_address):
        """In the accepting thread: admit the connection, making room by evicting a slow one if needed."""
        with self._lock:
            if len(self._connections) >= self.limits.max_connections:
                slow = [c for c in self._connections.values() if c.phase != BUSY and not c.evicted]
                if not slow:
                    self.refused_connections += 1
                    _refuse_connection(request, self.tls is None)
                    return
                victim = min(slow, key=lambda c: c.since)
                victim.evict()
                self.evicted_connections += 1
                del self._connections[victim.sock]
            self._connections[request] = _Connection(request, self.limits)
        super().process_request(request, client_address)

    def connection(self, sock: socket.socket) -> _Connection:
        with self._lock:
            return self._connections.get(sock) or _Connection(sock, self.limits)

    def shutdown_request(self, request):
        with self._lock:
            self._connections.pop(request, None)
        super().shutdown_request(request)

    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def serve_in_thread(self, name: str) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name=name, daemon=True)
        thread.start()
        return thread


def _refuse_connection(sock: socket.socket, plain: bool) -> None:
    """503 without a thread: one non-blocking write (plain HTTP only; TLS would need a handshake), then close."""
    try:
        if plain:
            sock.setblocking(False)
            sock.send(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
            )
    except OSError:
        pass
    finally:
        sock.close()


class _BodyBudget:
    """Bytes of request bodies held in memory, shared by all connections of a server."""

    def __init__(self):
        self.lock = threading.Lock()
        self.used = 0

    def take(self, n: int, limit: int) -> bool:
        with self.lock:
            if self.used + n > limit:
                return False
            self.used += n
            return True

    def give_back(self, n: int) -> None:
        with self.lock:
            self.used -= n


class BoundedHandler(BaseHTTPRequestHandler):
    """BaseHTTPRequestHandler that reads under the server's limits. Subclasses implement do_GET etc., call
    `read_body()` (buffered, within the body budget) or `expect_body()` (streamed) for request bodies, and
    may override `refuse_body(status, message)` to answer limit breaches in their own format."""

    protocol_version = "HTTP/1.1"
    server: BoundedHTTPServer

    def setup(self):
        super().setup()
        self.conn = self.server.connection(self.connection)
        self.limits = self.server.limits
        self.rfile = io.BufferedReader(_DeadlineReader(self.conn), 65536)
        self.wfile = _StallWriter(self.conn)
        self._held = 0

    def handle(self):
        try:
            if isinstance(self.connection, ssl.SSLSocket):
                self.connection.settimeout(self.limits.idle_timeout)
                self.connection.do_handshake()
            self.close_connection = True
            self.handle_one_request()
            while not self.close_connection:
                self.handle_one_request()
        except (OSError, ssl.SSLError, ValueError) as error:  # timeouts, resets, evictions, handshake failures
            log.debug("%s: connection closed: %s", self.client_address[0], error)

    def handle_one_request(self):
        self.conn.wait_for_request()
        self.close_connection = True
        try:
            self.raw_requestline = self.rfile.readline(self.limits.max_request_line + 1)
            if not self.raw_requestline:
                return
            if len(self.raw_requestline) > self.limits.max_request_line:
                raise Refused(414, f"request line longer than {self.limits.max_request_line} bytes")
            head = self._read_header_block()
        except Refused as refused:
            return self._refuse(refused)
        except TimeoutError:
            if self.conn.phase == HEADERS:
                self._refuse(Refused(408, f"request not complete within {self.limits.header_timeout:g} s"))
            return
        # parse_request reads the headers from self.rfile: give it the block already read under the limits.
        rfile, self.rfile = self.rfile, io.BufferedReader(io.BytesIO(head))
        try:
            ok = self.parse_request()
        finally:
            self.rfile = rfile
        if not ok:
            return
        self.conn.busy()
        try:
            self._check_framing()
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                return self._refuse(Refused(405 if self.command.isalpha() else 400, f"method {self.command}"))
            method()
            self.wfile.flush()
            if self._declared and not self._body_taken:
                self.close_connection = True  # its body was not read: it must not be taken for the next request
        except Refused as refused:
            self._refuse(refused)
        finally:
            self._release_body()

    def _read_header_block(self) -> bytes:
        lines, size = [], 0
        while True:
            line = self.rfile.readline(self.limits.max_header_bytes - size + 1)
            size += len(line)
            if size > self.limits.max_header_bytes:
                raise Refused(431, f"headers larger than {self.limits.max_header_bytes} bytes")
            if not line:
                raise ConnectionError("closed inside the headers")
            lines.append(line)
            if line in (b"\r\n", b"\n"):
                return b"".join(lines)
            if len(lines) > self.limits.max_headers:
                raise Refused(431, f"more than {self.limits.max_headers} header lines")
            if not HEADER_LINE.match(line):
                raise Refused(400, f"malformed header line {line[:64]!r}")

    # --- bodies ------------------------------------------------------------------------------------------

    def _check_framing(self) -> None:
        """Where the request ends, unambiguously (see the module's docstring); sets `_declared`."""
        self._declared, self._body_taken = 0, False
        if self.headers.get("Transfer-Encoding") is not None:
            raise Refused(411, "Content-Length required (Transfer-Encoding is not accepted)")
        declared = self.headers.get_all("Content-Length") or []
        if declared and (len(set(declared)) != 1 or not declared[0].isdigit() or not declared[0].isascii()):
            raise Refused(400, f"malformed Content-Length {declared!r}")
        if self.request_version == "HTTP/1.1" and len(self.headers.get_all("Host") or []) != 1:
            raise Refused(400, "an HTTP/1.1 request needs exactly one Host header")
        self._declared = int(declared[0]) if declared else 0

    def body_length(self, max_bytes: int | None = None) -> int:
        """The declared Content-Length, validated: 411 without one, 413 too large."""
        limit = self.limits.max_body_bytes if max_bytes is None else min(max_bytes, self.limits.max_body_bytes)
        if not self.headers.get_all("Content-Length"):
            raise Refused(411, "Content-Length required")
        self._body_taken = True
        length = self._declared
        if length > limit:
            raise Refused(413, f"body of {length} bytes is larger than {limit}")
        return length

    def expect_body(self, max_bytes: int | None = None) -> int:
        """Validate the body's length and start its deadline; the caller streams `self.rfile.read`."""
        length = self.body_length(max_bytes)
        self.conn.busy(length)
        return length

    def read_body(self, max_bytes: int | None = None) -> bytes:
        """The whole body in memory, within the server's shared body budget (503 when it is spent)."""
        length = self.body_length(max_bytes)
        if not self.server.body_budget.take(length, self.limits.body_budget):
            raise Refused(503, "too many request bodies in flight; retry")
        self._held = length
        self.conn.busy(length)
        body = self.rfile.read(length)
        if len(body) != length:
            raise ConnectionError(f"body ended after {len(body)} of {length} bytes")
        return body

    def _release_body(self) -> None:
        if self._held:
            self.server.body_budget.give_back(self._held)
            self._held = 0

    # --- answers -----------------------------------------------------------------------------------------

    def _refuse(self, refused: Refused) -> None:
        """Answer and close: the rest of what the client sent is never read."""
        self.close_connection = True
        if not hasattr(self, "request_version"):
            self.request_version = "HTTP/1.1"
            self.command, self.requestline = "", ""
        with contextlib.suppress(OSError):
            self.refuse_body(refused.status, str(refused))

    def refuse_body(self, status: int, message: str) -> None:
        body = (message + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        """parse_request's errors (bad request line, version): in the server's own format."""
        self.close_connection = True
        self.request_version = "HTTP/1.1"  # parse_request leaves 0.9 when the line is bad: answer with a status
        self.refuse_body(code, message or http.client.responses.get(code, "error"))

    def send_file(self, f, offset: int, count: int) -> None:
        """`count` bytes of file `f` from `offset` to the client: sendfile(2) on plain sockets (no copy through
        Python), large reads and writes under TLS; the reader must keep reading (stall cut-off)."""
        # Corked (nginx's tcp_nopush): headers and body go out in full segments, not a small one after each
        # of sendfile's 64 KiB steps (just above loopback's MSS).
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        try:
            self.wfile.flush()
            if isinstance(self.connection, ssl.SSLSocket):
                sent = self._copy_file(f, offset, count)
            else:
                sent = self._sendfile(f, offset, count)
        finally:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        if sent != count:
            raise ConnectionError(f"sent {sent} of {count} bytes")

    def _sendfile(self, f, offset: int, count: int) -> int:
        """Blocking sendfile(2) calls, each as large as the kernel takes, with the GIL released throughout: a
        thread per client does not wake up per socket buffer (and wait for the GIL) as a timeout-mode socket
        would. The kernel's send timeout (SO_SNDTIMEO) cuts a reader that stops reading."""
        sock = self.connection
        stall = self.limits.idle_timeout
        sock.settimeout(None)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", int(stall), int(stall % 1 * 1e6)))
        sent = 0
        try:
            while sent < count:
                try:
                    n = os.sendfile(sock.fileno(), f.fileno(), offset + sent, min(count - sent, 1 << 30))
                except BlockingIOError:  # nothing taken for SO_SNDTIMEO
                    raise TimeoutError(f"the client read nothing for {stall:g} s") from None
                if not n:
                    break
                sent += n
        finally:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, 0))
            sock.settimeout(stall)
        return sent

    def _copy_file(self, f, offset: int, count: int) -> int:
        self.connection.settimeout(self.limits.idle_timeout)
        f.seek(offset)
        sent, block = 0, bytearray(256 << 10)
        view = memoryview(block)
        while sent < count:
            n = f.readinto(view[: min(len(block), count - sent)])
            if not n:
                break
            self.connection.sendall(view[:n])
            sent += n
        return sent
