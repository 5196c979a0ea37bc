"""Colour harmony: how well a photo's hues fit one of Matsuda's harmonic hue templates (Cohen-Or et al., "Color
Harmonization", SIGGRAPH 2006).

A template is one or two sectors of the hue wheel (``i``: one narrow sector, ``V``: one wide, ``L``, ``I``,
``T``, ``Y``, ``X``); it may be rotated freely. Each pixel's hue, weighted by its saturation, lies either inside a
sector (distance 0) or some degrees away from the nearest sector border. The best template and rotation give the
smallest weighted mean distance D; ``harmony = 100 * (1 - D / HARMONY_ZERO_DEG)``. A photo with almost no
saturated colour (a black-and-white portrait) has nothing that could clash and scores 100.
"""

from __future__ import annotations

import cv2
import numpy as np

HUE_BINS = 360
ROTATION_STEP_DEG = 2
HARMONY_ZERO_DEG = 30.0
#: below this mean saturation (0..1) the photo is treated as colourless
MIN_MEAN_SATURATION = 0.05
#: template -> sectors as (centre offset, width), in degrees (Cohen-Or et al., Fig. 2)
TEMPLATES: dict[str, tuple[tuple[float, float], ...]] = {
    "i": ((0.0, 18.0),),
    "V": ((0.0, 93.6),),
    "L": ((0.0, 18.0), (90.0, 79.2)),
    "I": ((0.0, 18.0), (180.0, 18.0)),
    "T": ((0.0, 180.0),),
    "Y": ((0.0, 93.6), (180.0, 18.0)),
    "X": ((0.0, 93.6), (180.0, 93.6)),
}


def _arc(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = np.abs(a - b) % 360.0
    return np.minimum(d, 360.0 - d)


def _distance_tables() -> dict[str, np.ndarray]:
    """template -> (rotations, 360) distance of each hue from the rotated template's nearest sector."""
    hues = np.arange(HUE_BINS, dtype=np.float64) + 0.5
    rotations = np.arange(0, 360, ROTATION_STEP_DEG, dtype=np.float64)
    tables = {}
    for name, sectors in TEMPLATES.items():
        per_sector = [
            np.clip(_arc(hues[None, :], (rotations[:, None] + centre)) - width / 2, 0, None)
            for centre, width in sectors
        ]
        tables[name] = np.minimum.reduce(per_sector)
    return tables


_TABLES = _distance_tables()


def harmony(bgr: np.ndarray) -> tuple[float, str | None, float]:
    """(score 0-100, best template or None when colourless, mean distance in degrees from it)."""
    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV_FULL)
    hue = hsv[:, :, 0].astype(np.float64) * 360.0 / 256.0
    saturation = hsv[:, :, 1].astype(np.float64) / 255.0
    if float(saturation.mean()) < MIN_MEAN_SATURATION:
        return 100.0, None, 0.0
    histogram, _ = np.histogram(hue, bins=HUE_BINS, range=(0.0, 360.0), weights=saturation)
    histogram /= histogram.sum()
    best_name, best = "", float("inf")
    for name, table in _TABLES.items():
        cost = float((table @ histogram).min())
        if cost < best:
            best_name, best = name, cost
    score = 100.0 * max(0.0, 1.0 - best / HARMONY_ZERO_DEG)
    return score, best_name, best
