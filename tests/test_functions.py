"""The AI functions on real photos and real models, called in-process.

Each function is imported from its folder the way a bundle would run it (its folder and functions/_lib on
sys.path, the manifest's params and models as default arguments) until ``minifaas.testing.call`` exists.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import ai_photos  # tests/ai_photos.py
import cv2
import numpy as np
import pytest
from minifaas_sandbox import models

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = ROOT / "functions"
IMAGES = ROOT / "tests" / "data" / "images"
LABELLED = ROOT / "tests" / "data" / "labelled"

SHARP = ["messi5.jpg", "basketball1.png", "basketball2.png", "fruits.jpg", "baboon.jpg", "HappyFish.jpg",
         "squirrel_cls.jpg"]  # fmt: skip
BLURRED = ["text_defocus.jpg", "text_motion.jpg", "licenseplate_motion.jpg"]
PEOPLE = ["messi5.jpg", "basketball1.png"]
NO_PEOPLE = ["fruits.jpg", "HappyFish.jpg", "squirrel_cls.jpg"]

Fn = Callable[[dict[str, Any]], dict[str, Any]]


def load_function(name: str) -> Fn:
    """main() of functions/<name> with the manifest's defaults applied, as a deployed bundle sees them."""
    folder = FUNCTIONS / name
    for p in (str(FUNCTIONS / "_lib"), str(folder)):
        if p not in sys.path:
            sys.path.insert(0, p)
    spec = importlib.util.spec_from_file_location(f"_fn_{name}", folder / "__main__.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    manifest = json.loads((folder / "minifaas.json").read_text())
    defaults = dict(manifest.get("params", {}))
    for param, rel in manifest.get("models", {}).items():
        defaults[param] = (folder / rel).resolve().as_uri()

    def call(args: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = module.main({**defaults, **args})
        return result

    return call


@pytest.fixture(scope="module")
def quality() -> Fn:
    return load_function("image_quality")


@pytest.fixture(scope="module")
def smart_crop() -> Fn:
    return load_function("smart_body_crop")


@pytest.fixture(scope="module")
def haar_crop() -> Fn:
    return load_function("body_crop")


@pytest.fixture(scope="module")
def auto_tag() -> Fn:
    return load_function("auto_tag")


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving tests/data/images."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(IMAGES), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _decode(data: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def _iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    iw = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    ih = max(0, min(ay + ah, by + bh) - max(ay, by))
    return iw * ih / (aw * ah + bw * bh - iw * ih)


def _imread(name: str) -> np.ndarray:
    image = cv2.imread(str(IMAGES / name))
    assert image is not None, name
    return image


def _cut(name: str, rows: int) -> bytes:
    """The photo's top ``rows`` rows, PNG-encoded: a real photo with the lower body cut off."""
    ok, buf = cv2.imencode(".png", _imread(name)[:rows])
    assert ok
    return buf.tobytes()


# --- image_quality ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SHARP, ids=SHARP)
def test_quality_passes_sharp_photos(quality: Fn, name: str) -> None:
    result = quality({"image": str(IMAGES / name)})
    assert result["passed"] is True, result
    for key in ("sharpness", "exposure", "contrast", "colourfulness", "noise", "score"):
        assert 0 <= result[key] <= 100


@pytest.mark.parametrize("name", BLURRED, ids=BLURRED)
def test_quality_rejects_blurred_photos(quality: Fn, name: str) -> None:
    result = quality({"image": str(IMAGES / name)})
    assert result["passed"] is False, result
    assert result["score"] < result["threshold"] == 61


def test_quality_reacts_to_blur_not_to_the_photo(quality: Fn) -> None:
    image = _imread("messi5.jpg")
    ok, sharp = cv2.imencode(".png", image)
    ok2, blurred = cv2.imencode(".png", cv2.GaussianBlur(image, (0, 0), 3))
    assert ok and ok2
    before = quality({"image": sharp.tobytes()})
    after = quality({"image": blurred.tobytes()})
    assert before["passed"] and not after["passed"]
    assert after["sharpness"] < before["sharpness"] - 30


def test_quality_threshold_param_and_inputs(quality: Fn, image_server: str) -> None:
    path = IMAGES / "text_defocus.jpg"
    lenient = quality({"image": path.read_bytes(), "threshold": 5, "min_sharpness": 0})
    assert lenient["passed"] is True and lenient["threshold"] == 5
    by_url = quality({"image": f"{image_server}/text_defocus.jpg"})
    by_file_url = quality({"image": path.as_uri()})
    assert by_url["score"] == by_file_url["score"] == lenient["score"]
    with pytest.raises(ValueError, match="threshold"):
        quality({"image": str(path), "threshold": 101})


BLUR_PHOTOS = ["images/messi5.jpg", "images/basketball1.png", "labelled/camera.png"]
MOTION_CASES = [(photo, length, angle) for photo in BLUR_PHOTOS for length in (9, 25) for angle in (0, 45, 90, 135)]
DEFOCUS_CASES = [(photo, radius) for photo in BLUR_PHOTOS for radius in (3, 5)]
SHARPNESS_REASON = re.compile(r"sharpness ([0-9.]+) is ([0-9.]+) below the minimum ([0-9.]+)")


@pytest.mark.parametrize(
    ("photo", "length", "angle"),
    MOTION_CASES,
    ids=[f"{Path(p).stem}-{n}px-{a}deg" for p, n, a in MOTION_CASES],
)
def test_quality_rejects_motion_blur(quality: Fn, photo: str, length: int, angle: int) -> None:
    sharp = quality({"image": ai_photos.png(ai_photos.read(photo))})
    blurred = quality({"image": ai_photos.png(ai_photos.motion_blur(ai_photos.read(photo), length, angle))})
    assert sharp["passed"] is True, sharp
    assert blurred["passed"] is False and blurred["weakest"] == "sharpness", blurred
    assert blurred["sharpness"] < blurred["min_sharpness"] == 50
    match = SHARPNESS_REASON.search(blurred["reason"])
    assert match is not None, blurred["reason"]
    value, short_by, minimum = (float(g) for g in match.groups())
    assert value == blurred["sharpness"] and short_by == pytest.approx(minimum - value, abs=0.11)


@pytest.mark.parametrize(("photo", "radius"), DEFOCUS_CASES, ids=[f"{Path(p).stem}-r{r}" for p, r in DEFOCUS_CASES])
def test_quality_rejects_defocus(quality: Fn, photo: str, radius: int) -> None:
    blurred = quality({"image": ai_photos.png(ai_photos.defocus(ai_photos.read(photo), radius))})
    assert blurred["passed"] is False and blurred["weakest"] == "sharpness", blurred
    assert "sharpness" in blurred["reason"] and "below the minimum" in blurred["reason"]
    assert min(w for w in blurred["edge_widths_px"] if w is not None) > 3.0  # every orientation widened


def test_quality_the_issues_25px_horizontal_blur_fails(quality: Fn) -> None:
    # the case the old Laplacian measure let through (sharpness 43, score 62.4 >= 61)
    result = quality({"image": ai_photos.png(ai_photos.motion_blur(_imread("messi5.jpg"), 25, 0))})
    assert result["passed"] is False and result["weakest"] == "sharpness"
    assert result["score"] < result["threshold"] and result["sharpness"] < 50
    assert "score" in result["reason"] and "below the threshold 61.0" in result["reason"]


@pytest.mark.parametrize("photo", ["labelled/camera.png", "grey-messi5"], ids=["cameraman", "grey-messi5"])
def test_quality_passes_a_sharp_black_and_white_photo(quality: Fn, photo: str) -> None:
    image = ai_photos.derive("images/messi5.jpg", [{"op": "grey"}]) if photo == "grey-messi5" else ai_photos.read(photo)
    result = quality({"image": ai_photos.png(image)})
    assert result["colourfulness"] < 5 and result["harmony"] == 100.0 and result["harmony_template"] is None
    assert result["passed"] is True and "reason" not in result, result
    assert result["sharpness"] >= 80


def test_quality_reason_names_another_failing_measure(quality: Fn) -> None:
    dark = (_imread("messi5.jpg") * 0.12).astype(np.uint8)  # sharp, but nearly black
    result = quality({"image": ai_photos.png(dark)})
    assert result["passed"] is False and result["weakest"] == "exposure" and result["sharpness"] >= 50
    assert result["reason"] == (
        f"score {result['score']} is {round(61.0 - result['score'], 1)} below the threshold 61.0"
        f" (weakest: exposure {result['exposure']})"
    )


def test_quality_blank_photo_fails_on_sharpness(quality: Fn) -> None:
    # no edge at all: nothing shows detail, so nothing can pass as sharp
    result = quality({"image": ai_photos.png(np.full((300, 400, 3), 140, np.uint8))})
    assert result["passed"] is False and result["weakest"] == "sharpness"
    assert result["edge_width_px"] is None and result["edge_widths_px"] == [None] * 4
    assert "sharpness 0.0 is 50.0 below the minimum 50.0" in result["reason"]


def _hue_board(hues: list[int]) -> np.ndarray:
    """40 px squares of saturated ``hues`` (degrees), with the footballer's texture over them."""
    hsv = np.zeros((320, 480, 3), np.uint8)
    for row in range(8):
        for col in range(12):
            hue = hues[(row * 3 + col) % len(hues)]
            hsv[row * 40 : (row + 1) * 40, col * 40 : (col + 1) * 40] = (hue // 2, 220, 200)
    grey = cv2.cvtColor(cv2.cvtColor(_imread("messi5.jpg")[:320, :480], cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
    return cv2.addWeighted(cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR), 0.8, grey, 0.2, 0)


def test_quality_harmony_is_scored_but_weighs_only_when_asked(quality: Fn) -> None:
    clash = ai_photos.png(_hue_board([0, 72, 144, 216, 288]))  # five hues evenly round the wheel
    calm = ai_photos.png(_hue_board([10, 25, 40, 55]))  # neighbouring oranges
    plain_clash, plain_calm = quality({"image": clash}), quality({"image": calm})
    assert plain_calm["harmony"] - plain_clash["harmony"] > 20
    assert "harmony" not in plain_clash["weights"] and "depth_of_field" not in plain_clash["weights"]
    assert plain_clash["passed"] is True
    # explicit zero weights change nothing; a weight makes the clash count, and the reason name it
    zero = quality({"image": clash, "weights": {"harmony": 0, "depth_of_field": 0}})
    assert zero["score"] == plain_clash["score"]
    weighted = quality({"image": clash, "weights": {"harmony": 0.5}, "threshold": 90})
    assert weighted["score"] < plain_clash["score"] and weighted["passed"] is False
    assert weighted["weakest"] == "harmony" and "weakest: harmony" in weighted["reason"]
    assert quality({"image": clash, "threshold": 90})["passed"] is True
    with pytest.raises(ValueError, match="unknown measure 'beauty'"):
        quality({"image": clash, "weights": {"beauty": 1}})
    with pytest.raises(ValueError, match="weight of 'harmony'"):
        quality({"image": clash, "weights": {"harmony": -1}})


def test_quality_depth_of_field_uses_the_box(quality: Fn) -> None:
    messi = _imread("messi5.jpg")
    box = [85, 60, 290, 280]  # the footballer
    x, y, w, h = box
    shallow = cv2.GaussianBlur(messi, (0, 0), 4)
    shallow[y : y + h, x : x + w] = messi[y : y + h, x : x + w]  # sharp subject, soft surroundings
    deep = quality({"image": ai_photos.png(messi), "box": box})
    soft = quality({"image": ai_photos.png(shallow), "box": box})
    assert soft["depth_of_field"] >= 80 > 20 >= deep["depth_of_field"]
    assert soft["passed"] is True and soft["score"] == quality({"image": ai_photos.png(shallow)})["score"]
    dict_box = quality({"image": ai_photos.png(shallow), "box": {"x": x, "y": y, "w": w, "h": h}})
    assert dict_box["depth_of_field"] == soft["depth_of_field"]
    with pytest.raises(ValueError, match="'box' must be"):
        quality({"image": ai_photos.png(messi), "box": [1, 2, 0, 4]})


# --- smart_body_crop ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PEOPLE, ids=PEOPLE)
def test_smart_crop_eyes_to_hips(smart_crop: Fn, name: str) -> None:
    result = smart_crop({"image": str(IMAGES / name)})
    assert result["person"] is True and result["detector_score"] >= 0.5
    x, y, w, h = result["x"], result["y"], result["w"], result["h"]
    kps = result["keypoints"]
    for kp in ("left_eye", "right_eye", "left_hip", "right_hip"):
        assert kp in kps, kps.keys()
        assert kps[kp]["visibility"] >= 0.5
        assert x <= kps[kp]["x"] <= x + w and y <= kps[kp]["y"] <= y + h, (kp, kps[kp], (x, y, w, h))
    # eyes near the top edge, hips near the bottom: the crop is the eye-to-hip span, not the whole figure
    eye_y = min(kps["left_eye"]["y"], kps["right_eye"]["y"])
    hip_y = max(kps["left_hip"]["y"], kps["right_hip"]["y"])
    assert eye_y - y <= 0.15 * h and (y + h) - hip_y <= 0.15 * h
    assert w * h < 0.5 * result["width"] * result["height"]
    crop = _decode(result["crop"])
    assert crop.shape[:2] == (h, w)


@pytest.mark.parametrize("name", NO_PEOPLE, ids=NO_PEOPLE)
def test_smart_crop_no_person(smart_crop: Fn, name: str) -> None:
    result = smart_crop({"image": str(IMAGES / name)})
    assert result["person"] is False and result["crop"] is None
    assert "x" not in result
    # the detector alone scores the toy fish 0.53: the landmark model's pose score is what rejects it
    if result["detector_score"] >= 0.5:
        assert result["pose_score"] < 0.5
    else:
        assert result["pose_score"] is None


def test_smart_crop_clips_a_part_cut_off_by_the_bottom_edge(smart_crop: Fn) -> None:
    # the footballer with everything below the chest cut away: the model places his hips below the edge
    image = _cut("messi5.jpg", 170)
    result = smart_crop({"image": image})
    assert result["person"] is True and "missing" not in result
    assert result["clipped"] == ["hips"]
    hips = [result["keypoints"][k] for k in ("left_hip", "right_hip")]
    assert all(kp["status"] == "clipped" and kp["y"] >= 170 for kp in hips), hips
    # the crop runs from the eyes to the edge the hips lie beyond
    assert result["y"] + result["h"] == 170
    assert result["y"] <= result["keypoints"]["left_eye"]["y"]
    assert _decode(result["crop"]).shape[:2] == (result["h"], result["w"])
    shoulders = smart_crop({"image": image, "lower": "shoulders"})
    assert shoulders["clipped"] == [] and shoulders["y"] + shoulders["h"] < 170


def test_smart_crop_waist_up_portrait_is_clipped_not_missing(smart_crop: Fn) -> None:
    # the astronaut photo ends at her waist: both hips are placed a few pixels below the bottom edge with
    # visibility and presence above 0.5 (what made the old rule answer "missing: hips")
    result = smart_crop({"image": str(LABELLED / "astronaut.png")})
    assert result["person"] is True and result["clipped"] == ["hips"] and "missing" not in result
    for name in ("left_hip", "right_hip"):
        kp = result["keypoints"][name]
        assert kp["status"] == "clipped" and result["height"] <= kp["y"] < 1.2 * result["height"], kp
        assert kp["visibility"] >= 0.5 and kp["presence"] >= 0.5, kp
    assert result["y"] + result["h"] == result["height"]  # runs to the bottom edge
    eyes = [result["keypoints"][k]["y"] for k in ("left_eye", "right_eye")]
    assert result["y"] < min(eyes) and result["keypoints"]["left_eye"]["status"] == "visible"
    assert result["w"] < result["width"]


def test_smart_crop_hidden_part_inside_the_photo_is_missing(smart_crop: Fn) -> None:
    # the cameraman's knees lie inside the photo under his long coat: the model places them there (presence
    # >= 0.9) but scores them not visible, so a crop down to the knees is refused, not guessed
    result = smart_crop({"image": str(LABELLED / "camera.png"), "lower": "knees"})
    assert result["person"] is True and result["crop"] is None and "x" not in result
    assert result["missing"] == ["knees"] and result["clipped"] == []
    for name in ("left_knee", "right_knee"):
        kp = result["keypoints"][name]
        assert kp["status"] == "hidden" and kp["visibility"] < 0.5 and kp["presence"] >= 0.5, kp
        assert 0 <= kp["y"] < result["height"]
    # his hips are visible: eyes to hips is cropped
    hips = smart_crop({"image": str(LABELLED / "camera.png")})
    assert hips["crop"] is not None and hips["clipped"] == [] and "missing" not in hips


def _png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def _height(image: np.ndarray, rows: int) -> np.ndarray:
    """``image`` scaled to ``rows`` rows."""
    return cv2.resize(image, (round(image.shape[1] * rows / image.shape[0]), rows), interpolation=cv2.INTER_AREA)


def _side_by_side(*images: np.ndarray) -> np.ndarray:
    height = max(i.shape[0] for i in images)
    padded = []
    for image in images:
        canvas = np.full((height, image.shape[1], 3), 128, np.uint8)
        canvas[: image.shape[0]] = image
        padded.append(canvas)
    return np.hstack(padded)


def _box(result: dict[str, Any]) -> tuple[int, int, int, int]:
    return result["x"], result["y"], result["w"], result["h"]


def test_smart_crop_person_largest_and_most_confident(smart_crop: Fn) -> None:
    # basketball2: the man on the left scores higher with the detector, the man on the right (nearer) is larger
    photo = str(IMAGES / "basketball2.png")
    largest = smart_crop({"image": photo})
    confident = smart_crop({"image": photo, "person": "most_confident"})
    assert largest["person_mode"] == "largest" and largest["people_count"] == confident["people_count"] == 2
    cands = largest["candidates"]
    chosen, other = cands[largest["selected"]], cands[confident["selected"]]
    assert largest["selected"] != confident["selected"]
    assert chosen["area"] > other["area"] and other["detector_score"] > chosen["detector_score"]
    assert largest["x"] > 320 > confident["x"] + confident["w"]  # right man, left man
    assert largest["detector_score"] == chosen["detector_score"]
    # a composite where the difference is large: a full-size footballer beside a half-size copy of him
    messi = _imread("messi5.jpg")
    photo2 = _png(_side_by_side(_height(messi, 171), messi))
    big = smart_crop({"image": photo2})
    assert big["people_count"] == 2 and big["x"] > _height(messi, 171).shape[1]
    with pytest.raises(ValueError, match="person must be one of"):
        smart_crop({"image": photo, "person": "tallest"})


@pytest.mark.parametrize(
    ("layout", "count"),
    [("messi-x3", 3), ("astronaut-x2", 2), ("messi-and-cameraman", 2), ("basketball2", 2)],
    ids=["messi-x3", "astronaut-x2", "messi-and-cameraman", "basketball2"],
)
def test_smart_crop_all_finds_each_person_once(smart_crop: Fn, layout: str, count: int) -> None:
    messi, astronaut = _imread("messi5.jpg"), cv2.imread(str(LABELLED / "astronaut.png"))
    camera = cv2.imread(str(LABELLED / "camera.png"))
    image = {
        "messi-x3": lambda: _side_by_side(messi, messi, messi),
        "astronaut-x2": lambda: _side_by_side(astronaut, astronaut),
        "messi-and-cameraman": lambda: _side_by_side(_height(messi, 512), camera),
        "basketball2": lambda: _imread("basketball2.png"),
    }[layout]()
    result = smart_crop({"image": _png(image), "person": "all"})
    people = result["people"]
    assert result["person"] is True and result["people_count"] == len(people) == count, result["candidates"]
    # one box per person: no two people share a body (their pose boxes barely overlap)
    boxes = [tuple(p["pose_box"]) for p in people]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert _iou(boxes[i], boxes[j]) < 0.3, (boxes[i], boxes[j])
    # every extra detection of an already counted person is reported as its duplicate, not dropped silently
    dups = [c for c in result["candidates"] if c["duplicate_of"] is not None]
    assert all(result["candidates"][c["duplicate_of"]]["confirmed"] for c in dups)
    for person in people:
        assert person["confirmed"] and person["pose_score"] >= 0.5 and person["detector_score"] >= 0.5
        assert _decode(person["crop"]).shape[:2] == (person["h"], person["w"])


def test_smart_crop_mirrored_photo_gives_the_mirrored_box(smart_crop: Fn) -> None:
    messi = _imread("messi5.jpg")
    plain = smart_crop({"image": _png(messi)})
    mirrored = smart_crop({"image": _png(messi[:, ::-1].copy())})
    x, y, w, h = _box(plain)
    flipped = (plain["width"] - x - w, y, w, h)
    assert _iou(flipped, _box(mirrored)) > 0.8, (flipped, _box(mirrored))


def test_smart_crop_all_writes_numbered_files(smart_crop: Fn, tmp_path: Path) -> None:
    out = tmp_path / "people.jpg"
    result = smart_crop({"image": str(IMAGES / "basketball2.png"), "person": "all", "output_path": str(out)})
    paths = [p["output_path"] for p in result["people"]]
    assert paths == [str(tmp_path / "people.0.jpg"), str(tmp_path / "people.1.jpg")]
    for person in result["people"]:
        assert _decode(Path(person["output_path"]).read_bytes()).shape[:2] == (person["h"], person["w"])


def test_smart_crop_output_path_and_format(smart_crop: Fn, tmp_path: Path) -> None:
    out = tmp_path / "crop.jpg"
    result = smart_crop({"image": str(IMAGES / "messi5.jpg"), "output_path": str(out), "format": "jpeg"})
    assert result["output_path"] == str(out) and result["crop"] is None
    assert out.read_bytes()[:3] == b"\xff\xd8\xff"
    assert _decode(out.read_bytes()).shape[:2] == (result["h"], result["w"])
    padded = smart_crop({"image": str(IMAGES / "messi5.jpg"), "padding": 0.3})
    assert padded["w"] * padded["h"] > result["w"] * result["h"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"upper": "ears"}, "unknown body part"),
        ({"upper": "hips", "lower": "eyes"}, "below"),
        ({"padding": -1}, "padding"),
        ({"image": b"not an image"}, "not a decodable image"),
        ({"image": "/nonexistent/photo.jpg"}, "cannot read"),
        ({"image": 42}, "must be image bytes"),
    ],
    ids=["unknown-part", "upper-below-lower", "bad-padding", "not-an-image", "missing-file", "wrong-type"],
)
def test_smart_crop_bad_params(smart_crop: Fn, args: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        smart_crop({"image": str(IMAGES / "messi5.jpg"), **args})


def test_smart_crop_reports_model_cache_use(smart_crop: Fn) -> None:
    smart_crop({"image": str(IMAGES / "basketball2.png")})
    models.take_activation_info()
    smart_crop({"image": str(IMAGES / "basketball2.png")})
    info = models.take_activation_info()
    assert info["model_cache"] == "hit"
    assert [Path(m["url"]).name for m in info["models"]] == [
        "pose_detection.tflite",
        "pose_landmark_full.tflite",
    ]
    assert info["timings"]["pose_ms"] > 0
    assert any(url.endswith("pose_landmark_full.tflite") for url in models.held())


def test_detector_separates_two_people(smart_crop: Fn) -> None:
    import blazepose  # functions/_lib, on sys.path since the smart_crop fixture loaded the function

    folder = FUNCTIONS / "models"
    detector = models.load(str(folder / "pose_detection.tflite"))
    people = blazepose.detect(detector, _imread("basketball2.png"))
    assert len(people) == 2 and people[0].score >= people[1].score >= 0.5
    hips_x = sorted(float(p.keypoints[0][0]) for p in people)
    assert hips_x[0] < 200 < 450 < hips_x[1]  # the man on the left and the man on the right


# --- body_crop v1 -------------------------------------------------------------------------------------------


def test_haar_crop_differs_from_smart_crop(haar_crop: Fn, smart_crop: Fn) -> None:
    haar = haar_crop({"image": str(IMAGES / "messi5.jpg")})
    smart = smart_crop({"image": str(IMAGES / "messi5.jpg")})
    assert haar["person"] is True and haar["method"] == "haar"
    box_haar = (haar["x"], haar["y"], haar["w"], haar["h"])
    box_smart = (smart["x"], smart["y"], smart["w"], smart["h"])
    # both see the same man, from the eyes down, but only the landmarks follow his outstretched arms
    assert 0.2 < _iou(box_haar, box_smart) < 0.8, (box_haar, box_smart)
    fx, fy, fw, fh = haar["face"]
    eyes = smart["keypoints"]["left_eye"]
    assert fx <= eyes["x"] <= fx + fw and fy <= eyes["y"] <= fy + fh
    assert _decode(haar["crop"]).shape[:2] == (haar["h"], haar["w"])


def test_haar_crop_no_face_and_cut_photo(haar_crop: Fn) -> None:
    assert haar_crop({"image": str(IMAGES / "fruits.jpg")}) | {"height": 0} == {
        "person": False,
        "crop": None,
        "method": "haar",
        "width": 512,
        "height": 0,
        "upper": "eyes",
        "lower": "hips",
    }
    cut = haar_crop({"image": _cut("basketball1.png", 200)})
    assert cut["person"] is True and cut["crop"] is None and cut["missing"] == ["hips"]
    with pytest.raises(ValueError, match="unknown body part"):
        haar_crop({"image": str(IMAGES / "messi5.jpg"), "lower": "tail"})


# --- auto_tag -----------------------------------------------------------------------------------------------


def test_auto_tag_footballer(auto_tag: Fn) -> None:
    result = auto_tag({"image": str(IMAGES / "messi5.jpg"), "tags": ["created-with-minifaas"]})
    assert result["labels"][0]["label"] == "soccer ball"
    assert result["person"] is True
    assert result["tags"][:1] == ["soccer ball"]
    assert {"person", "created-with-minifaas"} <= set(result["tags"])
    scores = [label["score"] for label in result["labels"]]
    assert scores == sorted(scores, reverse=True) and min(scores) >= 0.05 and len(scores) <= 5


def test_auto_tag_fruit_and_params(auto_tag: Fn) -> None:
    result = auto_tag({"image": str(IMAGES / "fruits.jpg")})
    assert {"orange", "lemon"} <= set(result["tags"]) and "person" not in result["tags"]
    one = auto_tag({"image": str(IMAGES / "fruits.jpg"), "top_k": 1, "person": True, "tags": ["x", "x"]})
    assert len(one["labels"]) == 1 and one["tags"] == [one["labels"][0]["label"], "person", "x"]
    assert "person_score" not in one  # the caller knew: the pose models were not run
    with pytest.raises(ValueError, match="top_k"):
        auto_tag({"image": str(IMAGES / "fruits.jpg"), "top_k": 0})


def test_auto_tag_min_score_default_drops_the_guesses(auto_tag: Fn) -> None:
    messi = auto_tag({"image": str(IMAGES / "messi5.jpg"), "person": False})
    assert messi["min_score"] == 0.15 and [t["label"] for t in messi["labels"]] == ["soccer ball"]
    lenient = auto_tag({"image": str(IMAGES / "messi5.jpg"), "person": False, "min_score": 0.05})
    assert [t["label"] for t in lenient["labels"]][:2] == ["soccer ball", "rugby ball"]
    # a toy fish: ImageNet has no class for it, and its guesses ("table lamp" 0.13) stay out
    fish = auto_tag({"image": str(IMAGES / "HappyFish.jpg"), "person": False})
    assert fish["labels"] == [] and fish["tags"] == []


def test_auto_tag_tags_are_unique_and_duplicate_classes_add_up(auto_tag: Fn) -> None:
    # ImageNet names classes 836 and 837 both "sunglasses" (and two classes "missile")
    names = json.loads((FUNCTIONS / "models" / "imagenet_labels.json").read_text())
    assert names[836] == names[837] == "sunglasses"
    photo = str(LABELLED / "astronaut.png")
    result = auto_tag({"image": photo, "vocabulary": "garments", "top_k": 100, "min_score": 0, "person": False})
    labels = [t["label"] for t in result["labels"]]
    assert len(labels) == len(set(labels)) == len(result["tags"]) and "sunglasses" in labels
    # the merged score is the sum of both classes' probabilities, as the model gives them
    spec = importlib.util.spec_from_file_location("_auto_tag_module", FUNCTIONS / "auto_tag" / "__main__.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    classifier = models.load(str(FUNCTIONS / "models" / "efficientnet_lite0_int8.tflite"))
    (probs,) = module.blazepose.run(classifier, [module.classifier_input(cv2.imread(photo))])
    merged = next(t["score"] for t in result["labels"] if t["label"] == "sunglasses")
    assert merged == round(float(probs[0, 836] + probs[0, 837]), 4)
    # and only garment classes were considered
    garment_names = {names[i] for i in module.GARMENT_CLASSES}
    assert set(labels) <= garment_names and len(labels) == len(garment_names)


def test_auto_tag_every_tag_carries_its_score(auto_tag: Fn) -> None:
    found = auto_tag({"image": str(IMAGES / "messi5.jpg"), "tags": ["spring-2025", "soccer ball"]})
    assert found["tags"] == ["soccer ball", "person", "spring-2025"]  # the caller's duplicate is dropped
    scores = found["tag_scores"]
    assert scores["soccer ball"] == found["labels"][0]["score"] >= 0.15
    assert scores["person"] == found["person_score"] >= 0.5
    assert scores["spring-2025"] is None  # the caller's own tag: nobody scored it
    told = auto_tag({"image": str(IMAGES / "messi5.jpg"), "person": True, "person_score": 0.97})
    assert told["tag_scores"]["person"] == 0.97 and "person_score" not in told
    with pytest.raises(ValueError, match="vocabulary"):
        auto_tag({"image": str(IMAGES / "messi5.jpg"), "vocabulary": "clothes"})
    with pytest.raises(ValueError, match="person_score"):
        auto_tag({"image": str(IMAGES / "messi5.jpg"), "person": True, "person_score": 2})


def test_testing_call_leaves_no_folder_behind(tmp_path: Path) -> None:
    # `minifaas.testing.call` stages bundles in a temporary folder of its own: gone when the process ends
    script = (
        "import sys\n"
        "from minifaas import _inprocess, _testkit, testing\n"
        "assert testing.call(sys.argv[1], {'n': 2}) == {'n': 4}\n"
        "assert testing.call(sys.argv[1], {'n': 2}, in_process=True) == {'n': 4}\n"
        "print(_testkit._kit()[1])\n"
        "print(_inprocess._staging_dir())\n"
    )
    fn = tmp_path / "double.py"
    fn.write_text("def main(args):\n    return {'n': args['n'] * 2}\n")
    proc = subprocess.run([sys.executable, "-c", script, str(fn)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    kit, local = (Path(line) for line in proc.stdout.split())
    assert kit.name.startswith("minifaas-testkit-") and local.name.startswith("minifaas-testing-")
    assert not kit.exists() and not local.exists()


@pytest.mark.parametrize("mode", ["process", "sandbox"])
@pytest.mark.anyio
async def test_deployed_functions_take_host_files_only_under_their_grants(
    image_server: str, tmp_path: Path, mode: str
) -> None:
    """Deployed, a function reads a path only under its read_paths (and says nothing about any other file), writes
    output_path only under its write_paths, and fetches a URL only through the host's guarded fetcher."""
    import os
    import shutil

    import minifaas
    from minifaas.testing import assert_status, assert_success

    granted, out = tmp_path / "granted", tmp_path / "out"
    granted.mkdir()
    out.mkdir()
    for folder in (tmp_path, granted, out):
        folder.chmod(0o777)  # a sandbox runs as an unprivileged uid of its own
    shutil.copy(IMAGES / "messi5.jpg", granted / "p.jpg")
    (granted / "link.jpg").symlink_to("/etc/passwd")
    photo = (IMAGES / "messi5.jpg").read_bytes()
    async with minifaas.Engine() as engine:
        q = await engine.deploy("q", path=FUNCTIONS / "image_quality", isolation=mode, read_paths=[granted])
        assert q["isolation"] == mode
        await engine.deploy("c", path=FUNCTIONS / "body_crop", isolation=mode, read_paths=[granted], write_paths=[out])
        assert_success(await engine.call("q", {"image": str(granted / "p.jpg")}))
        errors = {}
        for image in ("/etc/passwd", "/etc/no-such-file", "file:///etc/passwd", str(granted / "link.jpg")):
            act = await engine.call("q", {"image": image})
            assert_status(act, "application_error", error_contains="read_paths")
            errors[image] = act.result["error"]
        # one message for a file that exists, one that does not, and a link out of the grant: nothing leaks
        assert len(set(errors.values())) == 1, errors
        assert str(os.path.getsize("/etc/passwd")) not in next(iter(errors.values()))
        elsewhere = tmp_path / "elsewhere.jpg"
        act = await engine.call("c", {"image": photo, "output_path": str(elsewhere)})
        assert_status(act, "application_error", error_contains="write_paths")
        assert not elsewhere.exists()
        act = assert_success(await engine.call("c", {"image": photo, "output_path": str(out / "crop.jpg")}))
        assert act.result["output_path"] == str(out / "crop.jpg") and (out / "crop.jpg").stat().st_size > 1000
        by_url = await engine.call("q", {"image": f"{image_server}/messi5.jpg"})
        if mode == "process":
            assert_success(by_url)  # fetched by the host: a loopback server is this machine's, as the caller's
        else:
            assert_status(by_url, "application_error", error_contains="loopback")
