"""The Open Inference Protocol v2 over HTTP/1.1, on asyncio with httptools' parser.

A small hand-written server rather than a web framework: per-request overhead is what a small model's
latency is made of. Requests on one connection are answered in order; the body is read whatever
its Content-Type (tritonclient's sync client sends none) and never compressed in the response.
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

from edgeloop_runtime.errors import BadRequest, NotFound, ServingError, TooLarge
from edgeloop_runtime.protocol import http_codec
from edgeloop_runtime.serving import Serving

log = logging.getLogger(__name__)

REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Content Too Large",
    500: b"Internal Server Error",
    503: b"Service Unavailable",
}
JSON = b"application/json"


@dataclass(slots=True)
class Request:
    method: bytes
    path: str
    headers: dict[bytes, bytes]
    body: bytes
    keep_alive: bool
    received: float  # perf_counter at the end of the body


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
    return Response(error.http_status, [orjson.dumps({"error": str(error)})], close=isinstance(error, TooLarge))


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


class App:
    """Routes requests; answers through a callback so that inference needs no task per request."""

    def __init__(self, serving: Serving, max_body_bytes: int) -> None:
        self.serving = serving
        self.max_body_bytes = max_body_bytes

    def too_large(self) -> Response:
        error = TooLarge(f"the request body exceeds {self.max_body_bytes} bytes (--max-body-bytes)")
        self.serving.metrics.request_done("http", error.outcome, 0.0)
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

    def _infer(self, request: Request, respond) -> None:
        serving = self.serving
        serving.inflight += 1

        def finish(response: Response, outcome: str, queued_ns: int = 0) -> None:
            serving.inflight -= 1
            serving.metrics.request_done("http", outcome, time.perf_counter() - request.received, queued_ns)
            respond(response)

        try:
            body = request.body
            encoding = request.headers.get(b"content-encoding")
            if encoding and encoding.lower() != b"identity":
                body = decompress(body, encoding, self.max_body_bytes)
            header_length = request.headers.get(b"inference-header-content-length")
            try:
                length = int(header_length) if header_length is not None else None
            except ValueError:
                raise BadRequest("Inference-Header-Content-Length is not an integer") from None
            decoded = http_codec.decode_request(body, length)
            future = serving.submit(decoded.inputs, list(decoded.outputs or ()))
        except ServingError as error:
            return finish(error_response(error), error.outcome)

        def done(future: asyncio.Future) -> None:
            try:
                results, queued_ns = future.result()
                parts, length = http_codec.encode_response(
                    serving.model.name, serving.model.version, decoded, serving.model.outputs, results
                )
            except ServingError as error:
                return finish(error_response(error), error.outcome)
            except Exception as error:
                log.exception("inference failed")
                return finish(json_response(500, {"error": f"inference failed: {error}"}), "error")
            content_type = b"application/octet-stream" if length is not None else JSON
            finish(Response(200, parts, content_type, length), "success", queued_ns)

        future.add_done_callback(done)


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: parses with httptools, answers requests one at a time, in order."""

    def __init__(self, app: App, connections: set[Connection]) -> None:
        self.app = app
        self.connections = connections
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        # pipelined requests waiting for the one in flight, each with its answer when known already
        self.pending: deque[tuple[Request, Response | None]] = deque()
        self.busy = False
        self.paused = False
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        self.body: list[bytes] = []
        self.body_size = 0
        self.too_large = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._send(json_response(400, {"error": "protocol upgrades are not supported"}), close=True)
        except httptools.HttpParserError as error:
            self._send(json_response(400, {"error": f"malformed HTTP request: {error}"}), close=True)

    # httptools callbacks

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        length = self.headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.app.max_body_bytes:
            self.too_large = True  # the body is read and dropped, so that the client sees the 413
        elif self.headers.get(b"expect", b"").lower() == b"100-continue" and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits for it before a large body

    def on_body(self, chunk: bytes) -> None:
        self.body_size += len(chunk)
        if self.body_size > self.app.max_body_bytes:
            self.too_large = True
        if not self.too_large:
            self.body.append(chunk)

    def on_message_complete(self) -> None:
        path = httptools.parse_url(self.url).path.decode("latin-1") if self.url else "/"
        request = Request(
            self.parser.get_method(),
            path,
            self.headers,
            b"".join(self.body),
            self.parser.should_keep_alive() and not self.too_large,
            time.perf_counter(),
        )
        rejection = self.app.too_large() if self.too_large else None
        self._reset()
        self.pending.append((request, rejection))
        if self.busy:
            self.transport.pause_reading()  # one request in flight and the next one parsed: enough
            self.paused = True
        else:
            self._next()

    # answering

    def _next(self) -> None:
        if not self.pending or self.transport is None:
            return
        request, rejection = self.pending.popleft()
        self.busy = True
        if rejection is not None:
            self._respond(request, rejection)
        else:
            self.app.handle(request, lambda response: self._respond(request, response))

    def _respond(self, request: Request, response: Response) -> None:
        self.busy = False
        close = response.close or not request.keep_alive or self.app.serving.draining
        self._send(response, close)
        if close or self.transport is None:
            return
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        self._next()

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
