"""Where a Ray sandbox may go: a function's Ray resources, the room of each node, the node it is packed onto.

Room is per node, never summed over the cluster: 1.5 CPUs do not fit on two 1-CPU nodes, and two half-free nodes
do not host a 1-CPU actor. A function that no node can ever host is refused at deploy
(:func:`check_fits_some_node`); one that fits a node only once idle sandboxes there are gone makes the launcher
evict exactly those (:func:`evictions_for`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any, Final

import ray

from .._core.function import FunctionSpec
from .._errors import DeployError

__all__ = ("RAY_ACTOR_OVERHEAD_MB", "Demand", "check_fits_some_node", "demand_of", "evictions_for", "fits")

RAY_NUM_CPUS: Final = 1.0
#: reserved in Ray's ``memory`` on top of the function's ``memory_mb``: the actor's worker process (93 MiB measured)
#: and the sandbox runtime (23 MiB). Without it Ray's memory monitor sees twice the reservation in use under load
RAY_ACTOR_OVERHEAD_MB: Final = 128
#: Ray rounds resource quantities to 1/10000
_EPSILON: Final = 1e-4
PLACEMENTS: Final = ("pack", "spread")


@dataclasses.dataclass(frozen=True, slots=True)
class Demand:
    """What one sandbox actor reserves on its node."""

    num_cpus: float
    num_gpus: float
    memory_bytes: int
    custom: tuple[tuple[str, float], ...] = ()

    def as_resources(self) -> dict[str, float]:
        """In Ray's resource names, as ``ray.nodes()`` and ``available_resources`` report them."""
        out = {"CPU": self.num_cpus, "memory": float(self.memory_bytes)}
        if self.num_gpus:
            out["GPU"] = self.num_gpus
        out.update(self.custom)
        return out

    def actor_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "memory": self.memory_bytes}
        if self.num_gpus:
            options["num_gpus"] = self.num_gpus
        if self.custom:
            options["resources"] = dict(self.custom)
        return options

    def describe(self) -> str:
        parts = [f"{self.num_cpus:g} CPU", f"{self.memory_bytes >> 20} MiB"]
        if self.num_gpus:
            parts.append(f"{self.num_gpus:g} GPU")
        parts += [f"{v:g} {k}" for k, v in self.custom]
        return ", ".join(parts)


def demand_of(spec: FunctionSpec | None) -> Demand:
    """The reservation of one of ``spec``'s actors (a generic pre-warmed actor's: one CPU, the overhead)."""
    if spec is None:
        return Demand(RAY_NUM_CPUS, 0.0, RAY_ACTOR_OVERHEAD_MB << 20)
    resources = dict(getattr(spec, "resources", None) or {})
    cpus: Any = resources.pop("num_cpus", None)
    if cpus is None:
        cpus = spec.annotations.get("num_cpus", RAY_NUM_CPUS)  # the older spelling, as an annotation
    if isinstance(cpus, bool) or not isinstance(cpus, int | float) or not cpus > 0:
        raise ValueError(f"num_cpus must be a positive number (a fraction is fine), got {cpus!r}")
    gpus = float(resources.pop("num_gpus", 0.0))
    memory = (spec.memory_mb + RAY_ACTOR_OVERHEAD_MB) << 20
    return Demand(float(cpus), gpus, memory, tuple(sorted((k, float(v)) for k, v in resources.items() if v)))


def fits(demand: Demand, room: Mapping[str, float]) -> bool:
    return all(room.get(name, 0.0) + _EPSILON >= need for name, need in demand.as_resources().items())


def alive_node_totals() -> dict[str, dict[str, float]]:
    """Each alive node's total resources, by node id (works through Ray Client too)."""
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return {str(n["NodeID"]): dict(n.get("Resources") or {}) for n in nodes if n.get("Alive")}


def _free_per_node() -> dict[str, dict[str, float]]:
    from ray._private.state import available_resources_per_node

    free: dict[str, dict[str, float]] = available_resources_per_node()  # type: ignore[no-untyped-call]
    return {str(k): dict(v) for k, v in free.items()}


