"""A FederatedRound's manifests: the aggregator Job and its Service, and one client Job per selected node.

What is decided when the round starts (the nodes, the starting model, the model the InferenceModel served)
is recorded on the aggregator Job, which is created first: every later render of the round comes from
that record, so the Jobs never disagree with each other, whatever the nodes or the InferenceModel do since.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Any

from edgeloop.api.common import ModelSource, ResourceRequirements
from edgeloop.api.federatedround import FEDERATED_ROUND, FederatedRoundSpec
from edgeloop.config import OperatorConfig
from edgeloop.names import (
    AGGREGATOR_ROLE,
    CLIENT_ROLE,
    MANAGED_BY,
    PART_OF,
    ROLE_LABEL,
    ROUND_LABEL,
    RUNTIME_APP,
    TRAINING_COMPONENT,
)
from edgeloop.render import Owner, render_template

STORE_TOKEN_KEY = "token"
AGGREGATOR_PORT = 8080
# The aggregator's /metrics and /healthz in plain HTTP: Prometheus has no client certificate for the main port.
AGGREGATOR_METRICS_PORT = 9090

# The runtime's defaults for what the spec does not set (FEDERATED.md): the short stages' timeout and how
# long the aggregator keeps answering after the end. Only the Jobs' safety deadline depends on them.
_STAGE_TIMEOUT_SECONDS = 60
_LINGER_SECONDS = 30
# Pulling the image and fetching the starting model.
_STARTUP_SECONDS = 600


@dataclass(frozen=True)
class Start:
    """The decisions taken when a round starts."""

    nodes: tuple[str, ...]
    model: ModelSource
    serving_sha256: str | None  # what modelRef's InferenceModel served then; promotion replaces only that

    def to_annotation(self) -> str:
        return json.dumps(
            {"nodes": list(self.nodes), "model": self.model.to_wire(), "servingSha256": self.serving_sha256},
            sort_keys=True,
        )

    @classmethod
    def from_annotation(cls, text: str) -> Start:
        record = json.loads(text)
        return cls(tuple(record["nodes"]), ModelSource.model_validate(record["model"]), record["servingSha256"])


@dataclass(frozen=True)
class Manifests:
    service: dict[str, Any]
    aggregator: dict[str, Any]
    clients: list[dict[str, Any]]  # in the order of Start.nodes

    def all(self) -> list[dict[str, Any]]:
        """In creation order: the aggregator Job records the start, so it comes first."""
        return [self.aggregator, self.service, *self.clients]


def owner_of(name: str, namespace: str, uid: str) -> Owner:
    return Owner(kind=FEDERATED_ROUND.kind, name=name, namespace=namespace, uid=uid)


def aggregator_name(round_name: str) -> str:
    return f"{round_name}-aggregator"


def client_name(round_name: str, index: int) -> str:
    return f"{round_name}-client-{index}"


def aggregator_tls_secret(round_name: str) -> str:
    """The aggregator's server certificate, for the DNS names of its Service."""
    return f"{round_name}-aggregator-tls"


def client_tls_secret(round_name: str, index: int) -> str:
    """The client certificate of one client Job (mTLS): its subject CN is the client's id, its node's name."""
    return f"{round_name}-client-{index}-tls"


def status_tls_secret(round_name: str) -> str:
    """The client certificate the operator reads the aggregator's status with (mTLS)."""
    return f"{round_name}-status-tls"


# The operator's identity at the aggregator: no node can be named so (a node's name has no ':').
STATUS_CLIENT = "edgeloop:operator"


def aggregator_host(owner: Owner) -> str:
    """The name clients reach the aggregator Service by; its server certificate carries it."""
    return f"{aggregator_name(owner.name)}.{owner.namespace}.svc"


def aggregator_url(owner: Owner, tls: bool = False) -> str:
    return f"{'https' if tls else 'http'}://{aggregator_host(owner)}:{AGGREGATOR_PORT}"


def labels(round_name: str, role: str | None = None) -> dict[str, str]:
    common = {
        "app.kubernetes.io/name": RUNTIME_APP,
        "app.kubernetes.io/instance": round_name,
        "app.kubernetes.io/component": TRAINING_COMPONENT,
        "app.kubernetes.io/part-of": PART_OF,
        **MANAGED_BY,
        ROUND_LABEL: round_name,
    }
    return {**common, ROLE_LABEL: role} if role else common


def active_deadline_seconds(spec: FederatedRoundSpec) -> int:
    """A bound no healthy round reaches: every training round and the evaluation round at their
    deadlines, the short stages at their timeouts, the linger and the start-up."""
    per_round = spec.deadline_seconds + 2 * _STAGE_TIMEOUT_SECONDS
    return (spec.training.rounds + 1) * per_round + _LINGER_SECONDS + _STARTUP_SECONDS


class DatasetOutsideRoot(ValueError):
    """The round's dataset is not in its namespace's data directory."""


