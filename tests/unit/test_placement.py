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


def matching_variants(order: list[str], labels: dict[str, str], node_selector=None) -> list[str]:
    classes = [CLASSES[name] for name in order]
    return [
        name for index, name in enumerate(order)
        if node_matches(node_selector_terms(classes, index), node_selector or {}, labels)
    ]


def first_class_of(order: list[str], labels: dict[str, str]) -> str | None:
    for name in order:
        cls = CLASSES[name]
        if cls.is_catch_all or any(labels.get(k) == v for k, v in cls.match_any_label.items()):
            return name
    return None


ORDERS = [["npu", "gpu", "cpu"], ["gpu", "npu", "cpu"], ["gpu", "cpu"], ["npu", "gpu"], ["cpu"]]


@pytest.mark.parametrize("order", ORDERS)
def test_every_node_matches_exactly_the_first_class_it_has(order):
    for present in itertools.chain.from_iterable(itertools.combinations(LABELS, n) for n in range(4)):
        labels = dict.fromkeys(present, "true")
        expected = first_class_of(order, labels)
        assert matching_variants(order, labels) == ([expected] if expected else []), labels


def test_a_label_with_another_value_does_not_count():
    assert matching_variants(["gpu", "cpu"], {"nvidia.com/gpu.present": "false"}) == ["cpu"]


def test_the_devcluster_fleet_splits_into_three_variants():
    fleet = {
        "edge-npu-0": {"edgeloop.io/accelerator.npu": "true"},
        "edge-gpu-0": {"edgeloop.io/accelerator.gpu": "true", "nvidia.com/gpu.present": "true"},
        "edge-cpu-0": {},
        "both": {"edgeloop.io/accelerator.npu": "true", "nvidia.com/gpu.present": "true"},
    }
    placed = {name: matching_variants(["npu", "gpu", "cpu"], labels) for name, labels in fleet.items()}
    assert placed == {"edge-npu-0": ["npu"], "edge-gpu-0": ["gpu"], "edge-cpu-0": ["cpu"], "both": ["npu"]}


def test_node_selector_is_anded_with_every_variant():
    selector = {"site": "berlin"}
    assert matching_variants(["gpu", "cpu"], {"nvidia.com/gpu.present": "true"}, selector) == []
    assert matching_variants(["gpu", "cpu"], {"nvidia.com/gpu.present": "true", "site": "berlin"}, selector) == ["gpu"]


def test_terms_are_one_per_label_of_the_class_each_with_all_exclusions():
    npu, gpu, cpu = CLASSES["npu"], CLASSES["gpu"], CLASSES["cpu"]
    terms = node_selector_terms([npu, gpu, cpu], 1)
    assert len(terms) == len(gpu.match_any_label)
    for term in terms:
        [own, *exclusions] = term["matchExpressions"]
        assert own["operator"] == "In" and own["key"] in gpu.match_any_label
        assert {e["key"] for e in exclusions} == set(npu.match_any_label)
        assert all(e["operator"] == "NotIn" for e in exclusions)


def test_a_lone_catch_all_class_needs_no_affinity():
    assert node_selector_terms([CLASSES["cpu"]], 0) == []
