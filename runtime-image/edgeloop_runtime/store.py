"""`edgeloop-runtime store`: a content-addressed model store over HTTP(S), on a volume.

    GET  /sha256/<hex>   the blob: strong ETag "<hex>", Range (one range: 206, 416), If-Range, If-None-Match
                         (304); sent with sendfile(2), never copied through Python on plain HTTP
    HEAD /sha256/<hex>   the same headers, no body
    PUT  /sha256/<hex>   needs `Authorization: Bearer <token>`; the body is streamed to a temporary file
                         while hashed, and renamed into place only if its sha256 is <hex> (201; 200 if
                         already stored); a mismatch is 400 and leaves nothing behind
    GET  /refs/<name>    a small mutable value (the federated aggregator's checkpoint), ETag "<its sha256>";
    PUT  /refs/<name>    both need the token; PUT needs If-Match: "<etag>" (replace exactly that value) or
                         If-None-Match: * (create): 412 otherwise, so two writers cannot overwrite each other
    GET  /healthz

Blobs live at <root>/sha256/<hex>, the same layout as the nodes' model cache, so a URI
http://store:8000/sha256/<hex> with sha256 <hex> is all an InferenceModel needs. Every connection, header,
body and timeout is bounded (bounded_http.Limits, from flags).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import hmac
import logging
import os
import re
import ssl
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path

from . import bounded_http
from .bounded_http import BoundedHandler, BoundedHTTPServer, Limits, Refused
from .termination import stop_on_sigterm

log = logging.getLogger("edgeloop_runtime.store")

CHUNK = 1 << 20
BLOB_PATH = re.compile(r"^/sha256/([0-9a-f]{64})$")
RANGE = re.compile(r"^bytes=([0-9]*)-([0-9]*)$")
REF_PATH = re.compile(r"^/refs/([A-Za-z0-9][A-Za-z0-9._-]{0,252})$")
MAX_REF_BYTES = 64 << 10
DEFAULT_LIMITS = Limits(max_body_bytes=4 << 30, body_budget=0)


def blob_path(root: Path, sha256: str) -> Path:
    return root / "sha256" / sha256


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single `Range: bytes=…` request, None to send the whole blob (no Range, or
    one this store ignores as RFC 9110 allows: several ranges, or malformed); Refused(416) if unsatisfiable."""
    match = RANGE.match(header.strip()) if header else None
    if match is None or match[1] == match[2] == "":
        return None
    if match[1] == "":  # the last N bytes
        n = _position(match[2])
        if n == 0:
            raise Refused(416, "empty suffix range")
        return max(0, size - n), size - 1
    first = _position(match[1])
    last = min(_position(match[2]), size - 1) if match[2] else size - 1
    if first > last or first >= size:
        raise Refused(416, f"range {header[:64]} is outside the blob's {size} bytes")
    return first, last


def _position(digits: str) -> int:
    """A byte position of a Range header; one beyond any blob when it has more digits than int() takes."""
    return int(digits) if len(digits) <= 18 else 1 << 62


