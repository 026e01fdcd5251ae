"""`fetch` against lying and hostile origins (issue 16, items 3 and 11; issue 13 §3): endless and lying bodies,
trickling and cut-off servers, paths outside the allowed root. Nothing unbounded lands in the node's cache,
cut-off downloads resume where they stopped, and a good fetch works afterwards."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from edgeloop_runtime.fetch import DigestMismatch, FetchError, fetch

MODEL = os.urandom(1 << 20)
DIGEST = hashlib.sha256(MODEL).hexdigest()


class Origin(BaseHTTPRequestHandler):
    """Serves MODEL honestly at /model (with Range), and lies at the other paths."""

    protocol_version = "HTTP/1.1"
    log: list[tuple[str, str | None, int]]  # (path, Range header, bytes sent)
    in_flight: list[str]  # paths being answered: a client may have its answer before the log has the entry
    behaviour: dict

    def log_message(self, *args):
        pass

    def _head(self, status: int, headers: dict) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()

    def _send(self, data: bytes) -> int:
        try:
            self.wfile.write(data)
            return len(data)
        except OSError:
            return 0

    def do_GET(self):
        sent = 0
        wanted = self.headers.get("Range")
        self.in_flight.append(self.path)
        try:
            if self.path == "/endless":  # chunked, never ends
                self._head(200, {"Transfer-Encoding": "chunked"})
                chunk = b"%x\r\n%s\r\n" % (1 << 16, b"\0" * (1 << 16))
                while self._send(chunk):
                    sent += 1 << 16
            elif self.path == "/huge":  # says how large it is
                self._head(200, {"Content-Length": str(50 << 30)})
                sent = self._send(b"\0" * (1 << 16))
            elif self.path == "/trickle":  # 100 bytes per 0.1 s, forever
                self._head(200, {"Content-Length": str(len(MODEL))})
                for i in range(0, len(MODEL), 100):
                    if not self._send(MODEL[i : i + 100]):
                        break
                    sent += 100
                    time.sleep(0.1)
            elif self.path in ("/model", "/cut", "/wrong"):
                data = os.urandom(len(MODEL)) if self.path == "/wrong" else MODEL
                first = 0
                match = re.fullmatch(r"bytes=(\d+)-", wanted or "")
                if match and self.behaviour.get("ranges", True):
                    first = int(match[1])
                    self._head(206, {"Content-Length": str(len(data) - first), "ETag": '"v1"',
                                     "Content-Range": f"bytes {first}-{len(data) - 1}/{len(data)}"})  # fmt: skip
                else:
                    self._head(200, {"Content-Length": str(len(data)), "ETag": '"v1"'})
                body = data[first:]
                cuts = self.behaviour.setdefault("cuts", 0)
                if self.path == "/cut" and cuts < self.behaviour.get("max_cuts", 1):
                    self.behaviour["cuts"] = cuts + 1
                    body = body[: len(data) // 2 - first] if first < len(data) // 2 else body[: len(body) // 2]
                    sent = self._send(body)
                    self.close_connection = True
                    return
                sent = self._send(body)
            else:
                self._head(404, {"Content-Length": "0"})
        finally:
            self.log.append((self.path, wanted, sent))
            self.in_flight.remove(self.path)


@pytest.fixture
def origin():
    handler = type("Handler", (Origin,), {"log": [], "behaviour": {}, "in_flight": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def served(handler) -> list[tuple[str, str | None, int]]:
    """The origin's log once every request it began is logged (a fetch may end before its handler does)."""
    deadline = time.monotonic() + 5
    while handler.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    return handler.log


def leftovers(cache) -> list[str]:
    directory = cache / "sha256"
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_an_endless_chunked_body_stops_at_the_maximum_size_and_leaves_nothing(tmp_path, origin):
    _, base = origin
    start = time.monotonic()
    with pytest.raises(FetchError, match="more than --max-bytes 2000000"):
        fetch(f"{base}/endless", DIGEST, tmp_path, max_bytes=2_000_000, backoff=0.01)
    assert time.monotonic() - start < 5
    assert leftovers(tmp_path) == []


