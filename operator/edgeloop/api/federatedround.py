"""FederatedRound: improve a model on the nodes' local data, then roll it out when it is better."""

from __future__ import annotations

from typing import Annotated, Literal

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
from edgeloop.api.inferencemodel import MAX_NAME_LENGTH as MAX_MODEL_NAME_LENGTH

# Objects are named after the round: "<name>-aggregator" (Job and Service, a DNS-1035 label of at most 63
# characters) and "<name>-client-<index>" (Jobs, whose name becomes a pod label value of at most 63).
MAX_NAME_LENGTH = 52
MAX_CLIENTS = 1000

LabelValue = Annotated[str, Field(max_length=63)]


class InferenceModelRef(ApiModel):
    """An InferenceModel in the round's namespace."""

    name: str = Field(
        min_length=1,
        max_length=MAX_MODEL_NAME_LENGTH,
        pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$",
        description="The InferenceModel's name.",
    )


class Participants(ApiModel):
    """Which nodes train: chosen once, when the round starts."""

    model_config = {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel("self.minClients <= self.maxClients", "minClients must not exceed maxClients"),
            ]
        }
    }

    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict,
        max_length=32,
        description="Node labels a participating node must have. Of the matching nodes that are Ready, "
        "schedulable and whose NoSchedule/NoExecute taints are tolerated, the first maxClients by name "
        "take part.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Tolerations of the client pods."
    )
    min_clients: int = Field(
        default=3,
        ge=1,
        le=MAX_CLIENTS,
        description="The quorum: the round waits until this many nodes are eligible, and a training round "
        "with fewer updates fails.",
    )
    max_clients: int = Field(default=20, ge=1, le=MAX_CLIENTS, description="At most this many nodes take part.")


class Dataset(ApiModel):
    """The local training data; it is read on each node and never leaves it. Each namespace has its own
    directory of datasets on the nodes (<datasetRoot>/<namespace>, by default /var/lib/edgeloop/data/<namespace>),
    and a round reads only from its namespace's."""

    model_config = {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel("has(self.name) != has(self.hostPath)", "set exactly one of name and hostPath"),
            ]
        }
    }

    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=253,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="The dataset's directory in the namespace's data directory on each node: "
        "/var/lib/edgeloop/data/<namespace>/<name> with the default datasetRoot.",
    )
    host_path: str | None = Field(
        default=None,
        min_length=2,
        max_length=1024,
        pattern=r"^/",
        description="The dataset's directory on each node, given by its path: it must lie in the namespace's data "
        "directory (<datasetRoot>/<namespace>/...), or the round fails (DatasetOutsideRoot).",
        json_schema_extra={
            "x-kubernetes-validations": [
                cel("!self.split('/').exists(p, p == '..')", "hostPath must not contain '..'"),
            ]
        },
    )


class Training(ApiModel):
    """The federated optimisation, run by the aggregator and passed to every client."""

    model_config = {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "self.strategy == 'fedprox' || self.proximalMu == 0.0",
                    "proximalMu applies to strategy fedprox only",
                ),
            ]
        }
    }

    rounds: int = Field(default=5, ge=1, le=1000, description="Training rounds.")
    local_epochs: int = Field(default=1, ge=1, le=1000, description="Epochs each client trains per round.")
    batch_size: int = Field(default=32, ge=1, le=65536, description="Mini-batch size on the clients.")
    learning_rate: float = Field(default=0.05, gt=0, le=100, description="Clients' SGD learning rate.")
    strategy: Literal["fedavg", "fedprox"] = Field(
        default="fedavg", description="fedavg, or fedprox (FedAvg with a proximal term, for skewed data)."
    )
    proximal_mu: float = Field(default=0.0, ge=0, le=1000, description="FedProx's proximal term weight.")
    trainable: Literal["auto", "all", "last"] = Field(
        default="auto",
        description="Which layers train: all (every dense layer of an MLP or logistic regression), last "
        "(only the final dense layer, on features computed by the frozen rest of the graph), or auto "
        "(all when the graph is only dense layers, else last).",
    )


