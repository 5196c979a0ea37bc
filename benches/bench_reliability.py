"""Reliability and security bench: the long versions of tests/test_reliability.py, test_security.py, test_fuzz.py.

Run: ``python benches/bench_reliability.py`` (all sections, ~5 min on 2 cores), or pick sections with
``--only chaos,crash,attacks,backpressure,fuzz,runtime,faults``; ``--invocations``, ``--crashes``, ``--submits``
scale them.
Prints one line per measurement and a Markdown summary (the README "Reliability" figures); ``--json FILE`` keeps
the raw figures.

- chaos: invocations over 4 functions while a task SIGKILLs a random sandbox every 100 ms; every accepted one must
  end in exactly one record (success, or developer_error naming the signal), none may hang, nothing may be left.
- crash: a host with a state_dir submits without pause and is killed -9 at a random time, several times; on
  restart every accepted activation is read back: completed ones as they ended, in-flight ones marked failed.
- attacks: infinite loop, fork bomb, 10 GB allocation, 100 MB of prints (captured and raw), 50 MB result, deep
  recursion, C-stack overflow, each next to a healthy function called every 20 ms.
- backpressure: 100,000 submits against a bounded queue: the time of a rejected submit and the host's memory.
- fuzz: tests/test_fuzz.py with ``HYPOTHESIS_PROFILE=long``.
- runtime: a function whose threads print (every line must arrive whole), an exception whose ``__str__`` raises
  (with concurrency 1 and 4: every call ends at once, the sandbox lives on), and model downloads from a server
  dripping bytes or cutting the body short (the deadline, cancellation and Content-Length check hold).
- catalog: the catalog workflow (real models) fed by a folder feed, 1,000 photos (``--photos``), the host killed
  -9 at random points (``--catalog-kills``) and restarted until done: every photo must end exactly once in
  ``catalog/`` or ``rejected/`` (none in both, none missing), whatever the kills interrupted.
- faults: the ten faults of issue 25, one scenario each (``benches/reliability_faults.py``): what happens, and
  that every accepted invocation has exactly one final record (none lost) within a bound (none hung).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

import minifaas
from minifaas._core.launch import MAX_PIDS_PER_SANDBOX, PIDS

# tests.helpers (the /proc readings the tests share) is imported from the repository's root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers.crashhost import run_host_and_kill
from tests.helpers.proc import descendants, proc_table, rss_kb

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reliability_faults

ROOT = Path(__file__).resolve().parent.parent
KILL_PERIOD_S = 0.1
HEALTHY_PERIOD_S = 0.02
PROCESS_EXIT_S = 15.0
FIGURES: dict[str, Any] = {}


def say(msg: str) -> None:
    print(msg, flush=True)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


async def leftovers(before: set[int], parents: set[int], sessions: set[int]) -> set[int]:
    """Live processes left after a wait: new descendants of this process, children of ``parents``, members of
    ``sessions`` (sandboxes are session leaders)."""
    left: set[int] = set()
    deadline = time.monotonic() + PROCESS_EXIT_S
    while time.monotonic() < deadline:
        table = proc_table()
        live = {pid for pid, (state, _, _) in table.items() if state != "Z"}
        left = (descendants(os.getpid(), table) - before) | {
            pid for pid in live if table[pid][1] in parents or table[pid][2] in sessions
        }
        left &= live
        if not left:
            break
        await anyio.sleep(0.1)
    return left


# -- chaos ----------------------------------------------------------------------------------------------------
CHAOS_FUNCTIONS = {
    "fast": "def main(args):\n    return {'i': args['i']}\n",
    "sleepy": "import time\ndef main(args):\n    time.sleep(args['i'] % 5 * 0.01)\n    return {'i': args['i']}\n",
    "cpu": "def main(args):\n    s = 0\n    for k in range(50_000):\n        s += k\n    return {'i': args['i']}\n",
    "printer": "def main(args):\n    print('x' * 100)\n    return {'i': args['i']}\n",
}


async def bench_chaos(n: int, clients: int = 50) -> None:
    before = descendants(os.getpid(), proc_table())
    ends: collections.Counter[str] = collections.Counter()
    acts: dict[str, minifaas.Activation] = {}
    hung = 0
    zygotes: set[int] = set()
    sandboxes: set[int] = set()
    kills = 0
    names = list(CHAOS_FUNCTIONS)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as state:
        async with minifaas.Engine(state_dir=state) as engine:
            engine.add_end_hook(lambda act: ends.update([act.activation_id]))
            for name, code in CHAOS_FUNCTIONS.items():
                await engine.deploy(name, code=code, max_sandboxes=3)

            async def killer() -> None:
                nonlocal kills
                while True:
                    await anyio.sleep(KILL_PERIOD_S)
                    stats = engine.stats()
                    if stats.get("launcher_stats", {}).get("zygote_pid"):
                        zygotes.add(stats["launcher_stats"]["zygote_pid"])
                    pids = [pid for fn in stats["functions"].values() for pid in fn["pids"]]
                    sandboxes.update(pids)
                    if pids:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(random.choice(pids), signal.SIGKILL)
                            kills += 1

            async def client(first: int) -> None:
                nonlocal hung
                for i in range(first, n, clients):
                    with anyio.move_on_after(120) as scope:
                        act = await engine.call(names[i % len(names)], {"i": i})
                        acts[act.activation_id] = act
                    hung += scope.cancelled_caught

            async with anyio.create_task_group() as chaos:
                chaos.start_soon(killer)
                async with anyio.create_task_group() as tg:
                    for k in range(clients):
                        tg.start_soon(client, k)
                chaos.cancel_scope.cancel()
            elapsed = time.perf_counter() - t0
            statuses = collections.Counter(a.status for a in acts.values())
            signal_named = sum(1 for a in acts.values() if "killed by SIG" in str(a.result.get("error")))
            other = len(acts) - statuses["success"] - signal_named
            not_once = sum(1 for aid in acts if ends[aid] != 1)
            lost = 0
            for aid, act in acts.items():
                stored = await engine.activations.get(aid)
                lost += stored.status != act.status or not stored.done
            serving = all([await engine.invoke(name, {"i": -1}) == {"i": -1} for name in names])
        left = await leftovers(before, zygotes, sandboxes)
    FIGURES["chaos"] = {
        "invocations": len(acts),
        "seconds": round(elapsed, 1),
        "kills": kills,
        "success": statuses["success"],
        "developer_error_naming_signal": signal_named,
        "other_outcomes": other,
        "not_ended_exactly_once": not_once,
        "hung": hung,
        "records_lost": lost,
        "serving_after": serving,
        "processes_left": len(left),
    }
    say(f"chaos: {FIGURES['chaos']}")


# -- host crash -----------------------------------------------------------------------------------------------
async def bench_crash(rounds: int) -> None:
    totals: collections.Counter[str] = collections.Counter()
    for r in range(rounds):
        kill_after = random.uniform(1.0, 4.0)
        with tempfile.TemporaryDirectory() as state:
            lines, family = await anyio.to_thread.run_sync(
                functools.partial(run_host_and_kill, state, kill_after, batch=50, max_sandboxes=4)
            )
            left = await leftovers(set(), family, family)
            accepted = [x[1] for x in lines if x[:1] == ["acc"] and len(x) == 2]
            ended = {x[1]: x[2] for x in lines if x[:1] == ["end"] and len(x) == 3}
            c: collections.Counter[str] = collections.Counter(accepted=len(accepted), processes_left=len(left))
            async with minifaas.Engine(state_dir=state) as engine:
                c["recovered_by_engine"] = engine.recovered
                for aid in accepted:
                    try:
                        act = await engine.activations.get(aid)
                    except minifaas.ActivationNotFound:
                        c["missing"] += 1
                        continue
                    if aid in ended:
                        c["completed_readable" if act.status == ended[aid] else "completed_wrong"] += 1
                    elif act.annotations.get("recovered") and act.status == "internal_error":
                        c["in_flight_marked_failed"] += 1
                    elif act.done:
                        c["completed_readable"] += 1  # its "end" line died with the host
                    else:
                        c["left_pending"] += 1
        say(f"crash round {r + 1}: killed after {kill_after:.2f} s: {dict(c)}")
        totals.update(c)
    FIGURES["crash"] = {"rounds": rounds, **dict(totals)}
    say(f"crash: {FIGURES['crash']}")


# -- catalog under crashes -------------------------------------------------------------------------------------
async def bench_catalog_crashes(photos: int, kills: int) -> None:
    sys.path.insert(0, str(ROOT / "functions"))
    from tests.helpers import catalog_crash as crashrun

    images = sorted(p for p in (ROOT / "tests" / "data" / "images").iterdir() if p.suffix in (".jpg", ".png"))
    with tempfile.TemporaryDirectory() as d:
        root, state = Path(d), Path(d) / "state"
        await anyio.to_thread.run_sync(crashrun.setup, state, root)
        stems = crashrun.drop_photos(root, images, photos)
        t0 = time.monotonic()
        fires_per_run: list[int] = []
        left_total = 0
        for k in range(kills + 1):
            kill_after = random.uniform(3.0, 12.0) if k < kills else None
            fires, family = await anyio.to_thread.run_sync(crashrun.run_host, state, root, kill_after)
            left_total += len(await leftovers(set(), family, family))
            fires_per_run.append(fires)
            how = f"killed -9 after {kill_after:.1f} s" if kill_after is not None else "ran to the end"
            say(f"catalog run {k + 1}: {how}, {fires} fires")
        FIGURES["catalog"] = {
            "photos": photos,
            "kills": kills,
            "seconds": round(time.monotonic() - t0, 1),
            **crashrun.tally(root, stems),
            "fires": sum(fires_per_run),
            "refired_after_kills": sum(fires_per_run) - photos,
            "processes_left": left_total,
        }
    say(f"catalog: {FIGURES['catalog']}")


# -- attacks --------------------------------------------------------------------------------------------------
ATTACKS: dict[str, tuple[str, dict[str, Any]]] = {
    "infinite loop": ("def main(args):\n    while True:\n        pass\n", {"timeout_s": 2}),
    "fork bomb": (
        "import os, time\ndef main(args):\n    while True:\n        try:\n            os.fork()\n"
        "        except OSError:\n            time.sleep(0.01)\n",
        {"timeout_s": 3},
    ),
    "10 GB allocation": ("def main(args):\n    return {'n': len(bytearray(10 << 30))}\n", {"memory_mb": 256}),
    "100 MB of prints": (
        "def main(args):\n    line = 'x' * 999\n    for _ in range(100_000):\n        print(line)\n    return {}\n",
        {},
    ),
    "100 MB straight to fd 1": (
        "import os\ndef main(args):\n    chunk = b'x' * (1 << 20)\n    for _ in range(100):\n"
        "        os.write(1, chunk)\n    return {}\n",
        {},
    ),
    "50 MB result": ("def main(args):\n    return {'x': 'y' * (50 << 20)}\n", {}),
    "deep recursion": ("def f(n):\n    return f(n + 1)\ndef main(args):\n    return {'x': f(0)}\n", {}),
    "C-stack overflow": (
        "import sys\nsys.setrecursionlimit(10**8)\ndef main(args):\n    x = []\n    for _ in range(300_000):\n"
        "        x = [x]\n    return {'n': len(repr(x))}\n",
        {},
    ),
    "recursion to the memory limit": (
        "import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1)\ndef main(args):\n    f(0)\n",
        {"memory_mb": 128},
    ),
}


async def healthy_loop(engine: minifaas.Engine, latencies: list[float], failures: list[minifaas.Activation]) -> None:
    while True:
        t = time.perf_counter()
        act = await engine.call("healthy")
        latencies.append(time.perf_counter() - t)
        if act.status != "success":
            failures.append(act)
        await anyio.sleep(HEALTHY_PERIOD_S)


async def watch_pids(engine: minifaas.Engine, fn: str, seen: set[int]) -> None:
    while True:
        seen.update(engine.stats()["functions"].get(f"guest/{fn}@1", {}).get("pids", []))
        await anyio.sleep(0.05)


async def bench_attacks() -> None:
    rows = []
    async with minifaas.Engine() as engine:
        await engine.deploy("healthy", code="def main(args):\n    return {'ok': True}\n")
        await engine.invoke("healthy")
        for name, (code, options) in ATTACKS.items():
            if name == "fork bomb" and PIDS.parent is None:
                say(f"attack {name}: skipped ({PIDS.error})")
                continue
            fn = "attack-" + name.replace(" ", "-")
            await engine.deploy(fn, code=code, **options)
            latencies: list[float] = []
            failures: list[minifaas.Activation] = []
            seen: set[int] = set()
            rss0 = rss_kb()
            async with anyio.create_task_group() as tg:
                tg.start_soon(healthy_loop, engine, latencies, failures)
                tg.start_soon(watch_pids, engine, fn, seen)
                t0 = time.perf_counter()
                act = await engine.call(fn)
                elapsed = time.perf_counter() - t0
                tg.cancel_scope.cancel()
            # what a dead sandbox started must be gone too (the fork bomb's 255 children)
            dead = seen - set(engine.stats()["functions"].get(f"guest/{fn}@1", {}).get("pids", []))
            left = await leftovers(descendants(os.getpid(), proc_table()), set(), dead)
            row = {
                "attack": name,
                "status": act.status,
                "error": str(act.result.get("error", ""))[:90],
                "seconds": round(elapsed, 2),
                "log_lines": len(act.logs),
                "healthy_calls": len(latencies),
                "healthy_failures": len(failures),
                "healthy_p99_ms": round(pct(latencies, 0.99) * 1000, 1),
                "host_rss_growth_mb": round((rss_kb() - rss0) / 1024, 1),
                "logs_truncated": any("truncated" in line for line in act.logs[-1:]),
                "processes_left": len(left),
            }
            rows.append(row)
            say(f"attack {name}: {row}")
            await engine.delete(fn)
    FIGURES["attacks"] = rows


# -- backpressure ---------------------------------------------------------------------------------------------
async def bench_backpressure(submits: int) -> None:
    async with minifaas.Engine(close_timeout_s=1) as engine:
        code = "import time\ndef main(args):\n    time.sleep(0.001)\n    return {}\n"
        await engine.deploy("slow", code=code, max_sandboxes=1, max_queue=1000)
        await engine.invoke("slow")
        rss0 = rss_kb()
        accepted: list[str] = []
        rejected: list[float] = []
        t0 = time.perf_counter()
        for i in range(submits):
            t = time.perf_counter()
            try:
                accepted.append(await engine.submit("slow", {"i": i}))
            except minifaas.Overloaded:
                rejected.append(time.perf_counter() - t)
        elapsed = time.perf_counter() - t0
        rss1 = rss_kb()
        done = [await engine.activations.wait(aid, timeout_s=120) for aid in accepted]
        FIGURES["backpressure"] = {
            "submits": submits,
            "accepted": len(accepted),
            "rejected": len(rejected),
            "reject_p50_us": round(pct(rejected, 0.5) * 1e6, 1),
            "reject_p99_us": round(pct(rejected, 0.99) * 1e6, 1),
            "reject_max_us": round(max(rejected, default=0) * 1e6, 1),
            "submit_loop_s": round(elapsed, 2),
            "rss_before_mb": round(rss0 / 1024, 1),
            "rss_after_mb": round(rss1 / 1024, 1),
            "accepted_succeeded": sum(1 for a in done if a.status == "success"),
        }
    say(f"backpressure: {FIGURES['backpressure']}")


# -- fuzz -----------------------------------------------------------------------------------------------------
def bench_fuzz() -> None:
    with tempfile.NamedTemporaryFile(suffix=".json") as report:
        env = dict(os.environ, HYPOTHESIS_PROFILE="long", MINIFAAS_FUZZ_REPORT=report.name)
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "test_fuzz.py")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        counts = json.loads(Path(report.name).read_text() or "{}")
    tried = sum(v for k, v in counts.items() if k.endswith("tried"))
    FIGURES["fuzz"] = {
        "inputs_tried": tried,
        "passed": proc.returncode == 0,
        "seconds": round(time.perf_counter() - t0, 1),
        **counts,
    }
    say(f"fuzz: {FIGURES['fuzz']}")
    if proc.returncode != 0:
        say(proc.stdout[-4000:])


# -- runtime: threaded logging, failing __str__, slow downloads ------------------------------------------------
LOG_THREADS = 8
LOG_LINES_PER_THREAD = 12_500
THREADED_PRINTS = (
    "import threading\n"
    "def spam(t):\n"
    f"    for i in range({LOG_LINES_PER_THREAD}):\n"
    "        print(f'{t}-', end='')\n"
    "        print(f'{i}')\n"
    "def main(args):\n"
    f"    ts = [threading.Thread(target=spam, args=(t,)) for t in range({LOG_THREADS})]\n"
    "    [t.start() for t in ts]\n"
    "    [t.join() for t in ts]\n"
    "    return {}\n"
)
BAD_STR = (
    "class E(Exception):\n    def __str__(self):\n        raise RuntimeError('no str')\n"
    "def main(args):\n    if args.get('fail'):\n        raise E()\n    return {'pid': __import__('os').getpid()}\n"
)
DRIP_DEADLINE_S = 2.0
DRIP_CANCEL_S = 0.5


def _drip_server() -> tuple[str, Any]:
    """A loopback HTTP server: /drip sends one byte every 0.2 s of a declared 1,000; /short 500 of 1,000."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            with contextlib.suppress(OSError):
                if self.path == "/short":
                    self.wfile.write(b"A" * 500)
                    return
                for _ in range(1000):
                    self.wfile.write(b"B")
                    self.wfile.flush()
                    time.sleep(0.2)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


