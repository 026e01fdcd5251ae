"""The operator's client of a FederatedRound aggregator: one GET of its status report (FEDERATED.md).

With TLS (the default) the aggregator requires a client certificate (mTLS): the operator presents the
round's, trusts the namespace's CA, and verifies the certificate for the aggregator Service's name
wherever the URL points (an operator outside the cluster reaches the Service through another address).
Whatever goes wrong, the caller sees one error, AggregatorUnreachable, whose message says what.

Blocking; the handler calls it through `asyncio.to_thread`.
"""

from __future__ import annotations

import functools
import http.client
import os
import ssl
import tempfile
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

from edgeloop.status.federatedround import AggregatorReport, parse_report

TIMEOUT_SECONDS = 3.0

# Straight to the Service: a proxy from the environment would not know cluster names.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class AggregatorUnreachable(Exception):
    """No status report could be read from the aggregator: the message says why."""


@dataclass(frozen=True)
class ClientTLS:
    """mTLS for a status read: the namespace CA, the client certificate, and the name the aggregator's
    server certificate must carry (its Service's, wherever the URL points)."""

    ca: str
    cert: str
    key: str
    server_name: str


def read_report(url: str, tls: ClientTLS | None = None) -> AggregatorReport:
    """The aggregator's report at `url`; raises AggregatorUnreachable."""
    try:
        return parse_report(_read(url, tls))
    except (OSError, http.client.HTTPException, ValueError) as error:  # ssl.SSLError is an OSError
        raise AggregatorUnreachable(f"GET {url}: {error}") from error


def _read(url: str, tls: ClientTLS | None) -> str:
    if tls is None:
        with _direct.open(url, timeout=TIMEOUT_SECONDS) as response:
            return response.read().decode()
    parts = urlsplit(url)
    connection = _ServerNameHTTPS(
        parts.hostname or "", parts.port or 443, tls.server_name, _client_context(tls.ca, tls.cert, tls.key)
    )
    try:
        connection.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""))
        response = connection.getresponse()
        body = response.read().decode()
        if response.status != 200:
            raise http.client.HTTPException(f"HTTP {response.status}: {body[:200]}")
        return body
    finally:
        connection.close()


class _ServerNameHTTPS(http.client.HTTPSConnection):
    """HTTPS to host:port, verifying the certificate for `server_name` rather than for the host."""

    def __init__(self, host: str, port: int, server_name: str, context: ssl.SSLContext):
        super().__init__(host, port, timeout=TIMEOUT_SECONDS, context=context)
        self._server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_name)  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=64)
def _client_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca)
    with tempfile.TemporaryDirectory() as directory:  # load_cert_chain reads files only
        path = os.path.join(directory, "client.pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as file:
            file.write(cert + key)
        context.load_cert_chain(path)
    return context
