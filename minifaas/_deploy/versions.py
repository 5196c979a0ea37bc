"""Aliases of function versions, and weighted traffic splitting between the versions an alias points to.

A reference to a function is ``name`` (its latest version), ``name@3`` (version 3, pinned) or ``name@prod``
(an alias). An alias routes to one version or splits traffic by weight (``{"2": 90, "3": 10}``): each
invocation draws one version with a seedable :class:`random.Random`, so a canary can take a share of the
traffic and a test or a replay can fix the draws. Versions are decimal numbers, so an alias name never looks
like one.

Version numbers are never reused: the table keeps the highest number each function name was given (also after
the version, or the whole function, is deleted), so ``f@3`` never names other code than it did. Each version an
alias routes to is stored with its bundle's digest; an invocation through the alias whose version now runs other
code (a state dir whose counters were lost, an old table) is refused with :class:`AliasMismatch` rather than
silently switched.

The table is small and changes rarely: it lives in memory and, with a state dir, is rewritten whole to
``aliases.json`` after each change (a temporary file, then a rename: a crash leaves the old or the new table,
never half of one).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Final

from .._errors import DeployError, FunctionNotFound, MinifaasError

__all__ = ("ALIASES_FILE_NAME", "AliasMismatch", "AliasTable", "Routing", "VersionInUse", "split_ref")

ALIASES_FILE_NAME: Final = "aliases.json"
#: 2 adds the version counters and the digests of alias targets; a format 1 table is still read
ALIASES_FILE_FORMAT: Final = 2
READABLE_FORMATS: Final = (1, 2)
#: starts with a letter or '_' so that it can never be mistaken for a version number
ALIAS_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,63}$")
VERSION_RE: Final = re.compile(r"^[0-9]{1,18}$")
#: more targets than this is a configuration mistake, not a traffic split
MAX_ROUTES: Final = 32

#: what ``set_alias`` takes: one version ("2") or version -> weight ({"2": 90, "3": 10})
Routing = str | Mapping[str, float]


class VersionInUse(MinifaasError, ValueError):
    """Raised by ``Engine.delete("name@N")`` when an alias still routes traffic to version N."""


VersionInUse.__module__ = "minifaas"


class AliasMismatch(FunctionNotFound):
    """Raised when an alias routes to a version number that now runs other code than when the alias was set."""


AliasMismatch.__module__ = "minifaas"


def split_ref(ref: str) -> tuple[str, str]:
    """``"f@prod"`` -> ``("f", "prod")``; ``"f"`` -> ``("f", "")``."""
    base, _, qualifier = ref.partition("@")
    return base, qualifier


class AliasTable:
    """Alias name -> weighted versions, per function; persisted to ``path`` when one is given."""

    def __init__(self, path: Path | None = None, *, rng: random.Random | None = None) -> None:
        self.path = path
        #: draws the version of each invocation through a split alias; seed it to replay a sequence
        self.rng = rng if rng is not None else random.Random()
        self._table: dict[str, dict[str, list[tuple[str, float]]]] = {}
        #: name -> the highest version number ever given to it
        self._last: dict[str, int] = {}
        #: name -> version -> the bundle digest it had when an alias was pointed at it
        self._digests: dict[str, dict[str, str]] = {}
        if path is not None:
            self._table, self._last, self._digests = _load(path)
        #: writes from worker threads (:meth:`reserve_version`) go one at a time, and never an older snapshot over
        #: a newer one
        self._write_lock = threading.Lock()
        self._snapshots = 0
        self._written = 0

    def detached(self) -> AliasTable:
        """A copy that is never saved (what ``minifaas gc`` deploys to learn what is in use must not count)."""
        copy = AliasTable(rng=self.rng)
        copy._table = {n: dict(a) for n, a in self._table.items()}
        copy._last = dict(self._last)
        copy._digests = {n: dict(d) for n, d in self._digests.items()}
        return copy

    # -- versions -------------------------------------------------------------------------------------------
    def next_version(self, name: str, deployed: Sequence[str] = ()) -> str:
        """A version number ``name`` never had (persisted before it is returned)."""
        version, persist = self.reserve_version(name, deployed)
        persist()
        return version

    def reserve_version(self, name: str, deployed: Sequence[str] = ()) -> tuple[str, Callable[[], None]]:
        """A version number ``name`` never had, taken now, and the call that persists it (it fsyncs: a deploy runs
        it in a worker thread, where it does not hold up the event loop's other work, and awaits it before it
        hands the version out)."""
        last = max([self._last.get(name, 0), *(int(v) for v in deployed if VERSION_RE.match(v))])
        self._last[name] = last + 1
        return str(last + 1), self._saver()

    # -- editing --------------------------------------------------------------------------------------------
    def set_alias(
        self,
        name: str,
        alias: str,
        target: Routing,
        *,
        versions: Sequence[str] | None = None,
        digests: Mapping[str, str] | None = None,
    ) -> dict[str, float]:
        """Point ``name@alias`` at ``target``; ``versions`` (when given) are the versions that exist now,
        ``digests`` their bundle digests (kept for the versions the alias routes to).

        Returns the routing as stored: version -> weight. Raises :class:`DeployError` for a bad alias name,
        an unknown version or bad weights.
        """
        if not isinstance(alias, str) or not ALIAS_RE.match(alias):
            raise DeployError(
                f"invalid alias {alias!r}: start with a letter or '_', then letters, digits, '_' or '-' "
                "(a number would read as a version)"
            )
        routes = _routes(target)
        if versions is not None:
            missing = [v for v, _ in routes if v not in versions]
            if missing:
                have = ", ".join(versions) or "none"
                raise DeployError(
                    f"alias {name}@{alias} names version(s) {', '.join(missing)} that {name!r} does not have "
                    f"(versions: {have})"
                )
        self._table.setdefault(name, {})[alias] = routes
        if digests:
            known = self._digests.setdefault(name, {})
            known.update({v: digests[v] for v, _ in routes if v in digests})
        self._save()
        return dict(routes)

    def get_alias(self, name: str, alias: str) -> dict[str, float]:
        """The routing of ``name@alias`` (version -> weight); :class:`FunctionNotFound` if there is none."""
        return dict(self._routes_of(name, alias))

    def delete_alias(self, name: str, alias: str) -> None:
        self._routes_of(name, alias)
        aliases = self._table[name]
        del aliases[alias]
        if not aliases:
            del self._table[name]
        self._save()

    def aliases(self, name: str) -> dict[str, dict[str, float]]:
        """Every alias of ``name``: alias -> (version -> weight)."""
        return {alias: dict(routes) for alias, routes in self._table.get(name, {}).items()}

    def users(self, name: str, version: str) -> list[str]:
        """The aliases of ``name`` that route to ``version`` (with any weight, zero included)."""
        aliases = self._table.get(name, {})
        return sorted(a for a, routes in aliases.items() if any(v == version for v, _ in routes))

    def check_deletable(self, name: str, version: str) -> None:
        """Raise :class:`VersionInUse` when an alias still routes to ``name@version``."""
        users = self.users(name, version)
        if users:
            listed = ", ".join(f"{name}@{a}" for a in users)
            raise VersionInUse(
                f"version {version} of {name!r} is in use by alias(es) {listed}: point them at another "
                "version (set_alias) or delete them (delete_alias) first"
            )

    def drop_function(self, name: str) -> None:
        """Forget every alias of ``name`` (the function itself is being deleted); its version counter stays."""
        if self._table.pop(name, None) is not None or self._digests.pop(name, None) is not None:
            self._save()

    # -- routing --------------------------------------------------------------------------------------------
    def resolve(
        self,
        name_or_ref: str,
        versions: Sequence[str],
        rng: random.Random | None = None,
        *,
        digests: Mapping[str, str] | None = None,
    ) -> tuple[str, str | None]:
        """Pick the version an invocation of ``name_or_ref`` runs: ``(version, alias or None)``.

        ``versions`` are the deployed versions of the function, oldest first, ``digests`` their bundle digests.
        ``name`` is the latest version, ``name@3`` version 3, ``name@prod`` one of the alias's versions drawn by
        weight, checked against the digest it had when the alias was set.
        """
        name, qualifier = split_ref(name_or_ref)
        if not versions:
            raise FunctionNotFound(f"no function named {name!r} is deployed")
        if not qualifier:
            return versions[-1], None
        if VERSION_RE.match(qualifier):
            if qualifier not in versions:
                raise FunctionNotFound(
                    f"function {name!r} has no version {qualifier!r} (versions: {', '.join(versions)})"
                )
            return qualifier, None
        routes = self._routes_of(name, qualifier)
        live = [(v, w) for v, w in routes if w > 0]
        if len(live) == 1:
            version = live[0][0]
        else:
            draw = (rng or self.rng).choices([v for v, _ in live], weights=[w for _, w in live])
            version = draw[0]
        if version not in versions:
            # only possible for a table loaded from disk whose versions did not survive the restart
            raise FunctionNotFound(f"alias {name}@{qualifier} routes to version {version!r}, which is not deployed")
        expected = self._digests.get(name, {}).get(version)
        actual = (digests or {}).get(version)
        if expected is not None and actual is not None and expected != actual:
            raise AliasMismatch(
                f"alias {name}@{qualifier} was set on version {version} with bundle digest {expected[:12]}, but "
                f"version {version} now runs bundle {actual[:12]}: point the alias again (set_alias)"
            )
        return version, qualifier

    # -- persistence ----------------------------------------------------------------------------------------
    def _routes_of(self, name: str, alias: str) -> list[tuple[str, float]]:
        routes = self._table.get(name, {}).get(alias)
        if routes is None:
            known = ", ".join(sorted(self._table.get(name, {}))) or "none"
            raise FunctionNotFound(f"function {name!r} has no alias {alias!r} (aliases: {known})")
        return routes

    def _save(self) -> None:
        self._saver()()

    def _saver(self) -> Callable[[], None]:
        """The table as it is now (copied on the caller's thread), and the call that writes it."""
        if self.path is None:
            return _nothing
        path = self.path
        data = {
            "format": ALIASES_FILE_FORMAT,
            "aliases": {
                name: {alias: [[v, w] for v, w in routes] for alias, routes in aliases.items()}
                for name, aliases in self._table.items()
            },
            "last_versions": dict(self._last),
            "digests": {name: dict(d) for name, d in self._digests.items() if d},
        }
        self._snapshots += 1
        seq = self._snapshots

        def write() -> None:
            with self._write_lock:
                if seq <= self._written:
                    return  # a newer snapshot (which holds this one's changes) is on disk already
                _write(path, data)
                self._written = seq

        return write


def _nothing() -> None:
    return None


def _write(path: Path, data: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".aliases-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _routes(target: Routing) -> list[tuple[str, float]]:
    if isinstance(target, int) and not isinstance(target, bool):
        target = str(target)
    if isinstance(target, str):
        if not VERSION_RE.match(target):
            raise DeployError(f"alias target {target!r} is not a version number")
        return [(target, 100.0)]
    if not isinstance(target, Mapping) or not target:
        raise DeployError(f"alias target must be a version or a non-empty {{version: weight}} map: {target!r}")
    if len(target) > MAX_ROUTES:
        raise DeployError(f"an alias splits traffic between at most {MAX_ROUTES} versions, not {len(target)}")
    routes: list[tuple[str, float]] = []
    for version, weight in target.items():
        v = str(version)
        if not VERSION_RE.match(v):
            raise DeployError(f"alias target {version!r} is not a version number")
        number = isinstance(weight, int | float) and not isinstance(weight, bool)
        if not number or not math.isfinite(weight) or weight < 0:
            raise DeployError(f"weight of version {v} must be a finite number >= 0, not {weight!r}")
        routes.append((v, float(weight)))
    if not any(w > 0 for _, w in routes):
        raise DeployError("at least one version of an alias needs a weight above 0")
    return routes


_Loaded = tuple[dict[str, dict[str, list[tuple[str, float]]]], dict[str, int], dict[str, dict[str, str]]]


def _load(path: Path) -> _Loaded:
    try:
        raw = path.read_text("utf-8")
    except FileNotFoundError:
        return {}, {}, {}
    except OSError as exc:
        raise MinifaasError(f"cannot read the alias table {path}: {exc}") from None
    try:
        data = json.loads(raw)
        if data.get("format") not in READABLE_FORMATS:
            raise ValueError(f"unknown format {data.get('format')!r}")
        table = {
            str(name): {str(a): _routes({str(v): float(w) for v, w in routes}) for a, routes in aliases.items()}
            for name, aliases in data["aliases"].items()
        }
        last = {str(name): int(n) for name, n in data.get("last_versions", {}).items()}
        digests = {
            str(name): {str(v): str(d) for v, d in versions.items()}
            for name, versions in data.get("digests", {}).items()
        }
        return table, last, digests
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # refusing to start beats silently dropping a production alias
        raise MinifaasError(f"the alias table {path} is corrupt ({exc}); fix or remove it") from None
