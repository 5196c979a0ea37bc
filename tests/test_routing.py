"""Model-affinity routing and the model caches through a real engine: real sandboxes, real .tflite models.

The function under test loads ``args["model_url"]`` (the deployment's ``model_param``) through
``minifaas_sandbox.models`` and returns its sandbox's pid and the models it holds; the activation's annotations
carry what the sandbox cache did (hit/miss, download and load ms). Each test copies the models it uses to its
own files, so their URLs are new to the engine's host store whatever ran before.
"""

from __future__ import annotations

import contextlib
import http.server
import shutil
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import minifaas
from minifaas.testing import assert_status, assert_success

pytestmark = pytest.mark.anyio

MODELS_DIR = Path(__file__).resolve().parent.parent / "functions" / "models"
DETECTOR = MODELS_DIR / "pose_detection.tflite"
LANDMARK = MODELS_DIR / "pose_landmark_full.tflite"
CLASSIFIER = MODELS_DIR / "efficientnet_lite0_int8.tflite"
DETECTOR_SHA = "9ba9dd3d42efaaba86b4ff0122b06f29c4122e756b329d89dca1e297fd8f866c"
WRONG_SHA = "0" * 64
#: a first call holds its sandbox this long, so that concurrent first calls need sandboxes of their own
HOLD_S = 0.6
#: the busy holder's call in the spill test: long enough that the next call surely finds it busy
BUSY_HOLD_S = 1.0
#: the test HTTP server waits this long before answering, so concurrent fetches overlap at the host store
SLOW_RESPONSE_S = 0.8
WAIT_S = 30.0

FN = """\
import os
import time

from minifaas_sandbox import models


def main(args):
    interp = models.load(args["model_url"], sha256=args.get("sha256"))
    for url in args.get("also", []):
        models.load(url)
    time.sleep(args.get("hold_s", 0))
    shape = [int(d) for d in interp.get_input_details()[0]["shape"]]
    return {"pid": os.getpid(), "held": models.held(), "input_shape": shape}
"""


@pytest.fixture(scope="module")
async def minifaas_engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[minifaas.Engine]:
    # a state dir of its own: the host model store starts empty, so "downloads" counts this module's fetches only
    async with minifaas.Engine(state_dir=tmp_path_factory.mktemp("engine"), max_sandboxes=12) as eng:
        yield eng


@contextlib.asynccontextmanager
async def deployed(engine: minifaas.Engine, name: str, **options: Any) -> AsyncIterator[str]:
    """Deploy FN as ``name`` (model_param="model_url"); yields its pool key; deletes it (and its sandboxes) after."""
    info = await engine.deploy(name, code=FN, model_param="model_url", **options)
    try:
        yield f"{engine.namespace}/{name}@{info['version']}"
    finally:
        await engine.delete(name)


def model_copy(tmp_path: Path, source: Path, label: str) -> str:
    """A file:// URL of a fresh copy of a real model: a URL the host store has never seen."""
    dest = tmp_path / f"{label}-{source.name}"
    shutil.copyfile(source, dest)
    return dest.as_uri()


def pool(engine: minifaas.Engine, key: str) -> dict[str, Any]:
    snap: dict[str, Any] = engine.stats()["functions"][key]
    return snap


async def run(engine: minifaas.Engine, name: str, url: str, **args: Any) -> minifaas.Activation:
    return assert_success(await engine.call(name, {"model_url": url, **args}))


async def wait_running(engine: minifaas.Engine, activation_id: str) -> None:
    with anyio.fail_after(WAIT_S):
        while (await engine.activations.get(activation_id)).status != "running":
            await anyio.sleep(0.01)


async def test_first_call_misses_and_downloads_second_hits(minifaas_engine: minifaas.Engine, tmp_path: Path) -> None:
    url = model_copy(tmp_path, DETECTOR, "a")
    before = minifaas_engine.model_store.stats()
    async with deployed(minifaas_engine, "cache1", max_sandboxes=1):
        first = await run(minifaas_engine, "cache1", url)
        second = await run(minifaas_engine, "cache1", url)
    after = minifaas_engine.model_store.stats()

    assert first.result["input_shape"] == [1, 224, 224, 3]  # the real detector was loaded
    assert first.annotations["cold"] is True
    assert first.annotations["model_cache"] == "miss"
    (loaded,) = first.annotations["models"]
    assert loaded["url"] == url and loaded["hit"] is False
    # the host store copied the file in (download) and the sandbox built an interpreter from it (load)
    assert loaded["download_ms"] > 0 and loaded["load_ms"] > 0
    assert after["downloads"] - before["downloads"] == 1
    assert after["bytes"] - before["bytes"] == DETECTOR.stat().st_size

    assert second.result["pid"] == first.result["pid"]
    assert second.annotations["cold"] is False
    assert second.annotations["model_cache"] == "hit"
    assert second.annotations["models"] == [{"url": url, "hit": True, "download_ms": 0.0, "load_ms": 0.0}]
    assert second.result["held"] == [url]


