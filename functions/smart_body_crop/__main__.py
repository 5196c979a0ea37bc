"""smart_body_crop: crop a person from ``upper`` to ``lower`` body part with two-stage BlazePose on LiteRT.

The detector finds people, the landmark model places 33 points on each (``blazepose.py``, ``pose_people.py``);
the crop spans the keypoints of every part from ``upper`` down to ``lower`` (horizontally) and from the
``upper`` keypoints to the ``lower`` keypoints (vertically), grown by ``padding`` and cut at the photo's edges.

Which person (``person`` param):

- ``"largest"`` (default): the confirmed pose whose landmark box covers most of the photo;
- ``"most_confident"``: the confirmed pose with the highest detector score;
- ``"all"``: every confirmed pose, one entry each in ``people`` (box, crop, scores, clipped/missing parts).

A pose is confirmed when the detector scores it at least 0.5 and the landmark model's own pose flag is at
least 0.5 (the detector alone scores a toy fish 0.53). Overlapping anchors are merged by the detector's
weighted NMS, and a confirmed pose whose landmark box overlaps a more confident one by half or more is the same
person (``duplicate_of``), never a second one. ``candidates`` lists every detection with the scores behind the
decision.

Visible, clipped, missing. BlazePose gives each landmark a position (also outside the photo: the model
extrapolates the body from what it sees), a *visibility* (the likelihood that the point is in the image and not
occluded) and a *presence* (the likelihood that it lies inside the image at all; both in [0, 1] after a
sigmoid). For each keypoint of a requested part:

- inside the photo with visibility >= 0.5: **visible**;
- placed outside the photo: **clipped**, whatever its scores: a cut-off point cannot look visible, and
  its presence only says how sure the model is that it is cut off (a waist-up portrait's hips score
  visibility 0.8-0.9, presence 0.8-0.9, a few pixels below the bottom edge);
- inside the photo with visibility < 0.5: **hidden** (occluded, or the model is unsure).

A part is visible when one of its keypoints (left, right) is, else clipped when one is outside the photo, else
missing. A clipped ``upper`` or ``lower`` part makes the crop run to that edge and is listed in ``clipped``;
a missing one refuses the crop (``crop: None``, ``missing: [...]``), never a crop of the wrong region.
"""

from __future__ import annotations

import os
import time

import blazepose
import crop_params
import image_input
import numpy as np
import pose_people
from minifaas_sandbox import models

VISIBLE_MIN = 0.5
PERSON_MODES = ("largest", "most_confident", "all")
DEFAULT_PERSON_MODE = "largest"
#: one part (e.g. eyes to eyes) still gets a box: at least this fraction of the pose's own height
MIN_SIDE_FRACTION = 0.1
ROUND_PX = 1
ROUND_SCORE = 3


def parse_params(args: dict) -> tuple[str, str, float, str]:
    """(upper, lower, padding, format) validated; ValueError with the reason otherwise."""
    return crop_params.parse(args, blazepose.PART_ORDER)


def parse_person(args: dict) -> str:
    mode = args.get("person", DEFAULT_PERSON_MODE)
    if mode not in PERSON_MODES:
        raise ValueError(f"person must be one of {list(PERSON_MODES)}, got {mode!r}")
    return str(mode)


def keypoint_status(pose: blazepose.Pose, index: int, width: int, height: int) -> str:
    """The keypoint's status: visible, clipped or hidden (see the module docstring)."""
    x, y = pose.points[index]
    if not (0 <= x < width and 0 <= y < height):
        return "clipped"
    return "visible" if pose.visibility[index] >= VISIBLE_MIN else "hidden"


def part_status(statuses: list[str]) -> str:
    if "visible" in statuses:
        return "visible"
    return "clipped" if "clipped" in statuses else "missing"


def crop_box(
    pose: blazepose.Pose, upper: str, lower: str, padding: float, width: int, height: int
) -> tuple[tuple[int, int, int, int] | None, dict[str, dict], list[str], list[str]]:
    """((x, y, w, h) or None, keypoints of the span with their status, clipped parts, missing parts)."""
    order = blazepose.PART_ORDER
    span = order[order.index(upper) : order.index(lower) + 1]
    keypoints: dict[str, dict] = {}
    clipped: list[str] = []
    missing: list[str] = []
    for part in span:
        statuses = []
        for i in blazepose.PART_LANDMARKS[part]:
            status = keypoint_status(pose, i, width, height)
            statuses.append(status)
            x, y = pose.points[i]
            keypoints[blazepose.LANDMARK_NAMES[i]] = {
                "x": round(float(x), ROUND_PX),
                "y": round(float(y), ROUND_PX),
                "visibility": round(float(pose.visibility[i]), ROUND_SCORE),
                "presence": round(float(pose.presence[i]), ROUND_SCORE),
                "part": part,
                "status": status,
            }
        status = part_status(statuses)
        if part in (upper, lower):
            if status == "clipped":
                clipped.append(part)
            elif status == "missing":
                missing.append(part)
    if missing:
        return None, keypoints, clipped, missing
    # visible keypoints bound the crop; keypoints outside the photo too, and the clamp below turns them into
    # the edge they lie beyond. Hidden ones (in the photo, not seen) do not: their place is a guess.
    used = [kp for kp in keypoints.values() if kp["status"] != "hidden"]
    xs = np.array([kp["x"] for kp in used])
    top = min(kp["y"] for kp in used if kp["part"] == upper)
    bottom = max(kp["y"] for kp in used if kp["part"] == lower)
    min_side = MIN_SIDE_FRACTION * float(np.ptp(pose.points[:, 1]) or height)
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
        return None, keypoints, clipped, [upper, lower]
    return (left, up, right - left, down - up), keypoints, clipped, []


