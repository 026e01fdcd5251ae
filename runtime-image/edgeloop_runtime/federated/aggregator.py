"""The aggregator: an HTTP(S) service that runs the rounds, combines updates, checkpoints and publishes.

One coordinator thread walks each round through its stages; request threads record what clients send and
block until the stage they wait on closes (long polling), so a round moves as fast as its slowest live
client and never waits on a dead one past its deadline.

    join ──► share ──► collect ──► unmask        (secure aggregation)
    collect                                      (plain: update and example count in one request)

After the last training round comes an evaluation round: clients score the final model on their holdout
data, and the weighted means become the result's metrics. See FEDERATED.md for the API and the status.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np

from . import secagg
from .model import load
from .training import TrainConfig
from .transport import unpack

log = logging.getLogger("edgeloop.federated.aggregator")

LONG_POLL_SECONDS = 25.0


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
    bound: float = 8.0  # secure aggregation clips each update value to ±bound before quantizing
    deadline: float = 900.0  # seconds from a round's start to the end of its collect stage
    stage_timeout: float = 60.0  # how long join (past quorum), share, unmask and evaluate wait
    store: str | None = None
    store_token: str | None = None


class JobFailed(RuntimeError):
    """The job cannot succeed: reported as phase Failed with this message as the reason."""


@dataclass
class Member:
    client: str
    index: int  # 1-based: also the member's Shamir x-coordinate
    examples: int
    keys: bytes = b""  # c public key ‖ s public key (secure aggregation)


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


def weighted_mean(reports: list[dict]) -> dict[str, float]:
    """Federated evaluation: clients' holdout metrics weighted by their holdout sizes."""
    reports = [r for r in reports if r.get("examples", 0) > 0]
    total = sum(r["examples"] for r in reports)
    if not total:
        return {}
    return {k: sum(r[k] * r["examples"] for r in reports) / total for k in ("accuracy", "loss")}


