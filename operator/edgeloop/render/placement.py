"""Which node runs which variant: node affinity that makes accelerator classes mutually exclusive.

For accelerators [c1, c2, ..., cn] the variant of class ci matches a node that has ci and none of c1..ci-1.
A class has a node when the node carries any of the class's labels; the catch-all class (no labels) has
every node. Since each variant excludes all earlier ones, every node matches at most one variant, and
exactly one when the list ends with the catch-all class.

A class whose image is built for some architectures only (`architectures`, e.g. the cuda and openvino
flavours: amd64) has only the nodes of those architectures (label kubernetes.io/arch, which every kubelet
sets): an arm64 board labelled as a GPU node runs the next class it has, not an image that cannot exist for
it. The terms are then split by architecture, each with the exclusions of the earlier classes that can have
a node of it.

In a nodeSelectorTerm the expressions are ANDed and the terms are ORed, so "has ci" (an OR over its
labels) becomes one term per label, each carrying all the exclusions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgeloop.config import AcceleratorClass
from edgeloop.nodes import NodeSelectorTerm

ARCH_LABEL = "kubernetes.io/arch"  # the node's architecture; every kubelet sets it


def _exclusions(earlier: Sequence[AcceleratorClass]) -> list[dict[str, Any]]:
    """Expressions that hold on nodes having none of `earlier`: label NotIn [values], one per key."""
    values_by_key: dict[str, list[str]] = {}
    for cls in earlier:
        for key, value in cls.match_any_label.items():
            values = values_by_key.setdefault(key, [])
            if value not in values:
                values.append(value)
    return [
        {"key": key, "operator": "NotIn", "values": values} for key, values in sorted(values_by_key.items())
    ]


def _built_for(cls: AcceleratorClass, arch: str | None) -> bool:
    """Whether the class can have a node of `arch` (None: an architecture that no class in question lists)."""
    return not cls.architectures or arch in cls.architectures


def node_selector_terms(classes: Sequence[AcceleratorClass], index: int) -> list[NodeSelectorTerm]:
    """The required node affinity of the variant of `classes[index]`; [] means "every node"."""
    earlier, own = classes[:index], classes[index]
    listed = sorted({arch for cls in classes[: index + 1] for arch in cls.architectures})
    # Per architecture the classes earlier in the list that can have its nodes; the architectures with the same
    # ones share their terms. None stands for every architecture that no class here lists.
    archs_by_earlier: dict[tuple[int, ...], list[str | None]] = {}
    for arch in [*listed, None]:
        if _built_for(own, arch):
            applicable = tuple(i for i, cls in enumerate(earlier) if _built_for(cls, arch))
            archs_by_earlier.setdefault(applicable, []).append(arch)
    terms = []
    for applicable, archs in archs_by_earlier.items():
        exclusions = _exclusions([earlier[i] for i in applicable])
        if None not in archs:
            arch = [{"key": ARCH_LABEL, "operator": "In", "values": archs}]
        else:  # NotIn the listed architectures that do not share these terms (none listed: no expression)
            others = [a for a in listed if a not in archs]
            arch = [{"key": ARCH_LABEL, "operator": "NotIn", "values": others}] if others else []
        if own.is_catch_all:
            terms.append([*arch, *exclusions])
        else:
            terms += [
                [{"key": key, "operator": "In", "values": [value]}, *arch, *exclusions]
                for key, value in sorted(own.match_any_label.items())
            ]
    return [] if terms == [[]] else [{"matchExpressions": expressions} for expressions in terms]
