"""Compositions: combinator semantics, error handling, concurrency, traces, IR, sessions.

Action steps run in real sandboxes of a module-scoped Engine; pure-logic combinators (function, literal, let,
mask ...) run in the host and need no sandbox.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import minifaas
from minifaas import composer as c
from minifaas._core.activation import Activation, new_activation_id
from minifaas._workflows.conductor import (
    TRACE_MAX_BYTES,
    call_composition,
    run_session,
)
from minifaas._workflows.sessions import Session, SessionStore, Step

pytestmark = pytest.mark.anyio

INC = "def main(args):\n    return {**args, 'n': args.get('n', 0) + 1}\n"
FAIL = "def main(args):\n    return {'error': 'boom', 'detail': 1}\n"
CRASH = "def main(args):\n    raise ValueError('kaput')\n"
SLEEP = (
    "import time\n"
    "def main(args):\n"
    "    time.sleep(args.get('s', 0.4))\n"
    "    return {'i': args.get('i'), 'value': args.get('value')}\n"
)
FLAKY = (
    "import os\n"
    "def main(args):\n"
    "    path = args['counter']\n"
    "    n = int(open(path).read()) if os.path.exists(path) else 0\n"
    "    with open(path, 'w') as f:\n"
    "        f.write(str(n + 1))\n"
    "    if n < args['fail_times']:\n"
    "        return {'error': f'attempt {n} failed'}\n"
    "    return {'attempts': n + 1}\n"
)
NAP_S = 0.4
PARALLEL_BRANCHES = 3


@pytest.fixture(scope="module")
async def minifaas_engine() -> AsyncIterator[minifaas.Engine]:
    """One engine for the module (overrides the plugin's), with the actions the compositions call."""
    async with minifaas.Engine() as e:
        await e.deploy("inc", code=INC)
        await e.deploy("fail", code=FAIL)
        await e.deploy("crash", code=CRASH)
        await e.deploy("nap", code=SLEEP, max_sandboxes=4)
        await e.deploy("flaky", code=FLAKY)
        yield e


async def run(
    engine: minifaas.Engine | None, comp: c.Composition, args: dict[str, Any], *, max_steps: int = 50
) -> Session:
    """One session; without an engine, any action step fails the test."""

    async def invoke(name: str, params: dict[str, Any], cause: str) -> Activation:
        assert engine is not None, f"pure-logic test invoked action {name!r}"
        return await engine.call(name, params, cause=cause)

    async def submit(name: str, params: dict[str, Any], cause: str) -> str:
        assert engine is not None, f"pure-logic test submitted action {name!r}"
        return await engine.submit(name, params, cause=cause)

    return await run_session(
        comp,
        args,
        invoke=invoke,
        submit=submit,
        session_id=new_activation_id(),
        max_steps=max_steps,
        name="t",
    )


# ------------------------------------------------------------------------------------------------ helpers
# module-level functions are importable by reference, so compositions using them survive a JSON round trip


def is_even(p: dict[str, Any]) -> bool:
    return bool(p["n"] % 2 == 0)


def halve(p: dict[str, Any]) -> None:
    p["n"] //= 2


def set_flag(p: dict[str, Any]) -> None:
    p["value"] = p["n"] % 2 == 0


def count_down(p: dict[str, Any], env: dict[str, Any]) -> bool:
    env["n"] -= 1
    return bool(env["n"] >= 0)


def bump(p: dict[str, Any], env: dict[str, Any]) -> None:
    env["n"] += 1


def read_n(p: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    return {"value": env["n"]}


def loop(n: int, body: c.Task) -> c.Composition:
    """Composer's example template: a counted loop whose own variable is hidden from the body by mask."""
    return c.let({"n": n}, c.while_(count_down, c.mask(body)))


def raiser(p: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("no good")


async def async_double(p: dict[str, Any]) -> dict[str, Any]:
    await anyio.sleep(0)
    return {"n": p["n"] * 2}


# ------------------------------------------------------------------------------------------------ pure logic

PURE_CASES = [
    ("function", c.function(lambda p: {"y": p["x"] * 2}), {"x": 21}, {"y": 42}),
    ("function-none-returns-input", c.function(halve), {"n": 10}, {"n": 5}),
    ("function-scalar-wrapped", c.function(lambda p: 7), {}, {"value": 7}),
    ("function-no-args", c.function(lambda: {"k": 1}), {"x": 1}, {"k": 1}),
    ("async-function", c.function(async_double), {"n": 4}, {"n": 8}),
    ("literal-dict", c.literal({"a": [1, 2]}), {"x": 1}, {"a": [1, 2]}),
    ("literal-scalar", c.value("hi"), {}, {"value": "hi"}),
    ("empty", c.empty(), {"x": 1}, {"x": 1}),
    ("sequence-empty", c.sequence(), {"x": 1}, {"x": 1}),
    ("sequence", c.sequence(lambda p: {"n": 1}, lambda p: {"n": p["n"] + 1}), {}, {"n": 2}),
    ("if-true", c.if_(is_even, c.literal({"r": "even"}), c.literal({"r": "odd"})), {"n": 2}, {"r": "even"}),
    ("if-false", c.when(is_even, c.literal({"r": "even"}), c.literal({"r": "odd"})), {"n": 3}, {"r": "odd"}),
    ("if-no-alternate", c.if_(is_even, halve), {"n": 3}, {"n": 3}),
    (
        "if-truthy-takes-then",  # openwhisk-composer's conductor: p.params.value ? then : else
        c.if_(lambda p: 1, c.literal({"r": "t"}), c.literal({"r": "f"})),
        {},
        {"r": "t"},
    ),
    ("if-branch-sees-input", c.if_(lambda p: {"value": True, "junk": 1}, c.empty()), {"n": 1}, {"n": 1}),
    ("if_nosave", c.if_nosave(set_flag, halve), {"n": 28}, {"n": 14, "value": True}),
    ("while", c.while_(is_even, halve), {"n": 28}, {"n": 7}),
    ("while_nosave", c.while_nosave(set_flag, halve), {"n": 28}, {"n": 7, "value": False}),
    ("dowhile-runs-once", c.dowhile(halve, lambda p: False), {"n": 28}, {"n": 14}),
    ("dowhile", c.dowhile(halve, is_even), {"n": 28}, {"n": 7}),
    ("dowhile_nosave", c.dowhile_nosave(halve, set_flag), {"n": 28}, {"n": 7, "value": False}),
    ("repeat", c.repeat(3, lambda p: {"n": p["n"] + 1}), {"n": 0}, {"n": 3}),
    ("repeat-zero", c.repeat(0, raiser), {"n": 0}, {"n": 0}),
    ("let", c.let({"n": 5}, read_n), {}, {"value": 5}),
    ("let-mutation", c.let({"n": 0}, bump, bump, read_n), {}, {"value": 2}),
    ("let-fresh-each-entry", c.repeat(3, c.let({"n": 0}, bump, read_n)), {}, {"value": 1}),
    ("let-innermost-wins", c.let({"n": 1}, c.let({"n": 2}, read_n)), {}, {"value": 2}),
    ("mask", c.let({"n": 1}, c.let({"n": 2}, c.mask(read_n))), {}, {"value": 1}),
    # docs/COMBINATORS.md: composer.let({ n: 0 }, loop(3, loop(4, () => ++n))) returns { value: 12 }
    ("mask-loop-template", c.let({"n": 0}, loop(3, loop(4, bump)), read_n), {}, {"value": 12}),
    ("repeat-nested", c.let({"n": 0}, c.repeat(3, c.repeat(4, bump)), read_n), {}, {"value": 12}),
    ("retain", c.retain(lambda p: {"y": 1}), {"x": 1}, {"params": {"x": 1}, "result": {"y": 1}}),
    (
        "retain_catch",
        c.retain_catch(lambda p: {"error": "e", "y": 1}),
        {"x": 1},
        {"params": {"x": 1}, "result": {"error": "e"}},
    ),
    ("merge", c.merge(lambda p: {"y": p["x"] + 1, "x": 0}), {"x": 1, "z": 3}, {"x": 0, "y": 2, "z": 3}),
    ("try-no-error", c.try_(lambda p: {"ok": 1}, lambda p: {"handled": True}), {}, {"ok": 1}),
    (
        "try-handler-gets-error-only",
        c.try_(lambda p: {"error": "bad", "other": 1}, lambda p: {"got": p}),
        {},
        {"got": {"error": "bad"}},
    ),
    ("finally-on-success", c.finally_(lambda p: {"a": 1}, lambda p: {**p, "f": 1}), {}, {"a": 1, "f": 1}),
    ("finally-on-error", c.finally_(raiser, lambda p: {"f": "no good" in p["error"]}), {}, {"f": True}),
    (
        "parallel-pure",
        c.parallel(lambda p: {"a": p["x"]}, c.literal(2)),
        {"x": 1},
        {"value": [{"a": 1}, {"value": 2}]},
    ),
    (
        "map-pure",
        c.map(lambda p: {"sq": p["value"] ** 2}),
        {"value": [1, 2, 3]},
        {"value": [{"sq": 1}, {"sq": 4}, {"sq": 9}]},
    ),
    (
        "map-dict-items",
        c.map(lambda p: {"k": p["k"]}),
        {"value": [{"k": 1}], "other": 5},
        {"value": [{"k": 1}]},
    ),
    ("map-empty", c.map(raiser), {"value": []}, {"value": []}),
]


@pytest.mark.parametrize(("comp", "args", "expected"), [x[1:] for x in PURE_CASES], ids=[x[0] for x in PURE_CASES])
async def test_pure_combinators(comp: c.Composition, args: dict[str, Any], expected: dict[str, Any]) -> None:
    s = await run(None, comp, args)
    assert s.status == "success", s.result
    assert s.result == expected
    assert s.end is not None and s.duration is not None and s.end >= s.start


ERROR_CASES = [
    ("function-raises", c.function(raiser), "RuntimeError: no good"),
    ("function-returns-error", c.function(lambda p: {"error": "bad", "other": 1}), "bad"),
    ("function-not-json", c.function(lambda p: {"s": {1, 2}}), "not JSON"),
    ("undeclared-variable", c.let({"n": 0}, lambda p, env: env.update(m=1)), "undeclared variables ['m']"),
    ("error-skips-rest", c.sequence(raiser, lambda p: {"never": True}), "no good"),
    ("if-test-fails", c.if_(raiser, c.literal({"r": 1}), c.literal({"r": 2})), "no good"),
    ("while-body-fails", c.while_(lambda p: True, raiser), "no good"),
    ("handler-fails", c.try_(raiser, c.literal({"error": "again"})), "again"),
    ("handler-empty-rethrows", c.try_(raiser, c.empty()), "no good"),
    ("finally-passes-error", c.finally_(raiser, lambda p: None), "no good"),
    ("retain-keeps-error", c.retain(raiser), "no good"),
    ("merge-keeps-error", c.merge(raiser), "no good"),
    ("map-needs-list", c.map(lambda p: p), "needs a list"),
    ("dynamic-misuse", c.dynamic(), "Incorrect use of the dynamic combinator at AST node root"),
    ("literal-error", c.literal({"error": "lit", "x": 1}), "lit"),
]


@pytest.mark.parametrize(("comp", "needle"), [x[1:] for x in ERROR_CASES], ids=[x[0] for x in ERROR_CASES])
async def test_errors_end_the_session(comp: c.Composition, needle: str) -> None:
    s = await run(None, comp, {"value": 3})
    assert s.status == "application_error"
    assert list(s.result) == ["error"], "an error object is stripped to its error field"
    assert needle in s.result["error"]
    # every case but map's input check fails in a step, which the trace marks
    assert s.steps[-1].status == "application_error" if s.steps else comp.type == "map"


async def test_input_error_object_ends_session_at_once() -> None:
    s = await run(None, c.function(lambda p: {"ran": True}), {"error": "given", "x": 1})
    assert s.status == "application_error" and s.result == {"error": "given"}
    assert s.steps == []


async def test_error_jumps_to_nearest_handler_through_nesting() -> None:
    calls: list[str] = []

    def mark(tag: str) -> Any:
        def f(p: dict[str, Any]) -> dict[str, Any]:
            calls.append(tag)
            return p

        return f

    comp = c.sequence(
        mark("a"),
        c.try_(
            c.sequence(
                c.try_(c.sequence(mark("b"), raiser, mark("never1")), lambda p: {"inner": p["error"]}),
                c.if_(lambda p: True, c.let({"n": 0}, c.repeat(2, c.sequence(raiser, mark("never2"))))),
                mark("never3"),
            ),
            c.finally_(lambda p: {"outer": p["error"]}, mark("finalizer")),
        ),
        mark("after"),
    )
    s = await run(None, comp, {})
    assert s.status == "success"
    assert calls == ["a", "b", "finalizer", "after"]
    assert "no good" in s.result["outer"]
    paths = [st.path for st in s.steps]
    assert paths == [
        "[0]",
        "[1].body[0].body[0]",
        "[1].body[0].body[1]",
        "[1].body[0].handler",
        "[1].body[1].test",
        "[1].body[1].consequent[0][0][0]",
        "[1].handler.body",
        "[1].handler.finalizer",
        "[2]",
    ]


async def test_let_variables_are_copied_into_parallel_branches() -> None:
    comp = c.let(
        {"n": 10},
        c.parallel(c.sequence(bump, read_n), c.sequence(bump, bump, read_n), read_n),
        lambda p, env: {"branches": [b["value"] for b in p["value"]], "parent": env["n"]},
    )
    s = await run(None, comp, {})
    assert s.result == {"branches": [11, 12, 10], "parent": 10}


async def test_functions_get_a_private_copy_of_params() -> None:
    def mutate(p: dict[str, Any]) -> dict[str, Any]:
        p["x"].append(99)
        return {"mutated": True}

    s = await run(None, c.retain(mutate), {"x": [1]})
    assert s.result == {"params": {"x": [1]}, "result": {"mutated": True}}


async def test_paths_and_not_taken() -> None:
    comp = c.sequence(
        c.literal({"n": 1}),
        c.if_(is_even, "a", c.try_(lambda p: p, "handler")),
        c.while_(lambda p: False, "body"),
    )
    assert [n.path for n in comp.walk()] == [
        "",
        "[0]",
        "[1]",
        "[1].test",
        "[1].consequent",
        "[1].alternate",
        "[1].alternate.body",
        "[1].alternate.handler",
        "[2]",
        "[2].test",
        "[2].body",
    ]
    assert comp.find("[1].alternate.handler").name == "handler"
    s = await run(None, comp, {})
    assert s.status == "success"
    assert [st.path for st in s.steps] == ["[0]", "[1].test", "[1].alternate.body", "[2].test"]
    assert [st.kind for st in s.steps] == ["literal", "function", "function", "function"]
    assert sorted(s.not_taken) == ["[1].alternate.handler", "[1].consequent", "[2].body"]
    # a shared sub-composition gets the path of each place it is used
    shared = c.sequence("x")
    twice = c.parallel(shared, shared)
    assert [n.path for n in twice.walk()] == ["", "[0]", "[0][0]", "[1]", "[1][0]"]
    assert shared.components[0].path == "[0]"


async def echo_invoke(name: str, params: dict[str, Any], cause: str) -> Activation:
    """The engine's invoke interface, answering every action with its input plus one to ``n``."""
    result = {**params, "n": params.get("n", 0) + 1}
    return Activation(activation_id=new_activation_id(), name=name, status="success", result=result)


async def no_submit(name: str, params: dict[str, Any], cause: str) -> str:
    raise AssertionError("no async steps here")


async def run_echo(
    comp: c.Composition, args: dict[str, Any], *, max_steps: int = 50, conditions: str = "js"
) -> Session:
    return await run_session(
        comp,
        args,
        invoke=echo_invoke,
        submit=no_submit,
        session_id=new_activation_id(),
        max_steps=max_steps,
        conditions=conditions,
    )


async def test_step_limit_counts_component_activations_only() -> None:
    # 30 iterations: 30 actions and 31 host tests; OpenWhisk's limit (50) counts the 30 actions only
    s = await run_echo(c.while_(lambda p: p["n"] < 30, "inc"), {"n": 0}, max_steps=50)
    assert s.status == "success" and s.result["n"] == 30
    s = await run_echo(c.while_(lambda p: True, "inc"), {"n": 0}, max_steps=7)
    assert s.status == "application_error"
    assert "max_steps=7" in s.result["error"] and "step limit" in s.result["error"]
    assert len([st for st in s.steps if st.kind == "action"]) == 7
    # a try_ cannot swallow the limit
    s = await run_echo(c.try_(c.repeat(100, "inc"), lambda p: {"caught": True}), {}, max_steps=5)
    assert s.status == "application_error" and "max_steps=5" in s.result["error"]
    # host functions alone are bounded by the session limit, not the component one
    s = await run(None, c.repeat(60, lambda p: p), {}, max_steps=5)
    assert s.status == "success"
    s = await run(None, c.while_(lambda p: True, lambda p: p), {}, max_steps=5)
    assert s.status == "application_error" and "MAX_SESSION_STEPS" in s.result["error"]


async def test_step_limit_is_per_branch_in_map() -> None:
    # like OpenWhisk, where each map/parallel branch is a conductor activation with its own limit
    body = c.if_(lambda p: p["value"] == 2, c.repeat(10, "inc"), c.empty())
    s = await run_echo(c.map(body), {"value": [1, 2, 3]}, max_steps=5)
    assert s.status == "success"
    values = s.result["value"]
    assert values[0] == {"value": 1} and values[2] == {"value": 3}
    assert "max_steps=5" in values[1]["error"]


# openwhisk-composer's conductor.js: ``choice`` takes ``p.params.value ? then : else`` (JavaScript truthiness)
TRUTHINESS_CASES = [
    ("true", True, True, True),
    ("false", False, False, False),
    ("one", 1, True, False),
    ("zero", 0, False, False),
    ("half", 0.5, True, False),
    ("nan", float("nan"), False, False),
    ("string-no", "no", True, False),
    ("empty-string", "", False, False),
    ("empty-list", [], True, False),
    ("empty-object", {}, True, False),
    ("null", None, False, False),
]


@pytest.mark.parametrize(
    ("value", "js", "strict"), [x[1:] for x in TRUTHINESS_CASES], ids=[x[0] for x in TRUTHINESS_CASES]
)
async def test_conditions_follow_composer_truthiness_or_the_strict_flag(value: Any, js: bool, strict: bool) -> None:
    comp = c.if_(lambda p: {"value": value}, c.literal({"r": "then"}), c.literal({"r": "else"}))
    for conditions, expected in (("js", js), ("strict", strict)):
        s = await run_echo(comp, {}, conditions=conditions)
        assert s.result == {"r": "then" if expected else "else"}, conditions


async def test_while_on_a_counter_loops_as_in_composer() -> None:
    countdown = c.while_(lambda p: p["left"], lambda p: {"left": p["left"] - 1, "laps": p.get("laps", 0) + 1})
    assert (await run_echo(countdown, {"left": 3})).result == {"left": 0, "laps": 3}
    assert (await run_echo(countdown, {"left": 3}, conditions="strict")).result == {"left": 3}
    missing = c.if_(lambda p: {"other": 1}, c.literal({"r": "then"}), c.literal({"r": "else"}))
    assert (await run_echo(missing, {})).result == {"r": "else"}  # no value: undefined, false


async def test_nested_compositions_share_the_step_budget_and_cannot_recurse_for_ever() -> None:
    from minifaas._workflows.conductor import MAX_NESTING_DEPTH

    async with minifaas.Engine() as engine:
        await engine.deploy("inc", code=INC)
        await engine.deploy_composition("inner", c.repeat(4, "inc"), max_steps=5)
        await engine.deploy_composition("outer", c.sequence("inc", "inner"), max_steps=5)
        act = await engine.call("outer", {"n": 0})
        # outer: inc (1) + the call of inner (2) + inner's 4 incs = 6 component activations > 5
        assert act.status == "application_error" and "max_steps=5" in act.result["error"]
        await engine.deploy_composition("outer-ok", c.sequence("inner"), max_steps=5)
        assert (await engine.invoke("outer-ok", {"n": 0})) == {"n": 4}
        await engine.deploy_composition("rec", c.sequence(lambda p: {"d": p.get("d", 0) + 1}, "rec"), max_steps=1000)
        act = await engine.call("rec", {})
        assert act.status == "application_error"
        assert "MAX_NESTING_DEPTH" in act.result["error"] and "RecursionError" not in act.result["error"]
        deepest = max(
            (
                st.output.get("d", 0)
                for st_s in engine.sessions.list(limit=1000)
                for st in st_s.steps[:1]
                if isinstance(st.output, dict)
            ),
            default=0,
        )
        assert deepest == MAX_NESTING_DEPTH + 1


async def test_with_load_functions_false_only_display() -> None:
    data = c.sequence(c.function(halve)).to_json()
    comp = c.Composition.from_json(data, load_functions=False)
    assert comp.to_json() == data
    s = await run(None, comp, {"n": 2})
    assert s.status == "application_error" and "was not loaded" in s.result["error"]


# ------------------------------------------------------------------------------------------------ IR


async def test_ir_round_trip() -> None:
    comp = c.sequence(
        "inc",
        c.if_(is_even, c.while_(is_even, halve), c.try_("crop@1", c.literal({"error": None}))),
        c.let({"n": 2, "s": [1, "x"]}, c.repeat(2, c.mask(bump)), c.retry(3, "flaky")),
        c.retain("a"),
        c.retain_catch("b"),
        c.merge(c.function("test_compositions:read_n")),
        c.finally_(c.dowhile(halve, is_even), c.dowhile_nosave(halve, set_flag)),
        c.if_nosave(set_flag, c.empty()),
        c.while_nosave(set_flag, "x"),
        c.parallel("a", "b"),
        c.map("inc"),
        c.async_("inc"),
        c.dynamic(),
        c.value(3),
    )
    data = comp.to_json()
    assert set(data) == {"composition", "version", "actions"}
    assert data["actions"] == [{"name": n} for n in ("inc", "crop@1", "flaky", "a", "b", "x")]
    text = json.dumps(data)
    back = c.Composition.from_json(json.loads(text))
    assert back == comp
    assert back.to_json() == data
    assert [n.path for n in back.walk()] == [n.path for n in comp.walk()]
    fn = back.find("[1].test")
    assert fn.type == "function" and fn.fn is is_even
    node = data["composition"]["components"][1]
    assert node["type"] == "if" and node["path"] == "[1]" and node["test"]["path"] == "[1].test"
    assert node["test"]["function"]["exec"] == {"kind": "python:3", "ref": "test_compositions:is_even"}


async def test_round_tripped_composition_runs_the_same() -> None:
    comp = c.sequence(c.while_(is_even, halve), c.let({"n": 0}, loop(2, bump), read_n))
    back = c.Composition.from_json(json.loads(json.dumps(comp.to_json())))
    a, b = await run(None, comp, {"n": 40}), await run(None, back, {"n": 40})
    assert a.result == b.result == {"value": 2}


@pytest.mark.parametrize(
    ("fn", "needle"),
    [(lambda p: p, "lambdas and nested functions are not importable"), (None, "cannot load function")],
    ids=["lambda", "missing-module"],
)
async def test_ir_unloadable_function(fn: Any, needle: str) -> None:
    data = c.sequence("a", fn if fn is not None else halve).to_json()
    if fn is None:
        data["composition"]["components"][1]["function"]["exec"]["ref"] = "no_such_module_xyz:f"
    with pytest.raises(minifaas.CompositionError, match=needle):
        c.Composition.from_json(data)


class Scaler:
    """A callable instance (and a class with a method): neither round-trips by reference."""

    def __init__(self, k: int = 10) -> None:
        self.k = k

    def __call__(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"n": p["n"] * self.k}

    def bump(self, p: dict[str, Any]) -> dict[str, Any]:
        return {"n": p["n"] + self.k}


def add(p: dict[str, Any], k: int) -> dict[str, Any]:
    return {"n": p["n"] + k}


SCALE3 = Scaler(3)
ADD5 = functools.partial(add, k=5)


@pytest.mark.parametrize(
    "fn", [SCALE3, Scaler(7).bump, ADD5, lambda p: p], ids=["callable-instance", "bound-method", "partial", "lambda"]
)
async def test_ir_round_trip_is_lossless_or_refuses(fn: Any) -> None:
    comp = c.sequence(c.function(fn))
    before = await run(None, comp, {"n": 1})
    assert before.status == "success"
    ir = json.loads(json.dumps(comp.to_json()))
    assert "<" in ir["composition"]["components"][0]["function"]["exec"]["ref"]
    with pytest.raises(minifaas.CompositionError, match="not importable"):
        c.Composition.from_json(ir)


async def test_equality_tells_different_callables_apart() -> None:
    assert c.function(lambda p: 1) != c.function(lambda p: 2)
    f = lambda p: 1  # noqa: E731
    assert c.sequence(f, "a") == c.sequence(f, "a")
    assert c.function(halve) == c.Composition.from_json(json.loads(json.dumps(c.function(halve).to_json())))
    assert c.function(Scaler(1).bump) != c.function(Scaler(2).bump)


async def test_ir_prefers_composers_source_tree() -> None:
    # openwhisk-composer 0.12 writes the source tree ("ast") and the lowered one ("composition")
    data = {
        "ast": {"type": "retain", "components": [{"type": "action", "name": "/_/a", "path": "[0]"}], "path": ""},
        "composition": {
            "type": "let",
            "declarations": {"params": None},
            "components": [
                {"type": "finally", "body": {"type": "action", "name": "/_/a"}, "finalizer": {"type": "empty"}}
            ],
        },
        "version": "0.12.0",
    }
    comp = c.Composition.from_json(data)
    assert comp.type == "retain" and comp.actions() == ["a"]
    s = await run_echo(comp, {"n": 1})
    assert s.result == {"params": {"n": 1}, "result": {"n": 2}}


async def test_ir_accepts_openwhisk_composer_json() -> None:
    # shape of openwhisk-composer's compile() output (names fully qualified, if_nosave, empty alternate)
    data = {
        "composition": {
            "type": "if_nosave",
            "test": {"type": "action", "name": "/_/check", "path": ".test"},
            "consequent": {"type": "sequence", "components": [{"type": "action", "name": "/_/a"}]},
            "alternate": {"type": "empty"},
            "path": "",
        },
        "ast": {},
        "version": "0.12.0",
    }
    comp = c.Composition.from_json(data)
    assert comp.type == "if_nosave" and comp.actions() == ["check", "a"]
    assert comp.find(".consequent[0]").name == "a"
    js = {"composition": {"type": "function", "function": {"exec": {"kind": "nodejs:default", "code": "x=>x"}}}}
    with pytest.raises(minifaas.CompositionError, match="only Python functions"):
        c.Composition.from_json(js)


@pytest.mark.parametrize(
    "build",
    [
        lambda: c.repeat("3", "a"),  # type: ignore[arg-type]
        lambda: c.retry(True, "a"),
        lambda: c.let({"f": print}, "a"),
        lambda: c.literal(print),
        lambda: c.action(""),
        lambda: c.task(42),  # type: ignore[arg-type]
        lambda: c.async_("a", "b"),
        lambda: c.async_(lambda p: p),
        lambda: c.Composition.from_json({"composition": {"type": "nope"}}),
    ],
    ids=[
        "repeat-count",
        "retry-bool",
        "let-not-json",
        "literal-function",
        "empty-name",
        "bad-task",
        "async-two",
        "async-function",
        "unknown-type",
    ],
)
async def test_invalid_compositions_raise(build: Any) -> None:
    with pytest.raises(minifaas.CompositionError):
        build()


# ------------------------------------------------------------------------------------------------ sessions


def _session(i: int, name: str = "wf") -> Session:
    step = Step(
        path="[0]",
        kind="action",
        name="inc",
        activation_id=f"{i:032x}",
        input={"n": i},
        output={"blob": b"\x00\x01"},
        start=1000 + i,
        duration_ms=1.5,
        status="success",
    )
    return Session(
        session_id=f"s{i}",
        name=name,
        status="success",
        result={"n": i},
        start=1000 + i,
        end=1002 + i,
        duration=2,
        steps=[step],
        not_taken=[".alternate"],
        activation_ids=[f"{i:032x}"],
    )


def test_session_dict_round_trip() -> None:
    s = _session(1)
    d = json.loads(json.dumps(s.to_dict(), default=lambda o: {"$bytes": len(o)}))
    back = Session.from_dict(d)
    assert back.to_dict()["steps"][0]["output"] == {"blob": {"$bytes": 2}}
    assert back.session_id == "s1" and back.steps[0].path == "[0]" and back.not_taken == [".alternate"]
    assert back.activation_ids == s.activation_ids and back.done and back.success


def test_session_store_bounded_newest_kept() -> None:
    store = SessionStore(max_sessions=3)
    for i in range(5):
        store.put(_session(i, name="a" if i % 2 else "b"))
    assert len(store) == 3
    with pytest.raises(minifaas.ActivationNotFound):
        store.get("s1")
    assert "s4" in store and "s0" not in store
    assert [s.session_id for s in store.list()] == ["s4", "s3", "s2"]
    assert [s.session_id for s in store.list("a")] == ["s3"]
    assert [s.session_id for s in store.list(limit=1, skip=1)] == ["s3"]


def test_session_store_sqlite_persists(tmp_path: Path) -> None:
    db = tmp_path / "state" / "sessions.sqlite3"
    with SessionStore(db, max_sessions=2) as store:
        for i in range(4):
            store.put(_session(i))
        assert store.get("s0").result == {"n": 0}  # gone from memory, read back from the file
    with SessionStore(db) as again:
        assert len(again) == 4
        assert [s.session_id for s in again.list(limit=2)] == ["s3", "s2"]
        s = again.get("s2")
        assert s.steps[0].output == {"blob": {"$bytes": 2}} and s.steps[0].duration_ms == 1.5


# ------------------------------------------------------------------------------------------------ real engine


async def test_sequence_of_actions_trace(minifaas_engine: minifaas.Engine) -> None:
    s = await run(minifaas_engine, c.sequence("inc", "inc", c.function(lambda p: {**p, "f": 1}), "inc"), {"n": 0})
    assert s.status == "success" and s.result == {"n": 3, "f": 1}
    assert [st.path for st in s.steps] == ["[0]", "[1]", "[2]", "[3]"]
    assert [st.kind for st in s.steps] == ["action", "action", "function", "action"]
    assert [st.status for st in s.steps] == ["success"] * 4
    action_steps = [st for st in s.steps if st.kind == "action"]
    assert s.activation_ids == [st.activation_id for st in action_steps]
    assert len(set(s.activation_ids)) == 3
    assert [st.input for st in action_steps] == [{"n": 0}, {"n": 1}, {"n": 2, "f": 1}]
    starts = [st.start for st in s.steps]
    assert starts == sorted(starts)
    for st in action_steps:
        assert st.activation_id is not None
        act = await minifaas_engine.activations.get(st.activation_id)
        assert act.cause == s.session_id
        assert act.name == "inc" and act.result == st.output and act.status == "success"
        assert st.duration_ms > 0


async def test_action_errors_reach_handlers(minifaas_engine: minifaas.Engine) -> None:
    comp = c.sequence(
        c.try_("fail", lambda p: {"caught": p}),
        c.retain(c.try_("crash", lambda p: {"crashed": "kaput" in p["error"]})),
        c.merge(c.try_("no-such-function", lambda p: {"missing": "FunctionNotFound" in p["error"]})),
    )
    s = await run(minifaas_engine, comp, {})
    assert s.status == "success", s.result
    # the handler sees the error object stripped to its error field ("detail" is gone)
    assert s.result == {"params": {"caught": {"error": "boom"}}, "result": {"crashed": True}, "missing": True}
    statuses = {st.name: st.status for st in s.steps if st.kind == "action"}
    assert statuses["fail"] == "application_error"
    assert statuses["crash"] in ("application_error", "developer_error")
    assert statuses["no-such-function"] == "internal_error"
    fail_step = next(st for st in s.steps if st.name == "fail")
    assert fail_step.activation_id is not None
    assert (await minifaas_engine.activations.get(fail_step.activation_id)).result == {"error": "boom", "detail": 1}
    # without a handler the session ends with the action's error
    s = await run(minifaas_engine, c.sequence("inc", "fail", "inc"), {})
    assert s.status == "application_error" and s.result == {"error": "boom"}
    assert [st.name for st in s.steps] == ["inc", "fail"]


@pytest.mark.parametrize(("fail_times", "attempts", "ok"), [(2, 3, True), (5, 3, False)], ids=["recovers", "gives-up"])
async def test_retry_reruns_failing_action(
    minifaas_engine: minifaas.Engine, tmp_path: Path, fail_times: int, attempts: int, ok: bool
) -> None:
    counter = tmp_path / "count"
    s = await run(minifaas_engine, c.retry(2, "flaky"), {"counter": str(counter), "fail_times": fail_times})
    assert int(counter.read_text()) == attempts
    assert len(s.steps) == attempts and all(st.input == s.steps[0].input for st in s.steps)
    if ok:
        assert s.status == "success" and s.result == {"attempts": 3}
    else:
        assert s.status == "application_error" and s.result == {"error": "attempt 2 failed"}


async def test_dynamic_and_async(minifaas_engine: minifaas.Engine) -> None:
    s = await run(
        minifaas_engine, c.sequence(lambda p: {"type": "action", "name": "inc", "params": {"n": 41}}, c.dynamic()), {}
    )
    assert s.result == {"n": 42}
    assert s.steps[-1].kind == "dynamic" and s.steps[-1].name == "inc" and s.steps[-1].activation_id
    s = await run(minifaas_engine, c.sequence(c.async_("nap"), lambda p: {**p, "next": True}), {"s": 0.05, "i": 7})
    assert s.status == "success" and s.result["method"] == "async" and s.result["next"] is True
    assert s.result["sessionId"] == s.session_id
    aid = s.result["activationId"]
    assert s.activation_ids == [aid] and s.steps[0].kind == "async"
    act = await minifaas_engine.activations.wait(aid, timeout_s=30)
    assert act.status == "success" and act.result["i"] == 7 and act.cause == s.session_id


async def _timed(engine: minifaas.Engine, comp: c.Composition, args: dict[str, Any]) -> tuple[Session, float]:
    t0 = time.perf_counter()
    s = await run(engine, comp, args)
    return s, time.perf_counter() - t0


async def test_parallel_is_concurrent(minifaas_engine: minifaas.Engine) -> None:
    comp = c.parallel(*(c.sequence(c.literal({"s": NAP_S, "i": i}), "nap") for i in range(PARALLEL_BRANCHES)))
    await run(minifaas_engine, comp, {})  # warm the sandboxes: cold starts are not what this measures
    s, elapsed = await _timed(minifaas_engine, comp, {})
    assert s.status == "success"
    assert [v["i"] for v in s.result["value"]] == list(range(PARALLEL_BRANCHES))
    assert elapsed < NAP_S * 2, f"{PARALLEL_BRANCHES} branches of {NAP_S}s took {elapsed:.2f}s (sum would be more)"
    naps = [st for st in s.steps if st.name == "nap"]
    assert len(naps) == PARALLEL_BRANCHES
    assert max(st.start for st in naps) < min(st.start + st.duration_ms for st in naps), "steps did not overlap"


async def test_map_is_concurrent_and_branch_errors_do_not_cancel(minifaas_engine: minifaas.Engine) -> None:
    comp = c.map(c.if_(lambda p: p["value"] == 1, "fail", c.sequence(lambda p: {"s": NAP_S, "i": p["value"]}, "nap")))
    await run(minifaas_engine, comp, {"value": [0, 1, 2, 3]})
    s, elapsed = await _timed(minifaas_engine, comp, {"value": [0, 1, 2, 3]})
    assert s.status == "success", "a branch error is an array entry, not a session error"
    assert s.result["value"][1] == {"error": "boom"}
    assert [v.get("i") for v in s.result["value"]] == [0, None, 2, 3]
    assert elapsed < NAP_S * 2, f"map of 3 naps of {NAP_S}s took {elapsed:.2f}s"
    assert [st.status for st in s.steps if st.name == "nap"] == ["success"] * 3


async def test_map_over_100_items(minifaas_engine: minifaas.Engine) -> None:
    n = 100
    s = await run(minifaas_engine, c.map("inc", "inc"), {"value": [{"n": i} for i in range(n)]})
    assert s.status == "success"
    assert [v["n"] for v in s.result["value"]] == [i + 2 for i in range(n)]
    assert len(s.steps) == 2 * n and len(set(s.activation_ids)) == 2 * n
    assert s.activation_ids == [st.activation_id for st in s.steps]
    assert {st.path for st in s.steps} == {"[0]", "[1]"}
    starts = [st.start for st in s.steps]
    assert starts == sorted(starts), "steps are recorded in start order"
    acts = [await minifaas_engine.activations.get(a) for a in s.activation_ids[:10]]
    assert all(a.cause == s.session_id and a.status == "success" for a in acts)


async def test_step_limit_with_actions(minifaas_engine: minifaas.Engine) -> None:
    s = await run(minifaas_engine, c.while_(lambda p: True, "inc"), {"n": 0}, max_steps=3)
    assert s.status == "application_error" and "max_steps=3" in s.result["error"]
    assert len(s.activation_ids) == 3  # test, inc, test, inc, test, inc, test, (the 4th inc: over)


async def test_large_payloads_are_not_kept_in_traces(minifaas_engine: minifaas.Engine) -> None:
    big = "x" * (TRACE_MAX_BYTES + 10)
    s = await run(minifaas_engine, c.sequence("inc", lambda p: {"n": p["n"]}), {"blob": big})
    assert s.result == {"n": 1}
    assert s.steps[0].input == {"$truncated": True, "limit_bytes": TRACE_MAX_BYTES}
    assert s.steps[0].output == {"$truncated": True, "limit_bytes": TRACE_MAX_BYTES}
    assert s.steps[1].output == {"n": 1}


async def test_primary_activation_and_session(minifaas_engine: minifaas.Engine) -> None:
    sessions = SessionStore()
    recorded: list[Activation] = []
    comp = c.sequence("inc", c.if_(lambda p: p["n"] > 5, "fail", "inc"))
    act = await call_composition(
        minifaas_engine,
        "wf",
        comp,
        {"n": 0},
        sessions=sessions,
        record=recorded.append,
        params={"n": 3, "k": 1},
        cause="trigger-1",
    )
    assert act.status == "success" and act.result == {"n": 2, "k": 1}, "invocation args win over defaults"
    assert act.annotations == {"conductor": True, "kind": "sequence", "composition": "wf"}
    assert act.cause == "trigger-1" and act.name == "wf" and act.status_code == 0
    session = sessions.get(act.activation_id)
    assert session.session_id == act.activation_id and session.name == "wf"
    assert act.logs == session.activation_ids and len(act.logs) == 2
    assert session.not_taken == ["[1].consequent"]
    assert [r.status for r in recorded] == ["running", "success"]
    assert all(r.activation_id == act.activation_id for r in recorded)
    for aid in act.logs:
        assert (await minifaas_engine.activations.get(aid)).cause == act.activation_id
    ow = act.to_openwhisk()
    assert {"key": "conductor", "value": True} in ow["annotations"]


async def test_engine_deploy_composition(minifaas_engine: minifaas.Engine) -> None:
    if not hasattr(minifaas_engine, "deploy_composition"):
        pytest.skip("Engine.deploy_composition is not wired yet")
    await minifaas_engine.deploy_composition("wf2", c.sequence("inc", "inc"))
    assert await minifaas_engine.invoke("wf2", {"n": 1}) == {"n": 3}
    act = await minifaas_engine.call("wf2", {"n": 1})
    assert act.annotations.get("conductor") is True and act.annotations.get("kind") == "sequence"
    session = minifaas_engine.sessions.get(act.activation_id)  # type: ignore[attr-defined]
    assert act.logs == session.activation_ids and len(act.logs) == 2
    for aid in act.logs:
        assert (await minifaas_engine.activations.get(aid)).cause == act.activation_id
    await minifaas_engine.deploy_composition("wf3", c.sequence("fail"))
    with pytest.raises(minifaas.ActivationError, match="boom"):
        await minifaas_engine.invoke("wf3", {})


async def test_a_composition_persists_in_the_state_dir_and_is_back_after_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    comp = c.if_(is_even, halve, c.literal({"odd": True}))
    async with minifaas.Engine(state_dir=state) as engine:
        first = await engine.deploy_composition("wf", comp, conditions="strict")
        assert (await engine.deploy_composition("wf", comp, conditions="strict"))["version"] == first["version"]
        second = await engine.deploy_composition("wf", comp, params={"n": 8}, conditions="strict")
        assert int(second["version"]) == int(first["version"]) + 1
        await engine.deploy_composition("gone", c.sequence(halve))
        await engine.delete("gone")
        with pytest.raises(minifaas.CompositionError, match=r"root\[0\].*<lambda>.*persist=False"):
            await engine.deploy_composition("lam", c.sequence(lambda p: p))
        await engine.deploy_composition("mem", c.sequence(lambda p: p), persist=False)
        with pytest.raises(minifaas.DeployError, match="already a deployed composition"):
            await engine.deploy("mem", code=INC)  # it would never run: the composition takes its name
        assert await engine.invoke("mem", {"a": 1}) == {"a": 1}
        assert engine.triggers is not None
        engine.triggers.create_trigger("t")
        engine.triggers.create_rule("r", "t", "wf")
    async with minifaas.Engine(state_dir=state) as engine:
        # nothing deployed again: the state dir brought "wf" back, and only it
        assert [i["name"] for i in await engine.list_functions()] == ["wf"]
        info = await engine.get_function("wf")
        assert (info["version"], info["params"], info["conditions"]) == (second["version"], {"n": 8}, "strict")
        assert await engine.invoke("wf", {}) == {"n": 4}
        assert engine.triggers is not None
        [sid] = await engine.triggers.fire("t", {"n": 3})
        act = await engine.activations.wait(sid, timeout_s=30)
        assert act.status == "success" and act.result == {"odd": True}
        assert engine.sessions.get(sid).name == "wf"
        third = await engine.deploy_composition("wf", c.sequence(halve))
        assert int(third["version"]) == int(second["version"]) + 1  # never reused, as a function's
        await engine.delete("wf")
    async with minifaas.Engine(state_dir=state) as engine:
        assert await engine.list_functions() == []


async def test_a_saved_composition_that_cannot_be_read_back_is_skipped_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from minifaas._workflows.saved import CompositionFiles, SavedComposition

    state = tmp_path / "state"
    files = CompositionFiles(state / "compositions")
    gone = c.function(halve).to_json()
    gone["composition"]["function"]["exec"]["ref"] = "no_such_module_here:halve"  # the module was renamed since
    files.save(SavedComposition("moved", "1", gone, {}, 50, "js", 0))
    files.save(SavedComposition("ok", "1", c.sequence(halve).to_json(), {}, 50, "js", 0))
    (state / "compositions" / "torn.json").write_text('{"format": 1, "na')
    async with minifaas.Engine(state_dir=state) as engine:
        assert [i["name"] for i in await engine.list_functions()] == ["ok"]
        assert await engine.invoke("ok", {"n": 6}) == {"n": 3}
    assert "cannot restore composition moved" in caplog.text and "torn.json" in caplog.text


# ------------------------------------------------------------------------------------------- session records

SEEN_SESSIONS: list[str | None] = []


def note_session(p: dict[str, Any]) -> None:
    from minifaas import current_session_id

    SEEN_SESSIONS.append(current_session_id())


async def test_submitted_session_is_one_record_readable_at_once(minifaas_engine: minifaas.Engine) -> None:
    await minifaas_engine.deploy_composition("naps", c.sequence("nap", "nap"))
    sid = await minifaas_engine.submit("naps", {"s": NAP_S})
    first = minifaas_engine.sessions.get(sid)  # before the session's task has even started
    assert first.status == "running" and first.steps == []
    with anyio.fail_after(30):
        while not first.steps:  # the object returned by get fills in as the session runs
            await anyio.sleep(0.01)
    assert minifaas_engine.sessions.get(sid) is first and first.status == "running"
    act = await minifaas_engine.activations.wait(sid, timeout_s=60)
    assert act.status == "success"
    assert first.status == "success" and len(first.steps) == 2 and minifaas_engine.sessions.get(sid) is first


async def test_session_id_reaches_steps_under_call_and_in_branches(minifaas_engine: minifaas.Engine) -> None:
    SEEN_SESSIONS.clear()
    await minifaas_engine.deploy_composition(
        "noted", c.sequence(note_session, c.parallel(note_session, note_session), c.map(note_session))
    )
    act = await minifaas_engine.call("noted", {})
    assert act.status == "success", act.result
    # the map runs over the parallel's output list: two more branches
    assert [act.activation_id] * 5 == SEEN_SESSIONS
    sid = await minifaas_engine.submit("noted", {})
    await minifaas_engine.activations.wait(sid, timeout_s=60)
    assert SEEN_SESSIONS[5:] == [sid] * 5


async def test_step_timing_excludes_the_wait_for_a_step_slot() -> None:
    from minifaas._workflows.conductor import MAX_CONCURRENT_STEPS

    step_s = 0.1

    async def invoke(name: str, p: dict[str, Any], cause: str) -> Activation:
        await anyio.sleep(step_s)
        return Activation(
            activation_id=new_activation_id(), name=name, version="1", namespace="g", status="success", result=p
        )

    async def submit(name: str, p: dict[str, Any], cause: str) -> str:
        raise AssertionError("no async steps here")

    n = 2 * MAX_CONCURRENT_STEPS  # half the steps wait a whole step for a slot
    s = await run_session(
        c.map("work"), {"value": list(range(n))}, invoke=invoke, submit=submit, session_id="s", max_steps=n
    )
    assert s.status == "success" and len(s.steps) == n
    durations = sorted(st.duration_ms for st in s.steps)
    assert durations[-1] < 1.9 * step_s * 1e3, durations[-5:]


async def test_sessions_left_running_by_a_dead_host_are_failed_at_start_up(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with SessionStore(state / "sessions.sqlite3") as store:
        store.put(
            Session(session_id="dead", name="wf", start=1000, steps=[Step(path="[0]", kind="action", start=1000)])
        )
        store.put(Session(session_id="done", name="wf", start=1000, status="success", end=1500, duration=500))
    async with minifaas.Engine(state_dir=state) as engine:
        dead = engine.sessions.get("dead")
        assert dead.status == "internal_error" and "stopped" in dead.result["error"]
        assert dead.end is not None and dead.steps[0].status == "internal_error"
        assert engine.sessions.get("done").status == "success"


def big_tag(p: dict[str, Any]) -> dict[str, Any]:
    return {"v": p["value"], "blob": "y" * 60_000}


async def test_a_sessions_trace_is_bounded_and_stored_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from minifaas._workflows import sessions as _sessions
    from minifaas._workflows.conductor import SESSION_TRACE_MAX_BYTES

    comp = c.sequence(lambda p: {"value": list(range(300))}, c.map(big_tag))
    s = await run(None, comp, {})
    assert s.status == "success" and len(s.steps) == 301 and len(s.result["value"]) == 300
    kept = sum(len(json.dumps(st.output)) for st in s.steps if st.output is not None)
    assert kept <= SESSION_TRACE_MAX_BYTES * 1.1  # 300 outputs of 60 KB would be 18 MB
    assert {"$truncated": True, "session_limit_bytes": SESSION_TRACE_MAX_BYTES} in [st.output for st in s.steps]
    threads: list[str] = []
    real_dumps = _sessions.dumps

    def spy(obj: object) -> str:
        threads.append(threading.current_thread().name)
        return real_dumps(obj)

    monkeypatch.setattr(_sessions, "dumps", spy)
    with SessionStore(tmp_path / "s.sqlite3") as store:
        store.put(s)
        assert store.get(s.session_id) is s  # readable at once
        assert [x.session_id for x in store.list()] == [s.session_id]  # list waits for the write
    assert threads == ["minifaas-sessions-writer"]
    with SessionStore(tmp_path / "s.sqlite3") as store:
        again = store.get(s.session_id)
    assert again.status == "success" and len(again.steps) == 301


def test_session_store_memory_is_bounded_in_trace_bytes() -> None:
    store = SessionStore(max_bytes=250)
    running = Session(session_id="live", name="wf", start=1)
    store.put(running)
    for i in range(3):
        store.put(Session(session_id=f"s{i}", name="wf", start=2 + i, status="success", trace_bytes=100))
    assert "s0" not in store and "s1" in store and "s2" in store  # 300 bytes > 250: the oldest ended one went
    assert store.get("live") is running  # a running session is not dropped for its size
