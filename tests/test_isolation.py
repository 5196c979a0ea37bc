"""Hostile functions against ``isolation="sandbox"``: each escape attempt is a deployed function that reports whether
it got through. Under ``isolation="process"`` the same function gets through (so the test proves the boundary, not a
typo in the attempt); under ``"sandbox"`` it is denied, a healthy sandboxed neighbour keeps answering, and the host's
canaries are untouched.

Real sandboxes forked from the zygote, real namespaces, a real seccomp filter; the engine runs as root on these
machines (the attempts that need root to succeed under "process" say so).
"""

from __future__ import annotations

import glob
import http.server
import importlib.util
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import minifaas_sandbox
import numpy as np
import pytest

import minifaas
from minifaas._core.launch import PIDS
from minifaas.testing import assert_success
from tests.helpers.subproc import reap

HEALTHY = "def main(args):\n    return {'i': args['i']}\n"
VICTIM = textwrap.dedent(
    """
    import os
    def main(args):
        with open('/tmp/victim-secret-' + args['tag'], 'w') as f:
            f.write('victim secret')
        return {'pid': os.getpid()}
    """
)
#: the memory limit of the /tmp-filling attempt; its private /tmp is this big
FILL_MEMORY_MB = 32

#: each attempt: ``attempt(args) -> bool`` (True: it got through), run by WRAPPER; ctypes' libc is ``libc``
ATTEMPTS: dict[str, str] = {
    "read-etc-shadow": "return len(open('/etc/shadow').read()) > 0",
    "list-root-home": "return bool(set(os.listdir('/root')) - set(args['root_allowed']))",
    "read-state-sqlite": "return open(args['state_db'], 'rb').read(16).startswith(b'SQLite format')",
    "read-other-function-code": "return 'victim secret' in open(args['other_main']).read()",
    "read-other-function-tmp": "return open('/tmp/victim-secret-' + args['tag']).read() == 'victim secret'",
    "write-under-usr": (
        "p = '/usr/local/minifaas-escape-' + args['tag']\nopen(p, 'w').write('x')\nos.unlink(p)\nreturn True"
    ),
    "write-state-dir": (
        "p = os.path.join(args['state_dir'], 'escape-' + args['tag'])\n"
        "open(p, 'w').write('x')\nos.unlink(p)\nreturn True"
    ),
    "write-other-function-folder": (
        "p = os.path.join(args['other_dir'], 'escape-' + args['tag'])\n"
        "open(p, 'w').write('x')\nos.unlink(p)\nreturn True"
    ),
    "write-model-store": (
        "p = os.path.join(args['model_root'], 'escape-' + args['tag'])\n"
        "open(p, 'w').write('x')\nos.unlink(p)\nreturn True"
    ),
    "signal-host": "os.kill(args['host_pid'], 0)\nreturn True",
    "signal-sibling": "os.kill(args['sibling_pid'], 0)\nreturn True",
    "read-host-environ": "return len(open(f\"/proc/{args['host_pid']}/environ\", 'rb').read()) > 0",
    "read-sibling-environ": "return len(open(f\"/proc/{args['sibling_pid']}/environ\", 'rb').read()) > 0",
    "see-host-process": "return str(args['host_pid']) in os.listdir('/proc')",
    "open-host-fd": (
        "fds = os.listdir(f\"/proc/{args['host_pid']}/fd\")\n"
        "return any(os.path.exists(f\"/proc/{args['host_pid']}/fd/{n}\") for n in fds)"
    ),
    "setuid-0": "return in_child(lambda: os.setuid(0) or os.geteuid() == 0)",
    # pid 1 of its namespace dies with the host only through this handler (minifaas_sandbox.lifeline.INIT_SIG)
    "outlive-the-host": "import signal\nsignal.signal(signal.SIGRTMAX - 1, signal.SIG_IGN)\nreturn True",
    "mount-tmpfs": (
        "d = '/tmp/escape-mnt-' + args['tag']\n"
        "os.makedirs(d, exist_ok=True)\n"
        "def go():\n"
        "    if libc.mount(b'tmpfs', d.encode(), b'tmpfs', 0, None) != 0:\n"
        "        return False\n"
        "    libc.umount2(d.encode(), 2)\n"
        "    return True\n"
        "ok = in_child(go)\n"
        "os.rmdir(d)\n"
        "return ok"
    ),
    "unshare-user-namespace": "return in_child(lambda: libc.unshare(0x10000000) == 0)",
    "unshare-mount-namespace": "return in_child(lambda: libc.unshare(0x00020000) == 0)",
    "setns-host-mount-namespace": (
        "def go():\n"
        "    fd = os.open(f\"/proc/{args['host_pid']}/ns/mnt\", os.O_RDONLY)\n"
        "    return libc.setns(fd, 0) == 0\n"
        "return in_child(go)"
    ),
    "chroot": "return in_child(lambda: os.chroot('/tmp') is None)",
    "ptrace-sibling": (
        "PTRACE_ATTACH, PTRACE_DETACH, WALL = 16, 17, 0x40000000\n"
        "pid = args['sibling_pid']\n"
        "if libc.ptrace(PTRACE_ATTACH, pid, 0, 0) != 0:\n"
        "    return False\n"
        "# let it go again (a tracee left behind would stop for good at its next signal)\n"
        "os.waitpid(pid, WALL)\n"
        "libc.ptrace(PTRACE_DETACH, pid, 0, 0)\n"
        "return True"
    ),
    "raw-socket": "socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()\nreturn True",
    "packet-socket": "socket.socket(17, socket.SOCK_RAW, 0).close()\nreturn True",
    "create-device-node": (
        "p = '/tmp/escape-dev-' + args['tag']\n"
        "os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(1, 3))\n"
        "os.unlink(p)\n"
        "return True"
    ),
    "add-key": (
        "nr = 248  # add_key on x86_64\nrc = libc.syscall(nr, b'user', b'minifaas-escape', b'x', 1, -4)\nreturn rc >= 0"
    ),
    "fill-tmp-past-its-size": (
        f"n = {2 * FILL_MEMORY_MB} << 20\n"
        "p = '/tmp/escape-fill-' + args['tag']\n"
        "try:\n"
        "    with open(p, 'wb') as f:\n"
        "        for _ in range(n >> 20):\n"
        "            f.write(b'x' * (1 << 20))\n"
        "    return True\n"
        "finally:\n"
        "    os.unlink(p)"
    ),
    "symlink-in-tmp-to-host-file": (
        "p = '/tmp/escape-link-' + args['tag']\n"
        "os.symlink(args['state_db'], p)\n"
        "try:\n"
        "    return open(p, 'rb').read(16).startswith(b'SQLite format')\n"
        "finally:\n"
        "    os.unlink(p)"
    ),
    "write-proc-sys": (
        "p = '/proc/sys/kernel/hostname'\nname = open(p).read()\n"
        "with open(p, 'w') as f:\n    f.write(name)\nreturn True"
    ),
    "rewrite-own-bundle": "open(__file__, 'a').write('\\n# rewritten\\n')\nreturn True",
    "see-host-devices": "return bool(set(os.listdir('/dev')) - set(args['dev_allowed']))",
    "loopback-dev-server": (
        "s = socket.create_connection(('127.0.0.1', args['port']), timeout=2)\n"
        "s.sendall(b'ping')\n"
        "ok = s.recv(4) == b'pong'\n"
        "s.close()\n"
        "return ok"
    ),
}
#: deploy options of an attempt (both modes); "loopback-dev-server" runs with network=False in the sandbox only,
#: since network=False alone closes that door in both modes (the process run shows the server is reachable)
OPTIONS: dict[str, dict[str, Any]] = {
    "fill-tmp-past-its-size": {"memory_mb": FILL_MEMORY_MB},
}
SANDBOX_ONLY_OPTIONS: dict[str, dict[str, Any]] = {"loopback-dev-server": {"network": False}}
#: deployed from a folder (a staged bundle), not as code
FROM_FOLDER = {"rewrite-own-bundle"}
#: where an attempt could fail for another reason than the one it tests, what the sandbox must answer
SANDBOX_DENIAL: dict[str, str] = {
    "fill-tmp-past-its-size": "No space left on device",
    "symlink-in-tmp-to-host-file": "No such file or directory",
    "write-under-usr": "Read-only file system",
    "rewrite-own-bundle": "Permission denied",
    "read-etc-shadow": "Permission denied",
    "raw-socket": "Operation not permitted",
    "packet-socket": "Operation not permitted",
    "create-device-node": "Operation not permitted",
    "outlive-the-host": "Operation not permitted",
    "signal-host": "No such process",
    "signal-sibling": "No such process",
    "read-other-function-tmp": "No such file or directory",
    "read-state-sqlite": "No such file or directory",
}

