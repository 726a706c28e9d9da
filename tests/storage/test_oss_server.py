"""The OSS-protocol test server against oss2 itself: that it speaks the protocol, and is strict where OSS is.

If these pass, a client that works against the server sends what the real service
expects: signed requests, correct keys and query strings, paging, multipart.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import time

import oss2
import oss2.exceptions
import oss2.models
import oss2.utils
import pytest
import requests

from tests.support.oss_server import BUCKET, KEY_ID, SECRET, Fault, OSSServer, crc64_ecma, string_to_sign


@pytest.fixture
def bucket(oss_server):
    return oss2.Bucket(oss2.Auth(KEY_ID, SECRET), oss_server.endpoint, BUCKET)


def test_crc64_is_crc64_xz_and_matches_oss2():
    assert crc64_ecma(b"123456789") == 0x995DC9BBDF1939FA  # the CRC catalogue's check value
    data = bytes(range(256)) * 4097
    c = oss2.utils.Crc64()
    c.update(data)
    assert crc64_ecma(data) == c.crc
    assert crc64_ecma(b"") == 0


def test_string_to_sign_follows_the_v1_layout():
    headers = {
        "content-md5": "eB5eJF1ptWaXm4bijSPyxw==", "content-type": "text/html",
        "date": "Thu, 17 Nov 2005 18:49:58 GMT", "x-oss-meta-magic": "abracadabra",
        "x-oss-meta-author": "foo@bar.com", "host": "ignored",
    }
    got = string_to_sign("PUT", headers, "oss-example", "nelson", {"uploads": "", "prefix": "not signed"})
    assert got == (
        b"PUT\neB5eJF1ptWaXm4bijSPyxw==\ntext/html\nThu, 17 Nov 2005 18:49:58 GMT\n"
        b"x-oss-meta-author:foo@bar.com\nx-oss-meta-magic:abracadabra\n/oss-example/nelson?uploads"
    )
    # sub-resources sorted by name; values kept; a bucket-level request ends in "/"
    got = string_to_sign("GET", {"date": "D"}, "b", "", {"partNumber": "2", "uploadId": "X", "max-keys": "9"})
    assert got == b"GET\n\n\nD\n/b/?partNumber=2&uploadId=X"


def test_oss2_uses_path_style_urls_for_an_ip_endpoint(bucket, oss_server):
    bucket.put_object("dir/a b+c.txt", b"x")
    rec = oss_server.requests[-1]
    assert (rec.method, rec.bucket, rec.key, rec.status) == ("PUT", BUCKET, "dir/a b+c.txt", 200)


def test_put_get_head_delete_with_metadata_crc_and_etag(bucket, oss_server):
    data = b"hello \xe4\xb8\x96\xe7\x95\x8c"
    r = bucket.put_object("k/ü ñ.txt", data, headers={"x-oss-meta-corral-mode": "755"})
    assert r.etag == hashlib.md5(data).hexdigest().upper()
    assert r.crc == crc64_ecma(data)  # oss2 compared it with its own and found them equal
    got = bucket.get_object("k/ü ñ.txt")
    assert got.read() == data and got.headers["x-oss-meta-corral-mode"] == "755"
    assert got.server_crc == got.client_crc
    head = bucket.head_object("k/ü ñ.txt")
    assert head.content_length == len(data) and head.etag == r.etag and head.server_crc == r.crc
    assert bucket.object_exists("k/ü ñ.txt") and not bucket.object_exists("k/other")
    bucket.delete_object("k/ü ñ.txt")
    bucket.delete_object("k/ü ñ.txt")  # deleting a missing object is fine
    with pytest.raises(oss2.exceptions.NoSuchKey):
        bucket.get_object("k/ü ñ.txt")


def test_range_reads(bucket):
    bucket.put_object("r", b"0123456789")
    assert bucket.get_object("r", byte_range=(2, 4)).read() == b"234"
    assert bucket.get_object("r", byte_range=(7, None)).read() == b"789"
    assert bucket.get_object("r", byte_range=(None, 3)).read() == b"789"
    assert bucket.get_object("r", byte_range=(5, 100)).read() == b"56789"
    r = bucket.get_object("r", byte_range=(2, 4))
    assert r.status == 206 and r.content_range == "bytes 2-4/10"
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.get_object("r", byte_range=(10, 12))
    assert e.value.status == 416 and e.value.code == "InvalidRange"


@pytest.mark.parametrize("v2", [False, True])
def test_listing_pages_with_prefix_delimiter_and_marker(bucket, v2):
    keys = [f"p/{i:03d}" for i in range(25)] + ["p/sub/x", "p/sub/y", "p/zz/ü", "q/other"]
    for k in keys:
        bucket.put_object(k, b"")
    it = oss2.ObjectIteratorV2 if v2 else oss2.ObjectIterator
    assert [o.key for o in it(bucket, prefix="p/", max_keys=7)] == sorted(k for k in keys if k.startswith("p/"))
    flat = [o.key for o in it(bucket, prefix="p/", delimiter="/", max_keys=4)]
    assert flat == [f"p/{i:03d}" for i in range(25)] + ["p/sub/", "p/zz/"]
    assert [o.key for o in it(bucket, prefix="", delimiter="/", max_keys=1)] == ["p/", "q/"]
    first = bucket.list_objects_v2(prefix="p/", max_keys=3) if v2 else bucket.list_objects(prefix="p/", max_keys=3)
    assert first.is_truncated and [o.key for o in first.object_list] == ["p/000", "p/001", "p/002"]
    assert all(o.size == 0 and o.etag for o in first.object_list)


def test_listing_rejects_a_bad_max_keys(bucket):
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.list_objects(max_keys=1001)
    assert e.value.status == 400 and e.value.code == "InvalidArgument"


def test_delete_multiple_needs_and_checks_content_md5(bucket, oss_server):
    for i in range(5):
        bucket.put_object(f"d/{i}", b"x")
    result = bucket.batch_delete_objects(["d/0", "d/1", "d/missing"])
    assert sorted(result.deleted_keys) == ["d/0", "d/1", "d/missing"]
    assert oss_server.keys(BUCKET, "d/") == ["d/2", "d/3", "d/4"]
    body = b"<Delete><Quiet>false</Quiet><Object><Key>d/2</Key></Object></Delete>"
    bad_md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket._do("POST", BUCKET, "", data=body, params={"delete": ""}, headers={"Content-MD5": bad_md5})
    assert e.value.status == 400 and e.value.code == "InvalidDigest"
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket._do("POST", BUCKET, "", data=body, params={"delete": ""})
    assert e.value.code == "MissingArgument"
    assert oss_server.keys(BUCKET, "d/") == ["d/2", "d/3", "d/4"]


def test_content_md5_is_checked_on_put(bucket, oss_server):
    good = base64.b64encode(hashlib.md5(b"abc").digest()).decode()
    bucket.put_object("m", b"abc", headers={"Content-MD5": good})
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.put_object("m", b"abd", headers={"Content-MD5": good})
    assert e.value.code == "InvalidDigest"
    assert oss_server.get(BUCKET, "m").data == b"abc"


def test_multipart_upload_complete_and_abort(bucket, oss_server):
    part = 100 * 1024
    data = bytes(range(256)) * (part * 2 // 256) + b"tail"
    uid = bucket.init_multipart_upload("big", headers={"x-oss-meta-corral-mode": "600"}).upload_id
    parts = []
    for n, off in enumerate(range(0, len(data), part), 1):
        r = bucket.upload_part("big", uid, n, data[off:off + part])
        parts.append(oss2.models.PartInfo(n, r.etag, size=len(data[off:off + part]), part_crc=r.crc))
    result = bucket.complete_multipart_upload("big", uid, parts)  # oss2 checks the combined CRC
    assert result.crc == crc64_ecma(data)
    obj = oss_server.get(BUCKET, "big")
    assert obj.data == data and obj.object_type == "Multipart" and obj.etag.endswith("-3")
    assert obj.meta["x-oss-meta-corral-mode"] == "600"
    assert oss_server.uploads_in_progress(BUCKET) == 0
    with pytest.raises(oss2.exceptions.NoSuchUpload):
        bucket.complete_multipart_upload("big", uid, parts)

    uid = bucket.init_multipart_upload("small-parts").upload_id
    a = bucket.upload_part("small-parts", uid, 1, b"a" * 10)
    b = bucket.upload_part("small-parts", uid, 2, b"b")
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.complete_multipart_upload("small-parts", uid, [oss2.models.PartInfo(1, a.etag),
                                                              oss2.models.PartInfo(2, b.etag)])
    assert e.value.code == "EntityTooSmall"
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.complete_multipart_upload("small-parts", uid, [oss2.models.PartInfo(1, "WRONG")])
    assert e.value.code == "InvalidPart"
    bucket.abort_multipart_upload("small-parts", uid)
    assert oss_server.uploads_in_progress(BUCKET) == 0
    assert not bucket.object_exists("small-parts")


def test_wrong_secret_is_signature_does_not_match(oss_server):
    bad = oss2.Bucket(oss2.Auth(KEY_ID, "not-the-secret"), oss_server.endpoint, BUCKET)
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bad.put_object("x", b"1")
    assert (e.value.status, e.value.code) == (403, "SignatureDoesNotMatch")
    assert e.value.details["OSSAccessKeyId"] == KEY_ID  # as the real service answers
    assert oss_server.keys(BUCKET) == []


def test_unknown_key_id_missing_bucket_and_anonymous(oss_server):
    with pytest.raises(oss2.exceptions.ServerError) as e:
        oss2.Bucket(oss2.Auth("LTAInobody", SECRET), oss_server.endpoint, BUCKET).get_object("x")
    assert (e.value.status, e.value.code) == (403, "InvalidAccessKeyId")
    with pytest.raises(oss2.exceptions.NoSuchBucket):
        oss2.Bucket(oss2.Auth(KEY_ID, SECRET), oss_server.endpoint, "no-such-bucket").get_object("x")
    with pytest.raises(oss2.exceptions.NoSuchBucket):  # HEAD errors come back in x-oss-err
        oss2.Bucket(oss2.Auth(KEY_ID, SECRET), oss_server.endpoint, "no-such-bucket").object_exists("x")
    r = requests.get(f"{oss_server.endpoint}/{BUCKET}/x", timeout=5)
    assert r.status_code == 403 and b"<Code>AccessDenied</Code>" in r.content and b"<RequestId>" in r.content


def test_a_tampered_request_fails_its_signature(oss_server):
    """Sign one request, send another: the key, a header or the date differ."""
    date = email.utils.formatdate(time.time(), usegmt=True)

    def send(method, key, headers, sign_key=None, sign_headers=None):
        to_sign = string_to_sign(method, {k.lower(): v for k, v in (sign_headers or headers).items()},
                                 BUCKET, sign_key or key, {})
        import hmac

        sig = base64.b64encode(hmac.new(SECRET.encode(), to_sign, hashlib.sha1).digest()).decode()
        return requests.request(method, f"{oss_server.endpoint}/{BUCKET}/{key}",
                                headers={**headers, "Authorization": f"OSS {KEY_ID}:{sig}"}, data=b"v", timeout=5)

    assert send("PUT", "ok", {"Date": date}).status_code == 200
    assert send("PUT", "a", {"Date": date}, sign_key="b").status_code == 403
    assert send("PUT", "a", {"Date": date, "x-oss-meta-m": "1"},
                sign_headers={"Date": date, "x-oss-meta-m": "2"}).status_code == 403
    old = email.utils.formatdate(time.time() - 3600, usegmt=True)
    r = send("PUT", "a", {"Date": old})
    assert r.status_code == 403 and b"RequestTimeTooSkewed" in r.content
    assert oss_server.keys(BUCKET) == ["ok"]


def test_faults_fire_on_the_nth_matching_request(bucket, oss_server):
    bucket.put_object("f", b"data")
    oss_server.inject(Fault("error", method="GET", nth=2, status=503, code="ServiceUnavailable"))
    bucket.get_object("f").read()
    with pytest.raises(oss2.exceptions.ServerError) as e:
        bucket.get_object("f")
    assert e.value.status == 503
    bucket.get_object("f").read()  # times=1: only the 2nd
    oss_server.inject(Fault("drop", key="f", method="PUT"))
    with pytest.raises(oss2.exceptions.RequestError):
        bucket.put_object("f", b"new")
    assert oss_server.get(BUCKET, "f").data == b"data"  # a dropped request did nothing
    oss_server.inject(Fault("truncate", method="GET"))
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        bucket.get_object("f").read()
    slow = oss_server.inject(Fault("slow", delay=0.3, times=None, query="uploads"))
    t0 = time.monotonic()
    bucket.init_multipart_upload("g")
    assert time.monotonic() - t0 >= 0.3 and slow.fired == 1
    assert [r.fault for r in oss_server.requests if r.fault] == ["error", "drop", "truncate", "slow"]


def test_server_stops_cleanly_with_idle_keep_alive_connections():
    srv = OSSServer({KEY_ID: SECRET}, buckets=[BUCKET]).start()
    b = oss2.Bucket(oss2.Auth(KEY_ID, SECRET), srv.endpoint, BUCKET)
    b.put_object("x", b"1")  # leaves a pooled connection open
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 3
    with pytest.raises(oss2.exceptions.RequestError):
        oss2.Bucket(oss2.Auth(KEY_ID, SECRET), srv.endpoint, BUCKET, connect_timeout=2).put_object("x", b"1")
