"""Real nodes that go away: the data path of issue 13, on the session's cluster of real nodes (real_devcluster,
two nodes by default), with the chart's operator and store as pods (conftest's real_release).

- A node partitioned from the API server (devcluster's offline nodes: iptables in its netns; its pods keep
  talking to everything else) keeps serving its model from its node cache; the rollout of a new version
  finishes on the other node, though one offline node is as many as maxUnavailable; the status names the
  offline node with the version it runs; back, it converges to the new version by itself.
- A FederatedRound survives the loss of its aggregator's pod (its node made unschedulable): the Job's next pod,
  on the other node, resumes after the last completed round from the checkpoint in the store.
- With four real nodes or more (EDGELOOP_E2E_REAL_FLEET=edge-real=3,edge-real-npu=1: secure aggregation needs a
  strict majority of a survivor's neighbours), a client's node is lost mid-round (its cable cut: nothing
  reaches it or leaves it) after it shared its keys, and the round drops it at its deadline and still unmasks
  the sum, rebuilding the lost client's masks from its neighbours' shares.
"""

from __future__ import annotations

import contextlib
import json
import re
import ssl
import subprocess
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml
from edgeloop import testing

from devcluster import nodes

from .conftest import RealRelease, wait_for
from .test_real_nodes import ROOT, Story, digits_inputs, expected, write_digits

MODELS_NS, RELEASE_NS = RealRelease.workload_namespace, RealRelease.namespace


@pytest.fixture(scope="module")
def story(real_release: RealRelease) -> Story:
    """The chart's operator and store on the real nodes (conftest's real_release)."""
    return Story(real_release, list(real_release.devcluster.nodes))


def node_of_pod(story: Story, namespace: str, selector: str) -> str:
    [pod] = story.devcluster.get_json("pods", "-n", namespace, "-l", selector)["items"]
    return pod["spec"]["nodeName"]


def pods_by_node(story: Story, name: str) -> dict[str, dict]:
    """The live pods of InferenceModel `name`, by node."""
    pods = story.devcluster.get_json("pods", "-n", MODELS_NS, "-l", f"edgeloop.io/inferencemodel={name}")["items"]
    return {p["spec"]["nodeName"]: p for p in pods if not p["metadata"].get("deletionTimestamp")}


def ask_pod(story: Story, pod_ip: str, name: str, inputs: np.ndarray) -> tuple[list[str], np.ndarray]:
    """tritonclient over gRPC with TLS straight to one pod's address (the host routes every node's pod
    range): the versions it serves and its answer."""
    import tritonclient.grpc as grpcclient

    ca = story.real[0].dir / f"{name}-ca.crt"
    ca.write_bytes(story.release.secret(MODELS_NS, f"{name}-tls", "ca.crt"))
    client = grpcclient.InferenceServerClient(
        f"{pod_ip}:8001", ssl=True, root_certificates=str(ca),
        channel_args=[("grpc.ssl_target_name_override", f"{name}.{MODELS_NS}.svc")],
    )
    try:
        metadata = client.get_model_metadata(name, as_json=True)
        [tensor] = metadata["inputs"]
        request = grpcclient.InferInput(tensor["name"], list(inputs.shape), tensor["datatype"])
        request.set_data_from_numpy(inputs)
        result = client.infer(name, [request], client_timeout=20)
        return metadata["versions"], result.as_numpy(metadata["outputs"][0]["name"])
    finally:
        client.close()


def model_status(story: Story, name: str) -> dict:
    return story.devcluster.get_json("inferencemodel", name, "-n", MODELS_NS)


def reason_of(body: dict, type_: str) -> tuple[str, str]:
    found = next((c for c in body.get("status", {}).get("conditions", []) if c["type"] == type_), {})
    return found.get("status", ""), found.get("reason", "")