WRAPPER = """
import ctypes, os, socket, stat, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def in_child(fn):
    # attempts that change the process (its uid, its namespaces) run in a child, so the sandbox stays as it was
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(0 if fn() else 1)
        except BaseException:
            os._exit(2)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0

def attempt(args):
{body}

def main(args):
    try:
        return {{'escaped': bool(attempt(args)), 'detail': ''}}
    except Exception as exc:
        return {{'escaped': False, 'detail': f'{{type(exc).__name__}}: {{exc}}'}}
"""


def _attempt_code(name: str) -> str:
    return WRAPPER.format(body=textwrap.indent(ATTEMPTS[name], "    "))


def _root_allowed() -> list[str]:
    """What a sandbox may see of /root: the folders of the interpreter it runs (pyenv keeps it there)."""
    out = set()
    for path in (sys.prefix, sys.base_prefix, *sys.path):
        if path.startswith("/root/"):
            out.add(path.split("/")[2])
    return sorted(out)


@pytest.fixture(scope="module")
def pong_server() -> Iterator[int]:
    """A loopback TCP server standing in for the dev server: answers b'pong'."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                if conn.recv(4) == b"ping":
                    conn.sendall(b"pong")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield srv.getsockname()[1]
    stop.set()
    t.join()
    srv.close()


@pytest.fixture(scope="module")
async def minifaas_engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[minifaas.Engine]:
    """One engine with a state dir (overrides the plugin's), the healthy neighbour sandboxed, and a victim in each
    mode deployed from a folder (so it has a bundle folder and a /tmp secret)."""
    state = tmp_path_factory.mktemp("state")
    src = tmp_path_factory.mktemp("victim")
    (src / "__main__.py").write_text(VICTIM + "# victim secret\n")
    async with minifaas.Engine(state_dir=state) as engine:
        await engine.deploy("healthy", code=HEALTHY, isolation="sandbox")
        assert_success(await engine.call("healthy", {"i": -1}))
        for mode in ("process", "sandbox"):
            await engine.deploy(f"victim-{mode}", path=src, isolation=mode)
        yield engine


def _args(engine: minifaas.Engine, mode: str, victim_pid: int, port: int) -> dict[str, Any]:
    assert engine.state_dir is not None
    spec = engine._route(f"victim-{mode}")[0]
    main_path = str(spec.bundle.source["path"])
    dbs = glob.glob(str(engine.state_dir / "*.sqlite3"))
    assert dbs, "the engine keeps its records in SQLite under its state dir"
    return {
        "host_pid": os.getpid(),
        "sibling_pid": victim_pid,
        "state_dir": str(engine.state_dir),
        "state_db": dbs[0],
        "other_main": main_path,
        "other_dir": os.path.dirname(main_path),
        "model_root": str(engine.model_store.root),
        "tag": f"{mode}-{os.getpid()}",
        "root_allowed": _root_allowed(),
        "dev_allowed": ["null", "zero", "random", "urandom", "shm", "fd", "stdin", "stdout", "stderr"],
        "port": port,
    }


def _canaries(engine: minifaas.Engine) -> dict[str, Any]:
    assert engine.state_dir is not None
    spec = engine._route("victim-sandbox")[0]
    folder = os.path.dirname(str(spec.bundle.source["path"]))
    return {
        "state": sorted(os.listdir(engine.state_dir)),
        "bundle": {n: Path(folder, n).read_bytes() for n in os.listdir(folder) if Path(folder, n).is_file()},
        "hostname": Path("/proc/sys/kernel/hostname").read_text(),
    }


@pytest.mark.parametrize("mode", ["process", "sandbox"])
@pytest.mark.parametrize("name", sorted(ATTEMPTS))
@pytest.mark.anyio
async def test_escape_attempt(
    minifaas_engine: minifaas.Engine, pong_server: int, name: str, mode: str, tmp_path: Path
) -> None:
    engine = minifaas_engine
    victim = await engine.call(f"victim-{mode}", {"tag": f"{mode}-{os.getpid()}"})
    assert_success(victim)
    # the victim's pid as the host sees it (a sandboxed one is pid 1 of its own PID namespace)
    (victim_pid,) = engine.stats()["functions"][f"guest/victim-{mode}@1"]["pids"]
    fn = f"{name}-{mode}"
    options = {**OPTIONS.get(name, {}), **(SANDBOX_ONLY_OPTIONS.get(name, {}) if mode == "sandbox" else {})}
    if name in FROM_FOLDER:
        (tmp_path / "__main__.py").write_text(_attempt_code(name))
        await engine.deploy(fn, path=tmp_path, isolation=mode, **options)
    else:
        await engine.deploy(fn, code=_attempt_code(name), isolation=mode, **options)
    before = _canaries(engine)
    try:
        act = await engine.call(fn, _args(engine, mode, victim_pid, pong_server))
    finally:
        # one sandbox per attempt would pass the engine's sandbox cap: the pool on main thrashes past it (seen at
        # 63 functions, process mode too), which is not what this module tests
        await engine.delete(fn)
    assert_success(act)
    if mode == "process":
        # the attempt is real: unconfined, it gets through
        assert act.result["escaped"] is True, act.result
    else:
        assert act.result["escaped"] is False, act.result
        assert SANDBOX_DENIAL.get(name, "") in act.result["detail"]
    assert_success(await engine.call("healthy", {"i": 1}))
    assert _canaries(engine) == before


@pytest.mark.anyio
async def test_no_fd_but_stdio_and_the_channel(minifaas_engine: minifaas.Engine) -> None:
    code = "import os\ndef main(args):\n    return {'fds': sorted(int(n) for n in os.listdir('/proc/self/fd'))}\n"
    await minifaas_engine.deploy("fds", code=code, isolation="sandbox")
    act = assert_success(await minifaas_engine.call("fds", {}))
    # 0-2, the channel, the host's lifeline (a pipe nobody writes: it dies with the host), and listdir's own fd
    assert len(act.result["fds"]) == 6, act.result
    assert act.result["fds"][:3] == [0, 1, 2]


@pytest.mark.anyio
async def test_sandboxed_function_sees_an_unprivileged_confined_process(minifaas_engine: minifaas.Engine) -> None:
    code = textwrap.dedent(
        """
        import os
        def main(args):
            status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)
            return {
                'euid': os.geteuid(),
                'cap_eff': status['CapEff'].strip(), 'cap_bnd': status['CapBnd'].strip(),
                'no_new_privs': status['NoNewPrivs'].strip(), 'seccomp': status['Seccomp'].strip(),
                'tmp': os.statvfs('/tmp').f_blocks * os.statvfs('/tmp').f_frsize,
                'root_writable': os.access('/', os.W_OK),
            }
        """
    )
    await minifaas_engine.deploy("whoami", code=code, isolation="sandbox", memory_mb=64)
    r = assert_success(await minifaas_engine.call("whoami", {})).result
    assert r["euid"] != 0
    assert r["cap_eff"] == r["cap_bnd"] == "0000000000000000"
    assert r["no_new_privs"] == "1"
    assert r["seccomp"] == "2"
    assert r["tmp"] == 64 << 20
    assert r["root_writable"] is False


@pytest.mark.anyio
async def test_grants_bind_host_folders(minifaas_engine: minifaas.Engine, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("granted")
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o777)  # the sandbox writes as an unprivileged uid of its own
    code = textwrap.dedent(
        """
        import os
        def main(args):
            text = open(os.path.join(args['in'], 'a.txt')).read()
            open(os.path.join(args['out'], 'b.txt'), 'w').write(text.upper())
            try:
                open(os.path.join(args['in'], 'c.txt'), 'w')
                ro = False
            except OSError:
                ro = True
            return {'text': text, 'read_only': ro}
        """
    )
    await minifaas_engine.deploy(
        "grants", code=code, isolation="sandbox", read_paths=[tmp_path / "in"], write_paths=[out]
    )
    r = assert_success(await minifaas_engine.call("grants", {"in": str(tmp_path / "in"), "out": str(out)}))
    assert r.result == {"text": "granted", "read_only": True}
    assert (out / "b.txt").read_text() == "GRANTED"


@pytest.mark.anyio
async def test_bad_isolation_and_grants_fail_the_deploy(minifaas_engine: minifaas.Engine, tmp_path: Path) -> None:
    with pytest.raises(minifaas.DeployError, match="invalid isolation 'container'"):
        await minifaas_engine.deploy("bad", code=HEALTHY, isolation="container")  # type: ignore[arg-type]
    with pytest.raises(minifaas.DeployError, match="does not exist"):
        await minifaas_engine.deploy("bad", code=HEALTHY, isolation="sandbox", read_paths=[tmp_path / "missing"])
    with pytest.raises(minifaas.DeployError, match="whole filesystem"):
        await minifaas_engine.deploy("bad", code=HEALTHY, isolation="sandbox", write_paths=["/"])


@pytest.mark.anyio
async def test_engine_default_isolation_applies(tmp_path: Path) -> None:
    code = "import os\ndef main(args):\n    return {'euid': os.geteuid()}\n"
    async with minifaas.Engine(isolation="sandbox") as engine:
        info = await engine.deploy("who", code=code)
        assert info["isolation"] == "sandbox"
        r = assert_success(await engine.call("who", {}))
        assert r.result["euid"] != 0
    with pytest.raises(ValueError, match="unknown isolation"):
        minifaas.Engine(isolation="vm")  # type: ignore[arg-type]


def _start_serve(state: Path, *extra: str) -> tuple[subprocess.Popen[str], list[str], str, tuple[str, str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "minifaas._cli.main", "serve", "--port", "0", "--state-dir", str(state), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("export "):
            break
    m = re.match(r"export MINIFAAS_APIHOST=(\S+) MINIFAAS_AUTH=(\S+)$", lines[-1].strip())
    assert m, "".join(lines)
    user, _, key = m.group(2).partition(":")
    return proc, lines, m.group(1), (user, key)


@pytest.mark.parametrize("unconfined", [False, True], ids=["default", "unconfined"])
def test_serve_sandboxes_code_from_http_unless_told_not_to(tmp_path: Path, unconfined: bool) -> None:
    proc, lines, url, auth = _start_serve(tmp_path, *(["--unconfined"] if unconfined else []))
    try:
        banner = "".join(lines)
        if unconfined:
            assert "isolation: UNCONFINED" in banner, banner
        else:
            assert "isolation: sandbox" in banner, banner
        code = "import os\ndef main(args):\n    return {'euid': os.geteuid()}\n"
        with httpx.Client(base_url=url, auth=auth, timeout=30) as http:
            put = http.put("/api/v1/namespaces/_/actions/who", json={"exec": {"kind": "python:3", "code": code}})
            assert put.status_code == 200, put.text
            got = http.post("/api/v1/namespaces/_/actions/who", params={"blocking": "true", "result": "true"})
            assert got.status_code == 200, got.text
        assert (got.json()["euid"] == 0) is unconfined  # the engine runs as root here
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        finally:
            reap(proc)


PIDNS = textwrap.dedent(
    """
    import os, subprocess, time
    def zombies():
        found = []
        for n in os.listdir('/proc'):
            try:
                stat = open(f'/proc/{n}/stat').read() if n.isdigit() else ''
            except OSError:
                stat = ''
            if stat and stat[stat.rindex(')') + 2] == 'Z':
                found.append(n)
        return found
    def main(args):
        if args.get('orphan'):
            # the shell ends before its background child: that child is reparented to the PID namespace's init
            subprocess.run(['sh', '-c', '(sleep 0.05; exit 3) &'], check=True)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not zombies():
                time.sleep(0.02)  # until it has exited (a loaded machine may take a while)
        if args.get('hang'):
            # a child in a session of its own (out of the sandbox's process group), then past the time limit
            subprocess.Popen(['sleep', args['hang']], start_new_session=True)
            time.sleep(60)
        states = {}
        for n in os.listdir('/proc'):
            try:
                stat = open(f'/proc/{n}/stat').read() if n.isdigit() else ''
            except OSError:
                stat = ''  # ended meanwhile
            if stat:
                states[n] = stat[stat.rindex(')') + 2]
        try:
            os.kill(args['host_pid'], 0)
            signalled = True
        except OSError:
            signalled = False
        return {'pid': os.getpid(), 'states': states, 'ns': os.readlink('/proc/self/ns/pid'), 'signalled': signalled}
    """
)


def _processes_running(argv: list[str]) -> list[int]:
    out = []
    for n in os.listdir("/proc"):
        if n.isdigit():
            try:
                if Path(f"/proc/{n}/cmdline").read_bytes().split(b"\0")[:-1] == [a.encode() for a in argv]:
                    out.append(int(n))
            except OSError:
                pass
    return out


@pytest.mark.parametrize("mode", ["process", "sandbox"])
@pytest.mark.anyio
async def test_a_sandbox_is_init_of_its_own_pid_namespace(minifaas_engine: minifaas.Engine, mode: str) -> None:
    """It sees itself and its children only, cannot name the host's processes, has the orphans its children leave
    reaped, and its whole namespace ends with it when the host kills it at its time limit."""
    engine = minifaas_engine
    name = f"pidns-{mode}"
    await engine.deploy(name, code=PIDNS, isolation=mode, timeout_s=1.5)  # type: ignore[arg-type]
    args: dict[str, Any] = {"host_pid": os.getpid()}
    try:
        first = assert_success(await engine.call(name, args)).result
        (host_pid,) = engine.stats()["functions"][f"guest/{name}@1"]["pids"]
        if PIDS.parent is not None:
            # its pids cgroup is named by the pid the host knows, and holds it
            assert str(host_pid) in (PIDS.parent / f"sb-{host_pid}" / "cgroup.procs").read_text().split()
        assert assert_success(await engine.call(name, {**args, "orphan": True})).result["states"].get("1") != "Z"
        after = assert_success(await engine.call(name, args)).result
        hang = f"{987 + (mode == 'sandbox')}.{os.getpid()}"
        timed_out = await engine.call(name, {**args, "hang": hang})
        assert timed_out.status == "developer_error", timed_out.result
        deadline = time.monotonic() + 10
        while _processes_running(["sleep", hang]) and time.monotonic() < deadline:
            await anyio.sleep(0.05)
        left = _processes_running(["sleep", hang])
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        again = assert_success(await engine.call(name, args)).result
    finally:
        await engine.delete(name)
    host_ns = os.readlink("/proc/self/ns/pid")
    if mode == "process":
        # the same function, unconfined: the host's namespace, every process, the host signalled
        assert first["ns"] == host_ns and first["pid"] != 1 and first["signalled"] is True
        assert len(first["states"]) > 3
        return
    for r in (first, after, again):
        assert r["pid"] == 1 and r["ns"] != host_ns and r["signalled"] is False, r
        # itself only: no zombie left by the orphan (pid 1 reaped it after that activation)
        assert r["states"] == {"1": "R"}, r
    assert left == [], "the sandbox's children end with it"
    assert again["ns"] != first["ns"], "a new sandbox after the kill, in a namespace of its own"


@pytest.mark.anyio
async def test_orphans_are_reaped_with_concurrent_activations(minifaas_engine: minifaas.Engine) -> None:
    """With concurrency > 1 the last activation to end reaps what the function's children left."""
    engine = minifaas_engine
    await engine.deploy("pidns-concurrent", code=PIDNS, isolation="sandbox", concurrency=2)
    args: dict[str, Any] = {"host_pid": os.getpid()}
    try:
        orphaned = assert_success(await engine.call("pidns-concurrent", {**args, "orphan": True})).result
        assert orphaned["pid"] == 1 and "Z" in orphaned["states"].values(), orphaned  # the orphan, not yet reaped
        after = assert_success(await engine.call("pidns-concurrent", args)).result
    finally:
        await engine.delete("pidns-concurrent")
    assert list(after["states"]) == ["1"], after  # pid 1 alone (its main thread's state varies: a pool runs this)


