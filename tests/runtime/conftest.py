"""Shared fixtures for runtime tests: small ONNX models built with onnx.helper, free ports, TLS
material, and the real `edgeloop-runtime serve` as a subprocess on loopback."""

from __future__ import annotations

import datetime
import hashlib
import http.client
import ipaddress
import resource
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save(model: onnx.ModelProto, path: Path) -> Path:
    model.opset_import[0].version = 17
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def mlp_layers(features: int = 64, hidden: int = 32, classes: int = 10, seed: int = 0) -> list:
    """(weight [in, out], bias [out]) of the test MLP's two layers."""
    rng = np.random.default_rng(seed)
    w1, b1 = rng.normal(0, 0.3, (features, hidden)), rng.normal(0, 0.1, hidden)
    w2, b2 = rng.normal(0, 0.3, (hidden, classes)), rng.normal(0, 0.1, classes)
    return [(w1.astype(np.float32), b1.astype(np.float32)), (w2.astype(np.float32), b2.astype(np.float32))]


def build_mlp(path: Path, features: int = 64, hidden: int = 32, classes: int = 10, seed: int = 0) -> Path:
    """input FP32 [N, features] → logits FP32 [N, classes] and label INT64 [N]; N is dynamic."""
    (w1, b1), (w2, b2) = mlp_layers(features, hidden, classes, seed)
    weights = [numpy_helper.from_array(array, name) for array, name in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["logits"]),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", features])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
        ],
        weights,
    )
    return save(helper.make_model(graph), path)


def mlp_reference(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the served MLP must answer, computed in-process with onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, label = session.run(None, {"input": x})
    return logits, label


def build_slow(path: Path, width: int = 1024, depth: int = 100) -> Path:
    """x FP32 [N, width] → y = x: `depth` chained MatMuls by an identity; ~25 ms for one row, more for more rows."""
    weight = numpy_helper.from_array(np.eye(width, dtype=np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", "w"], [f"h{i + 1}"]) for i in range(depth)]
    nodes.append(helper.make_node("Identity", [f"h{depth}"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])],
        [weight],
    )
    return save(helper.make_model(graph), path)


@pytest.fixture(scope="session")
def mlp_path(tmp_path_factory) -> Path:
    return build_mlp(tmp_path_factory.mktemp("models") / "mlp.onnx")


@pytest.fixture(scope="session")
def tflite_mlp_path(tmp_path_factory) -> Path:
    """The same MLP as mlp_path (the same weights), as a .tflite file written without TensorFlow."""
    from edgeloop_runtime.backends.tflite_mlp import mlp

    path = tmp_path_factory.mktemp("models") / "mlp.tflite"
    path.write_bytes(mlp(mlp_layers()))
    return path


@pytest.fixture(scope="session")
def slow_path(tmp_path_factory) -> Path:
    return build_slow(tmp_path_factory.mktemp("models") / "slow.onnx")


@dataclass
class TLSFiles:
    cert: Path
    key: Path


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> TLSFiles:
    """A self-signed certificate for localhost and 127.0.0.1."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    files = TLSFiles(directory / "tls.crt", directory / "tls.key")
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return files


@dataclass
class Server:
    proc: subprocess.Popen
    http_port: int
    grpc_port: int
    log: Path

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def output(self) -> str:
        return self.log.read_text()

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout)


def raw_request(server: Server, method: str, path: str, body: bytes = b"", headers: dict | None = None):
    """One plain HTTP exchange, for requests that tritonclient would never send."""
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    return response, response.read()


def memory_mb(pid: int) -> tuple[float, float]:
    """A process's resident memory now and at its peak (VmRSS, VmHWM), in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def serve_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgeloop_runtime.cli", "serve", *args]


def start_server(
    model: Path, *args: str, log_dir: Path, scheme: str = "http", context=None, max_files: int | None = None
) -> Server:
    """Starts `serve` on free loopback ports and waits until it answers ready; `max_files` caps its open
    files (RLIMIT_NOFILE), as a container runtime's default of 1024 would."""
    http_port, grpc_port = free_port(), free_port()
    log = log_dir / f"serve-{http_port}.log"
    command = serve_command(
        "--model-path",
        str(model),
        "--host",
        "127.0.0.1",
        "--http-port",
        str(http_port),
        "--grpc-port",
        str(grpc_port),
        *args,
    )
    with open(log, "wb") as out:
        cap = None if max_files is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=cap)
    server = Server(proc, http_port, grpc_port, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited with {proc.returncode}:\n{server.output()}")
        try:
            url = f"{scheme}://127.0.0.1:{http_port}/v2/health/ready"
            with urllib.request.urlopen(url, timeout=1, context=context) as response:
                if response.status == 200:
                    return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"serve did not become ready:\n{server.output()}")


@pytest.fixture
def server_factory(tmp_path):
    """Starts servers with chosen arguments; stops them (SIGTERM) at teardown."""
    servers: list[Server] = []

    def start(model: Path, *args: str, **kwargs) -> Server:
        server = start_server(model, *args, log_dir=tmp_path, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)


@pytest.fixture(scope="module")
def mlp_server(mlp_path, tmp_path_factory):
    """One MLP server shared by a module's tests (all of them read-only towards it)."""
    server = start_server(mlp_path, "--batch-window-us", "2000", log_dir=tmp_path_factory.mktemp("logs"))
    yield server
    assert server.stop() == 0, server.output()
