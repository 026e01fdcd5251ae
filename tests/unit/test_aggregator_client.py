"""The operator's client of an aggregator's status (edgeloop.aggregator) against real HTTP(S) servers on
loopback: mTLS as the aggregator requires it, and one error for everything that goes wrong."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from edgeloop import certs
from edgeloop.aggregator import AggregatorUnreachable, ClientTLS, read_report
from edgeloop_runtime.federated.transport import server_context
from fr_factories import report

Handler = Callable[[http.server.BaseHTTPRequestHandler], None]


def answer(body: bytes, status: int = 200) -> Handler:
    def handle(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(status)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    return handle


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    """serve(handler, context=None) → the status URL of a server on loopback answering with `handler`."""
    servers = []

    def start(handler: Handler, context=None) -> str:
        class Status(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                handler(self)

            def log_message(self, *args):
                pass

        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Status)
        httpd.daemon_threads = True
        if context is not None:
            httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"{'https' if context else 'http'}://127.0.0.1:{httpd.server_address[1]}/v1/status"

    yield start
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


def test_a_report_is_read_and_anything_else_is_one_error(serve):
    assert read_report(serve(answer(json.dumps(report()).encode()))).round == 2
    for bad in (answer(b"{}"), answer(b"not json"), answer(b"busy", status=503)):
        with pytest.raises(AggregatorUnreachable, match=r"GET http://127\.0\.0\.1"):
            read_report(serve(bad))


def test_mtls_as_the_aggregator_requires_it_verifying_the_services_name(serve, tmp_path):
    """Against a server set up as the aggregator's (the runtime's own server_context)."""
    now = dt.datetime.now(dt.UTC)
    ca = certs.new_ca("ca", now, dt.timedelta(days=1))
    server = certs.issue(ca, "s", certs.Usage.SERVER, now, dt.timedelta(hours=1), ["agg.edge.svc"])
    client = certs.issue(ca, "c", certs.Usage.CLIENT, now, dt.timedelta(hours=1), [])
    for name, text in {"ca.crt": ca.cert, "tls.crt": server.cert, "tls.key": server.key}.items():
        (tmp_path / name).write_text(text)
    context = server_context(str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"), str(tmp_path / "ca.crt"))
    url = serve(answer(json.dumps(report()).encode()), context)

    assert read_report(url, ClientTLS(ca.cert, client.cert, client.key, "agg.edge.svc")).round == 2
    with pytest.raises(AggregatorUnreachable, match="certificate"):  # another name than the Service's
        read_report(url, ClientTLS(ca.cert, client.cert, client.key, "other.edge.svc"))
    with pytest.raises(AggregatorUnreachable):  # no client certificate: the aggregator requires one
        read_report(url)


def endless(sent: list[int], total: int = 64 << 20) -> Handler:
    """A body far larger than any report (the aggregator's image is the tenant's choice); counts what it sent."""

    def handle(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", str(total))
        request.end_headers()
        chunk = b" " * (64 << 10)
        try:
            for _ in range(total // len(chunk)):
                request.wfile.write(chunk)
                sent[0] += len(chunk)
        except OSError:
            pass  # the client hung up

    return handle


def trickle(seconds: float) -> Handler:
    """A byte every 0.1 s: never idle long enough for a socket timeout."""

    def handle(request: http.server.BaseHTTPRequestHandler) -> None:
        request.send_response(200)
        request.send_header("Content-Length", str(int(seconds * 10)))
        request.end_headers()
        try:
            for _ in range(int(seconds * 10)):
                request.wfile.write(b" ")
                request.wfile.flush()
                time.sleep(0.1)
        except OSError:
            pass

    return handle


def test_a_huge_status_body_is_cut_off_at_the_cap(serve):
    sent = [0]
    url = serve(endless(sent))
    with pytest.raises(AggregatorUnreachable, match="larger than"):
        read_report(url, max_bytes=1 << 20)
    time.sleep(0.5)  # the server notices the closed connection
    assert sent[0] <= 8 << 20, f"the client read on: {sent[0]} bytes sent"


def test_a_trickling_status_body_is_cut_off_at_the_deadline(serve):
    url = serve(trickle(seconds=30))
    started = time.monotonic()
    with pytest.raises(AggregatorUnreachable, match="took longer than"):
        read_report(url, timeout=1.0)
    assert time.monotonic() - started < 10, "cut off near the deadline, not when the server stops"
