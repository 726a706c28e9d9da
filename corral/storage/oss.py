"""Workspace storage in an Alibaba Cloud OSS bucket (through ``oss2``, V1 signatures).

A storage path is a key prefix: the file ``a/b.txt`` of a workspace synced to
``sessions/s1`` is the object ``sessions/s1/a/b.txt``. Empty directories are kept
as zero-byte ``dir/`` marker objects. Permission bits and mtime travel as object
metadata (``x-oss-meta-corral-mode``, ``x-oss-meta-corral-mtime-ns``). The sync
manifest is the object ``sessions/s1.corral-sync.json``, beside the prefix (see
:mod:`corral.storage.manifest`).

The same guards as :class:`~corral.storage.local.LocalStorage` apply, through the
shared :mod:`corral.storage.tree`: uploads read each file from an fd opened with
``O_NOFOLLOW`` and ``fstat``-checked (symlinks, fifos, sockets and devices are
skipped and reported), downloads reject keys that are absolute or hold ``..`` and
never write through a symlink already in the local directory. For that reason
this module does not use ``put_object_from_file`` / ``get_object_to_file`` /
``resumable_upload``: they open a *path*, which follows a symlink the sandbox
may have swapped in. It calls ``put_object`` / ``get_object`` on file objects we
opened safely instead, checking length and CRC-64 on the way down (oss2 checks
the CRC on the way up), and a plain multipart upload for files of
``multipart_threshold`` bytes and more (each part retried on its own; not
resumable across a crash of this process).

Transfers run ``concurrency`` files at a time. Retries live in one place,
:meth:`OSSStorage._attempt`: a dropped or refused connection, a timeout, a 5xx
or 429 answer, or data that arrives damaged is retried with exponential back-off
(``attempts`` tries in all); anything else (a wrong key, a missing bucket, access
denied) fails at once. oss2 itself does not retry these calls (its
``requests`` adapter has ``max_retries=0``), so retries never stack. Every
failure becomes a corral error in one place, :func:`map_oss_error`, whose message
names the operation and key and holds no credential; oss2's own log records are
passed through :func:`redact` by a filter on its loggers.
"""

from __future__ import annotations

import http.client
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator, Optional, TypeVar

import oss2
import oss2.exceptions
import oss2.models
import oss2.utils
import requests
import urllib3.exceptions

from corral.errors import CorralError, InvalidRequest, NotFound, StorageError
from corral.storage.base import Storage, SyncReport
from corral.storage.manifest import MANIFEST_SUFFIX, SyncManifest, check_complete, parse_manifest
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
    "is_transient",
    "manifest_key",
    "map_oss_error",
    "object_key",
    "redact",
    "storage_prefix",
]

logger = logging.getLogger(__name__)

META_MODE = "x-oss-meta-corral-mode"
META_MTIME = "x-oss-meta-corral-mtime-ns"
MAX_KEY_BYTES = 1023  # OSS's limit on an object name
_BATCH_DELETE = 1000  # OSS's limit per DeleteMultipleObjects
_LIST_PAGE = 1000  # OSS's limit per ListObjects page
_CHUNK = 1 << 20
T = TypeVar("T")


# ---------------------------------------------------------------- pure parts


def storage_prefix(storage_path: str) -> str:
    """The key prefix (no leading/trailing ``/``) a storage path names; rejects ``..`` and ``.``."""
    prefix = (storage_path or "").strip("/")
    if not prefix:
        raise InvalidRequest("storage path must name a folder", path=storage_path)
    if prefix.endswith(MANIFEST_SUFFIX):
        raise InvalidRequest(f"storage path {storage_path!r} ends in {MANIFEST_SUFFIX}, which corral reserves",
                             path=storage_path)
    try:
        safe_relparts(prefix)
    except InvalidRequest:
        raise InvalidRequest(f"unsafe storage path {storage_path!r}", path=storage_path) from None
    return prefix


def manifest_key(prefix: str) -> str:
    """The object holding the sync manifest of ``prefix`` (beside it, not under it)."""
    return prefix + MANIFEST_SUFFIX


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


