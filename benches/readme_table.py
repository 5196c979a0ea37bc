"""README's benchmark table, regenerated from medians of alternating rounds, each figure with its range.

Run: ``python benches/readme_table.py [--rounds 5] [--only core,callables] [--print]``.

How a bench takes part: its module (``benches/bench_<name>.py``) defines ``table_rows() -> list[dict]``, which
measures ONE round (its comparisons side by side, as the bench itself does) and returns rows like::

    {"key": "tput_vs_ppe",                 # unique within the bench
     "label": "throughput, 2 sandboxes, 64 in flight, vs ProcessPoolExecutor(2)",
     "value": 2.41, "unit": "x",           # the figure the table shows (a ratio, or "ms", "us", "/s", "MiB")
     "goal": ">= 2x",                      # optional, shown as is
     "figures": {"minifaas /s": 21000.0, "ProcessPoolExecutor /s": 8700.0}}   # optional side figures

Every module with a ``table_rows`` is found (``--list`` shows them); nothing else needs registering. Each round runs
every selected bench once, each in a fresh interpreter, one after the other, so the benches alternate round after
round and see the same drifting machine; the table shows for each row the median of its rounds and their range
(min-max), side figures as medians. Results are kept in ``benches/data/readme_table.json`` per bench, so ``--only``
re-measures some benches and the table keeps the others' last results (with their date).

The table is written into README.md between ``<!-- readme-table:begin -->`` and ``<!-- readme-table:end -->``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

BENCHES_DIR: Final = Path(__file__).resolve().parent
ROOT: Final = BENCHES_DIR.parent
RESULTS_FILE: Final = BENCHES_DIR / "data" / "readme_table.json"
README: Final = ROOT / "README.md"
BEGIN: Final = "<!-- readme-table:begin -->"
END: Final = "<!-- readme-table:end -->"
#: the first line a child prints before its rows, so whatever else a bench prints is ignored
ROWS_MARK: Final = "README-TABLE-ROWS "
#: one bench round may take at most this long before it counts as failed
ROUND_TIMEOUT_S: Final = 600
#: benches in this order first (the rest alphabetically)
ORDER: Final = ("core", "hostcpu", "callables", "coldstart", "isolation")


def discover() -> list[str]:
    """Names (``bench_<name>.py``) of the benches that define ``table_rows``, found without importing them."""
    found = [
        path.stem.removeprefix("bench_")
        for path in sorted(BENCHES_DIR.glob("bench_*.py"))
        if re.search(r"^def table_rows\(", path.read_text(), re.MULTILINE)
    ]
    return sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def run_child(name: str) -> list[dict[str, Any]]:
    """One round of one bench, in a fresh interpreter."""
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(BENCHES_DIR)!r})\n"
        f"import bench_{name} as b\n"
        "rows = b.table_rows()\n"
        f"print({ROWS_MARK!r} + json.dumps(rows), flush=True)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=ROUND_TIMEOUT_S, cwd=str(ROOT)
    )
    for line in proc.stdout.splitlines():
        if line.startswith(ROWS_MARK):
            rows: list[dict[str, Any]] = json.loads(line[len(ROWS_MARK) :])
            return rows
    raise RuntimeError(f"bench_{name} gave no rows (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def summarize(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per row key: median and range of its values over the rounds, medians of its side figures."""
    out: list[dict[str, Any]] = []
    keys = list(dict.fromkeys(row["key"] for rows in rounds for row in rows))
    for key in keys:
        rows = [row for rs in rounds for row in rs if row["key"] == key]
        values = [float(row["value"]) for row in rows]
        figures: dict[str, list[float]] = {}
        for row in rows:
            for fname, fvalue in (row.get("figures") or {}).items():
                figures.setdefault(fname, []).append(float(fvalue))
        last = rows[-1]
        out.append(
            {
                "key": key,
                "label": last["label"],
                "unit": last.get("unit", ""),
                "goal": last.get("goal"),
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "n": len(values),
                "figures": {f: statistics.median(v) for f, v in figures.items()},
            }
        )
    return out


def fmt(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}x"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.2f}"
    return f"{text} {unit}".rstrip() if unit not in ("/s",) else f"{text}/s"


def render(results: dict[str, Any]) -> str:
    lines = [
        "| bench | what (medians of alternating rounds; range in brackets) | result | goal | side figures (medians) |",
        "|---|---|---|---|---|",
    ]
    for name in sorted(results, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n)):
        entry = results[name]
        command = f"`python benches/readme_table.py --only {name}`"
        for i, row in enumerate(entry["rows"]):
            unit = row["unit"]
            result = f"**{fmt(row['median'], unit)}** [{fmt(row['min'], unit)}-{fmt(row['max'], unit)}]"
            side = ", ".join(f"{k} {fmt(v, '')}" for k, v in row["figures"].items())
            load = f", load average {entry['load']} on {entry.get('cores', '?')} cores" if "load" in entry else ""
            where = f"{command}<br>{entry['date']}, {row['n']} rounds{load}" if i == 0 else ""
            lines.append(f"| {where} | {row['label']} | {result} | {row['goal'] or ''} | {side} |")
    return "\n".join(lines)


def write_readme(table: str, readme: Path) -> None:
    text = readme.read_text()
    block = f"{BEGIN}\n{table}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        raise SystemExit(f"{readme} has no {BEGIN} ... {END} markers: add them where the table belongs")
    readme.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (at least 5 for the README)")
    ap.add_argument("--only", default="", help="comma-separated benches to measure (default: every one)")
    ap.add_argument("--list", action="store_true", help="list the benches that contribute rows")
    ap.add_argument("--print", action="store_true", help="print the table, leave README.md alone")
    ap.add_argument("--render", action="store_true", help="re-render the table from the saved results only")
    ns = ap.parse_args()
    available = discover()
    if ns.list:
        print("\n".join(available))
        return
    chosen = [n for n in ns.only.split(",") if n] or available
    unknown = [n for n in chosen if n not in available]
    if unknown:
        raise SystemExit(f"no bench with table_rows named {', '.join(unknown)} (have: {', '.join(available)})")
    results: dict[str, Any] = json.loads(RESULTS_FILE.read_text()) if RESULTS_FILE.exists() else {}
    if not ns.render:
        rounds: dict[str, list[list[dict[str, Any]]]] = {n: [] for n in chosen}
        t0 = time.monotonic()
        loads: list[float] = []
        for r in range(ns.rounds):
            for name in chosen:
                loads.append(os.getloadavg()[0])
                t = time.monotonic()
                rounds[name].append(run_child(name))
                print(f"round {r + 1}/{ns.rounds} {name}: {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)
        print(f"measured in {time.monotonic() - t0:.0f} s", file=sys.stderr)
        date = time.strftime("%Y-%m-%d")
        load = statistics.median(loads)  # a busy machine's figures say so in the table
        for name in chosen:
            results[name] = {
                "date": date,
                "load": round(load, 1),
                "cores": os.cpu_count(),
                "rows": summarize(rounds[name]),
            }
        RESULTS_FILE.parent.mkdir(exist_ok=True)
        RESULTS_FILE.write_text(json.dumps(results, indent=1) + "\n")
    table = render(results)
    if ns.print:
        print(table)
    else:
        write_readme(table, README)
        print(table)


if __name__ == "__main__":
    main()
