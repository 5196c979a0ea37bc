"""Versions, aliases and weighted traffic splitting: the alias table alone, then through a real Engine."""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import minifaas
from minifaas._deploy.versions import ALIASES_FILE_NAME, AliasTable, VersionInUse
from minifaas.testing import assert_success
from tests.helpers.looplag import record_loop_lags

pytestmark = pytest.mark.anyio

SEED = 20240601
#: the smallest preload keeps sandbox starts fast (the zygote would otherwise import numpy, OpenCV, LiteRT)
PRELOAD = ("minifaas_sandbox.runtime",)
AB_CALLS = 1000
# Tolerance of the observed share of a split: with n draws of a version of weight share p, the count is
# Binomial(n, p), so the share has standard deviation sqrt(p * (1 - p) / n). For the 90/10 split over
# 1,000 invocations that is sqrt(0.1 * 0.9 / 1000) = 0.95 percentage points, and +-3 points is 3.2
# standard deviations: a correct router (any seed) misses it with probability ~0.16 %, and the seeded draw
# makes the run repeatable. A router that ignored the weights (50/50) or inverted them would be off by 40+.
AB_TOLERANCE = 0.03
# 100,000 draws of the table alone: sd of a 0.3 share is 0.145 points, so 1 point is ~7 sd
TABLE_DRAWS = 100_000
TABLE_TOLERANCE = 0.01

VERSIONED = "V = {v}\ndef main(args):\n    return {{'v': V}}\n"


# -- the table alone -----------------------------------------------------------------------------------------
def test_resolve_latest_pinned_and_alias() -> None:
    table = AliasTable()
    table.set_alias("f", "prod", "2", versions=["1", "2", "3"])
    assert table.resolve("f", ["1", "2", "3"]) == ("3", None)
    assert table.resolve("f@1", ["1", "2", "3"]) == ("1", None)
    assert table.resolve("f@prod", ["1", "2", "3"]) == ("2", "prod")
    with pytest.raises(minifaas.FunctionNotFound, match=r"no version '9' \(versions: 1, 2, 3\)"):
        table.resolve("f@9", ["1", "2", "3"])
    with pytest.raises(minifaas.FunctionNotFound, match="no alias 'beta' \\(aliases: prod\\)"):
        table.resolve("f@beta", ["1", "2", "3"])
    with pytest.raises(minifaas.FunctionNotFound, match="no function named 'g'"):
        table.resolve("g", [])


def test_weighted_draws_converge_and_replay() -> None:
    table = AliasTable(rng=random.Random(SEED))
    table.set_alias("f", "canary", {"1": 70, "2": 30, "3": 0})
    draws = [table.resolve("f@canary", ["1", "2", "3"])[0] for _ in range(TABLE_DRAWS)]
    counts = Counter(draws)
    assert counts["3"] == 0  # weight 0: routed to, never drawn
    assert abs(counts["2"] / TABLE_DRAWS - 0.30) < TABLE_TOLERANCE
    again = AliasTable(rng=random.Random(SEED))
    again.set_alias("f", "canary", {"1": 70, "2": 30, "3": 0})
    assert [again.resolve("f@canary", ["1", "2", "3"])[0] for _ in range(1000)] == draws[:1000]


@pytest.mark.parametrize(
    ("alias", "target", "match"),
    [
        ("123", "1", "invalid alias"),
        ("has space", "1", "invalid alias"),
        ("prod", "latest", "not a version number"),
        ("prod", {}, "non-empty"),
        ("prod", {"1": -1, "2": 5}, "finite number >= 0"),
        ("prod", {"1": float("nan")}, "finite number >= 0"),
        ("prod", {"1": True}, "finite number >= 0"),
        ("prod", {"1": 0, "2": 0}, "weight above 0"),
        ("prod", {"1": 50, "7": 50}, r"version\(s\) 7 that 'f' does not have"),
    ],
    ids=["numeric-alias", "space", "non-version", "empty", "negative", "nan", "bool", "all-zero", "unknown"],
)
def test_invalid_aliases_are_refused(alias: str, target: Any, match: str) -> None:
    table = AliasTable()
    with pytest.raises(minifaas.DeployError, match=match):
        table.set_alias("f", alias, target, versions=["1", "2"])
    assert table.aliases("f") == {}


