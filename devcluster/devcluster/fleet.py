"""Fleet specs: node groups of simulated edge nodes, rendered as kwok-managed Node objects."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

DEFAULT_FLEET = Path(__file__).parent / "fleets" / "default.yaml"
# kwok manages exactly the nodes that carry this annotation; real kubelets (later) never do.
KWOK_ANNOTATION = {"kwok.x-k8s.io/node": "fake"}
BASE_CAPACITY = {"cpu": "4", "memory": "8Gi", "pods": "110", "ephemeral-storage": "50Gi"}


class Taint(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str
    value: str = ""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]


class NodeGroup(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    count: int = Field(ge=0)
    labels: dict[str, str] = {}
    taints: list[Taint] = []
    capacity: dict[str, str] = {}
    # kwok: simulated nodes (many, cheap). kubelet: real nodes that run their pods (see nodes.py).
    runtime: Literal["kwok", "kubelet"] = "kwok"


class Fleet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    groups: list[NodeGroup] = Field(min_length=1)
    # RuntimeClasses the nodes' container runtime offers, each with the handler of the same name, as k3s
    # registers `nvidia` when it finds the NVIDIA container runtime on a node.
    runtimeClasses: list[str] = []

    @property
    def size(self) -> int:
        return sum(group.count for group in self.groups)

    def scaled_to(self, total: int) -> Fleet:
        """The same mix of simulated groups with `total` nodes in all (largest-remainder rounding)."""
        simulated = [group for group in self.groups if group.runtime == "kwok"]
        size = sum(group.count for group in simulated)
        if size == 0:
            raise ValueError("cannot scale a fleet with no simulated nodes")
        shares = [group.count * total / size for group in simulated]
        counts = [int(share) for share in shares]
        by_remainder = sorted(range(len(shares)), key=lambda i: shares[i] - counts[i], reverse=True)
        for i in by_remainder[: total - sum(counts)]:
            counts[i] += 1
        scaled = {id(g): g.model_copy(update={"count": n}) for g, n in zip(simulated, counts, strict=True)}
        return self.model_copy(update={"groups": [scaled.get(id(g), g) for g in self.groups]})

    def with_real_nodes(self, count: int) -> Fleet:
        """The fleet with `count` real nodes in its first group of runtime kubelet (the default fleet's
        GPU-labelled `edge-real`)."""
        real = [group.name for group in self.groups if group.runtime == "kubelet"]
        if not real:
            raise ValueError("--real-nodes needs a fleet with a group of runtime kubelet")
        return self.with_counts({real[0]: count})

    def with_counts(self, counts: dict[str, int]) -> Fleet:
        """The fleet with the named groups' counts changed (e.g. {"edge-real-npu": 1, "edge-arm64": 2})."""
        unknown = set(counts) - {group.name for group in self.groups}
        if unknown:
            raise ValueError(f"the fleet has no group {', '.join(sorted(unknown))}")
        if any(count < 0 for count in counts.values()):
            raise ValueError("a group's count cannot be negative")
        return self.model_copy(update={"groups": [
            group.model_copy(update={"count": counts[group.name]}) if group.name in counts else group
            for group in self.groups]})

    def real_nodes(self) -> list[tuple[str, NodeGroup]]:
        """(name, group) of every real node, in order: the node's index is its position here."""
        return [(f"{group.name}-{index}", group) for group in self.groups if group.runtime == "kubelet"
                for index in range(group.count)]


def load_fleet(path: Path | None = None) -> Fleet:
    return Fleet.model_validate(yaml.safe_load((path or DEFAULT_FLEET).read_text()))


def runtime_class_manifests(fleet: Fleet) -> list[dict]:
    return [
        {"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass", "metadata": {"name": name}, "handler": name}
        for name in fleet.runtimeClasses
    ]


def node_manifests(fleet: Fleet) -> list[dict]:
    """Node objects for every node of the fleet; kwok makes them Ready and runs their pods' lifecycle."""
    nodes = []
    for group in fleet.groups:
        if group.runtime != "kwok":
            continue
        capacity = {**BASE_CAPACITY, **group.capacity}
        for index in range(group.count):
            name = f"{group.name}-{index}"
            labels = {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "edgeloop.io/node-group": group.name,
                **group.labels,
            }
            nodes.append(
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "annotations": dict(KWOK_ANNOTATION),
                        "labels": labels,
                    },
                    "spec": {"taints": [taint.model_dump() for taint in group.taints]},
                    "status": {"capacity": capacity, "allocatable": capacity, "nodeInfo": {
                        "architecture": labels["kubernetes.io/arch"], "operatingSystem": "linux"}},
                }
            )
    return nodes
