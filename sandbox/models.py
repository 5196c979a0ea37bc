"""The warm model cache of a sandbox process: ``from minifaas_sandbox import models``.

A function loads every model through :func:`load`, so the second activation that a warm sandbox runs finds its
interpreter ready::

    detector = models.load(args["detector_url"], sha256=args.get("detector_sha256"))

Data flow::

    load(url, loader)  --hit-->  cached object (LRU bounded by the model files' bytes)
          | miss
          v
    fetcher(url, sha256) -> local path    (default: local/file:// paths as they are, other fsspec URLs into a
          |                                content-addressed dir; in a sandbox the runtime installs a fetcher
          v                                that asks the host's model store)
    loader(path) -> object                (tflite Interpreter with tensors allocated, bytes, json, cascade,
                                           or any callable(path) -> object)

A sandbox forked from a zygote may also find a TFLite interpreter the zygote built before forking
(:func:`prebuild`): the first ``load`` of its url adopts it into the cache as a hit, without fetching or
building. Its packed weights and plans stay shared copy-on-write with the zygote and the other sandboxes;
only the pages an ``invoke`` writes (activations) become this sandbox's own.

Each activation gets a record of what it loaded (:func:`take_activation_info`), which the runtime puts into
the activation's annotations. The record is kept per thread: the runtime takes it on the thread that ran
``main``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachetools import LRUCache

from .http_fetch import DownloadError, FetchLimits
from .http_fetch import download as http_download

__all__ = (
    "MODEL_CACHE_MAX_BYTES",
    "Fetcher",
    "ModelLoadError",
    "configure",
    "default_fetcher",
    "held",
    "host_fetcher",
    "load",
    "prebuild",
    "report_timing",
    "set_fetcher",
    "stats",
    "take_activation_info",
)

MODEL_CACHE_MAX_BYTES = 512 << 20
#: a download of the default fetcher larger than this is refused (the host store has its own limit)
DEFAULT_FETCH_MAX_BYTES = 2 << 30
#: each read of a download waits at most this long; the whole download (every attempt) at most DOWNLOAD_DEADLINE_S
HTTP_TIMEOUT_S = 60.0
DOWNLOAD_DEADLINE_S = 600.0
DOWNLOAD_ATTEMPTS = 3
DOWNLOAD_BACKOFF_S = 0.5
COPY_CHUNK_BYTES = 1 << 20
CACHE_DIR_ENV = "MINIFAAS_MODEL_CACHE"
#: the FlatBuffer file identifier of a TFLite model, at bytes 4..8
TFLITE_IDENTIFIER = b"TFL3"
TFLITE_IDENTIFIER_OFFSET = 4
#: a pre-built interpreter runs no thread of its own, so the zygote holding it stays safe to fork
PREBUILT_NUM_THREADS = 1

#: fetcher(url, sha256) -> path of a local file holding the model's bytes
Fetcher = Callable[[str, "str | None"], str]
Loader = str | Callable[[str], object]


class ModelLoadError(Exception):
    """Raised by ``models.load`` when a model cannot be fetched, fails its sha256 check or cannot load."""


@dataclass
class _Entry:
    value: object
    size_bytes: int
    # keeps bytes handed to Interpreter(model_content=...) alive as long as the interpreter
    keepalive: object = None
    # built by the zygote before this process was forked
    prebuilt: bool = False
    #: the sha256 of the file the value was loaded from: a later load passing sha256 is compared with it
    sha256: str | None = None


@dataclass
class _Counters:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    uncacheable: int = 0
    prebuilt: int = 0


@dataclass
class _Record:
    models: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


class _ByteLRU(LRUCache[tuple[str, str], _Entry]):
    """LRU whose eviction is counted; the evicted entry is returned and then dropped by cachetools."""

    def __init__(self, max_bytes: int, counters: _Counters) -> None:
        super().__init__(maxsize=max_bytes, getsizeof=_entry_size)
        self._counters = counters

    def popitem(self) -> tuple[tuple[str, str], _Entry]:
        item = super().popitem()
        self._counters.evictions += 1
        _remember_loose(*item)
        return item


def _entry_size(entry: _Entry) -> int:
    return entry.size_bytes


@dataclass
class _Prebuilt:
    """An interpreter the zygote built, waiting for the first ``load`` of one of its names in a sandbox."""

    entry: _Entry
    sha256: str
    num_threads: int
    names: frozenset[str]


_lock = threading.Lock()
_counters = _Counters()
_cache = _ByteLRU(MODEL_CACHE_MAX_BYTES, _counters)
_flights: dict[tuple[str, str], _Flight] = {}
#: models out of the cache (evicted, or too large for it) that the function still holds: a load of the same key
#: takes them back instead of building a second copy next to the one still in use
_loose: dict[tuple[str, str], tuple[weakref.ref[Any], _Entry]] = {}
_local = threading.local()
#: url or path -> interpreter built by the zygote (several spellings name one interpreter)
_prebuilt: dict[str, _Prebuilt] = {}


@dataclass
class _Flight:
    """The one load of a key in progress: others wait on its lock, then share what it loaded or try again."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    #: threads that hold or wait for ``lock``; the flight leaves ``_flights`` when the last one is done with it
    users: int = 0
    entry: _Entry | None = None


