"""TLS Secrets: the operator's own CA per namespace and the certificates it signs, kept valid.

Called from a workload's sync, so the InferenceModel resync (every minute by default) is also the rotation
check. The Secrets are known from a Kopf index fed by a watch of the Secrets labelled edgeloop.io/tls
(handlers/shared.py), so a certificate with time left costs no API call at all. When the index says a
certificate must be replaced, the live Secret is read first: a write of this operator that the watch has
not shown yet is not repeated.

Why a CA per namespace: the operator may be granted Secrets only in the namespaces it watches (a namespaced
install), and a CA key kept beside its workloads can only sign for that namespace's trust domain.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from edgeloop import certs
from edgeloop.config import TLSConfig
from edgeloop.kube import KubeApi, kind_of
from edgeloop.render import Owner, render_hash
from edgeloop.render.certificates import (
    CA_SECRET,
    ca_secret,
    certificate,
    decode,
    revision,
    tls_secret,
)

log = logging.getLogger(__name__)

SECRET = kind_of("v1", "Secret")

Key = tuple[str, str]  # (namespace, name) of a Secret


class Certificates:
    """One per operator, shared by every workload kind: `secrets` is the index of the TLS Secrets."""

    def __init__(
        self,
        tls: TLSConfig,
        kube: KubeApi,
        secrets: Mapping[Key, Any],
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ):
        self._tls, self._kube, self._secrets, self._now = tls, kube, secrets, now
        # Per namespace: the read (or creation) of its CA Secret in progress.
        self._ca_flights: dict[str, asyncio.Future[certs.KeyPair]] = {}
        # cert-manager mode: the render hash of each Certificate applied by this process. It owns them all,
        # so one apply per process and content is enough, and watching Certificates (a CRD that operator
        # mode must not need) is not.
        self._applied: dict[Key, str] = {}

    async def ensure(
        self,
        owner: Owner,
        name: str,
        labels: dict[str, str],
        usage: certs.Usage,
        dns_names: list[str],
        common_name: str | None = None,
    ) -> str:
        """Makes Secret `name` hold a valid certificate, for `common_name` when given (a client's identity,
        else the owner's name); returns its revision ("" until one exists)."""
        key = (owner.namespace, name)
        if self._tls.mode == "cert-manager":
            manifest = certificate(owner, name, labels, _usage(usage), dns_names, self._tls, common_name)
            if self._applied.get(key) != (digest := render_hash(manifest)):
                await asyncio.to_thread(self._kube.apply, manifest)
                log.info("applied Certificate %s/%s", *key)
                self._applied[key] = digest
            cert = decode(self._indexed(key) or {}, "tls.crt")
            return revision(cert) if cert else ""

        ca = await self._ca(owner.namespace)
        now = self._now()
        leaf = decode(self._indexed(key) or {}, "tls.crt")
        if certs.needs_rotation(leaf, ca.cert, now, dns_names, common_name=common_name):
            leaf = decode(await self._live(key) or {}, "tls.crt")
        if certs.needs_rotation(leaf, ca.cert, now, dns_names, common_name=common_name):
            validity = timedelta(days=self._tls.cert_validity_days)
            pair = certs.issue(ca, common_name or name, usage, now, validity, dns_names)
            await asyncio.to_thread(self._kube.apply, tls_secret(owner, name, labels, _usage(usage), pair, ca.cert))
            log.info("issued the certificate in Secret %s/%s", *key)
            leaf = pair.cert
        assert leaf is not None
        return revision(leaf)

    def stored(self, namespace: str, name: str) -> Stored | None:
        """What Secret `name` holds as the watch shows it (no API call); None until it holds a certificate."""
        secret = self._indexed((namespace, name)) or {}
        ca, cert, key = (decode(secret, k) for k in ("ca.crt", "tls.crt", "tls.key"))
        return Stored(ca, cert, key) if ca and cert and key else None

    async def _ca(self, namespace: str) -> certs.KeyPair:
        ca = _pair(self._indexed((namespace, CA_SECRET)))
        if not certs.ca_needs_rotation(ca, self._now()):
            assert ca is not None
            return ca
        # Every sync that finds no valid CA in the index meanwhile (a burst of new workloads, of any kind)
        # waits for one read, and at most one write, of the CA Secret: one CA per namespace, and no queue
        # of reads behind a lock.
        if (flight := self._ca_flights.get(namespace)) is None:
            flight = self._ca_flights[namespace] = asyncio.ensure_future(self._read_or_create_ca(namespace))
            flight.add_done_callback(lambda _: self._ca_flights.pop(namespace, None))
        return await asyncio.shield(flight)

    async def _read_or_create_ca(self, namespace: str) -> certs.KeyPair:
        key = (namespace, CA_SECRET)
        now = self._now()
        ca = _pair(await self._live(key))
        if certs.ca_needs_rotation(ca, now):
            ca = certs.new_ca(f"edgeloop-ca.{namespace}", now, timedelta(days=self._tls.ca_validity_days))
            await asyncio.to_thread(self._kube.apply, ca_secret(namespace, ca))
            log.info("created the CA in Secret %s/%s", *key)
        assert ca is not None
        return ca

    def _indexed(self, key: Key) -> dict[str, Any] | None:
        return next(iter(self._secrets.get(key, [])), None)

    async def _live(self, key: Key) -> dict[str, Any] | None:
        return await asyncio.to_thread(self._kube.get, SECRET, *key)


@dataclass(frozen=True)
class Stored:
    """A certificate Secret's files, as PEM text."""

    ca: str
    cert: str
    key: str


def _usage(usage: certs.Usage) -> str:
    return usage.name.lower()


def _pair(secret: dict[str, Any] | None) -> certs.KeyPair | None:
    cert, key = decode(secret or {}, "tls.crt"), decode(secret or {}, "tls.key")
    return certs.KeyPair(cert, key) if cert and key else None
