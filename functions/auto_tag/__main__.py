"""auto_tag: ImageNet labels (EfficientNet-Lite0 int8 on LiteRT) plus a ``person`` tag, plus caller tags.

Tags are, in order: the top ``top_k`` ImageNet labels scoring at least ``min_score``; ``person`` when a person
is in the photo (the ``person`` param when the caller already knows, else the shared BlazePose detector
confirmed by its landmark model); the caller's own ``tags`` (e.g. ``["created-with-minifaas"]``). Duplicates
are dropped.

The classifier sees the photo as it was evaluated on ImageNet: shorter side scaled to 256, centre 224x224
crop, RGB in [0, 255] (the model applies the ImageNet mean/std itself).
"""

from __future__ import annotations

import time

import blazepose
import cv2
import image_input
import numpy as np
from minifaas_sandbox import models

DEFAULT_TOP_K = 5
DEFAULT_MIN_SCORE = 0.05
MAX_TOP_K = 100
CLASSIFIER_SIZE_PX = 224
RESIZE_SHORT_SIDE_PX = 256
PERSON_TAG = "person"


def _params(args: dict) -> tuple[int, float, bool | None, list[str]]:
    top_k = args.get("top_k", DEFAULT_TOP_K)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k must be an integer in [1, {MAX_TOP_K}], got {top_k!r}")
    min_score = args.get("min_score", DEFAULT_MIN_SCORE)
    if isinstance(min_score, bool) or not isinstance(min_score, int | float) or not 0 <= min_score <= 1:
        raise ValueError(f"min_score must be a number in [0, 1], got {min_score!r}")
    person = args.get("person")
    if person is not None and not isinstance(person, bool):
        raise ValueError(f"person must be true, false or absent, got {person!r}")
    tags = args.get("tags") or []
    if isinstance(tags, str) or not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        raise ValueError(f"tags must be a list of non-empty strings, got {tags!r}")
    return top_k, float(min_score), person, tags


def classifier_input(image: np.ndarray) -> np.ndarray:
    """1x224x224x3 float32 RGB in [0, 255]: shorter side to 256, centre crop."""
    h, w = image.shape[:2]
    scale = RESIZE_SHORT_SIDE_PX / min(h, w)
    nw, nh = max(CLASSIFIER_SIZE_PX, round(w * scale)), max(CLASSIFIER_SIZE_PX, round(h * scale))
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    y, x = (nh - CLASSIFIER_SIZE_PX) // 2, (nw - CLASSIFIER_SIZE_PX) // 2
    crop = resized[y : y + CLASSIFIER_SIZE_PX, x : x + CLASSIFIER_SIZE_PX]
    return cv2.cvtColor(crop, cv2.COLOR_BGR2RGB).astype(np.float32)[None]


def classify(classifier, labels: list[str], image: np.ndarray, top_k: int, min_score: float) -> list[dict]:
    """[{label, score}] of the top_k classes scoring at least min_score, best first."""
    (probs,) = blazepose.run(classifier, [classifier_input(image)])
    probs = probs.reshape(-1)
    if probs.shape[0] != len(labels):
        raise ValueError(f"classifier has {probs.shape[0]} classes but the labels file {len(labels)}")
    top = np.argsort(-probs)[:top_k]
    return [{"label": labels[i], "score": round(float(probs[i]), 4)} for i in top if probs[i] >= min_score]


def main(args: dict) -> dict:
    if "image" not in args:
        raise ValueError("missing parameter 'image' (bytes, a path or a URL)")
    top_k, min_score, person, extra_tags = _params(args)
    image = image_input.read_image(args["image"])
    classifier = models.load(args["classifier_url"], sha256=args.get("classifier_sha256"))
    labels = models.load(args["labels_url"], sha256=args.get("labels_sha256"), loader="json")
    t0 = time.perf_counter()
    found = classify(classifier, labels, image, top_k, min_score)
    t1 = time.perf_counter()
    models.report_timing("classify_ms", (t1 - t0) * 1000)
    result: dict = {"labels": found}
    if person is None:
        detector = models.load(args["detector_url"], sha256=args.get("detector_sha256"))
        landmarker = models.load(args["landmark_url"], sha256=args.get("landmark_sha256"))
        t2 = time.perf_counter()
        found_person = blazepose.find_person(detector, landmarker, image)
        models.report_timing("person_ms", (time.perf_counter() - t2) * 1000)
        person = found_person.pose is not None
        result["person_score"] = round(found_person.detector_score, 3)
    tags = [f["label"] for f in found]
    if person:
        tags.append(PERSON_TAG)
    tags.extend(extra_tags)
    result["tags"] = list(dict.fromkeys(tags))
    result["person"] = person
    return result