def _remember_loose(key: tuple[str, str], entry: _Entry) -> None:
    """Keep a weak reference to a model leaving (or never entering) the cache (the caller holds ``_lock``)."""
    try:
        ref = weakref.ref(entry.value, lambda _ref: _forget_loose(key, _ref))
    except TypeError:
        return  # bytes, dicts: no weak references, and nothing a second copy of would cost much
    # the entry without its value: a strong reference here would keep an unused model alive
    _loose[key] = (ref, _Entry(None, entry.size_bytes, entry.keepalive, entry.prebuilt, entry.sha256))


def _forget_loose(key: tuple[str, str], ref: weakref.ref[Any]) -> None:
    found = _loose.get(key)
    if found is not None and found[0] is ref:
        _loose.pop(key, None)


def _revive(key: tuple[str, str]) -> _Entry | None:
    """The model of ``key`` still alive out of the cache, put back into it (the caller holds ``_lock``)."""
    found = _loose.pop(key, None)
    if found is None:
        return None
    ref, meta = found
    value = ref()
    if value is None:
        return None
    entry = _Entry(value, meta.size_bytes, meta.keepalive, meta.prebuilt, meta.sha256)
    _store(key, entry)
    return entry


def _record() -> _Record:
    rec: _Record | None = getattr(_local, "record", None)
    if rec is None:
        rec = _Record()
        _local.record = rec
    return rec


def _loader_name(loader: Loader) -> str:
    if isinstance(loader, str):
        return loader
    name = f"{getattr(loader, '__module__', '?')}.{getattr(loader, '__qualname__', repr(loader))}"
    # stable across activations for a lambda re-created on each call, yet two lambdas of a module differ
    code = getattr(loader, "__code__", None)
    return f"{name}:{code.co_firstlineno}" if code is not None else name


