"""``minifaas demo``: the product-catalog workflow on sample photos, watched live in the terminal.

It makes ``workdir/uploads``, ``workdir/catalog`` and ``workdir/rejected``, deploys the AI functions and the
catalog composition (``functions/catalog/workflow.py``) on an in-memory Engine, binds a folder feed on uploads to
the composition (feed -> trigger -> rule), then drops the photos into uploads the way an uploader should (a
hidden temporary name, then a rename). Each photo's path through the workflow is shown as it happens; at the end
come a summary table built from the sidecars the workflow wrote, the session trace of one photo, and where the
files are.

The AI functions and the sample photos are read from the source checkout this package is installed from
(``pip install -e .``): ``functions/`` and ``tests/data/images/`` next to the ``minifaas`` package. They are not
package data (the models alone are ~15 MB); an installed wheel has no demo and says so.

``python -m minifaas._cli.demo [workdir]`` runs it without the CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Final

import anyio
import anyio.to_thread
from rich import box
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from .._core.activation import Activation
from .._engine import Engine
from .._errors import ActivationNotFound, MinifaasError
from .._events.triggers import TriggerManager
from .._workflows.sessions import Session
from ..composer import Composition

__all__ = ("run_demo",)

REPO_DIR: Final = Path(__file__).resolve().parents[2]  # minifaas/_cli/demo.py -> the checkout
FUNCTIONS_DIR: Final = REPO_DIR / "functions"
SAMPLE_IMAGES_DIR: Final = REPO_DIR / "tests" / "data" / "images"
IMAGE_SUFFIXES: Final = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
WORKFLOW_MODULE: Final = "catalog.workflow"
COMPOSITION_NAME: Final = "catalog"
TRIGGER_NAME: Final = "uploads"
RULE_NAME: Final = "catalog-uploads"
#: above OpenWhisk's default of 60: a photographer's upload of a few hundred photos must not crawl
TRIGGER_RATE_PER_MINUTE: Final = 600
FEED_INTERVAL_S: Final = 0.2
DROP_MTIME_BACK_S: Final = 1.0
REFRESH_S: Final = 0.1
DEMO_TIMEOUT_S: Final = 120.0
MAX_FIRES_LISTED: Final = 1000
#: the summary table's photo column, in characters: longer names fold
PHOTO_COLUMN_MAX: Final = 16
#: the photo whose session trace is shown, when it is among the photos
TRACE_PHOTO: Final = "messi5.jpg"
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
#: step role -> the function-name key of the composition's ``functions`` let variable
ROLES: Final = ("quality", "crop", "tag")


class DemoError(MinifaasError):
    """Raised by the demo when it cannot run here (no source checkout with functions/ and sample photos)."""


@dataclasses.dataclass
class _Photo:
    """What the demo knows about one photo so far."""

    name: str
    session_id: str | None = None
    steps: dict[str, Activation] = dataclasses.field(default_factory=dict)
    session: Activation | None = None
    sidecar: dict[str, Any] | None = None

    @property
    def done(self) -> bool:
        return self.session is not None and self.session.done


class _StepWatcher:
    """An engine end hook keeping every ended activation by cause, so rows fill in as steps end."""

    def __init__(self) -> None:
        self.by_cause: dict[str, list[Activation]] = {}

    def __call__(self, act: Activation) -> None:
        if act.cause is not None:
            self.by_cause.setdefault(act.cause, []).append(act)


def _load_workflow(functions_dir: Path) -> ModuleType:
    """Import ``catalog.workflow`` from the checkout's functions/ (appended to sys.path: host steps import by name)."""
    if not (functions_dir / "catalog" / "workflow.py").is_file():
        raise DemoError(
            f"the demo needs a source checkout: {functions_dir / 'catalog'} is missing "
            "(clone the repository and `pip install -e .` there)"
        )
    if str(functions_dir) not in sys.path:
        sys.path.append(str(functions_dir))
    return importlib.import_module(WORKFLOW_MODULE)


