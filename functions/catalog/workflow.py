"""The product-catalog workflow: a photo arrives, passes a quality gate, is cropped and tagged, and catalogued.

::

    receive -> image_quality -> gate --passed--> crop_request -> crop -> tag_request -> auto_tag
                                     |   -> keep_photo_tags -> has_crop --yes--> crop_tag_request -> auto_tag
                                     |                                 |         -> keep_crop_tags --> write_catalog
                                     |                                 \\--no--> no_crop_tags ------/
                                     \\--failed--> write_rejected
    (any error) ----------------------------------------------------------------------------> write_failed

One composition (``build_workflow``); the AI steps are deployed functions (``image_quality``, ``crop``,
``auto_tag``), the glue steps are the host functions below, which carry the job between steps in a ``let``
variable (``job``) so that each AI function receives exactly its own parameters. Between steps only paths
travel, never image bytes: the crop function writes its output file itself, so every payload stays far below
the 1 MiB limit whatever the photo's size.

Input (one photo: what a folder feed passes to its trigger, plus the trigger's parameters): ``path`` (a local
file), ``name``, ``sha256`` (optional), ``catalog_dir``, ``rejected_dir``, optional ``threshold`` (the quality
gate's) and ``tags`` (extra tags for every entry, e.g. ``["spring-2025"]``).

Outputs, for a photo ``<stem>.<ext>``:

- passed the gate: ``catalog_dir/<stem>.jpg`` (the crop) and ``catalog_dir/<stem>.json``, the sidecar: quality
  scores, ``person``, ``box`` (x, y, w, h in the original's pixels), ``clipped`` (requested parts cut off by the
  photo's edge), the whole photo's ``tags``, ``labels`` (the classifier's, with scores) and ``tag_scores``
  (every tag's score), the crop's ``crop_tags``, ``crop_labels`` and ``crop_tag_scores`` (garment and accessory
  classes only), and ``steps``: per AI step the function, version, activation id, duration and cold/warm;
- failed the gate: a copy of the original as ``rejected_dir/<stem>.<ext>`` and ``rejected_dir/<stem>.json``
  with the scores and the ``reason`` (the gate's: the measure that failed, by how much, the weakest aspect);
- a step failed (unreadable file, function error): ``rejected_dir/<stem>.json`` with ``outcome: "failed"`` and
  the error as ``reason`` (and the original, when it can be read); the session then ends with that error.

Decisions:

- A photo that passes the gate but shows no person (``fruits.jpg``), or whose requested body parts are not
  visible, is catalogued *uncropped*: the original is copied as ``catalog_dir/<stem>.<ext>`` with
  ``person: false`` (or ``missing: [...]``) and ``box: null``. A product shot without a model is still a
  product; the sidecar says why it has no crop.
- Two tag sets, kept apart: ``tags`` describe the whole photo (the scene: "soccer ball"), ``crop_tags`` what the
  person in the crop wears or carries. The tagger runs on the crop with ``vocabulary="garments"`` (ImageNet's
  garment and accessory classes): asked about every class, the classifier (which has no "person" class) guesses
  objects on an eyes-to-hips crop ("ping-pong ball" for a footballer's shirt). Both use the tagger's
  ``min_score``, so a crop on which no garment class scores that high gets no crop tags rather than guesses.
  The crop step's person decision (and score) is passed to ``auto_tag`` so that the pose detector does not
  run twice on a photo.
- Files appear whole: the crop is written under a hidden staging name (feeds and most tools skip dot-files),
  renamed into place, and the sidecar is written last, atomically: a sidecar means the entry is complete. A
  later photo with the same stem replaces the entry (like an overwritten object in a bucket).
- Activation ids: the engine records which activation ran each step with ``cause`` = the session id. The
  ``RECORDER`` end hook (``install(engine)``) keeps them per session, and the write steps put them in the
  sidecar, with the session id (``minifaas.current_session_id``).
- Exactly once: a feed fires a photo again after a crash if its session never ended, with the same
  ``idempotency_key`` (its path and content hash). The sidecar keeps that key, so a repeat whose entry is
  already written ends at once with ``outcome: "duplicate"`` and writes nothing.
- What the steps read is a snapshot: ``receive`` copies the photo under a hidden name (hashing it on the way)
  and every AI step reads the copy. A photo whose bytes differ from the event's ``sha256`` is being rewritten:
  the session ends with ``outcome: "superseded"`` and writes nothing (the new version fires an event of its
  own). Writes of one stem take a lock, and an entry never replaces one received later.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import anyio
import anyio.to_thread

from minifaas import Activation, Engine, MinifaasError, current_session_id
from minifaas.composer import Composition, action, function, if_, let, sequence, try_

__all__ = (
    "COMPOSITION_NAME",
    "CROP_FUNCTION",
    "FUNCTIONS_DIR",
    "FUNCTION_MODELS",
    "QUALITY_FUNCTION",
    "RECORDER",
    "TAG_FUNCTION",
    "CatalogError",
    "StepRecorder",
    "build_workflow",
    "deploy_catalog",
    "deploy_functions",
    "install",
    "sweep_staging",
)

#: the repository's ``functions/`` folder, where the AI functions this workflow calls live
FUNCTIONS_DIR: Final = Path(__file__).resolve().parent.parent
COMPOSITION_NAME: Final = "catalog"
QUALITY_FUNCTION: Final = "image_quality"
CROP_FUNCTION: Final = "crop"
TAG_FUNCTION: Final = "auto_tag"
#: function name -> its folder under FUNCTIONS_DIR, as ``deploy_functions`` deploys them
FUNCTION_FOLDERS: Final[dict[str, str]] = {
    QUALITY_FUNCTION: "image_quality",
    CROP_FUNCTION: "smart_body_crop",
    TAG_FUNCTION: "auto_tag",
}
#: the models each function loads on every call, by the parameter naming them (its folder's defaults): deployed
#: with ``models=``, the zygote reads them and builds their interpreters once, and every sandbox forked from it
#: starts with them (a first call 2x faster, the weights shared between sandboxes)
FUNCTION_MODELS: Final[dict[str, tuple[str, ...]]] = {
    QUALITY_FUNCTION: (),
    CROP_FUNCTION: ("detector_url", "landmark_url"),
    TAG_FUNCTION: ("classifier_url",),  # its labels are a small JSON file, parsed by each sandbox
}
#: the AI steps of a catalogued photo, in the order they run (``crop_tag`` only when there is a crop)
ROLES: Final = ("quality", "crop", "tag", "crop_tag")
#: what the tagger looks for on the crop
CROP_TAG_VOCABULARY: Final = "garments"
CROP_FORMAT: Final = "jpeg"
CROP_SUFFIX: Final = ".jpg"
SIDECAR_SUFFIX: Final = ".json"
SIDECAR_VERSION: Final = 1
QUALITY_KEYS: Final = (
    "score",
    "threshold",
    "passed",
    "weakest",
    "reason",
    "min_sharpness",
    "sharpness",
    "edge_width_px",
    "directional_balance",
    "exposure",
    "contrast",
    "colourfulness",
    "noise",
    "harmony",
    "depth_of_field",
)
#: sub-scores that make up the overall quality score (colourfulness is reported only)
QUALITY_ASPECTS: Final = ("sharpness", "exposure", "contrast", "noise")
#: sessions whose step activations RECORDER keeps at once; older ones are dropped first
MAX_TRACKED_SESSIONS: Final = 4096
HASH_CHUNK_BYTES: Final = 1 << 20
#: sandboxes per AI function: the machines this is tuned for have 2 cores, more only costs memory
DEFAULT_MAX_SANDBOXES: Final = 2


class CatalogError(MinifaasError):
    """Raised by the workflow's host steps when a photo's input is unusable (no path, no folders, no file)."""


# ---------------------------------------------------------------------------------------------- activation ids


class StepRecorder:
    """An engine end hook that keeps the ended activations of each cause (a session id), newest sessions kept."""

    def __init__(self, max_sessions: int = MAX_TRACKED_SESSIONS) -> None:
        self._by_cause: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self._max = max_sessions

    def __call__(self, act: Activation) -> None:
        if act.cause is None:
            return
        steps = self._by_cause.get(act.cause)
        if steps is None:
            steps = self._by_cause[act.cause] = []
            while len(self._by_cause) > self._max:
                self._by_cause.popitem(last=False)
        steps.append(
            {
                "function": act.name,
                "version": act.version,
                "activation_id": act.activation_id,
                "status": act.status,
                "duration_ms": act.duration,
                "wait_ms": act.wait_time,
                "init_ms": act.init_time,
                "cold": bool(act.annotations.get("cold")),
            }
        )

    def peek(self, session_id: str) -> list[dict[str, Any]]:
        return list(self._by_cause.get(session_id, ()))

    def pop(self, session_id: str) -> list[dict[str, Any]]:
        return self._by_cause.pop(session_id, [])


RECORDER: Final = StepRecorder()
_installed: weakref.WeakSet[Engine] = weakref.WeakSet()


def install(engine: Engine) -> None:
    """Let ``engine``'s catalog sessions record their steps' activation ids (idempotent)."""
    if engine not in _installed:
        engine.add_end_hook(RECORDER)
        _installed.add(engine)


def _steps(functions: dict[str, str], session_id: str | None) -> dict[str, Any]:
    """role -> the activation that ran that AI step (matched by function name, in order)."""
    records = RECORDER.pop(session_id) if session_id is not None else []
    out: dict[str, Any] = {}
    for role in ROLES:
        base = functions.get(role, "").partition("@")[0]
        for i, rec in enumerate(records):
            if rec["function"] == base:
                out[role] = records.pop(i)
                break
    return out


# ---------------------------------------------------------------------------------------------- files


#: hidden names of this module's staging files: ``.<stem>.<token>.src<ext>``, ``.<stem>.<token>.jpg`` (a crop),
#: ``.<name>.<8 hex>.tmp`` (an atomic write)
_STAGING_RE: Final = re.compile(r"\..+\.(?:[0-9a-f]{12}(?:\.src)?\.[A-Za-z0-9]+|[0-9a-f]{8}\.tmp)")


def _temp_path(dst: Path) -> Path:
    # opened with plain open(), not mkstemp: the file gets the umask's permissions (mkstemp's are 0600)
    return dst.parent / f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp"


def _write_json_atomic(path: Path, obj: object) -> None:
    tmp = _temp_path(path)
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _copy_atomic(src: str, dst: Path) -> None:
    tmp = _temp_path(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


_stem_locks: dict[str, threading.Lock] = {}
_stem_locks_guard = threading.Lock()


@contextlib.contextmanager
def _stem_lock(job: dict[str, Any]) -> Any:
    """One writer per stem at a time (two versions of a photo may finish together)."""
    with _stem_locks_guard:
        lock = _stem_locks.setdefault(job["stem"], threading.Lock())
    with lock:
        yield


def _newer_entry_exists(job: dict[str, Any]) -> bool:
    """True if either folder holds an entry for this stem received after this job (a newer version won)."""
    for folder in (job["catalog_dir"], job["rejected_dir"]):
        with contextlib.suppress(OSError, ValueError):
            other = json.loads((Path(folder) / f"{job['stem']}{SIDECAR_SUFFIX}").read_text(encoding="utf-8"))
            if str(other.get("received") or "") > job["received"]:
                return True
    return False


def _drop_snapshot(job: dict[str, Any]) -> None:
    snapshot = job.get("snapshot")
    if snapshot:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(snapshot)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _folder(params: dict[str, Any], key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str) or not value:
        raise CatalogError(f"the workflow needs parameter {key!r} (a folder path), got {value!r}")
    return os.path.abspath(value)


# ---------------------------------------------------------------------------------------------- host steps


def _earlier_entry(job: dict[str, Any], key: object) -> Path | None:
    """The sidecar a previous run of this very event wrote (same idempotency key), if any."""
    if not isinstance(key, str) or not key:
        return None
    for folder in (job["catalog_dir"], job["rejected_dir"]):
        sidecar = Path(folder) / f"{job['stem']}{SIDECAR_SUFFIX}"
        with contextlib.suppress(OSError, ValueError):
            if json.loads(sidecar.read_text(encoding="utf-8")).get("idempotency_key") == key:
                return sidecar
    return None


def _snapshot(src: str, dst: str) -> str:
    """Copy ``src`` to ``dst``, returning the sha256 of the bytes copied."""
    digest = hashlib.sha256()
    with open(src, "rb") as fin, open(dst, "xb") as fout:
        while chunk := fin.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            fout.write(chunk)
    return digest.hexdigest()


async def receive(params: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """Check the input, open the ``job``, snapshot the photo; the ``if_`` after it runs the steps if fresh."""
    path = params.get("path")
    if not isinstance(path, str) or not path:
        raise CatalogError(f"the input names no photo: 'path' is {path!r}")
    name = os.path.basename(str(params.get("name") or path))
    catalog_dir, rejected_dir = _folder(params, "catalog_dir"), _folder(params, "rejected_dir")
    tags = params.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
        raise CatalogError(f"'tags' must be a list of non-empty strings, got {tags!r}")
    job: dict[str, Any] = {
        "path": path,
        "name": name,
        "stem": Path(name).stem or name,
        "sha256": params.get("sha256"),
        "idempotency_key": params.get("idempotency_key"),
        "catalog_dir": catalog_dir,
        "rejected_dir": rejected_dir,
        "tags": tags,
        "token": uuid.uuid4().hex[:12],
        "received": _now_iso(),
    }
    env["job"] = job
    if not os.path.isfile(path):
        raise CatalogError(f"photo {path} does not exist (or is not a file)")
    for folder in (catalog_dir, rejected_dir):
        os.makedirs(folder, exist_ok=True)
    earlier = _earlier_entry(job, job["idempotency_key"])
    if earlier is not None:
        job["skip"] = {"outcome": "duplicate", "sidecar": str(earlier)}
        return {"fresh": False}
    snapshot = os.path.join(catalog_dir, f".{job['stem']}.{job['token']}.src{Path(name).suffix}")
    digest = await anyio.to_thread.run_sync(_snapshot, path, snapshot)
    job["snapshot"] = snapshot
    if job["sha256"] is None:
        job["sha256"] = digest
    elif digest != job["sha256"]:
        os.unlink(snapshot)
        job.pop("snapshot")
        job["skip"] = {"outcome": "superseded", "sidecar": None, "reason": "the photo changed after its event"}
        return {"fresh": False}
    request: dict[str, Any] = {"image": snapshot}
    if "threshold" in params:
        request["threshold"] = params["threshold"]
    return {"fresh": True, "request": request}


def is_fresh(params: dict[str, Any], env: dict[str, Any]) -> bool:
    """The ``if_`` test after ``receive``: false for a repeat of a catalogued event or a rewritten photo."""
    return params.get("fresh") is True


def quality_request(params: dict[str, Any]) -> dict[str, Any]:
    """The quality gate's parameters, as ``receive`` prepared them."""
    request: dict[str, Any] = params["request"]
    return request


