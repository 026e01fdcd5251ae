"""The real aggregator and clients as processes on loopback: 10 clients on scikit-learn's digits, label skew
from Dirichlet(0.5), fixed seeds. A recording proxy between clients and aggregator sees every upload and
kills chosen clients at exact protocol steps."""

from __future__ import annotations

import hashlib
import http.client
import json
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from edgeloop_runtime.federated import secagg
from edgeloop_runtime.federated.data import dirichlet_partition
from edgeloop_runtime.federated.model import load, mlp
from edgeloop_runtime.federated.transport import unpack
from fed_processes import free_port, issue_certificates, runtime
from sklearn.datasets import load_digits

CLIENTS = 10
TRAINING = ["--learning-rate", "0.5", "--local-epochs", "2", "--batch-size", "16"]


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> Path:
    """Client data sets c0..c9.npz and the starting model m.onnx (an MLP 64-32-10)."""
    root = tmp_path_factory.mktemp("federation")
    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)
    for i, rows in enumerate(dirichlet_partition(y, CLIENTS, alpha=0.5, seed=7)):
        np.savez(root / f"c{i}.npz", x=x[rows], y=y[rows])
    (root / "m.onnx").write_bytes(mlp([64, 32, 10], seed=0))
    return root


class Recorder:
    """An HTTP proxy in front of the aggregator: records POST bodies, may kill a client after a step."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.posts: list[tuple[str, str, bytes]] = []  # (client, path, body)
        self.kill_after: dict[tuple[str, str], subprocess.Popen] = {}  # (client, path) → its process
        self.lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self, body: bytes | None):
                client = self.headers.get("X-Edgeloop-Client", "")
                headers = {k: v for k, v in self.headers.items() if k.lower().startswith(("x-", "content-type"))}
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", recorder.upstream_port, timeout=120)
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    conn.close()
                except OSError:
                    self.close_connection = True
                    self.connection.close()  # the client sees the aggregator go away, as it would directly
                    return
                if body is not None:
                    with recorder.lock:
                        recorder.posts.append((client, self.path, body))
                        victim = recorder.kill_after.pop((client, self.path), None)
                    if victim is not None:
                        victim.send_signal(signal.SIGKILL)  # after the aggregator got it, before the reply
                        victim.wait()
                        self.close_connection = True
                        return
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() in ("content-type", "etag"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._forward(None)

            def do_POST(self):
                self._forward(self.rfile.read(int(self.headers.get("Content-Length", 0))))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def uploads(self, path: str) -> dict[str, tuple[dict, bytes]]:
        return {client: unpack(body) for client, p, body in self.posts if p == path}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Run:
    """One federated job: an aggregator process, a recording proxy, CLIENTS client processes."""

    def __init__(
        self,
        root: Path,
        name: str,
        *flags: str,
        rounds: int = 2,
        clients: int = CLIENTS,
        deadline: float = 20,
        stage_timeout: float = 10,
        aggregator_env: dict | None = None,
    ):
        self.dir = root / name
        self.dir.mkdir(exist_ok=True)
        self.state = self.dir / "state"
        self.port = free_port()
        self.aggregator_env = aggregator_env
        self.status_file = self.dir / "status.json"
        self.aggregator_args = [
            "federated",
            "aggregate",
            "--model",
            str(root / "m.onnx"),
            "--clients",
            str(clients),
            "--min-clients",
            "3",
            "--rounds",
            str(rounds),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--state-dir",
            str(self.state),
            "--status-file",
            str(self.status_file),
            "--deadline",
            str(deadline),
            "--stage-timeout",
            str(stage_timeout),
            "--linger",
            "1",
            *TRAINING,
            *flags,
        ]
        self.aggregator = self.start_aggregator()
        self.proxy = Recorder(self.port)
        self.clients = {
            f"c{i}": runtime(
                "federated",
                "train",
                "--aggregator",
                f"http://127.0.0.1:{self.proxy.port}",
                "--data",
                str(root / f"c{i}.npz"),
                "--client-id",
                f"c{i}",
                "--seed",
                str(i),
                "--connect-timeout",
                "60",
                log=self.dir / f"c{i}.log",
            )
            for i in range(CLIENTS)
        }

    def start_aggregator(self, log_name: str = "aggregator.log") -> subprocess.Popen:
        self.aggregator_log = log_name
        return runtime(*self.aggregator_args, log=self.dir / log_name, env=self.aggregator_env)

    def status(self) -> dict:
        try:
            return json.loads(self.status_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def wait_until(self, predicate, timeout: float = 60) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            status = self.status()
            if status and predicate(status):
                return status
            if self.aggregator.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"status never matched; last {self.status()}\n{self.log()}")

    def finish(self, timeout: float = 90) -> tuple[int, dict]:
        """The aggregator's exit code and the status JSON it printed as its last line."""
        try:
            code = self.aggregator.wait(timeout)
            for client in self.clients.values():
                client.wait(timeout)
        finally:
            self.stop()
        return code, json.loads(self.log().strip().splitlines()[-1])

    def log(self) -> str:
        return (self.dir / self.aggregator_log).read_text()

    def stop(self):
        for process in [self.aggregator, *self.clients.values()]:
            if process.poll() is None:
                process.kill()
                process.wait()
        self.proxy.close()


