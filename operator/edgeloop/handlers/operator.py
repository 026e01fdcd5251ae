"""The operator's one startup: the shared Certificates, and both controllers built on the shared indexes.

Kopf passes every index to every handler by its function's name: the shared ones (handlers/shared.py) and
each controller's own.
"""

from __future__ import annotations

import functools
from typing import Any

import kopf

from edgeloop import metrics
from edgeloop.aggregator import read_report
from edgeloop.config import OperatorConfig
from edgeloop.handlers import inferencemodel, shared
from edgeloop.handlers.certificates import Certificates
from edgeloop.handlers.federatedround import FederatedRounds
from edgeloop.handlers.inferencemodel import InferenceModels


def register(config: OperatorConfig, settings: kopf.OperatorSettings) -> None:
    """What is registered depending on the configuration: Secrets are watched with TLS only."""
    shared.configure(settings)
    if config.tls.enabled:
        shared.watch_tls_secrets()
        inferencemodel.watch_tls_secrets()


@kopf.on.startup()
async def start(memo: kopf.Memo, **indexes: Any) -> None:  # Kopf's other keyword arguments too
    certificates = Certificates(memo.config.tls, memo.kube, indexes.get("tls_secrets", {}))
    memo.inference_models = InferenceModels(
        config=memo.config,
        kube=memo.kube,
        models=indexes["inference_models"],
        daemon_sets=indexes["inference_model_daemon_sets"],
        services=indexes["inference_model_services"],
        nodes=indexes["nodes"],
        namespaces=indexes["live_namespaces"],
        tls=certificates,
        coalesce_seconds=memo.coalesce_seconds,
        diagnosis_interval=memo.diagnosis_interval,
    )
    memo.federated_rounds = FederatedRounds(
        config=memo.config,
        kube=memo.kube,
        rounds=indexes["federated_rounds"],
        jobs=indexes["federated_round_jobs"],
        services=indexes["federated_round_services"],
        nodes=indexes["nodes"],
        pods=indexes["federated_round_pods"],
        namespaces=indexes["live_namespaces"],
        tls=certificates,
        coalesce_seconds=memo.coalesce_seconds,
        read_report=functools.partial(read_report, **memo.aggregator_status_limits),
    )
    memo.metrics_server = None
    if memo.get("metrics_port"):
        fleet = metrics.FleetCollector(
            memo.config, indexes["inference_models"], indexes["federated_rounds"], indexes["live_namespaces"]
        )
        leadership = metrics.Leadership(memo.kube, memo.peering)
        memo.metrics_server = await metrics.serve(memo.metrics_port, fleet, leadership)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    await memo.inference_models.close()
    await memo.federated_rounds.close()
    if memo.metrics_server is not None:
        await memo.metrics_server.cleanup()
