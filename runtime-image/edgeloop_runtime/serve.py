"""`edgeloop-runtime serve`: load one verified model and serve it over OIP v2 HTTP and gRPC.

The model loads before the server listens; the server then answers liveness at once and turns ready once
the warm-up of every allowed batch size is done. On SIGTERM (or SIGINT) it drains: readiness turns false,
new inference gets 503/UNAVAILABLE, requests already in the server finish (up to --drain-timeout), then it exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import resource
import signal
import ssl
import threading
import time
from pathlib import Path

from edgeloop_runtime.backends import FORMATS
from edgeloop_runtime.fetch import DEFAULT_CACHE, cache_path
from edgeloop_runtime.limits import Limits

log = logging.getLogger("edgeloop_runtime.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model-path", type=Path, help="the model file; default: <cache>/sha256/<sha256>")
    model.add_argument("--cache", type=Path, default=Path(DEFAULT_CACHE), help="node model cache (default %(default)s)")
    model.add_argument("--sha256", help="expected sha256 of the model; a mismatching file is refused")
    model.add_argument(
        "--format", choices=sorted(FORMATS), default="onnx", help="the model's format, which picks the backend"
    )
    model.add_argument("--model-name", default="model", help="name clients address (default %(default)s)")
    model.add_argument("--model-version", default="1", help="version reported and accepted (default %(default)s)")
    runtime = parser.add_argument_group("backend")
    runtime.add_argument(
        "--execution-providers",
        default="CPUExecutionProvider",
        help="comma-separated execution providers, in order of preference (default %(default)s)",
    )
    runtime.add_argument(
        "--provider-options",
        type=provider_options,
        default={},
        metavar="JSON",
        help='options per provider: {"<ExecutionProvider>": {"<key>": "<string value>", ...}, ...}',
    )
    runtime.add_argument(
        "--allow-cpu-fallback",
        action="store_true",
        help="serve on CPU when a requested provider is missing or fails; without it the server refuses to start",
    )
    runtime.add_argument(
        "--threads", type=int, default=1, help="intra-op threads per instance; 0: the backend decides (default 1)"
    )
    runtime.add_argument(
        "--model-instances",
        type=int,
        default=0,
        help="batches run at once (Triton's instance_group count); 0 (default): from the CPU limit and --threads",
    )
    runtime.add_argument(
        "--compiled-cache",
        type=Path,
        help="writable directory for compiled artefacts (OpenVINO, TensorRT), kept per model digest",
    )
    batching = parser.add_argument_group("batching and backpressure")
    batching.add_argument(
        "--max-batch-size", type=int, default=8, help="0 disables dynamic batching (default %(default)s)"
    )
    batching.add_argument(
        "--batch-sizes",
        type=batch_sizes,
        metavar="N,N,...",
        help="the only batch sizes the backend runs (the largest is --max-batch-size); "
        "default: powers of two up to --max-batch-size, and --max-batch-size",
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
    network.add_argument(
        "--shared-memory-dir",
        type=Path,
        help="where clients' POSIX shm objects are (/dev/shm, shared with them): turns on Triton's system shared "
        "memory extension for regions in this directory; off by default (docs/shared-memory.md)",
    )
    network.add_argument("--tls-cert", type=Path, help="PEM certificate: serve HTTPS and gRPC over TLS")
    network.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    network.add_argument(
        "--drain-timeout", type=float, default=30.0, help="seconds to finish requests on SIGTERM (default %(default)s)"
    )
    identity = parser.add_argument_group("identity (labels of the edgeloop_model_info metric)")
    identity.add_argument(
        "--node-name", default=os.environ.get("NODE_NAME", ""), help="the node this runs on (default: $NODE_NAME)"
    )
    identity.add_argument("--accelerator", default="", help="the accelerator class of this variant (npu, gpu, cpu, …)")
    Limits.add_arguments(parser.add_argument_group("limits (docs/security.md)"))
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def provider_options(text: str) -> dict[str, dict[str, str]]:
    """--provider-options: a JSON object of objects of strings (checked against the providers in `run`)."""
    try:
        document = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(document, dict) or not all(isinstance(v, dict) for v in document.values()):
        raise argparse.ArgumentTypeError('expected {"<ExecutionProvider>": {"<key>": "<string value>"}, ...}')
    for provider, options in document.items():
        for key, value in options.items():
            if not isinstance(value, str):
                quoted = json.dumps(str(value))
                raise argparse.ArgumentTypeError(
                    f"{provider}: option {key!r} is {json.dumps(value)}; options are strings (write {quoted})"
                )
    return document


def batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not sizes or len(sizes) > 64:
        raise argparse.ArgumentTypeError("give 1 to 64 batch sizes")
    return sizes


def check_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments together, for exit code 2; None when nothing is."""
    from edgeloop_runtime.model import MAX_BATCH_SIZE, MAX_INSTANCES, allowed_batch_sizes

    if bool(args.tls_cert) != bool(args.tls_key):
        return "--tls-cert and --tls-key go together"
    if args.model_path is None and not args.sha256:
        return "give --model-path, or --sha256 to serve <cache>/sha256/<sha256>"
    providers = requested_providers(args)
    unknown = [p for p in args.provider_options if p not in providers]
    if unknown:
        return f"--provider-options names {unknown}, which --execution-providers ({','.join(providers)}) does not"
    if not 0 <= args.max_batch_size <= MAX_BATCH_SIZE:
        return f"--max-batch-size must be within 0..{MAX_BATCH_SIZE}"
    if not 0 <= args.model_instances <= MAX_INSTANCES:
        return f"--model-instances must be within 0..{MAX_INSTANCES}"
    if args.threads < 0:
        return "--threads must be 0 or more"
    if args.batch_sizes:
        if not args.max_batch_size:
            return "--batch-sizes needs dynamic batching (--max-batch-size above 0)"
        try:
            allowed_batch_sizes(args.max_batch_size, args.batch_sizes)
        except ValueError as error:
            return f"--batch-sizes: {error}"
    return None


