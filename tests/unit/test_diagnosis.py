"""Why a node does not serve: reasons read from DaemonSet pods, nodes and the controller's events."""

from __future__ import annotations

import hashlib

import pytest
from edgeloop.status.diagnosis import missing_pod_problems, pod_problem


def pod(node_name="edge-0", *, ready=False, conditions=None, init=None, containers=None, bound=True, deleting=False):
    spec = {"nodeName": node_name} if bound else {"affinity": {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [node_name]}]}]}}}}
    conditions = [*(conditions or []), {"type": "Ready", "status": "True" if ready else "False"}]
    metadata = {"name": "p", "deletionTimestamp": "2026-01-01T00:00:00Z"} if deleting else {"name": "p"}
    return {"metadata": metadata, "spec": spec, "status": {
        "conditions": conditions, "initContainerStatuses": init or [], "containerStatuses": containers or []}}


def terminated(name, code, message=""):
    return {"name": name, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": code, "message": message}}}


def reason(found):
    return found.reason if found else None


def test_ready_and_terminating_pods_are_fine():
    assert pod_problem(pod(ready=True), "gpu") is None
    assert pod_problem(pod(deleting=True), "gpu") is None


def test_digest_mismatch_is_told_apart_from_other_fetch_failures(tmp_path):
    """Uses the runtime's own fetch to produce the message, so a reworded error fails here."""
    from edgeloop_runtime import fetch

    model = tmp_path / "model.onnx"
    model.write_bytes(b"not the model you are looking for")
    with pytest.raises(fetch.DigestMismatch) as mismatch:
        fetch.fetch(model.as_uri(), "0" * 64, tmp_path / "cache", retries=0, file_root=tmp_path)
    log_tail = f"2026-11-28 00:00:00,000 ERROR edgeloop_runtime.fetch: {mismatch.value}\n"
    found = pod_problem(pod(init=[terminated("fetch", 1, log_tail)]), "npu")
    assert (found.node, found.accelerator, found.reason) == ("edge-0", "npu", "DigestMismatch")
    assert "0" * 64 in found.message
    assert hashlib.sha256(model.read_bytes()).hexdigest() not in found.message  # never told: issue 16, item 11

    unreachable = "ERROR fetching http://x failed after 6 attempt(s)"
    refused = pod_problem(pod(init=[terminated("fetch", 1, unreachable)]), "npu")
    assert reason(refused) == "FetchFailed" and "failed after 6 attempt(s)" in refused.message


@pytest.mark.parametrize(("status", "expected"), [
    ({"init": [{"name": "fetch", "state": {"waiting": {"reason": "ImagePullBackOff", "message": "not found"}}}]},
     "ImagePullFailed"),
    ({"init": [{"name": "fetch", "state": {"terminated": {"exitCode": 0}}}],
      "containers": [terminated("runtime", 1, "execution providers ['CUDAExecutionProvider'] are not available")],
      "conditions": [{"type": "Initialized", "status": "True"}]}, "RuntimeFailed"),
    ({"containers": [{"name": "runtime", "state": {"waiting": {"reason": "CreateContainerConfigError"}}}]},
     "ContainerCreateFailed"),
    ({"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                      "message": "0/6 nodes are available: 1 Insufficient nvidia.com/gpu."}], "bound": False},
     "Unschedulable"),
    ({"init": [{"name": "fetch", "state": {"running": {}}}]}, "FetchingModel"),
    ({"conditions": [{"type": "Initialized", "status": "True"}]}, "Starting"),
])
def test_reasons(status, expected):
    assert reason(pod_problem(pod(**status), "gpu")) == expected


def test_unschedulable_pod_is_attributed_to_the_node_the_daemon_set_pinned_it_to():
    found = pod_problem(pod("edge-gpu-1", bound=False, conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "Insufficient nvidia.com/gpu"}
    ]), "gpu")
    assert (found.node, found.message) == ("edge-gpu-1", "Insufficient nvidia.com/gpu")


def test_a_pod_on_an_offline_node_is_no_problem_of_the_model():
    """The status reports offline nodes apart (NodesOffline); the model is not Degraded because of them."""
    crashed = pod("edge-0", containers=[terminated("runtime", 1, "boom")])
    assert pod_problem(crashed, "cpu", not_ready_nodes={"edge-0"}) is None
    assert reason(pod_problem(crashed, "cpu", not_ready_nodes={"edge-1"})) == "RuntimeFailed"


def test_messages_are_the_last_log_line_and_short():
    found = pod_problem(pod(init=[terminated("fetch", 1, "line one\n" + "x" * 1000 + "\n\n")]), "cpu")
    assert found.message.startswith("xxx") and len(found.message) == 300


def test_nodes_without_a_pod_are_reported_with_the_controllers_refusal():
    found = missing_pod_problems(["a", "b", "c"], ["b"], "gpu", 'Error creating: RuntimeClass "nvidia" not found')
    assert [(p.node, p.reason) for p in found] == [("a", "PodNotCreated"), ("c", "PodNotCreated")]
    assert found[0].message == 'Error creating: RuntimeClass "nvidia" not found'
