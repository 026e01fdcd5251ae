"""The operator-driven rollout (status/rollout.py): waves on reachable nodes, offline nodes left alone until they
return, and a wave that fails halts the rollout, saying why."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from edgeloop.api.inferencemodel import Rollout
from edgeloop.status import rollout
from edgeloop.status.diagnosis import NodeProblem
from edgeloop.status.rollout import ErrorRate, OfflineView, PodView, VariantFleet

OLD, NEW = "old-template", "new-template"
T0 = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)


def at(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(node: str, template: str = OLD, *, ready: bool = True, restarts: int = 0, problem: str = "") -> PodView:
    found = NodeProblem(node, "cpu", problem, f"{problem} on {node}") if problem else None
    return PodView(name=f"m-{node}-{template[:3]}", uid=f"uid-{node}-{template}", node=node, template=template,
                   version="2" if template == NEW else "1", created=at(0), ready=ready, restarts=restarts,
                   deleting=False, problem=found)


def fleet(pods, offline=(), accelerator="cpu") -> VariantFleet:
    offline_views = tuple(OfflineView(name, True, at(-600), False) for name in offline)
    reachable = [p for p in pods if p.node not in offline]
    return VariantFleet(
        accelerator=accelerator, daemon_set=f"m-{accelerator}", template=NEW, desired=len(reachable),
        ready=sum(p.ready for p in reachable),
        complete=all(p.ready and p.template == NEW for p in reachable), pods=tuple(pods), offline=offline_views,
    )


def nodes(count: int, prefix: str = "edge") -> list[str]:
    return [f"{prefix}-{i}" for i in range(count)]


class Fleet:
    """A variant's pods as the DaemonSet controller and the nodes would make them: a deleted pod's node gets a
    pod of the new template, ready at the next step (or never, or failing, as the test says)."""

    def __init__(self, names, offline=(), accelerator="cpu", new_pod=None):
        self.pods = {name: pod(name) for name in names}
        self.offline = set(offline)
        self.accelerator = accelerator
        self.new_pod = new_pod or (lambda node: pod(node, NEW))
        self.deleted: list[str] = []

    def view(self) -> VariantFleet:
        return fleet(list(self.pods.values()), self.offline, self.accelerator)

    def apply(self, step: rollout.Step) -> None:
        for gone in step.delete:
            assert gone.node not in self.offline, "a pod on an offline node is never deleted"
            self.deleted.append(gone.node)
            self.pods[gone.node] = self.new_pod(gone.node)

    def versions(self) -> dict[str, str]:
        return {name: p.template for name, p in self.pods.items()}


def run(fleets, spec: Rollout, *, start=0.0, steps=50, previous=None, tick=1.0, error_rate=None):
    """Steps the rollout until it stops changing; the last step and status."""
    status, watch, clock = previous, {}, start
    last = None
    for _ in range(steps):
        inputs = dict(revision="r2", rollout=spec, fleets=[f.view() for f in fleets], previous=status, watch=watch,
                      now=at(clock))
        result = rollout.step(**inputs)
        if result.sample:
            result = rollout.step(**inputs, error_rate=error_rate(result.sample))
        for f in fleets:
            f.apply(result)
        watch = result.watch
        if result.status == status and not result.delete and result.wake_in is None:
            return result
        status, last = result.status, result
        clock += result.wake_in if result.wake_in is not None else tick
    return last


def test_more_offline_nodes_than_max_unavailable_do_not_stop_the_reachable_ones():
    """What the DaemonSet controller's RollingUpdate cannot do: 3 offline nodes, maxUnavailable 1."""
    fleet_ = Fleet(nodes(8), offline={"edge-5", "edge-6", "edge-7"})
    first = rollout.step(revision="r2", rollout=Rollout(max_unavailable=1), fleets=[fleet_.view()], previous=None,
                         watch={}, now=at(0))
    assert [p.node for p in first.delete] == ["edge-0"], "one at a time, offline nodes not counted"

    result = run([fleet_], Rollout(max_unavailable=1))
    assert result.status.state == "Complete"
    assert fleet_.versions() == {**{n: NEW for n in nodes(5)}, **{n: OLD for n in ("edge-5", "edge-6", "edge-7")}}
    assert fleet_.deleted == nodes(5), "in name order, never more than maxUnavailable at once"

    # They come back: their old pods are replaced, no canary (the waves are done).
    fleet_.offline.clear()
    result = run([fleet_], Rollout(max_unavailable=1), previous=result.status)
    assert result.status.state == "Complete" and set(fleet_.versions().values()) == {NEW}


