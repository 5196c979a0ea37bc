"""The in-process runner behind ``minifaas.testing.call(..., in_process=True)``: pure logic at function-call speed.

What it keeps of a deployment: the bundle validation, default params merged under the call's, arguments and result
through the wire encoding (msgpack: a tuple arrives as a list, a set or a datetime is refused) and its limits
(payload, result and log sizes, with the same errors), the bundle's folder as working directory, the function's
``env`` and the Lambda variables while it runs, its own modules per bundle (two bundles each with a ``helper.py`` get
their own), the ``__OW_*`` variables, captured prints, and a cache keyed by the bundle's content and options.

What it cannot do inside the caller's process, and so skips (each activation lists it under the annotation
``not_enforced``): the timeout (a call runs to its end), the memory limit, output written to fd 1/2 directly (the
sandbox's pipes; here it goes to the test's own output), the scrubbed host environment, and network isolation
(``network=False`` is refused rather than ignored).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from minifaas_sandbox import protocol as p
from minifaas_sandbox import runtime as _rt

from ._core.activation import Activation, new_activation_id, now_ms
from ._core.function import MAX_LOG_BYTES, MAX_PAYLOAD_BYTES, MAX_RESULT_BYTES, MEMORY_MB, TIMEOUT_S
from ._core.scheduler import validate_args
from ._deploy.bundle import Bundle, load_bundle
from ._errors import DeployError, InvalidPayload, PayloadTooLarge

__all__ = ("NOT_ENFORCED", "run_in_process")

#: what an in-process call does not enforce, as its activations' ``not_enforced`` annotation says
NOT_ENFORCED: Final = (
    "timeout",
    "memory limit",
    "output written to fd 1/2",
    "scrubbed host environment",
    "network isolation",
)
_OW_VARS: Final = (
    "__OW_ACTIVATION_ID",
    "__OW_DEADLINE",
    "__OW_ACTION_NAME",
    "__OW_ACTION_VERSION",
    "__OW_NAMESPACE",
)
_work_dir: Path | None = None


@dataclass
class _Loaded:
    rt: _rt.Runtime
    bundle: Bundle
    fields: dict[str, Any]
    #: the bundle's folder (working directory, first on sys.path); None for code and single files
    folder: str | None
    #: the modules imported from the bundle's folder, kept out of sys.modules between its calls
    modules: dict[str, types.ModuleType] = field(default_factory=dict)


_loaded: dict[tuple[Any, ...], _Loaded] = {}


def _staging_dir() -> Path:
    global _work_dir
    if _work_dir is None:
        _work_dir = Path(tempfile.mkdtemp(prefix="minifaas-testing-"))
        atexit.register(shutil.rmtree, _work_dir, ignore_errors=True)  # the process's staged bundles go with it
    return _work_dir


def _in_folder(module: types.ModuleType, folder: str) -> bool:
    f = getattr(module, "__file__", None)
    return isinstance(f, str) and os.path.abspath(f).startswith(folder + os.sep)


@contextlib.contextmanager
def _as_deployed(loaded: _Loaded) -> Iterator[None]:
    """While the function runs: its folder, env, modules and captured output; all restored afterwards."""
    rt, fields, folder = loaded.rt, loaded.fields, loaded.folder
    env: dict[str, str] = {str(k): str(v) for k, v in (fields.get("env") or {}).items()}
    if fields.get("style") == "lambda":
        env = {**_rt._lambda_env(fields), **env}
    saved_env = {k: os.environ.get(k) for k in (*_OW_VARS, *env)}
    saved_path = list(sys.path)
    saved_main = sys.modules.pop(_rt.MODULE_NAME, None)
    saved_cwd = os.getcwd()
    saved_out, saved_err = sys.stdout, sys.stderr
    shadowed: dict[str, types.ModuleType] = {}
    if folder is not None:
        # another bundle's modules of the same name must not answer this bundle's imports
        for name, mod in list(sys.modules.items()):
            if name not in loaded.modules and name != _rt.MODULE_NAME and _bundle_module(mod):
                shadowed[name] = sys.modules.pop(name)
        sys.modules.update(loaded.modules)
        sys.path.insert(0, folder)
        os.chdir(folder)
    os.environ.update(env)
    sys.stdout = _rt._Capture("stdout", rt, saved_out)
    sys.stderr = _rt._Capture("stderr", rt, saved_err)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved_out, saved_err
        os.chdir(saved_cwd)
        sys.path[:] = saved_path
        if folder is not None:
            for name, mod in list(sys.modules.items()):
                if _in_folder(mod, folder):
                    loaded.modules[name] = sys.modules.pop(name)
            sys.modules.update(shadowed)
        sys.modules.pop(_rt.MODULE_NAME, None)
        if saved_main is not None:
            sys.modules[_rt.MODULE_NAME] = saved_main
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _bundle_module(mod: types.ModuleType) -> bool:
    """A module loaded from some bundle staged by this runner (not a library)."""
    f = getattr(mod, "__file__", None)
    return _work_dir is not None and isinstance(f, str) and os.path.abspath(f).startswith(str(_work_dir) + os.sep)


def _wire(name: str, args: dict[str, Any], params: dict[str, Any], max_bytes: int) -> dict[str, Any]:
    """The arguments as the sandbox receives them: checked, merged over the params, msgpack-encoded and decoded,
    within the payload limit (the same checks and errors as ``Scheduler.submit``)."""
    validate_args(args)
    value = {**params, **args}
    try:
        packed = p.encode_body(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidPayload(f"arguments cannot be encoded: {exc}") from None
    if len(packed) > max_bytes:
        raise PayloadTooLarge(f"arguments of {name} are {len(packed)} bytes, over the {max_bytes} byte limit")
    decoded: dict[str, Any] = p.decode_body(packed)
    return decoded


def _result_through_wire(out: dict[str, Any], fields: dict[str, Any]) -> None:
    """Apply the sandbox's result checks (runtime.run) and hand the result over as the host decodes it."""
    max_result = int(fields.get("max_result_bytes") or _rt.DEFAULT_MAX_RESULT_BYTES)
    error = ""
    try:
        packed = p.encode_body(out["result"])
        if len(packed) > max_result:
            error = "The action produced a response that exceeded the allowed length: "
            error += f"{len(packed)} > {max_result} bytes."
        else:
            out["result"] = p.decode_body(packed)
    except (TypeError, ValueError, OverflowError) as exc:
        error = f"The action returned a result that cannot be serialized: {exc}"
    if error:
        out["status"] = "developer_error"
        out["result"] = {"error": error}


