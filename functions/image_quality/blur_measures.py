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
from dataclasses import dataclass

import cv2
import numpy as np

#: gradient orientations 0, 45, 90, 135 degrees as (dx, dy) steps
DIRECTIONS: tuple[tuple[int, int], ...] = ((1, 0), (1, 1), (0, 1), (-1, 1))
ORIENTATION_HALF_WIDTH_DEG = 22.5
PROFILE_HALF_PX = 24
EDGES_PER_ORIENTATION = 400
#: edges measured per orientation, so that a region (the subject, its background) still has its strongest ones
EDGES_SAMPLED = 1200
MIN_EDGES = 30
#: edges weaker than this fraction of the photo's 99th-percentile gradient, or than EDGE_MIN_GRADIENT, are noise
EDGE_REL_MIN = 0.1
EDGE_MIN_GRADIENT = 8.0
EDGE_QUANTILE = 25
RISE_LOW, RISE_HIGH = 0.1, 0.9


def _crossing(level: np.ndarray, valid: np.ndarray, t: float) -> np.ndarray:
    """Per row, the fractional index where ``level`` (rising inside ``valid``) first reaches ``t``."""
    reached = valid & (level >= t)
    j = np.argmax(reached, axis=1)
    rows = np.arange(len(level))
    prev = np.maximum(j - 1, 0)
    lo, hi = level[rows, prev], level[rows, j]
    return prev + np.clip((t - lo) / np.maximum(hi - lo, 1e-12), 0.0, 1.0)


def _rise_widths(profiles: np.ndarray) -> np.ndarray:
    """10-90 % rise distance (in steps) of each row of ``profiles`` (n, 2K+1), centred on an edge."""
    k = PROFILE_HALF_PX
    sign = np.sign(profiles[:, k + 1] - profiles[:, k - 1])
    sign[sign == 0] = 1
    rising = profiles * sign[:, None]
    diffs = np.diff(rising, axis=1)
    after = np.cumprod(diffs[:, k:] > 0, axis=1).sum(axis=1)
    before = np.cumprod(diffs[:, :k][:, ::-1] > 0, axis=1).sum(axis=1)
    rows = np.arange(len(profiles))
    start, end = k - before, k + after
    low, high = rising[rows, start], rising[rows, end]
    span = high - low
    level = (rising - low[:, None]) / np.maximum(span, 1e-12)[:, None]
    index = np.arange(profiles.shape[1])[None, :]
    valid = (index >= start[:, None]) & (index <= end[:, None])
    widths = _crossing(level, valid, RISE_HIGH) - _crossing(level, valid, RISE_LOW)
    return np.where(span > 0, widths, 0.0)


@dataclass(frozen=True)
class Edges:
    """Per orientation, the strongest edge centres (strongest first): rows, columns and 10-90 % widths in px."""

    ys: list[np.ndarray]
    xs: list[np.ndarray]
    widths: list[np.ndarray]


def edges(grey: np.ndarray) -> Edges:
    """The EDGES_SAMPLED strongest edge centres of each orientation and their widths."""
    g = grey.astype(np.float32)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    magnitude, angle = cv2.cartToPolar(gx, gy, angleInDegrees=True)
    floor = max(EDGE_REL_MIN * float(np.quantile(magnitude, 0.99)), EDGE_MIN_GRADIENT)
    strong = magnitude >= floor
    strong[:2, :] = strong[-2:, :] = False
    strong[:, :2] = strong[:, -2:] = False
    ys_all, xs_all = np.nonzero(strong)
    # orientation bins of 45 degrees centred on 0, 45, 90, 135 (a gradient and its opposite are one orientation)
    bins = (((angle[ys_all, xs_all] + ORIENTATION_HALF_WIDTH_DEG) // 45.0) % 4).astype(np.int8)
    k = PROFILE_HALF_PX
    padded = np.pad(grey, k, mode="edge")
    steps = np.arange(-k, k + 1)
    out_y, out_x, out_w = [], [], []
    for i, (dx, dy) in enumerate(DIRECTIONS):
        ys, xs = ys_all[bins == i], xs_all[bins == i]
        m = magnitude[ys, xs]
        # edge centres: a gradient maximum along its own direction
        centre = (m >= magnitude[ys + dy, xs + dx]) & (m >= magnitude[ys - dy, xs - dx])
        ys, xs, m = ys[centre], xs[centre], m[centre]
        if len(m) > EDGES_SAMPLED:
            top = np.argpartition(-m, EDGES_SAMPLED)[:EDGES_SAMPLED]
            strongest = top[np.argsort(-m[top], kind="stable")]
        else:
            strongest = np.argsort(-m, kind="stable")
        ys, xs = ys[strongest], xs[strongest]
        profiles = padded[ys[:, None] + k + steps[None, :] * dy, xs[:, None] + k + steps[None, :] * dx]
        step_px = math.sqrt(2.0) if dx and dy else 1.0
        out_y.append(ys)
        out_x.append(xs)
        out_w.append(_rise_widths(profiles) * step_px)
    return Edges(out_y, out_x, out_w)


def edge_widths(found: Edges, mask: np.ndarray | None = None) -> list[float | None]:
    """Per orientation (0, 45, 90, 135 degrees), the lower quartile of the 10-90 % rise distance in pixels over
    its EDGES_PER_ORIENTATION strongest edges (inside ``mask`` when given); None where it has fewer than
    MIN_EDGES."""
    out: list[float | None] = []
    for ys, xs, widths in zip(found.ys, found.xs, found.widths, strict=True):
        if mask is not None:
            widths = widths[mask[ys, xs]]
        widths = widths[:EDGES_PER_ORIENTATION]
        out.append(float(np.percentile(widths, EDGE_QUANTILE)) if len(widths) >= MIN_EDGES else None)
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