async def bench_runtime(calls: int = 5) -> None:
    import dataclasses

    rows: dict[str, Any] = {}
    async with minifaas.Engine() as engine:
        await engine.deploy("threaded-prints", code=THREADED_PRINTS, timeout_s=120)
        arrived = merged = failed = 0
        t0 = time.perf_counter()
        for _ in range(calls):
            act = await engine.call("threaded-prints")
            failed += act.status != "success"
            payload = [line.split(" stdout: ", 1)[1] for line in act.logs if " stdout: " in line]
            arrived += len(payload)
            merged += sum(1 for p in payload if p.count("-") != 1)
        rows["threaded_logging"] = {
            "calls": calls,
            "expected_lines": calls * LOG_THREADS * LOG_LINES_PER_THREAD,
            "arrived_lines": arrived,
            "merged_lines": merged,
            "failed_calls": failed,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        say(f"runtime threaded logging: {rows['threaded_logging']}")

        for concurrency in (1, 4):
            fn = f"bad-str-{concurrency}"
            await engine.deploy(fn, code=BAD_STR, concurrency=concurrency, timeout_s=30)
            pids = {(await engine.invoke(fn))["pid"]}
            t0 = time.perf_counter()
            acts: list[minifaas.Activation] = []

            async def one(i: int, fn: str, acts: list[minifaas.Activation]) -> None:
                acts.append(await engine.call(fn, {"fail": i % 2 == 0}))

            async with anyio.create_task_group() as tg:
                for i in range(200):
                    tg.start_soon(one, i, fn, acts)
            elapsed = time.perf_counter() - t0
            pids |= {a.result["pid"] for a in acts if a.status == "success"}
            rows[f"failing_str_c{concurrency}"] = {
                "calls": len(acts),
                "application_error": sum(1 for a in acts if a.status == "application_error"),
                "success": sum(1 for a in acts if a.status == "success"),
                "other": sum(1 for a in acts if a.status not in ("success", "application_error")),
                "slowest_s": round(max((a.duration or 0) for a in acts) / 1000, 3),
                "seconds": round(elapsed, 2),
                "sandbox_pids": len(pids),
            }
            say(f"runtime failing __str__, concurrency {concurrency}: {rows[f'failing_str_c{concurrency}']}")

        base, server = _drip_server()
        try:
            store = engine.model_store
            store.limits = dataclasses.replace(store.limits, deadline_s=DRIP_DEADLINE_S, backoff_s=0.05)
            code = (
                "from minifaas_sandbox import models\n"
                "def main(args):\n    return {'n': len(models.load(args['url'], loader='bytes'))}\n"
            )
            await engine.deploy("loader", code=code, timeout_s=30)
            t0 = time.perf_counter()
            drip = await engine.call("loader", {"url": f"{base}/drip"})
            drip_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            with anyio.move_on_after(DRIP_CANCEL_S):
                await store.fetch(f"{base}/drip?cancel")
            cancel_s = time.perf_counter() - t0
            short = await engine.call("loader", {"url": f"{base}/short"})
        finally:
            server.shutdown()
            server.server_close()
        rows["slow_downloads"] = {
            "deadline_s": DRIP_DEADLINE_S,
            "drip_status": drip.status,
            "drip_error": str(drip.result.get("error", ""))[-60:],
            "drip_seconds": round(drip_s, 2),
            "cancel_after_s": DRIP_CANCEL_S,
            "cancel_returned_s": round(cancel_s, 2),
            "short_status": short.status,
            "short_error": str(short.result.get("error", ""))[-60:],
        }
        say(f"runtime slow downloads: {rows['slow_downloads']}")
    FIGURES["runtime"] = rows


# -- summary --------------------------------------------------------------------------------------------------
def summary() -> str:
    out = ["| what | load | faults / bad inputs | outcome |", "|---|---|---|---|"]
    if "chaos" in FIGURES:
        c = FIGURES["chaos"]
        out.append(
            f"| chaos | {c['invocations']} invocations, 4 functions, {c['seconds']} s | {c['kills']} SIGKILLs "
            f"(one per 100 ms) | {c['success']} success + {c['developer_error_naming_signal']} developer_error "
            f"naming the signal; {c['other_outcomes']} other, {c['not_ended_exactly_once']} not ended exactly "
            f"once, {c['hung']} hung, {c['records_lost']} records lost, {c['processes_left']} processes left |"
        )
    if "crash" in FIGURES:
        c = FIGURES["crash"]
        out.append(
            f"| host kill -9 | {c.get('accepted', 0)} accepted over {c['rounds']} runs | {c['rounds']} kills at "
            f"random times | {c.get('completed_readable', 0)} completed read back, "
            f"{c.get('in_flight_marked_failed', 0)} in flight marked failed, {c.get('missing', 0)} missing, "
            f"{c.get('processes_left', 0)} processes left |"
        )
    for row in FIGURES.get("attacks", []):
        what = row["error"] or ("logs truncated" if row["logs_truncated"] else f"{row['log_lines']} log lines")
        out.append(
            f"| attack: {row['attack']} | healthy function every 20 ms ({row['healthy_calls']} calls) | 1 | "
            f"{row['status']}: {what}; healthy failures {row['healthy_failures']}, p99 {row['healthy_p99_ms']} ms; "
            f"host RSS +{row['host_rss_growth_mb']} MB; {row['processes_left']} processes left |"
        )
    if "backpressure" in FIGURES:
        b = FIGURES["backpressure"]
        out.append(
            f"| backpressure | {b['submits']} submits, queue bound 1000 | {b['rejected']} rejected | Overloaded "
            f"p50 {b['reject_p50_us']} us, p99 {b['reject_p99_us']} us; RSS {b['rss_before_mb']} -> "
            f"{b['rss_after_mb']} MB; {b['accepted_succeeded']}/{b['accepted']} accepted succeeded |"
        )
    if "runtime" in FIGURES:
        r = FIGURES["runtime"]
        t = r["threaded_logging"]
        out.append(
            f"| threaded logging | {t['calls']} calls, {LOG_THREADS} threads printing pieces of lines | "
            f"{t['expected_lines']} lines | {t['arrived_lines']} arrived, {t['merged_lines']} merged, "
            f"{t['failed_calls']} calls failed ({t['seconds']} s) |"
        )
        for c in (1, 4):
            b = r[f"failing_str_c{c}"]
            out.append(
                f"| failing `__str__`, concurrency {c} | {b['calls']} calls, half raising | {b['calls'] // 2} "
                f"exceptions whose `__str__` raises | {b['application_error']} application_error + {b['success']} "
                f"success, {b['other']} other; slowest {b['slowest_s']} s; {b['sandbox_pids']} sandbox pids |"
            )
        s = r["slow_downloads"]
        out.append(
            f"| slow downloads | a model server dripping 5 bytes/s; one cutting the body at 500 of 1,000 bytes | "
            f"deadline {s['deadline_s']} s, cancel at {s['cancel_after_s']} s | drip: {s['drip_status']} after "
            f"{s['drip_seconds']} s (...{s['drip_error']}); cancel returned after {s['cancel_returned_s']} s; "
            f"short body: {s['short_status']} (...{s['short_error']}) |"
        )
    if "catalog" in FIGURES:
        c = FIGURES["catalog"]
        out.append(
            f"| catalog under crashes | {c['photos']} photos through the catalog workflow ({c['seconds']} s) | "
            f"host killed -9 {c['kills']} times at random points | {c['exactly_once']} exactly once in catalog/ or "
            f"rejected/, {c['in_both']} in both, {c['missing']} missing; {c['refired_after_kills']} fired again "
            f"after a kill; {c['processes_left']} processes left |"
        )
    out += reliability_faults.table_rows(FIGURES.get("faults", []))
    if "fuzz" in FIGURES:
        f = FIGURES["fuzz"]
        out.append(
            f"| fuzz (hypothesis, long) | payloads, code, zips, protocol bytes | {f['inputs_tried']} bad inputs | "
            f"{'all' if f['passed'] else 'NOT all'} ended as a MinifaasError or a clean record; engine still serving |"
        )
    return "\n".join(out)


async def main_async(args: argparse.Namespace) -> None:
    only = (
        set(args.only.split(","))
        if args.only
        else {"chaos", "crash", "attacks", "backpressure", "fuzz", "runtime", "catalog", "faults"}
    )
    say(f"minifaas reliability bench on {os.cpu_count()} cores; pids cgroup: {PIDS.parent or PIDS.error}")
    say(f"process cap per sandbox: {MAX_PIDS_PER_SANDBOX if PIDS.parent else 'none'}")
    if "chaos" in only:
        await bench_chaos(args.invocations)
    if "crash" in only:
        await bench_crash(args.crashes)
    if "attacks" in only:
        await bench_attacks()
    if "backpressure" in only:
        await bench_backpressure(args.submits)
    if "runtime" in only:
        await bench_runtime()
    if "fuzz" in only:
        await anyio.to_thread.run_sync(bench_fuzz)
    if "catalog" in only:
        await bench_catalog_crashes(args.photos, args.catalog_kills)
    if "faults" in only:
        FIGURES["faults"] = await reliability_faults.run_all(say)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--only", default="", help="comma-separated: chaos,crash,attacks,backpressure,fuzz,runtime,catalog,faults"
    )
    parser.add_argument("--photos", type=int, default=1000)
    parser.add_argument("--catalog-kills", type=int, default=5)
    parser.add_argument("--invocations", type=int, default=5000)
    parser.add_argument("--crashes", type=int, default=3)
    parser.add_argument("--submits", type=int, default=100_000)
    parser.add_argument("--json", default="", help="write the raw figures to this file")
    args = parser.parse_args()
    anyio.run(main_async, args)
    say("\n" + summary())
    if args.json:
        Path(args.json).write_text(json.dumps(FIGURES, indent=1))
    failed = (
        FIGURES.get("chaos", {}).get("records_lost")
        or FIGURES.get("chaos", {}).get("not_ended_exactly_once")
        or FIGURES.get("chaos", {}).get("hung")
        or FIGURES.get("crash", {}).get("missing")
        or FIGURES.get("catalog", {}).get("missing")
        or FIGURES.get("catalog", {}).get("in_both")
        or (FIGURES.get("fuzz") and not FIGURES["fuzz"]["passed"])
        or _runtime_failed(FIGURES.get("runtime"))
        or any(row["lost"] or row["hung"] for row in FIGURES.get("faults", []))
    )
    if failed:
        say("FAILED: see above")
        sys.exit(1)


def _runtime_failed(r: dict[str, Any] | None) -> bool:
    if not r:
        return False
    t = r["threaded_logging"]
    bad_str = any(r[f"failing_str_c{c}"]["other"] for c in (1, 4))
    return t["arrived_lines"] != t["expected_lines"] or t["merged_lines"] > 0 or bad_str


if __name__ == "__main__":
    main()