ROOT_VIEW = textwrap.dedent(
    """
    import ctypes, os
    def main(args):
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.umount2(b'/.host', 2)
        granted = sorted(os.listdir(args['granted'])) if args.get('granted') else None
        try:
            host = os.listdir('/.host')
        except OSError as exc:
            host = type(exc).__name__
        return {'pid': os.getpid(), 'host': host, 'umount': rc, 'errno': ctypes.get_errno(),
                'granted': granted}
    """
)


@pytest.mark.anyio
async def test_a_sandboxed_cold_start_takes_a_spare_prepared_for_it(minifaas_engine: minifaas.Engine) -> None:
    """The zygote keeps a spare of the kind asked for lately: a sandboxed one is pid 1 of its own PID namespace with
    the shared part of its root built; the host's old root lies under an empty cover nothing can lift."""
    engine = minifaas_engine
    await engine.deploy("root-view-1", code=ROOT_VIEW, isolation="sandbox")
    assert_success(await engine.call("root-view-1", {}))  # asks for that kind (a process spare may serve it)
    await engine.deploy("root-view-2", code=ROOT_VIEW, isolation="sandbox")
    deadline = time.monotonic() + 10
    act = None
    while time.monotonic() < deadline:
        await anyio.sleep(0.3)
        act = assert_success(await engine.call("root-view-2", {}))
        if act.annotations.get("cold") and act.annotations.get("spare"):
            break
        await engine.deploy("root-view-2", code=ROOT_VIEW + "\n", isolation="sandbox")  # a new version: cold again
    assert act is not None and act.annotations.get("spare") is True, act.annotations
    assert act.result["pid"] == 1 and act.result["host"] in ([], "PermissionError"), act.result
    assert act.result["umount"] == -1 and act.result["errno"] == 1, act.result  # EPERM
    for name in ("root-view-1", "root-view-2"):
        await engine.delete(name)


