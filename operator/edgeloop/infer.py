"""`edgeloop infer`: send one input to a model endpoint with tritonclient and print the outputs as JSON.

For checking a deployment by hand:

    edgeloop infer --url node-1:8000 --model digits --input sample.npy
    edgeloop infer --url node-1:8001 --protocol grpc --model digits --input input=sample.json
    edgeloop infer --url 10.96.12.34:8001 --protocol grpc --ssl --ca-cert ca.crt \
        --tls-server-name digits.edge.svc --model digits --input sample.npy

An input file is a `.npy` array or a `.json` nested list; without `NAME=`, it feeds the model's only
input. Data is cast to the datatype the model's metadata declares.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tritonclient.utils import InferenceServerException, triton_to_np_dtype


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="localhost:8000", help="host:port of the endpoint (default %(default)s)")
    parser.add_argument("--protocol", choices=["http", "grpc"], default="http", help="default %(default)s")
    parser.add_argument("--model", required=True, help="model name")
    parser.add_argument("--model-version", default="", help="model version (default: the served one)")
    parser.add_argument(
        "--input", action="append", required=True, metavar="[NAME=]FILE", help=".npy or .json; repeat per input"
    )
    parser.add_argument("--output", action="append", default=[], metavar="NAME", help="outputs to return (default all)")
    parser.add_argument("--json-data", action="store_true", help="send tensors as JSON instead of binary (HTTP)")
    parser.add_argument("--ssl", action="store_true", help="use TLS (HTTPS or gRPC over TLS)")
    parser.add_argument("--ca-cert", type=Path, help="CA certificate (PEM) to verify the server with")
    parser.add_argument(
        "--tls-server-name",
        help="the name to verify the server's certificate for, when --url is an address (e.g. a Service's "
        "ClusterIP); gRPC only",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds (default %(default)s)")


def load_array(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix == ".json":
        return np.array(json.loads(path.read_text()))
    raise ValueError(f"{path}: an input file must be .npy or .json")


def parse_inputs(specs: list[str], declared: dict[str, str]) -> dict[str, np.ndarray]:
    """NAME=FILE pairs (or one bare FILE for a single-input model) → arrays cast to the declared datatypes."""
    arrays = {}
    for spec in specs:
        name, sep, file = spec.rpartition("=")
        if not sep:
            if len(declared) != 1:
                raise ValueError(f"the model has inputs {list(declared)}: name each one as NAME=FILE")
            name = next(iter(declared))
        if name not in declared:
            raise ValueError(f"the model has no input {name!r}; its inputs: {list(declared)}")
        arrays[name] = load_array(Path(file)).astype(triton_to_np_dtype(declared[name]))
    return arrays


def _client(args: argparse.Namespace):
    if args.protocol == "grpc":
        import tritonclient.grpc as module

        root = str(args.ca_cert) if args.ca_cert else None
        # channel_args replaces tritonclient's own, which lift gRPC's 4 MiB message limit: keep that.
        channel = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1)]
        if args.tls_server_name:
            channel.append(("grpc.ssl_target_name_override", args.tls_server_name))
        client = module.InferenceServerClient(args.url, ssl=args.ssl, root_certificates=root, channel_args=channel)
        return module, client
    if args.tls_server_name:
        raise ValueError("--tls-server-name needs --protocol grpc")
    import tritonclient.http as module

    options = {"ca_certs": str(args.ca_cert)} if args.ca_cert else None
    client = module.InferenceServerClient(
        args.url, ssl=args.ssl, ssl_options=options, network_timeout=args.timeout, connection_timeout=args.timeout
    )
    return module, client


def infer(args: argparse.Namespace) -> dict:
    module, client = _client(args)
    # The two tritonclient flavours differ in a few keyword arguments.
    grpc = args.protocol == "grpc"
    as_json = {"as_json": True} if grpc else {}
    binary = {} if grpc else {"binary_data": not args.json_data}
    timeout = {"client_timeout": args.timeout} if grpc else {}
    with client:
        metadata = client.get_model_metadata(args.model, args.model_version, **as_json)
        declared = {i["name"]: i["datatype"] for i in metadata["inputs"]}
        inputs = []
        for name, array in parse_inputs(args.input, declared).items():
            tensor = module.InferInput(name, list(array.shape), declared[name])
            tensor.set_data_from_numpy(array, **binary)
            inputs.append(tensor)
        outputs = [module.InferRequestedOutput(n, **binary) for n in args.output]
        result = client.infer(args.model, inputs, model_version=args.model_version, outputs=outputs or None, **timeout)
        response = result.get_response(**as_json)
    names = [o["name"] for o in response["outputs"]]
    return {
        "model_name": response["model_name"],
        "model_version": response["model_version"],
        "outputs": {n: _output(result.as_numpy(n)) for n in names},
    }


def _output(array: np.ndarray) -> dict:
    if array.dtype == object:
        data = [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in array.ravel()]
    else:
        data = array.tolist()
    return {"dtype": str(array.dtype), "shape": list(array.shape), "data": data}


def run(args: argparse.Namespace) -> int:
    try:
        document = infer(args)
    except (InferenceServerException, ValueError, OSError) as error:
        print(f"edgeloop infer: {error}", file=sys.stderr)
        return 1
    json.dump(document, sys.stdout)
    sys.stdout.write("\n")
    return 0
