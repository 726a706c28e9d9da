"""Fixtures for the storage tests: an OSS-protocol server on 127.0.0.1 per test, and storages on it.

No Ray, no Docker: these run anywhere, without the heavy-test lock.
"""

from __future__ import annotations

import pytest

from tests.support.oss_server import BUCKET, KEY_ID, SECRET, OSSServer


@pytest.fixture
def oss_server():
    with OSSServer({KEY_ID: SECRET}, buckets=[BUCKET]) as srv:
        yield srv
        assert srv.internal_errors == [], srv.internal_errors[0]


@pytest.fixture
def oss_store(oss_server):
    """Make an OSSStorage on the test server; fast back-off so fault tests do not sleep long."""
    from corral.storage.oss import OSSStorage

    def make(**kw):
        key_id = kw.pop("key_id", KEY_ID)
        secret = kw.pop("secret", SECRET)
        bucket = kw.pop("bucket", BUCKET)
        kw.setdefault("backoff", 0.01)
        kw.setdefault("timeout", 10)
        return OSSStorage(oss_server.endpoint, key_id, secret, bucket, **kw)

    return make


@pytest.fixture(params=["local", "oss"])
def store(request, tmp_path):
    """Each storage backend in turn, with the same semantics expected of both."""
    if request.param == "local":
        from corral.storage import LocalStorage

        return LocalStorage(str(tmp_path / "store"))
    return request.getfixturevalue("oss_store")()
