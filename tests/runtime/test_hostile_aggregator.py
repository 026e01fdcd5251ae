"""The aggregator against lying clients, and honest clients against a lying aggregator (issue 16, items 4, 9,
13). The real aggregator and its HTTP server run in this process on loopback with mutual TLS and one
certificate per client (C5); honest clients are the real client code in threads; liars are the real client
with one message altered, or raw requests. After each case the round still ends as it should and what honest
clients sent is not lost."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from edgeloop_runtime.federated import secagg
from edgeloop_runtime.federated.aggregator import Aggregator, Settings
from edgeloop_runtime.federated.aggregator_http import serve
from edgeloop_runtime.federated.client import FederatedClient, LocalData, load_identity
from edgeloop_runtime.federated.data import dirichlet_partition
from edgeloop_runtime.federated.model import mlp
from edgeloop_runtime.federated.training import TrainConfig
from edgeloop_runtime.federated.transport import Client, RoundGone, client_context, pack, server_context
from fed_processes import free_port, issue_certificates, rss_kib, runtime
from sklearn.datasets import load_digits

NAMES = ["c0", "c1", "c2", "c3", "mallory"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Certificates for every name, data sets per client, and the starting model."""
    root = tmp_path_factory.mktemp("hostile-federation")
    tls = issue_certificates(root / "tls", clients=NAMES)
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)
    data = {}
    for name, rows in zip(NAMES, dirichlet_partition(y, len(NAMES), alpha=5.0, seed=3), strict=True):
        np.savez(root / f"{name}.npz", x=x[rows], y=y[rows])
        data[name] = LocalData.load(str(root / f"{name}.npz"), 0.2)
    return {"root": root, "tls": tls, "data": data, "model": mlp([64, 16, 10], seed=1)}


class Federation:
    """One job: the real aggregator (coordinator thread + HTTPS server with client certificates) and clients."""

    def __init__(self, world, tmp: Path, clients: int, aggregator_class=Aggregator, **settings):
        tls = world["tls"]
        self.world = world
        # Rounds and stages close as soon as every client has sent: the deadlines only guard a slow machine.
        cfg = {"rounds": 1, "min_clients": 3, "deadline": 30.0, "stage_timeout": 5.0, "secure": True, **settings}
        cfg.setdefault("train", TrainConfig(epochs=1, batch_size=16, learning_rate=0.5))
        self.settings = Settings(clients=clients, state_dir=tmp / "state", ca=_ca(tls["ca"]), **cfg)
        self.agg = aggregator_class(self.settings, world["model"])
        context = server_context(str(tls["server"]), str(tls["server-key"]), str(tls["ca"]))
        self.server = serve(self.agg, "127.0.0.1", 0, context)
        self.port = self.server.server_address[1]
        self.status: dict = {}
        self.coordinator = threading.Thread(target=lambda: self.status.update(self.agg.run()), daemon=True)
        self.coordinator.start()
        self.threads: list[threading.Thread] = []
        self.outcomes: dict[str, object] = {}

    def connection(self, name: str) -> Client:
        tls = self.world["tls"]
        context = client_context(str(tls["ca"]), str(tls[name]), str(tls[f"{name}-key"]))
        return Client(f"https://127.0.0.1:{self.port}", context)

    def start(self, name: str, client_class=FederatedClient, **kwargs) -> FederatedClient:
        tls = self.world["tls"]
        identity = load_identity(str(tls[name]), str(tls[f"{name}-key"]), str(tls["ca"]))
        client = client_class(self.connection(name), name, self.world["data"][name], 0, 20.0, identity, **kwargs)

        def run():
            try:
                self.outcomes[name] = client.run()
            except Exception as error:  # a liar's client may give up in its own way
                self.outcomes[name] = error

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)
        return client

    def finish(self, timeout: float = 30) -> dict:
        self.coordinator.join(timeout)
        assert not self.coordinator.is_alive(), "the coordinator is stuck"
        for thread in self.threads:
            thread.join(timeout)
        self.server.shutdown()
        self.server.server_close()
        return self.status


def _ca(path):
    from cryptography import x509

    return x509.load_pem_x509_certificate(Path(path).read_bytes())


class Liar(FederatedClient):
    """The real client, with `alter(action, header, payload)` applied to what it posts; when the aggregator
    refuses the altered message (400), it sends the honest one, unless `give_up`."""

    def __init__(self, *args, alter=None, give_up=False):
        super().__init__(*args)
        self.alter, self.give_up = alter, give_up
        self.answers: list[tuple[str, int]] = []

    def _send(self, info, action, header, payload):
        status, body = self.conn.request(
            "POST",
            f"/v1/{action}",
            pack(header, payload),
            {"X-Edgeloop-Client": self.id, "X-Edgeloop-Round": info["id"]},
        )
        self.answers.append((action, status))
        return status, body

    def _post(self, info, action, header, payload=b""):
        status, body = self._send(info, action, *self.alter(action, header, payload))
        if status == 400 and not self.give_up:
            status, body = self._send(info, action, header, payload)
        if status == 409:
            raise RoundGone(json.loads(body)["error"])
        if status != 200:
            raise RuntimeError(f"{action}: HTTP {status}: {body[:300]!r}")
        return json.loads(body)


