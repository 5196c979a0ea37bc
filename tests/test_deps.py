"""Per-function dependencies: requirements.txt -> a shared, reused venv. Real pip, sandboxes and files."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

import minifaas
from minifaas._deploy import deps as _deps
from minifaas.testing import assert_success

pytestmark = pytest.mark.anyio

PKG_DIR = Path(__file__).parent / "data" / "pkgs" / "minifaas_demo_pkg"
PKG_NAME = "minifaas-demo-pkg"
PKG_MODULE = "minifaas_demo_pkg"
PKG_VERSION = "1.2.0"
#: a package not on the host, fetched from the package index (the one test that needs the network)
INDEX_REQ = "tabulate==0.9.0"
#: pure Python, small, a dependency of minifaas (so on every host): pinned to another version, it conflicts
HOST_PKG = "cachetools"
#: a reused env is a marker read and a few stats; a build is a venv plus a pip run (seconds)
REUSE_MAX_S = 0.5
#: a small sandbox preload keeps sandbox starts fast (zygote or spawn); the conflict test adds HOST_PKG to it
PRELOAD = ("minifaas_sandbox.runtime",)

USE_DEMO = textwrap.dedent(
    """
    import sys
    import minifaas_demo_pkg

    def main(args):
        return {"shout": minifaas_demo_pkg.shout(args.get("text", "hi")),
                "version": minifaas_demo_pkg.__version__,
                "file": minifaas_demo_pkg.__file__,
                "prefix": sys.prefix}
    """
)


def build_wheel(src: Path, out_dir: Path) -> Path:
    """Pack the demo package into a wheel (PEP 427 layout) without a build backend or the network."""
    tag = "py3-none-any"
    dist_info = f"{PKG_MODULE}-{PKG_VERSION}.dist-info"
    files: dict[str, bytes] = {}
    for f in sorted((src / PKG_MODULE).rglob("*.py")):
        files[f.relative_to(src).as_posix()] = f.read_bytes()
    files[f"{dist_info}/METADATA"] = (
        f"Metadata-Version: 2.1\nName: {PKG_NAME}\nVersion: {PKG_VERSION}\nRequires-Python: >=3.11\n"
    ).encode()
    files[f"{dist_info}/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: minifaas-tests\nRoot-Is-Purelib: true\nTag: {tag}\n"
    ).encode()
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = out_dir / f"{PKG_MODULE}-{PKG_VERSION}-{tag}.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return wheel


def make_function(folder: Path, code: str, requirements: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "__main__.py").write_text(code)
    (folder / "requirements.txt").write_text(requirements)
    return folder


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(PKG_DIR, tmp_path_factory.mktemp("wheels"))


@pytest.fixture(scope="module")
def demo_req(wheel: Path) -> str:
    return f"# the demo package, from a local wheel: no index needed\n{PKG_NAME} @ {wheel.as_uri()}\n"


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
async def minifaas_engine(state_dir: Path) -> AsyncIterator[minifaas.Engine]:
    async with minifaas.Engine(state_dir, preload=PRELOAD) as eng:
        yield eng


def test_demo_package_is_not_on_the_host() -> None:
    # the tests below prove the env works only if the host itself cannot import the package
    assert importlib.util.find_spec(PKG_MODULE) is None
    assert importlib.util.find_spec("tabulate") is None
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version(PKG_NAME)


async def test_requirements_function_runs_in_its_env(
    minifaas_engine: minifaas.Engine, state_dir: Path, demo_req: str, tmp_path: Path
) -> None:
    builds = _deps.stats["builds"]
    t0 = time.perf_counter()
    info = await minifaas_engine.deploy("demo", path=make_function(tmp_path / "demo", USE_DEMO, demo_req))
    build_s = time.perf_counter() - t0
    print(f"env build + deploy: {build_s:.2f} s")
    assert _deps.stats["builds"] == builds + 1
    [site_packages] = info["sys_path"]
    assert Path(site_packages).is_relative_to(state_dir / "envs")
    assert info["python"] is None  # nothing of the host is replaced: the preloaded interpreter is fine
    act = await minifaas_engine.call("demo", {"text": "hello"})
    assert_success(act)
    assert act.result["shout"] == "HELLO!" and act.result["version"] == PKG_VERSION
    assert Path(act.result["file"]).is_relative_to(site_packages)
    # the env is a finished, marked venv; nothing of the build is left beside it
    env_dir = Path(site_packages).parents[2]
    meta = json.loads((env_dir / _deps.MARKER_NAME).read_text())
    assert meta["requirements"] == demo_req and meta["shadowed"] == {}
    assert not list((state_dir / "envs").glob(".build-*"))


async def test_same_requirements_reuse_the_env(minifaas_engine: minifaas.Engine, demo_req: str, tmp_path: Path) -> None:
    first = await minifaas_engine.deploy("demo-a", path=make_function(tmp_path / "a", USE_DEMO, demo_req))
    builds, reuses = _deps.stats["builds"], _deps.stats["reuses"]
    # another function, other code, the same requirements (comments and blank lines do not count)
    t0 = time.perf_counter()
    second = await minifaas_engine.deploy(
        "demo-b", path=make_function(tmp_path / "b", USE_DEMO + "\n# v2\n", "\n" + demo_req + "\n# end\n")
    )
    reuse_s = time.perf_counter() - t0
    print(f"deploy with a reused env: {reuse_s * 1000:.1f} ms")
    assert _deps.stats["builds"] == builds and _deps.stats["reuses"] == reuses + 1
    assert reuse_s < REUSE_MAX_S
    assert second["sys_path"] == first["sys_path"]
    assert (await minifaas_engine.invoke("demo-b", {"text": "b"}))["shout"] == "B!"


async def test_concurrent_builds_of_one_env_are_single_flight(tmp_path: Path, demo_req: str) -> None:
    builds, waits = _deps.stats["builds"], _deps.stats["waits"]
    envs: list[_deps.DepsEnv] = []

    async def one() -> None:
        envs.append(await _deps.ensure_env(demo_req, root=tmp_path))

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(one)
    assert _deps.stats["builds"] == builds + 1 and _deps.stats["waits"] == waits + 2
    assert len({e.path for e in envs}) == 1
    assert sorted(e.build_s > 0 for e in envs) == [False, False, True]
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [envs[0].key]


async def test_concurrent_failing_builds_run_pip_once(tmp_path: Path) -> None:
    failures = _deps.stats["failures"]
    req = "--no-index\nminifaas-no-such-package==1.0\n"
    errors: list[str] = []

    async def one() -> None:
        with pytest.raises(minifaas.DeployError) as info:
            await _deps.ensure_env(req, root=tmp_path)
        errors.append(str(info.value))

    async with anyio.create_task_group() as tg:
        for _ in range(2):
            tg.start_soon(one)
    # the waiter gets the builder's error (pip's output included) instead of running pip again
    assert _deps.stats["failures"] == failures + 1
    assert len(errors) == 2 and errors[0] == errors[1] and "minifaas-no-such-package" in errors[0]


def test_env_root_without_a_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MINIFAAS_ENV_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _deps.default_env_root() == tmp_path / "xdg" / "minifaas" / "envs"
    monkeypatch.setenv("MINIFAAS_ENV_CACHE", str(tmp_path / "envs"))
    assert _deps.default_env_root() == tmp_path / "envs"


def test_env_key_ignores_comments_but_not_pins() -> None:
    assert _deps.env_key("a==1\n# note\n\nb\n") == _deps.env_key("  a==1\nb")
    assert _deps.env_key("a==1\n") != _deps.env_key("a==2\n")


async def test_failing_install_is_a_deploy_error_with_pip_output(
    minifaas_engine: minifaas.Engine, state_dir: Path, tmp_path: Path
) -> None:
    failures = _deps.stats["failures"]
    req = "--no-index\nminifaas-no-such-package==9.9.9\n"
    folder = make_function(tmp_path / "broken", "def main(args):\n    return {}\n", req)
    with pytest.raises(minifaas.DeployError) as info:
        await minifaas_engine.deploy("broken", path=folder)
    msg = str(info.value)
    assert "pip could not install the requirements" in msg
    # pip's own words, so the developer sees why
    assert "No matching distribution found for minifaas-no-such-package==9.9.9" in msg
    assert _deps.stats["failures"] == failures + 1
    with pytest.raises(minifaas.FunctionNotFound):
        await minifaas_engine.get_function("broken")
    assert not list((state_dir / "envs").glob(".build-*"))
    assert not (state_dir / "envs" / _deps.env_key(req)).exists()


async def test_requirements_from_the_package_index(minifaas_engine: minifaas.Engine, tmp_path: Path) -> None:
    code = textwrap.dedent(
        """
        import tabulate

        def main(args):
            return {"table": tabulate.tabulate(args["rows"], headers=["k", "v"], tablefmt="plain"),
                    "version": tabulate.__version__}
        """
    )
    await minifaas_engine.deploy("table", path=make_function(tmp_path / "table", code, INDEX_REQ + "\n"))
    out = await minifaas_engine.invoke("table", {"rows": [["a", 1], ["b", 22]]})
    assert out["version"] == "0.9.0"
    assert out["table"].splitlines() == ["k      v", "a      1", "b     22"]


async def test_env_replacing_a_preloaded_package_spawns_its_own_python(tmp_path: Path) -> None:
    host_version = importlib.metadata.version(HOST_PKG)
    pinned = "5.3.3" if host_version != "5.3.3" else "5.4.0"
    code = textwrap.dedent(
        """
        import sys
        import cachetools

        def main(args):
            return {"version": cachetools.__version__, "prefix": sys.prefix}
        """
    )
    folder = make_function(tmp_path / "pinned", code, f"{HOST_PKG}=={pinned}\n")
    # every sandbox imports the host's cachetools before it loads a function (preload: zygote or spawn), so
    # the function gets the env's version only from a sandbox started with the env's own python
    preload = (HOST_PKG, *PRELOAD)
    async with minifaas.Engine(tmp_path / "state", preload=preload) as engine:
        info = await engine.deploy("pinned", path=folder)
        assert info["python"] is not None
        env_dir = Path(info["python"]).parents[1]
        assert json.loads((env_dir / _deps.MARKER_NAME).read_text())["shadowed"] == {HOST_PKG: pinned}
        out = await engine.invoke("pinned")
        assert out == {"version": pinned, "prefix": str(env_dir)}
        # functions without requirements still run in the preloaded interpreter, with the host's version
        plain = "import cachetools\ndef main(args):\n    return {'v': cachetools.__version__}\n"
        await engine.deploy("plain", code=plain)
        assert await engine.invoke("plain") == {"v": host_version}


ROOT = Path(__file__).resolve().parents[1]
#: the pin of the editable-install report: another version than the host's, which the sandbox must import
PINNED_HOST_PKG = "cachetools==5.3.3"


def run(argv: list[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    """subprocess.run that, when the command fails, fails the test with the command's own stderr."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, check=False, **kwargs)  # type: ignore[call-overload]
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, argv))[:300]}\nexit status {proc.returncode}\n"
            f"--- stdout (end) ---\n{proc.stdout[-2000:]}\n--- stderr (end) ---\n{proc.stderr[-6000:]}",
            pytrace=False,
        )
    return proc


