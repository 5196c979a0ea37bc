"""The in-sandbox model cache is sized from the function's memory limit, so loading many models evicts instead of
running out of address space; an idle sandbox gives back the heap its activations freed."""

from __future__ import annotations

import shutil
from pathlib import Path

import anyio
import pytest
from minifaas_sandbox import runtime

import minifaas
from minifaas.testing import assert_success
from tests.helpers.proc import smaps_rollup_kb

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
LANDMARKS = ROOT / "functions" / "models" / "pose_landmark_full.tflite"

CODE = """
from minifaas_sandbox import models
def main(args):
    for url in args["urls"]:
        models.load(url)
    return {"held": models.held(), "stats": models.stats()}
"""


async def test_many_models_under_a_small_memory_limit(tmp_path: Path) -> None:
    urls = []
    for i in range(6):  # 6 x 6.4 MB files: about 400 MB of interpreters, far over 256 MB if all were kept
        copy = tmp_path / f"landmarks{i}.tflite"
        shutil.copy(LANDMARKS, copy)
        urls.append(copy.as_uri())
    async with minifaas.Engine(state_dir=tmp_path / "state") as engine:
        await engine.deploy("many", code=CODE, memory_mb=256)
        act = await engine.call("many", {"urls": urls})
        assert_success(act)
        stats = act.result["stats"]
        assert stats["evictions"] >= 2
        assert stats["max_bytes"] == (256 << 20) // 10
        assert len(act.result["held"]) < len(urls)


#: allocates then frees many heap chunks (each far below MALLOC_MMAP_THRESHOLD_, so they come from the brk heap)
CHURN = """
import os
def main(args):
    chunks = [bytes(64 << 10) for _ in range(args["mib"] * 16)]
    del chunks
    return {"pid": os.getpid()}
"""
CHURN_MIB = 24


def private_dirty_mib(pid: int) -> float:
    return smaps_rollup_kb(pid)["Private_Dirty"] / 1024


async def test_idle_sandbox_returns_its_free_heap(tmp_path: Path) -> None:
    idle_s = runtime.IDLE_TRIM_AFTER_S
    async with minifaas.Engine(state_dir=tmp_path / "state") as engine:
        await engine.deploy("churn", code=CHURN)
        act = await engine.call("churn", {"mib": CHURN_MIB})
        assert_success(act)
        pid = act.result["pid"]
        # glibc keeps the freed chunks (MALLOC_TRIM_THRESHOLD_), so the next activation reuses them without faults
        busy = private_dirty_mib(pid)
        await anyio.sleep(idle_s + 0.5)
        idle = private_dirty_mib(pid)
        assert busy - idle >= CHURN_MIB / 2, (busy, idle)
        # still serving, and trims again after its next activation
        act = await engine.call("churn", {"mib": CHURN_MIB})
        assert_success(act)
        assert act.result["pid"] == pid
        assert private_dirty_mib(pid) - idle >= CHURN_MIB / 2
        await anyio.sleep(idle_s + 0.5)
        assert private_dirty_mib(pid) - idle < CHURN_MIB / 4
