"""InferenceModel status: conditions, counts and events computed from DaemonSets and node problems."""

from __future__ import annotations

import pytest
from edgeloop.api.inferencemodel import InferenceModelStatus
from edgeloop.status import condition
from edgeloop.status.diagnosis import NodeProblem
from edgeloop.status.inferencemodel import (
    DaemonSetState,
    Expected,
    ProvidersSample,
    SpecProblem,
    compute,
    parse_providers,
    transitions,
    unreadable,
)
from im_factories import SHA_B, spec

EXPECTED = [
    Expected("npu", "digits-npu", "h-npu", ("OpenVINOExecutionProvider", "CPUExecutionProvider")),
    Expected("gpu", "digits-gpu", "h-gpu", ("CUDAExecutionProvider", "CPUExecutionProvider")),
    Expected("cpu", "digits-cpu", "h-cpu", ("CPUExecutionProvider",)),
]


def ds(name, desired, ready, updated=None, *, render_hash=None, settled=True, scheduled=None):
    return DaemonSetState(
        name=f"digits-{name}", uid=f"uid-{name}", render_hash=render_hash or f"h-{name}", generation=2,
        observed_generation=2 if settled else 1, desired=desired, ready=ready,
        updated=desired if updated is None else updated, scheduled=desired if scheduled is None else scheduled,
    )


def fleet(**counts):
    """DaemonSets keyed by name; counts per class: (desired, ready[, updated])."""
    return {f"digits-{name}": ds(name, *values) for name, values in counts.items()}


def status(daemon_sets, problems=(), previous=None, generation=2, now="2026-11-28T10:00:00Z", **kwargs):
    return compute(
        generation=generation, spec=kwargs.pop("model_spec", spec()), expected=EXPECTED, daemon_sets=daemon_sets,
        problems=list(problems), previous=previous or InferenceModelStatus(), now=now, **kwargs,
    )


def conditions(result, *types):
    """By type, (status, reason) of the conditions of `types`, by default of all but Accelerated."""
    types = types or ("Ready", "Progressing", "Degraded")
    return {c.type: (c.status, c.reason) for c in result.conditions if c.type in types}


def test_before_any_daemon_set_exists():
    result = status({})
    assert conditions(result) == {
        "Ready": ("False", "RollingOut"), "Progressing": ("True", "RollingOut"), "Degraded": ("False", "AsExpected"),
    }
    assert result.observed_generation == 0 and result.model is None


def test_all_nodes_ready():
    result = status(fleet(npu=(2, 2), gpu=(2, 2), cpu=(2, 2)))
    assert conditions(result) == {
        "Ready": ("True", "AllNodesReady"), "Progressing": ("False", "RolloutComplete"),
        "Degraded": ("False", "AsExpected"),
    }
    assert (result.desired_nodes, result.ready_nodes, result.nodes) == (6, 6, "6/6")
    assert result.observed_generation == 2 and result.model.version == "3"
    assert [(v.accelerator, v.daemon_set, v.desired, v.ready, v.updated) for v in result.variants] == [
        ("npu", "digits-npu", 2, 2, 2), ("gpu", "digits-gpu", 2, 2, 2), ("cpu", "digits-cpu", 2, 2, 2)]
    assert result.variants[1].providers_in_use == [], "until its runtime is asked, nothing is claimed"
    assert all(c.observed_generation == 2 for c in result.conditions)


def test_a_class_without_nodes_is_fine_when_others_have_some():
    result = status(fleet(npu=(0, 0), gpu=(2, 2), cpu=(4, 4)))
    assert conditions(result)["Ready"] == ("True", "AllNodesReady")


def test_no_matching_nodes_is_degraded():
    on_mars = spec(placement={"nodeSelector": {"site": "mars"}})
    result = status(fleet(npu=(0, 0), gpu=(0, 0), cpu=(0, 0)), model_spec=on_mars)
    assert conditions(result)["Degraded"] == ("True", "NoMatchingNodes")
    assert conditions(result)["Ready"] == ("False", "NoMatchingNodes")
    assert "'site': 'mars'" in condition(result.conditions, "Degraded").message


