"""Node affinity of the variants: each node runs exactly the variant of the first listed class it has."""

from __future__ import annotations

import itertools

import pytest
from edgeloop import config
from edgeloop.nodes import node_matches
from edgeloop.render.placement import node_selector_terms

CLASSES = config.build().accelerator_classes
# Every label that marks a built-in class, plus one that marks none.
LABELS = sorted({key for cls in CLASSES.values() for key in cls.match_any_label} | {"unrelated"})
ARCH = "kubernetes.io/arch"  # every kubelet sets it


def matching_variants(order: list[str], labels: dict[str, str], node_selector=None) -> list[str]:
    classes = [CLASSES[name] for name in order]
    return [
        name for index, name in enumerate(order)
        if node_matches(node_selector_terms(classes, index), node_selector or {}, labels)
    ]


def first_class_of(order: list[str], labels: dict[str, str]) -> str | None:
    for name in order:
        cls = CLASSES[name]
        if cls.architectures and labels.get(ARCH) not in cls.architectures:
            continue
        if cls.is_catch_all or any(labels.get(k) == v for k, v in cls.match_any_label.items()):
            return name
    return None


ORDERS = [["npu", "gpu", "cpu"], ["gpu", "npu", "cpu"], ["gpu", "cpu"], ["npu", "gpu"], ["cpu"]]


@pytest.mark.parametrize("order", ORDERS)
def test_every_node_matches_exactly_the_first_class_it_has(order):
    for present in itertools.chain.from_iterable(itertools.combinations(LABELS, n) for n in range(4)):
        for arch in ("amd64", "arm64", None):
            labels = {**dict.fromkeys(present, "true"), **({ARCH: arch} if arch else {})}
            expected = first_class_of(order, labels)
            assert matching_variants(order, labels) == ([expected] if expected else []), labels


def test_a_class_whose_image_lacks_the_nodes_architecture_leaves_the_node_to_the_next_class():
    """The gpu and npu flavours are amd64 only (onnxruntime-gpu and onnxruntime-openvino have no aarch64 wheel): a
    Jetson that GPU Feature Discovery labels as a GPU node runs the cpu variant, whose image has an arm64 build,
    rather than an image that cannot exist for it."""
    assert (CLASSES["gpu"].architectures, CLASSES["npu"].architectures, CLASSES["cpu"].architectures) == (
        ["amd64"], ["amd64"], [])
    jetson = {"nvidia.com/gpu.present": "true", ARCH: "arm64"}
    assert matching_variants(["npu", "gpu", "cpu"], jetson) == ["cpu"]
    assert matching_variants(["gpu"], jetson) == [], "no variant at all rather than one that cannot run"
    assert matching_variants(["npu", "gpu", "cpu"], {**jetson, ARCH: "amd64"}) == ["gpu"]
    assert matching_variants(["npu", "gpu", "cpu"], {"edgeloop.io/accelerator.npu": "true", ARCH: "arm64"}) == ["cpu"]


def test_without_architectures_the_terms_are_as_before():
    """Classes that list no architectures get no kubernetes.io/arch expression at all."""
    anywhere = {name: cls.model_copy(update={"architectures": []}) for name, cls in CLASSES.items()}
    terms = node_selector_terms([anywhere["npu"], anywhere["gpu"], anywhere["cpu"]], 2)
    assert terms == [{"matchExpressions": [
        {"key": "edgeloop.io/accelerator.gpu", "operator": "NotIn", "values": ["true"]},
        {"key": "edgeloop.io/accelerator.npu", "operator": "NotIn", "values": ["true"]},
        {"key": "feature.node.kubernetes.io/pci-0300_10de.present", "operator": "NotIn", "values": ["true"]},
        {"key": "feature.node.kubernetes.io/pci-0302_10de.present", "operator": "NotIn", "values": ["true"]},
        {"key": "feature.node.kubernetes.io/pci-10de.present", "operator": "NotIn", "values": ["true"]},
        {"key": "feature.node.kubernetes.io/pci-1200_8086.present", "operator": "NotIn", "values": ["true"]},
        {"key": "nvidia.com/gpu.present", "operator": "NotIn", "values": ["true"]},
    ]}]


