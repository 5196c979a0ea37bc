"""Deploying folders and zips: symbolic links, size caps, manifest includes, model file names. Real files."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import pytest

import minifaas
from minifaas._deploy import bundlecopy as _bundlecopy
from minifaas._deploy.bundle import Bundle, load_bundle
from minifaas.testing import assert_success

pytestmark = pytest.mark.anyio

MAIN = "def main(args):\n    return {'ok': True}\n"


def _folder(root: Path, name: str = "fn", main: str = MAIN) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "__main__.py").write_text(main)
    return folder


def _load(folder: Path, work: Path) -> Bundle:
    work.mkdir(exist_ok=True)
    return load_bundle(code=None, path=folder, main="main", work_dir=work)


def test_link_to_a_file_outside_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("token")
    folder = _folder(tmp_path / "p")
    (folder / "link_file").symlink_to(secret)
    with pytest.raises(minifaas.DeployError, match="symbolic link link_file points outside the folder"):
        _load(folder, tmp_path / "work")
    assert [p.name for p in (tmp_path / "work").iterdir()] == []  # the staging folder is gone


def test_loop_and_inner_links_stay_links(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "p")
    (folder / "data").mkdir()
    (folder / "data" / "labels.txt").write_text("cat\n")
    (folder / "loop").symlink_to(".")
    # absolute, but inside the folder: the copy points into the copy, not back at the source
    (folder / "labels").symlink_to(folder / "data" / "labels.txt")
    bundle = _load(folder, tmp_path / "work")
    assert bundle.root is not None
    assert (bundle.root / "loop").is_symlink() and os.readlink(bundle.root / "loop") == "."
    assert os.readlink(bundle.root / "labels") == "data/labels.txt"
    assert (bundle.root / "labels").read_text() == "cat\n"
    assert sum(1 for _ in bundle.root.rglob("labels.txt")) == 1


def test_linked_entry_is_still_validated(tmp_path: Path) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "real.py").write_text("def handler(args):\n    return {}\n")
    (folder / "__main__.py").symlink_to("real.py")
    with pytest.raises(minifaas.DeployError, match="no top-level function 'main'"):
        _load(folder, tmp_path / "work")


def test_broken_link_is_refused(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "p")
    (folder / "gone").symlink_to(folder / "nowhere")
    with pytest.raises(minifaas.DeployError, match="symbolic link gone is broken"):
        _load(folder, tmp_path / "work")


def test_folder_bytes_and_entries_are_capped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_bundlecopy, "MAX_BUNDLE_ENTRIES", 20)
    monkeypatch.setattr(_bundlecopy, "MAX_BUNDLE_BYTES", 10_000)
    many = _folder(tmp_path / "a")
    for i in range(25):
        (many / f"f{i}.txt").write_text("x")
    with pytest.raises(minifaas.DeployError, match="over 20 entries"):
        _load(many, tmp_path / "work")
    big = _folder(tmp_path / "b")
    (big / "blob.bin").write_bytes(b"\0" * 20_000)
    with pytest.raises(minifaas.DeployError, match="over 10000 bytes"):
        _load(big, tmp_path / "work")


def _project(tmp_path: Path) -> Path:
    project = tmp_path / "project"
    (project / "_lib").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (project / "_lib" / "helper.py").write_text("def double(x):\n    return 2 * x\n")
    return project


@pytest.mark.parametrize(
    ("include", "message"),
    [
        (["/etc/hostname"], "is absolute"),
        (["../../outside.txt"], "outside the project root"),
        (["../other/__main__.py"], "would replace the bundle's own '__main__.py'"),
        (["../_lib/helper.py", "../_lib/helper.py"], "would replace the bundle's own 'helper.py'"),
        ([7], "non-empty relative paths"),
    ],
    ids=["absolute", "dotdot-outside", "replaces-main", "twice", "not-a-string"],
)
def test_include_is_confined_and_never_replaces(tmp_path: Path, include: list[object], message: str) -> None:
    project = _project(tmp_path)
    (tmp_path / "outside.txt").write_text("secret")
    _folder(project, "other", "def main(args):\n    return {'pwned': True}\n")
    folder = _folder(project, "fn")
    (folder / "minifaas.json").write_text(json.dumps({"include": include}))
    with pytest.raises(minifaas.DeployError, match=message):
        _load(folder, tmp_path / "work")


def test_include_from_the_project_root(tmp_path: Path) -> None:
    project = _project(tmp_path)
    folder = _folder(project / "functions", "fn", "from helper import double\ndef main(args):\n    return {}\n")
    (folder / "minifaas.json").write_text(json.dumps({"include": ["../../_lib/helper.py"]}))
    bundle = _load(folder, tmp_path / "work")
    assert bundle.root is not None and (bundle.root / "helper.py").read_text().startswith("def double")


def test_include_in_a_zip_is_an_error(tmp_path: Path) -> None:
    zpath = tmp_path / "fn.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("__main__.py", MAIN)
        zf.writestr("minifaas.json", json.dumps({"include": ["../helper.py"]}))
    with pytest.raises(minifaas.DeployError, match="'include' is not supported in a zip bundle"):
        _load(zpath, tmp_path / "work")


async def test_model_file_with_a_space_in_its_name(minifaas_engine: minifaas.Engine, tmp_path: Path) -> None:
    folder = _folder(
        tmp_path,
        "fn",
        "from minifaas_sandbox import models\ndef main(args):\n    return models.load(args['labels'], loader='json')\n",
    )
    (folder / "my labels%.json").write_text('{"cat": 1}')
    (folder / "minifaas.json").write_text(json.dumps({"models": {"labels": "my labels%.json"}}))
    info = await minifaas_engine.deploy("spaced", path=folder)
    assert info["params"]["labels"].endswith("/my%20labels%25.json")
    act = await minifaas_engine.call("spaced")
    assert_success(act)
    assert act.result == {"cat": 1}
