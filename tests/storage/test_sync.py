"""What every storage backend must do, run against LocalStorage and OSSStorage (on the OSS test server) alike.

Round trips with modes, mtimes, empty directories and awkward names; 2,000 files;
the additive default and mirror mode; special files skipped and reported; and the
sync manifest: written last, required by ``download_folder(..., expect=True)``.
"""

from __future__ import annotations

import os
import socket
import stat

import pytest

from corral.errors import InvalidRequest, NotFound, StorageError
from corral.storage import LocalStorage, SyncManifest

AWKWARD = [
    "plain.txt",
    "with space/a b.txt",
    "données/ünïcødé 文件.txt",
    "odd+%#?&=;name.txt",
    "emoji 🚀/x",
    ".hidden/.dotfile",
    "deep/" * 20 + "leaf.bin",
]


def write(path: str, data: bytes, mode: int | None = None, mtime_ns: int | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    if mode is not None:
        os.chmod(path, mode)
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))


def snapshot(root: str) -> dict:
    """rel path -> (kind, bytes, mode, mtime_ns) for every entry; nothing else may be there."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            assert stat.S_ISDIR(os.lstat(p).st_mode), p
            out[os.path.relpath(p, root)] = ("dir",)
        for f in filenames:
            p = os.path.join(dirpath, f)
            st = os.lstat(p)
            assert stat.S_ISREG(st.st_mode), p
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = ("file", fh.read(), st.st_mode & 0o777, st.st_mtime_ns)
    return out


@pytest.fixture
def ws(tmp_path):
    w = tmp_path / "ws"
    for i, rel in enumerate(AWKWARD):
        write(str(w / rel), f"content of {rel}\n".encode() * (i + 1), mtime_ns=1_600_000_000_123_456_789 + i)
    write(str(w / "bin.dat"), bytes(range(256)) * 1000, mode=0o600, mtime_ns=1_500_000_000_000_000_000)
    write(str(w / "run.sh"), b"#!/bin/sh\necho hi\n", mode=0o755)
    write(str(w / "empty.txt"), b"")
    os.makedirs(w / "empty" / "nested_empty")
    os.makedirs(w / "also empty")
    return str(w)


def test_round_trip_keeps_bytes_modes_mtimes_empty_dirs_and_names(store, ws, tmp_path):
    up = store.upload_folder(ws, "sessions/s1")
    assert up.skipped == []
    assert up.files == len(AWKWARD) + 3
    out = str(tmp_path / "restored")
    down = store.download_folder("sessions/s1", out, expect=True)
    assert (down.files, down.bytes, down.skipped) == (up.files, up.bytes, [])
    assert snapshot(out) == snapshot(ws)
    assert down.synced_at is not None


def test_two_thousand_small_files(store, tmp_path):
    w = tmp_path / "many"
    for i in range(2000):
        write(str(w / f"d{i % 20:02d}" / f"f{i:04d}.txt"), os.urandom(64))
    up = store.upload_folder(str(w), "many")
    assert up.files == 2000 and up.skipped == []
    assert len(store.last_sync("many").files) == 2000
    out = str(tmp_path / "out")
    down = store.download_folder("many", out, expect=True)
    assert down.files == 2000
    assert snapshot(out) == snapshot(str(w))


def test_upload_is_additive_by_default_and_mirror_removes(store, ws, tmp_path):
    store.upload_folder(ws, "s")
    os.remove(os.path.join(ws, "plain.txt"))
    os.rmdir(os.path.join(ws, "empty", "nested_empty"))
    rep = store.upload_folder(ws, "s")
    assert rep.deleted == 0
    kept = str(tmp_path / "kept")
    store.download_folder("s", kept, expect=True)
    assert os.path.exists(os.path.join(kept, "plain.txt"))  # additive: still in storage
    # the manifest describes the last upload only; the extra file is no obstacle
    assert "plain.txt" not in store.last_sync("s").files

    rep = store.upload_folder(ws, "s", mirror=True)
    assert rep.deleted == 2  # plain.txt and the directory nested_empty
    mirrored = str(tmp_path / "mirrored")
    store.download_folder("s", mirrored, expect=True)
    assert not os.path.exists(os.path.join(mirrored, "plain.txt"))
    assert snapshot(mirrored) == snapshot(ws)


def test_overwrite_changes_content_and_mode(store, ws, tmp_path):
    store.upload_folder(ws, "s")
    write(os.path.join(ws, "plain.txt"), b"changed", mode=0o700)
    store.upload_folder(ws, "s")
    out = str(tmp_path / "out")
    store.download_folder("s", out)
    p = os.path.join(out, "plain.txt")
    assert open(p, "rb").read() == b"changed" and os.stat(p).st_mode & 0o777 == 0o700


def test_special_files_are_skipped_and_reported(store, ws, tmp_path):
    secret = tmp_path / "host_secret"
    secret.write_bytes(b"TOP SECRET")
    os.symlink(str(secret), os.path.join(ws, "steal"))
    os.symlink(str(tmp_path), os.path.join(ws, "dirlink"))
    os.symlink("/nonexistent", os.path.join(ws, "dangling"))
    os.mkfifo(os.path.join(ws, "pipe"))
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.path.join(ws, "sock"))
    expected = {"steal": "symlink (not followed)", "dirlink": "symlink (not followed)",
                "dangling": "symlink (not followed)", "pipe": "fifo", "sock": "socket"}
    try:
        os.mknod(os.path.join(ws, "null"), 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        expected["null"] = "character device"
    except PermissionError:
        pass  # no CAP_MKNOD here: the device case is covered where it is allowed
    try:
        rep = store.upload_folder(ws, "s")
    finally:
        sock.close()
    assert dict(rep.skipped) == expected
    assert dict(store.last_sync("s").skipped) == expected
    out = str(tmp_path / "out")
    store.download_folder("s", out, expect=True)
    assert not set(expected) & set(os.listdir(out))
    for dirpath, _, files in os.walk(out):
        for f in files:
            assert b"TOP SECRET" not in open(os.path.join(dirpath, f), "rb").read()


def test_a_name_that_is_not_utf8(store, tmp_path):
    w = tmp_path / "w"
    w.mkdir()
    (w / "ok.txt").write_bytes(b"ok")
    bad = os.fsencode(str(w)) + b"/bad\xff.txt"
    with open(bad, "wb") as f:
        f.write(b"raw")
    rep = store.upload_folder(str(w), "s")
    out = tmp_path / "out"
    store.download_folder("s", str(out), expect=True)
    if isinstance(store, LocalStorage):
        assert rep.skipped == [] and open(os.fsencode(str(out)) + b"/bad\xff.txt", "rb").read() == b"raw"
    else:  # an OSS key must be UTF-8: the file is reported, not mangled
        assert [reason for _, reason in rep.skipped] == ["name is not valid UTF-8"]
        assert os.listdir(out) == ["ok.txt"]


# ---------------------------------------------------------------- the manifest


def test_a_session_never_synced(store, tmp_path):
    out = str(tmp_path / "out")
    rep = store.download_folder("never/synced", out)
    assert rep.files == 0 and rep.synced_at is None
    assert store.last_sync("never/synced") is None and not store.exists("never/synced")
    with pytest.raises(StorageError, match="manifest is missing"):
        store.download_folder("never/synced", out, expect=True)


def test_manifest_describes_the_upload_and_stays_out_of_the_workspace(store, ws, tmp_path):
    up = store.upload_folder(ws, "sessions/s1")
    m = store.last_sync("sessions/s1")
    assert isinstance(m, SyncManifest)
    assert m.bytes == up.bytes and sum(m.files.values()) == up.bytes
    assert m.files["données/ünïcødé 文件.txt"] == os.path.getsize(os.path.join(ws, "données/ünïcødé 文件.txt"))
    assert set(m.dirs) >= {"empty/nested_empty", "also empty"}
    out = str(tmp_path / "out")
    rep = store.download_folder("sessions/s1", out, expect=True)
    assert rep.synced_at == m.completed_at
    assert not [f for _, _, files in os.walk(out) for f in files if "corral-sync" in f]
    # a workspace may hold a file of the manifest's name: it is an ordinary file
    write(os.path.join(ws, "sessions", "s1.corral-sync.json"), b"not a manifest")
    write(os.path.join(ws, "s1.corral-sync.json"), b"nor this")
    store.upload_folder(ws, "sessions/s1")
    assert store.last_sync("sessions/s1").files["s1.corral-sync.json"] == 8
    store.download_folder("sessions/s1", str(tmp_path / "again"), expect=True)


def test_expect_names_what_is_missing(store, ws, tmp_path):
    store.upload_folder(ws, "s")
    _remove_from_storage(store, "s", ["plain.txt", "run.sh"])
    out = tmp_path / "out"
    with pytest.raises(StorageError) as e:
        store.download_folder("s", str(out), expect=True)
    assert "2 of 10 files missing" in str(e.value) and "'plain.txt'" in str(e.value) and "'run.sh'" in str(e.value)
    assert e.value.details["missing"] == ["plain.txt", "run.sh"]
    assert not out.exists()  # nothing written before the check
    rep = store.download_folder("s", str(out))  # without expect, what is there comes back
    assert rep.files == 8


def test_expect_notices_a_changed_size(store, ws, tmp_path):
    store.upload_folder(ws, "s")
    _replace_in_storage(store, "s", "plain.txt", b"truncated")
    with pytest.raises(StorageError, match=r"changed size: 'plain.txt \(9 bytes, expected 21\)'"):
        store.download_folder("s", str(tmp_path / "out"), expect=True)


def test_download_never_deletes_local_files(store, ws, tmp_path):
    store.upload_folder(ws, "s")
    out = tmp_path / "out"
    out.mkdir()
    (out / "local-only.txt").write_bytes(b"mine")
    store.download_folder("s", str(out), expect=True)
    assert (out / "local-only.txt").read_bytes() == b"mine"


def test_delete_removes_the_manifest_and_the_files(store, ws):
    store.upload_folder(ws, "s")
    assert store.exists("s")
    assert store.delete("s") == 10
    assert not store.exists("s") and store.last_sync("s") is None
    assert store.delete("s") == 0


def test_bad_paths(store, ws, tmp_path):
    for bad in ("../x", "a/../../x", "", "..", "s.corral-sync.json"):
        with pytest.raises(InvalidRequest):
            store.upload_folder(ws, bad)
    with pytest.raises(NotFound):
        store.upload_folder(str(tmp_path / "nope"), "s")
    assert not store.exists("s")


async def test_async_twins(store, ws, tmp_path):
    rep = await store.upload_folder_async(ws, "s")
    assert (await store.last_sync_async("s")).files
    down = await store.download_folder_async("s", str(tmp_path / "o"), expect=True)
    assert down.files == rep.files
    assert await store.exists_async("s")
    assert await store.delete_async("s") == rep.files


# ---------------------------------------------------------------- helpers that reach into each backend


def _remove_from_storage(store, path: str, rels: list[str]) -> None:
    if isinstance(store, LocalStorage):
        for rel in rels:
            os.remove(os.path.join(store.resolve(path), rel))
    else:
        store.bucket.batch_delete_objects([f"{path}/{rel}" for rel in rels])


def _replace_in_storage(store, path: str, rel: str, data: bytes) -> None:
    if isinstance(store, LocalStorage):
        with open(os.path.join(store.resolve(path), rel), "wb") as f:
            f.write(data)
    else:
        store.bucket.put_object(f"{path}/{rel}", data)