def honest(fed: Federation, count: int) -> None:
    for name in NAMES[:count]:
        fed.start(name)


# --- item 4: examples, metrics, updates --------------------------------------------------------------------


@pytest.mark.parametrize("examples", [10**400, 10**300, 0, -1, True, 1.5, "12", 1_000_001])
def test_a_client_claiming_absurd_example_counts_is_refused_and_the_round_goes_on(world, tmp_path, examples):
    fed = Federation(world, tmp_path, clients=4, secure=False, min_clients=3)
    honest(fed, 3)

    def lie(action, header, payload):
        return ({**header, "examples": examples} if action == "update" else header), payload

    mallory = fed.start("mallory", Liar, alter=lie)
    status = fed.finish()
    assert status["phase"] == "Succeeded", status
    assert mallory.answers[:2] == [("update", 400), ("update", 200)]  # refused, then its honest update taken
    assert status["history"][0]["participants"]["reported"] == 4
    assert status["metrics"]["accuracy"] > status["baseline"]["accuracy"]  # every update was applied


@pytest.mark.parametrize(
    "metrics",
    [
        {"accuracy": float("nan"), "loss": 1.0, "examples": 10},
        {"accuracy": 999999999.92, "loss": 1.0, "examples": 10},
        {"accuracy": 0.5, "loss": float("inf"), "examples": 10},
        {"accuracy": 0.5, "loss": -1.0, "examples": 10},
        {"accuracy": 0.5, "loss": 1.0, "examples": 10**300},
        {"accuracy": 0.5, "loss": 1.0},
        "high",
    ],
    ids=["nan", "huge-accuracy", "inf-loss", "negative-loss", "huge-holdout", "no-holdout-size", "not-an-object"],
)
def test_non_finite_or_out_of_range_metrics_are_refused(world, tmp_path, metrics):
    fed = Federation(world, tmp_path, clients=4, secure=False)
    honest(fed, 3)
    mallory = fed.start("mallory", Liar, alter=lambda a, h, p: ({**h, "metrics": metrics}, p))
    status = fed.finish()
    assert status["phase"] == "Succeeded"
    assert mallory.answers[:2] == [("update", 400), ("update", 200)]
    assert mallory.answers[2:] == [("evaluate", 400), ("evaluate", 200)]
    assert status["history"][0]["participants"]["reported"] == 4
    assert all(0 <= m["accuracy"] <= 1 for m in (status["metrics"], status["baseline"]))


@pytest.mark.parametrize("kind", ["nan", "beyond-bound", "beyond-clip-norm"])
def test_plain_updates_outside_the_bounds_are_refused(world, tmp_path, kind):
    train = TrainConfig(1, 16, 0.5, clip_norm=0.5 if kind == "beyond-clip-norm" else None)
    fed = Federation(world, tmp_path, clients=4, secure=False, bound=1.0, train=train)
    honest(fed, 3)

    def lie(action, header, payload):
        vector = np.frombuffer(payload, "<f4").copy()
        vector[:] = {"nan": np.nan, "beyond-bound": 5.0, "beyond-clip-norm": 0.9}[kind]
        return header, vector.astype("<f4").tobytes()

    mallory = fed.start("mallory", Liar, alter=lie)
    status = fed.finish()
    assert status["phase"] == "Succeeded"
    assert mallory.answers == [("update", 400), ("update", 200), ("evaluate", 200)]
    assert status["history"][0]["participants"]["reported"] == 4


def test_one_client_cannot_push_the_gate_metrics_past_the_honest_ones(world, tmp_path):
    """The gate reads medians over the clients: a liar claiming perfect accuracy on a huge holdout set moves the
    weighted mean, not the median."""
    fed = Federation(world, tmp_path, clients=4, secure=True, rounds=1)
    honest(fed, 3)

    def lie(action, header, payload):
        if "metrics" in header:
            header = {**header, "metrics": {"accuracy": 1.0, "loss": 0.0, "examples": 1_000_000}}
        return header, payload

    fed.start("mallory", Liar, alter=lie)
    status = fed.finish()
    assert status["phase"] == "Succeeded", status
    final, baseline = status["metrics"], status["baseline"]
    assert final["evaluators"] == baseline["evaluators"] == 4
    assert final["meanAccuracy"] > 0.99 and baseline["meanAccuracy"] > 0.99  # the weighted means are the liar's
    assert final["accuracy"] < 0.99, "the median lies between honest clients' accuracies"
    assert baseline["accuracy"] < 0.5, "and so does the starting model's"