@pytest.mark.anyio
async def test_a_grant_under_the_spares_staging_folder(minifaas_engine: minifaas.Engine) -> None:
    """A spare builds its root over /mnt (its own mount namespace): a grant under /mnt still shows the host's."""
    folder = Path(f"/mnt/minifaas-grant-{os.getpid()}")
    folder.mkdir()
    try:
        (folder / "a.txt").write_text("granted")
        await minifaas_engine.deploy("mnt-grant", code=ROOT_VIEW, isolation="sandbox", read_paths=[folder])
        for _ in range(2):  # the first may not come from a sandboxed spare; the second does (a new sandbox each)
            act = assert_success(await minifaas_engine.call("mnt-grant", {"granted": str(folder)}))
            assert act.result["granted"] == ["a.txt"], act.result
            await minifaas_engine.deploy("mnt-grant", code=ROOT_VIEW + "\n", isolation="sandbox", read_paths=[folder])
            await anyio.sleep(0.3)
        await minifaas_engine.delete("mnt-grant")
    finally:
        import shutil

        shutil.rmtree(folder)


HIJACK = textwrap.dedent(
    """
    def main(args):
        if args.get('hijack'):
            with open(__file__, 'w') as f:
                f.write("def main(args):\\n    return {'hijacked': True}\\n")
        return {'hijacked': False}
    """
)


