"""The Flower side of bench/federated.py; it runs in the Flower venv that bench/federated.py creates.

Flower's own server and clients as processes on loopback (its gRPC transport, `start_server` and
`start_client`), FedAvg, with the very same numpy model and local training as edgeloop's clients, so that
only the framework differs.

    federated_flower.py server --port P --rounds R --clients N --model m.onnx --out result.json
    federated_flower.py client --port P --data c0.npz --seed 0 --model m.onnx --bytes-log c0.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import flwr as fl
import numpy as np
from edgeloop_runtime.federated.client import LocalData
from edgeloop_runtime.federated.model import load
from edgeloop_runtime.federated.training import TrainConfig, local_train
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays, serde
from flwr.proto.transport_pb2 import ClientMessage


def arrays(model, vector: np.ndarray) -> list[np.ndarray]:
    return [w.copy() for w in model.weights(vector).values()]


def flat(weights: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([w.ravel() for w in weights]).astype(np.float32)


class TimedFedAvg(fl.server.strategy.FedAvg):
    """FedAvg that records, per round, the time from sending fit instructions to the aggregated model."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.started: dict[int, float] = {}
        self.seconds: dict[int, float] = {}
        self.final = None

    def configure_fit(self, server_round, parameters, client_manager):
        self.started[server_round] = time.perf_counter()
        return super().configure_fit(server_round, parameters, client_manager)

    def aggregate_fit(self, server_round, results, failures):
        aggregated = super().aggregate_fit(server_round, results, failures)
        self.seconds[server_round] = time.perf_counter() - self.started[server_round]
        self.final = aggregated[0]
        return aggregated


def server(args) -> None:
    model = load(Path(args.model).read_bytes())
    train = json.loads(args.train)
    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=args.clients,
        min_available_clients=args.clients,
        initial_parameters=ndarrays_to_parameters(arrays(model, model.vector())),
        on_fit_config_fn=lambda server_round: {"round": server_round, **train},
    )
    fl.server.start_server(
        server_address=f"127.0.0.1:{args.port}",
        config=fl.server.ServerConfig(num_rounds=args.rounds),
        strategy=strategy,
    )
    final = flat(parameters_to_ndarrays(strategy.final))
    Path(args.out).write_text(json.dumps({"seconds": strategy.seconds, "final": final.tolist()}))


class Client(fl.client.NumPyClient):
    def __init__(self, args):
        self.model = load(Path(args.model).read_bytes())
        self.data = LocalData.load(args.data, 0.2)  # the same train/holdout split as edgeloop's client
        self.seed = args.seed
        self.bytes_log = Path(args.bytes_log)

    def fit(self, parameters, config):
        start = flat(parameters)
        cfg = TrainConfig(int(config["epochs"]), int(config["batch_size"]), float(config["learning_rate"]))
        rng = np.random.default_rng([self.seed, int(config["round"])])
        trained = local_train(self.model, start, self.data.x_train, self.data.y_train, cfg, rng)
        result = arrays(self.model, trained)
        examples = len(self.data.y_train)
        # What goes up the wire for this fit: Flower's serialized FitRes message (gRPC framing not counted).
        message = ClientMessage(
            fit_res=serde.fit_res_to_proto(FitRes(Status(Code.OK, ""), ndarrays_to_parameters(result), examples, {}))
        )
        with self.bytes_log.open("a") as f:
            f.write(json.dumps({"round": int(config["round"]), "bytes": message.ByteSize()}) + "\n")
        return result, examples, {}


def client(args) -> None:
    fl.client.start_client(server_address=f"127.0.0.1:{args.port}", client=Client(args).to_client(), insecure=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--rounds", type=int, required=True)
    s.add_argument("--clients", type=int, required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--train", required=True, help="JSON: epochs, batch_size, learning_rate")
    s.add_argument("--out", required=True)
    c = sub.add_parser("client")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--data", required=True)
    c.add_argument("--seed", type=int, required=True)
    c.add_argument("--model", required=True)
    c.add_argument("--bytes-log", required=True)
    args = parser.parse_args()
    server(args) if args.role == "server" else client(args)


if __name__ == "__main__":
    main()
