"""InferenceModel on the devcluster: the real operator process, under its own ServiceAccount and RBAC,
against a real API server, controller manager and scheduler, with kwok-simulated edge nodes
(2 NPU, 2 GPU, 2 CPU-only). kwok runs no containers: pods become Running/Ready as if they did."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import pytest
import yaml
from edgeloop import config
from edgeloop.testing import WRITE_VERBS, OperatorProcess, audited_calls, install_service_account, service_account_user

from .conftest import wait_for

ROOT = Path(__file__).parents[2]
EXAMPLE = yaml.safe_load((ROOT / "examples" / "inferencemodel-digits.yaml").read_text())
OPERATOR_NAMESPACE = "edgeloop-e2e-operator"
NEW_SHA = "c" * 64
FLEET = {
    "edge-npu-0": "npu", "edge-npu-1": "npu", "edge-gpu-0": "gpu", "edge-gpu-1": "gpu",
    "edge-cpu-0": "cpu", "edge-cpu-1": "cpu",
}
# The operator reacts within a second or two; fast resyncs make the idle-write check meaningful.
OPERATOR_ARGS = ("--resync-seconds", "2", "--coalesce-seconds", "0.5", "--diagnosis-seconds", "2")


@pytest.fixture(scope="module")
def cluster(devcluster, tmp_path_factory):
    """CRDs and the operator's ServiceAccount and RBAC (the devcluster's fleet has the RuntimeClass k3s
    provides for GPUs)."""
    devcluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    devcluster.wait_established("inferencemodels.edgeloop.io")
    kubeconfig = install_service_account(
        devcluster.kubectl, devcluster.kubeconfig, tmp_path_factory.mktemp("operator"), namespace=OPERATOR_NAMESPACE
    )
    yield kubeconfig
    devcluster.kubectl("delete", "--ignore-not-found", "-f", str(ROOT / "crds"), "--wait=false")
    devcluster.kubectl("delete", "clusterrole,clusterrolebinding", "edgeloop-operator", "--ignore-not-found")
    devcluster.kubectl("delete", "namespace", OPERATOR_NAMESPACE, "--wait=false", "--ignore-not-found")


@pytest.fixture
def operator(devcluster, cluster, namespace, tmp_path):
    """The operator, watching only this test's namespace. Afterwards the test's models are deleted and
    their pods waited for: each node has one NPU or GPU, which the next test's pods need."""
    process = OperatorProcess(cluster, tmp_path / "operator.log", ("--namespace", namespace, *OPERATOR_ARGS))
    process.start()
    yield process
    devcluster.kubectl("delete", "inferencemodels", "--all", "-n", namespace, "--wait=true")
    wait_for("the model's pods to be gone", lambda: not devcluster.get_json("pods", "-n", namespace)["items"])
    process.stop()
    # An error the operator logged, a failed handler above all, fails the test.
    errors = process.errors()
    assert not errors, f"the operator logged errors: {errors[:3]}"


def apply(devcluster, namespace: str, body: dict) -> None:
    devcluster.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body))


def model(devcluster, namespace: str, name: str = "digits") -> dict:
    return devcluster.get_json("inferencemodel", name, "-n", namespace)


def conditions(body: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in body.get("status", {}).get("conditions", [])}


def wait_ready(devcluster, namespace: str, name: str = "digits", timeout: float = 90.0) -> dict:
    def ready():
        body = model(devcluster, namespace, name)
        current = body.get("status", {}).get("observedGeneration") == body["metadata"]["generation"]
        return body if current and conditions(body).get("Ready", ("",))[0] == "True" else None

    return wait_for(f"{name} to be Ready", ready, timeout, lambda: json.dumps(model(devcluster, namespace, name)))


def wait_condition(devcluster, namespace: str, type_: str, expected: tuple[str, str], name: str = "digits") -> dict:
    def reached():
        body = model(devcluster, namespace, name)
        return body if conditions(body).get(type_) == expected else None

    return wait_for(f"{type_} {expected}", reached, debug=lambda: json.dumps(model(devcluster, namespace, name)))


