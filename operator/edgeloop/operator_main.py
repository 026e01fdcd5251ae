"""`edgeloop operator`: run the Kopf operator with structured logs and a liveness endpoint.

Every flag can also come from the environment (EDGELOOP_<FLAG>), which is how the Helm chart sets them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from edgeloop import aggregator, metrics
from edgeloop import config as operator_config
from edgeloop.kube import CONCURRENCY, Kube

COMPONENT = "edgeloop-operator"


def _env(flag: str, default: str | None = None) -> str | None:
    return os.environ.get("EDGELOOP_" + flag.upper().replace("-", "_"), default)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=_env("config"),
        metavar="FILE",
        help="operator configuration (YAML or JSON) merged over the built-in defaults; "
        "see `python -m edgeloop.config` (env EDGELOOP_CONFIG)",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[ns for ns in (_env("namespaces") or "").split(",") if ns],
        help="watch this namespace (repeatable; globs like 'edge-*' work); env EDGELOOP_NAMESPACES=a,b",
    )
    scope.add_argument(
        "--all-namespaces", "-A", action="store_true", help="watch every namespace (the default without -n)"
    )
    parser.add_argument(
        "--liveness",
        default=_env("liveness", "http://0.0.0.0:8080/healthz"),
        metavar="URL",
        help="Kopf's liveness endpoint; empty disables it (default %(default)s)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(_env("metrics_port", str(metrics.DEFAULT_PORT))),
        help="serve Prometheus metrics at http://0.0.0.0:PORT/metrics; 0 disables them (default %(default)s)",
    )
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=float(_env("resync_seconds", "60")),
        help="re-sync every InferenceModel this often; a sync of an unchanged object writes nothing "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--diagnosis-seconds",
        type=float,
        default=float(_env("diagnosis_seconds", "15")),
        help="look at the pods of a variant whose rollout has not moved for this long (some nodes lack a "
        "ready pod), and at most this often (default %(default)s)",
    )
    parser.add_argument(
        "--coalesce-seconds",
        type=float,
        default=float(_env("coalesce_seconds", "1")),
        help="fold watch events arriving within this window into one sync (default %(default)s)",
    )
    parser.add_argument(
        "--federated-poll-seconds",
        type=float,
        default=float(_env("federated_poll_seconds", "5")),
        help="read the aggregator's status of every FederatedRound in progress this often (default %(default)s)",
    )
    parser.add_argument(
        "--aggregator-status-max-bytes",
        type=int,
        default=int(_env("aggregator_status_max_bytes", str(aggregator.MAX_REPORT_BYTES))),
        help="read at most this much of an aggregator's status report (its image is the namespace's choice) "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--aggregator-status-timeout",
        type=float,
        default=float(_env("aggregator_status_timeout", str(aggregator.TIMEOUT_SECONDS))),
        help="give up reading an aggregator's status report after this many seconds (default %(default)s)",
    )
    parser.add_argument(
        "--peering",
        default=_env("peering"),
        metavar="NAME",
        help="use Kopf peering object NAME (needs the KopfPeering CRDs); default: standalone",
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=int(_env("priority") or secrets.randbelow(1 << 31)),
        help="peering priority: among running replicas the highest serves, the others stand by; peers of equal "
        "priority all pause, so each replica picks a random one by default",
    )
    parser.add_argument("--log-format", choices=["json", "text"], default=_env("log_format", "json"))
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logs")


def settings() -> kopf.OperatorSettings:
    configured = kopf.OperatorSettings()
    # State lives in annotations under edgeloop.io/, so status holds only what the API describes.
    configured.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="edgeloop.io")
    configured.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="edgeloop.io", key="last-handled-configuration"
    )
    # Kubernetes Events only for what the handlers report on purpose, not for every log line.
    configured.posting.level = logging.WARNING
    configured.posting.reporting_component = COMPONENT
    configured.posting.reporting_instance = os.environ.get("HOSTNAME", COMPONENT)
    return configured


def run(args: argparse.Namespace) -> int:
    try:
        config = operator_config.load(args.config)
    except operator_config.ConfigError as error:
        print(f"edgeloop operator: bad configuration: {error}")
        return 2
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL,
    )
    if not args.verbose:
        # Kopf logs every handler call per object, and aiohttp every liveness probe: at fleet scale only
        # their warnings and errors are news. The operator logs what it changes itself.
        for chatty in ("kopf.objects", "aiohttp.access"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    from edgeloop.handlers import operator  # registers the handlers

    operator_settings = settings()
    operator.register(config, operator_settings)
    memo = kopf.Memo(
        config=config,
        kube=Kube.from_environment(),
        resync_seconds=args.resync_seconds,
        diagnosis_interval=args.diagnosis_seconds,
        coalesce_seconds=args.coalesce_seconds,
        federated_poll_seconds=args.federated_poll_seconds,
        aggregator_status_limits={
            "max_bytes": args.aggregator_status_max_bytes, "timeout": args.aggregator_status_timeout
        },
        metrics_port=args.metrics_port,
        peering=metrics.peering_from(args.peering, [] if args.all_namespaces else args.namespace, args.priority),
    )
    asyncio.run(
        _operate(
            settings=operator_settings,
            clusterwide=args.all_namespaces or not args.namespace,
            namespaces=[] if args.all_namespaces else args.namespace,
            liveness_endpoint=args.liveness or None,
            standalone=args.peering is None,
            peering_name=args.peering,
            priority=args.priority,
            memo=memo,
        )
    )
    return 0


async def _operate(**operator_args: Any) -> None:
    # The handlers run their blocking API calls through asyncio.to_thread, i.e. in this executor.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="kube"))
    await kopf.operator(**operator_args)