@pytest.mark.anyio
async def test_a_rewritten_bundle_is_not_reused(tmp_path: Path) -> None:
    """An unconfined function rewrites its staged code; another deployed from the same folder gets the original."""
    (tmp_path / "__main__.py").write_text(HIJACK)
    async with minifaas.Engine() as engine:
        await engine.deploy("a", path=tmp_path, isolation="process")
        assert (await engine.invoke("a", {"hijack": True})) == {"hijacked": False}
        await engine.deploy("b", path=tmp_path, isolation="process")
        assert (await engine.invoke("b", {})) == {"hijacked": False}


@pytest.mark.anyio
async def test_a_bundle_rewritten_after_deploy_never_starts_again(tmp_path: Path) -> None:
    """Deployed from the same folder, a and b share one staged bundle: when a rewrites it, b's next cold start
    refuses it (and a redeploy stages the original afresh), instead of running the hijacker's code."""
    (tmp_path / "__main__.py").write_text(HIJACK)
    async with minifaas.Engine() as engine:
        await engine.deploy("a", path=tmp_path, isolation="process")
        await engine.deploy("b", path=tmp_path, isolation="process")
        assert (await engine.invoke("a", {"hijack": True})) == {"hijacked": False}
        refused = await engine.call("b", {})
        assert refused.status == "developer_error", refused.result
        assert "changed since it was deployed" in refused.result["error"], refused.result
        await engine.deploy("b", path=tmp_path, isolation="process")
        assert (await engine.invoke("b", {})) == {"hijacked": False}


