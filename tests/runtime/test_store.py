"""`edgeloop-runtime store` as a process on loopback: content addressing, digest check, token, GET/HEAD."""

from __future__ import annotations

import hashlib
import http.client
import os
import ssl
import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
from edgeloop_runtime.fetch import fetch
from edgeloop_runtime.store import upload
from fed_processes import TOKEN, issue_certificates, start_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(base URL, root directory, port) of a running store."""
    running = start_store(tmp_path_factory.mktemp("store"), "--max-bytes", "1000000")
    yield running.base, running.root, running.port
    running.stop()


def _request(port, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, dict(response.getheaders()), response.read()


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


def test_ranges_and_strong_etags(store):
    base, _, port = store
    data = os.urandom(10_000)
    upload(base, data, TOKEN)
    path, etag = f"/sha256/{sha(data)}", f'"{sha(data)}"'
    status, headers, body = _request(port, "GET", path, headers={"Range": "bytes=100-199"})
    assert (status, body, headers["Content-Range"], headers["ETag"]) == (
        206,
        data[100:200],
        "bytes 100-199/10000",
        etag,
    )
    assert headers["Accept-Ranges"] == "bytes"
    status, headers, body = _request(port, "GET", path, headers={"Range": "bytes=9000-"})
    assert (status, body, headers["Content-Length"]) == (206, data[9000:], "1000")
    status, _, body = _request(port, "GET", path, headers={"Range": "bytes=-10"})
    assert (status, body) == (206, data[-10:])
    status, _, body = _request(port, "GET", path, headers={"Range": "bytes=9990-20000"})
    assert (status, body) == (206, data[9990:])
    status, headers, _ = _request(port, "GET", path, headers={"Range": "bytes=10000-"})
    assert (status, headers["Content-Range"]) == (416, "bytes */10000")
    # A range of another version of the resource is not what the client has: the whole blob instead.
    status, _, body = _request(port, "GET", path, headers={"Range": "bytes=0-9", "If-Range": '"' + "0" * 64 + '"'})
    assert (status, body) == (200, data)
    status, _, body = _request(port, "GET", path, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert (status, body) == (206, data[:10])
    status, _, body = _request(port, "GET", path, headers={"Range": "bytes=0-1,5-6"})  # several: ignored
    assert (status, body) == (200, data)
    status, headers, body = _request(port, "GET", path, headers={"If-None-Match": etag})
    assert (status, body, headers["ETag"]) == (304, b"", etag)


def test_store_over_tls_for_uploads_and_fetches(tmp_path):
    tls = issue_certificates(tmp_path / "tls")
    context = ssl.create_default_context(cafile=str(tls["ca"]))
    running = start_store(
        tmp_path, "--tls-cert", str(tls["server"]), "--tls-key", str(tls["server-key"]), context=context
    )
    try:
        data = os.urandom(300_000)
        uri = upload(running.base, data, TOKEN, context=context)
        assert uri.startswith("https://")
        assert fetch(uri, sha(data), tmp_path / "cache", ca_cert=tls["ca"], jitter=0).read_bytes() == data
        status, _, body = running.request("GET", f"/sha256/{sha(data)}", headers={"Range": "bytes=1000-1999"})
        assert (status, body) == (206, data[1000:2000])
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            upload(running.base, b"x", TOKEN)  # the system's CAs do not know the store's
    finally:
        running.stop()
    assert b"(TLS)" in running.log.read_bytes()


def test_tls_cert_without_key_is_refused(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "edgeloop_runtime.cli", "store", "--root", str(tmp_path), "--tls-cert", "x.crt"],
        capture_output=True, env={**os.environ, "EDGELOOP_STORE_TOKEN": "t"}, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2 and b"--tls-cert and --tls-key go together" in result.stderr


def test_refs_are_private_and_written_only_over_the_value_the_writer_saw(store):
    from edgeloop_runtime.store import RefConflict, get_ref, put_ref

    base, root, port = store
    assert get_ref(base, "ns.round.uid-1", TOKEN) is None
    first = put_ref(base, "ns.round.uid-1", b'{"round": 1}', TOKEN, None)
    assert get_ref(base, "ns.round.uid-1", TOKEN) == (b'{"round": 1}', first)
    second = put_ref(base, "ns.round.uid-1", b'{"round": 2}', TOKEN, first)
    with pytest.raises(RefConflict):  # a writer that last saw round 1 (a stale pod) cannot go back
        put_ref(base, "ns.round.uid-1", b'{"round": 1}', TOKEN, first)
    with pytest.raises(RefConflict):  # nor create it again
        put_ref(base, "ns.round.uid-1", b"{}", TOKEN, None)
    assert get_ref(base, "ns.round.uid-1", TOKEN) == (b'{"round": 2}', second)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert _request(port, "GET", "/refs/ns.round.uid-1")[0] == 401
    assert _request(port, "PUT", "/refs/x", b"{}", {"If-None-Match": "*"})[0] == 401
    assert _request(port, "PUT", "/refs/x", b"{}", auth)[0] == 428
    assert _request(port, "PUT", "/refs/x", b"x" * 70_000, {**auth, "If-None-Match": "*"})[0] == 413
    for bad in ("/refs/../token", "/refs/.hidden", "/refs/a/b", "/refs/"):
        assert _request(port, "GET", bad, headers=auth)[0] == 404
    assert sorted(p.name for p in (root / "refs").iterdir()) == ["ns.round.uid-1"]


def test_a_stale_aggregator_cannot_overwrite_the_checkpoint_of_the_one_that_replaced_it(store, tmp_path):
    import numpy as np
    from edgeloop_runtime.federated.checkpoint import Checkpoints, StoreRef, Superseded

    base, _, _ = store
    ref = StoreRef(base, "ns.round.stale", TOKEN)
    old = Checkpoints(tmp_path / "old", ref)
    assert old.load("m") is None
    old.save({"model": "m", "round": 1, "phase": "Running"}, np.zeros(4, np.float32))
    new = Checkpoints(tmp_path / "new", ref)  # the Job's next pod, elsewhere: nothing local
    state, weights, where = new.load("m")
    assert (state["round"], where) == (1, "the store's ref ns.round.stale")
    new.save({**state, "round": 2}, weights + 1)
    with pytest.raises(Superseded):  # the old pod, cut off but still running, finishes its round 2
        old.save({"model": "m", "round": 2, "phase": "Running"}, np.ones(4, np.float32) * 9)
    state, weights, _ = Checkpoints(tmp_path / "third", ref).load("m")
    assert state["round"] == 2 and weights.tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="another model"):
        Checkpoints(tmp_path / "fourth", ref).load("other")
