"""AWS Lambda-style handlers (``style="lambda"``): ``handler(event, context)`` runs unchanged in sandboxes."""

from __future__ import annotations

import json
import textwrap
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import minifaas
from minifaas import testing
from minifaas.testing import assert_status, assert_success

pytestmark = pytest.mark.anyio

#: the smallest preload keeps sandbox starts fast (the zygote would otherwise import numpy, OpenCV, LiteRT)
PRELOAD = ("minifaas_sandbox.runtime",)
TIMEOUT_S = 2.0
MEMORY_MB = 192
SLEEP_S = 0.3
#: sleeping SLEEP_S must take that much off the remaining time, give or take scheduling noise
SLEEP_TOLERANCE_MS = 150

# A function as written for AWS Lambda behind API Gateway, not a line changed.
API_GATEWAY = textwrap.dedent(
    """
    import json
    import os

    def lambda_handler(event, context):
        params = event.get("queryStringParameters") or {}
        name = params.get("name", "world")
        print(f"request {context.aws_request_id} for {name}")
        return {
            "statusCode": 200,
            "headers": {"Content-Type": "application/json"},
            "body": json.dumps({
                "message": f"hello {name}",
                "method": event["httpMethod"],
                "function": context.function_name,
                "env_function": os.environ.get("AWS_LAMBDA_FUNCTION_NAME"),
                "env_memory": os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE"),
            }),
        }
    """
)

CONTEXT = textwrap.dedent(
    """
    FIELDS = ("aws_request_id", "function_name", "function_version", "memory_limit_in_mb",
              "invoked_function_arn", "log_group_name", "log_stream_name", "identity", "client_context")

    def handler(event, context):
        out = {f: getattr(context, f) for f in FIELDS}
        out["remaining_ms"] = context.get_remaining_time_in_millis()
        out["event"] = event
        return out
    """
)

COUNTDOWN = textwrap.dedent(
    """
    import time

    def handler(event, context):
        before = context.get_remaining_time_in_millis()
        time.sleep(event["sleep_s"])
        return {"before": before, "after": context.get_remaining_time_in_millis()}
    """
)

# A batch job that stops before the deadline, the way Lambda functions use the remaining time.
DEADLINE_AWARE = textwrap.dedent(
    """
    import time

    def handler(event, context):
        done = 0
        while context.get_remaining_time_in_millis() > event["margin_ms"]:
            time.sleep(0.01)
            done += 1
        return {"done": done, "left_ms": context.get_remaining_time_in_millis()}
    """
)


@pytest.fixture(scope="module")
async def minifaas_engine() -> AsyncIterator[minifaas.Engine]:
    async with minifaas.Engine(preload=PRELOAD) as eng:
        yield eng


async def deploy_lambda(engine: minifaas.Engine, name: str, code: str, **options: Any) -> dict[str, Any]:
    options.setdefault("main", "handler")
    return await engine.deploy(name, code=code, style="lambda", **options)


async def test_api_gateway_handler_runs_unchanged(minifaas_engine: minifaas.Engine) -> None:
    await deploy_lambda(minifaas_engine, "api", API_GATEWAY, main="lambda_handler", memory_mb=MEMORY_MB)
    event = {"httpMethod": "GET", "path": "/hello", "queryStringParameters": {"name": "Ada"}, "body": None}
    act = await minifaas_engine.call("api", event)
    assert_success(act)
    assert act.result["statusCode"] == 200
    assert act.result["headers"] == {"Content-Type": "application/json"}
    assert json.loads(act.result["body"]) == {
        "message": "hello Ada",
        "method": "GET",
        "function": "api",
        "env_function": "api",
        "env_memory": str(MEMORY_MB),
    }
    assert len(act.logs) == 1 and act.logs[0].endswith(f"stdout: request {act.activation_id} for Ada")
    default = await minifaas_engine.invoke("api", {"httpMethod": "POST", "queryStringParameters": None})
    assert json.loads(default["body"])["message"] == "hello world"


async def test_context_fields(minifaas_engine: minifaas.Engine) -> None:
    await deploy_lambda(
        minifaas_engine, "ctx", CONTEXT, memory_mb=MEMORY_MB, timeout_s=TIMEOUT_S, params={"stage": "test"}
    )
    first = await minifaas_engine.call("ctx", {"a": 1})
    second = await minifaas_engine.call("ctx", {"a": 2})
    for act, a in ((first, 1), (second, 2)):
        assert_success(act)
        r = act.result
        assert r["aws_request_id"] == act.activation_id == r["log_stream_name"]
        assert r["function_name"] == "ctx" and r["function_version"] == "1"
        assert r["memory_limit_in_mb"] == MEMORY_MB
        assert r["invoked_function_arn"].endswith(":function:ctx:1")
        assert r["log_group_name"] == "/minifaas/ctx"
        assert r["identity"] is None and r["client_context"] is None
        assert 0 < r["remaining_ms"] <= TIMEOUT_S * 1000
        # the event is the invocation's arguments over the deployed default params
        assert r["event"] == {"stage": "test", "a": a}
    assert first.result["aws_request_id"] != second.result["aws_request_id"]
    # the version a context reports is the version that ran, pinned or through an alias
    await deploy_lambda(minifaas_engine, "ctx", CONTEXT, memory_mb=MEMORY_MB, timeout_s=TIMEOUT_S)
    assert (await minifaas_engine.invoke("ctx"))["function_version"] == "2"
    assert (await minifaas_engine.invoke("ctx@1"))["function_version"] == "1"
    await minifaas_engine.set_alias("ctx", "prod", "1")
    act = await minifaas_engine.call("ctx@prod")
    assert act.result["function_version"] == act.version == "1"


