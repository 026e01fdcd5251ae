"""Secure aggregation (Bonawitz et al., CCS 2017) with the sparse neighbour graph of SecAgg+ (Bell et al.,
CCS 2020): the aggregator learns the sum of the clients' vectors and nothing else about any one of them.

Each client u, in one round:
1. advertises two X25519 public keys: c_u (encrypts its secret shares) and s_u (agrees pairwise masks);
2. Shamir-shares two secrets among its neighbours: the seed b_u of its self mask, and the seed from which its
   s_u private key is derived; each share travels AES-GCM-encrypted under a key agreed with c_v;
3. uploads y_u = q(x_u) + PRG(b_u) + Σ_{v∈N(u), u<v} PRG(s_uv) - Σ_{v∈N(u), u>v} PRG(s_uv)  (mod 2^32);
4. for each neighbour v, reveals its share of b_v if v uploaded, or of s_v's seed if v dropped — never both.

Summing the y_u cancels every pair of pairwise masks between survivors; the aggregator removes the survivors'
self masks (b_u rebuilt from t shares) and the masks survivors share with dropped clients (s_v rebuilt).
The self mask is what keeps a late upload from a "dropped" client from exposing its vector.

Secrets are 127-bit field elements, so a share is 16 bytes. Masks come from AES-256-CTR keystreams; values
are fixed-point numbers in the ring Z/2^32, sent as uint32. All functions here are pure.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Iterable, Mapping

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

PRIME = 2**127 - 1  # a Mersenne prime: the Shamir field; secrets and shares are 16 bytes
SECRET_BYTES = 16
SHARE_BYTES = 16
CIPHERTEXT_BYTES = 2 * SHARE_BYTES + 16  # two shares + the GCM tag
KEY_BYTES = 32


class SecAggError(RuntimeError):
    """The round cannot produce the sum: too few survivors or shares. Never swallowed as success."""


# --- Shamir secret sharing over GF(2^127 - 1) ------------------------------------------------------------


def shamir_split(secret: int, threshold: int, xs: Iterable[int]) -> dict[int, int]:
    """Shares (x → f(x)) of a random polynomial of degree threshold-1 with f(0) = secret."""
    xs = list(xs)
    if not 0 <= secret < PRIME:
        raise ValueError("secret must lie in the field")
    if not 1 <= threshold <= len(xs) or len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError(f"need distinct nonzero points and 1 ≤ threshold ≤ {len(xs)}")
    coefficients = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _horner(coefficients, x) for x in xs}


def _horner(coefficients: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coefficients):
        acc = (acc * x + c) % PRIME
    return acc


def shamir_combine(shares: Mapping[int, int], threshold: int) -> int:
    """f(0) by Lagrange interpolation from `threshold` of the shares."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares, {threshold} needed")
    points = list(shares.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    return secret


# --- keys, PRG, encryption --------------------------------------------------------------------------------


def random_secret() -> int:
    return secrets.randbelow(PRIME)


def _hkdf(material: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(material)


def mask_private_key(seed: int) -> X25519PrivateKey:
    """s_u's private key, derived from a 127-bit seed so that a 16-byte share can carry it."""
    return X25519PrivateKey.from_private_bytes(_hkdf(seed.to_bytes(SECRET_BYTES, "big"), b"edgeloop/x25519"))


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def pairwise_seed(private: X25519PrivateKey, peer_public: bytes, context: bytes) -> bytes:
    """The seed u and v both derive for their pairwise mask (X25519 + HKDF, bound to the round)."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return _hkdf(shared, b"edgeloop/mask/" + context)


def prg(seed: bytes, length: int) -> np.ndarray:
    """`length` uniform uint32 values: the AES-256-CTR keystream under a key derived from `seed`."""
    key = _hkdf(seed, b"edgeloop/prg")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(encryptor.update(bytes(4 * length)), dtype="<u4").astype(np.uint32)


def _share_key(private: X25519PrivateKey, peer_public: bytes, context: bytes, sender: int, receiver: int):
    # One key per (round, sender, receiver) and one message under it, so a zero nonce is never reused.
    info = b"edgeloop/share/" + context + sender.to_bytes(4, "big") + receiver.to_bytes(4, "big")
    return AESGCM(_hkdf(private.exchange(X25519PublicKey.from_public_bytes(peer_public)), info))


def encrypt_shares(
    private: X25519PrivateKey,
    peer_public: bytes,
    context: bytes,
    sender: int,
    receiver: int,
    b_share: int,
    s_share: int,
) -> bytes:
    plain = b_share.to_bytes(SHARE_BYTES, "big") + s_share.to_bytes(SHARE_BYTES, "big")
    return _share_key(private, peer_public, context, sender, receiver).encrypt(bytes(12), plain, None)


def decrypt_shares(
    private: X25519PrivateKey, peer_public: bytes, context: bytes, sender: int, receiver: int, ciphertext: bytes
) -> tuple[int, int]:
    """(share of b_sender, share of s_sender's seed); raises InvalidTag if it was not made for us."""
    plain = _share_key(private, peer_public, context, sender, receiver).decrypt(bytes(12), ciphertext, None)
    return int.from_bytes(plain[:SHARE_BYTES], "big"), int.from_bytes(plain[SHARE_BYTES:], "big")


# --- neighbour graph and threshold (SecAgg+) ---------------------------------------------------------------


def default_degree(n: int) -> int:
    """Neighbours per client: everyone in small rounds, O(log n) (Bell et al. 2020) in large ones."""
    return min(n - 1, 2 * math.ceil(math.log2(max(n, 2))) + 2)


def neighbour_graph(ids: Iterable[int], degree: int, seed: bytes) -> dict[int, set[int]]:
    """A degree-regular circulant graph over a seeded permutation of `ids` (a Harary graph, as in SecAgg+).

    The seed is public: every client can check its neighbours. `degree` is rounded up to even below n-1.
    """
    order = sorted(ids, key=lambda i: hashlib.sha256(seed + i.to_bytes(4, "big")).digest())
    n = len(order)
    if degree >= n - 1:
        return {u: set(order) - {u} for u in order}
    half = (degree + 1) // 2
    return {u: {order[(p + d) % n] for d in range(-half, half + 1) if d} for p, u in enumerate(order)}


def share_threshold(degree: int, fraction: float) -> int:
    """Shares needed to rebuild a secret: `fraction` of the neighbours, and always a strict majority, so
    that the shares an honest client reveals for v can never yield both b_v and s_v."""
    if not 0 < fraction <= 1:
        raise ValueError("threshold must lie in (0, 1]")
    return max(degree // 2 + 1, math.ceil(fraction * degree))


# --- fixed point in Z/2^32 ---------------------------------------------------------------------------------


def quantization_scale(bound: float, total_weight: float) -> float:
    """Fixed-point scale at which a sum of vectors with |value| ≤ bound·weight, weights adding up to at
    most `total_weight`, stays inside the signed range of the ring: no wrap-around."""
    return (2**31 - 1) / (bound * total_weight)


def quantize(v: np.ndarray, scale: float) -> np.ndarray:
    """round(v·scale) as a two's-complement element of Z/2^32 (error ≤ 0.5/scale per value)."""
    return np.rint(np.asarray(v, dtype=np.float64) * scale).astype(np.int64).astype(np.uint32)


def dequantize(q: np.ndarray, scale: float) -> np.ndarray:
    return q.astype(np.uint32).view(np.int32).astype(np.float64) / scale


# --- masking and unmasking --------------------------------------------------------------------------------


def mask(q: np.ndarray, me: int, self_seed: int, pairwise: Mapping[int, bytes]) -> np.ndarray:
    """y_u: the quantized vector plus the self mask and the signed pairwise masks, mod 2^32."""
    y = q.astype(np.uint32) + prg(self_seed.to_bytes(SECRET_BYTES, "big"), len(q))
    for v, seed in pairwise.items():
        y = y + prg(seed, len(q)) if me < v else y - prg(seed, len(q))
    return y


def unmask_sum(
    masked_sum: np.ndarray,
    self_seeds: Mapping[int, int],
    dropped_keys: Mapping[int, int],
    public: Mapping[int, bytes],
    graph: Mapping[int, Iterable[int]],
    survivors: Iterable[int],
    context: bytes,
) -> np.ndarray:
    """Σ q(x_u) over the survivors, from Σ y_u, the survivors' rebuilt self-mask seeds and the dropped
    clients' rebuilt mask-key seeds (`public` maps each client to its s-public key)."""
    survivors = set(survivors)
    total = masked_sum.astype(np.uint32).copy()
    for seed in self_seeds.values():
        total -= prg(seed.to_bytes(SECRET_BYTES, "big"), len(total))
    for d, seed in dropped_keys.items():
        key = mask_private_key(seed)
        for v in set(graph[d]) & survivors:
            m = prg(pairwise_seed(key, public[v], context), len(total))
            total = total - m if v < d else total + m  # undo what survivor v added for pair (v, d)
    return total
