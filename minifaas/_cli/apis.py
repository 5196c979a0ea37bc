"""``minifaas api create|list|delete``: the API gateway's routes, as ``wsk api`` manages them.

A route maps a base path, a relative path and a verb onto a web action (``-a web-export true``); the server
answers it at the URL ``api list`` shows. The commands call the same ``whisk.system/apimgmt`` endpoints as
``wsk api`` and the ``openwhisk`` npm client.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from .main import EXIT_OK, CliError, _print_json

if TYPE_CHECKING:
    from rich.console import Console

    from .main import Api

__all__ = ("add_api_parser", "cmd_api")

MGMT: Final = "/api/v1/web/whisk.system/apimgmt"
VERBS: Final = ("get", "post", "put", "delete", "patch", "head", "options")
RESPONSE_TYPES: Final = ("json", "http", "text", "html", "svg")


def add_api_parser(verbs: Any, verb: Callable[..., argparse.ArgumentParser]) -> None:
    """``api create|list|delete`` under the CLI's verbs (``verb`` adds the common options)."""
    api = verbs.add_parser("api", help="create, list or delete API gateway routes onto web actions")
    sub = api.add_subparsers(dest="verb", required=True, metavar="VERB")
    p = verb(sub, "create", "route BASEPATH RELPATH VERB to a web action")
    p.add_argument("basepath", help="the API's base path, e.g. /hello")
    p.add_argument("relpath", help="the path under it, e.g. /world or /books/{id}")
    p.add_argument("operation", metavar="VERB", type=str.lower, choices=VERBS, help="HTTP verb")
    p.add_argument("action", help="the web action (name or package/name)")
    p.add_argument("--response-type", default="json", choices=RESPONSE_TYPES, help="web action extension")
    p.add_argument("--apiname", "-n", help="the API's name (default: its base path)")
    p = verb(sub, "list", "list routes")
    p.add_argument("basepath", nargs="?", help="only this API (base path or name)")
    p = verb(sub, "delete", "delete an API, one of its paths, or one verb of a path")
    p.add_argument("basepath", help="the API's base path or name")
    p.add_argument("relpath", nargs="?")
    p.add_argument("operation", metavar="VERB", nargs="?", type=str.lower, choices=VERBS)
    for choice in sub.choices.values():
        choice.set_defaults(call=cmd_api)


async def cmd_api(api: Api, args: argparse.Namespace, console: Console) -> int:
    if args.verb == "create":
        return await _create(api, args, console)
    if args.verb == "delete":
        params = {"basepath": args.basepath, "force": "true"}
        if args.relpath:
            params["relpath"] = args.relpath
        if args.operation:
            params["operation"] = args.operation
        await api.call("DELETE", f"{MGMT}/deleteApi", params=params)
        what = " ".join(x for x in (args.operation and args.operation.upper(), args.relpath) if x)
        console.print(f"[green]ok:[/] deleted {what + ' from ' if what else ''}API [bold]{args.basepath}[/]")
        return EXIT_OK
    params = {"basepath": args.basepath} if args.basepath else {}
    apis = (await api.json("GET", f"{MGMT}/getApi", params=params)).get("apis", [])
    if args.json:
        _print_json(console, apis)
        return EXIT_OK
    from rich.table import Table

    table = Table("action", "verb", "api name", "url", title="routes")
    for entry in apis:
        value = entry.get("value") or {}
        doc = value.get("apidoc") or {}
        title = (doc.get("info") or {}).get("title", doc.get("basePath", ""))
        for relpath, ops in sorted((doc.get("paths") or {}).items()):
            for op, spec in sorted(ops.items()):
                target = spec.get("x-openwhisk") or {}
                pkg = target.get("package") or ""
                action = f"/{target.get('namespace', '_')}/{pkg + '/' if pkg and pkg != 'default' else ''}"
                table.add_row(action + str(target.get("action", "?")), op.upper(), title, value["gwApiUrl"] + relpath)
    console.print(table)
    return EXIT_OK


async def _create(api: Api, args: argparse.Namespace, console: Console) -> int:
    action = await api.json("GET", api.path("actions", args.action), params={"code": "false"})
    annotations = {a["key"]: a["value"] for a in action.get("annotations", [])}
    if annotations.get("web-export") is not True:
        raise CliError(
            f"action {args.action!r} is not a web action: update it with `-a web-export true` first "
            "(a route calls the action's web URL, which answers only for web actions)"
        )
    secure = annotations.get("require-whisk-auth")
    apidoc: dict[str, Any] = {
        "namespace": "_",
        "gatewayBasePath": args.basepath,
        "gatewayPath": args.relpath,
        "gatewayMethod": args.operation,
        "action": {
            "name": args.action,
            "namespace": action["namespace"].split("/")[0],
            "backendMethod": args.operation.upper(),
            **({"secureKey": secure} if isinstance(secure, str | int) and not isinstance(secure, bool) else {}),
        },
    }
    if args.apiname:
        apidoc["apiName"] = args.apiname
    created = await api.json(
        "POST", f"{MGMT}/createApi", params={"responsetype": args.response_type}, body={"apidoc": apidoc}
    )
    url = created["gwApiUrl"] + args.relpath
    console.print(f"[green]ok:[/] created API {args.basepath}{args.relpath} {args.operation.upper()} for action")
    console.print(url, soft_wrap=True)
    return EXIT_OK
