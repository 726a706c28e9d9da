"""Unit tests of corral.storage: local round trips, the symlink/special-file guards, OSS pure parts.

No network here: the OSS transport runs against the OSS-protocol test server in
tests/storage; this file covers its pure parts (key mapping, upload plan,
download key checks, error mapping, redaction).
"""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import stat

import oss2.exceptions
import pytest

from corral.errors import InvalidRequest, NotFound, StorageError
from corral.models import SandboxManagerEnvConfig
from corral.storage import LocalStorage, OSSStorage, Storage, SyncReport, make_storage, walk_regular_files
from corral.storage.oss import (
    download_target,
    is_transient,
    manifest_key,
    map_oss_error,
    object_key,
    plan_upload,
    redact,
    storage_prefix,
)
from corral.storage.tree import SkipEntry, TreeWriter, empty_dirs, safe_relparts


def write(path, data: bytes = b"x", mode: int | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    if mode is not None:
        os.chmod(path, mode)


def tree_of(root) -> dict[str, bytes | None]:
    """rel path -> bytes for files, None for directories; fails on anything else."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            assert not os.path.islink(p), p
            out[os.path.relpath(p, root)] = None
        for f in filenames:
            p = os.path.join(dirpath, f)
            assert stat.S_ISREG(os.lstat(p).st_mode), p
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


@pytest.fixture
def ws(tmp_path):
    """A workspace with nested dirs, a binary file, an empty dir and an executable."""
    w = tmp_path / "ws"
    write(str(w / "a.txt"), b"hello")
    write(str(w / "sub" / "deep" / "bin.dat"), bytes(range(256)) * 1000)
    write(str(w / "sub" / "run.sh"), b"#!/bin/sh\necho hi\n", mode=0o755)
    os.makedirs(w / "empty" / "nested_empty")
    return str(w)


@pytest.fixture
def store(tmp_path):
    return LocalStorage(str(tmp_path / "store"))


@pytest.fixture
def secret(tmp_path):
    p = tmp_path / "host_secret"
    p.write_bytes(b"TOP SECRET")
    return str(p)


# ---------------------------------------------------------------- local round trip


def test_local_round_trip(ws, store, tmp_path):
    up = store.upload_folder(ws, "sessions/s1")
    assert isinstance(up, SyncReport)
    assert up.files == 3 and up.bytes == 5 + 256000 + len(b"#!/bin/sh\necho hi\n")
    assert up.skipped == []
    assert store.exists("sessions/s1")
    out = str(tmp_path / "restored")
    down = store.download_folder("sessions/s1", out)
    assert down.files == 3 and down.bytes == up.bytes
    assert tree_of(out) == tree_of(ws)
    assert "empty/nested_empty" in tree_of(out)  # empty dirs kept
    assert os.stat(os.path.join(out, "sub", "run.sh")).st_mode & 0o777 == 0o755
    assert os.stat(os.path.join(out, "a.txt")).st_mtime_ns == os.stat(os.path.join(ws, "a.txt")).st_mtime_ns


def test_idempotent_reupload_and_additive_default(ws, store, tmp_path):
    first = store.upload_folder(ws, "s")
    second = store.upload_folder(ws, "s")
    assert (first.files, first.bytes, first.dirs) == (second.files, second.bytes, second.dirs)
    dest = store.resolve("s")
    assert tree_of(dest) == tree_of(ws)
    assert not [n for n in os.listdir(dest) if n.endswith(".tmp")]  # no temp files left behind
    os.remove(os.path.join(ws, "a.txt"))
    store.upload_folder(ws, "s")
    assert os.path.exists(os.path.join(dest, "a.txt"))  # mirror=False: adds/overwrites only


def test_mirror_removes_what_the_workspace_dropped(ws, store):
    store.upload_folder(ws, "s")
    os.remove(os.path.join(ws, "a.txt"))
    os.rmdir(os.path.join(ws, "empty", "nested_empty"))
    rep = store.upload_folder(ws, "s", mirror=True)
    assert rep.deleted == 2
    assert tree_of(store.resolve("s")) == tree_of(ws)


def test_overwrite_changes_content(ws, store, tmp_path):
    store.upload_folder(ws, "s")
    write(os.path.join(ws, "a.txt"), b"changed")
    store.upload_folder(ws, "s")
    out = str(tmp_path / "out")
    store.download_folder("s", out)
    assert open(os.path.join(out, "a.txt"), "rb").read() == b"changed"


def test_download_of_missing_path_is_empty(store, tmp_path):
    rep = store.download_folder("never/uploaded", str(tmp_path / "out"))
    assert rep.files == 0 and rep.skipped == []
    assert not store.exists("never/uploaded")


def test_upload_of_missing_dir_is_not_found(store, tmp_path):
    with pytest.raises(NotFound):
        store.upload_folder(str(tmp_path / "nope"), "s")


def test_storage_path_cannot_climb_out_of_root(store, ws):
    for bad in ("../x", "a/../../x", "", "..", "./"):
        with pytest.raises(InvalidRequest):
            store.upload_folder(ws, bad)


def test_absolute_storage_path_is_used_as_given(ws, store, tmp_path):
    target = str(tmp_path / "abs_target")
    store.upload_folder(ws, target)
    assert tree_of(target) == tree_of(ws)


def test_delete_is_idempotent(ws, store):
    store.upload_folder(ws, "s")
    assert store.delete("s") == 3
    assert not store.exists("s")
    assert store.delete("s") == 0


def test_path_join(store):
    assert store.path_join("a", "b", "c") == os.path.join("a", "b", "c")
    assert store.path_join("", "a") == "a"


async def test_async_twins(ws, store, tmp_path):
    rep = await store.upload_folder_async(ws, "s")
    assert rep.files == 3
    assert await store.exists_async("s")
    out = str(tmp_path / "o")
    rep2 = await store.download_folder_async("s", out)
    assert rep2.files == 3
    assert await store.delete_async("s") == 3


# ---------------------------------------------------------------- the reference's defect: symlinks


def test_symlink_to_host_file_is_not_uploaded(ws, store, secret):
    os.symlink(secret, os.path.join(ws, "steal"))
    rep = store.upload_folder(ws, "s")
    assert ("steal", "symlink (not followed)") in rep.skipped
    dest = store.resolve("s")
    assert not os.path.lexists(os.path.join(dest, "steal"))
    for root, _, files in os.walk(dest):
        for f in files:
            assert b"TOP SECRET" not in open(os.path.join(root, f), "rb").read()


def test_symlinked_dir_is_not_followed(ws, store, tmp_path):
    host_dir = tmp_path / "host_dir"
    write(str(host_dir / "private.key"), b"KEY")
    os.symlink(str(host_dir), os.path.join(ws, "sub", "link_dir"))
    rep = store.upload_folder(ws, "s")
    assert ("sub/link_dir", "symlink (not followed)") in rep.skipped
    assert not os.path.lexists(os.path.join(store.resolve("s"), "sub", "link_dir"))
    assert "sub/link_dir/private.key" not in {f.rel for f in walk_regular_files(ws).files}


def test_dangling_and_relative_symlinks_skipped(ws, store):
    os.symlink("../../../etc/passwd", os.path.join(ws, "rel"))
    os.symlink("/nonexistent/x", os.path.join(ws, "dangling"))
    rep = store.upload_folder(ws, "s")
    assert {p for p, _ in rep.skipped} == {"rel", "dangling"}


def test_fifo_and_socket_skipped(ws, store, tmp_path):
    os.mkfifo(os.path.join(ws, "pipe"))
    sock_path = os.path.join(ws, "sock")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(sock_path)
        rep = store.upload_folder(ws, "s")  # must not hang on the fifo
    finally:
        s.close()
    assert ("pipe", "fifo") in rep.skipped
    assert ("sock", "socket") in rep.skipped
    assert rep.files == 3


def test_walk_only_regular_files_and_dirs(ws, secret):
    os.symlink(secret, os.path.join(ws, "l"))
    os.mkfifo(os.path.join(ws, "sub", "p"))
    scan = walk_regular_files(ws)
    assert sorted(f.rel for f in scan.files) == ["a.txt", "sub/deep/bin.dat", "sub/run.sh"]
    assert scan.dirs == ["empty", "empty/nested_empty", "sub", "sub/deep"]
    assert sorted(scan.skipped) == [("l", "symlink (not followed)"), ("sub/p", "fifo")]
    assert empty_dirs(scan) == ["empty/nested_empty"]


def test_file_swapped_for_symlink_after_walk_is_refused(ws, store, secret, monkeypatch):
    """The race: the walk saw a regular file, the sandbox swaps in a symlink before the read."""
    import corral.storage.local as local_mod

    real_walk = local_mod.walk_regular_files

    def walk_then_swap(root):
        scan = real_walk(root)
        if root == ws:
            os.remove(os.path.join(ws, "a.txt"))
            os.symlink(secret, os.path.join(ws, "a.txt"))
            os.rename(os.path.join(ws, "sub"), os.path.join(ws, "sub_real"))
            os.symlink(os.path.dirname(secret), os.path.join(ws, "sub"))
        return scan

    monkeypatch.setattr(local_mod, "walk_regular_files", walk_then_swap)
    rep = store.upload_folder(ws, "s")
    reasons = dict(rep.skipped)
    assert reasons["a.txt"] == "symlink (not followed)"
    assert reasons["sub/run.sh"].startswith("path crosses a symlink")
    dest = store.resolve("s")
    assert not os.path.exists(os.path.join(dest, "a.txt"))
    assert not os.path.exists(os.path.join(dest, "sub", "run.sh"))


# ---------------------------------------------------------------- download can't escape


def test_download_does_not_write_through_existing_symlink(ws, store, tmp_path, secret):
    store.upload_folder(ws, "s")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(secret, out / "a.txt")  # planted file symlink: replaced, target untouched
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(str(outside), out / "sub")  # planted dir symlink: refused
    rep = store.download_folder("s", str(out))
    assert open(secret, "rb").read() == b"TOP SECRET"
    assert not os.path.islink(out / "a.txt") and (out / "a.txt").read_bytes() == b"hello"
    assert os.listdir(outside) == []
    skipped = dict(rep.skipped)
    assert skipped["sub/run.sh"].startswith("path crosses a symlink")
    assert skipped["sub/deep/bin.dat"].startswith("path crosses a symlink")


def test_tree_writer_rejects_escape(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    for bad in ("../x", "/etc/x", "a/../../x", "a//b", "./a", ""):
        with pytest.raises(InvalidRequest):
            safe_relparts(bad)
    with TreeWriter(str(root)) as w:
        w.write_file(safe_relparts("a/b.txt"), lambda out: out.write(b"ok") and None)
        (root / "file").write_bytes(b"f")
        with pytest.raises(SkipEntry):
            w.write_file(("file", "child"), lambda out: None)  # a file where a dir should be
        (root / "dir").mkdir()
        (root / "dir" / "x").write_bytes(b"")
        with pytest.raises(SkipEntry, match="directory is in the way"):
            w.write_file(("dir",), lambda out: None)
    assert (root / "a" / "b.txt").read_bytes() == b"ok"
    assert sorted(os.listdir(root)) == ["a", "dir", "file"]  # no temp files left
    assert os.listdir(tmp_path) == ["root"]


def test_storage_side_symlink_not_followed_on_download(ws, store, tmp_path, secret):
    store.upload_folder(ws, "s")
    os.symlink(secret, os.path.join(store.resolve("s"), "planted"))
    out = str(tmp_path / "out")
    rep = store.download_folder("s", out)
    assert ("planted", "symlink (not followed)") in rep.skipped
    assert not os.path.lexists(os.path.join(out, "planted"))


# ---------------------------------------------------------------- make_storage


def test_make_storage(tmp_path):
    s = make_storage(SandboxManagerEnvConfig(storage_folder=str(tmp_path)))
    assert isinstance(s, LocalStorage) and s.root == str(tmp_path)
    cfg = SandboxManagerEnvConfig(
        file_system="oss", oss_endpoint="https://oss.invalid", oss_access_key_id="id",
        oss_access_key_secret="secret", oss_bucket_name="bucket-1",
    )
    o = make_storage(cfg)
    assert isinstance(o, OSSStorage) and isinstance(o, Storage)
    assert "secret" not in repr(o)


# ---------------------------------------------------------------- OSS pure parts


def oss_storage() -> OSSStorage:
    return OSSStorage("https://oss.invalid", "id", "secret", "bucket")  # never contacted


def test_oss_path_join_and_prefix():
    o = oss_storage()
    assert o.path_join("sessions/", "/s1/", "", "ws") == "sessions/s1/ws"
    assert storage_prefix("/sessions/s1/") == "sessions/s1"
    assert manifest_key("sessions/s1") == "sessions/s1.corral-sync.json"
    for bad in ("", "/", "a/../b", "../a", "a//b", "a/./b", "s1.corral-sync.json"):
        with pytest.raises(InvalidRequest):
            storage_prefix(bad)


def test_oss_key_mapping():
    assert object_key("sessions/s1", "sub/deep/bin.dat") == "sessions/s1/sub/deep/bin.dat"
    with pytest.raises(SkipEntry, match="UTF-8"):
        object_key("p", "bad\udcff")
    with pytest.raises(SkipEntry, match="1023"):
        object_key("p", "x" * 1100)


def test_oss_download_targets():
    p = "sessions/s1"
    assert download_target(p, "sessions/s1/a/b.txt") == ("file", ("a", "b.txt"))
    assert download_target(p, "sessions/s1/empty/") == ("dir", ("empty",))
    assert download_target(p, "sessions/s1/") == ("root", ())
    for bad in ("sessions/s1/../x", "sessions/s1//etc/passwd", "sessions/s1/a/../../x",
                "sessions/s1/./x", "sessions/s10/x", "other/x"):
        with pytest.raises(SkipEntry):
            download_target(p, bad)


def test_oss_upload_plan_shares_symlink_filtering(ws, secret, tmp_path):
    os.symlink(secret, os.path.join(ws, "steal"))
    os.symlink(str(tmp_path), os.path.join(ws, "loop"))
    os.mkfifo(os.path.join(ws, "pipe"))
    plan = plan_upload(ws, "sessions/s1")
    keys = sorted(k for _, k in plan.files)
    assert keys == ["sessions/s1/a.txt", "sessions/s1/sub/deep/bin.dat", "sessions/s1/sub/run.sh"]
    assert plan.dir_markers == ["sessions/s1/empty/nested_empty/"]
    assert sorted(plan.skipped) == [
        ("loop", "symlink (not followed)"), ("pipe", "fifo"), ("steal", "symlink (not followed)"),
    ]


def test_oss_error_mapping_pickles():
    def err(cls, status, code):
        return cls(status, {"x-oss-request-id": "rid"}, b"", {"Code": code, "Message": "m"})

    nf = map_oss_error(err(oss2.exceptions.NoSuchKey, 404, "NoSuchKey"), "get", "k")
    assert isinstance(nf, NotFound) and nf.details["request_id"] == "rid"
    denied = map_oss_error(err(oss2.exceptions.AccessDenied, 403, "AccessDenied"), "put", "k")
    assert isinstance(denied, StorageError) and denied.retryable and "access denied" in str(denied)
    assert not is_transient(err(oss2.exceptions.AccessDenied, 403, "AccessDenied"))
    assert is_transient(err(oss2.exceptions.ServerError, 503, "ServiceUnavailable"))
    assert is_transient(err(oss2.exceptions.ServerError, 429, "Throttling"))
    bad_name = map_oss_error(err(oss2.exceptions.InvalidObjectName, 400, "InvalidObjectName"), "put", "k")
    assert isinstance(bad_name, InvalidRequest)
    net = map_oss_error(oss2.exceptions.RequestError(ConnectionError("refused")), "list", "p", attempts=3)
    assert isinstance(net, StorageError) and "refused" in str(net) and "after 3 attempts" in str(net)
    assert is_transient(oss2.exceptions.RequestError(ConnectionError("refused")))
    disk = map_oss_error(OSError(28, "No space left on device"), "download", "p")
    assert isinstance(disk, StorageError) and not is_transient(OSError(28, "No space left on device"))
    for e in (nf, denied, net):
        again = pickle.loads(pickle.dumps(e))
        assert type(again) is type(e) and again.details == e.details


def test_oss_construction_makes_no_connection():
    # nothing listens on port 9 (discard); construction must not notice
    o = OSSStorage("http://127.0.0.1:9", "id", "secret", "bucket-1")
    assert o.bucket.bucket_name == "bucket-1"


def test_oss_error_text_holds_no_credentials():
    from corral.storage.oss import _register_secret

    _register_secret("LTAIunitKeyId", "unit-secret-value")
    details = {"Code": "SignatureDoesNotMatch", "Message": "m", "OSSAccessKeyId": "LTAIunitKeyId",
               "SignatureProvided": "abc=", "StringToSign": "PUT\n\n\nDate\n/b/k"}
    exc = oss2.exceptions.ServerError(403, {}, b"", details)
    mapped = map_oss_error(exc, "upload", "k")
    assert "LTAIunitKeyId" not in str(mapped) and "abc=" not in str(mapped)
    assert "check oss_access_key_secret" in str(mapped)
    line = "headers: {'authorization': 'OSS LTAIunitKeyId:c2lnbmF0dXJl', 'date': 'x'} unit-secret-value"
    assert redact(line) == "headers: {'authorization': '<redacted>', 'date': 'x'} <redacted>"
    assert redact(str(exc)).count("<redacted>") >= 3 and "LTAIunitKeyId" not in redact(str(exc))


def test_async_loop_not_blocked(ws, store):
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        t = asyncio.create_task(ticker())
        await store.upload_folder_async(ws, "s")
        t.cancel()
        return ticks

    assert asyncio.run(main()) > 0