def test_a_partitioned_node_keeps_serving_from_its_cache_and_converges_when_it_returns(story: Story):
    from edgeloop_runtime.federated.model import mlp

    name = "offline-digits"
    v1, v2 = mlp([64, 32, 10], seed=11), mlp([64, 32, 10], seed=12)
    digests = [story.release.upload(v1), story.release.upload(v2)]
    model = yaml.safe_load((ROOT / "examples" / "inferencemodel-digits.yaml").read_text())
    model["metadata"] = {"name": name, "namespace": MODELS_NS}
    model["spec"]["placement"]["accelerators"] = ["cpu"]  # the nodes' one GPU each serves test_real_nodes' model
    model["spec"]["rollout"] = {"maxUnavailable": 1}  # one offline node is as many: RollingUpdate would stall

    def serve(version: int) -> None:
        digest = digests[version - 1]
        model["spec"]["model"] = {"uri": story.release.model_uri(digest),
                                  "sha256": digest, "version": str(version)}
        story.devcluster.kubectl("apply", "-f", "-", input=json.dumps(model))

    def until(what: str, check) -> dict:
        return wait_for(what, lambda: (b := model_status(story, name)) and check(b) and b, timeout=300,
                        debug=lambda: json.dumps(model_status(story, name).get("status"), indent=1)
                        + story.debug(MODELS_NS))

    serve(1)
    until("version 1 on both nodes", lambda b: reason_of(b, "Ready") == ("True", "AllNodesReady")
          and b["status"]["model"]["version"] == "1")
    # Cut off the node that does not run the operator (which must reach the API server to roll anything).
    operator_node = node_of_pod(story, RELEASE_NS, "app.kubernetes.io/component=operator")
    [cut] = [node for node in story.real if node.name != operator_node][:1]
    inputs = digits_inputs()

    with story.devcluster.offline(cut.name):
        until("the partitioned node in the status", lambda b: reason_of(b, "Ready") == ("True", "NodesOffline"))
        pod_ip = pods_by_node(story, name)[cut.name]["status"]["podIP"]
        versions, outputs = ask_pod(story, pod_ip, name, inputs)
        assert versions == ["1"], "cut off from the API server, the node serves from its cache"
        np.testing.assert_allclose(outputs, expected(v1, inputs), rtol=1e-5, atol=1e-6)

        serve(2)
        done = until("version 2 on the reachable node", lambda b: b["status"].get("model", {}).get("version") == "2"
                     and b["status"].get("rollout", {}).get("state") == "Complete"
                     and reason_of(b, "Progressing") == ("False", "NodesOffline"))
        status = done["status"]
        assert reason_of(done, "Ready") == ("True", "NodesOffline") and reason_of(done, "Degraded")[0] == "False"
        nodes = len(story.real)
        assert (status["desiredNodes"], status["updatedNodes"], status["offlineNodeCount"]) == (nodes, nodes - 1, 1)
        [offline] = status["offlineNodes"]
        assert (offline["node"], offline["reason"], offline["version"], offline["updated"]) == (
            cut.name, "Unreachable", "1", False)
        reachable = pods_by_node(story, name)[operator_node]["status"]["podIP"]
        assert ask_pod(story, reachable, name, inputs)[0] == ["2"]
        versions, outputs = ask_pod(story, pod_ip, name, inputs)
        assert versions == ["1"], "the partitioned node is left alone, serving what it has"
        np.testing.assert_allclose(outputs, expected(v1, inputs), rtol=1e-5, atol=1e-6)

    # Back: it converges to version 2 without anyone asking.
    until("both nodes on version 2", lambda b: reason_of(b, "Ready") == ("True", "AllNodesReady")
          and b["status"]["updatedNodes"] == len(story.real) and b["status"]["offlineNodeCount"] == 0)
    pod = pods_by_node(story, name)[cut.name]
    versions, outputs = ask_pod(story, pod["status"]["podIP"], name, inputs)
    assert versions == ["2"]
    np.testing.assert_allclose(outputs, expected(v2, inputs), rtol=1e-5, atol=1e-6)
    assert (cut.host_path / "models" / MODELS_NS / "sha256" / digests[1]).read_bytes() == v2
    story.devcluster.kubectl("delete", "inferencemodel", name, "-n", MODELS_NS, "--wait=false")


