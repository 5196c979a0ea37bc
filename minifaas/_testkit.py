"""The sandboxed runner behind ``minifaas.testing.call``: a real engine, private to the test process.

A call is a deployed call: the kit deploys the function into an :class:`~minifaas.SyncEngine` that runs on an
event loop in a background thread (so plain and async tests can both call it), and invokes it there. Everything a
deployment enforces applies because it is a deployment: the wire encoding and its limits, the bundle's folder and
env, one sandbox process per function version (modules isolated), the timeout, the memory limit, output written
to fd 1/2, ``network=False`` and the Lambda environment.

Deployments are keyed by content: the bundle's digest plus every deploy option. The same key runs on the version
deployed first (a warm sandbox, as in production); an edited file or other options make a new version.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Final

from ._core.activation import Activation
from ._deploy.bundle import load_bundle
from ._sync import SyncEngine

__all__ = ("close", "run_deployed")

#: the kit's engine keeps this many sandboxes at most; an idle one of an older key makes room for a new one
KIT_MAX_SANDBOXES: Final = 16

_lock = threading.Lock()
_engine: SyncEngine | None = None
_stage_dir: Path | None = None
#: (name, content-and-options key) -> deployed version
_versions: dict[tuple[str, str], str] = {}


def _kit() -> tuple[SyncEngine, Path]:
    global _engine, _stage_dir
    if _engine is None or _stage_dir is None:
        _stage_dir = Path(tempfile.mkdtemp(prefix="minifaas-testkit-"))
        eng = SyncEngine(max_sandboxes=KIT_MAX_SANDBOXES)
        eng.__enter__()
        _engine = eng
        atexit.register(close)
    return _engine, _stage_dir


def close() -> None:
    """Stop the kit's engine and its sandboxes and remove its staging folder (also done at exit); the next call
    starts a new one."""
    global _engine, _stage_dir
    with _lock:
        eng, _engine = _engine, None
        stage, _stage_dir = _stage_dir, None
        _versions.clear()
    if eng is not None:
        eng.close()
    if stage is not None:
        shutil.rmtree(stage, ignore_errors=True)


def _content_key(digest: str, options: dict[str, Any]) -> str:
    blob = json.dumps([digest, options], sort_keys=True, default=repr).encode()
    return hashlib.sha256(blob).hexdigest()


def run_deployed(
    path: str | os.PathLike[str] | None,
    code: str | None,
    args: dict[str, Any],
    *,
    name: str,
    fresh: bool,
    options: dict[str, Any],
) -> Activation:
    """Deploy (unless this content with these options already is) and call; the Activation, whatever its status.

    Errors a deployment or a submission raises (DeployError, InvalidPayload, PayloadTooLarge) propagate.
    """
    with _lock:
        eng, stage = _kit()
        bundle = load_bundle(code=code, path=path, main=str(options.get("main", "main")), work_dir=stage)
        key = (name, _content_key(bundle.digest, options))
        version = None if fresh else _versions.get(key)
        if version is None:
            desc = eng.deploy(name, code=code, path=path, **options)
            version = _versions[key] = str(desc["version"])
    return eng.call(f"{name}@{version}", args)
