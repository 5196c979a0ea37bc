"""Several people in one photo: every detection checked by the landmark model, each person counted once.

``find_people`` runs BlazePose's two stages (``blazepose.py``) on every detection the detector scores at least
0.5 (its weighted NMS already merges overlapping anchors, also across the square tiles of a wide photo) and
says of each whether it is a confirmed person, an implausible one, or a duplicate of a confirmed one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from blazepose import PERSON_SCORE_MIN, POSE_SCORE_MIN, Detection, Pose, detect, landmarks, roi

#: two confirmed poses whose head and torso landmarks lie this close (median distance over the smaller pose's
#: torso size) are one person that two detector anchor groups led the landmark model to
POSE_DUPLICATE_DISTANCE_MAX = 0.25
#: the detector's box is around the head, its body circle around the whole body: a body is about 7.5 heads
#: tall, and a waist-up portrait, whose body the model extrapolates, reaches 13 boxes. A body circle of more than
#: 20 boxes is a pattern in a crowd or a texture, not a person (seen: 25-41 on a stadium crowd, pose flag 0.5-0.8)
BODY_TO_BOX_MAX = 20.0
#: nose, eyes, shoulders, hips: compared where both poses see them inside the photo
ANCHOR_LANDMARKS = (0, 2, 5, 11, 12, 23, 24)


@dataclass(frozen=True)
class Candidate:
    """One detector hit (after NMS) and what the landmark model said about it."""

    detection: Detection
    pose: Pose
    confirmed: bool  # pose_score >= POSE_SCORE_MIN, body_to_box <= BODY_TO_BOX_MAX, not a duplicate
    duplicate_of: int | None  # index of the confirmed candidate it duplicates
    body_to_box: float  # the ROI's side over the detector box's side


def body_to_box(detection: Detection) -> float:
    """The landmark ROI's side over the detector box's (longer) side."""
    x0, y0, x1, y1 = detection.box
    return roi(detection)[2] / max(x1 - x0, y1 - y0, 1e-6)


def find_people(detector, landmarker, image_bgr: np.ndarray) -> tuple[list[Candidate], float]:
    """Every person the detector scores at least PERSON_SCORE_MIN, each checked by the landmark model; and
    the best detector score seen (below PERSON_SCORE_MIN when the list is empty).

    Confirmed: the landmark model's pose flag is at least POSE_SCORE_MIN, the body circle is at most
    BODY_TO_BOX_MAX detector boxes across, and it is not a duplicate.

    Weighted NMS in ``detect`` already merges overlapping anchors; a second pass here marks a confirmed pose
    as a duplicate when its nose, shoulders and hips lie within POSE_DUPLICATE_DISTANCE_MAX torso sizes of a
    more confident one's: two anchor groups (one box around the head, one around the whole body) can survive
    NMS and lead the landmark model to the same body.
    """
    detections = detect(detector, image_bgr, min_score=PERSON_SCORE_MIN)
    if not detections:
        best = detect(detector, image_bgr, min_score=0.0)
        return [], best[0].score if best else 0.0
    found: list[Candidate] = []
    for detection in detections:
        pose = landmarks(landmarker, image_bgr, detection)
        ratio = body_to_box(detection)
        plausible = pose.pose_score >= POSE_SCORE_MIN and ratio <= BODY_TO_BOX_MAX
        duplicate_of = None
        if plausible:
            for index, other in enumerate(found):
                if other.confirmed and same_person(pose, other.pose, image_bgr.shape[:2]):
                    duplicate_of = index
                    break
        confirmed = plausible and duplicate_of is None
        found.append(Candidate(detection, pose, confirmed, duplicate_of, ratio))
    return found, detections[0].score


def torso_size(pose: Pose) -> float:
    """Shoulder centre to hip centre, or the shoulder width when larger (a person seen from the side)."""
    p = pose.points
    shoulders, hips = (p[11] + p[12]) / 2, (p[23] + p[24]) / 2
    return float(max(np.linalg.norm(shoulders - hips), np.linalg.norm(p[11] - p[12]), 1.0))


def same_person(a: Pose, b: Pose, image_shape: tuple[int, int]) -> bool:
    """Whether two poses put the nose, shoulders and hips of one body in the same places."""
    # extrapolated points (outside the photo, or not seen) wander with the ROI: compare the seen ones
    height, width = image_shape
    seen = [i for i in ANCHOR_LANDMARKS if a.usable(i, width, height) and b.usable(i, width, height)]
    idx = seen if len(seen) >= 2 else list(ANCHOR_LANDMARKS)
    distance = float(np.median(np.linalg.norm(a.points[idx] - b.points[idx], axis=1)))
    return distance <= POSE_DUPLICATE_DISTANCE_MAX * min(torso_size(a), torso_size(b))
