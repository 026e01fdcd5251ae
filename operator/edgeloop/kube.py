"""The operator's own calls to the Kubernetes API, on plain dicts (Kopf does the watching).

Blocking (the official client's urllib3 pool); handlers call it through `asyncio.to_thread`. Every call
made here needs a matching rule in the operator's RBAC.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote, urlencode

from kubernetes import client, config

FIELD_MANAGER = "edgeloop-operator"
TIMEOUT_SECONDS = 30
# Calls in flight at once: the operator's thread pool and the client's connection pool are this big, so that
# a burst of new models is bounded by the API server rather than by the client.
CONCURRENCY = 16
# What a pod may answer through the API server (a runtime's metadata, a log tail): pods run images that a
# namespace's users choose, so what the operator reads from them is bounded in bytes and in time.
POD_ANSWER_MAX_BYTES = 64 << 10
POD_ANSWER_TIMEOUT_SECONDS = 5.0
LOG_TAIL_MAX_BYTES = 1 << 20  # an aggregator's final report, the last line of its log


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str = "") -> str:
        prefix = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        parts = [prefix]
        if self.namespaced and namespace:
            parts += ["namespaces", quote(namespace, safe="")]
        parts.append(self.plural)
        if name:
            parts.append(quote(name, safe=""))
        if subresource:
            parts.append(subresource)
        return "/".join(parts)


KINDS: dict[tuple[str, str], Kind] = {
    (kind.api_version, kind.kind): kind
    for kind in (
        Kind("apps/v1", "DaemonSet", "daemonsets"),
        Kind("v1", "Service", "services"),
        Kind("v1", "Pod", "pods"),
        Kind("v1", "Event", "events"),
        Kind("v1", "Secret", "secrets"),
        Kind("batch/v1", "Job", "jobs"),
        Kind("cert-manager.io/v1", "Certificate", "certificates"),
        Kind("edgeloop.io/v1alpha1", "InferenceModel", "inferencemodels"),
        Kind("edgeloop.io/v1alpha1", "FederatedRound", "federatedrounds"),
    )
}


def kind_of(api_version: str, kind: str) -> Kind:
    return KINDS[(api_version, kind)]


class KubeError(Exception):
    """A failed API call: the HTTP status and the API server's message."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message

    @property
    def is_permanent(self) -> bool:
        """The request itself is wrong (invalid, forbidden, ...): repeating it cannot succeed."""
        return self.status in (400, 403, 422)


class KubeApi(Protocol):
    """The calls the operator makes; `Kube` makes them against a cluster, `edgeloop.testing.FakeKube` in memory."""

    def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]: ...

    def delete(self, kind: Kind, namespace: str, name: str, uid: str) -> None: ...

    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None: ...

    def list(
        self, kind: Kind, namespace: str, *, label_selector: str = "", field_selector: str = "", page_size: int = 100
    ) -> Iterator[dict[str, Any]]: ...

    def merge_patch(self, kind: Kind, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]: ...

    def log_tail(self, namespace: str, pod: str, container: str, lines: int) -> str: ...

    def proxy_get(self, namespace: str, pod: str, port: int, path: str, *, https: bool) -> str: ...

    def patch_status(
        self, kind: Kind, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any] | None: ...


