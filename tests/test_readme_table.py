"""The README benchmark table's generator: medians and ranges over rounds, rows from every bench that has them,
the table between its markers, and the hot path's frame decoder (whole frames, split frames, bad frames)."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path
from types import ModuleType

import msgpack
import pytest
from minifaas_sandbox import protocol as p

ROOT = Path(__file__).resolve().parent.parent


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("readme_table", ROOT / "benches" / "readme_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(value: float, side: float) -> dict[str, object]:
    return {"key": "k", "label": "a ratio", "value": value, "unit": "x", "goal": ">= 2x", "figures": {"us": side}}


def test_each_row_is_the_median_of_its_rounds_with_their_range() -> None:
    gen = _generator()
    (row,) = gen.summarize([[_row(v, s)] for v, s in ((2.0, 10), (1.0, 30), (3.5, 20), (2.5, 40), (1.5, 50))])
    assert (row["median"], row["min"], row["max"], row["n"]) == (2.0, 1.0, 3.5, 5)
    assert row["figures"] == {"us": 30}
    table = gen.render({"core": {"date": "2026-12-04", "rows": [row]}})
    assert "**2.00x** [1.00x-3.50x]" in table and "--only core" in table and "5 rounds" in table


def test_the_table_goes_between_the_markers_and_nowhere_else(tmp_path: Path) -> None:
    gen = _generator()
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{gen.BEGIN}\nold table\n{gen.END}\nafter\n")
    gen.write_readme("| new |", readme)
    gen.write_readme("| newer |", readme)
    assert readme.read_text() == f"intro\n{gen.BEGIN}\n| newer |\n{gen.END}\nafter\n"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        gen.write_readme("| t |", readme)


def test_the_wired_benches_contribute_rows_and_the_readme_has_the_markers() -> None:
    gen = _generator()
    assert {"core", "hostcpu", "callables", "coldstart", "isolation"} <= set(gen.discover())
    text = (ROOT / "README.md").read_text()
    assert text.count(gen.BEGIN) == 1 and text.count(gen.END) == 1


@pytest.mark.parametrize("split", [None, 1, 3, 4, 7], ids=["whole", "at-1", "at-3", "at-header", "at-7"])
def test_frames_decode_alike_whole_or_split(split: int | None) -> None:
    first = p.encode(p.RESULT, {"aid": "a" * 32, "status": "success", "result": {"x": b"\x00"}, "logs": []})
    frames = first + p.encode(p.READY, {"pid": 7})
    decoder = p.FrameDecoder()
    if split is None:  # exactly one whole frame per read: the fast path
        got = [m for frame in (first, frames[len(first) :]) for m in decoder.feed(frame)]
    else:
        got = [m for part in (frames[:split], frames[split:]) for m in decoder.feed(part)]
    assert got == [
        (p.RESULT, {"aid": "a" * 32, "status": "success", "result": {"x": b"\x00"}, "logs": []}),
        (p.READY, {"pid": 7}),
    ]


def test_a_whole_bad_frame_is_a_protocol_error() -> None:
    body = b"\xc1"  # never valid msgpack
    with pytest.raises(p.ProtocolError, match="undecodable"):
        list(p.FrameDecoder().feed(struct.pack(">I", len(body)) + body))
    body = msgpack.packb([1, {}, 3])
    with pytest.raises(p.ProtocolError):
        list(p.FrameDecoder().feed(struct.pack(">I", len(body)) + body))
