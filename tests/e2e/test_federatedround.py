"""FederatedRound on the devcluster: the real operator process, under its own ServiceAccount and RBAC,
against a real API server, controller manager (Job controller, garbage collector) and scheduler, with
kwok-simulated edge nodes (2 NPU, 2 GPU, 2 CPU-only).

No container runs here: kwok marks a Job's pods Succeeded as soon as they are scheduled. So the pod-level
work is simulated, and the tests that depend on it say so in their names: the aggregator's status endpoint
is served by this test process (`SimulatedAggregator`, answering what the runtime's aggregator answers at
`GET /v1/status`), and the operator is pointed at it through its `aggregatorStatusUrl` configuration
instead of the in-cluster Service address. Everything else - selection, Jobs, pinning, status writes,
promotion into the InferenceModel and its rollout, cleanup, admission - is the real thing."""

from __future__ import annotations

import base64
import contextlib
import copy
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml
from edgeloop.testing import OperatorProcess, install_service_account

from .conftest import wait_for

ROOT = Path(__file__).parents[2]
EXAMPLE = yaml.safe_load((ROOT / "examples" / "federatedround-digits.yaml").read_text())
MODEL_EXAMPLE = yaml.safe_load((ROOT / "examples" / "inferencemodel-digits.yaml").read_text())
OPERATOR_NAMESPACE = "edgeloop-e2e-fr-operator"
OPERATOR_ARGS = ("--resync-seconds", "2", "--coalesce-seconds", "0.5", "--federated-poll-seconds", "1")
ROUND = EXAMPLE["metadata"]["name"]
TRAINED_SHA = "d" * 64
PARTICIPANT_LABEL = "e2e.edgeloop.io/federated"


class SimulatedAggregator:
    """Answers `GET /<namespace>/<service>/v1/status` with the report set for that aggregator (404 until
    one is), as the runtime's aggregator answers `GET /v1/status` on its Service."""

    def __init__(self):
        self.reports: dict[tuple[str, str], dict] = {}
        reports = self.reports

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                namespace, service, *rest = self.path.strip("/").split("/")
                found = reports.get((namespace, service)) if rest == ["v1", "status"] else None
                body = json.dumps(found).encode() if found else b"{}"
                self.send_response(200 if found else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url_template(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{{namespace}}/{{service}}/v1/status"

    def report(self, namespace: str, phase: str, **fields) -> None:
        """What the aggregator of ROUND in `namespace` reports from now on (FEDERATED.md's JSON)."""
        report = {
            "phase": phase,
            "round": 2,
            "rounds": 10,
            "stage": "collect",
            "secureAggregation": True,
            "participants": {"selected": 3, "reported": 2, "dropped": 1},
            "metrics": None,
            "baseline": {"accuracy": 0.61, "loss": 1.2},
            "result": None,
            "reason": "",
            "history": [],
        }
        if phase == "Succeeded":
            report.update(
                round=10,
                stage=None,
                participants={"selected": 3, "reported": 3, "dropped": 0},
                metrics={"accuracy": 0.94, "loss": 0.21},
                result={
                    "uri": f"http://edgeloop-store.edgeloop-system.svc:8000/sha256/{TRAINED_SHA}",
                    "sha256": TRAINED_SHA,
                },
            )
        self.reports[(namespace, f"{ROUND}-aggregator")] = {**report, **fields}


@pytest.fixture(scope="module")
def aggregator():
    simulated = SimulatedAggregator()
    yield simulated
    simulated.server.shutdown()


@pytest.fixture(scope="module")
def cluster(devcluster, tmp_path_factory):
    """The CRDs and the operator's ServiceAccount and RBAC (the cluster is the session's own)."""
    for crd in ("inferencemodels.edgeloop.io", "federatedrounds.edgeloop.io"):
        # A module before this one may have deleted the CRDs without waiting.
        devcluster.kubectl("wait", "--for=delete", f"crd/{crd}", "--timeout=60s", check=False)
    devcluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    devcluster.wait_established("federatedrounds.edgeloop.io")
    yield install_service_account(
        devcluster.kubectl, devcluster.kubeconfig, tmp_path_factory.mktemp("operator"), namespace=OPERATOR_NAMESPACE
    )
    devcluster.kubectl("delete", "namespace", OPERATOR_NAMESPACE, "--wait=false", "--ignore-not-found")


@pytest.fixture
def operator_with(devcluster, cluster, namespace, tmp_path):
    """Starts the operator with a configuration, watching only this test's namespace. Afterwards the
    test's rounds and models are deleted and their pods waited for."""
    started: list[OperatorProcess] = []

    def start(configuration: dict) -> OperatorProcess:
        path = tmp_path / "operator.yaml"
        path.write_text(yaml.safe_dump(configuration))
        args = ("--namespace", namespace, "--config", str(path), *OPERATOR_ARGS)
        started.append(OperatorProcess(cluster, tmp_path / "operator.log", args).start())
        return started[-1]

    yield start
    devcluster.kubectl("delete", "federatedrounds,inferencemodels", "--all", "-n", namespace, "--wait=true")
    wait_for("the round's pods to be gone", lambda: not devcluster.get_json("pods", "-n", namespace)["items"])
    for process in started:
        process.stop()
        errors = process.errors()
        assert not errors, f"the operator logged errors: {errors[:3]}"


@pytest.fixture
def operator(operator_with, aggregator):
    """The operator, reading aggregator status from the simulation."""
    return operator_with({"aggregatorStatusUrl": aggregator.url_template})


@pytest.fixture
def participants(devcluster):
    """Labels nodes as participants for one test, and cordons some; undone afterwards."""
    labelled, cordoned = [], []

    def label(*nodes: str, cordon: tuple[str, ...] = ()) -> None:
        for node in nodes:
            devcluster.kubectl("label", "node", node, f"{PARTICIPANT_LABEL}=yes", "--overwrite")
            labelled.append(node)
        for node in cordon:
            devcluster.kubectl("cordon", node)
            cordoned.append(node)

    yield label
    for node in labelled:
        devcluster.kubectl("label", "node", node, f"{PARTICIPANT_LABEL}-", check=False)
    for node in cordoned:
        devcluster.kubectl("uncordon", node, check=False)


def apply(devcluster, namespace: str, body: dict) -> None:
    devcluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))


