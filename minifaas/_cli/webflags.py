"""``--web`` and ``--web-secure`` of ``minifaas action create|update|deploy``, as ``wsk action`` has them.

``--web true|yes`` sets OpenWhisk's web annotations (``web-export: true``, ``raw-http: false``, ``final: true``),
``--web raw`` the same with ``raw-http: true``, ``--web false|no`` turns them off. ``--web-secure SECRET`` sets
``require-whisk-auth`` (``true``: a random number; ``false``: removes it). An update keeps the action's other
annotations, as ``wsk`` does: the server replaces annotations wholesale, so they are read first.
"""

from __future__ import annotations

import argparse
import secrets
from typing import TYPE_CHECKING, Any, Final

from .main import CliError

if TYPE_CHECKING:
    from .main import Api

__all__ = ("add_web_options", "apply_web_options")

WEB_MODES: Final = ("true", "yes", "false", "no", "raw")
#: wsk's ``--web-secure true`` draws a random 63-bit number
SECRET_BOUND: Final = 1 << 63


def add_web_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--web",
        type=str.lower,
        choices=WEB_MODES,
        help="make it a web action at /api/v1/web/NS/PKG/NAME (raw: unparsed query and body)",
    )
    p.add_argument(
        "--web-secure",
        metavar="SECRET",
        help="require this X-Require-Whisk-Auth value (true: a random one; false: none)",
    )


async def apply_web_options(api: Api, args: argparse.Namespace, body: dict[str, Any], *, keep: bool) -> None:
    """Put the web annotations ``args`` ask for into ``body`` (with the action's current ones when ``keep``)."""
    mode, secure = getattr(args, "web", None), getattr(args, "web_secure", None)
    if mode is None and secure is None:
        return
    annotations: dict[str, Any] = {}
    if keep and "annotations" not in body:
        resp = await api.call("GET", api.entity("actions", args.name), params={"code": "false"}, ok=(200, 404))
        if resp.status_code == 200:
            annotations = {a["key"]: a["value"] for a in resp.json().get("annotations", []) if a["key"] != "exec"}
    annotations.update({a["key"]: a["value"] for a in body.get("annotations", [])})
    if mode is not None:
        on = mode != "false" and mode != "no"
        annotations.update({"web-export": on, "raw-http": mode == "raw", "final": on})
    if secure is not None:
        if annotations.get("web-export") is not True:
            raise CliError("--web-secure needs a web action: add --web true")
        if secure.lower() == "false":
            annotations.pop("require-whisk-auth", None)
        else:
            annotations["require-whisk-auth"] = secrets.randbelow(SECRET_BOUND) if secure.lower() == "true" else secure
    body["annotations"] = [{"key": k, "value": v} for k, v in annotations.items()]
