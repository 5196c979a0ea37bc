"""Two-stage BlazePose (MediaPipe pose detector + full landmark model) on LiteRT, in numpy + cv2 only.

Stage 1, detector (224x224, [-1,1]): letterboxed whole image -> 2254 SSD anchors -> boxes with 4 keypoints
(0 = hip centre, 1 = a point on the circle around the body, 2 = shoulder centre, 3 = upper-body circle).
Stage 2, landmarks (256x256, [0,1]): the rotated square ROI around the body, warped upright, -> 39 points of
which the first 33 are the BlazePose topology; they are mapped back to image pixels with the inverse affine.

Feeding the whole photo to the landmark model gives wrong points: stage 2 needs stage 1's ROI. Interpreters
are passed in (loaded by the caller through ``models.load``); their ``invoke`` is serialised per interpreter
since one LiteRT interpreter must not run on two threads at once.
"""

from __future__ import annotations

import math
import threading
import weakref
from dataclasses import dataclass

import cv2
import numpy as np

DETECTOR_SIZE_PX = 224
LANDMARK_SIZE_PX = 256
DETECTOR_STRIDES = (8, 16, 32)
DETECTOR_ANCHORS_PER_CELL = (2, 2, 6)
DETECTOR_SCORE_CLIP = 100.0
PERSON_SCORE_MIN = 0.5
POSE_SCORE_MIN = 0.5
VISIBLE_MIN = 0.5
NMS_IOU_MIN = 0.3
#: a photo this much longer than wide (or wider than long) is also searched in square tiles
TILE_ASPECT_MIN = 1.2
TILE_OVERLAP_MIN = 0.33
ROI_SCALE = 1.25
NUM_LANDMARKS = 33
LANDMARK_VALUES = 5

#: BlazePose landmark indices of the body parts a crop can be bounded by (left, right), top to bottom
PART_LANDMARKS: dict[str, tuple[int, ...]] = {
    "eyes": (2, 5),
    "nose": (0,),
    "shoulders": (11, 12),
    "elbows": (13, 14),
    "wrists": (15, 16),
    "hips": (23, 24),
    "knees": (25, 26),
    "ankles": (27, 28),
}
#: parts in their order from head to feet
PART_ORDER: tuple[str, ...] = ("eyes", "nose", "shoulders", "elbows", "wrists", "hips", "knees", "ankles")

LANDMARK_NAMES: dict[int, str] = {
    0: "nose",
    2: "left_eye",
    5: "right_eye",
    11: "left_shoulder",
    12: "right_shoulder",
    13: "left_elbow",
    14: "right_elbow",
    15: "left_wrist",
    16: "right_wrist",
    23: "left_hip",
    24: "right_hip",
    25: "left_knee",
    26: "right_knee",
    27: "left_ankle",
    28: "right_ankle",
}

_invoke_locks: weakref.WeakKeyDictionary[object, threading.Lock] = weakref.WeakKeyDictionary()
_invoke_locks_guard = threading.Lock()


def run(interp, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """Run a LiteRT interpreter on ``inputs`` and return copies of all its outputs, one thread at a time."""
    with _invoke_locks_guard:
        lock = _invoke_locks.get(interp)
        if lock is None:
            lock = _invoke_locks[interp] = threading.Lock()
    with lock:
        for detail, value in zip(interp.get_input_details(), inputs, strict=True):
            interp.set_tensor(detail["index"], value)
        interp.invoke()
        return [interp.get_tensor(d["index"]).copy() for d in interp.get_output_details()]


def _anchors() -> np.ndarray:
    """SSD anchor centres (n, 2) in [0,1], fixed size, in the order the detector emits them."""
    centres = []
    for stride, per_cell in zip(DETECTOR_STRIDES, DETECTOR_ANCHORS_PER_CELL, strict=True):
        cells = DETECTOR_SIZE_PX // stride
        ys, xs = np.mgrid[0:cells, 0:cells]
        grid = np.stack([(xs + 0.5) / cells, (ys + 0.5) / cells], axis=-1).reshape(-1, 2)
        centres.append(np.repeat(grid, per_cell, axis=0))
    return np.concatenate(centres).astype(np.float32)


ANCHORS = _anchors()


@dataclass(frozen=True)
class Detection:
    """A person found by the detector, in image pixels."""

    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    keypoints: np.ndarray  # (4, 2): hip centre, body circle point, shoulder centre, upper-body circle point


@dataclass(frozen=True)
class Pose:
    """33 landmarks in image pixels, each with its visibility (not occluded) and presence (in the ROI)."""

    detection: Detection
    points: np.ndarray  # (33, 2) x, y in image pixels
    visibility: np.ndarray  # (33,) in [0, 1]
    presence: np.ndarray  # (33,) in [0, 1]
    pose_score: float  # the landmark model's own "a pose is there" score

    def box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) around the 33 landmarks, clipped to a width x height image: the person's extent."""
        xs = np.clip(self.points[:, 0], 0, width)
        ys = np.clip(self.points[:, 1], 0, height)
        return float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())

    def area(self, width: int, height: int) -> float:
        """Pixels of the photo the person's landmark box covers (what "largest" compares)."""
        x0, y0, x1, y1 = self.box(width, height)
        return (x1 - x0) * (y1 - y0)

    def usable(self, index: int, width: int, height: int, min_score: float = VISIBLE_MIN) -> bool:
        """Whether landmark ``index`` is visible, present and inside a width x height image.

        All three are needed: a hip cut off by the bottom edge can still score visibility 0.8, presence 0.5.
        """
        x, y = self.points[index]
        return bool(
            self.visibility[index] >= min_score
            and self.presence[index] >= min_score
            and 0 <= x < width
            and 0 <= y < height
        )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # float64: exp(100) overflows float32
    return 1.0 / (1.0 + np.exp(-np.clip(np.asarray(x, dtype=np.float64), -DETECTOR_SCORE_CLIP, DETECTOR_SCORE_CLIP)))


