"""Blur measures of a grey image: how wide its edges are, per orientation, and how evenly its fine detail spreads
across orientations.

Edge width (the 10-90 % rise distance, as slanted-edge MTF measurements use): at the strongest edges of each
of four gradient orientations (0, 45, 90, 135 degrees) the grey profile is followed along the gradient while it
keeps rising (or falling); the distance over which it climbs from 10 % to 90 % of that rise is the edge's width.
An orientation's width is the lower quartile over its strongest edges (the sharpest ones: a sharp subject in
front of a soft background counts as sharp). Motion blur of length L widens the edges across its direction by
about 0.8 L; defocus widens them all.

Directional balance: the energy of one-pixel differences along each of the four orientations; the smallest
over the largest. Motion blur removes fine detail along its direction only. This catches blur on fine texture
(fur, grass), whose blurred profiles never rise steadily enough for an edge width.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

#: gradient orientations 0, 45, 90, 135 degrees as (dx, dy) steps
DIRECTIONS: tuple[tuple[int, int], ...] = ((1, 0), (1, 1), (0, 1), (-1, 1))
ORIENTATION_HALF_WIDTH_DEG = 22.5
PROFILE_HALF_PX = 24
EDGES_PER_ORIENTATION = 400
MIN_EDGES = 30
#: edges weaker than this fraction of the photo's 99th-percentile gradient, or than EDGE_MIN_GRADIENT, are noise
EDGE_REL_MIN = 0.1
EDGE_MIN_GRADIENT = 8.0
EDGE_QUANTILE = 25
RISE_LOW, RISE_HIGH = 0.1, 0.9


def _gradients(grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gx = cv2.Sobel(grey, cv2.CV_64F, 1, 0, ksize=3)
    gy = cv2.Sobel(grey, cv2.CV_64F, 0, 1, ksize=3)
    return np.hypot(gx, gy), np.mod(np.degrees(np.arctan2(gy, gx)), 180.0)


def _rise_widths(profiles: np.ndarray) -> np.ndarray:
    """10-90 % rise distance (in steps) of each row of ``profiles`` (n, 2K+1), centred on an edge."""
    k = PROFILE_HALF_PX
    sign = np.sign(profiles[:, k + 1] - profiles[:, k - 1])
    sign[sign == 0] = 1
    rising = profiles * sign[:, None]
    diffs = np.diff(rising, axis=1)
    after = np.cumprod(diffs[:, k:] > 0, axis=1).sum(axis=1)
    before = np.cumprod(diffs[:, :k][:, ::-1] > 0, axis=1).sum(axis=1)
    widths = np.zeros(len(profiles))
    for j in range(len(profiles)):
        segment = rising[j, k - before[j] : k + after[j] + 1]
        span = segment[-1] - segment[0]
        if span <= 0 or len(segment) < 2:
            continue
        level = (segment - segment[0]) / span
        steps = np.arange(len(segment), dtype=np.float64)
        widths[j] = np.interp(RISE_HIGH, level, steps) - np.interp(RISE_LOW, level, steps)
    return widths


def edge_widths(grey: np.ndarray, mask: np.ndarray | None = None) -> list[float | None]:
    """Per orientation (0, 45, 90, 135 degrees), the lower quartile of the 10-90 % rise distance in pixels over
    its strongest edges (inside ``mask`` when given); None where it has fewer than MIN_EDGES edges."""
    magnitude, angle = _gradients(grey)
    h, w = grey.shape
    k = PROFILE_HALF_PX
    padded = np.pad(grey, k, mode="edge")
    floor = max(EDGE_REL_MIN * float(np.quantile(magnitude, 0.99)), EDGE_MIN_GRADIENT)
    steps = np.arange(-k, k + 1)
    out: list[float | None] = []
    for i, (dx, dy) in enumerate(DIRECTIONS):
        off = np.abs((angle - i * 45.0 + 90.0) % 180.0 - 90.0)
        selected = (off < ORIENTATION_HALF_WIDTH_DEG) & (magnitude >= floor)
        if mask is not None:
            selected &= mask
        selected[:2, :] = selected[-2:, :] = False
        selected[:, :2] = selected[:, -2:] = False
        ys, xs = np.nonzero(selected)
        m = magnitude[ys, xs]
        # edge centres: a gradient maximum along its own direction
        ahead = magnitude[np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)]
        behind = magnitude[np.clip(ys - dy, 0, h - 1), np.clip(xs - dx, 0, w - 1)]
        centre = (m >= ahead) & (m >= behind)
        ys, xs, m = ys[centre], xs[centre], m[centre]
        if len(ys) < MIN_EDGES:
            out.append(None)
            continue
        strongest = np.argsort(-m)[:EDGES_PER_ORIENTATION]
        ys, xs = ys[strongest], xs[strongest]
        profiles = padded[ys[:, None] + k + steps[None, :] * dy, xs[:, None] + k + steps[None, :] * dx]
        step_px = math.sqrt(2.0) if dx and dy else 1.0
        out.append(float(np.percentile(_rise_widths(profiles) * step_px, EDGE_QUANTILE)))
    return out


def directional_balance(grey: np.ndarray) -> float:
    """Smallest over largest mean squared one-pixel difference across the four orientations, in [0, 1]."""
    h, w = grey.shape
    centre = grey[1 : h - 1, 1 : w - 1]
    energies = []
    for dx, dy in DIRECTIONS:
        shifted = grey[1 + dy : h - 1 + dy, 1 + dx : w - 1 + dx]
        # a diagonal neighbour is sqrt(2) away: per unit length its squared difference halves
        energies.append(float(((centre - shifted) ** 2).mean()) / (2.0 if dx and dy else 1.0))
    return min(energies) / max(max(energies), 1e-9)
