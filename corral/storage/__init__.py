"""Workspace storage: where a session's workspace goes on release/reap and comes back from on restore.

``make_storage(config)`` picks the backend from a :class:`~corral.models.SandboxManagerEnvConfig`
(``file_system="local"`` -> :class:`LocalStorage` rooted at ``storage_folder``;
``"oss"`` -> :class:`OSSStorage`). Both share :mod:`corral.storage.tree`, which moves
only regular files and directories, follows no symlink and writes nothing outside
the local directory. ``OSSStorage`` (and ``oss2``) load lazily, on first use.

Every upload ends by writing a :class:`SyncManifest`; ``download_folder(...,
expect=True)`` refuses a storage path whose last upload did not complete (see
:mod:`corral.storage.manifest`). The layout, settings and fault handling are
described in docs/storage.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from corral.errors import InvalidRequest
from corral.storage.base import Storage, SyncReport
from corral.storage.local import LocalStorage
from corral.storage.manifest import SyncManifest
from corral.storage.tree import walk_regular_files

if TYPE_CHECKING:
    from corral.storage.oss import OSSStorage

__all__ = [
    "LocalStorage", "OSSStorage", "Storage", "SyncManifest", "SyncReport", "make_storage", "walk_regular_files",
]


def make_storage(config: Any) -> Storage:
    """The storage backend ``config`` (a ``SandboxManagerEnvConfig`` or alike) asks for."""
    kind = getattr(config, "file_system", "local")
    if kind == "local":
        return LocalStorage(getattr(config, "storage_folder", None))
    if kind == "oss":
        from corral.storage.oss import OSSStorage

        fields = ("oss_endpoint", "oss_access_key_id", "oss_access_key_secret", "oss_bucket_name")
        missing = [f for f in fields if not getattr(config, f, None)]
        if missing:
            raise InvalidRequest(f"file_system='oss' needs {', '.join(missing)}")
        return OSSStorage(*(getattr(config, f) for f in fields))
    raise InvalidRequest(f"unknown file_system {kind!r} (expected 'local' or 'oss')")


def __getattr__(name: str) -> Any:
    if name == "OSSStorage":
        from corral.storage.oss import OSSStorage

        return OSSStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
