"""Entry point of a spawned sandbox: ``python -m minifaas_sandbox --fd N [--preload a,b]``."""

from __future__ import annotations

import argparse
import importlib
import sys

from minifaas_sandbox import lifeline


def _main() -> int:
    parser = argparse.ArgumentParser(prog="minifaas_sandbox")
    parser.add_argument("--fd", type=int, required=True, help="fd of the protocol channel socket")
    parser.add_argument("--preload", default="", help="comma-separated modules to import before READY")
    parser.add_argument(lifeline.ARG, type=int, default=None, help="fd of the host's lifeline (read end)")
    ns = parser.parse_args()
    if ns.lifeline is not None:
        # first: a host that dies while the preload imports run must not leave this process behind
        lifeline.arm(ns.lifeline)
    preload = [m for m in ns.preload.split(",") if m]
    for mod in preload:
        importlib.import_module(mod)
    from minifaas_sandbox import runtime

    return runtime.serve(ns.fd, preloaded=tuple(preload))


if __name__ == "__main__":
    sys.exit(_main())
