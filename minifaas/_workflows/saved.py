"""Deployed compositions kept in the state dir, so that an engine restarted on it has them before anything fires.

Each composition is one JSON file under ``state_dir/compositions``: its JSON IR, version, default parameters,
step limit and condition rule. A file is written atomically (0600) when the composition is deployed and removed
when it is deleted; an engine starting on the state dir deploys them all again (before its feeds resume).

Only a composition whose IR comes back as itself is kept: a function step must be a module-level function that
``from_json`` imports back (a lambda, a nested function, a bound method, a partial or a callable instance would
come back as something else, or not at all). :func:`check_lossless` names the first step that would not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Final

from .._core.statedir import PRIVATE_DIR_MODE, write_private
from .._errors import CompositionError
from ..composer import Composition

__all__ = ("COMPOSITIONS_SUBDIR", "CompositionFiles", "SavedComposition", "check_lossless")

COMPOSITIONS_SUBDIR: Final = "compositions"
#: bumped when the record's fields change incompatibly
SAVED_FORMAT: Final = 1
#: longer names are stored under a digest: a file name holds 255 bytes
MAX_PLAIN_FILE_NAME_BYTES: Final = 200

logger = logging.getLogger("minifaas.compositions")


@dataclasses.dataclass(frozen=True, slots=True)
class SavedComposition:
    """One deployed composition as the state dir keeps it."""

    name: str
    version: str
    ir: dict[str, Any]
    params: dict[str, Any]
    max_steps: int
    conditions: str
    #: deploy time, epoch ms
    created: int

    def to_json(self) -> dict[str, Any]:
        return {"format": SAVED_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SavedComposition:
        if d.get("format") != SAVED_FORMAT:
            raise ValueError(f"unknown format {d.get('format')!r}")
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def check_lossless(comp: Composition) -> dict[str, Any]:
    """The IR of ``comp`` if it reads back as ``comp`` itself; else CompositionError naming the step."""
    for node in comp.walk():
        ref = node.fn_ref or ""
        if node.type == "function" and "<" in ref:
            raise CompositionError(
                f"the function step at root{node.path} ({ref}) cannot be stored: lambdas, nested functions, bound "
                "methods, partials and callable instances do not import back as themselves; define it at module "
                "top level"
            )
    ir = comp.to_json()
    try:
        text = json.dumps(ir, allow_nan=False)
        back = Composition.from_json(json.loads(text))
    except (TypeError, ValueError) as exc:  # CompositionError is a ValueError
        raise CompositionError(f"the composition cannot be stored: {exc}") from None
    if back != comp:
        raise CompositionError("the composition cannot be stored: its JSON IR reads back as another composition")
    return ir


class CompositionFiles:
    """The saved compositions of one state dir (``folder=None``: nothing is kept)."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder

    def _path(self, name: str) -> Path:
        assert self.folder is not None
        if len(name.encode()) <= MAX_PLAIN_FILE_NAME_BYTES:
            return self.folder / f"{name}.json"
        return self.folder / f"{hashlib.sha256(name.encode()).hexdigest()}.json"

    def save(self, saved: SavedComposition) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR_MODE)
        write_private(self._path(saved.name), json.dumps(saved.to_json(), sort_keys=True).encode())

    def forget(self, name: str) -> None:
        if self.folder is not None:
            with contextlib.suppress(FileNotFoundError):
                self._path(name).unlink()

    def load(self) -> list[SavedComposition]:
        """Every readable record, by name; an unreadable file is logged and skipped (the others still load)."""
        if self.folder is None or not self.folder.is_dir():
            return []
        out: list[SavedComposition] = []
        for path in sorted(self.folder.glob("*.json")):
            try:
                out.append(SavedComposition.from_json(json.loads(path.read_text("utf-8"))))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.error("skipping unreadable saved composition %s: %s", path, exc)
        return out
