"""ONNX models as trainable numpy functions.

The trainable parameters are the model's initializers. Walking back from the first graph output, we find
the final dense layer (`Gemm`, or `MatMul` + `Add`) and, through `Relu`/`Sigmoid`/`Tanh`, the dense layers
before it. If that chain reaches a graph input, the whole model is an MLP (or logistic regression) and every
layer can be trained; otherwise only the final layer is trained, on features that onnxruntime computes with
the frozen rest of the graph. Training never changes the graph: new weights are written back into the
same initializers, so the exported model is valid ONNX and computes what `Model.forward` computes.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

ACTIVATIONS = {
    "Relu": (lambda z: np.maximum(z, 0), lambda z, a: (z > 0).astype(a.dtype)),
    "Sigmoid": (lambda z: 1 / (1 + np.exp(-z)), lambda z, a: a * (1 - a)),
    "Tanh": (np.tanh, lambda z, a: 1 - a * a),
}
# Output heads that follow the final layer; the loss is computed on the logits before them.
HEADS = {"Softmax", "Sigmoid", "Identity"}


class UnsupportedModel(ValueError):
    """The graph has no final dense layer with initializer weights that we could train."""


@dataclass(frozen=True)
class Dense:
    """y = alpha * x @ W' + beta * b, W' = W.T when trans_b (Gemm), then `activation` (None: linear)."""

    weight: str
    bias: str | None
    trans_b: bool = False
    alpha: float = 1.0
    beta: float = 1.0
    activation: str | None = None


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sum_to(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Gradient of a broadcast bias: sum over the broadcast axes."""
    while g.ndim > len(shape):
        g = g.sum(axis=0)
    return g.sum(axis=tuple(i for i, n in enumerate(shape) if n == 1), keepdims=True).reshape(shape)


def forward_dense(layers: list[Dense], weights: dict[str, np.ndarray], x: np.ndarray):
    """Logits of the chain and what the backward pass needs: the inputs and outputs of every layer."""
    cache = []
    a = x
    for layer in layers:
        w = weights[layer.weight].T if layer.trans_b else weights[layer.weight]
        z = layer.alpha * (a @ w)
        if layer.bias is not None:
            z = z + layer.beta * weights[layer.bias]
        out = ACTIVATIONS[layer.activation][0](z) if layer.activation else z
        cache.append((a, z, out))
        a = out
    return a, cache


def backward_dense(layers: list[Dense], weights: dict[str, np.ndarray], cache, grad_out: np.ndarray):
    """Gradients of every weight, given d loss / d logits."""
    grads: dict[str, np.ndarray] = {}
    g = grad_out
    for layer, (a, z, out) in zip(reversed(layers), reversed(cache), strict=True):
        if layer.activation:
            g = g * ACTIVATIONS[layer.activation][1](z, out)
        gw = layer.alpha * (a.T @ g)
        grads[layer.weight] = gw.T if layer.trans_b else gw
        if layer.bias is not None:
            grads[layer.bias] = layer.beta * _sum_to(g, weights[layer.bias].shape)
        w = weights[layer.weight].T if layer.trans_b else weights[layer.weight]
        g = layer.alpha * (g @ w.T)
    return grads