def test_counts_of_a_daemon_set_the_controller_has_not_processed_yet_do_not_mean_no_nodes():
    daemon_sets = {name: ds(name, 0, 0, settled=False) for name in ("npu", "gpu", "cpu")}
    assert conditions(status(daemon_sets))["Degraded"] == ("False", "AsExpected")


def test_a_new_model_rolls_out():
    previous = status(fleet(npu=(2, 2), gpu=(2, 2), cpu=(2, 2)))
    rolling = {  # the cpu DaemonSet already runs the new template on one of its two nodes
        "digits-npu": ds("npu", 2, 2, render_hash="old"), "digits-gpu": ds("gpu", 2, 2, render_hash="old"),
        "digits-cpu": ds("cpu", 2, 1, 1),
    }
    result = status(rolling, previous=previous, generation=3, model_spec=spec(model={"sha256": SHA_B, "version": "4"}))
    assert conditions(result)["Progressing"] == ("True", "RollingOut")
    assert conditions(result)["Ready"] == ("False", "RollingOut")
    assert result.observed_generation == 2 and result.model.version == "3", "not applied yet everywhere"
    assert [v.updated for v in result.variants] == [0, 0, 1]


def test_failures_degrade_and_name_the_nodes():
    problems = [
        NodeProblem("edge-gpu-0", "gpu", "FetchFailed", "connection refused"),
        NodeProblem("edge-gpu-1", "gpu", "DigestMismatch", "has sha256 ..., expected ..."),
        NodeProblem("edge-cpu-0", "cpu", "Starting", "loading"),
    ]
    result = status(fleet(npu=(0, 0), gpu=(2, 0), cpu=(2, 1)), problems)
    assert conditions(result)["Degraded"] == ("True", "DigestMismatch"), "the most telling reason wins"
    assert condition(result.conditions, "Degraded").message.startswith("1 node DigestMismatch: edge-gpu-1")
    assert conditions(result)["Progressing"] == ("False", "RolloutBlocked")
    assert [(n.node, n.reason) for n in result.unhealthy_nodes] == [
        ("edge-gpu-0", "FetchFailed"), ("edge-gpu-1", "DigestMismatch"), ("edge-cpu-0", "Starting")]


def test_starting_pods_are_listed_but_not_degraded():
    result = status(fleet(npu=(0, 0), gpu=(0, 0), cpu=(2, 1)), [NodeProblem("edge-cpu-0", "cpu", "Starting")])
    assert conditions(result)["Degraded"] == ("False", "AsExpected")
    assert conditions(result)["Progressing"] == ("True", "RollingOut")


def test_unhealthy_nodes_are_capped_at_50_and_counted():
    problems = [NodeProblem(f"edge-{i:03}", "cpu", "FetchFailed", "boom") for i in range(120)]
    result = status(fleet(npu=(0, 0), gpu=(0, 0), cpu=(120, 0)), problems)
    assert len(result.unhealthy_nodes) == 50 and result.unhealthy_node_count == 120
    assert condition(result.conditions, "Degraded").message.startswith("120 nodes FetchFailed: edge-000 (and 119 more)")


def test_spec_problems_degrade_without_a_rollout():
    result = status(fleet(npu=(1, 1), gpu=(1, 1), cpu=(1, 1)),
                    spec_problem=SpecProblem("ApplyRejected", "DaemonSet.apps is invalid"))
    assert conditions(result) == {
        "Ready": ("False", "ApplyRejected"), "Progressing": ("False", "ApplyRejected"),
        "Degraded": ("True", "ApplyRejected"),
    }
    assert result.observed_generation == 2


def test_unreadable_spec_keeps_the_last_numbers():
    previous = status(fleet(npu=(1, 1), gpu=(1, 1), cpu=(1, 1)))
    result = unreadable(previous, 3, SpecProblem("InvalidSpec", "bad"), "2026-11-28T11:00:00Z")
    assert conditions(result)["Degraded"] == ("True", "InvalidSpec")
    assert result.nodes == "3/3" and result.observed_generation == 3


