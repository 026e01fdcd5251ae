"""SIGTERM for the runtime's processes that have no draining of their own (store, federated aggregator and
client; `serve` drains, see serve.py)."""

from __future__ import annotations

import logging
import os
import signal


def stop_on_sigterm() -> None:
    """End the process at once on SIGTERM (a deleted or evicted pod). A container's PID 1 is spared every signal
    it has no handler for: without one, a deleted store or aggregator ran on through the pod's grace period (an
    aggregator training rounds that its successor could not resume). What a restart needs is durable already:
    the store's blobs (partial uploads are removed at its start) and the aggregator's checkpoint of the last
    completed round."""
    signal.signal(signal.SIGTERM, _stop)


def _stop(signum: int, _frame) -> None:
    logging.getLogger(__name__).warning("terminated (SIGTERM): stopping now")
    os._exit(128 + signum)
