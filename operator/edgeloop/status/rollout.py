"""The operator-driven rollout of an InferenceModel: which old pods to replace now, in waves, on the nodes it
can reach; and where the rollout stands. Pure: what the operator observed in, decisions out.

Why not the DaemonSet controller's RollingUpdate (docs/inferencemodel.md, "Rollouts"): it counts a node whose
pod is not available against maxUnavailable whether or not the node can be reached, and the pod of an
offline node is not available until the node returns; with more offline nodes than maxUnavailable, no
reachable node is ever updated. It has no pause and no partition either, so no canary. The DaemonSets are
therefore `OnDelete`: the DaemonSet controller still creates a node's missing pod from the current template,
and the operator decides which old pod to delete, and when:

- only pods on reachable nodes (Ready) are replaced, and only reachable nodes count against maxUnavailable;
  an offline node keeps its pod (and serves from its node cache) and is updated when it returns;
- wave by wave: wave k brings each variant to its k-th target of updated nodes; when every variant has
  reached it, the new pods are watched for pauseSeconds (and their error rate judged) before the next wave;
- a new pod that fails, or that stops being ready or restarts during its wave's pause, halts the rollout
  until the spec changes; the status says which pod, on which node, and why.
"""

from __future__ import annotations

import math
import re
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from edgeloop.api.inferencemodel import MIN_REQUESTS_FOR_ERROR_RATE, Rollout, RolloutStatus
from edgeloop.names import MODEL_VERSION_ANNOTATION, RUNTIME_CONTAINER, TEMPLATE_LABEL
from edgeloop.status.diagnosis import NodeProblem, node_of, pod_problem

# Pods per variant whose metrics are read to judge a wave's error rate.
ERROR_RATE_SAMPLE = 3


@dataclass(frozen=True)
class PodView:
    """What the rollout and the status need of one DaemonSet pod."""

    name: str
    uid: str
    node: str
    template: str  # the pod template's hash (TEMPLATE_LABEL)
    version: str  # the model version it serves
    created: str
    ready: bool
    restarts: int
    deleting: bool
    problem: NodeProblem | None = None  # why it does not serve, if it does not

    @classmethod
    def from_object(cls, pod: Mapping[str, Any], accelerator: str, offline: Container[str] = ()) -> PodView | None:
        """None for a pod not tied to a node yet. `offline`: the names of nodes that are not Ready."""
        node = node_of(pod)
        if node is None:
            return None
        metadata, status = pod["metadata"], pod.get("status", {})
        runtime = next((c for c in status.get("containerStatuses", []) if c.get("name") == RUNTIME_CONTAINER), {})
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", []))
        return cls(
            name=metadata["name"],
            uid=metadata.get("uid", ""),
            node=node,
            template=metadata.get("labels", {}).get(TEMPLATE_LABEL, ""),
            version=metadata.get("annotations", {}).get(MODEL_VERSION_ANNOTATION, ""),
            created=metadata.get("creationTimestamp", ""),
            ready=ready,
            restarts=runtime.get("restartCount", 0),
            deleting=bool(metadata.get("deletionTimestamp")),
            problem=pod_problem(pod, accelerator, offline),
        )


@dataclass(frozen=True)
class OfflineView:
    """An offline node of a variant."""

    node: str
    unreachable: bool  # Ready Unknown, else Ready False
    since: str
    counted_by_daemon_set: bool  # still among the DaemonSet's desired nodes (not tainted NoSchedule yet)


@dataclass(frozen=True)
class VariantFleet:
    """One variant as the rollout sees it: its nodes, and its pods where the operator listed them (only while
    it has old pods on reachable nodes, offline nodes, or new pods of a wave to watch; otherwise every pod is
    of the current template, as its DaemonSet's counts say)."""

    accelerator: str
    daemon_set: str
    template: str  # the current pod template's hash
    desired: int  # reachable nodes that should run it: the DaemonSet's own count
    ready: int = 0  # of them with a ready pod: the DaemonSet's count
    complete: bool = False  # the DaemonSet says: every reachable node runs a ready pod of the current template
    pods: tuple[PodView, ...] | None = None  # None: not listed
    offline: tuple[OfflineView, ...] = ()

    @property
    def offline_names(self) -> frozenset[str]:
        return frozenset(node.node for node in self.offline)

    def reachable(self) -> list[PodView]:
        """Its live pods on reachable nodes, by node name."""
        offline = self.offline_names
        pods = self.pods or ()
        return sorted((p for p in pods if p.node not in offline and not p.deleting), key=lambda p: p.node)

    def current(self) -> list[PodView]:
        return [p for p in self.reachable() if p.template == self.template]

    def old(self) -> list[PodView]:
        return [p for p in self.reachable() if p.template != self.template]

    def ready_current(self) -> int:
        """Reachable nodes with a ready pod of the current template."""
        return self.ready if self.pods is None else sum(p.ready for p in self.current())

    def pod_on(self, node: str) -> PodView | None:
        return next((p for p in self.pods or () if p.node == node and not p.deleting), None)


