"""Operator configuration: the runtime images, the node cache, the accelerator classes, the model store.

Built-in defaults live here and only here. A YAML or JSON file (the Helm chart's values, rendered into a
ConfigMap) is merged over them: top-level keys replace the defaults; under `acceleratorClasses`, each class
is merged field by field over the built-in class of the same name, a new name adds a class, and `null`
removes one. `python -m edgeloop.config [FILE]` prints the effective configuration.
"""

from __future__ import annotations

import argparse
import fnmatch
import posixpath
import sys
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from edgeloop.api.common import ResourceRequirements, Toleration
from edgeloop.api.inferencemodel import AcceleratorClassName

CPU_EXECUTION_PROVIDER = "CPUExecutionProvider"

ImagePullPolicy = Literal["Always", "IfNotPresent", "Never"]


class ConfigError(ValueError):
    """The operator configuration is unusable; the message says which field and why."""


class ImageNotAllowed(ConfigError):
    """An image that the operator configuration's allowedImages does not allow."""


class _Config(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True, extra="forbid")


class AcceleratorClass(_Config):
    """A kind of accelerator: how to recognise its nodes and how to run the runtime on them."""

    name: AcceleratorClassName
    match_any_label: dict[str, str] = Field(
        description="A node has this class if it carries any of these labels. Empty: every node (the "
        "catch-all class, which must come last in an InferenceModel's list)."
    )
    resource: str | None = Field(
        default=None, description="Extended resource requested by each pod, e.g. nvidia.com/gpu."
    )
    resource_count: int = Field(default=1, ge=1, description="How many of `resource` each pod requests.")
    runtime_class_name: str | None = Field(default=None, description="The pods' runtimeClassName.")
    execution_providers: list[str] = Field(
        min_length=1, description="ONNX Runtime execution providers to try, in order; the last is CPU."
    )
    allow_cpu_fallback: bool = Field(
        default=False,
        description="Serve on CPU when this class's accelerator provider is missing on a node. Off by "
        "default: a node that claims an accelerator but cannot use it fails loudly (Degraded) instead of "
        "serving slowly.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations for taints that mark this class's nodes."
    )
    image: str = Field(
        default="",
        max_length=512,
        description="The runtime image of this class's variants: a flavour whose ONNX Runtime has this class's "
        "execution providers (runtime-cuda for CUDA, runtime-openvino for OpenVINO). Empty: runtimeImage. An "
        "InferenceModel's spec.runtime.image replaces it for every variant of that model.",
    )
    architectures: list[Annotated[str, Field(pattern=r"^[a-z0-9_]{1,32}$")]] = Field(
        default_factory=list,
        max_length=16,
        description="The node architectures (kubernetes.io/arch: amd64, arm64, ...) this class's image is built "
        "for. A node of another architecture does not have this class, whatever its labels: it runs the next class "
        "it has (the catch-all cpu class, whose image is amd64 and arm64). Empty: every architecture.",
    )
    image_pull_policy: ImagePullPolicy | None = Field(
        default=None, description="imagePullPolicy of this class's variants; unset: imagePullPolicy."
    )
    provider_options: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description="Options per execution provider, passed to ONNX Runtime as they are: {<provider>: {<key>: "
        "<string value>}}, e.g. CUDAExecutionProvider: {cudnn_conv_algo_search: HEURISTIC}, "
        "OpenVINOExecutionProvider: {device_type: NPU}. A provider named here must be in executionProviders.",
    )

    @field_validator("execution_providers")
    @classmethod
    def _ends_with_cpu(cls, providers: list[str]) -> list[str]:
        if providers[-1] != CPU_EXECUTION_PROVIDER:
            raise ValueError(f"must end with {CPU_EXECUTION_PROVIDER}, so every node can serve the model")
        return providers

    @field_validator("provider_options", mode="before")
    @classmethod
    def _string_options(cls, options: Any) -> Any:
        if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
            raise ValueError("providerOptions is {<provider>: {<key>: <string value>}}")
        if len(options) > 16 or any(len(v) > 64 for v in options.values()):
            raise ValueError("providerOptions: at most 16 providers of 64 options each")
        for provider, values in options.items():
            for key, value in values.items():
                if not isinstance(value, str) or len(value) > 1024:
                    raise ValueError(
                        f"{provider}.{key} is {value!r}: option values are strings of at most 1024 characters "
                        "(quote numbers and booleans, as ONNX Runtime takes them)"
                    )
        return options

    @model_validator(mode="after")
    def _options_of_listed_providers(self) -> AcceleratorClass:
        unknown = [p for p in self.provider_options if p not in self.execution_providers]
        if unknown:
            listed = self.execution_providers
            raise ValueError(f"providerOptions names {unknown}, not in its executionProviders {listed}")
        return self

    @property
    def is_catch_all(self) -> bool:
        return not self.match_any_label


