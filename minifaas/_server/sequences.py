"""Sequence actions over REST: ``PUT actions/x`` with ``exec: {kind: "sequence", components: [...]}``.

The components are fully qualified names (``/_/a``, ``/guest/pkg/b``, ``/whisk.system/utils/echo``) as
OpenWhisk's clients send them; they are kept as the engine's names and shown fully qualified again. The engine
runs a sequence (``Engine.deploy_sequence``); its body is saved like an action's so that a server on the same
state dir deploys it again (after the actions it names).
"""

from __future__ import annotations

import json
from typing import Any, Final

from .names import BadName, engine_name, entity_path, fully_qualified

__all__ = ("SEQUENCE_KIND", "components_of", "is_sequence", "parse_components", "sequence_json")

SEQUENCE_KIND: Final = "sequence"
#: OpenWhisk shows a sequence's limits as an action's defaults (its components have their own)
SEQUENCE_LIMITS: Final = {"timeout": 60000, "memory": 256, "logs": 10, "concurrency": 1}


def is_sequence(exec_: object) -> bool:
    return isinstance(exec_, dict) and exec_.get("kind") == SEQUENCE_KIND


def parse_components(exec_: dict[str, Any], namespace: str) -> str:
    """``exec.components`` as the engine names them, JSON-encoded (the body's ``code``); ValueError if malformed."""
    comps = exec_.get("components")
    if not isinstance(comps, list) or not comps:
        raise ValueError("No component specified for the sequence.")
    out: list[str] = []
    for c in comps:
        if not isinstance(c, str) or not c:
            raise ValueError(f"sequence components must be names, got {c!r}")
        try:
            out.append(engine_name(c, namespace))
        except BadName as exc:
            raise ValueError(f"sequence component {exc}") from None
    return json.dumps(out)


def components_of(code: str) -> list[str]:
    """The engine names a saved sequence body holds."""
    comps = json.loads(code)
    if not isinstance(comps, list) or not all(isinstance(c, str) for c in comps):
        raise ValueError(f"not a list of component names: {code[:80]!r}")
    return comps


def sequence_json(
    info: dict[str, Any], namespace: str, *, version: str, parameters: list[dict[str, Any]], updated: int
) -> dict[str, Any]:
    """A sequence as OpenWhisk shows it: ``exec.components`` fully qualified, ``exec`` annotation ``sequence``."""
    path, name = entity_path(str(info["name"]), namespace)
    annotations = {**info.get("annotations", {}), "exec": SEQUENCE_KIND}
    return {
        "namespace": path,
        "name": name,
        "version": version,
        "publish": False,
        "exec": {"kind": SEQUENCE_KIND, "components": [fully_qualified(c, namespace) for c in info["components"]]},
        "annotations": [{"key": k, "value": v} for k, v in annotations.items()],
        "parameters": parameters,
        "limits": dict(SEQUENCE_LIMITS),
        "updated": updated,
    }