SCRATCH = textwrap.dedent(
    """
    import os, time
    LABELS = open('labels.txt').read()
    def main(args):
        time.sleep(0.5)  # the other call starts a sandbox of its own meanwhile
        open('written.txt', 'w').write(args['tag'])
        return {'cwd': os.getcwd(), 'labels': LABELS, 'listing': sorted(os.listdir('.'))}
    """
)


@pytest.mark.parametrize("mode", ["process", "sandbox"])
@pytest.mark.anyio
async def test_each_sandbox_works_in_a_scratch_dir_of_its_own(tmp_path: Path, mode: str) -> None:
    """Its bundle's files are there by their relative names, what it writes stays its own (not in the shared
    staged bundle), and the host removes the dir when the sandbox ends."""
    (tmp_path / "__main__.py").write_text(SCRATCH)
    (tmp_path / "labels.txt").write_text("cat dog")
    async with minifaas.Engine() as engine:
        info = await engine.deploy("s", path=tmp_path, isolation=mode, max_sandboxes=2)  # type: ignore[arg-type]
        spec = engine._route("s")[0]
        assert spec.bundle.root is not None
        results: dict[str, dict[str, Any]] = {}

        async def one(tag: str) -> None:
            results[tag] = await engine.invoke("s", {"tag": tag})

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "one")
            tg.start_soon(one, "two")
        first, second = results["one"], results["two"]
        assert first["labels"] == second["labels"] == "cat dog"
        assert first["cwd"] != second["cwd"], (first, second)  # two sandboxes, two dirs
        assert "written.txt" in first["listing"] and "labels.txt" in first["listing"]
        assert not (spec.bundle.root / "written.txt").exists()
        assert info["isolation"] == mode
        await engine.delete("s")
        if mode == "process":
            deadline = time.monotonic() + 10
            while (os.path.exists(first["cwd"]) or os.path.exists(second["cwd"])) and time.monotonic() < deadline:
                await anyio.sleep(0.05)
            assert not os.path.exists(first["cwd"]) and not os.path.exists(second["cwd"])


FETCH = textwrap.dedent(
    """
    from minifaas_sandbox import host_call
    def main(args):
        try:
            return {'path': host_call('model.fetch', {'url': args['url'], 'sha256': None})}
        except RuntimeError as exc:
            return {'refused': str(exc)}
    """
)


@pytest.fixture(scope="module")
def model_server() -> Iterator[str]:
    """A loopback HTTP server standing in for a "metadata" service: serves a few bytes at any path."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"secret metadata"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    t.join()
    srv.server_close()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("mode", "network", "target", "refusal"),
    [
        ("process", True, "http", None),
        ("process", False, "http", "network=False"),
        ("sandbox", True, "http", "loopback"),
        ("sandbox", False, "http", "network=False"),
        ("process", True, "file", None),
        ("sandbox", True, "file", "outside this function's bundle"),
    ],
    ids=[
        "process-net-loopback",
        "process-nonet",
        "sandbox-net-loopback",
        "sandbox-nonet",
        "process-file",
        "sandbox-file",
    ],
)
async def test_host_fetch_is_no_way_around_the_sandbox(
    minifaas_engine: minifaas.Engine, model_server: str, mode: str, network: bool, target: str, refusal: str | None
) -> None:
    """models.load(url) asks the host's store: the host fetches for a function only what that function could reach."""
    url = f"{model_server}/latest/meta-data" if target == "http" else "file:///etc/passwd"
    name = f"fetch-{mode}-{network}-{target}"
    await minifaas_engine.deploy(name, code=FETCH, isolation=mode, network=network)  # type: ignore[arg-type]
    try:
        result = assert_success(await minifaas_engine.call(name, {"url": url})).result
    finally:
        await minifaas_engine.delete(name)
    if refusal is None:
        assert "path" in result, result
    else:
        assert refusal in result.get("refused", ""), result


