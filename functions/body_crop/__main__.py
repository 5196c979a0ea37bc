"""body_crop v1: rule-based body crop: OpenCV's Haar frontal-face cascade, then fixed body proportions.

The most confident frontal face fixes the scale: the eye line sits EYE_LINE_FRACTION down the face box and
every body part lies a fixed number of face heights below it (hips about 3.5: the face box extended down by
about three face heights), as wide as a fixed number of face widths, centred on the face. It cannot see where
the body really is (a leaning or turned person, arms out): ``smart_body_crop`` (BlazePose) is its successor.
Same parameters and output keys where meaningful, plus ``method: "haar"`` and the ``face`` box.
"""

from __future__ import annotations

import time

import crop_params
import cv2
import image_input
from minifaas_sandbox import models

CASCADE_FILE = "haarcascade_frontalface_default.xml"
HAAR_SCALE_FACTOR = 1.1
HAAR_MIN_NEIGHBORS = 5
HAAR_MIN_FACE_PX = 20
HAAR_MAX_SIDE_PX = 800
EYE_LINE_FRACTION = 0.38
#: part -> (face heights below the eye line, width in face widths), head to feet
PROPORTIONS: dict[str, tuple[float, float]] = {
    "eyes": (0.0, 1.0),
    "nose": (0.25, 1.0),
    "shoulders": (1.2, 3.0),
    "elbows": (2.4, 3.4),
    "wrists": (3.4, 3.4),
    "hips": (3.5, 2.4),
    "knees": (5.2, 2.2),
    "ankles": (7.0, 2.0),
}
PART_ORDER = tuple(PROPORTIONS)


def best_face(cascade, image) -> tuple[tuple[int, int, int, int], float] | None:
    """The frontal face the cascade is most confident about, with its confidence, or None."""
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    # the cascade's cost grows with the pixel count: search a large photo at a bounded size
    scale = min(1.0, HAAR_MAX_SIDE_PX / max(grey.shape[:2]))
    if scale < 1.0:
        grey = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    faces, _levels, weights = cascade.detectMultiScale3(
        grey,
        scaleFactor=HAAR_SCALE_FACTOR,
        minNeighbors=HAAR_MIN_NEIGHBORS,
        minSize=(HAAR_MIN_FACE_PX, HAAR_MIN_FACE_PX),
        outputRejectLevels=True,
    )
    if len(faces) == 0:
        return None
    i = max(range(len(faces)), key=lambda k: float(weights[k]))
    x, y, w, h = (round(int(v) / scale) for v in faces[i])
    return (x, y, w, h), float(weights[i])


def body_box(
    face: tuple[int, int, int, int], upper: str, lower: str, padding: float, width: int, height: int
) -> tuple[tuple[int, int, int, int] | None, list[str]]:
    """((x, y, w, h) of the span upper..lower predicted from the face box, clipped to the image; or None and
    the parts predicted to lie outside the photo)."""
    fx, fy, fw, fh = face
    eye_y = fy + EYE_LINE_FRACTION * fh
    centre_x = fx + fw / 2
    span = PART_ORDER[PART_ORDER.index(upper) : PART_ORDER.index(lower) + 1]
    y0 = eye_y + PROPORTIONS[upper][0] * fh
    y1 = eye_y + PROPORTIONS[lower][0] * fh
    outside = [part for part, y in ((upper, y0), (lower, y1)) if not 0 <= y < height]
    if outside:
        return None, outside
    # a single part (eyes to eyes) still gets a box one face high
    if y1 - y0 < fh:
        y0, y1 = (y0 + y1 - fh) / 2, (y0 + y1 + fh) / 2
    half_w = max(PROPORTIONS[p][1] for p in span) * fw / 2
    pad_x, pad_y = 2 * half_w * padding, (y1 - y0) * padding
    left = max(0, round(centre_x - half_w - pad_x))
    right = min(width, round(centre_x + half_w + pad_x))
    top = max(0, round(y0 - pad_y))
    bottom = min(height, round(y1 + pad_y))
    if right - left < 1 or bottom - top < 1:
        return None, [upper, lower]
    return (left, top, right - left, bottom - top), []


def main(args: dict) -> dict:
    if "image" not in args:
        raise ValueError("missing parameter 'image' (bytes, a path or a URL)")
    upper, lower, padding, fmt = crop_params.parse(args, PART_ORDER)
    image = image_input.read_image(args["image"])
    cascade_url = args.get("cascade_url") or cv2.data.haarcascades + CASCADE_FILE
    cascade = models.load(cascade_url, sha256=args.get("cascade_sha256"), loader="cascade")
    t0 = time.perf_counter()
    found = best_face(cascade, image)
    models.report_timing("face_ms", (time.perf_counter() - t0) * 1000)
    height, width = image.shape[:2]
    base = {"method": "haar", "width": width, "height": height, "upper": upper, "lower": lower}
    if found is None:
        return {"person": False, "crop": None, **base}
    face, confidence = found
    box, missing = body_box(face, upper, lower, padding, width, height)
    result = {"person": True, "face": list(face), "face_score": round(confidence, 3), **base}
    if box is None:
        # the predicted part lies outside the photo: refuse rather than crop something else
        return {**result, "crop": None, "missing": missing}
    x, y, w, h = box
    result.update({"x": x, "y": y, "w": w, "h": h})
    cropped = image[y : y + h, x : x + w]
    result.update(image_input.output_fields(cropped, args, fmt))
    return result
