"""The pytest plugin: one engine fixture, a deploy fixture bound to it, and clear failures where an option cannot apply.

Each case runs a small test file in a pytest subprocess (pytester), with real engines and sandboxes.
"""

from __future__ import annotations

import textwrap

import pytest

HELLO = "def main(args):\\n    return {'hi': args.get('name')}\\n"


def _run(pytester: pytest.Pytester, source: str, *, scope: str | None = None) -> pytest.RunResult:
    pytester.makepyfile(test_case=textwrap.dedent(source))
    if scope is not None:
        pytester.makeini(f"[pytest]\nminifaas_engine_scope = {scope}\n")
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")


def test_the_natural_test_deploys_and_invokes_on_one_engine(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        f"""
        import pytest

        @pytest.mark.anyio
        async def test_x(minifaas_engine, minifaas_deploy):
            info = await minifaas_deploy("hello", code="{HELLO}")
            assert info["version"] == "1"
            assert await minifaas_engine.invoke("hello", {{"name": "Ada"}}) == {{"hi": "Ada"}}
        """,
    )
    result.assert_outcomes(passed=1)


@pytest.mark.parametrize("name", ["engine", "deploy", "minifaas_module_engine", "minifaas_session_engine"])
def test_no_generic_or_duplicate_fixture_names(pytester: pytest.Pytester, name: str) -> None:
    result = _run(pytester, f"def test_x({name}):\n    pass\n")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([f"*fixture '{name}' not found*"])


def test_module_scope_shares_the_engine_and_redeploys_only_changed_content(pytester: pytest.Pytester) -> None:
    fn = pytester.path / "fn.py"
    result = _run(
        pytester,
        f"""
        import pytest
        from pathlib import Path

        pytestmark = pytest.mark.anyio
        seen = []
        FN = Path({str(fn)!r})

        async def test_first(minifaas_engine, minifaas_deploy):
            FN.write_text("def main(args):\\n    return {{'v': 1}}\\n")
            seen.append(id(minifaas_engine))
            assert (await minifaas_deploy("f", path=FN))["version"] == "1"
            assert (await minifaas_deploy("f", path=FN))["version"] == "1"  # same content: reused

        async def test_second_sees_the_same_engine_and_the_edit(minifaas_engine, minifaas_deploy):
            seen.append(id(minifaas_engine))
            assert seen[0] == seen[1]
            FN.write_text("def main(args):\\n    return {{'v': 2}}\\n")  # same path, new content
            assert (await minifaas_deploy("f", path=FN))["version"] == "2"
            assert await minifaas_engine.invoke("f") == {{"v": 2}}
        """,
        scope="module",
    )
    result.assert_outcomes(passed=2)


def test_function_scope_gives_each_test_its_engine_and_honours_the_marker(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        import pytest

        pytestmark = pytest.mark.anyio

        @pytest.mark.minifaas(idle_timeout_s=7)
        async def test_marked(minifaas_engine, minifaas_deploy):
            assert minifaas_engine.idle_timeout_s == 7
            info = await minifaas_deploy("f", code="def main(a):\\n    return {}\\n")
            assert info["limits"]["idle_timeout_s"] == 7

        async def test_fresh(minifaas_engine):
            assert minifaas_engine.idle_timeout_s != 7
            assert await minifaas_engine.list_functions() == []
        """,
    )
    result.assert_outcomes(passed=2)


def test_marker_with_a_shared_engine_fails_saying_why(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        import pytest

        @pytest.mark.anyio
        @pytest.mark.minifaas(idle_timeout_s=7)
        async def test_marked(minifaas_engine):
            pass
        """,
        scope="session",
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*cannot apply to a session-scoped minifaas_engine*"])


def test_fake_clock_drives_the_function_scoped_engine(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        import pytest

        @pytest.mark.anyio
        async def test_clock(minifaas_engine, fake_clock):
            assert minifaas_engine.clock is fake_clock
        """,
    )
    result.assert_outcomes(passed=1)


def test_fake_clock_with_a_shared_engine_fails_saying_why(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        import pytest

        @pytest.mark.anyio
        async def test_clock(minifaas_engine, fake_clock):
            pass
        """,
        scope="module",
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fake_clock cannot drive a module-scoped minifaas_engine*"])


def test_a_module_override_of_the_engine_is_what_deploy_uses(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        f"""
        import pytest
        import minifaas

        pytestmark = pytest.mark.anyio

        @pytest.fixture(scope="module")
        async def minifaas_engine():
            async with minifaas.Engine(idle_timeout_s=42) as engine:
                yield engine

        async def test_x(minifaas_engine, minifaas_deploy):
            info = await minifaas_deploy("hello", code="{HELLO}")
            assert info["limits"]["idle_timeout_s"] == 42
            assert await minifaas_engine.invoke("hello", {{"name": "Bo"}}) == {{"hi": "Bo"}}
        """,
    )
    result.assert_outcomes(passed=1)