class StoreHandler(BoundedHandler):
    server_version = "edgeloop-store"
    root: Path
    token: str

    def log_message(self, fmt, *args):
        log.info("%s " + fmt, self.address_string(), *args)

    def _plain(self, code: int, text: str, headers: dict[str, str] | None = None) -> None:
        body = (text + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def refuse_body(self, status: int, message: str) -> None:
        size = getattr(self, "refused_size", None)
        self._plain(status, message, {"Content-Range": f"bytes */{size}"} if status == 416 and size else None)

    def _blob(self) -> tuple[str, Path]:
        match = BLOB_PATH.match(self.path)
        if not match:
            raise Refused(404, "not found: blobs live at /sha256/<64 lowercase hex digits>")
        return match[1], blob_path(self.root, match[1])

    def do_HEAD(self):
        self.do_GET()

    def _authorized(self) -> None:
        given = self.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
            raise Refused(401, "needs Authorization: Bearer <token>")

    def do_GET(self):
        if self.path == "/healthz":
            return self._plain(200, "ok")
        if self.path.startswith("/refs/"):
            return self._get_ref()
        sha, path = self._blob()
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed below; blobs are never removed, so an open one stays whole
        except FileNotFoundError:
            return self._plain(404, f"no blob sha256/{sha}")
        with f:
            size = os.fstat(f.fileno()).st_size
            etag = f'"{sha}"'
            headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "public, max-age=31536000, immutable"}
            if etag in _etags(self.headers.get("If-None-Match")) or self.headers.get("If-None-Match") == "*":
                self.send_response(304)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                return
            if_range = self.headers.get("If-Range")
            self.refused_size = size
            wanted = parse_range(self.headers.get("Range"), size) if if_range in (None, etag) else None
            first, last = wanted or (0, size - 1)
            self.send_response(206 if wanted else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(last - first + 1))
            if wanted:
                self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command == "GET" and last >= first:
                self.send_file(f, first, last - first + 1)

    def do_PUT(self):
        if self.path.startswith("/refs/"):
            return self._put_ref()
        sha, path = self._blob()
        self._authorized()
        length = self.expect_body()
        created = self._receive(length, sha, path)
        if created is None:
            return self._plain(400, f"body does not have sha256 {sha}; nothing stored")
        self._plain(201 if created else 200, f"/sha256/{sha}")

    def _receive(self, length: int, sha: str, path: Path) -> bool | None:
        """Stream the body to a temporary file; True if stored now, False if it was there, None if the
        digest did not match."""
        digest = hashlib.sha256()
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=".partial-")
        try:
            with os.fdopen(handle, "wb") as out:
                remaining = length
                while remaining:
                    chunk = self.rfile.read(min(CHUNK, remaining))
                    if not chunk:
                        raise ConnectionError("client closed the connection mid-upload")
                    digest.update(chunk)
                    _write(out, chunk)
                    remaining -= len(chunk)
                out.flush()
                os.fsync(out.fileno())
            if digest.hexdigest() != sha:
                return None
            os.chmod(name, 0o444)
            try:
                # Atomic, and only one of concurrent uploads of one blob creates it (201; the others 200): a
                # reader sees no blob or the whole verified one.
                os.link(name, path)
            except FileExistsError:
                return False
            log.info("stored sha256/%s (%d bytes)", sha, length)
            return True
        finally:
            Path(name).unlink(missing_ok=True)

    # --- refs ------------------------------------------------------------------------------------------------

    def _ref(self) -> Path:
        match = REF_PATH.match(self.path)
        if not match:
            raise Refused(404, "refs live at /refs/<name: letters, digits, . _ -, up to 253>")
        self._authorized()
        return self.root / "refs" / match[1]

    def _get_ref(self) -> None:
        path = self._ref()
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return self._plain(404, f"no ref {path.name}")
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(data)

    def _put_ref(self) -> None:
        path = self._ref()
        expected, create = self.headers.get("If-Match"), self.headers.get("If-None-Match") == "*"
        if expected is None and not create:
            raise Refused(428, 'a ref is written with If-Match: "<etag>" or If-None-Match: *')
        data = self.rfile.read(self.expect_body(MAX_REF_BYTES))
        with self.refs_lock:  # compare and swap
            try:
                current = f'"{hashlib.sha256(path.read_bytes()).hexdigest()}"'
            except FileNotFoundError:
                current = None
            if (create and current is not None) or (not create and current != expected):
                return self._plain(412, f"ref {path.name} is {current or 'absent'}, not {expected or 'absent'}")
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f".partial-{path.name}")
            with open(tmp, "wb") as out:
                _write(out, data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        etag = f'"{hashlib.sha256(data).hexdigest()}"'
        self._plain(200 if current else 201, path.name, {"ETag": etag})


def _etags(header: str | None) -> set[str]:
    return {tag.strip().removeprefix("W/") for tag in header.split(",")} if header else set()


def _write(out, chunk: bytes) -> None:
    try:
        out.write(chunk)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise Refused(507, "the store's volume is full") from error
        raise


def make_server(
    root: Path, token: str, host: str, port: int, tls: ssl.SSLContext | None = None, limits: Limits = DEFAULT_LIMITS
) -> BoundedHTTPServer:
    """The store's server, bound (its `server_address` has the port) but not yet serving."""
    if not token:
        raise ValueError("the store needs an upload token")
    blobs = root / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for stale in blobs.glob(".partial-*"):  # uploads cut off by a previous process (one store per volume)
        stale.unlink(missing_ok=True)
    for stale in (root / "refs").glob(".partial-*"):
        stale.unlink(missing_ok=True)
    handler = type("Handler", (StoreHandler,), {"root": root, "token": token, "refs_lock": threading.Lock()})
    return BoundedHTTPServer((host, port), handler, limits, tls)


def upload(
    base_url: str, data: bytes, token: str | None, timeout: float = 60.0, context: ssl.SSLContext | None = None
) -> str:
    """PUT `data` into the store at `base_url`; returns the blob's URI."""
    if not token:
        raise ValueError("uploading to the store needs a token")
    uri = f"{base_url.rstrip('/')}/sha256/{hashlib.sha256(data).hexdigest()}"
    request = urllib.request.Request(
        uri,
        data=data,
        method="PUT",
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/octet-stream"},
    )
    with urllib.request.urlopen(request, timeout=timeout, context=context):
        pass  # urlopen raises on anything but 2xx
    return uri


class RefConflict(Exception):
    """The ref is not the value this writer last saw: another writer moved it."""


def get_ref(base_url: str, name: str, token: str, timeout: float = 30.0, context=None) -> tuple[bytes, str] | None:
    """(value, etag) of a ref, or None when there is none."""
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}/refs/{name}", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.read(MAX_REF_BYTES + 1), response.headers["ETag"]
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return None
        raise