def test_never_more_than_max_unavailable_reachable_nodes_without_a_ready_pod():
    fleet_ = Fleet(nodes(10), new_pod=lambda node: pod(node, NEW, ready=False))  # new pods still starting
    step = rollout.step(revision="r2", rollout=Rollout(max_unavailable="30%"), fleets=[fleet_.view()],
                        previous=None, watch={}, now=at(0))
    assert len(step.delete) == 3
    fleet_.apply(step)
    again = rollout.step(revision="r2", rollout=Rollout(max_unavailable="30%"), fleets=[fleet_.view()],
                         previous=step.status, watch={}, now=at(1))
    assert again.delete == (), "3 nodes are already without a ready pod"


def test_old_pods_that_do_not_serve_are_replaced_first_at_no_cost():
    broken = [pod("edge-0"), replace(pod("edge-1"), ready=False), pod("edge-2"), replace(pod("edge-3"), ready=False)]
    step = rollout.step(revision="r2", rollout=Rollout(max_unavailable=1), fleets=[fleet(broken)],
                        previous=None, watch={}, now=at(0))
    assert [p.node for p in step.delete] == ["edge-1", "edge-3"], "already unavailable: within the budget of 1"


def test_waves_wait_for_their_pods_then_pause_then_go_on():
    fleet_ = Fleet(nodes(10))
    spec = Rollout(waves=[1, "50%"], pause_seconds=30, max_unavailable="100%")
    first = rollout.step(revision="r2", rollout=spec, fleets=[fleet_.view()], previous=None, watch={}, now=at(0))
    assert (first.status.wave, first.status.waves, first.status.state) == (1, 3, "RollingOut")
    assert [p.node for p in first.delete] == ["edge-0"], "the canary"
    fleet_.apply(first)

    paused = rollout.step(revision="r2", rollout=spec, fleets=[fleet_.view()], previous=first.status, watch={},
                          now=at(5))
    assert (paused.status.state, paused.status.healthy_since, paused.wake_in) == ("Paused", at(5), 30)
    assert paused.delete == () and set(paused.watch) == {"uid-edge-0-new-template"}
    still = rollout.step(revision="r2", rollout=spec, fleets=[fleet_.view()], previous=paused.status,
                         watch=paused.watch, now=at(20))
    assert (still.status.state, still.wake_in, still.delete) == ("Paused", 15, ())

    second = rollout.step(revision="r2", rollout=spec, fleets=[fleet_.view()], previous=still.status,
                          watch=still.watch, now=at(35))
    assert (second.status.wave, second.status.state) == (2, "RollingOut")
    assert [p.node for p in second.delete] == nodes(5)[1:], "up to 50%"


def test_waves_are_per_variant_and_the_model_moves_on_together():
    cpu, gpu = Fleet(nodes(10), accelerator="cpu"), Fleet(nodes(2, "gpu"), accelerator="gpu")
    spec = Rollout(waves=["10%"], pause_seconds=10, max_unavailable="100%")
    first = rollout.step(revision="r2", rollout=spec, fleets=[cpu.view(), gpu.view()], previous=None, watch={},
                         now=at(0))
    assert [p.node for p in first.delete] == ["edge-0", "gpu-0"], "a canary of each class"
    cpu.apply(first), gpu.apply(first)
    result = run([cpu, gpu], spec, start=1, previous=first.status)
    assert result.status.state == "Complete" and set(cpu.versions().values()) == set(gpu.versions().values()) == {NEW}


def test_a_new_model_has_nothing_to_replace():
    fresh = [pod(name, NEW) for name in nodes(3)]
    step = rollout.step(revision="r1", rollout=Rollout(waves=[1], pause_seconds=60), fleets=[fleet(fresh)],
                        previous=None, watch={}, now=at(0))
    assert (step.status.state, step.status.wave, step.delete, step.wake_in) == ("Complete", 2, (), None)


@pytest.mark.parametrize("reason", ["FetchFailed", "DigestMismatch", "RuntimeFailed", "Unschedulable",
                                    "ImagePullFailed"])
def test_a_failing_new_pod_halts_the_rollout_and_says_why(reason):
    fleet_ = Fleet(nodes(6), new_pod=lambda node: pod(node, NEW, ready=False, problem=reason))
    spec = Rollout(waves=[1, "50%"], pause_seconds=10, max_unavailable="100%")
    result = run([fleet_], spec)
    assert result.status.state == "Halted" and result.status.reason == reason
    assert result.status.message == f"wave 1/3 halted ({reason}): the new pod m-edge-0-new on node edge-0 (cpu): " \
                                    f"{reason} on edge-0"
    assert fleet_.deleted == ["edge-0"], "only the canary was replaced"

    # It stays halted for this revision; a change of the spec (a new revision) tries again.
    again = rollout.step(revision="r2", rollout=spec, fleets=[fleet_.view()], previous=result.status, watch={},
                         now=at(999))
    assert again.status == result.status and again.delete == ()
    retried = rollout.step(revision="r3", rollout=spec, fleets=[fleet_.view()], previous=result.status, watch={},
                           now=at(999))
    assert retried.status.state == "Halted" and retried.status.revision == "r3", "still failing: halted again"