def run_in_process(
    path: str | os.PathLike[str] | None,
    code: str | None,
    args: dict[str, Any],
    *,
    name: str,
    fresh: bool,
    options: dict[str, Any],
) -> Activation:
    """Run the function in this process under the contract above; the Activation, whatever its status."""
    if options.get("network") is False:
        raise DeployError("network=False needs a sandbox (a network namespace of its own): drop in_process=True")
    main = str(options.get("main", "main"))
    style = str(options.get("style", "openwhisk"))
    bundle = load_bundle(code=code, path=path, main=main, work_dir=_staging_dir())
    env = {str(k): str(v) for k, v in (options.get("env") or {}).items()}
    memory_mb = int(options.get("memory_mb") or MEMORY_MB)
    timeout_s = float(options.get("timeout_s") or TIMEOUT_S)
    fields: dict[str, Any] = {
        "name": name,
        "version": "1",
        "namespace": "guest",
        "main": main,
        "source": bundle.source,
        "env": env,
        "concurrency": 1,
        "memory_mb": memory_mb,
        "max_result_bytes": int(options.get("max_result_bytes") or MAX_RESULT_BYTES),
        "max_log_bytes": int(options.get("max_log_bytes") or MAX_LOG_BYTES),
        "style": style,
    }
    key = (bundle.digest, name, main, style, tuple(sorted(env.items())), memory_mb, fields["max_result_bytes"])
    loaded = None if fresh else _loaded.get(key)
    start = now_ms()
    annotations: dict[str, Any] = {"in_process": True, "not_enforced": list(NOT_ENFORCED)}
    if loaded is None:
        source = bundle.source
        folder = os.path.dirname(str(source["path"])) if source.get("kind") in ("file", "dir") else None
        loaded = _Loaded(_rt.Runtime(None), bundle, fields, folder)
        with _as_deployed(loaded):
            reply = loaded.rt.init(fields, in_process=True)
        if not reply.get("ok"):
            act = Activation(
                new_activation_id(),
                name,
                "1",
                start=start,
                end=start,
                duration=0,
                status="developer_error",
                result={"error": f"The action failed to initialize: {reply.get('error')}"},
                logs=list(reply.get("logs") or []),
                annotations=annotations,
            )
            return act
        _loaded[key] = loaded
    merged = _wire(
        name,
        args,
        {**bundle.params, **(options.get("params") or {})},
        int(options.get("max_payload_bytes") or MAX_PAYLOAD_BYTES),
    )
    aid = new_activation_id()
    start = now_ms()
    with _as_deployed(loaded):
        out = loaded.rt.execute({"aid": aid, "args": merged, "deadline": start + int(timeout_s * 1000), "version": "1"})
    _result_through_wire(out, fields)
    end = now_ms()
    result = out["result"] if isinstance(out["result"], dict) else {}
    return Activation(
        aid,
        name,
        "1",
        start=start,
        end=end,
        duration=end - start,
        status=out["status"],
        result=result,
        logs=list(out["logs"]),
        annotations={**out["annotations"], **annotations},
    )