def sample_images(folder: Path = SAMPLE_IMAGES_DIR) -> list[Path]:
    """The bundled sample photos, sorted by name."""
    if not folder.is_dir():
        raise DemoError(f"the demo needs a source checkout: no sample photos at {folder}")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def _drop(photo: Path, uploads: Path) -> None:
    """Upload the way a feed expects: a hidden temporary name (ignored), then an atomic rename.

    The copy's modification time is set a second back, as ``cp -p`` leaves an older one: the rename then moves
    only the change time, which tells the feed at its first look that the file is whole. (The photo's own
    mtime would make a re-run in the same folder look like the same file, which a feed fires only once.)
    """
    tmp = uploads / f".{photo.name}.{uuid.uuid4().hex[:8]}.part"
    shutil.copyfile(photo, tmp)
    written = time.time() - DROP_MTIME_BACK_S
    os.utime(tmp, (written, written))
    os.replace(tmp, uploads / photo.name)


# ------------------------------------------------------------------------------------------------ rendering


def _ms(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f} ms"


@dataclasses.dataclass
class _Row:
    """One line of a table: a photo's path through the workflow, as far as it is known."""

    photo: str
    outcome: Text
    score: str = ""
    detail: str = ""
    tags: str = ""
    steps: dict[str, Text] = dataclasses.field(default_factory=dict)
    total: str = ""


def _step_text(role: str, status: str, duration_ms: float | None, cold: bool) -> Text:
    if status != "success":
        return Text(f"{role} {status}", style="red")
    took = "" if duration_ms is None else f"{duration_ms:,.0f}"
    return Text.assemble(f"{role:<7} {took:>5}", (" cold" if cold else " warm", "cyan" if cold else "dim"))


def _score_text(quality: dict[str, Any] | None) -> str:
    if not quality or quality.get("score") is None:
        return ""
    sign = ">=" if quality.get("passed") else "<"
    return f"score {quality['score']} {sign} {quality.get('threshold', 0):g}"


def _box_text(box: dict[str, Any] | None, person: object) -> str:
    if box:
        return f"box {box['x']},{box['y']} {box['w']}x{box['h']}"
    if person is False:
        return "no person: whole photo"
    return "person, parts hidden: whole photo" if person else ""


def _outcome(photo: _Photo) -> Text:
    if photo.session_id is None:
        return Text("uploaded", style="dim")
    if photo.session is None or not photo.session.done:
        return Text("in the workflow", style="yellow")
    result = photo.session.result
    outcome = result.get("outcome")
    if photo.session.status != "success" or outcome is None:
        return Text(f"failed: {str(result.get('error', photo.session.status))[:80]}", style="bold red")
    if outcome == "catalog":
        return Text("catalogued" if result.get("box") else "catalogued uncropped", style="bold green")
    return Text("rejected", style="bold magenta")


def _live_row(photo: _Photo, names: dict[str, str]) -> _Row:
    """From the step activations that have ended so far."""
    by_function = {act.name: act for act in photo.steps.values()}
    acts = {role: by_function.get(names[role].partition("@")[0]) for role in ROLES}
    row = _Row(photo.name, _outcome(photo))
    quality, crop, tag = acts["quality"], acts["crop"], acts["tag"]
    if quality is not None and quality.success:
        row.score = _score_text(quality.result)
    if crop is not None and crop.success:
        box = {k: crop.result[k] for k in ("x", "y", "w", "h")} if crop.result.get("x") is not None else None
        row.detail = _box_text(box, crop.result.get("person"))
    if tag is not None and tag.success:
        row.tags = ", ".join(tag.result.get("tags") or [])
    running = photo.session_id is not None and not photo.done
    passed = quality is not None and quality.result.get("passed") is True
    for role in ROLES:
        act = acts[role]
        if act is not None:
            row.steps[role] = _step_text(role, act.status, act.duration, bool(act.annotations.get("cold")))
        elif running and (role == "quality" or passed):
            row.steps[role] = Text(f"{role} …", style="yellow")
            break
    if photo.done and photo.session is not None:
        row.total = _ms(photo.session.duration)
    return row