class SecureAggregation(ApiModel):
    """Masking so that the aggregator learns only the sum of the updates (Bonawitz et al., SecAgg+)."""

    enabled: bool = Field(default=True, description="Mask every update; off sends updates in the clear.")
    threshold: float = Field(
        default=0.66,
        gt=0,
        le=1,
        description="Fraction in (0, 1] of the clients (and of each client's neighbours) that must survive "
        "a round for the sum to be recovered; with fewer, the round fails.",
    )


class Privacy(ApiModel):
    """Differential-privacy style protection of each client's update."""

    model_config = {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    "self.noiseMultiplier == 0.0 || has(self.clipNorm)",
                    "noiseMultiplier needs clipNorm: the noise is scaled by the clip norm",
                ),
            ]
        }
    }

    clip_norm: float | None = Field(
        default=None, gt=0, le=1e6, description="Clip each client's update to this L2 norm; unset: no clipping."
    )
    noise_multiplier: float = Field(
        default=0.0, ge=0, le=100, description="Gaussian noise added to each update, std = this x clipNorm."
    )


class Promote(ApiModel):
    """When the trained model replaces the one the InferenceModel serves."""

    enabled: bool = Field(
        default=True, description="Promote a model that passes the gate; false only publishes it to the store."
    )
    min_accuracy: float = Field(
        default=0.0, ge=0, le=1, description="The trained model's federated accuracy must reach this."
    )
    require_improvement: bool = Field(
        default=True,
        description="The trained model must beat the starting model on the same clients' holdout data "
        "(higher accuracy, or equal accuracy and lower loss).",
    )
    version: str | None = Field(
        default=None,
        max_length=63,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="The promoted model's version; unset: the starting version plus one when it is a "
        "number, else <starting version>-<round name>.",
    )


class RoundRuntime(ApiModel):
    """The pods that run the round."""

    image: str = Field(
        default="",
        max_length=512,
        description="The runtime's container image; empty means the operator's configured default.",
    )
    resources: ResourceRequirements = section(
        ResourceRequirements, "Compute resources of the aggregator and of each client container."
    )


class Aggregator(ApiModel):
    """Where the round's aggregator runs: e.g. pinned to a k3s server node, away from the edge nodes that come
    and go. Its checkpoint outlives its pod (docs/federatedround.md), so a lost node costs no finished round."""

    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict,
        max_length=32,
        description="Node labels the aggregator's node must have, e.g. node-role.kubernetes.io/control-plane: "
        "\"true\".",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Tolerations of the aggregator pod."
    )
    resources: ResourceRequirements = section(
        ResourceRequirements, "Compute resources of the aggregator container; empty: runtime.resources."
    )


class FederatedRoundSpec(ApiModel):
    """The desired run. It is immutable: a FederatedRound is one run, and another run is another object."""

    model_config = {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel("has(self.modelRef) || has(self.model)", "set modelRef, model, or both"),
                cel(
                    "!has(self.model) || self.model.format == 'onnx'",
                    "federated training needs an onnx model: a tflite model can be served, not trained",
                ),
                cel(
                    "self == oldSelf",
                    "spec is immutable: a FederatedRound is one run; create another one to train again",
                ),
            ]
        }
    }

    model_ref: InferenceModelRef | None = Field(
        default=None,
        description="The InferenceModel to improve: the round starts from the model it serves (unless model "
        "is set) and, when the promotion gate passes, points it at the trained model.",
    )
    model: ModelSource | None = Field(
        default=None, description="The starting model, when it is not the one modelRef's InferenceModel serves."
    )
    participants: Participants = section(Participants, "Which nodes train.")
    dataset: Dataset = Field(
        description="Where each node's training data is: a directory holding one .npz file with arrays x "
        "(inputs) and y (integer labels), mounted read-only into the client pod; it must exist on every node "
        "that can be selected."
    )
    training: Training = section(Training, "The federated optimisation.")
    secure_aggregation: SecureAggregation = section(SecureAggregation, "Secure aggregation of the updates.")
    privacy: Privacy = section(Privacy, "Clipping and noise on each client's update.")
    deadline_seconds: int = Field(
        default=900,
        ge=10,
        le=86400,
        description="Per round: clients that have not uploaded by then are dropped, and the round goes on "
        "with the others if they reach the quorum.",
    )
    promote: Promote = section(Promote, "The promotion gate.")
    runtime: RoundRuntime = section(RoundRuntime, "Image and resources of the round's pods.")
    aggregator: Aggregator = section(Aggregator, "Where the aggregator runs, and its resources.")