def pods_by_node(devcluster, namespace: str) -> dict[str, list[str]]:
    placed: dict[str, list[str]] = {}
    for pod in devcluster.get_json("pods", "-n", namespace)["items"]:
        if not pod["metadata"].get("deletionTimestamp"):
            node = pod["spec"].get("nodeName", "<unscheduled>")
            placed.setdefault(node, []).append(pod["metadata"]["labels"]["edgeloop.io/accelerator"])
    return placed


def test_the_example_serves_one_variant_per_node(devcluster, namespace, operator):
    apply(devcluster, namespace, EXAMPLE)
    body = wait_ready(devcluster, namespace)

    assert pods_by_node(devcluster, namespace) == {node: [cls] for node, cls in FLEET.items()}
    status = body["status"]
    assert status["model"] == {"sha256": EXAMPLE["spec"]["model"]["sha256"], "version": "1"}
    assert (status["desiredNodes"], status["readyNodes"], status["nodes"]) == (6, 6, "6/6")
    assert status["unhealthyNodes"] == [] and conditions(body)["Degraded"] == ("False", "AsExpected")

    # The counts are what kubectl shows for the DaemonSets.
    daemon_sets = {ds["metadata"]["name"]: ds for ds in devcluster.get_json("daemonsets", "-n", namespace)["items"]}
    assert sorted(daemon_sets) == ["digits-cpu", "digits-gpu", "digits-npu"]
    for variant in status["variants"]:
        ds_status = daemon_sets[variant["daemonSet"]]["status"]
        assert (variant["desired"], variant["ready"], variant["updated"]) == (
            ds_status["desiredNumberScheduled"], ds_status["numberReady"], ds_status["updatedNumberScheduled"])
    # kwok runs no container, so no runtime answers what it runs on: nothing is claimed.
    assert [v["providersInUse"] for v in status["variants"]] == [[]] * 3
    assert conditions(body)["Accelerated"] == ("Unknown", "NotSampled")

    table = devcluster.kubectl("get", "im", "-n", namespace).stdout.splitlines()
    assert table[0].split() == ["NAME", "READY", "NODES", "MODEL", "VERSION", "ACCELERATED", "AGE"]
    assert table[1].split()[:5] == ["digits", "True", "6/6", "1", "NotSampled"]

    service = devcluster.get_json("service", "digits", "-n", namespace)
    assert service["spec"]["internalTrafficPolicy"] == "Local"
    for obj in [service, *daemon_sets.values()]:
        assert obj["metadata"]["ownerReferences"][0]["uid"] == body["metadata"]["uid"]
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "edgeloop"
    reasons = {e["reason"] for e in devcluster.get_json("events", "-n", namespace,
                                                        "--field-selector=involvedObject.kind=InferenceModel")["items"]}
    assert {"RollingOut", "Ready"} <= reasons


def test_a_new_model_rolls_the_daemon_sets_and_nothing_else(devcluster, namespace, operator):
    apply(devcluster, namespace, EXAMPLE)
    wait_ready(devcluster, namespace)
    service_version = devcluster.get_json("service", "digits", "-n", namespace)["metadata"]["resourceVersion"]

    updated = copy.deepcopy(EXAMPLE)
    updated["spec"]["model"].update(sha256=NEW_SHA, version="2", uri=f"http://store/sha256/{NEW_SHA}")
    apply(devcluster, namespace, updated)
    body = wait_for("version 2 everywhere", lambda: (
        (b := wait_ready(devcluster, namespace))["status"]["model"]["version"] == "2" and b))

    assert body["status"]["model"]["sha256"] == NEW_SHA
    for ds in devcluster.get_json("daemonsets", "-n", namespace)["items"]:
        args = ds["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--sha256") + 1] == NEW_SHA
        assert ds["metadata"]["generation"] == 2, "one rollout per DaemonSet"
    for node, classes in pods_by_node(devcluster, namespace).items():
        assert len(classes) == 1, f"{node} runs {classes}"
    assert devcluster.get_json("service", "digits", "-n", namespace)["metadata"]["resourceVersion"] == service_version


