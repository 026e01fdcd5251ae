"""Two tenants on one cluster (issue 16 item 10): namespaces A and B, each with a user whose RBAC is
namespace-scoped (the built-in `edit` role and edgeloop's custom resources, in their own namespace only), the
chart installed for both, and the operator running under the chart's ServiceAccount.

Proven against the real API server: a tenant can reach neither the other's objects nor the other's node
directories (its pods mount the node model cache with its own namespace's subPath only, the admission policy
the chart installs refusing any other mount of the claim, Pod Security refusing hostPath; its dataset claim is
bound to its own data directory); and nothing a tenant writes makes the operator render anything outside its
namespace or the tenant's own node directories (another namespace's dataset, an image outside the allowlist).
What the pods then see of the nodes' files is proven on real nodes (test_real_nodes.py)."""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import pytest
import yaml
from edgeloop.testing import OperatorProcess

from .conftest import wait_for
from .test_chart import helm, write_kubeconfig

ROOT = Path(__file__).parents[2]
CHART = ROOT / "charts" / "edgeloop"
PID = os.getpid() % 10000
RELEASE, RELEASE_NS = "tenants", f"tenants-system-{PID}"
A, B = f"tenant-a-{PID}", f"tenant-b-{PID}"
USERS = {A: "alice", B: "bob"}
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted",
              "pod-security.kubernetes.io/enforce-version": "latest"}
MODEL = yaml.safe_load((ROOT / "examples" / "inferencemodel-digits.yaml").read_text())
ROUND = yaml.safe_load((ROOT / "examples" / "federatedround-digits.yaml").read_text())
CLAIM = "edgeloop-model-cache"


def tenant_role(namespace: str) -> list[dict]:
    """What a tenant may do: `edit` in its namespace, edgeloop's custom resources and ephemeral containers there."""
    user = USERS[namespace]
    return [
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": "edgeloop-tenant", "namespace": namespace},
         "rules": [{"apiGroups": ["edgeloop.io"], "resources": ["inferencemodels", "federatedrounds"],
                    "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
                   # Debugging its own pods (`edit` leaves ephemeral containers out): the admission policy must
                   # still keep them to the namespace's own cache.
                   {"apiGroups": [""], "resources": ["pods/ephemeralcontainers"], "verbs": ["update", "patch"]}]},
        *({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
           "metadata": {"name": f"{user}-{role}", "namespace": namespace},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role},
           "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]}
          for kind, role in (("ClusterRole", "edit"), ("Role", "edgeloop-tenant"))),
    ]


@pytest.fixture(scope="module")
def operator(devcluster, tmp_path_factory):
    """The chart for both tenants (an image allowlist on), its operator as a process under the chart's
    ServiceAccount, the tenants' namespaces (Pod Security restricted) and their users' RBAC."""
    # An earlier module may still be deleting the CRDs: Helm would skip installing them then.
    wait_for("the edgeloop CRDs of earlier tests to be gone or live", lambda: all(
        not (crd := devcluster.kubectl("get", "crd", name, "-o", "json", check=False)).stdout
        or "deletionTimestamp" not in json.loads(crd.stdout)["metadata"]
        for name in ("inferencemodels.edgeloop.io", "federatedrounds.edgeloop.io")), timeout=120)
    for namespace in (RELEASE_NS, A, B):
        devcluster.kubectl("create", "namespace", namespace)
    for namespace in (A, B):
        devcluster.kubectl("label", "namespace", namespace, *(f"{k}={v}" for k, v in RESTRICTED.items()))
        devcluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(tenant_role(namespace)))
    tmp = tmp_path_factory.mktemp("tenants")
    process = None
    try:
        helm(devcluster, "install", RELEASE, str(CHART), "--namespace", RELEASE_NS, "--wait", "--timeout=120s",
             "--set", f"watchNamespaces={{{A},{B}}}", "--set", "operator.replicas=1", "--set", "store.enabled=false",
             "--set", "config.allowedImages={ghcr.io/edgeloop/*}")
        fullname = f"{RELEASE}-edgeloop"
        token = devcluster.kubectl("create", "token", fullname, "-n", RELEASE_NS, "--duration=1h").stdout.strip()
        config = tmp / "config.yaml"
        config.write_text(devcluster.get_json("configmap", f"{fullname}-config", "-n", RELEASE_NS)["data"]
                          ["config.yaml"])
        args = ("--config", str(config), "--namespace", A, "--namespace", B, "--resync-seconds", "5",
                "--coalesce-seconds", "0.5", "--diagnosis-seconds", "1")
        process = OperatorProcess(write_kubeconfig(devcluster, token, tmp / "operator.kubeconfig"),
                                  tmp / "operator.log", args).start()
        yield process
    finally:
        if process:
            process.stop()
        for namespace in (A, B):
            devcluster.kubectl("delete", "inferencemodels,federatedrounds", "--all", "-n", namespace,
                               "--ignore-not-found", "--wait=true", check=False)
        helm(devcluster, "uninstall", RELEASE, "--namespace", RELEASE_NS, "--wait", "--timeout=60s", check=False)
        devcluster.kubectl("delete", "pvc,pv,validatingadmissionpolicybindings,validatingadmissionpolicies", "-A",
                           "-l", f"app.kubernetes.io/instance={RELEASE}", "--ignore-not-found", "--wait=false",
                           check=False)
        for namespace in (RELEASE_NS, A, B):
            devcluster.kubectl("delete", "namespace", namespace, "--wait=false", "--ignore-not-found", check=False)