def requested_providers(args: argparse.Namespace) -> list[str]:
    return [p.strip() for p in args.execution_providers.split(",") if p.strip()]


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = check_arguments(args)
    if problem:
        log.error("%s", problem)
        return 2
    # Imported here so that `--help` and argument errors stay fast.
    from edgeloop_runtime.backends import LoadOptions, ModelLoadError, backend_for
    from edgeloop_runtime.model import Model, allowed_batch_sizes, read_verified

    path = args.model_path or cache_path(args.cache, args.sha256)
    try:
        backend = backend_for(args.format)
        data, digest = read_verified(path, args.sha256)
        options = LoadOptions(
            providers=requested_providers(args),
            provider_options=args.provider_options,
            allow_cpu_fallback=args.allow_cpu_fallback,
            threads=args.threads,
            compiled_cache=args.compiled_cache / digest if args.compiled_cache else None,
        )
        model = Model.load(
            backend,
            data,
            options,
            instances=args.model_instances,
            name=args.model_name,
            version=args.model_version,
            sha256=digest,
            max_batch_size=args.max_batch_size,
            batch_sizes=allowed_batch_sizes(args.max_batch_size, args.batch_sizes),
        )
        del data
    except ModelLoadError as error:
        log.error("%s", error)
        return 1
    log.info(
        "loaded %s version %s (sha256 %s) from %s with %s; execution providers in use: %s; "
        "%d instance(s) of %d thread(s); batch sizes %s",
        model.name,
        model.version,
        model.sha256,
        path,
        backend.name,
        ",".join(model.providers),
        model.instances,
        args.threads,
        ",".join(map(str, model.batch_sizes)) or "off",
    )
    import uvloop

    return uvloop.run(_serve(args, model))


def _warm_up(loop: asyncio.AbstractEventLoop, model) -> asyncio.Future:
    """Runs the model's warm-up in a thread of its own (a daemon: a SIGTERM meanwhile need not wait for it)."""
    done = loop.create_future()

    def work() -> None:
        try:
            seconds = model.warm_up()
        except BaseException as error:  # handed to the event loop
            loop.call_soon_threadsafe(done.set_exception, error)
        else:
            loop.call_soon_threadsafe(done.set_result, seconds)

    threading.Thread(target=work, name="warm-up", daemon=True).start()
    return done


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


def _tls(args: argparse.Namespace, protocol: str) -> ssl.SSLContext | None:
    """The TLS context of one port, offering its protocol by ALPN (http/1.1, or h2 for gRPC)."""
    if not args.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.tls_cert, args.tls_key)
    context.set_alpn_protocols([protocol])
    return context


async def _serve(args: argparse.Namespace, model) -> int:
    from edgeloop_runtime.http_server import App, http_listener
    from edgeloop_runtime.serving import Serving

    loop = asyncio.get_running_loop()
    limits = fit_to_open_files(Limits.from_args(args), protocols=2 if args.grpc_port else 1)
    serving = Serving(
        model,
        max_queue=args.max_queue,
        window_us=args.batch_window_us,
        limits=limits,
        shared_memory_dir=args.shared_memory_dir,
        node=args.node_name,
        accelerator=args.accelerator,
    )
    serving.batcher.start()  # requests are refused until the warm-up is done (Serving.ready)
    listeners = {"http": http_listener(App(serving))}
    await listeners["http"].start(args.host, args.http_port, _tls(args, "http/1.1"))
    if args.grpc_port:
        from edgeloop_runtime.grpc_server import grpc_listener  # only with gRPC on

        listeners["grpc"] = grpc_listener(serving)
        await listeners["grpc"].start(args.host, args.grpc_port, _tls(args, "h2"))
    for protocol, listener in listeners.items():
        serving.metrics.gauge(
            "edgeloop_open_connections",
            f"Open connections (--max-connections {limits.max_connections}).",
            lambda listener=listener: len(listener.connections),
            protocol=protocol,
        )

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    scheme = "https" if args.tls_cert else "http"
    log.info("listening: %s://%s:%d (HTTP), gRPC port %s; warming up", scheme, args.host, args.http_port,
             args.grpc_port or "off")  # fmt: skip
    warm_up = _warm_up(loop, model)
    stopping = loop.create_task(stop.wait())
    await asyncio.wait([warm_up, stopping], return_when=asyncio.FIRST_COMPLETED)
    if warm_up.done():
        serving.warmed = True
        log.info("ready: warm-up of batch sizes %s took %.2f s", ",".join(map(str, model.batch_sizes)) or "1",
                 warm_up.result())  # fmt: skip
    await stopping

    # Draining: both protocols keep answering, with readiness false and 503 / UNAVAILABLE for new inference,
    # so that probes and clients see why. Requests already in the server finish; then the connections close
    # (gRPC's with a GOAWAY) once what was written to them is sent.
    log.info("draining: %d request(s) in flight", serving.inflight)
    serving.draining = True
    deadline = time.monotonic() + args.drain_timeout
    while serving.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    for listener in listeners.values():
        listener.close()
    serving.shared_memory.close()
    await serving.batcher.stop()
    log.info("stopped; %d request(s) left unfinished", serving.inflight)
    return 0
