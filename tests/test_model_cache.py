"""The sandbox's warm model cache (in-process) and the host's content-addressed model store, on real models.

Remote fetches go to a real HTTP server on 127.0.0.1 whose handler counts the GETs it answers, so "fetched
once" is measured where the bytes leave, not inferred from the store's own counters.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import http.server
import shutil
import threading
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import cv2
import minifaas_sandbox
import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from minifaas_sandbox import models

from minifaas import ModelError
from minifaas._deploy.modelstore import ModelStore

MODELS_DIR = Path(__file__).resolve().parent.parent / "functions" / "models"
DETECTOR = MODELS_DIR / "pose_detection.tflite"
LANDMARK = MODELS_DIR / "pose_landmark_full.tflite"
CLASSIFIER = MODELS_DIR / "efficientnet_lite0_int8.tflite"
LABELS = MODELS_DIR / "imagenet_labels.json"
DETECTOR_SHA = "9ba9dd3d42efaaba86b4ff0122b06f29c4122e756b329d89dca1e297fd8f866c"
LABELS_SHA = "e46cf90316006d7a615d0ae06860b7f438ee44e69558cb129a959c63c026d77b"
MESSI = Path(__file__).resolve().parent / "data" / "images" / "messi5.jpg"
SLOW_RESPONSE_S = 0.3
DRIP_BYTES = 100
DRIP_EVERY_S = 0.05


class ModelServer:
    """A real HTTP server on 127.0.0.1 serving functions/models, counting the GETs per path.

    Path prefixes change how it answers: /slow/ waits SLOW_RESPONSE_S first, /truncated/ announces the whole
    length but closes after half the body, /nolength/ sends no Content-Length (body ends at close), /drip/ sends
    DRIP_BYTES every DRIP_EVERY_S (never finishing within a test), /flaky<N>/ answers 503 to its first N GETs.
    """

    def __init__(self) -> None:
        self.gets: Counter[str] = Counter()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.gets[self.path] += 1
                mode, _, name = self.path.lstrip("/").rpartition("/")
                file = MODELS_DIR / name
                if not file.is_file():
                    self.send_error(404)
                    return
                body = file.read_bytes()
                if mode == "slow":
                    time.sleep(SLOW_RESPONSE_S)
                if mode.startswith("flaky") and owner.gets[self.path] <= int(mode.removeprefix("flaky")):
                    self.send_error(503)
                    return
                if mode == "drip":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        for start in range(0, len(body), DRIP_BYTES):
                            self.wfile.write(body[start : start + DRIP_BYTES])
                            self.wfile.flush()
                            time.sleep(DRIP_EVERY_S)
                    self.close_connection = True
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                if mode != "nolength":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                # a client that refuses an oversized model hangs up early
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body[: len(body) // 2] if mode == "truncated" else body)
                self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def url(self, name: str, mode: str = "") -> str:
        return f"{self.base}/{mode + '/' if mode else ''}{name}"

    def count(self, name: str, mode: str = "") -> int:
        return self.gets[self.url(name, mode).removeprefix(self.base)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def server() -> Iterator[ModelServer]:
    srv = ModelServer()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def cache() -> Iterator[None]:
    """An empty sandbox cache with the default budget and fetcher, restored afterwards."""
    models.clear()
    models.set_fetcher(None)
    models.take_activation_info()
    yield
    models.set_fetcher(None)
    models.configure(max_bytes=models.MODEL_CACHE_MAX_BYTES)
    models.take_activation_info()


def _detector_input() -> np.ndarray:
    photo = cv2.imread(str(MESSI))
    assert photo is not None
    image = cv2.cvtColor(cv2.resize(photo, (224, 224)), cv2.COLOR_BGR2RGB)
    return (image.astype(np.float32) / 127.5 - 1.0)[None]


def _run(interp: Any, x: np.ndarray) -> list[np.ndarray]:
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    return [interp.get_tensor(d["index"]).copy() for d in interp.get_output_details()]


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# --- sandbox cache ------------------------------------------------------------------------------------------


def test_hit_miss_and_activation_record(cache: None) -> None:
    # counters are per process and other tests of this session load models too: compare deltas
    before = models.stats()
    first = models.load(str(DETECTOR))
    second = models.load(str(DETECTOR))
    assert first is second
    stats = models.stats()
    assert (stats["hits"] - before["hits"], stats["misses"] - before["misses"], stats["entries"]) == (1, 1, 1)
    assert stats["bytes"] == DETECTOR.stat().st_size
    models.report_timing("decode_ms", 1.5)
    models.report_timing("decode_ms", 1.0)
    info = models.take_activation_info()
    assert info["model_cache"] == "miss"
    miss, hit = info["models"]
    assert miss["hit"] is False and miss["load_ms"] > 0 and hit["hit"] is True and hit["load_ms"] == 0
    assert info["timings"] == {"decode_ms": 2.5}
    assert models.take_activation_info() == {}
    models.load(str(DETECTOR))
    assert models.take_activation_info()["model_cache"] == "hit"
    assert models.held() == [str(DETECTOR)]


def test_served_interpreter_matches_a_direct_one(cache: None) -> None:
    direct = Interpreter(model_path=str(DETECTOR), num_threads=1)
    direct.allocate_tensors()
    served = models.load(DETECTOR.as_uri(), sha256=DETECTOR_SHA)
    x = _detector_input()
    expected, got = _run(direct, x), _run(served, x)
    assert len(expected) == len(got) == 2
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_array_equal(e, g)
    assert float(got[1].max()) > 0  # the footballer is detected: this is a real, non-trivial output


def test_prebuilt_interpreter_is_adopted_once_under_any_of_its_names(cache: None) -> None:
    """What a zygote-forked sandbox sees (here in-process): ``prebuild`` builds the interpreter, the first
    ``load`` of one of its names takes it as a cache hit without fetching, and it outputs what a fresh one does."""
    fetched: list[str] = []

    def fetch(url: str, sha256: str | None) -> str:
        fetched.append(url)
        return models.default_fetcher(url, sha256)

    models.set_fetcher(fetch)
    content = DETECTOR.read_bytes()
    url = DETECTOR.as_uri()
    assert models.prebuild(b"not a model" * 10, ["x"]) is False
    assert models.prebuild(content, [url, str(DETECTOR)], sha256=DETECTOR_SHA) is True
    before = models.stats()
    assert before["prebuilt_waiting"] == 1
    # another content's digest, or another thread count, is not this interpreter: loaded the normal way
    with pytest.raises(models.ModelLoadError, match="sha256 mismatch"):
        models.load(url, sha256="0" * 64)
    assert fetched == [url]
    by_path = models.load(str(DETECTOR), num_threads=2)
    assert models.stats()["prebuilt_waiting"] == 1
    models.take_activation_info()

    mid = models.stats()
    served = models.load(url, sha256=DETECTOR_SHA)
    info = models.take_activation_info()
    assert info["model_cache"] == "hit"
    assert info["models"] == [{"url": url, "hit": True, "download_ms": 0.0, "load_ms": 0.0, "prebuilt": True}]
    assert fetched == [url, str(DETECTOR)]  # the two loads above fetched; the adopted one did not
    stats = models.stats()
    assert stats["prebuilt_adopted"] - before["prebuilt_adopted"] == 1
    assert stats["hits"] - before["hits"] == 1
    # both names were taken off the waiting list; the cache charges the adopted model once, at its size
    assert stats["prebuilt_waiting"] == 0
    assert (stats["entries"] - mid["entries"], stats["bytes"] - mid["bytes"]) == (1, len(content))
    assert by_path is not served
    x = _detector_input()
    fresh = Interpreter(model_content=content, num_threads=1)
    fresh.allocate_tensors()
    for want, got in zip(_run(fresh, x), _run(served, x), strict=True):
        np.testing.assert_array_equal(want, got)


def test_lru_is_bounded_by_bytes_and_releases_evicted_models(cache: None) -> None:
    sizes = {p: p.stat().st_size for p in (DETECTOR, LANDMARK, CLASSIFIER)}
    # room for the detector with either other model, never all three
    models.configure(max_bytes=sizes[DETECTOR] + sizes[LANDMARK] + 100_000)
    models.load(str(DETECTOR))
    classifier_ref = weakref.ref(models.load(str(CLASSIFIER)))
    models.load(str(DETECTOR))  # now the classifier is the least recently used
    models.load(str(LANDMARK))
    assert models.held() == [str(DETECTOR), str(LANDMARK)]
    stats = models.stats()
    assert stats["evictions"] == 1 and stats["bytes"] == sizes[DETECTOR] + sizes[LANDMARK]
    gc.collect()
    assert classifier_ref() is None, "an evicted interpreter must not stay referenced"
    # shrinking the budget keeps the most recently used model that fits
    models.configure(max_bytes=sizes[LANDMARK] + 1)
    assert models.held() == [str(LANDMARK)]


def test_model_larger_than_cache_is_served_uncached(cache: None) -> None:
    models.configure(max_bytes=1 << 20)
    interp = models.load(str(DETECTOR))
    assert interp.get_input_details()[0]["shape"].tolist() == [1, 224, 224, 3]
    assert models.held() == [] and models.stats()["uncacheable"] == 1


def test_sha256_mismatch_is_rejected(cache: None) -> None:
    with pytest.raises(models.ModelLoadError, match="sha256 mismatch"):
        models.load(str(DETECTOR), sha256="0" * 64)
    assert models.held() == []
    with pytest.raises(models.ModelLoadError, match="not found"):
        models.load("/nonexistent/model.tflite")
    with pytest.raises(models.ModelLoadError, match="unknown loader"):
        models.load(str(DETECTOR), loader="onnx")


def test_loaders_and_keys(cache: None) -> None:
    labels = models.load(str(LABELS), sha256=LABELS_SHA, loader="json")
    assert len(labels) == 1000 and labels[805] == "soccer ball"
    raw = models.load(str(LABELS), loader="bytes")
    assert hashlib.sha256(raw).hexdigest() == LABELS_SHA
    haar = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"  # type: ignore[attr-defined]
    cascade = models.load(haar, loader="cascade")
    assert isinstance(cascade, cv2.CascadeClassifier) and not cascade.empty()

    def line_count(path: str) -> int:
        return Path(path).read_text().count("\n")

    assert models.load(str(LABELS), loader=line_count) == LABELS.read_text().count("\n")
    # (url, loader) is the key: the same file under three loaders is three entries
    assert models.stats()["entries"] == 4
    with pytest.raises(models.ModelLoadError, match="cascade"):
        models.load(str(LABELS), loader="cascade")


def test_pluggable_fetcher_is_called_once_per_model(cache: None) -> None:
    calls: list[tuple[str, str | None]] = []

    def fetch(url: str, sha256: str | None) -> str:
        calls.append((url, sha256))
        time.sleep(0.05)  # long enough for all threads below to ask before the first load finishes
        return str(MODELS_DIR / url.removeprefix("store://"))

    models.set_fetcher(fetch)
    got: list[object] = []
    threads = [
        threading.Thread(target=lambda: got.append(models.load("store://pose_detection.tflite"))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [("store://pose_detection.tflite", None)]
    assert len(got) == 4 and all(g is got[0] for g in got)
    models.set_fetcher(lambda url, sha: "/nonexistent/file")
    with pytest.raises(models.ModelLoadError, match="not a readable file"):
        models.load("store://other.tflite")


def test_default_fetcher_downloads_once_into_content_addressed_dir(
    cache: None, server: ModelServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MINIFAAS_MODEL_CACHE", str(tmp_path))
    url = server.url("pose_detection.tflite", "sbx")
    with pytest.raises(models.ModelLoadError, match="sha256 mismatch"):
        models.load(url, sha256="f" * 64)
    assert _files(tmp_path) == []
    interp = models.load(url, sha256=DETECTOR_SHA)
    assert (tmp_path / "sha256" / DETECTOR_SHA).read_bytes() == DETECTOR.read_bytes()
    models.clear()
    again = models.load(url)  # a new process would find it on disk: no second GET
    assert again is not interp
    assert server.count("pose_detection.tflite", "sbx") == 2  # the rejected one and the kept one


def test_host_fetcher_asks_the_hosts_store(
    cache: None, server: ModelServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ModelStore(tmp_path)
    calls: list[tuple[str, dict[str, Any]]] = []

    def host_call(method: str, args: dict[str, Any]) -> str:
        # what the engine's "model.fetch" service does, minus the socket between the processes
        calls.append((method, args))
        path: Path = anyio.run(store.fetch, args["url"], args["sha256"])
        return str(path)

    monkeypatch.setattr(minifaas_sandbox, "_host_call", host_call)
    models.set_fetcher(models.host_fetcher)
    url = server.url("pose_detection.tflite", "host")
    interp = models.load(url, sha256=DETECTOR_SHA)
    assert interp.get_output_details()[0]["shape"].tolist() == [1, 2254, 12]
    assert calls == [("model.fetch", {"url": url, "sha256": DETECTOR_SHA})]
    assert store.downloads == 1 and server.count("pose_detection.tflite", "host") == 1
    with pytest.raises(models.ModelLoadError, match="the host could not fetch"):
        models.load(url, sha256="0" * 64, loader="bytes")


# --- host store ---------------------------------------------------------------------------------------------


def test_store_fetches_a_local_file_once(tmp_path: Path) -> None:
    source = tmp_path / "src" / "labels.json"
    source.parent.mkdir()
    shutil.copy(LABELS, source)
    store = ModelStore(tmp_path / "store")

    async def scenario() -> None:
        first = await store.fetch(str(source), sha256=LABELS_SHA)
        assert first == tmp_path / "store" / "sha256" / LABELS_SHA
        assert first.read_bytes() == LABELS.read_bytes()
        assert first.stat().st_mode & 0o222 == 0  # stored content is read-only
        assert await store.fetch(source.as_uri()) == first
        assert store.stats() == {"downloads": 1, "hits": 1, "shared": 0, "bytes": source.stat().st_size,
                                 "errors": 0}  # fmt: skip
        # a changed source is fetched again; the old content stays (it is content-addressed)
        source.write_text('["a", "b"]')
        changed = await store.fetch(str(source))
        assert changed.read_text() == '["a", "b"]' and changed != first and first.is_file()
        # a new store on the same root (another engine on this machine) finds it through the index
        other = ModelStore(tmp_path / "store")
        assert await other.fetch(str(source)) == changed and other.downloads == 0

    anyio.run(scenario)


def test_store_single_flight_over_http(tmp_path: Path, server: ModelServer) -> None:
    store = ModelStore(tmp_path)
    url = server.url("pose_detection.tflite", "slow")
    paths: list[Path] = []

    async def fetch() -> None:
        paths.append(await store.fetch(url, sha256=DETECTOR_SHA))

    async def scenario() -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(fetch)

    t0 = time.perf_counter()
    anyio.run(scenario)
    assert time.perf_counter() - t0 < 8 * SLOW_RESPONSE_S  # they waited together, not in turn
    assert server.count("pose_detection.tflite", "slow") == 1
    assert len(paths) == 8 and len(set(paths)) == 1
    assert hashlib.sha256(paths[0].read_bytes()).hexdigest() == DETECTOR_SHA
    assert (store.downloads, store.shared, store.bytes_downloaded) == (1, 7, DETECTOR.stat().st_size)
    assert _files(tmp_path) == ["index.json", f"sha256/{DETECTOR_SHA}"]

    async def again() -> Path:
        return await store.fetch(url)

    assert anyio.run(again) == paths[0] and store.hits == 1
    assert server.count("pose_detection.tflite", "slow") == 1


def test_store_cancelled_fetch_hands_over_to_a_waiter(tmp_path: Path, server: ModelServer) -> None:
    store = ModelStore(tmp_path)
    url = server.url("pose_detection.tflite", "slow")
    before = server.count("pose_detection.tflite", "slow")
    got: list[Path] = []

    async def leader(scope: anyio.CancelScope) -> None:
        with scope:
            await store.fetch(url)
        assert scope.cancelled_caught

    async def follower() -> None:
        got.append(await store.fetch(url, sha256=DETECTOR_SHA))

    async def scenario() -> None:
        scope = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(leader, scope)
            with anyio.fail_after(5):
                while server.count("pose_detection.tflite", "slow") == before:
                    await anyio.sleep(0.01)
            # the leader's request is at the server, which answers after SLOW_RESPONSE_S
            tg.start_soon(follower)
            await anyio.sleep(0.05)
            scope.cancel()  # while the leader's transfer is in its worker thread

    anyio.run(scenario)
    assert got == [store.content_path(DETECTOR_SHA)]
    assert server.count("pose_detection.tflite", "slow") == before + 2
    assert store.downloads == 1 and store.shared == 0
    assert _files(tmp_path) == ["index.json", f"sha256/{DETECTOR_SHA}"]  # the abandoned .part is gone


@pytest.mark.parametrize(
    ("mode", "max_bytes", "sha256", "message"),
    [
        ("", 2 << 30, "0" * 64, "sha256 mismatch"),
        ("", 1 << 20, None, "over the model store's limit"),
        ("nolength", 1 << 20, None, "over the model store's limit"),
        ("truncated", 2 << 30, None, "got 1479523 of 2959046 bytes"),
    ],
    ids=["sha-mismatch", "too-large-declared", "too-large-streamed", "truncated"],
)
def test_store_keeps_nothing_corrupt(
    tmp_path: Path, server: ModelServer, mode: str, max_bytes: int, sha256: str | None, message: str
) -> None:
    store = ModelStore(tmp_path, max_bytes=max_bytes, backoff_s=0.01)
    url = server.url("pose_detection.tflite", mode)
    before = server.count("pose_detection.tflite", mode)

    async def fetch() -> Path:
        return await store.fetch(url, sha256=sha256)

    with pytest.raises(ModelError, match=message):
        anyio.run(fetch)
    # a short body may be a dropped connection: tried again (3 attempts), the others are final at once
    assert server.count("pose_detection.tflite", mode) == before + (3 if mode == "truncated" else 1)
    assert [f for f in _files(tmp_path) if f != "index.json"] == []  # no content, no temp file
    assert store.errors == 1 and store.downloads == 0


def test_store_errors_are_clear(tmp_path: Path, server: ModelServer) -> None:
    store = ModelStore(tmp_path)

    async def fetch(url: str, sha256: str | None = None) -> Path:
        return await store.fetch(url, sha256=sha256)

    with pytest.raises(ModelError, match="pip install gcsfs"):
        anyio.run(fetch, "gs://bucket/model.tflite")
    with pytest.raises(ModelError, match="unsupported protocol"):
        anyio.run(fetch, "nosuchproto://bucket/model.tflite")
    with pytest.raises(ModelError, match="404"):
        anyio.run(fetch, server.url("absent.tflite"))
    with pytest.raises(ModelError, match="64 hex digits"):
        anyio.run(fetch, str(DETECTOR), "abc")
    with pytest.raises(ModelError, match="cannot read model file"):
        anyio.run(fetch, str(tmp_path / "absent.tflite"))


def test_stores_sharing_a_root_fetch_once(tmp_path: Path, server: ModelServer) -> None:
    first, second = ModelStore(tmp_path), ModelStore(tmp_path)  # e.g. two engines on one machine
    labels = server.url("imagenet_labels.json", "shared")

    async def scenario() -> None:
        await second.fetch(str(LABELS))  # the second store has read the index before the first fetches
        a = await first.fetch(labels)
        b = await second.fetch(labels)
        assert a == b and second.hits == 1 and second.downloads == 1
        await second.fetch(str(DETECTOR))
        # neither store's writes lost the other's entries
        third = ModelStore(tmp_path)
        await third.fetch(labels)
        await third.fetch(str(LABELS))
        assert third.downloads == 0 and third.hits == 2

    anyio.run(scenario)
    assert server.count("imagenet_labels.json", "shared") == 1


def test_store_serves_known_content_for_a_new_url(tmp_path: Path, server: ModelServer) -> None:
    store = ModelStore(tmp_path)

    async def scenario() -> tuple[Path, Path]:
        local = await store.fetch(str(DETECTOR))
        # the bytes with this digest are already here: no download, whatever url names them
        remote = await store.fetch(server.url("pose_detection.tflite", "mirror"), sha256=DETECTOR_SHA)
        return local, remote

    local, remote = anyio.run(scenario)
    assert local == remote and server.count("pose_detection.tflite", "mirror") == 0
    assert store.downloads == 1 and store.hits == 1


# --- verification on hits, single flight, loose models -------------------------------------------------------


def test_sha256_is_checked_on_a_cache_hit(cache: None) -> None:
    assert models.load(str(LABELS), sha256=LABELS_SHA, loader="json")[805] == "soccer ball"
    with pytest.raises(models.ModelLoadError, match="sha256 mismatch.*cached model has " + LABELS_SHA):
        models.load(str(LABELS), sha256="0" * 64, loader="json")
    # loaded without a digest first: a later load passing one is still compared
    models.load(str(LABELS), loader="bytes")
    with pytest.raises(models.ModelLoadError, match="sha256 mismatch"):
        models.load(str(LABELS), sha256=DETECTOR_SHA, loader="bytes")
    assert hashlib.sha256(models.load(str(LABELS), sha256=LABELS_SHA.upper(), loader="bytes")).hexdigest() == LABELS_SHA


def test_single_flight_holds_after_a_failed_load(cache: None) -> None:
    running = 0
    peak = 0
    calls = 0
    lock = threading.Lock()

    def fetch(url: str, sha256: str | None) -> str:
        nonlocal running, peak, calls
        with lock:
            running += 1
            calls += 1
            first = calls == 1
            peak = max(peak, running)
        time.sleep(0.15)
        with lock:
            running -= 1
        if first:
            raise models.ModelLoadError("the first fetch fails")
        return str(LABELS)

    models.set_fetcher(fetch)
    results: list[object] = []

    def load() -> None:
        with contextlib.suppress(models.ModelLoadError):
            results.append(models.load("store://labels", loader="json"))

    threads = []
    # some threads wait on the failing first load, others arrive after it failed: still one load at a time
    for _ in range(6):
        t = threading.Thread(target=load)
        t.start()
        threads.append(t)
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert peak == 1
    assert len(results) == 5 and all(r is results[0] for r in results)


def test_waiters_share_an_uncacheable_load(cache: None) -> None:
    models.configure(max_bytes=1 << 20)  # smaller than the detector
    calls: list[str] = []

    def fetch(url: str, sha256: str | None) -> str:
        calls.append(url)
        time.sleep(0.1)
        return str(DETECTOR)

    models.set_fetcher(fetch)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(models.load("store://detector"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["store://detector"]
    assert len(got) == 4 and all(g is got[0] for g in got)
    assert models.held() == []


def test_an_evicted_model_still_in_use_is_not_built_twice(cache: None) -> None:
    sizes = {p: p.stat().st_size for p in (DETECTOR, CLASSIFIER)}
    models.configure(max_bytes=max(sizes.values()) + 1)  # one model at a time
    detector = models.load(str(DETECTOR), sha256=DETECTOR_SHA)
    models.load(str(CLASSIFIER))
    assert models.held() == [str(CLASSIFIER)]
    # the function still holds the evicted detector: the next load takes it back instead of building another
    assert models.load(str(DETECTOR), sha256=DETECTOR_SHA) is detector
    assert models.held() == [str(DETECTOR)]
    with pytest.raises(models.ModelLoadError, match="sha256 mismatch"):
        models.load(str(CLASSIFIER), sha256=DETECTOR_SHA)


# --- downloads: deadline, cancellation, Content-Length, retries ----------------------------------------------


def test_default_fetcher_rejects_a_truncated_download(
    cache: None, server: ModelServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MINIFAAS_MODEL_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "DOWNLOAD_BACKOFF_S", 0.01)
    url = server.url("imagenet_labels.json", "truncated")
    before = server.count("imagenet_labels.json", "truncated")
    for _ in range(2):
        with pytest.raises(models.ModelLoadError, match=r"got \d+ of \d+ bytes \(after 3 attempts\)"):
            models.load(url, loader="bytes")
    # nothing half-written is kept or indexed: each load went to the server again (3 attempts each)
    assert server.count("imagenet_labels.json", "truncated") == before + 6
    assert [f for f in _files(tmp_path) if not f.startswith("urls/")] == []


def test_default_fetcher_has_an_overall_deadline(
    cache: None, server: ModelServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MINIFAAS_MODEL_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "DOWNLOAD_DEADLINE_S", 0.5)
    t0 = time.monotonic()
    with pytest.raises(models.ModelLoadError, match="deadline passed"):
        models.load(server.url("pose_detection.tflite", "drip"))
    # every read of the drip returns within its timeout: only an overall deadline stops it
    assert time.monotonic() - t0 < 2.0


def test_store_download_has_an_overall_deadline(tmp_path: Path, server: ModelServer) -> None:
    store = ModelStore(tmp_path, deadline_s=0.5, read_timeout_s=5.0)

    async def fetch() -> Path:
        return await store.fetch(server.url("pose_detection.tflite", "drip"))

    t0 = time.monotonic()
    with pytest.raises(ModelError, match="deadline passed"):
        anyio.run(fetch)
    assert time.monotonic() - t0 < 2.0
    assert [f for f in _files(tmp_path) if f != "index.json"] == []


def test_store_cancellation_is_prompt(tmp_path: Path, server: ModelServer) -> None:
    store = ModelStore(tmp_path)
    url = server.url("imagenet_labels.json", "drip")

    async def scenario() -> float:
        t0 = time.monotonic()
        with anyio.move_on_after(0.3):
            await store.fetch(url)
        elapsed = time.monotonic() - t0
        # the worker thread ends too (its socket was shut): the .part file goes within a read
        with anyio.fail_after(3):
            while any(f.startswith("tmp/") for f in _files(tmp_path)):
                await anyio.sleep(0.02)
        return elapsed

    assert anyio.run(scenario) < 1.0


def test_store_retries_transient_errors_with_backoff(tmp_path: Path, server: ModelServer) -> None:
    async def fetch(store: ModelStore, url: str) -> Path:
        return await store.fetch(url, sha256=LABELS_SHA)

    url = server.url("imagenet_labels.json", "flaky2")
    t0 = time.monotonic()
    assert anyio.run(fetch, ModelStore(tmp_path / "a", backoff_s=0.1), url).name == LABELS_SHA
    # two 503s, then the body: backoff 0.1 s then 0.2 s
    assert server.count("imagenet_labels.json", "flaky2") == 3 and time.monotonic() - t0 >= 0.3
    with pytest.raises(ModelError, match=r"HTTP 503.*after 2 attempts"):
        anyio.run(
            fetch, ModelStore(tmp_path / "b", attempts=2, backoff_s=0.01), server.url("imagenet_labels.json", "flaky5")
        )
    with pytest.raises(ModelError, match="404"):
        anyio.run(fetch, ModelStore(tmp_path / "c", backoff_s=0.01), server.url("absent.json", "flaky0"))


def test_store_downloads_through_the_environments_proxy(
    tmp_path: Path, server: ModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import urllib.request

    seen: list[str] = []

    class Proxy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            # a forward proxy gets the absolute URL
            seen.append(self.path)
            direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with direct.open(self.path, timeout=10) as upstream:
                body = upstream.read()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    thread = threading.Thread(target=proxy.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    url = server.url("imagenet_labels.json", "proxied")
    try:
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.server_address[1]}")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        store = ModelStore(tmp_path)

        async def fetch() -> Path:
            return await store.fetch(url, sha256=LABELS_SHA)

        assert anyio.run(fetch).name == LABELS_SHA
    finally:
        proxy.shutdown()
        proxy.server_close()
        thread.join(timeout=5)
    assert seen == [url] and server.count("imagenet_labels.json", "proxied") == 1


class _Redirector(http.server.BaseHTTPRequestHandler):
    """``/go`` redirects to ``/model``, which serves a few bytes."""

    def do_GET(self) -> None:
        if self.path == "/go":
            self.send_response(302)
            self.send_header("Location", "/model")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"weights"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_the_hosts_redirect_guard_sees_every_redirect_of_a_download(tmp_path: Path) -> None:
    """The guard a sandboxed caller's fetch runs under (no private addresses) is asked about each redirect's
    target before it is followed: a refusal ends the download, nothing is stored."""
    from minifaas._deploy.fetchguard import REDIRECT_GUARD

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirector)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/go"
    seen: list[str] = []

    def refuse(target: str) -> None:
        seen.append(target)
        raise ModelError(f"refused redirect to {target}")

    try:
        store = ModelStore(tmp_path / "store")
        token = REDIRECT_GUARD.set(refuse)
        try:
            with pytest.raises(ModelError, match=r"refused redirect to http://127\.0\.0\.1"):
                anyio.run(store.fetch, url)
        finally:
            REDIRECT_GUARD.reset(token)
        assert seen == [url.replace("/go", "/model")]
        assert not any((tmp_path / "store").rglob("*.part"))
        # without a guard the same redirect is followed
        assert anyio.run(store.fetch, url).read_bytes() == b"weights"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
