"""An in-process server for the part of the Alibaba Cloud OSS REST API corral's storage uses.

:class:`OSSServer` listens on 127.0.0.1 (port 0 picks a free one) in a background
thread and keeps buckets in memory. It is strict where the real service is strict,
so a client that works against it is exercising the same protocol:

* every request must carry a V1 ``Authorization: OSS <AccessKeyId>:<Signature>``
  header; the server recomputes the HMAC-SHA1 signature over the documented
  string to sign (verb, Content-MD5, Content-Type, Date, the sorted ``x-oss-``
  headers, ``/bucket/key`` and the signed sub-resources) and answers
  ``InvalidAccessKeyId``, ``SignatureDoesNotMatch``, ``RequestTimeTooSkewed`` or
  ``AccessDenied`` (403) as OSS does; an unknown bucket is ``NoSuchBucket`` (404);
* a ``Content-MD5`` header is checked against the body (``InvalidDigest``), and
  is required on DeleteMultipleObjects;
* PutObject, UploadPart, CompleteMultipartUpload, GetObject and HeadObject answer
  ``x-oss-hash-crc64ecma`` (CRC-64/XZ, the one oss2 verifies) and quoted ETags;
* errors are OSS-shaped XML (``<Error><Code>..</Code><Message>..</Message>
  <RequestId>..</RequestId>..</Error>``); a HEAD error has no body and carries the
  same XML base64-encoded in ``x-oss-err``, as the service does.

Operations: PutObject, GetObject (``Range``), HeadObject / GetObjectMeta,
DeleteObject, DeleteMultipleObjects, ListObjects (v1: ``marker``; v2:
``list-type=2``, ``continuation-token``, ``start-after``) with ``prefix``,
``delimiter``, ``max-keys`` and ``encoding-type=url``, InitiateMultipartUpload,
UploadPart, CompleteMultipartUpload, AbortMultipartUpload, user metadata
(``x-oss-meta-*``). Path-style addressing only (``http://127.0.0.1:PORT/bucket/key``),
which is what oss2 uses for an IP endpoint.

Faults (:class:`Fault`, added with :meth:`OSSServer.inject`) make chosen requests
fail: an error status, a dropped connection (before or after the request took
effect), a body cut short, or a delay. Every
request is recorded in :attr:`OSSServer.requests`, and an exception inside the
server itself lands in :attr:`OSSServer.internal_errors` (and a 500), so a test
can tell a server bug from a client one.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import hmac
import re
import secrets
import socket
import sys
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterable, Mapping, Optional
from urllib.parse import parse_qsl, quote, unquote, urlsplit

__all__ = ["Fault", "OSSServer", "RequestRecord", "StoredObject", "crc64_ecma", "string_to_sign"]

MAX_KEY_BYTES = 1023
MAX_DELETE = 1000
MIN_PART_SIZE = 100 * 1024
MAX_META_BYTES = 8 * 1024
MAX_SKEW = 15 * 60
OWNER_ID = "1234567890"

# Query parameters that are part of the V1 canonicalized resource (the documented
# sub-resources and response overrides); all others (prefix, marker, max-keys,
# list-type, ...) are not signed.
SIGNED_SUBRESOURCES = frozenset({
    "acl", "append", "bucketInfo", "callback", "callback-var", "cname", "comp", "continuation-token",
    "cors", "delete", "encryption", "endTime", "img", "inventory", "inventoryId", "lifecycle", "live",
    "location", "logging", "objectMeta", "partNumber", "policy", "position", "qos", "referer",
    "replication", "replicationLocation", "replicationProgress", "requestPayment", "restore",
    "response-cache-control", "response-content-disposition", "response-content-encoding",
    "response-content-language", "response-content-type", "response-expires", "security-token",
    "startTime", "stat", "status", "style", "styleName", "symlink", "tagging", "uploadId", "uploads",
    "versionId", "versioning", "versions", "vod", "website", "worm", "wormExtend", "wormId",
    "x-oss-process", "x-oss-traffic-limit",
})


# ---------------------------------------------------------------- CRC-64/XZ (ECMA-182, reflected)

_CRC64_POLY_REFLECTED = 0xC96C5795D7870F42  # 0x42F0E1EBA9EA3693 bit-reversed
_CRC64_MASK = 0xFFFFFFFFFFFFFFFF


def _crc64_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _CRC64_POLY_REFLECTED if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc64_table()


def _crc64_py(data: bytes, crc: int = 0) -> int:
    """CRC-64/XZ of ``data`` continuing from ``crc`` (table-driven; the reference definition)."""
    crc ^= _CRC64_MASK
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ _CRC64_MASK


def _fast_crc64():
    """crcmod's C implementation of the same CRC, checked against the table version above."""
    try:
        import crcmod
    except ImportError:  # pragma: no cover - crcmod comes with oss2
        return None
    fn = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, rev=True, xorOut=_CRC64_MASK)
    sample = bytes(range(256)) * 3
    if fn(sample) != _crc64_py(sample) or fn(b"123456789") != 0x995DC9BBDF1939FA:
        return None  # pragma: no cover
    return fn