def test_a_node_that_loses_its_accelerator_label_moves_to_the_cpu_variant(devcluster, namespace, operator):
    apply(devcluster, namespace, EXAMPLE)
    wait_ready(devcluster, namespace)
    devcluster.kubectl("label", "node", "edge-npu-1", "edgeloop.io/accelerator.npu-")
    try:
        wait_for("edge-npu-1 to run the cpu variant",
                 lambda: pods_by_node(devcluster, namespace).get("edge-npu-1") == ["cpu"],
                 debug=lambda: json.dumps(pods_by_node(devcluster, namespace)))

        def moved():
            body = wait_ready(devcluster, namespace)
            variants = {v["accelerator"]: (v["desired"], v["ready"]) for v in body["status"]["variants"]}
            return variants == {"npu": (1, 1), "gpu": (2, 2), "cpu": (3, 3)}

        wait_for("status to count edge-npu-1 in the cpu variant", moved,
                 debug=lambda: json.dumps(model(devcluster, namespace)["status"]))
    finally:
        devcluster.kubectl("label", "node", "edge-npu-1", "edgeloop.io/accelerator.npu=true", "--overwrite")
    wait_for("edge-npu-1 back on the npu variant",
             lambda: pods_by_node(devcluster, namespace).get("edge-npu-1") == ["npu"])


def test_arm64_boards_run_the_same_image_names_and_never_an_amd64_only_flavour(
        devcluster, namespace, arm64_nodes, operator):
    """The cpu flavour is an amd64 + arm64 index: arm64 boards run the same image names as amd64 nodes. The cuda
    and openvino flavours are amd64 only, so an arm64 board labelled as a GPU node (a Jetson, as GPU Feature
    Discovery labels it) runs the cpu variant instead of an image that cannot exist for it. (arm64_nodes comes
    before operator: the model's pods go before the boards do.)"""
    jetson, board = arm64_nodes
    devcluster.kubectl("label", "node", jetson, "nvidia.com/gpu.present=true")
    apply(devcluster, namespace, EXAMPLE)

    def all_placed():
        body = wait_ready(devcluster, namespace)
        return {v["accelerator"]: (v["desired"], v["ready"]) for v in body["status"]["variants"]} == {
            "npu": (2, 2), "gpu": (2, 2), "cpu": (4, 4)}

    wait_for("the boards to serve", all_placed, debug=lambda: json.dumps(model(devcluster, namespace)["status"]))
    assert pods_by_node(devcluster, namespace) == {**{node: [cls] for node, cls in FLEET.items()},
                                                   jetson: ["cpu"], board: ["cpu"]}
    built_in = config.build()
    images = {pod["spec"]["nodeName"]: {c["image"] for c in pod["spec"]["initContainers"] + pod["spec"]["containers"]}
              for pod in devcluster.get_json("pods", "-n", namespace)["items"]}
    assert images[jetson] == images[board] == images["edge-cpu-0"] == {built_in.runtime_image}
    assert images["edge-gpu-0"] == {built_in.accelerator_classes["gpu"].image}, "amd64 GPU nodes keep the cuda flavour"
    assert images["edge-npu-0"] == {built_in.accelerator_classes["npu"].image}
    gpu = devcluster.get_json("daemonset", "digits-gpu", "-n", namespace)["spec"]["template"]["spec"]
    for term in gpu["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]:
        assert {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]} in term["matchExpressions"]