def test_a_declared_size_above_the_maximum_is_refused_before_the_body(tmp_path, origin):
    handler, base = origin
    with pytest.raises(FetchError, match=f"{50 << 30} bytes, more than --max-bytes 2000000"):
        fetch(f"{base}/huge", DIGEST, tmp_path, max_bytes=2_000_000, backoff=0.01)
    assert len(served(handler)) == 1, "not retried"
    assert leftovers(tmp_path) == []


def test_a_trickling_server_is_cut_off_and_the_deadline_ends_the_fetch(tmp_path, origin):
    _, base = origin
    start = time.monotonic()
    with pytest.raises(FetchError, match=r"deadline|slower than"):
        fetch(f"{base}/trickle", DIGEST, tmp_path, timeout=1, min_rate=10_000, deadline=3, backoff=0.01)
    assert time.monotonic() - start < 5
    # What did arrive is kept for the next fetch of this model to resume; nothing is in the cache.
    assert leftovers(tmp_path) == [f".partial-{DIGEST}"]


def test_a_body_cut_short_is_resumed_with_range_not_reported_as_a_mismatch(tmp_path, origin):
    handler, base = origin
    path = fetch(f"{base}/cut", DIGEST, tmp_path, backoff=0.01)
    assert path.read_bytes() == MODEL
    (first, _, sent_first), (second, wanted, sent_second) = served(handler)
    assert (first, second) == ("/cut", "/cut")
    assert wanted == f"bytes={sent_first}-"
    assert sent_first + sent_second == len(MODEL), "nothing transferred twice"
    assert leftovers(tmp_path) == [DIGEST]