def site_packages_of(prefix: Path) -> Path:
    return prefix / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def lend_this_interpreters_packages(site_dir: Path, *, process_pth: bool) -> None:
    """Make the packages of the interpreter running pytest importable from another prefix's ``site_dir``.

    pytest itself often runs in a venv (the README's test command, CI): a venv made from ``sys.executable`` is
    then a child of the *base* interpreter and sees none of this venv's packages. With ``process_pth`` the
    folders' .pth files run too (this interpreter's editable minifaas comes along); without, only plain
    packages do (the dependencies), and the prefix brings its own minifaas.
    """
    site_dir.mkdir(parents=True, exist_ok=True)
    dirs = _deps.host_site_dirs()
    if process_pth:
        text = "".join(f"import site; site.addsitedir({d!r})\n" for d in dirs)
    else:
        text = "".join(f"{d}\n" for d in dirs)
    (site_dir / "zz_lent_by_pytest.pth").write_text(text)


def new_venv(path: Path) -> Path:
    # from the base interpreter, without its site-packages: only what the test lends or installs is there
    run([sys.executable, "-m", "venv", "--without-pip", path])
    return path / "bin" / "python"


def test_host_in_a_venv_lends_its_packages(tmp_path: Path, wheel: Path, demo_req: str) -> None:
    # minifaas itself often runs in a venv: --system-site-packages alone would reach the base interpreter's
    # packages, not the host venv's. Here the host venv has the demo package; an env requiring it must see it
    # there (pip installs nothing) and its python must import it.
    host = tmp_path / "host-venv"
    py = new_venv(host)
    lend_this_interpreters_packages(site_packages_of(host), process_pth=True)
    run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", wheel])
    script = textwrap.dedent(
        f"""
        import anyio, json, sys
        from pathlib import Path
        from minifaas._deploy.deps import ensure_env
        env = anyio.run(lambda: ensure_env({demo_req!r}, root=Path({str(tmp_path / "envs")!r})))
        print(json.dumps({{"site": str(env.site_packages), "python": str(env.python)}}))
        """
    )
    out = run([py, "-c", script], cwd=tmp_path)
    env = json.loads(out.stdout.splitlines()[-1])
    assert not list(Path(env["site"]).glob(f"{PKG_MODULE}*"))  # satisfied by the host venv: not reinstalled
    probe = [env["python"], "-c", f"import {PKG_MODULE}, sys; print({PKG_MODULE}.__file__)"]
    where = run(probe, cwd=tmp_path).stdout.strip()
    assert Path(where).is_relative_to(host)


