"""Builders shared by the FederatedRound unit tests: specs, starts, Jobs and aggregator reports."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from edgeloop.api.common import ModelSource
from edgeloop.api.federatedround import FederatedRoundSpec
from edgeloop.render.federatedround import Start, owner_of
from im_factories import SHA_A, deep_merge

EXAMPLE = Path(__file__).parents[2] / "examples" / "federatedround-digits.yaml"
SHA_TRAINED = "7" * 64
NODES = ("edge-cpu-0", "edge-gpu-0", "edge-npu-0")
OWNER = owner_of("digits-round-1", "edge", "9d1e7c2a-aaaa-4bbb-8ccc-ddddeeeeffff")
MODEL = ModelSource(uri=f"http://edgeloop-store.edgeloop-system.svc:8000/sha256/{SHA_A}", sha256=SHA_A, version="3")
START = Start(NODES, MODEL, SHA_A)


def example_spec() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE.read_text())["spec"]


def spec(**override: Any) -> FederatedRoundSpec:
    base = {"modelRef": {"name": "digits"}, "dataset": {"name": "digits"}}
    if "dataset" in override:  # a dataset is named or given by its path, not both
        base.pop("dataset")
    return FederatedRoundSpec.model_validate(deep_merge(base, override))


def report(phase: str = "Running", **override: Any) -> dict[str, Any]:
    """An aggregator status report as FEDERATED.md documents it."""
    base: dict[str, Any] = {
        "phase": phase,
        "round": 2,
        "rounds": 5,
        "stage": "collect",
        "secureAggregation": True,
        "participants": {"selected": 3, "reported": 2, "dropped": 1},
        "metrics": None,
        "baseline": {"accuracy": 0.4, "loss": 1.9},
        "result": None,
        "reason": "",
        "history": [],
    }
    if phase == "Succeeded":
        base.update(
            round=5,
            stage=None,
            participants={"selected": 3, "reported": 3, "dropped": 0},
            metrics={"accuracy": 0.93, "loss": 0.25},
            result={
                "uri": f"http://edgeloop-store.edgeloop-system.svc:8000/sha256/{SHA_TRAINED}",
                "sha256": SHA_TRAINED,
            },
        )
    if phase == "Failed":
        base.update(stage=None, reason="round 2: only 1 of 3 clients uploaded updates, 3 needed (minClients 3)")
    return {**base, **override}


def job(manifest: dict[str, Any], *, finished: str = "", reason: str = "", uid: str | None = None) -> dict[str, Any]:
    """A rendered Job as the API server returns it, finished ("Complete"/"Failed") or not."""
    live = copy.deepcopy(manifest)
    live["metadata"]["uid"] = uid or f"uid-{manifest['metadata']['name']}"
    live["status"] = (
        {"conditions": [{"type": finished, "status": "True", "reason": reason, "message": ""}]} if finished else {}
    )
    return live
