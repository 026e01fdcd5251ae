"""`edgeloop-runtime serve`: load one verified ONNX model and serve it over OIP v2 HTTP and gRPC.

On SIGTERM (or SIGINT) it drains: readiness turns false, new inference gets 503/UNAVAILABLE, requests
already in the server finish (up to --drain-timeout), then it exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import resource
import signal
import ssl
import time
from pathlib import Path

from edgeloop_runtime.fetch import DEFAULT_CACHE, cache_path
from edgeloop_runtime.limits import Limits

log = logging.getLogger("edgeloop_runtime.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model-path", type=Path, help="the ONNX file; default: <cache>/sha256/<sha256>")
    model.add_argument("--cache", type=Path, default=Path(DEFAULT_CACHE), help="node model cache (default %(default)s)")
    model.add_argument("--sha256", help="expected sha256 of the model; a mismatching file is refused")
    model.add_argument("--model-name", default="model", help="name clients address (default %(default)s)")
    model.add_argument("--model-version", default="1", help="version reported and accepted (default %(default)s)")
    runtime = parser.add_argument_group("ONNX Runtime")
    runtime.add_argument(
        "--execution-providers",
        default="CPUExecutionProvider",
        help="comma-separated ONNX Runtime execution providers, in order of preference (default %(default)s)",
    )
    runtime.add_argument(
        "--allow-cpu-fallback",
        action="store_true",
        help="serve on CPU when a requested provider is missing or fails; without it the server refuses to start",
    )
    runtime.add_argument(
        "--threads", type=int, default=1, help="intra-op threads; 0: ONNX Runtime decides (default %(default)s)"
    )
    batching = parser.add_argument_group("batching and backpressure")
    batching.add_argument(
        "--max-batch-size", type=int, default=8, help="0 disables dynamic batching (default %(default)s)"
    )
    batching.add_argument(
        "--batch-window-us",
        type=int,
        default=500,
        help="under concurrent load, how long a batch waits to fill, in µs (default %(default)s)",
    )
    batching.add_argument(
        "--max-queue",
        type=int,
        default=128,
        help="requests waiting for a batch beyond which new ones get 503/UNAVAILABLE (default %(default)s)",
    )
    network = parser.add_argument_group("network")
    network.add_argument("--host", default="0.0.0.0", help="address to listen on (default %(default)s)")
    network.add_argument("--http-port", type=int, default=8000, help="default %(default)s")
    network.add_argument("--grpc-port", type=int, default=8001, help="0 disables gRPC (default %(default)s)")
    network.add_argument("--tls-cert", type=Path, help="PEM certificate: serve HTTPS and gRPC over TLS")
    network.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    network.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds to finish requests on SIGTERM (default %(default)s)"
    )
    Limits.add_arguments(parser.add_argument_group("limits (docs/security.md)"))
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if bool(args.tls_cert) != bool(args.tls_key):
        log.error("--tls-cert and --tls-key go together")
        return 2
    if args.model_path is None and not args.sha256:
        log.error("give --model-path, or --sha256 to serve <cache>/sha256/<sha256>")
        return 2
    # Imported here so that `--help` and argument errors stay fast.
    import onnxruntime as ort

    from edgeloop_runtime.model import Model, ModelLoadError, create_session, read_verified, resolve_providers

    path = args.model_path or cache_path(args.cache, args.sha256)
    requested = [p.strip() for p in args.execution_providers.split(",") if p.strip()]
    try:
        data, digest = read_verified(path, args.sha256)
        providers = resolve_providers(requested, ort.get_available_providers(), args.allow_cpu_fallback)
        session = create_session(data, providers, args.allow_cpu_fallback, args.threads)
        model = Model(
            session,
            name=args.model_name,
            version=args.model_version,
            sha256=digest,
            max_batch_size=max(args.max_batch_size, 0),
        )
    except ModelLoadError as error:
        log.error("%s", error)
        return 1
    model.warm_up()
    log.info(
        "loaded %s version %s (sha256 %s) from %s; execution providers in use: %s; max batch size %d",
        model.name,
        model.version,
        model.sha256,
        path,
        ",".join(model.providers),
        model.max_batch_size,
    )
    import uvloop

    return uvloop.run(_serve(args, model))


SPARE_FILES = 64  # open files besides connections: the model, logs, the event loop's, the backend's


def fit_to_open_files(limits: Limits, protocols: int) -> Limits:
    """Raises the open-files limit to its hard limit, and lowers --max-connections to what that leaves for
    each protocol, so that a flood of connections meets the cap rather than EMFILE (which refuses everyone)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    room = max(1, (soft - SPARE_FILES) // protocols)
    if limits.max_connections <= room:
        return limits
    log.warning("--max-connections %d lowered to %d: %d open files allowed", limits.max_connections, room, soft)
    return dataclasses.replace(limits, max_connections=room)


def _tls(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not args.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.tls_cert, args.tls_key)
    context.set_alpn_protocols(["http/1.1"])
    return context


GRPC_FLUSH_SECONDS = 2.0


async def _serve(args: argparse.Namespace, model) -> int:
    import grpc

    from edgeloop_runtime.grpc_server import build_server
    from edgeloop_runtime.http_server import App, HttpServer
    from edgeloop_runtime.serving import Serving

    loop = asyncio.get_running_loop()
    limits = fit_to_open_files(Limits.from_args(args), protocols=2 if args.grpc_port else 1)
    serving = Serving(model, max_queue=args.max_queue, window_us=args.batch_window_us, limits=limits)
    serving.batcher.start()
    http = HttpServer(App(serving))
    await http.start(args.host, args.http_port, _tls(args))
    grpc_server = None
    if args.grpc_port:
        grpc_server = build_server(serving)
        address = f"{args.host}:{args.grpc_port}"
        if args.tls_cert:
            credentials = grpc.ssl_server_credentials([(args.tls_key.read_bytes(), args.tls_cert.read_bytes())])
            grpc_server.add_secure_port(address, credentials)
        else:
            grpc_server.add_insecure_port(address)
        await grpc_server.start()

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    scheme = "https" if args.tls_cert else "http"
    log.info("ready: %s://%s:%d (HTTP), gRPC port %s", scheme, args.host, args.http_port, args.grpc_port or "off")
    await stop.wait()

    # Draining: HTTP keeps answering, with readiness false and 503 for new inference, so that probes
    # and clients see why; new gRPC calls get UNAVAILABLE. Requests already in the server finish.
    log.info("draining: %d request(s) in flight", serving.inflight)
    serving.draining = True
    deadline = time.monotonic() + args.drain_timeout
    while serving.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    if grpc_server:
        # Stopped only now, with a grace to send the last responses: stopping gRPC while its calls were
        # still running sometimes reset their connections (seen under load) despite the grace period.
        await grpc_server.stop(max(deadline - time.monotonic(), GRPC_FLUSH_SECONDS))
    http.close()
    await serving.batcher.stop()
    log.info("stopped; %d request(s) left unfinished", serving.inflight)
    return 0
