"""Prometheus metrics of one engine, served by the dev server at ``/metrics``.

Two sources: every ended activation (through ``engine.add_end_hook``) feeds counters and duration histograms,
and ``engine.stats()`` is read at scrape time for what is a level, not an event (sandboxes per state, queue
lengths, the pool's own counters). Each :class:`Metrics` has its own registry, so two engines in one process
(tests, notebooks) never mix their figures.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .._errors import EngineClosed

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from .._core.activation import Activation
    from .._engine import Engine

__all__ = ("CONTENT_TYPE", "Metrics")

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
PREFIX: Final = "minifaas"
#: seconds; from a warm sub-millisecond run to the 5 minute OpenWhisk timeout ceiling
DURATION_BUCKETS_S: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
SANDBOX_STATES: Final = ("busy", "idle", "starting")


def _split_key(key: str) -> tuple[str, str]:
    """``"guest/hello@3"`` -> ``("hello", "3")``: the pool keys sandboxes by namespace/name@version."""
    _, _, rest = key.partition("/")
    name, _, version = (rest or key).rpartition("@")
    return (name, version) if name else (rest or key, "")


class _EngineCollector(Collector):
    """Levels read from ``engine.stats()`` at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._engine.stats()
        except EngineClosed:
            return
        sandboxes = GaugeMetricFamily(
            f"{PREFIX}_sandboxes",
            "Sandboxes per function version and state",
            labels=["function", "version", "state"],
        )
        queue = GaugeMetricFamily(
            f"{PREFIX}_queue_length",
            "Invocations waiting for a sandbox, per function version",
            labels=["function", "version"],
        )
        backoff = GaugeMetricFamily(
            f"{PREFIX}_init_backoff_seconds",
            "Seconds until a function whose initializations keep failing may start a sandbox again",
            labels=["function", "version"],
        )
        functions: dict[str, dict[str, Any]] = stats.get("functions", {})
        for key, fs in functions.items():
            name, version = _split_key(key)
            for state in SANDBOX_STATES:
                sandboxes.add_metric([name, version, state], float(fs.get(state, 0)))
            queue.add_metric([name, version], float(fs.get("queued", 0)))
            backoff.add_metric([name, version], float(fs.get("init_backoff_s", 0)))
        yield sandboxes
        yield queue
        yield backoff
        yield GaugeMetricFamily(
            f"{PREFIX}_sandboxes_total", "Sandboxes of every function", value=float(stats.get("sandboxes", 0))
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_queued", "Invocations waiting in every queue", value=float(stats.get("queued", 0))
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_in_flight",
            "Accepted invocations not yet ended",
            value=float(stats.get("in_flight", 0)),
        )
        pool = CounterMetricFamily(
            f"{PREFIX}_pool_events",
            "Pool events since start (cold_starts, forks, spawns, evictions ...)",
            labels=["event"],
        )
        for event, n in sorted(stats.items()):
            if isinstance(n, int) and not isinstance(n, bool) and event not in ("sandboxes", "queued", "in_flight"):
                pool.add_metric([event], float(n))
        yield pool
        launcher: dict[str, Any] = stats.get("launcher_stats") or {}
        if "spares" in launcher:
            yield GaugeMetricFamily(
                f"{PREFIX}_spares", "Children the zygote keeps forked ahead of demand", value=float(launcher["spares"])
            )
            yield GaugeMetricFamily(
                f"{PREFIX}_spares_target",
                "Spares the recent bursts of cold starts ask for",
                value=float(launcher.get("spares_target", 0)),
            )
            yield GaugeMetricFamily(
                f"{PREFIX}_spares_pss_bytes",
                "Proportional set size of the idle spares (what they cost in memory)",
                value=float(sum(launcher.get("spares_pss_kib") or ()) * 1024),
            )
        store = getattr(self._engine, "_model_store", None)  # only report a store the engine has created
        if store is not None and callable(getattr(store, "stats", None)):
            host = CounterMetricFamily(
                f"{PREFIX}_model_store_events",
                "Host model store fetches (hits, downloads, shared, errors)",
                labels=["event"],
            )
            for event, n in sorted(store.stats().items()):
                if event != "bytes":
                    host.add_metric([event], float(n))
            yield host
        started = float(getattr(self._engine, "started_at", 0.0) or 0.0)
        if started:
            yield GaugeMetricFamily(
                f"{PREFIX}_uptime_seconds",
                "Seconds since the engine started",
                value=max(0.0, time.time() - started),
            )


class Metrics:
    """Counters and histograms of one engine; ``render()`` gives the Prometheus text exposition."""

    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.invocations = Counter(
            f"{PREFIX}_invocations",
            "Ended activations by function and status",
            ["function", "status"],
            registry=r,
        )
        self.starts = Counter(
            f"{PREFIX}_starts",
            "Activations that ran on a new (cold) or reused (warm) sandbox",
            ["function", "start"],
            registry=r,
        )
        self.wait = Histogram(
            f"{PREFIX}_wait_seconds",
            "Time from acceptance to start, less the cold start",
            ["function"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.init = Histogram(
            f"{PREFIX}_init_seconds",
            "Cold start: launching and initializing a sandbox",
            ["function"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.run = Histogram(
            f"{PREFIX}_run_seconds",
            "Run time of the function itself",
            ["function"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self.model_cache = Counter(
            f"{PREFIX}_model_cache",
            "Model loads in sandboxes: hit (already in memory) or miss",
            ["function", "model", "result"],
            registry=r,
        )
        r.register(_EngineCollector(engine))
        engine.add_end_hook(self.observe)

    def observe(self, act: Activation) -> None:
        """The engine's end hook: count one ended activation."""
        fn = act.name
        self.invocations.labels(fn, act.status).inc()
        ann = act.annotations
        if "sandbox" not in ann:
            return  # never ran (deleted or closed while queued): no start, no durations
        cold = bool(ann.get("cold"))
        self.starts.labels(fn, "cold" if cold else "warm").inc()
        if act.wait_time is not None:
            self.wait.labels(fn).observe(act.wait_time / 1000)
        if act.init_time is not None:
            self.init.labels(fn).observe(act.init_time / 1000)
        if act.duration is not None:
            self.run.labels(fn).observe(max(0, act.duration - (act.init_time or 0)) / 1000)
        models = ann.get("models")
        if isinstance(models, list):
            for m in models:
                if isinstance(m, dict) and isinstance(m.get("url"), str):
                    model = PurePosixPath(m["url"]).name or m["url"]
                    self.model_cache.labels(fn, model, "hit" if m.get("hit") else "miss").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
