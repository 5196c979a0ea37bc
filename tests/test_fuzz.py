"""Bad input fuzzing (hypothesis): payloads, code, zip bundles and protocol bytes.

Each bad input must end as a ``minifaas.MinifaasError`` subclass (InvalidPayload, PayloadTooLarge, DeployError) or
as a clean activation record, and the engine must keep serving. The protocol decoder may only raise ProtocolError.

Profiles: ``ci`` (default, small) and ``long`` (``HYPOTHESIS_PROFILE=long``, run by
``benches/bench_reliability.py``). With ``MINIFAAS_FUZZ_REPORT=<file>``, the counts of inputs tried and of each
outcome are written there as JSON when the module ends.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import decimal
import functools
import io
import json
import os
import stat
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from minifaas_sandbox import protocol as p

import minifaas

with warnings.catch_warnings():
    # hypothesis's report of a failing example imports libcst, whose import warns (an error under
    # filterwarnings=error): import it now, quietly, so a failure is reported instead of crashing pytest
    warnings.simplefilter("ignore", DeprecationWarning)
    with contextlib.suppress(ImportError):
        import hypothesis.extra._patching  # noqa: F401

settings.register_profile(
    "ci",
    max_examples=60,
    # the same examples on every run: CI fails only on a change of the code, never on a new random draw
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "long",
    max_examples=1500,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ECHO = "def main(args):\n    return {'echo': args}\n"
MAX_PAYLOAD_BYTES = 64 << 10
VALID = "import os\n\ndef helper(x):\n    return [x, x * 2]\n\ndef main(args):\n    return {'v': helper(len(args))}\n"
OUTCOMES: collections.Counter[str] = collections.Counter()


@pytest.fixture(scope="module")
def portal_engine() -> Iterator[tuple[BlockingPortal, minifaas.Engine]]:
    """One engine for the module, in an event loop of its own, so hypothesis drives it from plain functions."""
    with (
        start_blocking_portal("asyncio") as portal,
        portal.wrap_async_context_manager(minifaas.Engine()) as engine,
    ):
        portal.call(
            functools.partial(
                engine.deploy, "echo", code=ECHO, max_payload_bytes=MAX_PAYLOAD_BYTES, max_result_bytes=4 << 20
            )
        )
        yield portal, engine
        # the engine never crashed: it still serves
        assert portal.call(engine.invoke, "echo", {"after": True}) == {"echo": {"after": True}}
    report = os.environ.get("MINIFAAS_FUZZ_REPORT")
    if report:
        Path(report).write_text(json.dumps(dict(OUTCOMES), indent=1, sort_keys=True))


# -- payloads -------------------------------------------------------------------------------------------------
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)  # invalid UTF-8 is fine in bytes
)
bad_leaves = st.sampled_from(
    [set(), frozenset({1}), object(), 1j, decimal.Decimal(1), datetime.date(2020, 1, 1), bytearray(b"x"), range(2)]
) | st.one_of(
    st.integers(min_value=2**64),
    st.integers(max_value=-(2**63) - 1),
    st.characters(categories=["Cs"]).map(lambda c: f"a{c}b"),  # lone surrogates cannot be UTF-8
)
keys = st.text(max_size=8) | st.sampled_from([1, None, b"k", (1,), 2.5]) | st.characters(categories=["Cs"])


def _nested(depth: int, kind: str) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8), children, max_size=4)
        | st.tuples(children, children)
    )


payloads = st.one_of(
    st.dictionaries(st.text(max_size=8), st.recursive(json_leaves, _containers, max_leaves=20), max_size=5),
    st.dictionaries(keys, st.recursive(json_leaves | bad_leaves, _containers, max_leaves=12), max_size=4),
    st.tuples(st.integers(1, 3000), st.sampled_from(["list", "dict"])).map(lambda t: {"deep": _nested(*t)}),
    st.integers(MAX_PAYLOAD_BYTES - 64, 4 * MAX_PAYLOAD_BYTES).map(lambda n: {"blob": b"\xff" * n}),
    st.one_of(st.lists(json_leaves, max_size=3), st.text(max_size=5), st.none(), st.integers()),  # not a dict
)


@PROFILE
@given(payload=payloads)
def test_payloads(portal_engine: tuple[BlockingPortal, minifaas.Engine], payload: Any) -> None:
    portal, engine = portal_engine
    OUTCOMES["payloads tried"] += 1
    try:
        act = portal.call(engine.call, "echo", payload)
    except (minifaas.InvalidPayload, minifaas.PayloadTooLarge) as exc:
        OUTCOMES[f"payload {type(exc).__name__}"] += 1
        return
    OUTCOMES["payload accepted"] += 1
    assert act.status == "success", act
    # what the function saw is what was sent (tuples become lists, as in JSON; None means no arguments);
    # compared encoded, so NaN == NaN
    assert p.encode_body(act.result["echo"]) == p.encode_body({} if payload is None else payload)


# -- code -----------------------------------------------------------------------------------------------------
def _mutate(source: str, edits: list[tuple[int, str]]) -> str:
    for pos, text in edits:
        pos %= len(source) + 1
        source = source[:pos] + text + source[pos + len(text) // 2 :]
    return source


codes = st.one_of(
    st.text(max_size=200),
    st.lists(st.tuples(st.integers(0, 500), st.text(max_size=6)), min_size=1, max_size=4).map(
        lambda edits: _mutate(VALID, edits)
    ),
    st.tuples(st.sampled_from(["(", "[", "-", "not ", "{1:", "lambda: "]), st.integers(10, 200_000)).map(
        lambda t: f"x = {t[0] * t[1]}1\n" + VALID
    ),
    st.tuples(st.integers(1, 50_000), st.sampled_from([".b", "+1", "()"])).map(lambda t: f"x = a{t[1] * t[0]}\n"),
    st.sampled_from(["\0" + VALID, "\ufeff" + VALID, VALID + "\ud800", VALID.replace("main", "ma\udc80in")]),
)


@PROFILE
@given(code=codes, main=st.sampled_from(["main", "helper", "nope", "class", "1x", "os"]))
def test_code(portal_engine: tuple[BlockingPortal, minifaas.Engine], code: str, main: str) -> None:
    portal, engine = portal_engine
    OUTCOMES["code tried"] += 1
    try:
        portal.call(functools.partial(engine.deploy, "fuzzcode", code=code, main=main, timeout_s=5))
    except minifaas.DeployError:
        OUTCOMES["code DeployError"] += 1
        return
    try:
        act = portal.call(engine.call, "fuzzcode", {"x": 1})
    finally:
        portal.call(engine.delete, "fuzzcode")
    OUTCOMES[f"code deployed, ran: {act.status}"] += 1
    assert act.done, act


# -- zip bundles ----------------------------------------------------------------------------------------------
entry_names = st.one_of(
    st.sampled_from(["__main__.py", "helper.py", "pkg/__init__.py", "minifaas.json", "requirements.txt"]),
    st.sampled_from(["../evil.py", "/abs.py", "..\\evil.py", "C:evil.py", "a/../../x.py", "./__main__.py", "d/"]),
    st.text(st.characters(categories=["L", "N", "P"]), min_size=1, max_size=12),
)
contents = st.one_of(
    st.just(VALID.encode()),
    st.binary(max_size=200),
    st.sampled_from(
        [
            b'{"params": {"a": 1}}',
            b'{"models": {"m": "../../etc/passwd"}}',
            b'{"models": {"m": "a\\u0000b"}}',
            b"[" * 100_000,
            b'{"include": "x"}',
            b"def main(args):\n    return {\n",
        ]
    ),
)
entries = st.lists(
    st.tuples(entry_names, contents, st.sampled_from(["file", "symlink", "fifo", "exec"])), min_size=0, max_size=5
)
methods = st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
corruptions = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4)
MODES = {"file": 0o100644, "symlink": 0o120777, "fifo": 0o010644, "exec": 0o100755}


def _zip_bytes(items: list[tuple[str, bytes, str]], method: int, flips: list[tuple[int, int]], cut: int) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", method) as zf:
        warnings.simplefilter("ignore", UserWarning)  # duplicate names are one of the bad inputs
        for name, data, kind in items:
            info = zipfile.ZipInfo(name)
            info.external_attr = MODES[kind] << 16
            info.compress_type = method
            zf.writestr(info, data)
    raw = bytearray(buf.getvalue())
    for pos, byte in flips:
        if raw:
            raw[pos % len(raw)] = byte
    return bytes(raw[: len(raw) - cut] if 0 < cut < len(raw) else raw)


@PROFILE
@given(
    items=entries,
    method=methods,
    flips=corruptions,
    cut=st.integers(0, 40),
    with_main=st.booleans(),
    garbage=st.none() | st.binary(min_size=1, max_size=300),
)
def test_zip_bundles(
    portal_engine: tuple[BlockingPortal, minifaas.Engine],
    items: list[tuple[str, bytes, str]],
    method: int,
    flips: list[tuple[int, int]],
    cut: int,
    with_main: bool,
    garbage: bytes | None,
) -> None:
    portal, engine = portal_engine
    OUTCOMES["zip tried"] += 1
    if with_main:
        items = [("__main__.py", VALID.encode(), "file"), *items]
    data = b"PK\x03\x04" + garbage if garbage is not None else _zip_bytes(items, method, flips, cut)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bundle.zip"
        path.write_bytes(data)
        try:
            portal.call(functools.partial(engine.deploy, "fuzzzip", path=path, timeout_s=5))
        except minifaas.DeployError:
            OUTCOMES["zip DeployError"] += 1
            return
    try:
        act = portal.call(engine.call, "fuzzzip", {})
    finally:
        portal.call(engine.delete, "fuzzzip")
    OUTCOMES[f"zip deployed, ran: {act.status}"] += 1
    assert act.done, act


def test_zip_entries_are_plain_files_inside_the_bundle(
    portal_engine: tuple[BlockingPortal, minifaas.Engine], tmp_path: Path
) -> None:
    portal, engine = portal_engine
    items = [("__main__.py", VALID.encode(), "file"), ("fifo", b"x", "fifo"), ("run.sh", b"#!/bin/sh\n", "exec")]
    path = tmp_path / "b.zip"
    path.write_bytes(_zip_bytes(items, zipfile.ZIP_DEFLATED, [], 0))
    info = portal.call(functools.partial(engine.deploy, "plainzip", path=path))
    try:
        assert engine._work_dir is not None
        unpacked = engine._work_dir / info["digest"]
        for f in unpacked.rglob("*"):
            mode = f.lstat().st_mode
            assert stat.S_ISREG(mode) or stat.S_ISDIR(mode), f
            assert f.resolve().is_relative_to(unpacked.resolve())
    finally:
        portal.call(engine.delete, "plainzip")


def _patch_headers(data: bytes, offset: int, value: bytes) -> bytes:
    """Overwrite ``value`` at ``offset`` of the local header and of the central directory entry (one-entry zip)."""
    raw = bytearray(data)
    central = raw.index(b"PK\x01\x02")
    raw[offset : offset + len(value)] = value
    # the central entry has 16 more bytes before the fields shared with the local header (version made by, ...)
    shift = 2 if offset >= 4 else 0
    raw[central + offset + shift : central + offset + shift + len(value)] = value
    return bytes(raw)


def _one(name: str, data: bytes, method: int = zipfile.ZIP_DEFLATED) -> bytes:
    return _zip_bytes([(name, data, "file")], method, [], 0)


def _corrupt_deflate() -> bytes:
    raw = bytearray(_one("__main__.py", VALID.encode() * 50))
    for i in range(60, 90):
        raw[i] ^= 0x5A
    return bytes(raw)


def _bad_utf8_name() -> bytes:
    raw = bytearray(_one("\u00e9\u00e9.py", b"x = 1\n"))  # non-ASCII: the UTF-8 flag is set
    return bytes(raw).replace("\u00e9\u00e9".encode(), b"\xff\xfe\xff\xfe")


#: crafted zips that each once escaped as a non-DeployError (found by the long fuzz run, kept as regressions)
BAD_ZIPS = {
    "encrypted-flag": (lambda: _patch_headers(_one("__main__.py", VALID.encode()), 6, b"\x01"), "RuntimeError"),
    "compression-99": (lambda: _patch_headers(_one("__main__.py", VALID.encode()), 8, b"\x63\x00"), "NotImplemented"),
    "bad-utf8-name": (_bad_utf8_name, "UnicodeDecodeError"),
    "corrupt-deflate": (_corrupt_deflate, "cannot unpack zip"),
    "deep-manifest": (
        lambda: _zip_bytes(
            [("__main__.py", VALID.encode(), "file"), ("minifaas.json", b"[" * 100_000, "file")],
            zipfile.ZIP_DEFLATED,
            [],
            0,
        ),
        "invalid manifest",
    ),
    "nul-model-path": (
        lambda: _zip_bytes(
            [("__main__.py", VALID.encode(), "file"), ("minifaas.json", b'{"models": {"m": "a\\u0000b"}}', "file")],
            zipfile.ZIP_DEFLATED,
            [],
            0,
        ),
        "model path for 'm'",
    ),
    "requirements-not-utf8": (
        lambda: _zip_bytes(
            [("__main__.py", VALID.encode(), "file"), ("requirements.txt", b"\x80", "file")],
            zipfile.ZIP_STORED,
            [],
            0,
        ),
        "requirements.txt is not UTF-8",
    ),
    "deep-python": (
        lambda: _zip_bytes(
            [("__main__.py", VALID.encode(), "file"), ("util.py", b"x = " + b"-" * 100_000 + b"1\n", "file")],
            zipfile.ZIP_DEFLATED,
            [],
            0,
        ),
        "nested too deeply",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ZIPS), ids=list(BAD_ZIPS))
def test_crafted_bad_zips(portal_engine: tuple[BlockingPortal, minifaas.Engine], tmp_path: Path, case: str) -> None:
    portal, engine = portal_engine
    build, fragment = BAD_ZIPS[case]
    path = tmp_path / f"{case}.zip"
    path.write_bytes(build())
    with pytest.raises(minifaas.DeployError, match=fragment):
        portal.call(functools.partial(engine.deploy, "crafted", path=path))


@pytest.mark.parametrize(
    "code",
    ["x = " + "-" * 100_000 + "1\n" + VALID, "x = a" + ".b" * 200_000 + "\n" + VALID],
    ids=["100k-unary", "200k-attributes"],
)
def test_deeply_nested_code(portal_engine: tuple[BlockingPortal, minifaas.Engine], code: str) -> None:
    portal, engine = portal_engine
    with pytest.raises(minifaas.DeployError, match="nested too deeply"):
        portal.call(functools.partial(engine.deploy, "deep", code=code))


# -- protocol decoder ----------------------------------------------------------------------------------------
messages = st.tuples(
    st.integers(0, 200),
    st.dictionaries(st.text(max_size=5), st.recursive(json_leaves, lambda c: st.lists(c, max_size=3), max_leaves=6)),
)


def _feed_all(chunks: list[bytes]) -> list[p.Message]:
    decoder = p.FrameDecoder()
    out: list[p.Message] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@PROFILE
@given(chunks=st.lists(st.binary(max_size=64), max_size=8))
def test_decoder_random_bytes(chunks: list[bytes]) -> None:
    OUTCOMES["decoder byte strings tried"] += 1
    try:
        _feed_all(chunks)
    except p.ProtocolError:
        OUTCOMES["decoder ProtocolError"] += 1


@PROFILE
@given(
    msgs=st.lists(messages, max_size=4),
    garbage=st.binary(max_size=32),
    where=st.integers(0, 4),
    cuts=st.lists(st.integers(0, 10_000), max_size=6),
)
def test_decoder_frames_with_garbage(
    msgs: list[tuple[int, dict[str, Any]]], garbage: bytes, where: int, cuts: list[int]
) -> None:
    OUTCOMES["decoder frame streams tried"] += 1
    frames = [p.encode(kind, fields) for kind, fields in msgs]
    clean = b"".join(frames)
    # valid frames, however they are split, decode to exactly what was sent (compared encoded: NaN != NaN)
    assert [p.encode(kind, fields) for kind, fields in _feed_all(_split(clean, cuts))] == frames
    frames.insert(min(where, len(frames)), garbage)
    try:
        _feed_all(_split(b"".join(frames), cuts))
    except p.ProtocolError:
        OUTCOMES["decoder ProtocolError"] += 1
