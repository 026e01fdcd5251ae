"""Node eligibility: where a pod may land, and a FederatedRound's participants (eligible nodes, the first
maxClients by name, or none)."""

from __future__ import annotations

from edgeloop.api.federatedround import Participants
from edgeloop.nodes import NodeInfo, eligible_nodes, select, shortfall_message
from im_factories import node

FLEET = [
    node("edge-npu-1", {"edgeloop.io/accelerator.npu": "true", "site": "a"}),
    node("edge-cpu-0", {"site": "a"}),
    node("edge-gpu-0", {"edgeloop.io/accelerator.gpu": "true", "site": "b"}),
    node("edge-cpu-1", {"site": "b"}),
    node("edge-npu-0", {"edgeloop.io/accelerator.npu": "true", "site": "a"}),
]


def candidates(nodes=FLEET):
    return [NodeInfo.from_object(n) for n in nodes]


def participants(**fields) -> Participants:
    return Participants.model_validate(fields)


def test_the_first_max_clients_by_name_whatever_the_order_nodes_arrive_in():
    chosen = select(candidates(), participants(minClients=2, maxClients=3))
    assert chosen.nodes == ["edge-cpu-0", "edge-cpu-1", "edge-gpu-0"]
    assert chosen.eligible == 5
    assert select(candidates(FLEET[::-1]), participants(minClients=2, maxClients=3)) == chosen


def test_the_node_selector_narrows_the_choice():
    chosen = select(candidates(), participants(nodeSelector={"site": "a"}, minClients=1))
    assert chosen.nodes == ["edge-cpu-0", "edge-npu-0", "edge-npu-1"]


def test_not_ready_and_cordoned_nodes_are_left_out():
    fleet = [
        node("a", ready=False),
        {**node("b"), "spec": {"unschedulable": True}},
        node("c"),
        node("d"),
    ]
    assert select(candidates(fleet), participants(minClients=1)).nodes == ["c", "d"]


def test_a_taint_is_a_barrier_unless_tolerated():
    gpu_taint = {"key": "nvidia.com/gpu", "effect": "NoSchedule"}
    fleet = [node("a", taints=[gpu_taint]), node("b", taints=[{"key": "x", "effect": "PreferNoSchedule"}]), node("c")]
    assert select(candidates(fleet), participants(minClients=1)).nodes == ["b", "c"]
    tolerant = participants(minClients=1, tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists"}])
    assert select(candidates(fleet), tolerant).nodes == ["a", "b", "c"]


def test_fewer_than_min_clients_selects_no_one_and_says_why():
    wanted = participants(nodeSelector={"site": "b"}, minClients=3)
    chosen = select(candidates(), wanted)
    assert chosen.nodes == [] and not chosen.enough and chosen.eligible == 2
    message = shortfall_message(chosen, wanted)
    assert message.startswith("2 of the minClients 3 nodes are available matching nodeSelector {'site': 'b'}")


def test_exactly_min_clients_is_enough():
    chosen = select(candidates(), participants(minClients=5, maxClients=5))
    assert chosen.enough and len(chosen.nodes) == 5


def test_eligible_nodes_follow_affinity_selector_and_taints():
    terms = [{"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["true"]}]}]
    nodes = [NodeInfo.from_object(n) for n in (
        node("a", {"gpu": "true"}),
        node("b", {"gpu": "true"}, taints=[{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]),
        node("c", {"gpu": "true"}, taints=[{"key": "dedicated", "value": "ml", "effect": "NoExecute"}]),
        node("d", {"gpu": "true"}, taints=[{"key": "soft", "effect": "PreferNoSchedule"}]),
        node("e", {}),
    )]
    tolerations = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert eligible_nodes(nodes, terms, {}, tolerations) == ["a", "b", "d"]
    assert eligible_nodes(nodes, terms, {}, [*tolerations, {"key": "dedicated", "value": "ml"}]) == ["a", "b", "c", "d"]
    assert eligible_nodes(nodes, terms, {"zone": "x"}, [{"operator": "Exists"}]) == []