def test_stuck_round_pods_are_diagnosed_with_their_reason_long_before_the_deadline(story: Story):
    """An image that cannot be pulled (the aggregator's), and a dataset a node lacks (a client's)."""
    from edgeloop_runtime.federated.model import mlp

    devcluster = story.devcluster
    write_digits(story.real, MODELS_NS)  # no-image's clients have their data: what stops them is only the image
    digest = story.release.upload(mlp([64, 32, 10], seed=7))
    spec = {
        "model": {"uri": story.release.model_uri(digest), "sha256": digest,
                  "version": "1"},
        "participants": {"nodeSelector": {"edgeloop.io/node-group": "edge-real"}, "minClients": 1},
        "deadlineSeconds": 3600,
        "runtime": {"resources": {"requests": {"cpu": "50m", "memory": "64Mi"}}},
    }
    rounds = {
        "no-image": {**spec, "dataset": {"name": "digits"},
                     "runtime": {**spec["runtime"], "image": "registry.invalid/edgeloop/runtime-federated:0"}},
        "no-data": {**spec, "dataset": {"name": "nowhere"}},
    }
    for name, round_spec in rounds.items():
        body = {"apiVersion": "edgeloop.io/v1alpha1", "kind": "FederatedRound",
                "metadata": {"name": name, "namespace": MODELS_NS}, "spec": round_spec}
        devcluster.kubectl("apply", "-f", "-", input=json.dumps(body))

    def degraded(name: str):
        body = devcluster.get_json("federatedround", name, "-n", MODELS_NS)
        found = next((c for c in body.get("status", {}).get("conditions", []) if c["type"] == "Degraded"), {})
        return found.get("status") == "True" and (body["status"]["phase"], found)

    try:
        phase, found = wait_for("the missing image diagnosed", lambda: degraded("no-image"), timeout=90,
                                debug=lambda: story.debug(MODELS_NS))
        assert phase == "Running" and found["reason"] == "ImagePullFailed", found
        assert found["message"].startswith("the aggregator pod no-image-aggregator-"), found
        assert "registry.invalid/edgeloop/runtime-federated:0" in found["message"], found
        events = devcluster.get_json("events", "-n", MODELS_NS, "--field-selector",
                                     "involvedObject.name=no-image,reason=ImagePullFailed")["items"]
        assert [e["type"] for e in events] == ["Warning"], events

        # The aggregator of no-data runs (it waits for its clients); its clients find no dataset on their node.
        phase, found = wait_for("the missing dataset diagnosed", lambda: degraded("no-data"), timeout=120,
                                debug=lambda: story.debug(MODELS_NS))
        assert phase == "Running" and found["reason"] in ("MountFailed", "ContainerFailed", "CrashLooping"), found
        assert found["message"].startswith("the client pod no-data-client-"), found
        body = devcluster.get_json("federatedround", "no-data", "-n", MODELS_NS)
        health = testing.argocd_health(testing.ARGOCD_HEALTH / "FederatedRound" / "health.lua", body)
        assert health["status"] == "Degraded" and found["reason"] in health["message"], health
        testing.capture_argocd_testdata("FederatedRound", "stuck-client", body)
    finally:
        devcluster.kubectl("delete", "federatedround", *rounds, "-n", MODELS_NS, "--wait=false")


CUT_CHAIN = "E2E-CABLE-CUT"


@contextlib.contextmanager
def cable_cut(node: nodes.RealNode):
    """Nothing reaches the node or leaves it (its uplink, in its network namespace): lost to the control plane
    and to every other node and pod, as when its power or its cable goes; restored afterwards."""
    def iptables(*args: str, check: bool = True) -> None:
        subprocess.run(["ip", "netns", "exec", node.network.netns(node.index), "iptables", "-w", *args],
                       check=check, capture_output=True)

    iptables("-N", CUT_CHAIN)
    iptables("-A", CUT_CHAIN, "-i", "eth0", "-j", "DROP")
    iptables("-A", CUT_CHAIN, "-o", "eth0", "-j", "DROP")
    for hook in ("INPUT", "OUTPUT", "FORWARD"):
        iptables("-I", hook, "1", "-j", CUT_CHAIN)
    try:
        yield
    finally:
        for hook in ("INPUT", "OUTPUT", "FORWARD"):
            iptables("-D", hook, "-j", CUT_CHAIN, check=False)
        iptables("-F", CUT_CHAIN, check=False)
        iptables("-X", CUT_CHAIN, check=False)


