"""The sync manifest: how a restore knows a workspace was synced, and synced completely.

Every backend's ``upload_folder`` removes the manifest of its storage path before
it sends anything and writes a new one after everything else went through. So a
manifest exists only while the storage path holds the whole of the last upload:
an upload that failed or was cut off leaves none. ``download_folder(...,
expect=True)`` refuses a storage path without one, or one whose listed files are
missing or changed size (:class:`~corral.errors.StorageError`).

The manifest sits *next to* the storage path, not inside it
(``sessions/s1`` -> ``sessions/s1.corral-sync.json``), so it can never collide
with a file of the workspace (the sandbox picks every name in it) and is never
downloaded into one.
"""

from __future__ import annotations

import json
import time
from typing import Literal, Optional

from pydantic import BaseModel, Field, ValidationError

from corral.errors import StorageError

__all__ = ["MANIFEST_SUFFIX", "SyncManifest", "check_complete", "parse_manifest"]

MANIFEST_SUFFIX = ".corral-sync.json"
_SHOW = 10  # names listed in an error message before "and N more"


class SyncManifest(BaseModel):
    """What one complete ``upload_folder`` left at its storage path."""

    format: Literal["corral-sync/1"] = "corral-sync/1"
    completed_at: float = Field(default_factory=time.time, description="Unix time the upload finished.")
    files: dict[str, int] = Field(default_factory=dict, description="Workspace path -> size of every file sent.")
    dirs: list[str] = Field(default_factory=list, description="Empty directories the upload kept.")
    bytes: int = 0
    skipped: list[tuple[str, str]] = Field(default_factory=list, description="What the upload did not send, and why.")

    def dump(self) -> bytes:
        # ASCII JSON from the python-mode dump: a workspace name that is not valid UTF-8
        # (a lone surrogate here) survives as a \\udcXX escape; pydantic's JSON mode would mangle it
        return json.dumps(self.model_dump(), ensure_ascii=True, separators=(",", ":")).encode("ascii")


def parse_manifest(data: bytes, where: str) -> SyncManifest:
    """The manifest in ``data``; :class:`StorageError` if it is not one."""
    try:
        return SyncManifest.model_validate(json.loads(data))
    except (ValueError, ValidationError) as e:
        raise StorageError(f"the sync manifest at {where} is unreadable: {str(e)[:200]}", path=where) from None


def _names(items: list[str]) -> str:
    shown = ", ".join(repr(i) for i in items[:_SHOW])
    return shown + (f" and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


def check_complete(manifest: Optional[SyncManifest], files: dict[str, int], dirs: set[str], where: str) -> None:
    """Raise :class:`StorageError` unless storage (``files``: path -> size, ``dirs``) holds all of ``manifest``."""
    if manifest is None:
        raise StorageError(
            f"no complete sync at {where}: its manifest is missing (the workspace was never synced there, "
            "or the last upload did not finish)", path=where,
        )
    missing = sorted(rel for rel in manifest.files if rel not in files)
    changed = sorted(
        f"{rel} ({files[rel]} bytes, expected {size})"
        for rel, size in manifest.files.items() if rel in files and files[rel] != size
    )
    gone_dirs = sorted(d for d in manifest.dirs if d not in dirs)
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(manifest.files)} files missing: {_names(missing)}")
    if changed:
        problems.append(f"{len(changed)} files changed size: {_names(changed)}")
    if gone_dirs:
        problems.append(f"{len(gone_dirs)} directories missing: {_names(gone_dirs)}")
    if problems:
        raise StorageError(
            f"the workspace synced to {where} is incomplete: " + "; ".join(problems),
            path=where, missing=missing[:100], changed=changed[:100], missing_dirs=gone_dirs[:100],
        )