def _final_row(photo: _Photo, names: dict[str, str]) -> _Row:
    """From the sidecar the workflow wrote (from the activations when there is none: a failed session)."""
    side = photo.sidecar
    if side is None:
        return _live_row(photo, names)
    row = _Row(photo.name, _outcome(photo), score=_score_text(side.get("quality")))
    if side.get("outcome") == "catalog":
        row.detail = _box_text(side.get("box"), side.get("person"))
        row.tags = ", ".join(side.get("tags") or [])
    else:
        reason = str(side.get("reason", ""))
        # the score is in its own column: keep what the photographer should fix
        row.detail = reason[reason.find("(") + 1 : -1] if reason.endswith(")") else reason
    for role in ROLES:
        step = (side.get("steps") or {}).get(role)
        if step is not None:
            row.steps[role] = _step_text(role, str(step["status"]), step.get("duration_ms"), bool(step.get("cold")))
    if photo.session is not None:
        row.total = _ms(photo.session.duration)
    return row


def _done_line(row: _Row) -> Text:
    """The log line printed when a photo has gone through the workflow."""
    parts = [p for p in (row.score, row.detail, f"tags: {row.tags}" if row.tags else "") if p]
    return Text.assemble(
        (f"{row.photo:<24} ", "bold"), row.outcome, f"  {'; '.join(parts)}", (f"  ({row.total})", "dim")
    )


def _table(rows: Sequence[_Row], title: str) -> Table:
    # fits an 80-column terminal: no vertical rules, four columns, and the step times never wrap (the others
    # wrap between words, a long photo name anywhere)
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_lines=True, padding=(0, 1))
    table.add_column("photo", overflow="fold", max_width=PHOTO_COLUMN_MAX)
    table.add_column("outcome")
    table.add_column("crop box, tags / why rejected")
    table.add_column("steps, ms", no_wrap=True)
    for r in rows:
        outcome = Text.assemble(r.outcome, "\n" if r.score else "", r.score)
        detail = Text.assemble(r.detail, "\n" if r.detail and r.tags else "", r.tags)
        lines = [r.steps[k] for k in ROLES if k in r.steps]
        if r.total:
            lines.append(Text(f"session {r.total.removesuffix(' ms'):>5}", style="bold"))
        table.add_row(r.photo, outcome, detail, Text("\n").join(lines))
    return table


def _short_path(path: str) -> str:
    """A step's path for an 80-column trace (the records keep the full one): without the ``try_`` body every step
    is under (``[0].body``), an if_'s branches as ``then``/``else``."""
    path = path.removeprefix("[0].body") or path
    return path.replace(".consequent", ".then").replace(".alternate", ".else")


def _trace(session: Session, comp: Composition, photo: str) -> Tree:
    """The steps of one session in order, the gate's decision, and the branches not taken."""
    tree = Tree(
        Text.assemble(
            ("session trace of ", "bold"),
            (photo, "bold"),
            f": {session.name} {session.session_id} ({session.status}, {_ms(session.duration)})",
        )
    )
    for step in session.steps:
        label = step.name or step.kind
        if step.kind == "function" and ":" in label:
            label = label.rsplit(":", 1)[1]
        line = Text.assemble(
            (f"{_short_path(step.path):<24}", "dim"),
            (f" {step.kind:<8} ", "cyan" if step.kind == "action" else "dim"),
            (f"{label:<16}", "bold" if step.kind == "action" else ""),
            f"{step.duration_ms:7.1f} ms",
        )
        if step.path.endswith(".test"):
            taken = isinstance(step.output, dict) and step.output.get("value") is True
            # short enough for an 80-column line; the colour says passed or failed
            line.append("  → then" if taken else "  → else", style="bold green" if taken else "bold magenta")
        tree.add(line)
    for path in session.not_taken:
        try:
            node = comp.find(path)
            what = node.name or (node.fn_ref or "").rsplit(":", 1)[-1] or node.type
        except MinifaasError:
            what = "?"
        tree.add(Text(f"{_short_path(path):<24} not taken {what}", style="dim"))
    return tree