def load(url: str, *, sha256: str | None = None, loader: Loader = "tflite", num_threads: int = 1) -> Any:
    """Return the model at ``url`` loaded by ``loader``, from the cache when this process already holds it.

    The key is (url, loader): ``num_threads`` only applies when the interpreter is first created.

    ``loader`` is "tflite" (a ``ai_edge_litert.interpreter.Interpreter`` with tensors allocated), "bytes",
    "json", "cascade" (a ``cv2.CascadeClassifier``) or a callable taking the local file path.
    Raises :class:`ModelLoadError` when the model cannot be fetched, fails ``sha256`` or cannot be loaded.
    """
    if not isinstance(url, str) or not url:
        raise ModelLoadError(f"model url must be a non-empty string, got {url!r}")
    if isinstance(loader, str) and loader not in _LOADERS:
        raise ModelLoadError(f"unknown loader {loader!r}; expected one of {sorted(_LOADERS)} or a callable")
    if sha256 is not None:
        sha256 = sha256.strip().lower()
    key = (url, _loader_name(loader))
    adopted = False
    with _lock:
        entry = _cache.get(key) or _revive(key)
        if entry is None and loader == "tflite":
            entry = _adopt(url, sha256, num_threads)
            if entry is not None:
                adopted = True
                _store(key, entry)
        if entry is None:
            flight = _flights.setdefault(key, _Flight())
            flight.users += 1
    if entry is not None:
        return _hit(url, entry, sha256, prebuilt=adopted)
    # one thread loads a given key; the others wait for it and share what it loaded (cached or not), or, when it
    # failed, try again one at a time: the flight stays registered until its last waiter is done with it
    try:
        with flight.lock:
            with _lock:
                entry = _cache.get(key) or flight.entry or _revive(key)
            if entry is not None:
                return _hit(url, entry, sha256)
            t0 = time.perf_counter()
            path = _fetcher(url, sha256)
            t1 = time.perf_counter()
            entry = _load_entry(url, path, loader, num_threads)
            if entry.sha256 is None:
                entry.sha256 = sha256 if sha256 is not None else _digest_of(path)
            t2 = time.perf_counter()
            with _lock:
                _counters.misses += 1
                flight.entry = entry
                if not _store(key, entry):
                    _remember_loose(key, entry)
    finally:
        with _lock:
            flight.users -= 1
            if flight.users == 0 and _flights.get(key) is flight:
                del _flights[key]
    info: dict[str, Any] = {
        "url": url,
        "hit": False,
        "download_ms": round((t1 - t0) * 1000, 3),
        "load_ms": round((t2 - t1) * 1000, 3),
    }
    if entry.prebuilt:
        info["prebuilt"] = True
    _record().models.append(info)
    return entry.value


def _store(key: tuple[str, str], entry: _Entry) -> bool:
    """Cache ``entry``; False when it is too large to (the caller holds ``_lock``)."""
    try:
        _cache[key] = entry
    except ValueError:
        # larger than the whole cache: serve it uncached rather than evict everything for it
        _counters.uncacheable += 1
        return False
    return True


def _digest_of(path: str) -> str:
    """The sha256 of a fetched file: its name in a content-addressed directory (the host's store, the default
    fetcher's), else hashed."""
    p = Path(path)
    if p.parent.name == "sha256" and len(p.name) == 64 and all(c in "0123456789abcdef" for c in p.name):
        return p.name
    return _sha256_file(path)


def _hit(url: str, entry: _Entry, sha256: str | None, *, prebuilt: bool = False) -> Any:
    if sha256 is not None and entry.sha256 != sha256:
        # the cache holds other content under this url than the one asked for now: never serve it
        raise ModelLoadError(f"sha256 mismatch for {url}: expected {sha256}, the cached model has {entry.sha256}")
    with _lock:
        _counters.hits += 1
    info: dict[str, Any] = {"url": url, "hit": True, "download_ms": 0.0, "load_ms": 0.0}
    if prebuilt:
        info["prebuilt"] = True
    _record().models.append(info)
    return entry.value


def _adopt(name: str, sha256: str | None, num_threads: int) -> _Entry | None:
    """Take the zygote's interpreter for ``name`` if it is the model asked for (the caller holds ``_lock``).

    Adopting removes every spelling of it: one interpreter object must not end up under two cache keys (two
    entries would count its bytes twice, and a second key expects an interpreter of its own).
    """
    found = _prebuilt.get(name)
    if found is None or found.num_threads != num_threads:
        return None
    if sha256 is not None and sha256.lower() != found.sha256:
        # not the content asked for: the normal path fetches it and reports the mismatch or loads the right one
        return None
    for alias in found.names:
        _prebuilt.pop(alias, None)
    _counters.prebuilt += 1
    found.entry.sha256 = found.sha256
    return found.entry


