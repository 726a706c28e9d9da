"""Workspace storage on a local (or network-mounted) filesystem.

A storage path is a directory: absolute paths are used as given, relative ones
live under ``root``. Uploads and downloads copy file by file through
:mod:`corral.storage.tree` (no symlink followed on either side, each file written
atomically via temp file + ``os.replace``), keeping empty directories, permission
bits (minus setuid/setgid/sticky) and mtimes. Deletes are mirrored only when asked
(``upload_folder(..., mirror=True)``); by default an upload adds and overwrites,
as the reference did.

The sync manifest of storage path ``p`` is the file ``p.corral-sync.json`` beside
the directory (see :mod:`corral.storage.manifest`), replaced atomically.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from contextlib import contextmanager
from typing import BinaryIO, Container, Iterator, Optional

from corral.errors import CorralError, InvalidRequest, NotFound, StorageError
from corral.storage.base import Storage, SyncReport
from corral.storage.manifest import MANIFEST_SUFFIX, SyncManifest, check_complete, parse_manifest
from corral.storage.tree import FileMeta, SkipEntry, TreeReader, TreeWriter, empty_dirs, walk_regular_files

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
        raise StorageError(f"local storage {op} failed at {path}: {e}", op=op, path=path) from e


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
        if storage_path.rstrip("/").endswith(MANIFEST_SUFFIX):
            raise InvalidRequest(f"storage path {storage_path!r} ends in {MANIFEST_SUFFIX}, which corral reserves",
                                 path=storage_path)
        if os.path.isabs(storage_path):
            path = os.path.normpath(storage_path)
            if path == os.path.dirname(path):
                raise InvalidRequest("storage path may not be the filesystem root", path=storage_path)
            return path
        parts = [p for p in storage_path.split("/") if p not in ("", ".")]
        if ".." in parts or not parts:
            raise InvalidRequest(f"storage path {storage_path!r} leaves the storage root", path=storage_path)
        return os.path.join(self.root, *parts)

    def manifest_path(self, storage_path: str) -> str:
        """The file holding the sync manifest of ``storage_path`` (beside its directory)."""
        return self.resolve(storage_path) + MANIFEST_SUFFIX

    def upload_folder(self, local_dir: str, storage_path: str, *, mirror: bool = False) -> SyncReport:
        dest = self.resolve(storage_path)
        manifest = dest + MANIFEST_SUFFIX
        local_dir = os.path.abspath(local_dir)
        if not os.path.isdir(local_dir):  # before anything changes in storage
            raise NotFound(f"not a directory: {local_dir}", path=local_dir)
        with _local_errors("upload", manifest):
            if os.path.lexists(manifest):
                os.unlink(manifest)  # incomplete until this upload has gone through
        report, sizes, kept_dirs = _copy_tree(local_dir, dest, "upload", mirror)
        done = SyncManifest(files=sizes, dirs=kept_dirs, bytes=report.bytes, skipped=report.skipped)
        with _local_errors("upload", manifest):
            _write_atomic(manifest, done.dump())
        return report

    def download_folder(self, storage_path: str, local_dir: str, *, expect: bool = False) -> SyncReport:
        src = self.resolve(storage_path)
        manifest = self.last_sync(storage_path)
        if expect:
            scan = walk_regular_files(src) if os.path.isdir(src) else None
            check_complete(manifest, {f.rel: f.size for f in scan.files} if scan else {},
                           set(scan.dirs) if scan else set(), src)
        if not os.path.isdir(src):
            return SyncReport()  # nothing saved yet (a new session)
        with _local_errors("download", local_dir):
            os.makedirs(local_dir, exist_ok=True)
        report, _, _ = _copy_tree(src, os.path.abspath(local_dir), "download", False)
        report.synced_at = manifest.completed_at if manifest else None
        return report

    def last_sync(self, storage_path: str) -> Optional[SyncManifest]:
        path = self.manifest_path(storage_path)
        with _local_errors("read manifest", path):
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None
        return parse_manifest(data, path)

    def exists(self, storage_path: str) -> bool:
        path = self.resolve(storage_path)
        return os.path.lexists(path) or os.path.lexists(path + MANIFEST_SUFFIX)

    def delete(self, storage_path: str) -> int:
        path = self.resolve(storage_path)
        with _local_errors("delete", path):
            if os.path.lexists(path + MANIFEST_SUFFIX):
                os.unlink(path + MANIFEST_SUFFIX)  # first: what is left is no longer complete
            if os.path.isdir(path) and not os.path.islink(path):
                count = len(walk_regular_files(path).files)
                shutil.rmtree(path)  # rmtree does not follow symlinks
                return count
            if os.path.lexists(path):
                os.unlink(path)
                return 1
        return 0


def _write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.{secrets.token_hex(6)}.tmp"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _copy_tree(src: str, dest: str, op: str, mirror: bool) -> tuple[SyncReport, dict[str, int], list[str]]:
    """Copy the regular files and directories of ``src`` into ``dest``; see the module docstring.

    Returns the report, the size of every file written, and the written directories that hold nothing.
    """
    t0 = time.monotonic()
    scan = walk_regular_files(src)  # NotFound if src is not a directory
    report = SyncReport(skipped=list(scan.skipped))
    written_files: dict[str, int] = {}
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
                written_files[entry.rel] = size
                report.bytes += size
        if mirror:
            report.deleted = _prune(dest, written_files, written_dirs)
    report.files = len(written_files)
    report.dirs = len(written_dirs)
    report.seconds = time.monotonic() - t0
    return report, written_files, [d for d in empty_dirs(scan) if d in written_dirs]


def _copier(fsrc: BinaryIO, st: os.stat_result):
    def fill(out: BinaryIO) -> FileMeta:
        shutil.copyfileobj(fsrc, out, _CHUNK)
        return FileMeta(mode=st.st_mode, mtime_ns=st.st_mtime_ns)

    return fill


def _prune(dest: str, keep_files: Container[str], keep_dirs: Container[str]) -> int:
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
