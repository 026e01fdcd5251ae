"""Secure aggregation math: Shamir, PRG, key agreement, share encryption, graph, fixed point, masking."""

from __future__ import annotations

import datetime
import itertools

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from edgeloop_runtime.federated import secagg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


def test_any_threshold_shares_rebuild_the_secret():
    secret = secagg.random_secret()
    shares = secagg.shamir_split(secret, 3, range(1, 6))
    assert all(0 <= s < secagg.PRIME for s in shares.values())
    for subset in itertools.combinations(shares, 3):
        assert secagg.shamir_combine({x: shares[x] for x in subset}, 3) == secret


def test_fewer_shares_than_threshold_fail_loudly_and_reveal_nothing():
    secret = secagg.random_secret()
    shares = secagg.shamir_split(secret, 3, range(1, 6))
    with pytest.raises(secagg.SecAggError, match="2 shares, 3 needed"):
        secagg.shamir_combine({1: shares[1], 2: shares[2]}, 3)
    # Interpolating a line through two shares of a quadratic gives an unrelated value.
    assert secagg.shamir_combine({1: shares[1], 2: shares[2]}, 2) != secret


@pytest.mark.parametrize("threshold, xs", [(0, [1, 2]), (3, [1, 2]), (2, [1, 1]), (2, [0, 1])])
def test_split_rejects_bad_parameters(threshold, xs):
    with pytest.raises(ValueError):
        secagg.shamir_split(5, threshold, xs)


def test_prg_is_deterministic_per_seed_and_uniform():
    a = secagg.prg(b"seed-a", 100_000)
    assert a.dtype == np.uint32 and len(a) == 100_000
    assert np.array_equal(a, secagg.prg(b"seed-a", 100_000))
    assert np.mean(a == secagg.prg(b"seed-b", 100_000)) < 0.001
    counts = np.bincount(a >> 28, minlength=16)
    expected = len(a) / 16
    assert ((counts - expected) ** 2 / expected).sum() < 37.7  # chi-square, 15 dof, p = 0.001


def test_both_sides_of_a_pair_derive_the_same_seed_bound_to_the_round():
    u, v = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    uv = secagg.pairwise_seed(u, secagg.public_bytes(v), b"round-1")
    assert uv == secagg.pairwise_seed(v, secagg.public_bytes(u), b"round-1")
    assert uv != secagg.pairwise_seed(u, secagg.public_bytes(v), b"round-2")


def test_mask_key_is_a_function_of_its_shareable_seed():
    seed = secagg.random_secret()
    assert secagg.public_bytes(secagg.mask_private_key(seed)) == secagg.public_bytes(secagg.mask_private_key(seed))


def test_shares_decrypt_only_for_their_receiver_in_their_direction():
    a, b, c = (X25519PrivateKey.generate() for _ in range(3))
    ct = secagg.encrypt_shares(a, secagg.public_bytes(b), b"ctx", 1, 2, 11, 22)
    assert len(ct) == secagg.CIPHERTEXT_BYTES
    assert secagg.decrypt_shares(b, secagg.public_bytes(a), b"ctx", 1, 2, ct) == (11, 22)
    with pytest.raises(InvalidTag):
        secagg.decrypt_shares(c, secagg.public_bytes(a), b"ctx", 1, 2, ct)
    with pytest.raises(InvalidTag):  # replayed as if sent the other way
        secagg.decrypt_shares(b, secagg.public_bytes(a), b"ctx", 2, 1, ct)


@pytest.mark.parametrize("n, degree", [(10, 9), (10, 4), (30, 6), (7, 3)])
def test_neighbour_graph_is_symmetric_regular_and_public(n, degree):
    ids = range(1, n + 1)
    graph = secagg.neighbour_graph(ids, degree, b"seed")
    assert graph == secagg.neighbour_graph(ids, degree, b"seed")
    assert all(u not in vs and all(u in graph[v] for v in vs) for u, vs in graph.items())
    sizes = {len(vs) for vs in graph.values()}
    assert sizes == {min(n - 1, degree + degree % 2)}


def test_threshold_is_always_a_strict_majority_of_neighbours():
    assert secagg.share_threshold(9, 0.66) == 6
    assert secagg.share_threshold(8, 0.1) == 5
    assert secagg.share_threshold(4, 1.0) == 4
    with pytest.raises(ValueError):
        secagg.share_threshold(4, 0)


