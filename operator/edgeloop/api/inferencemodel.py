"""InferenceModel: serve an ONNX model on every node that has a given kind of accelerator."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field

from edgeloop.api.common import (
    CONDITIONS_LIST,
    ApiModel,
    Condition,
    ModelRef,
    ModelSource,
    PrinterColumn,
    ResourceDefinition,
    ResourceRequirements,
    Toleration,
    cel,
    section,
)

# The Service is named after the InferenceModel and each DaemonSet after it plus "-<class>"; both must be
# DNS-1035 labels of at most 63 characters, which leaves this much for the name.
MAX_NAME_LENGTH = 47
MAX_CLASS_NAME_LENGTH = 15
# Fewer inference requests than this on a wave's sampled pods say nothing about its error rate.
MIN_REQUESTS_FOR_ERROR_RATE = 20

AcceleratorClassName = Annotated[
    str,
    Field(min_length=1, max_length=MAX_CLASS_NAME_LENGTH, pattern=r"^[a-z]([a-z0-9-]*[a-z0-9])?$"),
]


class Placement(ApiModel):
    """Which nodes serve the model, and which accelerator each of them uses."""

    accelerators: list[AcceleratorClassName] = Field(
        min_length=1,
        max_length=8,
        description="Accelerator classes in order of preference. Each node runs one variant: that of the "
        "first class in this list that the node has. The catch-all class (cpu) matches nodes that have "
        "none of the classes listed before it, so it can only come last. Classes are defined in the "
        "operator's configuration.",
        # crdgen turns the marker into an enum of the configured classes plus the catch-all-last rule.
        json_schema_extra={"x-kubernetes-list-type": "set", "x-edgeloop-accelerator-class-list": True},
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        max_length=32,
        description="Node labels that every serving node must have, on top of its accelerator class.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list,
        max_length=32,
        description="Tolerations added to every variant, on top of those of its accelerator class.",
    )


class RuntimeSpec(ApiModel):
    """How the edgeloop runtime serves the model on each node."""

    image: str = Field(
        default="",
        max_length=512,
        description="The runtime's container image; empty means the operator's configured default.",
    )
    resources: ResourceRequirements = section(
        ResourceRequirements,
        "Compute resources of the runtime container. The accelerator class's extended resource "
        "(e.g. nvidia.com/gpu: 1) is added to the limits unless set here.",
    )
    max_batch_size: int = Field(
        default=8, ge=1, le=4096, description="Largest batch the runtime forms from concurrent requests."
    )
    batch_window_microseconds: int = Field(
        default=500,
        ge=0,
        le=1_000_000,
        description="How long the runtime waits for more requests to fill a batch; 0 disables batching "
        "delays.",
    )
    threads: int = Field(default=1, ge=1, le=256, description="ONNX Runtime intra-op threads per model instance.")
    instances: int | None = Field(
        default=None,
        ge=0,
        le=256,
        description="Model instances that run batches at once (Triton's instance_group count). Unset or 0: the "
        "runtime decides (the container's CPU limit divided by threads; 2 on an accelerator).",
    )


class Serving(ApiModel):
    """The runtime's network endpoints, speaking the Open Inference Protocol (KServe v2)."""

    model_config = {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel("self.httpPort != self.grpcPort", "httpPort and grpcPort must differ"),
            ]
        }
    }

    http_port: int = Field(default=8000, ge=1, le=65535, description="HTTP/REST port.")
    grpc_port: int = Field(default=8001, ge=1, le=65535, description="gRPC port.")
    node_local: bool = Field(
        default=True,
        description="Send Service traffic only to the runtime on the client's own node "
        "(internalTrafficPolicy: Local), so that edge workloads use their local accelerator.",
    )


# A number of nodes: a count of at least 1, or a percentage of a variant's reachable nodes (rounded up).
COUNT_OR_PERCENT = r"^([1-9][0-9]?|100)%$"


def _count_or_percent(value: int | str) -> int | str:
    if (isinstance(value, int) and value < 1) or (isinstance(value, str) and not re.match(COUNT_OR_PERCENT, value)):
        raise ValueError(f"{value!r} is neither a count of at least 1 nor a percentage from 1% to 100%")
    return value


def count_or_percent(what: str) -> Any:
    """The type of a number of nodes: int-or-string, checked by the API server (CEL) and by pydantic."""
    return Annotated[
        int | str,
        AfterValidator(_count_or_percent),
        Field(
            json_schema_extra={
                "x-kubernetes-int-or-string": True,
                "maxLength": 4,  # "100%"; bounds the cost of the rule below
                "x-kubernetes-validations": [
                    cel(
                        f"type(self) == int ? self >= 1 : self.matches('{COUNT_OR_PERCENT}')",
                        f"{what} must be a count of at least 1 or a percentage from 1% to 100%",
                    ),
                ],
            }
        ),
    ]