async def test_remaining_time_counts_down(minifaas_engine: minifaas.Engine) -> None:
    await deploy_lambda(minifaas_engine, "countdown", COUNTDOWN, timeout_s=TIMEOUT_S)
    await minifaas_engine.invoke("countdown", {"sleep_s": 0})  # warm: the cold start is not what is measured
    out = await minifaas_engine.invoke("countdown", {"sleep_s": SLEEP_S})
    assert TIMEOUT_S * 1000 - 500 < out["before"] <= TIMEOUT_S * 1000
    assert abs(out["before"] - out["after"] - SLEEP_S * 1000) < SLEEP_TOLERANCE_MS


async def test_handler_stops_before_its_deadline(minifaas_engine: minifaas.Engine) -> None:
    await deploy_lambda(minifaas_engine, "batch", DEADLINE_AWARE, timeout_s=1.0)
    t0 = time.perf_counter()
    act = await minifaas_engine.call("batch", {"margin_ms": 300})
    elapsed = time.perf_counter() - t0
    assert_success(act)
    assert act.result["done"] > 0 and 0 < act.result["left_ms"] <= 300
    # it ended on its own, before the 1 s timeout would have killed it (the 0.5 s is for the cold start)
    assert elapsed < 1.0 + 0.5


async def test_exception_is_an_application_error_with_lambda_fields(minifaas_engine: minifaas.Engine) -> None:
    code = "def handler(event, context):\n    raise ValueError(f\"bad input: {event['x']}\")\n"
    await deploy_lambda(minifaas_engine, "fails", code)
    act = await minifaas_engine.call("fails", {"x": 7})
    assert_status(act, "application_error")
    assert act.result["error"] == "bad input: 7"
    assert act.result["errorMessage"] == "bad input: 7" and act.result["errorType"] == "ValueError"
    assert any("Traceback" in line for line in act.logs)
    with pytest.raises(minifaas.ActivationError, match="bad input: 7"):
        await minifaas_engine.invoke("fails", {"x": 7})


@pytest.mark.parametrize(
    ("returned", "expected"),
    [("None", None), ("'done'", "done"), ("[1, 2]", [1, 2]), ("42", 42)],
    ids=["none", "str", "list", "int"],
)
async def test_any_json_return_value(minifaas_engine: minifaas.Engine, returned: str, expected: Any) -> None:
    # event processors (S3, SQS) return None and scripts return strings: AWS accepts any JSON value
    await deploy_lambda(minifaas_engine, "anyret", f"def handler(event, context):\n    return {returned}\n")
    assert await minifaas_engine.invoke("anyret") == {"result": expected}
    await minifaas_engine.delete("anyret")


async def test_an_error_key_is_just_data(minifaas_engine: minifaas.Engine) -> None:
    # OpenWhisk reads {"error": ...} as a failure; a Lambda invocation fails only by raising
    code = "def handler(event, context):\n    return {'statusCode': 400, 'error': 'missing name'}\n"
    await deploy_lambda(minifaas_engine, "errkey", code)
    act = await minifaas_engine.call("errkey")
    assert_success(act)
    assert act.result == {"statusCode": 400, "error": "missing name"}


async def test_openwhisk_style_still_requires_a_dict(minifaas_engine: minifaas.Engine) -> None:
    await minifaas_engine.deploy("ow", code="def main(args):\n    return None\n")
    act = await minifaas_engine.call("ow")
    assert_status(act, "developer_error")
    assert "did not return a dictionary" in act.result["error"]


async def test_lambda_handler_errors_at_deploy_and_call(minifaas_engine: minifaas.Engine) -> None:
    with pytest.raises(minifaas.DeployError, match="no top-level function 'lambda_handler'"):
        await deploy_lambda(
            minifaas_engine, "nohandler", "def handler(event, context):\n    return {}\n", main="lambda_handler"
        )
    with pytest.raises(minifaas.DeployError, match="invalid style"):
        await minifaas_engine.deploy("badstyle", code="def main(args):\n    return {}\n", style="aws")  # type: ignore[arg-type]
    # an OpenWhisk-style function deployed as lambda gets two arguments and says so
    await deploy_lambda(minifaas_engine, "onearg", "def handler(event):\n    return {}\n")
    act = await minifaas_engine.call("onearg")
    assert_status(act, "application_error")
    assert act.result["errorType"] == "TypeError" and "positional argument" in act.result["error"]


def test_in_process_runner_passes_a_context() -> None:
    act = testing.run(CONTEXT, {"a": 1}, main="handler", name="local", style="lambda", fresh=True)
    assert act.status == "success"
    assert act.result["function_name"] == "local" and act.result["aws_request_id"] == act.activation_id
    assert act.result["event"] == {"a": 1} and act.result["remaining_ms"] > 0
