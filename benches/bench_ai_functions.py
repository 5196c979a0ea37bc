"""Accuracy of the AI functions on the labelled set (tests/data/labelled/labels.json), run in-process.

    python benches/bench_ai_functions.py               # crop and gate accuracy, one line per miss
    python benches/bench_ai_functions.py --calibrate   # the quality gate on sharp photos blurred at several
                                                       # motion lengths and angles and defocus radii

Crop: ``people`` is right when smart_body_crop(person="all") counts the labelled number of people; the crop
outcome is right when an eyes-to-``lower`` crop of the largest person exists exactly when labelled, with the
labelled clipped and missing parts. Gate: image_quality passes exactly the photos labelled sharp. Accuracy,
not speed: the figures do not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import cv2

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = ROOT / "functions"
sys.path.insert(0, str(ROOT / "tests"))

import ai_photos  # noqa: E402  (tests/ai_photos.py: the labelled set and the blur kernels)

from minifaas.testing import call  # noqa: E402

CALIBRATION_PHOTOS = (
    "images/messi5.jpg",
    "images/basketball1.png",
    "images/basketball2.png",
    "images/fruits.jpg",
    "images/baboon.jpg",
    "images/HappyFish.jpg",
    "images/squirrel_cls.jpg",
    "labelled/astronaut.png",
    "labelled/camera.png",
)
MOTION_LENGTHS_PX = (5, 9, 15, 25, 35)
MOTION_ANGLES_DEG = (0, 30, 45, 90, 135)
DEFOCUS_RADII_PX = (2, 3, 4, 6)


def crop_outcome(result: dict[str, Any]) -> tuple[bool, list[str], list[str]]:
    return result.get("crop") is not None or "x" in result, result.get("clipped", []), result.get("missing", [])


def accuracy() -> int:
    photos = ai_photos.labelled_set()
    counted = crop_right = crop_total = gate_right = 0
    sharp_passed = sharp_total = blurred_rejected = blurred_total = 0
    misses: list[str] = []
    for photo in photos:
        people = call(FUNCTIONS / "smart_body_crop", {"image": photo.image, "person": "all"})
        if people["people_count"] == photo.people:
            counted += 1
        else:
            misses.append(f"people {photo.name}: {people['people_count']} found, {photo.people} labelled {photo.note}")
        if photo.crop is not None:
            crop_total += 1
            result = call(FUNCTIONS / "smart_body_crop", {"image": photo.image, "lower": photo.lower})
            got = crop_outcome(result)
            want = (photo.crop, photo.clipped, photo.missing)
            if got == want:
                crop_right += 1
            else:
                misses.append(f"crop {photo.name}: got (crop, clipped, missing) {got}, labelled {want}")
        quality = call(FUNCTIONS / "image_quality", {"image": photo.image})
        if photo.sharp:
            sharp_total += 1
            sharp_passed += quality["passed"]
        else:
            blurred_total += 1
            blurred_rejected += not quality["passed"]
        if quality["passed"] == photo.sharp:
            gate_right += 1
        else:
            misses.append(
                f"gate {photo.name}: passed={quality['passed']} (sharpness {quality['sharpness']}, "
                f"score {quality['score']}), labelled sharp={photo.sharp}"
            )
    n = len(photos)
    print(f"labelled set: {n} photos ({sum(p.people > 0 for p in photos)} with people)")
    print(f"crop: people counted right {counted}/{n} ({100 * counted / n:.0f}%)")
    print(f"crop: eyes-to-part outcome right {crop_right}/{crop_total} ({100 * crop_right / crop_total:.0f}%)")
    print(
        f"gate: right {gate_right}/{n} ({100 * gate_right / n:.0f}%): sharp passed {sharp_passed}/{sharp_total}, "
        f"blurred rejected {blurred_rejected}/{blurred_total}"
    )
    for miss in misses:
        print(f"  miss: {miss}")
    return 0


def calibrate() -> int:
    print("quality gate on sharp photos and blurred copies (rejected / copies, highest sharpness among them)")
    for source in CALIBRATION_PHOTOS:
        result = call(FUNCTIONS / "image_quality", {"image": ai_photos.png(ai_photos.read(source))})
        print(
            f"  {source:26s} passed={result['passed']!s:5s} sharpness {result['sharpness']:5.1f} "
            f"edges {result['edge_width_px']} px, balance {result['directional_balance']}"
        )
    rows: list[tuple[str, list[tuple[bool, float]]]] = []
    for length in MOTION_LENGTHS_PX:
        outcomes = []
        for source in CALIBRATION_PHOTOS:
            image = ai_photos.read(source)
            for angle in MOTION_ANGLES_DEG:
                blurred = ai_photos.png(ai_photos.motion_blur(image, length, angle))
                r = call(FUNCTIONS / "image_quality", {"image": blurred})
                outcomes.append((bool(r["passed"]), float(r["sharpness"])))
        rows.append((f"motion {length:2d} px x {len(MOTION_ANGLES_DEG)} angles", outcomes))
    for radius in DEFOCUS_RADII_PX:
        outcomes = []
        for source in CALIBRATION_PHOTOS:
            blurred = ai_photos.png(ai_photos.defocus(ai_photos.read(source), radius))
            r = call(FUNCTIONS / "image_quality", {"image": blurred})
            outcomes.append((bool(r["passed"]), float(r["sharpness"])))
        rows.append((f"defocus radius {radius} px", outcomes))
    for label, outcomes in rows:
        rejected = sum(not passed for passed, _ in outcomes)
        print(f"  {label:28s} rejected {rejected:2d}/{len(outcomes)}, max sharpness {max(s for _, s in outcomes):5.1f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calibrate", action="store_true", help="the blur calibration grid instead")
    args = parser.parse_args()
    cv2.setNumThreads(1)
    return calibrate() if args.calibrate else accuracy()


if __name__ == "__main__":
    sys.exit(main())
