"""Testing helpers: call a function as a deployment would, and assert on activations.

``call(path_or_code, args)`` deploys the function into a private engine (one per test process, see
``minifaas._testkit``) and invokes it in a sandbox: what passes here passes deployed, because it is a deployment.
Pass ``in_process=True`` for pure logic at function-call speed: the same wire encoding, limits, folder, env and
module isolation, but no timeout, memory limit, fd 1/2 capture or network isolation (``minifaas._inprocess`` lists
what it skips; each of its activations says so under the annotation ``not_enforced``).
"""

from __future__ import annotations

import os
from typing import Any, Literal

from ._core.activation import Activation
from ._errors import ActivationError
from ._fakeclock import FakeClock
from ._inprocess import NOT_ENFORCED, run_in_process
from ._testkit import close, run_deployed

__all__ = ("NOT_ENFORCED", "FakeClock", "assert_status", "assert_success", "call", "close", "run")


def _is_path(target: str | os.PathLike[str]) -> bool:
    if isinstance(target, os.PathLike):
        return True
    if "\n" in target or "def " in target:
        return False
    return target.endswith((".py", ".zip")) or os.path.exists(target)


def run(
    path_or_code: str | os.PathLike[str],
    args: dict[str, Any] | None = None,
    *,
    params: dict[str, Any] | None = None,
    main: str = "main",
    name: str = "test",
    style: Literal["openwhisk", "lambda"] = "openwhisk",
    env: dict[str, str] | None = None,
    timeout_s: float | None = None,
    memory_mb: int | None = None,
    network: bool = True,
    max_payload_bytes: int | None = None,
    max_result_bytes: int | None = None,
    max_log_bytes: int | None = None,
    fresh: bool = False,
    in_process: bool = False,
) -> Activation:
    """Run the function and return its Activation (whatever the status), as ``Engine.call`` of a deployment would.

    The options are ``Engine.deploy``'s. The function stays loaded between calls of the same content and options
    (a warm sandbox) unless ``fresh=True``. Errors a deployment or a submission raises (DeployError for bad code,
    InvalidPayload, PayloadTooLarge for arguments) are raised here too.
    """
    is_path = _is_path(path_or_code)
    options: dict[str, Any] = {"main": main, "style": style, "network": network}
    given = {
        "params": params,
        "env": env,
        "timeout_s": timeout_s,
        "memory_mb": memory_mb,
        "max_payload_bytes": max_payload_bytes,
        "max_result_bytes": max_result_bytes,
        "max_log_bytes": max_log_bytes,
    }
    options.update({k: v for k, v in given.items() if v is not None})
    runner = run_in_process if in_process else run_deployed
    return runner(
        path_or_code if is_path else None,
        None if is_path else str(path_or_code),
        {} if args is None else args,
        name=name,
        fresh=fresh,
        options=options,
    )


def call(path_or_code: str | os.PathLike[str], args: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run the function (see :func:`run`); return its result, or raise ActivationError as ``Engine.invoke`` would."""
    act = run(path_or_code, args, **kwargs)
    if act.status != "success":
        raise ActivationError(act)
    return act.result


def _describe(act: Activation) -> str:
    logs = "\n".join(f"    {line}" for line in act.logs[-30:]) or "    (no logs)"
    return (
        f"activation {act.activation_id} of {act.name!r}: status {act.status}\n"
        f"  result: {act.result!r}\n  annotations: {act.annotations!r}\n  logs (last 30):\n{logs}"
    )


def assert_success(act: Activation) -> Activation:
    """Fail with the activation's result and logs unless it succeeded."""
    __tracebackhide__ = True
    if act.status != "success":
        raise AssertionError("expected success\n" + _describe(act))
    return act


def assert_status(act: Activation, status: str, *, error_contains: str | None = None) -> Activation:
    """Fail with a readable message unless the activation ended with ``status`` (and an error containing text)."""
    __tracebackhide__ = True
    if act.status != status:
        raise AssertionError(f"expected status {status!r}\n" + _describe(act))
    if error_contains is not None:
        err = str(act.result.get("error", ""))
        if error_contains not in err:
            raise AssertionError(f"expected an error containing {error_contains!r}\n" + _describe(act))
    return act
