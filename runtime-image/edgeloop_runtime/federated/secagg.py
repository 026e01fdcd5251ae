"""Secure aggregation (Bonawitz et al., CCS 2017) with the sparse neighbour graph of SecAgg+ (Bell et al.,
CCS 2020): the aggregator learns the sum of the clients' vectors and nothing else about any one of them.

Each client u, in one round:
1. advertises two X25519 public keys: c_u (encrypts its secret shares) and s_u (agrees pairwise masks);
2. Shamir-shares two secrets among its neighbours: the seed b_u of its self mask, and the seed from which its
   s_u private key is derived; each share travels AES-GCM-encrypted under a key agreed with c_v;
3. uploads y_u = q(x_u) + PRG(b_u) + Σ_{v∈N(u), u<v} PRG(s_uv) - Σ_{v∈N(u), u>v} PRG(s_uv)  (mod 2^32);
4. for each neighbour v, reveals its share of b_v if v uploaded, or of s_v's seed if v dropped — never both.

With client certificates, each client signs its public keys (bound to the round and its name) with its
certificate's key, and checks its neighbours' signatures against the CA and their names before sharing, so an
aggregator cannot put keys of its own in a client's place. Rebuilt secrets are checked: an s seed against the
advertised public key, a b seed against the commitment its owner sent with its shares, and more shares than
the threshold are checked for consistency (and corrected, Berlekamp-Welch) before use.

Summing the y_u cancels every pair of pairwise masks between survivors; the aggregator removes the survivors'
self masks (b_u rebuilt from t shares) and the masks survivors share with dropped clients (s_v rebuilt).
The self mask is what keeps a late upload from a "dropped" client from exposing its vector.

Secrets are 127-bit field elements, so a share is 16 bytes. Masks come from AES-256-CTR keystreams; values
are fixed-point numbers in the ring Z/2^32, sent as uint32. All functions here are pure.
"""

from __future__ import annotations

