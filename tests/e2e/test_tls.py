"""TLS by default on the devcluster: the real operator, under its own ServiceAccount and RBAC, issues the
namespace's CA and the runtime Service's certificate, mounts it into the DaemonSets with HTTPS probes,
writes nothing while the certificate is good, and replaces a certificate that is about to expire.

kwok runs no containers, so no TLS handshake happens here: the runtime's HTTPS serving is tested as a
process in tests/runtime; this file tests what the operator writes to the cluster."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
from edgeloop import certs
from edgeloop.render.certificates import revision
from edgeloop.testing import WRITE_VERBS, OperatorProcess, audited_calls, install_service_account, service_account_user

from .conftest import wait_for

ROOT = Path(__file__).parents[2]
EXAMPLE = yaml.safe_load((ROOT / "examples" / "inferencemodel-digits.yaml").read_text())
OPERATOR_NAMESPACE = "edgeloop-e2e-tls"
ACCOUNT = "edgeloop-tls-operator"
OPERATOR_ARGS = ("--resync-seconds", "2", "--coalesce-seconds", "0.5", "--diagnosis-seconds", "2")


@pytest.fixture(scope="module")
def cluster(devcluster, tmp_path_factory):
    devcluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    devcluster.wait_established("inferencemodels.edgeloop.io")
    kubeconfig = install_service_account(devcluster.kubectl, devcluster.kubeconfig, tmp_path_factory.mktemp("tls"),
                                         namespace=OPERATOR_NAMESPACE, name=ACCOUNT)
    yield kubeconfig
    devcluster.kubectl("delete", "clusterrole,clusterrolebinding", ACCOUNT, "--ignore-not-found")
    devcluster.kubectl("delete", "namespace", OPERATOR_NAMESPACE, "--wait=false", "--ignore-not-found")


@pytest.fixture
def operator(devcluster, cluster, namespace, tmp_path):
    process = OperatorProcess(cluster, tmp_path / "operator.log", ("--namespace", namespace, *OPERATOR_ARGS))
    process.start()
    yield process
    devcluster.kubectl("delete", "inferencemodels", "--all", "-n", namespace, "--wait=true")
    wait_for("the model's pods to be gone", lambda: not devcluster.get_json("pods", "-n", namespace)["items"])
    process.stop()
    errors = process.errors()
    assert not errors, f"the operator logged errors: {errors[:3]}"


def secret(devcluster, namespace: str, name: str) -> dict | None:
    found = devcluster.kubectl("get", "secret", name, "-n", namespace, "-o", "json", check=False)
    return json.loads(found.stdout) if found.returncode == 0 else None


def pem(body: dict, key: str) -> str:
    return base64.b64decode(body["data"][key]).decode()


def verify_server(leaf_pem: str, ca_pem: str, name: str, at: dt.datetime) -> None:
    """Raises unless `leaf_pem` is a server certificate for `name` that chains to `ca_pem` at `at`."""
    verifier = PolicyBuilder().store(Store([certs.load_cert(ca_pem)])).time(at).build_server_verifier(
        x509.DNSName(name)
    )
    verifier.verify(certs.load_cert(leaf_pem), [])


def ready(devcluster, namespace: str) -> bool:
    body = devcluster.get_json("inferencemodel", "digits", "-n", namespace)
    current = body.get("status", {}).get("observedGeneration") == body["metadata"]["generation"]
    return current and any(c["type"] == "Ready" and c["status"] == "True" for c in body["status"]["conditions"])


def test_a_model_is_served_over_tls_and_a_near_expiry_certificate_is_rotated(devcluster, namespace, operator):
    devcluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(EXAMPLE))
    ca_secret = wait_for("the namespace's CA", lambda: secret(devcluster, namespace, "edgeloop-ca"))
    tls = wait_for("the runtime's TLS Secret", lambda: secret(devcluster, namespace, "digits-tls"))
    now = dt.datetime.now(dt.UTC)

    # A kubernetes.io/tls Secret with ca.crt, owned by the model; its certificate is the Service's.
    model = devcluster.get_json("inferencemodel", "digits", "-n", namespace)
    assert tls["type"] == "kubernetes.io/tls" and set(tls["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    assert tls["metadata"]["ownerReferences"][0]["uid"] == model["metadata"]["uid"]
    assert pem(tls, "ca.crt") == pem(ca_secret, "tls.crt")
    for name in (f"digits.{namespace}.svc", f"digits.{namespace}.svc.cluster.local"):
        verify_server(pem(tls, "tls.crt"), pem(ca_secret, "tls.crt"), name, now)

    # Every variant mounts it, serves it, probes over HTTPS, and carries its revision.
    wait_for("the model to be Ready", lambda: ready(devcluster, namespace), timeout=90)
    daemon_sets = devcluster.get_json("daemonsets", "-n", namespace)["items"]
    assert len(daemon_sets) == 3
    for ds in daemon_sets:
        template = ds["spec"]["template"]
        [runtime] = template["spec"]["containers"]
        assert {"name": "tls", "secret": {"secretName": "digits-tls", "defaultMode": 0o440}} in template["spec"][
            "volumes"]
        assert runtime["args"][runtime["args"].index("--tls-cert") + 1] == "/etc/edgeloop/tls/tls.crt"
        assert {runtime[p]["httpGet"]["scheme"] for p in ("startupProbe", "livenessProbe", "readinessProbe")} == {
            "HTTPS"}
        assert template["metadata"]["annotations"]["edgeloop.io/tls-revision"] == revision(pem(tls, "tls.crt"))
    for pod in devcluster.get_json("pods", "-n", namespace)["items"]:
        assert pod["spec"]["containers"][0]["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"

    # Idle: several resyncs write no Secret (nor anything else).
    since = time.time()
    time.sleep(8)
    calls = audited_calls(devcluster.run_dir / "audit.log", service_account_user(OPERATOR_NAMESPACE, ACCOUNT), since)
    writes = [f"{c['verb']} {c['requestURI']}" for c in calls if c["verb"] in WRITE_VERBS]
    assert not writes, f"an idle operator wrote: {writes}"
    assert secret(devcluster, namespace, "digits-tls")["metadata"]["resourceVersion"] == tls["metadata"][
        "resourceVersion"]

    # A certificate from the same CA with a week of its 90 days left, as if the operator had been away: it is
    # replaced on the next sync, and the pods roll to the new one.
    ca = certs.KeyPair(pem(ca_secret, "tls.crt"), pem(ca_secret, "tls.key"))
    names = certs.service_dns_names("digits", namespace)
    old = certs.issue(ca, "digits-tls", certs.Usage.SERVER, now - dt.timedelta(days=83), dt.timedelta(days=90), names)
    patch = {"data": {"tls.crt": base64.b64encode(old.cert.encode()).decode(),
                      "tls.key": base64.b64encode(old.key.encode()).decode()}}
    devcluster.kubectl("patch", "secret", "digits-tls", "-n", namespace, "--type=merge", "-p", json.dumps(patch))

    def rotated():
        current = secret(devcluster, namespace, "digits-tls")
        return current if pem(current, "tls.crt") not in (old.cert, pem(tls, "tls.crt")) else None

    renewed = wait_for("the near-expiry certificate to be replaced", rotated, timeout=30)
    assert not certs.needs_rotation(pem(renewed, "tls.crt"), ca.cert, dt.datetime.now(dt.UTC), names)
    verify_server(pem(renewed, "tls.crt"), ca.cert, f"digits.{namespace}.svc", dt.datetime.now(dt.UTC))
    assert secret(devcluster, namespace, "edgeloop-ca")["data"] == ca_secret["data"], "the CA stays"

    def rolled():
        annotations = [ds["spec"]["template"]["metadata"]["annotations"]["edgeloop.io/tls-revision"]
                       for ds in devcluster.get_json("daemonsets", "-n", namespace)["items"]]
        return set(annotations) == {revision(pem(renewed, "tls.crt"))}

    wait_for("the DaemonSets to roll to the new certificate", rolled, timeout=30)

    # The certificate goes with its model; the namespace's CA stays for the next one.
    devcluster.kubectl("delete", "inferencemodel", "digits", "-n", namespace, "--wait=true")
    wait_for("the TLS Secret to be collected", lambda: secret(devcluster, namespace, "digits-tls") is None)
    assert secret(devcluster, namespace, "edgeloop-ca") is not None
