"""pytest plugin for minifaas (registered through the ``pytest11`` entry point, so it loads when minifaas is installed).

One obvious way, two fixtures that go together::

    @pytest.mark.anyio
    async def test_hello(minifaas_engine, minifaas_deploy):
        await minifaas_deploy("hello", code="def main(args):\\n    return {'hi': args['name']}")
        assert (await minifaas_engine.invoke("hello", {"name": "Ada"})) == {"hi": "Ada"}

- ``minifaas_engine``: a running :class:`minifaas.Engine`. Its scope is the ini option ``minifaas_engine_scope``
  (``function``, the default, ``module`` or ``session``: a shared engine keeps warm sandboxes across tests). A module
  or conftest may override it with a fixture of the same name; ``minifaas_deploy`` then deploys to that one.
- ``minifaas_deploy``: ``await minifaas_deploy(name, code=... | path=... | composition=..., **options)`` deploys on
  ``minifaas_engine``. On a shared engine an identical deployment (same options and the same *content*: the code, the
  file's bytes, every file of a folder) is reused with its warm sandboxes; an edited file is deployed again.
  Deployments live as long as the engine.
- ``fake_clock``: a :class:`minifaas.testing.FakeClock`. A test that asks for it gets a function-scoped engine driven
  by it (keep-alive and triggers); with a shared engine scope that cannot be, and the test fails saying so.
- ``assert_success`` / ``assert_status``: the helpers of :mod:`minifaas.testing`, as fixtures.

Ini options: ``minifaas_engine_scope`` (function | module | session), ``minifaas_launcher`` (auto | spawn | zygote).
Marker: ``@pytest.mark.minifaas(**engine_options)`` passes options to the engine of that test; it needs the function
scope (a shared engine was built before the test), and a test that uses it with a shared scope fails saying so.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import pytest

from ._engine import Engine
from ._errors import FunctionNotFound
from .testing import FakeClock, assert_status, assert_success

__all__ = ("SCOPES",)

SCOPES = ("function", "module", "session")
#: a folder bigger than this is not hashed for reuse: it is simply deployed again
MAX_DIGEST_BYTES = 256 << 20


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "minifaas_engine_scope",
        "scope of the minifaas_engine fixture: function, module or session",
        default="function",
    )
    parser.addini("minifaas_launcher", "sandbox launcher for minifaas fixtures: auto, spawn or zygote", default="auto")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "minifaas(**engine_options): options for the engine of this test (function scope only)"
    )
    if not config.pluginmanager.has_plugin("minifaas-backend"):
        from . import _pytest_backend

        config.pluginmanager.register(_pytest_backend, "minifaas-backend")
    scope = config.getini("minifaas_engine_scope")
    if scope not in SCOPES:
        raise pytest.UsageError(f"minifaas_engine_scope must be one of {', '.join(SCOPES)}, not {scope!r}")


def _engine_scope(fixture_name: str, config: pytest.Config) -> Literal["function", "module", "session"]:
    scope = str(config.getini("minifaas_engine_scope"))
    return scope if scope in ("module", "session") else "function"  # type: ignore[return-value]


def _plugin_engine_scope(item: pytest.Item) -> str | None:
    """The scope of the plugin's own ``minifaas_engine`` if this test uses it (None when overridden or unused)."""
    info = getattr(item, "_fixtureinfo", None)
    defs = info.name2fixturedefs.get("minifaas_engine") if info is not None else None
    if not defs or getattr(defs[-1].func, "__module__", None) != __name__:
        return None
    return str(defs[-1].scope)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    scope = _plugin_engine_scope(item)
    if scope is None or scope == "function":
        return
    if item.get_closest_marker("minifaas") is not None:
        pytest.fail(
            f"@pytest.mark.minifaas(...) cannot apply to a {scope}-scoped minifaas_engine (built before this test): "
            "set minifaas_engine_scope = function, or build an Engine with those options in the test",
            pytrace=False,
        )
    if "fake_clock" in getattr(item, "fixturenames", ()):
        pytest.fail(
            f"fake_clock cannot drive a {scope}-scoped minifaas_engine (built before this test): "
            "set minifaas_engine_scope = function, or pass the clock to your own Engine(clock=fake_clock)",
            pytrace=False,
        )


def _options(config: pytest.Config, marker: pytest.Mark | None = None) -> dict[str, Any]:
    opts: dict[str, Any] = {"launcher": config.getini("minifaas_launcher")}
    if marker is not None:
        opts.update(marker.kwargs)
    return opts


@pytest.fixture(scope=_engine_scope)
async def minifaas_engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    options = _options(request.config)
    if request.scope == "function":
        options = _options(request.config, request.node.get_closest_marker("minifaas"))
        if "fake_clock" in request.fixturenames and "clock" not in options:
            options["clock"] = request.getfixturevalue("fake_clock")
    async with Engine(**options) as engine:
        yield engine


#: engine -> name -> (what was asked, content digest, the deploy's description): reuse on shared engines
_DEPLOYED: weakref.WeakKeyDictionary[Engine, dict[str, tuple[Any, str | None, dict[str, Any]]]] = (
    weakref.WeakKeyDictionary()
)


def _content_digest(code: Any, path: Any) -> str | None:
    """sha256 of what a deploy would read: the code, a file's bytes, or every file (name and bytes) of a folder."""
    h = hashlib.sha256()
    if isinstance(code, str):
        h.update(b"code\0" + code.encode("utf-8", "surrogatepass"))
        return h.hexdigest()
    if path is None:
        return None
    p = Path(os.fspath(path))
    if p.is_file():
        h.update(b"file\0" + p.read_bytes())
        return h.hexdigest()
    if not p.is_dir():
        return None
    total = 0
    for root, dirs, files in os.walk(p):
        dirs.sort()
        for name in sorted(files):
            f = Path(root, name)
            data = f.read_bytes()
            total += len(data)
            if total > MAX_DIGEST_BYTES:
                return None
            h.update(str(f.relative_to(p)).encode("utf-8", "surrogateescape") + b"\0" + data + b"\0")
    return h.hexdigest()


@pytest.fixture
async def minifaas_deploy(minifaas_engine: Engine) -> Callable[..., Awaitable[dict[str, Any]]]:
    engine = minifaas_engine
    deployed = _DEPLOYED.setdefault(engine, {})

    async def _deploy(name: str, *, composition: Any = None, **kwargs: Any) -> dict[str, Any]:
        asked = (composition, {k: v for k, v in kwargs.items()})
        digest = _content_digest(kwargs.get("code"), kwargs.get("path")) if composition is None else None
        known = deployed.get(name)
        if known is not None and known[0] == asked and known[1] == digest and (digest or composition is not None):
            # the same deployment again on a shared engine: keep it, and its warm sandboxes, unless it is gone
            with contextlib.suppress(FunctionNotFound):
                current = await engine.get_function(name)
                if current.get("version") == known[2].get("version"):
                    return known[2]
        if composition is not None:
            info: dict[str, Any] = await engine.deploy_composition(name, composition)
        else:
            info = await engine.deploy(name, **kwargs)
        deployed[name] = (asked, digest, info)
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