@pytest.mark.anyio
async def test_model_urls_only_from_the_allow_list(model_server: str) -> None:
    """An allow-list of origins (engine-wide, or per deploy): the host fetches model URLs from those only, for every
    function; an origin it names may be loopback, also for a sandbox; redirects are held to it as well."""
    port = urllib.parse.urlparse(model_server).port
    with pytest.raises(ValueError, match="scheme://host"):
        minifaas.Engine(model_url_allow=["127.0.0.1"])
    async with minifaas.Engine(model_url_allow=[model_server]) as engine:
        for mode in ("process", "sandbox"):
            name = f"allow-{mode}"
            info = await engine.deploy(name, code=FETCH, isolation=mode)  # type: ignore[arg-type]
            assert info["model_url_allow"] == [model_server]
            allowed = assert_success(await engine.call(name, {"url": f"{model_server}/m.bin"})).result
            assert Path(allowed["path"]).read_bytes() == b"secret metadata", allowed
            for url in (f"http://localhost:{port}/m.bin", "https://example.com/m.bin", "ftp://example.com/m"):
                refused = assert_success(await engine.call(name, {"url": url})).result
                assert "not in the model URL allow-list" in refused.get("refused", ""), (url, refused)
        # per deploy, replacing the engine's: an empty list allows no URL at all
        await engine.deploy("allow-none", code=FETCH, isolation="sandbox", model_url_allow=[])
        refused = assert_success(await engine.call("allow-none", {"url": f"{model_server}/m.bin"})).result
        assert "allow-list (empty)" in refused.get("refused", ""), refused
        with pytest.raises(minifaas.DeployError, match="model_url_allow entry"):
            await engine.deploy("allow-bad", code=FETCH, model_url_allow=["http://x/path"])


def test_serve_takes_a_model_url_allow_list(tmp_path: Path, model_server: str) -> None:
    """``minifaas serve --model-url-allow ORIGIN``: code deployed over HTTP gets model URLs fetched from there only."""
    port = urllib.parse.urlparse(model_server).port
    proc, _lines, url, auth = _start_serve(tmp_path, "--model-url-allow", model_server)
    try:
        with httpx.Client(base_url=url, auth=auth, timeout=30) as http:
            put = http.put("/api/v1/namespaces/_/actions/fetch", json={"exec": {"kind": "python:3", "code": FETCH}})
            assert put.status_code == 200, put.text
            got = {}
            for target in (f"{model_server}/m.bin", f"http://localhost:{port}/m.bin"):
                resp = http.post(
                    "/api/v1/namespaces/_/actions/fetch",
                    params={"blocking": "true", "result": "true"},
                    json={"url": target},
                )
                assert resp.status_code == 200, resp.text
                got[target] = resp.json()
        assert "path" in got[f"{model_server}/m.bin"], got
        assert "not in the model URL allow-list" in got[f"http://localhost:{port}/m.bin"].get("refused", ""), got
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        finally:
            reap(proc)


@pytest.mark.anyio
async def test_manifest_model_params_are_final(minifaas_engine: minifaas.Engine, tmp_path: Path) -> None:
    """A caller cannot replace a manifest's model URL or its digest (the host would fetch whatever it names)."""
    (tmp_path / "m.bin").write_bytes(b"weights")
    bundle = tmp_path / "fn"
    bundle.mkdir()
    (bundle / "__main__.py").write_text("def main(args):\n    return {'url': args['weights_url']}\n")
    (bundle / "minifaas.json").write_text(
        json.dumps({"params": {"weights_sha256": "0" * 64, "k": 1}, "models": {"weights_url": "../m.bin"}})
    )
    await minifaas_engine.deploy("final", path=bundle, isolation="sandbox")
    own = assert_success(await minifaas_engine.call("final", {"k": 2})).result["url"]
    assert own == (tmp_path / "m.bin").resolve().as_uri()
    for key, value in (("weights_url", "http://169.254.169.254/latest"), ("weights_sha256", "1" * 64)):
        with pytest.raises(minifaas.InvalidPayload, match=f"parameter '{key}' of final is fixed by its manifest"):
            await minifaas_engine.call("final", {key: value})
    # the same value is no replacement
    assert_success(await minifaas_engine.call("final", {"weights_url": own}))


@pytest.mark.anyio
async def test_spawned_sandboxes_are_confined_too() -> None:
    """The spawn launcher (a fresh interpreter per sandbox) runs the same set-up at INIT."""
    code = textwrap.dedent(
        """
        import os
        def main(args):
            return {'euid': os.geteuid(), 'root': sorted(os.listdir('/')), 'pid': os.getpid(),
                    'procs': sorted(n for n in os.listdir('/proc') if n.isdigit())}
        """
    )
    async with minifaas.Engine(launcher="spawn") as engine:
        await engine.deploy("who", code=code, isolation="sandbox")
        r = assert_success(await engine.call("who", {})).result
        r2 = assert_success(await engine.call("who", {})).result
    assert r["euid"] != 0
    assert "home" not in r["root"] and "tmp" in r["root"]
    # a PID namespace of its own, made at INIT (the process the host started waits outside it)
    assert r["pid"] == 1 and r["procs"] == ["1"] and r2 == r