class Kube:
    def __init__(self, api_client: client.ApiClient):
        self._api = api_client

    @classmethod
    def from_environment(cls) -> Kube:
        """In-cluster credentials when running in a pod, otherwise $KUBECONFIG or ~/.kube/config."""
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = CONCURRENCY
        return cls(client.ApiClient(configuration))

    def _request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        text = self._call(method, path, query=query, body=body, content_type=content_type)
        return json.loads(text) if text else {}

    def _call(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        max_bytes: int | None = None,
        timeout: float = TIMEOUT_SECONDS,
    ) -> str:
        """The response body as text; non-2xx responses raise KubeError. With `max_bytes`, a longer body
        raises KubeError (413), and so does one that takes longer than `timeout` (504)."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, url, headers, body, _ = self._api.param_serialize(
            method, path, header_params=headers, body=body, auth_settings=["BearerToken"]
        )
        if query:
            url += "?" + urlencode(query)
        response = self._api.call_api(method, url, header_params=headers, body=body, _request_timeout=timeout)
        if max_bytes is None:
            data = response.read() or b""
        else:
            data = _bounded_read(response.response, max_bytes, time.monotonic() + timeout)
        text = data.decode(errors="replace")
        if not 200 <= response.status < 300:
            try:
                message = json.loads(text).get("message", text)
            except (ValueError, AttributeError):
                message = text
            raise KubeError(response.status, message)
        return text

    def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply: creates the object or updates the fields this operator owns."""
        metadata = manifest["metadata"]
        path = kind_of(manifest["apiVersion"], manifest["kind"]).path(metadata.get("namespace"), metadata["name"])
        return self._request(
            "PATCH",
            path,
            query={"fieldManager": FIELD_MANAGER, "force": "true"},
            body=dict(manifest),
            content_type="application/apply-patch+yaml",
        )

    def delete(self, kind: Kind, namespace: str, name: str, uid: str) -> None:
        """Deletes exactly the object with this uid (a same-named newer object is left alone)."""
        try:
            self._request(
                "DELETE",
                kind.path(namespace, name),
                body={"preconditions": {"uid": uid}, "propagationPolicy": "Background"},
            )
        except KubeError as error:
            if error.status not in (404, 409):  # gone already, or replaced by another object
                raise

    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._request("GET", kind.path(namespace, name))
        except KubeError as error:
            if error.status == 404:
                return None
            raise

    def list(
        self,
        kind: Kind,
        namespace: str,
        *,
        label_selector: str = "",
        field_selector: str = "",
        page_size: int = 100,
    ) -> Iterator[dict[str, Any]]:
        """Every matching object, fetched page by page to bound the memory one call needs."""
        query = {"limit": page_size}
        if label_selector:
            query["labelSelector"] = label_selector
        if field_selector:
            query["fieldSelector"] = field_selector
        while True:
            page = self._request("GET", kind.path(namespace), query=query)
            yield from page.get("items", [])
            if not (token := page.get("metadata", {}).get("continue")):
                return
            query = {**query, "continue": token}

    def merge_patch(self, kind: Kind, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        """A JSON merge patch; with metadata.resourceVersion in it, it applies only to that version (409)."""
        return self._request(
            "PATCH", kind.path(namespace, name), body=dict(patch), content_type="application/merge-patch+json"
        )

    def log_tail(self, namespace: str, pod: str, container: str, lines: int) -> str:
        """The last `lines` lines of a container's log (of its current run), at most LOG_TAIL_MAX_BYTES."""
        query = {"container": container, "tailLines": lines, "limitBytes": LOG_TAIL_MAX_BYTES}
        return self._call("GET", kind_of("v1", "Pod").path(namespace, pod, "log"), query=query)

    def proxy_get(self, namespace: str, pod: str, port: int, path: str, *, https: bool) -> str:
        """GET `path` on a pod's port through the API server (RBAC: pods/proxy get), bounded in bytes and time.
        The API server does not verify the pod's certificate."""
        target = f"{'https' if https else 'http'}:{pod}:{port}"
        return self._call(
            "GET",
            kind_of("v1", "Pod").path(namespace, target, "proxy") + path,
            max_bytes=POD_ANSWER_MAX_BYTES,
            timeout=POD_ANSWER_TIMEOUT_SECONDS,
        )

    def patch_status(
        self, kind: Kind, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Replaces the status (a JSON merge patch: lists are replaced whole); None if the object is gone,
        which a sync racing a deletion must not treat as an error: the deletion's own event follows."""
        try:
            return self._request(
                "PATCH",
                kind.path(namespace, name, "status"),
                body={"status": dict(status)},
                content_type="application/merge-patch+json",
            )
        except KubeError as error:
            if error.status == 404:
                return None
            raise


def _bounded_read(response: Any, max_bytes: int, deadline: float) -> bytes:
    """A urllib3 response's body, or KubeError once it exceeds `max_bytes` or `deadline` passes."""
    chunks, size = [], 0
    try:
        while chunk := response.read1(16 << 10):
            size += len(chunk)
            if size > max_bytes:
                raise KubeError(413, f"the answer exceeds {max_bytes} bytes")
            if time.monotonic() > deadline:
                raise KubeError(504, "the answer took too long")
            chunks.append(chunk)
    except BaseException:
        response.close()  # the rest is never read: the connection cannot be reused
        raise
    finally:
        response.release_conn()
    return b"".join(chunks)