class ParticipantsStatus(ApiModel):
    """Who takes part: the selected nodes and, per the aggregator, how many of them reported."""

    selected: int = Field(default=0, description="Clients selected (one client Job each).")
    reported: int = Field(default=0, description="Clients whose update is in the current or last round's sum.")
    dropped: int = Field(default=0, description="Selected clients that did not report in that round.")
    nodes: list[str] = Field(default_factory=list, description="The selected nodes, by name.")


class Metrics(ApiModel):
    """Federated evaluation: the clients' holdout metrics, weighted by holdout size."""

    accuracy: float = Field(description="Accuracy in [0, 1].")
    loss: float = Field(description="Mean cross-entropy loss.")


class Result(ApiModel):
    """The trained model, published to the model store."""

    uri: str = Field(description="Where the model store serves it.")
    sha256: str = Field(description="Its SHA-256 digest.")
    version: str = Field(default="", description="The version it is (or would be) promoted as.")


Phase = Literal["Pending", "Running", "Succeeded", "Failed"]


class FederatedRoundStatus(ApiModel):
    """The observed state, from the round's Jobs and the aggregator's reports."""

    observed_generation: int = Field(default=0, description="The .metadata.generation last acted on.")
    phase: Phase = Field(
        default="Pending",
        description="Pending (waiting for nodes or the model), Running, Succeeded (trained and published) or Failed.",
    )
    round: int = Field(default=0, description="The training round in progress, or the last one completed.")
    rounds: int = Field(default=0, description="Training rounds in all.")
    progress: str = Field(default="", description="round/rounds, for kubectl get.")
    stage: str = Field(default="", description="The stage of the round in progress: join, share, collect, unmask.")
    participants: ParticipantsStatus = Field(default_factory=ParticipantsStatus, description="Who takes part.")
    base_model: ModelRef | None = Field(default=None, description="The model the round started from.")
    baseline: Metrics | None = Field(default=None, description="The starting model's federated evaluation.")
    metrics: Metrics | None = Field(default=None, description="The trained model's federated evaluation.")
    accuracy: str = Field(
        default="", description="metrics.accuracy to 3 significant digits (e.g. 0.972), for kubectl get."
    )
    result: Result | None = Field(default=None, description="The trained model, once published.")
    promoted: bool = Field(default=False, description="Whether modelRef's InferenceModel now serves the result.")
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Started, Succeeded, Promoted and Degraded (a pod of the round is stuck, and why).",
        json_schema_extra=CONDITIONS_LIST,
    )


FEDERATED_ROUND = ResourceDefinition(
    kind="FederatedRound",
    plural="federatedrounds",
    singular="federatedround",
    short_names=("fr",),
    spec=FederatedRoundSpec,
    status=FederatedRoundStatus,
    description="Trains a model on the nodes' local data with federated learning and secure aggregation: "
    "an aggregator Job and one client Job per selected node. The trained model is published to the model "
    "store and, when it passes the promotion gate, rolled out by pointing the InferenceModel at it.",
    printer_columns=(
        PrinterColumn("Phase", ".status.phase", description="Pending, Running, Succeeded or Failed"),
        PrinterColumn("Round", ".status.progress", description="Training round / rounds"),
        PrinterColumn("Clients", ".status.participants.selected", type="integer", description="Selected clients"),
        PrinterColumn("Accuracy", ".status.accuracy", description="Trained model, 3 significant digits"),
        PrinterColumn("Promoted", ".status.promoted", type="boolean"),
        PrinterColumn("Reason", '.status.conditions[?(@.type=="Succeeded")].reason', priority=1),
        PrinterColumn("Age", ".metadata.creationTimestamp", type="date"),
    ),
    root_validations=(
        cel(
            f"size(self.metadata.name) <= {MAX_NAME_LENGTH} "
            "&& self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
            f"metadata.name must be a DNS-1035 label of at most {MAX_NAME_LENGTH} characters "
            "(it names the aggregator's Service and the round's Jobs)",
        ),
    ),
)