def _png(width: int, height: int) -> bytes:
    """A valid PNG of one grey channel, all zero (compresses to almost nothing, whatever its size)."""
    raw = zlib.compress(b"".join(b"\x00" + bytes(width) for _ in range(height)), 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def image_input() -> Any:
    spec = importlib.util.spec_from_file_location(
        "image_input_under_test", Path(__file__).resolve().parents[1] / "functions" / "_lib" / "image_input.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("width", "height", "error"),
    [(1, 20000, "aspect ratio"), (20000, 1, "aspect ratio"), (8000, 6000, "pixel limit")],
    ids=["1x20000", "20000x1", "48MP"],
)
def test_image_size_is_capped_from_its_header(image_input: Any, width: int, height: int, error: str) -> None:
    data = _png(width, height)
    assert image_input.image_size(data) == (width, height)
    with pytest.raises(ValueError, match=error):
        image_input.read_image(data)


def test_image_headers_of_the_test_images_are_read(image_input: Any) -> None:
    import cv2

    for path in sorted((Path(__file__).resolve().parent / "data" / "images").glob("*")):
        if path.suffix.lower() not in (".jpg", ".jpeg", ".png", ".webp"):
            continue
        data = path.read_bytes()
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert image_input.image_size(data) == (decoded.shape[1], decoded.shape[0]), path.name
        assert image_input.read_image(data).shape == decoded.shape


UNPRIVILEGED_ENTER = textwrap.dedent(
    """
    import json, os
    from minifaas_sandbox import isolation
    isolation.enter({}, network=False, memory_mb=16)
    status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)
    print(json.dumps({'euid': os.geteuid(), 'root': sorted(os.listdir('/')), 'cap': status['CapEff'].strip(),
                      'seccomp': status['Seccomp'].strip(), 'tmp_writable': os.access('/tmp', os.W_OK),
                      'pid': os.getpid(), 'procs': sorted(n for n in os.listdir('/proc') if n.isdigit())}))
    """
)


def test_an_unprivileged_host_gets_the_same_sandbox() -> None:
    """Run as a user other than root, the set-up creates the user namespace first and does the same."""
    assert os.geteuid() == 0, "these machines run the suite as root: setpriv drops to nobody"
    # the sandbox package as nobody can read it, wherever this checkout and its install live (a folder under
    # /root is not readable by nobody)
    import shutil
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="minifaas-unprivileged-"))
    try:
        shutil.copytree(Path(minifaas_sandbox.__file__).parent, shared / "minifaas_sandbox")
        for path in [shared, *shared.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(shared)}
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c"]
        probe = subprocess.run(
            [*nobody, "import minifaas_sandbox"], capture_output=True, text=True, timeout=60, cwd="/", env=env
        )
        if probe.returncode != 0:
            # e.g. an interpreter under /root (mode 0700): nobody cannot run it; not the sandbox's doing
            pytest.skip(f"uid 65534 cannot run {sys.executable} with minifaas_sandbox here: {probe.stderr[-300:]}")
        proc = subprocess.run(
            [*nobody, UNPRIVILEGED_ENTER], capture_output=True, text=True, timeout=60, cwd="/", check=False, env=env
        )
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["euid"] == 1000 and r["cap"] == "0000000000000000" and r["seccomp"] == "2"
    assert "home" not in r["root"] and r["tmp_writable"] is True
    assert r["pid"] == 1 and r["procs"] == ["1"]


def test_the_seccomp_filter_is_a_binary_tree_of_call_numbers() -> None:
    """Loading the filter is on every isolated cold start's path: the kernel compiles it and walks it once per call
    number (its per-call cache), which a chain of ~50 comparisons makes slower than a tree (same rules: the hostile
    tests above hold for it)."""
    import ctypes

    from minifaas_sandbox import seccomp

    lib = seccomp._lib()
    lib.seccomp_attr_get.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_uint32))
    value = ctypes.c_uint32(0)
    assert lib.seccomp_attr_get(seccomp.build(), seccomp.SCMP_FLTATR_CTL_OPTIMIZE, ctypes.byref(value)) == 0
    assert value.value == seccomp.SCMP_OPTIMIZE_BINARY_TREE


LAZY_IMPORT_UNDER_TMP = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import lazyprobe  # its submodule is imported only after the sandbox is entered, as numpy imports numpy.ma
    from minifaas_sandbox import isolation
    isolation.enter({}, network=False, memory_mb=16)
    from lazyprobe import sub
    print(json.dumps({'value': sub.VALUE, 'tmp_writable': __import__('os').access('/tmp', __import__('os').W_OK)}))
    """
)


def test_an_interpreter_under_the_hosts_tmp_goes_on_importing(tmp_path: Path) -> None:
    """CI's virtualenv lies under /tmp, which every sandbox replaces with a private tmpfs: its packages' folders were
    left out of the sandbox's root, so a submodule imported late (numpy.ma, by np.quantile) was not found."""
    assert str(tmp_path).startswith("/tmp/")
    site = tmp_path / "site"
    (site / "lazyprobe").mkdir(parents=True)
    (site / "lazyprobe" / "__init__.py").write_text("")
    (site / "lazyprobe" / "sub.py").write_text("VALUE = 42\n")
    site.chmod(0o755)
    tmp_path.chmod(0o755)
    out = subprocess.run(
        [sys.executable, "-c", LAZY_IMPORT_UNDER_TMP, str(site)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    # the package's folder is there, read-only, on top of the sandbox's own (writable) /tmp
    assert seen == {"value": 42, "tmp_writable": True}
