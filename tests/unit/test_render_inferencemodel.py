"""Rendering an InferenceModel: golden manifests, the runtime's command-line contract, and the invariants
every manifest must keep. Regenerate the golden files with EDGELOOP_UPDATE_GOLDEN=1 after a deliberate change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from edgeloop import config
from edgeloop.api.inferencemodel import InferenceModelSpec
from edgeloop.config import ConfigError
from edgeloop.names import RENDER_HASH
from edgeloop.render.inferencemodel import owner_of, render
from im_factories import SHA_B, example_body, spec

GOLDEN = Path(__file__).parent / "golden"
OWNER = owner_of("digits", "edge", "0b8e6f3c-1111-4222-8333-444455556666")


def rendered_example():
    body = example_body()
    return render(OWNER, InferenceModelSpec.model_validate(body["spec"]), config.build())


def cpu_only():
    return render(OWNER, spec(placement={"accelerators": ["cpu"]}), config.build())


@pytest.mark.parametrize(
    ("case", "manifests"), [("inferencemodel-digits", rendered_example), ("inferencemodel-cpu-only", cpu_only)]
)
def test_matches_golden_file(case, manifests):
    text = yaml.safe_dump_all(manifests().all(), sort_keys=False, width=110)
    golden = GOLDEN / f"{case}.yaml"
    if os.environ.get("EDGELOOP_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"rendering changed; if intended, EDGELOOP_UPDATE_GOLDEN=1 pytest {__file__}"


def test_rendering_is_pure():
    assert rendered_example() == rendered_example()


def test_one_daemon_set_per_class_with_its_resource_runtime_class_and_providers():
    daemon_sets = rendered_example().daemon_sets
    assert list(daemon_sets) == ["digits-npu", "digits-gpu", "digits-cpu"]
    pods = {name: ds["spec"]["template"]["spec"] for name, ds in daemon_sets.items()}
    runtime = {name: pod["containers"][0] for name, pod in pods.items()}
    assert runtime["digits-gpu"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert runtime["digits-npu"]["resources"]["limits"]["npu.intel.com/accel"] == 1
    assert runtime["digits-cpu"]["resources"] == {
        "requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}
    }
    assert pods["digits-gpu"]["runtimeClassName"] == "nvidia" and "runtimeClassName" not in pods["digits-cpu"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pods["digits-gpu"]["tolerations"]
    providers = {name: c["args"][c["args"].index("--execution-providers") + 1] for name, c in runtime.items()}
    assert providers == {
        "digits-npu": "OpenVINOExecutionProvider,CPUExecutionProvider",
        "digits-gpu": "CUDAExecutionProvider,CPUExecutionProvider",
        "digits-cpu": "CPUExecutionProvider",
    }
    for pod in pods.values():
        assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}, "the spec's nodeSelector reaches every variant"


def test_each_variant_runs_its_classs_image_unless_the_model_names_one_for_all():
    def images(manifests):
        return {
            name: {(c["image"], c["imagePullPolicy"]) for c in [*pod["initContainers"], *pod["containers"]]}
            for name, ds in manifests.daemon_sets.items()
            for pod in [ds["spec"]["template"]["spec"]]
        }

    custom = config.build({
        "runtimeImage": "registry.example/runtime:1",
        "acceleratorClasses": {"gpu": {"image": "registry.example/runtime-cuda:1", "imagePullPolicy": "Always"}},
    })
    assert images(render(OWNER, spec(), custom)) == {
        "digits-npu": {("ghcr.io/edgeloop/runtime-openvino:0.1.0", "IfNotPresent")},
        "digits-gpu": {("registry.example/runtime-cuda:1", "Always")},
        "digits-cpu": {("registry.example/runtime:1", "IfNotPresent")},
    }
    own = render(OWNER, spec(runtime={"image": "registry.example/mine:2"}), custom)
    assert {image for found in images(own).values() for image, _ in found} == {"registry.example/mine:2"}


def test_spec_tolerations_and_resource_amounts_reach_the_variants():
    manifests = render(OWNER, spec(
        placement={"tolerations": [{"key": "edge", "operator": "Exists"}]},
        runtime={"resources": {"limits": {"nvidia.com/gpu": 2}}},
    ), config.build())
    gpu = manifests.daemon_sets["digits-gpu"]["spec"]["template"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2, "an explicit amount wins"
    assert [t["key"] for t in gpu["tolerations"]] == ["nvidia.com/gpu", "edge"]
    assert manifests.daemon_sets["digits-cpu"]["spec"]["template"]["spec"]["tolerations"] == [
        {"key": "edge", "operator": "Exists"}
    ]


def test_restricted_security_context_and_probes():
    for ds in rendered_example().daemon_sets.values():
        pod = ds["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in [*pod["initContainers"], *pod["containers"]]:
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "runAsNonRoot": True,
                "capabilities": {"drop": ["ALL"]},
            }
        runtime = pod["containers"][0]
        assert runtime["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
        assert runtime["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
        mounts = {m["mountPath"]: m for m in runtime["volumeMounts"]}
        assert mounts["/var/lib/edgeloop/models"].get("readOnly") is True, (
            "only the verifying init container writes the models")
        # The operator replaces pods itself, in waves, on reachable nodes (status/rollout.py).
        assert ds["spec"]["updateStrategy"] == {"type": "OnDelete"}


def test_every_container_has_a_memory_limit_by_default_and_the_spec_decides_for_what_it_names():
    """A runtime whose memory is not bounded can take a node down (issue 16 item 7)."""
    def containers(manifests, name="digits-cpu"):
        pod = manifests.daemon_sets[name]["spec"]["template"]["spec"]
        return {c["name"]: c.get("resources", {}) for c in [*pod["initContainers"], *pod["containers"]]}

    bare = containers(render(OWNER, spec(), config.build()))
    assert bare["runtime"] == {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    assert bare["fetch"] == {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}}

    big = containers(render(OWNER, spec(runtime={"resources": {"requests": {"memory": "4Gi"}}}), config.build()))
    assert big["runtime"] == {"requests": {"cpu": "100m", "memory": "4Gi"}}, (
        "memory named by the spec: its settings alone, no default limit below its request")
    gpu = containers(render(OWNER, spec(), config.build()), "digits-gpu")
    assert gpu["runtime"]["limits"] == {"memory": "1Gi", "nvidia.com/gpu": 1}
    assert "nvidia.com/gpu" not in gpu["fetch"].get("limits", {}), "the accelerator is the runtime's alone"
    custom = config.build({"runtimeResources": {"limits": {"memory": "2Gi"}}})
    assert containers(render(OWNER, spec(), custom))["runtime"] == {"limits": {"memory": "2Gi"}}


@pytest.mark.parametrize("claim", [None, "edgeloop-model-cache"])
def test_a_pod_mounts_only_its_namespaces_cache_and_only_the_fetcher_may_write(claim):
    """Tenants share nodes, not caches: a cache hit never serves another namespace's file (issue 16 item 10)."""
    for namespace in ("tenant-a", "tenant-b"):
        owner = owner_of("digits", namespace, "uid")
        for ds in render(owner, spec(), config.build({"modelCacheClaim": claim})).daemon_sets.values():
            pod = ds["spec"]["template"]["spec"]
            mounts = {c["name"]: next(m for m in c["volumeMounts"] if m["mountPath"] == "/var/lib/edgeloop/models")
                      for c in [*pod["initContainers"], *pod["containers"]]}
            assert mounts == {
                "fetch": {"name": "model-cache", "mountPath": "/var/lib/edgeloop/models", "subPath": namespace},
                "runtime": {"name": "model-cache", "mountPath": "/var/lib/edgeloop/models", "subPath": namespace,
                            "readOnly": True},
            }
            [volume] = [v for v in pod["volumes"] if v["name"] == "model-cache"]
            source = ({"persistentVolumeClaim": {"claimName": claim}} if claim
                      else {"hostPath": {"path": "/var/lib/edgeloop/models", "type": "Directory"}})
            assert volume == {"name": "model-cache", **source}


