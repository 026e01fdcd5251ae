"""Secure aggregation math: Shamir, PRG, key agreement, share encryption, graph, fixed point, masking."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from edgeloop_runtime.federated import secagg


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
    scale = secagg.quantization_scale(8.0, 100)
    v = np.array([-8.0 * 100, -1e-3, 0.0, 2.5e-4, 8.0 * 100])
    q = secagg.quantize(v, scale)
    assert q.dtype == np.uint32
    assert np.abs(secagg.dequantize(q, scale) - v).max() <= 0.5 / scale


def test_sum_in_the_ring_equals_the_sum_of_values_when_inside_the_bound():
    rng = np.random.default_rng(0)
    weights = rng.integers(1, 300, 10)
    updates = [rng.uniform(-8, 8, 500) * w for w in weights]
    scale = secagg.quantization_scale(8.0, weights.sum())
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
