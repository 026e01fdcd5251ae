"""The Open Inference Protocol v2 over HTTP/1.1, on asyncio with httptools' parser.

A small hand-written server rather than a web framework: per-request overhead is what a small model's
latency is made of. Requests on one connection are answered in order; the body is read whatever
its Content-Type (tritonclient's sync client sends none) and never compressed in the response.

Every client is bounded (edgeloop_runtime.limits): the head's line, bytes and fields (431), the body (413),
the memory all requests hold together (503), the requests queued on a connection, the time to send a head
or a body (408) and to stay idle, and the number of connections: at the cap, a new connection closes the
one that has waited longest for a request, or is refused when every connection is busy.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections import deque
from dataclasses import dataclass
from urllib.parse import unquote

import httptools
import orjson

from edgeloop_runtime.errors import (
    BadRequest,
    HeadTooLarge,
    NotFound,
    RequestTimeout,
    ServingError,
    TooLarge,
    Unavailable,
)
from edgeloop_runtime.listener import Listener
from edgeloop_runtime.protocol import http_codec
from edgeloop_runtime.serving import Serving
from edgeloop_runtime.shared_memory import Unsupported

log = logging.getLogger(__name__)

REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}
JSON = b"application/json"


@dataclass(slots=True)
class Request:
    method: bytes
    path: str
    headers: dict[bytes, bytes]
    body: bytes | bytearray
    keep_alive: bool
    received: int  # perf_counter_ns at the end of the body
    cost: int = 0  # bytes of the memory budget it holds until answered


@dataclass(slots=True)
class Response:
    status: int
    parts: list[bytes]
    content_type: bytes = JSON
    header_length: int | None = None  # Inference-Header-Content-Length
    close: bool = False


def json_response(status: int, document: object) -> Response:
    return Response(status, [orjson.dumps(document)])


def error_response(error: ServingError) -> Response:
    return Response(error.http_status, [orjson.dumps({"error": str(error)})])


def decompress(body: bytes, encoding: bytes, limit: int) -> bytes:
    """Request bodies may be gzip or deflate (tritonclient's request_compression_algorithm)."""
    wbits = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}.get(encoding.lower())
    if wbits is None:
        raise BadRequest(f"unsupported Content-Encoding {encoding.decode(errors='replace')!r}")
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)  # bounded: a small bomb must not fill memory
    except zlib.error as error:
        raise BadRequest(f"cannot decompress the {encoding.decode()} body: {error}") from error
    if len(data) > limit:
        raise TooLarge(f"the decompressed body exceeds {limit} bytes (--max-body-bytes)")
    return data


def http_listener(app: App) -> Listener:
    return Listener(app.limits, lambda listener: Connection(app, listener))


