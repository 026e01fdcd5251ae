"""The demo's data: a starting model in the store, each real node's share of the digits data set, and a few
images to ask the served model about. Run by hack/demo.sh with the venv's Python.

    demo_data.py model STORE_URL TOKEN         upload an untrained MLP; print its sha256
    demo_data.py datasets DIR...               one digits .npz per node data directory
    demo_data.py sample FILE                   8 digits as a .npy input; print their labels
    demo_data.py predictions RESULT_JSON       labels vs what the model answered
"""

from __future__ import annotations

import hashlib
import json
import sys
import urllib.request
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

SAMPLE = slice(0, 8)


def model(store: str, token: str) -> None:
    from edgeloop_runtime.federated.model import mlp

    data = mlp([64, 32, 10], seed=0)
    digest = hashlib.sha256(data).hexdigest()
    request = urllib.request.Request(f"{store}/sha256/{digest}", data=data, method="PUT",
                                     headers={"Authorization": f"Bearer {token}"})
    urllib.request.urlopen(request, timeout=30).close()
    print(digest)


def datasets(*directories: str) -> None:
    x, y = load_digits(return_X_y=True)
    for index, directory in enumerate(directories):
        part = slice(index, None, len(directories))
        Path(directory).mkdir(parents=True, exist_ok=True)
        np.savez(Path(directory) / "digits.npz", x=(x[part] / 16).astype(np.float32), y=y[part])


def sample(file: str) -> None:
    digits = load_digits()
    np.save(file, (digits.data[SAMPLE] / 16).astype(np.float32))
    print(" ".join(map(str, digits.target[SAMPLE])))


def predictions(result: str) -> None:
    outputs = json.loads(Path(result).read_text())["outputs"]
    labels = load_digits().target[SAMPLE]
    answered = next(o for o in outputs.values() if o["shape"] == [len(labels), 10])
    predicted = np.array(answered["data"]).argmax(axis=1)
    print(f"  digits shown:     {' '.join(map(str, labels))}")
    print(f"  model answered:   {' '.join(map(str, predicted))}   ({(predicted == labels).sum()}/{len(labels)} right)")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"model": model, "datasets": datasets, "sample": sample, "predictions": predictions}[command](*args)
