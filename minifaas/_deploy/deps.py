"""Per-function dependencies: a ``requirements.txt`` in a bundle gets a virtual environment of its own.

One environment per content hash of the requirements (and of the interpreter), built once and shared by every
sandbox and every function with the same requirements::

    <root>/<key>/                    a venv (--system-site-packages), renamed into place once complete
    <root>/<key>/minifaas-env.json   marker of a finished build: requirements, shadowed packages, build time
    <root>/.<key>.lock               flock: one builder per key across processes sharing the root

The venv sees the host's packages (``--system-site-packages``), so pip installs only what the host lacks and
heavy packages (numpy, OpenCV, LiteRT) stay the ones the zygote preloaded. A sandbox forked from the zygote
just puts the venv's ``site_packages`` in front of ``sys.path``. When the requirements pin another version of
a package the host has, the venv shadows it: :attr:`DepsEnv.conflicts_with_preload` says so, and such a
function's sandboxes must start from the venv's own ``python`` instead of a fork that may hold the host's
version already.

Builds are single-flight (concurrent deploys of one key wait for one build) and atomic (built in a temporary
folder, renamed when complete): a crash or a failed pip never leaves a half environment that looks finished.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import site
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Final

import anyio

from .._environ import scrubbed_env
from .._errors import DeployError

__all__ = ("DepsEnv", "default_env_root", "describe", "ensure_env", "env_key", "stats")

#: bump when the layout or the marker of an environment changes: old environments are then rebuilt, not reused
ENV_FORMAT: Final = 2
MARKER_NAME: Final = "minifaas-env.json"
REQUIREMENTS_NAME: Final = "requirements.txt"
HOST_SITE_PTH_NAME: Final = "_minifaas_host_site.pth"
HOST_SITE_MODULE: Final = "_minifaas_host_site"
VENV_TIMEOUT_S: Final = 120.0
PIP_TIMEOUT_S: Final = 900.0
LOCK_POLL_S: Final = 0.2
#: how much of pip's output a DeployError carries: the end, where pip says what went wrong
PIP_OUTPUT_TAIL_CHARS: Final = 4000
#: pip settings that would send the install somewhere other than the venv
PIP_ENV_DROP: Final = frozenset({"PIP_USER", "PIP_TARGET", "PIP_PREFIX", "PIP_ROOT", "PIP_REQUIRE_VIRTUALENV"})
#: what pip needs, on top of a sandbox's scrubbed environment, to reach its index (its own PIP_* settings too)
PIP_NETWORK_ENV: Final = frozenset(
    {
        "http_proxy",
        "https_proxy",
        "no_proxy",
        "all_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "NO_PROXY",
        "ALL_PROXY",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
        "REQUESTS_CA_BUNDLE",
        "CURL_CA_BUNDLE",
    }
)
#: requirements.txt options that change where pip downloads from (or read more options from elsewhere)
INDEX_OPTIONS: Final = (
    "--index-url",
    "--extra-index-url",
    "--find-links",
    "--trusted-host",
    "--requirement",
    "--constraint",
    "-i",
    "-f",
    "-r",
    "-c",
)

#: process-wide counters: builds (pip ran), reuses (a finished env was found), waits (joined another's build),
#: failures (pip or venv failed)
stats: Counter[str] = Counter()


@dataclasses.dataclass(frozen=True, slots=True)
class DepsEnv:
    """A ready virtual environment holding a function's requirements."""

    key: str
    path: Path
    #: the venv's interpreter: sandboxes of a function whose env conflicts with the preload set start from it
    python: Path
    #: put in front of a sandbox's ``sys.path`` (the INIT frame's ``sys_path``)
    site_packages: Path
    #: host packages the env replaces with another version: distribution name -> the env's version
    shadowed: dict[str, str]
    #: seconds this call spent building (0.0 when the env was reused)
    build_s: float = 0.0

    @property
    def conflicts_with_preload(self) -> bool:
        """True when the env replaces a host package, which a fork of a preloaded interpreter may hold."""
        return bool(self.shadowed)


