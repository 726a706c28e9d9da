"""Workspace storage on a local (or network-mounted) filesystem.

A storage path is a directory: absolute paths are used as given, relative ones
live under ``root``. Uploads and downloads copy file by file through
:mod:`corral.storage.tree` (no symlink followed on either side, each file written
atomically via temp file + ``os.replace``), keeping empty directories, permission
bits (minus setuid/setgid/sticky) and mtimes. Deletes are mirrored only when asked
(``upload_folder(..., mirror=True)``); by default an upload adds and overwrites,
as the reference did.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import contextmanager
from typing import BinaryIO, Iterator, Optional

from corral.errors import CorralError, DriverError, InvalidRequest
from corral.storage.base import Storage, SyncReport
from corral.storage.tree import FileMeta, SkipEntry, TreeReader, TreeWriter, walk_regular_files

__all__ = ["LocalStorage"]

_CHUNK = 1 << 20


@contextmanager
def _local_errors(op: str, path: str) -> Iterator[None]:
    """The one place a local OSError becomes a corral error (the backend failed)."""
    try:
        yield
    except CorralError:
        raise
    except OSError as e:
        raise DriverError(f"local storage {op} failed at {path}: {e}", op=op, path=path) from e


class LocalStorage(Storage):
    """Storage in directories on this host. Owns only its root; holds no open state.

    ``root=None`` resolves relative storage paths against the working directory at
    construction time.
    """

    def __init__(self, root: Optional[str] = None) -> None:
        self.root = os.path.abspath(root) if root else os.getcwd()

    def __repr__(self) -> str:
        return f"LocalStorage(root={self.root!r})"

    def path_join(self, *parts: str) -> str:
        parts = tuple(p for p in parts if p)
        return os.path.join(*parts) if parts else ""

    def resolve(self, storage_path: str) -> str:
        """The directory a storage path names. Relative paths may not climb out of ``root``."""
        if not storage_path:
            raise InvalidRequest("storage path must name a folder", path=storage_path)
        if "\x00" in storage_path:
            raise InvalidRequest(f"unsafe storage path {storage_path!r}", path=storage_path)
        if os.path.isabs(storage_path):
            return os.path.normpath(storage_path)
        parts = [p for p in storage_path.split("/") if p not in ("", ".")]
        if ".." in parts or not parts:
            raise InvalidRequest(f"storage path {storage_path!r} leaves the storage root", path=storage_path)
        return os.path.join(self.root, *parts)

    def upload_folder(self, local_dir: str, storage_path: str, *, mirror: bool = False) -> SyncReport:
        return _copy_tree(os.path.abspath(local_dir), self.resolve(storage_path), "upload", mirror)

    def download_folder(self, storage_path: str, local_dir: str) -> SyncReport:
        src = self.resolve(storage_path)
        if not os.path.isdir(src):
            return SyncReport()  # nothing saved yet (a new session)
        with _local_errors("download", local_dir):
            os.makedirs(local_dir, exist_ok=True)
        return _copy_tree(src, os.path.abspath(local_dir), "download", False)

    def exists(self, storage_path: str) -> bool:
        return os.path.lexists(self.resolve(storage_path))

    def delete(self, storage_path: str) -> int:
        path = self.resolve(storage_path)
        with _local_errors("delete", path):
            if os.path.isdir(path) and not os.path.islink(path):
                count = len(walk_regular_files(path).files)
                shutil.rmtree(path)  # rmtree does not follow symlinks
                return count
            if os.path.lexists(path):
                os.unlink(path)
                return 1
        return 0


def _copy_tree(src: str, dest: str, op: str, mirror: bool) -> SyncReport:
    """Copy the regular files and directories of ``src`` into ``dest``; see the module docstring."""
    t0 = time.monotonic()
    scan = walk_regular_files(src)  # NotFound if src is not a directory
    report = SyncReport(skipped=list(scan.skipped))
    written_files: set[str] = set()
    written_dirs: set[str] = set()
    with _local_errors(op, dest):
        os.makedirs(dest, exist_ok=True)
        with TreeReader(src) as reader, TreeWriter(dest) as writer:
            for rel in scan.dirs:
                try:
                    writer.make_dir(tuple(rel.split("/")))
                except SkipEntry as s:
                    report.skipped.append((rel, s.reason))
                    continue
                written_dirs.add(rel)
            for entry in scan.files:
                try:
                    fsrc, st = reader.open_file(entry.parts)
                except SkipEntry as s:
                    report.skipped.append((entry.rel, s.reason))
                    continue
                with fsrc:
                    try:
                        size = writer.write_file(entry.parts, _copier(fsrc, st))
                    except SkipEntry as s:
                        report.skipped.append((entry.rel, s.reason))
                        continue
                written_files.add(entry.rel)
                report.bytes += size
        if mirror:
            report.deleted = _prune(dest, written_files, written_dirs)
    report.files = len(written_files)
    report.dirs = len(written_dirs)
    report.seconds = time.monotonic() - t0
    return report


def _copier(fsrc: BinaryIO, st: os.stat_result):
    def fill(out: BinaryIO) -> FileMeta:
        shutil.copyfileobj(fsrc, out, _CHUNK)
        return FileMeta(mode=st.st_mode, mtime_ns=st.st_mtime_ns)

    return fill


def _prune(dest: str, keep_files: set[str], keep_dirs: set[str]) -> int:
    """Remove regular files and directories of ``dest`` this upload did not write.

    ``dest`` is storage (host-owned), but it is walked the same link-free way; any
    symlink or special file found there is left alone.
    """
    have = walk_regular_files(dest)
    deleted = 0
    for entry in have.files:
        if entry.rel not in keep_files:
            os.unlink(os.path.join(dest, *entry.parts))
            deleted += 1
    for rel in sorted(have.dirs, reverse=True):  # children before parents
        if rel not in keep_dirs:
            try:
                os.rmdir(os.path.join(dest, *rel.split("/")))
                deleted += 1
            except OSError:
                pass  # holds something we leave alone (a symlink, a fifo)
    return deleted
