"""The event loop backend for minifaas' async fixtures: registered by the pytest plugin after anyio's own plugin,
so this definition of ``anyio_backend`` wins (minifaas runs on asyncio)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"
