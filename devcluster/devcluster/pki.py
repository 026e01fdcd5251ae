"""The devcluster's certificates: one CA, the apiserver's serving certificate, a client certificate
per component, and the ServiceAccount token signing key."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=30)
# The first address of the service range: the `kubernetes` Service, which pods use to reach the apiserver.
APISERVER_SERVICE_IP = "10.96.0.1"
APISERVER_DNS_NAMES = [
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
]

# Component client identities. Kubernetes' bootstrap RBAC binds the system:kube-* users; kwok and the
# admin get system:masters, as kubeadm's admin.conf does.
CLIENTS = {
    "admin": ("kubernetes-admin", ["system:masters"]),
    "kube-controller-manager": ("system:kube-controller-manager", []),
    "kube-scheduler": ("system:kube-scheduler", []),
    "kwok": ("kwok-controller", ["system:masters"]),
    "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", ["system:masters"]),
}


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _name(common_name: str, organizations: list[str] = ()) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    return x509.Name([*attributes, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
    )


def _load_ca(directory: Path):
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    return ca_cert, ca_key


def issue(directory: Path, stem: str, subject: x509.Name, usage, sans: list[x509.GeneralName] = ()) -> None:
    """Write <stem>.{crt,key}, signed by the CA in `directory`."""
    ca_cert, ca_key = _load_ca(directory)
    key = _new_key()
    builder = _builder(subject, ca_cert.subject, key.public_key()).add_extension(
        x509.ExtendedKeyUsage([usage]), critical=False
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    _write_key(directory / f"{stem}.key", key)
    (directory / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def issue_client(directory: Path, stem: str, user: str, groups: list[str] = ()) -> None:
    issue(directory, stem, _name(user, groups), ExtendedKeyUsageOID.CLIENT_AUTH)


def issue_server(directory: Path, stem: str, common_name: str, dns_names: list[str], ips: list[str]) -> None:
    sans = [x509.DNSName(name) for name in dns_names] + [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    issue(directory, stem, _name(common_name), ExtendedKeyUsageOID.SERVER_AUTH, sans)


def write_pki(directory: Path, service_ip: str = APISERVER_SERVICE_IP, extra_ips: list[str] = ()) -> None:
    """Write ca.{crt,key}, apiserver.{crt,key}, <client>.{crt,key} and sa.{key,pub} into `directory`.

    `service_ip` is the `kubernetes` Service's address; `extra_ips` are further addresses the apiserver
    serves on (the real nodes' bridge gateway)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = _new_key()
    ca_name = _name("edgeloop-devcluster-ca")
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(directory / "ca.key", ca_key)
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))

    issue_server(directory, "apiserver", "kube-apiserver", APISERVER_DNS_NAMES, ["127.0.0.1", service_ip, *extra_ips])
    for stem, (user, groups) in CLIENTS.items():
        issue_client(directory, stem, user, groups)

    sa_key = _new_key()
    _write_key(directory / "sa.key", sa_key)
    (directory / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def write_kubeconfig(path: Path, server: str, pki_dir: Path, client: str) -> None:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "devcluster", "cluster": {
            "server": server, "certificate-authority": str(pki_dir / "ca.crt")}}],
        "users": [{"name": client, "user": {
            "client-certificate": str(pki_dir / f"{client}.crt"),
            "client-key": str(pki_dir / f"{client}.key")}}],
        "contexts": [{"name": "devcluster", "context": {"cluster": "devcluster", "user": client}}],
        "current-context": "devcluster",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
