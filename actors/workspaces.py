"""Workspaces: the workspace directories of a node's sandboxes, and their copies in storage.

What it owns: the storage client of its pool (made on first use, when the namespace has
storage) and the workspace steps of a sandbox's life on this node: the directory made for a
start and what storage brings into it (:meth:`prepare`), the upload before a reset or a
teardown (:meth:`upload`, :meth:`sync`), and the removal of a workspace corral made under
``default_mount_dir`` (:meth:`remove_own`; never a user's mount dir). When to do which is the
registry's decision, passed with each record (``download``, ``upload``, the teardown's action).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Optional

from corral.models import ContainerModel, SandboxManagerEnvConfig

__all__ = ["Workspaces"]

logger = logging.getLogger("corral.pool")


class Workspaces:
    """See the module docstring."""

    def __init__(self, config: SandboxManagerEnvConfig) -> None:
        self.config = config
        self._storage: Any = None

    @property
    def storage(self) -> Any:
        if self._storage is None and (self.config.storage_folder or self.config.file_system == "oss"):
            from corral.storage import make_storage

            self._storage = make_storage(self.config)
        return self._storage

    def _synced(self, rec: ContainerModel) -> bool:
        return bool(rec.mount_dir and rec.storage_path and self.storage is not None)

    async def prepare(self, rec: ContainerModel, download: Optional[str]) -> Optional[str]:
        """The sandbox's workspace directory (None: it has none), made, with what storage holds for
        it when ``download`` is "optional" or "expected" (then a download that does not find all of
        it fails and says what is missing)."""
        if not rec.mount_dir:
            return None
        workspace = os.path.abspath(rec.mount_dir)
        os.makedirs(workspace, exist_ok=True)
        if download and self._synced(rec):
            await self.storage.download_folder_async(rec.storage_path, workspace, expect=download == "expected")
        return workspace

    async def upload(self, rec: ContainerModel) -> None:
        """Copy the workspace to storage (raises when the upload fails)."""
        if self._synced(rec):
            await self.storage.upload_folder_async(rec.mount_dir, rec.storage_path)

    async def sync(self, rec: ContainerModel) -> tuple[Optional[float], Optional[str]]:
        """:meth:`upload`, reported as (when it completed, why it failed)."""
        if not self._synced(rec):
            return None, None
        try:
            await self.upload(rec)
            return time.time(), None
        except Exception as e:  # the container still goes; the workspace stays on disk
            logger.warning("upload of %s failed: %s", rec.container_name, e)
            return None, f"upload to {rec.storage_path} failed: {e}"

    def remove_own(self, rec: ContainerModel) -> None:
        """Delete a workspace corral made under default_mount_dir (never a user's mount dir)."""
        if not rec.mount_dir or not self.config.default_mount_dir:
            return
        base = os.path.realpath(self.config.default_mount_dir)
        path = os.path.realpath(rec.mount_dir)
        if os.path.dirname(path) == base and os.path.basename(path) == rec.session_id:
            shutil.rmtree(path, ignore_errors=True)