def federated_round(devcluster, namespace: str) -> dict:
    return devcluster.get_json("federatedround", ROUND, "-n", namespace)


def conditions(body: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in body.get("status", {}).get("conditions", [])}


def wait_round(devcluster, namespace: str, what: str, check: Callable[[dict], bool], timeout: float = 60) -> dict:
    def reached():
        body = federated_round(devcluster, namespace)
        return body if check(body) else None

    return wait_for(what, reached, timeout, lambda: json.dumps(federated_round(devcluster, namespace)))


def started_message(body: dict) -> str:
    return next((c["message"] for c in body.get("status", {}).get("conditions", []) if c["type"] == "Started"), "")


def a_round(**spec) -> dict:
    """The example round, selecting nodes labelled by the `participants` fixture."""
    body = copy.deepcopy(EXAMPLE)
    body["spec"]["participants"] = {"nodeSelector": {PARTICIPANT_LABEL: "yes"}, "minClients": 3, "maxClients": 3}
    for field, value in spec.items():  # None: leave the field out
        body["spec"][field] = value
        if value is None:
            del body["spec"][field]
    return body


def client_pods_by_node(devcluster, namespace: str) -> dict[str, str]:
    pods = devcluster.get_json("pods", "-n", namespace, "-l", "edgeloop.io/role=client")["items"]
    return {pod["spec"].get("nodeName", ""): pod["metadata"]["labels"]["job-name"] for pod in pods}


