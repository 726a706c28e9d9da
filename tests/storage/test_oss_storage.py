"""OSSStorage against the OSS-protocol test server: layout, multipart, hostile keys, credentials and faults.

The semantics shared with LocalStorage are in test_sync.py; this file holds what
only the OSS transport has: the object layout, a 64 MiB multipart upload, keys
planted in the bucket, wrong credentials or bucket, and retries (one retry loop,
with back-off) against 500s, dropped connections, cut-short bodies and slow
answers, and what is left when a fault persists.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import time
import traceback

import pytest

from corral.errors import InvalidRequest, StorageError
from corral.models import SandboxManagerEnvConfig
from corral.storage import make_storage
from corral.storage.oss import OSSStorage
from tests.support.oss_server import BUCKET, KEY_ID, SECRET, Fault, oss_config

MiB = 1 << 20


def write(path, data: bytes, mode: int | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    if mode is not None:
        os.chmod(path, mode)


@pytest.fixture
def ws(tmp_path):
    w = tmp_path / "ws"
    write(str(w / "a.txt"), b"hello")
    write(str(w / "sub" / "run.sh"), b"#!/bin/sh\n", mode=0o750)
    write(str(w / "sub" / "deep" / "b.bin"), os.urandom(300_000))
    os.makedirs(w / "empty")
    return str(w)


def sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_object_layout_metadata_and_manifest_beside_the_prefix(oss_store, oss_server, ws):
    store = oss_store()
    store.upload_folder(ws, "sessions/s1")
    assert oss_server.keys(BUCKET) == [
        "sessions/s1.corral-sync.json", "sessions/s1/a.txt", "sessions/s1/empty/",
        "sessions/s1/sub/deep/b.bin", "sessions/s1/sub/run.sh",
    ]
    run = oss_server.get(BUCKET, "sessions/s1/sub/run.sh")
    assert run.meta["x-oss-meta-corral-mode"] == "750"
    assert int(run.meta["x-oss-meta-corral-mtime-ns"]) == os.stat(os.path.join(ws, "sub", "run.sh")).st_mtime_ns
    assert oss_server.get(BUCKET, "sessions/s1/empty/").data == b""
    # the manifest is the last object written
    puts = [r.key for r in oss_server.requests if r.method == "PUT"]
    assert puts[-1] == "sessions/s1.corral-sync.json"


def test_a_64_mib_file_goes_up_in_parts_and_comes_back_whole(oss_store, oss_server, tmp_path):
    w = tmp_path / "big"
    data = os.urandom(MiB) * 64
    write(str(w / "model.bin"), data, mode=0o640)
    os.utime(w / "model.bin", ns=(1_700_000_000_000_000_001, 1_700_000_000_000_000_001))
    store = oss_store()
    rep = store.upload_folder(str(w), "big")
    assert rep.bytes == 64 * MiB
    obj = oss_server.get(BUCKET, "big/model.bin")
    assert obj.object_type == "Multipart" and obj.etag.endswith("-8")  # 8 MiB parts
    assert oss_server.count("PUT", query="partNumber") == 8
    assert oss_server.uploads_in_progress(BUCKET) == 0
    out = tmp_path / "out"
    store.download_folder("big", str(out), expect=True)
    got = out / "model.bin"
    assert sha(got) == hashlib.sha256(data).hexdigest()
    st = os.stat(got)
    assert st.st_mode & 0o777 == 0o640 and st.st_mtime_ns == 1_700_000_000_000_000_001


def test_keys_that_would_escape_are_refused_on_download(oss_store, oss_server, ws, tmp_path):
    store = oss_store()
    store.upload_folder(ws, "s")
    b = store.bucket
    for key in ("s/../escape.txt", "s//etc/passwd", "s/a/../../x", "s/./dot", "s/sub/../../up"):
        b.put_object(key, b"EVIL")
    out = tmp_path / "nest" / "out"
    rep = store.download_folder("s", str(out), expect=True)
    assert sorted(k for k, _ in rep.skipped) == sorted(
        ["s/../escape.txt", "s//etc/passwd", "s/a/../../x", "s/./dot", "s/sub/../../up"])
    assert {reason for _, reason in rep.skipped} == {"unsafe key (absolute, '..', '.' or empty component)"}
    for root, _, files in os.walk(tmp_path):
        for f in files:
            assert open(os.path.join(root, f), "rb").read() != b"EVIL", os.path.join(root, f)


def test_download_replaces_a_planted_symlink_and_never_writes_through_one(oss_store, ws, tmp_path):
    store = oss_store()
    store.upload_folder(ws, "s")
    secret = tmp_path / "host_secret"
    secret.write_bytes(b"TOP SECRET")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(secret, out / "a.txt")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, out / "sub")
    rep = store.download_folder("s", str(out))
    assert secret.read_bytes() == b"TOP SECRET" and os.listdir(outside) == []
    assert not os.path.islink(out / "a.txt") and (out / "a.txt").read_bytes() == b"hello"
    assert dict(rep.skipped)["s/sub/run.sh"].startswith("path crosses a symlink")


# ---------------------------------------------------------------- credentials and settings


def _no_credentials_in(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text and KEY_ID not in text, text
        assert "OSS LTAI" not in text, text


def test_wrong_secret_is_a_clear_storage_error_without_retries(oss_store, oss_server, ws):
    store = oss_store(secret="wrong-secret-0000")
    with pytest.raises(StorageError) as e:
        store.upload_folder(ws, "s")
    msg = str(e.value)
    assert "SignatureDoesNotMatch" in msg and "check oss_access_key_secret" in msg
    assert e.value.details["status"] == 403 and e.value.details["attempts"] == 1
    assert len(oss_server.requests) == 1  # not retried: it cannot get better
    assert e.value.__cause__ is None and e.value.__suppress_context__
    _no_credentials_in(msg, repr(e.value), "".join(traceback.format_exception(e.value)),
                       repr(pickle.loads(pickle.dumps(e.value)).details))
    assert oss_server.keys(BUCKET) == []


def test_unknown_key_id_and_missing_bucket(oss_store, oss_server, ws, tmp_path):
    with pytest.raises(StorageError, match="InvalidAccessKeyId.*check oss_access_key_id") as e:
        oss_store(key_id="LTAInobody").upload_folder(ws, "s")
    assert "LTAInobody" not in str(e.value)
    with pytest.raises(StorageError, match="NoSuchBucket.*check oss_bucket_name") as e:
        oss_store(bucket="no-such-bucket").download_folder("s", str(tmp_path / "o"))
    assert e.value.details["status"] == 404


def test_bad_settings_are_invalid_requests():
    with pytest.raises(InvalidRequest, match="bucket"):
        OSSStorage("http://127.0.0.1:1", KEY_ID, SECRET, "B!")
    with pytest.raises(InvalidRequest):
        OSSStorage("http://127.0.0.1:1", KEY_ID, SECRET, "bucket-ok", part_size=10)

    class Cfg:  # a config that skipped SandboxManagerEnvConfig's own check
        file_system = "oss"
        oss_endpoint = "http://127.0.0.1:1"
        oss_access_key_id = KEY_ID
        oss_access_key_secret = None
        oss_bucket_name = BUCKET

    with pytest.raises(InvalidRequest, match="oss_access_key_secret"):
        make_storage(Cfg())


def test_make_storage_from_the_manager_config_and_reprs_hold_no_secret(oss_server):
    cfg = SandboxManagerEnvConfig(**oss_config(oss_server))
    store = make_storage(cfg)
    assert isinstance(store, OSSStorage)
    _no_credentials_in(repr(store), str(store), repr(cfg), str(cfg))
    incomplete = {**oss_config(oss_server), "oss_bucket_name": None}
    with pytest.raises(ValueError, match="needs oss_bucket_name") as e:
        SandboxManagerEnvConfig(**incomplete)
    _no_credentials_in(str(e.value))  # the validation error does not quote its input


def test_credentials_never_reach_the_logs(oss_store, oss_server, ws, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # oss2 logs request headers and error details at DEBUG/INFO
    good = oss_store()
    good.upload_folder(ws, "s")
    good.download_folder("s", str(tmp_path / "o"))
    oss_server.inject(Fault("error", method="PUT", nth=1))
    good.upload_folder(ws, "t")  # a retry logs a warning
    with pytest.raises(StorageError):
        oss_store(secret="wrong-secret-0000").upload_folder(ws, "s")
    with pytest.raises(StorageError):
        oss_store(key_id="LTAInobody0000").upload_folder(ws, "s")
    text = caplog.text
    assert "Authorization" in text or "authorization" in text  # oss2 did log its headers ...
    assert "retrying" in text
    _no_credentials_in(text)  # ... with the values redacted
    assert "wrong-secret-0000" not in text and "LTAInobody0000" not in text
    assert "SignatureProvided': '<redacted>'" in text


# ---------------------------------------------------------------- faults and retries


def test_a_500_on_the_nth_request_is_retried(oss_store, oss_server, ws, tmp_path):
    fault = oss_server.inject(Fault("error", method="PUT", nth=3, status=500, code="InternalError"))
    store = oss_store()
    store.upload_folder(ws, "s")
    assert fault.fired == 1
    failed = [r for r in oss_server.requests if r.status == 500]
    assert len(failed) == 1
    retried = [r for r in oss_server.requests if r.key == failed[0].key and r.method == "PUT"]
    assert [r.status for r in retried] == [500, 200]
    get_fault = oss_server.inject(Fault("error", method="GET", nth=2, status=503, code="ServiceUnavailable"))
    out = tmp_path / "out"
    store.download_folder("s", str(out), expect=True)
    assert get_fault.fired == 1 and (out / "a.txt").read_bytes() == b"hello"


@pytest.mark.parametrize("fault", [
    Fault("drop", method="PUT", key="a.txt"),
    Fault("drop", method="PUT", query="partNumber", nth=2),
    Fault("drop", method="POST", query="uploadId"),
    Fault("lose_answer", method="POST", query="uploadId"),  # the complete went through, its answer was lost
    Fault("lose_answer", method="PUT", key="a.txt"),
    Fault("drop", method="POST", query="uploads"),
    Fault("drop", method="GET", query="prefix"),
    Fault("truncate", method="GET", key="big.bin"),
    Fault("drop", method="GET", key="big.bin"),
    Fault("error", method="POST", query="delete", status=502, code="BadGateway"),
], ids=lambda f: f"{f.kind}-{f.method}-{f.key or f.query}")
def test_dropped_connections_and_cut_bodies_are_retried(oss_store, oss_server, ws, tmp_path, fault):
    write(os.path.join(ws, "big.bin"), os.urandom(3 * MiB + 5))
    store = oss_store(multipart_threshold=2 * MiB, part_size=1 * MiB)
    store.upload_folder(ws, "s")
    os.remove(os.path.join(ws, "a.txt"))
    oss_server.inject(fault)
    store.upload_folder(ws, "s", mirror=True)  # mirror: a batch delete to fault
    write(os.path.join(ws, "a.txt"), b"hello")
    store.upload_folder(ws, "s")
    out = tmp_path / "out"
    store.download_folder("s", str(out), expect=True)
    assert fault.fired == 1
    assert sha(out / "big.bin") == sha(os.path.join(ws, "big.bin"))
    assert (out / "a.txt").read_bytes() == b"hello"
    assert oss_server.uploads_in_progress(BUCKET) == 0


def test_a_slow_answer_times_out_and_is_retried(oss_store, oss_server, ws, caplog):
    fault = oss_server.inject(Fault("slow", method="PUT", key="a.txt", delay=1.5))
    store = oss_store(timeout=0.5)
    store.upload_folder(ws, "s")
    assert fault.fired == 1
    # the retry was answered; the slow first request is recorded once the server wakes from it
    deadline = time.monotonic() + 5
    while len([r for r in oss_server.requests if r.key == "s/a.txt"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(str(r.fault) for r in oss_server.requests if r.key == "s/a.txt") == ["None", "slow"]
    assert "timed out" in caplog.text


def test_damaged_data_is_caught_by_the_crc_and_retried_then_reported(oss_store, oss_server, ws, tmp_path):
    store = oss_store()
    store.upload_folder(ws, "s")
    obj = oss_server.get(BUCKET, "s/a.txt")
    obj.data = b"HELLO"  # same length, different bytes, CRC header unchanged
    with pytest.raises(StorageError, match=r"download of 's/a.txt' failed after 4 attempts: the data arrived damaged"):
        store.download_folder("s", str(tmp_path / "out"))
    assert oss_server.count("GET") >= 4
    assert not (tmp_path / "out" / "a.txt").exists()  # never written under its name


def test_retries_happen_in_one_place_with_growing_back_off(oss_server, ws):
    waits: list[float] = []
    store = OSSStorage(oss_server.endpoint, KEY_ID, SECRET, BUCKET, attempts=5, backoff=0.1, max_backoff=0.3,
                       sleep=waits.append)
    oss_server.inject(Fault("error", method="PUT", key="a.txt", times=None))
    with pytest.raises(StorageError) as e:
        store.upload_folder(ws, "s")
    # exactly `attempts` requests for the key: oss2 adds none of its own
    assert [r.status for r in oss_server.requests if r.key == "s/a.txt"] == [500] * 5
    assert len(waits) == 4
    for wait, cap in zip(waits, [0.1, 0.2, 0.3, 0.3]):
        assert cap / 2 <= wait <= cap
    assert "after 5 attempts" in str(e.value)


def test_a_persistent_fault_fails_the_upload_and_loses_nothing(oss_store, oss_server, ws, tmp_path):
    store = oss_store()
    store.upload_folder(ws, "s")  # a first, complete sync
    before = {p: sha(os.path.join(ws, p)) for p in ("a.txt", "sub/run.sh", "sub/deep/b.bin")}
    write(os.path.join(ws, "sub", "new.txt"), b"new work")
    oss_server.inject(Fault("error", method="PUT", key="new.txt", times=None, status=503, code="ServiceUnavailable"))
    with pytest.raises(StorageError) as e:
        store.upload_folder(ws, "s")
    msg = str(e.value)
    assert msg.startswith("OSS upload of 's/sub/new.txt' failed after 4 attempts: 503 ServiceUnavailable")
    assert e.value.details["op"] == "upload" and e.value.details["target"] == "s/sub/new.txt"
    # the workspace is untouched, and storage says the last sync is not complete
    assert {p: sha(os.path.join(ws, p)) for p in before} == before
    assert open(os.path.join(ws, "sub", "new.txt"), "rb").read() == b"new work"
    assert store.last_sync("s") is None
    with pytest.raises(StorageError, match="manifest is missing"):
        store.download_folder("s", str(tmp_path / "out"), expect=True)
    oss_server.clear_faults()
    store.upload_folder(ws, "s")  # once the fault clears, the next sync completes
    store.download_folder("s", str(tmp_path / "out2"), expect=True)
    assert (tmp_path / "out2" / "sub" / "new.txt").read_bytes() == b"new work"


def test_a_failed_multipart_upload_is_aborted(oss_store, oss_server, tmp_path):
    w = tmp_path / "w"
    write(str(w / "big.bin"), os.urandom(3 * MiB))
    oss_server.inject(Fault("error", method="PUT", query="partNumber", nth=2, times=None))
    with pytest.raises(StorageError, match=r"big.bin \(part 2\)"):
        oss_store(multipart_threshold=2 * MiB, part_size=1 * MiB).upload_folder(str(w), "s")
    assert oss_server.uploads_in_progress(BUCKET) == 0
    assert oss_server.count("DELETE", query="uploadId") == 1


def test_the_service_unreachable_is_a_storage_error(ws, tmp_path):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    store = OSSStorage(f"http://127.0.0.1:{port}", KEY_ID, SECRET, BUCKET, attempts=2, backoff=0.01, timeout=2)
    with pytest.raises(StorageError, match="no answer from the service") as e:
        store.upload_folder(ws, "s")
    assert e.value.retryable
    _no_credentials_in(str(e.value))


def test_syncs_at_once_on_one_storage_share_its_transfer_threads(oss_store, oss_server, tmp_path):
    import threading

    before = set(threading.enumerate())  # other storages of this process keep threads of their own
    store = oss_store(concurrency=4)
    sources = []
    for n in range(3):
        w = tmp_path / f"w{n}"
        for i in range(60):
            write(str(w / f"f{i:02d}.txt"), f"{n}-{i}".encode())
        sources.append(str(w))
    errors: list[BaseException] = []

    def sync(n: int) -> None:
        try:
            store.upload_folder(sources[n], f"s{n}")
            store.download_folder(f"s{n}", str(tmp_path / f"out{n}"), expect=True)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=sync, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    for n in range(3):
        assert (tmp_path / f"out{n}" / "f59.txt").read_bytes() == f"{n}-59".encode()
        assert len(store.last_sync(f"s{n}").files) == 60
    assert len([t for t in set(threading.enumerate()) - before if t.name.startswith("corral-oss")]) <= 4
