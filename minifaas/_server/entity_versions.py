"""OpenWhisk's entity versions for triggers and rules: ``0.0.1`` when created, one more on every update.

(Actions and packages keep theirs in their own saved bodies.) With a state dir the counters are kept in
``state_dir/server/versions.json`` so that a restarted server shows the same versions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Final

from .._core.statedir import PRIVATE_DIR_MODE, write_private

__all__ = ("VERSIONS_FILE", "EntityVersions", "semver")

VERSIONS_FILE: Final = "server/versions.json"

logger = logging.getLogger("minifaas.server")


def semver(n: int) -> str:
    return f"0.0.{n}"


class EntityVersions:
    """``(kind, name) -> N`` of version ``0.0.N``."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._n: dict[str, int] = {}
        if path is not None and path.is_file():
            try:
                data = json.loads(path.read_text("utf-8"))
                self._n = {str(k): int(v) for k, v in data.items()}
            except (OSError, ValueError, TypeError, AttributeError) as exc:
                logger.error("entity versions in %s are unreadable, starting again at 0.0.1: %s", path, exc)

    def get(self, kind: str, name: str) -> str:
        return semver(self._n.get(f"{kind}/{name}", 1))

    def created(self, kind: str, name: str) -> str:
        self._n[f"{kind}/{name}"] = 1
        self._save()
        return semver(1)

    def bumped(self, kind: str, name: str) -> str:
        key = f"{kind}/{name}"
        self._n[key] = self._n.get(key, 1) + 1
        self._save()
        return semver(self._n[key])

    def drop(self, kind: str, name: str) -> None:
        if self._n.pop(f"{kind}/{name}", None) is not None:
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        write_private(self.path, json.dumps(self._n).encode("utf-8"))
