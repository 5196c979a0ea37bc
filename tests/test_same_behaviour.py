"""Each AI function gives the same result in-process (``minifaas.testing.call``) and in a sandbox of a real engine.

Same bundle, same photos, same models: the results must be equal dict for dict, numbers and encoded crop bytes
included. A difference means the sandbox (its fork of the preloaded interpreter, its limits, the host store's copy
of the models, the wire format) changes what a function computes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import minifaas
from minifaas.testing import call

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = ROOT / "functions"
IMAGES = ROOT / "tests" / "data" / "images"
AI_FUNCTIONS = ["image_quality", "smart_body_crop", "body_crop", "auto_tag"]
#: photo -> how it is passed: the bytes of a photo of a person, and paths to a still life and a blurred page
PHOTOS: dict[str, Any] = {
    "messi5.jpg-bytes": (IMAGES / "messi5.jpg").read_bytes(),
    "fruits.jpg-path": str(IMAGES / "fruits.jpg"),
    "text_motion.jpg-path": str(IMAGES / "text_motion.jpg"),
}
CASES = [(fn, photo) for fn in AI_FUNCTIONS for photo in PHOTOS]


@pytest.fixture(scope="module")
async def minifaas_engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[minifaas.Engine]:
    async with minifaas.Engine(state_dir=tmp_path_factory.mktemp("engine"), max_sandboxes=4) as eng:
        for fn in AI_FUNCTIONS:
            # the photos passed as paths lie under a folder granted to the functions (paths elsewhere are refused)
            await eng.deploy(fn, path=FUNCTIONS / fn, max_sandboxes=1, read_paths=[IMAGES])
        yield eng


def _kinds(value: Any) -> Any:
    """The value's shape with every leaf replaced by its type name, for a readable first assertion."""
    if isinstance(value, dict):
        return {k: _kinds(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_kinds(v) for v in value]
    return type(value).__name__


@pytest.mark.parametrize(("fn", "photo"), CASES, ids=[f"{fn}-{photo}" for fn, photo in CASES])
async def test_in_process_equals_sandbox(minifaas_engine: minifaas.Engine, fn: str, photo: str) -> None:
    args = {"image": PHOTOS[photo]}
    local = call(FUNCTIONS / fn, args, in_process=True)
    remote = await minifaas_engine.invoke(fn, args)
    assert _kinds(remote) == _kinds(local)
    assert remote == local
    if fn in ("smart_body_crop", "body_crop") and photo.startswith("messi"):
        # the photo of a person is cropped: the comparison above covered real image bytes
        assert isinstance(local["crop"], bytes) and len(local["crop"]) > 1000