def test_a_label_with_another_value_does_not_count():
    assert matching_variants(["gpu", "cpu"], {"nvidia.com/gpu.present": "false", ARCH: "amd64"}) == ["cpu"]


def test_the_devcluster_fleet_splits_into_three_variants():
    fleet = {
        "edge-npu-0": {"edgeloop.io/accelerator.npu": "true"},
        "edge-gpu-0": {"edgeloop.io/accelerator.gpu": "true", "nvidia.com/gpu.present": "true"},
        "edge-cpu-0": {},
        "both": {"edgeloop.io/accelerator.npu": "true", "nvidia.com/gpu.present": "true"},
    }
    placed = {name: matching_variants(["npu", "gpu", "cpu"], {**labels, ARCH: "amd64"})
              for name, labels in fleet.items()}
    assert placed == {"edge-npu-0": ["npu"], "edge-gpu-0": ["gpu"], "edge-cpu-0": ["cpu"], "both": ["npu"]}


def test_node_selector_is_anded_with_every_variant():
    selector, gpu = {"site": "berlin"}, {"nvidia.com/gpu.present": "true", ARCH: "amd64"}
    assert matching_variants(["gpu", "cpu"], gpu, selector) == []
    assert matching_variants(["gpu", "cpu"], {**gpu, "site": "berlin"}, selector) == ["gpu"]


def test_terms_are_one_per_label_of_the_class_each_with_all_exclusions():
    npu, gpu, cpu = CLASSES["npu"], CLASSES["gpu"], CLASSES["cpu"]
    terms = node_selector_terms([npu, gpu, cpu], 1)
    assert len(terms) == len(gpu.match_any_label)
    for term in terms:
        [own, arch, *exclusions] = term["matchExpressions"]
        assert own["operator"] == "In" and own["key"] in gpu.match_any_label
        assert arch == {"key": ARCH, "operator": "In", "values": ["amd64"]}
        assert {e["key"] for e in exclusions} == set(npu.match_any_label)
        assert all(e["operator"] == "NotIn" for e in exclusions)


def test_a_lone_catch_all_class_needs_no_affinity():
    assert node_selector_terms([CLASSES["cpu"]], 0) == []


def test_a_class_of_ones_own_for_arm64_boards_takes_them_and_every_node_still_runs_one_variant():
    """A Jetson class (NVIDIA's own ONNX Runtime build, arm64 only) beside the built-in gpu class (amd64): the same
    GPU label means gpu on amd64, jetson on arm64, and cpu on an architecture neither is built for."""
    jetson = config.build({"acceleratorClasses": {"jetson": {
        "matchAnyLabel": {"nvidia.com/gpu.present": "true"}, "resource": "nvidia.com/gpu",
        "executionProviders": ["CUDAExecutionProvider", "CPUExecutionProvider"], "architectures": ["arm64"],
    }}}).accelerator_classes["jetson"]
    classes = {**CLASSES, "jetson": jetson}
    order = ["npu", "gpu", "jetson", "cpu"]

    def placed(labels):
        return [name for index, name in enumerate(order)
                if node_matches(node_selector_terms([classes[n] for n in order], index), {}, labels)]

    gpu = {"nvidia.com/gpu.present": "true"}
    assert [placed({**gpu, ARCH: arch}) for arch in ("amd64", "arm64", "riscv64")] == [["gpu"], ["jetson"], ["cpu"]]
    npu_and_gpu = {**gpu, "edgeloop.io/accelerator.npu": "true"}
    assert [placed({**npu_and_gpu, ARCH: arch}) for arch in ("amd64", "arm64")] == [["npu"], ["jetson"]]
    assert placed({ARCH: "arm64"}) == ["cpu"]
    # The cpu variant's terms: one for the architectures some earlier class is built for, one for the rest.
    cpu_terms = node_selector_terms([classes[n] for n in order], 3)
    assert [term["matchExpressions"][0] for term in cpu_terms] == [
        {"key": ARCH, "operator": "In", "values": ["amd64"]},
        {"key": ARCH, "operator": "In", "values": ["arm64"]},
        {"key": ARCH, "operator": "NotIn", "values": ["amd64", "arm64"]},
    ]
