"""Helpers for the store, fetch and federated tests: the real runtime commands as processes on loopback,
a CA with server and per-client certificates, raw sockets for what well-behaved clients never send."""

from __future__ import annotations

import contextlib
import datetime
import http.client
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TOKEN = "test-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def runtime(*args: str, log: Path, env: dict | None = None) -> subprocess.Popen:
    out = open(log, "wb")  # noqa: SIM115 - the process owns it until it exits
    return subprocess.Popen(
        [sys.executable, "-m", "edgeloop_runtime.cli", *args],
        stdout=out,
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


@dataclass
class Store:
    proc: subprocess.Popen
    port: int
    root: Path
    log: Path
    context: ssl.SSLContext | None = None

    @property
    def base(self) -> str:
        return f"{'https' if self.context else 'http'}://127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 10):
        """(status, headers, body) of one exchange on a fresh connection."""
        if self.context:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, timeout=timeout, context=self.context)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def healthy(self, timeout: float = 10) -> bool:
        try:
            return self.request("GET", "/healthz", timeout=timeout)[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_store(directory: Path, *args: str, context: ssl.SSLContext | None = None) -> Store:
    root = directory / "store"
    token_file = directory / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    log = directory / f"store-{port}.log"
    proc = runtime(
        "store", "--root", str(root), "--host", "127.0.0.1", "--port", str(port), "--token-file", str(token_file),
        *args, log=log,
    )  # fmt: skip
    store = Store(proc, port, root, log, context)
    end = time.monotonic() + 20
    while not store.healthy(timeout=2):
        if proc.poll() is not None or time.monotonic() > end:
            store.stop()
            raise RuntimeError(f"the store did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return store


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send `data` as is on a new connection; everything the server answers until it closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close before reading everything
            sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else 0


def issue_certificates(directory: Path, clients: list[str] | tuple[str, ...] = ("client",)) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and one client certificate per name (CN = the name), all
    signed by the CA; files["ca"], files["server"], files["server-key"], files[name], files[f"{name}-key"]."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(name, key, issuer_name, issuer_key, ca=False, san=None, usage=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeloop test CA")])
    files = {}
    pem = serialization.Encoding.PEM
    directory.mkdir(parents=True, exist_ok=True)
    files["ca"] = directory / "ca.crt"
    files["ca"].write_bytes(certificate("edgeloop test CA", ca_key, ca_name, ca_key, ca=True).public_bytes(pem))
    leaves = [
        ("server", "server", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))], ExtendedKeyUsageOID.SERVER_AUTH)
    ] + [(name, name, None, ExtendedKeyUsageOID.CLIENT_AUTH) for name in clients]
    for role, cn, san, usage in leaves:
        key = ec.generate_private_key(ec.SECP256R1())
        files[role] = directory / f"{role}.crt"
        files[role].write_bytes(certificate(cn, key, ca_name, ca_key, san=san, usage=usage).public_bytes(pem))
        files[f"{role}-key"] = directory / f"{role}.key"
        files[f"{role}-key"].write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
    return files