def test_deleting_a_routed_version_is_refused() -> None:
    table = AliasTable()
    table.set_alias("f", "prod", {"1": 100, "2": 0}, versions=["1", "2"])
    table.set_alias("f", "beta", "2", versions=["1", "2"])
    with pytest.raises(VersionInUse, match=r"version 2 of 'f' is in use by alias\(es\) f@beta, f@prod"):
        table.check_deletable("f", "2")
    table.check_deletable("f", "3")
    assert issubclass(VersionInUse, minifaas.MinifaasError) and VersionInUse.__module__ == "minifaas"


def test_table_persists_atomically(tmp_path: Path) -> None:
    path = tmp_path / ALIASES_FILE_NAME
    table = AliasTable(path)
    table.set_alias("f", "prod", {"1": 90, "2": 10})
    table.set_alias("g", "live", "4")
    table.delete_alias("g", "live")
    assert json.loads(path.read_text())["aliases"] == {"f": {"prod": [["1", 90.0], ["2", 10.0]]}}
    assert [p.name for p in tmp_path.iterdir()] == [ALIASES_FILE_NAME]  # no temporary file left behind
    assert AliasTable(path).aliases("f") == {"prod": {"1": 90.0, "2": 10.0}}
    path.write_text('{"format": 1, "aliases": {"f": {"prod": [["x", 1]]}}}')
    with pytest.raises(minifaas.MinifaasError, match="is corrupt"):
        AliasTable(path)


# -- through the engine --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
async def minifaas_engine() -> AsyncIterator[minifaas.Engine]:
    async with minifaas.Engine(routing_seed=SEED, preload=PRELOAD) as eng:
        yield eng


async def deploy_versions(engine: minifaas.Engine, name: str, n: int) -> None:
    for v in range(1, n + 1):
        info = await engine.deploy(name, code=VERSIONED.format(v=v))
        assert info["version"] == str(v)


async def test_version_pinning(minifaas_engine: minifaas.Engine) -> None:
    await deploy_versions(minifaas_engine, "pin", 3)
    assert await minifaas_engine.invoke("pin") == {"v": 3}
    act = await minifaas_engine.call("pin@1")
    assert_success(act)
    assert act.result == {"v": 1} and act.version == "1" and "alias" not in act.annotations
    assert await minifaas_engine.invoke("pin@2") == {"v": 2}
    with pytest.raises(minifaas.FunctionNotFound, match="no version '4'"):
        await minifaas_engine.invoke("pin@4")
    await minifaas_engine.delete("pin")


async def test_alias_to_one_version(minifaas_engine: minifaas.Engine) -> None:
    await deploy_versions(minifaas_engine, "one", 2)
    assert await minifaas_engine.set_alias("one", "prod", "1") == {
        "name": "one",
        "alias": "prod",
        "routing": {"1": 100.0},
    }
    act = await minifaas_engine.call("one@prod")
    assert_success(act)
    assert act.result == {"v": 1} and act.version == "1" and act.annotations["alias"] == "prod"
    record = await minifaas_engine.activations.get(act.activation_id)
    assert record.annotations["alias"] == "prod"
    # a new deploy does not move the alias; repointing does, at once
    await minifaas_engine.deploy("one", code=VERSIONED.format(v=3))
    assert await minifaas_engine.invoke("one@prod") == {"v": 1}
    await minifaas_engine.set_alias("one", "prod", "3")
    assert await minifaas_engine.invoke("one@prod") == {"v": 3}
    assert (await minifaas_engine.get_alias("one", "prod"))["routing"] == {"3": 100.0}
    assert (await minifaas_engine.get_function("one"))["aliases"] == {"prod": {"3": 100.0}}
    await minifaas_engine.delete_alias("one", "prod")
    with pytest.raises(minifaas.FunctionNotFound, match="no alias 'prod'"):
        await minifaas_engine.invoke("one@prod")
    await minifaas_engine.delete("one")