def test_transition_times_move_only_when_the_status_does():
    ready = status(fleet(npu=(2, 2), gpu=(2, 2), cpu=(2, 2)), now="2026-11-28T10:00:00Z")
    later = status(fleet(npu=(2, 2), gpu=(2, 2), cpu=(2, 2)), previous=ready, now="2026-11-28T10:05:00Z")
    assert later == ready, "an unchanged fleet gives an identical status: nothing to write"
    broken = status(fleet(npu=(2, 2), gpu=(2, 1), cpu=(2, 2)), [NodeProblem("edge-gpu-0", "gpu", "RuntimeFailed")],
                    previous=ready, now="2026-11-28T10:06:00Z")
    times = {c.type: c.last_transition_time for c in broken.conditions}
    assert times == {"Ready": "2026-11-28T10:06:00Z", "Progressing": "2026-11-28T10:00:00Z",
                     "Degraded": "2026-11-28T10:06:00Z", "Accelerated": "2026-11-28T10:00:00Z"}


def test_events_on_significant_transitions_only():
    created = status({})
    assert transitions(InferenceModelStatus(), created) == []
    applied = status(fleet(npu=(2, 0, 0), gpu=(2, 0, 0), cpu=(2, 0, 0)), previous=created)
    assert [(e.type, e.reason) for e in transitions(created, applied)] == [("Normal", "RollingOut")]
    ready = status(fleet(npu=(2, 2), gpu=(2, 2), cpu=(2, 2)), previous=applied)
    assert [(e.type, e.reason) for e in transitions(applied, ready)] == [("Normal", "Ready")]
    assert transitions(ready, ready) == []
    failing = status(fleet(npu=(2, 2), gpu=(2, 1), cpu=(2, 2)), [NodeProblem("edge-gpu-0", "gpu", "RuntimeFailed")],
                     previous=ready)
    assert [(e.type, e.reason) for e in transitions(ready, failing)] == [("Warning", "RuntimeFailed")]
    healed = status(fleet(npu=(2, 2), gpu=(2, 2), cpu=(2, 2)), previous=failing)
    assert [(e.type, e.reason) for e in transitions(failing, healed)] == [("Normal", "Ready"), ("Normal", "Recovered")]


# ---- Accelerated: what the runtimes report they run on

OPENVINO = ProvidersSample("edge-npu-0", ("OpenVINOExecutionProvider", "CPUExecutionProvider"))
CUDA = ProvidersSample("edge-gpu-0", ("CUDAExecutionProvider", "CPUExecutionProvider"))
ON_CPU = ProvidersSample("edge-gpu-1", ("CPUExecutionProvider",))


def test_every_accelerated_variant_on_its_provider_is_accelerated_and_reported_per_variant():
    result = status(fleet(npu=(2, 2), gpu=(3, 3), cpu=(2, 2)), samples={"digits-npu": OPENVINO, "digits-gpu": CUDA})
    assert conditions(result, "Accelerated") == {"Accelerated": ("True", "AcceleratorsInUse")}
    variants = {v.accelerator: (v.providers_in_use, v.providers_reported_by) for v in result.variants}
    assert variants == {
        "npu": (["OpenVINOExecutionProvider", "CPUExecutionProvider"], "edge-npu-0"),
        "gpu": (["CUDAExecutionProvider", "CPUExecutionProvider"], "edge-gpu-0"),
        "cpu": ([], ""),
    }, "what runs, never what is configured"


def test_a_cpu_fallback_stays_ready_and_says_where_and_what_is_missing():
    result = status(fleet(npu=(0, 0), gpu=(3, 3), cpu=(2, 2)), samples={"digits-gpu": ON_CPU})
    assert conditions(result, "Ready", "Accelerated") == {
        "Ready": ("True", "AllNodesReady"), "Accelerated": ("False", "CPUFallback"),
    }
    message = condition(result.conditions, "Accelerated").message
    assert "gpu variant runs on CPUExecutionProvider without CUDAExecutionProvider on node edge-gpu-1" in message
    assert "1 of its 3 nodes" in message
    assert result.variants[1].providers_in_use == ["CPUExecutionProvider"]
    events = [(e.type, e.reason) for e in transitions(InferenceModelStatus(), result)]
    assert ("Warning", "CPUFallback") in events
    assert [e for e in transitions(result, result) if e.reason == "CPUFallback"] == [], "once"


