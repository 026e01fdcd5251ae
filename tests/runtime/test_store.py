"""`edgeloop-runtime store` as a process on loopback: content addressing, digest check, token, GET/HEAD."""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest
from edgeloop_runtime.fetch import fetch
from edgeloop_runtime.store import upload

TOKEN = "test-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(base URL, root directory) of a running store."""
    root = tmp_path_factory.mktemp("store")
    token_file = root.parent / "token"
    token_file.write_text(TOKEN + "\n")
    port = _free_port()
    log = open(root.parent / "store.log", "wb")  # noqa: SIM115 - the process owns it until it exits
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgeloop_runtime.cli",
            "store",
            "--root",
            str(root),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--token-file",
            str(token_file),
            "--max-bytes",
            "1000000",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    end = time.monotonic() + 20
    while _request(port, "GET", "/healthz") is None:
        assert proc.poll() is None and time.monotonic() < end, (root.parent / "store.log").read_text()
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", root, port
    proc.terminate()
    proc.wait(10)


def _request(port, method, path, body=None, headers=None):
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    except OSError:
        return None


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_put_get_head_round_trip(store):
    base, root, port = store
    data = os.urandom(4096)
    uri = upload(base, data, TOKEN)
    assert uri == f"{base}/sha256/{sha(data)}"
    assert (root / "sha256" / sha(data)).read_bytes() == data
    status, headers, body = _request(port, "GET", f"/sha256/{sha(data)}")
    assert (status, body, headers["ETag"]) == (200, data, f'"{sha(data)}"')
    status, headers, body = _request(port, "HEAD", f"/sha256/{sha(data)}")
    assert (status, headers["Content-Length"], body) == (200, "4096", b"")


def test_putting_the_same_blob_again_is_idempotent(store):
    _, _, port = store
    data = b"same bytes"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert _request(port, "PUT", f"/sha256/{sha(data)}", data, auth)[0] == 201
    assert _request(port, "PUT", f"/sha256/{sha(data)}", data, auth)[0] == 200


def test_upload_without_the_right_token_is_refused(store):
    base, root, port = store
    data = b"model bytes"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        assert _request(port, "PUT", f"/sha256/{sha(data)}", data, headers)[0] == 401
    with pytest.raises(urllib.error.HTTPError):
        upload(base, data, "wrong")
    assert not (root / "sha256" / sha(data)).exists()


def test_a_body_that_does_not_match_its_digest_is_rejected_and_leaves_nothing(store):
    _, root, port = store
    claimed = sha(b"the real model")
    status, _, _ = _request(port, "PUT", f"/sha256/{claimed}", b"something else", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 400
    assert sorted(p.name for p in (root / "sha256").iterdir() if p.name.startswith(".")) == []
    assert not (root / "sha256" / claimed).exists()


def test_oversized_blobs_missing_blobs_and_bad_paths(store):
    _, _, port = store
    auth = {"Authorization": f"Bearer {TOKEN}"}
    # The store answers 413 from the headers alone and closes without reading the body, so send only
    # the headers: a client still writing the body may see the reset before the answer.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("PUT", f"/sha256/{'0' * 64}")
    conn.putheader("Authorization", auth["Authorization"])
    conn.putheader("Content-Length", "1000001")
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    assert _request(port, "GET", f"/sha256/{'0' * 64}")[0] == 404
    assert _request(port, "HEAD", f"/sha256/{'0' * 64}")[0] == 404
    for path in ("/sha256/ABC", "/sha256/../token", f"/sha512/{'0' * 64}", "/"):
        assert _request(port, "GET", path)[0] == 404


def test_nodes_fetch_store_uris_into_their_verified_cache(store, tmp_path):
    base, _, _ = store
    data = os.urandom(1000)
    uri = upload(base, data, TOKEN)
    path = fetch(uri, sha(data), tmp_path / "cache")
    assert path == tmp_path / "cache" / "sha256" / sha(data)
    assert Path(path).read_bytes() == data


def test_the_store_refuses_to_start_without_a_token(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "EDGELOOP_STORE_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "edgeloop_runtime.cli", "store", "--root", str(tmp_path), "--port", "0"],
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 2 and b"no upload token" in result.stderr