class Aggregator:
    """The round's aggregator asked directly at its pod's address, as the operator asks it (with the round's
    status certificate, under mTLS)."""

    def __init__(self, story: Story, round_name: str):
        self.story, self.round_name = story, round_name
        directory = Path(tempfile.mkdtemp(dir=story.real[0].dir))
        for key in ("tls.crt", "tls.key", "ca.crt"):
            (directory / key).write_bytes(story.release.secret(MODELS_NS, f"{round_name}-status-tls", key))
        self.context = ssl.create_default_context(cafile=str(directory / "ca.crt"))
        self.context.check_hostname = False  # its certificate names the Service; the chain is verified
        self.context.load_cert_chain(directory / "tls.crt", directory / "tls.key")

    def pod(self) -> dict | None:
        pods = self.story.devcluster.get_json("pods", "-n", MODELS_NS, "-l",
                                              f"edgeloop.io/federatedround={self.round_name},edgeloop.io/role=aggregator")
        live = [p for p in pods["items"] if not p["metadata"].get("deletionTimestamp")
                and p["status"].get("podIP") and p["status"].get("phase") == "Running"]
        return live[0] if live else None

    def status(self) -> dict | None:
        pod = self.pod()
        if pod is None:
            return None
        with contextlib.suppress(OSError, ValueError):
            url = f"https://{pod['status']['podIP']}:8080/v1/status"
            with urllib.request.urlopen(url, timeout=3, context=self.context) as answer:
                return json.loads(answer.read())
        return None

    def until(self, what: str, check, timeout: float = 240) -> dict:
        return wait_for(what, lambda: (s := self.status()) and check(s) and s, timeout,
                        debug=lambda: self.story.debug(MODELS_NS))


PIN = "e2e.edgeloop.io/aggregator"


