"""The objects behind TLS by default: the CA Secret, a workload's TLS Secret, or a cert-manager Certificate.

Workload Secrets are `kubernetes.io/tls` with `ca.crt` beside `tls.crt` and `tls.key`, the layout
cert-manager writes too, so the templates mount the same files in either mode.
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from edgeloop.certs import KeyPair
from edgeloop.config import TLSConfig
from edgeloop.names import MANAGED_BY, TLS_LABEL
from edgeloop.render import Owner

CA_SECRET = "edgeloop-ca"


def secret_name(workload: str) -> str:
    return f"{workload}-tls"


def revision(cert_pem: str) -> str:
    """Identifies a certificate: pods that mount it roll when it changes, since servers read it at start."""
    return hashlib.sha256(cert_pem.encode()).hexdigest()[:16]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def decode(secret: dict[str, Any], key: str) -> str | None:
    """A key of a Secret's data as text; None when it is absent or not base64."""
    try:
        return base64.b64decode((secret.get("data") or {})[key], validate=True).decode()
    except (KeyError, ValueError, TypeError):
        return None


def ca_secret(namespace: str, ca: KeyPair) -> dict[str, Any]:
    """The namespace's CA. No owner: every workload of the namespace shares it."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": CA_SECRET, "namespace": namespace, "labels": {**MANAGED_BY, TLS_LABEL: "ca"}},
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": _b64(ca.cert), "tls.key": _b64(ca.key), "ca.crt": _b64(ca.cert)},
    }


def tls_secret(
    owner: Owner, name: str, labels: dict[str, str], usage: str, leaf: KeyPair, ca_cert: str
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": {**labels, TLS_LABEL: usage},
            "ownerReferences": [owner.reference()],
        },
        "type": "kubernetes.io/tls",
        "data": {"tls.crt": _b64(leaf.cert), "tls.key": _b64(leaf.key), "ca.crt": _b64(ca_cert)},
    }


def certificate(
    owner: Owner,
    name: str,
    labels: dict[str, str],
    usage: str,
    dns_names: list[str],
    tls: TLSConfig,
    common_name: str | None = None,
) -> dict[str, Any]:
    """A cert-manager Certificate that writes the same Secret the operator would (cert-manager.io/v1)."""
    assert tls.issuer is not None  # TLSConfig validates it for cert-manager mode
    hours = round(tls.cert_validity_days * 24)
    spec: dict[str, Any] = {
        "secretName": name,
        # The labels the operator watches Secrets by, so pods roll when cert-manager renews.
        "secretTemplate": {"labels": {**labels, TLS_LABEL: usage}},
        "commonName": common_name or owner.name,
        "duration": f"{hours}h",
        "renewBefore": f"{hours // 3}h",
        "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
        "usages": ["digital signature", "server auth" if usage == "server" else "client auth"],
        "issuerRef": tls.issuer.model_dump(),
    }
    if dns_names:
        spec["dnsNames"] = dns_names
    return {
        "apiVersion": "cert-manager.io/v1",
        "kind": "Certificate",
        "metadata": {
            "name": name,
            "namespace": owner.namespace,
            "labels": labels,
            "ownerReferences": [owner.reference()],
        },
        "spec": spec,
    }