def _files(root: Path, folder: str) -> str:
    path = root / folder
    names = sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) if path.is_dir() else []
    return f"{path}/  ({len(names)} files: {', '.join(names[:8])}{', …' if len(names) > 8 else ''})"


# ------------------------------------------------------------------------------------------------ the demo


async def run_demo(
    workdir: Path,
    console: Console | None = None,
    *,
    images: list[Path] | None = None,
    keep: Callable[[Engine], Awaitable[None]] | None = None,
) -> int:
    """Run the catalog workflow demo in ``workdir``; returns 0 when every photo went through the workflow.

    ``keep``, when given, is awaited with the demo's engine once the run is over and before the engine closes
    (``minifaas demo --serve`` serves it until Ctrl-C).
    """
    console = console if console is not None else Console()
    t0 = time.perf_counter()
    try:
        wf = _load_workflow(FUNCTIONS_DIR)
        photos_in = list(images) if images is not None else sample_images()
    except DemoError as exc:
        console.print(f"[red]error:[/] {exc}")
        return EXIT_FAILED
    if not photos_in:
        console.print("[red]error:[/] no photos to run the demo on")
        return EXIT_FAILED
    workdir = Path(workdir).expanduser().resolve()
    uploads, catalog, rejected = workdir / "uploads", workdir / "catalog", workdir / "rejected"
    for folder in (uploads, catalog, rejected):
        folder.mkdir(parents=True, exist_ok=True)
    console.rule("[bold]minifaas demo: a product-catalog workflow")
    console.print(
        "A photo dropped into [bold]uploads/[/] fires a trigger (folder feed) whose rule runs the [bold]catalog[/]"
        " composition:\n  image_quality → [green]passed[/]: crop (BlazePose) → auto_tag (EfficientNet) → "
        "catalog/<photo>.jpg + .json\n                → [magenta]failed[/]: rejected/<photo> + .json (scores, reason)"
    )
    console.print(f"working folder: [bold]{escape(str(workdir))}[/]")

    watcher = _StepWatcher()
    async with Engine() as engine:
        tm = engine.triggers
        if tm is None:
            raise DemoError("this engine has no trigger manager")
        engine.add_end_hook(watcher)
        versions: dict[str, str] = await wf.deploy_functions(engine, grants=[str(catalog)])
        comp: Composition = await wf.deploy_catalog(
            engine, COMPOSITION_NAME, params={"catalog_dir": str(catalog), "rejected_dir": str(rejected)}
        )
        names = {"quality": wf.QUALITY_FUNCTION, "crop": wf.CROP_FUNCTION, "tag": wf.TAG_FUNCTION}
        deployed = ", ".join(f"{n}@{v} ({Path(wf.FUNCTION_FOLDERS[n]).name})" for n, v in versions.items())
        console.print(f"deployed: {deployed}; composition [bold]{COMPOSITION_NAME}[/] ({len(comp.actions())} actions)")
        tm.create_trigger(TRIGGER_NAME, rate_per_minute=TRIGGER_RATE_PER_MINUTE)
        tm.create_rule(RULE_NAME, TRIGGER_NAME, COMPOSITION_NAME)
        await tm.add_feed(TRIGGER_NAME, "folder", path=str(uploads), interval_s=FEED_INTERVAL_S)
        console.print(
            f"trigger [bold]{TRIGGER_NAME}[/] ← folder feed on uploads/ (every {FEED_INTERVAL_S:g} s); "
            f"rule [bold]{RULE_NAME}[/] → {COMPOSITION_NAME}"
        )
        photos = {p.name: _Photo(p.name) for p in photos_in}
        t_drop = time.perf_counter()
        for p in photos_in:
            await anyio.to_thread.run_sync(_drop, p, uploads)
        console.print(f"dropped {len(photos_in)} photos into uploads/\n")
        finished = await _watch(engine, tm, watcher, photos, names, console)
        wall_s = time.perf_counter() - t_drop
        stats = engine.stats()
        ordered = list(photos.values())
        await _load_sidecars(ordered)
        console.print(_table([_final_row(p, names) for p in ordered], "summary (read back from the sidecars)"))
        counts = {k: sum(1 for p in ordered if _outcome(p).plain.startswith(k)) for k in ("catalogued", "rejected")}
        uncropped = sum(1 for p in ordered if _outcome(p).plain == "catalogued uncropped")
        failed = len(ordered) - counts["catalogued"] - counts["rejected"]
        console.print(
            f"[bold]{len(ordered)}[/] photos in {wall_s:.1f} s from the drop: [green]{counts['catalogued']}"
            f" catalogued[/] ({uncropped} uncropped), [magenta]{counts['rejected']} rejected[/]"
            + (f", [red]{failed} failed or unfinished[/]" if failed else "")
            + f"; sandboxes: {stats.get('cold_runs', 0)} cold starts, {stats.get('warm_runs', 0)} warm runs"
        )
        traced = photos.get(TRACE_PHOTO) or next((p for p in ordered if p.done), None)
        if traced is not None and traced.session_id is not None:
            with contextlib.suppress(ActivationNotFound):
                console.print(_trace(engine.sessions.get(traced.session_id), comp, traced.name))
        console.print(f"\n[bold]catalog:[/]  {escape(_files(workdir, 'catalog'))}")
        console.print(f"[bold]rejected:[/] {escape(_files(workdir, 'rejected'))}")
        console.print(f"done in {time.perf_counter() - t0:.1f} s")
        if keep is not None:
            await keep(engine)
    return EXIT_OK if finished and failed == 0 else EXIT_FAILED