class App:
    """Routes requests; answers through a callback so that inference needs no task per request."""

    def __init__(self, serving: Serving) -> None:
        self.serving = serving
        self.limits = serving.limits

    def refuse(self, error: ServingError) -> Response:
        """The answer to a request refused before it was read whole."""
        self.serving.metrics.refused("http", error.outcome)
        return error_response(error)

    def handle(self, request: Request, respond) -> None:
        try:
            self._route(request, respond)
        except ServingError as error:
            respond(error_response(error))
        except Exception:
            log.exception("unhandled error on %s %s", request.method.decode(), request.path)
            respond(json_response(500, {"error": "internal server error"}))

    def _route(self, request: Request, respond) -> None:
        serving = self.serving
        parts = request.path.split("/")[1:]  # "/v2/models/m/infer" → ["v2", "models", "m", "infer"]
        get = request.method == b"GET"
        if parts == ["metrics"] and get:
            return respond(Response(200, [serving.metrics.render()], b"text/plain; version=0.0.4"))
        if not parts or parts[0] != "v2":
            raise NotFound(f"no route for {request.path}")
        rest = parts[1:]
        if rest in ([], [""]) and get:
            return respond(json_response(200, serving.server_metadata()))
        if rest == ["health", "live"] and get:
            return respond(json_response(200, {"live": True}))
        if rest == ["health", "ready"] and get:
            return respond(json_response(200 if serving.ready else 503, {"ready": serving.ready}))
        if rest == ["models", "stats"] and get:
            return respond(json_response(200, serving.model_stats()))
        if rest and rest[0] in ("systemsharedmemory", "cudasharedmemory"):
            return respond(self._shared_memory(request, rest))
        if len(rest) < 2 or rest[0] != "models":
            raise NotFound(f"no route for {request.path}")
        name, version, action = unquote(rest[1]), None, rest[2:]
        if action[:1] == ["versions"] and len(action) >= 2:
            version, action = unquote(action[1]), action[2:]
        serving.find(name, version)
        if action == ["infer"]:
            if request.method != b"POST":
                return respond(json_response(405, {"error": "infer takes POST"}))
            return self._infer(request, respond)
        if not get:
            return respond(json_response(405, {"error": f"{request.path} takes GET"}))
        if action == []:
            return respond(json_response(200, serving.model_metadata()))
        if action == ["ready"]:
            return respond(json_response(200 if serving.ready else 503, {"ready": serving.ready}))
        if action == ["config"]:
            return respond(json_response(200, serving.model_config()))
        if action == ["stats"]:
            return respond(json_response(200, serving.model_stats()))
        raise NotFound(f"no route for {request.path}")

    def _shared_memory(self, request: Request, rest: list[str]) -> Response:
        """`{system,cuda}sharedmemory[/region/<name>]/{status,register,unregister}`; CUDA regions are never held."""
        kind, action = rest[0], rest[-1]
        if len(rest) == 4 and rest[1] == "region":
            name = unquote(rest[2])
        elif len(rest) == 2:
            name = ""
        else:
            raise NotFound(f"no route for {request.path}")
        if (request.method == b"GET") != (action == "status") or action not in ("status", "register", "unregister"):
            return json_response(405, {"error": f"{request.path}: status takes GET, register and unregister POST"})
        memory = self.serving.shared_memory
        if kind == "cudasharedmemory":
            if action == "register":
                raise Unsupported("CUDA shared memory is not supported; use system shared memory")
            if action == "status" and name:
                raise NotFound(f"unable to find cuda shared memory region '{name}'")
            return json_response(200, [])
        if action == "status":
            return json_response(200, memory.status(name))
        if action == "unregister":
            memory.unregister(name)
            return json_response(200, {})
        if not name:
            raise BadRequest("register a system shared memory region at /v2/systemsharedmemory/region/<name>/register")
        document = http_codec.parse_json(memoryview(request.body)) if request.body else {}
        if not isinstance(document, dict):
            raise BadRequest("the register request must be a JSON object with 'key', 'offset' and 'byte_size'")
        key, offset, size = document.get("key"), document.get("offset", 0), document.get("byte_size")
        if not isinstance(key, str) or type(offset) is not int or type(size) is not int:
            raise BadRequest("the register request needs a 'key' string and 'byte_size' (and 'offset') integers")
        memory.register(name, key, offset, size)
        return json_response(200, {})

    def _infer(self, request: Request, respond) -> None:
        serving = self.serving
        call = serving.call("http", request.received)

        def finish(response: Response, outcome: str) -> None:
            call.finish(outcome)
            respond(response)

        try:
            body = request.body
            encoding = request.headers.get(b"content-encoding")
            if encoding and encoding.lower() != b"identity":
                body = decompress(body, encoding, self.limits.max_body_bytes)
                call.reserve(len(body))
            header_length = request.headers.get(b"inference-header-content-length")
            try:
                length = int(header_length) if header_length is not None else None
            except ValueError:
                raise BadRequest("Inference-Header-Content-Length is not an integer") from None
            decoded = http_codec.decode_request(body, length, serving.signature, call.reserve, serving.shared_memory)
            future = call.submit(decoded.inputs, list(decoded.outputs or ()))
        except ServingError as error:
            return finish(error_response(error), error.outcome)
        except Exception:
            log.exception("unhandled error decoding an inference request")
            return finish(json_response(500, {"error": "internal server error"}), "error")

        def done(future: asyncio.Future) -> None:
            try:
                results = call.ran(future)
                parts, length = http_codec.encode_response(
                    serving.model.name,
                    serving.model.version,
                    decoded,
                    serving.model.outputs,
                    results,
                    serving.shared_memory,
                )
            except ServingError as error:
                return finish(error_response(error), error.outcome)
            except Exception:
                log.exception("inference failed")
                return finish(json_response(500, {"error": "inference failed"}), "error")
            content_type = b"application/octet-stream" if length is not None else JSON
            finish(Response(200, parts, content_type, length), "success")

        future.add_done_callback(done)


# What a connection is receiving: nothing (between requests), a request's head, or its body.
IDLE, HEAD, BODY = "idle", "head", "body"


