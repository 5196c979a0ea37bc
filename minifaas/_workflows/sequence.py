"""Sequences: OpenWhisk's ``exec.kind: "sequence"`` actions, run by the host one component after another.

Semantics are OpenWhisk's (``SequenceActions.scala``): the first component gets the sequence's parameters under
the invocation's, each next one the previous result; every component is an activation of its own whose ``cause``
is the sequence's activation id; the first component that does not succeed stops the chain and its response
(status and result) becomes the sequence's. The sequence's own record holds the components' activation ids in
``logs``, its ``duration`` is the sum of theirs, its annotations say ``kind: sequence``, ``topmost`` and the
``path``; a sequence nested in another is run inline (``topmost: false``, ``causedBy: sequence``). A component
that does not exist (deleted after the sequence was made) ends it with the application error
:data:`COMPONENT_NOT_FOUND`; more than :data:`MAX_ATOMIC_ACTIONS` component activations in all end it with
:data:`TOO_LONG`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Final, Protocol

from .._core.activation import Activation, new_activation_id, now_ms
from .._errors import FunctionNotFound

__all__ = (
    "COMPONENT_NOT_FOUND",
    "IS_CYCLIC",
    "MAX_ATOMIC_ACTIONS",
    "NO_COMPONENT",
    "TOO_LONG",
    "SequenceHost",
    "SequenceSpec",
    "atomic_count",
    "run_sequence",
)

#: OpenWhisk's ``actionSequenceLimit``: atomic actions one topmost sequence may run (nested ones inlined)
MAX_ATOMIC_ACTIONS: Final = 50
#: OpenWhisk's messages, word for word (clients and tests match them)
COMPONENT_NOT_FOUND: Final = "Sequence component does not exist."
TOO_LONG: Final = "Too many actions in the sequence."
IS_CYCLIC: Final = "Sequence may not refer to itself."
NO_COMPONENT: Final = "No component specified for the sequence."


@dataclasses.dataclass(frozen=True, slots=True)
class SequenceSpec:
    """A deployed sequence: its components (engine references, resolved at each run) and default parameters."""

    name: str
    components: tuple[str, ...]
    params: dict[str, Any]
    annotations: dict[str, Any]
    version: str
    namespace: str
    created: int

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": "sequence",
            "components": list(self.components),
            "params": dict(self.params),
            "annotations": dict(self.annotations),
            "version": self.version,
            "namespace": self.namespace,
            "created": self.created,
        }


class SequenceHost(Protocol):
    """What :func:`run_sequence` needs of the engine."""

    def sequence_of(self, ref: str) -> tuple[SequenceSpec, dict[str, Any]] | None:
        """The sequence ``ref`` names and the defaults its package adds, or None for any other entity."""
        ...

    async def call(self, name: str, args: dict[str, Any] | None = None, *, cause: str | None = None) -> Activation: ...


def atomic_count(
    components: tuple[str, ...],
    lookup: Callable[[str], SequenceSpec | None],
    *,
    root: str,
    depth: int = 0,
) -> int:
    """Atomic actions ``components`` run, nested sequences inlined; ValueError for a cycle through ``root``."""
    n = 0
    for ref in components:
        inner = lookup(ref)
        if inner is None:
            n += 1
            continue
        if inner.name == root or depth > MAX_ATOMIC_ACTIONS:
            raise ValueError(IS_CYCLIC)
        n += atomic_count(inner.components, lookup, root=root, depth=depth + 1)
    return n


def _merge(defaults: dict[str, Any], spec: SequenceSpec, args: dict[str, Any]) -> dict[str, Any]:
    return {**{k: v for k, v in defaults.items() if k not in spec.params}, **spec.params, **args}


async def run_sequence(
    host: SequenceHost,
    spec: SequenceSpec,
    args: dict[str, Any],
    *,
    act: Activation,
    record: Callable[[Activation], None],
    defaults: dict[str, Any] | None = None,
    topmost: bool = True,
    budget: list[int] | None = None,
) -> Activation:
    """Run ``spec`` on ``args`` into the record ``act`` (id, name, cause set by the caller); never raises for a
    component's failure. ``record`` stores the ended record. ``budget`` counts atomic actions across nesting."""
    count = budget if budget is not None else [0]
    act.start = act.start or now_ms()
    act.status = "running"
    act.annotations = {
        "topmost": topmost,
        "path": f"{spec.namespace}/{spec.name}" if spec.name.count("/") < 2 else spec.name,
        "kind": "sequence",
        **({"causedBy": "sequence"} if not topmost else {}),
        "waitTime": max(0, act.start - act.accepted) if act.accepted else 0,
    }
    record(act)  # running: readers of its id learn it exists and has not ended
    payload = _merge(defaults or {}, spec, args)
    status: str = "success"
    result: dict[str, Any] = payload
    duration = 0
    for ref in spec.components:
        if count[0] >= MAX_ATOMIC_ACTIONS:
            status, result = "application_error", {"error": TOO_LONG}
            break
        inner = host.sequence_of(ref)
        if inner is not None:
            nested_spec, nested_defaults = inner
            nested = Activation(
                activation_id=new_activation_id(),
                name=nested_spec.name,
                version=nested_spec.version,
                namespace=spec.namespace,
                accepted=now_ms(),
                cause=act.activation_id,
            )
            done = await run_sequence(
                host,
                nested_spec,
                result,
                act=nested,
                record=record,
                defaults=nested_defaults,
                topmost=False,
                budget=count,
            )
        else:
            count[0] += 1
            try:
                done = await host.call(ref, result, cause=act.activation_id)
            except FunctionNotFound:
                status, result = "application_error", {"error": COMPONENT_NOT_FOUND}
                break
        act.logs.append(done.activation_id)
        duration += done.duration or 0
        status, result = done.status, done.result
        if status != "success":
            break
    act.end = now_ms()
    act.duration = duration
    act.result = result
    act.status = status  # type: ignore[assignment]
    record(act)
    return act
