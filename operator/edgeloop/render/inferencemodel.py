"""An InferenceModel's manifests: one DaemonSet per accelerator class and one Service."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgeloop.api.inferencemodel import INFERENCE_MODEL, InferenceModelSpec
from edgeloop.config import AcceleratorClass, OperatorConfig
from edgeloop.names import (
    ACCELERATOR_LABEL,
    COMPILED_CACHE_DIR,
    INFERENCE_COMPONENT,
    INFERENCE_MODEL_LABEL,
    MANAGED_BY,
    PART_OF,
    RUNTIME_APP,
    TEMPLATE_LABEL,
    TLS_REVISION,
)
from edgeloop.nodes import NodeSelectorTerm
from edgeloop.render import Owner, render_hash, render_template, with_render_hash
from edgeloop.render.certificates import secret_name
from edgeloop.render.placement import node_selector_terms


@dataclass(frozen=True)
class Variant:
    """What runs on the nodes of one accelerator class."""

    accelerator: AcceleratorClass
    daemon_set: str
    node_selector_terms: list[NodeSelectorTerm]

    @property
    def name(self) -> str:
        return self.accelerator.name


@dataclass(frozen=True)
class Manifests:
    daemon_sets: dict[str, dict[str, Any]]  # by name, in the spec's order of preference
    service: dict[str, Any]

    def all(self) -> list[dict[str, Any]]:
        return [*self.daemon_sets.values(), self.service]


def owner_of(name: str, namespace: str, uid: str) -> Owner:
    return Owner(kind=INFERENCE_MODEL.kind, name=name, namespace=namespace, uid=uid)


def daemon_set_name(model_name: str, accelerator: str) -> str:
    return f"{model_name}-{accelerator}"


def variants(model_name: str, spec: InferenceModelSpec, config: OperatorConfig) -> list[Variant]:
    """One variant per listed class, in order. Raises ConfigError for a class the operator lacks."""
    classes = [config.accelerator_class(name) for name in spec.placement.accelerators]
    return [
        Variant(cls, daemon_set_name(model_name, cls.name), node_selector_terms(classes, index))
        for index, cls in enumerate(classes)
    ]


def labels(model_name: str, accelerator: str | None = None) -> dict[str, str]:
    common = {
        "app.kubernetes.io/name": RUNTIME_APP,
        "app.kubernetes.io/instance": model_name,
        "app.kubernetes.io/component": INFERENCE_COMPONENT,
        "app.kubernetes.io/part-of": PART_OF,
        **MANAGED_BY,
        INFERENCE_MODEL_LABEL: model_name,
    }
    return {**common, ACCELERATOR_LABEL: accelerator} if accelerator else common


def _resources(spec: InferenceModelSpec, config: OperatorConfig, accelerator: AcceleratorClass) -> dict[str, Any]:
    """The spec's resources; for each resource it does not name, the configured defaults (a memory limit)."""
    own, defaults = spec.runtime.resources, config.runtime_resources
    named = set(own.requests) | set(own.limits)
    requests = {**{k: v for k, v in defaults.requests.items() if k not in named}, **own.requests}
    limits = {**{k: v for k, v in defaults.limits.items() if k not in named}, **own.limits}
    if accelerator.resource:
        # Extended resources are requested through limits; an explicit amount in the spec wins.
        limits.setdefault(accelerator.resource, requests.get(accelerator.resource, accelerator.resource_count))
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def _tolerations(spec: InferenceModelSpec, accelerator: AcceleratorClass) -> list[dict[str, Any]]:
    merged: list[dict[str, Any]] = []
    for toleration in [*accelerator.tolerations, *spec.placement.tolerations]:
        if (wire := toleration.to_wire()) not in merged:
            merged.append(wire)
    return merged


def image(spec: InferenceModelSpec, config: OperatorConfig, accelerator: AcceleratorClass) -> str:
    """The model's own image for every variant, else the class's flavour, else the default runtime image.
    Raises ImageNotAllowed for an image outside the configuration's allowedImages."""
    return config.check_image(spec.runtime.image or config.image_of(accelerator))


def compiled_cache_sub_path(namespace: str) -> str:
    """The namespace's compiled models in the node cache: beside its models' directory, not in it, where its
    own pods may write (a symlink there must not lead a mount elsewhere). No namespace can be named so: a
    namespace's name has no dot."""
    return f"{namespace}.compiled"


def tls_secret_name(model_name: str) -> str:
    """The Secret with the runtime Service's certificate (written by the operator or by cert-manager)."""
    return secret_name(model_name)


def template_hash(daemon_set: dict[str, Any]) -> str:
    """The hash of a rendered DaemonSet's pod template, which its pods carry as a label."""
    return daemon_set["spec"]["template"]["metadata"]["labels"][TEMPLATE_LABEL]


def daemon_set(
    owner: Owner, spec: InferenceModelSpec, config: OperatorConfig, variant: Variant, tls_revision: str = ""
) -> dict[str, Any]:
    manifest = render_template(
        "daemonset.yaml.j2",
        name=variant.daemon_set,
        namespace=owner.namespace,
        owner=owner.reference(),
        labels=labels(owner.name, variant.name),
        selector={INFERENCE_MODEL_LABEL: owner.name, ACCELERATOR_LABEL: variant.name},
        model_name=owner.name,
        spec=spec,
        config=config,
        variant=variant,
        image=image(spec, config, variant.accelerator),
        image_pull_policy=config.image_pull_policy_of(variant.accelerator),
        resources=_resources(spec, config, variant.accelerator),
        fetch_resources=config.fetch_resources.to_wire(),
        compiled_cache=COMPILED_CACHE_DIR,
        compiled_sub_path=compiled_cache_sub_path(owner.namespace),
        store_ca=config.store_ca_config_map if spec.model.uri.startswith("https://") else None,
        tolerations=_tolerations(spec, variant.accelerator),
        tls_secret=tls_secret_name(owner.name) if config.tls.enabled else None,
        tls_revision={TLS_REVISION: tls_revision} if config.tls.enabled else {},
    )
    # Pods tell their version by their template's hash: the operator replaces those of an older one.
    template = manifest["spec"]["template"]
    template["metadata"]["labels"][TEMPLATE_LABEL] = render_hash(template)
    return with_render_hash(manifest)


def service(owner: Owner, spec: InferenceModelSpec, config: OperatorConfig) -> dict[str, Any]:
    return with_render_hash(
        render_template(
            "service.yaml.j2",
            name=owner.name,
            namespace=owner.namespace,
            owner=owner.reference(),
            labels=labels(owner.name),
            selector={INFERENCE_MODEL_LABEL: owner.name},
            serving=spec.serving,
            tls=config.tls.enabled,
        )
    )


def render(owner: Owner, spec: InferenceModelSpec, config: OperatorConfig, tls_revision: str = "") -> Manifests:
    """Everything an InferenceModel consists of. Raises ConfigError for an unknown accelerator class, its
    subclass ImageNotAllowed for an image outside allowedImages.

    `tls_revision` identifies the certificate the runtime serves: its pods roll when it changes."""
    daemon_sets = {
        variant.daemon_set: daemon_set(owner, spec, config, variant, tls_revision)
        for variant in variants(owner.name, spec, config)
    }
    return Manifests(daemon_sets=daemon_sets, service=service(owner, spec, config))