def prebuild(content: bytes, names: Iterable[str], *, sha256: str | None = None) -> bool:
    """Build and warm the interpreter of the TFLite model ``content`` now, for processes forked later.

    Called by the zygote before it forks; each name (the url a function will pass to :func:`load`, or the
    local path the fetcher will return) finds it once in a forked sandbox. The interpreter has its tensors
    allocated and has run once on zeros, so the weights XNNPACK packs and the buffers it sets up on the first
    ``invoke`` are made here and shared; variables are reset afterwards. It uses one thread, and creates none.

    Returns False (nothing built) for content that is not a TFLite model, or when LiteRT was not imported in
    this process (a zygote that did not preload it only shares the bytes). A name already pre-built gets the
    existing interpreter. Raises :class:`ModelLoadError` when LiteRT cannot build or run the model.
    """
    names = set(names)
    if not names:
        return False
    if content[TFLITE_IDENTIFIER_OFFSET : TFLITE_IDENTIFIER_OFFSET + len(TFLITE_IDENTIFIER)] != TFLITE_IDENTIFIER:
        return False
    if "ai_edge_litert.interpreter" not in sys.modules:
        return False
    digest = sha256.lower() if sha256 is not None else hashlib.sha256(content).hexdigest()
    with _lock:
        existing = next((_prebuilt[n] for n in names if n in _prebuilt), None)
        if existing is not None and existing.sha256 == digest:
            merged = _Prebuilt(existing.entry, digest, existing.num_threads, existing.names | names)
            for alias in merged.names:
                _prebuilt[alias] = merged
            return True
    try:
        interp = _build_tflite(content, PREBUILT_NUM_THREADS)
        _warm(interp)
    except Exception as exc:
        raise ModelLoadError(f"cannot pre-build the TFLite model {sorted(names)[0]}: {exc}") from exc
    entry = _Entry(interp, len(content), keepalive=content, prebuilt=True)
    built = _Prebuilt(entry, digest, PREBUILT_NUM_THREADS, frozenset(names))
    with _lock:
        for alias in names:
            _prebuilt[alias] = built
    return True


def _build_tflite(content: bytes, num_threads: int) -> Any:
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=content, num_threads=num_threads)
    interp.allocate_tensors()
    return interp


def _warm(interp: Any) -> None:
    import numpy as np

    for detail in interp.get_input_details():
        interp.set_tensor(detail["index"], np.zeros(detail["shape"], dtype=detail["dtype"]))
    interp.invoke()
    # a stateful model must start from its initial state in every sandbox, not from the warm-up's
    interp.reset_all_variables()


def _load_entry(url: str, path: str, loader: Loader, num_threads: int) -> _Entry:
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise ModelLoadError(f"fetcher returned {path!r}, which is not a readable file: {exc}") from exc
    try:
        if callable(loader):
            return _Entry(loader(path), size)
        return _LOADERS[loader](url, path, size, num_threads)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load {path!r} with loader {_loader_name(loader)!r}: {exc}") from exc


def _load_tflite(url: str, path: str, size: int, num_threads: int) -> _Entry:
    from ai_edge_litert.interpreter import Interpreter

    from . import _preloaded_models

    # the fetcher verified the file at ``path``: an interpreter the zygote built from it needs no build here
    with _lock:
        adopted = _adopt(path, None, num_threads)
    if adopted is not None:
        return adopted
    # bytes the zygote read before forking are shared copy-on-write: build from them instead of the file
    content = _preloaded_models.get(path) or _preloaded_models.get(url)
    if content is not None:
        interp = Interpreter(model_content=content, num_threads=num_threads)
    else:
        interp = Interpreter(model_path=path, num_threads=num_threads)
    interp.allocate_tensors()
    return _Entry(interp, size, keepalive=content)


def _load_bytes(url: str, path: str, size: int, num_threads: int) -> _Entry:
    return _Entry(Path(path).read_bytes(), size)