def test_default_degree_is_complete_for_small_rounds_logarithmic_for_large():
    assert secagg.default_degree(10) == 9
    assert secagg.default_degree(1000) == 22


def test_quantization_round_trips_signed_values_within_half_a_step():
    scale = secagg.quantization_scale(8.0, 100, 1)
    v = np.array([-8.0 * 100, -1e-3, 0.0, 2.5e-4, 8.0 * 100])
    q = secagg.quantize(v, scale)
    assert q.dtype == np.uint32
    assert np.abs(secagg.dequantize(q, scale) - v).max() <= 0.5 / scale


def test_sum_in_the_ring_equals_the_sum_of_values_when_inside_the_bound():
    rng = np.random.default_rng(0)
    weights = rng.integers(1, 300, 10)
    updates = [rng.uniform(-8, 8, 500) * w for w in weights]
    scale = secagg.quantization_scale(8.0, weights.sum(), len(weights))
    total = np.zeros(500, np.uint32)
    for u in updates:
        total += secagg.quantize(u, scale)
    assert np.abs(secagg.dequantize(total, scale) - sum(updates)).max() <= 10 * 0.5 / scale


def run_protocol(n: int, degree: int, dropped: set[int], t_fraction: float = 0.66):
    """The client and server steps of one round, in memory: returns (recovered, true) sums."""
    rng = np.random.default_rng(1)
    ids = list(range(1, n + 1))
    context = b"round"
    graph = secagg.neighbour_graph(ids, degree, context)
    t = secagg.share_threshold(min(map(len, graph.values())), t_fraction)
    s_seeds = {u: secagg.random_secret() for u in ids}
    b_seeds = {u: secagg.random_secret() for u in ids}
    public = {u: secagg.public_bytes(secagg.mask_private_key(s_seeds[u])) for u in ids}
    shares = {
        u: (secagg.shamir_split(b_seeds[u], t, graph[u]), secagg.shamir_split(s_seeds[u], t, graph[u])) for u in ids
    }
    q = {u: secagg.quantize(rng.normal(0, 1, 64), 1000) for u in ids}
    survivors = set(ids) - dropped
    masked = {}
    for u in survivors:  # dropped clients shared their keys, then never uploaded
        key = secagg.mask_private_key(s_seeds[u])
        pairwise = {v: secagg.pairwise_seed(key, public[v], context) for v in graph[u]}
        masked[u] = secagg.mask(q[u], u, b_seeds[u], pairwise)
    masked_sum = np.sum(list(masked.values()), axis=0, dtype=np.uint32)
    # Survivors reveal b shares of surviving neighbours and s shares of dropped ones.
    self_seeds = {u: secagg.shamir_combine({v: shares[u][0][v] for v in graph[u] & survivors}, t) for u in survivors}
    dropped_keys = {d: secagg.shamir_combine({v: shares[d][1][v] for v in graph[d] & survivors}, t) for d in dropped}
    recovered = secagg.unmask_sum(masked_sum, self_seeds, dropped_keys, public, graph, survivors, context)
    true = np.sum([q[u] for u in survivors], axis=0, dtype=np.uint32)
    return recovered, true, masked, q


@pytest.mark.parametrize("n, degree, dropped", [(6, 5, set()), (10, 9, {2, 7}), (12, 6, {1, 5})])
def test_unmasking_recovers_exactly_the_survivors_sum(n, degree, dropped):
    recovered, true, masked, q = run_protocol(n, degree, dropped)
    assert np.array_equal(recovered, true)
    u = next(iter(masked))
    assert np.mean(masked[u] == q[u]) < 0.01  # a single upload is not the update


def test_too_many_dropouts_cannot_be_unmasked():
    with pytest.raises(secagg.SecAggError):
        run_protocol(10, 9, dropped={1, 2, 3, 4, 5})


# --- issue 16, item 5: the sum never wraps around -------------------------------------------------------------

EXTREMES = st.sampled_from(["plus", "minus", "mixed", "beyond"])


