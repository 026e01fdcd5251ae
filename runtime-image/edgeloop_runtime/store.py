"""`edgeloop-runtime store`: a content-addressed model store over HTTP(S), on a volume.

    GET  /sha256/<hex>   the blob (ETag "<hex>"); 404 if absent
    HEAD /sha256/<hex>   the same headers, no body
    PUT  /sha256/<hex>   needs `Authorization: Bearer <token>`; the body is streamed to a temporary file
                         while hashed, and renamed into place only if its sha256 is <hex> (201; 200 if
                         already stored); a mismatch is 400 and leaves nothing behind
    GET  /healthz

Blobs live at <root>/sha256/<hex>, the same layout as the nodes' model cache, so a URI
http://store:8000/sha256/<hex> with sha256 <hex> is all an InferenceModel needs.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import re
import tempfile
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger("edgeloop_runtime.store")

CHUNK = 1 << 20
BLOB_PATH = re.compile(r"^/sha256/([0-9a-f]{64})$")


def blob_path(root: Path, sha256: str) -> Path:
    return root / "sha256" / sha256


def make_handler(root: Path, token: str, max_bytes: int):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "edgeloop-store"

        def log_message(self, fmt, *args):
            log.info("%s " + fmt, self.address_string(), *args)

        def _plain(self, code: int, text: str) -> None:
            body = (text + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _blob(self) -> tuple[str, Path] | None:
            match = BLOB_PATH.match(self.path)
            if not match:
                self._plain(404, "not found: blobs live at /sha256/<64 lowercase hex digits>")
                return None
            return match[1], blob_path(root, match[1])

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            if self.path == "/healthz":
                return self._plain(200, "ok")
            found = self._blob()
            if found is None:
                return
            sha, path = found
            if not path.is_file():
                return self._plain(404, f"no blob sha256/{sha}")
            with open(path, "rb") as f:  # blobs are only ever added, never removed, so this open succeeds
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
                self.send_header("ETag", f'"{sha}"')
                self.send_header("Cache-Control", "public, max-age=31536000, immutable")
                self.end_headers()
                if self.command == "GET":
                    while chunk := f.read(CHUNK):
                        self.wfile.write(chunk)

        def do_PUT(self):
            found = self._blob()
            if found is None:
                return
            sha, path = found
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                self.close_connection = True  # the body is not read
                return self._plain(401, "uploading needs Authorization: Bearer <token>")
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self.close_connection = True
                return self._plain(411, "Content-Length required")
            if int(length) > max_bytes:
                self.close_connection = True
                return self._plain(413, f"blob larger than {max_bytes} bytes")
            created = self._receive(int(length), sha, path)
            if created is None:
                return self._plain(400, f"body does not have sha256 {sha}; nothing stored")
            self._plain(201 if created else 200, f"/sha256/{sha}")

        def _receive(self, length: int, sha: str, path: Path) -> bool | None:
            """Stream the body to a temporary file; True if stored now, False if it was there, None if the
            digest did not match."""
            path.parent.mkdir(parents=True, exist_ok=True)
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
                        out.write(chunk)
                        remaining -= len(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                if digest.hexdigest() != sha:
                    return None
                if path.exists():
                    return False
                os.chmod(name, 0o444)
                os.replace(name, path)  # atomic: a reader sees no blob or the whole verified one
                log.info("stored sha256/%s (%d bytes)", sha, length)
                return True
            finally:
                Path(name).unlink(missing_ok=True)

    return Handler


def make_server(
    root: Path, token: str, host: str, port: int, tls=None, max_bytes: int = 4 << 30
) -> ThreadingHTTPServer:
    """The store's server, bound (its `server_address` has the port) but not yet serving."""
    if not token:
        raise ValueError("the store needs an upload token")
    (root / "sha256").mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer((host, port), make_handler(root, token, max_bytes))
    server.daemon_threads = True
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    return server


def upload(base_url: str, data: bytes, token: str | None, timeout: float = 60.0) -> str:
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
    with urllib.request.urlopen(request, timeout=timeout):
        pass  # urlopen raises on anything but 2xx
    return uri


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
    parser.add_argument("--max-bytes", type=int, default=4 << 30, help="largest blob accepted (default 4 GiB)")
    parser.add_argument("--tls-cert", help="certificate (PEM): serve HTTPS")
    parser.add_argument("--tls-key", help="private key (PEM)")


def run(args: argparse.Namespace) -> int:
    from .federated.transport import server_context

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = args.token_file.read_text().strip() if args.token_file else os.environ.get("EDGELOOP_STORE_TOKEN", "")
    if not token:
        log.error("no upload token: pass --token-file or set EDGELOOP_STORE_TOKEN")
        return 2
    server = make_server(
        args.root, token, args.host, args.port, server_context(args.tls_cert, args.tls_key, None), args.max_bytes
    )
    log.info("serving %s on %s:%d", args.root, *server.server_address[:2])
    server.serve_forever()
    return 0
