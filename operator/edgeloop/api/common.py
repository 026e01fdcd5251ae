"""Types shared by every edgeloop custom resource, and the vocabulary for describing a CRD.

Kubernetes-specific schema annotations (CEL rules, list types, int-or-string) ride along in pydantic's
`json_schema_extra`, next to the field they constrain, so the generated CRD and the model cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


def cel(rule: str, message: str, **extra: str) -> dict[str, str]:
    """One `x-kubernetes-validations` entry: a CEL rule and the message users see when it fails."""
    return {"rule": rule, "message": message, **extra}


class ApiModel(BaseModel):
    """Base of every API model: camelCase on the wire, snake_case in Python, immutable once parsed.

    Unknown fields are ignored rather than rejected: the API server prunes them before they reach us.
    """

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready dict as it appears in the cluster (camelCase keys, unset optionals left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def section(model: type[ApiModel], description: str) -> Any:
    """A sub-object that is filled with its own defaults when omitted, also by the API server.

    The CRD's default is the complete default object: the API server validates defaults against the
    schema's rules without defaulting inside them first.
    """
    return Field(default_factory=model, description=description, json_schema_extra={"default": model().to_wire()})


Sha256Hex = Annotated[
    str,
    Field(
        pattern=r"^[a-f0-9]{64}$",
        min_length=64,
        max_length=64,
        description="SHA-256 digest of the model file: 64 lowercase hexadecimal characters.",
    ),
]

# Kubernetes resource quantities ("500m", "1Gi", 2) are ints or strings on the wire.
Quantity = Annotated[
    int | str,
    Field(
        json_schema_extra={
            "x-kubernetes-int-or-string": True,
            "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",  # noqa: E501 (the API server's own quantity regex)
        }
    ),
]


class ModelSource(ApiModel):
    """Where a model comes from and how to verify it: a file addressed by URI and pinned by digest."""

    uri: str = Field(
        min_length=1,
        max_length=2048,
        pattern=r"^https?://\S+$",
        description="Where the runtime fetches the model from: an http:// or https:// URI (the model store's, or "
        "any origin: the sha256 decides). The fetcher reads no file of the node.",
    )
    sha256: Sha256Hex
    format: Literal["onnx", "tflite"] = Field(
        default="onnx",
        description="The model file's format: onnx (ONNX Runtime, with the accelerator's execution providers) or "
        "tflite (LiteRT, on the CPU). FederatedRounds train onnx models only.",
    )
    version: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Human-readable version, reported by the runtime's model metadata and in status.",
    )


class ModelRef(ApiModel):
    """The model a resource currently serves or produced: its digest and version."""

    sha256: str = Field(description="SHA-256 digest of the model file.")
    version: str = Field(description="The model's version.")


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(ApiModel):
    """One aspect of the resource's state, following the Kubernetes API conventions for conditions."""

    type: str = Field(max_length=316, description="The aspect this condition describes, in CamelCase.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        min_length=1,
        max_length=1024,
        description="A CamelCase, machine-readable word explaining the status.",
    )
    message: str = Field(default="", max_length=32768, description="A human-readable explanation.")
    last_transition_time: str = Field(
        json_schema_extra={"format": "date-time"},
        description="When the status last changed (RFC 3339).",
    )
    observed_generation: int = Field(
        default=0, ge=0, description="The .metadata.generation this condition was computed for."
    )


CONDITIONS_LIST = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


class Toleration(ApiModel):
    """A Kubernetes toleration, added to every pod the resource runs."""

    model_config = {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel("has(self.key) || self.operator == 'Exists'", "a toleration without a key needs operator Exists"),
                cel("self.operator != 'Exists' || !has(self.value)", "a toleration with operator Exists has no value"),
                cel(
                    "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
                    "tolerationSeconds applies to effect NoExecute only",
                ),
            ]
        }
    }

    key: str | None = Field(default=None, max_length=316, description="The taint key; empty matches all keys.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, max_length=63, description="The taint value, for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="The taint effect to tolerate; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="For NoExecute: how long the pod stays bound after the taint appears."
    )


class ResourceRequirements(ApiModel):
    """Compute resources of a container, as in a Kubernetes pod spec."""

    requests: dict[str, Quantity] = Field(default_factory=dict, description="Minimum resources.")
    limits: dict[str, Quantity] = Field(default_factory=dict, description="Maximum resources.")


@dataclass(frozen=True)
class PrinterColumn:
    name: str
    json_path: str
    type: str = "string"
    description: str = ""
    priority: int = 0


@dataclass(frozen=True)
class ResourceDefinition:
    """Everything about a custom resource that is not its schema: names, columns, root-level rules."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    spec: type[ApiModel]
    status: type[ApiModel]
    description: str
    categories: tuple[str, ...] = ("edgeloop",)
    printer_columns: tuple[PrinterColumn, ...] = ()
    # Rules that need metadata (only name and generateName are visible to CEL).
    root_validations: tuple[dict[str, str], ...] = field(default=())
