"""The product-catalog workflow end to end: real photos, real models, a real Engine, a real folder feed.

One module-scoped run drops the photos into an uploads folder watched by a folder feed; its trigger's rules run
three deployments of the catalog composition (``crop`` at its latest version, ``crop@1`` = body_crop (Haar) and
``crop@2`` = smart_body_crop (BlazePose)). The tests then read what landed on disk and what the engine
recorded. The demo runs once as ``python -m minifaas._demo``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import cv2
import pytest

import minifaas
from minifaas._composer import Composition
from minifaas._sessions import Session

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "tests" / "data" / "images"
FUNCTIONS = REPO / "functions"
PEOPLE = ("messi5.jpg", "basketball1.png")
BLURRED = ("text_defocus.jpg", "text_motion.jpg", "licenseplate_motion.jpg")
NO_PERSON = "fruits.jpg"
BROKEN = "notes.jpg"  # text, not an image: a step fails
AB_PHOTO = "messi5.jpg"
FEED_INTERVAL_S = 0.05
SESSION_TIMEOUT_S = 120.0
FIRE_WAIT_S = 30.0
DEMO_TIMEOUT_S = 120.0
#: the terminal a newcomer runs the demo in
TERMINAL_COLUMNS = 80


def load_workflow() -> ModuleType:
    if str(FUNCTIONS) not in sys.path:
        sys.path.append(str(FUNCTIONS))  # the composition's host steps are imported as catalog.workflow:...
    return importlib.import_module("catalog.workflow")


wf = load_workflow()


@dataclasses.dataclass
class Target:
    """One deployment of the composition and what it produced, by photo name."""

    composition: str
    catalog: Path
    rejected: Path
    sessions: dict[str, minifaas.Activation] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Run:
    engine: minifaas.Engine
    main: Target
    v1: Target
    v2: Target
    fires: dict[str, str]  # photo name -> trigger activation id


def drop(src: Path, folder: Path, name: str | None = None) -> None:
    tmp = folder / f".{src.name}.part"
    shutil.copyfile(src, tmp)
    written = time.time() - 1.0  # an older mtime than the rename's ctime: whole at the feed's first look
    os.utime(tmp, (written, written))
    os.replace(tmp, folder / (name or src.name))


@pytest.fixture(scope="module")
async def run(minifaas_module_engine: minifaas.Engine, tmp_path_factory: pytest.TempPathFactory) -> Run:
    engine = minifaas_module_engine
    root = tmp_path_factory.mktemp("catalog")
    uploads, ab = root / "uploads", root / "ab-uploads"
    for folder in (uploads, ab):
        folder.mkdir()
    await engine.deploy("image_quality", path=FUNCTIONS / "image_quality", max_sandboxes=2)
    await engine.deploy("crop", path=FUNCTIONS / "body_crop", max_sandboxes=1)  # crop@1
    await engine.deploy("crop", path=FUNCTIONS / "smart_body_crop", max_sandboxes=2)  # crop@2
    await engine.deploy("auto_tag", path=FUNCTIONS / "auto_tag", max_sandboxes=2)
    targets = {}
    for key, comp, crop in (
        ("main", "catalog", "crop"),
        ("v1", "catalog-v1", "crop@1"),
        ("v2", "catalog-v2", "crop@2"),
    ):
        t = Target(comp, root / key / "catalog", root / key / "rejected")
        await wf.deploy_catalog(
            engine, comp, crop=crop, params={"catalog_dir": str(t.catalog), "rejected_dir": str(t.rejected)}
        )
        targets[key] = t
    fires: dict[str, str] = {}
    tm = engine.triggers
    assert tm is not None
    try:
        tm.create_trigger("photos")
        tm.create_rule("to-catalog", "photos", "catalog")
        tm.create_trigger("ab-photos")
        tm.create_rule("ab-1", "ab-photos", "catalog-v1")
        tm.create_rule("ab-2", "ab-photos", "catalog-v2")
        await tm.add_feed("photos", "folder", path=str(uploads), interval_s=FEED_INTERVAL_S)
        await tm.add_feed("ab-photos", "folder", path=str(ab), interval_s=FEED_INTERVAL_S)
        names = [*PEOPLE, *BLURRED, NO_PERSON]
        for name in names:
            drop(IMAGES / name, uploads)
        broken = root / BROKEN
        broken.write_text("meeting notes, not a photo\n")
        drop(broken, uploads)
        drop(IMAGES / AB_PHOTO, ab)
        expected = {"photos": {*names, BROKEN}, "ab-photos": {AB_PHOTO}}
        with anyio.fail_after(FIRE_WAIT_S):
            while True:
                got = {trig: {f.args["name"] for f in tm.list_fires(trig, limit=100)} for trig in expected}
                if got == expected:
                    break
                await anyio.sleep(FEED_INTERVAL_S)
        for fire in tm.list_fires("photos", limit=100):
            assert [o.error for o in fire.outcomes] == [None]
            fires[fire.args["name"]] = fire.activation_id
            (sid,) = fire.activation_ids
            targets["main"].sessions[fire.args["name"]] = await engine.activations.wait(sid, SESSION_TIMEOUT_S)
        (ab_fire,) = tm.list_fires("ab-photos")
        for outcome in ab_fire.outcomes:
            assert outcome.activation_id is not None, outcome.error
            key = "v1" if outcome.action == "catalog-v1" else "v2"
            targets[key].sessions[AB_PHOTO] = await engine.activations.wait(outcome.activation_id, SESSION_TIMEOUT_S)
    finally:
        for trigger in ("photos", "ab-photos"):  # stops their feeds: nothing polls the folders afterwards
            with contextlib.suppress(minifaas.TriggerError):
                tm.delete_trigger(trigger)
    return Run(engine, targets["main"], targets["v1"], targets["v2"], fires)


def sidecar(folder: Path, photo: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / f"{Path(photo).stem}.json").read_text())
    return data


# ---------------------------------------------------------------------------------------------- catalogued


@pytest.mark.parametrize("photo", PEOPLE, ids=PEOPLE)
async def test_person_is_cropped_and_tagged_into_the_catalog(run: Run, photo: str) -> None:
    act = run.main.sessions[photo]
    assert act.status == "success", act.result
    side = sidecar(run.main.catalog, photo)
    assert side["outcome"] == "catalog" and side["person"] is True
    box, size = side["box"], side["size"]
    assert box["w"] * box["h"] < 0.8 * size["width"] * size["height"], "the crop must not be the whole photo"
    assert box["x"] >= 0 and box["x"] + box["w"] <= size["width"]
    assert box["y"] >= 0 and box["y"] + box["h"] <= size["height"]
    crop = cv2.imread(side["image"])
    assert side["image"] == str(run.main.catalog / f"{Path(photo).stem}.jpg")
    assert crop is not None and crop.shape[:2] == (box["h"], box["w"])
    labels = [entry["label"] for entry in side["labels"]]
    assert labels, "the classifier found no label"
    assert set(labels) <= set(side["tags"]) and "person" in side["tags"]
    assert side["quality"]["passed"] is True and side["quality"]["score"] >= side["quality"]["threshold"]
    assert side["sha256"] == hashlib.sha256((IMAGES / photo).read_bytes()).hexdigest()
    # no staging leftovers: a sidecar means the entry is complete
    assert not [p for p in run.main.catalog.iterdir() if p.name.startswith(".")]


async def test_sidecar_names_the_activation_of_each_step(run: Run) -> None:
    photo = PEOPLE[0]
    side = sidecar(run.main.catalog, photo)
    session_id = run.main.sessions[photo].activation_id
    assert side["session_id"] == session_id
    assert run.main.sessions[photo].cause == run.fires[photo]  # the trigger's fire caused the session
    assert set(side["steps"]) == {"quality", "crop", "tag"}
    for role, function in (("quality", "image_quality"), ("crop", "crop"), ("tag", "auto_tag")):
        step = side["steps"][role]
        act = await run.engine.activations.get(step["activation_id"])
        assert (act.name, act.cause, act.status) == (function, session_id, "success")
        assert step["cold"] is bool(act.annotations.get("cold"))
    assert side["steps"]["crop"]["version"] == "2"  # "crop" alone runs the latest version
    # the write steps took their sessions' records: nothing piles up in the recorder
    assert all(wf.RECORDER.peek(act.activation_id) == [] for act in run.main.sessions.values())


async def test_photo_without_person_is_catalogued_uncropped(run: Run) -> None:
    act = run.main.sessions[NO_PERSON]
    assert act.status == "success", act.result
    side = sidecar(run.main.catalog, NO_PERSON)
    assert (side["outcome"], side["person"], side["box"]) == ("catalog", False, None)
    assert Path(side["image"]).read_bytes() == (IMAGES / NO_PERSON).read_bytes()
    labels = [entry["label"] for entry in side["labels"]]
    assert labels and side["tags"] == labels  # no "person" tag
    assert set(side["steps"]) == {"quality", "crop", "tag"}


# ---------------------------------------------------------------------------------------------- rejected


@pytest.mark.parametrize("photo", BLURRED, ids=BLURRED)
async def test_blurred_photo_goes_to_rejected_with_its_scores(run: Run, photo: str) -> None:
    act = run.main.sessions[photo]
    assert act.status == "success", act.result
    assert act.result["outcome"] == "rejected"
    side = sidecar(run.main.rejected, photo)
    quality = side["quality"]
    assert quality["passed"] is False and quality["score"] < quality["threshold"]
    assert {"sharpness", "exposure", "contrast", "noise", "colourfulness"} <= set(quality)
    assert f"{quality['score']}" in side["reason"] and "threshold" in side["reason"]
    assert (run.main.rejected / photo).read_bytes() == (IMAGES / photo).read_bytes()
    assert set(side["steps"]) == {"quality"}
    assert not (run.main.catalog / f"{Path(photo).stem}.json").exists()


async def test_unreadable_upload_is_reported_as_failed(run: Run) -> None:
    act = run.main.sessions[BROKEN]
    assert act.status == "application_error"
    assert "not a decodable image" in act.result["error"]
    side = sidecar(run.main.rejected, BROKEN)
    assert side["outcome"] == "failed" and "not a decodable image" in side["reason"]
    assert side["steps"]["quality"]["status"] == "application_error"
    assert (run.main.rejected / BROKEN).exists()


# ---------------------------------------------------------------------------------------------- traces


def trace(run: Run, photo: str) -> Session:
    return run.engine.sessions.get(run.main.sessions[photo].activation_id)


async def test_trace_of_a_catalogued_photo_takes_the_consequent(run: Run) -> None:
    session = trace(run, PEOPLE[0])
    steps = [(s.path, s.kind, s.name) for s in session.steps]
    assert steps == [
        ("[0].body[0]", "function", "catalog.workflow:receive"),
        ("[0].body[1]", "action", "image_quality"),
        ("[0].body[2].test", "function", "catalog.workflow:gate"),
        ("[0].body[2].consequent[0]", "function", "catalog.workflow:crop_request"),
        ("[0].body[2].consequent[1]", "action", "crop"),
        ("[0].body[2].consequent[2]", "function", "catalog.workflow:tag_request"),
        ("[0].body[2].consequent[3]", "action", "auto_tag"),
        ("[0].body[2].consequent[4]", "function", "catalog.workflow:write_catalog"),
    ]
    assert session.steps[2].output == {"value": True}
    assert sorted(session.not_taken) == ["[0].body[2].alternate", "[0].handler"]
    side = sidecar(run.main.catalog, PEOPLE[0])
    assert [s.activation_id for s in session.steps if s.kind == "action"] == [
        side["steps"][role]["activation_id"] for role in ("quality", "crop", "tag")
    ]


async def test_trace_of_a_rejected_photo_takes_the_alternate(run: Run) -> None:
    session = trace(run, BLURRED[0])
    assert [s.path for s in session.steps] == [
        "[0].body[0]",
        "[0].body[1]",
        "[0].body[2].test",
        "[0].body[2].alternate",
    ]
    assert session.steps[2].output == {"value": False}
    assert sorted(session.not_taken) == ["[0].body[2].consequent", "[0].handler"]


# ---------------------------------------------------------------------------------------------- versions


async def test_crop_versions_give_two_recorded_results(run: Run) -> None:
    v1, v2 = sidecar(run.v1.catalog, AB_PHOTO), sidecar(run.v2.catalog, AB_PHOTO)
    assert run.v1.sessions[AB_PHOTO].status == run.v2.sessions[AB_PHOTO].status == "success"
    assert (v1["crop_function"], v2["crop_function"]) == ("crop@1", "crop@2")
    assert (v1["steps"]["crop"]["version"], v2["steps"]["crop"]["version"]) == ("1", "2")
    assert v1["box"] != v2["box"], "Haar proportions and BlazePose keypoints should not agree to the pixel"
    records = [await run.engine.activations.get(s["steps"]["crop"]["activation_id"]) for s in (v1, v2)]
    assert [(a.name, a.version) for a in records] == [("crop", "1"), ("crop", "2")]
    assert records[0].result["method"] == "haar" and "method" not in records[1].result
    assert records[0].cause == run.v1.sessions[AB_PHOTO].activation_id
    assert records[1].cause == run.v2.sessions[AB_PHOTO].activation_id
    for side in (v1, v2):
        crop = cv2.imread(side["image"])
        assert crop is not None and crop.shape[:2] == (side["box"]["h"], side["box"]["w"])


# ---------------------------------------------------------------------------------------------- the IR


def test_workflow_survives_a_json_round_trip() -> None:
    comp = wf.build_workflow(crop="crop@1")
    ir = json.loads(json.dumps(comp.to_json()))
    again = Composition.from_json(ir)
    assert again == comp
    assert again.actions() == ["image_quality", "crop@1", "auto_tag"]


async def test_workflow_without_folders_fails_with_a_clear_error(run: Run) -> None:
    await run.engine.deploy_composition("catalog-bare", wf.build_workflow())
    act = await run.engine.call("catalog-bare", {"path": str(IMAGES / NO_PERSON)})
    assert act.status == "application_error"
    assert "catalog_dir" in act.result["error"]


# ---------------------------------------------------------------------------------------------- the demo


def test_demo_runs_on_the_bundled_photos(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "minifaas._demo", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_S,
        env={**os.environ, "COLUMNS": str(TERMINAL_COLUMNS)},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    photos = sorted(p.name for p in IMAGES.iterdir() if p.suffix in (".jpg", ".png"))
    # an 80-column terminal: nothing wider, and the summary's step times whole (not cut at the edge)
    assert max(len(line) for line in proc.stdout.splitlines()) <= TERMINAL_COLUMNS, proc.stdout
    summary = proc.stdout.split("summary (read back from the sidecars)", 1)[1].split(" photos in ", 1)[0]
    assert len(re.findall(r"quality +[\d,]+ (?:cold|warm) *$", summary, re.M)) == len(photos), summary
    assert len(re.findall(r"session +[\d,]+ *$", summary, re.M)) == len(photos), summary
    # LiteRT's INFO line, written by the zygote while it builds the interpreters, stays out of the output
    assert "XNNPACK" not in proc.stdout + proc.stderr
    done = sorted(p.stem for folder in ("catalog", "rejected") for p in (tmp_path / folder).glob("*.json"))
    assert done == sorted(Path(p).stem for p in photos)
    assert sorted(p.stem for p in (tmp_path / "rejected").glob("*.json")) == sorted(Path(p).stem for p in BLURRED)
    assert "session trace of messi5.jpg" in proc.stdout
    assert re.search(r"\.test +function +gate .* → consequent$", proc.stdout, re.M), proc.stdout
    assert f"{len(photos)} photos in" in proc.stdout


async def test_deployed_functions_start_with_their_models_in_the_zygote() -> None:
    """``deploy_functions`` (the demo's) names each function's models: the zygote reads them and builds their
    interpreters, so a sandbox's first call finds them built (a cache hit, not a load)."""
    async with minifaas.Engine(launcher="zygote") as engine:
        await wf.deploy_functions(engine, max_sandboxes=1)
        stats = engine.stats()["launcher_stats"]
        built = {Path(path).name for path in stats["prebuilt_models"]}  # the model store names files by content
        tflite = ("pose_detection.tflite", "pose_landmark_full.tflite", "efficientnet_lite0_int8.tflite")
        assert built == {hashlib.sha256((FUNCTIONS / "models" / name).read_bytes()).hexdigest() for name in tflite}
        assert not stats["prebuild_errors"] and stats["zygote_threads"] == 1
        image = (IMAGES / PEOPLE[0]).read_bytes()
        crop = await engine.call(wf.CROP_FUNCTION, {"image": image})
        tag = await engine.call(wf.TAG_FUNCTION, {"image": image, "person": True})
        for act in (crop, tag):
            assert act.status == "success", act.result
            assert act.annotations["cold"] and act.annotations["launch"] == "fork"
            tflite = [m for m in act.annotations["models"] if m["url"].endswith(".tflite")]
            assert tflite and all(m["hit"] and m.get("prebuilt") for m in tflite), act.annotations["models"]
        assert crop.result["person"] is True and tag.result["labels"]