class IssuerRef(_Config):
    """A cert-manager issuerRef."""

    name: str = Field(min_length=1)
    kind: Literal["Issuer", "ClusterIssuer"] = "Issuer"
    group: str = "cert-manager.io"


class TLSConfig(_Config):
    """TLS by default for the endpoints the operator renders (see docs/tls.md)."""

    mode: Literal["operator", "cert-manager", "disabled"] = Field(
        default="operator",
        description="operator: the operator keeps a CA per namespace and issues and rotates the certificates "
        "itself; cert-manager: it renders cert-manager Certificates for `issuer` instead; disabled: plain HTTP.",
    )
    ca_validity_days: float = Field(default=3650, gt=0, description="Validity of a CA the operator creates.")
    cert_validity_days: float = Field(
        default=90, gt=0, description="Validity of a certificate; renewed when a third of it remains."
    )
    issuer: IssuerRef | None = Field(
        default=None, description="cert-manager mode: the Certificates' issuer, e.g. {name: ca, kind: ClusterIssuer}."
    )

    @model_validator(mode="after")
    def _issuer_for_cert_manager(self) -> TLSConfig:
        if self.mode == "cert-manager" and self.issuer is None:
            raise ValueError("cert-manager mode needs an issuer")
        return self

    @property
    def enabled(self) -> bool:
        return self.mode != "disabled"


