"""Which node runs which variant: node affinity that makes accelerator classes mutually exclusive.

For accelerators [c1, c2, ..., cn] the variant of class ci matches a node that has ci and none of c1..ci-1.
A class has a node when the node carries any of the class's labels; the catch-all class (no labels) has
every node. Since each variant excludes all earlier ones, every node matches at most one variant, and
exactly one when the list ends with the catch-all class.

In a nodeSelectorTerm the expressions are ANDed and the terms are ORed, so "has ci" (an OR over its
labels) becomes one term per label, each carrying all the exclusions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from edgeloop.config import AcceleratorClass
from edgeloop.nodes import NodeSelectorTerm


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


def node_selector_terms(classes: Sequence[AcceleratorClass], index: int) -> list[NodeSelectorTerm]:
    """The required node affinity of the variant of `classes[index]`; [] means "every node"."""
    exclusions = _exclusions(classes[:index])
    own = classes[index]
    if own.is_catch_all:
        return [{"matchExpressions": exclusions}] if exclusions else []
    return [
        {"matchExpressions": [{"key": key, "operator": "In", "values": [value]}, *exclusions]}
        for key, value in sorted(own.match_any_label.items())
    ]
