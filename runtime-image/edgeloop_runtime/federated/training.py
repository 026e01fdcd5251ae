"""Local training on a client: minibatch SGD on cross-entropy, FedAvg or FedProx, optional DP-style noise."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model import Model, loss_and_grad_logits, predict


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    proximal_mu: float = 0.0  # FedProx; 0 is FedAvg
    clip_norm: float | None = None  # L2 bound on a client's update
    noise_multiplier: float = 0.0  # Gaussian noise std = noise_multiplier * clip_norm


def local_train(
    model: Model, start: np.ndarray, feats: np.ndarray, y: np.ndarray, cfg: TrainConfig, rng: np.random.Generator
) -> np.ndarray:
    """Parameters after `cfg.epochs` passes of SGD from `start`.

    FedProx adds (mu/2)·||w - start||² to the local loss, which keeps clients with skewed data from drifting
    far from the global model; its gradient is mu·(w - start).
    """
    w = start.astype(np.float32, copy=True)
    for _ in range(cfg.epochs):
        order = rng.permutation(len(y))
        for i in range(0, len(y), cfg.batch_size):
            batch = order[i : i + cfg.batch_size]
            _, grad = model.loss_and_grad(w, feats[batch], y[batch])
            if cfg.proximal_mu:
                grad += cfg.proximal_mu * (w - start)
            w -= cfg.learning_rate * grad
    return w


def privatize(
    update: np.ndarray, clip_norm: float | None, noise_multiplier: float, rng: np.random.Generator
) -> np.ndarray:
    """Clip the update to L2 norm `clip_norm`, then add N(0, (noise_multiplier·clip_norm)²) per coordinate."""
    if clip_norm is None:
        if noise_multiplier:
            raise ValueError("noise needs a clip norm: the noise is scaled to the update's bounded sensitivity")
        return update
    norm = float(np.linalg.norm(update))
    clipped = update * min(1.0, clip_norm / norm) if norm > 0 else update
    if noise_multiplier:
        clipped = clipped + rng.normal(0.0, noise_multiplier * clip_norm, update.shape)
    return clipped.astype(np.float32)


def evaluate(model: Model, w: np.ndarray, feats: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Mean loss and accuracy of parameters `w` on (feats, y)."""
    if len(y) == 0:
        return {"loss": float("nan"), "accuracy": float("nan")}
    logits = model.logits(w, feats)
    loss, _ = loss_and_grad_logits(logits, y)
    return {"loss": loss, "accuracy": float(np.mean(predict(logits) == y))}