def skip(params: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """End a repeat or a superseded photo without writing anything."""
    job = env["job"]
    return {"photo": job["name"], **job["skip"]}


def gate(params: dict[str, Any], env: dict[str, Any]) -> bool:
    """The ``if_`` test: keep the quality scores in the job; true when the photo passed."""
    env["job"]["quality"] = {k: params[k] for k in QUALITY_KEYS if k in params}
    env["job"]["size"] = {"width": params.get("width"), "height": params.get("height")}
    return params.get("passed") is True


def crop_request(params: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """Ask the crop function to write the crop under a hidden staging name in the catalog folder."""
    job = env["job"]
    staging = os.path.join(job["catalog_dir"], f".{job['stem']}.{job['token']}{CROP_SUFFIX}")
    job["staging"] = staging
    return {"image": job["snapshot"], "output_path": staging, "format": CROP_FORMAT}


def tag_request(params: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """Keep the crop's outcome; ask the tagger about the whole photo, telling it whether a person is there."""
    job = env["job"]
    box = {k: params[k] for k in ("x", "y", "w", "h")} if params.get("output_path") else None
    job["crop"] = {
        "person": bool(params.get("person")),
        "box": box,
        "output_path": params.get("output_path"),
        "missing": params.get("missing"),
        "clipped": params.get("clipped") or [],
        "method": params.get("method", "blazepose"),
    }
    request: dict[str, Any] = {"image": job["snapshot"], "person": bool(params.get("person"))}
    if params.get("person") and isinstance(params.get("detector_score"), int | float):
        request["person_score"] = params["detector_score"]
    if job["tags"]:
        request["tags"] = job["tags"]
    return request


def _tag_fields(params: dict[str, Any]) -> dict[str, Any]:
    return {
        "tags": params.get("tags") or [],
        "labels": params.get("labels") or [],
        "tag_scores": params.get("tag_scores") or {},
    }


def keep_photo_tags(params: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """Keep the whole photo's tags in the job."""
    env["job"]["photo_tags"] = _tag_fields(params)
    return {}


def has_crop(params: dict[str, Any], env: dict[str, Any]) -> bool:
    """The ``if_`` test: true when the crop step wrote a crop (then the tagger looks at it too)."""
    return bool((env["job"].get("crop") or {}).get("output_path"))


def crop_tag_request(params: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """Ask the tagger what the person in the (staged) crop wears or carries."""
    crop = env["job"]["crop"]
    return {"image": crop["output_path"], "person": False, "vocabulary": CROP_TAG_VOCABULARY}


def keep_crop_tags(params: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """Keep the crop's tags in the job, apart from the photo's."""
    env["job"]["crop_tags"] = _tag_fields(params)
    return {}


def no_crop_tags(params: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """No crop, no crop tags."""
    env["job"]["crop_tags"] = None
    return {}


def _record(
    job: dict[str, Any], outcome: str, functions: dict[str, str], session_id: str | None, **fields: Any
) -> dict[str, Any]:
    return {
        "version": SIDECAR_VERSION,
        "photo": job.get("name"),
        "source": job.get("path"),
        "sha256": job.get("sha256"),
        "idempotency_key": job.get("idempotency_key"),
        "outcome": outcome,
        **fields,
        "quality": job.get("quality"),
        "size": job.get("size"),
        "session_id": session_id,
        "steps": _steps(functions, session_id),
        "received": job.get("received"),
        "created": _now_iso(),
    }


def _summary(record: dict[str, Any], sidecar: Path) -> dict[str, Any]:
    """The session's result: what a caller needs to find and show the entry (the sidecar has the rest)."""
    quality = record.get("quality") or {}
    return {
        "photo": record["photo"],
        "outcome": record["outcome"],
        "image": record.get("image"),
        "sidecar": str(sidecar),
        "score": quality.get("score"),
        "person": record.get("person"),
        "box": record.get("box"),
        "tags": record.get("tags"),
        "crop_tags": record.get("crop_tags"),
        "reason": record.get("reason"),
    }


async def write_catalog(params: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """Move the crop into place (or copy the uncropped original) and write the sidecar last."""
    job, functions = env["job"], env["functions"]
    crop = job.get("crop") or {}
    catalog = Path(job["catalog_dir"])
    staged = crop.get("output_path")
    image = catalog / (f"{job['stem']}{CROP_SUFFIX}" if staged else job["name"])
    fields: dict[str, Any] = {
        "image": str(image),
        "person": crop.get("person", False),
        "box": crop.get("box"),
        "crop_function": functions.get("crop"),
    }
    photo_tags = job.get("photo_tags") or _tag_fields({})
    fields.update(photo_tags)
    crop_tags = job.get("crop_tags")
    fields["crop_tags"] = None if crop_tags is None else crop_tags["tags"]
    fields["crop_labels"] = None if crop_tags is None else crop_tags["labels"]
    fields["crop_tag_scores"] = None if crop_tags is None else crop_tags["tag_scores"]
    if crop.get("missing"):
        fields["missing"] = crop["missing"]
    if crop.get("clipped"):
        fields["clipped"] = crop["clipped"]
    record = _record(job, "catalog", functions, current_session_id(), **fields)
    sidecar = catalog / f"{job['stem']}{SIDECAR_SUFFIX}"

    def commit() -> None:
        with _stem_lock(job):
            if _newer_entry_exists(job):
                if staged:
                    os.unlink(staged)
            elif staged:
                os.replace(staged, image)
                _write_json_atomic(sidecar, record)
            else:
                _copy_atomic(job["snapshot"], image)
                _write_json_atomic(sidecar, record)
        _drop_snapshot(job)

    await anyio.to_thread.run_sync(commit)
    return _summary(record, sidecar)


def _reason(quality: dict[str, Any]) -> str:
    if isinstance(quality.get("reason"), str):
        return f"quality {quality['reason']}"
    # a gate without its own reason (an older image_quality): the overall score and the lowest aspect
    aspects = {k: quality[k] for k in QUALITY_ASPECTS if isinstance(quality.get(k), int | float)}
    weakest = min(aspects, key=lambda k: aspects[k]) if aspects else None
    text = f"quality score {quality.get('score')} is below the threshold {quality.get('threshold')}"
    return text + (f" (weakest: {weakest} {aspects[weakest]})" if weakest else "")


async def write_rejected(params: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """Copy the original into the rejected folder with its scores and the reason, for the photographer."""
    job, functions = env["job"], env["functions"]
    rejected = Path(job["rejected_dir"])
    image = rejected / job["name"]
    reason = _reason(job.get("quality") or {})
    record = _record(job, "rejected", functions, current_session_id(), image=str(image), reason=reason)
    sidecar = rejected / f"{job['stem']}{SIDECAR_SUFFIX}"

    def commit() -> None:
        with _stem_lock(job):
            if not _newer_entry_exists(job):
                _copy_atomic(job["snapshot"], image)
                _write_json_atomic(sidecar, record)
        _drop_snapshot(job)

    await anyio.to_thread.run_sync(commit)
    return _summary(record, sidecar)


async def write_failed(params: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """The ``try_`` handler: record the failure next to the rejected photos, then fail the session with it."""
    error = params.get("error", "unknown error")
    job, functions = env.get("job") or {}, env.get("functions") or {}
    session_id = current_session_id()
    if not job.get("rejected_dir"):
        return {"error": error}  # not even a folder to report to: the session's error is the only record

    def report() -> None:
        rejected = Path(job["rejected_dir"])
        staging = job.get("staging")
        if staging:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)
        source = job.get("snapshot") or job["path"]
        with _stem_lock(job):
            if job.get("received") and _newer_entry_exists(job):
                _drop_snapshot(job)
                return
            image: str | None = None
            if os.path.isfile(source):
                target = rejected / job["name"]
                _copy_atomic(source, target)
                image = str(target)
            record = _record(job, "failed", functions, session_id, image=image, reason=str(error))
            _write_json_atomic(rejected / f"{job['stem']}{SIDECAR_SUFFIX}", record)
        _drop_snapshot(job)

    try:
        await anyio.to_thread.run_sync(report)
    except OSError as exc:
        return {"error": f"{error}; and the failure could not be recorded: {exc}"}
    return {"error": error}


def build_workflow(
    *, quality: str = QUALITY_FUNCTION, crop: str = CROP_FUNCTION, tag: str = TAG_FUNCTION
) -> Composition:
    """The catalog composition, calling the deployed functions named ``quality``, ``crop`` and ``tag``.

    Names may pin a version (``crop="crop@1"``). Every host step is a module-level function, so the
    composition survives ``to_json``/``from_json`` (with ``functions/`` on ``sys.path``).
    """
    catalogue = sequence(
        function(crop_request),
        action(crop),
        function(tag_request),
        action(tag),
        function(keep_photo_tags),
        if_(
            function(has_crop),
            sequence(function(crop_tag_request), action(tag), function(keep_crop_tags)),
            function(no_crop_tags),
        ),
        function(write_catalog),
    )
    steps = sequence(
        function(quality_request),
        action(quality),
        if_(function(gate), catalogue, function(write_rejected)),
    )
    body = sequence(function(receive), if_(function(is_fresh), steps, function(skip)))
    functions = {"quality": quality, "crop": crop, "tag": tag, "crop_tag": tag}
    return let({"job": {}, "functions": functions}, try_(body, function(write_failed)))


# ---------------------------------------------------------------------------------------------- deploying


async def deploy_functions(
    engine: Engine,
    *,
    functions_dir: Path = FUNCTIONS_DIR,
    max_sandboxes: int = DEFAULT_MAX_SANDBOXES,
    folders: dict[str, str] | None = None,
    grants: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, str]:
    """Deploy the workflow's AI functions (``folders``: name -> folder under ``functions_dir``); name -> version.

    A function deployed from its own folder names its models (:data:`FUNCTION_MODELS`), so a zygote holds them.
    ``grants``: the folders the functions read the photos from and write the crops to (each composition's
    ``catalog_dir``, or a folder above them): a deployed function takes paths only under its grants.
    """
    versions: dict[str, str] = {}
    for name, folder in (folders or FUNCTION_FOLDERS).items():
        models = FUNCTION_MODELS.get(name, ()) if folder == FUNCTION_FOLDERS.get(name) else ()
        info = await engine.deploy(
            name,
            path=functions_dir / folder,
            max_sandboxes=max_sandboxes,
            models=models,
            read_paths=grants,
            write_paths=grants,
        )
        versions[name] = str(info["version"])
    return versions


async def deploy_catalog(
    engine: Engine,
    name: str = COMPOSITION_NAME,
    *,
    params: dict[str, Any] | None = None,
    quality: str = QUALITY_FUNCTION,
    crop: str = CROP_FUNCTION,
    tag: str = TAG_FUNCTION,
) -> Composition:
    """Deploy the composition as ``name`` and install the step recorder, after sweeping the staging files.

    Call it before deploying the functions: an engine with a state dir restarts with the composition it kept, so
    a saved feed targeting it starts as soon as the functions it calls are deployed, and no session may start
    before the sweep.

    ``params`` are the composition's defaults (e.g. ``catalog_dir``/``rejected_dir``); a trigger's parameters
    and the event's payload override them.
    """
    comp = build_workflow(quality=quality, crop=crop, tag=tag)
    folders = [str(params[k]) for k in ("catalog_dir", "rejected_dir") if isinstance((params or {}).get(k), str)]
    await anyio.to_thread.run_sync(sweep_staging, folders)
    await engine.deploy_composition(name, comp, params=params)
    install(engine)
    return comp


def sweep_staging(folders: list[str]) -> int:
    """Delete the hidden snapshots, crops and temporary files that sessions cut short by a crash left behind.

    Called when the composition is deployed, before any of its sessions runs (their events fire again, with new
    staging names). Only names this module makes are touched; returns how many were deleted.
    """
    removed = 0
    for folder in folders:
        with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
            for entry in entries:
                if _STAGING_RE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                        removed += 1
    return removed
