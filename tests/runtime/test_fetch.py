"""`edgeloop-runtime fetch`: content-addressed, verified, atomic, retried."""

from __future__ import annotations

import hashlib
import http.server
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from edgeloop_runtime.fetch import DigestMismatch, FetchError, cache_path, fetch

MODEL = b"not really onnx, but bytes with a digest" * 1000
DIGEST = hashlib.sha256(MODEL).hexdigest()


class FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Serves MODEL at /model after `failures` 503s; counts the requests it saw."""

    failures = 0
    requests = 0

    def do_GET(self):
        type(self).requests += 1
        if self.path != "/model":
            self.send_error(404)
        elif type(self).requests <= type(self).failures:
            self.send_error(503)
        else:
            self.send_response(200)
            self.send_header("Content-Length", str(len(MODEL)))
            self.end_headers()
            self.wfile.write(MODEL)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_origin():
    handler = type("Handler", (FlakyHandler,), {"failures": 0, "requests": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_file_uri_lands_verified_at_its_content_address(tmp_path):
    source = tmp_path / "model.onnx"
    source.write_bytes(MODEL)
    path = fetch(source.as_uri(), DIGEST, tmp_path / "cache", file_root=tmp_path)
    assert path == tmp_path / "cache" / "sha256" / DIGEST
    assert path.read_bytes() == MODEL
    assert [p.name for p in path.parent.iterdir()] == [DIGEST], "no temporary file is left behind"


def test_http_uri_retries_with_backoff_until_the_origin_answers(tmp_path, http_origin):
    handler, origin = http_origin
    handler.failures = 2
    path = fetch(f"{origin}/model", DIGEST, tmp_path, retries=3, backoff=0.01)
    assert path.read_bytes() == MODEL
    assert handler.requests == 3


def test_gives_up_after_the_retries(tmp_path, http_origin):
    handler, origin = http_origin
    handler.failures = 100
    with pytest.raises(FetchError, match="after 3 attempt"):
        fetch(f"{origin}/model", DIGEST, tmp_path, retries=2, backoff=0.01)
    assert not cache_path(tmp_path, DIGEST).exists()


def test_a_404_is_not_retried(tmp_path, http_origin):
    handler, origin = http_origin
    with pytest.raises(FetchError):
        fetch(f"{origin}/missing", DIGEST, tmp_path, retries=5, backoff=0.01)
    assert handler.requests == 1


def test_digest_mismatch_fails_clearly_and_leaves_nothing_servable(tmp_path, http_origin):
    _, origin = http_origin
    wrong = "0" * 64
    with pytest.raises(DigestMismatch, match=f"does not match sha256 {wrong}"):
        fetch(f"{origin}/model", wrong, tmp_path, backoff=0.01)
    assert list((tmp_path / "sha256").iterdir()) == []


def test_a_verified_cached_file_is_not_fetched_again(tmp_path, http_origin):
    handler, origin = http_origin
    fetch(f"{origin}/model", DIGEST, tmp_path)
    fetch(f"{origin}/model", DIGEST, tmp_path)
    assert handler.requests == 1


def test_a_corrupt_cached_file_is_replaced(tmp_path, http_origin):
    handler, origin = http_origin
    path = cache_path(tmp_path, DIGEST)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"truncated")
    fetch(f"{origin}/model", DIGEST, tmp_path)
    assert path.read_bytes() == MODEL
    assert handler.requests == 1


def test_cli_prints_the_path_and_fails_with_a_message(tmp_path):
    source = tmp_path / "model.onnx"
    source.write_bytes(MODEL)
    command = [
        sys.executable,
        "-m",
        "edgeloop_runtime.cli",
        "fetch",
        "--uri",
        source.as_uri(),
        "--cache",
        str(tmp_path),
        "--file-root",
        str(tmp_path),
    ]
    ok = subprocess.run([*command, "--sha256", DIGEST], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert Path(ok.stdout.strip()) == cache_path(tmp_path, DIGEST)
    bad = subprocess.run([*command, "--sha256", "f" * 64], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert f"does not match sha256 {'f' * 64}; nothing was written to the cache" in bad.stderr
    assert DIGEST not in bad.stderr


@pytest.fixture
def https_origin(http_origin, tls_files):
    """The same origin over HTTPS, with a certificate for 127.0.0.1 that no system CA signed."""
    handler, _ = http_origin
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_files.cert, tls_files.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_https_with_the_ca_cert_fetches_and_without_it_fails_at_once(tmp_path, https_origin, tls_files):
    handler, origin = https_origin
    with pytest.raises(FetchError, match="CERTIFICATE_VERIFY_FAILED"):
        fetch(f"{origin}/model", DIGEST, tmp_path / "cache", retries=3, backoff=0.01)
    assert handler.requests == 0, "the handshake failed before any request"
    assert not (tmp_path / "cache" / "sha256" / DIGEST).exists()

    command = [sys.executable, "-m", "edgeloop_runtime.cli", "fetch", "--uri", f"{origin}/model", "--sha256", DIGEST,
               "--cache", str(tmp_path / "cache"), "--ca-cert", str(tls_files.cert)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert cache_path(tmp_path / "cache", DIGEST).read_bytes() == MODEL
