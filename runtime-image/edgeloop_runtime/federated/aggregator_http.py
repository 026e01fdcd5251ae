"""The aggregator's HTTP(S) side: routes, client identity and limits; the logic lives in aggregator.py.

    GET  /v1/round?after=<id>   long poll for the next round          GET /v1/status   the status JSON
    GET  /v1/model, /v1/weights  the graph (once), the round's weights  GET /healthz, /metrics (Prometheus)
    POST /v1/join|shares|update|unmask|evaluate   4-byte length, JSON header, raw bytes (transport.pack)

A client's identity is the subject CN of its verified certificate when the aggregator requires client
certificates (--tls-ca): an `X-Edgeloop-Client` header that names anyone else is refused (403). Without mTLS the
header is the identity, and nothing authenticates it. The server is a bounded_http server: connections,
headers, bodies (at most the largest message the model's size allows) and their time are bounded, and one
client has at most a few requests in flight. With --metrics-port, /metrics and /healthz are also served in
plain HTTP on a port of their own, for scrapers that have no client certificate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import ssl
import threading
from collections import Counter
from urllib.parse import parse_qs, urlsplit

from ..bounded_http import BoundedHandler, BoundedHTTPServer, Limits, Refused
from . import metrics
from .aggregator import Aggregator, BadRequest, Conflict
from .transport import unpack

log = logging.getLogger("edgeloop.federated.aggregator")

ACTIONS = {
    "/v1/join": "join",
    "/v1/shares": "shares",
    "/v1/update": "update",
    "/v1/unmask": "unmask",
    "/v1/evaluate": "evaluate",
}
REQUESTS_PER_CLIENT = 4  # in flight at once: a long poll and a blocking step, with room for a reconnect
DEFAULT_LIMITS = Limits(max_connections=1024, max_body_bytes=0, body_budget=256 << 20)  # body 0: from the model


class MetricsHandler(BoundedHandler):
    """/metrics and /healthz only: what the plain-HTTP metrics port serves (and the main port too)."""

    server_version = "edgeloop-aggregator"
    agg: Aggregator
    counters: metrics.HTTPCounters
    servers: list[BoundedHTTPServer]

    def log_message(self, fmt, *args):  # per-request lines would drown the round log
        log.debug(fmt, *args)

    def send_response(self, code, message=None):
        self.counters.request(getattr(self, "path", ""), code)
        super().send_response(code, message)

    def refuse_body(self, status: int, message: str) -> None:
        self._reply(status, json.dumps({"error": message}).encode(), close=True)

    def _reply(self, code: int, body: bytes, content_type: str = "application/json", close: bool = False) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj) -> None:
        self._reply(code, json.dumps(obj).encode())

    def do_GET(self):
        path = urlsplit(self.path).path
        if path == "/healthz":
            return self._json(200, {"ok": True})
        if path == "/metrics":
            text = metrics.render(self.agg, self.counters, self.servers).encode()
            return self._reply(200, text, "text/plain; version=0.0.4; charset=utf-8")
        self._json(404, {"error": "not found"})


class AggregatorHandler(MetricsHandler):
    mutual_tls: bool

    def setup(self):
        super().setup()
        # Small request/response pairs: without this, Nagle + delayed ACKs add ~40 ms to many replies.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def identity(self) -> tuple[str, bytes]:
        """(client id, its certificate in DER or b""): from the verified certificate under mTLS."""
        claimed = self.headers.get("X-Edgeloop-Client", "")
        if not self.mutual_tls:
            return claimed, b""
        peer = self.connection.getpeercert()
        names = [value for rdn in peer.get("subject", ()) for key, value in rdn if key == "commonName"]
        if len(names) != 1 or not names[0]:
            raise Refused(403, "the client certificate must name exactly one client (subject CN)")
        if claimed and claimed != names[0]:
            raise Refused(403, f"X-Edgeloop-Client {claimed!r} is not the certificate's client {names[0]!r}")
        return names[0], self.connection.getpeercert(binary_form=True)

    def _count(self, client: str, body_length: int) -> None:
        """Attribute what this request carried (request line, headers, body) to its client."""
        size = len(self.raw_requestline) + sum(len(k) + len(v) + 4 for k, v in self.headers.items()) + 2
        self.counters.bytes_in(self.path, size + body_length)
        with self.agg.cond:
            if client and self.agg.round is not None:
                self.agg.round.uploaded[client] += size + body_length

    def _in_flight(self, client: str):
        return _ClientSlot(self.server, client)

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path in ("/healthz", "/metrics"):
            return super().do_GET()
        client, _ = self.identity()
        with self._in_flight(client):
            self._count(client, 0)
            if url.path == "/v1/round":
                previous = parse_qs(url.query).get("after", [""])[0]
                self._json(200, self.agg.wait_for_round(previous, client))
            elif url.path in ("/v1/model", "/v1/weights"):
                with self.agg.cond:
                    body = self.agg.model_bytes if url.path == "/v1/model" else self.agg.weights_bytes
                sha = hashlib.sha256(body).hexdigest()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", f'"{sha}"')
                self.end_headers()
                self.wfile.write(body)
            elif url.path == "/v1/status":
                with self.agg.cond:
                    self._json(200, self.agg.status())
            else:
                self._json(404, {"error": "not found"})

    def do_POST(self):
        action = ACTIONS.get(urlsplit(self.path).path)
        if action is None:
            raise Refused(404, "not found")
        client, cert = self.identity()
        if not client:
            raise Refused(400, "X-Edgeloop-Client header missing")
        with self._in_flight(client):
            body = self.read_body(self.agg.max_body_bytes)
            self._count(client, len(body))
            try:
                header, payload = unpack(body)
                round_id = self.headers.get("X-Edgeloop-Round", "")
                result = self.agg.handle(client, cert, round_id, action, header, payload)
            except (Conflict, BadRequest) as error:
                return self._json(error.status, {"error": str(error)})
            except (ValueError, KeyError, TypeError) as error:
                return self._json(400, {"error": f"malformed {action}: {error}"})
            self._json(200, result)


class _ClientSlot:
    """One of a client's few requests in flight (429 beyond them): one client cannot hold every thread."""

    def __init__(self, server: BoundedHTTPServer, client: str):
        self.server, self.client = server, client

    def __enter__(self):
        with self.server.clients_lock:
            if self.server.client_requests[self.client] >= REQUESTS_PER_CLIENT:
                raise Refused(429, f"{self.client} has {REQUESTS_PER_CLIENT} requests in flight already")
            self.server.client_requests[self.client] += 1

    def __exit__(self, *exc):
        with self.server.clients_lock:
            self.server.client_requests[self.client] -= 1
            if not self.server.client_requests[self.client]:
                del self.server.client_requests[self.client]


