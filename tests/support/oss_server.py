"""The OSS-protocol test server, for tests: ``from tests.support.oss_server import OSSServer, Fault``.

The server itself lives in :mod:`corral.testing.oss_server` so that the storage
benchmark can use it outside the test tree; this module re-exports it and adds
:func:`oss_config`, the manager settings that point corral at a running server.
"""

from __future__ import annotations

from corral.testing.oss_server import Fault, OSSServer, RequestRecord, StoredObject, crc64_ecma, string_to_sign

__all__ = [
    "BUCKET", "KEY_ID", "SECRET", "Fault", "OSSServer", "RequestRecord", "StoredObject", "crc64_ecma", "oss_config",
    "string_to_sign",
]

# The credentials the tests' servers accept (shaped like real ones, so a leak check means something).
KEY_ID = "LTAI5tCorralTestKeyId"
SECRET = "corral-test-secret-9f8e7d6c5b4a"
BUCKET = "corral-test"


def oss_config(server: OSSServer, bucket: str = BUCKET, **kw) -> dict:
    """``SandboxManagerEnvConfig`` fields for ``file_system="oss"`` against ``server``."""
    key_id, secret = next(iter(server.credentials.items()))
    return {
        "file_system": "oss",
        "oss_endpoint": server.endpoint,
        "oss_access_key_id": key_id,
        "oss_access_key_secret": secret,
        "oss_bucket_name": bucket,
        **kw,
    }