ENV_BACKEND = textwrap.dedent(
    """
    import json, os, zipfile

    RECORD = {record!r}
    NAME, VERSION = "envprobe", "0.1"

    def get_requires_for_build_wheel(config_settings=None):
        return []

    def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
        # a requirement's build code runs here, with whatever environment pip was given
        with open(RECORD, "w") as f:
            json.dump(dict(os.environ), f)
        info = f"{{NAME}}-{{VERSION}}.dist-info"
        files = {{
            f"{{NAME}}/__init__.py": "",
            f"{{info}}/METADATA": f"Metadata-Version: 2.1\\nName: {{NAME}}\\nVersion: {{VERSION}}\\n",
            f"{{info}}/WHEEL": "Wheel-Version: 1.0\\nGenerator: probe\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
        }}
        files[f"{{info}}/RECORD"] = "".join(f"{{n}},,\\n" for n in [*files, f"{{info}}/RECORD"])
        name = f"{{NAME}}-{{VERSION}}-py3-none-any.whl"
        with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as zf:
            for path, text in files.items():
                zf.writestr(path, text)
        return name
    """
)


async def test_build_code_gets_a_scrubbed_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "envprobe"
    project.mkdir()
    record = tmp_path / "seen-env.json"
    (project / "envbackend.py").write_text(ENV_BACKEND.format(record=str(record)))
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = []\nbuild-backend = "envbackend"\nbackend-path = ["."]\n'
    )
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "host-secret")
    monkeypatch.setenv("MINIFAAS_TEST_TOKEN", "host-token")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "17")
    env = await _deps.ensure_env(f"envprobe @ {project.as_uri()}\n", root=tmp_path / "envs")
    assert (env.site_packages / "envprobe" / "__init__.py").is_file()
    seen = json.loads(record.read_text())
    assert "AWS_SECRET_ACCESS_KEY" not in seen and "MINIFAAS_TEST_TOKEN" not in seen
    # what a sandbox gets, plus pip's own settings
    assert seen["OMP_NUM_THREADS"] == "1" and seen["PIP_DEFAULT_TIMEOUT"] == "17"


@pytest.mark.parametrize(
    "line",
    [
        "--index-url https://mirror.example/simple",
        "-i https://mirror.example/simple",
        "--extra-index-url=https://mirror.example/simple",
        "--find-links /tmp/wheels",
        "--trusted-host mirror.example",
        "-r /etc/other-requirements.txt",
    ],
    ids=["index-url", "short-i", "extra-index-url", "find-links", "trusted-host", "nested-r"],
)
async def test_index_options_in_requirements_are_refused(tmp_path: Path, line: str) -> None:
    folder = make_function(tmp_path / "fn", "def main(args):\n    return {}\n", f"tabulate==0.9.0\n{line}\n")
    async with minifaas.Engine(tmp_path / "state", preload=PRELOAD) as engine:
        with pytest.raises(minifaas.DeployError, match=r"requirements.txt line 2: -.* chooses where pip downloads"):
            await engine.deploy("fn", path=folder)
    assert not (tmp_path / "state" / "envs").exists() or not any((tmp_path / "state" / "envs").iterdir())


async def test_index_options_when_allowed(tmp_path: Path, wheel: Path) -> None:
    req = f"--no-index\n--find-links {wheel.parent}\n{PKG_NAME}=={PKG_VERSION}\n"
    folder = make_function(tmp_path / "fn", USE_DEMO, req)
    async with minifaas.Engine(tmp_path / "state", preload=PRELOAD, pip_allow_index_options=True) as engine:
        await engine.deploy("fn", path=folder)
        assert (await engine.invoke("fn", {"text": "ok"}))["shout"] == "OK!"


