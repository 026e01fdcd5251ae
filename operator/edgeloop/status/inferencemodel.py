"""An InferenceModel's status from its DaemonSets and the problems found on its nodes.

Conditions (Kubernetes API conventions; reasons are CamelCase):
- Ready: every node that should serve the model runs the current model and is ready.
- Progressing: a rollout is under way (DaemonSets being updated, or new pods starting).
- Degraded: the model cannot be served as specified on some or all nodes, and waiting will not fix it
  (no matching nodes, a failed fetch, a digest mismatch, an unschedulable pod, an invalid spec, ...).
- Accelerated: every variant of an accelerator class runs on its accelerator's execution provider, as its
  runtime reports (False CPUFallback when one serves on the CPU instead; the model stays Ready).

Offline nodes (not Ready) are no fault of the model: they keep their pod, update when they return, and show
as reason NodesOffline (Ready stays True when every reachable node serves the current version). A halted
rollout (status/rollout.py) is Degraded, reason RolloutHalted.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgeloop.api.common import ModelRef
from edgeloop.api.inferencemodel import (
    MAX_OFFLINE_NODES,
    MAX_UNHEALTHY_NODES,
    InferenceModelSpec,
    InferenceModelStatus,
    OfflineNode,
    RolloutStatus,
    UnhealthyNode,
    VariantStatus,
)
from edgeloop.config import CPU_EXECUTION_PROVIDER
from edgeloop.names import RENDER_HASH
from edgeloop.status import ConditionUpdate, Event, condition, merge_conditions
from edgeloop.status.diagnosis import FAILURES, NodeProblem
from edgeloop.status.rollout import VariantFleet

READY, PROGRESSING, DEGRADED, ACCELERATED = "Ready", "Progressing", "Degraded", "Accelerated"
NODES_OFFLINE, ROLLOUT_HALTED = "NodesOffline", "RolloutHalted"
MAX_NAMES_IN_MESSAGES = 10


@dataclass(frozen=True)
class DaemonSetState:
    """What the operator reads from one of its DaemonSets."""

    name: str
    uid: str
    render_hash: str
    generation: int
    observed_generation: int
    desired: int
    scheduled: int
    ready: int
    updated: int

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> DaemonSetState:
        metadata, status = obj["metadata"], obj.get("status", {})
        return cls(
            name=metadata["name"],
            uid=metadata.get("uid", ""),
            render_hash=metadata.get("annotations", {}).get(RENDER_HASH, ""),
            generation=metadata.get("generation", 0),
            observed_generation=status.get("observedGeneration", 0),
            desired=status.get("desiredNumberScheduled", 0),
            scheduled=status.get("currentNumberScheduled", 0),
            ready=status.get("numberReady", 0),
            updated=status.get("updatedNumberScheduled", 0),
        )

    @property
    def settled(self) -> bool:
        """The DaemonSet controller has processed the current spec, so the counts describe it."""
        return self.observed_generation >= self.generation

    @property
    def complete(self) -> bool:
        return self.settled and self.updated == self.desired and self.ready == self.desired

    @property
    def counts(self) -> tuple[int, ...]:
        """What moves while a rollout progresses."""
        return (self.generation, self.observed_generation, self.desired, self.scheduled, self.ready, self.updated)

    @property
    def needs_diagnosis(self) -> bool:
        """Some node lacks a ready pod of this DaemonSet, so it is worth looking at pods and nodes."""
        return self.ready < self.desired or self.scheduled < self.desired


@dataclass(frozen=True)
class Expected:
    """One variant as the current spec renders it."""

    accelerator: str
    daemon_set: str
    render_hash: str
    execution_providers: tuple[str, ...]
    template: str = ""  # the pod template's hash


@dataclass(frozen=True)
class ProvidersSample:
    """What the runtime of one ready pod of a variant said it runs the model on, or why it could not be asked."""

    node: str = ""
    providers: tuple[str, ...] = ()
    error: str = ""


MAX_PROVIDERS = 16
_PROVIDER = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


def parse_providers(text: str) -> tuple[str, ...]:
    """The providers in use from the runtime's model metadata (`GET /v2/models/<name>`): its
    parameters.execution_providers, a comma-joined string. ValueError when the answer says otherwise."""
    document = json.loads(text)
    value = document.get("parameters", {}).get("execution_providers") if isinstance(document, dict) else None
    if isinstance(value, list):  # as runtimes before the string did
        value = ",".join(str(item) for item in value)
    if not isinstance(value, str):
        raise ValueError("the model metadata has no parameters.execution_providers")
    providers = tuple(p.strip() for p in value.split(",") if p.strip())
    if not providers or len(providers) > MAX_PROVIDERS or not all(_PROVIDER.match(p) for p in providers):
        raise ValueError(f"parameters.execution_providers is not a list of providers: {value[:200]!r}")
    return providers


@dataclass(frozen=True)
class SpecProblem:
    """The spec is valid for the API server but cannot be carried out; retrying will not help."""

    reason: str  # e.g. UnknownAcceleratorClass, ApplyRejected
    message: str


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _degraded_by(problems: Sequence[NodeProblem]) -> ConditionUpdate | None:
    failures = [p for p in problems if p.is_failure]
    if not failures:
        return None
    counts = Counter(p.reason for p in failures)
    reason = min(counts, key=FAILURES.index)
    first = next(p for p in failures if p.reason == reason)
    others = "" if counts[reason] == 1 else f" (and {counts[reason] - 1} more)"
    message = f"{_plural(counts[reason], 'node')} {reason}: {first.node}{others}: {first.message}"
    return ConditionUpdate(DEGRADED, "True", reason, message)


def _accelerated(
    expected: Sequence[Expected], live: Sequence[DaemonSetState | None], samples: Mapping[str, ProvidersSample]
) -> ConditionUpdate:
    """From what the runtimes report: does every variant of an accelerator class with nodes run on one of its
    class's accelerator providers?"""
    fallbacks, unknown, in_use = [], [], []
    for variant, ds in zip(expected, live, strict=True):
        wanted = [p for p in variant.execution_providers if p != CPU_EXECUTION_PROVIDER]
        if not wanted or (ds is not None and ds.settled and ds.desired == 0):
            continue  # no accelerator to use, or no node to use it on
        sample = samples.get(variant.daemon_set)
        if sample is None or sample.error:
            unknown.append(variant.accelerator)
        elif not set(wanted) & set(sample.providers):
            of = f", 1 of its {ds.desired} nodes" if ds else ""
            fallbacks.append(
                f"the {variant.accelerator} variant runs on {', '.join(sample.providers)} without "
                f"{' or '.join(wanted)} on node {sample.node} (its runtime asked{of})"
            )
        else:
            in_use.append(f"{variant.accelerator}: {', '.join(sample.providers)}")
    if fallbacks:
        return ConditionUpdate(ACCELERATED, "False", "CPUFallback", "; ".join(fallbacks))
    if unknown:
        # Why an ask failed goes to the operator's log: a status that changed with each failed ask would be
        # written again and again.
        return ConditionUpdate(
            ACCELERATED, "Unknown", "NotSampled",
            f"not known yet for {', '.join(unknown)}: a ready pod of the current version is asked what it runs on",
        )
    if not in_use:
        return ConditionUpdate(
            ACCELERATED, "False", "NoAcceleratedNodes", "no node runs a class with an accelerator provider"
        )
    return ConditionUpdate(ACCELERATED, "True", "AcceleratorsInUse", "; ".join(in_use))


