"""image_quality: a no-model quality gate (OpenCV only) scoring a photo from 0 to 100.

Every measure is taken on the image scaled to ANALYSIS_SIZE_PX on its long side, so scores do not depend on
the resolution (and blur is judged as it shows at that size):

- ``sharpness``: the lower of two blur scores (``blur_measures.py``). *Edge width*: the widest of the four orientations'
  edge widths (10-90 % rise distance over the sharpest quarter of each orientation's strongest edges), 2.0 px ->
  100, 3.2 px -> 50, 4.4 px -> 0. *Directional balance*: the smallest over the largest one-pixel detail energy
  of the four orientations, 0.55 -> 100, 0.4 -> 50, 0.25 -> 0 (motion blur on fine texture). Reported as
  ``edge_width_px`` (with ``edge_widths_px`` per orientation) and ``directional_balance``.
- ``exposure``: 100 while the mean grey level lies in 70..190, falling linearly to 0 at 10 and 245, then
  reduced by up to half in proportion to the fraction of clipped pixels (<= 2 or >= 253).
- ``contrast``: RMS contrast (standard deviation of the grey levels), 48 or more -> 100.
- ``colourfulness``: Hasler & Suesstrunk's metric, 109 ("extremely colourful") -> 100.
- ``noise``: 100 minus the noise sigma (Immerkaer's estimator, median over the smoothest fifth of the
  unclipped 32 px tiles, so texture is not taken for noise) times 12.5; sigma 8 or more -> 0.
- ``harmony``: how well the hues fit a harmonic hue template (``hue_harmony.py``; 100 for a colourless photo).
- ``depth_of_field``: subject sharp against a softer background: the background's edge width over the
  subject's, 1.0 (as sharp) -> 0, 2.5 or more -> 100. The subject is the ``box`` param (x, y, w, h, e.g. the
  crop's) or else the central half of the photo; None when either region has too few edges to measure.

Overall ``score`` is the weighted geometric mean of the weighted measures (each floored at 1), rounded to one
decimal. Default weights: sharpness 0.55, exposure, contrast and noise 0.15 each; colourfulness, harmony and
depth of field 0 (reported only: a monochrome photo, a clashing kit or a deep focus is not a worse photo). The
``weights`` param changes them (e.g. ``{"harmony": 0.1}``); a measure that is None is left out. Geometric so
that one very poor aspect cannot be averaged away by good ones; sharpness weighs most since blur is what no
later step can repair.

``passed`` needs ``score >= threshold`` *and* ``sharpness >= min_sharpness`` (default 50): a blurred photo fails
whatever its exposure and contrast. A failed photo's ``reason`` names the measure that failed and by how much,
and ``weakest`` names it (the failed floor, else the weighted measure that lowers the score most: the
largest weight x log(100 / score)).

Calibration (``benches/bench_ai_functions.py --calibrate``): the bundled sharp photos (OpenCV's samples, a
black-and-white portrait and a colour portrait from scikit-image) have edges of 1.7-3.0 px and a balance of at
least 0.56; their copies blurred by 9-25 px of motion (0, 30, 45, 90, 135 degrees) or a defocus disc of radius
3-6 px all score sharpness below 50; blur of 5 px or radius 2 is within what the sharp but soft office photos
(basketball1/2: edges 3.0 px) show, and is caught only on crisp photos.
"""

from __future__ import annotations

import math
import time

import blur_measures
import cv2
import hue_harmony
import image_input
import numpy as np
from minifaas_sandbox import models

ANALYSIS_SIZE_PX = 512
DEFAULT_THRESHOLD = 61.0
DEFAULT_MIN_SHARPNESS = 50.0
EDGE_WIDTH_FULL_PX = 2.0  # edge width scoring 100 ...
EDGE_WIDTH_ZERO_PX = 4.4  # ... and 0 (3.2 px scores 50)
BALANCE_FULL = 0.55  # directional balance scoring 100 ...
BALANCE_ZERO = 0.25  # ... and 0
DOF_SUBJECT_FRACTION = 0.5  # without a box, the subject is the central half (of each side) of the photo
DOF_FULL_RATIO = 2.5  # background edges this many times wider than the subject's score 100
EXPOSURE_GOOD = (70.0, 190.0)
EXPOSURE_ZERO = (10.0, 245.0)
CLIP_LOW, CLIP_HIGH = 2, 253
CLIP_PENALTY_MAX = 0.5
CONTRAST_FULL_STD = 48.0
COLOURFUL_FULL = 109.0
NOISE_TILE_PX = 32
NOISE_ZERO_SIGMA = 8.0
SCORE_FLOOR = 1.0
WEIGHTS = {
    "sharpness": 0.55,
    "exposure": 0.15,
    "contrast": 0.15,
    "noise": 0.15,
    "colourfulness": 0.0,
    "harmony": 0.0,
    "depth_of_field": 0.0,
}
MAX_WEIGHT = 10.0
_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)


def _clip100(x: float) -> float:
    return float(min(100.0, max(0.0, x)))