def model_vector(path: Path) -> np.ndarray:
    return load(path.read_bytes()).vector()


@pytest.fixture(scope="module")
def one_round(federation) -> dict[str, tuple[Run, dict]]:
    """The same seeded round run twice: plain and with secure aggregation."""
    runs = {}
    for name, flag in [("plain", "--no-secure-aggregation"), ("secure", "--secure-aggregation")]:
        run = Run(federation, name, flag, rounds=1)
        code, status = run.finish()
        assert code == 0, run.log()
        runs[name] = (run, status)
    return runs


def test_secure_sum_equals_plain_sum_within_quantization_error(one_round, federation):
    (plain, _), (secure, status) = one_round["plain"], one_round["secure"]
    joins = secure.proxy.uploads("/v1/join")
    total = sum(header["examples"] for header, _ in joins.values())
    start = model_vector(federation / "m.onnx")
    plain_sum = (model_vector(plain.state / "final.onnx") - start).astype(np.float64) * total
    secure_sum = (model_vector(secure.state / "final.onnx") - start).astype(np.float64) * total

    # Recompute the plain sum from what plain clients uploaded: it is what the plain aggregator applied.
    uploads = plain.proxy.uploads("/v1/update").values()
    recomputed = sum(np.frombuffer(p, "<f4").astype(np.float64) * header["examples"] for header, p in uploads)
    float32_error = np.abs(model_vector(plain.state / "final.onnx")).max() * 2**-23 * total * 2
    np.testing.assert_allclose(plain_sum, recomputed, atol=float32_error)

    scale = secagg.quantization_scale(8.0, total, CLIENTS)  # the default --quantization-bound
    quantization_error = CLIENTS * 0.5 / scale
    assert np.abs(secure_sum - plain_sum).max() <= quantization_error + 2 * float32_error
    assert status["participants"] == {"selected": CLIENTS, "reported": CLIENTS, "dropped": 0}