def test_evaluation_needs_min_clients_evaluators(world, tmp_path):
    fed = Federation(world, tmp_path, clients=3, secure=False, min_clients=3, stage_timeout=2.0)
    honest(fed, 2)
    fed.start("c2", Liar, alter=lambda a, h, p: (h, p) if a != "evaluate" else ({"metrics": "none"}, p), give_up=True)
    status = fed.finish()
    assert status["phase"] == "Failed"
    assert "only 2 client(s) evaluated the final model, minClients is 3" in status["reason"]
    assert status["metrics"] is None


# --- secure aggregation: garbage vectors and wrong shares ---------------------------------------------------


def test_a_masked_vector_of_garbage_discards_the_round_instead_of_poisoning_the_model(world, tmp_path):
    fed = Federation(world, tmp_path, clients=4, secure=True)
    start = fed.agg.weights.copy()
    honest(fed, 3)

    def lie(action, header, payload):
        if action == "update":
            size = len(payload) - 64
            payload = np.random.default_rng(0).integers(0, 2**32, size // 4, dtype=np.uint32).tobytes() + payload[size:]
        return header, payload

    fed.start("mallory", Liar, alter=lie)
    status = fed.finish()
    assert status["phase"] == "Succeeded"
    assert "a client lied" in status["history"][0]["discarded"]
    np.testing.assert_array_equal(fed.agg.weights, start)


def test_wrong_revealed_shares_are_corrected_and_the_sum_is_right(world, tmp_path):
    fed = Federation(world, tmp_path, clients=5, secure=True, min_clients=3)
    honest(fed, 4)

    def lie(action, header, payload):
        if action == "unmask":
            payload = bytes(b ^ 0x5A for b in payload)  # every share it reveals is wrong
        return header, payload

    fed.start("mallory", Liar, alter=lie)
    status = fed.finish()
    assert status["phase"] == "Succeeded", status
    assert "discarded" not in status["history"][0]
    assert status["history"][0]["participants"]["reported"] == 5
    assert status["metrics"]["accuracy"] > status["baseline"]["accuracy"]


# --- item 9: identity, overwrites and replays ----------------------------------------------------------------


def test_the_client_id_is_the_certificates_and_a_header_naming_another_is_refused(world, tmp_path):
    fed = Federation(world, tmp_path, clients=3, secure=False)
    conn = fed.connection("mallory")
    status, body = conn.request("GET", "/v1/round?after=", headers={"X-Edgeloop-Client": "c0"})
    assert status == 403 and b"is not the certificate's client 'mallory'" in body
    info = json.loads(conn.request("GET", "/v1/round?after=")[1])  # no header: the certificate names it
    assert info["phase"] == "Running"
    honest(fed, 3)
    assert fed.finish()["phase"] == "Succeeded"


def test_replayed_and_changed_messages_are_refused_and_retries_answered(world, tmp_path):
    # mallory does not evaluate; the rounds close when all three sent, the deadline only guards a slow machine
    fed = Federation(world, tmp_path, clients=3, secure=False, rounds=2, min_clients=2, deadline=30.0)
    # mallory's first round before the honest clients start: the round cannot close under its retries
    conn = fed.connection("mallory")
    info = json.loads(conn.request("GET", "/v1/round?after=")[1])
    vector = np.zeros(fed.agg.model.size, "<f4")
    good = pack({"examples": 5, "metrics": {"accuracy": 0.5, "loss": 1.0, "examples": 2}}, vector.tobytes())
    headers = {"X-Edgeloop-Round": info["id"]}
    assert conn.request("POST", "/v1/update", good, headers)[0] == 200
    assert conn.request("POST", "/v1/update", good, headers)[0] == 200, "an identical retry is answered"
    changed = pack({"examples": 500, "metrics": {"accuracy": 0.5, "loss": 1.0, "examples": 2}}, vector.tobytes())
    status, body = conn.request("POST", "/v1/update", changed, headers)
    assert status == 409 and b"already sent a different update" in body
    honest(fed, 2)
    first_round = info["id"]
    info = json.loads(conn.request("GET", f"/v1/round?after={first_round}")[1])
    assert info["round"] == 2
    status, body = conn.request("POST", "/v1/update", good, {"X-Edgeloop-Round": first_round})
    assert status == 409 and b"no such round" in body, "a message of an old round is refused"
    assert conn.request("POST", "/v1/update", good, {"X-Edgeloop-Round": info["id"]})[0] == 200
    status = fed.finish()
    assert status["phase"] == "Succeeded"
    assert [h["participants"]["reported"] for h in status["history"]] == [3, 3]


# --- item 13: key substitution by the aggregator -----------------------------------------------------------


class SubstitutingAggregator(Aggregator):
    """Hands clients its own public keys in place of c1's (with c1's signature and certificate, or another
    client's), as an aggregator that wanted to read c1's pairwise masks would."""

    how = "fresh-keys"

    def _public(self, m):
        entry = super()._public(m)
        if m.client == "c1":
            fake = secagg.public_bytes(secagg.mask_private_key(1)) * 2
            if self.how == "fresh-keys":
                entry["keys"] = base64.b64encode(fake).decode()
            elif self.how == "other-cert":
                other = next(o for o in self.round.members.values() if o.client == "c2")
                entry.update(keys=base64.b64encode(fake).decode(), cert=base64.b64encode(other.cert).decode())
            else:
                entry["signature"] = ""
        return entry


@pytest.mark.parametrize("how", ["fresh-keys", "other-cert", "no-signature"])
def test_clients_refuse_to_share_with_substituted_keys(world, tmp_path, how):
    aggregator = type("Substituting", (SubstitutingAggregator,), {"how": how})
    fed = Federation(world, tmp_path, clients=3, secure=True, aggregator_class=aggregator, stage_timeout=2.0)
    honest(fed, 3)
    status = fed.finish()
    assert status["phase"] == "Failed"
    assert "clients shared keys" in status["reason"]
    assert not fed.agg.state["history"]
    # c0 and c2 saw c1's substituted keys and shared nothing; c1 never got to share with the others either.


def test_unsigned_keys_are_refused_by_an_aggregator_that_requires_client_certificates(world, tmp_path):
    fed = Federation(world, tmp_path, clients=3, secure=True, stage_timeout=2.0, deadline=3.0)
    honest(fed, 2)
    unsigned = {"alter": lambda a, h, p: ({k: v for k, v in h.items() if k != "signature"}, p), "give_up": True}
    fed.start("mallory", Liar, **unsigned)
    status = fed.finish()
    assert status["phase"] == "Failed"  # 2 of 3 joined within the stage timeout, then min_clients 3 failed it
    mallory = fed.outcomes["mallory"]
    assert isinstance(mallory, RuntimeError) and "keys must be signed" in str(mallory)


# --- the HTTP side, as a process: bodies the aggregator never buffers --------------------------------------


@pytest.fixture
def aggregator_process(world, tmp_path):
    (tmp_path / "m.onnx").write_bytes(world["model"])
    port = free_port()
    proc = runtime(
        "federated", "aggregate", "--model", str(tmp_path / "m.onnx"), "--clients", "3", "--host", "127.0.0.1",
        "--port", str(port), "--state-dir", str(tmp_path / "state"), "--header-timeout", "2", "--body-timeout", "2",
        "--min-body-rate", "10000000", log=tmp_path / "aggregator.log",
    )  # fmt: skip
    end = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < end, (tmp_path / "aggregator.log").read_text()
            time.sleep(0.1)
    yield proc, port
    proc.kill()
    proc.wait()


def _send(port: int, head: bytes, body_bytes: int = 0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        chunk = b"\0" * (1 << 20)
        try:
            for _ in range(body_bytes >> 20):
                sock.sendall(chunk)
        except OSError:
            pass
        sock.settimeout(5)
        try:
            return sock.recv(4096)
        except OSError:
            return b""


@pytest.mark.parametrize(
    ("length", "status"),
    [("-1", b"400"), ("abc", b"400"), (None, b"411"), (str(1 << 30), b"413")],
    ids=["negative", "not-a-number", "missing", "1GiB"],
)
def test_bodies_are_never_buffered_beyond_the_model_bound(aggregator_process, length, status):
    proc, port = aggregator_process
    before = rss_kib(proc.pid)
    head = b"POST /v1/update HTTP/1.1\r\nHost: x\r\nX-Edgeloop-Client: a\r\n"
    head += (b"Content-Length: " + length.encode() + b"\r\n" if length else b"") + b"\r\n"
    answer = _send(port, head, body_bytes=300 << 20)
    assert answer.split(b" ")[1] == status, answer
    assert rss_kib(proc.pid) - before < 30_000, "the aggregator held on to what it was sent"
    healthy = _send(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert healthy.startswith(b"HTTP/1.1 200")


def test_a_body_the_aggregator_does_not_read_is_not_taken_for_the_next_request(aggregator_process):
    """Request smuggling: GET /healthz with a Content-Length body holding a second request was answered twice
    (the body was read as the next request). One answer now, then the connection closes."""
    _, port = aggregator_process
    smuggled = b"GET /v1/status HTTP/1.1\r\nHost: x\r\nX-Edgeloop-Client: c0\r\n\r\n"
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(smuggled)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head + smuggled)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"\r\n\r\n") == 1, answer
