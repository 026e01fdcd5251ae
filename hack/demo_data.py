"""The demo's data: a starting model in the store, each real node's share of the digits data set, and a few
images to ask the served model about. Run by hack/demo.sh with the venv's Python.

    demo_data.py model ADDRESS TOKEN CA NAME   upload an untrained MLP over HTTPS to the store at ADDRESS
                                               (host:port), its certificate verified with CA for NAME; print
                                               its sha256
    demo_data.py datasets DIR...               one digits .npz per node data directory
    demo_data.py sample FILE                   8 digits as a .npy input; print their labels
    demo_data.py predictions RESULT_JSON       labels vs what the model answered
"""

from __future__ import annotations

import hashlib
import http.client
import json
import ssl
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

SAMPLE = slice(0, 8)


class _HTTPSFor(http.client.HTTPSConnection):
    """HTTPS to an address (the store's ClusterIP), verifying the certificate for the Service's name."""

    def __init__(self, address: str, server_name: str, context: ssl.SSLContext) -> None:
        super().__init__(address, timeout=30, context=context)
        self.server_name = server_name

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.server_name)


def model(address: str, token: str, ca: str, server_name: str) -> None:
    from edgeloop_runtime.federated.model import mlp

    data = mlp([64, 32, 10], seed=0)
    digest = hashlib.sha256(data).hexdigest()
    connection = _HTTPSFor(address, server_name, ssl.create_default_context(cafile=ca))
    try:
        connection.request("PUT", f"/sha256/{digest}", body=data, headers={"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        if response.status not in (200, 201):
            sys.exit(f"the store answered {response.status}: {response.read()[:200]!r}")
    finally:
        connection.close()
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