async def _warm(engine: minifaas.Engine, name: str, urls: list[str]) -> dict[str, int]:
    """Concurrent first calls, one per model: each model warm in a sandbox of its own; model url -> pid."""
    pids: dict[str, int] = {}

    async def one(url: str) -> None:
        act = await run(engine, name, url, hold_s=HOLD_S)
        assert act.annotations["model_cache"] == "miss"
        pids[url] = act.result["pid"]

    async with anyio.create_task_group() as tg:
        for url in urls:
            tg.start_soon(one, url)
    assert len(set(pids.values())) == len(urls), f"the first calls shared sandboxes: {pids}"
    return pids


async def test_calls_go_to_the_sandbox_holding_their_model(minifaas_engine: minifaas.Engine, tmp_path: Path) -> None:
    a, b = model_copy(tmp_path, DETECTOR, "a"), model_copy(tmp_path, LANDMARK, "b")
    async with deployed(minifaas_engine, "affinity", max_sandboxes=2) as key:
        holder = await _warm(minifaas_engine, "affinity", [a, b])
        assert pool(minifaas_engine, key)["models"] == sorted([a, b])
        # alternating, so that "most recently used" (the routing without a model) would be wrong every time
        for url in [a, b, a, b, b, a, a, b]:
            act = await run(minifaas_engine, "affinity", url)
            assert act.result["pid"] == holder[url], f"{Path(url).name} went to the wrong sandbox"
            assert act.annotations["model_cache"] == "hit"
            assert act.result["held"] == [url]  # neither sandbox loaded the other's model
        assert pool(minifaas_engine, key)["sandboxes"] == 2


async def test_busy_holder_spills_to_the_idle_sandbox_with_fewest_models(
    minifaas_engine: minifaas.Engine, tmp_path: Path
) -> None:
    """Three warm sandboxes: S_a holds {A}, S_b holds {B, C}, S_c holds {C}; the function may start a fourth.

    With S_a busy, a call for A must go to S_c (one model), not S_b (two) and not a new sandbox. Then A is hot:
    sequential calls for A stay on its holders, S_b never loads A, and B keeps hitting in S_b: one hot model does
    not end up loaded in (pinning the memory of) every sandbox.
    """
    a = model_copy(tmp_path, DETECTOR, "a")
    b = model_copy(tmp_path, LANDMARK, "b")
    c = model_copy(tmp_path, CLASSIFIER, "c")
    async with deployed(minifaas_engine, "spill", max_sandboxes=4) as key:
        pid = await _warm(minifaas_engine, "spill", [a, b, c])
        s_a, s_b, s_c = pid[a], pid[b], pid[c]
        extra = await run(minifaas_engine, "spill", b, also=[c])  # routed by B to S_b, which then also loads C
        assert extra.result["pid"] == s_b and sorted(extra.result["held"]) == sorted([b, c])
        cold_starts = minifaas_engine.stats()["cold_starts"]

        busy_id = await minifaas_engine.submit("spill", {"model_url": a, "hold_s": BUSY_HOLD_S})
        await wait_running(minifaas_engine, busy_id)
        spilled = await run(minifaas_engine, "spill", a)
        busy = assert_success(await minifaas_engine.activations.wait(busy_id, timeout_s=WAIT_S))
        assert busy.result["pid"] == s_a
        assert spilled.result["pid"] == s_c, f"went to {spilled.result['pid']}; S_a={s_a} S_b={s_b} S_c={s_c}"
        assert spilled.annotations["model_cache"] == "miss"
        assert minifaas_engine.stats()["cold_starts"] == cold_starts
        assert pool(minifaas_engine, key)["sandboxes"] == 3

        for _ in range(6):
            hot = await run(minifaas_engine, "spill", a)
            assert hot.result["pid"] in (s_a, s_c) and hot.annotations["model_cache"] == "hit"
        for _ in range(2):
            other = await run(minifaas_engine, "spill", b)
            assert other.result["pid"] == s_b and other.annotations["model_cache"] == "hit"
            assert a not in other.result["held"]
        assert minifaas_engine.stats()["cold_starts"] == cold_starts


class SlowModelServer:
    """A real HTTP server on 127.0.0.1 serving functions/models after SLOW_RESPONSE_S, counting its GETs."""

    def __init__(self) -> None:
        self.gets: Counter[str] = Counter()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.gets[self.path] += 1
                file = MODELS_DIR / self.path.lstrip("/")
                if not file.is_file():
                    self.send_error(404)
                    return
                body = file.read_bytes()
                time.sleep(SLOW_RESPONSE_S)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(body)
                self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def slow_server() -> Iterator[SlowModelServer]:
    srv = SlowModelServer()
    try:
        yield srv
    finally:
        srv.close()