def test_a_node_labelled_with_a_gpu_it_lacks_is_degraded_then_recovers(devcluster, namespace, operator):
    apply(devcluster, namespace, EXAMPLE)
    wait_ready(devcluster, namespace)
    devcluster.kubectl("label", "node", "edge-cpu-1", "edgeloop.io/accelerator.gpu=true")
    try:
        body = wait_condition(devcluster, namespace, "Degraded", ("True", "Unschedulable"))
        [node] = body["status"]["unhealthyNodes"]
        assert (node["node"], node["accelerator"], node["reason"]) == ("edge-cpu-1", "gpu", "Unschedulable")
        assert "nvidia.com/gpu" in node["message"]
        assert conditions(body)["Ready"] == ("False", "Unschedulable")
    finally:
        devcluster.kubectl("label", "node", "edge-cpu-1", "edgeloop.io/accelerator.gpu-")
        # Kubernetes 1.34's DaemonSet controller matches node updates to pods by spec.nodeName, so the
        # unschedulable pod, which has none, is not noticed until the DaemonSet syncs for another reason.
        devcluster.kubectl("delete", "pods", "-n", namespace, "-l", "edgeloop.io/accelerator=gpu",
                           "--field-selector=status.phase=Pending")
    body = wait_ready(devcluster, namespace)
    assert conditions(body)["Degraded"] == ("False", "AsExpected")
    reasons = [e["reason"] for e in devcluster.get_json("events", "-n", namespace,
                                                        "--field-selector=involvedObject.kind=InferenceModel")["items"]]
    assert "Unschedulable" in reasons and "Recovered" in reasons


def test_no_matching_nodes_is_degraded_without_retrying(devcluster, namespace, operator):
    nowhere = copy.deepcopy(EXAMPLE)
    nowhere["spec"]["placement"]["nodeSelector"] = {"topology.kubernetes.io/zone": "nowhere"}
    apply(devcluster, namespace, nowhere)
    body = wait_condition(devcluster, namespace, "Degraded", ("True", "NoMatchingNodes"))
    assert body["status"]["observedGeneration"] == 1 and body["status"]["desiredNodes"] == 0
    kopf_state = {a for a in body["metadata"].get("annotations", {}) if a.startswith("edgeloop.io/")}
    assert kopf_state <= {"edgeloop.io/last-handled-configuration", "edgeloop.io/kopf-managed"}, (
        f"handled once, with no retry pending: {kopf_state}")
    time.sleep(3)
    assert operator.process.poll() is None


def test_deleting_the_model_removes_everything(devcluster, namespace, operator):
    apply(devcluster, namespace, EXAMPLE)
    wait_ready(devcluster, namespace)
    devcluster.kubectl("delete", "inferencemodel", "digits", "-n", namespace, "--timeout=30s")

    def gone():
        left = devcluster.get_json("daemonsets,services,pods", "-n", namespace, "-l", "edgeloop.io/inferencemodel")
        return not left["items"]

    wait_for("the garbage collector to remove DaemonSets, Service and pods", gone)


def test_a_sigkilled_operator_converges_on_restart_without_duplicates(devcluster, namespace, operator, cluster):
    apply(devcluster, namespace, EXAMPLE)
    wait_for("the first DaemonSet", lambda: devcluster.get_json("daemonsets", "-n", namespace)["items"])
    operator.kill()

    # While it is down: a new model, and one of its DaemonSets deleted by hand.
    updated = copy.deepcopy(EXAMPLE)
    updated["spec"]["model"].update(sha256=NEW_SHA, version="2")
    apply(devcluster, namespace, updated)
    devcluster.kubectl("delete", "daemonset", "digits-gpu", "-n", namespace, "--ignore-not-found")

    operator.start()
    body = wait_for("version 2 Ready", lambda: (
        (b := wait_ready(devcluster, namespace))["status"]["model"]["version"] == "2" and b))
    daemon_sets = sorted(ds["metadata"]["name"] for ds in devcluster.get_json("daemonsets", "-n", namespace)["items"])
    assert daemon_sets == ["digits-cpu", "digits-gpu", "digits-npu"]
    assert len(devcluster.get_json("services", "-n", namespace)["items"]) == 1
    assert pods_by_node(devcluster, namespace) == {node: [cls] for node, cls in FLEET.items()}
    assert body["status"]["observedGeneration"] == 2


