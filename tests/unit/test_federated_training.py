"""Local training, FedProx, clipping and noise, federated evaluation, and the node's data format."""

from __future__ import annotations

import numpy as np
import pytest
from edgeloop_runtime.federated.data import dirichlet_partition, holdout_split, load_npz
from edgeloop_runtime.federated.model import load, mlp
from edgeloop_runtime.federated.training import TrainConfig, evaluate, local_train, privatize
from edgeloop_runtime.federated.validation import summarize
from sklearn.datasets import load_digits


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return (x / 16).astype(np.float32), y


def test_local_sgd_learns_digits(digits):
    x, y = digits
    model = load(mlp([64, 32, 10]))
    start = model.vector()
    trained = local_train(model, start, x, y, TrainConfig(epochs=3, learning_rate=0.3), np.random.default_rng(0))
    assert evaluate(model, start, x, y)["accuracy"] < 0.3
    assert evaluate(model, trained, x, y)["accuracy"] > 0.85


def test_fedprox_keeps_the_update_closer_to_the_global_model(digits):
    x, y = digits[0][:300], digits[1][:300]
    model = load(mlp([64, 32, 10]))
    start = model.vector()

    def drift(mu):
        cfg = TrainConfig(epochs=3, learning_rate=0.3, proximal_mu=mu)
        return np.linalg.norm(local_train(model, start, x, y, cfg, np.random.default_rng(0)) - start)

    assert drift(1.0) < 0.8 * drift(0.0)


def test_privatize_clips_to_the_norm_and_adds_scaled_noise():
    update = np.full(10_000, 0.1, np.float32)
    clipped = privatize(update, 1.0, 0.0, np.random.default_rng(0))
    assert np.linalg.norm(clipped) == pytest.approx(1.0, rel=1e-5)
    noisy = privatize(update, 1.0, 2.0, np.random.default_rng(0))
    assert np.std(noisy - clipped) == pytest.approx(2.0, rel=0.05)
    assert privatize(update, None, 0.0, np.random.default_rng(0)) is update
    with pytest.raises(ValueError, match="clip norm"):
        privatize(update, None, 1.0, np.random.default_rng(0))


def test_dirichlet_partition_covers_every_row_once_with_label_skew(digits):
    _, y = digits
    parts = dirichlet_partition(y, 10, alpha=0.5, seed=7)
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(y)))
    assert all(len(p) >= 10 for p in parts)
    assert all(np.array_equal(a, b) for a, b in zip(parts, dirichlet_partition(y, 10, 0.5, seed=7), strict=True))
    # Skew: most clients miss at least one digit or hold one digit in excess.
    shares = np.array([np.bincount(y[p], minlength=10) / len(p) for p in parts])
    assert np.mean(shares.max(axis=1) > 0.25) > 0.5


def test_holdout_split_is_disjoint_fixed_and_nonempty():
    train, hold = holdout_split(50, 0.2, seed=0)
    assert len(hold) == 10 and not set(train) & set(hold) and len(train) + len(hold) == 50
    assert np.array_equal(hold, holdout_split(50, 0.2, seed=0)[1])
    assert len(holdout_split(3, 0.01, seed=0)[1]) == 1


def test_npz_format_and_errors(tmp_path):
    np.savez(tmp_path / "ok.npz", x=np.ones((4, 2)), y=np.array([0, 1, 0, 1]))
    x, y = load_npz(tmp_path / "ok.npz")
    assert x.dtype == np.float32 and y.dtype == np.int64 and x.shape == (4, 2)
    assert load_npz(tmp_path)[0].shape == (4, 2)  # a directory holding one file
    np.savez(tmp_path / "bad.npz", features=np.ones(3))
    with pytest.raises(ValueError, match="lacks"):
        load_npz(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="exactly one"):
        load_npz(tmp_path)


def test_federated_evaluation_is_the_median_over_clients_with_the_weighted_mean_beside_it():
    reports = [
        {"accuracy": 1.0, "loss": 0.0, "examples": 30},
        {"accuracy": 0.0, "loss": 1.0, "examples": 10},
        {"accuracy": 0.6, "loss": 0.5, "examples": 20},
        {"accuracy": 0.5, "loss": 9.0, "examples": 0},  # no holdout data: no vote
    ]
    assert summarize(reports, min_evaluators=3) == {
        "accuracy": 0.6,
        "loss": 0.5,
        "evaluators": 3,
        "meanAccuracy": 0.7,
        "meanLoss": pytest.approx(1 / 3),
    }
    assert summarize(reports, min_evaluators=4) is None  # too few to trust


def test_one_liar_moves_the_median_no_further_than_its_honest_neighbours():
    honest = [{"accuracy": a, "loss": 1.0, "examples": 50} for a in (0.40, 0.45, 0.50, 0.55)]
    liar = {"accuracy": 1.0, "loss": 0.0, "examples": 1_000_000}
    summary = summarize([*honest, liar], min_evaluators=3)
    assert summary["accuracy"] == 0.50 and summary["meanAccuracy"] > 0.99
