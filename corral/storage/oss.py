"""Workspace storage in an Alibaba Cloud OSS bucket (through ``oss2``).

A storage path is a key prefix: the file ``a/b.txt`` of a workspace synced to
``sessions/s1`` is the object ``sessions/s1/a/b.txt``. Empty directories are kept
as zero-byte ``dir/`` marker objects. Permission bits and mtime travel as object
metadata (``x-oss-meta-corral-mode``, ``x-oss-meta-corral-mtime-ns``).

The same guards as :class:`~corral.storage.local.LocalStorage` apply, through the
shared :mod:`corral.storage.tree`: uploads read each file from an fd opened with
``O_NOFOLLOW`` and ``fstat``-checked (symlinks, fifos, sockets and devices are
skipped and reported), downloads reject keys that are absolute or hold ``..`` and
never write through a symlink already in the local directory. For that reason
this module does not use ``put_object_from_file`` / ``get_object_to_file`` /
``resumable_upload``: they open a *path*, which follows a symlink the sandbox
may have swapped in. It calls ``put_object`` / ``get_object`` on file objects we
opened safely instead (with the same length and CRC checks ``get_object_to_file``
does), and a plain multipart upload above ``multipart_threshold`` (not resumable
across a crash of this process).

All oss2 errors become corral errors in one place, :func:`map_oss_error`.

UNTESTED TRANSPORT: no OSS service is reachable from the machine this was written
on, so only the pure parts (key mapping, path joining, the upload plan and its
symlink filtering, download key checks, error mapping) are unit-tested. The
calls into ``oss2.Bucket`` have never run against a real bucket.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from itertools import islice
from typing import BinaryIO, Callable, Iterator, Optional

import oss2
import oss2.exceptions
import oss2.models
import oss2.utils

from corral.errors import CorralError, DriverError, InvalidRequest, NotFound
from corral.storage.base import Storage, SyncReport
from corral.storage.tree import (
    FileEntry,
    FileMeta,
    SkipEntry,
    TreeReader,
    TreeWriter,
    empty_dirs,
    safe_relparts,
    walk_regular_files,
)

__all__ = [
    "OSSStorage",
    "UploadPlan",
    "download_target",
    "map_oss_error",
    "object_key",
    "storage_prefix",
]

META_MODE = "x-oss-meta-corral-mode"
META_MTIME = "x-oss-meta-corral-mtime-ns"
MAX_KEY_BYTES = 1023  # OSS's limit on an object name
_BATCH_DELETE = 1000  # OSS's limit per DeleteMultipleObjects


# ---------------------------------------------------------------- pure parts


def storage_prefix(storage_path: str) -> str:
    """The key prefix (no leading/trailing ``/``) a storage path names; rejects ``..`` and ``.``."""
    prefix = (storage_path or "").strip("/")
    if not prefix:
        raise InvalidRequest("storage path must name a folder", path=storage_path)
    try:
        safe_relparts(prefix)
    except InvalidRequest:
        raise InvalidRequest(f"unsafe storage path {storage_path!r}", path=storage_path) from None
    return prefix


def object_key(prefix: str, rel: str) -> str:
    """The object key of workspace path ``rel`` under ``prefix``; :class:`SkipEntry` if OSS cannot name it."""
    key = f"{prefix}/{rel}"
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise SkipEntry("name is not valid UTF-8") from None
    if size > MAX_KEY_BYTES:
        raise SkipEntry(f"object key longer than {MAX_KEY_BYTES} bytes")
    return key


def download_target(prefix: str, key: str) -> tuple[str, tuple[str, ...]]:
    """Where object ``key`` goes below the local directory: ``("file"|"dir"|"root", parts)``.

    Raises :class:`SkipEntry` for a key outside ``prefix/`` or one that is absolute
    or holds ``..``, ``.`` or an empty component once the prefix is removed.
    """
    if not key.startswith(prefix + "/"):
        raise SkipEntry("outside the storage path")
    rel = key[len(prefix) + 1:]
    if rel == "":
        return "root", ()
    kind = "dir" if rel.endswith("/") else "file"
    try:
        parts = safe_relparts(rel[:-1] if kind == "dir" else rel)
    except InvalidRequest:
        raise SkipEntry("unsafe key (absolute, '..', '.' or empty component)") from None
    return kind, parts


@dataclass
class UploadPlan:
    """What an upload will send: (file, key) pairs, empty-dir marker keys, and what it skips."""

    files: list[tuple[FileEntry, str]] = field(default_factory=list)
    dir_markers: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def plan_upload(local_dir: str, prefix: str) -> UploadPlan:
    """Walk ``local_dir`` (no symlink followed) and name every object to send."""
    scan = walk_regular_files(local_dir)
    plan = UploadPlan(skipped=list(scan.skipped))
    for entry in scan.files:
        try:
            plan.files.append((entry, object_key(prefix, entry.rel)))
        except SkipEntry as s:
            plan.skipped.append((entry.rel, s.reason))
    for rel in empty_dirs(scan):
        try:
            plan.dir_markers.append(object_key(prefix, rel + "/"))
        except SkipEntry as s:
            plan.skipped.append((rel, s.reason))
    return plan


def map_oss_error(exc: BaseException, op: str, target: str) -> CorralError:
    """The corral error for a failure of ``op`` on ``target`` (the one mapping point).

    NoSuchKey -> NotFound; InvalidObjectName -> InvalidRequest; everything else
    (network, 5xx, access denied, missing bucket, CRC mismatch, local disk) is the
    storage backend failing -> DriverError (retryable infrastructure).
    """
    if isinstance(exc, CorralError):
        return exc
    details = {"op": op, "target": target}
    if isinstance(exc, oss2.exceptions.OssError):
        details.update(status=exc.status, oss_code=exc.code or type(exc).__name__, request_id=exc.request_id)
        msg = f"OSS {op} of {target!r} failed: {exc.status} {exc.code or type(exc).__name__}: {str(exc)[:300]}"
        if isinstance(exc, oss2.exceptions.NoSuchKey):
            return NotFound(msg, **details)
        if isinstance(exc, oss2.exceptions.InvalidObjectName):
            return InvalidRequest(msg, **details)
        return DriverError(msg, **details)
    return DriverError(f"OSS {op} of {target!r} failed: {type(exc).__name__}: {exc}", **details)


@contextmanager
def _oss_errors(op: str, target: str) -> Iterator[None]:
    try:
        yield
    except CorralError:
        raise
    except (oss2.exceptions.OssError, OSError) as e:
        raise map_oss_error(e, op, target) from e


def _meta_from_headers(headers) -> FileMeta:
    mode = mtime = None
    with suppress(TypeError, ValueError):
        mode = int(headers.get(META_MODE), 8)
    with suppress(TypeError, ValueError):
        mtime = int(headers.get(META_MTIME))
    return FileMeta(mode=mode, mtime_ns=mtime)


# ---------------------------------------------------------------- transport


class OSSStorage(Storage):
    """Storage in one OSS bucket. Owns its lazily made ``oss2.Bucket`` (thread-safe)."""

    def __init__(
        self,
        endpoint: str,
        key_id: str,
        key_secret: str,
        bucket: str,
        *,
        multipart_threshold: int = 256 << 20,
        part_size: int = 64 << 20,
    ) -> None:
        self.endpoint = endpoint
        self.bucket_name = bucket
        self._key_id = key_id
        self._key_secret = key_secret
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self._bucket: Optional[oss2.Bucket] = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # no secrets
        return f"OSSStorage(endpoint={self.endpoint!r}, bucket={self.bucket_name!r})"

    @property
    def bucket(self) -> oss2.Bucket:
        with self._lock:
            if self._bucket is None:
                self._bucket = oss2.Bucket(oss2.Auth(self._key_id, self._key_secret), self.endpoint, self.bucket_name)
            return self._bucket

    def path_join(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in parts if p and p.strip("/"))

    # ---- upload

    def upload_folder(self, local_dir: str, storage_path: str, *, mirror: bool = False) -> SyncReport:
        t0 = time.monotonic()
        prefix = storage_prefix(storage_path)
        plan = plan_upload(local_dir, prefix)
        report = SyncReport(skipped=list(plan.skipped))
        sent: set[str] = set()
        with TreeReader(local_dir) as reader:
            for entry, key in plan.files:
                try:
                    fsrc, st = reader.open_file(entry.parts)
                except SkipEntry as s:
                    report.skipped.append((entry.rel, s.reason))
                    continue
                with fsrc, _oss_errors("upload", key):
                    self._put(key, fsrc, st)
                sent.add(key)
                report.files += 1
                report.bytes += st.st_size
        for key in plan.dir_markers:
            with _oss_errors("upload", key):
                self.bucket.put_object(key, b"")
            sent.add(key)
        report.dirs = len(plan.dir_markers)
        if mirror:
            report.deleted = self._delete_keys([k for k in self._list(prefix) if k not in sent], prefix)
        report.seconds = time.monotonic() - t0
        return report

    def _put(self, key: str, fsrc: BinaryIO, st: os.stat_result) -> None:
        headers = {META_MODE: "%o" % (st.st_mode & 0o777), META_MTIME: str(st.st_mtime_ns)}
        if st.st_size < self.multipart_threshold:
            self.bucket.put_object(key, fsrc, headers=headers)
            return
        bucket = self.bucket
        size = st.st_size
        part_size = oss2.determine_part_size(size, preferred_size=self.part_size)
        upload_id = bucket.init_multipart_upload(key, headers=headers).upload_id
        try:
            parts, offset, number = [], 0, 1
            while offset < size:
                n = min(part_size, size - offset)
                result = bucket.upload_part(key, upload_id, number, oss2.utils.SizedFileAdapter(fsrc, n))
                parts.append(oss2.models.PartInfo(number, result.etag, size=n))
                offset, number = offset + n, number + 1
            bucket.complete_multipart_upload(key, upload_id, parts)
        except BaseException:
            with suppress(Exception):
                bucket.abort_multipart_upload(key, upload_id)
            raise

    # ---- download

    def download_folder(self, storage_path: str, local_dir: str) -> SyncReport:
        t0 = time.monotonic()
        prefix = storage_prefix(storage_path)
        report = SyncReport()
        with _oss_errors("download", prefix):
            os.makedirs(local_dir, exist_ok=True)
            with TreeWriter(local_dir) as writer:
                for key in self._list(prefix):
                    try:
                        kind, parts = download_target(prefix, key)
                        if kind == "dir":
                            writer.make_dir(parts)
                            report.dirs += 1
                        elif kind == "file":
                            report.bytes += writer.write_file(parts, self._fetcher(key))
                            report.files += 1
                    except SkipEntry as s:
                        report.skipped.append((key, s.reason))
        report.seconds = time.monotonic() - t0
        return report

    def _fetcher(self, key: str) -> Callable[[BinaryIO], FileMeta]:
        def fill(out: BinaryIO) -> FileMeta:
            # What Bucket.get_object_to_file does, minus its open() of a path.
            bucket = self.bucket
            result = bucket.get_object(key)
            if result.content_length is None:
                shutil.copyfileobj(result, out)
            else:
                oss2.utils.copyfileobj_and_verify(result, out, result.content_length, request_id=result.request_id)
            if bucket.enable_crc:
                oss2.utils.check_crc("get", result.client_crc, result.server_crc, result.request_id)
            return _meta_from_headers(result.headers)

        return fill

    # ---- listing, exists, delete

    def _list(self, prefix: str) -> Iterator[str]:
        with _oss_errors("list", prefix):
            for obj in oss2.ObjectIterator(self.bucket, prefix=prefix + "/"):
                yield obj.key

    def exists(self, storage_path: str) -> bool:
        prefix = storage_prefix(storage_path)
        with _oss_errors("exists", prefix):
            if self.bucket.object_exists(prefix):
                return True
        return any(True for _ in islice(self._list(prefix), 1))

    def delete(self, storage_path: str) -> int:
        prefix = storage_prefix(storage_path)
        keys = list(self._list(prefix))
        with _oss_errors("delete", prefix):
            if self.bucket.object_exists(prefix):
                keys.append(prefix)
        return self._delete_keys(keys, prefix)

    def _delete_keys(self, keys: list[str], prefix: str) -> int:
        for i in range(0, len(keys), _BATCH_DELETE):
            with _oss_errors("delete", prefix):
                self.bucket.batch_delete_objects(keys[i:i + _BATCH_DELETE])
        return len(keys)