async def test_ab_split_converges(minifaas_engine: minifaas.Engine) -> None:
    await deploy_versions(minifaas_engine, "ab", 3)
    await minifaas_engine.set_alias("ab", "live", {"2": 90, "3": 10})
    counts: Counter[str] = Counter()
    for i in range(AB_CALLS):
        act = await minifaas_engine.call("ab@live", {"i": i})
        assert_success(act)
        assert act.result == {"v": int(act.version)} and act.annotations["alias"] == "live"
        counts[act.version] += 1
    shares = {v: n / AB_CALLS for v, n in sorted(counts.items())}
    print(f"A/B 90/10 over {AB_CALLS} invocations: observed shares {shares}")
    assert set(counts) == {"2", "3"}  # version 1 is not in the alias, however latest or pinned it is
    assert abs(shares["3"] - 0.10) <= AB_TOLERANCE
    await minifaas_engine.delete("ab")


async def test_delete_version_in_use_is_refused(minifaas_engine: minifaas.Engine) -> None:
    await deploy_versions(minifaas_engine, "del", 3)
    await minifaas_engine.set_alias("del", "prod", {"1": 50, "2": 50})
    with pytest.raises(VersionInUse, match=r"version 1 of 'del' is in use by alias\(es\) del@prod"):
        await minifaas_engine.delete("del@1")
    assert await minifaas_engine.invoke("del@1") == {"v": 1}  # nothing was deleted
    await minifaas_engine.delete("del@3")  # not routed to: deletable
    assert (await minifaas_engine.get_function("del"))["versions"] == ["1", "2"]
    await minifaas_engine.set_alias("del", "prod", "2")
    await minifaas_engine.delete("del@1")
    assert (await minifaas_engine.get_function("del"))["versions"] == ["2"]
    # deleting the whole function takes its aliases with it
    await minifaas_engine.delete("del")
    await minifaas_engine.deploy("del", code=VERSIONED.format(v=1))
    with pytest.raises(minifaas.FunctionNotFound, match="no alias 'prod'"):
        await minifaas_engine.get_alias("del", "prod")
    await minifaas_engine.delete("del")


async def test_alias_errors(minifaas_engine: minifaas.Engine) -> None:
    with pytest.raises(minifaas.FunctionNotFound, match="no function named 'ghost'"):
        await minifaas_engine.set_alias("ghost", "prod", "1")
    await deploy_versions(minifaas_engine, "err", 1)
    with pytest.raises(minifaas.DeployError, match=r"version\(s\) 2 that 'err' does not have"):
        await minifaas_engine.set_alias("err", "prod", "2")
    with pytest.raises(minifaas.DeployError, match="invalid alias"):
        await minifaas_engine.set_alias("err", "1", "1")
    with pytest.raises(minifaas.FunctionNotFound):
        await minifaas_engine.delete_alias("err", "prod")
    await minifaas_engine.delete("err")


async def test_aliases_survive_a_restart(tmp_path: Path) -> None:
    async with minifaas.Engine(tmp_path, preload=PRELOAD) as engine:
        await deploy_versions(engine, "keep", 2)
        await engine.set_alias("keep", "prod", {"1": 25, "2": 75})
    saved = json.loads((tmp_path / ALIASES_FILE_NAME).read_text())
    assert saved["aliases"] == {"keep": {"prod": [["1", 25.0], ["2", 75.0]]}}
    async with minifaas.Engine(tmp_path, preload=PRELOAD) as engine:
        assert (await engine.get_alias("keep", "prod"))["routing"] == {"1": 25.0, "2": 75.0}


def test_version_numbers_are_never_reused(tmp_path: Path) -> None:
    path = tmp_path / ALIASES_FILE_NAME
    table = AliasTable(path)
    assert [table.next_version("f", []) for _ in range(3)] == ["1", "2", "3"]
    # after deleting version 3 (or the whole function) and a restart, the next deploy is 4
    assert AliasTable(path).next_version("f", ["1", "2"]) == "4"
    assert AliasTable(path).next_version("g", []) == "1"
    # an old table (format 1) is still read; the deployed versions keep the counter ahead of them
    path.write_text('{"format": 1, "aliases": {}}')
    assert AliasTable(path).next_version("f", ["1", "7"]) == "8"


def test_alias_refuses_a_version_whose_code_changed() -> None:
    table = AliasTable()
    table.set_alias("f", "prod", "1", versions=["1", "2"], digests={"1": "a" * 64, "2": "b" * 64})
    assert table.resolve("f@prod", ["1", "2"], digests={"1": "a" * 64, "2": "b" * 64}) == ("1", "prod")
    with pytest.raises(minifaas.AliasMismatch, match="set on version 1 with bundle digest aaaaaaaaaaaa"):
        table.resolve("f@prod", ["1"], digests={"1": "c" * 64})
    assert issubclass(minifaas.AliasMismatch, minifaas.FunctionNotFound)