def _load_json(url: str, path: str, size: int, num_threads: int) -> _Entry:
    return _Entry(json.loads(Path(path).read_text(encoding="utf-8")), size)


def _load_cascade(url: str, path: str, size: int, num_threads: int) -> _Entry:
    import cv2

    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise ModelLoadError(f"{path!r} is not a valid OpenCV cascade file")
    return _Entry(cascade, size)


_LOADERS: dict[str, Callable[[str, str, int, int], _Entry]] = {
    "tflite": _load_tflite,
    "bytes": _load_bytes,
    "json": _load_json,
    "cascade": _load_cascade,
}


# --- fetching ---------------------------------------------------------------------------------------------


def _cache_dir() -> Path:
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env) if env else Path.home() / ".cache" / "minifaas" / "models"


def _local_path(url: str) -> str | None:
    """The filesystem path a plain path or file:// URL names, or None for any other scheme."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return urllib.request.url2pathname(parsed.path)
    # a one-letter scheme is a Windows drive letter, not a protocol
    if parsed.scheme == "" or len(parsed.scheme) == 1:
        return url
    return None


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _check_sha(url: str, actual: str, expected: str | None) -> None:
    if expected is not None and actual != expected.lower():
        raise ModelLoadError(f"sha256 mismatch for {url}: expected {expected.lower()}, got {actual}")


@contextlib.contextmanager
def _open_remote(url: str) -> Iterator[Any]:
    scheme = urllib.parse.urlparse(url).scheme
    import fsspec

    try:
        with fsspec.open(url, "rb") as f:
            yield f
    except ImportError as exc:
        raise ModelLoadError(f"no fsspec backend installed for {scheme}:// ({exc})") from exc


def default_fetcher(url: str, sha256: str | None) -> str:
    """Fetch ``url`` for an in-process (non-sandbox) run and return a local file path.

    Plain paths and file:// URLs are used where they are; any other URL is downloaded once into a
    content-addressed directory (``$MINIFAAS_MODEL_CACHE`` or ``~/.cache/minifaas/models``).
    """
    local = _local_path(url)
    if local is not None:
        if not os.path.isfile(local):
            raise ModelLoadError(f"model file not found: {local}")
        if sha256 is not None:
            _check_sha(url, _sha256_file(local), sha256)
        return local
    root = _cache_dir()
    if sha256 is not None:
        known = root / "sha256" / sha256.lower()
        if known.is_file():
            return str(known)
    url_index = root / "urls" / hashlib.sha256(url.encode()).hexdigest()
    if sha256 is None and url_index.is_file():
        known = root / "sha256" / url_index.read_text().strip()
        if known.is_file():
            return str(known)
    return _download(url, sha256, root, url_index)


def _download(url: str, sha256: str | None, root: Path, url_index: Path) -> str:
    (root / "sha256").mkdir(parents=True, exist_ok=True)
    url_index.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".part-", dir=root)
    try:
        with os.fdopen(fd, "wb") as out:
            if urllib.parse.urlparse(url).scheme in ("http", "https"):
                # stdlib rather than fsspec's HTTP filesystem (which needs aiohttp), with an overall deadline
                limits = FetchLimits(
                    deadline_s=DOWNLOAD_DEADLINE_S,
                    read_timeout_s=HTTP_TIMEOUT_S,
                    max_bytes=DEFAULT_FETCH_MAX_BYTES,
                    attempts=DOWNLOAD_ATTEMPTS,
                    backoff_s=DOWNLOAD_BACKOFF_S,
                )
                try:
                    _total, digest = http_download(url, out, limits)
                except DownloadError as exc:
                    raise ModelLoadError(str(exc)) from exc
            else:
                digest = _copy_remote(url, out)
        _check_sha(url, digest, sha256)
        dest = root / "sha256" / digest
        os.replace(tmp, dest)
        _write_atomic(url_index, digest)
        return str(dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _copy_remote(url: str, out: Any) -> str:
    """Copy an fsspec URL's object into ``out``, checking its size against the one the backend declares."""
    h = hashlib.sha256()
    total = 0
    try:
        with _open_remote(url) as src:
            declared = getattr(src, "size", None)
            while chunk := src.read(COPY_CHUNK_BYTES):
                total += len(chunk)
                if total > DEFAULT_FETCH_MAX_BYTES:
                    raise ModelLoadError(f"{url} is larger than {DEFAULT_FETCH_MAX_BYTES} bytes")
                h.update(chunk)
                out.write(chunk)
    except OSError as exc:
        raise ModelLoadError(f"cannot fetch {url}: {exc}") from exc
    if isinstance(declared, int) and total != declared:
        raise ModelLoadError(f"cannot fetch {url}: got {total} of {declared} bytes")
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def host_fetcher(url: str, sha256: str | None) -> str:
    """Fetcher for use inside a sandbox: the host's model store fetches (once per machine) and verifies.

    Install it with ``models.set_fetcher(models.host_fetcher)``; it answers with a path in the host's store.
    """
    from . import host_call

    try:
        path = host_call("model.fetch", {"url": url, "sha256": sha256})
    except Exception as exc:
        raise ModelLoadError(f"the host could not fetch {url}: {exc}") from exc
    if not isinstance(path, str):
        raise ModelLoadError(f"the host answered model.fetch for {url} with {path!r}, not a path")
    return path


