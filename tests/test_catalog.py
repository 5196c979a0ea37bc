"""The product-catalog workflow end to end: real photos, real models, a real Engine, a real folder feed.

One module-scoped run drops the photos into an uploads folder watched by a folder feed; its trigger's rules run
three deployments of the catalog composition (``crop`` at its latest version, ``crop@1`` = body_crop (Haar) and
``crop@2`` = smart_body_crop (BlazePose)). The tests then read what landed on disk and what the engine
recorded. The demo runs once as ``python -m minifaas._cli.demo``.
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
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import cv2
import pytest

import minifaas
from minifaas._workflows.sessions import Session
from minifaas.composer import Composition

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
async def shared_engine() -> AsyncIterator[minifaas.Engine]:
    """One engine for the tests of this module that only read their own records (warm sandboxes are reused)."""
    async with minifaas.Engine() as engine:
        yield engine


REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "tests" / "data" / "images"
FUNCTIONS = REPO / "functions"
PEOPLE = ("messi5.jpg", "basketball1.png")
BLURRED = ("text_defocus.jpg", "text_motion.jpg", "licenseplate_motion.jpg")
NO_PERSON = "fruits.jpg"
LABELLED = REPO / "tests" / "data" / "labelled"
WAIST_UP = "astronaut.png"  # a waist-up portrait: hips below the bottom edge
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
async def run(shared_engine: minifaas.Engine, tmp_path_factory: pytest.TempPathFactory) -> Run:
    engine = shared_engine
    root = tmp_path_factory.mktemp("catalog")
    uploads, ab = root / "uploads", root / "ab-uploads"
    for folder in (uploads, ab):
        folder.mkdir()
    # the functions take photo paths only under the folders granted to them: the catalogs' (under root)
    grants = {"read_paths": [root], "write_paths": [root]}
    await engine.deploy("image_quality", path=FUNCTIONS / "image_quality", max_sandboxes=2, **grants)
    await engine.deploy("crop", path=FUNCTIONS / "body_crop", max_sandboxes=1, **grants)  # crop@1
    await engine.deploy("crop", path=FUNCTIONS / "smart_body_crop", max_sandboxes=2, **grants)  # crop@2
    await engine.deploy("auto_tag", path=FUNCTIONS / "auto_tag", max_sandboxes=2, **grants)
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
        drop(LABELLED / WAIST_UP, uploads)
        names.append(WAIST_UP)
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
    assert set(labels) <= set(side["tags"]) and "person" in side["tags"]
    # every tag carries its score: the classifier's, the crop step's person score
    assert list(side["tag_scores"]) == side["tags"]
    assert all(side["tag_scores"][e["label"]] == e["score"] >= 0.15 for e in side["labels"])
    assert side["tag_scores"]["person"] >= 0.5
    # the crop was tagged too, apart from the photo, with garment and accessory classes only
    assert isinstance(side["crop_tags"], list) and list(side["crop_tag_scores"]) == side["crop_tags"]
    assert [e["label"] for e in side["crop_labels"]] == side["crop_tags"]
    assert "person" not in side["crop_tags"]
    assert set(side["steps"]) == {"quality", "crop", "tag", "crop_tag"}
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
    assert set(side["steps"]) == {"quality", "crop", "tag", "crop_tag"}
    roles = (("quality", "image_quality"), ("crop", "crop"), ("tag", "auto_tag"), ("crop_tag", "auto_tag"))
    for role, function in roles:
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
    assert set(side["steps"]) == {"quality", "crop", "tag"}  # no crop, so no crop tagging
    assert side["crop_tags"] is side["crop_labels"] is None


async def test_waist_up_portrait_is_cropped_to_the_bottom_edge(run: Run) -> None:
    act = run.main.sessions[WAIST_UP]
    assert act.status == "success", act.result
    side = sidecar(run.main.catalog, WAIST_UP)
    assert side["outcome"] == "catalog" and side["person"] is True
    assert side["clipped"] == ["hips"] and "missing" not in side
    box, size = side["box"], side["size"]
    assert box["y"] + box["h"] == size["height"]
    # on her crop the tagger finds what she wears and holds; on the whole photo nothing scores 0.15
    garments = json.loads((FUNCTIONS / "models" / "imagenet_labels.json").read_text())
    assert side["crop_tags"], side["crop_labels"]
    assert side["crop_tags"] != side["tags"] and set(side["crop_tags"]) <= set(garments)
    session = run.engine.sessions.get(act.activation_id)
    crop_tag = [s for s in session.steps if s.kind == "action" and s.name == "auto_tag"][1]
    assert crop_tag.input["vocabulary"] == "garments" and crop_tag.input["image"].endswith(".jpg")
    assert Path(crop_tag.input["image"]).parent == run.main.catalog  # the staged crop, not the original


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
    assert quality["weakest"] == "sharpness" and "sharpness" in side["reason"]
    assert "below the minimum" in side["reason"]
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
    fresh, passed = "[0].body[1].consequent", "[0].body[1].consequent[2].consequent"
    assert steps == [
        ("[0].body[0]", "function", "catalog.workflow:receive"),
        ("[0].body[1].test", "function", "catalog.workflow:is_fresh"),
        (f"{fresh}[0]", "function", "catalog.workflow:quality_request"),
        (f"{fresh}[1]", "action", "image_quality"),
        (f"{fresh}[2].test", "function", "catalog.workflow:gate"),
        (f"{passed}[0]", "function", "catalog.workflow:crop_request"),
        (f"{passed}[1]", "action", "crop"),
        (f"{passed}[2]", "function", "catalog.workflow:tag_request"),
        (f"{passed}[3]", "action", "auto_tag"),
        (f"{passed}[4]", "function", "catalog.workflow:keep_photo_tags"),
        (f"{passed}[5].test", "function", "catalog.workflow:has_crop"),
        (f"{passed}[5].consequent[0]", "function", "catalog.workflow:crop_tag_request"),
        (f"{passed}[5].consequent[1]", "action", "auto_tag"),
        (f"{passed}[5].consequent[2]", "function", "catalog.workflow:keep_crop_tags"),
        (f"{passed}[6]", "function", "catalog.workflow:write_catalog"),
    ]
    assert session.steps[1].output == {"value": True} and session.steps[4].output == {"value": True}
    assert sorted(session.not_taken) == [
        "[0].body[1].alternate",
        f"{fresh}[2].alternate",
        f"{passed}[5].alternate",
        "[0].handler",
    ]
    side = sidecar(run.main.catalog, PEOPLE[0])
    assert [s.activation_id for s in session.steps if s.kind == "action"] == [
        side["steps"][role]["activation_id"] for role in ("quality", "crop", "tag", "crop_tag")
    ]


async def test_trace_of_a_rejected_photo_takes_the_alternate(run: Run) -> None:
    session = trace(run, BLURRED[0])
    fresh = "[0].body[1].consequent"
    assert [s.path for s in session.steps] == [
        "[0].body[0]",
        "[0].body[1].test",
        f"{fresh}[0]",
        f"{fresh}[1]",
        f"{fresh}[2].test",
        f"{fresh}[2].alternate",
    ]
    assert session.steps[4].output == {"value": False}
    assert sorted(session.not_taken) == ["[0].body[1].alternate", f"{fresh}[2].consequent", "[0].handler"]


async def test_a_repeated_event_is_recognised_by_its_idempotency_key(run: Run) -> None:
    """A feed fires a photo again when its session never ended (a crash); the entry is written once."""
    photo = PEOPLE[0]
    side = sidecar(run.main.catalog, photo)
    assert side["idempotency_key"]  # the folder feed's key travelled into the sidecar
    before = {p.name: p.stat().st_mtime_ns for p in run.main.catalog.iterdir()}
    repeat = {
        "path": side["source"],
        "name": photo,
        "sha256": side["sha256"],
        "idempotency_key": side["idempotency_key"],
    }
    act = await run.engine.call("catalog", repeat)
    assert act.status == "success", act.result
    assert act.result == {
        "photo": photo,
        "outcome": "duplicate",
        "sidecar": str(run.main.catalog / f"{Path(photo).stem}.json"),
    }
    assert {p.name: p.stat().st_mtime_ns for p in run.main.catalog.iterdir()} == before  # nothing rewritten


async def test_a_photo_whose_bytes_changed_after_its_event_is_refused(run: Run, tmp_path: Path) -> None:
    photo = tmp_path / "changing.jpg"
    shutil.copyfile(IMAGES / PEOPLE[1], photo)
    stale = hashlib.sha256(b"the bytes the feed saw").hexdigest()
    out = tmp_path / "out"
    args = {"path": str(photo), "sha256": stale, "catalog_dir": str(out / "c"), "rejected_dir": str(out / "r")}
    act = await run.engine.call("catalog", args)
    assert act.status == "success", act.result
    assert act.result["outcome"] == "superseded"
    assert list((out / "c").iterdir()) == [] and list((out / "r").iterdir()) == []  # no entry, no snapshot left


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
        [sys.executable, "-m", "minifaas._cli.demo", str(tmp_path)],
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
    assert re.search(r"\.test +function +gate .* → then$", proc.stdout, re.M), proc.stdout
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


async def test_deploying_sweeps_staging_files_left_by_a_crash(run: Run, tmp_path: Path) -> None:
    catalog, rejected = tmp_path / "catalog", tmp_path / "rejected"
    catalog.mkdir()
    rejected.mkdir()
    stale = [
        catalog / ".p0001.0123456789ab.src.jpg",  # a snapshot
        catalog / ".p0001.0123456789ab.jpg",  # a crop not yet renamed into place
        rejected / ".p0002.json.deadbeef.tmp",  # an atomic write cut short
    ]
    kept = [catalog / ".keep.jpg", catalog / "p0003.jpg", catalog / "p0003.json"]
    for path in stale + kept:
        path.write_bytes(b"x")
    params = {"catalog_dir": str(catalog), "rejected_dir": str(rejected)}
    await wf.deploy_catalog(run.engine, "catalog-swept", params=params)
    assert [p.name for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept)


def test_photos_end_exactly_once_when_the_host_is_killed_mid_run(tmp_path: Path) -> None:
    """The short version of ``bench_reliability.py --only catalog``: a host killed -9 while sessions run."""
    from tests.helpers import catalog_crash as crashrun

    root, state = tmp_path, tmp_path / "state"
    crashrun.setup(state, root)
    images = sorted(p for p in IMAGES.iterdir() if p.name in (*PEOPLE, *BLURRED, NO_PERSON))
    count = 40  # at ~30 photos/s on 2 cores, more than a second of work
    stems = crashrun.drop_photos(root, images, count)
    first, family = crashrun.run_host(state, root, kill_after_s=0.5)  # sessions in flight
    assert first > 0, "nothing fired before the kill"
    filed_before = crashrun.tally(root, stems)["exactly_once"]
    assert filed_before < count, "the kill came too late to cut a session short"
    again, _ = crashrun.run_host(state, root, kill_after_s=None)
    assert again >= count - filed_before  # the unfinished ones fired again (and maybe filed-but-unended ones)
    counts = crashrun.tally(root, stems)
    assert counts["exactly_once"] == count and counts["in_both"] == 0 and counts["missing"] == 0
    assert counts["staging_files_left"] == 0
    time.sleep(1.0)
    assert not [pid for pid in family if os.path.exists(f"/proc/{pid}")], "processes left behind"
