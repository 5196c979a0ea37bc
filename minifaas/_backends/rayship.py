"""What a Ray node needs from the host, shipped the Ray way: no path of the host's disk reaches another node.

- a dir bundle: zipped and ``ray.put`` once per digest; a node unpacks it once into its own cache;
- models a function names (bundle ``minifaas.json``, ``models=``, ``file://`` params): fetched into the host's
  content-addressed store, ``ray.put`` once per sha256; a node writes the bytes into its own store by that hash;
- requirements: the text goes out, each node builds (and caches by content hash) its own environment.

The host holds an object reference only while a live sandbox uses it (:class:`Shipments` counts them), so the
object store frees an archive once no sandbox of that code is left, and the host keeps no copy of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
import urllib.parse
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import anyio.to_thread
import ray

from .._errors import ModelError

__all__ = ("Shipments", "local_url", "store_model_bytes", "unpack_bundle")

BUNDLE_CACHE_DIR: Final = "minifaas-ray-bundles"


def local_url(value: object) -> bool:
    """True for a ``file://`` URL: a path of the host's disk, which another node does not see."""
    return isinstance(value, str) and urllib.parse.urlparse(value).scheme == "file"


def _zip_folder(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                zf.write(f, f.relative_to(folder).as_posix())
    return buf.getvalue()


class Shipments:
    """The host's object references to shipped bundles and models, each held while a live sandbox uses it."""

    def __init__(self, model_root: Path) -> None:
        self.model_root = model_root
        self._refs: dict[str, Any] = {}
        self._users: dict[str, int] = {}
        self._store: Any = None
        self.puts = 0
        self.bytes_put = 0

    def _hold(self, key: str) -> Any:
        self._users[key] = self._users.get(key, 0) + 1
        return self._refs.get(key)

    def _put(self, key: str, data: bytes) -> Any:
        ref = self._refs.get(key)
        if ref is None:
            ref = self._refs[key] = ray.put(data)
            self.puts += 1
            self.bytes_put += len(data)
        return ref

    def release(self, keys: Iterable[str]) -> None:
        """A sandbox is gone: drop the references no other live sandbox uses (the object store frees them)."""
        for key in keys:
            n = self._users.get(key, 0) - 1
            if n > 0:
                self._users[key] = n
            else:
                self._users.pop(key, None)
                self._refs.pop(key, None)

    def held(self) -> int:
        return len(self._refs)

    async def bundle(self, source: dict[str, Any], holds: list[str]) -> dict[str, Any]:
        """``source`` (INIT's) with its dir bundle as an object reference instead of a host path."""
        if source.get("kind") != "dir":
            return source
        entry = Path(str(source["path"]))
        digest = entry.parent.name  # bundles are unpacked into <work dir>/<digest>/
        key = f"bundle:{digest}"
        holds.append(key)
        ref = self._hold(key)
        if ref is None:
            data = await anyio.to_thread.run_sync(_zip_folder, entry.parent)
            ref = self._put(key, data)
        return {"kind": "dir", "entry": entry.name, "digest": digest, "archive": ref}

    async def models(self, urls: Iterable[str], holds: list[str]) -> dict[str, tuple[str, Any]]:
        """url -> (sha256, object reference) of each ``file://`` model, fetched into the host's store."""
        if self._store is None:
            from .._deploy.modelstore import ModelStore

            self._store = ModelStore(self.model_root)
        out: dict[str, tuple[str, Any]] = {}
        for url in dict.fromkeys(u for u in urls if local_url(u)):
            path = Path(await self._store.fetch(url))
            sha = path.name
            key = f"model:{sha}"
            holds.append(key)
            ref = self._hold(key)
            if ref is None:
                ref = self._put(key, await anyio.to_thread.run_sync(path.read_bytes))
            out[url] = (sha, ref)
        return out


# -- on a node ----------------------------------------------------------------------------------------------------
def unpack_bundle(digest: str, entry: str, archive: bytes) -> str:
    """Unpack a shipped bundle into this node's cache (once per digest); the path of its entry file."""
    root = Path(tempfile.gettempdir()) / BUNDLE_CACHE_DIR
    target = root / digest
    path = target / entry
    if not path.is_file():
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".part-", dir=root))
        with zipfile.ZipFile(io.BytesIO(archive)) as zf:
            zf.extractall(staging)
        try:
            os.replace(staging, target)
        except OSError:  # another actor of this node unpacked it first
            shutil.rmtree(staging, ignore_errors=True)
    return str(path)


def store_model_bytes(root: Path, sha256: str, data: bytes) -> Path:
    """Write shipped model bytes into this node's store by their hash (verified), as the model store lays it out."""
    path = root / "sha256" / sha256
    if path.is_file():
        return path
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ModelError(f"shipped model bytes hash to {digest}, not {sha256}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o444)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path
