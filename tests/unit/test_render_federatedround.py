"""Rendering a FederatedRound: golden manifests, the runtime's command-line contract, pinning, and the
invariants every manifest keeps. Regenerate the golden file with EDGELOOP_UPDATE_GOLDEN=1 after a
deliberate change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from edgeloop import config
from edgeloop.api.federatedround import FederatedRoundSpec
from edgeloop.names import START_ANNOTATION
from edgeloop.render.federatedround import (
    DatasetOutsideRoot,
    Start,
    active_deadline_seconds,
    dataset_sub_path,
    render,
)
from edgeloop_runtime.cli import build_parser
from fr_factories import MODEL, NODES, OWNER, START, example_spec, spec

GOLDEN = Path(__file__).parent / "golden"
RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
}


def rendered_example():
    return render(OWNER, FederatedRoundSpec.model_validate(example_spec()), config.build(), START)


def pod(job):
    return job["spec"]["template"]["spec"]


def container(job):
    [only] = pod(job)["containers"]
    return only


def parsed(job):
    """The Job's command line as edgeloop-runtime itself parses it."""
    assert container(job)["command"] == ["edgeloop-runtime"]
    return build_parser(only="federated").parse_args(container(job)["args"])


def test_matches_golden_file():
    text = yaml.safe_dump_all(rendered_example().all(), sort_keys=False, width=110)
    golden = GOLDEN / "federatedround-digits.yaml"
    if os.environ.get("EDGELOOP_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"rendering changed; if intended, EDGELOOP_UPDATE_GOLDEN=1 pytest {__file__}"


def test_rendering_is_pure():
    assert rendered_example() == rendered_example()


def test_the_runtime_parses_the_aggregator_command_line_as_the_spec_says():
    args = parsed(rendered_example().aggregator)
    assert (args.command, args.federated_command) == ("federated", "aggregate")
    assert (args.model, args.model_sha256) == (MODEL.uri, MODEL.sha256)
    assert (args.clients, args.min_clients) == (3, 3)
    assert (args.rounds, args.local_epochs, args.batch_size, args.learning_rate) == (10, 2, 16, 0.5)
    assert (args.strategy, args.proximal_mu, args.trainable) == ("fedavg", 0.0, "auto")
    assert (args.secure_aggregation, args.threshold, args.deadline) == (True, 0.66, 300.0)
    assert (args.clip_norm, args.noise_multiplier) == (None, 0.0)
    assert args.store == "http://edgeloop-store.edgeloop-system.svc:8000"
    assert str(args.store_token_file) == "/secrets/store/token"
    assert args.port == container(rendered_example().aggregator)["ports"][0]["containerPort"]


def test_optional_training_and_privacy_settings_reach_the_aggregator():
    custom = spec(
        training={"strategy": "fedprox", "proximalMu": 0.01, "trainable": "last"},
        privacy={"clipNorm": 2.5, "noiseMultiplier": 0.3},
        secureAggregation={"enabled": False, "threshold": 1},
    )
    args = parsed(render(OWNER, custom, config.build(), START).aggregator)
    assert (args.strategy, args.proximal_mu, args.trainable) == ("fedprox", 0.01, "last")
    assert (args.clip_norm, args.noise_multiplier) == (2.5, 0.3)
    assert (args.secure_aggregation, args.threshold) == (False, 1.0)


def test_the_runtime_parses_each_client_command_line():
    manifests = rendered_example()
    service = manifests.service["metadata"]["name"]
    for job in manifests.clients:
        args = parsed(job)
        assert args.federated_command == "train"
        assert args.aggregator == f"https://{service}.edge.svc:8080", "TLS by default"
        assert args.data == "/data"
        env = {e["name"]: e for e in container(job)["env"]}
        assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}, "the client id"


def test_one_client_job_pinned_to_each_selected_node():
    clients = rendered_example().clients
    assert [job["metadata"]["name"] for job in clients] == [f"digits-round-1-client-{i}" for i in range(3)]
    pinned = []
    for job in clients:
        [term] = pod(job)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ]
        assert list(term) == ["matchFields"], "by node name, not by a label a node may share"
        [field] = term["matchFields"]
        assert (field["key"], field["operator"]) == ("metadata.name", "In")
        pinned += field["values"]
        assert job["metadata"]["annotations"]["edgeloop.io/node"] == field["values"][0]
    assert tuple(pinned) == NODES