def _analysis_image(image: np.ndarray) -> np.ndarray:
    h, w = image.shape[:2]
    scale = ANALYSIS_SIZE_PX / max(h, w)
    if scale == 1:
        return image
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=interp)


def _tiles(shape: tuple[int, int], tile: int, step: int) -> list[tuple[int, int]]:
    h, w = shape
    ys = range(0, max(1, h - tile + 1), step)
    xs = range(0, max(1, w - tile + 1), step)
    return [(y, x) for y in ys for x in xs]


def _linear(value: float, zero: float, full: float) -> float:
    return _clip100(100 * (value - zero) / (full - zero))


def sharpness(grey: np.ndarray, found: blur_measures.Edges) -> dict[str, object]:
    """The sharpness score and the blur figures behind it."""
    widths = blur_measures.edge_widths(found)
    measured = [w for w in widths if w is not None]
    width = max(measured) if measured else None
    balance = blur_measures.directional_balance(grey)
    # no edges at all (a blank page): nothing shows blur, and nothing shows detail either
    width_score = _linear(width, EDGE_WIDTH_ZERO_PX, EDGE_WIDTH_FULL_PX) if width is not None else 0.0
    balance_score = _linear(balance, BALANCE_ZERO, BALANCE_FULL)
    return {
        "sharpness": min(width_score, balance_score),
        "edge_width_px": None if width is None else round(width, 2),
        "edge_widths_px": [None if w is None else round(w, 2) for w in widths],
        "directional_balance": round(balance, 3),
    }


def depth_of_field(grey: np.ndarray, found: blur_measures.Edges, box: tuple[int, int, int, int] | None) -> float | None:
    """Background edge width over the subject's, mapped to 0..100; None when a region has too few edges."""
    h, w = grey.shape
    if box is None:
        margin_x, margin_y = round(w * (1 - DOF_SUBJECT_FRACTION) / 2), round(h * (1 - DOF_SUBJECT_FRACTION) / 2)
        x0, y0, x1, y1 = margin_x, margin_y, w - margin_x, h - margin_y
    else:
        x0, y0 = max(0, box[0]), max(0, box[1])
        x1, y1 = min(w, box[0] + box[2]), min(h, box[1] + box[3])
    subject = np.zeros((h, w), dtype=bool)
    subject[y0:y1, x0:x1] = True
    inside = [v for v in blur_measures.edge_widths(found, subject) if v is not None]
    outside = [v for v in blur_measures.edge_widths(found, ~subject) if v is not None]
    if not inside or not outside:
        return None
    ratio = float(np.median(outside)) / max(float(np.median(inside)), 1e-6)
    return _linear(ratio, 1.0, DOF_FULL_RATIO)


def exposure(grey: np.ndarray) -> float:
    mean = float(grey.mean())
    lo_good, hi_good = EXPOSURE_GOOD
    lo_zero, hi_zero = EXPOSURE_ZERO
    if mean < lo_good:
        level = (mean - lo_zero) / (lo_good - lo_zero)
    elif mean > hi_good:
        level = (hi_zero - mean) / (hi_zero - hi_good)
    else:
        level = 1.0
    clipped = float(((grey <= CLIP_LOW) | (grey >= CLIP_HIGH)).mean())
    return _clip100(100 * level * (1 - CLIP_PENALTY_MAX * clipped))


def contrast(grey: np.ndarray) -> float:
    return _clip100(100 * float(grey.std()) / CONTRAST_FULL_STD)


def colourfulness(bgr: np.ndarray) -> float:
    b, g, r = (c.astype(np.float64) for c in cv2.split(bgr))
    rg = r - g
    yb = 0.5 * (r + g) - b
    m = math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean())
    return _clip100(100 * m / COLOURFUL_FULL)