def test_a_new_pod_that_stops_being_ready_during_the_pause_halts_the_rollout():
    fleet_ = Fleet(nodes(6))
    spec = Rollout(waves=[1], pause_seconds=60, max_unavailable="100%")
    first = rollout.step(revision="r2", rollout=spec, fleets=[fleet_.view()], previous=None, watch={}, now=at(0))
    fleet_.apply(first)
    paused = rollout.step(revision="r2", rollout=spec, fleets=[fleet_.view()], previous=first.status, watch={},
                          now=at(5))
    assert paused.status.state == "Paused"

    fleet_.pods["edge-0"] = replace(fleet_.pods["edge-0"], ready=False)
    halted = rollout.step(revision="r2", rollout=spec, fleets=[fleet_.view()], previous=paused.status,
                          watch=paused.watch, now=at(10))
    assert (halted.status.state, halted.status.reason) == ("Halted", "ProbeFailed")
    assert "m-edge-0-new on node edge-0 (cpu) stopped being ready during its wave's pause" in halted.status.message

    fleet_.pods["edge-0"] = replace(fleet_.pods["edge-0"], ready=True, restarts=1)
    restarted = rollout.step(revision="r2", rollout=spec, fleets=[fleet_.view()], previous=paused.status,
                             watch=paused.watch, now=at(10))
    assert "restarted during its wave's pause" in restarted.status.message


def test_the_error_rate_of_a_wave_is_judged_at_the_end_of_its_pause():
    spec = Rollout(waves=[1], pause_seconds=10, max_unavailable="100%", max_error_rate=0.05)

    def answered(requests, errors):
        return lambda pods: ErrorRate(requests, errors, tuple(p.name for p in pods))

    fleet_ = Fleet(nodes(4))
    halted = run([fleet_], spec, error_rate=answered(100, 6))
    assert (halted.status.state, halted.status.reason) == ("Halted", "ErrorRateExceeded")
    assert "6 of 100 inference requests (6.0%) to its new pods m-edge-0-new were server errors" in halted.status.message
    assert fleet_.deleted == ["edge-0"]

    fleet_ = Fleet(nodes(4))
    assert run([fleet_], spec, error_rate=answered(100, 5)).status.state == "Complete"
    fleet_ = Fleet(nodes(4))
    assert run([fleet_], spec, error_rate=answered(10, 10)).status.state == "Complete", "too few requests to judge"


def test_a_pause_without_new_pods_to_watch_is_skipped():
    """Going back to the version most nodes still run: the early waves are met as they begin."""
    pods = [pod(name, NEW) for name in nodes(5)] + [pod("edge-5")]
    step = rollout.step(revision="r3", rollout=Rollout(waves=[1, "50%"], pause_seconds=600), fleets=[fleet(pods)],
                        previous=None, watch={}, now=at(0))
    assert (step.status.wave, [p.node for p in step.delete], step.wake_in) == (3, ["edge-5"], None)


def test_wave_targets_and_max_unavailable():
    assert rollout.wave_targets(Rollout(waves=[1, "10%", "50%"]), 6) == [1, 1, 3, 6]
    assert rollout.wave_targets(Rollout(waves=["100%"]), 6) == [6]
    assert rollout.wave_targets(Rollout(), 6) == [6]
    assert rollout.wave_targets(Rollout(waves=[50, "1%"]), 6) == [6, 6, 6]
    assert rollout.max_unavailable(Rollout(max_unavailable="10%"), 11) == 2
    assert rollout.max_unavailable(Rollout(max_unavailable="10%"), 3) == 1
    assert rollout.max_unavailable(Rollout(max_unavailable=5), 0) == 0


def test_request_counts_from_the_runtimes_metrics():
    text = (
        '# TYPE edgeloop_requests_total counter\n'
        'edgeloop_requests_total{model="m",protocol="http",outcome="success"} 90\n'
        'edgeloop_requests_total{model="m",protocol="grpc",outcome="error"} 7\n'
        'edgeloop_requests_total{model="m",protocol="http",outcome="bad_request"} 3\n'
        'edgeloop_request_duration_seconds_count{model="m",protocol="http"} 100\n'
    )
    assert rollout.request_counts(text) == (100, 7)
    assert rollout.request_counts("garbage\n" * 3) == (0, 0)
