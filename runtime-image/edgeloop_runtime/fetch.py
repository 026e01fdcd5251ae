"""`edgeloop-runtime fetch`: bring a model into the node's content-addressed cache, verified.

The file is streamed to a temporary file in the cache directory while its sha256 is computed, and
renamed to `sha256/<hex>` only when the digest matches: a file at that path is always the right one.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

log = logging.getLogger("edgeloop_runtime.fetch")

DEFAULT_CACHE = "/var/lib/edgeloop/models"
CHUNK = 1 << 20


class FetchError(Exception):
    pass


class DigestMismatch(FetchError):
    pass


def cache_path(cache: Path, sha256: str) -> Path:
    return Path(cache) / "sha256" / sha256.lower()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tls_context(ca_cert: Path | None) -> ssl.SSLContext:
    """The system's trusted CAs, plus `ca_cert`: an in-cluster store's CA is trusted without losing public origins."""
    context = ssl.create_default_context()
    if ca_cert is not None:
        context.load_verify_locations(cafile=ca_cert)
    return context


def _open(uri: str, timeout: float, ca_cert: Path | None = None):
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return open(unquote(parsed.path), "rb")
    if parsed.scheme in ("http", "https"):
        request = urllib.request.Request(uri, headers={"User-Agent": "edgeloop-runtime"})
        context = tls_context(ca_cert) if parsed.scheme == "https" else None
        return urllib.request.urlopen(request, timeout=timeout, context=context)
    raise FetchError(f"unsupported URI scheme {parsed.scheme!r} in {uri}: use http, https or file")


def _download(uri: str, expected: str, directory: Path, timeout: float, ca_cert: Path | None) -> Path:
    """Streams into a temporary file beside the destination; returns it once its digest is verified."""
    digest = hashlib.sha256()
    handle, name = tempfile.mkstemp(dir=directory, prefix=".partial-")
    tmp = Path(name)
    try:
        with os.fdopen(handle, "wb") as out, _open(uri, timeout, ca_cert) as source:
            while chunk := source.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != expected:
            raise DigestMismatch(
                f"{uri} has sha256 {digest.hexdigest()}, expected {expected}; nothing was written to the cache"
            )
        return tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _retryable(error: Exception) -> bool:
    if isinstance(error, urllib.error.HTTPError):
        return error.code in (408, 429) or error.code >= 500
    if isinstance(getattr(error, "reason", error), ssl.SSLCertVerificationError):
        return False  # an untrusted certificate stays untrusted
    return isinstance(error, OSError)  # connection refused/reset, timeouts, DNS


def fetch(
    uri: str,
    sha256: str,
    cache: Path,
    *,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 1.0,
    ca_cert: Path | None = None,
) -> Path:
    """The verified model's path in the cache, fetching it unless a verified copy is already there."""
    expected = sha256.lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise FetchError(f"--sha256 must be 64 hex digits, got {sha256!r}")
    destination = cache_path(cache, expected)
    if destination.exists():
        if file_sha256(destination) == expected:
            log.info("%s is cached and verified", destination)
            return destination
        log.warning("%s is corrupt: fetching it again", destination)
        destination.unlink()
    destination.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        try:
            tmp = _download(uri, expected, destination.parent, timeout, ca_cert)
            break
        except FetchError:  # a digest mismatch or bad URI: retrying cannot help
            raise
        except Exception as error:
            if attempt == retries or not _retryable(error):
                raise FetchError(f"fetching {uri} failed after {attempt + 1} attempt(s): {error}") from error
            delay = min(backoff * 2**attempt, 30.0) * random.uniform(0.5, 1.0)
            log.warning("fetching %s failed (%s); retrying in %.1fs", uri, error, delay)
            time.sleep(delay)
    tmp.chmod(0o444)
    os.replace(tmp, destination)  # atomic: readers see no file or the whole verified file
    log.info("fetched %s into %s", uri, destination)
    return destination


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--uri", required=True, help="http://, https:// or file:// URI of the model")
    parser.add_argument("--sha256", required=True, help="expected sha256 (64 hex digits)")
    parser.add_argument("--cache", type=Path, default=Path(DEFAULT_CACHE), help="cache directory (default %(default)s)")
    parser.add_argument("--retries", type=int, default=5, help="retries after the first attempt (default %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds (default %(default)s)")
    parser.add_argument(
        "--ca-cert",
        type=Path,
        help="also trust this CA (PEM) for https:// URIs, e.g. the CA of an in-cluster store's certificate",
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = fetch(
            args.uri, args.sha256, args.cache, retries=args.retries, timeout=args.timeout, ca_cert=args.ca_cert
        )
    except FetchError as error:
        log.error("%s", error)
        return 1
    print(path)
    return 0
