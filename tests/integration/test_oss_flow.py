"""Workspaces on OSS through the whole runtime: the manager, the actors and a real driver.

The OSS endpoint is the OSS-protocol test server (tests/support) on 127.0.0.1, so
the pool actor's oss2 client signs, sends and checks real requests. Only the
public manager API is used (create, call_tool, get_info, reap_session,
restore_session, release). The process-driver cases need the session's Ray
cluster; the Docker case also needs the engine and image (skips without them,
fails under CORRAL_REQUIRE_DOCKER=1). Run under the heavy-test lock.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from corral.errors import StorageError
from tests.support.oss_server import BUCKET, KEY_ID, SECRET, Fault, OSSServer, oss_config
from tests.support.waiting import wait_for

pytestmark = pytest.mark.ray

FOLDER = "corral/sessions"




def _require_docker() -> None:
    from tests.support.docker import require_docker

    require_docker()


@pytest.fixture
def oss_server():
    with OSSServer({KEY_ID: SECRET}, buckets=[BUCKET]) as srv:
        yield srv
        assert srv.internal_errors == [], srv.internal_errors[0]


def shell(m, name: str, command: str) -> str:
    out = m.call_tool(name, "run_shell_command", {"command": command})
    parts = {c.get("description"): c.get("text") for c in out["content"]}
    assert not out.get("isError"), out
    return parts.get("stdout") or ""


WRITE = (
    "mkdir -p work/empty 'work/with space' && printf 'kept across hosts' > work/keep.txt"
    " && printf 'ü' > 'work/with space/ünï.txt' && head -c 3000000 /dev/urandom > work/blob.bin"
    " && chmod 750 work/keep.txt && sha256sum work/blob.bin | cut -d' ' -f1"
)
READ = (
    "cat work/keep.txt; echo; cat 'work/with space/ünï.txt'; echo; sha256sum work/blob.bin | cut -d' ' -f1;"
    " stat -c %a work/keep.txt; test -d work/empty && echo empty-dir-ok"
)


@pytest.mark.parametrize("deployment", ["process", pytest.param("docker", marks=pytest.mark.docker)])
def test_reap_syncs_the_workspace_to_oss_and_restore_brings_it_back(make_manager, oss_server, deployment):
    if deployment == "docker":
        _require_docker()
    m = make_manager(pool_size=0, container_deployment=deployment,
                     **oss_config(oss_server, storage_folder=FOLDER))
    sid = f"oss-flow-{deployment}"
    name = m.create(meta={"session_ctx_id": sid})
    blob_sha = shell(m, name, WRITE).strip()
    info = m.get_info(name)
    prefix, mount = info["storage_path"], info["mount_dir"]
    assert prefix == f"{FOLDER}/{info['session_id']}"

    assert m.reap_session(sid)
    wait_for(lambda: m.get_info(name)["state"] == "RECYCLED", what="the reap")
    manifest = f"{prefix}.corral-sync.json"
    wait_for(lambda: manifest in oss_server.keys(BUCKET), what="the sync to complete (its manifest)")
    keys = oss_server.keys(BUCKET, prefix + "/")
    assert {f"{prefix}/work/keep.txt", f"{prefix}/work/blob.bin", f"{prefix}/work/with space/ünï.txt",
            f"{prefix}/work/empty/"} <= set(keys)
    assert len(oss_server.get(BUCKET, f"{prefix}/work/blob.bin").data) == 3_000_000

    # the bucket is now the only copy: the host's goes, as if the session came back on another node
    shutil.rmtree(mount)
    new_names = m.restore_session(sid)
    assert len(new_names) == 1 and new_names[0] != name
    assert m.get_info(name)["container_name"] == new_names[0]
    lines = shell(m, new_names[0], READ).splitlines()
    assert lines == ["kept across hosts", "ü", blob_sha, "750", "empty-dir-ok"]

    # release syncs again: new work lands in the bucket too
    shell(m, new_names[0], "printf more > work/later.txt")
    before = oss_server.get(BUCKET, manifest).last_modified
    m.release(new_names[0])
    wait_for(lambda: f"{prefix}/work/later.txt" in oss_server.keys(BUCKET, prefix + "/"), what="the release sync")
    wait_for(lambda: oss_server.get(BUCKET, manifest).last_modified > before, what="the new manifest")


def test_a_wrong_key_is_a_clear_error_when_the_sandbox_starts(make_manager, oss_server):
    """A cold start reads the bucket (to restore whatever was synced), so a wrong secret shows at once."""
    m = make_manager(pool_size=0, **oss_config(oss_server, storage_folder=FOLDER,
                                               oss_access_key_secret="wrong-secret-value"))
    with pytest.raises(StorageError, match="SignatureDoesNotMatch.*check oss_access_key_secret") as e:
        m.create(meta={"session_ctx_id": "oss-wrong-key"})
    for text in (str(e.value), repr(e.value)):
        assert SECRET not in text and KEY_ID not in text and "wrong-secret-value" not in text


def test_a_refused_sync_keeps_the_workspace_and_restore_says_why(make_manager, oss_server):
    """The key is revoked while the session runs: its reap cannot sync (403), the host workspace is
    untouched, a restore fails with a StorageError naming the setting, and works once access is back."""
    m = make_manager(pool_size=0, **oss_config(oss_server, storage_folder=FOLDER))
    sid = "oss-revoked"
    name = m.create(meta={"session_ctx_id": sid})
    shell(m, name, "printf precious > precious.txt")
    mount = m.get_info(name)["mount_dir"]
    oss_server.credentials[KEY_ID] = "rotated-secret"  # the service no longer accepts our secret
    assert m.reap_session(sid)
    wait_for(lambda: m.get_info(name)["state"] == "RECYCLED", what="the reap")
    wait_for(lambda: oss_server.count("DELETE", status=403) >= 1, what="the refused sync")
    assert oss_server.keys(BUCKET) == []
    assert open(os.path.join(mount, "precious.txt")).read() == "precious"
    with pytest.raises(StorageError, match="SignatureDoesNotMatch.*check oss_access_key_secret") as e:
        m.restore_session(sid)
    assert SECRET not in str(e.value) and KEY_ID not in str(e.value)
    assert m.get_info(name)["state"] == "RECYCLED"  # still restorable
    oss_server.credentials[KEY_ID] = SECRET
    new = m.restore_session(sid)
    assert shell(m, new[0], "cat precious.txt") == "precious"
    m.release(new[0])


def test_a_release_whose_sync_fails_keeps_the_workspace(make_manager, oss_server):
    m = make_manager(pool_size=0, **oss_config(oss_server, storage_folder=FOLDER))
    name = m.create(meta={"session_ctx_id": "oss-release-fault"})
    shell(m, name, "printf precious > precious.txt")
    mount = m.get_info(name)["mount_dir"]
    fault = oss_server.inject(Fault("error", method="PUT", key="precious.txt", times=None, status=503,
                                    code="ServiceUnavailable"))
    m.release(name)
    wait_for(lambda: fault.fired >= 4, what="the upload to give up")
    assert m.get_info(name)["state"] == "RELEASED"
    # the teardown goes on after the last attempt; give it time to do whatever it will do
    deadline = time.monotonic() + 5
    while os.path.exists(mount) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert os.path.exists(os.path.join(mount, "precious.txt")), "the failed sync lost the only copy"
    err = wait_for(lambda: m.get_info(name).get("storage_error"), what="the record to say the sync failed")
    assert "precious.txt" in err and SECRET not in err and "upload" in err
