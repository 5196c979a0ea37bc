#!/usr/bin/env python3
"""Build ``dist/minifaas.pyz``: the dev server (the whole ``minifaas`` command) as one executable file.

The file is a shiv zipapp: minifaas and every dependency (numpy, OpenCV, LiteRT, starlette, uvicorn ...) in a
zip with a ``#!/usr/bin/env python3.11`` line. Its first run unpacks the packages under ``~/.shiv`` (or
``$SHIV_ROOT``); later runs start from there. A machine needs only CPython 3.11 on x86-64 Linux (the bundled
wheels are built for the interpreter that ran this script)::

    python scripts/build_onefile.py                  # build dist/minifaas.pyz
    python scripts/build_onefile.py --smoke          # build, then start it in a clean interpreter and call it
    python scripts/build_onefile.py --smoke-only     # smoke-test an existing file
    ./dist/minifaas.pyz serve --port 3233            # run it

The smoke test runs the file with a fresh venv's interpreter (stdlib only: ``import minifaas`` fails there),
from an empty folder, with an empty ``SHIV_ROOT``, so nothing of this checkout or of the build machine's
site-packages can leak in. It starts ``serve --port 0``, deploys a function over the REST API, invokes it,
loads the web UI, and stops the server with SIGINT. Stdlib only, so it runs anywhere.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
DEFAULT_OUT: Final = REPO / "dist" / "minifaas.pyz"
#: what a wheel of the project needs from the checkout (tests, benches and functions stay out)
SOURCES: Final = ("pyproject.toml", "README.md", "minifaas", "sandbox")
#: the bundled wheels are CPython 3.11 builds: the shebang must not pick another minor version
SHEBANG_PYTHON: Final = "/usr/bin/env python3.11"
PRUNE_DIRS: Final = ("__pycache__",)
SERVER_START_TIMEOUT_S: Final = 180.0  # the first run unpacks ~hundreds of MB
HTTP_TIMEOUT_S: Final = 60.0
STOP_TIMEOUT_S: Final = 30.0
HELLO: Final = "def main(args):\n    print('hello from the pyz')\n    return {'hi': args.get('name', 'world')}\n"
APIHOST_RE: Final = re.compile(r"MINIFAAS_APIHOST=(\S+)\s+MINIFAAS_AUTH=(\S+)")


def _copy_sources(dst: Path) -> None:
    for name in SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        elif src.exists():
            shutil.copy2(src, dst / name)
        elif name == "README.md":
            (dst / name).write_text("minifaas\n", encoding="utf-8")
        else:
            raise SystemExit(f"missing {src}")


def _prune(site_packages: Path) -> None:
    for path in sorted(site_packages.rglob("*"), reverse=True):
        if path.is_dir() and path.name in PRUNE_DIRS:
            shutil.rmtree(path, ignore_errors=True)


def build(out: Path, *, python: str = SHEBANG_PYTHON, quiet: bool = False) -> dict[str, Any]:
    """Build the zipapp at ``out``; returns figures (seconds, bytes, sha256)."""
    t0 = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    pip_quiet = ["-q"] if quiet else []
    with tempfile.TemporaryDirectory(prefix="minifaas-onefile-") as tmp:
        work = Path(tmp)
        src = work / "src"
        src.mkdir()
        # a copy, so pip's in-tree build leaves no build/ or egg-info in the checkout
        _copy_sources(src)
        site = work / "site-packages"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", *pip_quiet, "--disable-pip-version-check",
             "--no-compile", "--target", str(site), str(src)],
            check=True,
        )  # fmt: skip
        _prune(site)
        t_pip = time.perf_counter() - t0
        subprocess.run(
            [sys.executable, "-m", "shiv", "--site-packages", str(site), "-c", "minifaas", "-o", str(out),
             "-p", python, "--compressed", "--reproducible", "--extend-pythonpath"],
            check=True,
        )  # fmt: skip
    digest = hashlib.sha256()
    with out.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {
        "path": str(out),
        "bytes": out.stat().st_size,
        "build_s": round(time.perf_counter() - t0, 1),
        "pip_s": round(t_pip, 1),
        "sha256": digest.hexdigest(),
    }


# ---------------------------------------------------------------------------------------------- smoke test


def _request(
    method: str, url: str, auth: str, body: Any = None, *, timeout_s: float = HTTP_TIMEOUT_S
) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


def _pump(stream: Any, sink: list[str], found: threading.Event) -> None:
    for line in iter(stream.readline, ""):
        sink.append(line)
        if APIHOST_RE.search(line):
            found.set()
    found.set()  # EOF: the server died; the waiter reads the output


def smoke(pyz: Path, *, keep_output: bool = False) -> dict[str, Any]:
    """Start ``pyz serve`` in a clean interpreter, deploy and invoke over HTTP, stop it. Returns timings."""
    figures: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="minifaas-smoke-") as tmp:
        work = Path(tmp)
        venv = work / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        py = venv / "bin" / "python"
        env = {
            k: v
            for k, v in os.environ.items()
            if k in ("PATH", "LANG", "LC_ALL", "TMPDIR", "TERM") or k.startswith("XDG_")
        }
        env.update(HOME=str(work / "home"), SHIV_ROOT=str(work / "shiv"), PYTHONDONTWRITEBYTECODE="1")
        probe = subprocess.run(
            [str(py), "-c", "import minifaas"], cwd=work, env=env, capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            raise AssertionError("the clean interpreter can import minifaas: the smoke test would prove nothing")
        lines: list[str] = []
        found = threading.Event()
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [str(py), str(pyz), "serve", "--host", "127.0.0.1", "--port", "0",
             "--state-dir", str(work / "state")],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        reader = threading.Thread(target=_pump, args=(proc.stdout, lines, found), daemon=True)
        reader.start()
        try:
            found.wait(SERVER_START_TIMEOUT_S)
            match = next((m for m in map(APIHOST_RE.search, lines) if m), None)
            if match is None:
                raise AssertionError(f"the server did not start; its output:\n{''.join(lines)}")
            figures["first_start_s"] = round(time.perf_counter() - t0, 2)
            base, auth = match.group(1), match.group(2)
            api = f"{base}/api/v1/namespaces/guest"
            t1 = time.perf_counter()
            status, body = _request("PUT", f"{api}/actions/hello", auth, {"exec": {"kind": "python:3", "code": HELLO}})
            if status != 200:
                raise AssertionError(f"deploy answered {status}: {body[:500]!r}")
            figures["deploy_s"] = round(time.perf_counter() - t1, 3)
            t2 = time.perf_counter()
            status, body = _request("POST", f"{api}/actions/hello?blocking=true&result=true", auth, {"name": "pyz"})
            if status != 200 or json.loads(body) != {"hi": "pyz"}:
                raise AssertionError(f"invoke answered {status}: {body[:500]!r}")
            figures["cold_invoke_s"] = round(time.perf_counter() - t2, 3)
            t3 = time.perf_counter()
            status, body = _request("POST", f"{api}/actions/hello?blocking=true&result=true", auth, {})
            if status != 200 or json.loads(body) != {"hi": "world"}:
                raise AssertionError(f"second invoke answered {status}: {body[:500]!r}")
            figures["warm_invoke_s"] = round(time.perf_counter() - t3, 3)
            status, body = _request("GET", f"{base}/ui/", auth)
            if status != 200 or b"/ui/static/app.js" not in body:
                raise AssertionError(f"the web UI answered {status}: {body[:300]!r}")
            status, body = _request("GET", f"{base}/ui/static/app.js", auth)
            if status != 200 or b"drawGraph" not in body:
                raise AssertionError(f"the UI's script answered {status}")
            status, body = _request("GET", f"{base}/ui/api/activations", auth)
            acts = json.loads(body)["activations"] if status == 200 else []
            if len(acts) != 2 or {a["status"] for a in acts} != {"success"}:
                raise AssertionError(f"the UI lists {acts!r}")
            status, body = _request("GET", f"{base}/ui/api/overview", auth)
            figures["launcher"] = json.loads(body)["stats"].get("launcher") if status == 200 else None
        finally:
            t4 = time.perf_counter()
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError("the server did not stop on SIGINT") from None
            reader.join(5)
            if proc.stdout is not None:
                proc.stdout.close()
            figures["stop_s"] = round(time.perf_counter() - t4, 2)
        if code != 0:
            raise AssertionError(f"the server exited with {code}; its output:\n{''.join(lines)}")
        # a second start reuses the unpacked packages: the start-up a user sees after the first run
        t5 = time.perf_counter()
        again = subprocess.run(
            [str(py), str(pyz), "--help"], cwd=work, env=env, capture_output=True, text=True, check=False
        )
        figures["warm_help_s"] = round(time.perf_counter() - t5, 2)
        if again.returncode != 0 or "serve" not in again.stdout:
            raise AssertionError(f"--help failed: {again.stderr[-2000:]}")
        if keep_output:
            figures["output"] = "".join(lines)
    return figures


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output file (default {DEFAULT_OUT})")
    ap.add_argument("--python", default=SHEBANG_PYTHON, help=f"shebang interpreter (default {SHEBANG_PYTHON})")
    ap.add_argument("--smoke", action="store_true", help="smoke-test the file after building it")
    ap.add_argument("--smoke-only", action="store_true", help="only smoke-test an existing --out file")
    ap.add_argument("-q", "--quiet", action="store_true", help="less pip output")
    args = ap.parse_args(argv)
    if not args.smoke_only:
        figures = build(args.out, python=args.python, quiet=args.quiet)
        print(
            f"built {figures['path']}: {figures['bytes'] / 1e6:.1f} MB in {figures['build_s']} s "
            f"(pip {figures['pip_s']} s), sha256 {figures['sha256']}",
            flush=True,
        )
    if args.smoke or args.smoke_only:
        timings = smoke(args.out)
        print("smoke test passed: " + ", ".join(f"{k} {v}" for k, v in timings.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
