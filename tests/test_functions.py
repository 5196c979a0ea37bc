"""The AI functions on real photos and real models, called in-process.

Each function is imported from its folder the way a bundle would run it (its folder and functions/_lib on
sys.path, the manifest's params and models as default arguments) until ``minifaas.testing.call`` exists.
"""

from __future__ import annotations

import http.server
import importlib.util
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from minifaas_sandbox import models

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = ROOT / "functions"
IMAGES = ROOT / "tests" / "data" / "images"

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
    lenient = quality({"image": path.read_bytes(), "threshold": 10})
    assert lenient["passed"] is True and lenient["threshold"] == 10
    by_url = quality({"image": f"{image_server}/text_defocus.jpg"})
    by_file_url = quality({"image": path.as_uri()})
    assert by_url["score"] == by_file_url["score"] == lenient["score"]
    with pytest.raises(ValueError, match="threshold"):
        quality({"image": str(path), "threshold": 101})


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


def test_smart_crop_refuses_a_part_outside_the_photo(smart_crop: Fn) -> None:
    # the footballer with everything below the chest cut away: his hips are not in the photo
    image = _cut("messi5.jpg", 170)
    result = smart_crop({"image": image})
    assert result["person"] is True and result["crop"] is None
    assert result["missing"] == ["hips"]
    shoulders = smart_crop({"image": image, "lower": "shoulders"})
    assert shoulders["crop"] is not None and shoulders["y"] + shoulders["h"] <= 170


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


def test_testing_call_leaves_no_folder_behind(tmp_path: Path) -> None:
    # `minifaas.testing.call` stages bundles in a temporary folder of its own: gone when the process ends
    script = (
        "import sys\n"
        "from minifaas import testing\n"
        "assert testing.call(sys.argv[1], {'n': 2}) == {'n': 4}\n"
        "print(testing._staging_dir())\n"
    )
    fn = tmp_path / "double.py"
    fn.write_text("def main(args):\n    return {'n': args['n'] * 2}\n")
    proc = subprocess.run([sys.executable, "-c", script, str(fn)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    staged = Path(proc.stdout.strip())
    assert staged.name.startswith("minifaas-testing-")
    assert not staged.exists()
