"""Pure parts of the devcluster: the generated pin and the fleet spec."""

from __future__ import annotations

import pytest
from devcluster.fleet import Fleet, load_fleet, node_manifests, runtime_class_manifests
from pydantic import ValidationError

from devcluster import pin

RELEASE_GOMOD = """module k8s.io/kubernetes

require (
\tk8s.io/api v0.0.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tgithub.com/other/thing => github.com/fork/thing v1.0.0
)
"""


def test_staging_replaces_come_from_the_release_gomod():
    assert pin.staging_replaces(RELEASE_GOMOD, "v1.34.4") == [
        "\tk8s.io/api => k8s.io/api v0.34.4",
        "\tk8s.io/client-go => k8s.io/client-go v0.34.4",
    ]


def test_replace_block_is_rewritten_in_place():
    first = pin.with_replaces("module x\n\ngo 1.24\n", ["\ta => a v0.1.0"])
    second = pin.with_replaces(first, ["\ta => a v0.2.0"])
    assert second.count(pin.BEGIN) == 1
    assert "a => a v0.2.0" in second and "v0.1.0" not in second


def test_committed_gomod_replaces_every_staging_module_of_the_pinned_release():
    gomod = (pin.MODULE_DIR / "go.mod").read_text()
    assert "k8s.io/kubernetes v1.34." in gomod
    for module in ("k8s.io/api", "k8s.io/client-go", "k8s.io/kubectl", "k8s.io/kubelet", "k8s.io/kube-proxy"):
        assert f"\t{module} => {module} v0.34." in gomod


def test_default_fleet_is_two_npu_two_gpu_two_cpu_nodes():
    nodes = node_manifests(load_fleet())
    by_group: dict[str, list[dict]] = {}
    for node in nodes:
        by_group.setdefault(node["metadata"]["labels"]["edgeloop.io/node-group"], []).append(node)
    assert {group: len(members) for group, members in by_group.items()} == {
        "edge-npu": 2, "edge-gpu": 2, "edge-cpu": 2}
    npu = by_group["edge-npu"][0]
    assert npu["metadata"]["labels"]["edgeloop.io/accelerator.npu"] == "true"
    assert npu["status"]["capacity"]["npu.intel.com/accel"] == "1"
    gpu = by_group["edge-gpu"][0]
    assert gpu["metadata"]["labels"]["nvidia.com/gpu.present"] == "true"
    assert gpu["status"]["capacity"]["nvidia.com/gpu"] == "1"
    cpu = by_group["edge-cpu"][0]
    assert not any(label.startswith(("edgeloop.io/accelerator", "nvidia.com")) for label in cpu["metadata"]["labels"])
    assert all(node["metadata"]["annotations"] == {"kwok.x-k8s.io/node": "fake"} for node in nodes)


@pytest.mark.parametrize("total", [1, 6, 7, 1000])
def test_scaling_keeps_the_total_and_the_mix(total):
    scaled = load_fleet().scaled_to(total)
    assert len(node_manifests(scaled)) == total
    counts = {group.name: group.count for group in scaled.groups if group.runtime == "kwok"}
    assert counts.pop("edge-arm64") == 0, "an empty group stays empty"
    assert max(counts.values()) - min(counts.values()) <= 1
    assert scaled.real_nodes() == [], "scaling the simulated fleet adds no real node"


def test_real_nodes_come_from_the_kubelet_group_and_are_not_simulated():
    fleet = load_fleet().with_real_nodes(2)
    assert [name for name, _ in fleet.real_nodes()] == ["edge-real-0", "edge-real-1"]
    _, group = fleet.real_nodes()[0]
    assert group.labels["edgeloop.io/accelerator.gpu"] == "true" and group.capacity == {"nvidia.com/gpu": "1"}
    assert not any(node["metadata"]["name"].startswith("edge-real") for node in node_manifests(fleet))
    with pytest.raises(ValueError, match="a group of runtime kubelet"):
        Fleet.model_validate({"groups": [{"name": "g", "count": 1}]}).with_real_nodes(1)


def test_a_mix_of_real_gpu_and_npu_nodes_is_asked_for_by_group():
    fleet = load_fleet().scaled_to(0).with_counts({"edge-real": 1, "edge-real-npu": 1})
    [(gpu, gpu_group), (npu, npu_group)] = fleet.real_nodes()
    assert (gpu, npu) == ("edge-real-0", "edge-real-npu-0"), "a real node's index is its place in this list"
    assert gpu_group.capacity == {"nvidia.com/gpu": "1"}
    assert npu_group.labels == {"edgeloop.io/accelerator.npu": "true"}
    assert npu_group.capacity == {"npu.intel.com/accel": "1"}, "advertised as the Intel NPU device plugin does"
    with pytest.raises(ValueError, match="no group edge-tpu"):
        fleet.with_counts({"edge-tpu": 1})
    with pytest.raises(ValueError, match="negative"):
        fleet.with_counts({"edge-real": -1})


def test_arm64_nodes_are_an_optional_group_outside_the_default_six():
    assert all(node["metadata"]["labels"]["kubernetes.io/arch"] == "amd64" for node in node_manifests(load_fleet()))
    arm64 = [node for node in node_manifests(load_fleet().with_counts({"edge-arm64": 2}))
             if node["metadata"]["labels"]["edgeloop.io/node-group"] == "edge-arm64"]
    assert [node["metadata"]["name"] for node in arm64] == ["edge-arm64-0", "edge-arm64-1"]
    assert all(node["metadata"]["labels"]["kubernetes.io/arch"] == "arm64" for node in arm64)
    assert all(node["status"]["nodeInfo"]["architecture"] == "arm64" for node in arm64), "as kwok reports it"


def test_taints_are_rendered_and_unknown_fields_rejected():
    fleet = Fleet.model_validate({"groups": [{"name": "g", "count": 1,
                                              "taints": [{"key": "edge", "effect": "NoSchedule"}]}]})
    assert node_manifests(fleet)[0]["spec"]["taints"] == [{"key": "edge", "value": "", "effect": "NoSchedule"}]
    with pytest.raises(ValidationError, match="colour"):
        Fleet.model_validate({"groups": [{"name": "g", "count": 1, "colour": "blue"}]})
    with pytest.raises(ValidationError):
        Fleet.model_validate({"groups": [{"name": "Bad_Name", "count": 1}]})


def test_default_fleet_offers_the_nvidia_runtime_class_as_k3s_does():
    assert runtime_class_manifests(load_fleet()) == [
        {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": "nvidia"}, "handler": "nvidia"}
    ]
    assert load_fleet().scaled_to(10).runtimeClasses == ["nvidia"]


def test_up_takes_group_counts_and_refuses_unknown_groups(capsys):
    from devcluster import cli

    assert cli._group_count("edge-arm64=2") == ("edge-arm64", 2)
    with pytest.raises(SystemExit):
        cli.main(["up", "--scale", "edge-arm64=two"])
    assert "expected GROUP=N" in capsys.readouterr().err
    assert cli.main(["--name", "unit-never-up", "up", "--scale", "edge-tpu=1"]) == 1
    assert "the fleet has no group edge-tpu" in capsys.readouterr().err
