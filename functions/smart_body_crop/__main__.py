"""smart_body_crop: crop a person from ``upper`` to ``lower`` body part with two-stage BlazePose on LiteRT.

The detector finds the most confident person, the landmark model places 33 points on them (see
``blazepose.py``); the crop spans the visible keypoints of every part from ``upper`` down to ``lower``
(horizontally) and from the ``upper`` keypoints to the ``lower`` keypoints (vertically), grown by ``padding``.

Outcomes: no person (detector score < 0.5, or the landmark model does not confirm the pose) ->
``{"person": false, "crop": None}``; a requested part not visible on either side ->
``{"person": true, "crop": None, "missing": [...]}``, never a crop of the wrong region. A keypoint counts as
visible when its visibility and its presence are both at least 0.5 and it lies inside the photo.
"""

from __future__ import annotations

import time

import blazepose
import crop_params
import image_input
import numpy as np
from minifaas_sandbox import models

VISIBLE_MIN = 0.5


def parse_params(args: dict) -> tuple[str, str, float, str]:
    """(upper, lower, padding, format) validated; ValueError with the reason otherwise."""
    return crop_params.parse(args, blazepose.PART_ORDER)


def crop_box(
    pose: blazepose.Pose, upper: str, lower: str, padding: float, width: int, height: int
) -> tuple[tuple[int, int, int, int] | None, dict[str, dict], list[str]]:
    """((x, y, w, h) or None, keypoints used, missing parts) for the span ``upper``..``lower`` of ``pose``."""
    order = blazepose.PART_ORDER
    span = order[order.index(upper) : order.index(lower) + 1]
    used: dict[str, dict] = {}
    missing: list[str] = []
    for part in span:
        visible = [i for i in blazepose.PART_LANDMARKS[part] if pose.usable(i, width, height, VISIBLE_MIN)]
        if not visible and part in (upper, lower):
            missing.append(part)
        for i in visible:
            x, y = pose.points[i]
            used[blazepose.LANDMARK_NAMES[i]] = {
                "x": round(float(x), 1),
                "y": round(float(y), 1),
                "visibility": round(float(pose.visibility[i]), 3),
                "presence": round(float(pose.presence[i]), 3),
                "part": part,
            }
    if missing:
        return None, used, missing
    xs = np.array([kp["x"] for kp in used.values()])
    top = min(kp["y"] for kp in used.values() if kp["part"] == upper)
    bottom = max(kp["y"] for kp in used.values() if kp["part"] == lower)
    # one part (e.g. eyes to eyes) still gets a box: at least a tenth of the pose's own size
    min_side = 0.1 * float(np.ptp(pose.points[:, 1]) or height)
    x0, x1 = float(xs.min()), float(xs.max())
    y0, y1 = float(top), float(bottom)
    if x1 - x0 < min_side:
        x0, x1 = (x0 + x1 - min_side) / 2, (x0 + x1 + min_side) / 2
    if y1 - y0 < min_side:
        y0, y1 = (y0 + y1 - min_side) / 2, (y0 + y1 + min_side) / 2
    pad_x, pad_y = (x1 - x0) * padding, (y1 - y0) * padding
    left = max(0, int(np.floor(x0 - pad_x)))
    right = min(width, int(np.ceil(x1 + pad_x)))
    up = max(0, int(np.floor(y0 - pad_y)))
    down = min(height, int(np.ceil(y1 + pad_y)))
    if right - left < 1 or down - up < 1:
        return None, used, [upper, lower]
    return (left, up, right - left, down - up), used, []


def main(args: dict) -> dict:
    if "image" not in args:
        raise ValueError("missing parameter 'image' (bytes, a path or a URL)")
    upper, lower, padding, fmt = parse_params(args)
    t0 = time.perf_counter()
    image = image_input.read_image(args["image"])
    detector = models.load(args["detector_url"], sha256=args.get("detector_sha256"))
    landmarker = models.load(args["landmark_url"], sha256=args.get("landmark_sha256"))
    t1 = time.perf_counter()
    person = blazepose.find_person(detector, landmarker, image)
    t2 = time.perf_counter()
    models.report_timing("pose_ms", (t2 - t1) * 1000)
    height, width = image.shape[:2]
    pose = person.pose
    base = {
        "detector_score": round(person.detector_score, 3),
        "pose_score": None if person.pose_score is None else round(person.pose_score, 3),
        "width": width,
        "height": height,
        "upper": upper,
        "lower": lower,
    }
    if pose is None:
        return {"person": False, "crop": None, **base}
    box, used, missing = crop_box(pose, upper, lower, padding, width, height)
    if box is None:
        return {"person": True, "crop": None, "missing": missing, "keypoints": used, **base}
    x, y, w, h = box
    cropped = image[y : y + h, x : x + w]
    result = {"person": True, "x": x, "y": y, "w": w, "h": h, "keypoints": used, **base}
    result.update(image_input.output_fields(cropped, args, fmt))
    models.report_timing("crop_ms", (time.perf_counter() - t2) * 1000)
    models.report_timing("prepare_ms", (t1 - t0) * 1000)
    return result
