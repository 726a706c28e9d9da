"""The gateway's pure parts: tokens, tenancy rules, argument checks, error shapes (no Ray, no server)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

import corral
from corral.gateway.auth import Tenants
from corral.gateway.tenancy import TENANT_KEY, owns, public_record, scope, tag_meta, unscope

T_A = "a" * 32
T_B = "b" * 32


def test_tokens_file_parses_comments_blank_lines_and_rotation():
    t = Tenants.parse(f"# c\n\nalpha {T_A}\n  beta   {T_B}  \nalpha {'c' * 20}\n")
    assert t.names == ["alpha", "beta"]
    assert t.authenticate(f"Bearer {T_A}") == "alpha"
    assert t.authenticate(f"bearer {'c' * 20}") == "alpha"
    assert t.authenticate(f"Bearer {T_B}") == "beta"


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", f"Basic {T_A}", f"Bearer {T_A}x", T_A,
                                    f"Bearer {T_A[:-1]}", "Bearer \udcff"])
def test_anything_but_a_configured_token_is_refused(header):
    assert Tenants.parse(f"alpha {T_A}").authenticate(header) is None


@pytest.mark.parametrize("text, words", [
    ("", "never runs open"),
    ("# only a comment\n", "never runs open"),
    ("alpha", "two fields"),
    (f"alpha {T_A} extra", "two fields"),
    ("alpha short", "at least 16"),
    (f"al/pha {T_A}", "tenant name"),
    (f"alpha {T_A}\nbeta {T_A}", "two tenants"),
])
def test_bad_tokens_text_is_refused_with_a_clear_error(text, words):
    with pytest.raises(corral.InvalidRequest, match=words) as e:
        Tenants.parse(text)
    assert T_A not in str(e.value)  # a message never carries a token


def test_no_tokens_anywhere_refuses(tmp_path):
    with pytest.raises(corral.InvalidRequest, match="never runs open"):
        Tenants.load(None, environ={})
    assert Tenants.load(None, environ={"CORRAL_GATEWAY_TOKENS": f"alpha {T_A}"}).names == ["alpha"]
    f = tmp_path / "tokens"
    f.write_text(f"beta {T_B}\n")
    os.chmod(f, 0o600)
    t = Tenants.load(str(f), environ={"CORRAL_GATEWAY_TOKENS": f"alpha {T_A}"})
    assert t.names == ["beta"] and not t.world_readable  # the file wins over the environment
    os.chmod(f, 0o644)
    assert Tenants.from_file(str(f)).world_readable
    with pytest.raises(corral.InvalidRequest, match="cannot read"):
        Tenants.from_file(str(tmp_path / "missing"))


def test_only_digests_cross_process_boundaries():
    t = Tenants.parse(f"alpha {T_A}\nbeta {T_B}")
    rows = t.digests()
    assert json.dumps(rows).count(T_A) == 0 and rows[0][0] == hashlib.sha256(T_A.encode()).hexdigest()
    again = Tenants.from_digests(rows)
    assert again.authenticate(f"Bearer {T_B}") == "beta"
    assert T_A not in repr(t) and rows[0][0] not in repr(t)
    with pytest.raises(corral.InvalidRequest):
        Tenants.from_digests([("zz", "alpha")])


def test_session_ids_are_scoped_per_tenant():
    assert scope("alpha", "ep-1") == "alpha:ep-1"
    assert unscope("alpha", "alpha:ep-1") == "ep-1"
    assert unscope("alpha", "alpha:b:x") == "b:x"
    assert unscope("beta", "alpha:ep-1") is None and unscope("alpha", None) is None
    assert unscope("alp", "alpha:x") is None  # a tenant whose name is a prefix of another's sees nothing of it
    for bad in (None, "", 3, "x" * 300):
        with pytest.raises(corral.InvalidRequest):
            scope("alpha", bad)


def test_meta_is_tagged_and_the_tag_cannot_be_forged():
    m = tag_meta("alpha", {"session_ctx_id": "ep", "k": 1})
    assert m == {"session_ctx_id": "alpha:ep", "k": 1, TENANT_KEY: "alpha"}
    bare = tag_meta("alpha", None)  # a sandbox made without a session gets one of the tenant's own
    assert bare[TENANT_KEY] == "alpha" and unscope("alpha", bare["session_ctx_id"]).startswith("auto-")
    with pytest.raises(corral.InvalidRequest, match="reserved"):
        tag_meta("alpha", {TENANT_KEY: "beta"})
    with pytest.raises(corral.InvalidRequest, match="meta must be an object"):
        tag_meta("alpha", ["x"])


def _rec(tenant=None, sid=None, **kw):
    meta = {} if tenant is None else {TENANT_KEY: tenant}
    if sid:
        meta["session_ctx_id"] = sid
    return {"container_name": "c1", "session_ctx_id": sid, "meta": meta, "runtime_token": "secret", **kw}


def test_ownership_needs_the_tag_and_a_session_of_the_tenant():
    assert owns("alpha", _rec("alpha", "alpha:ep"))
    assert owns("alpha", _rec("alpha"))  # created without a session
    assert not owns("beta", _rec("alpha", "alpha:ep"))
    assert not owns("alpha", _rec(None))  # a pool sandbox, or an embedded user's
    # a reused sandbox still tagged by its last tenant, now bound to someone else's session
    assert not owns("alpha", _rec("alpha", "beta:ep"))
    assert not owns("alpha", _rec("alpha", "s-embedded"))
    assert not owns("alpha", None)


def test_public_records_have_no_box_token_and_the_tenants_own_ids():
    out = public_record("alpha", _rec("alpha", "alpha:ep", url="http://127.0.0.1:1"))
    assert "runtime_token" not in out
    assert out["session_ctx_id"] == "ep" and out["meta"] == {"session_ctx_id": "ep"}


def test_operation_arguments_are_checked_against_the_signature():
    from corral.gateway.app import _arguments
    from corral.gateway.guard import BadRequest

    assert _arguments("release", b'{"identity": "x"}') == {"identity": "x"}
    assert _arguments("list_session_keys", b"") == {}
    with pytest.raises(corral.InvalidRequest, match="unexpected argument.*'args'"):
        _arguments("release", b'{"args": "x"}')
    with pytest.raises(corral.InvalidRequest, match="missing argument.*'identity'"):
        _arguments("release", b"{}")
    with pytest.raises(BadRequest, match="not JSON"):
        _arguments("release", b"{nope")
    with pytest.raises(BadRequest, match="JSON object"):
        _arguments("release", b'["x"]')


def test_errors_on_the_wire_say_code_message_and_retryable():
    from corral.gateway.guard import PayloadTooLarge, error_response_parts

    status, body, headers = error_response_parts(corral.CapacityError("full"))
    assert status == 429 and body == {"error": {"code": "capacity", "message": "full", "retryable": True}}
    assert headers == [(b"retry-after", b"1")]
    status, body, headers = error_response_parts(corral.SandboxUnreachable("gone"))
    assert status == 503 and body["error"]["retryable"] and headers
    status, body, _ = error_response_parts(corral.DriverError("docker"))
    assert status == 502 and body["error"]["code"] == "driver_error"
    status, body, headers = error_response_parts(PayloadTooLarge("big"))
    assert status == 413 and body["error"]["code"] == "invalid_request" and not headers
    assert isinstance(corral.from_wire(body, status), corral.InvalidRequest)


def test_the_backend_adapter_takes_a_manager_or_async_ops_and_nothing_else():
    from corral.gateway.backend import OPERATIONS, Backend

    class Ops:
        pass

    for op in OPERATIONS:
        setattr(Ops, op, lambda self: None)
    assert Backend(Ops())._suffix == ""
    with pytest.raises(corral.InvalidRequest, match="lacks"):
        Backend(object())


def test_settings_refuse_unknown_fields():
    from pydantic import ValidationError

    from corral.gateway import GatewaySettings

    with pytest.raises(ValidationError):
        GatewaySettings(max_body=1)


def test_remote_mode_needs_a_url_and_a_token():
    from corral import SandboxManager
    from corral.remote import RemoteSandboxManager

    m = SandboxManager(base_url="http://127.0.0.1:1/", bearer_token=T_A)
    assert isinstance(m, RemoteSandboxManager) and isinstance(m, SandboxManager)
    assert m.base_url == "http://127.0.0.1:1" and T_A not in repr(m)
    with pytest.raises(corral.InvalidRequest, match="bearer_token"):
        SandboxManager(base_url="http://127.0.0.1:1")
    with pytest.raises(corral.InvalidRequest, match="base_url"):
        SandboxManager(base_url="ftp://x", bearer_token=T_A)
    with pytest.raises(corral.InvalidRequest, match="address"):
        SandboxManager(base_url="http://x", bearer_token=T_A, address="auto")
    with pytest.raises(corral.SandboxUnreachable):
        m.get_info("x")  # nothing listens there: infrastructure, retryable
    with pytest.raises(corral.InvalidRequest, match="JSON"):
        m.create(meta={"x": object()})


def test_remote_ops_mirror_the_embedded_ops():
    import inspect

    from corral.manager._async.ops import AsyncOps
    from corral.remote import AsyncRemoteOps, RemoteOps

    public = lambda c: {n for n in dir(c) if not n.startswith("_") and callable(getattr(c, n))}  # noqa: E731
    assert public(AsyncOps) - {"proxy_url"} <= public(AsyncRemoteOps)
    for name in public(AsyncOps):
        a, r = inspect.signature(getattr(AsyncOps, name)), inspect.signature(getattr(AsyncRemoteOps, name))
        assert list(a.parameters) == list(r.parameters), name
        assert inspect.iscoroutinefunction(getattr(AsyncRemoteOps, name)) == inspect.iscoroutinefunction(
            getattr(AsyncOps, name)), name
    assert {n.replace("aclose", "close") for n in public(AsyncRemoteOps)} == public(RemoteOps)


async def test_failures_outside_corrals_tree_are_still_errors_on_the_wire(caplog):
    """A backend whose actors are gone (a Ray error) answers 503, retryable; anything unexpected, 500.
    A stand-in backend: only the app's mapping of exceptions is under test here."""
    import logging

    import httpx
    import ray.exceptions

    from corral.gateway import create_app
    from corral.gateway.backend import OPERATIONS

    class Failing:
        pass

    async def actors_gone(*a, **kw):
        raise ray.exceptions.RayActorError()

    async def broken(*a, **kw):
        raise ValueError("boom")

    for op in OPERATIONS:
        setattr(Failing, op, staticmethod(actors_gone))
    Failing.status = staticmethod(broken)
    caplog.set_level(logging.DEBUG)
    app = create_app(Failing(), f"alpha {T_A}")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g",
                                 headers={"Authorization": f"Bearer {T_A}"}) as c:
        r = await c.post("/get_info", json={"identity": "x"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "sandbox_unreachable" and r.json()["error"]["retryable"] is True
        r = await c.post("/status", json={})
        assert r.status_code == 500
        assert r.json()["error"] == {"code": "corral_error", "message": "internal error in the gateway (ValueError)",
                                     "retryable": False}
    assert "ValueError" in caplog.text and T_A not in caplog.text


def test_routes_are_remembered_for_their_ttl_per_tenant_and_bounded():
    from corral.gateway.proxy import Routes

    now = [0.0]
    r = Routes(ttl=2.0, limit=10, clock=lambda: now[0])
    r.put("a", "sb1", {"url": "u1"})
    r.put("b", "sb1", {"url": "other"})
    assert r.get("a", "sb1") == {"url": "u1"} and r.get("b", "sb1") == {"url": "other"}
    assert r.get("a", "sb2") is None
    now[0] = 2.5
    assert r.get("a", "sb1") is None  # expired
    r.put("a", "sb1", {"url": "u1"})
    r.forget("a")
    assert r.get("a", "sb1") is None and r.get("b", "sb1") is None  # b's expired too
    for i in range(25):
        r.put("a", f"x{i}", {"i": i})
    assert len(r._routes) <= 10 and r.get("a", "x24") == {"i": 24}
    off = Routes(ttl=0)
    off.put("a", "sb", {"url": "u"})
    assert off.get("a", "sb") is None
