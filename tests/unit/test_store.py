"""The registry's record store: append, reload, tombstones, torn lines, compaction."""

from __future__ import annotations

import json

from corral.store import JsonlRecordStore


def rec(name: str, state: str = "WARM") -> dict:
    return {"container_name": name, "session_id": name, "state": state}


async def test_append_reload_and_tombstones(tmp_path):
    s = JsonlRecordStore(str(tmp_path))
    assert await s.load() == []
    await s.append([rec("a"), rec("b")], [])
    await s.append([rec("a", "RUNNING")], ["b"])
    await s.close()
    got = await JsonlRecordStore(str(tmp_path)).load()
    assert got == [rec("a", "RUNNING")]


async def test_a_torn_last_line_keeps_everything_before_it(tmp_path):
    s = JsonlRecordStore(str(tmp_path))
    await s.append([rec("a")], [])
    await s.close()
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"container_name": "b", "sess')
    assert [r["container_name"] for r in await JsonlRecordStore(str(tmp_path)).load()] == ["a"]


async def test_compact_folds_the_log_into_a_versioned_snapshot(tmp_path):
    s = JsonlRecordStore(str(tmp_path))
    await s.append([rec("a"), rec("b")], [])
    assert s.log_lines == 2
    await s.compact([rec("b", "RUNNING")])
    assert s.log_lines == 0
    snap = json.loads((tmp_path / "snapshot.json").read_text())
    assert snap["version"] == 1
    await s.append([rec("c")], [])
    await s.close()
    names = sorted(r["container_name"] for r in await JsonlRecordStore(str(tmp_path)).load())
    assert names == ["b", "c"]


async def test_small_appends_inline_and_large_ones_through_aiofiles_keep_their_order(tmp_path, monkeypatch):
    import corral.store as store

    monkeypatch.setattr(store, "INLINE_APPEND", 200)  # so that a few records count as large
    s = JsonlRecordStore(str(tmp_path))
    await s.append([rec("a")], [])  # inline
    # on disk before append returns (what the registry answers after), without closing the store
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["container_name"] == "a"
    big = [rec(f"big{i}") for i in range(10)]
    assert len(json.dumps(big)) > 200
    await s.append(big, [])  # through aiofiles' thread
    await s.append([rec("a", "RUNNING")], ["big3"])  # inline again, after the large one
    assert s.log_lines == 13
    await s.close()
    got = {r["container_name"]: r["state"] for r in await JsonlRecordStore(str(tmp_path)).load()}
    assert got == {"a": "RUNNING", **{f"big{i}": "WARM" for i in range(10) if i != 3}}