def noise(grey: np.ndarray) -> float:
    residual = np.abs(cv2.filter2D(grey, cv2.CV_64F, _IMMERKAER))
    gx = cv2.Sobel(grey, cv2.CV_64F, 1, 0)
    gy = cv2.Sobel(grey, cv2.CV_64F, 0, 1)
    energy = np.hypot(gx, gy)
    t = NOISE_TILE_PX
    sigmas, energies = [], []
    for y, x in _tiles(grey.shape, t, t):
        mean = grey[y : y + t, x : x + t].mean()
        if mean <= CLIP_LOW or mean >= CLIP_HIGH:
            continue  # saturated tiles hide noise
        sigmas.append(residual[y + 1 : y + t - 1, x + 1 : x + t - 1].mean() * math.sqrt(math.pi / 2) / 6)
        energies.append(energy[y : y + t, x : x + t].mean())
    if not sigmas:
        return 100.0
    smooth = np.argsort(energies)[: max(1, len(sigmas) // 5)]
    sigma = float(np.median(np.asarray(sigmas)[smooth]))
    return _clip100(100 * (1 - sigma / NOISE_ZERO_SIGMA))


def assess(
    image: np.ndarray, box: tuple[int, int, int, int] | None = None, weights: dict[str, float] | None = None
) -> dict[str, object]:
    """All scores, the figures behind them and the overall score of a BGR image (``box`` in its pixels)."""
    small = _analysis_image(image)
    scale = small.shape[1] / image.shape[1]
    grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY).astype(np.float64)
    found = blur_measures.edges(grey)
    result: dict[str, object] = dict(sharpness(grey, found))
    harmony_score, template, deviation = hue_harmony.harmony(small)
    small_box = None if box is None else tuple(round(v * scale) for v in box)
    dof = depth_of_field(grey, found, small_box)  # type: ignore[arg-type]
    scores: dict[str, float | None] = {
        "sharpness": float(result["sharpness"]),  # type: ignore[arg-type]
        "exposure": exposure(grey),
        "contrast": contrast(grey),
        "colourfulness": colourfulness(small),
        "noise": noise(grey),
        "harmony": harmony_score,
        "depth_of_field": dof,
    }
    used = {k: w for k, w in (weights or WEIGHTS).items() if w > 0 and scores.get(k) is not None}
    total = sum(used.values())
    log_score = sum(math.log(max(float(scores[k]), SCORE_FLOOR)) * w for k, w in used.items()) / total  # type: ignore[arg-type]
    # normalised by the weights' sum, so extra weights keep the scale (the defaults sum to 1)
    result.update({k: None if v is None else round(v, 1) for k, v in scores.items()})
    result["harmony_template"] = template
    result["hue_deviation_deg"] = round(deviation, 1)
    result["score"] = round(math.exp(log_score), 1)
    result["weights"] = used
    return result


def parse_weights(value: object) -> dict[str, float]:
    if value is None:
        return dict(WEIGHTS)
    if not isinstance(value, dict):
        raise ValueError(f"'weights' must be an object of measure -> weight, got {value!r}")
    weights = dict(WEIGHTS)
    for key, weight in value.items():
        if key not in WEIGHTS:
            raise ValueError(f"unknown measure {key!r} in 'weights'; expected some of {sorted(WEIGHTS)}")
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"weight of {key!r} must be a number in [0, {MAX_WEIGHT}], got {weight!r}")
        weights[key] = float(weight)
    if not any(w > 0 for w in weights.values()):
        raise ValueError("'weights' leaves no measure with a positive weight")
    return weights


def parse_box(value: object) -> tuple[int, int, int, int] | None:
    if value is None:
        return None
    if isinstance(value, dict):
        value = [value.get(k) for k in ("x", "y", "w", "h")]
    if (
        not isinstance(value, list | tuple)
        or len(value) != 4
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or value[2] < 1
        or value[3] < 1
    ):
        raise ValueError(f"'box' must be [x, y, w, h] (or {{x, y, w, h}}) in whole pixels, w and h >= 1, got {value!r}")
    x, y, w, h = value
    return int(x), int(y), int(w), int(h)


def verdict(result: dict[str, object], threshold: float, min_sharpness: float) -> dict[str, object]:
    """``passed``, ``weakest`` and, when failed, the ``reason`` naming the measure and by how much."""
    score = float(result["score"])  # type: ignore[arg-type]
    sharp = float(result["sharpness"])  # type: ignore[arg-type]
    weights: dict[str, float] = result["weights"]  # type: ignore[assignment]
    # the measure that pulls the geometric mean down most: weight times log of its distance from 100
    weakest = max(weights, key=lambda k: weights[k] * math.log(100.0 / max(float(result[k]), SCORE_FLOOR)))  # type: ignore[arg-type]
    failures = []
    if score < threshold:
        failures.append(f"score {score} is {round(threshold - score, 1)} below the threshold {threshold}")
    if sharp < min_sharpness:
        weakest = "sharpness"
        failures.append(f"sharpness {sharp} is {round(min_sharpness - sharp, 1)} below the minimum {min_sharpness}")
    detail = f"weakest: {weakest} {result[weakest]}"
    if weakest == "sharpness":
        detail += f"; edges {result['edge_width_px']} px wide, directional balance {result['directional_balance']}"
    out: dict[str, object] = {"passed": not failures, "weakest": weakest}
    if failures:
        out["reason"] = f"{' and '.join(failures)} ({detail})"
    return out


def _number(args: dict, name: str, default: float) -> float:
    value = args.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise ValueError(f"{name!r} must be a number in [0, 100], got {value!r}")
    return float(value)


def main(args: dict) -> dict:
    if "image" not in args:
        raise ValueError("missing parameter 'image' (bytes, a path or a URL)")
    threshold = _number(args, "threshold", DEFAULT_THRESHOLD)
    min_sharpness = _number(args, "min_sharpness", DEFAULT_MIN_SHARPNESS)
    weights = parse_weights(args.get("weights"))
    box = parse_box(args.get("box"))
    t0 = time.perf_counter()
    image = image_input.read_image(args["image"])
    t1 = time.perf_counter()
    result = assess(image, box, weights)
    t2 = time.perf_counter()
    models.report_timing("decode_ms", (t1 - t0) * 1000)
    models.report_timing("assess_ms", (t2 - t1) * 1000)
    h, w = image.shape[:2]
    return {
        **result,
        "threshold": threshold,
        "min_sharpness": min_sharpness,
        **verdict(result, threshold, min_sharpness),
        "width": w,
        "height": h,
    }
