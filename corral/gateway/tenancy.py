"""Which sandboxes and sessions belong to which tenant (pure logic, no Ray, no HTTP).

The gateway sits in front of one corral namespace shared by every tenant, and
may only use the manager's public API. It marks ownership in two places the
registry already keeps, and only the gateway writes through HTTP:

- **a reserved meta key**, :data:`TENANT_KEY`, set on every sandbox a tenant
  creates or acquires (``create``, ``create_from_pool``, ``acquire``). A
  tenant's own meta may not contain it: a request that tries is refused, so a
  tenant cannot forge or borrow another tenant's tag.
- **session ids namespaced per tenant**: a tenant's session ``ep-17`` is the
  session ``<tenant>/ep-17`` inside corral. Tenant names cannot contain ``/``,
  so each tenant's sessions form a prefix no other tenant can name. Records
  and answers going back to the tenant carry its own ids (the prefix removed).

A record belongs to tenant T when its tag is T **and** it is bound to no
session or to one of T's sessions. The second half matters for reused
sandboxes: while a released sandbox is being reset its meta still carries the
old tag, and a sandbox bound to a session outside T's prefix is not T's,
whatever its meta says. Tool calls and the proxy also require a live state.
"""

from __future__ import annotations

import secrets

from typing import Any, Optional

from corral.errors import InvalidRequest

__all__ = [
    "TENANT_KEY",
    "SEP",
    "scope",
    "unscope",
    "owns",
    "tag_meta",
    "public_record",
    "MAX_SESSION_ID",
]

#: The reserved meta key holding a sandbox's tenant.
TENANT_KEY = "corral.tenant"
#: Between a tenant's name and its own session id (tenant names never hold it).
SEP = ":"
#: Longest session id corral takes; a tenant's own part is shorter by its name and SEP.
MAX_SESSION_ID = 256


def scope(tenant: str, session_ctx_id: Any, what: str = "session_ctx_id") -> str:
    """The corral session id of a tenant's session id."""
    if not isinstance(session_ctx_id, str) or not session_ctx_id:
        raise InvalidRequest(f"{what} must be a non-empty string, got {session_ctx_id!r}")
    room = MAX_SESSION_ID - len(tenant) - len(SEP)
    if len(session_ctx_id) > room:
        raise InvalidRequest(f"{what} is longer than {room} characters")
    return f"{tenant}{SEP}{session_ctx_id}"


def unscope(tenant: str, session_ctx_id: Optional[str]) -> Optional[str]:
    """The tenant's own id for a corral session id of its own (None for anything else)."""
    prefix = tenant + SEP
    if isinstance(session_ctx_id, str) and session_ctx_id.startswith(prefix):
        return session_ctx_id[len(prefix):]
    return None


def owns(tenant: str, record: Any) -> bool:
    """Whether ``record`` (a registry record as a dict) belongs to ``tenant``."""
    if not isinstance(record, dict):
        return False
    meta = record.get("meta") or {}
    if not isinstance(meta, dict) or meta.get(TENANT_KEY) != tenant:
        return False
    sid = record.get("session_ctx_id")
    return sid is None or unscope(tenant, sid) is not None


def tag_meta(tenant: str, meta: Any) -> dict:
    """A tenant's meta with its tag set and its session id scoped (a copy)."""
    if meta is None:
        meta = {}
    if not isinstance(meta, dict):
        raise InvalidRequest(f"meta must be an object, got {type(meta).__name__}")
    if TENANT_KEY in meta:
        raise InvalidRequest(f"meta key {TENANT_KEY!r} is reserved: the gateway sets it")
    out = dict(meta)
    sid = out.get("session_ctx_id")
    # Every sandbox has a session (its clock); one made without gets one of the tenant's own.
    out["session_ctx_id"] = scope(tenant, sid if sid is not None else "auto-" + secrets.token_hex(8),
                                  "meta.session_ctx_id")
    out[TENANT_KEY] = tenant
    return out


def public_record(tenant: str, record: dict) -> dict:
    """A record as its tenant sees it over HTTP: no box token, its own session ids, no tag."""
    out = dict(record)
    out.pop("runtime_token", None)
    if "session_ctx_id" in out:
        out["session_ctx_id"] = unscope(tenant, out["session_ctx_id"])
    meta = out.get("meta")
    if isinstance(meta, dict):
        meta = {k: v for k, v in meta.items() if k != TENANT_KEY}
        if "session_ctx_id" in meta:
            meta["session_ctx_id"] = unscope(tenant, meta["session_ctx_id"])
        out["meta"] = meta
    return out