def test_client_jobs_land_on_exactly_the_selected_nodes(devcluster, namespace, operator, participants):
    participants("edge-npu-1", "edge-gpu-0", "edge-cpu-0", "edge-cpu-1", cordon=("edge-cpu-1",))
    apply(
        devcluster,
        namespace,
        a_round(
            participants={"nodeSelector": {PARTICIPANT_LABEL: "yes"}, "minClients": 2, "maxClients": 2},
            modelRef=None,
            model=MODEL_EXAMPLE["spec"]["model"],
        ),
    )
    # Eligible: the three uncordoned labelled nodes; the first two by name take part.
    selected = ["edge-cpu-0", "edge-gpu-0"]
    body = wait_round(
        devcluster, namespace, "the round to start", lambda b: b.get("status", {}).get("phase") == "Running"
    )
    assert body["status"]["participants"]["nodes"] == selected
    assert conditions(body)["Started"] == ("True", "JobsCreated")

    placed = wait_for(
        "both client pods to be scheduled",
        lambda: (p := client_pods_by_node(devcluster, namespace)) and len(p) == 2 and p,
    )
    assert sorted(placed) == selected, "each client on its own selected node"
    jobs = {job["metadata"]["name"]: job for job in devcluster.get_json("jobs", "-n", namespace)["items"]}
    assert sorted(jobs) == [f"{ROUND}-aggregator", f"{ROUND}-client-0", f"{ROUND}-client-1"]
    for name in (f"{ROUND}-client-0", f"{ROUND}-client-1"):
        volume = jobs[name]["spec"]["template"]["spec"]["volumes"][0]
        assert volume["hostPath"] == {"path": f"/var/lib/edgeloop/data/{namespace}/digits", "type": "Directory"}
    service = devcluster.get_json("service", f"{ROUND}-aggregator", "-n", namespace)
    for obj in [service, *jobs.values()]:
        assert obj["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "edgeloop"

    # kwok "completed" every pod and no aggregator reported: the round waits for a report, never guesses.
    body = wait_round(
        devcluster,
        namespace,
        "the aggregator Job to complete without a report",
        lambda b: conditions(b).get("Succeeded") == ("Unknown", "AwaitingReport"),
    )
    assert body["status"]["phase"] == "Running" and body["status"]["promoted"] is False


def test_too_few_nodes_waits_with_a_condition_then_starts_when_a_node_joins(
    devcluster, namespace, operator, participants
):
    participants("edge-gpu-0", "edge-gpu-1")
    apply(devcluster, namespace, a_round(modelRef=None, model=MODEL_EXAMPLE["spec"]["model"]))
    body = wait_round(
        devcluster,
        namespace,
        "the round to wait for a third node",
        lambda b: started_message(b).startswith("2 of the minClients 3 nodes are available"),
    )
    assert body["status"]["phase"] == "Pending"
    assert conditions(body)["Started"] == ("False", "NotEnoughNodes")
    assert devcluster.get_json("jobs", "-n", namespace)["items"] == []
    events = devcluster.get_json("events", "-n", namespace, "--field-selector=involvedObject.kind=FederatedRound")
    assert "NotEnoughNodes" in {e["reason"] for e in events["items"]}

    participants("edge-cpu-1")
    body = wait_round(
        devcluster,
        namespace,
        "the round to start on the new node",
        lambda b: b.get("status", {}).get("phase") == "Running",
    )
    assert body["status"]["participants"]["nodes"] == ["edge-cpu-1", "edge-gpu-0", "edge-gpu-1"]
    placed = wait_for(
        "three client pods", lambda: (p := client_pods_by_node(devcluster, namespace)) and len(p) == 3 and p
    )
    assert sorted(placed) == ["edge-cpu-1", "edge-gpu-0", "edge-gpu-1"]


def test_status_follows_the_simulated_aggregator_and_promotion_rolls_the_inference_model(
    devcluster, namespace, operator, participants, aggregator
):
    participants("edge-npu-0", "edge-gpu-0", "edge-cpu-0")
    apply(devcluster, namespace, MODEL_EXAMPLE)
    aggregator.report(namespace, "Running")
    apply(devcluster, namespace, a_round())

    body = wait_round(
        devcluster, namespace, "round 2 of 10 in the status", lambda b: b.get("status", {}).get("progress") == "2/10"
    )
    status = body["status"]
    assert (status["phase"], status["stage"]) == ("Running", "collect")
    assert status["participants"] == {
        "selected": 3,
        "reported": 2,
        "dropped": 1,
        "nodes": ["edge-cpu-0", "edge-gpu-0", "edge-npu-0"],
    }
    assert status["baseModel"] == {"sha256": MODEL_EXAMPLE["spec"]["model"]["sha256"], "version": "1"}
    row = devcluster.kubectl("get", "fr", "-n", namespace).stdout.splitlines()
    assert row[0].split() == ["NAME", "PHASE", "ROUND", "CLIENTS", "ACCURACY", "PROMOTED", "AGE"]
    assert row[1].split()[:4] == [ROUND, "Running", "2/10", "3"]

    aggregator.report(namespace, "Succeeded")
    body = wait_round(
        devcluster,
        namespace,
        "the round to succeed and promote",
        lambda b: conditions(b).get("Promoted", ("",))[0] == "True",
    )
    status = body["status"]
    assert status["phase"] == "Succeeded" and status["promoted"] is True
    assert status["metrics"] == {"accuracy": 0.94, "loss": 0.21}
    assert status["result"]["sha256"] == TRAINED_SHA and status["result"]["version"] == "2"

    model = devcluster.get_json("inferencemodel", "digits", "-n", namespace)
    assert model["spec"]["model"] == {
        "uri": status["result"]["uri"],
        "sha256": TRAINED_SHA,
        "version": "2",
        "format": "onnx",
    }
    assert model["spec"]["placement"] == MODEL_EXAMPLE["spec"]["placement"], "only spec.model is patched"

    def rolled():
        daemon_set = devcluster.get_json("daemonset", "digits-cpu", "-n", namespace)
        args = daemon_set["spec"]["template"]["spec"]["containers"][0]["args"]
        return args[args.index("--sha256") + 1] == TRAINED_SHA

    wait_for("the fleet to roll to the trained model", rolled)
    round_events = devcluster.get_json("events", "-n", namespace, "--field-selector=involvedObject.kind=FederatedRound")
    assert {"Started", "Succeeded", "Promoted"} <= {e["reason"] for e in round_events["items"]}
    model_events = devcluster.get_json("events", "-n", namespace, "--field-selector=involvedObject.kind=InferenceModel")
    assert "Promoted" in {e["reason"] for e in model_events["items"]}


def test_a_model_below_the_gate_is_not_promoted_simulated_aggregator(
    devcluster, namespace, operator, participants, aggregator
):
    participants("edge-npu-0", "edge-gpu-0", "edge-cpu-0")
    apply(devcluster, namespace, MODEL_EXAMPLE)
    aggregator.report(namespace, "Succeeded", baseline={"accuracy": 0.97, "loss": 0.1})
    apply(devcluster, namespace, a_round())
    body = wait_round(
        devcluster, namespace, "promotion to be refused", lambda b: conditions(b).get("Promoted", ("",))[0] == "False"
    )
    assert conditions(body)["Promoted"] == ("False", "NotImproved")
    assert body["status"]["phase"] == "Succeeded" and body["status"]["promoted"] is False
    model = devcluster.get_json("inferencemodel", "digits", "-n", namespace)
    assert model["spec"]["model"] == {**MODEL_EXAMPLE["spec"]["model"], "format": "onnx"}


def test_a_round_the_simulated_aggregator_reports_failed_fails(
    devcluster, namespace, operator, participants, aggregator
):
    participants("edge-npu-0", "edge-gpu-0", "edge-cpu-0")
    apply(devcluster, namespace, MODEL_EXAMPLE)
    reason = "round 2: only 1 of 3 clients uploaded updates, 2 needed (minClients 3, threshold 0.66)"
    aggregator.report(namespace, "Failed", stage=None, reason=reason)
    apply(devcluster, namespace, a_round())
    body = wait_round(
        devcluster, namespace, "the round to fail", lambda b: b.get("status", {}).get("phase") == "Failed"
    )
    assert conditions(body)["Succeeded"] == ("False", "RoundFailed")
    assert conditions(body)["Promoted"] == ("False", "RoundFailed")
    assert next(c["message"] for c in body["status"]["conditions"] if c["type"] == "Succeeded") == reason


def test_deleting_the_round_removes_its_jobs_service_and_pods(devcluster, namespace, operator, participants):
    participants("edge-npu-0", "edge-gpu-0", "edge-cpu-0")
    apply(devcluster, namespace, a_round(modelRef=None, model=MODEL_EXAMPLE["spec"]["model"]))
    wait_for("the round's pods", lambda: len(client_pods_by_node(devcluster, namespace)) == 3)
    devcluster.kubectl("delete", "federatedround", ROUND, "-n", namespace, "--timeout=30s")

    def gone():
        left = devcluster.get_json("jobs,services,pods", "-n", namespace, "-l", "edgeloop.io/federatedround")
        return not left["items"]

    wait_for("the garbage collector to remove the Jobs, their pods and the Service", gone)


class Processes:
    """Local processes, each logging to its own file, terminated at the end."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.running: list[subprocess.Popen] = []

    def start(self, name: str, command: list[str], env: dict | None = None) -> subprocess.Popen:
        with open(self.directory / f"{name}.log", "wb") as log:
            self.running.append(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
            )
        return self.running[-1]

    def stop(self) -> None:
        for process in self.running:
            process.terminate()
        for process in self.running:
            process.wait(10)


@pytest.fixture
def processes(tmp_path):
    started = Processes(tmp_path)
    yield started
    started.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def localized(args: list[str], values: dict[str, str]) -> list[str]:
    """`args` with the value after each flag in `values` replaced; every flag must be there."""
    result = list(args)
    for flag, value in values.items():
        result[result.index(flag) + 1] = value
    return result


def wait_http(url: str, timeout: float = 30.0) -> None:
    def answers():
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
        return False

    wait_for(url, answers, timeout)


def secret_files(devcluster, namespace: str, name: str, directory: Path) -> dict:
    """Writes a kubernetes.io/tls Secret's files into `directory`, as its volume would; returns the Secret."""
    body = devcluster.get_json("secret", name, "-n", namespace)
    directory.mkdir()
    for key in ("tls.crt", "tls.key", "ca.crt"):
        (directory / key).write_bytes(base64.b64decode(body["data"][key]))
    return body


def resolving_svc_to_loopback(directory: Path) -> dict[str, str]:
    """The environment for a local process in which every `*.svc` name resolves to 127.0.0.1, as the
    aggregator Service's name resolves to the aggregator in the cluster: the clients then reach it by the
    name its certificate carries."""
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(
        "import socket\n"
        "_getaddrinfo = socket.getaddrinfo\n"
        "def getaddrinfo(host, *args, **kwargs):\n"
        "    if isinstance(host, str) and host.endswith('.svc'):\n"
        "        host = '127.0.0.1'\n"
        "    return _getaddrinfo(host, *args, **kwargs)\n"
        "socket.getaddrinfo = getaddrinfo\n"
    )
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(directory), os.environ.get("PYTHONPATH")]))}