_FAST = _fast_crc64()


def crc64_ecma(data: bytes) -> int:
    """CRC-64/XZ of ``data``: the value OSS sends as ``x-oss-hash-crc64ecma``.

    Check value: ``crc64_ecma(b"123456789") == 0x995DC9BBDF1939FA``.
    """
    return _FAST(data) if _FAST is not None else _crc64_py(data)


# ---------------------------------------------------------------- the V1 signature


def string_to_sign(method: str, headers: Mapping[str, str], bucket: str, key: str,
                   params: Mapping[str, str]) -> bytes:
    """The V1 string to sign for a request (``headers`` keyed by lower-case name).

    VERB, Content-MD5, Content-Type and Date (``x-oss-date`` if present) each end
    with a newline; then every ``x-oss-*`` header as ``name:value\\n`` sorted by
    name; then ``/bucket/key`` with the signed sub-resources sorted by name as a
    query string (``k=v``, or ``k`` alone for an empty value).
    """
    date = headers.get("x-oss-date") or headers.get("date", "")
    oss_headers = sorted((k, v) for k, v in headers.items() if k.startswith("x-oss-"))
    canon_headers = "".join(f"{k}:{v}\n" for k, v in oss_headers)
    sub = sorted((k, v) for k, v in params.items() if k in SIGNED_SUBRESOURCES)
    resource = f"/{bucket}/{key}" if bucket else "/"
    if sub:
        resource += "?" + "&".join(f"{k}={v}" if v else k for k, v in sub)
    lines = [method, headers.get("content-md5", ""), headers.get("content-type", ""), date]
    return ("\n".join(lines) + "\n" + canon_headers + resource).encode("utf-8")


def sign(secret: str, to_sign: bytes) -> str:
    return base64.b64encode(hmac.new(secret.encode("utf-8"), to_sign, hashlib.sha1).digest()).decode()


# ---------------------------------------------------------------- state


@dataclass
class StoredObject:
    """One object as the server holds it."""

    data: bytes
    etag: str  # without quotes, upper-case hex (multipart: "<hex>-<parts>")
    crc64: int
    content_type: str
    meta: dict[str, str]  # lower-case x-oss-meta-* header -> value
    last_modified: float
    object_type: str = "Normal"


@dataclass
class _Part:
    data: bytes
    etag: str
    md5: bytes


@dataclass
class _Upload:
    key: str
    content_type: str
    meta: dict[str, str]
    parts: dict[int, _Part] = field(default_factory=dict)


@dataclass
class _Bucket:
    objects: dict[str, StoredObject] = field(default_factory=dict)
    uploads: dict[str, _Upload] = field(default_factory=dict)


@dataclass
class Fault:
    """Make matching requests fail. Filters are ANDed; None matches anything.

    ``kind``: ``"error"`` (answer ``status``/``code``), ``"drop"`` (read the request,
    then close the connection without an answer or any effect), ``"lose_answer"``
    (carry the request out, then close without answering), ``"truncate"`` (send the
    headers and half the body of the real answer, then close), ``"slow"`` (wait
    ``delay`` seconds, then answer normally). It fires on the ``nth`` matching request and
    the ``times - 1`` after it (``times=None``: on every one from the ``nth`` on).
    """

    kind: str = "error"
    method: Optional[str] = None
    key: Optional[str] = None  # a substring of the object key
    query: Optional[str] = None  # a query parameter the request must carry (e.g. "partNumber")
    nth: int = 1
    times: Optional[int] = 1
    status: int = 500
    code: str = "InternalError"
    delay: float = 0.0
    seen: int = 0
    fired: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("error", "drop", "lose_answer", "truncate", "slow"):
            raise ValueError(f"unknown fault kind {self.kind!r}")

    def _matches(self, method: str, key: str, params: Mapping[str, str]) -> bool:
        if self.method is not None and self.method.upper() != method:
            return False
        if self.key is not None and self.key not in key:
            return False
        if self.query is not None and self.query not in params:
            return False
        return True

    def _take(self) -> bool:
        self.seen += 1
        if self.seen < self.nth:
            return False
        if self.times is not None and self.seen >= self.nth + self.times:
            return False
        self.fired += 1
        return True