MAX_WAVES = 10


class Rollout(ApiModel):
    """How a new model or configuration reaches the fleet: the operator replaces pods in waves, on the nodes it
    can reach, and leaves offline nodes until they return."""

    max_unavailable: count_or_percent("maxUnavailable") = Field(
        default="10%",
        description="How many reachable nodes of each variant may be without a ready pod at once while it is "
        "updated: a count (at least 1) or a percentage such as 10% of its reachable nodes. Offline nodes do not "
        "count: they update when they return.",
    )
    waves: list[count_or_percent("each wave")] = Field(
        default_factory=list,
        max_length=MAX_WAVES,
        description="Canary waves, e.g. [1, \"10%\", \"50%\"]: how many reachable nodes of each variant run the "
        "new version once each wave is done (a count, or a percentage rounded up). The next wave starts when "
        "every new pod is ready and has stayed so, without a restart, for pauseSeconds; a new pod that fails "
        "(a failed fetch, a crash, a failed probe, an unschedulable pod) or an error rate above maxErrorRate "
        "halts the rollout, and the status says why. After the last wave every remaining node updates. Empty: "
        "one wave of every node.",
    )
    pause_seconds: int = Field(
        default=0,
        ge=0,
        le=86400,
        description="How long the new pods of a wave must stay ready, without a restart, before the next wave "
        "starts.",
    )
    max_error_rate: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Halt the rollout when a wave's new pods answered more than this fraction of their "
        "inference requests with a server error (the runtime's edgeloop_requests_total, outcome error), asked of "
        "up to 3 of them per variant at the end of the wave's pause, once they have answered at least "
        f"{MIN_REQUESTS_FOR_ERROR_RATE} requests. Unset: not checked.",
    )


class InferenceModelSpec(ApiModel):
    """The desired state: which model to serve, where, and how."""

    model: ModelSource = Field(description="The model to serve. Changing it rolls every variant.")
    placement: Placement = Field(description="Where the model is served.")
    runtime: RuntimeSpec = section(RuntimeSpec, "Runtime settings shared by every variant.")
    serving: Serving = section(Serving, "Network endpoints of the runtime.")
    rollout: Rollout = section(Rollout, "How a change reaches the nodes: in waves, on the reachable nodes.")


class VariantStatus(ApiModel):
    """One accelerator class's DaemonSet and how far it has got."""

    accelerator: str = Field(description="The accelerator class.")
    daemon_set: str = Field(description="The DaemonSet serving this class.")
    desired: int = Field(default=0, description="Nodes that should run this variant.")
    ready: int = Field(default=0, description="Nodes whose runtime is ready.")
    updated: int = Field(default=0, description="Nodes running the current model and settings.")
    providers_in_use: list[str] = Field(
        default_factory=list,
        description="The execution providers the runtime really runs the model on, as it reports them (its model "
        "metadata), asked of one ready pod of the current version; empty until asked. Fewer accelerator providers "
        "than the class configures is a CPU fallback (condition Accelerated).",
    )
    providers_reported_by: str = Field(default="", description="The node whose runtime reported providersInUse.")
    offline: int = Field(default=0, description="Nodes of this variant that are offline (not Ready).")


class UnhealthyNode(ApiModel):
    """A node that should serve the model but does not."""

    node: str = Field(description="The node's name.")
    accelerator: str = Field(description="The variant the node should run.")
    reason: str = Field(description="Why, in CamelCase: e.g. FetchFailed, DigestMismatch, Unschedulable.")
    message: str = Field(default="", description="Details.")


MAX_UNHEALTHY_NODES = 50
MAX_OFFLINE_NODES = 50


class OfflineNode(ApiModel):
    """A node that should serve the model but is not Ready: cut off from the control plane (its runtime may
    well go on serving from its node cache), or reporting itself not ready."""

    node: str = Field(description="The node's name.")
    accelerator: str = Field(description="The variant the node runs.")
    reason: Literal["Unreachable", "NotReady"] = Field(
        description="Unreachable: the node stopped reporting (Ready Unknown); NotReady: it reports Ready False."
    )
    since: str = Field(default="", description="When its Ready condition last changed (RFC 3339).")
    version: str = Field(default="", description="The model version its pod runs; empty when it has none.")
    updated: bool = Field(default=False, description="Whether its pod runs the current model and settings.")


RolloutState = Literal["RollingOut", "Paused", "Halted", "Complete"]