_fetcher: Fetcher = default_fetcher


def set_fetcher(fn: Fetcher | None) -> None:
    """Install the function that turns (url, sha256) into a local file path; None restores the default."""
    global _fetcher
    _fetcher = default_fetcher if fn is None else fn


# --- introspection ----------------------------------------------------------------------------------------


def configure(*, max_bytes: int = MODEL_CACHE_MAX_BYTES) -> None:
    """Set the cache's byte budget, keeping the most recently used models that still fit."""
    global _cache
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    with _lock:
        old = _cache
        new = _ByteLRU(max_bytes, _counters)
        # LRUCache iterates least recently used first, so re-inserting keeps the order
        for key in list(old.keys()):
            entry = old[key]
            with contextlib.suppress(ValueError):
                new[key] = entry
        _cache = new
        old.clear()


def clear() -> None:
    """Drop every cached model and every interpreter the zygote pre-built (counters are kept)."""
    with _lock:
        _cache.clear()
        _prebuilt.clear()
        _loose.clear()


def stats() -> dict[str, int]:
    """Counters and occupancy of this process's model cache."""
    with _lock:
        return {
            "entries": len(_cache),
            "bytes": int(_cache.currsize),
            "max_bytes": int(_cache.maxsize),
            "hits": _counters.hits,
            "misses": _counters.misses,
            "evictions": _counters.evictions,
            "uncacheable": _counters.uncacheable,
            #: loads answered by adopting an interpreter the zygote built (counted in hits or misses too)
            "prebuilt_adopted": _counters.prebuilt,
            #: interpreters the zygote built that this process has not adopted (yet)
            "prebuilt_waiting": len({id(b) for b in _prebuilt.values()}),
        }


def held() -> list[str]:
    """URLs of the models this process holds, least recently used first (for model-affinity routing)."""
    with _lock:
        return list(dict.fromkeys(url for url, _ in _cache))


def report_timing(name: str, ms: float) -> None:
    """Add a named timing (milliseconds) to the current activation's record; repeated names add up."""
    timings = _record().timings
    timings[name] = round(timings.get(name, 0.0) + float(ms), 3)


def take_activation_info() -> dict[str, Any]:
    """Return and reset what this thread's activation loaded and timed; {} when it did neither."""
    rec: _Record | None = getattr(_local, "record", None)
    _local.record = None
    if rec is None or (not rec.models and not rec.timings):
        return {}
    info: dict[str, Any] = {}
    if rec.models:
        info["model_cache"] = "hit" if all(m["hit"] for m in rec.models) else "miss"
        info["models"] = rec.models
    if rec.timings:
        info["timings"] = rec.timings
    return info