def offline_nodes(fleets: Sequence[VariantFleet]) -> list[OfflineNode]:
    """Every variant's offline nodes, longest offline first, with the version their pod runs."""
    found = []
    for fleet in fleets:
        for offline in fleet.offline:
            pod = fleet.pod_on(offline.node)
            found.append(
                OfflineNode(
                    node=offline.node,
                    accelerator=fleet.accelerator,
                    reason="Unreachable" if offline.unreachable else "NotReady",
                    since=offline.since,
                    version=pod.version if pod else "",
                    updated=pod is not None and pod.template == fleet.template,
                )
            )
    return sorted(found, key=lambda node: (node.since or "~", node.node))


def _describe_offline(nodes: Sequence[OfflineNode]) -> str:
    shown = ", ".join(
        f"{n.node} ({n.reason.lower()} since {n.since or 'unknown'}, "
        f"{f'version {n.version}' if n.version else 'no pod'})"
        for n in nodes[:MAX_NAMES_IN_MESSAGES]
    )
    more = len(nodes) - MAX_NAMES_IN_MESSAGES
    return shown + (f" and {more} more" if more > 0 else "")


def compute(
    *,
    generation: int,
    spec: InferenceModelSpec,
    expected: Sequence[Expected],
    daemon_sets: Mapping[str, DaemonSetState],
    problems: Sequence[NodeProblem],
    previous: InferenceModelStatus,
    now: str,
    spec_problem: SpecProblem | None = None,
    samples: Mapping[str, ProvidersSample] | None = None,
    fleets: Mapping[str, VariantFleet] | None = None,
    rollout: RolloutStatus | None = None,
) -> InferenceModelStatus:
    """`samples`: by DaemonSet, what its runtime reports it runs on (providersInUse, Accelerated). `fleets`: by
    DaemonSet, its offline nodes and (where the operator looked) pods. `rollout`: where the rollout stands."""
    samples, fleets = samples or {}, fleets or {}
    live = [daemon_sets.get(variant.daemon_set) for variant in expected]
    applied = spec_problem is None and all(
        ds is not None and ds.render_hash == variant.render_hash for ds, variant in zip(live, expected, strict=True)
    )
    settled = applied and all(ds.settled for ds in live if ds)
    variants = [
        VariantStatus(
            accelerator=variant.accelerator,
            daemon_set=variant.daemon_set,
            desired=ds.desired if ds else 0,
            ready=ds.ready if ds else 0,
            updated=ds.updated if ds and ds.render_hash == variant.render_hash else 0,
            providers_in_use=list(sample.providers) if sample else [],
            providers_reported_by=sample.node if sample else "",
            offline=len(fleet.offline) if fleet else 0,
        )
        for ds, variant in zip(live, expected, strict=True)
        for sample, fleet in [(_reported(samples.get(variant.daemon_set)), fleets.get(variant.daemon_set))]
    ]
    offline = [] if spec_problem else offline_nodes([fleets[v.daemon_set] for v in expected if v.daemon_set in fleets])
    # The DaemonSets count offline nodes only until the node lifecycle controller taints them.
    uncounted = [(f, node.node) for f in fleets.values() for node in f.offline if not node.counted_by_daemon_set]
    uncounted_updated = sum(1 for f, node in uncounted if (pod := f.pod_on(node)) and pod.template == f.template)
    reachable = sum(v.desired for v in variants)
    desired = reachable + len(uncounted)
    ready = sum(v.ready for v in variants)
    updated = sum(v.updated for v in variants) + uncounted_updated
    version = spec.model.version
    halted = rollout is not None and rollout.state == "Halted"
    outdated = [node for node in offline if not node.updated]

    degraded = _degraded_by(problems)
    if spec_problem:
        degraded = ConditionUpdate(DEGRADED, "True", spec_problem.reason, spec_problem.message)
    elif halted:
        degraded = ConditionUpdate(DEGRADED, "True", ROLLOUT_HALTED, rollout.message)
    elif settled and desired == 0:
        selector = f" and nodeSelector {dict(spec.placement.node_selector)}" if spec.placement.node_selector else ""
        degraded = ConditionUpdate(
            DEGRADED,
            "True",
            "NoMatchingNodes",
            f"no node has any of the accelerator classes {list(spec.placement.accelerators)}{selector}",
        )

    complete = settled and all(ds.complete for ds in live if ds)
    if complete and reachable > 0 and not halted:
        if offline:
            ready_condition = ConditionUpdate(
                READY,
                "True",
                NODES_OFFLINE,
                f"{_plural(ready, 'reachable node')} serve version {version}; {len(offline)} offline: "
                + _describe_offline(offline),
            )
        else:
            ready_condition = ConditionUpdate(
                READY, "True", "AllNodesReady", f"{_plural(ready, 'node')} serve version {version}"
            )
    elif degraded:
        ready_condition = ConditionUpdate(READY, "False", degraded.reason, degraded.message)
    elif complete and offline:
        ready_condition = ConditionUpdate(
            READY, "False", NODES_OFFLINE, f"every node is offline: {_describe_offline(offline)}"
        )
    else:
        ready_condition = ConditionUpdate(
            READY, "False", "RollingOut", f"{ready}/{desired} nodes ready, {updated} on version {version}"
        )

    if spec_problem:
        progressing = ConditionUpdate(PROGRESSING, "False", spec_problem.reason, "")
    elif halted:
        progressing = ConditionUpdate(PROGRESSING, "False", ROLLOUT_HALTED, rollout.message)
    elif complete and outdated:
        progressing = ConditionUpdate(
            PROGRESSING,
            "False",
            NODES_OFFLINE,
            f"every reachable node runs version {version}; {_plural(len(outdated), 'offline node')} "
            f"run an older one and update when they return: {_describe_offline(outdated)}",
        )
    elif complete:
        progressing = ConditionUpdate(PROGRESSING, "False", "RolloutComplete", f"every node runs version {version}")
    elif degraded and settled and updated == desired:
        progressing = ConditionUpdate(
            PROGRESSING, "False", "RolloutBlocked", "every node is updated but some cannot serve: see Degraded"
        )
    else:
        progressing = ConditionUpdate(
            PROGRESSING,
            "True",
            "RollingOut",
            f"{_wave(rollout, spec)}{updated}/{desired} nodes updated to version {version}",
        )

    if degraded is None:
        degraded = (
            ConditionUpdate(
                DEGRADED,
                "False",
                NODES_OFFLINE,
                f"{_plural(len(offline), 'node')} offline, no fault of the model (they keep their pod and update "
                f"when they return): {_describe_offline(offline)}",
            )
            if offline
            else ConditionUpdate(DEGRADED, "False", "AsExpected", "")
        )
    accelerated = (
        ConditionUpdate(ACCELERATED, "Unknown", spec_problem.reason, "")
        if spec_problem
        else _accelerated(expected, live, samples)
    )
    ordered = sorted(problems, key=lambda p: (not p.is_failure, p.node))
    updates = [ready_condition, progressing, degraded, accelerated]
    return InferenceModelStatus(
        observed_generation=generation if applied or spec_problem else previous.observed_generation,
        conditions=merge_conditions(previous.conditions, updates, generation, now),
        model=ModelRef(sha256=spec.model.sha256, version=version) if applied else previous.model,
        variants=variants,
        desired_nodes=desired,
        ready_nodes=ready,
        nodes=f"{ready}/{desired}",
        unhealthy_nodes=[
            UnhealthyNode(node=p.node, accelerator=p.accelerator, reason=p.reason, message=p.message)
            for p in ordered[:MAX_UNHEALTHY_NODES]
        ],
        unhealthy_node_count=len(problems),
        updated_nodes=updated,
        offline_nodes=offline[:MAX_OFFLINE_NODES],
        offline_node_count=len(offline),
        rollout=rollout if applied else previous.rollout,
    )


