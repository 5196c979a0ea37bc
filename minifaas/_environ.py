"""The environment every sandbox starts with: an allow-list of the host's variables plus fixed defaults.

A leaf module (it imports nothing of minifaas): launchers, dependency builds (pip runs a requirement's build code
with the same scrubbed environment as sandboxes) and backends all start processes with it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Final

__all__ = ("ENV_ALLOW", "ISOLATION_ENV", "SANDBOX_ENV_DEFAULTS", "scrubbed_env")

#: host variables a sandbox may inherit; everything else (tokens, keys, cloud credentials) is dropped
ENV_ALLOW: Final[frozenset[str]] = frozenset(
    {
        "PATH",
        "HOME",
        "LANG",
        "LC_ALL",
        "LC_CTYPE",
        "TZ",
        "TMPDIR",
        "PYTHONHASHSEED",
        "OPENBLAS_CORETYPE",
        "OPENBLAS_L2_SIZE",
        "PYTHONPATH",
        "VIRTUAL_ENV",
        "SYSTEMROOT",
        "MINIFAAS_MODEL_CACHE",
    }
)
#: thread pools of numeric libraries are pinned to one thread per sandbox: sandboxes, not threads, give parallelism
SANDBOX_ENV_DEFAULTS: Final[dict[str, str]] = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONDONTWRITEBYTECODE": "1",
    # keep freed image-sized buffers in the heap: otherwise glibc returns them and every activation re-faults
    # ~390 pages of a vision function (measured: 1-3 ms per call, 0 faults with these)
    "MALLOC_MMAP_THRESHOLD_": str(4 << 20),
    "MALLOC_TRIM_THRESHOLD_": str(32 << 20),
    # one heap arena per thread (OpenCV's pool) would reserve 64 MiB of address space each, counted against the
    # sandbox's RLIMIT_AS; glibc reads these at process start, so they must be in the zygote's environment too
    "MALLOC_ARENA_MAX": "2",
}

#: set to "sandbox" in the env of a launch for isolation="sandbox": a zygote forks that child as pid 1 of a PID
#: namespace of its own (the function sees it too; minifaas_sandbox.zygote.ISOLATION_ENV)
ISOLATION_ENV: Final = "MINIFAAS_ISOLATION"


def scrubbed_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k in ENV_ALLOW}
    env.update(SANDBOX_ENV_DEFAULTS)
    if extra:
        env.update(extra)
    return env