@settings(max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    clients=st.integers(1, 300),
    bound=st.floats(1e-4, 1e4, allow_nan=False),
    max_examples=st.sampled_from([1, 7, 1000, 10**6]),
    pattern=EXTREMES,
    seed=st.integers(0, 2**32 - 1),
)
def test_the_sum_of_n_clients_within_the_bound_never_wraps(clients, bound, max_examples, pattern, seed):
    """Every client as far out as the bound allows (and beyond it: clipped), with any weights, float32 updates
    as clients compute them: the decoded sum is the true sum of the clipped values within n/2 steps."""
    rng = np.random.default_rng(seed)
    weights = rng.integers(1, max_examples + 1, clients)
    scale = secagg.quantization_scale(bound, int(weights.sum()), clients)
    size = 8
    total = np.zeros(size, np.uint32)
    true = np.zeros(size, np.float64)
    for w in weights:
        if pattern == "plus":
            update = np.full(size, bound, np.float32)
        elif pattern == "minus":
            update = np.full(size, -bound, np.float32)
        elif pattern == "beyond":
            update = (rng.choice([-1, 1], size) * bound * rng.uniform(1, 1e3, size)).astype(np.float32)
        else:
            update = rng.uniform(-bound, bound, size).astype(np.float32)
        total += secagg.encode(update, int(w), bound, scale)
        true += np.clip(update.astype(np.float64), -bound, bound) * float(w)
    decoded = secagg.dequantize(total, scale)
    # A wrap-around would be off by 2^32 steps; the rounding of n clients costs at most n/2.
    assert np.all(np.abs(decoded - true) <= (clients * 0.5 + 1) / scale)
    if pattern in ("plus", "minus"):
        assert np.all(np.sign(decoded) == (1 if pattern == "plus" else -1))


def test_the_old_scale_wraps_with_everyone_at_the_bound():
    """The configuration of the review (issue 16, item 5): the mean came out -bound instead of +bound."""
    bound, weights = 8.0, [279, 156, 59, 229, 182]
    old_scale = (2**31 - 1) / (bound * sum(weights))  # no headroom
    total = np.zeros(1, np.uint32)
    for w in weights:
        total += secagg.quantize(np.clip(np.full(1, bound, np.float32), -bound, bound) * w, old_scale)
    assert secagg.dequantize(total, old_scale)[0] < 0
    scale = secagg.quantization_scale(bound, sum(weights), len(weights))
    total = sum(secagg.encode(np.full(1, bound, np.float32), w, bound, scale) for w in weights)
    assert secagg.dequantize(np.asarray(total, np.uint32), scale)[0] / sum(weights) == pytest.approx(bound, rel=1e-6)


# --- issue 16, item 9: shares are verified -------------------------------------------------------------------


def test_more_shares_than_the_threshold_must_agree_and_wrong_ones_are_corrected():
    secret = secagg.random_secret()
    shares = secagg.shamir_split(secret, 4, range(1, 10))  # 9 shares, threshold 4: corrects 2 wrong ones
    lied = {**shares, 2: (shares[2] + 1) % secagg.PRIME, 7: secagg.random_secret()}
    assert secagg.shamir_combine(lied, 4) == secret
    assert secagg.wrong_shares(lied, 4) == [2, 7]
    too_many = {**lied, 5: 12345}
    with pytest.raises(secagg.SecAggError, match="inconsistent"):
        secagg.shamir_combine(too_many, 4)


def test_a_wrong_share_among_the_first_threshold_is_no_longer_used_unchecked():
    """The old combine took the first t shares as they came: one liar decided the secret."""
    secret = secagg.random_secret()
    shares = secagg.shamir_split(secret, 3, range(1, 6))
    lied = {**shares, 1: (shares[1] + 99) % secagg.PRIME}
    assert secagg.shamir_combine(lied, 3) == secret  # 5 shares, threshold 3: one wrong share corrected
    with pytest.raises(secagg.SecAggError):
        secagg.shamir_combine({x: lied[x] for x in (1, 2, 3, 4)}, 3)  # 4 shares: detected, not correctable


