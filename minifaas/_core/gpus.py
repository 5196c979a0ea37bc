"""Local GPUs shared out per sandbox (the local backend's side of ``resources={"num_gpus": n}``).

The host's GPUs are its ``CUDA_VISIBLE_DEVICES`` list when set (an empty value: none), else what ``nvidia-smi``
lists. A sandbox of a function asking for ``num_gpus`` gets that many of them (rounded up), the least used first,
in its ``CUDA_VISIBLE_DEVICES``; every other sandbox gets an empty one, so no sandbox sees a GPU it was not given
(CUDA shows every GPU of the machine to a process without the variable). GPUs are shared, not queued for: more
sandboxes than GPUs share them, as fractional GPUs do on Ray.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from collections.abc import Mapping
from typing import Any, Final

import anyio.abc

from .function import FunctionSpec
from .launch import Launcher
from .sandbox import HostService, Sandbox

__all__ = ("CUDA_ENV", "GpuSandbox", "GpuShares", "host_gpus", "num_gpus")

CUDA_ENV: Final = "CUDA_VISIBLE_DEVICES"
NVIDIA_SMI_TIMEOUT_S: Final = 10.0


def host_gpus(environ: Mapping[str, str] = os.environ) -> list[str]:
    """This host's GPU ids, as a sandbox's ``CUDA_VISIBLE_DEVICES`` names them."""
    if CUDA_ENV in environ:
        return [g.strip() for g in environ[CUDA_ENV].split(",") if g.strip()]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []  # a driver that does not answer: no GPU this host can hand out
    return [line.strip() for line in out.splitlines() if line.strip()]


def num_gpus(spec: FunctionSpec | None) -> float:
    if spec is None:
        return 0.0
    return float(getattr(spec, "resources", {}).get("num_gpus", 0.0))


class GpuShares:
    """How many live sandboxes hold each GPU of the host."""

    def __init__(self, gpus: list[str]) -> None:
        self.gpus = list(gpus)
        self.holders = dict.fromkeys(self.gpus, 0)

    def take(self, n: float) -> list[str]:
        count = min(len(self.gpus), math.ceil(n))
        chosen = sorted(self.gpus, key=lambda g: (self.holders[g], self.gpus.index(g)))[:count]
        for g in chosen:
            self.holders[g] += 1
        return sorted(chosen, key=self.gpus.index)

    def give_back(self, ids: list[str]) -> None:
        for g in ids:
            if self.holders.get(g, 0) > 0:
                self.holders[g] -= 1


class GpuSandbox(Sandbox):
    """A local sandbox that sees the GPUs its function asked for, and only those."""

    def __init__(self, fn_key: str, services: dict[str, HostService], shares: GpuShares) -> None:
        super().__init__(fn_key, services)
        self.shares = shares
        self.gpus: list[str] = []

    def can_serve(self, spec: FunctionSpec) -> bool:
        """A pre-warmed (stem) sandbox was started without GPUs: only for functions that ask for none."""
        return num_gpus(spec) == 0

    async def start(
        self, launcher: Launcher, env: dict[str, str], tg: anyio.abc.TaskGroup, *, wait_ready: bool = True
    ) -> float:
        fp: Any = self.owner
        wanted = num_gpus(fp.spec if fp is not None else None)
        self.gpus = self.shares.take(wanted) if wanted else []
        try:
            took = await super().start(launcher, {**env, CUDA_ENV: ",".join(self.gpus)}, tg, wait_ready=wait_ready)
        except BaseException:
            self.shares.give_back(self.gpus)
            raise
        if self.gpus:
            tg.start_soon(self._give_back_when_closed)
        return took

    async def _give_back_when_closed(self) -> None:
        await self.closed.wait()
        self.shares.give_back(self.gpus)