async def test_deleted_version_numbers_stay_retired_across_restarts(tmp_path: Path) -> None:
    code = {c: f"def main(args):\n    return {{'code': '{c}'}}\n" for c in "ABC"}
    async with minifaas.Engine(tmp_path, preload=PRELOAD) as engine:
        await engine.deploy("f", code=code["A"])
        await engine.deploy("f", code=code["B"])
        await engine.set_alias("f", "prod", "1")
        assert (await engine.deploy("f", code=code["C"]))["version"] == "3"
        await engine.delete("f@3")
        assert (await engine.deploy("f", code=code["A"]))["version"] == "4"
        with pytest.raises(minifaas.FunctionNotFound, match="no version '3'"):
            await engine.invoke("f@3")
    async with minifaas.Engine(tmp_path, preload=PRELOAD) as engine:
        # the app redeploys other code first: it gets version 5, and the alias does not silently run it
        assert (await engine.deploy("f", code=code["B"]))["version"] == "5"
        with pytest.raises(minifaas.FunctionNotFound, match="routes to version '1', which is not deployed"):
            await engine.invoke("f@prod")
        await engine.delete("f")
        assert (await engine.deploy("f", code=code["C"]))["version"] == "6"


async def test_alias_mismatch_after_the_counter_was_lost(tmp_path: Path) -> None:
    async with minifaas.Engine(tmp_path, preload=PRELOAD) as engine:
        await engine.deploy("f", code="def main(args):\n    return {'code': 'A'}\n")
        await engine.set_alias("f", "prod", "1")
        assert await engine.invoke("f@prod") == {"code": "A"}
    # an older minifaas (or a hand edit) left the table without counters: version 1 is given again
    saved = json.loads((tmp_path / ALIASES_FILE_NAME).read_text())
    saved.pop("last_versions")
    (tmp_path / ALIASES_FILE_NAME).write_text(json.dumps(saved))
    async with minifaas.Engine(tmp_path, preload=PRELOAD) as engine:
        await engine.deploy("f", code="def main(args):\n    return {'code': 'B'}\n")
        with pytest.raises(minifaas.AliasMismatch, match="now runs bundle"):
            await engine.invoke("f@prod")
        await engine.set_alias("f", "prod", "1")
        assert await engine.invoke("f@prod") == {"code": "B"}


async def test_a_deploys_version_file_is_written_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The version counter is fsynced at every deploy: on the event loop, a slow disk stalled every activation
    running meanwhile (a warm function's calls during back-to-back deploys). With an fsync of 0.3 s the loop keeps
    ticking, the deploy still returns only once its number is on disk, and a restart never reuses it."""
    import os
    import time

    import anyio

    slow_s = 0.3
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(slow_s)
        real_fsync(fd)

    async with minifaas.Engine(tmp_path / "state", preload=PRELOAD) as engine:
        monkeypatch.setattr(os, "fsync", slow_fsync)
        lags: list[float] = []
        done = anyio.Event()

        async with anyio.create_task_group() as tg:
            tg.start_soon(record_loop_lags, lags, done)
            t0 = time.perf_counter()
            fn = await engine.deploy("f", code=VERSIONED.format(v=1))
            took = time.perf_counter() - t0
            done.set()
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert fn["version"] == "1" and took >= slow_s, (fn["version"], took)
        assert max(lags) < slow_s / 2, max(lags)
        saved = json.loads((tmp_path / "state" / ALIASES_FILE_NAME).read_text())
        assert saved["last_versions"] == {"f": 1}, saved


def test_reserved_versions_persist_newest_last_whatever_the_order(tmp_path: Path) -> None:
    """Two deploys reserve numbers back to back and persist them from worker threads: numbers differ, and a
    slower write of the older snapshot never lands over the newer one (which holds both)."""
    path = tmp_path / ALIASES_FILE_NAME
    table = AliasTable(path)
    first, persist_first = table.reserve_version("f")
    second, persist_second = table.reserve_version("f")
    assert (first, second) == ("1", "2")
    persist_second()
    persist_first()
    assert json.loads(path.read_text())["last_versions"] == {"f": 2}
    assert AliasTable(path).next_version("f") == "3"
