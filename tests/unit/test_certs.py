"""edgeloop.certs: the CA, its leaves and the rotation decision."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from edgeloop import certs

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
NAMES = certs.service_dns_names("digits", "edge")


@pytest.fixture(scope="module")
def ca() -> certs.KeyPair:
    return certs.new_ca("edgeloop-ca", NOW, 3650 * DAY)


@pytest.fixture(scope="module")
def server(ca) -> certs.KeyPair:
    return certs.issue(ca, "digits", certs.Usage.SERVER, NOW, 90 * DAY, NAMES)


def verifier(ca: certs.KeyPair, at: dt.datetime):
    return PolicyBuilder().store(Store([certs.load_cert(ca.cert)])).time(at)


def test_service_names_cover_every_in_cluster_form():
    assert NAMES == ["digits", "digits.edge", "digits.edge.svc", "digits.edge.svc.cluster.local"]


def test_a_server_certificate_verifies_for_each_service_name_and_no_other(ca, server):
    leaf = certs.load_cert(server.cert)
    for name in NAMES[2:]:  # the verifier takes fully qualified names
        verifier(ca, NOW + DAY).build_server_verifier(x509.DNSName(name)).verify(leaf, [])
    with pytest.raises(VerificationError):
        verifier(ca, NOW + DAY).build_server_verifier(x509.DNSName("other.edge.svc")).verify(leaf, [])


def test_a_client_certificate_verifies_as_a_client_but_not_as_a_server(ca):
    # With a server's name, so that only the extended key usage tells them apart.
    client = certs.load_cert(certs.issue(ca, "round-1-client", certs.Usage.CLIENT, NOW, 90 * DAY, NAMES).cert)
    verifier(ca, NOW + DAY).build_client_verifier().verify(client, [])
    with pytest.raises(VerificationError):
        verifier(ca, NOW + DAY).build_server_verifier(x509.DNSName("digits.edge.svc")).verify(client, [])


def test_a_leaf_from_another_ca_does_not_verify(ca, server):
    other = certs.new_ca("edgeloop-ca", NOW, 3650 * DAY)
    with pytest.raises(VerificationError):
        verifier(other, NOW + DAY).build_server_verifier(x509.DNSName(NAMES[2])).verify(
            certs.load_cert(server.cert), []
        )


def test_a_leaf_never_outlives_its_ca():
    short_ca = certs.new_ca("edgeloop-ca", NOW, 10 * DAY)
    leaf = certs.load_cert(certs.issue(short_ca, "digits", certs.Usage.SERVER, NOW, 90 * DAY, NAMES).cert)
    assert leaf.not_valid_after_utc == certs.load_cert(short_ca.cert).not_valid_after_utc


def test_a_fresh_certificate_needs_no_rotation(ca, server):
    assert not certs.needs_rotation(server.cert, ca.cert, NOW, NAMES)
    assert not certs.ca_needs_rotation(ca, NOW)


def test_rotation_starts_when_a_third_of_the_validity_remains(ca, server):
    # Valid from NOW - 5 min to NOW + 90 days: a third of that remains 30 days and 100 s before the end.
    end = NOW + 90 * DAY
    boundary = end - (90 * DAY + certs.BACKDATE) / 3
    assert not certs.needs_rotation(server.cert, ca.cert, boundary, NAMES)
    assert certs.needs_rotation(server.cert, ca.cert, boundary + dt.timedelta(seconds=1), NAMES)
    assert certs.needs_rotation(server.cert, ca.cert, end, NAMES), "expired"
    assert certs.needs_rotation(server.cert, ca.cert, NOW - DAY, NAMES), "not yet valid"


def test_another_ca_or_other_names_need_a_new_certificate(ca, server):
    other = certs.new_ca("edgeloop-ca", NOW, 3650 * DAY)
    assert certs.needs_rotation(server.cert, other.cert, NOW, NAMES)
    assert certs.needs_rotation(server.cert, ca.cert, NOW, certs.service_dns_names("renamed", "edge"))


BROKEN_PEM = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize("stored", [None, "", "garbage", BROKEN_PEM])
def test_missing_or_unreadable_certificates_are_reissued(ca, stored):
    assert certs.needs_rotation(stored, ca.cert, NOW, NAMES)


def test_an_unreadable_current_ca_reissues_rather_than_raises(server):
    assert certs.needs_rotation(server.cert, "garbage", NOW, NAMES)


def test_the_ca_is_replaced_when_missing_broken_mismatched_or_expiring(ca):
    other = certs.new_ca("edgeloop-ca", NOW, 3650 * DAY)
    assert certs.ca_needs_rotation(None, NOW)
    assert certs.ca_needs_rotation(certs.KeyPair(ca.cert, "garbage"), NOW)
    assert certs.ca_needs_rotation(certs.KeyPair(ca.cert, other.key), NOW), "a key that is not the CA's"
    assert certs.ca_needs_rotation(ca, NOW + 3000 * DAY)


def test_the_ca_may_sign_leaves_only(ca):
    constraints = certs.load_cert(ca.cert).extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