def default_env_root() -> Path:
    """Where environments live without a state dir: ``$MINIFAAS_ENV_CACHE`` or ``~/.cache/minifaas/envs``."""
    env = os.environ.get("MINIFAAS_ENV_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "minifaas" / "envs"


def env_key(requirements: str, index_url: str | None = None) -> str:
    """The content hash naming an environment: the requirements' lines, the index they come from and the
    interpreter they are for."""
    lines = [line.strip() for line in requirements.splitlines()]
    normalized = "\n".join(line for line in lines if line and not line.startswith("#"))
    # the venv links to this interpreter and sees its site-packages, so both are part of what it is
    interp = f"{sys.implementation.cache_tag}|{platform.machine()}|{os.path.realpath(sys.prefix)}|{ENV_FORMAT}"
    # "pkg==1.0" from another index may be other code: an env built from one index is not reused for another
    index = f"\n--index-url {index_url}" if index_url else ""
    return hashlib.sha256(f"{interp}\n{normalized}{index}".encode()).hexdigest()[:32]


def check_requirements(requirements: str) -> None:
    """Refuse options in ``requirements.txt`` that choose where pip downloads from: a bundle must not send the
    host's pip to an index of its choosing (``Engine(pip_allow_index_options=True)`` allows them)."""
    joined = requirements.replace("\\\n", " ")
    for number, line in enumerate(joined.splitlines(), 1):
        # pip's comments: '#' at the start or after whitespace ('#' inside a URL is not one)
        for token in re.sub(r"(^|\s)#.*$", "", line).split():
            option = token.split("=", 1)[0] if token.startswith("--") else token[:2]
            if option in INDEX_OPTIONS:
                raise DeployError(
                    f"requirements.txt line {number}: {option} chooses where pip downloads from; set the index "
                    "with Engine(pip_index_url=...), or allow such options with Engine(pip_allow_index_options=True)"
                )


class _Flight:
    """One build in progress in this process, that other deploys of the same key wait for."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.error: DeployError | None = None


_flights: dict[Path, _Flight] = {}


async def ensure_env(
    requirements: str, *, root: Path, index_url: str | None = None, allow_index_options: bool = False
) -> DepsEnv:
    """The environment for ``requirements`` under ``root``: reused if built before, else built now.

    Raises :class:`DeployError` (with the tail of pip's output) when the requirements cannot be installed.
    ``index_url`` replaces pip's index (else pip's own configuration applies, ``PIP_INDEX_URL`` included).
    Relative paths in the requirements are not supported: the build runs in a temporary folder. Options that
    choose an index (``--index-url``, ``--find-links``, ``-r``...) are refused unless ``allow_index_options``.
    """
    if not allow_index_options:
        check_requirements(requirements)
    key = env_key(requirements, index_url)
    final = Path(root).expanduser().resolve() / key
    while True:
        env = _read_env(final, key)
        if env is not None:
            stats["reuses"] += 1
            return env
        flight = _flights.get(final)
        if flight is None:
            break
        stats["waits"] += 1
        await flight.done.wait()
        if flight.error is not None:
            raise DeployError(str(flight.error))
    flight = _Flight()
    _flights[final] = flight
    try:
        return await _build(requirements, key, final, index_url)
    except DeployError as exc:
        flight.error = exc
        raise
    finally:
        del _flights[final]
        flight.done.set()


def _read_env(final: Path, key: str) -> DepsEnv | None:
    marker = final / MARKER_NAME
    try:
        meta = json.loads(marker.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    python = final / "bin" / "python"
    if not isinstance(meta, dict) or meta.get("format") != ENV_FORMAT or not python.exists():
        return None
    return DepsEnv(key, final, python, _site_packages(final), dict(meta.get("shadowed") or {}))


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


async def _build(requirements: str, key: str, final: Path, index_url: str | None) -> DepsEnv:
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(root / f".{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        await _lock(lock_fd)
        env = _read_env(final, key)
        if env is not None:  # another process built it while we waited for the lock
            stats["reuses"] += 1
            return env
        t0 = time.perf_counter()
        tmp = root / f".build-{key}-{uuid.uuid4().hex[:8]}"
        try:
            shadowed = await _install(requirements, tmp, index_url)
            build_s = time.perf_counter() - t0
            meta = {
                "format": ENV_FORMAT,
                "key": key,
                "python": sys.version,
                "requirements": requirements,
                "shadowed": shadowed,
                "build_s": round(build_s, 3),
                "built_at": time.time(),
            }
            (tmp / MARKER_NAME).write_text(json.dumps(meta, indent=1), "utf-8")
            if final.exists():  # a stale, unmarked leftover of an older format: ours replaces it
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(lambda: shutil.rmtree(tmp, ignore_errors=True))
        stats["builds"] += 1
        return dataclasses.replace(_must_read(final, key), build_s=build_s)
    finally:
        os.close(lock_fd)  # closing releases the flock


def _must_read(final: Path, key: str) -> DepsEnv:
    env = _read_env(final, key)
    if env is None:
        raise DeployError(f"the environment {final} was built but cannot be read back")
    return env


async def _lock(fd: int) -> None:
    # polling keeps the wait cancellable; builds take seconds, so a 0.2 s poll costs nothing
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        await anyio.sleep(LOCK_POLL_S)


async def _install(requirements: str, venv: Path, index_url: str | None) -> dict[str, str]:
    """Create the venv in ``venv`` and pip-install ``requirements``; returns the host packages it shadows."""
    venv_argv = [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)]
    await _run(venv_argv, VENV_TIMEOUT_S, "could not create a virtual environment", cwd=venv.parent)
    _lend_host_sites(_site_packages(venv))
    req_file = venv / REQUIREMENTS_NAME
    req_file.write_text(requirements, "utf-8")
    # the venv has no pip of its own: the host's pip, seen through the system site-packages, installs into the
    # interpreter that runs it (saves the seconds ensurepip takes per environment)
    pip_argv = [
        str(venv / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar",
        "off",
        "--no-warn-script-location",
        "-r",
        str(req_file),
    ]
    if index_url:
        pip_argv += ["--index-url", index_url]
    await _run(pip_argv, PIP_TIMEOUT_S, "pip could not install the requirements", cwd=venv)
    return _shadowed(_site_packages(venv))


def host_site_dirs() -> list[str]:
    """The host's site-packages folders (user site included), in the order the host searches them."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    found = [d for d in dict.fromkeys(dirs) if Path(d).is_dir()]
    rank = {p: i for i, p in reversed(list(enumerate(sys.path)))}
    return sorted(found, key=lambda d: rank.get(d, len(rank)))


def _lend_host_sites(site_packages: Path) -> None:
    """Make the host's packages importable in the venv, processing their ``.pth`` files.

    ``--system-site-packages`` reaches the base interpreter's folders only: a host that is itself a venv, or one
    whose packages are in a user site the sandbox's scrubbed environment does not point to, would be missing.
    Bare paths in a ``.pth`` are not enough either: the ``.pth`` files in them (an editable install's finder
    that maps ``minifaas_sandbox`` to ``sandbox/``) would be skipped, so a sandbox started from the venv's
    python could not import its own runtime. ``site.addsitedir`` processes them.
    """
    module = f"""\
# Written by minifaas: lends the host's site-packages to this environment, their .pth files included.
import os
import site
import sys

HOST_SITES = {host_site_dirs()!r}


def _lend():
    before = len(sys.path)
    for path in HOST_SITES:
        if path not in sys.path:
            site.addsitedir(path)
    added = sys.path[before:]
    del sys.path[before:]
    # right behind this environment's own packages: the host's versions win over the base interpreter's
    here = os.path.dirname(os.path.abspath(__file__))
    at = sys.path.index(here) + 1 if here in sys.path else len(sys.path)
    sys.path[at:at] = added


_lend()
"""
    (site_packages / f"{HOST_SITE_MODULE}.py").write_text(module, "utf-8")
    (site_packages / HOST_SITE_PTH_NAME).write_text(f"import {HOST_SITE_MODULE}\n", "utf-8")


async def _run(argv: list[str], timeout_s: float, what: str, *, cwd: Path) -> None:
    env = pip_env()
    # the tail of pip's output ends up in an exception message: no escape codes in it
    env["PIP_NO_COLOR"] = "1"
    try:
        with anyio.fail_after(timeout_s):
            proc = await anyio.run_process(
                argv, check=False, stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=cwd, env=env
            )
    except TimeoutError:
        stats["failures"] += 1
        raise DeployError(f"{what}: still running after {timeout_s:g} s") from None
    except OSError as exc:
        stats["failures"] += 1
        raise DeployError(f"{what}: cannot run {argv[0]}: {exc}") from None
    if proc.returncode != 0:
        stats["failures"] += 1
        out = proc.stdout.decode("utf-8", "replace").rstrip()
        tail = out[-PIP_OUTPUT_TAIL_CHARS:]
        if len(out) > len(tail):
            tail = "...\n" + tail
        raise DeployError(f"{what} (exit status {proc.returncode}); its output ends with:\n{tail}")


def pip_env() -> dict[str, str]:
    """The environment pip (and every requirement's build code it runs) gets: a sandbox's scrubbed environment,
    pip's own settings and what reaching an index takes; no tokens, keys or cloud credentials of the host."""
    env = scrubbed_env()
    env.pop("PYTHONHOME", None)
    for key, value in os.environ.items():
        if key in PIP_NETWORK_ENV or (key.startswith("PIP_") and key not in PIP_ENV_DROP):
            env[key] = value
    return env


def _shadowed(site_packages: Path) -> dict[str, str]:
    """Distributions pip put in the venv that the host has in another version."""
    host: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            host.setdefault(_normalize(name), dist.version)
    out: dict[str, str] = {}
    for dist in importlib.metadata.distributions(path=[str(site_packages)]):
        name = dist.metadata["Name"]
        if not name:
            continue
        norm = _normalize(name)
        if norm in host and host[norm] != dist.version:
            out[norm] = dist.version
    return out


def _normalize(name: str) -> str:
    # PEP 503 normalization, so "Foo_Bar" in the venv matches "foo-bar" on the host
    return re.sub(r"[-_.]+", "-", name).lower()


def describe(env: DepsEnv) -> dict[str, Any]:
    """What ``get_function`` shows about a function's environment."""
    return {
        "key": env.key,
        "path": str(env.path),
        "site_packages": str(env.site_packages),
        "shadowed": dict(env.shadowed),
        "conflicts_with_preload": env.conflicts_with_preload,
    }
