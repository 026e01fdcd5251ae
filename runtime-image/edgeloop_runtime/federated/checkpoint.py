"""Where a federated job's progress survives: the state directory (a restart in the same pod) and, with a
ref name, the model store (the pod and its node lost: the Job's next pod, on any node, resumes from it).

A checkpoint is the status state (JSON) naming the weights by their sha256. Locally, weights then checkpoint
are each written by atomic rename. In the store, the weights are a content-addressed blob and the checkpoint
is the value of the ref `refs/<name>`, replaced only over the value this aggregator last read or wrote
(compare and swap): an older pod that is still running somewhere cannot overwrite a newer one's progress
(it stops with `Superseded`).

Why the store and not a PersistentVolumeClaim: k3s's default StorageClass (local-path) binds a volume to one
node, so a claim would be lost with the node it lives on; the store is already the piece a round must reach
to publish its result, and holds one small ref and one weights blob per round.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import store

log = logging.getLogger("edgeloop.federated.checkpoint")

STORE_ATTEMPTS = 3


class Superseded(RuntimeError):
    """Another aggregator moved the checkpoint in the store: this one is stale and must stop."""


@dataclass(frozen=True)
class StoreRef:
    base: str  # the store's base URL
    name: str  # refs/<name>: unique to the round (the operator renders namespace, name and uid)
    token: str
    context: object = None  # ssl.SSLContext for an https store


class Checkpoints:
    def __init__(self, state_dir: Path, ref: StoreRef | None = None):
        self.weights_dir = state_dir / "weights"
        self.weights_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / "checkpoint.json"
        self.ref = ref
        self.etag: str | None = None  # of the ref's value this aggregator last read or wrote

    def load(self, model_sha: str) -> tuple[dict, np.ndarray, str] | None:
        """(state, weights, where) of the furthest checkpoint of this model, local or in the store."""
        found = [c for c in (self._load_local(), self._load_remote()) if c is not None]
        for state, _, where in found:
            if state["model"] != model_sha:
                raise ValueError(f"{where} holds a checkpoint of another model ({state['model']})")
        return max(found, key=lambda c: (c[0]["round"], c[0]["phase"] != "Running"), default=None)

    def _load_local(self):
        if not self.path.exists():
            return None
        state = json.loads(self.path.read_text())
        return state, np.load(self.weights_dir / f"{state['weights']}.npy"), str(self.path)

    def _load_remote(self):
        if self.ref is None:
            return None
        found = store.get_ref(self.ref.base, self.ref.name, self.ref.token, context=self.ref.context)
        if found is None:
            return None
        value, self.etag = found
        state = json.loads(value)
        blob = _download(self.ref, state["weights"])
        return state, np.load(io.BytesIO(blob)), f"the store's ref {self.ref.name}"

    def save(self, state: dict, weights: np.ndarray) -> None:
        """Weights first, then the checkpoint that names them: a crash leaves the old checkpoint or the new one,
        never one that points at weights that are not there."""
        buffer = io.BytesIO()
        np.save(buffer, weights)
        blob = buffer.getvalue()
        sha = hashlib.sha256(blob).hexdigest()
        state["weights"] = sha
        path = self.weights_dir / f"{sha}.npy"
        if not path.exists():
            atomic_write(path, blob)
        document = json.dumps(state, indent=1).encode()
        atomic_write(self.path, document)
        for old in self.weights_dir.glob("*.npy"):
            if old != path:
                old.unlink()
        if self.ref is not None:
            self._save_remote(blob, document, state["round"])

    def _save_remote(self, blob: bytes, document: bytes, number: int) -> None:
        ref = self.ref
        for attempt in range(STORE_ATTEMPTS):
            try:
                store.upload(ref.base, blob, ref.token, context=ref.context)
                self.etag = store.put_ref(ref.base, ref.name, document, ref.token, self.etag, context=ref.context)
                return
            except store.RefConflict as conflict:
                raise Superseded(f"another aggregator moved the checkpoint {ref.name}: {conflict}") from conflict
            except (OSError, ValueError) as error:  # the store is away: the local checkpoint still holds
                if attempt + 1 == STORE_ATTEMPTS:
                    log.warning("round %d: the checkpoint did not reach the store (%s): only local", number, error)
                    return
                time.sleep(2**attempt)


def _download(ref: StoreRef, sha: str) -> bytes:
    request = urllib.request.Request(f"{ref.base.rstrip('/')}/sha256/{sha}")
    with urllib.request.urlopen(request, timeout=60, context=ref.context) as response:
        blob = response.read()
    if hashlib.sha256(blob).hexdigest() != sha:
        raise urllib.error.URLError(f"the store's blob sha256/{sha} does not match its name")
    return blob


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
