"""The collector of what deploys and model fetches leave on disk: ``engine.gc()`` and ``minifaas gc``.

Two kinds of things go:

- leftovers of work that died (a killed build or download): ``.build-*`` folders of environment builds nobody
  holds the build lock of, ``.stage-*`` bundle staging folders and the model store's ``tmp/*.part`` files not
  written for ``stale_after_s``;
- when everything together is over ``budget_bytes``: staged bundles, per-function environments and model files
  no deployed function uses, least recently used first, until under the budget. Anything used within
  ``min_age_s`` stays (another engine sharing the folders may have just deployed it), and so does everything a
  deployed function uses, whatever the budget. An environment a function of any engine on this machine uses is
  held with a shared lock on ``<root>/.<key>.use`` (:class:`EnvHolds`), and stays: environments are shared by
  every engine without a state dir, and a sandbox cannot start without its environment (a removed model file is
  only fetched again).

Deploys and model fetches touch what they use (its mtime), which is what "recently used" reads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

__all__ = ("GC_BUDGET_BYTES", "EnvHolds", "GcReport", "Roots", "collect", "touch")

#: what the collectable folders may hold together before unused things go (10 GiB)
GC_BUDGET_BYTES: Final = 10 << 30
#: a leftover not written for this long belongs to no live build or download
GC_STALE_AFTER_S: Final = 3600.0
#: something used this recently is kept even when unused here: another engine may have just deployed it
GC_MIN_AGE_S: Final = 600.0
ENV_KEY_RE: Final = re.compile(r"^[0-9a-f]{32}$")
BUNDLE_DIGEST_RE: Final = re.compile(r"^[0-9a-f]{64}$")
BUILD_RE: Final = re.compile(r"^\.build-([0-9a-f]{32})-[0-9a-f]+$")


@dataclass(frozen=True)
class Roots:
    """The folders one engine writes to (None: it has none of that kind)."""

    bundles: Path | None = None
    envs: Path | None = None
    models: Path | None = None


@dataclass
class GcReport:
    """What one collection removed and what it kept."""

    removed: list[str] = field(default_factory=list)
    freed_bytes: int = 0
    kept_bytes: int = 0
    budget_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "removed": list(self.removed),
            "freed_bytes": self.freed_bytes,
            "kept_bytes": self.kept_bytes,
            "budget_bytes": self.budget_bytes,
        }


class EnvHolds:
    """Shared locks on the environments this engine's functions use (see the module's docstring)."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def update(self, envs: Iterable[Path]) -> None:
        """Hold exactly ``envs`` from now on."""
        wanted = set(envs)
        for env in [e for e in self._fds if e not in wanted]:
            os.close(self._fds.pop(env))  # closing releases the lock
        for env in wanted - set(self._fds):
            try:
                fd = os.open(_use_lock(env), os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                continue
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._fds[env] = fd

    def close(self) -> None:
        self.update(())


def _use_lock(env: Path) -> Path:
    return env.parent / f".{env.name}.use"


def touch(path: Path) -> None:
    """Mark ``path`` used now (the collector removes the least recently used first)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def collect(
    roots: Roots,
    in_use: Iterable[Path],
    *,
    budget_bytes: int = GC_BUDGET_BYTES,
    stale_after_s: float | None = None,
    min_age_s: float | None = None,
    now: Callable[[], float] = time.time,
) -> GcReport:
    """Remove leftovers, then unused things least recently used first until under ``budget_bytes``."""
    stale_after_s = GC_STALE_AFTER_S if stale_after_s is None else stale_after_s
    min_age_s = GC_MIN_AGE_S if min_age_s is None else min_age_s
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
    keep = {p.resolve() for p in in_use}
    report = GcReport(budget_bytes=budget_bytes)
    t = now()
    for leftover in _leftovers(roots, t - stale_after_s):
        _remove(leftover, report)
    candidates: list[tuple[float, int, Path]] = []
    total = 0
    for item in _collectables(roots):
        size = _size(item)
        total += size
        try:
            used = item.lstat().st_mtime
        except OSError:
            continue
        if item.resolve() not in keep and used < t - min_age_s and not _locked(_use_lock(item)):
            candidates.append((used, size, item))
    for _used, size, item in sorted(candidates):
        if total <= budget_bytes:
            break
        if _remove(item, report):
            total -= size
    report.kept_bytes = total
    return report


def _leftovers(roots: Roots, stale_before: float) -> list[Path]:
    # a collection killed between its rename and its rmtree
    found = [p for root in (roots.bundles, roots.envs) if root is not None for p in _children(root)]
    found = [p for p in found if p.name.startswith(".gc-")]
    if roots.bundles is not None:
        found += [p for p in _children(roots.bundles) if p.name.startswith(".stage-") and _older(p, stale_before)]
    if roots.models is not None:
        found += [p for p in _children(roots.models / "tmp") if p.name.endswith(".part") and _older(p, stale_before)]
    if roots.envs is not None:
        for p in _children(roots.envs):
            m = BUILD_RE.match(p.name)
            # a build in progress holds its key's lock: whatever its age, its folder stays
            if m is not None and not _locked(roots.envs / f".{m.group(1)}.lock"):
                found.append(p)
    return found


def _collectables(roots: Roots) -> list[Path]:
    found: list[Path] = []
    if roots.bundles is not None:
        found += [p for p in _children(roots.bundles) if BUNDLE_DIGEST_RE.match(p.name) and p.is_dir()]
    if roots.envs is not None:
        found += [p for p in _children(roots.envs) if ENV_KEY_RE.match(p.name) and p.is_dir()]
    if roots.models is not None:
        found += [p for p in _children(roots.models / "sha256") if BUNDLE_DIGEST_RE.match(p.name) and p.is_file()]
    return found


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _older(path: Path, before: float) -> bool:
    try:
        return path.lstat().st_mtime < before
    except OSError:
        return False


def _locked(lock: Path) -> bool:
    """True when a builder holds ``lock`` (the environment build lock of _deps)."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EACCES)
    finally:
        os.close(fd)  # also releases the lock taken just now
    return False


def _size(path: Path) -> int:
    try:
        st = path.lstat()
    except OSError:
        return 0
    if not path.is_dir() or path.is_symlink():
        return st.st_size
    total = 0
    for dirpath, _dirs, files in os.walk(path, followlinks=False):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _remove(path: Path, report: GcReport) -> bool:
    size = _size(path)
    try:
        if path.is_dir() and not path.is_symlink():
            # renamed first: a half-removed environment must never look like a finished one
            doomed = path.with_name(f".gc-{path.name}-{os.getpid()}")
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        return False
    with contextlib.suppress(OSError):
        _use_lock(path).unlink()  # an environment's, when nobody holds it any more
    report.removed.append(str(path))
    report.freed_bytes += size
    return True
