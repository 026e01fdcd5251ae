"""ONNX model I/O: which layers train, numpy forward = onnxruntime, gradients, write-back."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edgeloop_runtime.federated.model import UnsupportedModel, load, mlp
from onnx import TensorProto, helper, numpy_helper


def run_ort(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def build(nodes, inits, outputs, features=8) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", features])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", None]) for name in outputs],
        [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model.SerializeToString()


def frozen_prefix_model(rng) -> bytes:
    """Conv-free stand-in for a backbone: MatMul+Add → Relu → Mul by a constant (not a dense layer) →
    MatMul+Add head → Softmax. The Mul breaks the dense chain, so only the head trains."""
    inits = {
        "w0": rng.normal(0, 0.5, (8, 6)),
        "b0": rng.normal(0, 0.1, 6),
        "k": [2.0],
        "w1": rng.normal(0, 0.5, (6, 3)),
        "b1": np.zeros(3),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["a"]),
        helper.make_node("Add", ["a", "b0"], ["b"]),
        helper.make_node("Relu", ["b"], ["c"]),
        helper.make_node("Mul", ["c", "k"], ["features"]),
        helper.make_node("MatMul", ["features", "w1"], ["d"]),
        helper.make_node("Add", ["b1", "d"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["p"], axis=1),
    ]
    return build(nodes, inits, ["p"])


def test_mlp_trains_every_layer_and_exports_what_numpy_computes():
    model = load(mlp([8, 5, 3], seed=1))
    assert [s.name for s in model.specs] == ["w0", "b0", "w1", "b1"]
    assert model.size == 8 * 5 + 5 + 5 * 3 + 3 and not model.frozen_prefix
    x = np.random.default_rng(0).normal(size=(7, 8)).astype(np.float32)
    w = model.vector() + 0.1
    exported = model.export(w)
    onnx.checker.check_model(onnx.load_from_string(exported))
    np.testing.assert_allclose(run_ort(exported, x), model.forward(w, x), atol=1e-6)
    np.testing.assert_array_equal(load(exported).vector(), w)


def test_logistic_regression_is_one_trainable_layer():
    model = load(mlp([8, 3], softmax=True))
    assert len(model.layers) == 1 and model.head == "Softmax"


def test_gemm_transb_alpha_beta_and_a_sigmoid_head_for_binary_labels():
    rng = np.random.default_rng(2)
    inits = {"w": rng.normal(size=(1, 8)), "c": [0.3]}
    nodes = [
        helper.make_node("Gemm", ["x", "w", "c"], ["z"], transB=1, alpha=0.5, beta=2.0),
        helper.make_node("Sigmoid", ["z"], ["p"]),
    ]
    model = load(build(nodes, inits, ["p"]))
    x = rng.normal(size=(5, 8)).astype(np.float32)
    w = model.vector() * 1.5
    np.testing.assert_allclose(run_ort(model.export(w), x), model.forward(w, x), atol=1e-6)
    loss, grad = model.loss_and_grad(w, x, np.array([0, 1, 1, 0, 1]))
    assert np.isfinite(loss) and grad.shape == w.shape


@pytest.mark.parametrize("source", ["mlp", "gemm"])
def test_gradients_match_finite_differences(source):
    rng = np.random.default_rng(3)
    if source == "mlp":
        data = mlp([8, 6, 4], seed=3)
    else:
        data = build(
            [helper.make_node("Gemm", ["x", "w", "c"], ["z"], transB=1, alpha=0.7, beta=1.3)],
            {"w": rng.normal(size=(4, 8)), "c": rng.normal(size=(1, 4))},
            ["z"],
        )
    model = load(data)
    x = rng.normal(size=(10, 8))
    y = rng.integers(0, 4, 10)
    w = model.vector().astype(np.float64)
    _, grad = model.loss_and_grad(w, x, y)
    eps = 1e-3
    for i in rng.choice(len(w), 12, replace=False):
        step = np.zeros_like(w)
        step[i] = eps
        numeric = (model.loss_and_grad(w + step, x, y)[0] - model.loss_and_grad(w - step, x, y)[0]) / (2 * eps)
        assert grad[i] == pytest.approx(numeric, abs=2e-3)


def test_any_graph_fine_tunes_its_final_dense_layer_on_frozen_features():
    rng = np.random.default_rng(4)
    data = frozen_prefix_model(rng)
    model = load(data)
    assert model.frozen_prefix and model.feature_input == "features"
    assert [s.name for s in model.specs] == ["w1", "b1"]
    x = rng.normal(size=(9, 8)).astype(np.float32)
    feats = model.features(x)
    assert feats.shape == (9, 6)
    w = model.vector() + 0.2
    exported = model.export(w)
    np.testing.assert_allclose(run_ort(exported, x), model.forward(w, feats), atol=1e-6)
    # The frozen part is untouched.
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(data).graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load_from_string(exported).graph.initializer}
    assert all(np.array_equal(before[k], after[k]) for k in ("w0", "b0", "k"))


def test_trainable_last_restricts_an_mlp_to_its_head_and_all_refuses_a_frozen_graph():
    assert [s.name for s in load(mlp([8, 5, 3]), "last").specs] == ["w1", "b1"]
    with pytest.raises(UnsupportedModel):
        load(frozen_prefix_model(np.random.default_rng(0)), "all")


def test_a_graph_without_a_final_dense_layer_is_rejected():
    with pytest.raises(UnsupportedModel):
        load(build([helper.make_node("Relu", ["x"], ["y"])], {}, ["y"]))


def test_vector_of_the_wrong_length_is_rejected():
    model = load(mlp([8, 3]))
    with pytest.raises(ValueError, match="needs 27"):
        model.weights(np.zeros(5, np.float32))