#: the same question asked from inside the cluster, for a driver connected through Ray Client (whose process has
#: no GCS connection of its own); zero CPUs: it never waits for room
_free_per_node_remote: Any = None


def free_per_node() -> dict[str, dict[str, float]]:
    """Each alive node's free resources, by node id (blocking: call it from a worker thread)."""
    global _free_per_node_remote
    if not ray.util.client.ray.is_connected():  # type: ignore[no-untyped-call]
        return _free_per_node()
    if _free_per_node_remote is None:
        _free_per_node_remote = ray.remote(num_cpus=0)(_free_per_node)
    free: dict[str, dict[str, float]] = ray.get(_free_per_node_remote.remote())
    return free


def forget_connection() -> None:
    """A new connection to the cluster: a Ray Client function handle belongs to the connection it was made on."""
    global _free_per_node_remote
    _free_per_node_remote = None


def check_fits_some_node(spec: FunctionSpec, totals: Mapping[str, Mapping[str, float]]) -> None:
    """Refuse (DeployError) a function whose sandbox no alive node could ever host, with each node's size."""
    demand = demand_of(spec)
    if any(fits(demand, total) for total in totals.values()):
        return
    sizes = "; ".join(
        f"{node[:8]}: {t.get('CPU', 0):g} CPU, {int(t.get('memory', 0)) >> 20} MiB, {t.get('GPU', 0):g} GPU"
        for node, t in sorted(totals.items())
    )
    raise DeployError(
        f"no node of the Ray cluster can host a sandbox of {spec.name!r}: it asks for {demand.describe()} "
        f"(memory_mb plus {RAY_ACTOR_OVERHEAD_MB} MiB for the actor) on one node; nodes: {sizes or 'none alive'}"
    )


def best_fit_node(demand: Demand, free: Mapping[str, Mapping[str, float]]) -> str | None:
    """Pack: of the nodes with room, the one left with the fewest free CPUs (then memory), or None."""
    best: tuple[float, float, str] | None = None
    for node, room in free.items():
        if fits(demand, room):
            key = (room.get("CPU", 0.0) - demand.num_cpus, room.get("memory", 0.0), node)
            if best is None or key < best:
                best = key
    return best[2] if best is not None else None


def roomiest_node(demand: Demand, free: Mapping[str, Mapping[str, float]]) -> str | None:
    """Spread: of the nodes with room, the one with the most free CPUs (then memory), or None."""
    best: tuple[float, float, str] | None = None
    for node, room in free.items():
        if fits(demand, room):
            key = (-room.get("CPU", 0.0), -room.get("memory", 0.0), node)
            if best is None or key < best:
                best = key
    return best[2] if best is not None else None


def evictions_for(
    demand: Demand, free: Mapping[str, Mapping[str, float]], idle: Iterable[tuple[str, Demand, float, Any]]
) -> list[Any]:
    """The idle sandboxes to evict so that one node gets room for ``demand``: the fewest, least recently used
    first, on the node where that works; [] when no node gets enough (evicting would free nothing useful).

    ``idle``: (node id, reservation, last used, key) of each idle sandbox that may be evicted.
    """
    by_node: dict[str, list[tuple[float, Demand, Any]]] = {}
    for node, held, last_used, key in idle:
        by_node.setdefault(node, []).append((last_used, held, key))
    best: list[Any] | None = None
    for node, room in free.items():
        room_left = dict(room)
        chosen: list[Any] = []
        for _last, held, key in sorted(by_node.get(node, []), key=lambda t: t[0]):
            if fits(demand, room_left):
                break
            for name, value in held.as_resources().items():
                room_left[name] = room_left.get(name, 0.0) + value
            chosen.append(key)
        if chosen and fits(demand, room_left) and (best is None or len(chosen) < len(best)):
            best = chosen
    return best or []