import hashlib
import itertools
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
    """f(0) from the shares, verified: with more than `threshold` shares, every share must lie on one
    polynomial of degree threshold-1; up to ⌊(k - threshold)/2⌋ wrong shares among k are corrected
    (Berlekamp-Welch) and more are an error. With exactly `threshold` shares nothing can be checked here:
    callers check the secret against a commitment (`self_mask_commitment`, or the advertised public key)."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares, {threshold} needed")
    points = sorted(shares.items())
    if any(not 0 < x < PRIME or not 0 <= y < PRIME for x, y in points):
        raise SecAggError("a share lies outside the field")
    base = points[:threshold]
    if all(_lagrange(base, x) == y for x, y in points[threshold:]):
        return _lagrange(base, 0)
    errors = (len(points) - threshold) // 2
    polynomial = _berlekamp_welch(points, threshold, errors) if errors else None
    if polynomial is None:
        raise SecAggError(f"the {len(points)} shares are inconsistent and cannot be corrected (threshold {threshold})")
    return polynomial[0]


def wrong_shares(shares: Mapping[int, int], threshold: int) -> list[int]:
    """The x of every share off the polynomial that the (corrected) majority defines: who lied."""
    points = sorted(shares.items())
    polynomial = _berlekamp_welch(points, threshold, (len(points) - threshold) // 2)
    if polynomial is None:
        return []
    return [x for x, y in points if _horner(polynomial, x) != y]


def recover(shares: Mapping[int, int], threshold: int, check, max_tries: int = 4096) -> tuple[int, list[int]]:
    """(secret, x of the wrong shares) for a secret whose value `check(secret)` can confirm (a commitment, a
    public key): the verified combination first; if its result fails the check, threshold-sized subsets until
    one rebuilds a secret that passes (up to `max_tries`), so wrong shares are found even without spares."""
    try:
        secret = shamir_combine(shares, threshold)
        if check(secret):
            points = sorted(shares.items())
            polynomial = _interpolate(points[:threshold])
            agree = all(_horner(polynomial, x) == y for x, y in points)
            return secret, [] if agree else wrong_shares(shares, threshold)
    except SecAggError:
        if len(shares) < threshold:
            raise
    for subset in itertools.islice(itertools.combinations(sorted(shares.items()), threshold), max_tries):
        secret = _lagrange(list(subset), 0)
        if check(secret):
            polynomial = _interpolate(list(subset))
            return secret, [x for x, y in shares.items() if _horner(polynomial, x) != y]
    raise SecAggError(f"no {threshold} of the {len(shares)} shares rebuild the committed secret")


def _lagrange(points: list[tuple[int, int]], x: int) -> int:
    """The value at x of the polynomial through `points` (degree len(points) - 1)."""
    value = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (x - xj) % PRIME
                den = den * (xi - xj) % PRIME
        value = (value + yi * num * pow(den, -1, PRIME)) % PRIME
    return value


def _berlekamp_welch(points: list[tuple[int, int]], threshold: int, errors: int) -> list[int] | None:
    """Coefficients of the polynomial of degree < threshold that agrees with all but at most `errors` of
    the points, or None. Solves Q(x) = y·E(x) for E monic of degree `errors`, then P = Q / E."""
    if errors == 0:
        base = points[:threshold]
        coefficients = _interpolate(base)
        return coefficients if all(_horner(coefficients, x) == y for x, y in points) else None
    q_terms, e_terms = threshold + errors, errors
    rows = []
    for x, y in points:
        powers = [pow(x, i, PRIME) for i in range(q_terms)]
        row = powers + [(-y * powers[i]) % PRIME for i in range(e_terms)]
        rows.append([*row, y * pow(x, errors, PRIME) % PRIME])
    solution = _solve(rows, q_terms + e_terms)
    if solution is None:
        return None
    q, e = solution[:q_terms], [*solution[q_terms:], 1]
    p, remainder = _divide(q, e)
    if any(remainder) or len(p) > threshold:
        return None
    wrong = sum(_horner(p, x) != y for x, y in points)
    return p if wrong <= errors else None


def _interpolate(points: list[tuple[int, int]]) -> list[int]:
    """Coefficients (lowest first) of the polynomial through `points`."""
    coefficients = [0] * len(points)
    for i, (xi, yi) in enumerate(points):
        basis, den = [1], 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                basis = [((basis[k - 1] if k else 0) - xj * (basis[k] if k < len(basis) else 0)) % PRIME
                         for k in range(len(basis) + 1)]  # fmt: skip
                den = den * (xi - xj) % PRIME
        factor = yi * pow(den, -1, PRIME) % PRIME
        coefficients = [(c + factor * b) % PRIME for c, b in zip(coefficients, basis, strict=True)]
    return coefficients


def _solve(rows: list[list[int]], unknowns: int) -> list[int] | None:
    """One solution of the linear system (augmented rows) over the field, free unknowns set to 0."""
    rows = [r[:] for r in rows]
    pivots, r = [], 0
    for c in range(unknowns):
        pivot = next((i for i in range(r, len(rows)) if rows[i][c]), None)
        if pivot is None:
            continue
        rows[r], rows[pivot] = rows[pivot], rows[r]
        inverse = pow(rows[r][c], -1, PRIME)
        rows[r] = [v * inverse % PRIME for v in rows[r]]
        for i in range(len(rows)):
            if i != r and rows[i][c]:
                factor = rows[i][c]
                rows[i] = [(a - factor * b) % PRIME for a, b in zip(rows[i], rows[r], strict=True)]
        pivots.append(c)
        r += 1
    if any(row[-1] for row in rows[r:]):
        return None  # inconsistent
    solution = [0] * unknowns
    for i, c in enumerate(pivots):
        solution[c] = rows[i][-1]
    return solution


def _divide(numerator: list[int], denominator: list[int]) -> tuple[list[int], list[int]]:
    """Polynomial division over the field (lowest coefficient first); the denominator is monic."""
    remainder = numerator[:]
    quotient = [0] * max(1, len(numerator) - len(denominator) + 1)
    for shift in range(len(numerator) - len(denominator), -1, -1):
        factor = remainder[shift + len(denominator) - 1]
        quotient[shift] = factor
        for i, d in enumerate(denominator):
            remainder[shift + i] = (remainder[shift + i] - factor * d) % PRIME
    while len(quotient) > 1 and quotient[-1] == 0:
        quotient.pop()
    return quotient, remainder[: len(denominator) - 1]


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


def self_mask_commitment(seed: int, context: bytes) -> bytes:
    """What a client commits to its self-mask seed with, before anyone reveals shares of it: the aggregator
    checks the seed it rebuilds against it, so wrong shares cannot unmask the sum into garbage unnoticed."""
    return hashlib.sha256(b"edgeloop/self-mask/" + context + seed.to_bytes(SECRET_BYTES, "big")).digest()


# --- authenticated public keys -----------------------------------------------------------------------------


class UntrustedKeys(Exception):
    """A neighbour's public keys are not signed by a certificate of the CA for that neighbour's name."""


def keys_message(round_id: str, client: str, keys: bytes) -> bytes:
    """What a client signs: its two public keys, for one round and under its own name."""
    name = client.encode()
    return b"edgeloop/secagg-keys/v1\0" + bytes.fromhex(round_id) + len(name).to_bytes(2, "big") + name + keys


def sign(private_key, message: bytes) -> bytes:
    """A signature with the client's certificate key (EC, RSA or EdDSA, as the CA issued it)."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa

    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        return private_key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(private_key, rsa.RSAPrivateKey):
        return private_key.sign(message, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    if isinstance(private_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey):
        return private_key.sign(message)
    raise TypeError(f"cannot sign with a {type(private_key).__name__}")


def verify_keys(cert_der: bytes, ca, client: str, message: bytes, signature: bytes, now=None) -> None:
    """Raise UntrustedKeys unless `cert_der` is a client certificate that `ca` issued to `client` (its CN),
    valid now, and `signature` is its key's signature of `message`."""
    import datetime

    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    try:
        cert = x509.load_der_x509_certificate(cert_der)
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as error:
        raise UntrustedKeys(f"{client}: the certificate is not one the CA issued ({error})") from error
    now = now or datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise UntrustedKeys(f"{client}: the certificate is not valid now")
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [client]:
        raise UntrustedKeys(f"keys claimed for {client!r} are signed by a certificate for {names}")
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        if ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
            raise UntrustedKeys(f"{client}: the certificate is not for client authentication")
    except x509.ExtensionNotFound:
        pass
    key = cert.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, message, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
        else:
            key.verify(signature, message)
    except InvalidSignature as error:
        raise UntrustedKeys(f"{client}: the signature of its keys does not verify: substituted keys") from error


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


GUARD = 8  # honest sums use 1/GUARD of the ring: garbage lands beyond it in 7 of 8 values, so it is seen


def quantization_scale(bound: float, total_weight: float, clients: int) -> float:
    """Fixed-point scale at which the sum of `clients` vectors, each value |v| ≤ bound·weight and the weights
    adding up to at most `total_weight`, stays inside 1/GUARD of the signed range of the ring: no wrap-around,
    and a masked vector of garbage (not an honest one) shows as a sum beyond the bound.

    Each client's rounding adds at most 1/2 (and float64 error far less), so `clients` steps are kept free:
    |Σ q| ≤ (2³¹ - 1)/GUARD - clients + clients/2 (tests/unit/test_secagg.py proves it over random
    configurations with hypothesis). The cost: the mean is exact to clients·bound·GUARD/2³² per value."""
    if clients < 1 or total_weight <= 0 or bound <= 0:
        raise ValueError("quantization needs clients ≥ 1, a positive total weight and a positive bound")
    return ((2**31 - 1) / GUARD - clients) / (bound * total_weight)


def encode(update: np.ndarray, weight: int, bound: float, scale: float) -> np.ndarray:
    """What a client adds to the sum: its update clipped to ±bound, times its weight, in fixed point. In
    float64 throughout: float32's rounding of bound·weight alone is worth more than the headroom."""
    clipped = np.clip(np.asarray(update, dtype=np.float64), -bound, bound)
    return quantize(clipped * float(weight), scale)


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
