"""The host's content-addressed on-disk model store: each model is fetched once per machine.

Layout under ``root``::

    root/index.json         url -> {"sha256", "size", "mtime_ns" (local sources only)}
    root/sha256/<hex>       the model bytes, named by their sha256, written once and never modified
    root/tmp/<random>.part  downloads in progress (renamed into sha256/ with os.replace once verified)

Sources: plain paths and file:// (copied in, so a sandbox always loads a verified immutable file; copied again
when the source's size or mtime changes), http(s):// (``minifaas_sandbox.http_fetch``, stdlib http.client: an
overall deadline, prompt cancellation, Content-Length checked, bounded retries; fsspec's HTTP filesystem would
need aiohttp), and every other fsspec protocol whose backend is installed (s3:// needs
``pip install 'minifaas[s3]'``).

Concurrent fetches of one url share a single download; a sha256 mismatch or an object over ``max_bytes``
raises :class:`~minifaas.ModelError` and leaves nothing behind. Several processes may share a root: content
files are immutable and renamed in atomically, so the worst a race costs is one extra download.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import anyio
import anyio.from_thread
import anyio.to_thread
from minifaas_sandbox.http_fetch import Abort, DownloadError, FetchLimits
from minifaas_sandbox.http_fetch import download as http_download

from .._errors import ModelError
from .fetchguard import REDIRECT_GUARD
from .gc import touch

__all__ = ("ModelStore",)

MODEL_STORE_MAX_BYTES = 2 << 30
#: each read of an HTTP download waits at most this long; the whole download (all attempts) DOWNLOAD_DEADLINE_S
HTTP_TIMEOUT_S = 60.0
DOWNLOAD_DEADLINE_S = 600.0
DOWNLOAD_ATTEMPTS = 3
DOWNLOAD_BACKOFF_S = 0.5
CHUNK_BYTES = 1 << 20
INDEX_NAME = "index.json"
#: pip command that installs the fsspec backend of a protocol, for the error when it is missing
BACKEND_INSTALL: dict[str, str] = {
    "s3": "pip install 'minifaas[s3]'",
    "s3a": "pip install 'minifaas[s3]'",
    "gs": "pip install gcsfs",
    "gcs": "pip install gcsfs",
    "az": "pip install adlfs",
    "abfs": "pip install adlfs",
}


@dataclass
class _Flight:
    """One download in progress, awaited by every other fetch of the same url."""

    sha256: str | None
    done: anyio.Event = field(default_factory=anyio.Event)
    path: Path | None = None
    error: ModelError | None = None


@dataclass
class _Source:
    key: str  # the index key: the url, or the absolute file:// URI of a local path
    local: Path | None  # set for plain paths and file:// URLs


def _source(url: str) -> _Source:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        path = Path(urllib.request.url2pathname(parsed.path)).absolute()
        return _Source(path.as_uri(), path)
    if parsed.scheme == "" or len(parsed.scheme) == 1:
        path = Path(url).absolute()
        return _Source(path.as_uri(), path)
    return _Source(url, None)


def _normalise_sha(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    sha = sha256.strip().lower()
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise ModelError(f"sha256 must be 64 hex digits, got {sha256!r}")
    return sha


class ModelStore:
    """Content-addressed model files under ``root``; ``max_bytes`` is the largest single model accepted."""

    def __init__(
        self,
        root: Path,
        max_bytes: int = MODEL_STORE_MAX_BYTES,
        *,
        deadline_s: float = DOWNLOAD_DEADLINE_S,
        read_timeout_s: float = HTTP_TIMEOUT_S,
        attempts: int = DOWNLOAD_ATTEMPTS,
        backoff_s: float = DOWNLOAD_BACKOFF_S,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if deadline_s <= 0 or read_timeout_s <= 0 or attempts < 1 or backoff_s < 0:
            raise ValueError("deadline_s and read_timeout_s must be positive, attempts at least 1, backoff_s >= 0")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.limits = FetchLimits(deadline_s, read_timeout_s, max_bytes, attempts, backoff_s, "the model store's limit")
        self._index: dict[str, dict[str, Any]] | None = None
        self._index_lock = anyio.Lock()
        self._inflight: dict[str, _Flight] = {}
        self.downloads = 0  # transfers from a source that completed and were kept
        self.hits = 0  # fetches answered from the store without a transfer
        self.shared = 0  # fetches that waited for another fetch's transfer of the same url
        self.bytes_downloaded = 0
        self.errors = 0

    def stats(self) -> dict[str, int]:
        """Counters since this store was created."""
        return {
            "downloads": self.downloads,
            "hits": self.hits,
            "shared": self.shared,
            "bytes": self.bytes_downloaded,
            "errors": self.errors,
        }

    def known_path(self, url: str) -> Path | None:
        """Where the store keeps ``url``'s content, as far as this store's index knows (no I/O)."""
        entry = (self._index or {}).get(_source(url).key)
        return self.content_path(str(entry["sha256"])) if entry is not None else None

    def content_path(self, sha256: str) -> Path:
        """Where the model with this sha256 is (or would be) stored."""
        return self.root / "sha256" / sha256

    async def fetch(self, url: str, sha256: str | None = None) -> Path:
        """Path of a local, verified copy of the model at ``url``; downloads it only if the store lacks it.

        Raises :class:`~minifaas.ModelError` when the source cannot be read, its protocol's backend is not
        installed, it is larger than ``max_bytes`` or its content does not hash to ``sha256``.
        """
        sha = _normalise_sha(sha256)
        src = _source(url)
        reloaded = False
        while True:
            hit = await self._lookup(src, sha)
            if hit is not None:
                self.hits += 1
                return hit
            flight = self._inflight.get(src.key)
            if flight is None:
                if reloaded:
                    break
                # another process sharing this root may have fetched it since we read the index
                await self._reload_index()
                reloaded = True
                continue
            await flight.done.wait()
            if flight.path is not None:
                self.shared += 1
                if sha is not None and flight.path.name != sha:
                    raise ModelError(f"sha256 mismatch for {url}: expected {sha}, got {flight.path.name}")
                return flight.path
            if flight.error is not None and flight.sha256 == sha:
                self.shared += 1
                raise ModelError(str(flight.error))
            # the other fetch was cancelled or failed on a digest we do not expect: try ourselves
        flight = _Flight(sha)
        self._inflight[src.key] = flight
        try:
            flight.path = await self._download(url, src, sha)
            return flight.path
        except ModelError as exc:
            self.errors += 1
            flight.error = exc
            raise
        finally:
            del self._inflight[src.key]
            flight.done.set()

    async def _load_index(self) -> dict[str, dict[str, Any]]:
        if self._index is None:
            self._index = await anyio.to_thread.run_sync(self._read_index)
        return self._index

    async def _reload_index(self) -> None:
        async with self._index_lock:
            memory = await self._load_index()
            disk = await anyio.to_thread.run_sync(self._read_index)
            self._index = {**memory, **disk}

    def _read_index(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads((self.root / INDEX_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            # a missing or unreadable index only costs downloads: the content files are self-describing
            return {}
        return data if isinstance(data, dict) else {}

    async def _lookup(self, src: _Source, sha: str | None) -> Path | None:
        index = await self._load_index()
        entry = index.get(src.key)
        return await anyio.to_thread.run_sync(self._lookup_sync, src, sha, entry)

    def _lookup_sync(self, src: _Source, sha: str | None, entry: dict[str, Any] | None) -> Path | None:
        if entry is None or (sha is not None and entry.get("sha256") != sha):
            if sha is not None and src.local is None:
                # content-addressed: the bytes asked for are already here, whatever url brought them
                known = self.content_path(sha)
                if not known.is_file():
                    return None
                touch(known)
                return known
            return None
        path = self.content_path(str(entry["sha256"]))
        if not path.is_file():
            return None
        # used now: the collector (engine.gc) removes the least recently used model files first
        touch(path)
        if src.local is not None:
            try:
                st = src.local.stat()
            except OSError:
                return None
            if st.st_size != entry.get("size") or st.st_mtime_ns != entry.get("mtime_ns"):
                return None
        return path

    async def _download(self, url: str, src: _Source, sha: str | None) -> Path:
        abort = Abort()
        try:
            # abandoned when cancelled, and the abort shuts its socket: the fetch returns at once and the thread
            # follows within one read, where it used to hold a worker thread (and every waiter) for minutes
            digest, size, mtime_ns = await anyio.to_thread.run_sync(
                self._transfer, url, src, sha, abort, abandon_on_cancel=True
            )
        except anyio.get_cancelled_exc_class():
            abort.abort()
            raise
        path = self.content_path(digest)
        self.downloads += 1
        self.bytes_downloaded += size
        entry: dict[str, Any] = {"sha256": digest, "size": size}
        if mtime_ns is not None:
            entry["mtime_ns"] = mtime_ns
        async with self._index_lock:
            memory = await self._load_index()
            # merge what other processes sharing the root wrote, so that no one's entries are lost
            disk = await anyio.to_thread.run_sync(self._read_index)
            merged = {**memory, **disk, src.key: entry}
            await anyio.to_thread.run_sync(self._write_index, merged)
            self._index = merged
        return path

    def _write_index(self, index: dict[str, dict[str, Any]]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{INDEX_NAME}.", dir=self.root)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(index, f, indent=1, sort_keys=True)
            os.replace(tmp, self.root / INDEX_NAME)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _transfer(self, url: str, src: _Source, sha: str | None, abort: Abort) -> tuple[str, int, int | None]:
        """Stream the source into a temp file while hashing it, verify, rename into place (worker thread)."""
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "sha256").mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".part", dir=tmp_dir)
        try:
            if src.local is None and urllib.parse.urlparse(url).scheme in ("http", "https"):
                with os.fdopen(fd, "wb") as out:
                    try:
                        # the host's guard (a sandboxed caller: no private address) also sees every redirect
                        limits = dataclasses.replace(self.limits, on_redirect=REDIRECT_GUARD.get())
                        total, digest = http_download(url, out, limits, abort)
                    except DownloadError as exc:
                        raise ModelError(str(exc)) from exc
                return self._keep(url, tmp, digest, sha, total, None)
            h = hashlib.sha256()
            total = 0
            with os.fdopen(fd, "wb") as out, self._open(url, src) as (reader, declared, mtime_ns):
                if declared is not None and declared > self.max_bytes:
                    raise ModelError(f"{url} is {declared} bytes, over the model store's limit of {self.max_bytes}")
                while True:
                    # lets a cancelled fetch stop between chunks instead of finishing a large download
                    anyio.from_thread.check_cancelled()
                    try:
                        chunk = reader.read(CHUNK_BYTES)
                    except (OSError, http.client.HTTPException) as exc:
                        raise ModelError(f"cannot fetch {url}: {exc!r}") from exc
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > self.max_bytes:
                        raise ModelError(f"{url} is over the model store's limit of {self.max_bytes} bytes")
                    h.update(chunk)
                    out.write(chunk)
            if declared is not None and total != declared:
                raise ModelError(f"cannot fetch {url}: got {total} of {declared} bytes")
            return self._keep(url, tmp, h.hexdigest(), sha, total, mtime_ns)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _keep(
        self, url: str, tmp: str, digest: str, sha: str | None, total: int, mtime_ns: int | None
    ) -> tuple[str, int, int | None]:
        """Verify a complete temp file and rename it into the store."""
        if sha is not None and digest != sha:
            raise ModelError(f"sha256 mismatch for {url}: expected {sha}, got {digest}")
        os.chmod(tmp, 0o444)
        os.replace(tmp, self.content_path(digest))
        return digest, total, mtime_ns

    @contextlib.contextmanager
    def _open(self, url: str, src: _Source) -> Iterator[tuple[IO[bytes], int | None, int | None]]:
        """(reader, declared size or None, mtime_ns for local files) of the source."""
        if src.local is not None:
            try:
                f = src.local.open("rb")
            except OSError as exc:
                raise ModelError(f"cannot read model file {src.local}: {exc}") from exc
            with f:
                st = os.fstat(f.fileno())
                yield f, st.st_size, st.st_mtime_ns
            return
        yield from self._open_fsspec(url, urllib.parse.urlparse(url).scheme)

    def _open_fsspec(self, url: str, scheme: str) -> Iterator[tuple[IO[bytes], int | None, int | None]]:
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(url)
            size = fs.size(path)
            f = fs.open(path, "rb")
        except ImportError as exc:
            hint = BACKEND_INSTALL.get(scheme, f"install the fsspec backend for {scheme}://")
            raise ModelError(f"cannot fetch {url}: no backend for {scheme}:// is installed; {hint}") from exc
        except ValueError as exc:
            raise ModelError(f"cannot fetch {url}: unsupported protocol {scheme!r} ({exc})") from exc
        except Exception as exc:
            raise ModelError(f"cannot fetch {url}: {type(exc).__name__}: {exc}") from exc
        with f:
            yield f, (int(size) if isinstance(size, int) else None), None
