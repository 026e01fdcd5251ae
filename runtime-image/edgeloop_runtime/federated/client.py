"""The client: trains on one node's data and sends only its (masked) update, its example count and its
holdout metrics. It follows the aggregator from round to round until the federation ends, and survives an
aggregator restart by rejoining whatever round is open next.

With a client certificate (mTLS), the client signs its secure-aggregation public keys with the certificate's
key and shares its secrets only with neighbours whose keys carry a valid signature by a certificate that the
CA issued for their names, so an aggregator cannot slip keys of its own between clients."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from . import secagg
from .data import holdout_split, load_npz
from .model import Model, load
from .training import TrainConfig, evaluate, local_train, privatize
from .transport import Client, RoundGone, pack, retry

log = logging.getLogger("edgeloop.federated.client")


@dataclass
class LocalData:
    x_train: np.ndarray
    y_train: np.ndarray
    x_holdout: np.ndarray
    y_holdout: np.ndarray

    @classmethod
    def load(cls, path: str, holdout: float) -> LocalData:
        x, y = load_npz(path)
        train, hold = holdout_split(len(y), holdout, seed=0)  # fixed: a restarted client keeps its holdout
        return cls(x[train], y[train], x[hold], y[hold])


@dataclass(frozen=True)
class Identity:
    """The client's certificate key (it signs the client's public keys) and the CA its neighbours' come from."""

    key: object
    ca: object


def load_identity(cert: str | None, key: str | None, ca: str | None) -> Identity | None:
    """The identity of a client with a certificate and a CA, else None (keys then travel unsigned)."""
    if not (cert and key and ca):
        return None
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    with open(key, "rb") as k, open(ca, "rb") as c:
        return Identity(load_pem_private_key(k.read(), password=None), x509.load_pem_x509_certificate(c.read()))


