"""What federated clients claim, checked before anything counts (docs/security.md, "Federated clients"), and
the federated evaluation that the promotion gate reads; BadRequest (400) and Conflict (409) are what the HTTP
side answers. Pure functions."""

from __future__ import annotations

import base64
import math
import statistics

import numpy as np

from .training import TrainConfig

MAX_LOSS = 1e6


class Conflict(Exception):
    status = 409


class BadRequest(Exception):
    status = 400


def check_count(value, name: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise BadRequest(f"{name} must be an integer in [{low}, {high}], not {value!r}")
    return value


def check_metrics(metrics, max_examples: int) -> dict:
    """Holdout metrics: examples in [0, max_examples]; accuracy in [0, 1] and loss in [0, 1e6], finite."""
    if not isinstance(metrics, dict):
        raise BadRequest("metrics must be an object")
    examples = check_count(metrics.get("examples"), "metrics.examples", 0, max_examples)
    values = {}
    for name, high in (("accuracy", 1.0), ("loss", MAX_LOSS)):
        value = metrics.get(name, 0.0 if examples == 0 else None)
        if type(value) not in (int, float) or not math.isfinite(value) or not 0 <= value <= high:
            raise BadRequest(f"metrics.{name} must be a finite number in [0, {high:g}], not {value!r}")
        values[name] = float(value)
    return {**values, "examples": examples}


def check_plain_update(vector: np.ndarray, bound: float, train: TrainConfig) -> None:
    """A plain update: finite, each value within ±bound, and within the clip norm (plus what the noise adds)."""
    if not np.all(np.isfinite(vector)):
        raise BadRequest("update has values that are not finite")
    if np.abs(vector).max(initial=0.0) > bound * (1 + 1e-6):
        raise BadRequest(f"update has values beyond ±{bound:g} (--quantization-bound)")
    if train.clip_norm is not None:
        sigma = train.noise_multiplier * train.clip_norm
        # The noise's norm exceeds sigma·(√d + 8) with probability below e^-32 (Gaussian concentration).
        allowed = train.clip_norm * (1 + 1e-5) + sigma * (math.sqrt(len(vector)) + 8)
        norm = float(np.linalg.norm(vector.astype(np.float64)))
        if norm > allowed:
            raise BadRequest(f"update norm {norm:.4g} is beyond the clip norm {train.clip_norm:g} (with noise)")


def summarize(reports: list[dict], min_evaluators: int) -> dict | None:
    """Federated evaluation from clients' holdout metrics: medians over the clients (one vote each, so no
    client moves them past its honest neighbours in the order), and the means weighted by holdout size for
    information. None when fewer than `min_evaluators` clients evaluated: too few to trust."""
    reports = [r for r in reports if r.get("examples", 0) > 0]
    if len(reports) < max(1, min_evaluators):
        return None
    total = sum(r["examples"] for r in reports)
    return {
        "accuracy": statistics.median(r["accuracy"] for r in reports),
        "loss": statistics.median(r["loss"] for r in reports),
        "evaluators": len(reports),
        "meanAccuracy": sum(r["accuracy"] * r["examples"] for r in reports) / total,
        "meanLoss": sum(r["loss"] * r["examples"] for r in reports) / total,
    }


def unb64(value, name: str, size: int | None = None, max_size: int = 4096) -> bytes:
    try:
        data = base64.b64decode(value, validate=True)
    except (TypeError, ValueError) as error:
        raise BadRequest(f"{name} must be base64") from error
    if (size is not None and len(data) != size) or len(data) > max_size:
        raise BadRequest(f"{name} has {len(data)} bytes")
    return data