def test_the_aggregator_goes_where_spec_aggregator_says_with_its_own_resources():
    pinned = spec(
        aggregator={
            "nodeSelector": {"node-role.kubernetes.io/control-plane": "true"},
            "tolerations": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists",
                             "effect": "NoSchedule"}],
            "resources": {"requests": {"cpu": "500m"}, "limits": {"memory": "1Gi"}},
        },
        runtime={"resources": {"requests": {"cpu": "100m"}}},
    )
    manifests = render(OWNER, pinned, config.build(), START)
    aggregator = pod(manifests.aggregator)
    assert aggregator["nodeSelector"] == {"node-role.kubernetes.io/control-plane": "true"}
    assert aggregator["tolerations"] == [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists",
                                          "effect": "NoSchedule"}]
    assert container(manifests.aggregator)["resources"] == {"requests": {"cpu": "500m"}, "limits": {"memory": "1Gi"}}
    for client in manifests.clients:
        assert "nodeSelector" not in pod(client) and "tolerations" not in pod(client)
        assert container(client)["resources"] == {"requests": {"cpu": "100m"}}

    # Unset: anywhere, with the runtime's resources.
    default = render(OWNER, spec(runtime={"resources": {"requests": {"cpu": "100m"}}}), config.build(), START)
    assert "nodeSelector" not in pod(default.aggregator) and "tolerations" not in pod(default.aggregator)
    assert container(default.aggregator)["resources"] == {"requests": {"cpu": "100m"}}


def test_a_named_dataset_is_the_directory_of_that_name_in_the_namespaces_data_on_the_node():
    assert example_spec()["dataset"] == {"name": "digits"}
    for job in rendered_example().clients:
        volumes = {v["name"]: v for v in pod(job)["volumes"]}
        assert volumes["data"]["hostPath"] == {"path": "/var/lib/edgeloop/data/edge/digits", "type": "Directory"}
        mounts = {m["name"]: m for m in container(job)["volumeMounts"]}
        assert mounts["data"] == {"name": "data", "mountPath": "/data", "readOnly": True}


def claimed(**overrides):
    return config.build({"datasetClaim": "edgeloop-datasets", **overrides})


def test_with_a_dataset_claim_the_dataset_is_a_read_only_sub_path_of_the_namespaces_claim_and_no_host_path():
    """The claim of each namespace is bound to the namespace's own data directory on the nodes."""
    for job in render(OWNER, FederatedRoundSpec.model_validate(example_spec()), claimed(), START).clients:
        volumes = {v["name"]: v for v in pod(job)["volumes"]}
        assert volumes["data"] == {
            "name": "data",
            "persistentVolumeClaim": {"claimName": "edgeloop-datasets", "readOnly": True},
        }
        assert not any("hostPath" in v for v in volumes.values())
        mounts = {m["name"]: m for m in container(job)["volumeMounts"]}
        assert mounts["data"] == {"name": "data", "mountPath": "/data", "readOnly": True, "subPath": "digits"}
        assert parsed(job).data == "/data", "the runtime's contract is unchanged"


@pytest.mark.parametrize(
    ("root", "dataset", "sub_path"),
    [
        ("/var/lib/edgeloop/data", {"hostPath": "/var/lib/edgeloop/data/edge/a/b/"}, "a/b"),
        ("/var/lib/edgeloop/data/", {"hostPath": "//var/lib/edgeloop/data//edge//a"}, "a"),
        ("/srv/data", {"hostPath": "/srv/data/edge"}, ""),
        ("/srv/data", {"name": "digits.v2"}, "digits.v2"),
    ],
)
def test_the_sub_path_is_the_dataset_relative_to_the_namespaces_directory(root, dataset, sub_path):
    assert dataset_sub_path(spec(dataset=dataset), claimed(datasetRoot=root), "edge") == sub_path
    [client, *_] = render(OWNER, spec(dataset=dataset), claimed(datasetRoot=root), START).clients
    mounts = {m["name"]: m for m in container(client)["volumeMounts"]}
    assert mounts["data"].get("subPath") == (sub_path or None)