def put_ref(
    base_url: str, name: str, data: bytes, token: str, etag: str | None, timeout: float = 30.0, context=None
) -> str:
    """Replace the ref whose value has `etag` (None: create it); its new etag. RefConflict if it moved."""
    headers = {"Authorization": f"Bearer {token}", **({"If-Match": etag} if etag else {"If-None-Match": "*"})}
    request = urllib.request.Request(f"{base_url.rstrip('/')}/refs/{name}", data=data, method="PUT", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.headers["ETag"]
    except urllib.error.HTTPError as error:
        if error.code == 412:
            raise RefConflict(error.read().decode(errors="replace").strip()) from error
        raise


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("/var/lib/edgeloop/store"),
        help="the volume; blobs go to ROOT/sha256/<hex> (default %(default)s)",
    )
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--token-file", type=Path, help="file holding the upload bearer token (default: $EDGELOOP_STORE_TOKEN)"
    )
    parser.add_argument("--tls-cert", help="certificate (PEM): serve HTTPS")
    parser.add_argument("--tls-key", help="private key (PEM)")
    bounded_http.add_arguments(parser, DEFAULT_LIMITS, body_flag="--max-bytes")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = args.token_file.read_text().strip() if args.token_file else os.environ.get("EDGELOOP_STORE_TOKEN", "")
    if not token:
        log.error("no upload token: pass --token-file or set EDGELOOP_STORE_TOKEN")
        return 2
    if bool(args.tls_cert) != bool(args.tls_key):
        log.error("--tls-cert and --tls-key go together")
        return 2
    limits = bounded_http.from_args(args, DEFAULT_LIMITS)
    server = make_server(
        args.root, token, args.host, args.port, bounded_http.server_context(args.tls_cert, args.tls_key, None), limits
    )
    log.info("serving %s on %s:%d%s", args.root, *server.server_address[:2], " (TLS)" if args.tls_cert else "")
    stop_on_sigterm()
    server.serve_forever()
    return 0
