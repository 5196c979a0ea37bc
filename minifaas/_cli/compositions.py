"""``minifaas composition create|update|get|list|delete|invoke``: compositions on a server, from a file.

FILE is a ``.json`` file (``minifaas.composer``'s IR, or openwhisk-composer's output of ``compose flow.js``) or a
``.py`` file, run here, on the client, whose module-level ``composition`` (or ``--attr NAME``) is a
``minifaas.composer.Composition``. Either way the server receives the JSON IR only, and accepts only steps that
name deployed actions: a Python function step is refused here, before anything is sent, since the server does
not run code that arrives over HTTP in its own host.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from .main import EXIT_FAILED, EXIT_OK, Api, CliError, _kv, _pairs, _params, _print_json, _when

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ("add_parser", "load_composition")

#: the module-level name a .py file defines its composition under, unless --attr says otherwise
DEFAULT_ATTR: Final = "composition"
#: what runpy names the module of a .py file (not __main__: its `if __name__ == "__main__":` block stays idle)
PY_RUN_NAME: Final = "__minifaas_composition__"
CONDITIONS: Final = ("js", "strict")


def load_composition(path: Path, attr: str = DEFAULT_ATTR) -> Any:
    """The JSON a server accepts for the composition in ``path`` (.json as it is, .py evaluated here)."""
    if not path.is_file():
        raise CliError(f"{path} is not a file")
    if path.suffix == ".json":
        try:
            data: Any = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot read {path} as JSON: {exc}") from None
        if not isinstance(data, dict | list):
            raise CliError(f"{path} must hold a composition's JSON object, not {type(data).__name__}")
        return data
    if path.suffix != ".py":
        raise CliError(f"{path}: give a .json file (a composition's JSON) or a .py file that defines one")
    from ..composer import Composition

    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # the file may import its neighbours, as `python FILE` would let it
    try:
        namespace = runpy.run_path(str(path), run_name=PY_RUN_NAME)
    except SystemExit as exc:
        raise CliError(f"{path} exited ({exc.code}) while it was being read") from None
    finally:
        sys.path.remove(folder)
    if attr not in namespace:
        raise CliError(f"{path} defines no module-level {attr!r}: name the composition's variable with --attr NAME")
    comp = namespace[attr]
    if not isinstance(comp, Composition):
        raise CliError(f"{path}: {attr!r} is a {type(comp).__name__}, not a minifaas.composer composition")
    for node in comp.walk():
        if node.type == "function":
            raise CliError(
                f"{path}: the step at root{node.path} is a Python function ({node.fn_ref}); a server runs only "
                "steps that name deployed actions: deploy that code as an action (minifaas deploy NAME FILE) and "
                "use composer.action('NAME') in its place"
            )
    return comp.to_json()


async def cmd_composition(api: Api, args: argparse.Namespace, console: Console) -> int:
    verb = args.verb
    if verb in ("create", "update"):
        exec_: dict[str, Any] = {"kind": "composition", "composition": load_composition(Path(args.file), args.attr)}
        if args.conditions:
            exec_["conditions"] = args.conditions
        body: dict[str, Any] = {"exec": exec_, "parameters": _kv(_pairs(args.param))}
        if args.max_steps is not None:
            body["limits"] = {"steps": args.max_steps}
        overwrite = "true" if verb == "update" else "false"
        comp = await api.json("PUT", api.path("compositions", args.name), params={"overwrite": overwrite}, body=body)
        done = "created" if verb == "create" else "updated"
        parts = ", ".join(comp["exec"]["components"]) or "none"
        console.print(
            f"[green]ok:[/] {done} composition [bold]{comp['name']}[/] (version {comp['version']}), actions: {parts}"
        )
    elif verb == "get":
        params = {"code": str(args.code).lower()}
        _print_json(console, await api.json("GET", api.path("compositions", args.name), params=params))
    elif verb == "delete":
        await api.call("DELETE", api.path("compositions", args.name))
        console.print(f"[green]ok:[/] deleted composition [bold]{args.name}[/]")
    elif verb == "invoke":
        return await _invoke(api, args, console)
    else:
        return await _list(api, args, console)
    return EXIT_OK


async def _list(api: Api, args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    comps = await api.json("GET", api.path("compositions"), params={"limit": args.limit})
    if args.json:
        _print_json(console, comps)
        return EXIT_OK
    table = Table("name", "version", "actions", "steps", "updated", title="compositions")
    for c in comps:
        actions = ", ".join(c["exec"]["components"])
        table.add_row(c["name"], c["version"], actions, str(c["limits"]["steps"]), _when(c.get("updated")))
    console.print(table)
    return EXIT_OK


async def _invoke(api: Api, args: argparse.Namespace, console: Console) -> int:
    """Blocking: the session's record (or result) on stdout, where to see its graph on stderr."""
    from rich.console import Console

    from .main import _wait_record

    params = {"blocking": "true", "result": "false"}
    path = api.path("compositions", args.name)
    resp = await api.call("POST", path, params=params, body=_pairs(args.param), ok=(200, 202, 500, 502))
    record: dict[str, Any] = resp.json()
    if resp.status_code == 202:  # the server stopped waiting: follow the record
        record = await _wait_record(api, record["activationId"])
    success = bool(record["response"]["success"])
    _print_json(console, record["response"]["result"] if args.result else record)
    sid = record["activationId"]
    url = str(api.client.base_url).rstrip("/")
    # an embedded engine (--local) has no web UI to point at
    note = f"`minifaas session get {sid}` shows its steps" if args.local else f"its graph is at {url}/ui/sessions/{sid}"
    Console(stderr=True, highlight=False, emoji=False, markup=False).print(f"session {sid}: {note}", soft_wrap=True)
    return EXIT_OK if success else EXIT_FAILED


def add_parser(verbs: Any, verb: Any) -> None:
    """The ``composition`` command and its verbs (``verb(sub, name, help)`` adds a verb with the common options)."""
    comp = verbs.add_parser("composition", help="create, update, get, list, delete or invoke compositions")
    cv = comp.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name in ("create", "update"):
        p = verb(cv, name, f"{name} a composition from a .json file or a .py file that defines one")
        p.add_argument("name")
        p.add_argument("file", help="a composition's JSON (minifaas or openwhisk-composer), or a .py file")
        p.add_argument(
            "--attr",
            default=DEFAULT_ATTR,
            help=f"with a .py file: the module-level variable holding the composition (default {DEFAULT_ATTR})",
        )
        _params(p, files=False)
        p.add_argument("--max-steps", type=int, help="component activations per thread of control (default 50)")
        p.add_argument("--conditions", choices=CONDITIONS, help="js truthiness (default) or strict True")
    p = verb(cv, "get", "show a composition")
    p.add_argument("name")
    p.add_argument("--code", action=argparse.BooleanOptionalAction, default=True, help="include its JSON")
    p = verb(cv, "delete", "delete a composition")
    p.add_argument("name")
    p = verb(cv, "list", "list compositions")
    p.add_argument("--limit", type=int, default=30)
    p = verb(cv, "invoke", "run a composition and wait for its session")
    p.add_argument("name")
    _params(p, files=False)
    p.add_argument("-r", "--result", action="store_true", help="print only the result")
    choices: dict[str, argparse.ArgumentParser] = cv.choices
    for p in choices.values():
        p.set_defaults(call=cmd_composition)
