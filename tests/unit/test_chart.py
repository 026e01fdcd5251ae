"""The Helm chart, rendered with the pinned helm (`helm template`, no cluster): generated parts up to date,
values validated, RBAC exactly the operator's, and the objects wired to what the operator renders."""

from __future__ import annotations

import argparse
import base64
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from edgeloop import certs, chartgen, config, operator_main, rbac
from edgeloop.api.common import ModelSource
from edgeloop.api.federatedround import FederatedRoundSpec
from edgeloop.api.inferencemodel import InferenceModelSpec
from edgeloop.render import federatedround
from edgeloop.render.inferencemodel import owner_of, render

from devcluster import build

ROOT = Path(__file__).parents[2]
CHART = ROOT / "charts" / "edgeloop"
HELM = build.bin_dir() / "helm"

needs_helm = pytest.mark.skipif(not HELM.exists(), reason="the pinned helm is not built (make devcluster-build)")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{result.stderr}")
    return result


def template(*sets: str, namespace: str = "edgeloop-system") -> list[dict]:
    args = ["template", "edgeloop", str(CHART), "--namespace", namespace]
    for value in sets:
        args += ["--set", value]
    return [doc for doc in yaml.safe_load_all(helm(*args).stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: list[dict], kind: str, name: str) -> dict:
    [doc] = [doc for doc in by_kind(docs, kind) if doc["metadata"]["name"] == name]
    return doc


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def rule_set(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


# ---- generated parts


def test_generated_chart_files_are_up_to_date():
    for name, text in chartgen.render_all(config.build()).items():
        assert (CHART / name).read_text() == text, f"charts/edgeloop/{name} is stale: run `make crds`"


def test_chart_crds_are_the_repository_crds_with_argocd_annotations():
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        chart_crd = yaml.safe_load((CHART / "crds" / path.name).read_text())
        assert chart_crd["metadata"].pop("annotations") == {
            "argocd.argoproj.io/sync-wave": "-1", "argocd.argoproj.io/sync-options": "Delete=false"}
        assert chart_crd == yaml.safe_load(path.read_text()), f"charts/edgeloop/crds/{path.name} differs from crds/"
    peering = {p.name for p in (CHART / "crds").glob("kopf.dev_*.yaml")}
    assert peering == {"kopf.dev_clusterkopfpeerings.yaml", "kopf.dev_kopfpeerings.yaml"}


def test_check_mode_reports_stale_chart_files(tmp_path):
    assert chartgen.main(["--chart-dir", str(tmp_path), "--check"]) == 1
    assert chartgen.main(["--chart-dir", str(tmp_path)]) == 0
    assert chartgen.main(["--chart-dir", str(tmp_path), "--check"]) == 0


def test_accelerator_class_defaults_in_values_are_the_operators_built_in_ones():
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def without_images(classes):
        return {name: {k: v for k, v in cls.items() if k != "image"} for name, cls in classes.items()}

    assert without_images(values["config"]["acceleratorClasses"]) == without_images(
        config.BUILT_IN["acceleratorClasses"]
    ), "the images are filled in by the chart at its appVersion: test_the_chart_defaults_are_the_built_in_classes"
    # The helper that turns a class removed from the values into an explicit null knows the same names.
    names = " ".join(f'"{name}"' for name in config.BUILT_IN["acceleratorClasses"])
    assert f"range list {names}" in (CHART / "templates" / "_helpers.tpl").read_text()


# ---- values


@needs_helm
def test_lint_passes():
    helm("lint", "--strict", str(CHART))


BAD_VALUES = [
    ("unknown top-level key", "replicas=3", "additional properties 'replicas' not allowed"),
    ("negative replicas", "operator.replicas=-1", "/operator/replicas"),
    ("store persistence mode", "store.persistence.mode=nfs", "value must be one of 'storageClass', 'hostPath'"),
    ("relative cache dir", "config.modelCacheDir=var/cache", "/config/modelCacheDir"),
    ("relative data root", "config.datasetRoot=data", "/config/datasetRoot"),
    ("dataset claim name", "datasets.claimName=Data_Set", "/datasets/claimName"),
    ("namespace name", "watchNamespaces={Edge_A}", "/watchNamespaces/0"),
    ("class without providers", "config.acceleratorClasses.hailo.resource=hailo.ai/npu",
     "missing properties 'matchAnyLabel', 'executionProviders'"),
    ("provider name", "config.acceleratorClasses.gpu.executionProviders={CUDA}", "does not match pattern"),
    ("provider list not ending on CPU", "config.acceleratorClasses.gpu.executionProviders={CUDAExecutionProvider}",
     "must end with CPUExecutionProvider"),
    ("architecture", "config.acceleratorClasses.gpu.architectures={ARM64}", "/config/acceleratorClasses/gpu"),
    ("log format", "operator.logFormat=xml", "/operator/logFormat"),
    ("resource quantity", "operator.resources.limits.memory=lots", "/operator/resources/limits/memory"),
    ("image digest", "operator.image.digest=latest", "/operator/image/digest"),
    ("tls mode", "tls.mode=manual", "/tls/mode"),
    ("cert-manager without an issuer", "tls.mode=cert-manager", "/tls/issuer/name"),
]


@needs_helm
@pytest.mark.parametrize(("case", "value", "message"), BAD_VALUES, ids=[case for case, _, _ in BAD_VALUES])
def test_bad_values_are_rejected(case, value, message):
    # values.schema.json fails both; the template's own checks (`fail`) are only warnings to `helm lint`.
    schema = "must end with" not in message
    for command in ("template", "lint") if schema else ("template",):
        args = [command, *(["edgeloop"] if command == "template" else []), str(CHART), "--set", value]
        result = helm(*args, check=False)
        assert result.returncode != 0, f"{case}: helm {command} accepted {value}"
        assert message in result.stdout + result.stderr, result.stdout + result.stderr


# ---- the operator


@needs_helm
def test_operator_deployment_defaults():
    docs = template()
    deployment = one(docs, "Deployment", "edgeloop-operator")
    spec = deployment["spec"]["template"]["spec"]
    [container] = spec["containers"]
    assert deployment["spec"]["replicas"] == 2
    assert container["image"] == "ghcr.io/edgeloop/operator:0.1.0"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {"name": "health", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    assert by_kind(docs, "PodDisruptionBudget")
    assert one(docs, "ClusterKopfPeering", "edgeloop")


def operator_args(container: dict, monkeypatch) -> argparse.Namespace:
    """The operator's own parser, fed the Deployment's environment: every variable is a real flag."""
    for name, value in env_of(container).items():
        if name.startswith("EDGELOOP_"):
            monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    operator_main.add_arguments(parser)
    return parser.parse_args(container["args"][1:])


@needs_helm
def test_the_environment_sets_the_operators_flags(monkeypatch):
    docs = template("watchNamespaces={edge-a,edge-b}", "operator.resyncSeconds=30")
    [container] = one(docs, "Deployment", "edgeloop-operator")["spec"]["template"]["spec"]["containers"]
    known = {"EDGELOOP_" + action.dest.upper() for action in _actions()}
    assert {name for name in env_of(container) if name.startswith("EDGELOOP_")} <= known | {"EDGELOOP_NAMESPACES"}
    args = operator_args(container, monkeypatch)
    assert args.namespace == ["edge-a", "edge-b"] and args.peering == "edgeloop" and args.resync_seconds == 30
    assert args.config == "/etc/edgeloop/config.yaml" and args.liveness == "http://0.0.0.0:8080/healthz"


def _actions():
    parser = argparse.ArgumentParser()
    operator_main.add_arguments(parser)
    return parser._actions


@needs_helm
def test_one_replica_runs_without_peering(monkeypatch):
    docs = template("operator.replicas=1")
    [container] = one(docs, "Deployment", "edgeloop-operator")["spec"]["template"]["spec"]["containers"]
    assert operator_args(container, monkeypatch).peering is None
    assert not by_kind(docs, "ClusterKopfPeering") and not by_kind(docs, "PodDisruptionBudget")


@needs_helm
def test_the_config_map_is_a_valid_operator_configuration(tmp_path):
    docs = template("config.acceleratorClasses.gpu.resourceCount=2", "config.acceleratorClasses.npu=null")
    path = tmp_path / "config.yaml"
    path.write_text(one(docs, "ConfigMap", "edgeloop-config")["data"]["config.yaml"])
    loaded = config.load(path)
    assert list(loaded.accelerator_classes) == ["gpu", "cpu"]
    assert loaded.accelerator_classes["gpu"].resource_count == 2
    assert loaded.runtime_image == "ghcr.io/edgeloop/runtime:0.1.0"
    assert loaded.federated_image == "ghcr.io/edgeloop/runtime-federated:0.1.0"
    assert loaded.model_cache_claim == "edgeloop-model-cache"
    assert (loaded.dataset_claim, loaded.dataset_root) == ("edgeloop-datasets", "/var/lib/edgeloop/data")


@needs_helm
def test_the_chart_defaults_are_the_built_in_ones_with_the_flavours_images(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(one(template(), "ConfigMap", "edgeloop-config")["data"]["config.yaml"])
    loaded, built_in = config.load(path), config.build()
    assert loaded.accelerator_classes == built_in.accelerator_classes
    assert (loaded.runtime_resources, loaded.fetch_resources) == (built_in.runtime_resources, built_in.fetch_resources)
    images = {name: cls.image for name, cls in config.build().accelerator_classes.items()}
    assert images == {
        "npu": "ghcr.io/edgeloop/runtime-openvino:0.1.0", "gpu": "ghcr.io/edgeloop/runtime-cuda:0.1.0", "cpu": ""
    }, "an empty image is runtimeImage's"
    allowlist = one(template("config.allowedImages={ghcr.io/edgeloop/*}"), "ConfigMap", "edgeloop-config")
    path.write_text(allowlist["data"]["config.yaml"])
    assert config.load(path).allowed_images == ["ghcr.io/edgeloop/*"], "the chart's own images are allowed"
    mirrored = one(template("config.acceleratorClasses.gpu.image=registry.example/runtime-cuda:1"), "ConfigMap",
                   "edgeloop-config")["data"]["config.yaml"]
    assert yaml.safe_load(mirrored)["acceleratorClasses"]["gpu"]["image"] == "registry.example/runtime-cuda:1"


# ---- RBAC: exactly edgeloop.rbac


@needs_helm
def test_cluster_wide_rbac_is_the_operators_rules():
    docs = template()
    [role] = by_kind(docs, "ClusterRole")
    assert not by_kind(docs, "Role")
    expected = rule_set(rbac.rules("operator")) | {
        ("kopf.dev", "clusterkopfpeerings", v) for v in ("list", "watch", "patch")}
    assert rule_set(role["rules"]) == expected
    assert not any("*" in item for rule in role["rules"] for key in rule for item in rule[key])
    [binding] = by_kind(docs, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "edgeloop", "namespace": "edgeloop-system"}]


@needs_helm
def test_watching_namespaces_grants_namespaced_rules_only_there():
    docs = template("watchNamespaces={edge-a,edge-b}")
    [cluster_role] = by_kind(docs, "ClusterRole")
    split = chartgen.split_by_scope(rbac.rules("operator"))
    assert rule_set(cluster_role["rules"]) == rule_set(split["cluster"])
    roles = by_kind(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["edge-a", "edge-b"]
    for role in roles:
        assert rule_set(role["rules"]) == rule_set(split["namespaced"]) | {
            ("kopf.dev", "kopfpeerings", v) for v in ("list", "watch", "patch")}
    assert sorted(b["metadata"]["namespace"] for b in by_kind(docs, "RoleBinding")) == ["edge-a", "edge-b"]
    assert sorted(p["metadata"]["namespace"] for p in by_kind(docs, "KopfPeering")) == ["edge-a", "edge-b"]
    assert not by_kind(docs, "ClusterKopfPeering")


@needs_helm
@pytest.mark.parametrize("watch", [[], ["watchNamespaces={edge-a}"]], ids=["cluster-wide", "namespaced"])
def test_secrets_are_granted_as_far_as_the_tls_mode_needs_and_cert_manager_mode_configures_the_issuer(tmp_path,
                                                                                                       watch):
    secrets = {verb for (group, resource, verb) in rule_set(rbac.rules("operator")) if resource == "secrets"}
    assert secrets == {"get", "list", "watch", "create", "patch"}, "never update, delete or deletecollection"
    for mode, secret_verbs, certificates in (
        ("operator", {"get", "list", "watch", "create", "patch"}, False),
        ("cert-manager", {"get", "list", "watch"}, True),  # cert-manager writes them
        ("disabled", set(), False),  # no Secret at all
    ):
        docs = template(f"tls.mode={mode}", "tls.issuer.name=edge-ca", "tls.issuer.kind=ClusterIssuer", *watch)
        roles = by_kind(docs, "Role") or by_kind(docs, "ClusterRole")
        for role in roles:
            granted = rule_set(role["rules"])
            assert {verb for (_, resource, verb) in granted if resource == "secrets"} == secret_verbs, mode
            assert any(resource == "certificates" for (_, resource, _) in granted) == certificates, mode
        assert not any(r == "secrets" for role in by_kind(docs, "ClusterRole") if watch
                       for (_, r, _) in rule_set(role["rules"])), "namespaced: no Secret outside the watched ones"
        path = tmp_path / f"{mode}.yaml"
        path.write_text(one(docs, "ConfigMap", "edgeloop-config")["data"]["config.yaml"])
        tls = config.load(path).tls
        assert tls.mode == mode
        assert (tls.issuer is not None) == certificates, "the issuer is passed on only where it is used"
        if certificates:
            assert (tls.issuer.name, tls.issuer.kind) == ("edge-ca", "ClusterIssuer")


# ---- what the chart provides for the pods the operator renders

EXAMPLE = yaml.safe_load((ROOT / "examples" / "inferencemodel-digits.yaml").read_text())
FR_EXAMPLE = ROOT / "examples" / "federatedround-digits.yaml"


def rendered_daemon_set(operator_config: config.OperatorConfig) -> dict:
    spec = InferenceModelSpec.model_validate(EXAMPLE["spec"])
    manifests = render(owner_of("digits", "edge-a", "uid-1"), spec, operator_config)
    return next(iter(manifests.daemon_sets.values()))


@needs_helm
def test_runtime_network_policy_selects_the_rendered_pods_and_their_named_ports():
    docs = template("watchNamespaces={edge-a}")
    policy = one(docs, "NetworkPolicy", "edgeloop-runtime")
    assert policy["metadata"]["namespace"] == "edge-a"
    pod = rendered_daemon_set(config.build())["spec"]["template"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    [rule] = policy["spec"]["ingress"]
    assert "from" not in rule, "inference is open to every client by default"
    container_ports = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    assert {p["port"] for p in rule["ports"]} == container_ports == {"http", "grpc"}


def federated_pods(operator_config: config.OperatorConfig) -> dict[str, dict]:
    """The aggregator's and a client's pod templates, as the operator renders a FederatedRound."""
    spec = FederatedRoundSpec.model_validate(yaml.safe_load(FR_EXAMPLE.read_text())["spec"])
    owner = federatedround.owner_of("round", "edge-a", "uid-2")
    model = ModelSource(uri="http://store/sha256/" + "a" * 64, sha256="a" * 64, version="1")
    start = federatedround.Start(("edge-cpu-0",), model, "a" * 64)
    return {
        "aggregator": federatedround.aggregator_job(owner, spec, operator_config, start)["spec"]["template"],
        "client": federatedround.client_job(owner, spec, operator_config, 0, "edge-cpu-0")["spec"]["template"],
    }


def selects(peer_or_policy: dict, labels: dict[str, str]) -> bool:
    return peer_or_policy["podSelector"]["matchLabels"].items() <= labels.items()


@needs_helm
def test_store_network_policy_admits_runtime_pods_and_aggregators_only():
    docs = template()
    policy = one(docs, "NetworkPolicy", "edgeloop-store")
    [rule] = policy["spec"]["ingress"]
    assert all(peer["namespaceSelector"] == {} for peer in rule["from"])
    runtime = rendered_daemon_set(config.build())["spec"]["template"]["metadata"]["labels"]
    pods = federated_pods(config.build())
    assert [selects(peer, runtime) for peer in rule["from"]] == [True, False]
    assert [selects(peer, pods["aggregator"]["metadata"]["labels"]) for peer in rule["from"]] == [False, True]
    assert not any(selects(peer, pods["client"]["metadata"]["labels"]) for peer in rule["from"])
    operator_policy = one(docs, "NetworkPolicy", "edgeloop-operator")
    assert operator_policy["spec"]["policyTypes"] == ["Ingress"]
    assert operator_policy["spec"]["ingress"] == [{"ports": [{"port": "metrics", "protocol": "TCP"}]}], "metrics only"
    without_metrics = one(template("monitoring.metricsPort=0"), "NetworkPolicy", "edgeloop-operator")
    assert "ingress" not in without_metrics["spec"]


@needs_helm
def test_aggregator_network_policy_admits_its_clients_and_the_operator():
    docs = template("watchNamespaces={edge-a}")
    policy = one(docs, "NetworkPolicy", "edgeloop-aggregator")
    pods = federated_pods(config.build())
    assert selects(policy["spec"], pods["aggregator"]["metadata"]["labels"])
    assert not selects(policy["spec"], pods["client"]["metadata"]["labels"])
    rule, scrape = policy["spec"]["ingress"]
    clients, operator = rule["from"]
    assert selects(clients, pods["client"]["metadata"]["labels"]) and "namespaceSelector" not in clients
    operator_pod = one(docs, "Deployment", "edgeloop-operator")["spec"]["template"]["metadata"]["labels"]
    assert selects(operator, operator_pod)
    assert operator["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "edgeloop-system"}
    aggregator_ports = {p["name"] for p in pods["aggregator"]["spec"]["containers"][0]["ports"]}
    assert {p["port"] for p in rule["ports"]} | {p["port"] for p in scrape["ports"]} == aggregator_ports
    assert scrape == {"ports": [{"port": "metrics", "protocol": "TCP"}]}, "Prometheus reads the metrics port only"


@needs_helm
def test_federated_rounds_find_the_store_and_its_token(tmp_path):
    docs = template("watchNamespaces={edge-a}")
    path = tmp_path / "config.yaml"
    path.write_text(one(docs, "ConfigMap", "edgeloop-config")["data"]["config.yaml"])
    loaded = config.load(path)
    assert loaded.store_url == "https://edgeloop-store.edgeloop-system.svc:8000"
    secrets = {s["metadata"]["namespace"]: s for s in by_kind(docs, "Secret") if s["type"] == "Opaque"}
    assert sorted(secrets) == ["edge-a", "edgeloop-system"]
    assert {s["metadata"]["name"] for s in secrets.values()} == {loaded.store_token_secret}
    assert secrets["edge-a"]["data"] == secrets["edgeloop-system"]["data"], "one token, in every namespace"
    volumes = federated_pods(loaded)["aggregator"]["spec"]["volumes"]
    assert loaded.store_token_secret in [v.get("secret", {}).get("secretName") for v in volumes]


@needs_helm
def test_model_cache_claim_is_what_the_rendered_pods_mount_with_the_namespaces_sub_path_alone(tmp_path):
    docs = template("watchNamespaces={edge-a,edge-b}")
    [claim] = [c for c in by_kind(docs, "PersistentVolumeClaim")
               if (c["metadata"]["namespace"], c["metadata"]["name"]) == ("edge-a", "edgeloop-model-cache")]
    volume = one(docs, "PersistentVolume", "edgeloop-model-cache-edge-a")
    assert claim["metadata"]["namespace"] == "edge-a" and claim["spec"]["volumeName"] == "edgeloop-model-cache-edge-a"
    assert volume["spec"]["claimRef"] == {"namespace": "edge-a", "name": "edgeloop-model-cache"}
    assert volume["spec"]["hostPath"]["path"] == "/var/lib/edgeloop/models"
    assert "nodeAffinity" not in volume["spec"], "each pod must get its own node's directory"

    path = tmp_path / "config.yaml"
    path.write_text(one(docs, "ConfigMap", "edgeloop-config")["data"]["config.yaml"])
    pod = rendered_daemon_set(config.load(path))["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["model-cache"] == {"name": "model-cache",
                                      "persistentVolumeClaim": {"claimName": "edgeloop-model-cache"}}
    assert not any("hostPath" in v for v in volumes.values())

    # The claim reaches the whole cache of the node (the kubelet creates a namespace's directory, writable,
    # only as a subPath of it): an admission policy lets a pod mount it with its own namespace's subPath only.
    policy = one(docs, "ValidatingAdmissionPolicy", "edgeloop-node-cache")
    binding = one(docs, "ValidatingAdmissionPolicyBinding", "edgeloop-node-cache")
    assert binding["spec"]["policyName"] == "edgeloop-node-cache" and binding["spec"]["validationActions"] == ["Deny"]
    [selector] = binding["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"]
    assert selector == {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["edge-a", "edge-b"]}
    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    assert {r for rule in rules for r in rule["resources"]} == {"pods", "pods/ephemeralcontainers"}
    assert "'edgeloop-model-cache'" in policy["spec"]["variables"][0]["expression"]


@needs_helm
def test_dataset_claim_reaches_the_namespaces_data_directory_alone(tmp_path):
    docs = template("watchNamespaces={edge-a}", "config.datasetRoot=/srv/edge")
    claim = one(docs, "PersistentVolumeClaim", "edgeloop-datasets")
    volume = one(docs, "PersistentVolume", "edgeloop-datasets-edge-a")
    assert claim["metadata"]["namespace"] == "edge-a" and claim["spec"]["volumeName"] == "edgeloop-datasets-edge-a"
    assert claim["spec"]["accessModes"] == volume["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert volume["spec"]["claimRef"] == {"namespace": "edge-a", "name": "edgeloop-datasets"}
    assert volume["spec"]["hostPath"] == {"path": "/srv/edge/edge-a", "type": "Directory"}, "this namespace's data"
    assert volume["spec"]["persistentVolumeReclaimPolicy"] == "Retain", "the nodes' data is never deleted"
    assert "nodeAffinity" not in volume["spec"], "each pod must get its own node's directory"
    for kept in (claim, volume):
        assert kept["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert kept["metadata"]["labels"]["app.kubernetes.io/component"] == "datasets"

    path = tmp_path / "config.yaml"
    path.write_text(one(docs, "ConfigMap", "edgeloop-config")["data"]["config.yaml"])
    loaded = config.load(path)
    assert loaded.dataset_root == "/srv/edge"
    client = federated_pods(loaded)["client"]["spec"]
    assert {v["name"]: v for v in client["volumes"]}["data"] == {
        "name": "data", "persistentVolumeClaim": {"claimName": "edgeloop-datasets", "readOnly": True}}
    assert {m["name"]: m for m in client["containers"][0]["volumeMounts"]}["data"]["subPath"] == "digits"
    assert not any("hostPath" in v for v in client["volumes"])


@needs_helm
def test_without_the_dataset_volume_the_client_pods_mount_the_host_path(tmp_path):
    docs = template("watchNamespaces={edge-a}", "datasets.persistentVolume=false")
    assert not [d for d in docs if "datasets" in d["metadata"]["name"]]
    path = tmp_path / "config.yaml"
    path.write_text(one(docs, "ConfigMap", "edgeloop-config")["data"]["config.yaml"])
    loaded = config.load(path)
    assert loaded.dataset_claim is None
    volumes = {v["name"]: v for v in federated_pods(loaded)["client"]["spec"]["volumes"]}
    assert volumes["data"]["hostPath"]["path"] == "/var/lib/edgeloop/data/edge-a/digits"


# ---- the store


@needs_helm
def test_store_uses_a_storage_class_by_default():
    docs = template("store.persistence.storageClassName=local-path")
    claim = one(docs, "PersistentVolumeClaim", "edgeloop-store")
    assert claim["spec"]["storageClassName"] == "local-path" and "volumeName" not in claim["spec"]
    assert not [v for v in by_kind(docs, "PersistentVolume") if "store" in v["metadata"]["name"]]
    deployment = one(docs, "Deployment", "edgeloop-store")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert container["args"][:2] == ["store", "--root"] and "--token-file" in container["args"]
    assert one(docs, "Service", "edgeloop-store")["spec"]["ports"][0]["port"] == 8000
    assert one(docs, "Secret", "edgeloop-store-token")["data"]["token"]


@needs_helm
def test_store_host_path_mode_binds_its_own_volume():
    docs = template("store.persistence.mode=hostPath", "store.persistence.hostPath.node=edge-cpu-0")
    claim = one(docs, "PersistentVolumeClaim", "edgeloop-store")
    volume = one(docs, "PersistentVolume", claim["spec"]["volumeName"])
    assert claim["spec"]["storageClassName"] == "" == volume["spec"]["storageClassName"]
    assert volume["spec"]["claimRef"] == {"namespace": "edgeloop-system", "name": "edgeloop-store"}
    [term] = volume["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert term["matchExpressions"][0]["values"] == ["edge-cpu-0"]


@needs_helm
def test_an_existing_token_secret_replaces_the_generated_one():
    docs = template("store.token.existingSecret=my-token", "store.tls.enabled=false")
    assert not by_kind(docs, "Secret")
    assert "storeTokenSecret: my-token" in one(docs, "ConfigMap", "edgeloop-config")["data"]["config.yaml"]
    volumes = one(docs, "Deployment", "edgeloop-store")["spec"]["template"]["spec"]["volumes"]
    secrets = [v["secret"] for v in volumes if "secret" in v]
    assert secrets == [{"secretName": "my-token", "items": [{"key": "token", "path": "token"}]}]


@needs_helm
def test_the_store_serves_https_with_a_certificate_for_its_names_and_workloads_trust_its_ca(tmp_path):
    """The upload token and the models cross the network encrypted (issue 16 item 13)."""
    docs = template("watchNamespaces={edge-a,edge-b}")
    tls = one(docs, "Secret", "edgeloop-store-tls")
    files = {key: base64.b64decode(value).decode() for key, value in tls["data"].items()}
    cert, ca = certs.load_cert(files["tls.crt"]), certs.load_cert(files["ca.crt"])
    assert certs.signed_by(cert, ca)
    assert not certs.needs_rotation(files["tls.crt"], files["ca.crt"], datetime.now(UTC),
                                    certs.service_dns_names("edgeloop-store", "edgeloop-system"))
    cas = [c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"] == "edgeloop-store-ca"]
    assert sorted(c["metadata"]["namespace"] for c in cas) == ["edge-a", "edge-b"]
    assert all(c["data"] == {"ca.crt": files["ca.crt"]} for c in cas), "public: the CA's certificate only"
    [store] = one(docs, "Deployment", "edgeloop-store")["spec"]["template"]["spec"]["containers"]
    args = store["args"]
    assert args[args.index("--tls-cert") + 1] == "/etc/edgeloop/tls/tls.crt"
    assert store["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    path = tmp_path / "config.yaml"
    path.write_text(one(docs, "ConfigMap", "edgeloop-config")["data"]["config.yaml"])
    loaded = config.load(path)
    assert (loaded.store_url, loaded.store_ca_config_map) == (
        "https://edgeloop-store.edgeloop-system.svc:8000", "edgeloop-store-ca")
    aggregator = federated_pods(loaded)["aggregator"]["spec"]
    assert {"name": "store-ca", "configMap": {"name": "edgeloop-store-ca"}} in aggregator["volumes"]

    mine = template("store.tls.existingSecret=my-tls", "store.tls.caCert=PEM", "watchNamespaces={edge-a}")
    assert not [s for s in by_kind(mine, "Secret") if s["metadata"]["name"] == "edgeloop-store-tls"]
    assert one(mine, "ConfigMap", "edgeloop-store-ca")["data"] == {"ca.crt": "PEM"}
    result = helm("template", "edgeloop", str(CHART), "--set", "store.tls.existingSecret=my-tls", check=False)
    assert result.returncode != 0 and "store.tls.existingSecret needs its CA" in result.stderr


@needs_helm
def test_every_pod_of_the_chart_is_restricted():
    for deployment in by_kind(template(), "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
            assert context["readOnlyRootFilesystem"] is True
        assert not any("hostPath" in v for v in pod.get("volumes", []))