async def _watch(
    engine: Engine,
    tm: TriggerManager,
    watcher: _StepWatcher,
    photos: dict[str, _Photo],
    names: dict[str, str],
    console: Console,
) -> bool:
    """Follow the photos until every session has ended (True) or DEMO_TIMEOUT_S passed (False)."""
    ordered = list(photos.values())

    def render() -> Table:
        return _table([_live_row(p, names) for p in ordered], "live")

    with Live(render(), console=console, refresh_per_second=1 / REFRESH_S, transient=True) as live:
        with anyio.move_on_after(DEMO_TIMEOUT_S):
            while True:
                for fire in tm.list_fires(TRIGGER_NAME, limit=MAX_FIRES_LISTED):
                    photo = photos.get(str(fire.args.get("name")))
                    if photo is not None and photo.session_id is None and fire.activation_ids:
                        photo.session_id = fire.activation_ids[0]
                for photo in ordered:
                    if photo.session_id is None or photo.done:
                        continue
                    photo.steps = {a.activation_id: a for a in watcher.by_cause.get(photo.session_id, ())}
                    with contextlib.suppress(ActivationNotFound):
                        photo.session = await engine.activations.get(photo.session_id)
                    if photo.done:
                        live.console.print(_done_line(_live_row(photo, names)))
                live.update(render())
                if all(p.done for p in ordered):
                    return True
                await anyio.sleep(REFRESH_S)
    console.print(f"[red]timed out after {DEMO_TIMEOUT_S:g} s[/]")
    return False


async def _load_sidecars(photos: Sequence[_Photo]) -> None:
    for photo in photos:
        path = photo.session.result.get("sidecar") if photo.session is not None else None
        if isinstance(path, str):
            with contextlib.suppress(OSError, ValueError):
                text = await anyio.to_thread.run_sync(Path(path).read_text)
                photo.sidecar = json.loads(text)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m minifaas._cli.demo [workdir]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    workdir = Path(args[0]) if args else Path(tempfile.mkdtemp(prefix="minifaas-demo-"))
    return anyio.run(run_demo, workdir)


if __name__ == "__main__":
    sys.exit(main())
