"""What both controllers share: the indexes of namespaces, nodes and TLS Secrets, what the operator watches,
the status publisher, and the translation of API errors into Kopf's retries."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Hashable, Mapping
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import kopf
from pydantic import ValidationError

from edgeloop.api.common import ApiModel
from edgeloop.kube import Kind, KubeApi, KubeError
from edgeloop.names import MANAGED_BY, ROUND_LABEL, TLS_LABEL
from edgeloop.nodes import NodeInfo
from edgeloop.status import Event

log = logging.getLogger(__name__)

ALL_NODES = "all"  # the nodes index has one key: every node is wanted at once

Key = tuple[str, str]  # (namespace, name)
S = TypeVar("S", bound=ApiModel)
K = TypeVar("K", bound=Hashable)


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def one(index: Mapping[K, Any], key: K) -> Any:
    """The single value a Kopf index holds under `key`, or None."""
    return next(iter(index.get(key, [])), None)


def configure(settings: kopf.OperatorSettings) -> None:
    """Watch only what edgeloop manages (filtered by the API server): never anyone else's Secrets."""
    managed = ",".join(f"{k}={v}" for k, v in MANAGED_BY.items())
    settings.watching.label_selectors["apps", "daemonsets"] = managed
    settings.watching.label_selectors["", "services"] = managed
    settings.watching.label_selectors["batch", "jobs"] = managed
    settings.watching.label_selectors["", "pods"] = f"{managed},{ROUND_LABEL}"  # a FederatedRound's only
    settings.watching.label_selectors["", "secrets"] = f"{managed},{TLS_LABEL}"


def watch_tls_secrets() -> None:
    """Registers the index of TLS Secrets: with TLS only, since without it the operator reads no Secret (and
    is granted none)."""
    kopf.index("", "v1", "secrets", labels={TLS_LABEL: kopf.PRESENT})(tls_secrets)


def kube_errors_are_temporary(handler: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    """A failed API call in a Kopf handler: Kopf retries the handler in 10 s."""

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            await handler(*args, **kwargs)
        except KubeError as error:
            raise kopf.TemporaryError(str(error), delay=10) from error

    return wrapper


class StatusPublisher(Generic[S]):
    """Writes a custom resource's status when it changed, and posts the Events of the change.

    The status last written is kept until the watch delivers it: compared against instead of the indexed
    status meanwhile, so a quick second sync neither writes nor posts events twice.
    """

    def __init__(
        self,
        kube: KubeApi,
        kind: Kind,
        status_type: type[S],
        transitions: Callable[[S, S], list[Event]],
        post_event: Callable[..., None] = kopf.event,
    ):
        self._kube, self._kind, self._type = kube, kind, status_type
        self._transitions, self._post_event = transitions, post_event
        self._published: dict[Key, S] = {}

    def status_of(self, body: Mapping[str, Any]) -> S:
        """The status in `body`; an empty one if it was hand-edited into something else (rewritten whole)."""
        try:
            return self._type.model_validate(body.get("status") or {})
        except ValidationError:
            return self._type()

    def previous(self, key: Key, body: Mapping[str, Any]) -> S:
        """The status to compare against: the last one written, until the watch shows it in `body`."""
        indexed = self.status_of(body)
        published = self._published.get(key)
        if published is None or published == indexed:
            self._published.pop(key, None)  # the watch has caught up
            return indexed
        return published

    def latest(self, key: Key, body: Mapping[str, Any]) -> S:
        return self._published.get(key) or self.status_of(body)

    def forget(self, key: Key) -> None:
        self._published.pop(key, None)

    async def publish(self, body: Mapping[str, Any], previous: S, status: S) -> None:
        if status == previous:
            return
        metadata = body["metadata"]
        key = (metadata["namespace"], metadata["name"])
        if await asyncio.to_thread(self._kube.patch_status, self._kind, *key, status.to_wire()) is None:
            return  # deleted since the index showed it: no Event about an object that is gone
        self._published[key] = status
        for event in self._transitions(previous, status):
            log.info("%s/%s: %s: %s", *key, event.reason, event.message)
            self._post_event(body, type=event.type, reason=event.reason, message=event.message)


# ---- the shared indexes (Kopf passes each to every handler by its function's name)


@kopf.index("", "v1", "namespaces")
def live_namespaces(name: str, **_: Any) -> dict[str, bool]:
    """The namespaces that exist and are not being deleted. Watching some namespaces only, Kopf stops
    watching one as soon as it is being deleted, before its objects are: their deletions never reach the
    indexes, so a custom resource indexed in a namespace missing here is gone (and not synced again)."""
    return {name: True}


@kopf.index("", "v1", "nodes")
def nodes(body: kopf.Body, **_: Any) -> dict[str, NodeInfo]:
    return {ALL_NODES: NodeInfo.from_object(body)}


def tls_secrets(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace, name): {"data": dict(body.get("data") or {})}}
