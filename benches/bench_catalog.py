"""The catalog workflow on real video frames: the engine (feed -> trigger -> composition) vs a plain loop.

Run: ``python benches/bench_catalog.py [--frames 1000] [--window 16] [--sandboxes 2] [--entry trigger|submit]``
(``--skip-engine``/``--skip-baseline`` run one side, ``--baseline-cv2-threads N`` sets OpenCV's threads in the
loop, ``--feed-interval S`` the folder feed's polling, ``--keep DIR`` keeps frames and outputs).

Frames come from ``benches/data/vtest.avi`` (768x576 pedestrians, 795 frames), written as JPEG (quality 90) to
a temporary folder; past frame 795 the video is replayed mirrored left-right, so each of the N files is a
distinct real image. Each variant runs in a fresh interpreter (no shared heap, threads or imports). Both
produce the same outputs (crop + JSON sidecar in a catalog folder, or a copy + sidecar in a rejected folder)
with the same three functions:

- ``baseline``: one process, a plain sequential loop calling image_quality -> smart_body_crop -> auto_tag
  through ``minifaas.testing.call`` (in-process, under the sandbox contract) and writing the files;
- ``engine``: ``functions/catalog/workflow.py`` deployed on an Engine; by default each frame is dropped into an
  uploads folder watched by a folder feed whose trigger's rule runs the composition (``--entry submit`` calls
  ``engine.submit`` instead, ``--entry map`` maps the composition's handle over the frames: ``Function.map``).
  At most ``--window`` photos are in flight; the next is dropped when one ends.
  The window must cover the feed's delay as well as the sessions (Little's law): 8 left the cores idle here.

Printed per variant: wall time, throughput, per-photo latency p50/p99 (baseline: one photo's processing time;
engine: from the drop to the end of its session, so it includes the feed's polling and queueing behind the
other photos in the window), peak memory (sum over the host and its sandbox processes, including the zygote:
RSS, and PSS which counts pages shared copy-on-write once), lost photos (sidecars missing, sessions not
successful, staging files left), and CPU time per photo (baseline: the process; engine: the host, and the
sandboxes and zygote read from /proc). Cold starts and model loading are inside both measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import anyio.to_thread
import cv2

import minifaas
from minifaas.testing import call

# tests.helpers (the /proc readings the tests share) is imported from the repository's root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers.proc import smaps_rollup_kb

REPO = Path(__file__).resolve().parent.parent
VIDEO = REPO / "benches" / "data" / "vtest.avi"
FUNCTIONS = REPO / "functions"
JPEG_QUALITY = 90
FEED_INTERVAL_S = 0.05
SAMPLE_INTERVAL_S = 0.1
PSS_INTERVAL_S = 5.0
SESSION_TIMEOUT_S = 300.0
FIRE_POLL_S = 0.01
GOAL_RATIO = 1.7
RESULT_PREFIX = "RESULT "


def load_workflow() -> ModuleType:
    if str(FUNCTIONS) not in sys.path:
        sys.path.append(str(FUNCTIONS))
    return importlib.import_module("catalog.workflow")


wf = load_workflow()


# ---------------------------------------------------------------------------------------------- frames


def write_frames(n: int, folder: Path) -> list[Path]:
    """N real frames of the video as JPEG files; past its end it is replayed mirrored (then plain, and so on)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    rounds = 0
    # streamed, one frame in memory at a time: holding 795 decoded frames (~1 GB) would inflate the host's RSS
    while len(paths) < n:
        cap = cv2.VideoCapture(str(VIDEO))
        before = len(paths)
        try:
            while len(paths) < n:
                ok, frame = cap.read()
                if not ok:
                    break
                if rounds % 2 == 1:
                    frame = cv2.flip(frame, 1)
                path = folder / f"frame{len(paths):05d}.jpg"
                cv2.imwrite(str(path), frame, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
                paths.append(path)
        finally:
            cap.release()
        if len(paths) == before:
            raise SystemExit(f"cannot decode {VIDEO}")
        rounds += 1
    return paths


# ---------------------------------------------------------------------------------------------- memory


PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def _rss_kib(pid: int) -> int:
    """Resident set size from /proc/<pid>/statm: cheap enough to read ten times a second."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
    except (OSError, IndexError, ValueError):
        return 0


def _pss_kib(pid: int) -> int:
    """Proportional set size: walks the page tables (~1-2 ms a process), so it is read every PSS_INTERVAL_S."""
    try:
        return smaps_rollup_kb(pid).get("Pss", 0)
    except OSError:
        return 0


@dataclass
class Peak:
    rss_kib: int = 0
    pss_kib: int = 0
    processes: int = 0
    _last_pss: float = 0.0

    def sample(self, pids: list[int], *, force_pss: bool = False) -> None:
        self.rss_kib = max(self.rss_kib, sum(_rss_kib(pid) for pid in pids))
        self.processes = max(self.processes, len(pids))
        now = time.monotonic()
        if force_pss or now - self._last_pss >= PSS_INTERVAL_S:
            self._last_pss = now
            self.pss_kib = max(self.pss_kib, sum(_pss_kib(pid) for pid in pids))


CLOCK_TICKS_S = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds a live process has used (fields 14 and 15 of /proc/<pid>/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_S


def engine_pids(engine: minifaas.Engine) -> list[int]:
    """The host, the zygote (sandboxes fork from it) and every sandbox."""
    stats = engine.stats()
    pids = {os.getpid()}
    zygote = (stats.get("launcher_stats") or {}).get("zygote_pid")
    if zygote:
        pids.add(int(zygote))
    for pool in stats["functions"].values():
        pids.update(int(p) for p in pool.get("pids") or ())
    return sorted(pids)


# ---------------------------------------------------------------------------------------------- results


@dataclass
class Result:
    name: str
    photos: int
    wall_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    peak: Peak = field(default_factory=Peak)
    lost: int = 0
    catalogued: int = 0
    cropped: int = 0
    rejected: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.photos / self.wall_s if self.wall_s else 0.0

    def pct(self, q: float) -> float:
        values = sorted(self.latencies_ms)
        return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


def count_outputs(result: Result, catalog: Path, rejected: Path, expected: list[Path]) -> None:
    """Every photo must have exactly one sidecar (catalog or rejected) and no staging file may be left."""
    sidecars = {}
    for folder in (catalog, rejected):
        for p in folder.glob("*.json"):
            sidecars[p.stem] = json.loads(p.read_text())
    result.catalogued = sum(1 for s in sidecars.values() if s["outcome"] == "catalog")
    result.cropped = sum(1 for s in sidecars.values() if s["outcome"] == "catalog" and s.get("box"))
    result.rejected = sum(1 for s in sidecars.values() if s["outcome"] == "rejected")
    staging = [p for folder in (catalog, rejected) for p in folder.iterdir() if p.name.startswith(".")]
    missing = [p.stem for p in expected if p.stem not in sidecars]
    failed = [stem for stem, s in sidecars.items() if s["outcome"] not in ("catalog", "rejected")]
    result.lost = len(missing) + len(failed) + len(staging)
    result.extra["missing"] = missing[:5]
    result.extra["failed"] = failed[:5]


# ---------------------------------------------------------------------------------------------- baseline


def run_baseline(frames: list[Path], out: Path, cv2_threads: int | None) -> Result:
    """The three functions in a plain sequential loop in this process, writing the same files."""
    if cv2_threads is not None:
        cv2.setNumThreads(cv2_threads)
    catalog, rejected = out / "catalog", out / "rejected"
    catalog.mkdir(parents=True)
    rejected.mkdir(parents=True)
    result = Result("baseline (sequential loop, one process)", len(frames))
    result.extra["cv2_threads"] = cv2.getNumThreads()
    quality_fn, crop_fn, tag_fn = (FUNCTIONS / f for f in ("image_quality", "smart_body_crop", "auto_tag"))
    stop = threading.Event()

    def sampler() -> None:
        while not stop.wait(SAMPLE_INTERVAL_S):
            result.peak.sample([os.getpid()])

    thread = threading.Thread(target=sampler, name="bench-memory", daemon=True)
    thread.start()
    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    try:
        for path in frames:
            t = time.perf_counter()
            stem = path.stem
            quality = call(quality_fn, {"image": str(path)}, in_process=True)
            record: dict[str, Any] = {"photo": path.name, "source": str(path), "quality": quality}
            if quality["passed"]:
                staging = catalog / f".{stem}.tmp.jpg"
                crop = call(
                    crop_fn, {"image": str(path), "output_path": str(staging), "format": "jpeg"}, in_process=True
                )
                tags = call(tag_fn, {"image": str(path), "person": bool(crop.get("person"))}, in_process=True)
                crop_tags = None
                if crop.get("output_path"):
                    # as the workflow does: the crop is tagged too, with garment classes
                    crop_tags = call(
                        tag_fn, {"image": str(staging), "person": False, "vocabulary": "garments"}, in_process=True
                    )
                    image = catalog / f"{stem}.jpg"
                    os.replace(staging, image)
                    box = {k: crop[k] for k in ("x", "y", "w", "h")}
                else:
                    image = catalog / path.name
                    wf._copy_atomic(str(path), image)
                    box = None
                record |= {"outcome": "catalog", "image": str(image), "box": box, "tags": tags["tags"]}
                record["crop_tags"] = None if crop_tags is None else crop_tags["tags"]
                wf._write_json_atomic(catalog / f"{stem}.json", record)
            else:
                wf._copy_atomic(str(path), rejected / path.name)
                record |= {"outcome": "rejected", "image": str(rejected / path.name)}
                wf._write_json_atomic(rejected / f"{stem}.json", record)
            result.latencies_ms.append((time.perf_counter() - t) * 1e3)
        result.wall_s = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu_s = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
        result.extra["cpu_ms_per_photo"] = f"{cpu_s / len(frames) * 1e3:.1f}"
    finally:
        stop.set()
        thread.join()
    result.peak.sample([os.getpid()], force_pss=True)
    count_outputs(result, catalog, rejected, frames)
    return result


# ---------------------------------------------------------------------------------------------- engine


def _drop(src: Path, folder: Path) -> None:
    tmp = folder / f".{src.name}.part"
    shutil.copyfile(src, tmp)
    # mtime older than the rename's ctime: the feed sees the file is whole at its first look (as after cp -p)
    written = time.time() - 1.0
    os.utime(tmp, (written, written))
    os.replace(tmp, folder / src.name)


async def run_engine(
    frames: list[Path], out: Path, *, window: int, sandboxes: int, entry: str, feed_interval_s: float
) -> Result:
    catalog, rejected, uploads = out / "catalog", out / "rejected", out / "uploads"
    for folder in (catalog, rejected, uploads):
        folder.mkdir(parents=True)
    result = Result(f"engine (composition, entry={entry}, window={window}, {sandboxes} sandboxes/function)", 0)
    statuses: dict[str, str] = {}
    async with minifaas.Engine() as engine:
        await wf.deploy_functions(engine, max_sandboxes=sandboxes, grants=[str(catalog)])
        await wf.deploy_catalog(engine, params={"catalog_dir": str(catalog), "rejected_dir": str(rejected)})
        slots = anyio.Semaphore(window)
        dropped: dict[str, float] = {}
        all_done = anyio.Event()
        remaining = [len(frames)]

        async def finish(name: str, session_id: str) -> None:
            try:
                act = await engine.activations.wait(session_id, timeout_s=SESSION_TIMEOUT_S)
                statuses[name] = act.status
                result.latencies_ms.append((time.perf_counter() - dropped[name]) * 1e3)
                result.photos += 1
            finally:
                slots.release()
                remaining[0] -= 1
                if remaining[0] == 0:
                    all_done.set()

        async def sample_memory() -> None:
            while True:
                pids = engine_pids(engine)
                await anyio.to_thread.run_sync(result.peak.sample, pids)
                await anyio.sleep(SAMPLE_INTERVAL_S)

        tm = engine.triggers
        assert tm is not None
        if entry == "trigger":
            tm.create_trigger("uploads", rate_per_minute=None)
            tm.create_rule("catalog-uploads", "uploads", wf.COMPOSITION_NAME)
            await tm.add_feed("uploads", "folder", path=str(uploads), interval_s=feed_interval_s)
        async with anyio.create_task_group() as run_tg:
            run_tg.start_soon(sample_memory)
            seen: set[str] = set()

            async def collect() -> None:
                # a fire names the photo and the session its rule started
                while True:
                    for fire in tm.list_fires("uploads", limit=4 * window + 16):
                        if fire.activation_id in seen:
                            continue
                        seen.add(fire.activation_id)
                        (session_id,) = fire.activation_ids
                        run_tg.start_soon(finish, fire.args["name"], session_id)
                    await anyio.sleep(FIRE_POLL_S)

            if entry == "trigger":
                run_tg.start_soon(collect)
            t0 = time.perf_counter()
            cpu0 = resource.getrusage(resource.RUSAGE_SELF)
            if entry == "map":
                # Function.map over the composition: the handle streams the frames through its own window
                catalog_fn = await engine.function(wf.COMPOSITION_NAME)
                inputs = ({"path": str(path), "name": path.name} for path in frames)
                async for out_ in catalog_fn.map(inputs, concurrency=window, return_exceptions=True):
                    ok = isinstance(out_, dict)
                    statuses[str(out_.get("photo") if ok else result.photos)] = "success" if ok else "failed"
                    result.photos += 1
                all_done.set()
            for path in frames if entry != "map" else ():
                await slots.acquire()
                dropped[path.name] = time.perf_counter()
                if entry == "trigger":
                    await anyio.to_thread.run_sync(_drop, path, uploads)
                else:
                    args = {"path": str(path), "name": path.name}
                    session_id = await engine.submit(wf.COMPOSITION_NAME, args)
                    run_tg.start_soon(finish, path.name, session_id)
            await all_done.wait()
            result.wall_s = time.perf_counter() - t0
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            pids = engine_pids(engine)
            result.peak.sample(pids, force_pss=True)
            # since they started: cold starts and model loading are in it, as in the baseline's figure
            sandbox_cpu_s = sum(_cpu_s(pid) for pid in pids if pid != os.getpid())
            run_tg.cancel_scope.cancel()
        stats = engine.stats()
        host_user, host_sys = cpu1.ru_utime - cpu0.ru_utime, cpu1.ru_stime - cpu0.ru_stime
        result.extra["host_cpu_ms_per_photo"] = f"{(host_user + host_sys) / len(frames) * 1e3:.1f}"
        result.extra["sandbox_cpu_ms_per_photo"] = f"{sandbox_cpu_s / len(frames) * 1e3:.1f}"
        result.extra["cpu_ms_per_photo"] = f"{(host_user + host_sys + sandbox_cpu_s) / len(frames) * 1e3:.1f}"
        result.extra["host_sys_share"] = f"{host_sys / max(host_user + host_sys, 1e-9):.0%}"
        result.extra["cold_starts"] = stats.get("cold_runs")
        result.extra["warm_runs"] = stats.get("warm_runs")
        result.extra["sandboxes_peak"] = result.peak.processes
        sessions = engine.sessions.list(wf.COMPOSITION_NAME, limit=len(frames))
        durations = sorted(float(s.duration or 0) for s in sessions)
        if durations:
            result.extra["session_p50_ms"] = durations[len(durations) // 2]
            result.extra["session_p99_ms"] = durations[min(len(durations) - 1, int(len(durations) * 0.99))]
    count_outputs(result, catalog, rejected, frames)
    result.lost += len(frames) - result.photos + sum(1 for s in statuses.values() if s != "success")
    return result


# ---------------------------------------------------------------------------------------------- main


def report(r: Result) -> None:
    print(f"\n{r.name}")
    print(f"  photos {r.photos}, wall {r.wall_s:.1f} s, throughput {r.throughput:.2f} photos/s")
    mean = statistics.fmean(r.latencies_ms) if r.latencies_ms else float("nan")
    print(f"  latency p50 {r.pct(0.5):.0f} ms, p99 {r.pct(0.99):.0f} ms, mean {mean:.0f} ms")
    print(
        f"  peak memory (host + sandboxes, {r.peak.processes} processes): RSS {r.peak.rss_kib / 1024:.0f} MiB, "
        f"PSS {r.peak.pss_kib / 1024:.0f} MiB"
    )
    print(f"  catalogued {r.catalogued} ({r.cropped} cropped), rejected {r.rejected}, lost {r.lost}")
    if r.extra:
        print("  " + ", ".join(f"{k} {v}" for k, v in r.extra.items() if v not in ([], None)))


def run_variant(variant: str, args: argparse.Namespace, frames_dir: Path, out: Path) -> Result:
    """One variant in a fresh interpreter, so neither inherits the other's heap, threads or imports."""
    cmd = [sys.executable, __file__, "--only", variant, "--frames-dir", str(frames_dir), "--out", str(out)]
    cmd += ["--window", str(args.window), "--sandboxes", str(args.sandboxes), "--entry", args.entry]
    cmd += ["--feed-interval", str(args.feed_interval)]
    if args.baseline_cv2_threads is not None:
        cmd += ["--baseline-cv2-threads", str(args.baseline_cv2_threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith(RESULT_PREFIX)), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"{variant} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    data = json.loads(line[len(RESULT_PREFIX) :])
    data["peak"] = Peak(**data["peak"])
    return Result(**data)


def child(args: argparse.Namespace) -> int:
    frames = sorted(args.frames_dir.glob("*.jpg"))
    if args.only == "engine":
        coro = run_engine(
            frames,
            args.out,
            window=args.window,
            sandboxes=args.sandboxes,
            entry=args.entry,
            feed_interval_s=args.feed_interval,
        )
        result = anyio.run(lambda: coro)
    else:
        result = run_baseline(frames, args.out, args.baseline_cv2_threads)
    print(RESULT_PREFIX + json.dumps(dataclasses.asdict(result)))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=1000, help="how many frames (default 1000)")
    ap.add_argument("--window", type=int, default=16, help="engine: photos in flight at once (default 16)")
    ap.add_argument("--sandboxes", type=int, default=wf.DEFAULT_MAX_SANDBOXES, help="engine: max per function")
    ap.add_argument(
        "--entry", choices=("trigger", "submit", "map"), default="trigger", help="engine: how photos arrive"
    )
    ap.add_argument("--feed-interval", type=float, default=FEED_INTERVAL_S, help="engine: folder feed poll (s)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--baseline-cv2-threads", type=int, default=None, help="OpenCV threads in the baseline loop")
    ap.add_argument("--keep", type=Path, default=None, help="write frames and outputs here and keep them")
    ap.add_argument("--only", choices=("engine", "baseline"), help=argparse.SUPPRESS)
    ap.add_argument("--frames-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.only:
        return child(args)
    if args.keep is not None and args.keep.exists() and any(args.keep.iterdir()):
        raise SystemExit(f"--keep {args.keep}: the folder is not empty (old outputs would be counted)")
    root = args.keep or Path(tempfile.mkdtemp(prefix="minifaas-bench-catalog-"))
    try:
        t = time.perf_counter()
        frames = write_frames(args.frames, root / "frames")
        print(f"{len(frames)} frames of {VIDEO.name} as JPEG in {root / 'frames'} ({time.perf_counter() - t:.1f} s)")
        print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.1f}")
        eng = base = None
        if not args.skip_engine:
            eng = run_variant("engine", args, root / "frames", root / "engine")
            report(eng)
        if not args.skip_baseline:
            base = run_variant("baseline", args, root / "frames", root / "baseline")
            report(base)
        if eng is None or base is None:
            return 0 if all(r is None or r.lost == 0 for r in (eng, base)) else 1
        ratio = eng.throughput / base.throughput
        print(f"\nthroughput ratio engine/baseline: {ratio:.2f}x (goal >= {GOAL_RATIO}x)")
        same = (eng.catalogued, eng.cropped, eng.rejected) == (base.catalogued, base.cropped, base.rejected)
        print(f"same outcomes in both: {same}; load average after: {os.getloadavg()[0]:.1f}")
        return 0 if eng.lost == 0 and base.lost == 0 else 1
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
