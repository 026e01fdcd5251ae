"""`edgeloop-runtime fetch`: bring a model into the node's content-addressed cache, verified.

The file is streamed to `sha256/.partial-<hex>` in the cache directory while its sha256 is computed, and
renamed to `sha256/<hex>` only when the digest of the whole file matches: a file at that path is always the
right one. Everything an origin can make it spend is bounded: bytes (`max_bytes`, also against a declared
Content-Length), time (`deadline` for the whole fetch, retries included) and patience (a download slower than
`min_rate` over any `timeout` window is cut). A download cut off, by the network or by a killed process,
resumes with `Range` from what the partial file holds. One fetch per digest at a time: the partial file is
locked while written, so concurrent fetches of one model on a node download it once, and partial files that
no one holds (left by killed fetches of other models) are removed.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import http.client
import logging
import os
import random
import re
import ssl
import stat
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

log = logging.getLogger("edgeloop_runtime.fetch")

DEFAULT_CACHE = "/var/lib/edgeloop/models"
DEFAULT_MAX_BYTES = 4 << 30  # the store's default largest blob
CHUNK = 1 << 20
PARTIAL = ".partial-"


class FetchError(Exception):
    """The fetch failed for good: reported, exit 1."""


class DigestMismatch(FetchError):
    pass


class Interrupted(FetchError):
    """Attempts or time ran out on a download that may go on: its partial file stays for the next fetch."""


class _Retry(Exception):
    """This attempt failed in a way another attempt may not: a short body, a stall, a 5xx."""


@dataclass(frozen=True)
class Bounds:
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout: float = 60.0  # socket timeout, and the window over which min_rate is measured
    min_rate: int = 16 << 10  # bytes per second
    deadline: float = 3600.0  # seconds for the whole fetch


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


def _mismatch(uri: str, expected: str, size: int) -> DigestMismatch:
    # The digest of what was read is not told: it would disclose the hash of any file the fetcher can read.
    return DigestMismatch(
        f"{uri}: the content ({size} bytes) does not match sha256 {expected}; nothing was written to the cache"
    )


def _too_large(uri: str, size: int, max_bytes: int) -> FetchError:
    return FetchError(f"{uri} is {size} bytes, more than --max-bytes {max_bytes}; nothing was written to the cache")


# --- the partial file: locked, resumable ------------------------------------------------------------------


class _Partial:
    """`sha256/.partial-<hex>`, opened and locked (waiting for another fetch of the same digest if need be)."""

    def __init__(self, directory: Path, expected: str, until: float):
        self.path = directory / f"{PARTIAL}{expected}"
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > until:
                        os.close(fd)
                        raise FetchError(
                            f"another fetch of sha256 {expected} held the download past the deadline"
                        ) from None
                    time.sleep(0.05)
            try:  # the holder may have renamed it into place meanwhile: then it is the blob, not ours
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.fd = fd
        self.file = os.fdopen(fd, "r+b")
        self.sha = hashlib.sha256()

    def restart(self) -> None:
        self.file.seek(0)
        self.file.truncate()
        self.sha = hashlib.sha256()

    def size(self) -> int:
        self.file.flush()
        return os.fstat(self.fd).st_size

    def hash_existing(self) -> None:
        """Start the running sha256 from what the partial already holds (left by an earlier fetch)."""
        self.sha = hashlib.sha256()
        self.file.seek(0)
        while chunk := self.file.read(CHUNK):
            self.sha.update(chunk)

    def append(self, chunk: bytes) -> None:
        self.sha.update(chunk)
        self.file.write(chunk)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.file.close()

    def commit(self, destination: Path) -> None:
        self.file.flush()
        os.fsync(self.fd)
        os.fchmod(self.fd, 0o444)
        os.replace(self.path, destination)  # atomic: readers see no file or the whole verified file
        self.file.close()


def remove_stale_partials(directory: Path, keep: str) -> int:
    """Remove partial files that no fetch holds (left by killed fetches of other models; `keep`'s is resumed);
    the count removed."""
    removed = 0
    for path in directory.glob(f"{PARTIAL}*"):
        if path.name == f"{PARTIAL}{keep}":
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()
                removed += 1
        except (BlockingIOError, FileNotFoundError):
            pass  # a live fetch holds it, or it just became a blob
        finally:
            os.close(fd)
    return removed


# --- sources ----------------------------------------------------------------------------------------------


def _copy_file(uri: str, partial: _Partial, bounds: Bounds, file_root: Path | None) -> None:
    """A file:// URI, only a regular file under `file_root` (after symlinks), at most max_bytes."""
    parsed = urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        raise FetchError(f"{uri}: file:// URIs name a local path (no host)")
    if file_root is None:
        raise FetchError(f"{uri}: file:// URIs need --file-root, the directory they may be read from")
    root = os.path.realpath(file_root)
    try:  # O_NONBLOCK: a FIFO must not block the open; what is opened is checked, not what a path resolved to
        fd = os.open(unquote(parsed.path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise FetchError(f"{uri}: {error.strerror}") from error
    try:
        opened, info = os.readlink(f"/proc/self/fd/{fd}"), os.fstat(fd)
        if os.path.commonpath([root, opened]) != root:
            raise FetchError(f"{uri} is outside --file-root {file_root}")
        if not stat.S_ISREG(info.st_mode):
            raise FetchError(f"{uri} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as source:
        if info.st_size > bounds.max_bytes:
            raise _too_large(uri, info.st_size, bounds.max_bytes)
        partial.restart()
        size = 0
        while chunk := source.read(CHUNK):
            size += len(chunk)
            if size > bounds.max_bytes:  # it grew while read
                raise _too_large(uri, size, bounds.max_bytes)
            partial.append(chunk)


class _HTTPOnly(urllib.request.HTTPRedirectHandler):
    """Redirects only to http(s), never from https down to http."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urlparse(req.full_url).scheme, urlparse(newurl).scheme
        if new not in ("http", "https") or (old == "https" and new == "http"):
            raise FetchError(f"{req.full_url}: refusing a redirect to {newurl}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def _download(uri: str, partial: _Partial, bounds: Bounds, until: float, context, state: dict) -> None:
    """One HTTP(S) attempt, appending to `partial` from its current size (Range)."""
    have = partial.size()
    headers = {"User-Agent": "edgeloop-runtime", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if state.get("etag"):
            headers["If-Range"] = state["etag"]
    opener = urllib.request.build_opener(_HTTPOnly, urllib.request.HTTPSHandler(context=context))
    left = until - time.monotonic()
    if left <= 0:
        raise Interrupted(f"fetching {uri}: deadline of {bounds.deadline:g} s passed")
    try:
        response = opener.open(urllib.request.Request(uri, headers=headers), timeout=min(bounds.timeout, left))
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:  # our partial is not a prefix of what the origin has now
            partial.restart()
            raise _Retry(f"{uri} refused the range from byte {have}") from error
        raise
    with response:
        total = _expected_total(uri, response, have, partial)
        have = partial.size()
        etag = response.headers.get("ETag", "")
        if etag and not etag.startswith("W/"):
            state["etag"] = etag
        if total is not None and total > bounds.max_bytes:
            raise _too_large(uri, total, bounds.max_bytes)
        window_start, window_bytes = time.monotonic(), 0
        partial.file.seek(have)
        while True:
            if time.monotonic() > until:
                raise Interrupted(f"fetching {uri}: deadline of {bounds.deadline:g} s passed after {have} bytes")
            try:
                chunk = response.read1(CHUNK) if hasattr(response, "read1") else response.read(CHUNK)
            except http.client.IncompleteRead as short:
                chunk = short.partial
                if not chunk:
                    break
            if not chunk:
                break
            have += len(chunk)
            if have > bounds.max_bytes:
                raise _too_large(uri, have, bounds.max_bytes)
            partial.append(chunk)
            window_bytes += len(chunk)
            elapsed = time.monotonic() - window_start
            if elapsed >= bounds.timeout:
                if window_bytes < bounds.min_rate * elapsed:
                    raise _Retry(f"{uri} sent {window_bytes} bytes in {elapsed:.1f} s, slower than --min-rate")
                window_start, window_bytes = time.monotonic(), 0
    if total is not None and have < total:
        raise _Retry(f"{uri} ended after {have} of {total} bytes")


def _expected_total(uri: str, response, have: int, partial: _Partial) -> int | None:
    """The whole file's size if the origin says it; restarts the partial when the origin sends all of it."""
    length = response.headers.get("Content-Length")
    length = int(length) if length and length.isdigit() else None
    if response.status == 206:
        match = CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if match is None or int(match[1]) != have:
            raise _Retry(f"{uri} answered a range other than the one asked for")
        return int(match[3]) if match[3] != "*" else None
    if have:  # 200: the whole file again
        partial.restart()
    return length


def _retryable(error: Exception) -> bool:
    if isinstance(error, _Retry):
        return True
    if isinstance(error, urllib.error.HTTPError):
        return error.code in (408, 429) or error.code >= 500
    if isinstance(getattr(error, "reason", error), ssl.SSLCertVerificationError):
        return False  # an untrusted certificate stays untrusted
    return isinstance(error, OSError | http.client.HTTPException)  # refused/reset, timeouts, DNS, bad status


# --- the whole fetch ----------------------------------------------------------------------------------------


def fetch(
    uri: str,
    sha256: str,
    cache: Path,
    *,
    retries: int = 5,
    timeout: float = 60.0,
    backoff: float = 1.0,
    ca_cert: Path | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    deadline: float = 3600.0,
    min_rate: int = 16 << 10,
    file_root: Path | None = None,
    jitter: float = 0.0,
) -> Path:
    """The verified model's path in the cache, fetching it unless a verified copy is already there."""
    expected = sha256.lower()
    if len(expected) != 64 or any(c not in "0123456789abcdef" for c in expected):
        raise FetchError(f"--sha256 must be 64 hex digits, got {sha256!r}")
    bounds = Bounds(max_bytes, timeout, min_rate, deadline)
    until = time.monotonic() + deadline
    destination = cache_path(cache, expected)
    if _verified(destination, expected):
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    if removed := remove_stale_partials(destination.parent, keep=expected):
        log.info("removed %d partial file(s) left by killed fetches", removed)
    scheme = urlparse(uri).scheme
    if scheme not in ("http", "https", "file"):
        raise FetchError(f"unsupported URI scheme {scheme!r} in {uri}: use http, https or file")
    if scheme != "file" and jitter > 0:  # many nodes start at once in a rollout: spread their first requests
        time.sleep(random.uniform(0, jitter))
    partial = _Partial(destination.parent, expected, until)
    try:
        if _verified(destination, expected):  # another fetch of the same model finished while we waited
            partial.discard()
            return destination
        if scheme == "file":
            _copy_file(uri, partial, bounds, file_root)
        else:
            context = tls_context(ca_cert) if scheme == "https" else None
            _fetch_http(uri, expected, partial, bounds, until, context, retries, backoff)
        if partial.sha.hexdigest() != expected:
            raise _mismatch(uri, expected, partial.size())
        partial.commit(destination)
    except Interrupted:
        partial.file.close()  # kept: the next fetch of this model resumes it
        raise
    except Exception:
        partial.discard()
        raise
    log.info("fetched %s into %s", uri, destination)
    return destination


def _verified(destination: Path, expected: str) -> bool:
    if not destination.exists():
        return False
    if file_sha256(destination) == expected:
        log.info("%s is cached and verified", destination)
        return True
    log.warning("%s is corrupt: fetching it again", destination)
    destination.unlink(missing_ok=True)
    return False


def _fetch_http(uri, expected, partial, bounds, until, context, retries, backoff) -> None:
    """Attempts until the whole file is there; a digest mismatch after resuming a partial that an earlier
    process left is worth one whole download, since that partial may be what was wrong."""
    resumed = partial.size() > 0
    if resumed:
        log.info("resuming %s from byte %d", uri, partial.size())
        partial.hash_existing()
    state: dict = {}
    attempt = 0
    while True:
        try:
            _download(uri, partial, bounds, until, context, state)
            if partial.sha.hexdigest() == expected or not resumed:
                return
            log.warning("%s: the resumed download does not match; fetching it whole", uri)
            resumed = False
            partial.restart()
            continue
        except FetchError:
            raise
        except Exception as error:
            if not _retryable(error):
                raise FetchError(f"fetching {uri} failed after {attempt + 1} attempt(s): {error}") from error
            if attempt >= retries:
                raise Interrupted(f"fetching {uri} failed after {attempt + 1} attempt(s): {error}") from error
            delay = min(backoff * 2**attempt, 30.0) * random.uniform(0.5, 1.0)
            if time.monotonic() + delay > until:
                raise Interrupted(f"fetching {uri}: deadline of {bounds.deadline:g} s passed: {error}") from error
            log.warning("fetching %s failed (%s); retrying in %.1fs from byte %d", uri, error, delay, partial.size())
            time.sleep(delay)
            attempt += 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--uri", required=True, help="http://, https:// or file:// URI of the model")
    parser.add_argument("--sha256", required=True, help="expected sha256 (64 hex digits)")
    parser.add_argument("--cache", type=Path, default=Path(DEFAULT_CACHE), help="cache directory (default %(default)s)")
    parser.add_argument("--retries", type=int, default=5, help="retries after the first attempt (default %(default)s)")
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="socket timeout, and --min-rate's window, in seconds (default 60)"
    )
    parser.add_argument(
        "--ca-cert",
        type=Path,
        help="also trust this CA (PEM) for https:// URIs, e.g. the CA of an in-cluster store's certificate",
    )
    parser.add_argument(
        "--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="largest model accepted (default 4 GiB)"
    )
    parser.add_argument(
        "--deadline", type=float, default=3600.0, help="seconds for the whole fetch, retries included (default 3600)"
    )
    parser.add_argument(
        "--min-rate",
        type=int,
        default=16 << 10,
        help="bytes/s: a download slower than this over a --timeout window is cut and resumed (default 16384)",
    )
    parser.add_argument(
        "--file-root", type=Path, help="file:// URIs may name regular files under this directory only (default: none)"
    )
    parser.add_argument(
        "--jitter",
        type=float,
        default=1.0,
        help="wait a random 0..S seconds before the first request, so many nodes do not start at once (default 1)",
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        path = fetch(
            args.uri,
            args.sha256,
            args.cache,
            retries=args.retries,
            timeout=args.timeout,
            ca_cert=args.ca_cert,
            max_bytes=args.max_bytes,
            deadline=args.deadline,
            min_rate=args.min_rate,
            file_root=args.file_root,
            jitter=args.jitter,
        )
    except FetchError as error:
        log.error("%s", error)
        return 1
    print(path)
    return 0
