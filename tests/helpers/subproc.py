"""Ending the processes a test started (a real ``minifaas serve``, the CLI): whatever the test's outcome."""

from __future__ import annotations

import subprocess
from typing import Any

__all__ = ("reap",)


def reap(proc: subprocess.Popen[Any]) -> None:
    """Kill ``proc`` if it still runs, wait for it, and close the pipes the test held to it."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
