"""Node eligibility: what the operator keeps of a Node, and which nodes a pod may land on.

The scheduler's rules as pure functions (node affinity terms, nodeSelector, NoSchedule/NoExecute taints),
used to name the nodes that lack an InferenceModel's pod and to select a FederatedRound's participants. It
sits on the lowest floor beside the API: render and status both use it, and it uses neither.

A round's participants are chosen once, when it starts, and deterministically: a node is eligible when it
matches the nodeSelector, is Ready, is not cordoned, and every NoSchedule or NoExecute taint it has is
tolerated (a client pod could not land there otherwise). Of the eligible nodes, the first maxClients by
name take part, so the same cluster always yields the same selection.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgeloop.api.federatedround import Participants

NodeSelectorTerm = dict[str, Any]


@dataclass(frozen=True)
class NodeInfo:
    """What the operator keeps of a Node."""

    name: str
    labels: Mapping[str, str]
    taints: tuple[Mapping[str, str], ...] = ()
    ready: bool = True
    unschedulable: bool = False

    @classmethod
    def from_object(cls, node: Mapping[str, Any]) -> NodeInfo:
        conditions = node.get("status", {}).get("conditions", [])
        spec = node.get("spec", {})
        return cls(
            name=node["metadata"]["name"],
            labels=dict(node["metadata"].get("labels", {})),
            taints=tuple({k: t[k] for k in ("key", "value", "effect") if k in t} for t in spec.get("taints", [])),
            ready=any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions),
            unschedulable=bool(spec.get("unschedulable")),
        )


def _expression_holds(expression: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
    if operator == "In":
        return key in labels and labels[key] in values
    if operator == "NotIn":
        return key not in labels or labels[key] not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    raise ValueError(f"unsupported node selector operator {operator!r}")


def node_matches(
    terms: Sequence[NodeSelectorTerm], node_selector: Mapping[str, str], labels: Mapping[str, str]
) -> bool:
    """Whether a node with `labels` satisfies required node affinity `terms` (ORed; [] is every node) and a
    nodeSelector, with the scheduler's semantics."""
    if any(labels.get(key) != value for key, value in node_selector.items()):
        return False
    if not terms:
        return True
    return any(all(_expression_holds(e, labels) for e in term["matchExpressions"]) for term in terms)


def tolerated(taint: Mapping[str, str], tolerations: Iterable[Mapping[str, Any]]) -> bool:
    for toleration in tolerations:
        if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
            continue
        if not toleration.get("key"):
            if toleration.get("operator") == "Exists":
                return True
            continue
        if toleration["key"] != taint.get("key"):
            continue
        if toleration.get("operator") == "Exists" or toleration.get("value", "") == taint.get("value", ""):
            return True
    return False


def eligible_nodes(
    nodes: Iterable[NodeInfo],
    terms: Sequence[NodeSelectorTerm],
    node_selector: Mapping[str, str],
    tolerations: Sequence[Mapping[str, Any]],
) -> list[str]:
    """The names, sorted, of the nodes where a pod may land: affinity and nodeSelector match, and every
    NoSchedule/NoExecute taint is tolerated (what the DaemonSet controller wants a pod on)."""
    return sorted(
        node.name
        for node in nodes
        if node_matches(terms, node_selector, node.labels)
        and all(tolerated(t, tolerations) for t in node.taints if t.get("effect") in ("NoSchedule", "NoExecute"))
    )


@dataclass(frozen=True)
class Selection:
    nodes: list[str]  # sorted; empty unless at least minClients nodes are eligible
    eligible: int

    @property
    def enough(self) -> bool:
        return bool(self.nodes)


def select(nodes: Iterable[NodeInfo], participants: Participants) -> Selection:
    """A FederatedRound's participants (module docstring)."""
    available = [node for node in nodes if node.ready and not node.unschedulable]
    tolerations = [t.to_wire() for t in participants.tolerations]
    eligible = eligible_nodes(available, [], participants.node_selector, tolerations)
    chosen = eligible[: participants.max_clients] if len(eligible) >= participants.min_clients else []
    return Selection(nodes=chosen, eligible=len(eligible))


def shortfall_message(selection: Selection, participants: Participants) -> str:
    """Why a round waits, for its Started condition."""
    where = f" matching nodeSelector {dict(participants.node_selector)}" if participants.node_selector else ""
    return (
        f"{selection.eligible} of the minClients {participants.min_clients} nodes are available{where} "
        "(Ready, schedulable, taints tolerated); the round starts when enough are"
    )