async def test_concurrent_first_calls_download_once(
    minifaas_engine: minifaas.Engine, slow_server: SlowModelServer
) -> None:
    url = f"{slow_server.base}/{DETECTOR.name}"
    before = minifaas_engine.model_store.stats()
    acts: list[minifaas.Activation] = []

    async def one() -> None:
        # no sha256: with one, the store would serve the bytes an earlier test brought under another url
        acts.append(await run(minifaas_engine, "burst", url))

    async with deployed(minifaas_engine, "burst", max_sandboxes=4), anyio.create_task_group() as tg:
        for _ in range(8):
            tg.start_soon(one)
    after = minifaas_engine.model_store.stats()
    delta = {k: after[k] - before[k] for k in after}

    pids = {act.result["pid"] for act in acts}
    assert len(acts) == 8 and len(pids) >= 2, f"the burst did not spread: {pids}"
    assert slow_server.gets[f"/{DETECTOR.name}"] == 1
    assert delta["downloads"] == 1 and delta["bytes"] == DETECTOR.stat().st_size
    # each sandbox asked the host once (its own cache serves its later calls); all but one waited or hit
    assert delta["downloads"] + delta["shared"] + delta["hits"] == len(pids)
    assert delta["shared"] >= 1, f"no fetch overlapped the download: {delta}"
    assert sum(act.annotations["model_cache"] == "miss" for act in acts) == len(pids)


async def test_sha256_mismatch_is_an_application_error(minifaas_engine: minifaas.Engine, tmp_path: Path) -> None:
    url = model_copy(tmp_path, DETECTOR, "e")
    async with deployed(minifaas_engine, "badsha", max_sandboxes=1):
        bad = await minifaas_engine.call("badsha", {"model_url": url, "sha256": WRONG_SHA})
        assert_status(bad, "application_error", error_contains="sha256 mismatch")
        assert WRONG_SHA in bad.result["error"] and DETECTOR_SHA in bad.result["error"]
        # the refused model was not cached: the same sandbox loads it once the right digest is given
        good = await run(minifaas_engine, "badsha", url, sha256=DETECTOR_SHA)
        assert good.annotations["model_cache"] == "miss"
        assert good.annotations["sandbox"] == bad.annotations["sandbox"]
    # the refused copy left nothing behind in the store (no partial file, nothing under the wrong digest)
    assert not minifaas_engine.model_store.content_path(WRONG_SHA).exists()
    assert list((minifaas_engine.model_store.root / "tmp").iterdir()) == []


async def test_pipelining_follows_recent_run_times() -> None:
    """hol.py: after many fast calls the lifetime mean stayed low, so slow calls were queued behind each other."""
    async with minifaas.Engine() as engine:
        code = "import time\ndef main(a):\n    time.sleep(a['s'])\n    return {}\n"
        await engine.deploy("f", code=code, max_sandboxes=8)
        for _ in range(2000):  # a lifetime mean of these stays under the pipelining threshold after slow runs
            await engine.invoke("f", {"s": 0})
        pipelined: list[list[bool]] = []
        for _ in range(3):
            burst: list[bool] = []

            async def one(burst: list[bool] = burst) -> None:
                act = await engine.call("f", {"s": 0.2})
                burst.append(bool(act.annotations.get("pipelined")))

            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(one)
            pipelined.append(burst)
            await anyio.sleep(0.05)
        # the first burst runs before any slow result is known; after it, slow calls scale out instead
        assert not any(pipelined[1]) and not any(pipelined[2]), pipelined


@pytest.mark.parametrize(
    ("max_sandboxes", "spread", "expect"),
    [(1, False, True), (2, False, True), (2, True, False)],
    ids=["one-sandbox", "at-cap-even-runs", "at-cap-uneven-runs"],
)
async def test_a_function_at_its_cap_keeps_its_sandboxes_fed(max_sandboxes: int, spread: bool, expect: bool) -> None:
    """No sandbox may start for it: a request waits for a busy one anyway, so it is queued inside the one that
    frees first (whatever its run time) and starts when that run ends, not a host round trip later. Not when the
    run times vary widely: the one picked could end last."""
    code = "import time\ndef main(a):\n    time.sleep(a['s'])\n    return {}\n"
    async with minifaas.Engine() as engine:
        await engine.deploy("f", code=code, max_sandboxes=max_sandboxes)
        for i in range(30):  # runs of 5 ms (over the 2 ms short-run rule), or of 0 to 30 ms
            await engine.invoke("f", {"s": (0.03 if i % 2 else 0.0) if spread else 0.005})
        flags: list[bool] = []

        async def client() -> None:
            for i in range(6):
                act = await engine.call("f", {"s": (0.03 if i % 2 else 0.0) if spread else 0.005})
                flags.append(bool(act.annotations.get("pipelined")))

        async with anyio.create_task_group() as tg:
            for _ in range(2 * max_sandboxes):
                tg.start_soon(client)
        assert any(flags) is expect, flags