def _scores(candidate: pose_people.Candidate, width: int, height: int) -> dict:
    x0, y0, x1, y1 = candidate.pose.box(width, height)
    return {
        "detector_score": round(candidate.detection.score, ROUND_SCORE),
        "pose_score": round(candidate.pose.pose_score, ROUND_SCORE),
        "area": round((x1 - x0) * (y1 - y0)),
        "pose_box": [round(x0), round(y0), round(x1 - x0), round(y1 - y0)],
        "body_to_box": round(candidate.body_to_box, 1),
        "confirmed": candidate.confirmed,
        "duplicate_of": candidate.duplicate_of,
    }


def _numbered(path: str, index: int) -> str:
    stem, ext = os.path.splitext(path)
    return f"{stem}.{index}{ext}"


def _crop_person(
    image: np.ndarray, pose: blazepose.Pose, args: dict, fmt: str, output_path: str | None, spec: tuple
) -> dict:
    upper, lower, padding = spec
    height, width = image.shape[:2]
    box, keypoints, clipped, missing = crop_box(pose, upper, lower, padding, width, height)
    entry: dict = {"clipped": clipped, "keypoints": keypoints}
    if box is None:
        return {**entry, "crop": None, "missing": missing}
    x, y, w, h = box
    entry.update({"x": x, "y": y, "w": w, "h": h})
    out_args = {**args, "output_path": output_path} if output_path else {"format": fmt}
    entry.update(image_input.output_fields(image[y : y + h, x : x + w], out_args, fmt))
    return entry


def main(args: dict) -> dict:
    if "image" not in args:
        raise ValueError("missing parameter 'image' (bytes, a path or a URL)")
    upper, lower, padding, fmt = parse_params(args)
    mode = parse_person(args)
    t0 = time.perf_counter()
    image = image_input.read_image(args["image"])
    detector = models.load(args["detector_url"], sha256=args.get("detector_sha256"))
    landmarker = models.load(args["landmark_url"], sha256=args.get("landmark_sha256"))
    t1 = time.perf_counter()
    candidates, best_score = pose_people.find_people(detector, landmarker, image)
    t2 = time.perf_counter()
    models.report_timing("prepare_ms", (t1 - t0) * 1000)
    models.report_timing("pose_ms", (t2 - t1) * 1000)
    height, width = image.shape[:2]
    confirmed = [i for i, c in enumerate(candidates) if c.confirmed]
    best_pose = max((c.pose.pose_score for c in candidates), default=None)
    base = {
        "detector_score": round(best_score, ROUND_SCORE),
        "pose_score": None if best_pose is None else round(best_pose, ROUND_SCORE),
        "width": width,
        "height": height,
        "upper": upper,
        "lower": lower,
        "person_mode": mode,
        "people_count": len(confirmed),
        "candidates": [_scores(c, width, height) for c in candidates],
    }
    if not confirmed:
        return {"person": False, "crop": None, **base}
    spec = (upper, lower, padding)
    output_path = args.get("output_path") or None
    if mode == "all":
        people = []
        for n, i in enumerate(confirmed):
            c = candidates[i]
            path = _numbered(output_path, n) if output_path else None
            entry = _crop_person(image, c.pose, args, fmt, path, spec)
            people.append({"candidate": i, **_scores(c, width, height), **entry})
        models.report_timing("crop_ms", (time.perf_counter() - t2) * 1000)
        return {"person": True, "crop": None, "people": people, **base}
    if mode == "largest":
        chosen = max(confirmed, key=lambda i: candidates[i].pose.area(width, height))
    else:
        chosen = max(confirmed, key=lambda i: candidates[i].detection.score)
    c = candidates[chosen]
    entry = _crop_person(image, c.pose, args, fmt, output_path, spec)
    result = {
        "person": True,
        **base,
        "selected": chosen,
        "detector_score": round(c.detection.score, ROUND_SCORE),
        "pose_score": round(c.pose.pose_score, ROUND_SCORE),
        **entry,
    }
    models.report_timing("crop_ms", (time.perf_counter() - t2) * 1000)
    return result
