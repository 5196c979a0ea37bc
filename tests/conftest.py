"""Shared test configuration: the project's own tests use its pytest plugin (loaded by the pytest11 entry point)."""

from __future__ import annotations

pytest_plugins = ("pytester",)