def _letterbox(image_bgr: np.ndarray, size: int) -> tuple[np.ndarray, float, int, int]:
    """Resize keeping the aspect ratio onto a black square; returns (square, scale, pad_x, pad_y)."""
    h, w = image_bgr.shape[:2]
    scale = size / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    resized = cv2.resize(image_bgr, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    pad_x, pad_y = (size - nw) // 2, (size - nh) // 2
    square = np.zeros((size, size, 3), dtype=np.uint8)
    square[pad_y : pad_y + nh, pad_x : pad_x + nw] = resized
    return square, scale, pad_x, pad_y


def _iou(a: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x0 = np.maximum(a[0], boxes[:, 0])
    y0 = np.maximum(a[1], boxes[:, 1])
    x1 = np.minimum(a[2], boxes[:, 2])
    y1 = np.minimum(a[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area_a + areas - inter, 1e-9)


def tiles(width: int, height: int) -> list[tuple[int, int, int]]:
    """Square windows (x, y, side) the detector also looks at, besides the whole photo.

    The detector sees a letterboxed 224x224 copy: in a wide photo (several people side by side) each person
    shrinks below what it was trained on and is missed. Squares as high as the photo, overlapping by at least
    TILE_OVERLAP_MIN along the long side, show each person at the scale of a portrait photo.
    """
    long_side, short_side = max(width, height), min(width, height)
    if long_side < TILE_ASPECT_MIN * short_side:
        return []
    step = short_side * (1 - TILE_OVERLAP_MIN)
    count = 1 + math.ceil((long_side - short_side) / step)
    starts = [round(i * (long_side - short_side) / (count - 1)) for i in range(count)]
    if width >= height:
        return [(x, 0, short_side) for x in starts]
    return [(0, y, short_side) for y in starts]


def _decode(detector, image_bgr: np.ndarray, x0: int, y0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores (n,), boxes (n, 4), keypoints (n, 4, 2)) of every anchor, in the pixels of the photo that
    ``image_bgr`` was cut from at (x0, y0)."""
    square, scale, pad_x, pad_y = _letterbox(image_bgr, DETECTOR_SIZE_PX)
    rgb = cv2.cvtColor(square, cv2.COLOR_BGR2RGB).astype(np.float32)
    x = (rgb / 127.5 - 1.0)[None]
    raw_boxes, raw_scores = run(detector, [x])
    scores = _sigmoid(np.clip(raw_scores[0, :, 0], -DETECTOR_SCORE_CLIP, DETECTOR_SCORE_CLIP))
    raw = raw_boxes[0] / DETECTOR_SIZE_PX
    centres = raw[:, 0:2] + ANCHORS
    half = raw[:, 2:4] / 2
    corners = np.concatenate([centres - half, centres + half], axis=0)
    kps = (raw[:, 4:12].reshape(-1, 4, 2) + ANCHORS[:, None, :]).reshape(-1, 2)
    offset = np.array([x0, y0], dtype=np.float32)
    corners_px = _unletterbox(corners, scale, pad_x, pad_y) + offset
    n = scores.shape[0]
    boxes = np.concatenate([corners_px[:n], corners_px[n:]], axis=1)
    kps_px = (_unletterbox(kps, scale, pad_x, pad_y) + offset).reshape(n, 4, 2)
    return scores, boxes, kps_px


def detect(detector, image_bgr: np.ndarray, *, min_score: float = PERSON_SCORE_MIN) -> list[Detection]:
    """All people scoring at least ``min_score``, best first.

    The detector runs on the whole photo and on the square ``tiles`` of a wide or tall one; weighted NMS over
    all their anchors (in photo pixels) merges the anchors, and the views, that see the same person. With
    ``min_score=0`` the best anchor is always returned, so a caller can report how far from a person it was.
    """
    height, width = image_bgr.shape[:2]
    views = [_decode(detector, image_bgr, 0, 0)]
    for x0, y0, side in tiles(width, height):
        views.append(_decode(detector, image_bgr[y0 : y0 + side, x0 : x0 + side], x0, y0))
    scores = np.concatenate([v[0] for v in views])
    boxes = np.concatenate([v[1] for v in views])
    kps = np.concatenate([v[2] for v in views])

    order = np.argsort(-scores)
    order = order[:1] if min_score <= 0 else order[scores[order] >= min_score]
    found: list[Detection] = []
    remaining = order
    while remaining.size:
        best = remaining[0]
        overlap = _iou(boxes[best], boxes[remaining])
        group = remaining[overlap >= NMS_IOU_MIN]
        remaining = remaining[overlap < NMS_IOU_MIN]
        weights = scores[group][:, None]
        box = (boxes[group] * weights).sum(0) / weights.sum()
        kp = (kps[group] * weights[:, :, None]).sum(0) / weights.sum()
        found.append(
            Detection(
                score=float(scores[best]),
                box=(float(box[0]), float(box[1]), float(box[2]), float(box[3])),
                keypoints=kp.astype(np.float32),
            )
        )
    return found


def _unletterbox(points01: np.ndarray, scale: float, pad_x: int, pad_y: int) -> np.ndarray:
    px = points01 * DETECTOR_SIZE_PX
    return np.stack([(px[:, 0] - pad_x) / scale, (px[:, 1] - pad_y) / scale], axis=1).astype(np.float32)


def roi(detection: Detection) -> tuple[float, float, float, float]:
    """The landmark model's square ROI: (centre x, centre y, side, rotation in radians), in image pixels."""
    (x0, y0), (x1, y1) = detection.keypoints[0], detection.keypoints[1]
    side = 2.0 * math.hypot(x1 - x0, y1 - y0) * ROI_SCALE
    rotation = math.pi / 2 - math.atan2(-(y1 - y0), x1 - x0)
    rotation = (rotation + math.pi) % (2 * math.pi) - math.pi
    return float(x0), float(y0), side, rotation


def _crop_to_image(cx: float, cy: float, side: float, rotation: float) -> np.ndarray:
    """2x3 affine mapping landmark-crop pixels to image pixels."""
    k = side / LANDMARK_SIZE_PX
    c, s = math.cos(rotation) * k, math.sin(rotation) * k
    half = LANDMARK_SIZE_PX / 2
    # image = R * k * (crop - half) + centre, with R a rotation in image (y-down) coordinates
    return np.array([[c, -s, cx - c * half + s * half], [s, c, cy - s * half - c * half]], dtype=np.float64)


def landmarks(landmarker, image_bgr: np.ndarray, detection: Detection) -> Pose:
    """Run the landmark model on the detection's ROI and map its 33 points back to image pixels."""
    to_image = _crop_to_image(*roi(detection))
    to_crop = cv2.invertAffineTransform(to_image)
    crop = cv2.warpAffine(
        image_bgr,
        to_crop,
        (LANDMARK_SIZE_PX, LANDMARK_SIZE_PX),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(0, 0, 0),
    )
    x = (cv2.cvtColor(crop, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0)[None]
    outputs = run(landmarker, [x])
    raw = outputs[0].reshape(-1, LANDMARK_VALUES)[:NUM_LANDMARKS]
    flag = float(outputs[1].ravel()[0])
    homog = np.concatenate([raw[:, 0:2], np.ones((NUM_LANDMARKS, 1), np.float32)], axis=1)
    points = homog @ to_image.T
    # the pose flag leaves this model already through a sigmoid (0.9997 on a footballer, 0.01 on a toy fish)
    return Pose(
        detection=detection,
        points=points.astype(np.float32),
        visibility=_sigmoid(raw[:, 3]),
        presence=_sigmoid(raw[:, 4]),
        pose_score=flag,
    )


@dataclass(frozen=True)
class Person:
    """What the two stages say about the most confident person in a photo."""

    detector_score: float
    pose_score: float | None  # None when the detector found no one, so the landmark model did not run
    pose: Pose | None  # None when there is no person


def find_person(detector, landmarker, image_bgr: np.ndarray) -> Person:
    """The most confident person's pose, or ``pose=None`` when there is no person.

    A person needs a detector score of at least PERSON_SCORE_MIN and the landmark model's confirmation
    (pose score >= POSE_SCORE_MIN): the detector alone scores some objects (a toy fish) above 0.5.
    """
    best = detect(detector, image_bgr, min_score=0.0)
    score = best[0].score if best else 0.0
    if score < PERSON_SCORE_MIN:
        return Person(detector_score=score, pose_score=None, pose=None)
    pose = landmarks(landmarker, image_bgr, best[0])
    confirmed = pose.pose_score >= POSE_SCORE_MIN
    return Person(detector_score=score, pose_score=pose.pose_score, pose=pose if confirmed else None)