def loss_and_grad_logits(logits: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy: softmax over classes, or sigmoid for a single output (binary labels)."""
    n = len(y)
    if logits.shape[1] == 1:
        p = 1 / (1 + np.exp(-logits[:, 0]))
        eps = 1e-7
        loss = -np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))
        return float(loss), ((p - y) / n)[:, None].astype(logits.dtype)
    p = _softmax(logits)
    loss = -np.mean(np.log(p[np.arange(n), y] + 1e-7))
    g = p.copy()
    g[np.arange(n), y] -= 1
    return float(loss), (g / n).astype(logits.dtype)


def predict(logits: np.ndarray) -> np.ndarray:
    return (logits[:, 0] > 0).astype(np.int64) if logits.shape[1] == 1 else logits.argmax(axis=1)


class Model:
    """An ONNX model with the parameters we train laid out as one flat float32 vector."""

    def __init__(self, proto: onnx.ModelProto, trainable: str = "auto"):
        if trainable not in ("auto", "all", "last"):
            raise ValueError(f"trainable must be auto, all or last, not {trainable!r}")
        self.proto = proto
        graph = proto.graph
        self._inits = {t.name: t for t in graph.initializer}
        self._producer = {out: node for node in graph.node for out in node.output}
        self._consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self._consumers.setdefault(name, []).append(node)
        graph_inputs = {i.name for i in graph.input} - set(self._inits)

        self.output = graph.output[0].name
        self.head = None
        tensor = self.output
        node = self._producer.get(tensor)
        if node is not None and node.op_type in HEADS:
            self.head = node.op_type
            tensor = node.input[0]
        chain = self._dense_chain(tensor)
        if not chain:
            raise UnsupportedModel(f"no Gemm or MatMul+Add with initializer weights produces {self.output!r}")
        whole = chain[0][1] in graph_inputs
        if trainable == "all" and not whole:
            raise UnsupportedModel("trainable=all needs a graph that is only dense layers and activations")
        if trainable == "last" or not whole:
            chain = chain[-1:]
        self.layers = [layer for layer, _ in chain]
        self.feature_input = chain[0][1]
        self.frozen_prefix = self.feature_input not in graph_inputs
        self.specs = [
            ParamSpec(
                name,
                tuple(self._inits[name].dims),
                np.dtype(helper.tensor_dtype_to_np_dtype(self._inits[name].data_type)),
            )
            for layer in self.layers
            for name in (layer.weight, layer.bias)
            if name is not None
        ]
        self.size = sum(s.size for s in self.specs)
        self._feature_session = None

    def _dense_chain(self, tensor: str) -> list[tuple[Dense, str]]:
        """(layer, its input tensor) from the first to the one producing `tensor`, walking backwards."""
        chain: list[tuple[Dense, str]] = []
        activation = None
        while True:
            node = self._producer.get(tensor)
            if node is None:
                break
            if node.op_type in ACTIVATIONS and activation is None and chain:
                activation, tensor = node.op_type, node.input[0]
                continue
            found = self._as_dense(node)
            if found is None:
                break
            layer, source = found
            if chain:
                # An intermediate tensor read elsewhere in the graph would make the chain's math incomplete.
                if len(self._consumers.get(tensor, [])) > 1 or len(self._consumers.get(chain[0][1], [])) > 1:
                    break
                layer = replace(layer, activation=activation)
            chain.insert(0, (layer, source))
            activation = None
            tensor = source
        return chain

    def _as_dense(self, node: onnx.NodeProto) -> tuple[Dense, str] | None:
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0) or node.input[1] not in self._inits:
                return None
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            if bias is not None and bias not in self._inits:
                return None
            return Dense(
                node.input[1],
                bias,
                bool(attrs.get("transB", 0)),
                float(attrs.get("alpha", 1.0)),
                float(attrs.get("beta", 1.0)),
            ), node.input[0]
        if node.op_type == "Add":
            bias = next((i for i in node.input if i in self._inits), None)
            other = next((i for i in node.input if i != bias), None)
            matmul = self._producer.get(other) if other else None
            if bias is None or matmul is None or matmul.op_type != "MatMul":
                return None
            if matmul.input[1] not in self._inits or len(self._consumers.get(other, [])) > 1:
                return None
            if len(self._inits[matmul.input[1]].dims) != 2:
                return None
            return Dense(matmul.input[1], bias), matmul.input[0]
        return None

    # --- parameters -------------------------------------------------------------------------------

    def vector(self) -> np.ndarray:
        """The current trainable parameters, flattened in a fixed order."""
        return np.concatenate(
            [numpy_helper.to_array(self._inits[s.name]).astype(np.float32).ravel() for s in self.specs]
        )

    def weights(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        if len(vector) != self.size:
            raise ValueError(f"parameter vector has {len(vector)} values, the model needs {self.size}")
        out, offset = {}, 0
        for s in self.specs:
            out[s.name] = vector[offset : offset + s.size].reshape(s.shape)
            offset += s.size
        return out

    def export(self, vector: np.ndarray) -> bytes:
        """The ONNX model with `vector` written into its initializers."""
        proto = onnx.ModelProto()
        proto.CopyFrom(self.proto)
        by_name = {t.name: t for t in proto.graph.initializer}
        for s, array in zip(self.specs, self.weights(vector).values(), strict=True):
            by_name[s.name].CopyFrom(numpy_helper.from_array(array.astype(s.dtype), s.name))
        onnx.checker.check_model(proto)
        return proto.SerializeToString()

    # --- math ---------------------------------------------------------------------------------------

    def features(self, x: np.ndarray) -> np.ndarray:
        """The input of the first trainable layer: `x` itself, or the frozen prefix run by onnxruntime."""
        if not self.frozen_prefix:
            return np.asarray(x, dtype=np.float32)
        if self._feature_session is None:
            import onnxruntime as ort

            proto = onnx.ModelProto()
            proto.CopyFrom(self.proto)
            del proto.graph.output[:]
            proto.graph.output.append(helper.make_tensor_value_info(self.feature_input, onnx.TensorProto.FLOAT, None))
            self._feature_session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        name = self._feature_session.get_inputs()[0].name
        feats = self._feature_session.run(None, {name: np.asarray(x, dtype=np.float32)})[0]
        return feats.reshape(len(feats), -1)

    def logits(self, vector: np.ndarray, feats: np.ndarray) -> np.ndarray:
        return forward_dense(self.layers, self.weights(vector), feats)[0]

    def forward(self, vector: np.ndarray, feats: np.ndarray) -> np.ndarray:
        """What the exported model's first output computes, in numpy."""
        z = self.logits(vector, feats)
        if self.head == "Softmax":
            return _softmax(z)
        if self.head == "Sigmoid":
            return 1 / (1 + np.exp(-z))
        return z

    def loss_and_grad(self, vector: np.ndarray, feats: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        weights = self.weights(vector)
        logits, cache = forward_dense(self.layers, weights, feats)
        loss, g = loss_and_grad_logits(logits, y)
        grads = backward_dense(self.layers, weights, cache, g)
        return loss, np.concatenate([grads[s.name].ravel() for s in self.specs]).astype(np.float32)


def load(data: bytes, trainable: str = "auto") -> Model:
    return Model(onnx.load_from_string(data), trainable)


def mlp(sizes: list[int], seed: int = 0, softmax: bool = True) -> bytes:
    """A float32 MLP (Gemm + Relu; one layer is logistic regression) with Glorot-uniform weights."""
    rng = np.random.default_rng(seed)
    nodes, inits, tensor = [], [], "input"
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
        limit = np.sqrt(6 / (fan_in + fan_out))
        inits += [
            numpy_helper.from_array(rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32), f"w{i}"),
            numpy_helper.from_array(np.zeros(fan_out, np.float32), f"b{i}"),
        ]
        nodes.append(helper.make_node("Gemm", [tensor, f"w{i}", f"b{i}"], [f"z{i}"]))
        tensor = f"z{i}"
        if i < len(sizes) - 2:
            nodes.append(helper.make_node("Relu", [tensor], [f"h{i}"]))
            tensor = f"h{i}"
    if softmax:
        nodes.append(helper.make_node("Softmax", [tensor], ["probabilities"], axis=1))
        tensor = "probabilities"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", sizes[0]])],
        [helper.make_tensor_value_info(tensor, onnx.TensorProto.FLOAT, ["batch", sizes[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()