def test_masked_upload_differs_from_the_update_and_looks_uniform(one_round):
    (plain, _), (secure, _) = one_round["plain"], one_round["secure"]
    header, payload = secure.proxy.uploads("/v1/update")["c0"]
    examples = secure.proxy.uploads("/v1/join")["c0"][0]["examples"]
    update = np.frombuffer(plain.proxy.uploads("/v1/update")["c0"][1], "<f4")  # c0's update (same seeds)
    assert len(payload) == 4 * len(update) + 64  # the masked vector, then public keys for the next round
    masked = np.frombuffer(payload[: 4 * len(update)], "<u4")
    joins = secure.proxy.uploads("/v1/join").values()
    scale = secagg.quantization_scale(8.0, sum(h["examples"] for h, _ in joins), CLIENTS)
    quantized = secagg.encode(update, examples, 8.0, scale)

    assert set(header) == {"metrics"}  # nothing but holdout metrics travels in the clear
    assert np.mean(masked == quantized) < 0.01
    # The update is concentrated around 0 (values near 0 or 2^32); the masked upload fills the ring evenly:
    # a chi-square test on 16 equal bins, 0.1% critical value for 15 degrees of freedom.
    counts = np.bincount(masked >> 28, minlength=16)
    expected = len(masked) / 16
    assert ((counts - expected) ** 2 / expected).sum() < 37.7
    assert ((np.bincount(quantized >> 28, minlength=16) - expected) ** 2 / expected).sum() > 1000
    assert abs(np.corrcoef(masked.astype(np.float64), quantized.astype(np.float64))[0, 1]) < 0.1


def test_upload_bytes_with_secure_aggregation_stay_within_a_quarter_of_plain(one_round):
    plain = one_round["plain"][1]["history"][0]["uploadBytesPerClient"]
    secure = one_round["secure"][1]["history"][0]["uploadBytesPerClient"]
    assert secure <= 1.25 * plain


