"""The in-sandbox model cache is sized from the function's memory limit, so loading many models evicts instead of
running out of address space."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import minifaas
from minifaas.testing import assert_success

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
