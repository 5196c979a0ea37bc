"""image_quality: a no-model quality gate (OpenCV only) scoring a photo from 0 to 100.

Every measure is taken on the grey image scaled to ANALYSIS_SIZE_PX on its long side, so scores do not depend
on the resolution:

- ``sharpness``: the variance of the Laplacian in 64 px tiles (half overlapping); the 90th percentile over the
  tiles, so a photo whose subject is sharp passes even with plain walls or a soft background. Mapped on a log
  scale: 10 (a defocused page) -> 0, 2000 (fine texture in focus) -> 100.
- ``exposure``: 100 while the mean grey level lies in 70..190, falling linearly to 0 at 10 and 245, then
  reduced by up to half in proportion to the fraction of clipped pixels (<= 2 or >= 253).
- ``contrast``: RMS contrast (standard deviation of the grey levels), 48 or more -> 100.
- ``colourfulness``: Hasler & Suesstrunk's metric, 109 ("extremely colourful") -> 100.
- ``noise``: 100 minus the noise sigma (Immerkaer's estimator, median over the smoothest fifth of the
  unclipped 32 px tiles, so texture is not taken for noise) times 12.5; sigma 8 or more -> 0.

Overall ``score`` is the weighted geometric mean
``sharpness^0.55 * exposure^0.15 * contrast^0.15 * noise^0.15`` (each floored at 1), rounded to one decimal.
Geometric so that one very poor aspect cannot be averaged away by good ones (a motion-blurred but well
exposed, contrasty licence plate must still fail); sharpness weighs most since blur is what no later step can
repair. Colourfulness is reported but not part of the score: a monochrome photo (e.g. from a grey camera) is
not a worse photo. ``passed = score >= threshold``.

Calibrated on OpenCV's sample photos: the defocused and motion-blurred ones score below 46 while the sharp
ones (including two grey office photos with large plain walls) score above 74; the default threshold 61 sits
between.
"""

from __future__ import annotations

import math
import time

import cv2
import image_input
import numpy as np
from minifaas_sandbox import models

ANALYSIS_SIZE_PX = 512
DEFAULT_THRESHOLD = 61.0
SHARP_TILE_PX = 64
SHARP_PERCENTILE = 90
SHARP_LOG_MIN = 1.0  # log10 of the Laplacian variance scoring 0
SHARP_LOG_MAX = math.log10(2000.0)  # ... and 100
EXPOSURE_GOOD = (70.0, 190.0)
EXPOSURE_ZERO = (10.0, 245.0)
CLIP_LOW, CLIP_HIGH = 2, 253
CLIP_PENALTY_MAX = 0.5
CONTRAST_FULL_STD = 48.0
COLOURFUL_FULL = 109.0
NOISE_TILE_PX = 32
NOISE_ZERO_SIGMA = 8.0
SCORE_FLOOR = 1.0
WEIGHTS = {"sharpness": 0.55, "exposure": 0.15, "contrast": 0.15, "noise": 0.15}
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


def sharpness(grey: np.ndarray) -> float:
    lap = cv2.Laplacian(grey, cv2.CV_64F)
    variances = [
        lap[y : y + SHARP_TILE_PX, x : x + SHARP_TILE_PX].var()
        for y, x in _tiles(grey.shape, SHARP_TILE_PX, SHARP_TILE_PX // 2)
    ]
    value = float(np.percentile(variances, SHARP_PERCENTILE))
    return _clip100(100 * (math.log10(max(value, 1e-6)) - SHARP_LOG_MIN) / (SHARP_LOG_MAX - SHARP_LOG_MIN))


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


def assess(image: np.ndarray) -> dict[str, float]:
    """All five scores and the overall score of a BGR image."""
    small = _analysis_image(image)
    grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY).astype(np.float64)
    scores = {
        "sharpness": sharpness(grey),
        "exposure": exposure(grey),
        "contrast": contrast(grey),
        "colourfulness": colourfulness(small),
        "noise": noise(grey),
    }
    log_score = sum(math.log(max(scores[k], SCORE_FLOOR)) * w for k, w in WEIGHTS.items())
    scores["score"] = math.exp(log_score)
    return {k: round(v, 1) for k, v in scores.items()}


def main(args: dict) -> dict:
    if "image" not in args:
        raise ValueError("missing parameter 'image' (bytes, a path or a URL)")
    threshold = args.get("threshold", DEFAULT_THRESHOLD)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 100:
        raise ValueError(f"'threshold' must be a number in [0, 100], got {threshold!r}")
    t0 = time.perf_counter()
    image = image_input.read_image(args["image"])
    t1 = time.perf_counter()
    scores = assess(image)
    t2 = time.perf_counter()
    models.report_timing("decode_ms", (t1 - t0) * 1000)
    models.report_timing("assess_ms", (t2 - t1) * 1000)
    h, w = image.shape[:2]
    return {
        **scores,
        "threshold": float(threshold),
        "passed": scores["score"] >= threshold,
        "width": w,
        "height": h,
    }
