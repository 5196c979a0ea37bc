"""auto_tag: ImageNet labels (EfficientNet-Lite0 int8 on LiteRT) plus a ``person`` tag, plus caller tags.

Tags are, in order: the top ``top_k`` ImageNet labels scoring at least ``min_score``; ``person`` when a person
is in the photo (the ``person`` param when the caller already knows, else the shared BlazePose detector
confirmed by its landmark model); the caller's own ``tags`` (e.g. ``["created-with-minifaas"]``). Every tag
appears once: ImageNet names two classes "missile" and two "sunglasses", and a class whose name repeats scores
the sum of its classes' probabilities (the chance that the photo shows that thing). ``tag_scores`` maps each
tag to its score: the classifier's probability, the person detector's score (or the ``person_score`` param),
and None for the caller's own tags, which nobody scored.

``min_score`` defaults to 0.15, chosen on the bundled photos: the right labels score 0.18-0.94 (baboon 0.92,
fox squirrel 0.87, tripod 0.94, orange 0.50 and lemon 0.48, soccer ball 0.63), while the guesses on photos
whose subject ImageNet has no class for (a toy fish, an office, an astronaut) score 0.05-0.13 ("table lamp",
"projector", "lens cap"), and so does the footballer's second label, "rugby ball" (0.08).

``vocabulary="garments"`` restricts the labels to ImageNet's garment and accessory classes (T-shirt, the
sport-jersey class, suit, sweatshirt, jeans, miniskirt, bow tie, sunglasses, helmets ...): the catalog workflow
tags a person's crop with it, so that what they wear is tagged rather than the scene around them.

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
DEFAULT_MIN_SCORE = 0.15
MAX_TOP_K = 100
CLASSIFIER_SIZE_PX = 224
RESIZE_SHORT_SIDE_PX = 256
PERSON_TAG = "person"
VOCABULARIES = ("all", "garments")
#: ImageNet indices of garments and accessories worn or carried by a person (names as in imagenet_labels.json)
GARMENT_CLASSES: tuple[int, ...] = (
    399, 400, 411, 414, 433, 439, 445, 451, 452, 457, 459, 465, 474, 490, 501, 502, 514, 515, 518, 529, 531, 552,
    560, 568, 578, 591, 601, 608, 610, 614, 615, 617, 630, 636, 638, 639, 643, 652, 655, 658, 667, 678, 679, 689,
    697, 735, 748, 770, 774, 775, 793, 796, 806, 808, 824, 834, 836, 837, 841, 842, 869, 879, 887, 893, 903, 906,
)  # fmt: skip


def _params(args: dict) -> tuple[int, float, bool | None, float | None, list[str], str]:
    top_k = args.get("top_k", DEFAULT_TOP_K)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k must be an integer in [1, {MAX_TOP_K}], got {top_k!r}")
    min_score = args.get("min_score", DEFAULT_MIN_SCORE)
    if isinstance(min_score, bool) or not isinstance(min_score, int | float) or not 0 <= min_score <= 1:
        raise ValueError(f"min_score must be a number in [0, 1], got {min_score!r}")
    person = args.get("person")
    if person is not None and not isinstance(person, bool):
        raise ValueError(f"person must be true, false or absent, got {person!r}")
    person_score = args.get("person_score")
    if person_score is not None and (
        isinstance(person_score, bool) or not isinstance(person_score, int | float) or not 0 <= person_score <= 1
    ):
        raise ValueError(f"person_score must be a number in [0, 1] or absent, got {person_score!r}")
    tags = args.get("tags") or []
    if isinstance(tags, str) or not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        raise ValueError(f"tags must be a list of non-empty strings, got {tags!r}")
    vocabulary = args.get("vocabulary", "all")
    if vocabulary not in VOCABULARIES:
        raise ValueError(f"vocabulary must be one of {list(VOCABULARIES)}, got {vocabulary!r}")
    return top_k, float(min_score), person, person_score, tags, str(vocabulary)


def classifier_input(image: np.ndarray) -> np.ndarray:
    """1x224x224x3 float32 RGB in [0, 255]: shorter side to 256, centre crop."""
    h, w = image.shape[:2]
    scale = RESIZE_SHORT_SIDE_PX / min(h, w)
    nw, nh = max(CLASSIFIER_SIZE_PX, round(w * scale)), max(CLASSIFIER_SIZE_PX, round(h * scale))
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    y, x = (nh - CLASSIFIER_SIZE_PX) // 2, (nw - CLASSIFIER_SIZE_PX) // 2
    crop = resized[y : y + CLASSIFIER_SIZE_PX, x : x + CLASSIFIER_SIZE_PX]
    return cv2.cvtColor(crop, cv2.COLOR_BGR2RGB).astype(np.float32)[None]


def classify(
    classifier, labels: list[str], image: np.ndarray, top_k: int, min_score: float, vocabulary: str = "all"
) -> list[dict]:
    """[{label, score}] of the top_k labels scoring at least min_score, best first, each label once (the
    probabilities of classes sharing a name add up)."""
    (probs,) = blazepose.run(classifier, [classifier_input(image)])
    probs = probs.reshape(-1)
    if probs.shape[0] != len(labels):
        raise ValueError(f"classifier has {probs.shape[0]} classes but the labels file {len(labels)}")
    classes = GARMENT_CLASSES if vocabulary == "garments" else range(len(labels))
    by_label: dict[str, float] = {}
    for i in classes:
        by_label[labels[i]] = by_label.get(labels[i], 0.0) + float(probs[i])
    ranked = sorted(by_label.items(), key=lambda item: -item[1])[:top_k]
    return [{"label": label, "score": round(score, 4)} for label, score in ranked if score >= min_score]


def main(args: dict) -> dict:
    if "image" not in args:
        raise ValueError("missing parameter 'image' (bytes, a path or a URL)")
    top_k, min_score, person, person_score, extra_tags, vocabulary = _params(args)
    image = image_input.read_image(args["image"])
    classifier = models.load(args["classifier_url"], sha256=args.get("classifier_sha256"))
    labels = models.load(args["labels_url"], sha256=args.get("labels_sha256"), loader="json")
    t0 = time.perf_counter()
    found = classify(classifier, labels, image, top_k, min_score, vocabulary)
    t1 = time.perf_counter()
    models.report_timing("classify_ms", (t1 - t0) * 1000)
    result: dict = {"labels": found, "vocabulary": vocabulary, "min_score": min_score}
    if person is None:
        detector = models.load(args["detector_url"], sha256=args.get("detector_sha256"))
        landmarker = models.load(args["landmark_url"], sha256=args.get("landmark_sha256"))
        t2 = time.perf_counter()
        found_person = blazepose.find_person(detector, landmarker, image)
        models.report_timing("person_ms", (time.perf_counter() - t2) * 1000)
        person = found_person.pose is not None
        person_score = round(found_person.detector_score, 3)
        result["person_score"] = person_score
    scores: dict[str, float | None] = {f["label"]: f["score"] for f in found}
    if person:
        scores.setdefault(PERSON_TAG, person_score)
    for tag in extra_tags:
        scores.setdefault(tag, None)
    result["tags"] = list(scores)
    result["tag_scores"] = scores
    result["person"] = person
    return result
