"""Photos for the AI functions' tests and bench: the bundled ones and copies derived from them.

Blur kernels as blur detectors are tested with: a line of ``length`` pixels at ``angle`` degrees (motion) and a
disc of ``radius`` pixels (defocus). The labelled set (``tests/data/labelled/labels.json``) names each photo's
source and how it is derived, with what a person sees in it: how many people, what an eyes-to-``lower`` crop
of the largest one should give (a crop, which parts are clipped by the frame, which are missing), sharp or not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

DATA = Path(__file__).resolve().parent / "data"
IMAGES = DATA / "images"
LABELLED = DATA / "labelled"
LABELS = LABELLED / "labels.json"
GREY_CANVAS = 128


def motion_kernel(length: int, angle_deg: float) -> np.ndarray:
    """A normalised line ``length`` px long at ``angle_deg`` (counter-clockwise from the x axis)."""
    kernel = np.zeros((length, length), np.float32)
    centre = (length - 1) / 2
    kernel[round(centre), :] = 1.0
    rotation = cv2.getRotationMatrix2D((centre, centre), angle_deg, 1.0)
    kernel = cv2.warpAffine(kernel, rotation, (length, length), flags=cv2.INTER_LINEAR)
    return kernel / kernel.sum()


def motion_blur(image: np.ndarray, length: int, angle_deg: float) -> np.ndarray:
    return cv2.filter2D(image, -1, motion_kernel(length, angle_deg), borderType=cv2.BORDER_REFLECT)


def defocus(image: np.ndarray, radius: int) -> np.ndarray:
    size = 2 * radius + 1
    disc = np.zeros((size, size), np.float32)
    cv2.circle(disc, (radius, radius), radius, 1.0, -1)
    return cv2.filter2D(image, -1, disc / disc.sum(), borderType=cv2.BORDER_REFLECT)


def read(source: str) -> np.ndarray:
    """``images/<name>`` or ``labelled/<name>`` under tests/data, as BGR."""
    image = cv2.imread(str(DATA / source), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(DATA / source)
    return image


def scaled(image: np.ndarray, rows: int) -> np.ndarray:
    return cv2.resize(image, (round(image.shape[1] * rows / image.shape[0]), rows), interpolation=cv2.INTER_AREA)


def side_by_side(*images: np.ndarray) -> np.ndarray:
    """The images left to right, top-aligned on a grey canvas as high as the highest."""
    height = max(i.shape[0] for i in images)
    parts = []
    for image in images:
        canvas = np.full((height, image.shape[1], 3), GREY_CANVAS, np.uint8)
        canvas[: image.shape[0]] = image
        parts.append(canvas)
    return np.hstack(parts)


def derive(source: str | list[str], steps: list[dict[str, Any]]) -> np.ndarray:
    """Apply ``steps`` (each ``{"op": ..., ...}``) to the source photo(s)."""
    images = [read(s) for s in ([source] if isinstance(source, str) else source)]
    image = images[0] if len(images) == 1 else side_by_side(*images)
    for step in steps:
        op = step["op"]
        if op == "cut":  # keep the top rows
            image = image[: step["rows"]]
        elif op == "mirror":
            image = image[:, ::-1].copy()
        elif op == "motion":
            image = motion_blur(image, step["length"], step["angle"])
        elif op == "defocus":
            image = defocus(image, step["radius"])
        elif op == "grey":
            image = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)
        elif op == "scale":
            image = scaled(image, step["rows"])
        else:
            raise ValueError(f"unknown derivation {op!r}")
    return image


def png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    if not ok:
        raise ValueError("cannot encode")
    return buf.tobytes()


@dataclass(frozen=True)
class Labelled:
    """One photo of the labelled set and what a person sees in it."""

    name: str
    image: bytes
    people: int
    sharp: bool
    lower: str = "hips"
    crop: bool | None = None  # an eyes-to-lower crop of the largest person exists (None: not labelled)
    clipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    note: str = ""


def labelled_set() -> list[Labelled]:
    entries = json.loads(LABELS.read_text())["photos"]
    out = []
    for e in entries:
        source, steps = e["source"], e.get("derive", [])
        image = (DATA / source).read_bytes() if isinstance(source, str) and not steps else png(derive(source, steps))
        out.append(
            Labelled(
                name=e["name"],
                image=image,
                people=e["people"],
                sharp=e["sharp"],
                lower=e.get("lower", "hips"),
                crop=e.get("crop"),
                clipped=e.get("clipped", []),
                missing=e.get("missing", []),
                note=e.get("note", ""),
            )
        )
    return out
