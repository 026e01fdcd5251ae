"""Pure status computation: what the operator observed → the status it reports. No cluster access."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from edgeloop.api.common import Condition, ConditionStatus


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event worth recording on a custom resource."""

    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class ConditionUpdate:
    type: str
    status: ConditionStatus
    reason: str
    message: str


def merge_conditions(
    previous: Iterable[Condition], updates: Iterable[ConditionUpdate], generation: int, now: str
) -> list[Condition]:
    """The new conditions, keeping a condition's lastTransitionTime while its status stays the same."""
    before = {condition.type: condition for condition in previous}
    merged = []
    for update in updates:
        old = before.get(update.type)
        merged.append(
            Condition(
                type=update.type,
                status=update.status,
                reason=update.reason,
                message=update.message,
                last_transition_time=old.last_transition_time if old and old.status == update.status else now,
                observed_generation=generation,
            )
        )
    return merged


def condition(conditions: Iterable[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)