def test_an_idle_model_costs_no_writes(devcluster, namespace, operator):
    apply(devcluster, namespace, EXAMPLE)
    wait_ready(devcluster, namespace)
    time.sleep(3)  # let the last status write and events land
    since = time.time()
    time.sleep(8)  # four resyncs
    operator.stop()  # and a restart: Kopf resumes the model
    operator.start()
    time.sleep(5)
    calls = audited_calls(devcluster.run_dir / "audit.log", service_account_user(OPERATOR_NAMESPACE), since)
    writes = [f"{c['verb']} {c['requestURI']}" for c in calls if c["verb"] in WRITE_VERBS]
    assert calls, "the audit log records the operator's calls"
    assert writes == []


INVALID = [
    ("bad sha256", {"model": {"sha256": "not-a-digest"}}, "spec.model.sha256"),
    ("no accelerators", {"placement": {"accelerators": []}}, "should have at least 1 items"),
    ("unknown class", {"placement": {"accelerators": ["tpu", "cpu"]}}, 'Unsupported value: "tpu"'),
    ("duplicate class", {"placement": {"accelerators": ["gpu", "gpu", "cpu"]}}, 'Duplicate value: "gpu"'),
    ("cpu not last", {"placement": {"accelerators": ["cpu", "gpu"]}}, "cpu matches every node"),
    ("negative port", {"serving": {"httpPort": -1}}, "spec.serving.httpPort"),
    ("same ports", {"serving": {"httpPort": 9000, "grpcPort": 9000}}, "httpPort and grpcPort must differ"),
    ("negative batch size", {"runtime": {"maxBatchSize": -4}}, "spec.runtime.maxBatchSize"),
    ("zero maxUnavailable", {"rollout": {"maxUnavailable": 0}}, "maxUnavailable must be a count of at least 1"),
    ("a node's file", {"model": {"uri": "file:///var/lib/edgeloop/models/other/sha256/" + "a" * 64}},
     "spec.model.uri"),
    ("unknown format", {"model": {"format": "pt"}}, 'Unsupported value: "pt"'),
    ("too many instances", {"runtime": {"instances": 257}}, "spec.runtime.instances"),
    ("bad uri", {"model": {"uri": "ftp://x/model.onnx"}}, "spec.model.uri"),
]


@pytest.mark.parametrize(("case", "spec", "message"), INVALID, ids=[case for case, _, _ in INVALID])
def test_invalid_specs_are_rejected_at_admission(devcluster, cluster, case, spec, message):
    body = copy.deepcopy(EXAMPLE)
    for section, fields in spec.items():
        body["spec"][section].update(fields)
    result = devcluster.kubectl("apply", "--dry-run=server", "-n", "default", "-f", "-",
                                input=yaml.safe_dump(body), check=False)
    assert result.returncode != 0, f"{case} was accepted"
    assert message in result.stderr, result.stderr


def test_a_name_too_long_for_its_objects_is_rejected(devcluster, cluster):
    body = copy.deepcopy(EXAMPLE)
    body["metadata"]["name"] = "a" * 48
    result = devcluster.kubectl("apply", "--dry-run=server", "-n", "default", "-f", "-",
                                input=yaml.safe_dump(body), check=False)
    assert "metadata.name must be a DNS-1035 label of at most 47 characters" in result.stderr


def test_kubectl_explain_describes_the_api(devcluster, cluster):
    explained = devcluster.kubectl("explain", "inferencemodel.spec.placement").stdout
    assert "Accelerator classes in order of preference" in explained
    assert "nodeSelector" in explained and "tolerations" in explained