# ---------------------------------------------------------------- credentials stay out of text

_known_secrets: set[str] = set()  # key ids and secrets of every OSSStorage made in this process
_secrets_lock = threading.Lock()
_REDACTIONS = [
    # an Authorization header value: "OSS <key id>:<signature>"
    (re.compile(r"\bOSS\s+[^\s:'\"]+:[A-Za-z0-9+/=]+"), "OSS <redacted>"),
    # dict reprs oss2 logs: request headers, error details
    (re.compile(r"('(?:authorization|x-oss-security-token|security-token|OSSAccessKeyId|SignatureProvided|"
                r"StringToSign|StringToSignBytes|Signature)'\s*:\s*)(?:'[^']*'|\"[^\"]*\")", re.I), r"\1'<redacted>'"),
    # error XML bodies
    (re.compile(r"(<(OSSAccessKeyId|SignatureProvided|StringToSign|StringToSignBytes)>)[^<]*"), r"\1<redacted>"),
    # oss2.auth's "Init Auth v1: access_key_id: ..."
    (re.compile(r"(access_key_id:\s*)[^\s,]+"), r"\1<redacted>"),
]


def redact(text: str) -> str:
    """``text`` with every signature, Authorization value and known key id or secret replaced."""
    for pattern, repl in _REDACTIONS:
        text = pattern.sub(repl, text)
    with _secrets_lock:
        known = sorted(_known_secrets, key=len, reverse=True)
    for s in known:
        text = text.replace(s, "<redacted>")
    return text


