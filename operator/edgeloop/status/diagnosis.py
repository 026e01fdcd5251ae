"""Why a node that should serve a variant does not: from its pod (or the lack of one) and the node.

Failure reasons make the InferenceModel Degraded; transitional ones (a pod still fetching or starting)
only show in unhealthyNodes while a rollout is under way.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from edgeloop.names import FETCH_CONTAINER, ROLE_LABEL, RUNTIME_CONTAINER

# Failure reasons, most telling first: when nodes fail for several reasons, Degraded names the first.
FAILURES = (
    "DigestMismatch",
    "FetchFailed",
    "ImagePullFailed",
    "ContainerCreateFailed",
    "RuntimeFailed",
    "PodNotCreated",
    "Unschedulable",
)
# `edgeloop-runtime fetch` logs this on a digest mismatch; the fetch container's termination message
# carries its last log lines (terminationMessagePolicy: FallbackToLogsOnError).
_DIGEST_MISMATCH = re.compile(r"does not match sha256 [0-9a-f]{64}")
_IMAGE_PULL = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
_CREATE_FAILED = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
MAX_MESSAGE = 300


@dataclass(frozen=True)
class NodeProblem:
    node: str
    accelerator: str
    reason: str
    message: str = ""

    @property
    def is_failure(self) -> bool:
        return self.reason in FAILURES


def _short(message: str) -> str:
    """The last non-empty line (log tails put the error last), capped so status stays small."""
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last if len(last) <= MAX_MESSAGE else last[: MAX_MESSAGE - 1] + "…"


def node_of(pod: Mapping[str, Any]) -> str | None:
    """The pod's node: bound, or the one the DaemonSet controller pinned it to before scheduling."""
    spec = pod.get("spec", {})
    if spec.get("nodeName"):
        return spec["nodeName"]
    terms = (
        spec.get("affinity", {})
        .get("nodeAffinity", {})
        .get("requiredDuringSchedulingIgnoredDuringExecution", {})
        .get("nodeSelectorTerms", [])
    )
    for term in terms:
        for field in term.get("matchFields", []):
            if field.get("key") == "metadata.name" and field.get("values"):
                return field["values"][0]
    return None


def _container_problem(status: Mapping[str, Any], failed_reason: str) -> tuple[str, str] | None:
    """(reason, message) if the container cannot run or keeps failing."""
    state, last = status.get("state", {}), status.get("lastState", {})
    waiting = state.get("waiting", {})
    if waiting.get("reason") in _IMAGE_PULL:
        return "ImagePullFailed", waiting.get("message", waiting["reason"])
    if waiting.get("reason") in _CREATE_FAILED:
        return "ContainerCreateFailed", waiting.get("message", waiting["reason"])
    terminated = state.get("terminated") or last.get("terminated") or {}
    if terminated.get("exitCode", 0) != 0:
        message = terminated.get("message") or f"exit code {terminated['exitCode']}"
        if failed_reason == "FetchFailed" and _DIGEST_MISMATCH.search(message):
            return "DigestMismatch", message
        return failed_reason, message
    return None


def _condition(pod: Mapping[str, Any], type_: str) -> Mapping[str, Any]:
    return next((c for c in pod.get("status", {}).get("conditions", []) if c.get("type") == type_), {})


def is_ready(pod: Mapping[str, Any]) -> bool:
    return _condition(pod, "Ready").get("status") == "True" and not pod["metadata"].get("deletionTimestamp")