class _StopParsing(Exception):
    """Raised from a parser callback to stop reading the connection's bytes."""


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: parses with httptools, answers requests one at a time, in order."""

    def __init__(self, app: App, listener: Listener) -> None:
        self.server = listener
        self.app = app
        self.limits = listener.limits
        self.budget = app.serving.budget
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        # requests read while another is being answered, each with its answer when known already
        self.pending: deque[tuple[Request | None, Response | None]] = deque()
        self.current: Request | None = None  # the request being answered
        self.busy = False
        self.pumping = False  # answering queued requests: an answer given at once does not recurse
        self.paused = False
        self.stopped = False  # reads nothing more: closes once the requests read are answered
        self.receiving = IDLE
        self.since = time.monotonic()  # when `receiving` last changed, or the last answer when idle
        self.head_bytes = 0  # bytes fed to the parser since the last request ended
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.header_count = 0
        self.header_bytes = 0
        self.body: bytearray | list[bytes] = []  # sized when the length is known, else chunks
        self.body_size = 0
        self.reserved = 0  # budget held by the request being received
        self.rejection: ServingError | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        if not self.server.admit(self):
            error = Unavailable(f"too many connections (--max-connections {self.limits.max_connections}); retry later")
            self._send(error_response(error), close=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.forget(self)
        self.transport = None
        self.stopped = True
        self._release(self.reserved)
        self.reserved = 0
        for request, _ in self.pending:
            if request is not None:
                self._release(request.cost)
        self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.stopped:
            return
        try:
            self._feed(data)
        except httptools.HttpParserCallbackError as error:
            cause = error.__context__
            if isinstance(cause, ServingError):
                self._fail(cause)
            elif not isinstance(cause, _StopParsing):
                log.error("HTTP connection failed", exc_info=cause)
                self._fail(ServingError("internal server error"))
        except httptools.HttpParserUpgrade:
            self._fail(BadRequest("protocol upgrades are not supported"))
        except httptools.HttpParserError as error:
            self._fail(BadRequest(f"malformed HTTP request: {error}"))

    def _feed(self, data: bytes) -> None:
        """Feeds the parser, a head's worth at most while a head is read: httptools keeps a header field whole
        until it ends, so a head without end must be cut off before it is buffered."""
        limit = self.limits.max_header_bytes
        if self.receiving == IDLE:  # a request begins (httptools' on_message_begin would cost a call per request)
            self.receiving = HEAD
            self.since = time.monotonic()
        if self.receiving == BODY or self.head_bytes + len(data) <= limit:
            self.head_bytes += len(data)
            self.parser.feed_data(data)
            return
        view = memoryview(data)
        while view and not self.stopped:
            if self.receiving == BODY:
                self.parser.feed_data(view)
                return
            room = limit - self.head_bytes
            if room <= 0:
                self._fail(HeadTooLarge(f"the request head exceeds {limit} bytes (--max-header-bytes)"))
                return
            chunk, view = view[:room], view[room:]
            self.head_bytes += len(chunk)
            self.parser.feed_data(chunk)

    # httptools callbacks

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > self.limits.max_request_line_bytes:
            raise HeadTooLarge(f"the request line exceeds {self.limits.max_request_line_bytes} bytes "
                               "(--max-request-line-bytes)")  # fmt: skip

    def on_header(self, name: bytes, value: bytes) -> None:
        # the head's bytes are bounded as they are fed (_feed); its fields are counted here
        self.header_count += 1
        self.header_bytes += len(name) + len(value) + 4
        if self.header_count > self.limits.max_headers:
            raise HeadTooLarge(f"the request has more than {self.limits.max_headers} header fields (--max-headers)")
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        self.receiving = BODY
        self.since = time.monotonic()
        self.server.waiting.pop(self, None)
        length = self.headers.get(b"content-length")
        size = int(length) if length is not None and length.isdigit() else 0
        try:
            if size > self.limits.max_body_bytes:
                raise TooLarge(f"the request body exceeds {self.limits.max_body_bytes} bytes (--max-body-bytes)")
            self._reserve(len(self.url) + self.header_bytes + size)
            if size:
                self.body = bytearray(size)  # filled in place: a large body is not held twice
        except ServingError as error:
            self.rejection = error  # its body is read and dropped, so that the client reads the answer
        if self.headers.get(b"expect", b"").lower() == b"100-continue":
            if self.rejection is not None:  # the client waits for a word before sending its body: refuse now
                raise self.rejection
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits for it before a large body

    def on_body(self, chunk: bytes) -> None:
        if self.rejection is not None:
            return
        start = self.body_size
        self.body_size += len(chunk)
        if isinstance(self.body, bytearray):  # the parser holds the body to its Content-Length
            self.body[start : self.body_size] = chunk
            return
        try:  # chunked: the body is reserved as it comes
            if self.body_size > self.limits.max_body_bytes:
                raise TooLarge(f"the request body exceeds {self.limits.max_body_bytes} bytes (--max-body-bytes)")
            self._reserve(len(chunk))
        except ServingError as error:
            self.rejection = error
            self.body = []
            return
        self.body.append(chunk)

    def on_message_complete(self) -> None:
        if self.stopped:  # pipelined after a request that closes the connection: not answered
            raise _StopParsing
        path = httptools.parse_url(self.url).path.decode("latin-1") if self.url else "/"
        request = Request(
            self.parser.get_method(),
            path,
            self.headers,
            self.body if isinstance(self.body, bytearray) else b"".join(self.body),
            self.parser.should_keep_alive(),
            time.perf_counter_ns(),
            self.reserved,
        )
        rejection = None
        if self.rejection is not None:
            self._release(self.reserved)
            request.cost = 0
            rejection = self.app.refuse(self.rejection)
        self.reserved = 0
        self._reset()
        self.receiving = IDLE
        self.since = time.monotonic()
        self.head_bytes = 0
        self.pending.append((request, rejection))
        self._pump()
        if len(self.pending) >= self.limits.max_pipelined:
            # Enough queued: the rest of what the client sent is not read, and the connection closes once
            # these are answered (a client retries unanswered pipelined requests then, RFC 9112 9.3.2).
            self._stop_reading()
            raise _StopParsing
        if self.pending and not self.paused:
            self.transport.pause_reading()  # one request in flight and the next one read: enough
            self.paused = True

    # answering

    def _pump(self) -> None:
        """Answers the queued requests in order, one after the other, until one is answered later."""
        if self.pumping:
            return
        self.pumping = True
        try:
            while not self.busy and self.pending and self.transport is not None:
                request, answer = self.pending.popleft()
                self.busy = True
                self.current = request
                if answer is not None:
                    self._respond(answer)
                else:
                    self.app.handle(request, self._respond)
        finally:
            self.pumping = False
        if not self.busy and not self.pending and self.paused and not self.stopped and self.transport is not None:
            self.paused = False
            self.since = time.monotonic()  # the client could not send meanwhile: its time starts again
            self.transport.resume_reading()

    def _respond(self, response: Response) -> None:
        request, self.current, self.busy = self.current, None, False
        if request is not None:
            self._release(request.cost)
        close = (
            response.close
            or request is None
            or not request.keep_alive
            or self.app.serving.draining
            or (self.stopped and not self.pending)
        )
        self._send(response, close)
        if close:
            self.stopped = True
            return
        if self.receiving == IDLE and not self.pending:
            self.since = time.monotonic()
            self.server.waiting[self] = None
        self._pump()

    def _send(self, response: Response, close: bool = False) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        length = sum(len(p) for p in response.parts)
        head = [
            b"HTTP/1.1 %d %s\r\n" % (response.status, REASONS.get(response.status, b"")),
            b"Content-Type: %s\r\nContent-Length: %d\r\n" % (response.content_type, length),
        ]
        if response.header_length is not None:
            head.append(b"Inference-Header-Content-Length: %d\r\n" % response.header_length)
        if close:
            head.append(b"Connection: close\r\n")
        head.append(b"\r\n")
        self.transport.writelines([b"".join(head), *response.parts])
        if close:
            self.transport.close()

    # limits

    def _fail(self, error: ServingError) -> None:
        """Reads nothing more; answers the requests already read, then `error`, then closes."""
        self._release(self.reserved)
        self.reserved = 0
        self._stop_reading()
        self.pending.append((None, self.app.refuse(error)))
        self._pump()

    def _stop_reading(self) -> None:
        self.stopped = True
        self.receiving = IDLE
        self.server.waiting.pop(self, None)
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True

    def _reserve(self, size: int) -> None:
        self.budget.reserve(size)
        self.reserved += size

    def _release(self, size: int) -> None:
        if size:
            self.budget.release(size)

    def expire(self, now: float) -> None:
        """Called every so often: ends a head or body that takes too long, and an idle connection."""
        if self.transport is None or self.stopped or self.paused:
            return
        limits = self.limits
        if self.receiving == HEAD and now - self.since > limits.header_timeout:
            self._fail(RequestTimeout(f"the request head took over {limits.header_timeout:g} s (--header-timeout)"))
        elif self.receiving == BODY and now - self.since > limits.body_timeout:
            self._fail(RequestTimeout(f"the request body took over {limits.body_timeout:g} s (--body-timeout)"))
        elif self.receiving == IDLE and not self.busy and not self.pending and now - self.since > limits.idle_timeout:
            self.evict()

    def evict(self) -> None:
        """Closes the connection, which waits for a request (the listener needs its place, or it idled)."""
        self.stopped = True
        if self.transport is not None:
            self.transport.close()
