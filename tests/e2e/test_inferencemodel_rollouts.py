"""InferenceModel rollouts on the devcluster's kwok fleet, driven by the operator (OnDelete DaemonSets): a
rollout finishes on the reachable nodes while more nodes than maxUnavailable are offline (devcluster's offline
nodes: kwok stops reporting them, the node lifecycle controller marks them Unknown and taints them), offline
nodes update when they return, and canary waves pause, then halt on a failing wave and say why. kwok runs no
container: the data path (a cut-off node serving from its cache) is proven on real nodes
(test_real_nodes_offline.py)."""

from __future__ import annotations

import copy
import json
import time

import pytest
import yaml
from edgeloop import testing
from edgeloop.testing import install_service_account

from .conftest import wait_for
from .test_inferencemodel import EXAMPLE, ROOT, apply, conditions, model, operator  # noqa: F401 (a fixture)

OPERATOR = "edgeloop-e2e-rollouts"  # its ServiceAccount, ClusterRole and namespace: this module's own


@pytest.fixture(scope="module")
def cluster(devcluster, tmp_path_factory):
    """The CRDs (a module before this one may have deleted them without waiting) and the operator's own
    ServiceAccount and RBAC."""
    for crd in ("inferencemodels.edgeloop.io", "federatedrounds.edgeloop.io"):
        devcluster.kubectl("wait", "--for=delete", f"crd/{crd}", "--timeout=60s", check=False)
    devcluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    devcluster.wait_established("inferencemodels.edgeloop.io")
    yield install_service_account(devcluster.kubectl, devcluster.kubeconfig, tmp_path_factory.mktemp("operator"),
                                  namespace=OPERATOR, name=OPERATOR)
    devcluster.kubectl("delete", "clusterrole,clusterrolebinding", OPERATOR, "--ignore-not-found")
    devcluster.kubectl("delete", "namespace", OPERATOR, "--wait=false", "--ignore-not-found")

CPU_ONLY = copy.deepcopy(EXAMPLE)
CPU_ONLY["spec"]["placement"]["accelerators"] = ["cpu"]  # every node of the six runs the one variant
FLEET = ["edge-cpu-0", "edge-cpu-1", "edge-gpu-0", "edge-gpu-1", "edge-npu-0", "edge-npu-1"]


def version(body: dict, number: str) -> dict:
    versioned = copy.deepcopy(body)
    sha = number * 64 if number.isdigit() else "f" * 64
    versioned["spec"]["model"].update(version=number, sha256=sha, uri=f"http://store/sha256/{sha}")
    return versioned


def versions_by_node(devcluster, namespace: str) -> dict[str, str]:
    """The model version each node's live pod serves (its pod template's annotation)."""
    return {
        pod["spec"]["nodeName"]: pod["metadata"]["annotations"]["edgeloop.io/model-version"]
        for pod in devcluster.get_json("pods", "-n", namespace)["items"]
        if pod["spec"].get("nodeName") and not pod["metadata"].get("deletionTimestamp")
    }


def until(devcluster, namespace: str, what: str, check, timeout: float = 120) -> dict:
    """Polls the model until `check(body)` holds; the body then."""
    return wait_for(what, lambda: (b := model(devcluster, namespace)) and check(b) and b, timeout,
                    lambda: json.dumps(model(devcluster, namespace).get("status"), indent=1))


def test_a_rollout_finishes_on_reachable_nodes_while_more_than_max_unavailable_are_offline(
    devcluster, namespace, operator  # noqa: F811
):
    body = copy.deepcopy(CPU_ONLY)
    body["spec"]["rollout"] = {"maxUnavailable": 1}
    apply(devcluster, namespace, version(body, "1"))
    until(devcluster, namespace, "version 1 on six nodes",
          lambda b: conditions(b).get("Ready") == ("True", "AllNodesReady") and b["status"]["readyNodes"] == 6)

    offline = ["edge-cpu-1", "edge-npu-1"]  # two offline, one may be unavailable
    with devcluster.offline(*offline):
        until(devcluster, namespace, "the offline nodes in the status",
              lambda b: conditions(b).get("Ready") == ("True", "NodesOffline"))
        apply(devcluster, namespace, version(body, "2"))
        done = until(devcluster, namespace, "version 2 on every reachable node", lambda b: (
            b["status"].get("model", {}).get("version") == "2"
            and b["status"].get("rollout", {}).get("state") == "Complete"
            and conditions(b).get("Progressing") == ("False", "NodesOffline")))

        status = done["status"]
        assert conditions(done) == {
            "Ready": ("True", "NodesOffline"), "Progressing": ("False", "NodesOffline"),
            "Degraded": ("False", "NodesOffline"), "Accelerated": ("False", "NoAcceleratedNodes"),
        }
        assert (status["desiredNodes"], status["readyNodes"], status["updatedNodes"]) == (6, 4, 4)
        assert status["offlineNodeCount"] == 2
        assert sorted(n["node"] for n in status["offlineNodes"]) == offline
        for node in status["offlineNodes"]:
            assert (node["reason"], node["version"], node["updated"]) == ("Unreachable", "1", False)
            assert node["since"].endswith("Z")
        message = next(c for c in status["conditions"] if c["type"] == "Progressing")["message"]
        assert all(f"{name} (unreachable since" in message for name in offline), message
        # The offline nodes keep their pod (it serves from the node's cache); the others run version 2.
        assert versions_by_node(devcluster, namespace) == {n: "1" if n in offline else "2" for n in FLEET}
        table = devcluster.kubectl("get", "im", "-n", namespace, "-o", "wide").stdout.splitlines()
        header, row = table[0].split(), table[1].split()
        assert row[header.index("OFFLINE") - 1] == "2" and row[header.index("ROLLOUT") - 1] == "Complete", table
        health = testing.argocd_health(testing.ARGOCD_HEALTH / "InferenceModel" / "health.lua", done)
        assert health == {"status": "Healthy",
                          "message": "Serving on 4/6 nodes, 2 offline (they update when they return)"}
        testing.capture_argocd_testdata("InferenceModel", "nodes-offline", done)

    # Back online: they update, without anyone asking.
    until(devcluster, namespace, "every node on version 2", lambda b: (
        conditions(b).get("Ready") == ("True", "AllNodesReady") and b["status"]["updatedNodes"] == 6
        and b["status"]["offlineNodeCount"] == 0))
    assert versions_by_node(devcluster, namespace) == dict.fromkeys(FLEET, "2")
    reasons = [e["reason"] for e in devcluster.get_json("events", "-n", namespace,
                                                        "--field-selector=involvedObject.kind=InferenceModel")["items"]]
    assert "NodesOffline" in reasons and "RolloutHalted" not in reasons