class FederatedClient:
    def __init__(
        self,
        conn: Client,
        client_id: str,
        data: LocalData,
        seed: int | None = None,
        connect_timeout: float = 600.0,
        identity: Identity | None = None,
    ):
        self.conn, self.id, self.data = conn, client_id, data
        self.seed, self.connect_timeout = seed, connect_timeout
        self.identity = identity
        self.rounds_seen: set[str] = set()  # a round id comes once: a repeat is a replay
        self.model: Model | None = None
        self.model_sha = ""
        self.features: tuple[np.ndarray, np.ndarray] | None = None
        # Secure aggregation keys (c private key, s seed) advertised with the last update, for the next round.
        self.next_keys: tuple[X25519PrivateKey, int] | None = None

    def run(self) -> int:
        """Take part in every round until the aggregator reports the end: 0 if the federation succeeded,
        2 if it failed, 1 if the aggregator stayed unreachable for `connect_timeout` seconds."""
        last = ""
        while True:
            path = f"/v1/round?after={last}"
            try:
                info = retry(lambda path=path: self._get_json(path), self.connect_timeout, "aggregator")
            except ConnectionError as error:
                log.error("%s", error)
                return 1
            if info["phase"] != "Running":
                log.info("federation %s %s", info["phase"], info.get("reason", ""))
                return 0 if info["phase"] == "Succeeded" else 2
            if "id" not in info or info["id"] == last:
                continue
            last = info["id"]
            if info["task"] == "train" and info["secure"]:
                joinable = info["stage"] == "join" or "roster" in info
            else:
                joinable = info["stage"] == "collect"
            if not joinable:
                log.info("round %d is past joining; waiting for the next", info["round"])
                continue
            try:
                self._round(info)
            except RoundGone as gone:
                log.warning("round %d abandoned: %s", info["round"], gone)
            except (OSError, http.client.HTTPException) as error:
                log.warning("round %d: lost the aggregator: %s", info["round"], error)
                self.conn.close()

    # --- one round ----------------------------------------------------------------------------------------

    def _round(self, info: dict) -> None:
        if info["id"] in self.rounds_seen:
            raise RoundGone(f"round id {info['id']} was used before: refusing a replayed round")
        self.rounds_seen.add(info["id"])
        self.conn.timeout = info["waitSeconds"]
        self._fetch_model(info["model"], info["trainable"])
        start = self._fetch_weights()
        feats_train, feats_hold = self.features
        examples = len(self.data.y_train)
        cfg = TrainConfig(**info["train"])
        rng = np.random.default_rng(None if self.seed is None else [self.seed, info["round"]])

        def evaluate_start() -> dict:
            if not len(feats_hold):
                return {"accuracy": 0.0, "loss": 0.0, "examples": 0}
            return {**evaluate(self.model, start, feats_hold, self.data.y_holdout), "examples": len(feats_hold)}

        def evaluate_and_train() -> tuple[dict, np.ndarray]:
            trained = local_train(self.model, start, feats_train, self.data.y_train, cfg, rng)
            # Noise must be unpredictable, so it never comes from the (maybe seeded) training generator.
            noise_rng = np.random.default_rng(secrets.randbits(128))
            return evaluate_start(), privatize(trained - start, cfg.clip_norm, cfg.noise_multiplier, noise_rng)

        if info["task"] == "evaluate":
            metrics = evaluate_start()
            self._post(info, "evaluate", {"metrics": metrics})
            log.info("evaluated the final model: %s", metrics)
            return
        if info["secure"]:
            # Work while the key exchange waits on the other clients: the masks need the keys, not the update.
            with ThreadPoolExecutor(1) as pool:
                metrics = self._secure_round(info, examples, pool.submit(evaluate_and_train).result)
        else:
            metrics, update = evaluate_and_train()
            update = np.clip(update, -info["bound"], info["bound"]).astype("<f4")  # what the aggregator accepts
            self._post(info, "update", {"examples": examples, "metrics": metrics}, update.tobytes())
        log.info(
            "round %d: sent update (%d examples, holdout accuracy %.4f before training)",
            info["round"],
            examples,
            metrics["accuracy"],
        )

    def _secure_round(self, info: dict, examples: int, work) -> dict:
        """Bonawitz et al.'s four steps; `work()` yields (holdout metrics, update). Returns the metrics."""
        context = bytes.fromhex(info["id"])
        c_key, s_seed = self.next_keys or _new_keys()
        self.next_keys = None
        s_key, b_seed = secagg.mask_private_key(s_seed), secagg.random_secret()
        keys = secagg.public_bytes(c_key) + secagg.public_bytes(s_key)
        roster = info.get("roster")
        if roster is None or base64.b64decode(roster["keys"]) != keys:
            if info["stage"] != "join":
                raise RoundGone("the round started without this client's current keys")
            roster = self._post(info, "join", {"examples": examples, **self._signed(info["id"], keys)}, keys)
        me, t, scale, bound = roster["index"], roster["t"], roster["scale"], roster["bound"]
        peers = self._trusted_peers(info["id"], roster["neighbours"])

        b_shares = secagg.shamir_split(b_seed, t, peers)
        s_shares = secagg.shamir_split(s_seed, t, peers)
        order = sorted(peers)
        ciphertexts = b"".join(
            secagg.encrypt_shares(c_key, peers[v][:32], context, me, v, b_shares[v], s_shares[v]) for v in order
        )
        commitment = base64.b64encode(secagg.self_mask_commitment(b_seed, context)).decode()
        inbox = self._post(info, "shares", {"to": order, "commitment": commitment}, ciphertexts)["inbox"]
        try:
            held = {
                int(u): secagg.decrypt_shares(c_key, peers[int(u)][:32], context, int(u), me, base64.b64decode(c))
                for u, c in inbox.items()
            }
        except InvalidTag as error:
            raise RoundGone("a share failed authentication: altered or misrouted by the aggregator") from error

        metrics, update = work()
        pairwise = {u: secagg.pairwise_seed(s_key, peers[u][32:], context) for u in held}
        masked = secagg.mask(secagg.encode(update, examples, bound, scale), me, b_seed, pairwise)
        # Fresh keys for the next round ride along, so that round can start without a join step.
        self.next_keys = _new_keys()
        next_public = secagg.public_bytes(self.next_keys[0]) + secagg.public_bytes(
            secagg.mask_private_key(self.next_keys[1])
        )
        header = {"metrics": metrics, **self._signed(info["nextId"], next_public, "nextSignature")}
        decision = self._post(info, "update", header, masked.astype("<u4").tobytes() + next_public)

        survivors, dropped = set(decision["survivors"]), set(decision["dropped"])
        if survivors & dropped or not (survivors | dropped) <= set(held):
            raise RoundGone("inconsistent unmasking request: refusing to reveal shares")
        if len(survivors) + 1 < t:  # as in the paper: too few survivors, and the sum must not be recovered
            raise RoundGone(f"only {len(survivors) + 1} of this client's neighbourhood survived, {t} needed")
        b = sorted(survivors)
        s = sorted(dropped)
        payload = b"".join(held[u][0].to_bytes(secagg.SHARE_BYTES, "big") for u in b)
        payload += b"".join(held[u][1].to_bytes(secagg.SHARE_BYTES, "big") for u in s)
        self._post(info, "unmask", {"b": b, "s": s}, payload)
        return metrics

    # --- authenticated keys -----------------------------------------------------------------------------

    def _signed(self, round_id: str, keys: bytes, name: str = "signature") -> dict:
        if self.identity is None:
            return {}
        signature = secagg.sign(self.identity.key, secagg.keys_message(round_id, self.id, keys))
        return {name: base64.b64encode(signature).decode()}

    def _trusted_peers(self, round_id: str, neighbours: dict) -> dict[int, bytes]:
        """Neighbours' public keys by index, each checked (with a certificate) against its signature, the CA
        and the neighbour's name: a substituted key ends the round for this client before it shares."""
        peers, names = {}, set()
        for v, entry in neighbours.items():
            keys = base64.b64decode(entry["keys"])
            if len(keys) != 2 * secagg.KEY_BYTES:
                raise RoundGone(f"neighbour {v} has no valid public keys")
            if self.identity is not None:
                name = entry["client"]
                if name == self.id or name in names:
                    raise RoundGone(f"neighbour {name!r} is listed twice, or is this client")
                names.add(name)
                try:
                    cert, signature = base64.b64decode(entry["cert"]), base64.b64decode(entry["signature"])
                    message = secagg.keys_message(round_id, name, keys)
                    secagg.verify_keys(cert, self.identity.ca, name, message, signature)
                except (secagg.UntrustedKeys, ValueError) as error:
                    raise RoundGone(f"refusing to share secrets: {error}") from error
            peers[int(v)] = keys
        return peers

    # --- plumbing ------------------------------------------------------------------------------------------

    def _fetch_model(self, sha: str, trainable: str) -> None:
        """The ONNX graph, once: rounds only change its weights."""
        if sha == self.model_sha:
            return
        status, body = self.conn.request("GET", "/v1/model", headers={"X-Edgeloop-Client": self.id})
        if status != 200:
            raise RoundGone(f"model download: HTTP {status}")
        if hashlib.sha256(body).hexdigest() != sha:
            raise RoundGone("model download does not match the round's sha256")
        self.model, self.model_sha = load(body, trainable), sha
        # Only the trainable layers change between rounds, so the frozen prefix's features are computed once.
        if self.features is None:
            self.features = (self.model.features(self.data.x_train), self.model.features(self.data.x_holdout))

    def _fetch_weights(self) -> np.ndarray:
        status, body = self.conn.request("GET", "/v1/weights", headers={"X-Edgeloop-Client": self.id})
        if status != 200 or len(body) != 4 * self.model.size:
            raise RoundGone(f"weights download: HTTP {status}, {len(body)} bytes")
        return np.frombuffer(body, "<f4").copy()

    def _get_json(self, path: str) -> dict:
        status, body = self.conn.request("GET", path, headers={"X-Edgeloop-Client": self.id})
        if status != 200:
            raise OSError(f"GET {path}: HTTP {status}")
        return json.loads(body)

    def _post(self, info: dict, action: str, header: dict, payload: bytes = b"") -> dict:
        status, body = self.conn.request(
            "POST",
            f"/v1/{action}",
            pack(header, payload),
            {"X-Edgeloop-Client": self.id, "X-Edgeloop-Round": info["id"], "Content-Type": "application/octet-stream"},
        )
        if status == 409:
            raise RoundGone(json.loads(body).get("error", "conflict"))
        if status != 200:
            raise RuntimeError(f"{action}: HTTP {status}: {body[:200]!r}")
        return json.loads(body)


def _new_keys() -> tuple[X25519PrivateKey, int]:
    return X25519PrivateKey.generate(), secagg.random_secret()
