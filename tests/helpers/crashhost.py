"""A host killed with -9 while it submits without pause: the harness the reliability test and benchmark share.

The host runs in a subprocess with a state folder (SQLite records), deploys a sleeping and a quick function, then
submits batches forever, printing ``acc <activation id>`` when it accepts and ``end <id> <status>`` when one ends.
After the kill, the caller compares those lines with what a new engine on the same state folder reads back.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

from minifaas._core.function import MAX_SANDBOXES

from .proc import descendants, proc_table

__all__ = ("HOST", "run_host_and_kill")

HOST = textwrap.dedent("""
    import random, sys, anyio, minifaas
    SLEEP = "import time\\ndef main(a):\\n    time.sleep(a['s'])\\n    return {'i': a['i']}\\n"
    state_dir, batch, max_sandboxes = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    async def main():
        async with minifaas.Engine(state_dir=state_dir) as engine:
            engine.add_end_hook(lambda a: print("end", a.activation_id, a.status, flush=True))
            await engine.deploy("w", code=SLEEP, max_sandboxes=max_sandboxes)
            await engine.deploy("q", code="def main(a):\\n    return {'i': a['i']}\\n", max_sandboxes=max_sandboxes)
            await engine.invoke("q", {"i": -1})
            print("ready", flush=True)
            i = 0
            while True:
                for _ in range(batch):
                    aid = await engine.submit("w" if i % 2 else "q", {"i": i, "s": random.random() * 0.05})
                    print("acc", aid, flush=True)
                    i += 1
                await anyio.sleep(0.01)
    anyio.run(main)
""")


def run_host_and_kill(
    state_dir: str | Path, kill_after_s: float, *, batch: int = 40, max_sandboxes: int = MAX_SANDBOXES
) -> tuple[list[list[str]], set[int]]:
    """Start the host, let it submit for ``kill_after_s`` once ready, SIGKILL it (no clean-up of any kind runs);
    its output lines, split, and the processes it had (zygote, sandboxes) just before the kill."""
    argv = [sys.executable, "-c", HOST, str(state_dir), str(batch), str(max_sandboxes)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    head = []
    while (line := proc.stdout.readline()) and line.strip() != "ready":
        head.append(line.split())
    time.sleep(kill_after_s)
    family = descendants(proc.pid, proc_table())
    proc.kill()
    proc.wait()
    lines = head + [line.split() for line in proc.stdout.read().splitlines()]
    proc.stdout.close()
    return lines, family