class OperatorConfig(_Config):
    runtime_image: str = Field(
        description="Default image of the edgeloop runtime (the cpu flavour): the classes without an image of "
        "their own."
    )
    federated_image: str = Field(
        description="Image of FederatedRound aggregator and client Jobs: the runtime-federated flavour (the "
        "serving flavours have no `federated` command). A round's spec.runtime.image replaces it."
    )
    image_pull_policy: ImagePullPolicy = "IfNotPresent"
    model_cache_dir: str = Field(
        default="/var/lib/edgeloop/models",
        pattern=r"^/",
        description="Node-local, content-addressed model cache: one directory per namespace under it "
        "(<modelCacheDir>/<namespace>), which is all a pod of that namespace mounts (a subPath).",
    )
    model_cache_claim: str | None = Field(
        default=None,
        description="Mount the node cache through this PersistentVolumeClaim of the model's namespace instead of "
        "a hostPath volume, so that the pods meet the Pod Security restricted level; the namespace's directory "
        "is its subPath. The claim is bound to a hostPath PersistentVolume of modelCacheDir, and an admission "
        "policy allows pods to mount the claim with that subPath only (the Helm chart creates all three).",
    )
    dataset_root: str = Field(
        default="/var/lib/edgeloop/data",
        pattern=r"^/",
        description="Node directory of the FederatedRound datasets: one directory per namespace under it "
        "(<datasetRoot>/<namespace>/<dataset>), and a round reads only from its namespace's.",
    )
    dataset_claim: str | None = Field(
        default=None,
        description="Mount FederatedRound datasets through this PersistentVolumeClaim of the round's namespace "
        "(read-only, with the dataset's path in the namespace's directory as subPath) instead of a hostPath "
        "volume, so that the client pods meet the Pod Security restricted level. The claim is bound to a hostPath "
        "PersistentVolume of <datasetRoot>/<namespace> (the Helm chart creates both).",
    )
    run_as_user: int = Field(
        default=65532,
        ge=1,
        description="UID of the runtime containers; the node's model cache must be writable by it.",
    )
    accelerator_classes: dict[str, AcceleratorClass]
    runtime_resources: ResourceRequirements = Field(
        default_factory=lambda: ResourceRequirements(
            requests={"cpu": "100m", "memory": "256Mi"}, limits={"memory": "1Gi"}
        ),
        description="Defaults for the runtime container of every InferenceModel variant, so that none runs "
        "without a memory limit. A resource that the model's spec.runtime.resources names (in requests or "
        "limits) is set by the spec alone.",
    )
    fetch_resources: ResourceRequirements = Field(
        default_factory=lambda: ResourceRequirements(
            requests={"cpu": "50m", "memory": "64Mi"}, limits={"memory": "256Mi"}
        ),
        description="Resources of the init container that fetches and verifies the model (it streams it).",
    )
    store_url: str = Field(
        default="http://edgeloop-store.edgeloop-system.svc:8000",
        pattern=r"^https?://[^/]+$",
        description="The model store's base URL; FederatedRounds publish trained models there.",
    )
    store_ca_config_map: str | None = Field(
        default=None,
        description="ConfigMap, in each workload namespace, whose key ca.crt is the CA of the model store's HTTPS "
        "certificate: fetchers of https:// models and aggregators trust it besides the system's CAs (the Helm chart "
        "creates it with the store's TLS).",
    )
    store_token_secret: str = Field(
        default="edgeloop-store-token",
        description="Secret, in each FederatedRound's namespace, whose key `token` is the store's upload token.",
    )
    tls: TLSConfig = Field(default_factory=TLSConfig)
    allowed_images: list[str] = Field(
        default_factory=list,
        max_length=256,
        description="If set, the only images the operator runs, as glob patterns where * matches any characters "
        "(e.g. ghcr.io/edgeloop/*, registry.example/edgeloop/runtime@sha256:*): every configured image must "
        "match one, and a model or round whose spec.runtime.image matches none fails (ImageNotAllowed). "
        "Empty: any image.",
    )
    aggregator_status_url: str | None = Field(
        default=None,
        description="Where the operator reads a FederatedRound aggregator's status; {service}, {namespace} and "
        "{port} are filled in. The default, {scheme}://{service}.{namespace}.svc:{port}/v1/status, resolves "
        "inside the cluster; its scheme is https unless tls.mode is disabled.",
    )

    @field_validator("dataset_root", "model_cache_dir")
    @classmethod
    def _plain_root(cls, root: str) -> str:
        if ".." in root.split("/"):
            raise ValueError("must not contain '..'")
        return posixpath.normpath("/" + root.lstrip("/"))

    @field_validator("aggregator_status_url")
    @classmethod
    def _known_placeholders(cls, template: str | None) -> str | None:
        if template is None:
            return None
        try:
            template.format(service="s", namespace="n", port=1)
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"only {{service}}, {{namespace}} and {{port}} can be filled in: {error}") from None
        return template

    def status_url_template(self) -> str:
        """aggregator_status_url, or its default for the TLS mode."""
        scheme = "https" if self.tls.enabled else "http"
        return self.aggregator_status_url or scheme + "://{service}.{namespace}.svc:{port}/v1/status"

    @model_validator(mode="after")
    def _configured_images_allowed(self) -> OperatorConfig:
        configured = [self.runtime_image, self.federated_image, *(c.image for c in self.accelerator_classes.values())]
        for image in filter(None, configured):
            self.check_image(image)
        return self

    def image_allowed(self, image: str) -> bool:
        return not self.allowed_images or any(fnmatch.fnmatchcase(image, p) for p in self.allowed_images)

    def check_image(self, image: str) -> str:
        """`image`, or ImageNotAllowed when allowedImages does not allow it."""
        if not self.image_allowed(image):
            raise ImageNotAllowed(f"image {image} is not in allowedImages ({', '.join(self.allowed_images)})")
        return image

    def image_of(self, accelerator: AcceleratorClass) -> str:
        return accelerator.image or self.runtime_image

    def image_pull_policy_of(self, accelerator: AcceleratorClass) -> str:
        return accelerator.image_pull_policy or self.image_pull_policy

    def accelerator_class(self, name: str) -> AcceleratorClass:
        try:
            return self.accelerator_classes[name]
        except KeyError:
            known = ", ".join(self.accelerator_classes)
            raise ConfigError(f"unknown accelerator class {name!r} (configured: {known})") from None


def _version() -> str:
    try:
        return metadata.version("edgeloop")
    except metadata.PackageNotFoundError:
        return "dev"


def _label(key: str) -> dict[str, str]:
    return {key: "true"}