def serve(
    agg: Aggregator,
    host: str,
    port: int,
    tls: ssl.SSLContext | None = None,
    limits: Limits = DEFAULT_LIMITS,
    metrics_port: int | None = None,
) -> BoundedHTTPServer:
    """Start the HTTP(S) server (and the plain metrics port, as `.metrics_server`) in daemon threads; the caller
    runs `agg.run()`. A body limit of 0 means the largest message the model's size allows."""
    if not limits.max_body_bytes:
        limits = Limits(**{**limits.__dict__, "max_body_bytes": agg.max_body_bytes})
    servers: list[BoundedHTTPServer] = []
    shared = {"agg": agg, "counters": metrics.HTTPCounters(), "servers": servers}
    mutual = tls is not None and tls.verify_mode == ssl.CERT_REQUIRED
    handler = type("Handler", (AggregatorHandler,), {**shared, "mutual_tls": mutual})
    server = BoundedHTTPServer((host, port), handler, limits, tls)
    server.clients_lock = threading.Lock()
    server.client_requests = Counter()
    servers.append(server)
    server.metrics_server = None
    if metrics_port is not None:
        plain = Limits(**{**limits.__dict__, "max_connections": 64, "max_body_bytes": 1})
        metrics_handler = type("Metrics", (MetricsHandler,), shared)
        server.metrics_server = BoundedHTTPServer((host, metrics_port), metrics_handler, plain)
        servers.append(server.metrics_server)
        server.metrics_server.serve_in_thread("aggregator-metrics")
    server.serve_in_thread("aggregator-http")
    return server
