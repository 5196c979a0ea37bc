"""The AI functions against the labelled set (tests/data/labelled/labels.json): what a person sees in each photo.

Every photo is a case. The gate must agree with every label. Where the pose models disagree with a person, the
case is a strict xfail with the reason, so that the known misses stay listed (``benches/bench_ai_functions.py``
prints the same figures as accuracy) and a model or code change that fixes one is noticed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ai_photos  # tests/ai_photos.py
import pytest

from minifaas.testing import call

FUNCTIONS = Path(__file__).resolve().parent.parent / "functions"

PHOTOS = {p.name: p for p in ai_photos.labelled_set()}
#: name -> why the pose models miss what the label says
PEOPLE_MISSES = {
    "basketball1": "the man facing away scores 0.15 with the detector (0.34 in a tile), below 0.5",
    "messi5-grey": "the grey copy of the footballer scores below 0.5 with the detector",
    "messi5-motion25-0": "25 px of motion blur: the detector no longer finds the footballer",
    "basketball2-defocus3": "defocused, the nearer man scores below 0.5 with the detector",
}
CROP_MISSES = {
    "astronaut-mirror": "mirrored, the model places her hips 13-15 px inside the bottom edge",
    "astronaut-x2": "side by side, the model places the chosen copy's hips 0.3-17 px inside the bottom edge",
    "messi5-grey": "no person found (see the people count)",
    "messi5-motion25-0": "no person found (see the people count)",
    "camera-motion25-0": "motion-blurred, the model places the cameraman's hips beyond the left edge (x < 0)",
}


def _cases(misses: dict[str, str], only_cropped: bool = False) -> list[Any]:
    return [
        pytest.param(name, id=name, marks=[pytest.mark.xfail(reason=misses[name])] if name in misses else [])
        for name, photo in PHOTOS.items()
        if not only_cropped or photo.crop is not None
    ]


@pytest.mark.parametrize("name", _cases({}))
def test_gate_agrees_with_the_label(name: str) -> None:
    photo = PHOTOS[name]
    result = call(FUNCTIONS / "image_quality", {"image": photo.image})
    assert result["passed"] is photo.sharp, (result["sharpness"], result["score"], result.get("reason"))
    if not photo.sharp:
        assert result["weakest"] == "sharpness"


@pytest.mark.parametrize("name", _cases(PEOPLE_MISSES))
def test_crop_counts_the_people(name: str) -> None:
    photo = PHOTOS[name]
    result = call(FUNCTIONS / "smart_body_crop", {"image": photo.image, "person": "all"})
    assert result["people_count"] == photo.people, result["candidates"]
    assert result["person"] is (photo.people > 0)


@pytest.mark.parametrize("name", _cases(CROP_MISSES, only_cropped=True))
def test_crop_outcome_matches_the_label(name: str) -> None:
    photo = PHOTOS[name]
    result = call(FUNCTIONS / "smart_body_crop", {"image": photo.image, "lower": photo.lower})
    assert ("x" in result) is photo.crop, result.get("missing")
    assert result.get("clipped", []) == photo.clipped
    assert result.get("missing", []) == photo.missing
