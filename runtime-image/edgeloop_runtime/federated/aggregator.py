"""The aggregator's logic: runs the rounds, combines updates, checkpoints and publishes (its HTTP side is
aggregator_http.py).

One coordinator thread walks each round through its stages; request threads record what clients send and
block until the stage they wait on closes (long polling), so a round moves as fast as its slowest live
client and never waits on a dead one past its deadline.

    join ──► share ──► collect ──► unmask        (secure aggregation)
    collect                                      (plain: update and example count in one request)

After the last training round comes an evaluation round: clients score the final model on their holdout
data, and the medians over the clients become the result's metrics. See FEDERATED.md for the API and the
status.

Nothing a client sends is taken on trust beyond what the protocol must: example counts lie in
[1, max_examples], metrics are finite and in range, plain updates are finite and within the bounds, every
message is accepted once per round and client (an identical retry is answered again, a different one is
refused), a secure sum outside what clients within the bound can produce is discarded, and rebuilt secrets are
checked against what their owners committed to. The metrics that decide promotion are medians over at least
min_clients clients, so no single client's claim passes the gate. See docs/security.md.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import math
import secrets
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import secagg
from .checkpoint import Checkpoints, StoreRef, Superseded, atomic_write
from .model import load
from .training import TrainConfig
from .validation import BadRequest, Conflict, check_count, check_metrics, check_plain_update, summarize, unb64

log = logging.getLogger("edgeloop.federated.aggregator")

LONG_POLL_SECONDS = 25.0
UNMASK_GRACE_SECONDS = 2.0  # once the sum is recoverable, how long to wait for more reveals (to check them)


@dataclass(frozen=True)
class Settings:
    rounds: int
    clients: int  # selected: how many clients are expected in every round
    min_clients: int  # quorum: fewer reports and the round fails
    state_dir: Path
    train: TrainConfig = field(default_factory=TrainConfig)
    trainable: str = "auto"
    secure: bool = True
    threshold: float = 0.66  # fraction of key-sharing clients that must survive; also of neighbours
    neighbours: int = 0  # SecAgg+ graph degree; 0 picks secagg.default_degree
    bound: float = 8.0  # each update value is clipped to ±bound (secure: before quantizing; plain: checked)
    deadline: float = 900.0  # seconds from a round's start to the end of its collect stage
    stage_timeout: float = 60.0  # how long join (past quorum), share, unmask and evaluate wait
    max_examples: int = 1_000_000  # largest example (and holdout) count a client may claim
    store: str | None = None
    store_token: str | None = None
    store_context: object = None  # ssl.SSLContext trusting the store's CA, for https stores
    ca: object = None  # x509.Certificate: with it, clients' public keys must be signed by their certificates
    checkpoint_ref: StoreRef | None = None  # also checkpoint to the store, to survive the pod and its node


class JobFailed(RuntimeError):
    """The job cannot succeed: reported as phase Failed with this message as the reason."""


class Discarded(Exception):
    """A round's sum cannot be right (a client sent what no honest client can): the weights stay as they were."""


@dataclass
class Member:
    client: str
    index: int  # 1-based: also the member's Shamir x-coordinate
    examples: int
    keys: bytes = b""  # c public key ‖ s public key (secure aggregation)
    signature: bytes = b""  # of keys_message(round id, client, keys), by the client's certificate key
    cert: bytes = b""  # the client's certificate (DER), as its TLS handshake presented it
    commitment: bytes = b""  # to its self-mask seed, sent with its shares


