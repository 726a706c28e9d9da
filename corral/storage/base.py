"""The storage interface every workspace backend implements, and its sync report.

A *storage path* names a folder in a backend (a directory for :class:`LocalStorage`,
a key prefix for :class:`OSSStorage`). A session's workspace (a host directory the
sandbox can write) is uploaded there on release/reap and downloaded back on restore.

The workspace is untrusted: the sandbox controls every name and file type in it.
Every backend therefore moves only regular files and directories, never follows a
symlink, and never writes outside the local directory it was given (see
:mod:`corral.storage.tree`, the shared code that enforces this). What it does not
move it reports in :attr:`SyncReport.skipped`; nothing is capped or dropped silently.

Completeness: ``upload_folder`` writes a :class:`~corral.storage.manifest.SyncManifest`
last (see :mod:`corral.storage.manifest`); ``download_folder(..., expect=True)``
refuses a storage path whose last upload did not complete. Neither method ever
deletes anything in the local directory.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Optional

from pydantic import BaseModel, Field

from corral.storage.manifest import SyncManifest

__all__ = ["Storage", "SyncReport"]


class SyncReport(BaseModel):
    """What one ``upload_folder`` / ``download_folder`` call did."""

    files: int = Field(0, description="Regular files written to the destination.")
    bytes: int = Field(0, description="Bytes of those files.")
    dirs: int = Field(0, description="Directories created or kept (empty ones included).")
    deleted: int = Field(
        0, description="Destination entries removed because the source no longer has them (mirror=True)."
    )
    skipped: list[tuple[str, str]] = Field(
        default_factory=list,
        description="(relative path or key, reason) for every entry that was not transferred.",
    )
    seconds: float = Field(0.0, description="Wall time of the call.")
    synced_at: Optional[float] = Field(
        None, description="Download only: when the upload it restored completed (its manifest), if it had one."
    )


class Storage(ABC):
    """A place workspaces are synced to. Owns nothing but its connection/root.

    Idempotency: ``upload_folder`` and ``download_folder`` overwrite what they find,
    so repeating one gives the same result; ``delete`` of a missing path is a no-op;
    ``download_folder`` of a missing storage path downloads nothing (a new session
    has no saved workspace yet) unless ``expect=True``. Each blocking method has an
    ``*_async`` twin that runs it in a worker thread, so an actor never blocks its
    event loop.

    Failures: a backend failure is a :class:`corral.errors.StorageError` naming the
    operation and the path or key; a storage path that is absolute where it may not
    be, or climbs out with ``..``, is :class:`corral.errors.InvalidRequest`.
    """

    @abstractmethod
    def upload_folder(self, local_dir: str, storage_path: str, *, mirror: bool = False) -> SyncReport:
        """Copy the regular files and directories under ``local_dir`` to ``storage_path``.

        ``mirror=False`` (the default, as in the reference) only adds and overwrites;
        ``mirror=True`` also removes what ``storage_path`` holds beyond this upload.
        The manifest is removed first and written last, so a failed upload leaves
        the storage path marked incomplete. Raises :class:`corral.errors.NotFound`
        if ``local_dir`` is not a directory.
        """

    @abstractmethod
    def download_folder(self, storage_path: str, local_dir: str, *, expect: bool = False) -> SyncReport:
        """Copy everything under ``storage_path`` into ``local_dir`` (created if missing).

        Files already in ``local_dir`` are overwritten or left alone, never deleted.
        ``expect=True`` (a session that was synced before) first checks that the
        storage path holds a manifest and every file and directory it lists, at the
        listed size, and raises :class:`corral.errors.StorageError` naming what is
        missing otherwise, before anything is written locally.
        """

    @abstractmethod
    def last_sync(self, storage_path: str) -> Optional[SyncManifest]:
        """The manifest of the last complete upload to ``storage_path``, or None."""

    @abstractmethod
    def path_join(self, *parts: str) -> str:
        """Join storage path parts the way this backend spells paths."""

    @abstractmethod
    def exists(self, storage_path: str) -> bool:
        """Whether anything is stored at ``storage_path``."""

    @abstractmethod
    def delete(self, storage_path: str) -> int:
        """Remove everything under ``storage_path``; returns how many files went. Idempotent."""

    # Async twins: one thread per call, so the caller's event loop stays free.

    async def upload_folder_async(self, local_dir: str, storage_path: str, *, mirror: bool = False) -> SyncReport:
        return await asyncio.to_thread(self.upload_folder, local_dir, storage_path, mirror=mirror)

    async def download_folder_async(self, storage_path: str, local_dir: str, *, expect: bool = False) -> SyncReport:
        return await asyncio.to_thread(self.download_folder, storage_path, local_dir, expect=expect)

    async def last_sync_async(self, storage_path: str) -> Optional[SyncManifest]:
        return await asyncio.to_thread(self.last_sync, storage_path)

    async def exists_async(self, storage_path: str) -> bool:
        return await asyncio.to_thread(self.exists, storage_path)

    async def delete_async(self, storage_path: str) -> int:
        return await asyncio.to_thread(self.delete, storage_path)