class _RedactFilter(logging.Filter):
    """Runs every record of oss2's loggers through :func:`redact` (its debug and info
    records print request headers and error details, which carry the key id and signature)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a malformed record is not ours to fix
            return True
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        return True


_FILTER = _RedactFilter()
for _name in ("oss2", "oss2.api", "oss2.http", "oss2.auth", "oss2.utils", "oss2.models", "oss2.resumable",
              "oss2.xml_utils", "oss2.credentials", "oss2.crypto", "oss2.crypto_bucket", "oss2.task_queue"):
    _lg = logging.getLogger(_name)
    if _FILTER not in _lg.filters:
        _lg.addFilter(_FILTER)


def _register_secret(*values: str) -> None:
    # real key ids and secrets are 16-30+ characters; a short value would blank out ordinary words
    with _secrets_lock:
        _known_secrets.update(v for v in values if v and len(v) >= 8)


# ---------------------------------------------------------------- failures

_HINTS = {
    "InvalidAccessKeyId": "the access key id was not accepted; check oss_access_key_id",
    "SignatureDoesNotMatch": "the request signature was rejected; check oss_access_key_secret",
    "NoSuchBucket": "the bucket does not exist; check oss_bucket_name and oss_endpoint",
    "AccessDenied": "access denied; the key may lack permission on this bucket",
    "RequestTimeTooSkewed": "this host's clock is more than 15 minutes off the service's",
}
_TRANSIENT_CODES = {"InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling", "SlowDown"}


def is_transient(exc: BaseException) -> bool:
    """Whether repeating the request may succeed: no answer, a 5xx or 429, damaged data."""
    if isinstance(exc, (oss2.exceptions.RequestError, oss2.exceptions.InconsistentError)):
        return True
    if isinstance(exc, oss2.exceptions.OssError):
        return exc.status >= 500 or exc.status == 429 or exc.code in _TRANSIENT_CODES
    # a body cut short surfaces from requests/urllib3 while it is read, after oss2 returned
    return isinstance(exc, (requests.exceptions.RequestException, urllib3.exceptions.HTTPError,
                            http.client.HTTPException))


def describe(exc: BaseException) -> str:
    """A short, credential-free account of one failure (never oss2's ``str()``, which holds the details)."""
    if isinstance(exc, oss2.exceptions.RequestError):
        inner = getattr(exc, "exception", None)
        why = f"{type(inner).__name__}: {inner}" if inner is not None else "no answer"
        return redact(f"no answer from the service ({why[:240]})")
    if isinstance(exc, oss2.exceptions.InconsistentError):
        return "the data arrived damaged (CRC-64 or length mismatch)"
    if isinstance(exc, oss2.exceptions.ClientError):
        return redact(f"invalid request: {str(exc.body)[:240]}")
    if isinstance(exc, oss2.exceptions.OssError):
        code = exc.code or type(exc).__name__
        text = f"{exc.status} {code}"
        hint = _HINTS.get(code)
        if hint:
            text += f" ({hint})"
        elif exc.message:
            text += f": {exc.message[:240]}"
        return redact(text)
    return redact(f"{type(exc).__name__}: {str(exc)[:240]}")


def map_oss_error(exc: BaseException, op: str, target: str, attempts: int = 1) -> CorralError:
    """The corral error for a failure of ``op`` on ``target`` (the one mapping point).

    NoSuchKey -> NotFound; InvalidObjectName -> InvalidRequest; everything else
    (no answer, 5xx, access denied, wrong key, missing bucket, CRC mismatch) is
    the storage failing -> :class:`~corral.errors.StorageError`.
    """
    if isinstance(exc, CorralError):
        return exc
    details: dict = {"op": op, "target": target, "attempts": attempts}
    if isinstance(exc, oss2.exceptions.OssError):
        details.update(status=exc.status, oss_code=exc.code or type(exc).__name__, request_id=exc.request_id)
    after = f" after {attempts} attempts" if attempts > 1 else ""
    msg = f"OSS {op} of {target!r} failed{after}: {describe(exc)}"
    if isinstance(exc, oss2.exceptions.NoSuchKey):
        return NotFound(msg, **details)
    if isinstance(exc, oss2.exceptions.InvalidObjectName):
        return InvalidRequest(msg, **details)
    return StorageError(msg, **details)


def _meta_from_headers(headers) -> FileMeta:
    mode = mtime = None
    with suppress(TypeError, ValueError):
        mode = int(headers.get(META_MODE), 8)
    with suppress(TypeError, ValueError):
        mtime = int(headers.get(META_MTIME))
    return FileMeta(mode=mode, mtime_ns=mtime)


# ---------------------------------------------------------------- transport


class OSSStorage(Storage):
    """Storage in one OSS bucket. Owns its ``oss2.Bucket`` (thread-safe) and retry policy.

    ``timeout`` bounds each request's connect and each read (seconds); a request
    is tried ``attempts`` times in all, waiting ``backoff``, 2x, 4x ... (at most
    ``max_backoff``, with jitter) between tries. Construction checks the endpoint
    and bucket name but makes no connection.
    """

    def __init__(
        self,
        endpoint: str,
        key_id: str,
        key_secret: str,
        bucket: str,
        *,
        multipart_threshold: int = 32 << 20,
        part_size: int = 8 << 20,
        concurrency: int = 8,
        timeout: float = 60.0,
        attempts: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 8.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if attempts < 1 or concurrency < 1:
            raise InvalidRequest("attempts and concurrency must be at least 1")
        if part_size < 100 * 1024 or multipart_threshold < part_size:
            raise InvalidRequest("part_size must be at least 100 KiB and multipart_threshold at least part_size")
        self.endpoint = endpoint
        self.bucket_name = bucket
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.concurrency = concurrency
        self.timeout = timeout
        self.attempts = attempts
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._sleep = sleep
        self._executor: Optional[ThreadPoolExecutor] = None
        self._executor_lock = threading.Lock()
        _register_secret(key_id, key_secret)
        try:
            # connections: the transfer threads, plus callers' own threads (listing, manifests)
            self._bucket = oss2.Bucket(
                oss2.Auth(key_id, key_secret), endpoint, bucket, connect_timeout=timeout,
                session=oss2.Session(pool_size=2 * concurrency + 2),
            )
        except oss2.exceptions.ClientError as e:
            raise InvalidRequest(f"invalid OSS settings for bucket {bucket!r} at {endpoint!r}: "
                                 f"{redact(str(e.body))[:200]}") from None

    def __repr__(self) -> str:  # no credentials
        return f"OSSStorage(endpoint={self.endpoint!r}, bucket={self.bucket_name!r})"

    @property
    def bucket(self) -> oss2.Bucket:
        return self._bucket

    def where(self, prefix: str) -> str:
        return f"oss://{self.bucket_name}/{prefix}"

    def path_join(self, *parts: str) -> str:
        return "/".join(p.strip("/") for p in parts if p and p.strip("/"))

    # ---- the one retry loop

    def _attempt(self, op: str, target: str, fn: Callable[[], T]) -> T:
        """``fn()``, repeated on transient failures; any failure left becomes a corral error."""
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            try:
                return fn()
            except CorralError:
                raise
            except Exception as e:
                if not is_transient(e) or attempt == self.attempts:
                    # from None: oss2's exception text carries the key id and signature
                    raise map_oss_error(e, op, target, attempt) from None
                wait = min(delay, self.max_backoff) * random.uniform(0.5, 1.0)
                logger.warning("OSS %s of %r failed (attempt %d of %d): %s; retrying in %.2fs",
                               op, target, attempt, self.attempts, describe(e), wait)
                self._sleep(wait)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def _parallel(self, fn: Callable[[T], object], items: list[T]) -> list:
        """``[fn(i) for i in items]`` on this storage's transfer threads; the first error cancels the rest.

        The threads are shared by every call on this storage, so syncs running at once
        (a pool releasing several sessions) together keep ``concurrency`` transfers in flight.
        """
        if self.concurrency == 1 or len(items) <= 1:
            return [fn(i) for i in items]
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="corral-oss")
            pool = self._executor
        futures = [pool.submit(fn, i) for i in items]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:
                f.cancel()
            for f in futures:  # let the ones already running finish before the caller moves on
                if not f.cancelled():
                    with suppress(BaseException):
                        f.result()
            raise

    # ---- upload

    def upload_folder(self, local_dir: str, storage_path: str, *, mirror: bool = False) -> SyncReport:
        t0 = time.monotonic()
        prefix = storage_prefix(storage_path)
        plan = plan_upload(local_dir, prefix)  # NotFound before anything changes in the bucket
        report = SyncReport(skipped=list(plan.skipped))
        mkey = manifest_key(prefix)
        self._attempt("upload", mkey, lambda: self.bucket.delete_object(mkey))  # incomplete from here on
        sizes: dict[str, int] = {}
        with TreeReader(local_dir) as reader:

            def send(item: tuple[FileEntry, str]) -> Optional[tuple[str, str]]:
                entry, key = item
                try:
                    fsrc, _ = reader.open_file(entry.parts)
                except SkipEntry as s:
                    return entry.rel, s.reason
                with fsrc:
                    sizes[entry.rel] = self._put(key, fsrc)
                return None

            for skipped in self._parallel(send, plan.files):
                if skipped is not None:
                    report.skipped.append(skipped)
        self._parallel(lambda key: self._attempt("upload", key, lambda: self.bucket.put_object(key, b"")),
                       plan.dir_markers)
        if mirror:
            keep = {key for entry, key in plan.files if entry.rel in sizes} | set(plan.dir_markers)
            report.deleted = self._delete_keys([k for k, _ in self._list(prefix) if k not in keep], prefix)
        report.files, report.bytes, report.dirs = len(sizes), sum(sizes.values()), len(plan.dir_markers)
        markers = [d[len(prefix) + 1:-1] for d in plan.dir_markers]
        done = SyncManifest(files=sizes, dirs=markers, bytes=report.bytes, skipped=report.skipped)
        body = done.dump()
        self._attempt("upload", mkey, lambda: self.bucket.put_object(
            mkey, body, headers={"Content-Type": "application/json"}))
        report.seconds = time.monotonic() - t0
        return report

    def _put(self, key: str, fsrc: BinaryIO) -> int:
        """Send one open file as ``key``; returns the bytes sent."""
        st = os.fstat(fsrc.fileno())
        size = st.st_size  # pinned: a file still growing is sent as it was now
        headers = {META_MODE: "%o" % (st.st_mode & 0o777), META_MTIME: str(st.st_mtime_ns)}
        if size < self.multipart_threshold:

            def once() -> None:
                fsrc.seek(0)
                self.bucket.put_object(key, oss2.utils.SizedFileAdapter(fsrc, size), headers=headers)

            self._attempt("upload", key, once)
            return size
        self._put_multipart(key, fsrc, size, headers)
        return size

    def _put_multipart(self, key: str, fsrc: BinaryIO, size: int, headers: dict) -> None:
        bucket = self.bucket
        part_size = oss2.determine_part_size(size, preferred_size=self.part_size)
        upload_id = self._attempt("upload", key, lambda: bucket.init_multipart_upload(key, headers=headers).upload_id)
        try:
            parts = []
            for number, offset in enumerate(range(0, size, part_size), start=1):
                n = min(part_size, size - offset)

                def once(offset: int = offset, n: int = n, number: int = number):
                    fsrc.seek(offset)
                    return bucket.upload_part(key, upload_id, number, oss2.utils.SizedFileAdapter(fsrc, n))

                result = self._attempt("upload", f"{key} (part {number})", once)
                parts.append(oss2.models.PartInfo(number, result.etag, size=n, part_crc=result.crc))
            self._complete(key, upload_id, parts, size)
        except BaseException:
            with suppress(Exception):  # best effort: an abandoned upload only costs storage
                bucket.abort_multipart_upload(key, upload_id)
            raise

    def _complete(self, key: str, upload_id: str, parts: list, size: int) -> None:
        """CompleteMultipartUpload, safe to repeat: a retry that finds the upload already
        gone accepts the object if it has this upload's size and CRC (the answer was lost)."""
        bucket = self.bucket
        expected_crc = oss2.utils.calc_obj_crc_from_parts(parts)
        tries = 0

        def once() -> None:
            nonlocal tries
            tries += 1
            try:
                bucket.complete_multipart_upload(key, upload_id, parts)
            except oss2.exceptions.NoSuchUpload:
                if tries == 1:
                    raise
                head = bucket.head_object(key)
                if head.content_length != size or (expected_crc is not None and head.server_crc != expected_crc):
                    raise
        self._attempt("upload", key, once)

    # ---- download

    def download_folder(self, storage_path: str, local_dir: str, *, expect: bool = False) -> SyncReport:
        t0 = time.monotonic()
        prefix = storage_prefix(storage_path)
        manifest = self.last_sync(storage_path)
        listing = dict(self._list(prefix))
        if expect:
            files: dict[str, int] = {}
            dirs: set[str] = set()
            for key, size in listing.items():
                with suppress(SkipEntry):
                    kind, parts = download_target(prefix, key)
                    if kind == "file":
                        files["/".join(parts)] = size
                    elif kind == "dir":
                        dirs.add("/".join(parts))
            check_complete(manifest, files, dirs, self.where(prefix))
        report = SyncReport(synced_at=manifest.completed_at if manifest else None)
        if not listing:
            report.seconds = time.monotonic() - t0
            return report  # nothing saved yet (a new session)
        try:
            os.makedirs(local_dir, exist_ok=True)
        except OSError as e:
            raise StorageError(f"OSS download into {local_dir} failed: {e}", op="download", path=local_dir) from e
        file_keys: list[tuple[str, tuple[str, ...]]] = []
        vanished: list[str] = []
        with TreeWriter(local_dir) as writer:
            for key in sorted(listing):
                try:
                    kind, parts = download_target(prefix, key)
                    if kind == "dir":
                        self._local("download", local_dir, writer.make_dir, parts)
                        report.dirs += 1
                    elif kind == "file":
                        file_keys.append((key, parts))
                except SkipEntry as s:
                    report.skipped.append((key, s.reason))

            def fetch(item: tuple[str, tuple[str, ...]]):
                key, parts = item
                try:
                    return key, self._local("download", local_dir, writer.write_file, parts, self._fetcher(key)), None
                except SkipEntry as s:
                    return key, None, s.reason
                except NotFound:
                    return key, None, "vanished from storage during the download"

            for key, size, reason in self._parallel(fetch, file_keys):
                if reason is None:
                    report.files += 1
                    report.bytes += size
                else:
                    report.skipped.append((key, reason))
                    if reason.startswith("vanished"):
                        vanished.append(key[len(prefix) + 1:])
        if expect and manifest is not None:
            lost = sorted(rel for rel in vanished if rel in manifest.files)
            if lost:
                raise StorageError(f"the workspace synced to {self.where(prefix)} lost {len(lost)} files during "
                                   f"the download: {', '.join(map(repr, lost[:10]))}", path=prefix, missing=lost[:100])
        report.seconds = time.monotonic() - t0
        return report

    @staticmethod
    def _local(op: str, where: str, fn: Callable, *args):
        """A local filesystem step of a transfer; its OSError is a StorageError (not retried)."""
        try:
            return fn(*args)
        except (CorralError, SkipEntry):
            raise
        except OSError as e:
            raise StorageError(f"OSS {op} into {where} failed locally: {e}", op=op, path=where) from e

    def _fetcher(self, key: str) -> Callable[[BinaryIO], FileMeta]:
        def fill(out: BinaryIO) -> FileMeta:
            def once() -> FileMeta:
                out.seek(0)
                out.truncate()
                result = self.bucket.get_object(key)
                got = 0
                while True:
                    chunk = result.read(_CHUNK)
                    if not chunk:
                        break
                    try:
                        out.write(chunk)
                    except OSError as e:
                        raise StorageError(f"OSS download of {key!r} failed locally: {e}", op="download",
                                           target=key) from e
                    got += len(chunk)
                if result.content_length is not None and got != result.content_length:
                    raise oss2.exceptions.InconsistentError("IncompleteRead from source", result.request_id)
                if self.bucket.enable_crc:
                    oss2.utils.check_crc("get", result.client_crc, result.server_crc, result.request_id)
                return _meta_from_headers(result.headers)

            return self._attempt("download", key, once)

        return fill

    # ---- manifest, listing, exists, delete

    def last_sync(self, storage_path: str) -> Optional[SyncManifest]:
        prefix = storage_prefix(storage_path)
        mkey = manifest_key(prefix)
        try:
            data = self._attempt("read manifest", mkey, lambda: self.bucket.get_object(mkey).read())
        except NotFound:
            return None
        return parse_manifest(data, self.where(mkey))

    def _list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every object under ``prefix/``, one retried page at a time."""
        marker = ""
        while True:
            page = self._attempt("list", prefix + "/", lambda: self.bucket.list_objects(
                prefix=prefix + "/", marker=marker, max_keys=_LIST_PAGE))
            for obj in page.object_list:
                yield obj.key, obj.size
            if not page.is_truncated or not page.next_marker:
                return
            marker = page.next_marker

    def exists(self, storage_path: str) -> bool:
        prefix = storage_prefix(storage_path)
        mkey = manifest_key(prefix)
        if self._attempt("exists", mkey, lambda: self.bucket.object_exists(mkey)):
            return True
        return any(True for _ in self._list_first(prefix))

    def _list_first(self, prefix: str) -> list:
        page = self._attempt("list", prefix + "/", lambda: self.bucket.list_objects(prefix=prefix + "/", max_keys=1))
        return page.object_list

    def delete(self, storage_path: str) -> int:
        prefix = storage_prefix(storage_path)
        mkey = manifest_key(prefix)
        self._attempt("delete", mkey, lambda: self.bucket.delete_object(mkey))  # first: the rest is not complete
        keys = [k for k, _ in self._list(prefix)]
        self._delete_keys(keys, prefix)
        return sum(1 for k in keys if not k.endswith("/"))  # files; directory markers are not counted

    def _delete_keys(self, keys: list[str], prefix: str) -> int:
        for i in range(0, len(keys), _BATCH_DELETE):
            batch = keys[i:i + _BATCH_DELETE]
            self._attempt("delete", prefix + "/", lambda batch=batch: self.bucket.batch_delete_objects(batch))
        return len(keys)