def as_tenant(devcluster, namespace: str, *args: str, input: str | None = None):
    return devcluster.kubectl("--as", USERS[namespace], "-n", namespace, *args, input=input, check=False)


def pod(name: str, volumes: list[dict], mounts: list[dict]) -> dict:
    container = {
        "name": "main", "image": "ghcr.io/edgeloop/runtime:0.1.0", "command": ["edgeloop-runtime"],
        "securityContext": {"allowPrivilegeEscalation": False, "runAsNonRoot": True, "runAsUser": 65532,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumeMounts": mounts,
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [container], "volumes": volumes}}


CACHE_VOLUME = [{"name": "cache", "persistentVolumeClaim": {"claimName": CLAIM}}]


def test_a_tenant_reaches_nothing_of_the_other_namespace(devcluster, operator):
    for mine, theirs in ((A, B), (B, A)):
        for verb, resource in (("get", "pods"), ("list", "secrets"), ("get", "persistentvolumeclaims"),
                               ("delete", "persistentvolumeclaims"), ("create", "pods"), ("list", "inferencemodels")):
            assert as_tenant(devcluster, mine, "auth", "can-i", verb, resource).stdout.strip() == "yes"
            other = devcluster.kubectl("--as", USERS[mine], "-n", theirs, "auth", "can-i", verb, resource, check=False)
            assert other.stdout.strip() == "no", f"{USERS[mine]} may {verb} {resource} in {theirs}"
        # Cluster-scoped: the volumes behind the claims, and the admission policy that guards the cache.
        for verb, resource in (("get", "persistentvolumes"), ("delete", "validatingadmissionpolicies")):
            assert as_tenant(devcluster, mine, "auth", "can-i", verb, resource).stdout.strip() == "no"


OWN_ONLY = f"the node model cache (claim {CLAIM}) may be mounted with subPath {A} or {A}.compiled only"


@pytest.mark.parametrize(("case", "mount", "refusal"), [
    ("its own namespace's cache", {"subPath": A}, None),
    ("its own namespace's compiled models", {"subPath": f"{A}.compiled"}, None),
    ("the whole cache", {}, OWN_ONLY),
    ("the other namespace's cache", {"subPath": B}, OWN_ONLY),
    ("a directory in its own cache (it could be a symlink it wrote)", {"subPath": f"{A}/sha256"}, OWN_ONLY),
    ("a subPathExpr", {"subPathExpr": "$(POD_NAMESPACE)"}, OWN_ONLY),
    ("a path out of its own", {"subPath": f"{A}/../{B}"}, "must not contain '..'"),
])
def test_a_tenants_pod_mounts_the_node_cache_with_its_own_namespaces_sub_path_only(devcluster, operator, case,
                                                                                    mount, refusal):
    body = pod("probe", CACHE_VOLUME, [{"name": "cache", "mountPath": "/cache", "readOnly": True, **mount}])
    result = as_tenant(devcluster, A, "apply", "--dry-run=server", "-f", "-", input=json.dumps(body))
    if refusal is None:
        assert result.returncode == 0, f"{case}: {result.stderr}"
    else:
        assert result.returncode != 0 and refusal in result.stderr, f"{case}: {result.stderr}"


def test_neither_an_ephemeral_container_nor_a_host_path_reaches_the_node_cache(devcluster, operator):
    body = pod("holder", CACHE_VOLUME, [{"name": "cache", "mountPath": "/cache", "subPath": A, "readOnly": True}])
    assert as_tenant(devcluster, A, "apply", "-f", "-", input=json.dumps(body)).returncode == 0
    live = json.loads(as_tenant(devcluster, A, "get", "pod", "holder", "-o", "json").stdout)
    debug = copy.deepcopy(body["spec"]["containers"][0])
    debug.update(name="debugger", volumeMounts=[{"name": "cache", "mountPath": "/cache"}])
    live["spec"]["ephemeralContainers"] = [debug]
    result = as_tenant(devcluster, A, "replace", "--subresource", "ephemeralcontainers", "-f", "-",
                       input=json.dumps(live))
    assert result.returncode != 0 and f"may be mounted with subPath {A} or" in result.stderr, result.stderr

    host = pod("host", [{"name": "cache", "hostPath": {"path": "/var/lib/edgeloop/models"}}],
               [{"name": "cache", "mountPath": "/cache"}])
    result = as_tenant(devcluster, A, "apply", "--dry-run=server", "-f", "-", input=json.dumps(host))
    assert result.returncode != 0 and 'violates PodSecurity "restricted:latest"' in result.stderr, result.stderr


def test_each_tenants_dataset_claim_is_bound_to_its_own_data_directory(devcluster, operator):
    for namespace in (A, B):
        claim = devcluster.get_json("pvc", "edgeloop-datasets", "-n", namespace)
        volume = devcluster.get_json("pv", claim["spec"]["volumeName"])
        assert volume["spec"]["hostPath"]["path"] == f"/var/lib/edgeloop/data/{namespace}"
        assert volume["spec"]["claimRef"]["namespace"] == namespace
        assert claim["status"]["phase"] == "Bound"


def conditions(body: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in body.get("status", {}).get("conditions", [])}


def test_nothing_a_tenant_writes_makes_the_operator_render_outside_its_namespace(devcluster, operator):
    # The same model in both namespaces: each namespace's objects, mounting its own cache.
    for namespace in (A, B):
        result = as_tenant(devcluster, namespace, "apply", "-f", "-", input=yaml.safe_dump(MODEL))
        assert result.returncode == 0, result.stderr

    def rendered(namespace):
        daemon_sets = devcluster.get_json("daemonsets", "-n", namespace)["items"]
        return len(daemon_sets) == 3 and daemon_sets

    for namespace in (A, B):
        for ds in wait_for(f"the DaemonSets in {namespace}", lambda ns=namespace: rendered(ns)):
            pod_spec = ds["spec"]["template"]["spec"]
            subpaths = {m.get("subPath") for c in [*pod_spec["initContainers"], *pod_spec["containers"]]
                        for m in c["volumeMounts"] if m["name"] == "model-cache"}
            assert subpaths == {namespace, f"{namespace}.compiled"}, subpaths
            assert {v["name"]: v for v in pod_spec["volumes"]}["model-cache"]["persistentVolumeClaim"] == {
                "claimName": CLAIM}

    # B asks for A's dataset, and for an image outside the operator's allowlist: refused, nothing created.
    stolen = copy.deepcopy(ROUND)
    stolen["metadata"]["name"] = "stolen-data"
    stolen["spec"]["dataset"] = {"hostPath": f"/var/lib/edgeloop/data/{A}/digits"}
    foreign = copy.deepcopy(MODEL)
    foreign["metadata"]["name"] = "foreign-image"
    foreign["spec"]["runtime"]["image"] = "docker.io/someone/miner:latest"
    for body in (stolen, foreign):
        result = as_tenant(devcluster, B, "apply", "-f", "-", input=yaml.safe_dump(body))
        assert result.returncode == 0, result.stderr

    def outcome(kind, name, condition):
        body = devcluster.get_json(kind, name, "-n", B)
        return conditions(body).get(condition)

    assert wait_for("the round to fail", lambda: outcome("federatedround", "stolen-data", "Succeeded") == (
        "False", "DatasetOutsideRoot"))
    message = next(c["message"] for c in devcluster.get_json("federatedround", "stolen-data", "-n", B)["status"]
                   ["conditions"] if c["type"] == "Succeeded")
    assert f"is not under /var/lib/edgeloop/data/{B}/" in message
    assert wait_for("the model to be refused", lambda: outcome("inferencemodel", "foreign-image", "Degraded") == (
        "True", "ImageNotAllowed"))
    time.sleep(2)  # a few syncs more: still nothing
    assert devcluster.get_json("jobs", "-n", B)["items"] == []
    assert not [d for d in devcluster.get_json("daemonsets", "-n", B)["items"]
                if d["metadata"]["labels"]["edgeloop.io/inferencemodel"] == "foreign-image"]

    # Everything the operator made lives in the namespace of the resource that owns it.
    owners = {}
    for namespace in (A, B):
        for kind in ("inferencemodels", "federatedrounds"):
            for item in devcluster.get_json(kind, "-n", namespace)["items"]:
                owners[item["metadata"]["uid"]] = namespace
    made = devcluster.get_json("daemonsets,services,jobs,secrets", "-A", "-l",
                               "app.kubernetes.io/managed-by=edgeloop")["items"]
    assert made
    for obj in made:
        namespace = obj["metadata"]["namespace"]
        assert namespace in (A, B), f"{obj['kind']} {obj['metadata']['name']} in {namespace}"
        for reference in obj["metadata"].get("ownerReferences", []):
            assert owners[reference["uid"]] == namespace
    assert not operator.errors()