@dataclass(frozen=True)
class RequestRecord:
    """One request the server answered (or dropped)."""

    method: str
    bucket: str
    key: str
    params: tuple[tuple[str, str], ...]
    status: int  # 0 when the connection was dropped
    fault: Optional[str] = None


class _Fail(Exception):
    """An OSS error answer."""

    def __init__(self, status: int, code: str, message: str, **extra: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


class _Drop(Exception):
    """Close the connection without answering."""


# ---------------------------------------------------------------- HTTP plumbing


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "AliyunOSS"
    sys_version = ""
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    timeout = 60  # an idle keep-alive connection is closed after this

    def setup(self) -> None:
        super().setup()
        self.server.owner._track(self.connection, True)  # type: ignore[attr-defined]

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.owner._track(self.connection, False)  # type: ignore[attr-defined]

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass  # requests are in OSSServer.requests

    def _dispatch(self) -> None:
        self.server.owner._handle(self)  # type: ignore[attr-defined]

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _dispatch


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr, owner: "OSSServer") -> None:
        self.owner = owner
        super().__init__(addr, _Handler)

    def handle_error(self, request, client_address) -> None:
        # A client that closes a pooled connection between requests (a reset while the
        # next request line is read) is normal; anything else is a bug in this server.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return
        self.owner.internal_errors.append(traceback.format_exc())


def _read_body(h: BaseHTTPRequestHandler) -> bytes:
    if "chunked" in (h.headers.get("Transfer-Encoding") or "").lower():
        chunks = []
        while True:
            line = h.rfile.readline(65537)
            if not line:
                raise _Drop()
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while h.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            chunks.append(h.rfile.read(size))
            h.rfile.readline(3)
        return b"".join(chunks)
    length = h.headers.get("Content-Length")
    if not length:
        return b""
    try:
        n = int(length)
    except ValueError:
        raise _Fail(400, "InvalidArgument", "Content-Length is not a number") from None
    buf = bytearray()
    while len(buf) < n:
        chunk = h.rfile.read(min(1 << 20, n - len(buf)))
        if not chunk:
            raise _Drop()
        buf += chunk
    return bytes(buf)


def _http_date(t: float) -> str:
    return email.utils.formatdate(t, usegmt=True)


def _iso8601(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + ".000Z"


def _xml(root: ET.Element) -> bytes:
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="utf-8")


def _sub(parent: ET.Element, tag: str, text: object = None) -> ET.Element:
    el = ET.SubElement(parent, tag)
    if text is not None:
        el.text = str(text)
    return el


# ---------------------------------------------------------------- the server