def namespace_data_dir(config: OperatorConfig, namespace: str) -> str:
    """The directory of a namespace's datasets on every node; its claim (datasetClaim) is bound to it."""
    return posixpath.join(config.dataset_root, namespace)


def dataset_path(spec: FederatedRoundSpec, config: OperatorConfig, namespace: str) -> str:
    """The dataset's directory on the nodes. Raises DatasetOutsideRoot unless it lies in the namespace's
    data directory: a round never reads another namespace's data."""
    root = namespace_data_dir(config, namespace)
    if spec.dataset.name is not None:
        return posixpath.join(root, spec.dataset.name)
    assert spec.dataset.host_path is not None  # admission requires one of them
    path = posixpath.normpath("/" + spec.dataset.host_path.lstrip("/"))
    if path != root and not path.startswith(root + "/"):
        raise DatasetOutsideRoot(
            f"dataset.hostPath {spec.dataset.host_path} is not under {root}/, the directory of namespace "
            f"{namespace}'s datasets on the nodes"
        )
    return path


def dataset_sub_path(spec: FederatedRoundSpec, config: OperatorConfig, namespace: str) -> str:
    """The dataset's path within its namespace's data directory ("" for that directory itself)."""
    relative = posixpath.relpath(dataset_path(spec, config, namespace), namespace_data_dir(config, namespace))
    return "" if relative == "." else relative


def image(spec: FederatedRoundSpec, config: OperatorConfig) -> str:
    """The round's own image, else the federated flavour; ImageNotAllowed outside allowedImages."""
    return config.check_image(spec.runtime.image or config.federated_image)


def _common(owner: Owner, spec: FederatedRoundSpec, config: OperatorConfig) -> dict[str, Any]:
    return {
        "namespace": owner.namespace,
        "owner": owner.reference(),
        "spec": spec,
        "config": config,
        "image": image(spec, config),
        "active_deadline": active_deadline_seconds(spec),
    }


def _resources(requirements: ResourceRequirements) -> dict[str, Any]:
    return {key: value for key, value in requirements.to_wire().items() if value}


def checkpoint_ref(owner: Owner) -> str:
    """The store ref of the round's checkpoint: the uid keeps a recreated round of the same name from resuming an
    old one, and makes the name unguessable to other tenants."""
    return f"{owner.namespace}.{owner.name}.{owner.uid}"


def aggregator_job(owner: Owner, spec: FederatedRoundSpec, config: OperatorConfig, start: Start) -> dict[str, Any]:
    return render_template(
        "federatedround-aggregator.yaml.j2",
        name=aggregator_name(owner.name),
        labels=labels(owner.name, AGGREGATOR_ROLE),
        start=start.to_annotation(),
        model=start.model,
        training=spec.training,
        clients=len(start.nodes),
        port=AGGREGATOR_PORT,
        metrics_port=AGGREGATOR_METRICS_PORT,
        store_token_key=STORE_TOKEN_KEY,
        tls_secret=aggregator_tls_secret(owner.name) if config.tls.enabled else None,
        resources=_resources(spec.aggregator.resources) or _resources(spec.runtime.resources),
        node_selector=dict(spec.aggregator.node_selector),
        tolerations=[t.to_wire() for t in spec.aggregator.tolerations],
        checkpoint_ref=checkpoint_ref(owner),
        **_common(owner, spec, config),
    )


def service(owner: Owner) -> dict[str, Any]:
    return render_template(
        "federatedround-service.yaml.j2",
        name=aggregator_name(owner.name),
        namespace=owner.namespace,
        owner=owner.reference(),
        labels=labels(owner.name, AGGREGATOR_ROLE),
        selector={ROUND_LABEL: owner.name, ROLE_LABEL: AGGREGATOR_ROLE},
        port=AGGREGATOR_PORT,
    )


def client_job(owner: Owner, spec: FederatedRoundSpec, config: OperatorConfig, index: int, node: str) -> dict[str, Any]:
    return render_template(
        "federatedround-client.yaml.j2",
        name=client_name(owner.name, index),
        labels=labels(owner.name, CLIENT_ROLE),
        node=node,
        aggregator_url=aggregator_url(owner, config.tls.enabled),
        tls_secret=client_tls_secret(owner.name, index) if config.tls.enabled else None,
        tolerations=[t.to_wire() for t in spec.participants.tolerations],
        dataset_path=dataset_path(spec, config, owner.namespace),
        dataset_sub_path=dataset_sub_path(spec, config, owner.namespace),
        resources=_resources(spec.runtime.resources),
        **_common(owner, spec, config),
    )


def render(owner: Owner, spec: FederatedRoundSpec, config: OperatorConfig, start: Start) -> Manifests:
    """Everything a started round consists of."""
    return Manifests(
        service=service(owner),
        aggregator=aggregator_job(owner, spec, config, start),
        clients=[client_job(owner, spec, config, index, node) for index, node in enumerate(start.nodes)],
    )
