"""pytest plugin for minifaas (registered through the ``pytest11`` entry point, so it loads when minifaas is installed).

Fixtures:

- ``minifaas_engine``: a fresh running :class:`minifaas.Engine` per test (async; use ``@pytest.mark.anyio``).
- ``minifaas_module_engine`` / ``minifaas_session_engine``: one engine shared by a module / the session, so warm
  sandboxes are reused across tests.
- ``engine``: what ``deploy`` uses: the function-scoped engine by default; set the ini option
  ``minifaas_engine_scope = module`` (or ``session``) to share one, or override the fixture in a conftest.
- ``deploy``: a factory ``await deploy(name, code=... | path=... | composition=..., **options)`` that deploys on
  ``engine`` and deletes what it deployed when the test ends.
- ``fake_clock``: a :class:`minifaas.testing.FakeClock` for keep-alive and trigger timing tests
  (``Engine(clock=fake_clock)``).
- ``assert_success`` / ``assert_status``: the helpers of :mod:`minifaas.testing`, as fixtures.

Ini options: ``minifaas_engine_scope`` (function | module | session), ``minifaas_launcher`` (auto | spawn | zygote).
Marker: ``minifaas(launcher=..., **engine_options)`` passes options to the function-scoped engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, Literal

import pytest

from ._engine import Engine
from ._errors import FunctionNotFound
from .testing import FakeClock, assert_status, assert_success

SCOPES = ("function", "module", "session")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "minifaas_engine_scope",
        "scope of the `engine` fixture: function, module or session",
        default="function",
    )
    parser.addini("minifaas_launcher", "sandbox launcher for minifaas fixtures: auto, spawn or zygote", default="auto")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "minifaas(**engine_options): options for the function-scoped engine fixture")
    if not config.pluginmanager.has_plugin("minifaas-backend"):
        from . import _pytest_backend

        config.pluginmanager.register(_pytest_backend, "minifaas-backend")
    scope = config.getini("minifaas_engine_scope")
    if scope not in SCOPES:
        raise pytest.UsageError(f"minifaas_engine_scope must be one of {', '.join(SCOPES)}, not {scope!r}")


def _engine_scope(fixture_name: str, config: pytest.Config) -> Literal["function", "module", "session"]:
    scope = str(config.getini("minifaas_engine_scope"))
    return scope if scope in ("module", "session") else "function"  # type: ignore[return-value]


def _options(config: pytest.Config, marker: pytest.Mark | None = None) -> dict[str, Any]:
    opts: dict[str, Any] = {"launcher": config.getini("minifaas_launcher")}
    if marker is not None:
        opts.update(marker.kwargs)
    return opts


@pytest.fixture
async def minifaas_engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    async with Engine(**_options(request.config, request.node.get_closest_marker("minifaas"))) as engine:
        yield engine


@pytest.fixture(scope="module")
async def minifaas_module_engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    async with Engine(**_options(request.config)) as engine:
        yield engine


@pytest.fixture(scope="session")
async def minifaas_session_engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    async with Engine(**_options(request.config)) as engine:
        yield engine


@pytest.fixture(scope=_engine_scope)
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    async with Engine(**_options(request.config)) as eng:
        yield eng


@pytest.fixture(scope=_engine_scope)
async def minifaas_deployments(engine: Engine) -> AsyncIterator[dict[str, tuple[Any, dict[str, Any]]]]:
    """What ``deploy`` put on ``engine``: name -> (its arguments, description); deleted when the engine's scope ends."""
    deployed: dict[str, tuple[Any, dict[str, Any]]] = {}
    yield deployed
    for name in reversed(list(deployed)):
        with contextlib.suppress(Exception):  # a test may have deleted it already
            await engine.delete(name)


@pytest.fixture
async def deploy(
    engine: Engine, minifaas_deployments: dict[str, tuple[Any, dict[str, Any]]]
) -> Callable[..., Awaitable[dict[str, Any]]]:
    async def _deploy(name: str, *, composition: Any = None, **kwargs: Any) -> dict[str, Any]:
        asked = (composition, kwargs)
        known = minifaas_deployments.get(name)
        if known is not None and known[0] == asked:
            # the same deployment again on a shared engine: keep it, and its warm sandboxes, unless it is gone
            with contextlib.suppress(FunctionNotFound):
                current = await engine.get_function(name)
                if current.get("version") == known[1].get("version"):
                    return known[1]
        if composition is not None:
            info: dict[str, Any] = await engine.deploy_composition(name, composition)
        else:
            info = await engine.deploy(name, **kwargs)
        minifaas_deployments[name] = (asked, info)
        return info

    return _deploy


@pytest.fixture
def fake_clock() -> Iterator[FakeClock]:
    yield FakeClock()


@pytest.fixture(name="assert_success")
def _assert_success_fixture() -> Callable[..., Any]:
    return assert_success


@pytest.fixture(name="assert_status")
def _assert_status_fixture() -> Callable[..., Any]:
    return assert_status
