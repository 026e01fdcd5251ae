"""The Helm chart on the devcluster, as a user meets it: server-side validation of what it renders, then one
release through its life (install, the operator reconciling under the chart's ServiceAccount, upgrade,
uninstall), in file order.

kwok runs no container, so the chart's operator pods only look Running. The real operator runs here as a
process, with a token of the chart's ServiceAccount and the configuration from the chart's ConfigMap. Both
the release namespace and the workload namespace enforce the Pod Security "restricted" level. The RBAC test
compares the operator's calls in the API server's audit log with the chart's Roles."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from edgeloop import testing
from edgeloop.testing import OperatorProcess, service_account_user

from .conftest import wait_for

ROOT = Path(__file__).parents[2]
CHART = ROOT / "charts" / "edgeloop"
HEALTH = ROOT / "docs" / "gitops" / "argocd" / "health" / "edgeloop.io"
EXAMPLE = yaml.safe_load((ROOT / "examples" / "inferencemodel-digits.yaml").read_text())
RELEASE = "edgeloop"
PID = os.getpid() % 10000
RELEASE_NS = f"chart-system-{PID}"
WORK_NS = f"chart-models-{PID}"
EXTRA_NS = f"chart-more-{PID}"
SERVICE_ACCOUNT = service_account_user(RELEASE_NS, RELEASE)
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest"}
# Set to a directory to refresh the Argo CD health checks' testdata from this run's objects.
OPERATOR_ARGS = ("--resync-seconds", "2", "--coalesce-seconds", "0.5", "--diagnosis-seconds", "1")


def helm(devcluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["helm", *args], env=devcluster.env, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def conditions(body: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in body.get("status", {}).get("conditions", [])}


def argocd_health(kind: str, obj: dict) -> dict:
    """The Argo CD health check shipped in docs/gitops."""
    return testing.argocd_health(HEALTH / kind / "health.lua", obj)


def write_kubeconfig(devcluster, token: str, path: Path) -> Path:
    admin = yaml.safe_load(devcluster.kubeconfig.read_text())
    cluster = admin["clusters"][0]
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "clusters": [cluster],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": cluster["name"], "user": "sa"}}],
        "current-context": "sa",
    }))
    path.chmod(0o600)
    return path


# ---- what the chart renders is valid for the API server


@pytest.fixture(scope="module")
def crds(devcluster):
    """The chart's CRDs, as `helm install` would create them, so that dry runs know the peering kinds."""
    devcluster.kubectl("apply", "--server-side", "-f", str(CHART / "crds"))
    names = [yaml.safe_load(path.read_text())["metadata"]["name"] for path in sorted((CHART / "crds").glob("*.yaml"))]
    devcluster.wait_established(*names)
    yield
    devcluster.kubectl("delete", "-f", str(CHART / "crds"), "--ignore-not-found", "--wait=false")


VALUE_SETS = {
    "defaults": [],
    "namespaced": ["watchNamespaces={default,kube-public}", "store.persistence.mode=hostPath"],
    "single replica without store": ["operator.replicas=1", "store.enabled=false", "networkPolicy.enabled=false"],
}


@pytest.mark.parametrize("case", VALUE_SETS)
def test_the_rendered_chart_passes_server_side_validation(devcluster, crds, case):
    args = ["template", RELEASE, str(CHART), "--namespace", "default"]
    for value in VALUE_SETS[case]:
        args += ["--set", value]
    rendered = helm(devcluster, *args).stdout
    result = devcluster.kubectl("apply", "--dry-run=server", "--validate=strict", "-f", "-",
                                input=rendered, check=False)
    assert result.returncode == 0, result.stderr
    assert "created (server dry run)" in result.stdout


# ---- one release through its life


