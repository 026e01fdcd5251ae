"""`edgeloop-runtime federated aggregate|train`: the commands the operator's Jobs run (see FEDERATED.md)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

from .. import bounded_http
from ..termination import stop_on_sigterm
from .aggregator_http import DEFAULT_LIMITS
from .training import TrainConfig
from .transport import Client, client_context, server_context


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1]")
    return value


def _add_tls(parser: argparse.ArgumentParser, server: bool) -> None:
    group = parser.add_argument_group("TLS (mTLS when both sides have certificates)")
    if server:
        group.add_argument("--tls-cert", help="server certificate (PEM); serves HTTPS when set")
        group.add_argument("--tls-key", help="server private key (PEM)")
        group.add_argument("--tls-ca", help="CA (PEM) that must have signed client certificates: mTLS")
    else:
        group.add_argument("--tls-ca", help="CA (PEM) that signed the aggregator's certificate")
        group.add_argument("--tls-cert", help="client certificate (PEM) for mTLS")
        group.add_argument("--tls-key", help="client private key (PEM)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="federated_command", required=True, metavar="ROLE")

    agg = sub.add_parser(
        "aggregate",
        help="run the aggregator service for a federated training job",
        description="Serve the rounds, aggregate (securely), checkpoint, publish the model.",
    )
    agg.add_argument("--model", required=True, help="starting ONNX model: a path, file://, http:// or https:// URI")
    agg.add_argument("--model-sha256", help="expected sha256 of --model; a mismatch is an error")
    agg.add_argument(
        "--trainable",
        choices=["auto", "all", "last"],
        default="auto",
        help="all: every dense layer (MLP); last: only the final Gemm/MatMul+Add; "
        "auto: all when the graph is only dense layers, else last (default)",
    )
    agg.add_argument("--rounds", type=int, default=5, help="training rounds (default 5)")
    agg.add_argument("--clients", type=int, required=True, help="clients selected: expected in every round")
    agg.add_argument("--min-clients", type=int, default=3, help="quorum: fewer updates fail the round (default 3)")
    agg.add_argument("--local-epochs", type=int, default=1)
    agg.add_argument("--batch-size", type=int, default=32)
    agg.add_argument("--learning-rate", type=_positive_float, default=0.05)
    agg.add_argument("--strategy", choices=["fedavg", "fedprox"], default="fedavg")
    agg.add_argument("--proximal-mu", type=float, default=0.0, help="FedProx mu (needs --strategy fedprox)")
    agg.add_argument("--clip-norm", type=_positive_float, help="clip each client's update to this L2 norm")
    agg.add_argument(
        "--noise-multiplier",
        type=float,
        default=0.0,
        help="Gaussian noise std per coordinate = this x --clip-norm (default 0)",
    )
    agg.add_argument(
        "--secure-aggregation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mask updates so the aggregator learns only their sum (default on)",
    )
    agg.add_argument(
        "--threshold",
        type=_fraction,
        default=0.66,
        help="fraction of key-sharing clients (and of each client's neighbours) that must "
        "survive for the sum to be recovered (default 0.66)",
    )
    agg.add_argument(
        "--neighbours",
        type=int,
        default=0,
        help="SecAgg+ neighbours per client; 0 = min(n-1, 2·ceil(log2 n)+2) (default)",
    )
    agg.add_argument(
        "--quantization-bound",
        type=_positive_float,
        default=8.0,
        help="every update value is clipped to ±this (secure aggregation: before fixed-point encoding; "
        "plain: updates beyond it are refused) (default 8)",
    )
    agg.add_argument(
        "--max-examples",
        type=int,
        default=1_000_000,
        help="largest example (and holdout) count a client may claim; it weighs the client's update (default 1e6)",
    )
    agg.add_argument(
        "--deadline",
        type=_positive_float,
        default=900.0,
        help="seconds from a round's start until late updates are dropped (default 900)",
    )
    agg.add_argument(
        "--stage-timeout",
        type=_positive_float,
        default=60.0,
        help="seconds the join (past quorum), share, unmask and evaluation stages wait (default 60)",
    )
    agg.add_argument("--host", default="0.0.0.0")
    agg.add_argument("--port", type=int, default=8080)
    agg.add_argument(
        "--metrics-port",
        type=int,
        help="also serve /metrics (Prometheus) and /healthz in plain HTTP on this port, for scrapers without a "
        "client certificate (default: only on --port)",
    )
    agg.add_argument(
        "--state-dir",
        type=Path,
        default=Path("/var/lib/edgeloop/federated"),
        help="checkpoints; a restarted aggregator resumes from here",
    )
    agg.add_argument(
        "--store",
        help="model store base URL, e.g. http://edgeloop-store:8000; the final model is "
        "PUT there (without it, the result URI is file:// in --state-dir)",
    )
    agg.add_argument(
        "--store-token-file", type=Path, help="file with the store's bearer token (default: $EDGELOOP_STORE_TOKEN)"
    )
    agg.add_argument(
        "--checkpoint-ref",
        help="also checkpoint every round to the store as refs/NAME (needs --store), so that the Job's next pod, "
        "on any node, resumes from it; unique to the round, e.g. <namespace>.<name>.<uid>",
    )
    agg.add_argument(
        "--store-ca-cert",
        type=Path,
        help="also trust this CA (PEM) for https:// stores and models, e.g. the in-cluster store's CA",
    )
    agg.add_argument("--status-file", type=Path, help="rewrite the status JSON here at every change")
    agg.add_argument(
        "--linger",
        type=float,
        default=30.0,
        help="seconds to keep answering after the end, so clients learn the outcome (default 30)",
    )
    _add_tls(agg, server=True)
    bounded_http.add_arguments(
        agg, DEFAULT_LIMITS, body_help="bytes of a request body, 413 above; default 0: the largest message "
        "an honest client sends for this model (4 bytes per parameter, plus keys, shares and a header)"
    )  # fmt: skip
    agg.set_defaults(federated_run=run_aggregate)

    train = sub.add_parser(
        "train",
        help="run a federated client on this node's data",
        description="Train on local data each round; send only the (masked) update.",
    )
    train.add_argument("--aggregator", required=True, help="aggregator base URL, http://… or https://…")
    train.add_argument(
        "--data",
        required=True,
        help="an .npz file with arrays x (n x features, float) and y (n, int labels), "
        "or a directory holding exactly one",
    )
    train.add_argument(
        "--client-id",
        default=os.environ.get("NODE_NAME") or socket.gethostname(),
        help="unique client name (default: $NODE_NAME, else the host name)",
    )
    train.add_argument("--holdout", type=float, default=0.2, help="fraction kept for evaluation (default 0.2)")
    train.add_argument(
        "--seed",
        type=int,
        help="seed of the batch order (default: random); the holdout split is always the same for the same data",
    )
    train.add_argument(
        "--connect-timeout",
        type=_positive_float,
        default=600.0,
        help="give up when the aggregator is unreachable this long (default 600 s)",
    )
    _add_tls(train, server=False)
    train.set_defaults(federated_run=run_train)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop_on_sigterm()
    return args.federated_run(args)


def run_aggregate(args: argparse.Namespace) -> int:
    import time

    from ..fetch import tls_context
    from .aggregator import Aggregator, Settings
    from .aggregator_http import serve
    from .checkpoint import StoreRef

    if args.min_clients > args.clients or args.min_clients < 1:
        raise SystemExit("--min-clients must be between 1 and --clients")
    if args.max_examples < 1:
        raise SystemExit("--max-examples must be at least 1")
    if args.checkpoint_ref and not args.store:
        raise SystemExit("--checkpoint-ref needs --store")
    if args.strategy == "fedavg" and args.proximal_mu:
        raise SystemExit("--proximal-mu needs --strategy fedprox")
    token = (
        args.store_token_file.read_text().strip() if args.store_token_file else os.environ.get("EDGELOOP_STORE_TOKEN")
    )
    store_context = tls_context(args.store_ca_cert) if args.store and args.store.startswith("https") else None
    ref = StoreRef(args.store, args.checkpoint_ref, token or "", store_context) if args.checkpoint_ref else None
    settings = Settings(
        rounds=args.rounds,
        clients=args.clients,
        min_clients=args.min_clients,
        state_dir=args.state_dir,
        train=TrainConfig(
            args.local_epochs,
            args.batch_size,
            args.learning_rate,
            args.proximal_mu,
            args.clip_norm,
            args.noise_multiplier,
        ),
        trainable=args.trainable,
        secure=args.secure_aggregation,
        threshold=args.threshold,
        neighbours=args.neighbours,
        bound=args.quantization_bound,
        deadline=args.deadline,
        stage_timeout=args.stage_timeout,
        max_examples=args.max_examples,
        store=args.store,
        store_token=token,
        store_context=store_context,
        ca=_load_ca(args.tls_ca),
        checkpoint_ref=ref,
    )
    model = _initial_model(args.model, args.model_sha256, args.state_dir, args.store_ca_cert)
    agg = Aggregator(settings, model)
    if args.status_file:
        agg.on_change = lambda status: _write_json(args.status_file, status)
    tls = server_context(args.tls_cert, args.tls_key, args.tls_ca)
    server = serve(agg, args.host, args.port, tls, bounded_http.from_args(args, DEFAULT_LIMITS), args.metrics_port)
    status = agg.run()
    time.sleep(args.linger)
    for running in (server, server.metrics_server):
        if running is not None:
            running.shutdown()
    print(json.dumps(status), flush=True)  # the last line of the log: the operator's status source
    return 0 if status["phase"] == "Succeeded" else 1


def run_train(args: argparse.Namespace) -> int:
    from .client import FederatedClient, LocalData, load_identity

    context = client_context(args.tls_ca, args.tls_cert, args.tls_key) if args.aggregator.startswith("https") else None
    data = LocalData.load(args.data, args.holdout)
    identity = load_identity(args.tls_cert, args.tls_key, args.tls_ca)
    client = FederatedClient(
        Client(args.aggregator, context), args.client_id, data, args.seed, args.connect_timeout, identity
    )
    return client.run()


def _load_ca(path: str | None):
    """The CA whose client certificates sign secure-aggregation keys (the mTLS CA), or None."""
    if not path:
        return None
    from cryptography import x509

    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def _initial_model(uri: str, sha256: str | None, state_dir: Path, ca_cert: Path | None = None) -> bytes:
    """The starting model, verified against its digest when one is given (required for URIs)."""
    if sha256:
        from ..fetch import fetch

        uri = uri if "://" in uri else Path(uri).resolve().as_uri()
        # A local file named on the command line (the aggregator's own pod) may be read; only that file.
        local = Path(unquote(urlsplit(uri).path)).parent if uri.startswith("file:") else None
        return fetch(uri, sha256, state_dir / "cache", file_root=local, ca_cert=ca_cert).read_bytes()
    if "://" in uri:
        raise SystemExit("--model-sha256 is required when --model is a URI")
    return Path(uri).read_bytes()


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)