def test_the_rendered_jobs_train_for_real_as_local_processes_and_promote_simulated_pods(
    devcluster, namespace, operator_with, participants, processes, tmp_path
):
    """The pods are simulated by running each Job's own command line, as rendered into the cluster, as a
    local process: the real aggregator and clients of edgeloop-runtime, with secure aggregation, on the
    digits data split over three nodes, over mTLS with the certificates the operator issued to the round
    (and the operator polls the aggregator's status with the round's client certificate). Only what ties a
    command to a pod is replaced: the listening port, the Service's port, the volumes' paths. The store is
    the runtime's, on loopback."""
    from edgeloop_runtime.federated.model import mlp
    from sklearn.datasets import load_digits

    runtime = str(Path(sys.executable).with_name("edgeloop-runtime"))
    store_port, aggregator_port = free_port(), free_port()
    token = tmp_path / "token"
    token.write_text("e2e-token")
    processes.start(
        "store",
        [
            runtime,
            "store",
            "--root",
            str(tmp_path / "store"),
            "--port",
            str(store_port),
            "--host",
            "127.0.0.1",
            "--token-file",
            str(token),
        ],
    )
    store = f"http://127.0.0.1:{store_port}"
    wait_http(f"{store}/healthz")
    starting = mlp([64, 32, 10], seed=0)
    digest = hashlib.sha256(starting).hexdigest()
    upload = urllib.request.Request(
        f"{store}/sha256/{digest}", data=starting, method="PUT", headers={"Authorization": "Bearer e2e-token"}
    )
    urllib.request.urlopen(upload, timeout=10).close()

    nodes = ["edge-cpu-0", "edge-gpu-0", "edge-npu-0"]
    x, y = load_digits(return_X_y=True)
    for i, node in enumerate(nodes):
        (tmp_path / node).mkdir()
        np.savez(tmp_path / node / "digits.npz", x=(x[i::3] / 16).astype(np.float32), y=y[i::3])

    operator_with({"aggregatorStatusUrl": f"https://127.0.0.1:{aggregator_port}/v1/status", "storeUrl": store})
    participants(*nodes)
    model = copy.deepcopy(MODEL_EXAMPLE)
    model["spec"]["model"] = {"uri": f"{store}/sha256/{digest}", "sha256": digest, "version": "1"}
    apply(devcluster, namespace, model)
    apply(
        devcluster,
        namespace,
        a_round(
            training={"rounds": 3, "localEpochs": 2, "batchSize": 16, "learningRate": 0.5},
            deadlineSeconds=120,
            promote={"minAccuracy": 0.8, "requireImprovement": True},
        ),
    )
    jobs = wait_for(
        "the round's four Jobs",
        lambda: (j := devcluster.get_json("jobs", "-n", namespace)["items"]) and len(j) == 4 and j,
    )
    # TLS by default: a server certificate for the aggregator Service and client certificates, all owned by
    # the round, issued before its Jobs.
    round_uid = devcluster.get_json("federatedround", ROUND, "-n", namespace)["metadata"]["uid"]
    server_tls = secret_files(devcluster, namespace, f"{ROUND}-aggregator-tls", tmp_path / "aggregator-tls")
    # One client certificate per client Job, its CN the client's node (the aggregator's id for it).
    client_tls = [secret_files(devcluster, namespace, f"{ROUND}-client-{i}-tls", tmp_path / f"client-{i}-tls")
                  for i in range(3)]
    for body in (server_tls, *client_tls):
        assert body["type"] == "kubernetes.io/tls"
        assert [o["uid"] for o in body["metadata"]["ownerReferences"]] == [round_uid]
    env = resolving_svc_to_loopback(tmp_path / "resolve")

    for job in jobs:
        [container] = job["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["edgeloop-runtime"]
        args = container["args"]
        pod_spec = job["spec"]["template"]["spec"]
        mounted = {v["name"]: v.get("secret", {}).get("secretName") for v in pod_spec["volumes"]}
        assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["tls"] == "/etc/edgeloop/tls"
        if container["name"] == "aggregator":
            assert mounted["tls"] == f"{ROUND}-aggregator-tls"
            files = tmp_path / "aggregator-tls"
            args = localized(
                args,
                {
                    "--port": str(aggregator_port),
                    "--state-dir": str(tmp_path / "state"),
                    "--store-token-file": str(token),
                    "--tls-cert": str(files / "tls.crt"),
                    "--tls-key": str(files / "tls.key"),
                    "--tls-ca": str(files / "ca.crt"),
                },
            )
            processes.start("aggregator", [runtime, *args])
        else:
            index = job["metadata"]["name"].rsplit("-", 1)[1]
            assert mounted["tls"] == f"{ROUND}-client-{index}-tls"
            node = job["metadata"]["annotations"]["edgeloop.io/node"]
            service = args[args.index("--aggregator") + 1]
            assert service == f"https://{ROUND}-aggregator.{namespace}.svc:8080"
            files = tmp_path / f"client-{index}-tls"
            args = localized(
                args,
                {
                    "--aggregator": service.replace(":8080", f":{aggregator_port}"),
                    "--data": str(tmp_path / node),
                    "--tls-ca": str(files / "ca.crt"),
                    "--tls-cert": str(files / "tls.crt"),
                    "--tls-key": str(files / "tls.key"),
                },
            )
            processes.start(node, [runtime, *args], env={"NODE_NAME": node, **env})

    body = wait_round(
        devcluster,
        namespace,
        "real training to finish and be promoted",
        lambda b: conditions(b).get("Promoted", ("",))[0] != "Unknown",
        timeout=180,
    )
    status = body["status"]
    assert conditions(body) == {
        "Started": ("True", "JobsCreated"),
        "Succeeded": ("True", "Trained"),
        "Promoted": ("True", "Promoted"),
        "Degraded": ("False", "RoundEnded"),
    }, json.dumps(status)
    assert status["participants"] == {"selected": 3, "reported": 3, "dropped": 0, "nodes": nodes}
    assert status["metrics"]["accuracy"] >= 0.8 > status["baseline"]["accuracy"]
    trained = status["result"]["sha256"]
    assert trained != digest and status["result"]["uri"] == f"{store}/sha256/{trained}"
    with urllib.request.urlopen(status["result"]["uri"], timeout=10) as published:
        assert hashlib.sha256(published.read()).hexdigest() == trained
    served = devcluster.get_json("inferencemodel", "digits", "-n", namespace)["spec"]["model"]
    assert (served["sha256"], served["version"]) == (trained, "2")

    def rolled() -> bool:  # the operator rolls every variant to the trained model
        daemon_sets = devcluster.get_json("daemonsets", "-n", namespace)["items"]
        args = [d["spec"]["template"]["spec"]["containers"][0]["args"] for d in daemon_sets]
        return bool(args) and all(a[a.index("--sha256") + 1] == trained for a in args)

    wait_for("the fleet to roll to the trained model", rolled)


INVALID = [
    ("threshold zero", {"secureAggregation": {"threshold": 0}}, "should be greater than 0"),
    ("threshold above one", {"secureAggregation": {"threshold": 1.5}}, "should be less than or equal to 1"),
    ("min above max", {"participants": {"minClients": 5, "maxClients": 2}}, "minClients must not exceed maxClients"),
    ("noise without clipping", {"privacy": {"noiseMultiplier": 1.0}}, "noiseMultiplier needs clipNorm"),
    ("proximal mu with fedavg", {"training": {"strategy": "fedavg", "proximalMu": 0.1}}, "applies to strategy fedprox"),
    ("relative dataset path", {"dataset": {"name": None, "hostPath": "data/digits"}}, "spec.dataset.hostPath"),
    ("dataset path escaping", {"dataset": {"name": None, "hostPath": "/var/lib/../../etc"}},
     "hostPath must not contain '..'"),
    ("dataset named and given", {"dataset": {"hostPath": "/var/lib/edgeloop/data/x"}},
     "set exactly one of name and hostPath"),
    ("dataset name escaping", {"dataset": {"name": "../other"}}, "spec.dataset.name"),
    ("no model", {"modelRef": None}, "set modelRef, model, or both"),
    ("a tflite model", {"model": {"uri": "http://store/m.tflite", "sha256": "a" * 64, "version": "1",
                                  "format": "tflite"}}, "federated training needs an onnx model"),
    ("zero rounds", {"training": {"rounds": 0}}, "spec.training.rounds"),
    ("unknown strategy", {"training": {"strategy": "fedsgd"}}, 'Unsupported value: "fedsgd"'),
]


@pytest.mark.parametrize(("case", "spec", "message"), INVALID, ids=[case for case, _, _ in INVALID])
def test_invalid_specs_are_rejected_at_admission(devcluster, cluster, case, spec, message):
    body = copy.deepcopy(EXAMPLE)
    for section, fields in spec.items():
        if fields is None:
            del body["spec"][section]
        else:
            merged = {**body["spec"].get(section, {}), **fields}
            body["spec"][section] = {key: value for key, value in merged.items() if value is not None}
    result = devcluster.kubectl(
        "apply", "--dry-run=server", "-n", "default", "-f", "-", input=yaml.safe_dump(body), check=False
    )
    assert result.returncode != 0, f"{case} was accepted"
    assert message in result.stderr, result.stderr


def test_the_spec_is_immutable_and_the_name_bounded(devcluster, cluster, namespace):
    apply(devcluster, namespace, EXAMPLE)  # no operator: only admission is under test
    changed = copy.deepcopy(EXAMPLE)
    changed["spec"]["training"]["rounds"] = 20
    result = devcluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(changed), check=False)
    assert "spec is immutable" in result.stderr
    long_name = copy.deepcopy(EXAMPLE)
    long_name["metadata"]["name"] = "r" * 53
    result = devcluster.kubectl(
        "apply", "--dry-run=server", "-n", namespace, "-f", "-", input=yaml.safe_dump(long_name), check=False
    )
    assert "metadata.name must be a DNS-1035 label of at most 52 characters" in result.stderr


def test_kubectl_explain_describes_the_api(devcluster, cluster):
    explained = devcluster.kubectl("explain", "federatedround.spec.secureAggregation").stdout
    assert "threshold" in explained and "must survive" in explained
