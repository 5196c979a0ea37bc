"""minifaas_sandbox: the code that runs inside a minifaas sandbox process.

It imports nothing from the host package ``minifaas``. Function authors use :mod:`minifaas_sandbox.models` for the
warm model cache; the runtime (:mod:`minifaas_sandbox.runtime`) and the wire format
(:mod:`minifaas_sandbox.protocol`) are internal.
"""

from __future__ import annotations

from typing import Any

__all__ = ("host_call",)

#: set by the runtime inside a sandbox: call a host service (e.g. "model.fetch") and wait for its reply
_host_call: Any = None
#: model bytes loaded into the zygote before forking, shared copy-on-write with forked sandboxes (path -> bytes)
_preloaded_models: dict[str, bytes] = {}


def host_call(method: str, args: dict[str, Any]) -> Any:
    """Ask the host for a service; raises RuntimeError outside a sandbox or when the host reports an error."""
    if _host_call is None:
        raise RuntimeError("not running inside a minifaas sandbox")
    return _host_call(method, args)