class Aggregator:
    def __init__(self, settings: Settings, initial_model: bytes):
        self.settings = settings
        self.cond = threading.Condition()
        self.weights_dir = settings.state_dir / "weights"
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path = settings.state_dir / "checkpoint.json"
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
        }
        if self.checkpoint_path.exists():
            self.state = json.loads(self.checkpoint_path.read_text())
            if self.state["model"] != self.model_sha:
                raise ValueError(f"{settings.state_dir} holds a checkpoint of another model ({self.state['model']})")
            self.weights = np.load(self.weights_dir / f"{self.state['weights']}.npy")
            log.info("resuming after round %d from %s", self.state["round"], self.checkpoint_path)
        else:
            self.weights = self.model.vector()
        self.weights_bytes = self.weights.astype("<f4").tobytes()
        self.round: Round | None = None
        self.advertised: dict[str, tuple[int, bytes]] = {}  # next round's (examples, keys), by client
        self.on_change = lambda status: None

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
            "round": r.number,
            "rounds": cfg.rounds,
            "task": r.task,
            "stage": r.stage,
            "secure": cfg.secure,
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
            "neighbours": {v: _b64(r.member(v).keys) for v in sorted(r.graph[me.index])},
        }

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
        except JobFailed as failure:
            log.error("failed: %s", failure)
            self.state["phase"], self.state["reason"] = "Failed", str(failure)
        with self.cond:
            self.round = None
            self.cond.notify_all()
        self._checkpoint()
        status = self.status()
        self.on_change(status)
        return status

    def _wait(self, done, until: float) -> bool:
        with self.cond:
            return self.cond.wait_for(done, timeout=max(0.0, until - time.monotonic()))

    def _open(self, number: int, task: str, stage: str) -> Round:
        with self.cond:
            self.round = r = Round(number, task, stage=stage)
            if task == "train" and self.settings.secure:
                for client, (examples, keys) in self.advertised.items():
                    r.members[client] = Member(client, len(r.members) + 1, examples, keys)
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
        update = self._secure_round(r) if self.settings.secure else self._plain_round(r)
        with self.cond:
            self._apply(r, update)

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
        self._wait(lambda: self._recoverable(r, shared), time.monotonic() + cfg.stage_timeout)
        with self.cond:
            return self._secure_mean(r, shared)

    def _close_join(self, r: Round) -> None:
        """Fix the round's members: neighbour graph, share threshold, fixed-point scale."""
        cfg = self.settings
        joined = {m.index for m in r.members.values()}
        degree = cfg.neighbours or secagg.default_degree(len(joined))
        r.graph = secagg.neighbour_graph(joined, degree, r.context)
        r.t = secagg.share_threshold(min(len(v) for v in r.graph.values()), cfg.threshold)
        r.scale = secagg.quantization_scale(cfg.bound, sum(m.examples for m in r.members.values()))

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
        try:
            self_seeds = {u: secagg.shamir_combine(b_shares[u], r.t) for u in r.survivors}
            dropped_keys = {d: secagg.shamir_combine(s_shares[d], r.t) for d in dropped}
        except secagg.SecAggError as error:
            raise JobFailed(
                f"round {r.number}: cannot remove the masks: {error} "
                f"({len(r.reveals)} of {len(r.survivors)} survivors revealed shares)"
            ) from error
        masked = np.zeros(self.model.size, dtype=np.uint32)
        for u in r.survivors:
            masked += r.updates[u][0]
        public = {m.index: m.keys[32:] for m in r.members.values()}
        total = secagg.unmask_sum(masked, self_seeds, dropped_keys, public, r.graph, r.survivors, r.context)
        return secagg.dequantize(total, r.scale) / sum(r.member(u).examples for u in r.survivors)

    def _apply(self, r: Round, update: np.ndarray) -> None:
        """New global model, history entry and checkpoint: the round is durable once this returns."""
        self.weights = self.weights + update.astype(np.float32)
        self.weights_bytes = self.weights.astype("<f4").tobytes()
        metrics = weighted_mean([m for _, m in r.updates.values()])  # of the model the round started from
        if self.state["baseline"] is None:
            self.state["baseline"] = metrics or None
        uploads = [r.uploaded[m.client] for m in r.members.values() if m.index in r.survivors]
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
            }
        )
        self.state["round"] = r.number
        self._checkpoint()
        log.info(
            "round %d done: %d clients, holdout accuracy before %.4f",
            r.number,
            len(r.survivors),
            metrics.get("accuracy", float("nan")),
        )

    def _evaluate(self) -> None:
        cfg = self.settings
        r = self._open(self.state["round"], "evaluate", "collect")
        expected = self.state["history"][-1]["participants"]["reported"]  # the clients alive at the end
        self._wait(lambda: len(r.evaluations) >= expected, r.opened + cfg.stage_timeout)
        with self.cond:
            if not r.evaluations:
                raise JobFailed("no client evaluated the final model")
            self.state["metrics"] = weighted_mean(list(r.evaluations.values()))

    def _publish(self) -> None:
        data = self.model.export(self.weights)
        final = self.settings.state_dir / "final.onnx"
        _atomic_write(final, data)
        if self.settings.store:
            from ..store import upload

            try:
                uri = upload(self.settings.store, data, self.settings.store_token)
            except (OSError, ValueError) as error:  # URLError and HTTPError are OSErrors
                raise JobFailed(f"publishing to {self.settings.store} failed: {error}") from error
        else:
            uri = final.resolve().as_uri()
        self.state["result"] = {"uri": uri, "sha256": hashlib.sha256(data).hexdigest()}
        log.info("published %s", uri)

    def _checkpoint(self) -> None:
        """Weights first, then the checkpoint that names them, each by atomic rename: a crash leaves the old
        checkpoint or the new one, never one that points at weights that are not there."""
        sha = hashlib.sha256(self.weights_bytes).hexdigest()
        path = self.weights_dir / f"{sha}.npy"
        if not path.exists():
            buffer = io.BytesIO()
            np.save(buffer, self.weights)
            _atomic_write(path, buffer.getvalue())
        self.state["model"], self.state["weights"] = self.model_sha, sha
        _atomic_write(self.checkpoint_path, json.dumps(self.state, indent=1).encode())
        for old in self.weights_dir.glob("*.npy"):
            if old != path:
                old.unlink()

    # --- what request threads do ----------------------------------------------------------------------------

    def wait_for_round(self, previous: str, client: str) -> dict:
        with self.cond:
            self.cond.wait_for(
                lambda: (self.round is not None and self.round.id != previous) or self.state["phase"] != "Running",
                timeout=LONG_POLL_SECONDS,
            )
            return self.round_info(client)

    def handle(self, client: str, round_id: str, action: str, header: dict, payload: bytes) -> dict:
        """Record one client message and, for the blocking steps, wait until the stage closes."""
        with self.cond:
            r = self.round
            if r is None or r.id != round_id:
                raise Conflict("no such round (it ended, or the aggregator restarted)")
            return getattr(self, f"_on_{action}")(r, client, header, payload)

    def _expect(self, r: Round, stage: str) -> None:
        if r.stage != stage:
            raise Conflict(f"round {r.number} is in stage {r.stage}, not {stage}")

    def _await_stage_after(self, r: Round, stage: str) -> None:
        self.cond.wait_for(lambda: r is not self.round or r.stage != stage)
        if r is not self.round:
            raise Conflict("the round ended before this stage closed")

    def _on_join(self, r: Round, client: str, header: dict, payload: bytes) -> dict:
        self._expect(r, "join")
        if len(payload) != 2 * secagg.KEY_BYTES:
            raise BadRequest("join needs two 32-byte public keys")
        me = self._add_member(r, client, header, payload)
        self._await_stage_after(r, "join")
        return self._roster(r, me)

    def _on_shares(self, r: Round, client: str, header: dict, payload: bytes) -> dict:
        self._expect(r, "share")
        me = self._member(r, client)
        to = [int(v) for v in header["to"]]
        if set(to) != r.graph[me.index] or len(payload) != len(to) * secagg.CIPHERTEXT_BYTES:
            raise BadRequest("shares must go to exactly this client's neighbours, one ciphertext each")
        n = secagg.CIPHERTEXT_BYTES
        r.shares[me.index] = {v: payload[i * n : (i + 1) * n] for i, v in enumerate(to)}
        self.cond.notify_all()
        self._await_stage_after(r, "share")
        return {"inbox": {u: _b64(c[me.index]) for u, c in r.shares.items() if me.index in c}}

    def _on_update(self, r: Round, client: str, header: dict, payload: bytes) -> dict:
        self._expect(r, "collect")
        if not self.settings.secure:
            self._add_member(r, client, header)
        me = self._member(r, client)
        if self.settings.secure and me.index not in r.shares:
            raise Conflict("this client did not share its keys in this round")
        dtype = np.dtype("<u4") if self.settings.secure else np.dtype("<f4")
        size = self.model.size * dtype.itemsize
        # With secure aggregation, the public keys for the next round may follow the vector.
        if len(payload) not in (size, size + 2 * secagg.KEY_BYTES if self.settings.secure else size):
            raise BadRequest(f"update must be {self.model.size} {dtype} values")
        metrics = {k: float(header["metrics"][k]) for k in ("accuracy", "loss", "examples")}
        r.updates[me.index] = (np.frombuffer(payload[:size], dtype=dtype), metrics)
        if len(payload) > size:
            self.advertised[client] = (me.examples, payload[size:])
        self.cond.notify_all()
        if not self.settings.secure:
            return {}
        self._await_stage_after(r, "collect")
        if me.index not in r.survivors:
            raise Conflict("update arrived after the deadline")
        mine = r.graph[me.index] & set(r.shares)
        return {"survivors": sorted(mine & r.survivors), "dropped": sorted(mine - r.survivors)}

    def _on_unmask(self, r: Round, client: str, header: dict, payload: bytes) -> dict:
        self._expect(r, "unmask")
        me = self._member(r, client)
        b, s = [int(v) for v in header["b"]], [int(v) for v in header["s"]]
        if set(b) & set(s) or not set(b) <= r.survivors or set(s) & r.survivors:
            raise BadRequest("reveal b shares of survivors and s shares of dropped clients only")
        n = secagg.SHARE_BYTES
        values = [int.from_bytes(payload[i * n : (i + 1) * n], "big") for i in range(len(b) + len(s))]
        r.reveals[me.index] = (dict(zip(b, values[: len(b)], strict=True)), dict(zip(s, values[len(b) :], strict=True)))
        self.cond.notify_all()
        return {}

    def _on_evaluate(self, r: Round, client: str, header: dict, payload: bytes) -> dict:
        self._expect(r, "collect")
        if r.task != "evaluate":
            raise Conflict("this round trains")
        r.evaluations[client] = {k: float(header["metrics"][k]) for k in ("accuracy", "loss", "examples")}
        self.cond.notify_all()
        return {}

    def _add_member(self, r: Round, client: str, header: dict, keys: bytes = b"") -> Member:
        if client not in r.members:
            examples = int(header["examples"])
            if examples <= 0:
                raise BadRequest("examples must be > 0")
            if len(r.members) >= self.settings.clients:
                raise Conflict(f"round {r.number} is full ({self.settings.clients} clients)")
            r.members[client] = Member(client, len(r.members) + 1, examples, keys)
            self.cond.notify_all()
        return r.members[client]

    def _member(self, r: Round, client: str) -> Member:
        if client not in r.members:
            raise Conflict("this client did not join this round")
        return r.members[client]


