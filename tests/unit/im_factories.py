"""Builders shared by the InferenceModel unit tests: specs, cluster objects as the API server returns them."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from edgeloop.api.inferencemodel import InferenceModelSpec

EXAMPLE = Path(__file__).parents[2] / "examples" / "inferencemodel-digits.yaml"
SHA_A = "a" * 64
SHA_B = "b" * 64


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and key in merged else value
    return merged


def spec_dict(**override: Any) -> dict[str, Any]:
    base = {
        "model": {"uri": "https://models.example/digits.onnx", "sha256": SHA_A, "version": "3"},
        "placement": {"accelerators": ["npu", "gpu", "cpu"]},
    }
    return deep_merge(base, override)


def spec(**override: Any) -> InferenceModelSpec:
    return InferenceModelSpec.model_validate(spec_dict(**override))


def example_body() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())


def inference_model(name: str = "digits", namespace: str = "edge", generation: int = 1, **spec_override: Any):
    return {
        "apiVersion": "edgeloop.io/v1alpha1",
        "kind": "InferenceModel",
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "generation": generation},
        "spec": spec_dict(**spec_override),
    }


def daemon_set_status(manifest: dict[str, Any], *, desired: int, ready: int, updated: int | None = None,
                      scheduled: int | None = None, settled: bool = True) -> dict[str, Any]:
    """`manifest` as the API server would return it with the DaemonSet controller's status filled in."""
    live = copy.deepcopy(manifest)
    live["metadata"].setdefault("uid", f"uid-{manifest['metadata']['name']}")
    live["metadata"]["generation"] = 2
    live["status"] = {
        "observedGeneration": 2 if settled else 1,
        "desiredNumberScheduled": desired,
        "currentNumberScheduled": desired if scheduled is None else scheduled,
        "numberReady": ready,
        "updatedNumberScheduled": desired if updated is None else updated,
    }
    return live


def node(name: str, labels: dict[str, str] | None = None, *, ready: bool = True,
         taints: list[dict[str, str]] | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"taints": taints or []},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }
