"""Turning ``deploy(code=...)`` or ``deploy(path=...)`` into a validated bundle a sandbox can load.

Validation happens at deploy time, in the host, so that a syntax error, a missing ``main`` or a zip entry escaping its
folder is a :class:`DeployError` naming the file and line before any invocation.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import Any, Final

from .._errors import DeployError
from .bundlecopy import CopyBudget, copy_folder, include_into

__all__ = ("MANIFEST_NAME", "Bundle", "check_staged", "load_bundle")

MAX_CODE_BYTES: Final = 48 << 20
MAX_ZIP_ENTRIES: Final = 10_000
MANIFEST_NAME: Final = "minifaas.json"
STAGED_DIR_MODE: Final = 0o755
STAGED_FILE_MODE: Final = 0o644
ENTRY_NAME: Final = "__main__.py"


@dataclasses.dataclass(frozen=True, slots=True)
class Bundle:
    """What a sandbox needs to load a function, plus defaults declared by the bundle's manifest."""

    #: the INIT frame's ``source`` map: {kind: "code", code, filename} or {kind: "dir", path}
    source: dict[str, Any]
    digest: str
    params: dict[str, Any]
    #: model params declared by the manifest: param name -> file:// URL
    models: dict[str, str]
    origin: str
    #: the folder the bundle was unpacked into (None for code bundles)
    root: Path | None = None
    requirements: str | None = None


def _check_source(code: str, filename: str, main: str, *, need_main: bool) -> None:
    try:
        tree = ast.parse(code, filename=filename)
    except SyntaxError as exc:
        raise DeployError(f"syntax error: {exc.msg}", file=filename, line=exc.lineno) from None
    except ValueError as exc:  # null bytes
        raise DeployError(f"cannot parse source: {exc}", file=filename) from None
    except (RecursionError, MemoryError):
        # the parser gives up on very deep nesting (e.g. 100,000 unary minus signs) with these, not a SyntaxError
        raise DeployError("cannot parse source: it is nested too deeply", file=filename) from None
    if need_main and not _defines(tree, main):
        raise DeployError(f"no top-level function {main!r} defined", file=filename)


def _defines(tree: ast.Module, name: str) -> bool:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and node.name == name:
            return True
        if isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for sub in ast.walk(t):
                    if isinstance(sub, ast.Name) and sub.id == name:
                        return True
        if isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name.split(".")[0]) == name or alias.name == "*":
                    return True
        if isinstance(node, ast.If | ast.Try | ast.With):
            # definitions under `if`/`try` (e.g. optional imports) count too
            inner = ast.Module(
                body=[n for n in ast.walk(node) if isinstance(n, ast.stmt) and n is not node], type_ignores=[]
            )
            if _defines(inner, name):
                return True
    return False


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DeployError(f"cannot read: {exc.strerror or exc}", file=str(path)) from None
    if len(data) > MAX_CODE_BYTES:
        raise DeployError(f"code is {len(data)} bytes, over the {MAX_CODE_BYTES} byte limit", file=str(path))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DeployError(f"not UTF-8 text: {exc.reason} at byte {exc.start}", file=str(path)) from None


def load_bundle(*, code: str | None, path: str | os.PathLike[str] | None, main: str, work_dir: Path) -> Bundle:
    """Validate and stage a function's code. ``work_dir`` receives unpacked folders and zips."""
    if (code is None) == (path is None):
        raise DeployError("give exactly one of code= or path=")
    if code is not None:
        if not isinstance(code, str):
            raise DeployError(f"code must be a str, not {type(code).__name__}")
        if len(code.encode("utf-8", "surrogatepass")) > MAX_CODE_BYTES:
            raise DeployError(f"code is over the {MAX_CODE_BYTES} byte limit")
        _check_source(code, "<code>", main, need_main=True)
        digest = hashlib.sha256(code.encode("utf-8", "surrogatepass")).hexdigest()
        return Bundle({"kind": "code", "code": code, "filename": "__main__.py"}, digest, {}, {}, "code")
    assert path is not None
    p = Path(path).expanduser()
    if not p.exists():
        raise DeployError("no such file or folder", file=str(p))
    if p.is_dir():
        return _load_dir(p, main, work_dir)
    if p.suffix == ".zip" or zipfile.is_zipfile(p):
        return _load_zip(p, main, work_dir)
    if p.suffix == ".py":
        text = _read_text(p)
        _check_source(text, str(p), main, need_main=True)
        digest = hashlib.sha256(text.encode()).hexdigest()
        return Bundle({"kind": "code", "code": text, "filename": str(p.resolve())}, digest, {}, {}, str(p))
    raise DeployError("expected a .py file, a folder with __main__.py, or a .zip", file=str(p))


def _read_manifest(folder: Path) -> dict[str, Any]:
    mpath = folder / MANIFEST_NAME
    if not mpath.exists():
        return {}
    try:
        data = json.loads(mpath.read_text("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise DeployError(f"invalid manifest: {exc}", file=str(mpath)) from None
    if not isinstance(data, dict):
        raise DeployError("manifest must be a JSON object", file=str(mpath))
    for key, typ in (("include", list), ("params", dict), ("models", dict)):
        if key in data and not isinstance(data[key], typ):
            raise DeployError(f"manifest key {key!r} must be a {typ.__name__}", file=str(mpath))
    for key, value in data.get("models", {}).items():
        if not isinstance(value, str) or not value or "\0" in value:
            raise DeployError(f"model path for {key!r} must be a non-empty file path", file=str(mpath))
    return data


def _load_dir(folder: Path, main: str, work_dir: Path) -> Bundle:
    folder = folder.resolve()
    entry = folder / ENTRY_NAME
    if not entry.is_file():
        raise DeployError(f"folder has no {ENTRY_NAME}", file=str(folder))
    manifest = _read_manifest(folder)
    staging = Path(tempfile.mkdtemp(prefix=".stage-", dir=work_dir))
    try:
        # links stay links (confined to the folder), and bytes and entries are capped while copying
        budget = CopyBudget(str(folder))
        copy_folder(folder, staging, budget)
        include_into(folder, manifest.get("include", []), staging, budget, str(folder / MANIFEST_NAME))
        models: dict[str, str] = {}
        for param, rel in manifest.get("models", {}).items():
            model = (folder / str(rel)).resolve()
            if not model.is_file():
                raise DeployError(f"model file for {param!r} does not exist: {model}", file=str(folder / MANIFEST_NAME))
            # a file:// URI: a name with spaces or '%' is percent-encoded, and decoded by whoever opens it
            models[str(param)] = model.as_uri()
        return _finish_staged(staging, main, work_dir, origin=str(folder), manifest=manifest, models=models)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _load_zip(zpath: Path, main: str, work_dir: Path) -> Bundle:
    staging = Path(tempfile.mkdtemp(prefix=".stage-", dir=work_dir))
    try:
        try:
            zf = zipfile.ZipFile(zpath)
        except Exception as exc:
            # besides BadZipFile: e.g. UnicodeDecodeError for a name flagged UTF-8 that is not, struct.error
            raise DeployError(f"not a readable zip: {type(exc).__name__}: {exc}", file=str(zpath)) from None
        with zf:
            infos = zf.infolist()
            if len(infos) > MAX_ZIP_ENTRIES:
                raise DeployError(f"zip has {len(infos)} entries, over {MAX_ZIP_ENTRIES}", file=str(zpath))
            total = 0
            for info in infos:
                name = info.filename
                pure = PurePosixPath(name.replace("\\", "/"))
                if pure.is_absolute() or ".." in pure.parts or (pure.parts and pure.parts[0].endswith(":")):
                    raise DeployError(f"zip entry {name!r} escapes the bundle folder", file=str(zpath))
                mode = info.external_attr >> 16
                if stat.S_ISLNK(mode):
                    raise DeployError(f"zip entry {name!r} is a symbolic link", file=str(zpath))
                total += info.file_size
                if total > MAX_CODE_BYTES:
                    raise DeployError(f"zip unpacks to over {MAX_CODE_BYTES} bytes", file=str(zpath))
            try:
                zf.extractall(staging)
            except Exception as exc:
                # besides BadZipFile: encrypted entries (RuntimeError), unknown compression (NotImplementedError),
                # corrupt data (zlib.error, lzma.LZMAError, EOFError), bad names (ValueError), disk errors (OSError)
                raise DeployError(f"cannot unpack zip: {type(exc).__name__}: {exc}", file=str(zpath)) from None
        manifest = _read_manifest(staging)
        if manifest.get("include"):
            raise DeployError(
                "'include' is not supported in a zip bundle: put the shared files into the zip",
                file=f"{zpath}/{MANIFEST_NAME}",
            )
        # model files inside a zip live where the bundle ends up (resolved in _finish_staged)
        return _finish_staged(staging, main, work_dir, origin=str(zpath), manifest=manifest, models=None)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _walk(root: Path) -> list[Path]:
    """Every path under ``root``, sorted, without following links to folders (a ``loop -> .`` stays one entry)."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        found += [here / n for n in dirnames] + [here / n for n in filenames]
    return sorted(found)


#: each staged folder as it was staged: every entry's path, mode, inode, size, mtime and ctime (a rewrite, a new
#: file, a chmod or a touch with a forged mtime all change the ctime); comparing costs one lstat per entry
_STAMPS: dict[str, tuple[tuple[str, int, int, int, int, int], ...]] = {}


def _stamp(folder: str) -> tuple[tuple[str, int, int, int, int, int], ...]:
    # the folder's own times are not part of it: the engine touches it to mark it in use (a file added or removed
    # in it shows as an entry more or less)
    out = []
    for root, dirs, files in os.walk(folder):
        for name in (*dirs, *files):
            path = os.path.join(root, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, folder)
            out.append((rel, st.st_mode, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(sorted(out))


def check_staged(root: Path, digest: str) -> str | None:
    """Before a sandbox of a staged bundle starts: None when the folder is as it was staged; otherwise why it must
    not run (it is removed then, so that deploying it again stages it afresh). Staged folders are shared by every
    function and version with the same content, and an unconfined function can rewrite its own."""
    key = str(root)
    try:
        now = _stamp(key)
    except OSError as exc:
        return f"its staged bundle {root} is gone ({exc.strerror}); deploy it again"
    known = _STAMPS.get(key)
    if known is None and _digest_of(root) == digest:
        _STAMPS[key] = now  # staged by an earlier engine process: its content checked once
        return None
    if now == known:
        return None
    _STAMPS.pop(key, None)
    shutil.rmtree(root, ignore_errors=True)
    return f"its staged bundle {root} changed since it was deployed (a function rewrote it); deploy it again"


def _digest_of(folder: Path) -> str | None:
    """The content digest _finish_staged computed for a staged folder (None if a symbolic link appeared in it)."""
    h = hashlib.sha256()
    try:
        for f in sorted(folder.rglob("*")):
            if f.is_symlink():
                return None
            if "__pycache__" in f.parts:
                continue
            if f.is_file():
                h.update(f.relative_to(folder).as_posix().encode() + b"\0")
                h.update(f.read_bytes() + b"\0")
    except OSError:
        return None
    return h.hexdigest()


def _finish_staged(
    staging: Path,
    main: str,
    work_dir: Path,
    *,
    origin: str,
    manifest: dict[str, Any],
    models: dict[str, str] | None,
) -> Bundle:
    entry = staging / ENTRY_NAME
    if not entry.is_file():
        raise DeployError(f"bundle has no {ENTRY_NAME} at its root", file=origin)
    h = hashlib.sha256()
    # readable by a sandbox's own unprivileged uid (isolation="sandbox"), whatever the source's modes were
    staging.chmod(STAGED_DIR_MODE)
    for f in sorted(staging.rglob("*")):
        if not f.is_symlink():
            f.chmod(STAGED_DIR_MODE if f.is_dir() else STAGED_FILE_MODE)
    real_staging = staging.resolve()
    for f in _walk(staging):
        if f.is_symlink():
            # a folder's links were checked while copying (zips refuse links): check again, and hash the target
            rel = f.relative_to(staging).as_posix()
            try:
                inside = f.resolve(strict=True).is_relative_to(real_staging)
            except (OSError, RuntimeError):
                inside = False
            if not inside:
                raise DeployError(f"bundle contains a symbolic link leading outside it: {rel}", file=origin)
            h.update(rel.encode() + b"\0link\0" + os.readlink(f).encode() + b"\0")
            if f.is_dir():
                continue
            # a link to a file is checked as the file (a linked __main__.py must still define main)
        if f.is_file():
            rel = f.relative_to(staging).as_posix()
            h.update(rel.encode() + b"\0")
            data = f.read_bytes()
            h.update(data + b"\0")
            if f.suffix == ".py":
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise DeployError(f"not UTF-8 text: {exc.reason}", file=f"{origin}/{rel}") from None
                _check_source(text, f"{origin}/{rel}", main, need_main=(f == entry))
    digest = h.hexdigest()
    final = work_dir / digest
    if final.exists() and _digest_of(final) != digest:
        # changed since it was staged (an unconfined function rewrote its own code): never reuse it
        shutil.rmtree(final, ignore_errors=True)
    if final.exists():
        shutil.rmtree(staging, ignore_errors=True)
        # compiled files are not part of the digest: a planted one would be loaded instead of its source
        for cache in list(final.rglob("__pycache__")):
            shutil.rmtree(cache, ignore_errors=True)
    else:
        try:
            os.replace(staging, final)
        except OSError:
            if not final.is_dir():
                raise
            # a concurrent deploy of the same bundle got there first: its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    _STAMPS[str(final)] = _stamp(str(final))
    if models is None:
        models = {}
        for k, v in manifest.get("models", {}).items():
            target = (final / str(v)).resolve()
            if not target.is_relative_to(final.resolve()) or not target.is_file():
                raise DeployError(f"model file for {k!r} is not inside the bundle: {v}", file=origin)
            models[str(k)] = target.as_uri()
    params = dict(manifest.get("params", {}))
    params.update(models)
    req = final / "requirements.txt"
    try:
        requirements = req.read_text("utf-8") if req.is_file() else None
    except UnicodeDecodeError as exc:
        raise DeployError(f"requirements.txt is not UTF-8 text: {exc.reason}", file=origin) from None
    return Bundle(
        {"kind": "dir", "path": str(final / ENTRY_NAME)},
        digest,
        params,
        models,
        origin,
        final,
        requirements,
    )