def test_service_is_node_local_when_asked():
    assert rendered_example().service["spec"]["internalTrafficPolicy"] == "Local"
    cluster_wide = render(OWNER, spec(serving={"nodeLocal": False}), config.build()).service
    assert cluster_wide["spec"]["internalTrafficPolicy"] == "Cluster"


def test_everything_is_owned_and_labelled():
    for manifest in rendered_example().all():
        metadata = manifest["metadata"]
        assert metadata["ownerReferences"] == [OWNER.reference()]
        assert metadata["labels"]["app.kubernetes.io/managed-by"] == "edgeloop"
        assert metadata["labels"]["edgeloop.io/inferencemodel"] == "digits"
        assert len(metadata["annotations"][RENDER_HASH]) == 16


def test_the_hash_changes_exactly_when_the_content_does():
    before = render(OWNER, spec(), config.build())
    new_model = render(OWNER, spec(model={"sha256": SHA_B, "version": "4"}), config.build())
    def hashes(manifests):
        return {name: ds["metadata"]["annotations"][RENDER_HASH] for name, ds in manifests.daemon_sets.items()}

    assert all(hashes(before)[name] != hashes(new_model)[name] for name in before.daemon_sets)
    assert before.service == new_model.service, "a new model does not touch the Service"
    assert render(OWNER, spec(), config.build()) == before