def test_secure_training_reaches_accuracy_and_publishes_to_the_store(federation, tmp_path):
    token = "s3cret"
    store_port = free_port()
    store = runtime(
        "store",
        "--root",
        str(tmp_path / "store"),
        "--host",
        "127.0.0.1",
        "--port",
        str(store_port),
        log=tmp_path / "store.log",
        env={"EDGELOOP_STORE_TOKEN": token},
    )
    try:
        _wait_http(f"http://127.0.0.1:{store_port}/healthz")
        run = Run(
            federation,
            "accuracy",
            "--store",
            f"http://127.0.0.1:{store_port}",
            rounds=5,
            aggregator_env={"EDGELOOP_STORE_TOKEN": token},
        )
        code, status = run.finish()
    finally:
        store.kill()
        store.wait()
    assert code == 0, run.log()
    assert status["phase"] == "Succeeded" and status["round"] == 5
    assert status["metrics"]["accuracy"] >= 0.85, status
    assert status["metrics"]["accuracy"] > status["baseline"]["accuracy"] + 0.5
    assert [h["round"] for h in status["history"]] == [1, 2, 3, 4, 5]
    # Only round 1 has a join step: later rounds start from the keys that came with the previous updates.
    assert [path for _, path, _ in run.proxy.posts].count("/v1/join") == CLIENTS
    sha = status["result"]["sha256"]
    assert status["result"]["uri"] == f"http://127.0.0.1:{store_port}/sha256/{sha}"
    blob = (tmp_path / "store" / "sha256" / sha).read_bytes()
    assert hashlib.sha256(blob).hexdigest() == sha
    # The published model is valid ONNX that computes what numpy computes.
    model = load(blob)
    x = np.load(federation / "c0.npz")["x"]
    out = ort.InferenceSession(blob, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(out, model.forward(model.vector(), x), atol=1e-5)
    assert all(client.returncode == 0 for client in run.clients.values())


def _wait_http(url: str, timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize("killed", [1, 3])
def test_round_completes_when_clients_die_after_key_sharing(federation, killed):
    metrics_port = free_port()
    # Round 3 waits stage-timeout for the dead clients to join, within its deadline.
    flags = ("--metrics-port", str(metrics_port))
    run = Run(federation, f"dropouts-{killed}", *flags, rounds=3, deadline=8, stage_timeout=3)
    victims = [f"c{i}" for i in range(killed)]
    run.wait_until(lambda s: len(s.get("history", [])) >= 1)  # round 1 completes with everyone
    for c in victims:
        run.proxy.kill_after[(c, "/v1/shares")] = run.clients[c]
    run.wait_until(lambda s: len(s.get("history", [])) >= 2)
    before = sum(len(b) for _, p, b in list(run.proxy.posts) if p == "/v1/update")  # answered before the scrape
    exposition = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    code, status = run.finish()
    assert code == 0, run.log()
    assert status["phase"] == "Succeeded"
    assert status["history"][1]["participants"] == {
        "selected": CLIENTS,
        "reported": CLIENTS - killed,
        "dropped": killed,
    }
    shared = [c for c, p, _ in run.proxy.posts if p == "/v1/shares"]
    assert all(shared.count(c) == 2 for c in victims)  # they did share their keys in round 2
    assert status["metrics"]["accuracy"] > 0.5

    # Issue 15: the aggregator's own metrics, scraped while round 3 ran.
    samples = prometheus_samples(exposition)
    assert samples["edgeloop_federated_rounds", ()] == 3
    assert samples["edgeloop_federated_rounds_completed", ()] >= 2
    assert samples["edgeloop_federated_round", ()] >= 2
    assert samples["edgeloop_federated_dropped_clients_total", ()] == killed
    assert samples["edgeloop_federated_phase", (("phase", "Running"),)] == 1
    assert samples["edgeloop_federated_clients", (("state", "selected"),)] == CLIENTS
    assert 0 <= samples["edgeloop_federated_accuracy", ()] <= 1
    received = samples["edgeloop_federated_received_bytes_total", (("endpoint", "/v1/update"),)]
    uploads = sum(len(b) for _, p, b in run.proxy.posts if p == "/v1/update")
    assert before <= received < uploads * 1.2  # bodies, plus request lines and headers
    assert samples["edgeloop_federated_requests_total", (("code", "200"), ("endpoint", "/v1/shares"))] >= 2 * CLIENTS
    if shutil.which("promtool"):
        lint = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout + lint.stderr


def prometheus_samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(name, sorted label pairs): value} of an exposition in the text format; every line must parse."""
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.startswith(("# HELP ", "# TYPE ")), line
            continue
        match = re.fullmatch(r'([a-z_]+)(?:\{(.*)\})? (\S+)', line)
        assert match, line
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match[2] or "")))
        samples[match[1], labels] = float(match[3])
    return samples


def test_round_fails_explicitly_when_too_many_clients_die(federation):
    run = Run(federation, "too-many-dropouts", rounds=2, deadline=6)
    run.wait_until(lambda s: len(s.get("history", [])) >= 1)
    for i in range(5):  # threshold 0.66 of 10 needs 7 survivors
        run.proxy.kill_after[(f"c{i}", "/v1/shares")] = run.clients[f"c{i}"]
    code, status = run.finish()
    assert code == 1
    assert status["phase"] == "Failed"
    assert "round 2: only 5 of 10 clients uploaded updates, 7 needed" in status["reason"]
    assert status["result"] is None
    assert [c.returncode for name, c in run.clients.items() if name >= "c5"] == [2] * 5


def test_restarted_aggregator_resumes_from_its_checkpoint(federation):
    run = Run(federation, "restart", rounds=4)
    run.wait_until(lambda s: len(s.get("history", [])) >= 2)
    run.aggregator.send_signal(signal.SIGKILL)
    run.aggregator.wait()
    checkpoint = json.loads((run.state / "checkpoint.json").read_text())
    assert checkpoint["round"] >= 2
    run.aggregator = run.start_aggregator("aggregator-restarted.log")
    code, status = run.finish()
    log = run.log()
    assert code == 0, log
    assert f"resuming after round {checkpoint['round']}" in log
    assert f"round {checkpoint['round']} (train) open" not in log
    assert [h["round"] for h in status["history"]] == [1, 2, 3, 4]
    assert status["history"][: checkpoint["round"]] == checkpoint["history"]
    assert all(client.returncode == 0 for client in run.clients.values())


def test_mutual_tls_between_clients_and_aggregator(federation, tmp_path):
    import ssl

    tls = issue_certificates(tmp_path, clients=["c0", "c1", "c2"])  # C5: one certificate per client, CN = its id
    port = free_port()
    aggregator = runtime(
        "federated", "aggregate", "--model", str(federation / "m.onnx"), "--clients", "3", "--min-clients", "3",
        "--rounds", "1", "--host", "127.0.0.1", "--port", str(port), "--state-dir", str(tmp_path / "state"),
        "--linger", "1", "--tls-cert", str(tls["server"]), "--tls-key", str(tls["server-key"]),
        "--tls-ca", str(tls["ca"]), *TRAINING, log=tmp_path / "aggregator.log",
    )  # fmt: skip
    clients = [
        runtime(
            "federated",
            "train",
            "--aggregator",
            f"https://127.0.0.1:{port}",
            "--data",
            str(federation / f"c{i}.npz"),
            "--client-id",
            f"c{i}",
            "--tls-ca",
            str(tls["ca"]),
            "--tls-cert",
            str(tls[f"c{i}"]),
            "--tls-key",
            str(tls[f"c{i}-key"]),
            log=tmp_path / f"c{i}.log",
        )
        for i in range(3)
    ]
    try:
        # Without a client certificate the handshake is refused.
        time.sleep(0.5)
        anonymous = ssl.create_default_context(cafile=str(tls["ca"]))
        with pytest.raises((ssl.SSLError, ConnectionError)):
            for _ in range(50):  # until the aggregator listens
                try:
                    urllib.request.urlopen(f"https://127.0.0.1:{port}/healthz", context=anonymous, timeout=5).read()
                except urllib.error.URLError as error:
                    if not isinstance(error.reason, ConnectionRefusedError):
                        raise error.reason from error
                    time.sleep(0.1)
        assert aggregator.wait(90) == 0, (tmp_path / "aggregator.log").read_text()
        assert [c.wait(30) for c in clients] == [0, 0, 0]
    finally:
        for process in [aggregator, *clients]:
            if process.poll() is None:
                process.kill()
    status = json.loads((tmp_path / "aggregator.log").read_text().strip().splitlines()[-1])
    assert status["phase"] == "Succeeded" and status["participants"]["reported"] == 3


def test_an_aggregator_lost_with_its_node_resumes_from_the_store(federation, tmp_path):
    """Issue 13 §2: the aggregator is killed mid-round and its state directory is gone (a new pod on another
    node); the next one resumes after the last round the store holds, and the lost round is run again."""
    token = "s3cret"
    store_port = free_port()
    store = runtime("store", "--root", str(tmp_path / "store"), "--host", "127.0.0.1", "--port", str(store_port),
                    log=tmp_path / "store.log", env={"EDGELOOP_STORE_TOKEN": token})  # fmt: skip
    try:
        _wait_http(f"http://127.0.0.1:{store_port}/healthz")
        flags = ["--store", f"http://127.0.0.1:{store_port}", "--checkpoint-ref", "ns.round.0f1e"]
        run = Run(federation, "lost-node", *flags, rounds=4, aggregator_env={"EDGELOOP_STORE_TOKEN": token})
        run.wait_until(lambda s: len(s.get("history", [])) >= 2 and s.get("stage") in ("share", "collect"))
        run.aggregator.send_signal(signal.SIGKILL)
        run.aggregator.wait()
        saved = json.loads((tmp_path / "store" / "refs" / "ns.round.0f1e").read_text())
        shutil.rmtree(run.state)  # the pod's emptyDir went with its node
        run.aggregator = run.start_aggregator("aggregator-elsewhere.log")
        code, status = run.finish()
    finally:
        store.kill()
        store.wait()
    log = run.log()
    assert code == 0, log
    assert f"resuming after round {saved['round']} from the store's ref ns.round.0f1e" in log
    assert f"round {saved['round']} (train) open" not in log
    assert [h["round"] for h in status["history"]] == [1, 2, 3, 4]
    assert status["history"][: saved["round"]] == saved["history"]
    assert all(client.returncode == 0 for client in run.clients.values())
    refs = json.loads((tmp_path / "store" / "refs" / "ns.round.0f1e").read_text())
    assert refs["phase"] == "Succeeded" and refs["result"] == status["result"]