@dataclass(frozen=True)
class ErrorRate:
    """Inference requests answered by a wave's sampled new pods, and how many of them were server errors."""

    requests: int = 0
    errors: int = 0
    asked: tuple[str, ...] = ()  # the pods that answered


@dataclass(frozen=True)
class Step:
    status: RolloutStatus
    delete: tuple[PodView, ...] = ()
    wake_in: float | None = None  # seconds until a wave's pause ends: sync then
    watch: Mapping[str, int] = field(default_factory=dict)  # uid → restarts of the pods watched in a pause
    sample: tuple[PodView, ...] = ()  # a pause ended: ask these pods their error rate, then step again


def count(value: int | str, nodes: int) -> int:
    """A count, or a percentage of `nodes` rounded up, as the DaemonSet controller reads maxUnavailable."""
    if isinstance(value, int):
        return value
    return math.ceil(int(value.rstrip("%")) * nodes / 100)


def wave_count(rollout: Rollout) -> int:
    """The spec's waves, and a last one of every node unless the spec ends with 100%."""
    return len(rollout.waves) + (0 if rollout.waves and rollout.waves[-1] == "100%" else 1)


def wave_targets(rollout: Rollout, nodes: int) -> list[int]:
    """How many of `nodes` run the new version once each wave is done: never fewer than the wave before,
    never more than `nodes`, and all of them after the last."""
    targets, reached = [], 0
    for wave in rollout.waves[: wave_count(rollout) - 1]:
        reached = max(reached, min(nodes, count(wave, nodes)))
        targets.append(reached)
    return [*targets, nodes]


def max_unavailable(rollout: Rollout, nodes: int) -> int:
    return max(1, min(nodes, count(rollout.max_unavailable, nodes))) if nodes else 0


_REQUESTS = re.compile(r"^edgeloop_requests_total\{([^}]*)\}\s+([0-9.eE+]+)\s*$", re.MULTILINE)


def request_counts(metrics: str) -> tuple[int, int]:
    """(requests, server errors) from a runtime's Prometheus text (edgeloop_requests_total by outcome)."""
    requests = errors = 0
    for labels, value in _REQUESTS.findall(metrics):
        amount = int(float(value))
        requests += amount
        if 'outcome="error"' in labels:
            errors += amount
    return requests, errors


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _wave_done(fleets: Sequence[VariantFleet], rollout: Rollout, wave: int) -> bool:
    return all(fleet.ready_current() >= wave_targets(rollout, fleet.desired)[wave - 1] for fleet in fleets)


def _failure(fleets: Iterable[VariantFleet], watch: Mapping[str, int]) -> tuple[str, str] | None:
    """(reason, message) of the first new pod that fails, or that fails its probes while its wave is watched."""
    for fleet in fleets:
        for pod in fleet.current():
            where = f"the new pod {pod.name} on node {pod.node} ({fleet.accelerator})"
            if pod.problem is not None and pod.problem.is_failure:
                return pod.problem.reason, f"{where}: {pod.problem.message}"
            if pod.uid in watch and (not pod.ready or pod.restarts > watch[pod.uid]):
                what = "restarted" if pod.restarts > watch[pod.uid] else "stopped being ready"
                return "ProbeFailed", f"{where} {what} during its wave's pause"
    return None


def _sample(fleets: Sequence[VariantFleet]) -> tuple[PodView, ...]:
    """The newest ready new pods, a few per variant."""
    chosen: list[PodView] = []
    for fleet in fleets:
        ready = sorted((p for p in fleet.current() if p.ready), key=lambda p: p.created, reverse=True)
        chosen += ready[:ERROR_RATE_SAMPLE]
    return tuple(chosen)