def test_an_unknown_class_is_a_config_error():
    custom = config.build({"acceleratorClasses": {"npu": None}})
    with pytest.raises(ConfigError, match="unknown accelerator class 'npu'"):
        render(OWNER, spec(), custom)


def test_the_runtime_parses_the_rendered_command_lines():
    """The contract with edgeloop-runtime: its own parser accepts what the templates render."""
    from edgeloop_runtime.cli import build_parser

    for ds in rendered_example().daemon_sets.values():
        pod = ds["spec"]["template"]["spec"]
        [fetch] = pod["initContainers"]
        [runtime] = pod["containers"]
        assert fetch["command"] == runtime["command"] == ["edgeloop-runtime"]

        fetched = build_parser(only="fetch").parse_args(fetch["args"])
        served = build_parser(only="serve").parse_args(runtime["args"])
        body = example_body()["spec"]
        assert fetched.uri == body["model"]["uri"] and fetched.sha256 == body["model"]["sha256"]
        assert str(fetched.cache) == str(served.cache) == "/var/lib/edgeloop/models"
        assert served.sha256 == body["model"]["sha256"]
        assert (served.model_name, served.model_version) == ("digits", "1")
        assert (served.http_port, served.grpc_port) == (8000, 8001)
        assert (served.max_batch_size, served.batch_window_us, served.threads) == (16, 500, 1)
        assert served.execution_providers.split(",")[-1] == "CPUExecutionProvider"
        assert served.allow_cpu_fallback is False
        # Its metrics say which variant and node they come from.
        assert served.accelerator == ds["metadata"]["labels"]["edgeloop.io/accelerator"]
        assert runtime["env"] == [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
        ports = {p["name"]: p["containerPort"] for p in runtime["ports"]}
        assert ports == {"http": served.http_port, "grpc": served.grpc_port}

        # TLS by default: the runtime serves the certificate of the Secret mounted where its flags point.
        [mount] = [m for m in runtime["volumeMounts"] if m["name"] == "tls"]
        assert (served.tls_cert.parent, served.tls_key.parent) == (Path(mount["mountPath"]),) * 2
        assert (served.tls_cert.name, served.tls_key.name) == ("tls.crt", "tls.key")
        [volume] = [v for v in pod["volumes"] if v["name"] == "tls"]
        assert volume["secret"]["secretName"] == "digits-tls"
        assert {runtime[p]["httpGet"]["scheme"] for p in ("startupProbe", "livenessProbe", "readinessProbe")} == {
            "HTTPS"
        }


def test_fetching_over_https_trusts_the_namespace_ca_and_plain_http_does_not_need_it():
    from edgeloop_runtime.cli import build_parser

    def fetch_container(uri):
        ds = next(iter(render(OWNER, spec(model={"uri": uri}), config.build()).daemon_sets.values()))
        return ds["spec"]["template"]["spec"]["initContainers"][0]

    secure = fetch_container("https://edgeloop-store.edgeloop-system.svc:8000/sha256/" + "a" * 64)
    fetched = build_parser(only="fetch").parse_args(secure["args"])
    assert fetched.ca_cert == Path("/etc/edgeloop/tls/ca.crt")
    assert {"name": "tls", "mountPath": "/etc/edgeloop/tls", "readOnly": True} in secure["volumeMounts"]
    plain = fetch_container("http://edgeloop-store.edgeloop-system.svc:8000/sha256/" + "a" * 64)
    assert build_parser(only="fetch").parse_args(plain["args"]).ca_cert is None
    assert all(m["name"] != "tls" for m in plain["volumeMounts"])


def test_with_tls_disabled_the_runtime_serves_plain_http():
    from edgeloop_runtime.cli import build_parser

    for ds in render(OWNER, spec(), config.build({"tls": {"mode": "disabled"}})).daemon_sets.values():
        pod = ds["spec"]["template"]["spec"]
        [runtime] = pod["containers"]
        assert build_parser(only="serve").parse_args(runtime["args"]).tls_cert is None
        assert runtime["readinessProbe"]["httpGet"]["scheme"] == "HTTP"
        assert all(v["name"] != "tls" for v in pod["volumes"]) and "fsGroup" not in pod["securityContext"]
        assert "edgeloop.io/tls-revision" not in ds["spec"]["template"]["metadata"]["annotations"]


def test_a_new_certificate_rolls_the_runtime_pods():
    """The runtime reads its certificate at start: a rotated one reaches it through a rollout."""
    first, second = (render(OWNER, spec(), config.build(), revision) for revision in ("aaaa", "bbbb"))
    for name, ds in second.daemon_sets.items():
        assert ds["spec"]["template"]["metadata"]["annotations"]["edgeloop.io/tls-revision"] == "bbbb"
        assert ds["metadata"]["annotations"][RENDER_HASH] != first.daemon_sets[name]["metadata"]["annotations"][
            RENDER_HASH
        ]
    assert first.service == second.service


# ---- C1: what each class and the spec pass to the runtime


def served(manifests, name):
    """The runtime's command line of DaemonSet `name`, parsed and checked as edgeloop-runtime serve does."""
    from edgeloop_runtime.cli import build_parser
    from edgeloop_runtime.serve import check_arguments

    [runtime] = manifests.daemon_sets[name]["spec"]["template"]["spec"]["containers"]
    args = build_parser(only="serve").parse_args(runtime["args"])
    assert check_arguments(args) is None, check_arguments(args)
    return args


def test_each_class_passes_its_provider_options_with_sensible_defaults():
    manifests = render(OWNER, spec(), config.build())
    assert served(manifests, "digits-gpu").provider_options == {
        "CUDAExecutionProvider": {"cudnn_conv_algo_search": "HEURISTIC"}
    }, "exhaustive search of cuDNN algorithms for every new batch shape made batching slower than none"
    assert served(manifests, "digits-npu").provider_options == {"OpenVINOExecutionProvider": {"device_type": "NPU"}}
    assert served(manifests, "digits-cpu").provider_options == {}
    custom = config.build({"acceleratorClasses": {"npu": {"providerOptions": {
        "OpenVINOExecutionProvider": {"device_type": "CPU", "num_of_threads": "2"}}}}})
    assert served(render(OWNER, spec(), custom), "digits-npu").provider_options == {
        "OpenVINOExecutionProvider": {"device_type": "CPU", "num_of_threads": "2"}}


@pytest.mark.parametrize(("options", "message"), [
    ({"TensorrtExecutionProvider": {"trt_fp16_enable": "True"}}, "not in its executionProviders"),
    ({"CUDAExecutionProvider": {"device_id": 0}}, "are strings"),
    ({"CUDAExecutionProvider": "HEURISTIC"}, "providerOptions"),
])
def test_provider_options_are_checked_when_the_configuration_loads(options, message):
    with pytest.raises(ConfigError, match=message):
        config.build({"acceleratorClasses": {"gpu": {"providerOptions": options}}})


def test_the_compiled_cache_is_the_namespaces_own_writable_directory_on_the_node():
    for name, ds in render(OWNER, spec(), config.build()).daemon_sets.items():
        pod = ds["spec"]["template"]["spec"]
        [runtime] = pod["containers"]
        compiled = served(render(OWNER, spec(), config.build()), name).compiled_cache
        [mount] = [m for m in runtime["volumeMounts"] if m["mountPath"] == str(compiled)]
        assert mount == {"name": "model-cache", "mountPath": "/var/lib/edgeloop/compiled", "subPath": "edge.compiled"}
        assert not mount.get("readOnly"), "OpenVINO and TensorRT write their compiled models there"
        # Beside the models' directory, not in it: a namespace's own pods may write in that one, and a
        # symlink they left there would lead a subPath mount into another namespace's directory.


def test_the_format_and_the_instances_reach_the_runtime():
    assert served(render(OWNER, spec(), config.build()), "digits-cpu").format == "onnx"
    manifests = render(OWNER, spec(model={"format": "tflite"}, runtime={"instances": 3}), config.build())
    args = served(manifests, "digits-cpu")
    assert (args.format, args.model_instances) == ("tflite", 3)
    assert served(render(OWNER, spec(), config.build()), "digits-cpu").model_instances == 0, "unset: automatic"


def test_with_the_stores_ca_a_fetch_over_https_trusts_it():
    """The chart's store serves HTTPS with a CA of its own, published in each workload namespace."""
    from edgeloop_runtime.cli import build_parser

    store = config.build({"storeCaConfigMap": "edgeloop-store-ca"})
    uri = "https://edgeloop-store.edgeloop-system.svc:8000/sha256/" + "a" * 64
    ds = next(iter(render(OWNER, spec(model={"uri": uri}), store).daemon_sets.values()))
    pod = ds["spec"]["template"]["spec"]
    [fetch] = pod["initContainers"]
    assert build_parser(only="fetch").parse_args(fetch["args"]).ca_cert == Path("/etc/edgeloop/store-ca/ca.crt")
    assert {"name": "store-ca", "mountPath": "/etc/edgeloop/store-ca", "readOnly": True} in fetch["volumeMounts"]
    assert {"name": "store-ca", "configMap": {"name": "edgeloop-store-ca"}} in pod["volumes"]
    http = spec(model={"uri": "http://models.example/digits.onnx"})
    plain = next(iter(render(OWNER, http, store).daemon_sets.values()))["spec"]["template"]["spec"]
    assert all(v["name"] != "store-ca" for v in plain["volumes"]), "an http:// model needs no CA"