def test_accelerated_is_unknown_until_every_accelerated_variant_was_asked():
    result = status(fleet(npu=(2, 2), gpu=(3, 3), cpu=(2, 2)), samples={
        "digits-npu": OPENVINO, "digits-gpu": ProvidersSample("edge-gpu-0", error="HTTP 503: no endpoints"),
    })
    assert conditions(result, "Accelerated") == {"Accelerated": ("Unknown", "NotSampled")}
    assert condition(result.conditions, "Accelerated").message.startswith("not known yet for gpu:")
    asked_later = status(fleet(npu=(2, 2), gpu=(3, 3), cpu=(2, 2)), samples={"digits-npu": OPENVINO})
    assert asked_later.conditions == result.conditions, "a failed ask changes nothing to write (the log says why)"
    assert conditions(status({}), "Accelerated") == {"Accelerated": ("Unknown", "NotSampled")}


def test_only_cpu_nodes_means_nothing_to_accelerate():
    result = status(fleet(npu=(0, 0), gpu=(0, 0), cpu=(4, 4)))
    assert conditions(result, "Accelerated") == {"Accelerated": ("False", "NoAcceleratedNodes")}


@pytest.mark.parametrize(("answer", "expected"), [
    ('{"parameters": {"execution_providers": "CUDAExecutionProvider,CPUExecutionProvider"}}',
     ("CUDAExecutionProvider", "CPUExecutionProvider")),
    ('{"parameters": {"execution_providers": ["CPUExecutionProvider"]}}', ("CPUExecutionProvider",)),
])
def test_the_runtimes_answer_parses(answer, expected):
    assert parse_providers(answer) == expected


@pytest.mark.parametrize("answer", [
    "{}", "[]", "not json", '{"parameters": {"execution_providers": ""}}',
    '{"parameters": {"execution_providers": "<script>"}}',
    '{"parameters": {"execution_providers": "' + ",".join(["XExecutionProvider"] * 17) + '"}}',
])
def test_anything_else_is_refused(answer):
    with pytest.raises(ValueError):
        parse_providers(answer)


def offline_fleets(*offline, template="t-cpu", counted=False, pod_template="old"):
    """The cpu variant with offline nodes (each with a pod of `pod_template`, version 1 when old)."""
    from edgeloop.status.rollout import OfflineView, PodView, VariantFleet

    pods = tuple(
        PodView(name=f"p-{node}", uid=f"u-{node}", node=node, template=pod_template,
                version="1" if pod_template == "old" else "3", created="", ready=False, restarts=0, deleting=False)
        for node in offline
    )
    views = tuple(OfflineView(node, node != "edge-cpu-9", f"2026-11-28T09:0{i}:00Z", counted)
                  for i, node in enumerate(offline))
    return {"digits-cpu": VariantFleet("cpu", "digits-cpu", template, desired=2, ready=2, complete=True, pods=pods,
                                       offline=views)}


def test_offline_nodes_are_not_a_fault_of_the_model():
    """Every reachable node serves; two are offline with the old version: NodesOffline, not Degraded."""
    result = status(fleet(npu=(2, 2), gpu=(2, 2), cpu=(2, 2)), fleets=offline_fleets("edge-cpu-8", "edge-cpu-9"))
    assert conditions(result) == {
        "Ready": ("True", "NodesOffline"), "Progressing": ("False", "NodesOffline"),
        "Degraded": ("False", "NodesOffline"),
    }
    assert (result.desired_nodes, result.ready_nodes, result.nodes, result.updated_nodes) == (8, 6, "6/8", 6)
    assert result.offline_node_count == 2 and result.variants[2].offline == 2
    assert [(n.node, n.accelerator, n.reason, n.since, n.version, n.updated) for n in result.offline_nodes] == [
        ("edge-cpu-8", "cpu", "Unreachable", "2026-11-28T09:00:00Z", "1", False),
        ("edge-cpu-9", "cpu", "NotReady", "2026-11-28T09:01:00Z", "1", False),
    ]
    progressing = condition(result.conditions, "Progressing").message
    assert progressing == (
        "every reachable node runs version 3; 2 offline nodes run an older one and update when they return: "
        "edge-cpu-8 (unreachable since 2026-11-28T09:00:00Z, version 1), "
        "edge-cpu-9 (notready since 2026-11-28T09:01:00Z, version 1)"
    )
    assert "edge-cpu-8" in condition(result.conditions, "Ready").message
    assert "edge-cpu-8" in condition(result.conditions, "Degraded").message


