"""A deployed function version: its code bundle and its limits."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Final, Literal

from .._deploy.bundle import Bundle

__all__ = ("DEFAULTS", "FunctionSpec")

TIMEOUT_S: Final = 60.0
MEMORY_MB: Final = 256
CONCURRENCY: Final = 1
MAX_SANDBOXES: Final = 8
IDLE_TIMEOUT_S: Final = 600.0
MAX_PAYLOAD_BYTES: Final = 1 << 20
MAX_RESULT_BYTES: Final = 1 << 20
MAX_LOG_BYTES: Final = 10 << 20
MAX_QUEUE: Final = 10_000
#: how long a request may wait in its function's queue for a sandbox before it ends as failed
MAX_QUEUE_WAIT_S: Final = 600.0
#: the variables a deployed function finds its read_paths and write_paths in (os.pathsep-separated)
GRANTS_ENV: Final = ("MINIFAAS_READ_PATHS", "MINIFAAS_WRITE_PATHS")

DEFAULTS: Final[dict[str, Any]] = {
    "timeout_s": TIMEOUT_S,
    "memory_mb": MEMORY_MB,
    "concurrency": CONCURRENCY,
    "max_sandboxes": MAX_SANDBOXES,
    "idle_timeout_s": IDLE_TIMEOUT_S,
    "max_payload_bytes": MAX_PAYLOAD_BYTES,
    "max_result_bytes": MAX_RESULT_BYTES,
    "max_log_bytes": MAX_LOG_BYTES,
    "max_queue": MAX_QUEUE,
    "max_queue_wait_s": MAX_QUEUE_WAIT_S,
}


@dataclasses.dataclass(slots=True)
class FunctionSpec:
    """One immutable version of a deployed function."""

    name: str
    version: str
    namespace: str
    bundle: Bundle
    main: str = "main"
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    annotations: dict[str, Any] = dataclasses.field(default_factory=dict)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    timeout_s: float = TIMEOUT_S
    memory_mb: int = MEMORY_MB
    concurrency: int = CONCURRENCY
    max_sandboxes: int = MAX_SANDBOXES
    min_sandboxes: int = 0
    idle_timeout_s: float = IDLE_TIMEOUT_S
    max_payload_bytes: int = MAX_PAYLOAD_BYTES
    max_result_bytes: int = MAX_RESULT_BYTES
    max_log_bytes: int = MAX_LOG_BYTES
    max_queue: int = MAX_QUEUE
    max_queue_wait_s: float = MAX_QUEUE_WAIT_S
    style: Literal["openwhisk", "lambda"] = "openwhisk"
    #: the parameter whose value names a model (for model-affinity routing), e.g. "model_url"
    model_param: str | None = None
    #: model URLs to load into the zygote before forking this function's sandboxes
    models: tuple[str, ...] = ()
    #: preload set (zygote) this function's sandboxes fork from; None = the engine's default
    preload: tuple[str, ...] | None = None
    #: keep-alive policy name, None = the engine's
    keepalive: str | None = None
    #: folders put in front of the sandbox's sys.path: the site-packages of the function's requirements env
    sys_path: tuple[str, ...] = ()
    #: interpreter to spawn sandboxes with instead of forking the zygote (an env that shadows a host package)
    python: str | None = None
    created: int = 0
    #: False: the sandbox runs in a network namespace of its own, with no interface but its loopback
    network: bool = True
    #: Ray resources of each sandbox actor: num_cpus, num_gpus and custom resources (backend="ray")
    resources: dict[str, float] = dataclasses.field(default_factory=dict)
    #: where the Ray backend puts its actors: "pack" (fill a node first) or "spread" (over the nodes)
    placement: str = "pack"
    #: "sandbox": namespaces, an unprivileged uid, a read-only view, seccomp (see minifaas_sandbox.isolation)
    isolation: Literal["process", "sandbox"] = "process"
    #: host folders bound into a sandbox's view, read-only and writable
    read_paths: tuple[str, ...] = ()
    write_paths: tuple[str, ...] = ()
    #: what a sandbox's view must not show: the engine's state (records, bundles, environments)
    hidden_paths: tuple[str, ...] = ()
    #: what it shows read-only besides the grants: its own bundle, environment and the model store
    own_paths: tuple[str, ...] = ()
    #: parameters a caller may not replace: the manifest's models and their digests
    final_params: tuple[str, ...] = ()
    #: the only origins (scheme://host[:port]) the host fetches model URLs from for it; None: any (a sandbox's
    #: still refused private and loopback addresses)
    model_url_allow: tuple[str, ...] | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}@{self.version}"

    def init_fields(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "namespace": self.namespace,
            "main": self.main,
            "source": self.bundle.source,
            # the folders granted at deploy, for a function to check paths it is given against (functions/_lib's
            # image_input); set whatever the function's own env says
            "env": {
                **self.env,
                GRANTS_ENV[0]: os.pathsep.join(self.read_paths),
                GRANTS_ENV[1]: os.pathsep.join(self.write_paths),
            },
            "concurrency": self.concurrency,
            "memory_mb": self.memory_mb,
            "max_result_bytes": self.max_result_bytes,
            "max_log_bytes": self.max_log_bytes,
            "style": self.style,
            "sys_path": list(self.sys_path),
            "network": self.network,
            # the runtime ends a module-level import that outlives it with its logs (the host kills it later)
            "timeout_ms": int(self.timeout_s * 1000),
            "isolation": self.sandbox_view() if self.isolation == "sandbox" else None,
        }

    def sandbox_view(self) -> dict[str, Any]:
        """The INIT field that makes the runtime shut itself in (None in INIT: an unconfined process)."""
        return {
            "ro": [*self.own_paths, *self.read_paths],
            "rw": list(self.write_paths),
            "hide": list(self.hidden_paths),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "namespace": self.namespace,
            "main": self.main,
            "origin": self.bundle.origin,
            "digest": self.bundle.digest,
            "params": dict(self.params),
            "annotations": dict(self.annotations),
            "limits": {
                "timeout_s": self.timeout_s,
                "memory_mb": self.memory_mb,
                "concurrency": self.concurrency,
                "max_sandboxes": self.max_sandboxes,
                "min_sandboxes": self.min_sandboxes,
                "idle_timeout_s": self.idle_timeout_s,
                "max_payload_bytes": self.max_payload_bytes,
                "max_result_bytes": self.max_result_bytes,
                "max_log_bytes": self.max_log_bytes,
                "max_queue_wait_s": self.max_queue_wait_s,
            },
            "style": self.style,
            "sys_path": list(self.sys_path),
            "python": self.python,
            "network": self.network,
            "resources": dict(self.resources),
            "placement": self.placement,
            "isolation": self.isolation,
            "read_paths": list(self.read_paths),
            "write_paths": list(self.write_paths),
            "model_url_allow": None if self.model_url_allow is None else list(self.model_url_allow),
            "created": self.created,
        }