def test_a_server_that_ignores_ranges_is_read_again_from_the_start(tmp_path, origin):
    handler, base = origin
    handler.behaviour["ranges"] = False
    assert fetch(f"{base}/cut", DIGEST, tmp_path, backoff=0.01).read_bytes() == MODEL
    assert [sent for _, _, sent in served(handler)] == [len(MODEL) // 2, len(MODEL)]


def test_a_download_cut_many_times_still_completes_within_its_retries(tmp_path, origin):
    handler, base = origin
    handler.behaviour["max_cuts"] = 4
    assert fetch(f"{base}/cut", DIGEST, tmp_path, retries=5, backoff=0.01).read_bytes() == MODEL
    assert sum(sent for _, _, sent in served(handler)) == len(MODEL)


def test_a_partial_left_by_a_killed_fetch_is_resumed_and_stale_ones_are_removed(tmp_path, origin):
    handler, base = origin
    directory = tmp_path / "sha256"
    directory.mkdir()
    (directory / f".partial-{DIGEST}").write_bytes(MODEL[:300_000])  # this digest's, from a killed fetch
    (directory / ".partial-abc123").write_bytes(b"\0" * 100_000)  # an old one of another fetch
    assert fetch(f"{base}/model", DIGEST, tmp_path, backoff=0.01).read_bytes() == MODEL
    assert served(handler) == [("/model", "bytes=300000-", len(MODEL) - 300_000)]
    assert leftovers(tmp_path) == [DIGEST]


def test_a_resumed_partial_that_was_corrupt_is_fetched_again_whole(tmp_path, origin):
    handler, base = origin
    directory = tmp_path / "sha256"
    directory.mkdir()
    (directory / f".partial-{DIGEST}").write_bytes(os.urandom(300_000))
    assert fetch(f"{base}/model", DIGEST, tmp_path, backoff=0.01).read_bytes() == MODEL
    assert [wanted for _, wanted, _ in served(handler)] == ["bytes=300000-", None]


def test_a_mismatch_does_not_disclose_the_digest_of_what_was_read(tmp_path, origin):
    _, base = origin
    with pytest.raises(DigestMismatch) as mismatch:
        fetch(f"{base}/wrong", DIGEST, tmp_path, backoff=0.01)
    assert DIGEST in str(mismatch.value)
    assert not re.search(r"[0-9a-f]{64}", str(mismatch.value).replace(DIGEST, ""))
    assert leftovers(tmp_path) == []


def test_file_uris_are_read_only_under_the_allowed_root(tmp_path):
    root = tmp_path / "files"
    root.mkdir()
    (root / "model.onnx").write_bytes(MODEL)
    (root / "escape").symlink_to("/etc/hostname")
    os.mkfifo(root / "fifo")
    cache = tmp_path / "cache"
    assert fetch((root / "model.onnx").as_uri(), DIGEST, cache, file_root=root).read_bytes() == MODEL
    for uri, message in [
        ("file:///dev/zero", "outside --file-root"),
        ((root / "escape").as_uri(), "outside --file-root"),
        ((root / ".." / "files" / ".." / "cache").as_uri(), "outside --file-root"),
        ((root / "fifo").as_uri(), "not a regular file"),
    ]:
        with pytest.raises(FetchError, match=message):
            fetch(uri, "0" * 64, cache, file_root=root)
    with pytest.raises(FetchError, match="file:// URIs need --file-root"):
        fetch((root / "model.onnx").as_uri(), "0" * 64, cache)
    assert leftovers(cache) == [DIGEST]


def test_a_file_larger_than_the_maximum_is_refused(tmp_path):
    (tmp_path / "big").write_bytes(MODEL)
    with pytest.raises(FetchError, match="more than --max-bytes 1000"):
        fetch((tmp_path / "big").as_uri(), DIGEST, tmp_path / "cache", file_root=tmp_path, max_bytes=1000)
    assert leftovers(tmp_path / "cache") == []


def test_sigterm_mid_download_leaves_a_partial_that_the_next_run_resumes(tmp_path, origin):
    handler, base = origin
    command = [sys.executable, "-m", "edgeloop_runtime.cli", "fetch", "--uri", f"{base}/trickle", "--sha256", DIGEST,
               "--cache", str(tmp_path), "--jitter", "0"]  # fmt: skip
    proc = subprocess.Popen(command, stderr=subprocess.PIPE)
    partial = tmp_path / "sha256" / f".partial-{DIGEST}"
    end = time.monotonic() + 20
    while not (partial.exists() and partial.stat().st_size > 0) and time.monotonic() < end:
        time.sleep(0.05)
    proc.terminate()
    proc.wait(10)
    have = partial.stat().st_size
    assert 0 < have < len(MODEL)
    assert fetch(f"{base}/model", DIGEST, tmp_path, backoff=0.01).read_bytes() == MODEL
    assert [wanted for path, wanted, _ in served(handler) if path == "/model"] == [f"bytes={have}-"]


def test_many_fetches_of_one_model_at_once_download_it_once(tmp_path, origin):
    handler, base = origin
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(fetch(f"{base}/model", DIGEST, tmp_path, backoff=0.01)))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 6 and all(p.read_bytes() == MODEL for p in results)
    assert len(served(handler)) == 1
    assert leftovers(tmp_path) == [DIGEST]


def test_the_first_attempt_is_spread_by_jitter(tmp_path, origin):
    _, base = origin
    started = []
    for i in range(4):
        start = time.monotonic()
        fetch(f"{base}/model", DIGEST, tmp_path / str(i), jitter=0.4)
        started.append(time.monotonic() - start)
    assert max(started) - min(started) > 0.02  # uniform in [0, 0.4): four draws are not all alike
    assert max(started) < 2


def test_a_redirect_to_another_scheme_is_refused(tmp_path):
    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", "file:///etc/hostname")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(FetchError, match=r"(?i)redirect"):
            fetch(f"http://127.0.0.1:{server.server_address[1]}/m", DIGEST, tmp_path, backoff=0.01, retries=0)
    finally:
        server.shutdown()
        server.server_close()


def test_connection_refused_is_retried_until_the_deadline(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(FetchError):
        fetch(f"http://127.0.0.1:{port}/m", DIGEST, tmp_path, retries=100, backoff=0.2, deadline=1.5)
    assert time.monotonic() - start < 3