def _image(flavour: str = "") -> str:
    """The runtime image of a flavour (one per execution-provider family: their wheels exclude each other)."""
    return f"ghcr.io/edgeloop/runtime{'-' + flavour if flavour else ''}:{_version()}"


BUILT_IN: dict[str, Any] = {
    "runtimeImage": _image(),
    "federatedImage": _image("federated"),
    "acceleratorClasses": {
        # Intel NPUs (Core Ultra): the Intel device plugin's resource, the OpenVINO execution provider.
        "npu": {
            "matchAnyLabel": {
                **_label("edgeloop.io/accelerator.npu"),
                # NFD's default PCI label: class 1200 (processing accelerator), vendor 8086 (Intel).
                **_label("feature.node.kubernetes.io/pci-1200_8086.present"),
            },
            "resource": "npu.intel.com/accel",
            "executionProviders": ["OpenVINOExecutionProvider", CPU_EXECUTION_PROVIDER],
            "providerOptions": {"OpenVINOExecutionProvider": {"device_type": "NPU"}},
            "image": _image("openvino"),
            # onnxruntime-openvino publishes no aarch64 wheel: the flavour is amd64 only.
            "architectures": ["amd64"],
        },
        # NVIDIA GPUs: labels from GPU Feature Discovery and NFD (vendor 10de); k3s runs GPU pods through
        # the "nvidia" RuntimeClass, and GPU nodes are commonly tainted nvidia.com/gpu:NoSchedule.
        "gpu": {
            "matchAnyLabel": {
                **_label("edgeloop.io/accelerator.gpu"),
                **_label("nvidia.com/gpu.present"),
                **_label("feature.node.kubernetes.io/pci-10de.present"),
                **_label("feature.node.kubernetes.io/pci-0300_10de.present"),
                **_label("feature.node.kubernetes.io/pci-0302_10de.present"),
            },
            "resource": "nvidia.com/gpu",
            "runtimeClassName": "nvidia",
            "executionProviders": ["CUDAExecutionProvider", CPU_EXECUTION_PROVIDER],
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            # The default, EXHAUSTIVE, searches cuDNN's convolution algorithms anew for every input shape: with
            # dynamic batching that cost 490-800 ms per new batch size (HEURISTIC: 105-155 ms).
            "providerOptions": {"CUDAExecutionProvider": {"cudnn_conv_algo_search": "HEURISTIC"}},
            "image": _image("cuda"),
            # onnxruntime-gpu publishes no aarch64 wheel (Jetson needs NVIDIA's own builds): amd64 only.
            "architectures": ["amd64"],
        },
        "cpu": {
            "matchAnyLabel": {},
            "executionProviders": [CPU_EXECUTION_PROVIDER],
        },
    },
}


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` over `base` with the semantics in the module docstring."""
    merged = {**base, **{k: v for k, v in override.items() if k != "acceleratorClasses"}}
    classes = dict(base.get("acceleratorClasses", {}))
    for name, fields in (override.get("acceleratorClasses") or {}).items():
        if fields is None:
            classes.pop(name, None)
        else:
            classes[name] = {**classes.get(name, {}), **fields}
    merged["acceleratorClasses"] = classes
    return merged


def build(overrides: dict[str, Any] | None = None) -> OperatorConfig:
    raw = merge(BUILT_IN, overrides or {})
    classes = raw.get("acceleratorClasses", {})
    raw["acceleratorClasses"] = {name: {**fields, "name": name} for name, fields in classes.items()}
    try:
        config = OperatorConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(str(error)) from None
    if not config.accelerator_classes:
        raise ConfigError("acceleratorClasses: at least one accelerator class is needed")
    return config


def load(path: str | Path | None) -> OperatorConfig:
    """The built-in configuration, with the YAML or JSON file at `path` merged over it."""
    if path is None:
        return build()
    try:
        overrides = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: {error}") from None
    if not isinstance(overrides, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return build(overrides)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgeloop.config", description=__doc__.splitlines()[0])
    parser.add_argument("file", nargs="?", help="YAML/JSON overrides (default: built-in configuration only)")
    args = parser.parse_args(argv)
    try:
        config = load(args.file)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    dumped = config.model_dump(
        mode="json", by_alias=True, exclude_none=True, exclude={"accelerator_classes": {"__all__": {"name"}}}
    )
    print(yaml.safe_dump(dumped, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
