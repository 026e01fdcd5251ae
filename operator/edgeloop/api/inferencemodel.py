"""InferenceModel: serve an ONNX model on every node that has a given kind of accelerator."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

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


class Rollout(ApiModel):
    """How a new model or configuration reaches the fleet."""

    max_unavailable: int | str = Field(
        default="10%",
        description="How many nodes of each variant may be updating at once: a count (at least 1) or a "
        "percentage such as 10%.",
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "x-kubernetes-validations": [
                cel(
                    "type(self) == int ? self >= 1 : self.matches('^([1-9][0-9]?|100)%$')",
                    "maxUnavailable must be a count of at least 1 or a percentage from 1% to 100%",
                ),
            ],
        },
    )


class InferenceModelSpec(ApiModel):
    """The desired state: which model to serve, where, and how."""

    model: ModelSource = Field(description="The model to serve. Changing it rolls every variant.")
    placement: Placement = Field(description="Where the model is served.")
    runtime: RuntimeSpec = section(RuntimeSpec, "Runtime settings shared by every variant.")
    serving: Serving = section(Serving, "Network endpoints of the runtime.")
    rollout: Rollout = section(Rollout, "Rolling-update behaviour of every variant.")


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


class UnhealthyNode(ApiModel):
    """A node that should serve the model but does not."""

    node: str = Field(description="The node's name.")
    accelerator: str = Field(description="The variant the node should run.")
    reason: str = Field(description="Why, in CamelCase: e.g. FetchFailed, DigestMismatch, Unschedulable.")
    message: str = Field(default="", description="Details.")


MAX_UNHEALTHY_NODES = 50


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
    desired_nodes: int = Field(default=0, description="Nodes that should serve the model.")
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
