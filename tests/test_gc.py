"""The collector: leftovers of killed builds and downloads, unused bundles, environments and model files over a
size budget; on start, on delete, through engine.gc() and `minifaas gc`. Real engines, files and locks."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import minifaas
from minifaas._deploy import gc as _gc

pytestmark = pytest.mark.anyio

PRELOAD = ("minifaas_sandbox.runtime",)
HOUR_S = 3600
ENV_KEY = "ab" * 16
DIGEST = "cd" * 32


def _age(path: Path, seconds: float) -> Path:
    t = time.time() - seconds
    os.utime(path, (t, t), follow_symlinks=False)
    return path


def _blob(folder: Path, name: str, size: int, age_s: float, *, folder_like: bool = True) -> Path:
    """A file, or a folder holding one file, of ``size`` bytes, last used ``age_s`` ago."""
    path = folder / name
    if folder_like:
        path.mkdir(parents=True)
        (path / "data.bin").write_bytes(b"\0" * size)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * size)
    return _age(path, age_s)


def _function(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "__main__.py").write_text(f"def main(args):\n    return {{'fn': {name!r}}}\n")
    return folder


async def test_start_removes_leftovers_of_killed_builds_and_downloads(tmp_path: Path) -> None:
    state = tmp_path / "state"
    stage = _blob(state / "bundles", ".stage-killed", 100, 2 * HOUR_S)
    part = _blob(state / "models" / "tmp", "dead.part", 100, 2 * HOUR_S, folder_like=False)
    live_part = _blob(state / "models" / "tmp", "live.part", 100, 1, folder_like=False)
    build = _blob(state / "envs", f".build-{ENV_KEY}-0badf00d", 100, 1)
    locked_key = "ef" * 16
    locked_build = _blob(state / "envs", f".build-{locked_key}-12345678", 100, 1)
    # a build in progress in another process holds its key's lock
    fd = os.open(state / "envs" / f".{locked_key}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        async with minifaas.Engine(state, preload=PRELOAD):
            pass
    finally:
        os.close(fd)
    assert not stage.exists() and not part.exists() and not build.exists()
    assert live_part.exists() and locked_build.exists()


async def test_unused_things_go_least_recently_used_first_within_the_budget(tmp_path: Path) -> None:
    state = tmp_path / "state"
    async with minifaas.Engine(state, preload=PRELOAD, gc_budget_bytes=1 << 40) as engine:
        info = await engine.deploy("kept", path=_function(tmp_path, "kept"))
        kept = state / "bundles" / info["digest"]
        _age(kept, 10 * HOUR_S)  # old, but in use: never removed
        oldest = _blob(state / "bundles", "1" * 64, 10_000, 5 * HOUR_S)
        env = _blob(state / "envs", ENV_KEY, 10_000, 4 * HOUR_S)
        model = _blob(state / "models" / "sha256", DIGEST, 10_000, 3 * HOUR_S, folder_like=False)
        newest = _blob(state / "bundles", "2" * 64, 10_000, 2 * HOUR_S)
        recent = _blob(state / "bundles", "3" * 64, 10_000, 60)  # within the minimum age
        assert (await engine.gc())["removed"] == []  # under the budget
        used = sum(f.stat().st_size for f in kept.rglob("*") if f.is_file())
        # room for what is in use, the recent one and one more: the three least recently used go
        report = await engine.gc(used + 20_000 + 100)
        assert sorted(report["removed"]) == sorted(map(str, (oldest, env, model)))
        assert report["freed_bytes"] == 30_000
        assert kept.is_dir() and newest.is_dir() and recent.is_dir()
        assert await engine.invoke("kept") == {"fn": "kept"}
        report = await engine.gc(0)
        assert report["removed"] == [str(newest)] and kept.is_dir() and recent.is_dir()


async def test_delete_collects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_gc, "GC_MIN_AGE_S", 0.0)
    state = tmp_path / "state"
    async with minifaas.Engine(state, preload=PRELOAD, gc_budget_bytes=0) as engine:
        one = await engine.deploy("one", path=_function(tmp_path, "one"))
        two = await engine.deploy("two", path=_function(tmp_path, "two"))
        await engine.delete("one")
        assert not (state / "bundles" / one["digest"]).exists()
        assert (state / "bundles" / two["digest"]).is_dir()
        assert await engine.invoke("two") == {"fn": "two"}


def test_gc_command(tmp_path: Path) -> None:
    state = tmp_path / "state"
    old = _blob(state / "bundles", "4" * 64, 5_000, 5 * HOUR_S)
    stage = _blob(state / "bundles", ".stage-x", 10, 5 * HOUR_S)
    cmd = [sys.executable, "-m", "minifaas._cli.main", "gc", "--state-dir", str(state), "--budget-mb", "0", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(out.stdout)
    # the leftover went when the command's engine started, the unused bundle with the command's budget
    assert report["removed"] == [str(old)] and report["budget_bytes"] == 0
    assert not old.exists() and not stage.exists()


async def test_an_environment_another_engine_uses_stays(tmp_path: Path) -> None:
    state = tmp_path / "state"
    held = _blob(state / "envs", ENV_KEY, 10_000, 5 * HOUR_S)
    free = _blob(state / "envs", "12" * 16, 10_000, 5 * HOUR_S)
    (state / "envs" / f".{free.name}.use").touch()  # left by an engine that closed
    other = _gc.EnvHolds()  # what another engine whose function uses the environment holds
    other.update([held])
    try:
        async with minifaas.Engine(state, preload=PRELOAD) as engine:
            report = await engine.gc(0)
    finally:
        other.close()
    assert report["removed"] == [str(free)] and held.is_dir()
    assert not (state / "envs" / f".{free.name}.use").exists()


def test_gc_command_keeps_what_saved_actions_use(tmp_path: Path) -> None:
    state = tmp_path / "state"
    fn = _function(tmp_path, "saved")
    cli = [sys.executable, "-m", "minifaas._cli.main"]
    local = ["--local", "--state-dir", str(state)]
    subprocess.run([*cli, "action", "create", "saved", str(fn), *local], capture_output=True, timeout=120, check=True)
    bundles = [p for p in (state / "bundles").iterdir() if not p.name.startswith(".")]
    assert len(bundles) == 1
    for b in bundles:
        _age(b, 5 * HOUR_S)
    versions = json.loads((state / "aliases.json").read_text())["last_versions"]
    cmd = [*cli, "gc", "--state-dir", str(state), "--budget-mb", "0", "--json"]
    report = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout)
    assert report["removed"] == [] and all(b.is_dir() for b in bundles)
    # deploying the saved actions to see what they use did not use up version numbers
    assert json.loads((state / "aliases.json").read_text())["last_versions"] == versions