def _wave(rollout: RolloutStatus | None, spec: InferenceModelSpec) -> str:
    if rollout is None or rollout.waves <= 1:
        return ""
    paused = (
        f" done, its new pods watched for {spec.rollout.pause_seconds} s before the next wave"
        if rollout.state == "Paused"
        else ""
    )
    return f"wave {rollout.wave}/{rollout.waves}{paused}: "


def _reported(sample: ProvidersSample | None) -> ProvidersSample | None:
    return sample if sample and not sample.error else None


def transitions(previous: InferenceModelStatus, current: InferenceModelStatus) -> list[Event]:
    """Events worth recording on the InferenceModel: significant changes only, never repeats."""
    events = []
    if current.model and (previous.model is None or previous.model.sha256 != current.model.sha256):
        events.append(
            Event(
                "Normal",
                "RollingOut",
                f"rolling out version {current.model.version} (sha256 {current.model.sha256[:12]}…)",
            )
        )
    before_ready, now_ready = condition(previous.conditions, READY), condition(current.conditions, READY)
    if now_ready and now_ready.status == "True" and (not before_ready or before_ready.status != "True"):
        events.append(Event("Normal", "Ready", now_ready.message))
    before, now = condition(previous.conditions, DEGRADED), condition(current.conditions, DEGRADED)
    if now and now.status == "True" and (not before or before.status != "True" or before.reason != now.reason):
        events.append(Event("Warning", now.reason, now.message))
    if now and now.status == "False" and before and before.status == "True":
        events.append(Event("Normal", "Recovered", f"no longer degraded (was {before.reason})"))
    if now and now.reason == NODES_OFFLINE and (not before or before.reason != now.reason):
        events.append(Event("Normal", NODES_OFFLINE, now.message))
    before, now = condition(previous.conditions, ACCELERATED), condition(current.conditions, ACCELERATED)
    if now and now.reason == "CPUFallback" and (not before or before.reason != now.reason):
        events.append(Event("Warning", "CPUFallback", now.message))
    wave, was = current.rollout, previous.rollout
    if wave and was and wave.revision == was.revision and wave.wave > was.wave and wave.state != "Complete":
        events.append(Event("Normal", "WaveStarted", f"wave {wave.wave}/{wave.waves} of the rollout"))
    return events


def unreadable(previous: InferenceModelStatus, generation: int, problem: SpecProblem, now: str) -> InferenceModelStatus:
    """The spec cannot even be parsed (a CRD older than the operator): say so, keep the last numbers."""
    updates = [
        ConditionUpdate(READY, "False", problem.reason, problem.message),
        ConditionUpdate(PROGRESSING, "False", problem.reason, ""),
        ConditionUpdate(DEGRADED, "True", problem.reason, problem.message),
        ConditionUpdate(ACCELERATED, "Unknown", problem.reason, ""),
    ]
    return previous.model_copy(
        update={
            "observed_generation": generation,
            "conditions": merge_conditions(previous.conditions, updates, generation, now),
        }
    )