def pod_problem(pod: Mapping[str, Any], accelerator: str, not_ready_nodes: Container[str] = ()) -> NodeProblem | None:
    """Why this DaemonSet pod does not serve, or None if it is ready or its node is not Ready (an offline node
    is no fault of the model's: the status reports offline nodes apart)."""
    node = node_of(pod)
    if node is None or pod["metadata"].get("deletionTimestamp") or node in not_ready_nodes:
        return None  # not tied to a node yet, on its way out during a rollout, or offline

    def problem(reason: str, message: str) -> NodeProblem:
        return NodeProblem(node=node, accelerator=accelerator, reason=reason, message=_short(message))

    if _condition(pod, "Ready").get("status") == "True":
        return None
    scheduled = _condition(pod, "PodScheduled")
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return problem("Unschedulable", scheduled.get("message", ""))
    status = pod.get("status", {})
    for container in status.get("initContainerStatuses", []):
        if container.get("name") == FETCH_CONTAINER and (found := _container_problem(container, "FetchFailed")):
            return problem(*found)
    for container in status.get("containerStatuses", []):
        if container.get("name") == RUNTIME_CONTAINER and (found := _container_problem(container, "RuntimeFailed")):
            return problem(*found)
    if _condition(pod, "Initialized").get("status") != "True":
        return problem("FetchingModel", "the init container is fetching and verifying the model")
    return problem("Starting", "the runtime is loading the model and not ready yet")


def missing_pod_problems(
    eligible: Iterable[str], nodes_with_pods: Iterable[str], accelerator: str, why: str
) -> list[NodeProblem]:
    """Nodes that should run the variant but have no pod at all, e.g. because pod creation is refused."""
    have = set(nodes_with_pods)
    return [
        NodeProblem(node=name, accelerator=accelerator, reason="PodNotCreated", message=_short(why))
        for name in eligible
        if name not in have
    ]


# ---- a FederatedRound's pods: stuck before they can take part

# A client's exit code when the aggregator reported that the round failed: the round's failure, not the pod's.
ROUND_FAILED_EXIT_CODE = 2


@dataclass(frozen=True)
class RoundPod:
    """What the operator keeps of one pod of a round's Jobs (a watch feeds them), and why it is stuck, if it is."""

    name: str
    uid: str
    job_uid: str
    role: str  # aggregator or client
    node: str
    reason: str = ""  # CamelCase, when the pod's own status says it is stuck
    message: str = ""
    # When it was scheduled, if it waits for its containers to be created (e.g. a volume that cannot be
    # mounted: only the kubelet's events say so).
    creating_since: str = ""

    @classmethod
    def from_object(cls, pod: Mapping[str, Any]) -> RoundPod:
        metadata, status = pod["metadata"], pod.get("status", {})
        job = next((o.get("uid", "") for o in metadata.get("ownerReferences", []) if o.get("kind") == "Job"), "")
        found = None if metadata.get("deletionTimestamp") else _round_pod_problem(pod)
        scheduled = _condition(pod, "PodScheduled")
        creating = (
            found is None
            and status.get("phase") == "Pending"
            and scheduled.get("status") == "True"
            and all(
                c.get("state", {}).get("waiting", {}).get("reason", "ContainerCreating") == "ContainerCreating"
                for c in status.get("containerStatuses", [])
            )
        )
        return cls(
            name=metadata["name"],
            uid=metadata.get("uid", ""),
            job_uid=job,
            role=metadata.get("labels", {}).get(ROLE_LABEL, ""),
            node=pod.get("spec", {}).get("nodeName", ""),
            reason=found[0] if found else "",
            message=_short(found[1]) if found else "",
            creating_since=scheduled.get("lastTransitionTime", "") if creating else "",
        )


def _round_pod_problem(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, message) when the pod cannot run or keeps failing, from its own status."""
    scheduled = _condition(pod, "PodScheduled")
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return "Unschedulable", scheduled.get("message", "")
    for container in pod.get("status", {}).get("containerStatuses", []):
        if container.get("ready"):
            continue  # running (again): an earlier crash is behind it
        waiting = container.get("state", {}).get("waiting", {})
        if waiting.get("reason") == "CrashLoopBackOff":
            last = container.get("lastState", {}).get("terminated", {})
            return "CrashLooping", last.get("message") or f"exit code {last.get('exitCode', '?')}, restarting"
        terminated = container.get("state", {}).get("terminated", {})
        if terminated.get("exitCode") == ROUND_FAILED_EXIT_CODE:
            continue
        if (found := _container_problem(container, "ContainerFailed")) is not None:
            return found
    return None
