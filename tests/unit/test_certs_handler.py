"""The TLS Secrets' reconciliation (edgeloop.handlers.certificates) against a recording fake API server."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from edgeloop import certs, config
from edgeloop.handlers.certificates import Certificates
from edgeloop.render.certificates import CA_SECRET, decode, revision
from edgeloop.render.inferencemodel import labels, owner_of
from edgeloop.testing import FakeKube

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
OWNER = owner_of("digits", "edge", "uid-digits")
NAMES = certs.service_dns_names("digits", "edge")


class Watched(FakeKube):
    """The API server, and `index`: the TLS Secrets as the watch has delivered them so far."""

    def __init__(self):
        super().__init__()
        self.index: dict[tuple[str, str], list[dict]] = {}

    def catch_up(self):
        self.index.clear()
        self.index.update(self.indexed("Secret"))


@pytest.fixture
def clock():
    return [NOW]


def controller(kube: Watched, clock, **tls) -> Certificates:
    return Certificates(config.build({"tls": tls}).tls, kube, kube.index, now=lambda: clock[0])


def ensure(tls: Certificates) -> str:
    return asyncio.run(tls.ensure(OWNER, "digits-tls", labels("digits"), certs.Usage.SERVER, NAMES))


def leaf(kube: Watched) -> str:
    return decode(kube.objects[("Secret", "edge", "digits-tls")], "tls.crt")


def test_first_sync_creates_the_ca_and_a_server_certificate_it_signed(clock):
    kube = Watched()
    assert ensure(controller(kube, clock)) == revision(leaf(kube))
    assert kube.calls == [("get", "secrets", CA_SECRET), ("apply", "Secret", CA_SECRET),
                          ("get", "secrets", "digits-tls"), ("apply", "Secret", "digits-tls")]
    secret = kube.objects[("Secret", "edge", "digits-tls")]
    assert secret["type"] == "kubernetes.io/tls" and set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    assert secret["metadata"]["ownerReferences"] == [OWNER.reference()], "deleted with its InferenceModel"
    ca = kube.objects[("Secret", "edge", CA_SECRET)]
    assert "ownerReferences" not in ca["metadata"], "shared by the namespace's workloads"
    assert decode(secret, "ca.crt") == decode(ca, "tls.crt")
    assert not certs.needs_rotation(leaf(kube), decode(ca, "tls.crt"), NOW, NAMES)


def test_a_valid_certificate_costs_no_call_and_a_lagging_watch_no_write(clock):
    kube = Watched()
    tls = controller(kube, clock)
    ensure(tls)
    kube.calls.clear()
    ensure(tls)  # the watch has not delivered the Secrets yet: read, but not written again
    assert [call[0] for call in kube.calls] == ["get", "get"]
    kube.catch_up()
    kube.calls.clear()
    clock[0] = NOW + dt.timedelta(days=59)
    ensure(tls)
    assert kube.calls == [], "idle: no API call at all"


def test_a_burst_of_first_syncs_reads_and_creates_the_ca_once(clock):
    """Fifty new workloads at once, before the watch shows any Secret: one CA, read once, and every
    certificate signed by it."""
    kube = Watched()
    tls = controller(kube, clock)
    owners = [owner_of(f"m{i}", "edge", f"uid-{i}") for i in range(50)]

    async def burst():
        return await asyncio.gather(*(
            tls.ensure(owner, f"{owner.name}-tls", labels(owner.name), certs.Usage.SERVER,
                       certs.service_dns_names(owner.name, "edge"))
            for owner in owners))

    asyncio.run(burst())
    ca_calls = [call for call in kube.calls if call[2] == CA_SECRET]
    assert ca_calls == [("get", "secrets", CA_SECRET), ("apply", "Secret", CA_SECRET)]
    ca = decode(kube.objects[("Secret", "edge", CA_SECRET)], "tls.crt")
    assert all(decode(kube.objects[("Secret", "edge", f"{o.name}-tls")], "ca.crt") == ca for o in owners)


def test_rotation_once_a_third_of_the_validity_remains(clock):
    kube = Watched()
    tls = controller(kube, clock)
    first = ensure(tls)
    kube.catch_up()
    clock[0] = NOW + dt.timedelta(days=61)
    kube.calls.clear()
    second = ensure(tls)
    assert second != first and kube.calls == [("get", "secrets", "digits-tls"), ("apply", "Secret", "digits-tls")]
    ca = kube.objects[("Secret", "edge", CA_SECRET)]
    assert not certs.ca_needs_rotation(certs.KeyPair(decode(ca, "tls.crt"), decode(ca, "tls.key")), clock[0])


def test_a_new_ca_reissues_the_certificates_it_signs(clock):
    kube = Watched()
    tls = controller(kube, clock)
    ensure(tls)
    del kube.objects[("Secret", "edge", CA_SECRET)]  # deleted by hand
    kube.catch_up()
    ensure(tls)
    ca = decode(kube.objects[("Secret", "edge", CA_SECRET)], "tls.crt")
    assert not certs.needs_rotation(leaf(kube), ca, NOW, NAMES)


def test_a_garbage_secret_is_replaced(clock):
    kube = Watched()
    tls = controller(kube, clock)
    ensure(tls)
    kube.objects[("Secret", "edge", "digits-tls")]["data"] = {"tls.crt": "not base64!", "tls.key": ""}
    kube.catch_up()
    ensure(tls)
    assert leaf(kube).startswith("-----BEGIN CERTIFICATE-----")


def test_cert_manager_mode_applies_a_certificate_once_and_writes_no_secret(clock):
    kube = Watched()
    tls = controller(kube, clock, mode="cert-manager", issuer={"name": "edge-ca", "kind": "ClusterIssuer"})
    assert ensure(tls) == "", "no certificate until cert-manager has issued one"
    ensure(tls)
    assert kube.calls == [("apply", "Certificate", "digits-tls")]
    spec = kube.objects[("Certificate", "edge", "digits-tls")]["spec"]
    assert spec["secretName"] == "digits-tls" and spec["dnsNames"] == NAMES
    assert spec["issuerRef"] == {"name": "edge-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert (spec["duration"], spec["renewBefore"]) == ("2160h", "720h")
    assert spec["secretTemplate"]["labels"]["edgeloop.io/tls"] == "server", "watched like the operator's own"


def test_cert_manager_mode_needs_an_issuer():
    with pytest.raises(config.ConfigError, match="needs an issuer"):
        config.build({"tls": {"mode": "cert-manager"}})