def start_round(story: Story, name: str, rounds: int, aggregator_node: str) -> Aggregator:
    """A secure-aggregation round of every real node's client (one may be lost), its aggregator pinned to
    `aggregator_node`; local training of a few seconds a round: time to lose a client or the aggregator."""
    from edgeloop_runtime.federated.model import mlp

    write_digits(story.real, MODELS_NS)
    story.devcluster.kubectl("label", "node", aggregator_node, f"{PIN}=here", "--overwrite")
    digest = story.release.upload(mlp([64, 32, 10], seed=5))
    round_ = {
        "apiVersion": "edgeloop.io/v1alpha1", "kind": "FederatedRound",
        "metadata": {"name": name, "namespace": MODELS_NS},
        "spec": {
            "model": {"uri": story.release.model_uri(digest), "sha256": digest, "version": "1"},
            "participants": {"nodeSelector": {"kubernetes.io/os": "linux"},  # every real node
                             "minClients": len(story.real) - 1, "maxClients": len(story.real)},
            "dataset": {"name": "digits"},
            "training": {"rounds": rounds, "localEpochs": 100, "batchSize": 1, "learningRate": 0.02},
            "secureAggregation": {"enabled": True, "threshold": 0.5},
            "deadlineSeconds": 40,
            "aggregator": {"nodeSelector": {PIN: "here"}, "resources": {"requests": {"cpu": "100m"}}},
            "runtime": {"resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}},
        },
    }
    story.devcluster.kubectl("apply", "-f", "-", input=json.dumps(round_))
    return wait_for(f"{name}'s status certificate", lambda: story.devcluster.kubectl(
        "get", "secret", f"{name}-status-tls", "-n", MODELS_NS, check=False).returncode == 0
        and Aggregator(story, name), timeout=60)


def round_logs(story: Story, name: str) -> str:
    logs = story.devcluster.kubectl("logs", "-n", MODELS_NS, "-l", f"edgeloop.io/federatedround={name}",
                                    "--tail=30", "--prefix", check=False).stdout
    return story.debug(MODELS_NS) + logs


def succeeded(story: Story, name: str, last: dict, rounds: int) -> None:
    """The round ends Succeeded, each training round done once: the final report its aggregator pod `last`
    prints as its log's last line once its --linger is over (the round is Succeeded before that, from the
    aggregator's status)."""
    def finished():
        body = story.devcluster.get_json("federatedround", name, "-n", MODELS_NS)
        return body.get("status", {}).get("phase") in ("Succeeded", "Failed") and body

    body = wait_for(f"{name} to end", finished, timeout=240, debug=lambda: round_logs(story, name))
    assert body["status"]["phase"] == "Succeeded", body["status"]
    pod = last["metadata"]["name"]
    wait_for(f"the aggregator pod {pod} to finish", lambda: story.devcluster.get_json(
        "pod", pod, "-n", MODELS_NS)["status"].get("phase") == "Succeeded", timeout=120,
        debug=lambda: round_logs(story, name))
    log = story.devcluster.kubectl("logs", "-n", MODELS_NS, pod).stdout
    report = json.loads(log.strip().splitlines()[-1])
    assert [h["round"] for h in report["history"]] == list(range(1, rounds + 1)), "each round once, none repeated"


def test_a_round_resumes_after_losing_its_aggregator(story: Story):
    first, second = story.real[1], story.real[0]
    devcluster, rounds = story.devcluster, 4
    aggregator = start_round(story, "survivor", rounds, first.name)
    try:
        aggregator.until("round 1 done, on the first node", lambda s: len(s["history"]) >= 1)
        old = aggregator.pod()
        assert old["spec"]["nodeName"] == first.name, "spec.aggregator.nodeSelector pins it"

        # Its node unschedulable (cordoned, and the pin moved to the other node), its pod deleted mid-job.
        devcluster.kubectl("cordon", first.name)
        devcluster.kubectl("label", "node", first.name, f"{PIN}-")
        devcluster.kubectl("label", "node", second.name, f"{PIN}=here")
        devcluster.kubectl("delete", "pod", old["metadata"]["name"], "-n", MODELS_NS, "--wait=false")
        resumed = aggregator.until("a new aggregator, on the other node", lambda s: (
            (pod := aggregator.pod()) is not None and pod["metadata"]["name"] != old["metadata"]["name"]))
        new = aggregator.pod()
        assert new["spec"]["nodeName"] == second.name
        devcluster.kubectl("uncordon", first.name)
        log = devcluster.kubectl("logs", "-n", MODELS_NS, new["metadata"]["name"]).stdout
        found = re.search(r"resuming after round (\d+) from the store's ref models\.survivor\.", log)
        assert found and 1 <= int(found[1]) < rounds, log[-2000:]
        assert len(resumed["history"]) >= int(found[1]), "the completed rounds are not trained again"
    finally:
        devcluster.kubectl("uncordon", first.name, check=False)
        for node in story.real:
            devcluster.kubectl("label", "node", node.name, f"{PIN}-", check=False)
    succeeded(story, "survivor", new, rounds)


def test_a_lost_client_is_dropped_and_secure_aggregation_rebuilds_its_masks(story: Story):
    """Secure aggregation rebuilds a survivor's self-mask from a strict majority of its neighbours' shares
    (secagg.share_threshold: so that no honest client's reveals can yield both secrets of one client). With
    two clients the lost one is the survivor's only neighbour (the round Failed: "cannot rebuild the self mask
    of edge-real-0: 0 shares, 1 needed"); with three, one of two (1 share, 2 needed). Four clients survive a
    loss: tests/runtime/test_federated.py proves it with ten real processes; here it needs four real nodes."""
    if len(story.real) < 4:
        pytest.skip("a lost client needs four real nodes (secure aggregation's strict majority of neighbours), the "
                    "default fleet has two: EDGELOOP_E2E_REAL_FLEET=edge-real=3,edge-real-npu=1")
    devcluster, rounds = story.devcluster, 3
    lost_node = story.real[-1]  # the store and the operator live on the first node: never cut off
    aggregator = start_round(story, "lossy", rounds, story.real[0].name)
    try:
        # The last node's client is lost mid-round, after it shared its keys: its cable is cut while it
        # trains. Should it upload before the cut lands, the next round tries again.
        lost = None
        for number in range(1, rounds + 1):
            aggregator.until(f"round {number} collecting, no update in yet", lambda s, number=number: (
                s["round"] == number and s["stage"] == "collect" and s["participants"]["reported"] == 0)
                or s["round"] > number or s["phase"] != "Running")
            with cable_cut(lost_node):
                done = aggregator.until(f"round {number} done", lambda s, number=number: len(s["history"]) >= number
                                        or s["phase"] != "Running", timeout=120)
            assert len(done["history"]) >= number, f"{done}\n{round_logs(story, 'lossy')}"
            if done["history"][number - 1]["participants"]["dropped"] == 1:
                lost = done["history"][number - 1]
                break
        assert lost is not None, round_logs(story, "lossy")
        last = aggregator.pod()
    finally:
        for node in story.real:
            devcluster.kubectl("label", "node", node.name, f"{PIN}-", check=False)
    clients = len(story.real)
    assert lost["participants"] == {"selected": clients, "reported": clients - 1, "dropped": 1}, lost
    assert "discarded" not in lost, "the lost client's masks were rebuilt from its neighbours' shares"
    succeeded(story, "lossy", last, rounds)
