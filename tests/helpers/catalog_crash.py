"""The catalog under crashes: a host running the workflow off a folder feed, killed -9 and restarted.

Shared by ``benches/bench_reliability.py --only catalog`` (1,000 photos) and ``tests/test_catalog.py`` (a few).
``setup`` creates the trigger, rule and feed in a state folder; ``run_host`` starts a host on it (deploy the
composition and the functions: the saved feed resumes once its target and the functions it calls exist) and kills
it -9 after a while, or once the feed has nothing pending; ``tally`` says where each photo ended.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

from .proc import descendants, proc_table

__all__ = ("HOST", "drop_photos", "run_host", "setup", "tally")

FUNCTIONS_DIR: Final = Path(__file__).resolve().parents[2] / "functions"
#: polls of the feed (every 0.2 s) with nothing pending before a run counts as finished
QUIET_POLLS: Final = 25

HOST: Final = """
import sys, anyio, minifaas
sys.path.insert(0, sys.argv[2])
from catalog import workflow as wf
state, root, mode = sys.argv[1], sys.argv[3], sys.argv[4]
async def main():
    async with minifaas.Engine(state_dir=state) as engine:
        tm = engine.triggers
        if mode == "setup":
            tm.create_trigger("photos", rate_per_minute=None)
            tm.create_rule("to-catalog", "photos", "catalog")
            await tm.add_feed("photos", "folder", path=root + "/uploads", interval_s=0.2, settle_s=0.5)
            return
        # the composition first: the state dir kept it, so the saved feed starts once the functions are back,
        # and the catalog's sweep of staging files must come before any session of this run
        params = {"catalog_dir": root + "/catalog", "rejected_dir": root + "/rejected"}
        await wf.deploy_catalog(engine, params=params)
        await wf.deploy_functions(engine, grants=[root])  # the saved feed starts now: its target and all it calls exist
        print("ready", flush=True)
        while True:
            await anyio.sleep(0.2)
            feed = tm.list_feeds()[0]
            print("pending", feed.pending, feed.fires, flush=True)
anyio.run(main)
"""


def _host(state: Path, root: Path, mode: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-c", HOST, str(state), str(FUNCTIONS_DIR), str(root), mode]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)


def setup(state: Path, root: Path) -> None:
    """Create the uploads folder and, in ``state``, the trigger, rule and folder feed."""
    (root / "uploads").mkdir(parents=True, exist_ok=True)
    with _host(state, root, "setup") as proc:
        proc.communicate()


def drop_photos(root: Path, images: list[Path], count: int) -> list[str]:
    """Rename ``count`` copies of ``images`` into ``root/uploads`` as p0000.jpg ...; their stems."""
    stems = []
    for i in range(count):
        src = images[i % len(images)]
        tmp = root / "uploads" / f".p{i:04}{src.suffix}.part"
        tmp.write_bytes(src.read_bytes())
        tmp.replace(root / "uploads" / f"p{i:04}{src.suffix}")
        stems.append(f"p{i:04}")
    return stems


def run_host(state: Path, root: Path, kill_after_s: float | None) -> tuple[int, set[int]]:
    """Run a host; kill -9 it ``kill_after_s`` after it is ready (None: once nothing is pending for a while).
    Returns the fires its feed reported and its processes just before the kill."""
    proc = _host(state, root, "run")
    assert proc.stdout is not None
    fires = 0
    ready_at: float | None = None
    quiet = 0
    while line := proc.stdout.readline():
        words = line.split()
        if words == ["ready"]:
            ready_at = time.monotonic()
        elif words[:1] == ["pending"]:
            fires = int(words[2])
            quiet = quiet + 1 if words[1] == "0" else 0
        if ready_at is not None and (
            (kill_after_s is not None and time.monotonic() - ready_at >= kill_after_s)
            or (kill_after_s is None and quiet >= QUIET_POLLS)
        ):
            break
    family = descendants(proc.pid, proc_table())
    proc.kill()
    proc.wait()
    proc.stdout.close()
    return fires, family


def tally(root: Path, stems: list[str]) -> dict[str, Any]:
    """Where each photo ended: exactly once, in both folders, missing; outcomes; staging files left."""
    where = {s: [f for f in ("catalog", "rejected") if (root / f / f"{s}.json").exists()] for s in stems}
    outcomes = collections.Counter(
        json.loads((root / w[0] / f"{s}.json").read_text())["outcome"] for s, w in where.items() if len(w) == 1
    )
    return {
        "exactly_once": sum(1 for w in where.values() if len(w) == 1),
        "in_both": sum(1 for w in where.values() if len(w) > 1),
        "missing": sum(1 for w in where.values() if not w),
        "outcomes": dict(outcomes),
        "staging_files_left": sum(1 for f in ("catalog", "rejected") for _ in (root / f).glob(".*")),
    }