class Release:
    def __init__(self, devcluster, tmp: Path):
        self.devcluster, self.tmp = devcluster, tmp
        self.operator: OperatorProcess | None = None
        self.operator_started = 0.0

    def config_file(self) -> Path:
        data = self.devcluster.get_json("configmap", f"{RELEASE}-config", "-n", RELEASE_NS)["data"]["config.yaml"]
        path = self.tmp / "config.yaml"
        path.write_text(data)
        return path

    def start_operator(self) -> OperatorProcess:
        """`edgeloop operator` as the chart's Deployment runs it, with a token of the chart's ServiceAccount."""
        token = self.devcluster.kubectl("create", "token", RELEASE, "-n", RELEASE_NS, "--duration=1h").stdout.strip()
        kubeconfig = write_kubeconfig(self.devcluster, token, self.tmp / "operator.kubeconfig")
        deployment = self.devcluster.get_json("deployment", f"{RELEASE}-operator", "-n", RELEASE_NS)
        env = {e["name"]: e["value"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
               if "value" in e}
        namespaces = [arg for ns in env["EDGELOOP_NAMESPACES"].split(",") for arg in ("--namespace", ns)]
        args = ["--config", str(self.config_file()), *namespaces, "--peering", env["EDGELOOP_PEERING"], *OPERATOR_ARGS]
        self.operator = OperatorProcess(kubeconfig, self.tmp / "operator.log", tuple(args))
        self.operator_started = time.time()
        return self.operator.start()

    def stop_operator(self) -> None:
        if self.operator:
            self.operator.stop()
            errors = self.operator.errors()
            assert not errors, f"the operator logged errors: {errors[:3]}"


@pytest.fixture(scope="module")
def release(devcluster, tmp_path_factory):
    for namespace in (RELEASE_NS, WORK_NS):
        devcluster.kubectl("create", "namespace", namespace)
        devcluster.kubectl("label", "namespace", namespace, *(f"{k}={v}" for k, v in RESTRICTED.items()))
    devcluster.kubectl("create", "namespace", EXTRA_NS)
    state = Release(devcluster, tmp_path_factory.mktemp("chart"))
    try:
        helm(devcluster, "install", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--wait", "--timeout=120s",
             "--set", f"watchNamespaces={{{WORK_NS}}}",
             "--set", "store.persistence.mode=hostPath", "--set", "store.persistence.hostPath.node=edge-cpu-0")
        yield state
    finally:
        if state.operator:
            state.operator.stop()
        devcluster.kubectl("delete", "inferencemodels,federatedrounds", "--all", "-n", WORK_NS, "--ignore-not-found",
                           "--wait=true", check=False)
        helm(devcluster, "uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait", "--timeout=60s", check=False)
        devcluster.kubectl("delete", "pvc,pv", "-A", "-l", f"app.kubernetes.io/instance={RELEASE}",
                           "--ignore-not-found", "--wait=false", check=False)
        for namespace in (RELEASE_NS, WORK_NS, EXTRA_NS):
            devcluster.kubectl("delete", "namespace", namespace, "--wait=false", "--ignore-not-found", check=False)
        devcluster.kubectl("delete", "-f", str(CHART / "crds"), "--ignore-not-found", "--wait=false", check=False)


def test_install_runs_every_pod_of_the_chart_restricted(devcluster, release):
    deployments = devcluster.get_json("deployments", "-n", RELEASE_NS)["items"]
    ready = {d["metadata"]["name"]: (d["status"].get("readyReplicas"), d["spec"]["replicas"]) for d in deployments}
    assert ready == {f"{RELEASE}-operator": (2, 2), f"{RELEASE}-store": (1, 1)}
    pods = devcluster.get_json("pods", "-n", RELEASE_NS)["items"]
    assert len(pods) == 3 and all(p["status"]["phase"] == "Running" for p in pods)
    assert devcluster.get_json("pvc", f"{RELEASE}-store", "-n", RELEASE_NS)["status"]["phase"] == "Bound"
    store_pod = next(p for p in pods if p["metadata"]["labels"]["app.kubernetes.io/component"] == "store")
    assert store_pod["spec"]["nodeName"] == "edge-cpu-0", "the hostPath volume pins the store to its node"
    assert devcluster.get_json("pvc", "edgeloop-model-cache", "-n", WORK_NS)["status"]["phase"] == "Bound"
    assert devcluster.get_json("pvc", "edgeloop-datasets", "-n", WORK_NS)["status"]["phase"] == "Bound"
    assert devcluster.get_json("kopfpeering", RELEASE, "-n", WORK_NS)
    notes = helm(devcluster, "get", "notes", RELEASE, "-n", RELEASE_NS).stdout
    assert f"kubectl -n {RELEASE_NS} rollout status deployment/{RELEASE}-operator" in notes


def apply_model(devcluster, body: dict) -> None:
    devcluster.kubectl("apply", "-n", WORK_NS, "-f", "-", input=yaml.safe_dump(body))


def model(devcluster) -> dict:
    return devcluster.get_json("inferencemodel", "digits", "-n", WORK_NS)


def wait_condition(devcluster, type_: str, expected: tuple[str, str], timeout: float = 90.0) -> dict:
    def reached():
        body = model(devcluster)
        current = body.get("status", {}).get("observedGeneration") == body["metadata"]["generation"]
        return body if current and conditions(body).get(type_) == expected else None

    return wait_for(f"{type_} {expected}", reached, timeout, lambda: json.dumps(model(devcluster).get("status")))


def test_the_operator_reconciles_under_the_charts_service_account(devcluster, release):
    """Every path that needs a permission: create, roll out, diagnose (pods, FailedCreate events), delete a
    class's DaemonSet, and re-create one deleted by hand (which reads the InferenceModel first)."""
    release.start_operator()
    apply_model(devcluster, EXAMPLE)
    body = wait_condition(devcluster, "Ready", ("True", "AllNodesReady"))
    assert body["status"]["readyNodes"] == 6
    assert argocd_health("InferenceModel", body)["status"] == "Healthy"
    testing.capture_argocd_testdata("InferenceModel", "ready", body)

    # The node cache comes through the chart's claim: no hostPath in any pod, so "restricted" admits them.
    pods = devcluster.get_json("pods", "-n", WORK_NS)["items"]
    assert len(pods) == 6
    for pod in pods:
        assert not any("hostPath" in v for v in pod["spec"]["volumes"])

    # A pod the DaemonSet controller may not create (quota): Degraded, from the controller's FailedCreate events.
    devcluster.kubectl("create", "quota", "no-pods", "--hard=pods=0", "-n", WORK_NS)
    devcluster.kubectl("delete", "pod", "-n", WORK_NS, "-l", "edgeloop.io/accelerator=cpu", "--wait=false")
    body = wait_condition(devcluster, "Degraded", ("True", "PodNotCreated"))
    health = argocd_health("InferenceModel", body)
    assert health["status"] == "Degraded" and "exceeded quota" in health["message"], health
    testing.capture_argocd_testdata("InferenceModel", "degraded", body)
    devcluster.kubectl("delete", "quota", "no-pods", "-n", WORK_NS)
    wait_condition(devcluster, "Ready", ("True", "AllNodesReady"))

    # A DaemonSet deleted by hand comes back; a class dropped from the spec loses its DaemonSet.
    devcluster.kubectl("delete", "daemonset", "digits-gpu", "-n", WORK_NS)
    wait_for("digits-gpu to come back",
             lambda: devcluster.kubectl("get", "daemonset", "digits-gpu", "-n", WORK_NS, check=False).returncode == 0)
    fewer = copy.deepcopy(EXAMPLE)
    fewer["spec"]["placement"]["accelerators"] = ["gpu", "cpu"]
    apply_model(devcluster, fewer)
    body = model(devcluster)
    assert argocd_health("InferenceModel", body)["status"] == "Progressing"
    testing.capture_argocd_testdata("InferenceModel", "progressing", body)
    body = wait_condition(devcluster, "Ready", ("True", "AllNodesReady"))
    daemon_sets = sorted(d["metadata"]["name"] for d in devcluster.get_json("daemonsets", "-n", WORK_NS)["items"])
    assert daemon_sets == ["digits-cpu", "digits-gpu"]

    # A FederatedRound. kwok completes the aggregator Job's pod without running it, so no report ever
    # comes: the operator tries the aggregator's status endpoint and then its log (pods/log), and waits.
    devcluster.kubectl("apply", "-n", WORK_NS, "-f", str(ROOT / "examples" / "federatedround-digits.yaml"))

    def awaiting_report():
        body = devcluster.get_json("federatedround", "digits-round-1", "-n", WORK_NS)
        return body if ("Unknown", "AwaitingReport") in conditions(body).values() else None

    body = wait_for("the operator to look for the aggregator's report", awaiting_report, 120, lambda: json.dumps(
        devcluster.get_json("federatedround", "digits-round-1", "-n", WORK_NS).get("status")))
    testing.capture_argocd_testdata("FederatedRound", "awaiting-report", body)
    assert argocd_health("FederatedRound", body)["status"] == "Progressing"
    release.calls_until = time.time()


def operator_calls(audit_log: Path, since: float, until: float) -> list[dict]:
    """The operator's requests from the audit log: completed ones, and watches, which log ResponseStarted
    when they open and ResponseComplete only when they close (after the window, for most)."""
    seen = {}
    for path in sorted(audit_log.parent.glob(f"{audit_log.stem}*{audit_log.suffix}")):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            if event["user"]["username"] != SERVICE_ACCOUNT or event["stage"] not in ("ResponseStarted",
                                                                                       "ResponseComplete"):
                continue
            stamp = datetime.fromisoformat(event["requestReceivedTimestamp"].replace("Z", "+00:00")).timestamp()
            if since <= stamp <= until:
                seen[event["auditID"]] = event
    return list(seen.values())


def test_rbac_grants_exactly_the_calls_the_operator_made(devcluster, release):
    assert release.operator, "runs after the reconcile test"
    calls = operator_calls(devcluster.run_dir / "audit.log", release.operator_started, release.calls_until)
    # The authorizer's decision, not the response code: a request proxied to a pod answers what the pod (or, for
    # kwok's simulated pods, whatever the address leads to) answers.
    denied = sorted({f"{c['verb']} {c['requestURI']}" for c in calls
                     if c.get("annotations", {}).get("authorization.k8s.io/decision") == "forbid"})
    assert not denied, f"the chart's RBAC denied: {denied}"

    used = set()
    for call in calls:
        ref = call.get("objectRef", {})
        if "resource" not in ref:
            continue  # discovery (/api, /apis): open to every authenticated user
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        scope = ref.get("namespace") or "*"
        used.add((ref.get("apiGroup", ""), resource, call["verb"], scope))
        if call["verb"] == "patch" and call.get("responseStatus", {}).get("code") == 201:
            # Server-side apply of an object that does not exist yet creates it: it needs `create` too.
            used.add((ref.get("apiGroup", ""), resource, "create", scope))

    granted = set()  # (group, resource, verb, namespace or "*" for the ClusterRole)
    for role in [devcluster.get_json("clusterrole", RELEASE),
                 *devcluster.get_json("roles", "-A", "-l", f"app.kubernetes.io/instance={RELEASE}")["items"]]:
        scope = role["metadata"].get("namespace", "*")
        for rule in role["rules"]:
            granted |= {(g, r, v, scope) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    # Not a call: the OwnerReferencesPermissionEnforcement admission plugin (hardened clusters, OpenShift)
    # checks it when an owner reference blocks the owner's deletion; the devcluster does not enable it.
    not_calls = {("edgeloop.io", f"{plural}/finalizers", "update", WORK_NS)
                 for plural in ("inferencemodels", "federatedrounds")}

    def used_by(grant) -> bool:
        group, resource, verb, scope = grant
        return any(u[:3] == (group, resource, verb) and scope in ("*", u[3]) for u in used)

    never_used = {grant for grant in granted - not_calls if not used_by(grant)}
    assert not never_used, f"granted but never used: {sorted(never_used)}"
    outside = {u for u in used if u[3] not in ("*", WORK_NS)}
    assert not outside, f"calls outside the watched namespace: {sorted(outside)}"


def failed_creates(devcluster, kind: str) -> list[str]:
    events = devcluster.get_json("events", "-n", WORK_NS, "--field-selector=reason=FailedCreate")["items"]
    return [e["message"] for e in events if e["involvedObject"]["kind"] == kind]


def test_pod_security_restricted_admits_every_inference_pod_and_no_hostpath(devcluster, release):
    quota_refusals = failed_creates(devcluster, "DaemonSet")
    assert quota_refusals and all("exceeded quota" in m for m in quota_refusals), "only the quota refused pods"
    # The control: the same DaemonSet with the node cache as a hostPath volume (the operator's rendering
    # without the chart's claim) is refused by the namespace's enforcement.
    daemon_set = devcluster.get_json("daemonset", "digits-cpu", "-n", WORK_NS)
    bare = {"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "hostpath-control", "namespace": WORK_NS},
            "spec": copy.deepcopy(daemon_set["spec"])}
    bare["spec"]["selector"] = {"matchLabels": {"control": "hostpath"}}
    bare["spec"]["template"]["metadata"]["labels"] = {"control": "hostpath"}
    bare["spec"]["template"]["spec"]["volumes"][0] = {
        "name": "model-cache", "hostPath": {"path": "/var/lib/edgeloop/models", "type": "Directory"}}
    result = devcluster.kubectl("apply", "-f", "-", input=json.dumps(bare))
    assert 'would violate PodSecurity "restricted:latest"' in result.stderr and '"hostPath"' in result.stderr

    def refused():
        events = devcluster.get_json("events", "-n", WORK_NS, "--field-selector=involvedObject.name=hostpath-control")
        return [e["message"] for e in events["items"] if e["reason"] == "FailedCreate"]

    assert "violates PodSecurity" in wait_for("the DaemonSet controller's FailedCreate", refused)[0]
    devcluster.kubectl("delete", "daemonset", "hostpath-control", "-n", WORK_NS)


def test_pod_security_restricted_admits_every_federated_pod(devcluster, release):
    assert failed_creates(devcluster, "Job") == []
    # The dataset comes through the chart's claim, as a read-only subPath: no hostPath in any Job's pods.
    jobs = devcluster.get_json("jobs", "-n", WORK_NS, "-l", "edgeloop.io/federatedround=digits-round-1")["items"]
    clients = [j for j in jobs if j["metadata"]["labels"]["edgeloop.io/role"] == "client"]
    assert clients and len(clients) < len(jobs)
    for job in jobs:
        assert not any("hostPath" in v for v in job["spec"]["template"]["spec"].get("volumes", []))
    for job in clients:
        volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
        assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "edgeloop-datasets", "readOnly": True}
    pods = devcluster.get_json("pods", "-n", WORK_NS, "-l", "edgeloop.io/role=client")["items"]
    assert len(pods) == len(clients), "every client Job's pod was admitted"


def test_upgrade_with_changed_values(devcluster, release):
    release.stop_operator()
    before = devcluster.get_json("deployment", f"{RELEASE}-operator", "-n", RELEASE_NS)
    helm(devcluster, "upgrade", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--reuse-values", "--wait",
         "--timeout=120s", "--set", f"watchNamespaces={{{WORK_NS},{EXTRA_NS}}}",
         "--set", "config.acceleratorClasses.gpu.resourceCount=2", "--set", "operator.resyncSeconds=30")
    after = devcluster.get_json("deployment", f"{RELEASE}-operator", "-n", RELEASE_NS)
    annotation = "checksum/config"
    assert (after["spec"]["template"]["metadata"]["annotations"][annotation]
            != before["spec"]["template"]["metadata"]["annotations"][annotation]), "a new config rolls the operator"
    env = {e["name"]: e.get("value") for e in after["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["EDGELOOP_NAMESPACES"] == f"{WORK_NS},{EXTRA_NS}" and env["EDGELOOP_RESYNC_SECONDS"] == "30"
    assert devcluster.get_json("role", RELEASE, "-n", EXTRA_NS)["rules"]
    assert devcluster.get_json("kopfpeering", RELEASE, "-n", EXTRA_NS)

    # The operator, restarted with the new configuration, rolls the GPU variant to 2 GPUs per pod.
    release.start_operator()
    wait_for("the GPU variant to request 2 GPUs", lambda: devcluster.get_json(
        "daemonset", "digits-gpu", "-n", WORK_NS)["spec"]["template"]["spec"]["containers"][0]["resources"]
        ["limits"].get("nvidia.com/gpu") == "2")
    release.stop_operator()
    revisions = json.loads(helm(devcluster, "history", RELEASE, "-n", RELEASE_NS, "-o", "json").stdout)
    assert [r["status"] for r in revisions] == ["superseded", "deployed"]


def test_uninstall_leaves_no_orphans_and_keeps_crds_and_models(devcluster, release):
    helm(devcluster, "uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait", "--timeout=120s")
    kinds = ("deployments,services,configmaps,secrets,serviceaccounts,persistentvolumeclaims,roles,rolebindings,"
             "networkpolicies,poddisruptionbudgets,kopfpeerings.kopf.dev")
    selector = f"app.kubernetes.io/instance={RELEASE},app.kubernetes.io/managed-by=Helm"
    left = devcluster.get_json(kinds, "-A", "-l", selector)["items"]
    left += devcluster.get_json("clusterroles,clusterrolebindings,persistentvolumes,clusterkopfpeerings.kopf.dev,"
                                "validatingadmissionpolicies,validatingadmissionpolicybindings",
                                "-l", selector)["items"]
    # Kept on purpose (helm.sh/resource-policy: keep): the model cache claim the still-running models mount,
    # with the admission policy that guards it, and the dataset claim of the FederatedRounds' client pods.
    for component, guards in (("model-cache", ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]),
                              ("datasets", [])):
        kept = sorted((o["kind"], o["metadata"].get("namespace", "")) for o in left
                      if o["metadata"]["labels"].get("app.kubernetes.io/component") == component)
        assert kept == sorted([("PersistentVolume", ""), ("PersistentVolume", ""),
                               ("PersistentVolumeClaim", EXTRA_NS), ("PersistentVolumeClaim", WORK_NS),
                               *((kind, "") for kind in guards)]), component
    assert [f"{o['kind']}/{o['metadata']['name']}" for o in left if o["metadata"]["labels"].get(
        "app.kubernetes.io/component") not in ("model-cache", "datasets")] == []
    assert not devcluster.get_json("pods", "-n", RELEASE_NS)["items"] or wait_for(
        "the release's pods to go", lambda: not devcluster.get_json("pods", "-n", RELEASE_NS)["items"])
    # Documented retention: Helm never deletes CRDs, so the custom resources and what they run stay.
    for crd in ("inferencemodels.edgeloop.io", "federatedrounds.edgeloop.io", "kopfpeerings.kopf.dev"):
        assert devcluster.kubectl("get", "crd", crd, check=False).returncode == 0, f"{crd} was deleted"
    assert model(devcluster)["metadata"]["name"] == "digits"
    assert devcluster.get_json("daemonsets", "-n", WORK_NS)["items"]
