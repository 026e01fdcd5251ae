"""Which nodes take part in a FederatedRound: chosen once, when it starts, and deterministically.

A node is eligible when it matches the nodeSelector, is Ready, is not cordoned, and every NoSchedule or
NoExecute taint it has is tolerated (a client pod could not land there otherwise). Of the eligible nodes,
the first maxClients by name take part, so the same cluster always yields the same selection.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgeloop.api.federatedround import Participants
from edgeloop.status.diagnosis import NodeInfo, eligible_nodes


@dataclass(frozen=True)
class Candidate:
    """What selection needs to know of a Node."""

    node: NodeInfo
    unschedulable: bool = False

    @classmethod
    def from_object(cls, node: Mapping[str, Any]) -> Candidate:
        return cls(NodeInfo.from_object(node), bool(node.get("spec", {}).get("unschedulable")))


@dataclass(frozen=True)
class Selection:
    nodes: list[str]  # sorted; empty unless at least minClients nodes are eligible
    eligible: int

    @property
    def enough(self) -> bool:
        return bool(self.nodes)


def select(candidates: Iterable[Candidate], participants: Participants) -> Selection:
    available = [c.node for c in candidates if c.node.ready and not c.unschedulable]
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
