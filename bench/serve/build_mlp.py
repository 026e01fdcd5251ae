"""Trains an MLP on scikit-learn's bundled digits and exports it to ONNX (run in the bench's tools venv).

usage: build_mlp.py OUT.onnx
"""

import sys

import numpy as np
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

x, y = load_digits(return_X_y=True)
x = (x / 16.0).astype(np.float32)
x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
classifier = MLPClassifier(hidden_layer_sizes=(128, 64), max_iter=400, random_state=0).fit(x_train, y_train)
model = convert_sklearn(
    classifier,
    initial_types=[("input", FloatTensorType([None, 64]))],
    options={MLPClassifier: {"zipmap": False}},  # tensors out, not a sequence of maps
    target_opset=17,
)
with open(sys.argv[1], "wb") as f:
    f.write(model.SerializeToString())
print(f"digits MLP: held-out accuracy {classifier.score(x_test, y_test):.3f}")