@settings(max_examples=200, deadline=None, database=None)
@given(threshold=st.integers(1, 8), extra=st.integers(0, 8), data=st.data())
def test_shamir_corrects_up_to_half_the_spare_shares(threshold, extra, data):
    secret = secagg.random_secret()
    shares = secagg.shamir_split(secret, threshold, range(1, threshold + extra + 1))
    liars = data.draw(st.sets(st.sampled_from(sorted(shares)), max_size=extra // 2))
    lied = {x: (y + 1 + x) % secagg.PRIME if x in liars else y for x, y in shares.items()}
    assert secagg.shamir_combine(lied, threshold) == secret
    assert secagg.wrong_shares(lied, threshold) == sorted(liars)


def test_self_mask_commitment_binds_seed_and_round():
    seed = secagg.random_secret()
    assert secagg.self_mask_commitment(seed, b"r1") == secagg.self_mask_commitment(seed, b"r1")
    assert secagg.self_mask_commitment(seed, b"r1") != secagg.self_mask_commitment(seed, b"r2")
    assert secagg.self_mask_commitment(seed, b"r1") != secagg.self_mask_commitment(seed + 1, b"r1")


# --- issue 16, item 13: public keys are signed with the client's certificate --------------------------------


def _ca_and_clients(names, key_types=("ec",)):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def new_key(kind):
        return {"ec": lambda: ec.generate_private_key(ec.SECP256R1()),
                "rsa": lambda: rsa.generate_private_key(65537, 2048),
                "ed25519": ed25519.Ed25519PrivateKey.generate}[kind]()  # fmt: skip

    def cert(cn, key, issuer, issuer_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH, ca=False):
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if usage:
            builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        signer = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        return builder.sign(issuer_key, signer)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")])
    ca = cert("ca", ca_key, ca_name, ca_key, usage=None, ca=True)
    out = {}
    for name, kind in zip(names, key_types * len(names), strict=False):
        key = new_key(kind)
        out[name] = (key, cert(name, key, ca_name, ca_key))
    return ca, ca_key, ca_name, out, cert


@pytest.mark.parametrize("kind", ["ec", "rsa", "ed25519"])
def test_signed_keys_verify_for_their_name_round_and_keys_only(kind):
    from cryptography.hazmat.primitives.serialization import Encoding

    ca, _, _, clients, _ = _ca_and_clients(["node-a", "node-b"], (kind,))
    (key_a, cert_a), (_, cert_b) = clients["node-a"], clients["node-b"]
    round_id, keys = "ab" * 16, bytes(range(64))
    message = secagg.keys_message(round_id, "node-a", keys)
    signature = secagg.sign(key_a, message)
    der_a = cert_a.public_bytes(Encoding.DER)
    secagg.verify_keys(der_a, ca, "node-a", message, signature)
    with pytest.raises(secagg.UntrustedKeys, match="substituted"):  # other keys under a's name
        secagg.verify_keys(der_a, ca, "node-a", secagg.keys_message(round_id, "node-a", bytes(64)), signature)
    with pytest.raises(secagg.UntrustedKeys, match="substituted"):  # a's keys replayed into another round
        secagg.verify_keys(der_a, ca, "node-a", secagg.keys_message("cd" * 16, "node-a", keys), signature)
    with pytest.raises(secagg.UntrustedKeys, match="signed by a certificate for"):  # b's certificate, a's name
        secagg.verify_keys(cert_b.public_bytes(Encoding.DER), ca, "node-a", message, signature)


def test_keys_signed_by_a_certificate_of_another_ca_or_for_servers_are_refused():
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca, ca_key, ca_name, _, cert = _ca_and_clients([])
    _other_ca, _, _, others, _ = _ca_and_clients(["node-a"])
    key, foreign = others["node-a"]
    message = secagg.keys_message("ab" * 16, "node-a", bytes(64))
    with pytest.raises(secagg.UntrustedKeys, match="not one the CA issued"):
        secagg.verify_keys(foreign.public_bytes(Encoding.DER), ca, "node-a", message, secagg.sign(key, message))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = cert("node-a", server_key, ca_name, ca_key, usage=ExtendedKeyUsageOID.SERVER_AUTH)
    with pytest.raises(secagg.UntrustedKeys, match="not for client authentication"):
        secagg.verify_keys(server.public_bytes(Encoding.DER), ca, "node-a", message, secagg.sign(server_key, message))


def test_recover_finds_the_committed_secret_without_spare_shares():
    secret = secagg.random_secret()
    shares = secagg.shamir_split(secret, 3, range(1, 5))  # 4 shares, threshold 3: nothing to correct with
    lied = {**shares, 3: 7}
    with pytest.raises(secagg.SecAggError):
        secagg.shamir_combine(lied, 3)
    assert secagg.recover(lied, 3, lambda s: s == secret) == (secret, [3])
    with pytest.raises(secagg.SecAggError, match="rebuild the committed secret"):
        secagg.recover({**lied, 1: 8}, 3, lambda s: s == secret)