@dataclass
class Round:
    number: int
    task: str  # "train" | "evaluate"
    id: str = field(default_factory=lambda: secrets.token_hex(16))
    stage: str = "join"
    opened: float = field(default_factory=time.monotonic)
    members: dict[str, Member] = field(default_factory=dict)
    graph: dict[int, set[int]] = field(default_factory=dict)
    t: int = 0
    scale: float = 0.0
    shares: dict[int, dict[int, bytes]] = field(default_factory=dict)  # sender → receiver → ciphertext
    updates: dict[int, tuple[np.ndarray, dict]] = field(default_factory=dict)  # index → (vector, metrics)
    survivors: set[int] = field(default_factory=set)
    reveals: dict[int, tuple[dict[int, int], dict[int, int]]] = field(default_factory=dict)
    evaluations: dict[str, dict] = field(default_factory=dict)
    uploaded: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    @property
    def context(self) -> bytes:
        return bytes.fromhex(self.id)

    def member(self, index: int) -> Member:
        return next(m for m in self.members.values() if m.index == index)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Aggregator:
    def __init__(self, settings: Settings, initial_model: bytes):
        self.settings = settings
        self.cond = threading.Condition()
        self.checkpoints = Checkpoints(settings.state_dir, settings.checkpoint_ref)
        # The graph never changes: clients download the model once, then only the weights of each round.
        self.model_bytes = initial_model
        self.model_sha = hashlib.sha256(initial_model).hexdigest()
        self.model = load(initial_model, settings.trainable)
        self.state = {
            "phase": "Running",
            "round": 0,
            "history": [],
            "baseline": None,
            "metrics": None,
            "result": None,
            "reason": "",
            "participants": [],  # every client whose update went into a sum: who may evaluate
        }
        found = self.checkpoints.load(self.model_sha)
        if found is not None:
            state, self.weights, where = found
            self.state = {**self.state, **state}
            log.info("resuming after round %d from %s", self.state["round"], where)
        else:
            self.weights = self.model.vector()
        self.weights_bytes = self.weights.astype("<f4").tobytes()
        self.round: Round | None = None
        self.next_round_id = secrets.token_hex(16)  # known in advance: clients sign next round's keys for it
        self.advertised: dict[str, Member] = {}  # next round's keys (and count), by client
        self.on_change = lambda status: None

    @property
    def max_body_bytes(self) -> int:
        """The largest message an honest client sends: an update (4 bytes per parameter, next keys and a JSON
        header) or shares (one ciphertext per neighbour)."""
        return 4 * self.model.size + 64 + 64 * secagg.CIPHERTEXT_BYTES * self.settings.clients + (64 << 10)

    # --- state shared with request threads (call with self.cond held) ---------------------------------------

    def _set_stage(self, stage: str) -> None:
        self.round.stage = stage
        log.debug("round %d: stage %s", self.round.number, stage)
        self.cond.notify_all()
        self.on_change(self.status())

    def status(self) -> dict:
        s, r = self.state, self.round
        last = s["history"][-1] if s["history"] else None
        if r is not None and r.task == "train" and s["phase"] == "Running":
            participants = {
                "selected": self.settings.clients,
                "reported": len(r.updates),
                "dropped": self.settings.clients - len(r.updates),
            }
        else:
            participants = (
                last["participants"] if last else {"selected": self.settings.clients, "reported": 0, "dropped": 0}
            )
        return {
            "phase": s["phase"],
            "round": r.number if r and r.task == "train" else s["round"],
            "rounds": self.settings.rounds,
            "stage": r.stage if r else None,
            "secureAggregation": self.settings.secure,
            "participants": participants,
            "metrics": s["metrics"],
            "baseline": s["baseline"],
            "result": s["result"],
            "reason": s["reason"],
            "history": s["history"],
        }

    def round_info(self, client: str = "") -> dict:
        r, cfg = self.round, self.settings
        info = {"phase": self.state["phase"], "reason": self.state["reason"]}
        if r is None or self.state["phase"] != "Running":
            return info
        return {
            **info,
            "id": r.id,
            "nextId": self.next_round_id,
            "round": r.number,
            "rounds": cfg.rounds,
            "task": r.task,
            "stage": r.stage,
            "secure": cfg.secure,
            "authenticated": cfg.ca is not None,
            "bound": cfg.bound,
            "model": self.model_sha,
            "weights": hashlib.sha256(self.weights_bytes).hexdigest(),
            "trainable": cfg.trainable,
            "train": asdict(cfg.train),
            "waitSeconds": cfg.deadline + 2 * cfg.stage_timeout,
            # A client whose keys came with its last update finds its neighbours here and skips joining.
            **({"roster": self._roster(r, r.members[client])} if r.stage == "share" and client in r.members else {}),
        }

    def _roster(self, r: Round, me: Member) -> dict:
        return {
            "index": me.index,
            "keys": _b64(me.keys),
            "t": r.t,
            "scale": r.scale,
            "bound": self.settings.bound,
            "neighbours": {v: self._public(r.member(v)) for v in sorted(r.graph[me.index])},
        }

    @staticmethod
    def _public(m: Member) -> dict:
        """What a neighbour needs to check and use m's keys."""
        return {"client": m.client, "keys": _b64(m.keys), "signature": _b64(m.signature), "cert": _b64(m.cert)}

    # --- the coordinator ----------------------------------------------------------------------------------

    def run(self) -> dict:
        """Run the remaining rounds, the evaluation and the publication; return the final status."""
        try:
            while self.state["phase"] == "Running" and self.state["round"] < self.settings.rounds:
                self._train_round(self.state["round"] + 1)
            if self.state["phase"] == "Running":
                self._evaluate()
                self._publish()
                self.state["phase"] = "Succeeded"
        except (JobFailed, Superseded) as failure:
            log.error("failed: %s", failure)
            self.state["phase"], self.state["reason"] = "Failed", str(failure)
            stale = isinstance(failure, Superseded)
        else:
            stale = False
        with self.cond:
            self.round = None
            self.cond.notify_all()
        if not stale:  # a stale aggregator leaves the newer one's checkpoint be
            self._checkpoint()
        status = self.status()
        self.on_change(status)
        return status

    def _wait(self, done, until: float) -> bool:
        with self.cond:
            return self.cond.wait_for(done, timeout=max(0.0, until - time.monotonic()))

    def _open(self, number: int, task: str, stage: str) -> Round:
        with self.cond:
            self.round = r = Round(number, task, id=self.next_round_id, stage=stage)
            self.next_round_id = secrets.token_hex(16)
            if task == "train" and self.settings.secure:
                for member in self.advertised.values():
                    member.index = len(r.members) + 1
                    r.members[member.client] = member
                self.advertised = {}
                if len(r.members) == self.settings.clients:  # all keys came with the last updates: no join
                    self._close_join(r)
                    r.stage = "share"
            self.cond.notify_all()
            self.on_change(self.status())
            log.info("round %d (%s) open", number, task)
            return self.round

    def _train_round(self, number: int) -> None:
        r = self._open(number, "train", "join" if self.settings.secure else "collect")
        try:
            update, discarded = self._secure_round(r) if self.settings.secure else self._plain_round(r), None
        except Discarded as why:
            update, discarded = None, str(why)
        with self.cond:
            self._apply(r, update, discarded)

    def _plain_round(self, r: Round) -> np.ndarray:
        """Clients train as soon as the round opens and send update and example count in one request."""
        cfg = self.settings
        self._wait(lambda: len(r.updates) >= cfg.clients, r.opened + cfg.deadline)
        with self.cond:
            r.survivors = set(r.updates)
            self._require(r.number, "sent updates", len(r.survivors), cfg.clients)
            total = sum(r.member(i).examples for i in r.survivors)
            return sum(r.updates[i][0].astype(np.float64) * r.member(i).examples for i in r.survivors) / total

    def _secure_round(self, r: Round) -> np.ndarray:
        cfg = self.settings
        deadline = r.opened + cfg.deadline
        if r.stage == "join":
            if not self._wait(lambda: len(r.members) >= cfg.clients, r.opened + cfg.stage_timeout):
                self._wait(lambda: len(r.members) >= cfg.min_clients, deadline)
            with self.cond:
                if len(r.members) < cfg.min_clients:
                    raise JobFailed(
                        f"round {r.number}: {len(r.members)} of {cfg.clients} clients joined "
                        f"by the deadline, minClients is {cfg.min_clients}"
                    )
                self._close_join(r)
                self._set_stage("share")
        joined = set(r.graph)
        self._wait(lambda: len(r.shares) == len(joined), time.monotonic() + cfg.stage_timeout)
        with self.cond:
            shared = set(r.shares)
            self._require(r.number, "shared keys", len(shared), len(joined))
            self._set_stage("collect")
        self._wait(lambda: len(r.updates) == len(shared), deadline)
        with self.cond:
            r.survivors = set(r.updates)
            self._require(r.number, "uploaded updates", len(r.survivors), len(shared))
            self._set_stage("unmask")
        end = time.monotonic() + cfg.stage_timeout
        self._wait(lambda: self._recoverable(r, shared), end)
        # More reveals than the threshold let wrong shares be found and corrected: wait a little for them.
        self._wait(lambda: set(r.reveals) >= r.survivors, min(end, time.monotonic() + UNMASK_GRACE_SECONDS))
        with self.cond:
            return self._secure_mean(r, shared)

    def _close_join(self, r: Round) -> None:
        """Fix the round's members: neighbour graph, share threshold, fixed-point scale."""
        cfg = self.settings
        joined = {m.index for m in r.members.values()}
        degree = cfg.neighbours or secagg.default_degree(len(joined))
        r.graph = secagg.neighbour_graph(joined, degree, r.context)
        r.t = secagg.share_threshold(min(len(v) for v in r.graph.values()), cfg.threshold)
        r.scale = secagg.quantization_scale(cfg.bound, sum(m.examples for m in r.members.values()), len(joined))

    def _recoverable(self, r: Round, shared: set[int]) -> bool:
        """Whether t shares have come in for every secret the sum needs (not every survivor must answer)."""
        counts = defaultdict(int)
        for b, s in r.reveals.values():
            for owner in b:
                counts["b", owner] += 1
            for owner in s:
                counts["s", owner] += 1
        return all(counts["b", u] >= r.t for u in r.survivors) and all(
            counts["s", d] >= r.t for d in shared - r.survivors
        )

    def _require(self, number: int, what: str, have: int, of: int) -> None:
        cfg = self.settings
        need = max(cfg.min_clients, math.ceil(cfg.threshold * of) if cfg.secure else 0)
        if have < need:
            rule = f"minClients {cfg.min_clients}" + (f", threshold {cfg.threshold}" if cfg.secure else "")
            raise JobFailed(f"round {number}: only {have} of {of} clients {what}, {need} needed ({rule})")

    def _secure_mean(self, r: Round, shared: set[int]) -> np.ndarray:
        """Σ n_u·Δ_u / Σ n_u over the survivors, from masked vectors and the revealed shares only."""
        dropped = shared - r.survivors
        b_shares, s_shares = defaultdict(dict), defaultdict(dict)
        for holder, (b, s) in r.reveals.items():
            for owner, share in b.items():
                b_shares[owner][holder] = share
            for owner, share in s.items():
                s_shares[owner][holder] = share
        self_seeds, dropped_keys = {}, {}
        for owner, shares, seeds in [(u, b_shares[u], self_seeds) for u in r.survivors] + [
            (d, s_shares[d], dropped_keys) for d in dropped
        ]:
            kind = "self mask" if seeds is self_seeds else "mask key"
            try:
                check = functools.partial(self._matches, r, owner, kind)
                seeds[owner], wrong = secagg.recover(shares, r.t, check)
            except secagg.SecAggError as error:
                raise JobFailed(
                    f"round {r.number}: cannot rebuild the {kind} of {r.member(owner).client}: {error} "
                    f"({len(r.reveals)} of {len(r.survivors)} survivors revealed shares)"
                ) from error
            if wrong:
                log.warning(
                    "round %d: wrong shares of %s's %s from %s (corrected)",
                    r.number, r.member(owner).client, kind, ", ".join(r.member(x).client for x in wrong),
                )  # fmt: skip
        masked = np.zeros(self.model.size, dtype=np.uint32)
        for u in r.survivors:
            masked += r.updates[u][0]
        public = {m.index: m.keys[32:] for m in r.members.values()}
        total = secagg.unmask_sum(masked, self_seeds, dropped_keys, public, r.graph, r.survivors, r.context)
        weight = sum(r.member(u).examples for u in r.survivors)
        mean = secagg.dequantize(total, r.scale) / weight
        slack = (len(r.survivors) / 2 + 1) / (r.scale * weight)
        if np.abs(mean).max(initial=0.0) > self.settings.bound + slack:
            raise Discarded("the unmasked sum lies beyond what clients within the bound can send: a client lied")
        return mean

    def _matches(self, r: Round, owner: int, kind: str, seed: int) -> bool:
        """Whether a rebuilt seed is the one its owner committed to (self mask) or advertised (mask key)."""
        member = r.member(owner)
        if kind == "self mask":
            return secagg.self_mask_commitment(seed, r.context) == member.commitment
        return secagg.public_bytes(secagg.mask_private_key(seed)) == member.keys[32:]

    def _apply(self, r: Round, update: np.ndarray | None, discarded: str | None = None) -> None:
        """New global model, history entry and checkpoint: the round is durable once this returns. A round
        whose sum was discarded keeps the weights it started from, and its history entry says why."""
        entry = {}
        if discarded:
            log.warning("round %d: discarded: %s", r.number, discarded)
            entry["discarded"] = discarded
        else:
            self.weights = self.weights + update.astype(np.float32)
            self.weights_bytes = self.weights.astype("<f4").tobytes()
        metrics = summarize([m for _, m in r.updates.values()], self.settings.min_clients)  # of the round's start
        if self.state["baseline"] is None:
            self.state["baseline"] = metrics
        survivors = [m for m in r.members.values() if m.index in r.survivors]
        uploads = [r.uploaded[m.client] for m in survivors]
        self.state["participants"] = sorted(set(self.state["participants"]) | {m.client for m in survivors})
        self.state["history"].append(
            {
                "round": r.number,
                "participants": {
                    "selected": self.settings.clients,
                    "reported": len(r.survivors),
                    "dropped": self.settings.clients - len(r.survivors),
                },
                "metricsBefore": metrics,
                "seconds": round(time.monotonic() - r.opened, 4),
                "uploadBytesPerClient": round(sum(uploads) / len(uploads)),
                **entry,
            }
        )
        self.state["round"] = r.number
        self._checkpoint()
        log.info(
            "round %d done: %d clients, holdout accuracy before %.4f",
            r.number,
            len(r.survivors),
            (metrics or {}).get("accuracy", float("nan")),
        )

    def _evaluate(self) -> None:
        cfg = self.settings
        r = self._open(self.state["round"], "evaluate", "collect")
        expected = self.state["history"][-1]["participants"]["reported"]  # the clients alive at the end
        self._wait(lambda: len(r.evaluations) >= expected, r.opened + cfg.stage_timeout)
        with self.cond:
            metrics = summarize(list(r.evaluations.values()), cfg.min_clients)
            if metrics is None:
                raise JobFailed(
                    f"only {len(r.evaluations)} client(s) evaluated the final model, minClients is {cfg.min_clients}"
                )
            self.state["metrics"] = metrics

    def _publish(self) -> None:
        data = self.model.export(self.weights)
        final = self.settings.state_dir / "final.onnx"
        atomic_write(final, data)
        if self.settings.store:
            from ..store import upload

            try:
                uri = upload(self.settings.store, data, self.settings.store_token, context=self.settings.store_context)
            except (OSError, ValueError) as error:  # URLError and HTTPError are OSErrors
                raise JobFailed(f"publishing to {self.settings.store} failed: {error}") from error
        else:
            uri = final.resolve().as_uri()
        self.state["result"] = {"uri": uri, "sha256": hashlib.sha256(data).hexdigest()}
        log.info("published %s", uri)

    def _checkpoint(self) -> None:
        self.state["model"] = self.model_sha
        self.checkpoints.save(self.state, self.weights)

    # --- what request threads do ----------------------------------------------------------------------------

    def wait_for_round(self, previous: str, client: str) -> dict:
        with self.cond:
            self.cond.wait_for(
                lambda: (self.round is not None and self.round.id != previous) or self.state["phase"] != "Running",
                timeout=LONG_POLL_SECONDS,
            )
            return self.round_info(client)

    def handle(self, client: str, cert: bytes, round_id: str, action: str, header: dict, payload: bytes) -> dict:
        """Record one client message and, for the blocking steps, wait until the stage closes."""
        with self.cond:
            r = self.round
            if r is None or r.id != round_id:
                raise Conflict("no such round (it ended, or the aggregator restarted)")
            return getattr(self, f"_on_{action}")(r, client, cert, header, payload)

    @staticmethod
    def _once(r: Round, client: str, action: str, before, now) -> bool:
        """Each message is taken once per round and client: True if this one is new, False if it repeats the
        one taken (a retry: answered again); a different one is refused (a replay or an attempt to change it)."""
        if before is None:
            return True
        if before == now:
            return False
        raise Conflict(f"{client} already sent a different {action} in round {r.number}: refused")

    def _expect(self, r: Round, stage: str) -> None:
        if r.stage != stage:
            raise Conflict(f"round {r.number} is in stage {r.stage}, not {stage}")

    def _await_stage_after(self, r: Round, stage: str) -> None:
        self.cond.wait_for(lambda: r is not self.round or r.stage != stage)
        if r is not self.round:
            raise Conflict("the round ended before this stage closed")

    def _signed_keys(self, round_id: str, client: str, cert: bytes, keys: bytes, signature) -> bytes:
        """The signature of `keys`, checked against the client's certificate when keys must be signed."""
        if self.settings.ca is None:
            return b""
        if not signature:
            raise BadRequest("keys must be signed with the client certificate's key: this aggregator requires them")
        signature = unb64(signature, "signature")
        try:
            secagg.verify_keys(cert, self.settings.ca, client, secagg.keys_message(round_id, client, keys), signature)
        except secagg.UntrustedKeys as error:
            raise BadRequest(str(error)) from error
        return signature

    def _on_join(self, r: Round, client: str, cert: bytes, header: dict, payload: bytes) -> dict:
        self._expect(r, "join")
        if len(payload) != 2 * secagg.KEY_BYTES:
            raise BadRequest("join needs two 32-byte public keys")
        if client in r.members and r.members[client].keys != payload:
            raise Conflict(f"{client} already joined round {r.number} with other keys")
        signature = self._signed_keys(r.id, client, cert, payload, header.get("signature"))
        me = self._add_member(r, client, header.get("examples"), payload, signature, cert)
        self._await_stage_after(r, "join")
        return self._roster(r, me)

    def _on_shares(self, r: Round, client: str, cert: bytes, header: dict, payload: bytes) -> dict:
        self._expect(r, "share")
        me = self._member(r, client)
        to = header.get("to")
        if not isinstance(to, list) or any(type(v) is not int for v in to) or len(set(to)) != len(to):
            raise BadRequest("to must list the receivers' indexes")
        if set(to) != r.graph[me.index] or len(payload) != len(to) * secagg.CIPHERTEXT_BYTES:
            raise BadRequest("shares must go to exactly this client's neighbours, one ciphertext each")
        commitment = unb64(header.get("commitment"), "commitment", size=32)
        n = secagg.CIPHERTEXT_BYTES
        shares = {v: payload[i * n : (i + 1) * n] for i, v in enumerate(to)}
        before = (me.commitment, r.shares[me.index]) if me.index in r.shares else None
        if self._once(r, client, "shares", before, (commitment, shares)):
            me.commitment, r.shares[me.index] = commitment, shares
            self.cond.notify_all()
        self._await_stage_after(r, "share")
        return {"inbox": {u: _b64(c[me.index]) for u, c in r.shares.items() if me.index in c}}

    def _on_update(self, r: Round, client: str, cert: bytes, header: dict, payload: bytes) -> dict:
        cfg = self.settings
        self._expect(r, "collect")
        metrics = check_metrics(header.get("metrics"), cfg.max_examples)
        dtype = np.dtype("<u4") if cfg.secure else np.dtype("<f4")
        size = self.model.size * dtype.itemsize
        # With secure aggregation, the public keys for the next round may follow the vector.
        if len(payload) not in ((size, size + 2 * secagg.KEY_BYTES) if cfg.secure else (size,)):
            raise BadRequest(f"update must be {self.model.size} {dtype} values")
        vector = np.frombuffer(payload[:size], dtype=dtype)
        if cfg.secure:
            me = self._member(r, client)
            if me.index not in r.shares:
                raise Conflict("this client did not share its keys in this round")
        else:
            check_plain_update(vector, cfg.bound, cfg.train)
            me = self._add_member(r, client, header.get("examples"))
        advertised = None
        if len(payload) > size:
            keys = payload[size:]
            signature = self._signed_keys(self.next_round_id, client, cert, keys, header.get("nextSignature"))
            advertised = Member(client, 0, me.examples, keys, signature, cert)
        before = r.updates.get(me.index)
        before = before and (before[0].tobytes(), before[1], me.examples)
        if self._once(r, client, "update", before, (payload[:size], metrics, header.get("examples", me.examples))):
            r.updates[me.index] = (vector, metrics)
            if advertised:
                self.advertised[client] = advertised
            self.cond.notify_all()
        if not cfg.secure:
            return {}
        self._await_stage_after(r, "collect")
        if me.index not in r.survivors:
            raise Conflict("update arrived after the deadline")
        mine = r.graph[me.index] & set(r.shares)
        return {"survivors": sorted(mine & r.survivors), "dropped": sorted(mine - r.survivors)}

    def _on_unmask(self, r: Round, client: str, cert: bytes, header: dict, payload: bytes) -> dict:
        self._expect(r, "unmask")
        me = self._member(r, client)
        if me.index not in r.survivors:
            raise Conflict("only clients whose update is in the sum reveal shares")
        b, s = header.get("b"), header.get("s")
        if not all(isinstance(v, list) and all(type(i) is int for i in v) for v in (b, s)):
            raise BadRequest("b and s must list indexes")
        mine = r.graph[me.index] & set(r.shares)
        if set(b) & set(s) or not set(b) <= mine & r.survivors or not set(s) <= mine - r.survivors:
            raise BadRequest("reveal b shares of surviving neighbours and s shares of dropped neighbours only")
        n = secagg.SHARE_BYTES
        if len(payload) != n * (len(b) + len(s)) or len(set(b)) != len(b) or len(set(s)) != len(s):
            raise BadRequest("one 16-byte share per index listed")
        values = [int.from_bytes(payload[i * n : (i + 1) * n], "big") for i in range(len(b) + len(s))]
        reveal = (dict(zip(b, values[: len(b)], strict=True)), dict(zip(s, values[len(b) :], strict=True)))
        if self._once(r, client, "unmask", r.reveals.get(me.index), reveal):
            r.reveals[me.index] = reveal
            self.cond.notify_all()
        return {}

    def _on_evaluate(self, r: Round, client: str, cert: bytes, header: dict, payload: bytes) -> dict:
        self._expect(r, "collect")
        if r.task != "evaluate":
            raise Conflict("this round trains")
        if client not in self.state["participants"]:
            raise Conflict(f"{client} took part in no round: it does not evaluate")
        metrics = check_metrics(header.get("metrics"), self.settings.max_examples)
        if self._once(r, client, "evaluate", r.evaluations.get(client), metrics):
            r.evaluations[client] = metrics
            self.cond.notify_all()
        return {}

    def _add_member(self, r: Round, client: str, examples, keys=b"", signature=b"", cert=b"") -> Member:
        if client not in r.members:
            examples = check_count(examples, "examples", 1, self.settings.max_examples)
            if len(r.members) >= self.settings.clients:
                raise Conflict(f"round {r.number} is full ({self.settings.clients} clients)")
            r.members[client] = Member(client, len(r.members) + 1, examples, keys, signature, cert)
            self.cond.notify_all()
        return r.members[client]

    def _member(self, r: Round, client: str) -> Member:
        if client not in r.members:
            raise Conflict("this client did not join this round")
        return r.members[client]