class Conflict(Exception):
    status = 409


class BadRequest(Exception):
    status = 400


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


ACTIONS = {
    "/v1/join": "join",
    "/v1/shares": "shares",
    "/v1/update": "update",
    "/v1/unmask": "unmask",
    "/v1/evaluate": "evaluate",
}


def make_handler(agg: Aggregator):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "edgeloop-aggregator"

        def setup(self):
            super().setup()
            # Small request/response pairs: without this, Nagle + delayed ACKs add ~40 ms to many replies.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def log_message(self, fmt, *args):  # per-request lines would drown the round log
            log.debug(fmt, *args)

        def _reply(self, code: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj) -> None:
            self._reply(code, json.dumps(obj).encode())

        def _count(self, body_length: int) -> str:
            """Attribute what this request carried (request line, headers, body) to its client."""
            client = self.headers.get("X-Edgeloop-Client", "")
            size = len(self.raw_requestline) + sum(len(k) + len(v) + 4 for k, v in self.headers.items()) + 2
            with agg.cond:
                if client and agg.round is not None:
                    agg.round.uploaded[client] += size + body_length
            return client

        def do_GET(self):
            url = urlsplit(self.path)
            self._count(0)
            if url.path == "/v1/round":
                previous = parse_qs(url.query).get("after", [""])[0]
                self._json(200, agg.wait_for_round(previous, self.headers.get("X-Edgeloop-Client", "")))
            elif url.path in ("/v1/model", "/v1/weights"):
                with agg.cond:
                    body = agg.model_bytes if url.path == "/v1/model" else agg.weights_bytes
                    sha = hashlib.sha256(body).hexdigest()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", f'"{sha}"')
                self.end_headers()
                self.wfile.write(body)
            elif url.path == "/v1/status":
                with agg.cond:
                    self._json(200, agg.status())
            elif url.path == "/healthz":
                self._json(200, {"ok": True})
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self):
            length = int(self.headers.get("Content-Length", 0))
            body = self.rfile.read(length)
            client = self._count(length)
            action = ACTIONS.get(urlsplit(self.path).path)
            if action is None:
                return self._json(404, {"error": "not found"})
            if not client:
                return self._json(400, {"error": "X-Edgeloop-Client header missing"})
            try:
                header, payload = unpack(body)
                result = agg.handle(client, self.headers.get("X-Edgeloop-Round", ""), action, header, payload)
            except (Conflict, BadRequest) as error:
                return self._json(error.status, {"error": str(error)})
            except (ValueError, KeyError, TypeError) as error:
                return self._json(400, {"error": f"malformed {action}: {error}"})
            self._json(200, result)

    return Handler


def serve(agg: Aggregator, host: str, port: int, tls=None) -> ThreadingHTTPServer:
    """Start the HTTP(S) server in a daemon thread; the caller runs `agg.run()`."""
    server = ThreadingHTTPServer((host, port), make_handler(agg))
    server.daemon_threads = True
    if tls is not None:
        # The handshake happens in the request thread, so one slow client cannot stall accept().
        server.socket = tls.wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
    threading.Thread(target=server.serve_forever, name="aggregator-http", daemon=True).start()
    return server
