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
    # Ready Unknown: the node stopped reporting (unreachable); False: it reports itself not ready.
    unreachable: bool = False
    ready_since: str = ""  # when its Ready condition last changed

    @classmethod
    def from_object(cls, node: Mapping[str, Any]) -> NodeInfo:
        conditions = node.get("status", {}).get("conditions", [])
        ready = next((c for c in conditions if c.get("type") == "Ready"), {})
        spec = node.get("spec", {})
        return cls(
            name=node["metadata"]["name"],
            labels=dict(node["metadata"].get("labels", {})),
            taints=tuple({k: t[k] for k in ("key", "value", "effect") if k in t} for t in spec.get("taints", [])),
            ready=ready.get("status") == "True",
            unschedulable=bool(spec.get("unschedulable")),
            unreachable=ready.get("status", "Unknown") == "Unknown",
            ready_since=ready.get("lastTransitionTime", ""),
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


# Taints the node lifecycle controller puts on a node that is not Ready. A DaemonSet's pods tolerate their
# NoExecute form (they stay on the node), not their NoSchedule form (no new pod lands there).
OFFLINE_TAINT_KEYS = ("node.kubernetes.io/unreachable", "node.kubernetes.io/not-ready")
# What the DaemonSet controller adds to every pod it makes (AddOrUpdateDaemonPodTolerations).
DAEMON_SET_TOLERATIONS: tuple[Mapping[str, str], ...] = (
    *({"key": key, "operator": "Exists", "effect": "NoExecute"} for key in OFFLINE_TAINT_KEYS),
    *(
        {"key": f"node.kubernetes.io/{key}", "operator": "Exists", "effect": "NoSchedule"}
        for key in ("disk-pressure", "memory-pressure", "pid-pressure", "unschedulable")
    ),
)


def offline_nodes(
    nodes: Iterable[NodeInfo],
    terms: Sequence[NodeSelectorTerm],
    node_selector: Mapping[str, str],
    tolerations: Sequence[Mapping[str, Any]],
) -> list[NodeInfo]:
    """The nodes, sorted by name, that are not Ready but would run a pod of these terms, selector and
    tolerations were they Ready: a variant's offline nodes."""
    offline = [node for node in nodes if not node.ready]
    ignoring = [{"key": key, "operator": "Exists"} for key in OFFLINE_TAINT_KEYS]
    eligible = set(eligible_nodes(offline, terms, node_selector, [*tolerations, *ignoring]))
    return sorted((node for node in offline if node.name in eligible), key=lambda node: node.name)


def counted_by_daemon_set(node: NodeInfo, tolerations: Sequence[Mapping[str, Any]]) -> bool:
    """Whether the DaemonSet controller still counts this (offline) node among the nodes that should run its
    pods: it does until the node lifecycle controller's NoSchedule taint lands, unless the pods tolerate it."""
    return all(
        tolerated(taint, tolerations)
        for taint in node.taints
        if taint.get("key") in OFFLINE_TAINT_KEYS and taint.get("effect") == "NoSchedule"
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
