"""The runtime images' smoke test with a model: the digits MLP through the image's own backend code.

python images/smoke_model.py prepare DIR
    (on the build machine, with onnx, onnxruntime and ai-edge-litert) writes DIR/digits.onnx, the same
    weights as DIR/digits.tflite, DIR/input.npy (8 samples) and DIR/expected.npy: plain onnxruntime's
    answer on CPU, the reference every image and architecture must match.
python /smoke/smoke_model.py check --format onnx --providers P[,P...] [--provider-options JSON]
                                   [--tolerance T] [--refuse [TEXT]]
    (inside an image, DIR mounted at /smoke) loads the model with edgeloop_runtime's backend, asks for
    exactly those providers (no CPU fallback), requires the first one in use, runs the input and compares
    the probabilities with expected.npy. With --refuse, the load must fail (a provider that cannot run
    here), with TEXT in its message if given, and the message is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def prepare(directory: Path) -> None:
    import onnx
    import onnxruntime as ort
    from edgeloop_runtime.backends.tflite_mlp import mlp as tflite_mlp
    from edgeloop_runtime.federated.model import mlp
    from onnx import numpy_helper

    directory.mkdir(parents=True, exist_ok=True)
    data = mlp([64, 32, 10], seed=0)  # the demo's digits model (hack/demo_data.py)
    (directory / "digits.onnx").write_bytes(data)
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load_from_string(data).graph.initializer}
    layers = [(weights[f"w{i}"], weights[f"b{i}"]) for i in range(2)]
    (directory / "digits.tflite").write_bytes(tflite_mlp(layers, softmax=True))
    x = np.random.default_rng(0).random((8, 64), dtype=np.float32)
    np.save(directory / "input.npy", x)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    np.save(directory / "expected.npy", session.run(None, {"input": x})[0])
    (directory / "smoke_model.py").write_bytes(Path(__file__).read_bytes())


def check(args: argparse.Namespace) -> int:
    from edgeloop_runtime.backends import LoadOptions, ModelLoadError, backend_for

    directory = Path(__file__).resolve().parent
    providers = args.providers.split(",")
    options = LoadOptions(providers=providers, provider_options=json.loads(args.provider_options))
    data = (directory / f"digits.{args.format}").read_bytes()
    try:
        session = backend_for(args.format).load(data, options)
    except ModelLoadError as error:
        if args.refuse is not None:
            print(f"refused, as it must be: {error}")
            if args.refuse not in str(error):
                sys.exit(f"the refusal does not say {args.refuse!r}")
            return 0
        raise
    if args.refuse is not None:
        sys.exit(f"loaded on {session.providers}, but it must be refused")
    if session.providers[0] != providers[0]:
        sys.exit(f"{providers[0]} is not in use: {session.providers}")
    results = session.run({"input": np.load(directory / "input.npy")})
    outputs = dict(zip([spec.name for spec in session.outputs], results, strict=True))
    difference = float(np.abs(outputs["probabilities"] - np.load(directory / "expected.npy")).max())
    print(f"{args.format} on {','.join(session.providers)}: largest difference from onnxruntime on CPU "
          f"{difference:.2e} (tolerance {args.tolerance:g})")  # fmt: skip
    return 0 if difference <= args.tolerance else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("prepare").add_argument("directory", type=Path)
    checking = sub.add_parser("check")
    checking.add_argument("--format", choices=["onnx", "tflite"], default="onnx")
    checking.add_argument("--providers", default="CPUExecutionProvider")
    checking.add_argument("--provider-options", default="{}")
    checking.add_argument("--tolerance", type=float, default=1e-5)
    checking.add_argument("--refuse", nargs="?", const="", metavar="TEXT")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.directory)
        return 0
    return check(args)


if __name__ == "__main__":
    sys.exit(main())
