"""Readings of Linux's /proc that the tests and benchmarks share: process trees and memory figures.

Not used by the engine itself: leak checks (every sandbox gone after close, after a host was killed) and memory
figures (RSS of the host, PSS of sandboxes sharing pages with their zygote) are measured the same way everywhere.
"""

from __future__ import annotations

import collections
import os

__all__ = ("SPARE_WCHAN", "children", "descendants", "proc_table", "rss_kb", "smaps_rollup_kb", "wchan")

#: pid -> (state, parent pid, session id), as /proc/<pid>/stat gives them
ProcTable = dict[int, tuple[str, int, int]]


def proc_table() -> ProcTable:
    """Every process now: pid -> (state, ppid, session). Processes that end while it reads are left out."""
    table: ProcTable = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # the command name may hold spaces and parentheses: the fields start after its last ")"
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(entry)] = (fields[0], int(fields[1]), int(fields[3]))
    return table


def descendants(root: int, table: ProcTable) -> set[int]:
    """Every process below ``root`` in ``table`` (children, their children...)."""
    kids: collections.defaultdict[int, list[int]] = collections.defaultdict(list)
    for pid, (_, ppid, _) in table.items():
        kids[ppid].append(pid)
    out: set[int] = set()
    stack = [root]
    while stack:
        for child in kids[stack.pop()]:
            if child not in out:
                out.add(child)
                stack.append(child)
    return out


def children(pid: int) -> list[int]:
    """The direct children of ``pid`` (from each of its threads' ``children`` file)."""
    kids: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += [int(k) for k in f.read().split()]
    return kids


#: where a zygote's spare sleeps once it is ready: in the read of its request from the zygote's socket
SPARE_WCHAN = "unix_stream_read_generic"


def wchan(pid: int) -> str:
    """The kernel function a process sleeps in ("0" where the kernel does not tell, "" when it is gone)."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read().strip()
    except OSError:
        return ""


def rss_kb(pid: int | str = "self") -> int:
    """Resident set size of a process, in kB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise LookupError(f"no VmRSS in /proc/{pid}/status")


def smaps_rollup_kb(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/smaps_rollup (Pss: shared pages divided among their mappers; Private_*:
    the process's own)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out