def _replacements(fleets: Sequence[VariantFleet], rollout: Rollout, wave: int) -> list[PodView]:
    """Old pods to delete now to bring each variant to the wave's target, within maxUnavailable of its
    reachable nodes. Old pods that are not ready go first: replacing them costs no availability."""
    chosen: list[PodView] = []
    for fleet in fleets:
        reachable = fleet.reachable()
        todo = wave_targets(rollout, fleet.desired)[wave - 1] - len(fleet.current())
        if todo <= 0:
            continue
        unavailable = fleet.desired - sum(p.ready for p in reachable)
        budget = max_unavailable(rollout, fleet.desired) - unavailable
        old = fleet.old()
        not_ready = [p for p in old if not p.ready][:todo]
        ready = [p for p in old if p.ready][: max(0, min(todo - len(not_ready), budget))]
        chosen += not_ready + ready
    return chosen


def step(
    *,
    revision: str,
    rollout: Rollout,
    fleets: Sequence[VariantFleet],
    previous: RolloutStatus | None,
    watch: Mapping[str, int],
    now: str,
    error_rate: ErrorRate | None = None,
) -> Step:
    """The next step of the rollout of `revision` (the hash of every variant's pod template).

    `watch`: the pods (uid → restarts) that were ready when the current wave became healthy, as the last
    step returned them. `error_rate`: what the pods of the last step's `sample` answered."""
    waves = wave_count(rollout)
    same = previous is not None and previous.revision == revision
    if same and previous.state == "Halted":
        return Step(previous)  # until the spec changes
    status = previous if same else RolloutStatus(revision=revision, waves=waves)
    status = status.model_copy(update={"waves": waves, "wave": min(status.wave, waves), "reason": "", "message": ""})
    watch = watch if same else {}

    if not any(fleet.old() for fleet in fleets):
        # Nothing left to replace on a reachable node: a new model, or the last wave done.
        complete = all(fleet.complete for fleet in fleets)
        return Step(
            status.model_copy(
                update={"state": "Complete" if complete else "RollingOut", "wave": waves, "healthy_since": ""}
            )
        )
    if failed := _failure(fleets, watch):
        reason, message = failed
        return Step(
            status.model_copy(
                update={
                    "state": "Halted",
                    "reason": reason,
                    "message": f"wave {status.wave}/{waves} halted ({reason}): {message}",
                }
            )
        )

    entered = not same  # a wave whose target is met as it begins has no new pod to watch: no pause
    while True:
        wave = status.wave
        if not _wave_done(fleets, rollout, wave):
            status = status.model_copy(update={"state": "RollingOut", "healthy_since": ""})
            return Step(status, delete=tuple(_replacements(fleets, rollout, wave)))
        if wave == waves:
            return Step(status.model_copy(update={"state": "Complete", "healthy_since": ""}))
        if not entered:
            if not status.healthy_since:
                status = status.model_copy(update={"healthy_since": now})
                watch = {p.uid: p.restarts for fleet in fleets for p in fleet.current() if p.ready}
            remaining = rollout.pause_seconds - (_time(now) - _time(status.healthy_since)).total_seconds()
            if remaining > 0:
                return Step(status.model_copy(update={"state": "Paused"}), wake_in=remaining, watch=watch)
            if rollout.max_error_rate is not None:
                if error_rate is None:
                    return Step(status.model_copy(update={"state": "Paused"}), watch=watch, sample=_sample(fleets))
                if halted := _error_rate_halt(error_rate, rollout.max_error_rate, wave, waves):
                    return Step(
                        status.model_copy(update={"state": "Halted", "reason": "ErrorRateExceeded", "message": halted})
                    )
        status = status.model_copy(update={"wave": wave + 1, "healthy_since": ""})
        watch, entered = {}, True


def _error_rate_halt(error_rate: ErrorRate, limit: float, wave: int, waves: int) -> str | None:
    """Why the wave's error rate halts the rollout, or None when it does not (or says too little)."""
    if error_rate.requests < MIN_REQUESTS_FOR_ERROR_RATE or error_rate.errors <= limit * error_rate.requests:
        return None
    return (
        f"wave {wave}/{waves} halted (ErrorRateExceeded): {error_rate.errors} of {error_rate.requests} "
        f"inference requests ({error_rate.errors / error_rate.requests:.1%}) to its new pods "
        f"{', '.join(error_rate.asked)} were server errors, above maxErrorRate {limit:g}"
    )
