"""The model store under hostile clients (issue 16, items 8 and 9): slow, oversized, lying and concurrent.
After each case the store answers a good request at once, holds no more threads than its cap, and has lost
or corrupted nothing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time

import pytest
from fed_processes import TOKEN, raw_exchange, start_store, status_of, threads_of

LIMITS = [
    "--max-connections", "32", "--idle-timeout", "2", "--header-timeout", "1", "--body-timeout", "1",
    "--min-body-rate", "1000000", "--max-request-line", "1024", "--max-header-bytes", "4096",
    "--max-headers", "20", "--max-bytes", "2000000",
]  # fmt: skip
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = start_store(tmp_path_factory.mktemp("hostile-store"), *LIMITS)
    yield store
    store.stop()


@pytest.fixture
def good_afterwards(store):
    """After the case: a good request answers promptly and nothing was left half-written."""
    yield
    start = time.monotonic()
    assert store.healthy(timeout=3), store.log.read_text()[-2000:]
    assert time.monotonic() - start < 1.0
    assert not list((store.root / "sha256").glob(".partial-*"))


def wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def put_raw_head(port: int, path: str, headers: list[str]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall((f"PUT {path} HTTP/1.1\r\nHost: x\r\n" + "".join(h + "\r\n" for h in headers) + "\r\n").encode())
    return sock


def test_slowloris_holds_no_more_threads_than_the_cap_and_good_requests_get_through(store, good_afterwards):
    baseline = 1  # the serving thread, once earlier cases' connection threads are gone
    assert wait_for(lambda: threads_of(store.proc.pid) == baseline, 3)
    attackers = []
    for _ in range(200):
        sock = socket.create_connection(("127.0.0.1", store.port), timeout=5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Slow: ")  # never finishes its headers
        attackers.append(sock)
    try:
        time.sleep(0.3)
        assert threads_of(store.proc.pid) <= baseline + 32
        start = time.monotonic()  # a newcomer evicts the oldest slow connection
        assert store.healthy(timeout=3)
        assert time.monotonic() - start < 1.0
        time.sleep(1.5)  # past the header deadline: whoever is left was answered 408 and closed
        closed = 0
        for sock in attackers:
            sock.settimeout(0.5)
            try:
                answer = sock.recv(4096)
                closed += answer == b"" or status_of(answer) == 408
            except (TimeoutError, ConnectionResetError):
                closed += 1  # reset by the eviction
        assert closed == len(attackers)
    finally:
        for sock in attackers:
            sock.close()
    assert wait_for(lambda: threads_of(store.proc.pid) == baseline, 3)


def test_trickled_headers_are_cut_at_the_header_deadline_not_per_byte(store, good_afterwards):
    sock = socket.create_connection(("127.0.0.1", store.port), timeout=5)
    start = time.monotonic()
    try:
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
            sock.sendall(bytes([byte]))
            time.sleep(0.1)
    except OSError:
        pass  # closed on us, as it should be
    answer = b""
    with contextlib.suppress(OSError):
        answer = sock.recv(4096)
    sock.close()
    assert time.monotonic() - start < 3.0
    assert answer == b"" or status_of(answer) == 408


def test_idle_connections_are_closed_after_the_idle_timeout(store, good_afterwards):
    socks = [socket.create_connection(("127.0.0.1", store.port), timeout=5) for _ in range(10)]
    time.sleep(2.5)
    for sock in socks:
        assert sock.recv(10) == b""
        sock.close()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(30)) + b"\r\n", 431),
        (b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * (200 << 20) + b"\r\n\r\n", 431),
        (b"BREW /healthz HTTP/1.1\r\n\r\n", 405),
        (b"GET /healthz HTTP/9.9\r\n\r\n", 505),
    ],
    ids=["request-line", "header-bytes", "header-count", "200MiB-header", "method", "version"],
)
def test_oversized_or_malformed_requests_are_refused_from_their_first_bytes(
    store, good_afterwards, request_bytes, status
):
    assert status_of(raw_exchange(store.port, request_bytes)) == status


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (["Content-Length: -1"], 400),
        (["Content-Length: 12abc"], 400),
        (["Content-Length: 5", "Content-Length: 6"], 400),
        ([], 411),
        (["Transfer-Encoding: chunked"], 411),
        (["Content-Length: 2000001"], 413),
    ],
    ids=["negative", "not-a-number", "two-lengths", "missing", "chunked", "too-large"],
)
def test_upload_lengths_are_checked_before_any_byte_of_the_body_is_read(store, good_afterwards, headers, status):
    sock = put_raw_head(store.port, f"/sha256/{'0' * 64}", [f"Authorization: Bearer {TOKEN}", *headers])
    with sock:
        sock.settimeout(1.5)  # less than the idle timeout: the store closes at once, never reading a body
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
        assert status_of(answer) == status, answer


def test_a_trickled_upload_is_cut_at_its_body_deadline_and_leaves_nothing(store, good_afterwards):
    data = os.urandom(100_000)  # deadline: 1 s + 100000 / 1000000 s
    sock = put_raw_head(
        store.port, f"/sha256/{sha(data)}", [f"Authorization: Bearer {TOKEN}", "Content-Length: 100000"]
    )
    start = time.monotonic()
    with sock:
        try:
            for i in range(0, len(data), 1000):
                sock.sendall(data[i : i + 1000])
                time.sleep(0.05)
        except OSError:
            pass
        assert time.monotonic() - start < 3.0
    time.sleep(0.2)
    assert not (store.root / "sha256" / sha(data)).exists()


def test_concurrent_good_duplicate_lying_and_abandoned_uploads(store, good_afterwards):
    good = [os.urandom(300_000) for _ in range(6)]
    same = os.urandom(300_000)
    results: dict[str, int] = {}

    def put(name, path, body, headers=AUTH):
        results[name] = store.request("PUT", path, body, headers, timeout=20)[0]

    def abandon(name, data):
        sock = put_raw_head(
            store.port, f"/sha256/{sha(data)}", [f"Authorization: Bearer {TOKEN}", f"Content-Length: {len(data)}"]
        )
        sock.sendall(data[: len(data) // 2])
        sock.close()
        results[name] = 0

    jobs = [threading.Thread(target=put, args=(f"good{i}", f"/sha256/{sha(d)}", d)) for i, d in enumerate(good)]
    jobs += [threading.Thread(target=put, args=(f"same{i}", f"/sha256/{sha(same)}", same)) for i in range(4)]
    jobs += [
        threading.Thread(target=put, args=(f"lie{i}", f"/sha256/{sha(good[i])}", os.urandom(1000))) for i in range(3)
    ]
    jobs += [threading.Thread(target=put, args=("noauth", f"/sha256/{sha(same)}", same, {}))]
    jobs += [threading.Thread(target=abandon, args=(f"cut{i}", os.urandom(500_000))) for i in range(3)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join(30)
    assert [results[f"good{i}"] for i in range(6)] == [201] * 6
    assert sorted(results[f"same{i}"] for i in range(4)) == [200, 200, 200, 201]
    assert [results[f"lie{i}"] for i in range(3)] == [400] * 3
    assert results["noauth"] == 401
    for data in [*good, same]:
        status, headers, body = store.request("GET", f"/sha256/{sha(data)}")
        assert (status, body, headers["ETag"]) == (200, data, f'"{sha(data)}"')
    stored = {p.name for p in (store.root / "sha256").iterdir()}
    assert {sha(d) for d in [*good, same]} <= stored

    def partials() -> list[str]:
        return [p.name for p in (store.root / "sha256").iterdir() if p.name.startswith(".")]

    # The abandoned uploads' threads notice their closed connections and remove what they wrote.
    assert wait_for(lambda: not partials(), 5), partials()


def test_a_reader_that_stops_reading_is_cut_after_the_idle_timeout(tmp_path):
    store = start_store(tmp_path, "--idle-timeout", "1")
    try:
        data = os.urandom(40 << 20)  # more than the socket buffers of both ends hold
        assert store.request("PUT", f"/sha256/{sha(data)}", data, AUTH, timeout=30)[0] == 201
        baseline = 1  # the serving thread alone, once the upload's connection thread is gone
        assert wait_for(lambda: threads_of(store.proc.pid) == baseline, 3)
        readers = []
        for _ in range(4):
            sock = socket.create_connection(("127.0.0.1", store.port), timeout=5)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(f"GET /sha256/{sha(data)} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            sock.recv(1024)  # the headers, then nothing more is read
            readers.append(sock)
        assert wait_for(lambda: threads_of(store.proc.pid) == baseline + 4, 3)  # blocked on their readers
        start = time.monotonic()
        assert wait_for(lambda: threads_of(store.proc.pid) == baseline, 5), "cut after the idle timeout"
        assert time.monotonic() - start > 0.5
        status, _, body = store.request("GET", f"/sha256/{sha(data)}", timeout=30)
        assert (status, len(body)) == (200, len(data))
        for sock in readers:
            sock.close()
    finally:
        store.stop()