@pytest.mark.parametrize(
    "host_path",
    [
        "/var/lib/edgeloop/data/digits",  # no namespace
        "/var/lib/edgeloop/data/other/digits",  # another namespace's data
        "/var/lib/edgeloop/data/edge-b/digits",  # a namespace whose name starts like this one's
        "/var/lib/edgeloop/data",
        "/var/lib/edgeloop/models/edge",
        "/data/digits",
    ],
)
def test_a_dataset_outside_the_namespaces_directory_is_never_rendered(host_path):
    """A tenant cannot make the operator mount another namespace's data, with a claim or without one."""
    for operator_config in (claimed(), config.build()):
        with pytest.raises(DatasetOutsideRoot, match="is not under /var/lib/edgeloop/data/edge/"):
            render(OWNER, spec(dataset={"hostPath": host_path}), operator_config, START)


def test_a_data_root_with_dot_dot_is_a_config_error():
    with pytest.raises(config.ConfigError, match="datasetRoot"):
        config.build({"datasetRoot": "/var/lib/../etc"})


def test_restricted_security_context_and_no_api_credentials():
    for job in [rendered_example().aggregator, *rendered_example().clients]:
        spec_ = pod(job)
        assert spec_["securityContext"]["runAsNonRoot"] is True
        assert spec_["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec_["automountServiceAccountToken"] is False
        assert container(job)["securityContext"] == RESTRICTED


def test_a_client_that_learns_the_round_failed_fails_its_job_at_once():
    policy = rendered_example().clients[0]["spec"]["podFailurePolicy"]["rules"]
    assert {"action": "FailJob", "onExitCodes": {"containerName": "client", "operator": "In", "values": [2]}} in policy
    assert pod(rendered_example().clients[0])["restartPolicy"] == "Never"


def test_a_crashed_aggregator_restarts_in_its_pod_where_the_checkpoint_is_and_a_lost_one_resumes_from_the_store():
    aggregator = rendered_example().aggregator
    assert pod(aggregator)["restartPolicy"] == "OnFailure"
    volumes = {v["name"]: v for v in pod(aggregator)["volumes"]}
    assert "emptyDir" in volumes["state"]
    assert str(parsed(aggregator).state_dir) == "/state"
    # The store keeps every round's checkpoint under a ref unique to this round (fed's C4 flag).
    assert parsed(aggregator).checkpoint_ref == f"edge.digits-round-1.{OWNER.uid}"
    assert volumes["store-token"]["secret"] == {
        "secretName": "edgeloop-store-token",
        "items": [{"key": "token", "path": "token"}],
    }


def test_the_service_selects_the_aggregator_pod():
    manifests = rendered_example()
    selector = manifests.service["spec"]["selector"]
    labels = manifests.aggregator["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    for client in manifests.clients:
        assert not selector.items() <= client["spec"]["template"]["metadata"]["labels"].items()
    assert manifests.service["spec"]["ports"][0]["targetPort"] == "http"


def test_everything_is_owned_labelled_and_bounded_in_time():
    manifests = rendered_example()
    for manifest in manifests.all():
        metadata = manifest["metadata"]
        assert metadata["ownerReferences"] == [OWNER.reference()]
        assert metadata["labels"]["app.kubernetes.io/managed-by"] == "edgeloop"
        assert metadata["labels"]["edgeloop.io/federatedround"] == "digits-round-1"
    for job in [manifests.aggregator, *manifests.clients]:
        assert job["spec"]["activeDeadlineSeconds"] == active_deadline_seconds(
            FederatedRoundSpec.model_validate(example_spec())
        )


def test_the_aggregator_job_records_the_start_and_is_created_first():
    manifests = rendered_example()
    assert manifests.all()[0] is manifests.aggregator
    recorded = Start.from_annotation(manifests.aggregator["metadata"]["annotations"][START_ANNOTATION])
    assert recorded == START


def test_operator_configuration_sets_the_federated_image_and_the_store():
    custom = config.build(
        {
            "federatedImage": "registry.example/rt:1",
            "storeUrl": "https://store.example:8443",
            "storeTokenSecret": "tokens",
        }
    )
    manifests = render(OWNER, spec(), custom, START)
    assert (
        container(manifests.aggregator)["image"] == container(manifests.clients[0])["image"] == "registry.example/rt:1"
    )
    assert parsed(manifests.aggregator).store == "https://store.example:8443"
    volumes = {v["name"]: v for v in pod(manifests.aggregator)["volumes"]}
    assert volumes["store-token"]["secret"]["secretName"] == "tokens"
    own_image = render(OWNER, spec(runtime={"image": "mine:2"}), custom, START)
    assert container(own_image.aggregator)["image"] == "mine:2"


@pytest.mark.parametrize("template", ["http://{service}:{port}/{oops}", "http://{0}/v1/status"])
def test_an_aggregator_url_with_unknown_placeholders_is_a_config_error(template):
    with pytest.raises(config.ConfigError, match="aggregatorStatusUrl"):
        config.build({"aggregatorStatusUrl": template})


def mounts(job):
    return {m["name"]: m for m in container(job)["volumeMounts"]}


def volumes(job):
    return {v["name"]: v for v in pod(job)["volumes"]}


def test_the_aggregator_serves_mtls_with_its_server_certificate():
    job = rendered_example().aggregator
    args = parsed(job)
    assert (args.tls_cert, args.tls_key, args.tls_ca) == (
        "/etc/edgeloop/tls/tls.crt",
        "/etc/edgeloop/tls/tls.key",
        "/etc/edgeloop/tls/ca.crt",
    ), "with --tls-ca it requires client certificates"
    assert mounts(job)["tls"] == {"name": "tls", "mountPath": "/etc/edgeloop/tls", "readOnly": True}
    assert volumes(job)["tls"]["secret"] == {"secretName": "digits-round-1-aggregator-tls", "defaultMode": 0o440}
    assert pod(job)["securityContext"]["fsGroup"] == pod(job)["securityContext"]["runAsUser"]
    probe = container(job)["readinessProbe"]
    assert "tcpSocket" in probe and "httpGet" not in probe, "the kubelet has no client certificate"


def test_each_client_presents_a_client_certificate_of_its_own():
    for index, job in enumerate(rendered_example().clients):
        args = parsed(job)
        assert args.aggregator.startswith("https://")
        assert (args.tls_ca, args.tls_cert, args.tls_key) == (
            "/etc/edgeloop/tls/ca.crt",
            "/etc/edgeloop/tls/tls.crt",
            "/etc/edgeloop/tls/tls.key",
        )
        assert mounts(job)["tls"]["readOnly"] is True
        assert volumes(job)["tls"]["secret"]["secretName"] == f"digits-round-1-client-{index}-tls"


@pytest.mark.parametrize("mode", ["operator", "cert-manager"])
def test_the_default_status_url_follows_the_tls_mode(mode):
    tls = {"mode": mode, "issuer": {"name": "ca", "kind": "ClusterIssuer"}} if mode == "cert-manager" else {}
    assert config.build({"tls": tls}).status_url_template().startswith("https://")
    assert config.build({"tls": {"mode": "disabled"}}).status_url_template().startswith("http://")
    assert config.build({"aggregatorStatusUrl": "http://x/{service}"}).status_url_template() == "http://x/{service}"


def test_with_tls_disabled_the_jobs_speak_plain_http_without_certificates():
    manifests = render(
        OWNER, FederatedRoundSpec.model_validate(example_spec()), config.build({"tls": {"mode": "disabled"}}), START
    )
    aggregator = parsed(manifests.aggregator)
    assert (aggregator.tls_cert, aggregator.tls_key, aggregator.tls_ca) == (None, None, None)
    assert "tls" not in volumes(manifests.aggregator) and "fsGroup" not in pod(manifests.aggregator)["securityContext"]
    assert container(manifests.aggregator)["readinessProbe"]["httpGet"]["path"] == "/healthz"
    for job in manifests.clients:
        args = parsed(job)
        assert args.aggregator.startswith("http://") and args.tls_cert is None
        assert "tls" not in volumes(job)


def test_with_the_stores_ca_the_aggregator_trusts_it_for_its_store_and_its_model():
    store = config.build({"storeCaConfigMap": "edgeloop-store-ca",
                          "storeUrl": "https://edgeloop-store.edgeloop-system.svc:8000"})
    aggregator = render(OWNER, spec(), store, START).aggregator
    args = parsed(aggregator)
    assert args.store == "https://edgeloop-store.edgeloop-system.svc:8000"
    assert str(args.store_ca_cert) == "/etc/edgeloop/store-ca/ca.crt"
    assert mounts(aggregator)["store-ca"] == {"name": "store-ca", "mountPath": "/etc/edgeloop/store-ca",
                                               "readOnly": True}
    assert volumes(aggregator)["store-ca"] == {"name": "store-ca", "configMap": {"name": "edgeloop-store-ca"}}
    assert parsed(rendered_example().aggregator).store_ca_cert is None