class RolloutStatus(ApiModel):
    """Where the operator-driven rollout of the current pod templates stands."""

    revision: str = Field(default="", description="Hash of the pod templates being rolled out.")
    state: RolloutState = Field(
        default="RollingOut",
        description="RollingOut (a wave is updating), Paused (a wave is done and its pods are watched for "
        "pauseSeconds), Halted (a wave failed: see reason and message; no more pods are replaced until the spec "
        "changes) or Complete (every reachable node runs the current version).",
    )
    wave: int = Field(default=1, description="The wave in progress (1-based), or the last one when complete.")
    waves: int = Field(default=1, description="Waves in all: spec.rollout.waves, plus a last one of every node.")
    healthy_since: str = Field(
        default="",
        description="When every new pod of the wave was first ready; the next wave starts pauseSeconds later.",
    )
    reason: str = Field(default="", description="Why it halted, in CamelCase (e.g. FetchFailed, ErrorRateExceeded).")
    message: str = Field(default="", description="Details, naming the pod and node.")


class InferenceModelStatus(ApiModel):
    """The observed state, computed by the operator from its DaemonSets, their pods and the nodes."""

    observed_generation: int = Field(
        default=0, description="The .metadata.generation that the DaemonSets were last rendered from."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Progressing, Degraded and Accelerated.",
        json_schema_extra=CONDITIONS_LIST,
    )
    model: ModelRef | None = Field(default=None, description="The model the DaemonSets are rendered for.")
    variants: list[VariantStatus] = Field(default_factory=list, description="One entry per accelerator class.")
    desired_nodes: int = Field(default=0, description="Nodes that should serve the model, offline ones included.")
    ready_nodes: int = Field(default=0, description="Nodes that serve it.")
    nodes: str = Field(default="", description="ready/desired nodes, for kubectl get.")
    unhealthy_nodes: list[UnhealthyNode] = Field(
        default_factory=list,
        max_length=MAX_UNHEALTHY_NODES,
        description=f"Nodes that should serve but do not, with the reason (at most {MAX_UNHEALTHY_NODES}).",
    )
    unhealthy_node_count: int = Field(
        default=0, description="How many nodes are unhealthy in all, including those not listed."
    )
    updated_nodes: int = Field(
        default=0, description="Nodes whose pod runs the current model and settings, offline ones included."
    )
    offline_nodes: list[OfflineNode] = Field(
        default_factory=list,
        max_length=MAX_OFFLINE_NODES,
        description="Nodes that should serve but are not Ready, longest offline first (at most "
        f"{MAX_OFFLINE_NODES}): their pods are not replaced while they are offline; they update when they return.",
    )
    offline_node_count: int = Field(
        default=0, description="How many nodes are offline in all, including those not listed."
    )
    rollout: RolloutStatus | None = Field(default=None, description="The rollout of the current pod templates.")


INFERENCE_MODEL = ResourceDefinition(
    kind="InferenceModel",
    plural="inferencemodels",
    singular="inferencemodel",
    short_names=("im",),
    spec=InferenceModelSpec,
    status=InferenceModelStatus,
    description="Serves an ONNX model on every node that has one of the listed accelerator classes, "
    "through one DaemonSet per class running the edgeloop runtime (Open Inference Protocol v2).",
    printer_columns=(
        PrinterColumn("Ready", '.status.conditions[?(@.type=="Ready")].status', description="Ready condition"),
        PrinterColumn("Nodes", ".status.nodes", description="Ready/desired nodes"),
        PrinterColumn("Model Version", ".status.model.version", description="Model the fleet is rolled to"),
        PrinterColumn(
            "Accelerated",
            '.status.conditions[?(@.type=="Accelerated")].reason',
            description="AcceleratorsInUse, CPUFallback, NoAcceleratedNodes or NotSampled",
        ),
        PrinterColumn("Reason", '.status.conditions[?(@.type=="Ready")].reason', priority=1),
        PrinterColumn("Offline", ".status.offlineNodeCount", type="integer", description="Offline nodes", priority=1),
        PrinterColumn("Rollout", ".status.rollout.state", description="RollingOut, Paused, Halted or Complete",
                      priority=1),
        PrinterColumn("Age", ".metadata.creationTimestamp", type="date"),
    ),
    root_validations=(
        cel(
            f"size(self.metadata.name) <= {MAX_NAME_LENGTH} "
            "&& self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
            f"metadata.name must be a DNS-1035 label of at most {MAX_NAME_LENGTH} characters "
            "(it names the Service and, with the class, the DaemonSets)",
        ),
    ),
)