class OSSServer:
    """An OSS-protocol server on 127.0.0.1 with in-memory buckets. Use as a context manager.

    ``credentials`` maps each accepted AccessKeyId to its secret; ``buckets`` are
    created empty. :attr:`endpoint` is what a client passes as the OSS endpoint.
    """

    def __init__(
        self,
        credentials: Optional[Mapping[str, str]] = None,
        buckets: Iterable[str] = ("corral-test",),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_skew: float = MAX_SKEW,
    ) -> None:
        self.credentials = dict(credentials or {"test-key-id": "test-key-secret"})
        self.buckets: dict[str, _Bucket] = {name: _Bucket() for name in buckets}
        self.host, self.port = host, port
        self.max_skew = max_skew
        self.requests: list[RequestRecord] = []
        self.internal_errors: list[str] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()
        self._httpd: Optional[_HTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    def __repr__(self) -> str:
        return f"OSSServer(endpoint={self.endpoint!r}, buckets={sorted(self.buckets)!r})"

    # ---- lifecycle

    def start(self) -> "OSSServer":
        if self._httpd is not None:
            return self
        self._httpd = _HTTPServer((self.host, self.port), self)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"oss-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:  # idle keep-alive connections would otherwise wait out their timeout
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "OSSServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    # ---- test helpers

    def inject(self, fault: Fault) -> Fault:
        """Add a fault (checked in the order added; the first that fires wins)."""
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        with self._lock:
            return sorted(k for k in self.buckets[bucket].objects if k.startswith(prefix))

    def get(self, bucket: str, key: str) -> StoredObject:
        with self._lock:
            return self.buckets[bucket].objects[key]

    def uploads_in_progress(self, bucket: str) -> int:
        with self._lock:
            return len(self.buckets[bucket].uploads)

    def count(self, method: Optional[str] = None, *, status: Optional[int] = None, query: Optional[str] = None) -> int:
        """How many recorded requests match (a quick way to see retries)."""
        with self._lock:
            recs = list(self.requests)
        return sum(
            1 for r in recs
            if (method is None or r.method == method) and (status is None or r.status == status)
            and (query is None or query in dict(r.params))
        )

    # ---- request handling

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        request_id = secrets.token_hex(12).upper()
        method = h.command
        bucket = key = ""
        params: dict[str, str] = {}
        fault_kind: Optional[str] = None
        recorded = False

        def record(status: int) -> None:
            # before the answer goes out, so a client that has its answer finds the record
            nonlocal recorded
            if not recorded:
                recorded = True
                with self._lock:
                    self.requests.append(RequestRecord(method, bucket, key, tuple(sorted(params.items())),
                                                       status, fault_kind))

        try:
            try:
                try:
                    body = _read_body(h)  # first: an answer must not leave a body unread on the connection
                except _Fail:
                    h.close_connection = True
                    raise
                url = urlsplit(h.path)
                params = dict(parse_qsl(url.query, keep_blank_values=True))
                bucket, key = self._split_path(url.path)
                fault = self._fault_for(method, key, params)
                if fault is not None:
                    fault_kind = fault.kind
                    if fault.kind == "slow":
                        time.sleep(fault.delay)
                    elif fault.kind == "drop":
                        raise _Drop()
                    elif fault.kind == "error":
                        raise _Fail(fault.status, fault.code, f"injected fault ({fault.code})")
                status, headers, payload = self._route(h, method, bucket, key, params, body)
                if fault is not None and fault.kind == "lose_answer":
                    raise _Drop()
                if fault is not None and fault.kind == "truncate" and payload:
                    record(0)
                    self._send(h, status, headers, payload, request_id, truncate=True)
                    raise _Drop()
            except _Fail as f:
                record(f.status)
                self._send_error(h, f, request_id, bucket, key)
            else:
                record(status)
                self._send(h, status, headers, payload, request_id)
        except _Drop:
            record(0)
            h.close_connection = True
            try:
                h.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        except (ConnectionError, BrokenPipeError, TimeoutError):
            record(0)
            h.close_connection = True  # the client went away
        except Exception:
            self.internal_errors.append(traceback.format_exc())
            record(500)
            try:
                self._send_error(h, _Fail(500, "InternalError", "test server failure"), request_id, bucket, key)
            except OSError:
                h.close_connection = True

    def _fault_for(self, method: str, key: str, params: Mapping[str, str]) -> Optional[Fault]:
        with self._lock:
            hit = None
            for f in self._faults:
                if f._matches(method, key, params) and f._take() and hit is None:
                    hit = f
            return hit

    @staticmethod
    def _split_path(path: str) -> tuple[str, str]:
        rest = path[1:] if path.startswith("/") else path
        bucket_raw, _, key_raw = rest.partition("/")
        try:
            return unquote(bucket_raw, errors="strict"), unquote(key_raw, errors="strict")
        except UnicodeDecodeError:
            raise _Fail(400, "InvalidObjectName", "The object name is not valid UTF-8.") from None

    def _send(self, h: BaseHTTPRequestHandler, status: int, headers: dict, payload: bytes, request_id: str,
              truncate: bool = False) -> None:
        h.send_response(status)
        h.send_header("x-oss-request-id", request_id)
        h.send_header("x-oss-server-time", "1")
        headers = dict(headers)
        length = headers.pop("Content-Length", None)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(payload) if length is None else length))
        h.end_headers()
        if method_has_body(h.command, status) and payload:
            view = memoryview(payload)
            if truncate:
                view = view[: len(view) // 2]
            for i in range(0, len(view), 1 << 20):
                h.wfile.write(view[i:i + (1 << 20)])

    def _send_error(self, h: BaseHTTPRequestHandler, f: _Fail, request_id: str, bucket: str, key: str) -> None:
        root = ET.Element("Error")
        _sub(root, "Code", f.code)
        _sub(root, "Message", f.message)
        _sub(root, "RequestId", request_id)
        _sub(root, "HostId", f"{bucket or 'oss'}.{self.host}")
        for k, v in f.extra.items():
            _sub(root, k, v)
        _sub(root, "EC", "0000-00000000")
        body = _xml(root)
        headers = {"Content-Type": "application/xml"}
        if h.command == "HEAD":
            headers["x-oss-err"] = base64.b64encode(body).decode()
            headers["Content-Length"] = "0"
            body = b""
        self._send(h, f.status, headers, body, request_id)

    def _route(self, h, method: str, bucket: str, key: str, params: dict, body: bytes) -> tuple[int, dict, bytes]:
        if not bucket:
            raise _Fail(400, "InvalidRequest", "Service-level operations are not supported by this server.")
        with self._lock:
            b = self.buckets.get(bucket)
        if b is None:
            raise _Fail(404, "NoSuchBucket", "The specified bucket does not exist.", BucketName=bucket)
        headers = {k.lower(): v for k, v in h.headers.items()}
        self._authenticate(method, headers, bucket, key, params)
        if "content-md5" in headers:
            try:
                want = base64.b64decode(headers["content-md5"], validate=True)
            except (binascii.Error, ValueError):
                raise _Fail(400, "InvalidDigest", "The Content-MD5 you specified is not valid.") from None
            if hashlib.md5(body).digest() != want:
                raise _Fail(400, "InvalidDigest", "The Content-MD5 you specified did not match what we received.")
        if key == "":
            if method == "GET":
                return self._list(b, bucket, params)
            if method == "POST" and "delete" in params:
                return self._delete_many(b, headers, params, body)
            raise _Fail(405, "MethodNotAllowed", "The specified method is not allowed against this resource.")
        if len(key.encode("utf-8")) > MAX_KEY_BYTES or key.startswith(("/", "\\")):
            raise _Fail(400, "InvalidObjectName", "The specified object is not valid.", ObjectName=key)
        if method == "PUT" and "uploadId" in params:
            return self._upload_part(b, key, params, body)
        if method == "PUT":
            return self._put(b, key, headers, body)
        if method == "POST" and "uploads" in params:
            return self._initiate(b, bucket, key, headers)
        if method == "POST" and "uploadId" in params:
            return self._complete(b, bucket, key, params, body)
        if method == "DELETE" and "uploadId" in params:
            return self._abort(b, key, params)
        if method == "DELETE":
            with self._lock:
                b.objects.pop(key, None)
            return 204, {}, b""
        if method in ("GET", "HEAD"):
            return self._get(b, key, headers, method)
        raise _Fail(405, "MethodNotAllowed", "The specified method is not allowed against this resource.")

    def _authenticate(self, method: str, headers: Mapping[str, str], bucket: str, key: str,
                      params: Mapping[str, str]) -> None:
        auth = headers.get("authorization")
        if not auth:
            raise _Fail(403, "AccessDenied", "You have no right to access this object because of bucket acl.")
        m = re.fullmatch(r"OSS ([^:\s]+):(\S+)", auth.strip())
        if m is None:
            raise _Fail(400, "InvalidArgument", "Authorization header is invalid.")
        key_id, provided = m.groups()
        secret = self.credentials.get(key_id)
        if secret is None:
            raise _Fail(403, "InvalidAccessKeyId", "The OSS Access Key Id you provided does not exist in our records.",
                        OSSAccessKeyId=key_id)
        date = headers.get("x-oss-date") or headers.get("date")
        if not date:
            raise _Fail(403, "AccessDenied", "Missing Date Header.")
        try:
            when = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            raise _Fail(403, "AccessDenied", "Invalid Date Header.") from None
        if abs(time.time() - when) > self.max_skew:
            raise _Fail(403, "RequestTimeTooSkewed",
                        "The difference between the request time and the current time is too large.")
        # header values reach us decoded as latin-1; sign their original bytes
        raw = {k: v.encode("latin-1", "replace").decode("utf-8", "replace") for k, v in headers.items()}
        to_sign = string_to_sign(method, raw, bucket, key, params)
        if not hmac.compare_digest(sign(secret, to_sign), provided):
            raise _Fail(403, "SignatureDoesNotMatch",
                        "The request signature we calculated does not match the signature you provided. "
                        "Check your key and signing method.",
                        OSSAccessKeyId=key_id, SignatureProvided=provided,
                        StringToSign=to_sign.decode("utf-8", "replace"),
                        StringToSignBytes=" ".join(f"{c:02x}" for c in to_sign[:256]))

    # ---- objects

    @staticmethod
    def _user_meta(headers: Mapping[str, str]) -> dict[str, str]:
        meta = {k: v for k, v in headers.items() if k.startswith("x-oss-meta-")}
        if sum(len(k) + len(v) for k, v in meta.items()) > MAX_META_BYTES:
            raise _Fail(400, "InvalidArgument", "Your metadata headers exceed the maximum allowed metadata size.")
        return meta

    def _put(self, b: _Bucket, key: str, headers: Mapping[str, str], body: bytes) -> tuple[int, dict, bytes]:
        md5 = hashlib.md5(body).digest()
        obj = StoredObject(
            data=body, etag=md5.hex().upper(), crc64=crc64_ecma(body),
            content_type=headers.get("content-type") or "application/octet-stream",
            meta=self._user_meta(headers), last_modified=time.time(),
        )
        with self._lock:
            b.objects[key] = obj
        return 200, {"ETag": f'"{obj.etag}"', "x-oss-hash-crc64ecma": str(obj.crc64),
                     "Content-MD5": base64.b64encode(md5).decode()}, b""

    def _get(self, b: _Bucket, key: str, headers: Mapping[str, str], method: str) -> tuple[int, dict, bytes]:
        with self._lock:
            obj = b.objects.get(key)
        if obj is None:
            raise _Fail(404, "NoSuchKey", "The specified key does not exist.", Key=key)
        size = len(obj.data)
        out = {
            "Content-Type": obj.content_type, "ETag": f'"{obj.etag}"',
            "Last-Modified": _http_date(obj.last_modified), "Accept-Ranges": "bytes",
            "x-oss-object-type": obj.object_type, "x-oss-storage-class": "Standard",
            "x-oss-hash-crc64ecma": str(obj.crc64), **obj.meta,
        }
        status, start, end = 200, 0, size - 1
        rng = _parse_range(headers.get("range"), size)
        if rng is not None:
            status, (start, end) = 206, rng
            out["Content-Range"] = f"bytes {start}-{end}/{size}"
        payload = obj.data if status == 200 else obj.data[start:end + 1]
        if method == "HEAD":
            out["Content-Length"] = str(len(payload))
            return status, out, b""
        return status, out, payload

    # ---- listing

    def _list(self, b: _Bucket, bucket: str, params: Mapping[str, str]) -> tuple[int, dict, bytes]:
        v2 = params.get("list-type") == "2"
        prefix = params.get("prefix", "")
        delimiter = params.get("delimiter", "")
        encode = params.get("encoding-type") == "url"
        if params.get("encoding-type") not in (None, "", "url"):
            raise _Fail(400, "InvalidArgument", "Invalid Encoding Method specified in Request")
        try:
            max_keys = int(params.get("max-keys") or 100)
        except ValueError:
            raise _Fail(400, "InvalidArgument", "max-keys is not a number") from None
        if not 0 < max_keys <= 1000:
            raise _Fail(400, "InvalidArgument", "max-keys should be between 1 and 1000")
        if v2 and params.get("continuation-token"):
            try:
                after = base64.urlsafe_b64decode(params["continuation-token"].encode()).decode("utf-8")
            except (binascii.Error, ValueError):
                raise _Fail(400, "InvalidArgument", "The continuation token provided is incorrect") from None
        else:
            after = params.get("start-after", "") if v2 else params.get("marker", "")
        with self._lock:
            objects = dict(b.objects)
        after_b = after.encode("utf-8")
        items: list[tuple[str, str]] = []  # ("c", key) or ("p", common prefix)
        truncated = False
        for k in sorted((k for k in objects if k.startswith(prefix)), key=lambda s: s.encode("utf-8")):
            if k.encode("utf-8") <= after_b:
                continue
            item = ("c", k)
            if delimiter:
                i = k.find(delimiter, len(prefix))
                if i >= 0:
                    cp = k[: i + len(delimiter)]
                    if cp.encode("utf-8") <= after_b or (items and items[-1] == ("p", cp)):
                        continue
                    item = ("p", cp)
            if len(items) == max_keys:
                truncated = True
                break
            items.append(item)
        enc = (lambda s: quote(s, safe="")) if encode else (lambda s: s)
        root = ET.Element("ListBucketResult")
        _sub(root, "Name", bucket)
        _sub(root, "Prefix", enc(prefix))
        if v2:
            if params.get("continuation-token"):
                _sub(root, "ContinuationToken", params["continuation-token"])
            if params.get("start-after"):
                _sub(root, "StartAfter", enc(params["start-after"]))
        else:
            _sub(root, "Marker", enc(after))
        _sub(root, "MaxKeys", max_keys)
        _sub(root, "Delimiter", enc(delimiter))
        if encode:
            _sub(root, "EncodingType", "url")
        _sub(root, "IsTruncated", "true" if truncated else "false")
        if truncated:
            last = items[-1][1]
            if v2:
                _sub(root, "NextContinuationToken", base64.urlsafe_b64encode(last.encode("utf-8")).decode())
            else:
                _sub(root, "NextMarker", enc(last))
        if v2:
            _sub(root, "KeyCount", len(items))
        owner = not v2 or params.get("fetch-owner") == "true"
        for kind, name in items:
            if kind != "c":
                continue
            obj = objects[name]
            c = _sub(root, "Contents")
            _sub(c, "Key", enc(name))
            _sub(c, "LastModified", _iso8601(obj.last_modified))
            _sub(c, "ETag", f'"{obj.etag}"')
            _sub(c, "Type", obj.object_type)
            _sub(c, "Size", len(obj.data))
            _sub(c, "StorageClass", "Standard")
            if owner:
                o = _sub(c, "Owner")
                _sub(o, "ID", OWNER_ID)
                _sub(o, "DisplayName", OWNER_ID)
        for kind, name in items:
            if kind == "p":
                _sub(_sub(root, "CommonPrefixes"), "Prefix", enc(name))
        return 200, {"Content-Type": "application/xml"}, _xml(root)

    def _delete_many(self, b: _Bucket, headers: Mapping[str, str], params: Mapping[str, str],
                     body: bytes) -> tuple[int, dict, bytes]:
        if "content-md5" not in headers:
            raise _Fail(400, "MissingArgument", "Missing Some Required Arguments.", ArgumentName="Content-MD5")
        try:
            root = ET.fromstring(body)
        except ET.ParseError:
            raise _Fail(400, "MalformedXML", "The XML you provided was not well-formed.") from None
        keys = [(o.findtext("Key") or "") for o in root.findall("Object")]
        if root.tag != "Delete" or not keys or len(keys) > MAX_DELETE:
            raise _Fail(400, "MalformedXML", f"Delete needs 1 to {MAX_DELETE} objects.")
        quiet = (root.findtext("Quiet") or "false").strip().lower() == "true"
        with self._lock:
            for k in keys:
                b.objects.pop(k, None)
        out = ET.Element("DeleteResult")
        encode = params.get("encoding-type") == "url"
        if encode:
            _sub(out, "EncodingType", "url")
        if not quiet:
            for k in keys:
                _sub(_sub(out, "Deleted"), "Key", quote(k, safe="") if encode else k)
        return 200, {"Content-Type": "application/xml"}, _xml(out)

    # ---- multipart

    def _initiate(self, b: _Bucket, bucket: str, key: str, headers: Mapping[str, str]) -> tuple[int, dict, bytes]:
        upload_id = secrets.token_hex(16).upper()
        up = _Upload(key, headers.get("content-type") or "application/octet-stream", self._user_meta(headers))
        with self._lock:
            b.uploads[upload_id] = up
        root = ET.Element("InitiateMultipartUploadResult")
        _sub(root, "Bucket", bucket)
        _sub(root, "Key", key)
        _sub(root, "UploadId", upload_id)
        return 200, {"Content-Type": "application/xml"}, _xml(root)

    def _upload_of(self, b: _Bucket, key: str, params: Mapping[str, str]) -> _Upload:
        with self._lock:
            up = b.uploads.get(params.get("uploadId", ""))
        if up is None or up.key != key:
            raise _Fail(404, "NoSuchUpload", "The specified upload does not exist.",
                        UploadId=params.get("uploadId", ""))
        return up

    def _upload_part(self, b: _Bucket, key: str, params: Mapping[str, str], body: bytes) -> tuple[int, dict, bytes]:
        up = self._upload_of(b, key, params)
        try:
            number = int(params.get("partNumber", ""))
        except ValueError:
            number = 0
        if not 1 <= number <= 10000:
            raise _Fail(400, "InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive.")
        md5 = hashlib.md5(body).digest()
        part = _Part(body, md5.hex().upper(), md5)
        with self._lock:
            up.parts[number] = part
        return 200, {"ETag": f'"{part.etag}"', "x-oss-hash-crc64ecma": str(crc64_ecma(body)),
                     "Content-MD5": base64.b64encode(md5).decode()}, b""

    def _complete(self, b: _Bucket, bucket: str, key: str, params: Mapping[str, str],
                  body: bytes) -> tuple[int, dict, bytes]:
        up = self._upload_of(b, key, params)
        try:
            root = ET.fromstring(body)
        except ET.ParseError:
            raise _Fail(400, "MalformedXML", "The XML you provided was not well-formed.") from None
        listed: list[tuple[int, str]] = []
        for p in root.findall("Part"):
            try:
                listed.append((int(p.findtext("PartNumber") or ""), (p.findtext("ETag") or "").strip('"').upper()))
            except ValueError:
                raise _Fail(400, "MalformedXML", "PartNumber is not a number.") from None
        if root.tag != "CompleteMultipartUpload" or not listed:
            raise _Fail(400, "MalformedXML", "The XML you provided was not well-formed.")
        numbers = [n for n, _ in listed]
        if numbers != sorted(set(numbers)):
            raise _Fail(400, "InvalidPartOrder", "The list of parts was not in ascending order.")
        with self._lock:
            parts = dict(up.parts)
        chosen = []
        for i, (n, etag) in enumerate(listed):
            part = parts.get(n)
            if part is None or part.etag != etag:
                raise _Fail(400, "InvalidPart", "One or more of the specified parts could not be found.",
                            PartNumber=str(n), ETag=etag)
            if i < len(listed) - 1 and len(part.data) < MIN_PART_SIZE:
                raise _Fail(400, "EntityTooSmall", "Your proposed upload is smaller than the minimum allowed size.",
                            PartNumber=str(n))
            chosen.append(part)
        data = b"".join(p.data for p in chosen)
        etag = hashlib.md5(b"".join(p.md5 for p in chosen)).hexdigest().upper() + f"-{len(chosen)}"
        obj = StoredObject(data=data, etag=etag, crc64=crc64_ecma(data), content_type=up.content_type,
                           meta=up.meta, last_modified=time.time(), object_type="Multipart")
        with self._lock:
            if b.uploads.pop(params["uploadId"], None) is None:
                raise _Fail(404, "NoSuchUpload", "The specified upload does not exist.")
            b.objects[key] = obj
        out = ET.Element("CompleteMultipartUploadResult")
        encode = params.get("encoding-type") == "url"
        if encode:
            _sub(out, "EncodingType", "url")
        _sub(out, "Location", f"{self.endpoint}/{bucket}/{quote(key, safe='/')}")
        _sub(out, "Bucket", bucket)
        _sub(out, "Key", quote(key, safe="") if encode else key)
        _sub(out, "ETag", f'"{etag}"')
        return 200, {"Content-Type": "application/xml", "ETag": f'"{etag}"',
                     "x-oss-hash-crc64ecma": str(obj.crc64)}, _xml(out)

    def _abort(self, b: _Bucket, key: str, params: Mapping[str, str]) -> tuple[int, dict, bytes]:
        self._upload_of(b, key, params)
        with self._lock:
            b.uploads.pop(params["uploadId"], None)
        return 204, {}, b""


def method_has_body(method: str, status: int) -> bool:
    return method != "HEAD" and status not in (204, 304)


def _parse_range(value: Optional[str], size: int) -> Optional[tuple[int, int]]:
    """(start, end) inclusive for a satisfiable ``bytes=`` range; None means the whole object.

    Like OSS: a malformed range is ignored (the whole object, 200); a start past the
    end is ``InvalidRange`` (416).
    """
    if not value:
        return None
    m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", value)
    if m is None or (m.group(1) == "" and m.group(2) == ""):
        return None
    first, last = m.groups()
    if first == "":
        n = int(last)
        if n == 0:
            return None
        return max(size - n, 0), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size:
        raise _Fail(416, "InvalidRange", "The requested range cannot be satisfied.",
                    RangeRequested=value, ActualObjectSize=str(size))
    if end < start:
        return None
    return start, end