async def test_index_url_is_part_of_the_env_key(tmp_path: Path, demo_req: str) -> None:
    assert _deps.env_key(demo_req) != _deps.env_key(demo_req, "https://mirror.example/simple")
    assert _deps.env_key(demo_req, "https://a.example/simple") != _deps.env_key(demo_req, "https://b.example/simple")
    builds = _deps.stats["builds"]
    plain = await _deps.ensure_env(demo_req, root=tmp_path)
    # a direct-URL requirement never asks the index, so an unreachable one still builds: a second environment
    other = await _deps.ensure_env(demo_req, root=tmp_path, index_url="http://127.0.0.1:9/simple")
    assert plain.path != other.path and _deps.stats["builds"] == builds + 2
    assert (await _deps.ensure_env(demo_req, root=tmp_path, index_url="http://127.0.0.1:9/simple")).path == other.path


def test_a_failing_subprocess_shows_its_stderr() -> None:
    with pytest.raises(pytest.fail.Exception) as info:
        run([sys.executable, "-c", "import sys; sys.exit('the real reason, on stderr')"])
    assert "the real reason, on stderr" in str(info.value) and "exit status 1" in str(info.value)


PINNED_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import anyio
    import minifaas

    async def main():
        # cachetools preloaded: the pinned function needs a sandbox started from its env's own python
        async with minifaas.Engine(Path(sys.argv[1]), preload=("cachetools", "minifaas_sandbox.runtime")) as eng:
            info = await eng.deploy("pinned", path=sys.argv[2])
            out = await eng.invoke("pinned")
        print(json.dumps({"host_minifaas": minifaas.__file__, "python": info["python"], **out}))

    anyio.run(main)
    """
)
PINNED_FUNCTION = textwrap.dedent(
    """
    import sys
    import cachetools
    import minifaas_sandbox

    def main(args):
        return {"version": cachetools.__version__, "runtime": minifaas_sandbox.__file__, "prefix": sys.prefix}
    """
)


@pytest.mark.parametrize("editable", [True, False], ids=["editable", "regular"])
@pytest.mark.parametrize("where", ["venv", "user-site"], ids=["in-a-venv", "out-of-a-venv"])
def test_pinned_host_package_with_each_kind_of_install(tmp_path: Path, editable: bool, where: str) -> None:
    # the newcomer's report: an editable install in a venv, a function pinning another cachetools, and the
    # sandbox died with "No module named minifaas_sandbox" (the host's site-packages were lent as bare paths,
    # so the editable install's .pth never ran in the function's env). Every kind of host install, for real:
    # pip installs this checkout into a fresh venv, or into the user site of the base interpreter (no venv).
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONUSERBASE")}
    if where == "venv":
        prefix = tmp_path / "host-venv"
        py = new_venv(prefix)
    else:
        prefix = tmp_path / "userbase"
        py = Path(getattr(sys, "_base_executable", sys.executable))
        env["PYTHONUSERBASE"] = str(prefix)
    site_dir = site_packages_of(prefix)
    # minifaas's dependencies come from this interpreter; minifaas itself from the install below
    lend_this_interpreters_packages(site_dir, process_pth=False)
    # --target, not --prefix: with --prefix, pip uninstalls the minifaas of the interpreter running this test
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site_dir]
    if editable:
        run([*pip, "-e", ROOT], env=env, cwd=tmp_path)
    else:
        # from a copy: building a wheel in place would leave a build/ folder in the checkout
        src = tmp_path / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, src / name)
        for name in ("minifaas", "sandbox"):
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        run([*pip, src], env=env, cwd=tmp_path)
    folder = make_function(tmp_path / "pinned", PINNED_FUNCTION, PINNED_HOST_PKG + "\n")
    out = json.loads(run([py, "-c", PINNED_SCRIPT, tmp_path / "state", folder], env=env, cwd=tmp_path).stdout)
    installed = ROOT if editable else site_dir
    assert Path(out["host_minifaas"]).is_relative_to(installed)
    assert out["python"] is not None  # the sandbox started from the env's python, not a fork of the host
    assert out["version"] == PINNED_HOST_PKG.split("==")[1]
    assert Path(out["runtime"]).is_relative_to(installed / ("sandbox" if editable else "minifaas_sandbox"))