def test_offline_nodes_that_run_the_current_version_leave_the_rollout_complete():
    result = status(fleet(npu=(2, 2), gpu=(2, 2), cpu=(2, 2)),
                    fleets=offline_fleets("edge-cpu-8", pod_template="t-cpu"))
    assert conditions(result)["Progressing"] == ("False", "RolloutComplete")
    assert conditions(result)["Ready"] == ("True", "NodesOffline")
    assert result.updated_nodes == 7 and result.offline_nodes[0].updated


def test_an_offline_node_the_daemon_set_still_counts_is_counted_once():
    """Before the node lifecycle controller's NoSchedule taint lands, the DaemonSet counts the node itself."""
    result = status(fleet(npu=(2, 2), gpu=(2, 2), cpu=(3, 2, 3)), fleets=offline_fleets("edge-cpu-8", counted=True))
    assert (result.desired_nodes, result.offline_node_count) == (7, 1)


def test_every_node_offline():
    result = status(fleet(npu=(0, 0), gpu=(0, 0), cpu=(0, 0)), fleets=offline_fleets("edge-cpu-8"))
    assert conditions(result)["Ready"] == ("False", "NodesOffline")
    assert conditions(result)["Degraded"] == ("False", "NodesOffline"), "no NoMatchingNodes either"


def test_a_halted_rollout_is_degraded_and_says_why():
    from edgeloop.api.inferencemodel import RolloutStatus

    halted = RolloutStatus(revision="r", state="Halted", wave=1, waves=3, reason="FetchFailed",
                           message="wave 1/3 halted (FetchFailed): the new pod p on node edge-cpu-0 (cpu): refused")
    result = status(fleet(npu=(2, 2), gpu=(2, 2), cpu=(2, 2, 1)), rollout=halted)
    assert conditions(result) == {
        "Ready": ("False", "RolloutHalted"), "Progressing": ("False", "RolloutHalted"),
        "Degraded": ("True", "RolloutHalted"),
    }
    assert condition(result.conditions, "Degraded").message == halted.message
    assert result.rollout == halted
    assert ("Warning", "RolloutHalted") in [(e.type, e.reason) for e in transitions(InferenceModelStatus(), result)]


def test_a_rollout_in_waves_says_where_it_stands():
    from edgeloop.api.inferencemodel import RolloutStatus

    paused = RolloutStatus(revision="r", state="Paused", wave=1, waves=3, healthy_since="2026-11-28T09:59:50Z")
    result = status(fleet(npu=(2, 2), gpu=(2, 2), cpu=(2, 2, 1)),
                    model_spec=spec(rollout={"waves": [1, "50%"], "pauseSeconds": 30}), rollout=paused)
    assert condition(result.conditions, "Progressing").message == (
        "wave 1/3 done, its new pods watched for 30 s before the next wave: 5/6 nodes updated to version 3")


def test_events_of_offline_nodes_and_waves():
    from edgeloop.api.inferencemodel import RolloutStatus

    ready = status(fleet(npu=(2, 2), gpu=(2, 2), cpu=(2, 2)))
    offline = status(fleet(npu=(2, 2), gpu=(2, 2), cpu=(2, 2)), fleets=offline_fleets("edge-cpu-8"), previous=ready)
    assert [(e.type, e.reason) for e in transitions(ready, offline)] == [("Normal", "NodesOffline")]
    assert transitions(offline, offline) == []

    one = ready.model_copy(update={"rollout": RolloutStatus(revision="r", wave=1, waves=3)})
    two = ready.model_copy(update={"rollout": RolloutStatus(revision="r", wave=2, waves=3)})
    assert [(e.reason, e.message) for e in transitions(one, two)] == [("WaveStarted", "wave 2/3 of the rollout")]