def test_canary_waves_pause_and_a_failing_wave_halts_the_rollout_saying_why(
    devcluster, namespace, operator  # noqa: F811
):
    body = copy.deepcopy(CPU_ONLY)
    body["spec"]["rollout"] = {"waves": [1, "50%"], "pauseSeconds": 4, "maxUnavailable": "100%"}
    apply(devcluster, namespace, version(body, "1"))
    until(devcluster, namespace, "version 1 ready", lambda b: conditions(b).get("Ready") == ("True", "AllNodesReady"))

    apply(devcluster, namespace, version(body, "2"))
    for wave, updated in ((1, 1), (2, 3)):
        until(devcluster, namespace, f"wave {wave} paused", lambda b, wave=wave: (
            b["status"].get("rollout", {}).get("state") == "Paused" and b["status"]["rollout"]["wave"] == wave))
        on_2 = [node for node, v in versions_by_node(devcluster, namespace).items() if v == "2"]
        assert len(on_2) == updated, f"wave {wave}: {on_2}"
    until(devcluster, namespace, "version 2 everywhere",
          lambda b: b["status"]["rollout"]["state"] == "Complete" and b["status"]["updatedNodes"] == 6)
    waves = [e["message"] for e in devcluster.get_json("events", "-n", namespace,
                                                       "--field-selector=reason=WaveStarted")["items"]]
    assert sorted(waves) == ["wave 2/3 of the rollout", "wave 3/3 of the rollout"]

    # Version 3's canary cannot be scheduled (no node has 64 CPUs): the rollout halts there.
    broken = version(body, "3")
    broken["spec"]["runtime"]["resources"]["requests"]["cpu"] = "64"
    apply(devcluster, namespace, broken)
    halted = until(devcluster, namespace, "the rollout to halt",
                   lambda b: conditions(b).get("Degraded") == ("True", "RolloutHalted"))
    rollout = halted["status"]["rollout"]
    assert (rollout["state"], rollout["wave"], rollout["reason"]) == ("Halted", 1, "Unschedulable"), rollout
    assert "wave 1/3 halted (Unschedulable): the new pod digits-cpu-" in rollout["message"]
    assert "on node edge-cpu-0 (cpu): 0/6 nodes are available" in rollout["message"]
    assert "Insufficient cpu" in rollout["message"]
    assert conditions(halted)["Ready"] == ("False", "RolloutHalted")
    assert conditions(halted)["Progressing"] == ("False", "RolloutHalted")
    time.sleep(3)  # nothing more is replaced: five nodes go on serving version 2
    pods = devcluster.get_json("pods", "-n", namespace)["items"]
    versions = sorted(p["metadata"]["annotations"]["edgeloop.io/model-version"] for p in pods
                      if not p["metadata"].get("deletionTimestamp"))
    assert versions == ["2"] * 5 + ["3"], versions
    health = testing.argocd_health(testing.ARGOCD_HEALTH / "InferenceModel" / "health.lua", halted)
    assert health["status"] == "Degraded" and health["message"].startswith("RolloutHalted: wave 1/3 halted")
    testing.capture_argocd_testdata("InferenceModel", "rollout-halted", halted)


INVALID_ROLLOUTS = [
    ("zero wave", {"waves": [0]}, "each wave must be a count of at least 1"),
    ("bad percentage", {"waves": ["1%", "0%"]}, "each wave must be a count of at least 1 or a percentage"),
    ("too many waves", {"waves": list(range(1, 12))}, "must have at most 10 items"),
    ("negative pause", {"pauseSeconds": -1}, "spec.rollout.pauseSeconds"),
    ("error rate above 1", {"maxErrorRate": 1.5}, "spec.rollout.maxErrorRate"),
]


@pytest.mark.parametrize(("case", "rollout", "message"), INVALID_ROLLOUTS, ids=[c for c, _, _ in INVALID_ROLLOUTS])
def test_invalid_rollouts_are_rejected_at_admission(devcluster, cluster, case, rollout, message):
    body = copy.deepcopy(CPU_ONLY)
    body["spec"]["rollout"] = rollout
    result = devcluster.kubectl("apply", "--dry-run=server", "-n", "default", "-f", "-",
                                input=yaml.safe_dump(body), check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr
