"""The Kubernetes permissions the operator uses: exactly the calls it makes, and nothing else.

The e2e tests and the scale benchmark run the operator under a ServiceAccount bound to these rules, so a
missing rule fails there. `python -m edgeloop.rbac` prints them as a ClusterRole and its binding.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from edgeloop.api import GROUP

RULES: list[dict[str, Any]] = [
    # Kopf watches InferenceModels and keeps its last-handled state in annotations (patch); the
    # operator reads one before writing on behalf of a possibly stale cache (get) and writes status.
    {"apiGroups": [GROUP], "resources": ["inferencemodels"], "verbs": ["get", "list", "watch", "patch"]},
    {"apiGroups": [GROUP], "resources": ["inferencemodels/status"], "verbs": ["patch"]},
    # Owner references with blockOwnerDeletion, where OwnerReferencesPermissionEnforcement is enabled.
    {"apiGroups": [GROUP], "resources": ["inferencemodels/finalizers"], "verbs": ["update"]},
    # Server-side apply creates (create) or updates (patch) what the operator renders.
    {"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["list", "watch", "create", "patch", "delete"]},
    {"apiGroups": [""], "resources": ["services"], "verbs": ["list", "watch", "create", "patch"]},
    # FederatedRounds as InferenceModels (Kopf's annotations, status, owner references); promotion
    # patches an InferenceModel (get, patch above). Their Jobs are applied too, and read once before a
    # round starts, in case the watch has not shown them yet.
    {"apiGroups": [GROUP], "resources": ["federatedrounds"], "verbs": ["list", "watch", "patch"]},
    {"apiGroups": [GROUP], "resources": ["federatedrounds/status"], "verbs": ["patch"]},
    {"apiGroups": [GROUP], "resources": ["federatedrounds/finalizers"], "verbs": ["update"]},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch", "create", "patch"]},
    # A finished aggregator's final report is the last line of its log; what a runtime really runs on is
    # asked of it through the API server's pod proxy (GET /v2/models/<name>).
    {"apiGroups": [""], "resources": ["pods/log", "pods/proxy"], "verbs": ["get"]},
    # Status: pods of variants with unready nodes, nodes for readiness and placement, the DaemonSet
    # controller's FailedCreate events; Kopf posts the operator's own events. Rollouts: the operator deletes
    # the old pods of its OnDelete DaemonSets, wave by wave. It watches the pods of FederatedRounds (stuck
    # ones are reported within seconds) and reads the kubelet's FailedMount events of those that wait.
    {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch", "delete"]},
    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["list", "watch"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["list", "create"]},
    # Kopf's cluster observation: served namespaces (namespaced mode) and CRDs appearing at run time.
    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    {"apiGroups": ["apiextensions.k8s.io"], "resources": ["customresourcedefinitions"], "verbs": ["list", "watch"]},
]

# With --peering (the Helm chart's replicas): Kopf watches its peering object and patches its own entry in
# it; a ClusterKopfPeering when watching every namespace, a KopfPeering in each watched namespace otherwise.
PEERING_RULES: list[dict[str, Any]] = [
    {
        "apiGroups": ["kopf.dev"],
        "resources": ["clusterkopfpeerings", "kopfpeerings"],
        "verbs": ["list", "watch", "patch"],
    },
]


# Secrets, by TLS mode. The operator reads and writes only the Secrets it labels edgeloop.io/tls (its watch
# is label-selected, so an unchanged certificate costs no call; a Secret is read live only before replacing
# it), but RBAC cannot restrict list, watch or get by label, and names (<model>-tls) are not known in
# advance: within its scope (every namespace, or the watched ones) it may read every Secret. It never
# deletes or updates one.
_SECRETS_READ = ["get", "list", "watch"]
TLS_RULES: dict[str, list[dict[str, Any]]] = {
    # Its own CA per namespace and the certificates it signs: read, and applied server-side.
    "operator": [{"apiGroups": [""], "resources": ["secrets"], "verbs": [*_SECRETS_READ, "create", "patch"]}],
    # cert-manager writes the Secrets from the Certificates the operator applies; the operator only reads them
    # (the revision that rolls pods, the client certificate of its status polls).
    "cert-manager": [
        {"apiGroups": [""], "resources": ["secrets"], "verbs": _SECRETS_READ},
        {"apiGroups": ["cert-manager.io"], "resources": ["certificates"], "verbs": ["create", "patch"]},
    ],
    # No certificates: no Secret at all (the pods mount the store token; the operator never reads it).
    "disabled": [],
}


def rules(tls_mode: str = "operator") -> list[dict[str, Any]]:
    """What the operator calls in a TLS mode."""
    return [*RULES, *TLS_RULES[tls_mode]]


def manifests(name: str, service_account: str, namespace: str, tls_mode: str = "operator") -> list[dict[str, Any]]:
    """A ServiceAccount, a ClusterRole with the rules of `tls_mode`, and the binding between them."""
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": service_account, "namespace": namespace}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": rules(tls_mode),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
        },
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgeloop.rbac", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="edgeloop-operator")
    parser.add_argument("--service-account", default="edgeloop-operator")
    parser.add_argument("--namespace", default="edgeloop-system")
    parser.add_argument("--tls-mode", choices=sorted(TLS_RULES), default="operator")
    args = parser.parse_args(argv)
    documents = manifests(args.name, args.service_account, args.namespace, args.tls_mode)
    print(yaml.safe_dump_all(documents, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
